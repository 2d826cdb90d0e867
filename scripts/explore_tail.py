"""Probe the mixed descriptor tiles (``TAIL``: 128-row tiles plus one 64-row tail per expert) per GEMM.

The whole layer with tails ran 14 % slower than 128-row tiles at Mixtral M = 1024 although it
computes fewer rows (docs/kernels.md, "Large M: mixed tiles").  Per GEMM, on the same routed
tokens, timed alone as graph replays in alternating rounds:

* ``table``: 128-row tiles on a layout padded to 128 (what ships);
* ``tail``: the table's flags with TAIL, on a layout padded to 64;
* ``tail code, no tails``: the TAIL kernel on the 128-padded layout (every block full, the tail loop
  runs zero times): the cost of the second loop's code alone;
* ``tail nf``: tails without the flattened loop; ``tail np``: tails, one tile per program;
* ``bm64``: 64-row tiles everywhere (4 warps), the efficiency of a 64-row product.

    PYTHONPATH=$PWD python3 scripts/explore_tail.py --out $OUT/tail
"""

from __future__ import annotations

# ruff: noqa: B023  (every lambda is timed before its loop variables change)
import argparse
import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from explore_large_m import _routed, _weights, alternating, graph_of  # noqa: E402

from moepatch.ops import experts as ex  # noqa: E402
from moepatch.ops.tuning import device_key, get_config  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dims", default="8,4096,14336,2", help="E,H,I,K")
    ap.add_argument("--ms", default="1024,2048")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default="out/tail")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    logf = open(out / "log.txt", "w")

    def log(*a):
        s = " ".join(str(x) for x in a)
        print(s, flush=True)
        logf.write(s + "\n")

    dev = torch.device("cuda")
    E, H, I, K = (int(v) for v in args.dims.split(","))  # noqa: E741
    w1, w2, gate = _weights(E, H, I, dev)
    for M in (int(m) for m in args.ms.split(",")):
        x, ids, wts = _routed(M, H, K, gate)
        table = get_config(M, E, H, I, K, device_key(dev))
        lay128 = ex.dispatch(ids, E, 128, fuse=False)
        lay64 = ex.dispatch(ids, E, 64, fuse=False)
        as64 = dataclasses.replace(lay128, block_m=64)  # 128-padded starts read as a 64 layout: no tails
        counts = torch.diff(lay64.start_E1).tolist()
        rows128, rows64 = int(lay128.start_E1[E]), int(lay64.start_E1[E])
        log(f"M={M}: {M * K} pairs; padded rows per expert (64) {counts}; rows 128-padded {rows128}, "
            f"64-padded {rows64}; tail blocks {sum((c % 128) // 64 for c in counts)}")
        tail = dict(table, TAIL=64)
        gu, dn = table["gate_up"], table["down"]
        variants = {
            "table": (lay128, table),
            "tail": (lay64, tail),
            "tail code, no tails": (as64, tail),
            "tail nf": (lay64, dict(tail, gate_up=dict(gu, FLATTEN=0), down=dict(dn, FLATTEN=0))),
            "tail np": (lay64, dict(tail, gate_up=dict(gu, PERSISTENT=0, FLATTEN=0, H_STORE_SPLIT=0),
                                    down=dict(dn, PERSISTENT=0, FLATTEN=0))),
            "bm64": (lay64, dict(table, BLOCK_M=64, gate_up=dict(gu, num_warps=4),
                                 down=dict(dn, BLOCK_N=128, num_warps=4))),
        }
        fns, keep, ref = {}, [], {}
        for name, (lay, cfg) in variants.items():
            try:
                xs = ex.gather_rows(x, lay)
                h = ex.gate_up_desc(xs, w1, lay, cfg)
                y = ex.down_desc(h, w2, lay, wts, cfg)
                out_l = ex.combine(y, ids, E, x.dtype)
                if "out" not in ref:
                    ref["out"] = out_l
                same = torch.equal(out_l, ref["out"])
                keep += [xs, h]
                fns[("gate_up", name)] = graph_of(lambda xs=xs, lay=lay, cfg=cfg, h=h: ex.gate_up_desc(
                    xs, w1, lay, cfg, out=h))
                fns[("down", name)] = graph_of(lambda h=h, lay=lay, cfg=cfg: ex.down_desc(h, w2, lay, wts, cfg))
                log(f"  {name}: layer output equal to the table's: {same}")
            except Exception as exc:  # report and go on
                log(f"  {name}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
                if isinstance(exc, torch.AcceleratorError):
                    raise
        ms = alternating(fns, args.rounds, args.reps)
        log("| M | GEMM | variant | ms | TFLOP/s on the pairs | / table |")
        log("|---:|---|---|---:|---:|---:|")
        for (part, name), t in ms.items():
            flops = 2 * M * K * H * I * (2 if part == "gate_up" else 1)
            log(f"| {M} | {part} | {name} | {t:.3f} | {flops / t / 1e9:.0f} | {t / ms[(part, 'table')]:.3f} |")
        del fns, keep
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
