"""Profiles of expert-parallel calls, and how much of their NCCL time no compute kernel hides.

Shared by scripts/bench_ep.py, scripts/bench_scmoe.py (which write the traces, with
``--profile-dir``) and scripts/trace_exposure.py (which re-reads them).  Not a timing: the profiler
adds overhead; a trace shows what the GPU runs, where it idles and which streams overlap
(docs/expert-parallel.md, "Reading a profile").
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import torch


def add_profile_arguments(p) -> None:
    """The ``--profile-*`` options of the benchmarks that call :func:`profile_calls`."""
    p.add_argument("--profile-dir", type=Path, default=None,
                   help="also profile each timed call under torch.profiler and write every rank's kernel table "
                        "and Chrome trace here (diagnostics, not a timing)")
    p.add_argument("--profile-calls", type=int, default=8, help="profiled calls kept per trace (with --profile-dir)")
    p.add_argument("--profile-cpu", action="store_true",
                   help="on CUDA, record the CPU ops and launches too (adds host time per launch)")


def check_counts(p, args) -> None:
    """The benchmarks' --nproc and --profile-calls must be positive (argparse error otherwise)."""
    if args.nproc is not None and args.nproc < 1:
        p.error(f"--nproc {args.nproc}: accepted a positive number of ranks")
    if args.profile_calls < 1:
        p.error(f"--profile-calls {args.profile_calls}: accepted a positive number of calls")


def profile_calls(fn, tag: str, out: Path | None, calls: int = 8, cpu: bool = False) -> Path | None:
    """Run ``fn`` under torch.profiler and write this rank's kernel table and Chrome trace under ``out``
    (returns the trace's path); with ``out`` None nothing runs (None).

    One call warms the profiler up (recorded, then discarded: the first profiled call pays for
    the profiler's own start), then ``calls`` calls are kept, each after a barrier and with the GPU
    idle.  On CUDA only the GPU's activity is recorded (the CPU-op recording adds tens of
    microseconds of host time per launch, which distorts host-bound schedules); ``cpu=True``
    records the CPU ops and launches too."""
    if out is None:
        return None
    import torch.distributed as dist
    from torch.profiler import ProfilerActivity, profile, schedule

    if calls < 1:
        raise ValueError(f"profile_calls: calls={calls}; accepted: a positive number of calls")
    rank = dist.get_rank() if dist.is_initialized() else 0
    cuda = torch.cuda.is_available()
    acts = [ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    if cuda and cpu:
        acts.insert(0, ProfilerActivity.CPU)
    Path(out).mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), profile(activities=acts, schedule=schedule(wait=0, warmup=1, active=calls,
                                                                     repeat=1)) as prof:
        for _ in range(1 + calls):
            if dist.is_initialized():
                dist.barrier()
            if cuda:
                torch.cuda.synchronize()
            fn()
            if cuda:
                torch.cuda.synchronize()
            prof.step()
    name = "".join(c if c.isalnum() or c in "-_.@" else "_" for c in tag)
    sort = "cuda_time_total" if cuda else "cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=40)
    Path(out, f"{name}.rank{rank}.txt").write_text(table + "\n")
    trace = Path(out, f"{name}.rank{rank}.json")
    prof.export_chrome_trace(str(trace))
    return trace


def _union(intervals: list) -> list:
    out = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return out


def _length(intervals: list) -> float:
    return sum(b - a for a, b in intervals)


def _minus(xs: list, ys: list) -> list:
    """Union intervals xs minus union intervals ys."""
    out, j = [], 0
    for a, b in xs:
        while j < len(ys) and ys[j][1] <= a:
            j += 1
        k, cur = j, a
        while k < len(ys) and ys[k][0] < b:
            if ys[k][0] > cur:
                out.append([cur, ys[k][0]])
            cur = max(cur, ys[k][1])
            k += 1
        if cur < b:
            out.append([cur, b])
    return out


