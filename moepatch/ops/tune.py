"""The autotuner (``moepatch tune``): times curated tile configurations on this GPU, writes a table (tuning.py).

Legend: M tokens, E experts, H hidden, I intermediate, K experts per token.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
from triton.runtime.errors import OutOfResources

from ..arguments import ArgumentParser, HelpFormatter
from . import experts as X
from .tuning import DESC_DEFAULT, M_BUCKETS, PF, PRESET_SHAPES, device_key, dn, get_config, gu, shape_key, user_dir

# Weight streaming (few rows per expert): thin tiles, deep pipelines, split-K for down; compute-bound:
# 128-row tiles with 8 warps, as vLLM's tuned H200 tables.  gate_up's BLOCK_N is per half (two
# accumulators), so vLLM's BLOCK_N 256 on the fused [gate; up] is 128 here.
STREAM_GATE_UP = [gu(32, 128, 8, 4, 4), gu(32, 128, 8, 4, 3), gu(64, 128, 8, 4, 4), gu(64, 128, 16, 4, 5),
                  gu(32, 256, 8, 4, 3), gu(64, 256, 8, 4, 3), gu(16, 256, 8, 4, 4), gu(128, 128, 8, 8, 3),
                  gu(64, 64, 8, 4, 5)]
# SPLIT_K 3: Mixtral's 384 programs are one wave (3 per SM on 132 SMs); docs/kernels.md, "Small M".
STREAM_DOWN = [dn(64, 128, 8, 4, 4, 4), dn(64, 128, 8, 3, 4, 4), dn(64, 128, 8, 2, 4, 4), dn(128, 128, 8, 2, 4, 4),
               dn(64, 256, 8, 4, 4, 3), dn(32, 128, 8, 8, 4, 4), dn(128, 128, 8, 4, 4, 4), dn(64, 128, 8, 1, 4, 5),
               dn(128, 64, 8, 1, 4, 5)]
MID_GATE_UP = [gu(64, 128, 8, 4, 3), gu(64, 128, 16, 4, 4), gu(128, 128, 16, 8, 3), gu(64, 64, 8, 4, 4),
               gu(32, 128, 8, 4, 4), gu(128, 64, 16, 8, 4)]
MID_DOWN = [dn(128, 128, 8, 1, 4, 3), dn(64, 128, 8, 1, 4, 4), dn(128, 128, 16, 2, 8, 3), dn(256, 64, 16, 1, 8, 4),
            dn(128, 64, 8, 2, 4, 4), dn(64, 128, 8, 2, 4, 4)]
BIG_GATE_UP = [gu(128, 64, 16, 8, 3), gu(128, 64, 16, 8, 4), gu(64, 64, 8, 4, 4), gu(128, 64, 32, 8, 4),
               gu(64, 128, 8, 4, 3), gu(128, 32, 16, 8, 5)]
BIG_DOWN = [dn(256, 64, 16, 1, 8, 3), dn(256, 64, 16, 1, 8, 4), dn(128, 64, 16, 1, 8, 4), dn(128, 128, 8, 1, 8, 3),
            dn(256, 64, 32, 1, 8, 4), dn(256, 64, 16, 2, 8, 3)]
# One token: down + combine in one kernel (TOKEN); BLOCK_N 16 gives Mixtral 256 programs, the 2048-wide models 128.
TOKEN_DOWN = [dict(c, TOKEN=1) for c in (dn(16, 256, 1, 1, 4, 4), dn(16, 128, 1, 1, 4, 6), dn(16, 512, 1, 1, 4, 3),
                                          dn(32, 256, 1, 1, 4, 4), dn(16, 256, 1, 1, 8, 4))]
# The descriptor GEMMs (DESC) for the compute-bound regime: the defaults first (tuning.DESC_DEFAULT).
DESC_GATE_UP = [DESC_DEFAULT[128][0], dict(gu(128, 64, 16, 8, 3), JOINT=1, H_STORE_SPLIT=1, **PF),
                dict(gu(128, 64, 16, 8, 4), JOINT=1, **PF), dict(gu(128, 64, 16, 8, 4), JOINT=1),
                dict(gu(128, 64, 16, 8, 3), JOINT=1), gu(128, 64, 16, 8, 4)]
DESC_DOWN = [DESC_DEFAULT[128][1], dn(256, 64, 16, 1, 8, 4), dict(dn(256, 64, 16, 1, 8, 4), PERSISTENT=1),
             dict(dn(256, 64, 16, 1, 8, 3), **PF), dn(256, 64, 8, 1, 8, 4)]
# 64-row descriptor tiles (one warp group): the many-expert layers at 32-96 rows per expert.
DESC64_GATE_UP = [DESC_DEFAULT[64][0], dict(gu(128, 64, 16, 4, 3), JOINT=1, **PF)]
DESC64_DOWN = [DESC_DEFAULT[64][1], dict(dn(128, 64, 16, 1, 4, 4), **PF), dn(256, 64, 16, 1, 4, 3)]
SMEM_BYTES = 227 * 1024  # H200 shared memory per block


def candidate_configs(M: int, E: int, H: int, I: int, K: int) -> list[tuple]:  # noqa: E741
    """The search space for one shape and M: [(BLOCK_M, gate_up list, down list[, "desc"])], BLOCK_M after
    the mean rows per expert (M * K / E); pipelines past the H200's shared memory left out."""
    rows = M * K / E
    if M == 1:
        plan = [(16, STREAM_GATE_UP, TOKEN_DOWN + STREAM_DOWN)]
    elif rows <= 4:
        plan = [(16, STREAM_GATE_UP, STREAM_DOWN)]
    elif rows <= 24:
        plan = [(16, STREAM_GATE_UP, STREAM_DOWN), (32, MID_GATE_UP, MID_DOWN)]
    elif rows <= 96:
        plan = [(64, MID_GATE_UP, MID_DOWN), (64, DESC64_GATE_UP, DESC64_DOWN, "desc"),
                (128, BIG_GATE_UP, BIG_DOWN), (32, MID_GATE_UP, MID_DOWN)]
    elif rows <= 192:
        plan = [(128, BIG_GATE_UP, BIG_DOWN), (128, DESC_GATE_UP, DESC_DOWN, "desc"),
                (64, DESC64_GATE_UP, DESC64_DOWN, "desc"), (64, MID_GATE_UP, MID_DOWN)]
    else:
        plan = [(128, BIG_GATE_UP, BIG_DOWN), (128, DESC_GATE_UP, DESC_DOWN, "desc"), (64, BIG_GATE_UP, BIG_DOWN)]

    def fits(bm, c, b_tiles):
        return c["num_stages"] * 2 * c["BLOCK_K"] * (bm + b_tiles * c["BLOCK_N"]) <= SMEM_BYTES

    return [(p[0], [c for c in p[1] if fits(p[0], c, 2)], [c for c in p[2] if fits(p[0], c, 1)], *p[3:])
            for p in plan]


