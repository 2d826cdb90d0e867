"""Explore the descriptor GEMMs' per-tile overhead at large M (Mixtral layer, H200).

The question (docs/kernels.md, "Large M: per-tile overhead"): gate_up (K = H = 4096, 64 k-steps per
128 x 256 tile) sits at ~1.22x its FLOP floor while down (K = I = 14336, 224 k-steps) sits at ~1.13x
with the same tile.  One fixed cost c per tile fits both: 1.22 = (1 + c/64)/eta, 1.13 = (1 + c/224)/eta
gives c ~ 7 k-steps (~5 us: pipeline fill, epilogue, store) and eta ~ 0.91.  With one 192 KiB
program per SM nothing overlaps that cost.  Variants that should hide it: persistent programs whose
loop Triton flattens (the next tile's loads issued during this tile's epilogue), h stored through a
descriptor (bulk copy out of shared memory, in one or two parts), warp specialisation.

One run: for each M the gate_up and down variants are timed alone on the same gathered rows, in
alternating rounds (clock drift hits every variant alike), checked bit for bit against the table's
output; a dense cuBLAS GEMM of the same rows is the ceiling, an 8192^3 GEMM at the start and the end
shows the clock state; then the layer with the table against the layer with the best variants.
Table printed last.

    PYTHONPATH=$PWD python3 scripts/explore_large_m.py --out $OUT/large_m
"""

from __future__ import annotations

# ruff: noqa: B023  (every lambda is timed before its loop variables change)
import argparse
import json
import re
import sys
from pathlib import Path

import torch

from moepatch.ops import experts as ex
from moepatch.ops.tuning import busy_gpu, device_key, get_config

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernels import capture  # noqa: E402  (scripts/ is not a package)

PEAK = 790e12

# Overrides of the table's gate_up / down configuration (BLOCK_M 128, BLOCK_N 128 joint / 256, BLOCK_K 64, 8 warps).
GATE_UP = {
    "np g16 s4": dict(PERSISTENT=0, GROUP_M=16, num_stages=4),
    "np g8 s4": dict(PERSISTENT=0, GROUP_M=8, num_stages=4),
    "np g32 s4": dict(PERSISTENT=0, GROUP_M=32, num_stages=4),
    "p s4": dict(PERSISTENT=1, FLATTEN=0, num_stages=4),
    "pf s4": dict(PERSISTENT=1, FLATTEN=1, num_stages=4),
    "pf s3": dict(PERSISTENT=1, FLATTEN=1, num_stages=3),
    "np hd1 s3": dict(PERSISTENT=0, H_STORE_SPLIT=1, num_stages=3),
    "np hd1 s4": dict(PERSISTENT=0, H_STORE_SPLIT=1, num_stages=4),
    "np hd2 s4": dict(PERSISTENT=0, H_STORE_SPLIT=2, num_stages=4),
    "pf hd2 s4": dict(PERSISTENT=1, FLATTEN=1, H_STORE_SPLIT=2, num_stages=4),
    "pf hd1 s3": dict(PERSISTENT=1, FLATTEN=1, H_STORE_SPLIT=1, num_stages=3),
    "ws s3": dict(PERSISTENT=1, WARP_SPECIALIZE=1, num_stages=3),
    "ws hd2 s4": dict(PERSISTENT=1, WARP_SPECIALIZE=1, H_STORE_SPLIT=2, num_stages=4),
}
DOWN = {
    "np s4": dict(PERSISTENT=0, FLATTEN=0, num_stages=4),
    "p s4": dict(PERSISTENT=1, FLATTEN=0, num_stages=4),
    "pf s4": dict(PERSISTENT=1, FLATTEN=1, num_stages=4),
    "pf s3": dict(PERSISTENT=1, FLATTEN=1, num_stages=3),
    "ws s3": dict(PERSISTENT=1, WARP_SPECIALIZE=1, num_stages=3),
}


def graph_of(fn):
    g, _ = capture(fn)
    return g.replay


