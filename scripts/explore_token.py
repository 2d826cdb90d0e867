"""Explore one-token decode (M = 1): split-K down + combine against the one-kernel token down.

One run, on the GPU: for each shape, the shipped M = 1 configuration, then the same gate_up with
each one-token down candidate (tuning._TOKEN_DOWN), each with programmatic dependent launch off
and on (experts.PDL).  Every variant is checked against the
shipped path first (rel err), then timed as a whole layer under CUDA-graph replay and eagerly,
with its two halves (gate_up; down + combine) timed alone under graphs, and its peak extra memory.
Table printed last; JSON in OUT.
``--sweep``: instead, split-K configurations around the shipped one (gate_up alone and down + combine
alone, each under graph replay, with its weight-read rate), then the fastest pair as a whole layer
against the shipped configuration; the candidates are chosen by their waves of programs (Mixtral:
3 programs per SM fit, so 512 down programs make 1.3 waves and 384 make one).

    PYTHONPATH=$PWD python3 scripts/explore_token.py --out $OUT/token
    PYTHONPATH=$PWD python3 scripts/explore_token.py --sweep --shapes mixtral --out $OUT/token
"""

from __future__ import annotations

# ruff: noqa: B023  (every lambda is timed before its loop variables change)
import argparse
import json
import sys
from pathlib import Path

import torch

from moepatch.ops import experts as ex
from moepatch.ops.tuning import _TOKEN_DOWN, PRESET_SHAPES, _dn, _gu, _time, device_key, get_config

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernels import capture, peak_extra_mb  # noqa: E402  (scripts/ is not a package)

BW = 4.3e12


def graph_ms(fn, reps):
    g, _ = capture(fn)
    return _time(g.replay, reps, torch.device("cuda"), hide_launch=True)


# (BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages) and (BLOCK_N, BLOCK_K, GROUP_M, SPLIT_K, warps, stages)
SWEEP_GATE_UP = [_gu(32, 128, 8, 4, 4), _gu(16, 128, 8, 4, 4), _gu(16, 256, 8, 4, 4), _gu(32, 256, 8, 4, 3),
                 _gu(16, 512, 8, 4, 3), _gu(32, 128, 8, 4, 5), _gu(32, 128, 8, 4, 3), _gu(16, 128, 8, 4, 6),
                 _gu(32, 64, 8, 4, 6), _gu(32, 128, 8, 8, 4), _gu(64, 128, 8, 4, 4)]
SWEEP_DOWN = [_dn(64, 128, 8, 4, 4, 4), _dn(64, 128, 8, 3, 4, 4), _dn(32, 128, 8, 3, 4, 4), _dn(64, 128, 8, 6, 4, 4),
              _dn(32, 128, 8, 6, 4, 4), _dn(64, 256, 8, 3, 4, 3), _dn(128, 128, 8, 3, 4, 4), _dn(64, 128, 8, 2, 4, 4),
              _dn(32, 256, 8, 4, 4, 3), _dn(16, 256, 8, 4, 4, 4), _dn(64, 64, 8, 3, 4, 6), _dn(32, 128, 8, 4, 4, 4)]


def one_token_problem(name: str, dev: torch.device):
    """(E, H, I, K, w1, w2, x, ids, wts, shipped M = 1 config, its output in fp32) for one shape."""
    E, H, I, K = PRESET_SHAPES[name]  # noqa: E741
    gen = torch.Generator(device=dev).manual_seed(0)
    w1 = torch.randn(E, 2 * I, H, device=dev, dtype=torch.bfloat16, generator=gen) * H**-0.5
    w2 = torch.randn(E, H, I, device=dev, dtype=torch.bfloat16, generator=gen) * I**-0.5
    x = torch.randn(1, H, device=dev, dtype=torch.bfloat16, generator=gen)
    ids = torch.randperm(E, device=dev, generator=gen)[:K].view(1, K)
    wts = torch.rand(1, K, device=dev, generator=gen)
    base = get_config(1, E, H, I, K, device_key(dev))
    return E, H, I, K, w1, w2, x, ids, wts, base, ex.fused_experts_impl(x, ids, wts, w1, w2, base).float()


