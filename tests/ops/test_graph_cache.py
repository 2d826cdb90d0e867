"""moepatch.ops.graph_cache.GraphCache: when a signature runs eagerly, is captured, replayed or kept eager.

The bookkeeping is plain Python; here the "graph" is an object whose replay is a Python function and
``wall`` is told which side is faster, so the decisions are checked without a GPU (the CUDA graphs
themselves are checked on the GPU in test_expert_graphs.py and test_routing_sync_free.py).
"""

import pytest

from moepatch.ops.graph_cache import GraphCache


class _Recorder:
    def __init__(self, replay_faster=True, capture_fails=False):
        self.eager_calls, self.captures, self.replays = 0, 0, 0
        self.replay_faster, self.capture_fails = replay_faster, capture_fails

    def eager(self):
        self.eager_calls += 1
        return "eager"

    def capture(self):
        self.captures += 1
        if self.capture_fails:
            raise RuntimeError("operation not permitted when stream is capturing")
        rec = self

        class Graph:
            def replay(self, inputs):
                rec.replays += 1
                return ("replay", inputs)
        return Graph()

    def wall(self, fn, reps=3):
        fn()
        is_replay = fn.__name__ == "<lambda>"  # GraphCache times the replay through a lambda
        return 0.0 if is_replay == self.replay_faster else 1.0

    def call(self, cache, key, warmup=2):
        return cache.call(key, (key,), self.eager, self.capture, warmup_calls=warmup, wall=self.wall)


def test_warm_up_then_one_capture_then_replays():
    cache, rec = GraphCache(max_graphs=8), _Recorder()
    got = [rec.call(cache, "a") for _ in range(6)]
    assert got[:2] == ["eager", "eager"]  # the warm-up calls
    assert got[2:] == [("replay", ("a",))] * 4
    assert rec.captures == 1
    assert cache.captured(object) == 1


def test_slower_replay_and_failed_capture_stay_eager_for_good():
    for rec in (_Recorder(replay_faster=False), _Recorder(capture_fails=True)):
        cache = GraphCache(max_graphs=8)
        got = [rec.call(cache, "a") for _ in range(6)]
        assert got == ["eager"] * 6
        assert rec.captures == 1 and cache.entries == {"a": False}


@pytest.mark.parametrize("warmup", [0, 1, 3])
def test_signatures_are_counted_apart(warmup):
    cache, rec = GraphCache(max_graphs=8), _Recorder()
    for _ in range(warmup):
        assert rec.call(cache, "a", warmup) == "eager"
        assert rec.call(cache, "b", warmup) == "eager"
    assert rec.call(cache, "a", warmup)[0] == "replay"
    assert rec.call(cache, "b", warmup)[0] == "replay"
    assert rec.captures == 2


def test_full_cache_runs_new_signatures_eagerly_without_recording_them():
    cache, rec = GraphCache(max_graphs=2), _Recorder()
    for key in ("a", "b"):
        for _ in range(3):
            rec.call(cache, key)
    assert [rec.call(cache, "c") for _ in range(5)] == ["eager"] * 5
    assert set(cache.entries) == {"a", "b"} and rec.captures == 2
    cache.clear()
    assert not cache.entries
