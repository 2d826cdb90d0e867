"""Explore the descriptor (TMA) GEMMs against the pointer-gather GEMMs at large M (Mixtral layer, H200).

One run: for each M, the shipped configuration's layer time, then gate_up and down candidates
timed alone (same dispatch), the best pair as a whole layer, and a cuBLAS dense GEMM of the same
FLOPs as a ceiling.  Output checked against the shipped path first.  Table printed last.

    PYTHONPATH=$PWD python3 scripts/explore_desc.py --out $OUT/desc
"""

from __future__ import annotations

# ruff: noqa: B023  (every lambda is timed before its loop variables change)
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from moepatch.ops import experts as ex
from moepatch.ops.tuning import device_key, get_config

PEAK = 790e12
BW = 4.3e12


def med_ms(fn, reps=15, warmup=3):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    return statistics.median(ts)


GU = [  # BLOCK_N, BLOCK_K, GROUP_M, warps, stages, persistent
    (128, 64, 16, 8, 4, 0), (128, 64, 16, 8, 3, 0), (128, 64, 8, 8, 4, 0), (128, 64, 16, 8, 4, 1),
    (64, 64, 16, 4, 4, 0), (128, 128, 16, 8, 2, 0), (64, 128, 16, 4, 3, 0), (256, 64, 16, 8, 3, 0),
]
DN = [
    (256, 64, 16, 8, 4, 0), (256, 64, 16, 8, 3, 0), (128, 64, 16, 8, 4, 0), (256, 64, 16, 8, 4, 1),
    (128, 64, 16, 4, 4, 0), (128, 128, 16, 8, 3, 0), (256, 64, 8, 8, 4, 0),
]