def tune(shapes: list[tuple[int, int, int, int]], ms: list[int], *, dtype: torch.dtype = torch.bfloat16,
         out: str | os.PathLike | None = None, reps: int = 20, max_candidates: int | None = None,
         device: str = "cuda", log=None, budget_s: float | None = None) -> Path:
    """Autotune (E, H, I, K) ``shapes`` over token counts ``ms`` on the current GPU; returns the table's path.

    How: docs/kernels.md, "Configurations and tuning".  out: JSON path (default the user directory's
    ``<GPU>.json``); max_candidates: the first that many per GEMM and BLOCK_M; budget_s: wall-clock budget
    shared evenly by the (shape, M) pairs (a pair out of time keeps its best so far); log: callable taking
    one line of progress, or None."""
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("tune() times kernels on a CUDA GPU; none is available")
    if torch.device(device).type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(f"tune() on {device} needs TRITON_INTERPRET=1 (meant for tests only)")
    dev_key = device_key(device)
    path = Path(out) if out is not None else user_dir() / f"{dev_key}.json"
    table = json.loads(path.read_text()) if path.is_file() else {}
    t_start = time.perf_counter()
    for s, (E, H, I, K) in enumerate(shapes):  # noqa: E741
        key = shape_key(E, H, I, K)
        entry = table.setdefault(key, {str(m): get_config(m, E, H, I, K, dev_key) for m in M_BUCKETS})
        gen = torch.Generator(device=device).manual_seed(0)
        w1 = torch.randn(E, 2 * I, H, device=device, dtype=dtype, generator=gen) * H**-0.5
        w2 = torch.randn(E, H, I, device=device, dtype=dtype, generator=gen) * I**-0.5
        for pair, M in enumerate(ms, s * len(ms) + 1):  # the budget's share: pairs so far / all pairs
            deadline = None if budget_s is None else t_start + budget_s * pair / (len(shapes) * len(ms))
            x = torch.randn(M, H, device=device, dtype=dtype, generator=gen)
            ids = torch.rand(M, E, device=device, generator=gen).topk(K, dim=1).indices
            wts = torch.rand(M, K, device=device, generator=gen)
            base = get_config(M, E, H, I, K, dev_key)
            entry[str(M)] = _tune_m(x, ids, wts, w1, w2, base, candidate_configs(M, E, H, I, K), reps,
                                    max_candidates, deadline, log or (lambda line: None), f"{key} M={M}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    get_config.cache_clear()
    return path


def _tune_m(x, ids, wts, w1, w2, base, plan, reps, max_candidates, deadline, log, label) -> dict:
    """The best configuration for one (shape, M); see :func:`tune`."""
    E = w1.shape[0]
    dev = x.device
    ref = X.fused_experts_impl(x, ids, wts, w1, w2, base).float()

    def agrees(out):
        den = ref.norm().item() or 1.0
        return torch.isfinite(out).all().item() and (out.float() - ref).norm().item() / den < 2e-2

    def out_of_time():
        return deadline is not None and time.perf_counter() > deadline

    def fastest(configs, run, check=None):
        """(time, config) of the fastest ``run(c)`` whose output passes ``check`` (out of time: the first found)."""
        best = (float("inf"), None)
        for c in configs:
            if out_of_time() and best[1] is not None:
                break
            t = _time_safe(lambda c=c: run(c), reps, dev)
            if t < best[0] and (check is None or check(run(c))):
                best = (t, c)
        return best

    t_base = _time_safe(lambda: X.fused_experts_impl(x, ids, wts, w1, w2, base), reps, dev)
    results = [(t_base, base)]
    log(f"tune {label}: baseline BLOCK_M={base['BLOCK_M']} {t_base * 1e3:.1f} us")
    # Baseline's own BLOCK_M first, so its GEMM configurations are candidates too.
    plan = sorted(plan, key=lambda p: (p[0] != base["BLOCK_M"], len(p) > 3 and not base.get("DESC")))
    for bm, gate_ups, downs, *kind in plan:
        if out_of_time():
            break
        desc = bool(kind)
        if bm == base["BLOCK_M"] and desc == bool(base.get("DESC")):
            gate_ups = [base["gate_up"]] + [c for c in gate_ups if c != base["gate_up"]]
            downs = [base["down"]] + [c for c in downs if c != base["down"]]
        gate_ups, downs = gate_ups[:max_candidates or None], downs[:max_candidates or None]
        layout = X.dispatch(ids, E, bm, fuse=False if desc else None)
        if desc and not X.descriptors_fit(layout, x, w1, w2):
            continue
        t_dispatch = 0.0 if layout.fused else time_ms(lambda bm=bm: X.dispatch(ids, E, bm), reps, dev)
        h = torch.empty(layout.rows, w1.shape[1] // 2, device=dev, dtype=x.dtype)
        x_in = x
        if desc:
            x_in = X.gather_rows(x, layout)
            t_dispatch += time_ms(lambda lay=layout: X.gather_rows(x, lay), reps, dev)

        def gate_up_run(c, lay=layout, h=h, x_in=x_in, desc=desc):
            (X.gate_up_desc if desc else X.gate_up)(x_in, w1, lay, {"gate_up": c}, out=h)

        def down_run(c, lay=layout, h=h, desc=desc):
            if desc:
                return X.combine(X.down_desc(h, w2, lay, wts, {"down": c}), ids, E, x.dtype)
            return X.down_and_combine(h, w2, lay, ids, wts, {"down": c}, x.dtype)

        t_gu, c_gu = fastest(gate_ups, gate_up_run)
        if c_gu is None:
            continue
        gate_up_run(c_gu)
        t_dn, c_dn = fastest(downs, down_run, agrees)
        if c_dn is None:
            continue
        cfg = {"BLOCK_M": bm, "gate_up": c_gu, "down": c_dn, **({"DESC": True} if desc else {})}
        log(f"tune {label}: BLOCK_M={bm}{' desc' if desc else ''} {(t_dispatch + t_gu + t_dn) * 1e3:.1f} us "
            f"(gate_up {t_gu * 1e3:.1f}, down+combine {t_dn * 1e3:.1f})")
        if agrees(X.fused_experts_impl(x, ids, wts, w1, w2, cfg)):
            # Re-time the whole layer: the sum of parts misses launch gaps and L2 effects.
            results.append((_time_safe(lambda cfg=cfg: X.fused_experts_impl(x, ids, wts, w1, w2, cfg), reps, dev),
                            cfg))
    t_best, cfg_best = min(results, key=lambda r: r[0])
    if TUNE_FAILURES:
        log(f"tune {label}: {len(TUNE_FAILURES)} candidate(s) failed so far; last: {TUNE_FAILURES[-1]}")
    log(f"tune {label}: chose BLOCK_M={cfg_best['BLOCK_M']} {t_best * 1e3:.1f} us "
        f"({t_base / t_best:.2f}x the baseline) {json.dumps(cfg_best, sort_keys=True)}")
    return cfg_best


def time_ms(fn, reps: int, device: torch.device) -> float:
    """Median milliseconds of ``fn`` over ``reps`` CUDA-event timings after two warm-up calls (wall clock off CUDA)."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(reps):
        if device.type != "cuda":  # the interpreter (tests)
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
            continue
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


TUNE_FAILURES: list[str] = []  # candidates that failed to compile or run, with the error (tune's log)


def _time_safe(fn, reps: int, device: torch.device) -> float:
    """:func:`time_ms`, or infinity for a configuration this GPU cannot compile or run (recorded in
    TUNE_FAILURES): a tuner explores untried configurations and must not end on one."""
    try:
        return time_ms(fn, reps, device)
    except OutOfResources:
        return float("inf")
    except Exception as exc:  # recorded and reported, see above
        TUNE_FAILURES.append(f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")
        return float("inf")


def main(argv: list[str] | None = None) -> int:
    """``moepatch tune``: autotune shapes on this GPU and write a table (see :func:`tune`)."""
    p = ArgumentParser(prog="moepatch tune", description="Autotune the fused experts kernels on this GPU.",
                       formatter_class=HelpFormatter)
    p.add_argument("--shapes", default="mixtral",
                   help=f"comma list of presets ({', '.join(PRESET_SHAPES)}) or E:H:I:K tuples")
    p.add_argument("--ms", default="1,4,16,64,256,1024,4096,16384", help="token counts (M buckets)")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16"))
    p.add_argument("--max-candidates", type=int, default=8, help="candidates per GEMM and BLOCK_M (0: all)")
    p.add_argument("--budget", type=float, default=None, help="wall-clock budget in seconds (compiles included)")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--out", default=None, help="JSON path (default ~/.cache/moepatch/kernel_configs/<GPU>.json)")
    args = p.parse_args(argv)
    shapes = []
    for s in args.shapes.split(","):
        try:
            shapes.append(PRESET_SHAPES[s] if s in PRESET_SHAPES else tuple(int(v) for v in s.split(":")))
        except ValueError:
            p.error(f"shape {s!r}: expected a preset ({', '.join(PRESET_SHAPES)}) or E:H:I:K")
        if len(shapes[-1]) != 4:
            p.error(f"shape {s!r}: expected E:H:I:K")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    path = tune(shapes, [int(m) for m in args.ms.split(",")], dtype=dtype, out=args.out, reps=args.reps,
                max_candidates=args.max_candidates or None, log=print, budget_s=args.budget)
    print(f"wrote {path}")
    return 0