def exposed_communication(trace_path, compute: str = "any") -> dict:
    """From a Chrome trace of profile_calls: how long NCCL kernels ran with no compute kernel beside them.

    ``compute="any"`` (default): a compute kernel is any non-NCCL kernel, on any stream of this
    GPU; "exposed" is the time some NCCL kernel was running while no other kernel was (the GPU
    waited for the exchange, or nothing else was queued).  ``compute="stream"``: only the kernels
    of the compute stream count, the stream with the most non-NCCL kernel time (the older reading;
    under a CUDA graph replay one logical stream's kernels run on several hardware streams, so
    there it misreads).  "nccl" is the time any NCCL kernel ran; "compute" the time compute kernels
    ran (which rank is the critical path).  Milliseconds per call (the mean), and ``per_call``:
    ``[nccl, exposed, compute]`` of every call, the calls told apart by the barrier's all-reduce
    kernel in front of each (a kernel belongs to the call it starts in)."""
    if compute not in ("any", "stream"):
        raise ValueError(f"compute={compute!r}; accepted: 'any', 'stream'")
    events = json.loads(Path(trace_path).read_text())["traceEvents"]
    kernels = [e for e in events if e.get("ph") == "X" and e.get("cat") == "kernel"]
    busy: dict = {}
    for e in kernels:
        if "nccl" not in e["name"].lower():
            busy[e["args"].get("stream")] = busy.get(e["args"].get("stream"), 0.0) + e["dur"]
    nccl = [e for e in kernels if "nccl" in e["name"].lower() and "AllReduce" not in e["name"]]
    if not nccl or not busy:
        return dict(nccl_ms=0.0, exposed_ms=0.0, compute_ms=0.0, calls=0, per_call=[])
    streams = set(busy) if compute == "any" else {max(busy, key=busy.get)}
    starts = sorted(e["ts"] for e in kernels if "AllReduce" in e["name"]) or [min(e["ts"] for e in kernels)]
    starts[0] = min(starts[0], min(e["ts"] for e in kernels))
    per_call = []
    for lo, hi in zip(starts, starts[1:] + [float("inf")]):
        mine = [e for e in kernels if lo <= e["ts"] < hi]
        comm = _union([[e["ts"], e["ts"] + e["dur"]] for e in mine
                       if "nccl" in e["name"].lower() and "AllReduce" not in e["name"]])
        comp = _union([[e["ts"], e["ts"] + e["dur"]] for e in mine
                       if e["args"].get("stream") in streams and "nccl" not in e["name"].lower()])
        per_call.append([_length(comm) / 1e3, _length(_minus(comm, comp)) / 1e3, _length(comp) / 1e3])
    n = len(per_call)
    return dict(nccl_ms=sum(c[0] for c in per_call) / n, exposed_ms=sum(c[1] for c in per_call) / n,
                compute_ms=sum(c[2] for c in per_call) / n, calls=n, per_call=per_call)


def rank_exposures(per_rank: list[list[float]]) -> dict:
    """Combine every rank's ``[nccl_ms, exposed_ms, compute_ms]`` (from :func:`exposed_communication`).

    "exposed" is the largest exposure of any rank; "critical_exposed" the exposure of the rank with
    the most compute, whose end is the unit's end: a lighter rank that waits at an exchange for the
    slower one shows exposure that costs the unit nothing."""
    crit = max(range(len(per_rank)), key=lambda r: per_rank[r][2])
    return dict(nccl=max(r[0] for r in per_rank), exposed=max(r[1] for r in per_rank), critical_rank=crit,
                critical_exposed=per_rank[crit][1], compute=[r[2] for r in per_rank])


def call_exposures(per_rank_calls: list[list[list[float]]]) -> dict:
    """Every rank's ``per_call`` list (from :func:`exposed_communication`, the same calls on every
    rank) combined call by call with :func:`rank_exposures`: per call the largest exposure and
    the critical (most compute) rank's exposure, in ms, with their means and medians."""
    calls = min(len(r) for r in per_rank_calls)
    if calls == 0:
        return dict(calls=0, exposed=[], critical_exposed=[], critical_rank=[])
    rows = [rank_exposures([r[i] for r in per_rank_calls]) for i in range(calls)]
    out = dict(calls=calls, exposed=[r["exposed"] for r in rows],
               critical_exposed=[r["critical_exposed"] for r in rows], critical_rank=[r["critical_rank"] for r in rows])
    for key in ("exposed", "critical_exposed"):
        out[f"{key}_mean"] = statistics.fmean(out[key])
        out[f"{key}_median"] = statistics.median(out[key])
    return out
