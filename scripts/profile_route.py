"""Where the capacity-aware block's extra time goes at large M (H200): routes timed alone, and a profile.

For each (shape, M): the Token Drop routing (γ = 1.5, score) timed under CUDA-graph replay as shipped
(pairs sorted by expert first above routing_kernels.SORTED_MIN_PAIRS), always sorted, and with every
program scanning the whole group, the dispatch alone, and then one eager call of the
patched block with and without capacity under torch.profiler: the kernels that take the time.
``--dispatch-sweep``: the dispatch alone for several chunk sizes and warp counts; prints BEST.

    PYTHONPATH=$PWD python3 scripts/profile_route.py --out $OUT/route
"""

from __future__ import annotations

# ruff: noqa: B023  (every lambda is timed before its loop variables change)
import argparse
import sys
from pathlib import Path

import torch

import moepatch
from moepatch.ops import experts as ex
from moepatch.ops import routing_kernels as rk
from moepatch.ops.routing import route_sync_free
from moepatch.ops.tuning import _time
from moepatch.patch.registry import family_for
from moepatch.routing import make_config

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernels import SHAPES, _Holder, build_block, capture  # noqa: E402  (scripts/ is not a package)


def graph_ms(fn, reps=30):
    g, _ = capture(fn)
    return _time(g.replay, reps, torch.device("cuda"), hide_launch=True)


def _log_kernels(prof, log, limit=12):
    events = sorted(prof.key_averages(), key=lambda e: -e.self_device_time_total)[:limit]
    for e in events:
        log(f"    {e.self_device_time_total:9.1f} {e.count:4d}  {e.key[:90]}")


DISPATCH_VARIANTS = [(128, 4), (64, 4), (128, 8), (256, 8), (32, 4)]  # (pairs per chunk, warps)


def dispatch_sweep(cases: str, log) -> None:
    """The dispatch alone (block_m 1 and 128) per (pairs per chunk, warps): layout checked, graph µs."""
    from moepatch.ops import dispatch_kernels as dk

    saved = dk.CHUNK, dk.NUM_WARPS
    totals = {}
    for case in cases.split(","):
        name, M = case.split(":")
        E, K = SHAPES[name]["E"], SHAPES[name]["K"]
        ids = torch.rand(int(M), E, device="cuda").topk(K, dim=1).indices
        dk.CHUNK, dk.NUM_WARPS = saved
        want = ex.dispatch(ids, E, 128, fuse=False)
        for chunk, warps in DISPATCH_VARIANTS:
            dk.CHUNK, dk.NUM_WARPS = chunk, warps
            got = ex.dispatch(ids, E, 128, fuse=False)
            same = torch.equal(got.sorted_pairs_R, want.sorted_pairs_R) and torch.equal(got.start_E1, want.start_E1)
            t1 = graph_ms(lambda: ex.dispatch(ids, E, 1, fuse=False).sorted_pairs_R)
            t128 = graph_ms(lambda: ex.dispatch(ids, E, 128, fuse=False).sorted_pairs_R)
            totals[(chunk, warps)] = totals.get((chunk, warps), 0.0) + (t128 if same else float("inf"))
            log(f"[dispatch {name} M={M}] chunk {chunk} warps {warps}: block 1 {t1 * 1e3:.1f} us, block 128 "
                f"{t128 * 1e3:.1f} us, same layout {same}")
    dk.CHUNK, dk.NUM_WARPS = saved
    best = min(totals, key=totals.get)
    log(f"BEST {best[0]} {best[1]}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", default="qwen3_30b_a3b:1024,qwen3_30b_a3b:16384,olmoe:16384,mixtral:16384")
    p.add_argument("--out", default="profile_route_out")
    p.add_argument("--dispatch-sweep", action="store_true", help="only time dispatch chunk/warp variants")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = []

    def log(s=""):
        print(s, flush=True)
        lines.append(s)

    if args.dispatch_sweep:
        dispatch_sweep(args.cases, log)
        (out / "dispatch_sweep.txt").write_text("\n".join(lines) + "\n")
        return 0

    for case in args.cases.split(","):
        name, M = case.split(":")
        M = int(M)
        shape = SHAPES[name]
        blk, cfg = build_block(shape, torch.bfloat16, "cuda")
        holder = _Holder(blk, cfg)
        scoring = family_for(holder).scoring(blk.gate)
        E = shape["E"]
        x = torch.randn(M, shape["H"], device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            logits, w, ids = blk.gate(x)
            scores = scoring.scores(logits)
            factor = scoring.factor(scores, ids)
            rcfg = make_config(1.5, "drop", num_experts=E, collect_stats=False)

            def route():
                return route_sync_free(rcfg, scores, ids, w, factor, batch=1, seq=M).topk_ids_TW

            want = route()
            t_default = graph_ms(route)
            saved = rk.SORTED_MIN_PAIRS
            rk.SORTED_MIN_PAIRS = 0
            same = bool(torch.equal(route(), want))
            t_sorted = graph_ms(route)
            rk.SORTED_MIN_PAIRS = 1 << 62
            same = same and bool(torch.equal(route(), want))
            t_scan = graph_ms(route)
            rk.SORTED_MIN_PAIRS = saved
            t_disp = graph_ms(lambda: ex.dispatch(ids, E, 1, fuse=False).sorted_pairs_R)
            loads = torch.bincount(ids.flatten(), minlength=E)
            log(f"[{name} M={M}] route default {t_default * 1e3:.1f} us (sorted above {saved} pairs), sorted "
                f"{t_sorted * 1e3:.1f} us, scan {t_scan * 1e3:.1f} us (same pairs: "
                f"{same}), dispatch(block 1) {t_disp * 1e3:.1f} us; load max {int(loads.max())} mean "
                f"{loads.float().mean():.0f}, dropped {int((want >= E).sum())} of {ids.numel()}")
            xb = x.view(1, M, -1)
            for gamma in (None, 1.5):
                with moepatch.patched(holder, gamma, kernel="triton", collect_stats=False):
                    for _ in range(2):
                        blk(xb)
                    torch.cuda.synchronize()
                    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                        blk(xb)
                        torch.cuda.synchronize()
                    log(f"  block γ={gamma}: top kernels (self device µs, calls)")
                    _log_kernels(prof, log)
                    # The same block as a CUDA graph: its device time, and every kernel node of one replay.
                    g, _ = capture(lambda b=blk: b(xb))
                    t_graph = _time(g.replay, 30, torch.device("cuda"), hide_launch=True)
                    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                        g.replay()
                        torch.cuda.synchronize()
                    nodes = sum(e.count for e in prof.key_averages() if e.self_device_time_total > 0)
                    log(f"  block γ={gamma} as a graph: {t_graph * 1e3:.1f} us, {nodes} kernels per replay")
                    _log_kernels(prof, log, limit=40)
            for bm in (1, 128):
                for _ in range(2):
                    ex.dispatch(ids, E, bm, fuse=False)
                torch.cuda.synchronize()
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                    for _ in range(5):
                        ex.dispatch(ids, E, bm, fuse=False)
                    torch.cuda.synchronize()
                log(f"  dispatch block_m={bm}, 5 calls: kernels (self device µs, calls)")
                _log_kernels(prof, log)
        del blk, holder
        torch.cuda.empty_cache()
    (out / "profile.txt").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