def alternating(fns: dict, rounds: int, reps: int) -> dict:
    """Median ms of each graph replay, timed in alternating rounds behind a spin (no launch counted)."""
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            for _ in range(reps):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                busy_gpu()
                a.record()
                fn()
                b.record()
                b.synchronize()
                times[k].append(a.elapsed_time(b))
    return {k: sorted(v)[len(v) // 2] for k, v in times.items()}


def peak_tflops(dev) -> float:
    a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    ms = alternating({"mm": graph_of(lambda: a @ b)}, 1, 10)["mm"]
    return 2 * 8192**3 / ms / 1e9


_GU = dict(BLOCK_N=128, BLOCK_K=64, GROUP_M=16, JOINT=1, PERSISTENT=1, FLATTEN=1, H_STORE_SPLIT=2, num_stages=4,
           num_warps=8)
_DN = dict(BLOCK_N=256, BLOCK_K=64, GROUP_M=16, SPLIT_K=1, PERSISTENT=0, num_stages=4, num_warps=8)
# Whole-layer descriptor configurations tried on the shapes whose table runs the pointer GEMMs.
LAYER = {
    "desc": {"BLOCK_M": 128, "DESC": True, "gate_up": _GU, "down": _DN},
    "desc dn-pf": {"BLOCK_M": 128, "DESC": True, "gate_up": _GU, "down": dict(_DN, PERSISTENT=1, FLATTEN=1)},
    "desc dn128": {"BLOCK_M": 128, "DESC": True, "gate_up": _GU,
                   "down": dict(_DN, BLOCK_N=128, PERSISTENT=1, FLATTEN=1)},
    "desc gu64": {"BLOCK_M": 128, "DESC": True, "gate_up": dict(_GU, BLOCK_N=64), "down": _DN},
    "desc bm64": {"BLOCK_M": 64, "DESC": True, "gate_up": dict(_GU, num_warps=4),
                  "down": dict(_DN, BLOCK_N=128, num_warps=4)},
}


def _weights(E: int, H: int, I: int, dev):  # noqa: E741
    """(w1, w2, gate) in bf16, seeded: every variant and every run sees the same layer."""
    torch.manual_seed(0)
    w1 = torch.randn(E, 2 * I, H, device=dev, dtype=torch.bfloat16) * 0.02
    w2 = torch.randn(E, H, I, device=dev, dtype=torch.bfloat16) * 0.02
    gate = torch.randn(E, H, device=dev, dtype=torch.bfloat16) * H**-0.5
    return w1, w2, gate


def _routed(M: int, H: int, K: int, gate: torch.Tensor):
    """(x, ids, wts) of M random tokens routed top-K by the softmax gate."""
    x = torch.randn(M, H, device=gate.device, dtype=torch.bfloat16)
    wts, ids = (x @ gate.T).float().softmax(-1).topk(K, dim=-1)
    return x, ids.contiguous(), (wts / wts.sum(-1, keepdim=True)).to(torch.bfloat16)


def _floor_ms(M: int, E: int, H: int, I: int, K: int) -> float:  # noqa: E741
    return max(2 * M * K * 3 * H * I / PEAK, (E * 3 * H * I * 2 + 2 * M * H * 2) / 4.3e12) * 1e3


def layers(args, log) -> list:
    """--shape other than mixtral: the table's layer against descriptor layers, alternating rounds."""
    from moepatch.ops.tuning import PRESET_SHAPES, default_config

    dev = torch.device("cuda")
    E, H, I, K = (PRESET_SHAPES[args.shape] if not args.dims  # noqa: E741
                  else tuple(int(v) for v in args.dims.split(",")))
    w1, w2, gate = _weights(E, H, I, dev)
    summary = []
    for M in [int(m) for m in args.ms.split(",")]:
        x, ids, wts = _routed(M, H, K, gate)
        table = get_config(M, E, H, I, K, device_key(dev))
        ref = ex.fused_experts_impl(x, ids, wts, w1, w2, config=table)
        floor = _floor_ms(M, E, H, I, K)
        fns = {}
        defaults = [("pointer default", default_config(M, E, H, I, K, "cuda")),
                    ("desc default", default_config(M, E, H, I, K, "cuda", descriptors=True))]
        for name, c in [("table", table)] + defaults + list(LAYER.items()):
            if name != "table" and args.candidates and not re.search(args.candidates, name):
                continue
            try:
                err = rel(ex.fused_experts_impl(x, ids, wts, w1, w2, config=c), ref)
                fns[name] = graph_of(lambda c=c: ex.fused_experts_impl(x, ids, wts, w1, w2, config=c))
                log(f"  {args.shape} M={M} {name}: rel err vs table {err:.1e}")
                if err > 1e-2:
                    fns.pop(name)
            except Exception as exc:  # report and go on
                log(f"  {args.shape} M={M} {name}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
                if isinstance(exc, torch.AcceleratorError):
                    raise
        ms = alternating(fns, args.rounds, args.reps)
        for name, t in ms.items():
            log(f"| {args.shape} | {M} | {name} | {t:.3f} | {t / floor:.3f} | {t / ms['table']:.3f} |")
        best = min(ms, key=ms.get)
        summary.append(dict(M=M, floor=floor, table=ms["table"], best=ms[best], name=best,
                            ms={k: v for k, v in ms.items()}, config=dict([("table", table)] + defaults,
                                                                          **LAYER).get(best)))
        del fns
        torch.cuda.empty_cache()
    log("| M | floor | table | best | table/floor | best/floor | best |")
    log("|---:|---:|---:|---:|---:|---:|---|")
    for r in summary:
        log(f"| {r['M']} | {r['floor']:.3f} | {r['table']:.3f} | {r['best']:.3f} | {r['table'] / r['floor']:.3f} | "
            f"{r['best'] / r['floor']:.3f} | {r['name']} |")
    return summary


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--ms", default="1024,4096,16384")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--skip", default="", help="regex of 'part variant' names to leave out")
    ap.add_argument("--shape", default="mixtral", help="mixtral (per-GEMM variants) or another preset (layers)")
    ap.add_argument("--candidates", default="", help="regex of the layer candidates to time (the table always)")
    ap.add_argument("--dims", default="", help="E,H,I,K of a shape no table has (whole layers, with --shape NAME)")
    ap.add_argument("--out", default="out/large_m")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    logf = open(out / "log.txt", "w")

    def log(*a, end="\n"):
        s = " ".join(str(x) for x in a)
        print(s, end=end, flush=True)
        logf.write(s + end)
        logf.flush()

    if args.shape != "mixtral":
        summary = layers(args, log)
        (out / f"layers_{args.shape}.json").write_text(json.dumps(summary, indent=1))
        return 0
    dev = torch.device("cuda")
    E, H, I, K = 8, 4096, 14336, 2  # noqa: E741
    w1, w2, gate = _weights(E, H, I, dev)
    log(f"{torch.cuda.get_device_name()} torch {torch.__version__}; 8192^3 bf16 GEMM at start: "
        f"{peak_tflops(dev):.0f} TFLOP/s")
    summary = []
    for M in [int(m) for m in args.ms.split(",")]:
        x, ids, wts = _routed(M, H, K, gate)
        table = get_config(M, E, H, I, K, device_key(dev))
        bm = table["BLOCK_M"]
        layout = ex.dispatch(ids, E, bm, fuse=False)
        rows = int(layout.start_E1[E])
        xs = ex.gather_rows(x, layout)
        fl_gu, fl_dn = 2 * M * K * H * 2 * I / PEAK * 1e3, 2 * M * K * I * H / PEAK * 1e3
        h_ref = ex.gate_up_desc(xs, w1, layout, table).clone()
        y_ref = ex.down_desc(h_ref, w2, layout, wts, table).clone()
        fns, info, keep = {}, {}, []
        for part, variants, base in (("gate_up", GATE_UP, table["gate_up"]), ("down", DOWN, table["down"])):
            for name, over in [("table", {})] + list(variants.items()):
                if args.skip and re.search(args.skip, f"{part} {name}"):
                    continue
                c = dict(table, **{part: dict(base, **over)})
                log(f"  M={M} {part} {name}: building", end="")
                try:
                    if part == "gate_up":
                        h = torch.full_like(h_ref, float("nan"))
                        keep.append(h)  # the graph writes here: must outlive it (captures empty the cache)
                        call = (lambda c=c, h=h: ex.gate_up_desc(xs, w1, layout, c, out=h))
                        call()
                        same = torch.equal(h[:rows], h_ref[:rows])
                        h.fill_(float("nan"))
                        replay = graph_of(call)
                        replay()
                        same_graph = torch.equal(h[:rows], h_ref[:rows])
                    else:
                        call = (lambda c=c: ex.down_desc(h_ref, w2, layout, wts, c))
                        same = torch.equal(call(), y_ref)
                        g, y_g = capture(call)
                        y_g.fill_(float("nan"))
                        g.replay()
                        same_graph = torch.equal(y_g, y_ref)
                        replay = g.replay
                    fns[(part, name)] = replay
                    info[(part, name)] = (same and same_graph, c[part])
                    log(f", same bits eager {same}, graph {same_graph}")
                except Exception as exc:  # a variant this Triton cannot build: report and go on
                    log(f": {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
                    if isinstance(exc, torch.AcceleratorError):
                        raise  # the context is lost
        dense_a = torch.randn(rows, H, device=dev, dtype=torch.bfloat16)
        dense_h = torch.randn(rows, I, device=dev, dtype=torch.bfloat16)
        fns[("gate_up", "cuBLAS dense")] = graph_of(lambda: dense_a @ w1[0].T)
        fns[("down", "cuBLAS dense")] = graph_of(lambda: dense_h @ w2[0].T)
        torch.cuda.synchronize()
        ms = alternating(fns, args.rounds, args.reps)
        log(f"\nM={M}: {M * K} pairs in {rows} rows ({rows / (M * K):.3f}x); FLOP floors on the pairs: "
            f"gate_up {fl_gu:.3f} ms, down {fl_dn:.3f} ms")
        log("| GEMM | variant | ms | / floor | / cuBLAS | TFLOP/s on rows | same bits | config |")
        log("|---|---|---:|---:|---:|---:|---|---|")
        best = {}
        for (part, name), t in ms.items():
            floor = fl_gu if part == "gate_up" else fl_dn
            ceil = ms[(part, "cuBLAS dense")]
            flops = 2 * rows * H * (2 * I if part == "gate_up" else I)
            same, cfg = info.get((part, name), (None, {}))
            log(f"| {part} | {name} | {t:.3f} | {t / floor:.3f} | {t / ceil:.3f} | {flops / t / 1e9:.0f} | {same} | "
                f"{json.dumps(cfg)} |")
            if same and (part not in best or t < best[part][0]):
                best[part] = (t, name, cfg)
        # The layer: the table against the best gate_up and down found here, alternating.
        cand = dict(table, gate_up=best["gate_up"][2], down=best["down"][2])
        layer = {n: graph_of(lambda c=c: ex.fused_experts_impl(x, ids, wts, w1, w2, config=c))
                 for n, c in (("table", table), ("best", cand))}
        same_layer = torch.equal(ex.fused_experts_impl(x, ids, wts, w1, w2, config=table),
                                 ex.fused_experts_impl(x, ids, wts, w1, w2, config=cand))
        lm = alternating(layer, args.rounds, args.reps)
        floor = _floor_ms(M, E, H, I, K)
        log(f"layer M={M}: table {lm['table']:.3f} ms ({lm['table'] / floor:.3f}x floor), best "
            f"{lm['best']:.3f} ({lm['best'] / floor:.3f}x) with gate_up '{best['gate_up'][1]}', down "
            f"'{best['down'][1]}'; same bits {same_layer}")
        summary.append(dict(M=M, rows=rows, floor=floor, table=lm["table"], best=lm["best"],
                            gate_up=best["gate_up"][1], down=best["down"][1], config=cand,
                            kernels={f"{p}/{n}": t for (p, n), t in ms.items()}))
        (out / "large_m.json").write_text(json.dumps(summary, indent=1))
        del fns, layer, keep
        torch.cuda.empty_cache()
    log(f"\n8192^3 bf16 GEMM at the end: {peak_tflops(dev):.0f} TFLOP/s")
    log("| M | floor | table | best | table/floor | best/floor | gate_up | down |")
    log("|---:|---:|---:|---:|---:|---:|---|---|")
    for r in summary:
        log(f"| {r['M']} | {r['floor']:.3f} | {r['table']:.3f} | {r['best']:.3f} | {r['table'] / r['floor']:.3f} | "
            f"{r['best'] / r['floor']:.3f} | {r['gate_up']} | {r['down']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
