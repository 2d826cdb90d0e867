"""scripts/bench_ep.py's routing construction (skewed, exact in bf16, reproducible; no process group)
and scripts/traces.py's reading of profiled calls."""


import pytest
import torch
from repo_files import load_module  # tests/repo_files.py

from moepatch.tiny import tiny_model


def _load(name):
    return load_module(f"scripts/{name}.py")


bench_ep, traces = _load("bench_ep"), _load("traces")
calibrate, hidden_states, routing_logits = bench_ep.calibrate, bench_ep.hidden_states, bench_ep.routing_logits
selector, set_selector_gate, zipf_shares = bench_ep.selector, bench_ep.set_selector_gate, bench_ep.zipf_shares
exposed_communication, call_exposures = traces.exposed_communication, traces.call_exposures
profile_calls, rank_exposures = traces.profile_calls, traces.rank_exposures


@pytest.mark.parametrize("E, K, skew", [(8, 2, 1.8), (8, 2, 1.6), (2, 1, 1.8), (64, 8, 2.0)])
def test_zipf_shares_hit_the_target_skew(E, K, skew):
    shares = zipf_shares(E, K, skew, seed=0)
    assert shares.sum().item() == pytest.approx(1.0)
    assert shares.max().item() * E == pytest.approx(skew, rel=1e-6)


def test_clustered_placement_puts_the_hottest_experts_first():
    shares = zipf_shares(8, 2, 1.8, seed=0, placement="clustered")
    assert torch.equal(shares.argsort(descending=True), torch.arange(8))


def test_impossible_skew_is_refused():
    with pytest.raises(ValueError, match="impossible"):
        zipf_shares(8, 2, 4.0, seed=0)


@pytest.mark.parametrize("E, K", [(8, 2), (2, 1)])
def test_sampled_load_follows_the_profile(E, K):
    shares = zipf_shares(E, K, 1.8, seed=0)
    log_p = calibrate(shares, K, seed=0)
    logits = routing_logits(log_p, 20000, torch.Generator().manual_seed(1))
    load = torch.bincount(logits.topk(K, dim=1).indices.reshape(-1), minlength=E).double()
    assert (load / load.sum() * E).max().item() == pytest.approx(1.8, abs=0.06)


def test_logits_are_exact_in_bf16_distinct_and_reach_the_router_unchanged():
    log_p = calibrate(zipf_shares(8, 2, 1.8, seed=0), 2, seed=0)
    logits = routing_logits(log_p, 500, torch.Generator().manual_seed(2))
    assert torch.equal(logits.bfloat16().float(), logits)
    s = logits.sort(dim=1).values
    assert bool((s[:, 1:] > s[:, :-1]).all())  # no ties inside a row
    model = tiny_model("mixtral", dtype=torch.bfloat16)
    block = model.model.layers[0].mlp
    set_selector_gate(block, 32)
    x = hidden_states(logits, 32, torch.Generator().manual_seed(3)).bfloat16()
    assert x[:, selector(8, 32)].float().equal(logits)
    with torch.no_grad():
        router_logits = block.gate(x)[0]
    assert torch.equal(router_logits.float(), logits)


def _kernel(name, ts, dur, stream):
    return {"ph": "X", "cat": "kernel", "name": name, "ts": ts, "dur": dur, "args": {"stream": stream}}


def test_exposed_communication_counts_nccl_time_without_compute_beside_it(tmp_path):
    """Two profiled calls (a barrier all-reduce before each): NCCL kernels on a side stream are
    exposed only where the compute stream (most non-NCCL time) runs nothing; NCCL kernels on the
    compute stream itself are never their own cover."""
    import json

    events = []
    for base in (0, 1000):
        events += [_kernel("ncclDevKernel_AllReduce_Sum", base, 5, 7),
                   _kernel("gemm", base + 10, 100, 7), _kernel("gemm", base + 150, 100, 7),
                   _kernel("ncclDevKernel_SendRecv", base + 50, 40, 20),  # beside the first GEMM: hidden
                   _kernel("ncclDevKernel_SendRecv", base + 100, 80, 20),  # 110-150 exposed (40 of 80)
                   _kernel("ncclDevKernel_SendRecv", base + 300, 30, 7)]  # on the compute stream: exposed
    path = tmp_path / "trace.json"
    path.write_text(json.dumps({"traceEvents": events}))
    got = exposed_communication(path)
    assert got["calls"] == 2
    assert got["nccl_ms"] == pytest.approx((40 + 80 + 30) / 1e3)  # 50-90, 100-180 and 300-330, per call
    assert got["exposed_ms"] == pytest.approx((40 + 30) / 1e3)
    assert got["compute_ms"] == pytest.approx(200 / 1e3)  # the two GEMMs per call
    assert got["per_call"] == [pytest.approx([0.15, 0.07, 0.2])] * 2


def test_exposed_communication_counts_compute_on_any_stream(tmp_path):
    """A CUDA graph replay runs one logical stream's kernels on several hardware streams: an
    exchange beside a GEMM on the second of them is hidden (the default), while the older reading
    (``compute="stream"``: the busiest stream only) calls it exposed; unknown readings are refused."""
    import json

    events = [_kernel("ncclDevKernel_AllReduce_Sum", 0, 5, 7), _kernel("gemm", 10, 300, 7),
              _kernel("gemm", 320, 100, 216),  # the window, moved to another stream by the graph
              _kernel("ncclDevKernel_SendRecv", 330, 80, 218),  # beside it
              _kernel("ncclDevKernel_SendRecv", 430, 20, 219)]  # beside nothing
    path = tmp_path / "trace.json"
    path.write_text(json.dumps({"traceEvents": events}))
    assert exposed_communication(path)["per_call"] == [pytest.approx([0.1, 0.02, 0.4])]
    assert exposed_communication(path, compute="stream")["per_call"] == [pytest.approx([0.1, 0.1, 0.3])]
    with pytest.raises(ValueError, match="compute='all'; accepted: 'any', 'stream'"):
        exposed_communication(path, compute="all")


