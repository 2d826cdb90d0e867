"""A failing rank must end every rank with an error in bounded time, never a deadlock."""

import pytest
from launch import run_ranks

pytestmark = pytest.mark.distributed


@pytest.mark.parametrize("mode, error", [("raise", "ValueError"), ("raise-in-experts", "MemoryError")])
def test_raising_rank_stops_the_other_at_once(tmp_path, mode, error):
    results, wall = run_ranks("failure", tmp_path, args=(mode,), timeout_s=30, limit_s=25)
    r0, r1 = results
    assert r0.returncode == 0 and r1.returncode == 0, (r0.output[-2000:], r1.output[-2000:])
    assert r1.result["error"] == error
    assert r0.result["error"] == "PeerFailedError", r0.result
    # told by the abort header, not by the 30 s process-group timeout
    assert r0.result["elapsed"] < 5
    assert wall < 25


def test_crashed_rank_is_noticed_by_the_transport(tmp_path):
    results, wall = run_ranks("failure", tmp_path, args=("crash",), timeout_s=30, limit_s=25)
    r0, r1 = results
    assert r1.returncode == 3
    assert r0.returncode == 0 and r0.result["error"] == "CollectiveError", r0.output[-2000:]
    assert r0.result["elapsed"] < 10


def test_blocked_rank_is_bounded_by_the_process_group_timeout(tmp_path):
    results, wall = run_ranks("failure", tmp_path, args=("hang",), timeout_s=2, limit_s=25)
    r0, r1 = results
    assert r0.returncode == 0 and r0.result["error"] == "CollectiveError", r0.output[-2000:]
    assert "Timed out" in r0.result["message"]
    assert 1.5 < r0.result["elapsed"] < 6
    assert r1.returncode == 4  # the blocked rank came back and exited by itself