def cfg_of(bm, gu, dn):
    return {"BLOCK_M": bm, "DESC": True,
            "gate_up": dict(BLOCK_N=gu[0], BLOCK_K=gu[1], GROUP_M=gu[2], num_warps=gu[3], num_stages=gu[4],
                            PERSISTENT=gu[5]),
            "down": dict(BLOCK_N=dn[0], BLOCK_K=dn[1], GROUP_M=dn[2], num_warps=dn[3], num_stages=dn[4],
                         PERSISTENT=dn[5], SPLIT_K=1)}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--ms", default="256,512,1024,4096,16384")
    ap.add_argument("--bms", default="64,128")
    ap.add_argument("--out", default="out/desc")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    logf = open(out / "log.txt", "w")

    def log(*a):
        s = " ".join(str(x) for x in a)
        print(s, flush=True)
        logf.write(s + "\n")
        logf.flush()

    dev = torch.device("cuda")
    E, H, I, K = 8, 4096, 14336, 2  # noqa: E741
    torch.manual_seed(0)
    w1 = torch.randn(E, 2 * I, H, device=dev, dtype=torch.bfloat16) * 0.02
    w2 = torch.randn(E, H, I, device=dev, dtype=torch.bfloat16) * 0.02
    gate = torch.randn(E, H, device=dev, dtype=torch.bfloat16) * H**-0.5
    rows = []
    for M in [int(m) for m in args.ms.split(",")]:
        x = torch.randn(M, H, device=dev, dtype=torch.bfloat16)
        logits = (x @ gate.T).float()
        wts, ids = logits.softmax(-1).topk(K, dim=-1)
        wts = (wts / wts.sum(-1, keepdim=True)).to(torch.bfloat16)
        flops = 2 * M * K * 3 * H * I
        floor = max(flops / PEAK, (E * 3 * H * I * 2 + 2 * M * H * 2) / BW) * 1e3
        base_cfg = get_config(M, E, H, I, K, device_key(dev))
        ref = ex.fused_experts_impl(x, ids, wts, w1, w2, config=base_cfg)
        t_base = med_ms(lambda: ex.fused_experts_impl(x, ids, wts, w1, w2, config=base_cfg))
        log(f"M={M} floor {floor:.3f} ms; shipped {t_base:.3f} ms ({t_base / floor:.2f}x)")
        # cuBLAS ceiling: the same FLOPs as two dense GEMMs
        a = torch.randn(M * K, H, device=dev, dtype=torch.bfloat16)
        b1 = w1[0]
        hbuf = torch.randn(M * K, I, device=dev, dtype=torch.bfloat16)
        t_cublas = med_ms(lambda: (a @ b1.T, hbuf @ w2[0].T))
        log(f"  cuBLAS dense same FLOPs (one expert's weights) {t_cublas:.3f} ms ({t_cublas / floor:.2f}x)")
        best = None
        for bm in [int(b) for b in args.bms.split(",")]:
            c0 = cfg_of(bm, GU[0], DN[0])
            layout = ex.dispatch(ids.contiguous(), E, bm, fuse=False)
            xs = ex.gather_rows(x, layout)
            t_disp = med_ms(lambda: ex.dispatch(ids.contiguous(), E, bm, fuse=False))
            t_gather = med_ms(lambda: ex.gather_rows(x, layout))
            log(f"  BM={bm}: dispatch {t_disp:.3f} ms, gather {t_gather:.3f} ms")
            h_ref = ex.gate_up(x, w1, layout, {**c0, "gate_up": {**c0["gate_up"], "PERSISTENT": 0}})
            gu_best = None
            for gu in GU:
                c = cfg_of(bm, gu, DN[0])
                try:
                    h = ex.gate_up_desc(xs, w1, layout, c)
                    used = int(layout.start_E1[E])
                    err = ((h[:used].float() - h_ref[:used].float()).norm() / h_ref[:used].float().norm()).item()
                    t = med_ms(lambda c=c: ex.gate_up_desc(xs, w1, layout, c))
                except Exception as exc:  # report and go on
                    log(f"    gate_up {gu}: error {type(exc).__name__}: {str(exc)[:200]}")
                    continue
                log(f"    gate_up desc {gu}: {t:.3f} ms err {err:.1e}")
                if err < 1e-2 and (gu_best is None or t < gu_best[0]):
                    gu_best = (t, gu)
            t_gu_ptr = med_ms(lambda: ex.gate_up(x, w1, layout, base_cfg if base_cfg["BLOCK_M"] == bm else c0))
            log(f"    gate_up pointer (shipped tiles) {t_gu_ptr:.3f} ms")
            h = h_ref
            dn_best = None
            y_ref = ex.down(h, w2, layout, wts, {**c0, "down": {**c0["down"], "PERSISTENT": 0}})
            for dn in DN:
                c = cfg_of(bm, GU[0], dn)
                try:
                    y = ex.down_desc(h, w2, layout, wts, c)
                    err = ((y.float() - y_ref.float()).norm() / y_ref.float().norm()).item()
                    t = med_ms(lambda c=c: ex.down_desc(h, w2, layout, wts, c))
                except Exception as exc:
                    log(f"    down {dn}: error {type(exc).__name__}: {str(exc)[:200]}")
                    continue
                log(f"    down desc {dn}: {t:.3f} ms err {err:.1e}")
                if err < 1e-2 and (dn_best is None or t < dn_best[0]):
                    dn_best = (t, dn)
            t_dn_ptr = med_ms(lambda: ex.down(h, w2, layout, wts, base_cfg if base_cfg["BLOCK_M"] == bm else c0))
            log(f"    down pointer (shipped tiles) {t_dn_ptr:.3f} ms")
            if gu_best and dn_best:
                c = cfg_of(bm, gu_best[1], dn_best[1])
                o = ex.fused_experts_impl(x, ids, wts, w1, w2, config=c)
                err = ((o.float() - ref.float()).norm() / ref.float().norm()).item()
                t = med_ms(lambda c=c: ex.fused_experts_impl(x, ids, wts, w1, w2, config=c))
                log(f"  BM={bm} whole layer desc {t:.3f} ms ({t / floor:.2f}x floor) err vs shipped {err:.1e} cfg {c}")
                if best is None or t < best[0]:
                    best = (t, c)
        rows.append(dict(M=M, floor=floor, shipped=t_base, cublas=t_cublas, desc=best[0] if best else None,
                         cfg=best[1] if best else None))
        torch.cuda.empty_cache()
    (out / "desc.json").write_text(json.dumps(rows, indent=1))
    log("\n| M | floor ms | shipped | desc best | cuBLAS same FLOPs | desc/floor | shipped/floor |")
    log("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        d = r["desc"]
        ds, dr = ("-", "-") if d is None else (f"{d:.3f}", f"{d / r['floor']:.2f}")
        log(f"| {r['M']} | {r['floor']:.3f} | {r['shipped']:.3f} | {ds} | {r['cublas']:.3f} | {dr} | "
            f"{r['shipped'] / r['floor']:.2f} |")
    for r in rows:
        log(r["M"], json.dumps(r["cfg"]))
    return 0


if __name__ == "__main__":
    t0 = time.time()
    rc = main()
    print(f"total {time.time() - t0:.0f} s", file=sys.stderr)
    sys.exit(rc)