def test_exposed_communication_tells_the_calls_apart(tmp_path):
    """Per call (split at each barrier's all-reduce): a slow first call shows as such, and the
    means are the means of the calls."""
    import json

    events = [_kernel("ncclDevKernel_AllReduce_Sum", 0, 5, 7), _kernel("gemm", 10, 100, 7),
              _kernel("ncclDevKernel_SendRecv", 110, 300, 20),  # nothing beside it: 300 exposed
              _kernel("gemm", 410, 100, 7)]
    for base in (1000, 2000, 3000):
        events += [_kernel("ncclDevKernel_AllReduce_Sum", base, 5, 7), _kernel("gemm", base + 10, 400, 7),
                   _kernel("ncclDevKernel_SendRecv", base + 50, 100, 20)]  # hidden
    events[-1]["dur"] = 400  # the last call's exchange outlives the GEMM (to base + 410) by 40
    path = tmp_path / "trace.json"
    path.write_text(json.dumps({"traceEvents": events}))
    got = exposed_communication(path)
    assert got["calls"] == 4
    assert [c[1] for c in got["per_call"]] == pytest.approx([0.3, 0.0, 0.0, 0.04])
    assert [c[2] for c in got["per_call"]] == pytest.approx([0.2, 0.4, 0.4, 0.4])
    assert got["exposed_ms"] == pytest.approx(0.34 / 4)


def test_call_exposures_pick_the_critical_rank_call_by_call():
    rank0 = [[0.5, 0.30, 5.0], [0.5, 0.01, 5.0], [0.5, 0.02, 4.0]]
    rank1 = [[0.5, 0.10, 4.0], [0.5, 0.20, 4.5], [0.5, 0.40, 4.5]]
    got = call_exposures([rank0, rank1])
    assert got["calls"] == 3
    assert got["critical_rank"] == [0, 0, 1]
    assert got["critical_exposed"] == [0.30, 0.01, 0.40]
    assert got["exposed"] == [0.30, 0.20, 0.40]
    assert got["critical_exposed_median"] == 0.30
    assert got["critical_exposed_mean"] == pytest.approx(0.71 / 3)
    assert call_exposures([[], []])["calls"] == 0


def test_profile_calls_discards_the_warm_up_call(tmp_path):
    """With an output directory, one call more than asked runs (the profiler's warm-up) and only
    the asked calls are in the trace; without one nothing runs."""
    import json

    ran = []

    def fn():
        ran.append(1)
        with torch.profiler.record_function("moepatch_probe_call"):
            torch.ones(8).sum()

    assert profile_calls(fn, "x", None, calls=2) is None and not ran
    trace = profile_calls(fn, "probe/a", tmp_path, calls=3)
    assert len(ran) == 4 and trace == tmp_path / "probe_a.rank0.json"
    events = json.loads(trace.read_text())["traceEvents"]
    assert sum(e.get("name") == "moepatch_probe_call" for e in events) == 3
    assert (tmp_path / "probe_a.rank0.txt").read_text().strip()
    with pytest.raises(ValueError, match="positive number of calls"):
        profile_calls(fn, "x", tmp_path, calls=0)


def test_rank_exposures_judge_by_the_rank_with_the_most_compute():
    """The lighter rank (less compute) waits at the combine: the largest exposure, but not the unit's end."""
    got = rank_exposures([[0.5, 0.02, 17.7], [2.1, 0.25, 16.4]])
    assert got["critical_rank"] == 0 and got["critical_exposed"] == 0.02
    assert got["exposed"] == 0.25 and got["nccl"] == 2.1 and got["compute"] == [17.7, 16.4]
    assert rank_exposures([[1.0, 0.3, 5.0]])["critical_exposed"] == 0.3


def test_trace_exposure_script_reads_both_readings(tmp_path, capsys):
    """scripts/trace_exposure.py: per rank trace of one prefix, the critical (most compute) rank's
    exposure per call under both readings, and the fraction hidden of a given all-to-all time."""
    import json

    mod = load_module("scripts/trace_exposure.py")
    heavy = [_kernel("ncclDevKernel_AllReduce_Sum", 0, 5, 7), _kernel("gemm", 10, 300, 7),
             _kernel("gemm", 320, 100, 216), _kernel("ncclDevKernel_SendRecv", 330, 80, 218),
             _kernel("ncclDevKernel_SendRecv", 430, 20, 219)]
    light = [_kernel("ncclDevKernel_AllReduce_Sum", 0, 5, 7), _kernel("gemm", 10, 50, 7),
             _kernel("ncclDevKernel_SendRecv", 100, 300, 218)]
    for rank, events in enumerate((light, heavy)):
        (tmp_path / f"unit.rank{rank}.json").write_text(json.dumps({"traceEvents": events}))
    assert mod.main([str(tmp_path / "unit"), "--a2a-ms", "0.1"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("   any: critical exposure per call (ms) 0.020;") and "hidden 80.0%" in out[0]
    assert out[1].startswith("stream: critical exposure per call (ms) 0.100;") and "hidden 0.0%" in out[1]
    with pytest.raises(SystemExit):
        mod.main([str(tmp_path / "missing")])