def sweep(name: str, reps: int, dev: torch.device) -> list[dict]:
    """Split-K configurations at M = 1 for one shape: halves timed alone, then the best pair as a layer."""
    E, H, I, K, w1, w2, x, ids, wts, base, ref = one_token_problem(name, dev)  # noqa: E741
    layout = ex.dispatch(ids, E, base["BLOCK_M"])
    h = ex.gate_up(x, w1, layout, base)
    half_bytes = K * H * I * 2  # one of the three matrices of K experts
    rows, best = [], {}
    for half, cands in (("gate_up", SWEEP_GATE_UP), ("down", SWEEP_DOWN)):
        for c in cands:
            cfg = dict(base, **{half: c})
            row = dict(shape=name, variant=f"{half} " + " ".join(f"{k}={v}" for k, v in c.items()))
            try:
                got = ex.fused_experts_impl(x, ids, wts, w1, w2, cfg)
                row["rel_err"] = ((got.float() - ref).norm() / ref.norm()).item()
                if half == "gate_up":
                    row["graph_ms"] = graph_ms(lambda: ex.gate_up(x, w1, layout, cfg, out=h), reps)
                else:
                    row["graph_ms"] = graph_ms(lambda: ex.down_and_combine(h, w2, layout, ids, wts, cfg, x.dtype), reps)
                row["TB_s"] = half_bytes * (2 if half == "gate_up" else 1) / row["graph_ms"] / 1e9
                if row["rel_err"] < 2e-2 and row["graph_ms"] < best.get(half, (None, float("inf")))[1]:
                    best[half] = (c, row["graph_ms"])
            except Exception as exc:  # an exploration reports every failure in its table
                row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
            rows.append(row)
            print(json.dumps(row), flush=True)
    floor = (K * 3 * H * I * 2 + 2 * H * 2) / BW * 1e3
    layers = [("layer shipped", base)]
    if len(best) == 2:
        layers.append(("layer best pair", dict(base, gate_up=best["gate_up"][0], down=best["down"][0])))
    for label, cfg in layers:  # whole layers in alternating rounds, so drift hits both alike
        rows.append(dict(shape=name, variant=label + " " + json.dumps({k: cfg[k] for k in ("gate_up", "down")}),
                         floor_ms=floor, graph_ms=[]))
    graphs = [capture(lambda cfg=cfg: ex.fused_experts_impl(x, ids, wts, w1, w2, cfg))[0] for _, cfg in layers]
    for _ in range(5):
        for g, row in zip(graphs, rows[-len(layers):]):
            row["graph_ms"].append(_time(g.replay, reps, dev, hide_launch=True))
    for row in rows[-len(layers):]:
        row["graph_ms"] = sorted(row["graph_ms"])[2]
        row["x_floor_graph"] = row["graph_ms"] / floor
        print(json.dumps(row), flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default=",".join(PRESET_SHAPES))
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--out", default="explore_token_out")
    p.add_argument("--sweep", action="store_true", help="split-K configurations around the shipped one")
    args = p.parse_args(argv)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    dev = torch.device("cuda")
    rows = []
    if args.sweep:
        for name in args.shapes.split(","):
            rows += sweep(name, args.reps, dev)
        cols = ["shape", "variant", "graph_ms", "TB_s", "x_floor_graph", "rel_err"]
        lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for r in rows:
            cells = [f"{r[c]:.4g}" if isinstance(r.get(c), float) else str(r.get(c, r.get("error", ""))) for c in cols]
            lines.append("| " + " | ".join(cells) + " |")
        (out_dir / "sweep.json").write_text(json.dumps(rows, indent=1))
        (out_dir / "sweep.md").write_text("\n".join(lines) + "\n")
        print("\n".join(lines))
        return 0
    for name in args.shapes.split(","):
        E, H, I, K, w1, w2, x, ids, wts, base, ref = one_token_problem(name, dev)  # noqa: E741
        floor = (K * 3 * H * I * 2 + 2 * H * 2) / BW * 1e3
        # (label, config, PDL): the shipped configuration without and with programmatic dependent
        # launch, then the one-token downs, each without and with it.
        variants = [("shipped", base, False), ("shipped pdl", base, True)]
        variants += [(f"token bn{c['BLOCK_N']} bk{c['BLOCK_K']} w{c['num_warps']} s{c['num_stages']}{' pdl' * pdl}",
                      dict(base, down=c), pdl) for c in _TOKEN_DOWN[:4] for pdl in (False, True)]
        layout = ex.dispatch(ids, E, base["BLOCK_M"])
        h = ex.gate_up(x, w1, layout, base)
        for label, cfg, pdl in variants:
            ex.PDL = pdl
            row = dict(shape=name, variant=label, floor_ms=floor)
            try:
                got = ex.fused_experts_impl(x, ids, wts, w1, w2, cfg)
                row["rel_err"] = ((got.float() - ref).norm() / ref.norm()).item()
                row["token_path"] = ex.token_path(layout, cfg)
                row["graph_ms"] = graph_ms(lambda: ex.fused_experts_impl(x, ids, wts, w1, w2, cfg), args.reps)
                row["eager_ms"] = _time(lambda: ex.fused_experts_impl(x, ids, wts, w1, w2, cfg), args.reps, dev)
                row["gate_up_graph_ms"] = graph_ms(lambda: ex.gate_up(x, w1, layout, cfg, out=h), args.reps)
                row["down_graph_ms"] = graph_ms(
                    lambda: ex.down_and_combine(h, w2, layout, ids, wts, cfg, x.dtype), args.reps)
                row["peak_mb"] = peak_extra_mb("cuda", lambda: ex.fused_experts_impl(x, ids, wts, w1, w2, cfg))
                row["x_floor_graph"] = row["graph_ms"] / floor
            except Exception as exc:  # an exploration reports every failure in its table
                row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
            rows.append(row)
            print(json.dumps(row), flush=True)
    (out_dir / "results.json").write_text(json.dumps(rows, indent=1))
    cols = ["shape", "variant", "floor_ms", "graph_ms", "x_floor_graph", "eager_ms", "gate_up_graph_ms",
            "down_graph_ms", "peak_mb", "rel_err", "token_path"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['shape']} | {r['variant']} | error: {r['error']} |")
            continue
        lines.append("| " + " | ".join(f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
    table = "\n".join(lines)
    (out_dir / "results.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
