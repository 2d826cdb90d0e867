"""Tile configurations per GPU and shape: the shipped tables, defaults, and the autotuner.

A configuration is one dict::

    {"BLOCK_M": 16,                                   # rows per dispatch block, shared by both GEMMs
     "gate_up": {"BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 1, "num_warps": 4, "num_stages": 4},
     "down":    {"BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 1, "SPLIT_K": 4, "num_warps": 4, "num_stages": 4}}

Tables are JSON files named after the GPU (``NVIDIA_H200.json``), mapping a shape key
``"E=8,H=4096,I=14336,K=2"`` to M buckets (tokens per forward, as strings) to a configuration.
Lookup takes the nearest bucket of the exact shape; a shape that no table has gets
:func:`default_config`.  Tables are read from ``$MOEPATCH_KERNEL_CONFIGS`` (a directory), then
``~/.cache/moepatch/kernel_configs``, then the ones shipped in ``moepatch/ops/configs``; the first
that has the shape wins.  :func:`tune` writes to the user directory by default.

Legend: M tokens, E experts, H hidden, I intermediate, K experts per token (slots W at run time).
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import time
from pathlib import Path

import torch

SHIPPED_DIR = Path(__file__).with_name("configs")
USER_DIR = Path(os.path.expanduser("~/.cache/moepatch/kernel_configs"))
M_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)


def shape_key(E: int, H: int, I: int, K: int) -> str:  # noqa: E741 (I is the intermediate size)
    return f"E={E},H={H},I={I},K={K}"


def device_key(device: torch.device | str | None = None) -> str:
    """File stem for the GPU of ``device`` ("NVIDIA_H200"), or "cpu" (the interpreter)."""
    dev = torch.device(device) if device is not None else None
    if dev is None or dev.type != "cuda":
        return "cpu"
    return _cuda_device_key(dev.index if dev.index is not None else torch.cuda.current_device())


@functools.cache
def _cuda_device_key(index: int) -> str:
    # Cached: the experts function asks on every call and the name never changes.
    return torch.cuda.get_device_name(index).replace(" ", "_").replace("/", "_")


def _dirs() -> list[Path]:
    env = os.environ.get("MOEPATCH_KERNEL_CONFIGS")
    return ([Path(env)] if env else []) + [USER_DIR, SHIPPED_DIR]


@functools.lru_cache(maxsize=64)
def _table(path: str, mtime: float) -> dict:
    with open(path) as f:
        return json.load(f)


def _load_table(directory: Path, dev_key: str) -> dict:
    path = directory / f"{dev_key}.json"
    if not path.is_file():
        return {}
    return _table(str(path), path.stat().st_mtime)


def default_config(M: int, E: int, H: int, I: int, K: int, device_type: str = "cuda") -> dict:  # noqa: E741
    """A sensible configuration for any shape, from how many rows an expert gets on average.

    Few rows per expert: the layer is bound by reading weights, so tiles are thin (BLOCK_M 16),
    the down GEMM is split along K to put enough programs in flight, and BLOCK_N shrinks when the
    experts are narrow so the grid still covers every SM several times.  Many rows: compute-bound,
    so the large tiles and deep pipelines that reach tensor-core peak on Hopper.
    """
    if device_type != "cuda":
        # The interpreter runs one program at a time: the fewest, largest tiles are fastest.
        return {"BLOCK_M": 16,
                "gate_up": {"BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 1, "num_warps": 4, "num_stages": 1},
                "down": {"BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 1, "SPLIT_K": 1, "num_warps": 4,
                         "num_stages": 1}}
    rows = M * K / E  # mean rows per expert
    if rows <= 32:
        # Weight streaming: programs per (expert hit, N tile); keep >= ~4 waves of 132 SMs.
        experts_hit = min(E, M * K)
        bn = 64
        while bn > 16 and experts_hit * (I // bn) < 512:
            bn //= 2
        bn_down = 64
        tiles_down = experts_hit * (H // bn_down)
        split = 1
        while split < 8 and tiles_down * split < 512 and I // (split * 2) >= 256:
            split *= 2
        return {"BLOCK_M": 16,
                "gate_up": {"BLOCK_N": bn, "BLOCK_K": 128, "GROUP_M": 8, "num_warps": 4, "num_stages": 4},
                "down": {"BLOCK_N": bn_down, "BLOCK_K": 128, "GROUP_M": 8, "SPLIT_K": split, "num_warps": 4,
                         "num_stages": 4}}
    if rows <= 96:
        return {"BLOCK_M": 32,
                "gate_up": {"BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 8, "num_warps": 4, "num_stages": 3},
                "down": {"BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8, "SPLIT_K": 1, "num_warps": 4,
                         "num_stages": 3}}
    if rows <= 192:
        return {"BLOCK_M": 64,
                "gate_up": {"BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 4, "num_stages": 4},
                "down": {"BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "SPLIT_K": 1, "num_warps": 4,
                         "num_stages": 4}}
    # Two (128 x 128) fp32 accumulators for gate and up hold as many registers as vLLM's single
    # 128 x 256 tile; three stages of (128 + 2 * 128) x 64 bf16 tiles fit Hopper's shared memory.
    return {"BLOCK_M": 128,
            "gate_up": {"BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 16, "num_warps": 8, "num_stages": 3},
            "down": {"BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 16, "SPLIT_K": 1, "num_warps": 8,
                     "num_stages": 3}}


def _nearest_bucket(table_for_shape: dict, M: int) -> dict:
    keys = sorted(int(k) for k in table_for_shape)
    best = min(keys, key=lambda k: (abs(k - M), k))
    return table_for_shape[str(best)]


@functools.lru_cache(maxsize=4096)
def get_config(M: int, E: int, H: int, I: int, K: int, dev_key: str) -> dict:  # noqa: E741
    """The configuration for M tokens of this shape on this GPU (cached per process).

    Note: the cache means tables written while a process runs are seen by new processes only.
    """
    key = shape_key(E, H, I, K)
    for d in _dirs():
        table = _load_table(d, dev_key)
        if key in table and table[key]:
            return _nearest_bucket(table[key], M)
    return default_config(M, E, H, I, K, "cpu" if dev_key == "cpu" else "cuda")


def candidate_configs(M: int, E: int, H: int, I: int, K: int) -> list[dict]:  # noqa: E741
    """The search space of :func:`tune` for one shape and M (a few dozen points, pruned by M)."""
    rows = M * K / E
    block_ms = [16] if rows <= 16 else [16, 32] if rows <= 48 else [32, 64] if rows <= 160 else [64, 128]
    out = []
    for bm in block_ms:
        small = bm <= 32
        gate_up = [dict(BLOCK_N=bn, BLOCK_K=bk, GROUP_M=g, num_warps=nw, num_stages=ns)
                   for bn, bk, g, nw, ns in itertools.product(
                       (16, 32, 64) if small else (64, 128), (64, 128, 256) if small else (64,),
                       (8,) if small else (8, 16), (4,) if small else (4, 8), (3, 4, 5) if small else (3, 4))
                   if not (bm == 128 and bn == 128 and nw == 4)]
        down = [dict(BLOCK_N=bn, BLOCK_K=bk, GROUP_M=g, SPLIT_K=s, num_warps=nw, num_stages=ns)
                for bn, bk, g, s, nw, ns in itertools.product(
                    (32, 64, 128) if small else (128, 256), (64, 128, 256) if small else (64,),
                    (8,) if small else (8, 16), (1, 2, 4, 8) if small else (1,), (4,) if small else (4, 8),
                    (3, 4, 5) if small else (3, 4))
                if not (bn == 256 and nw == 4)]
        out.append((bm, gate_up, down))
    return out


def tune(shapes: list[tuple[int, int, int, int]], ms: list[int], *, dtype: torch.dtype = torch.bfloat16,
         out: str | os.PathLike | None = None, reps: int = 20, max_candidates: int | None = None,
         device: str = "cuda", log=None) -> Path:
    """Autotune (E, H, I, K) shapes over token counts ``ms`` on the current GPU and write a table.

    Each GEMM is timed alone (CUDA events, median of ``reps`` after warm-up) for every candidate of
    :func:`candidate_configs`; per BLOCK_M the best gate_up and best down are combined, and the
    BLOCK_M with the lowest sum wins.  Entries already in the output file for other shapes are
    kept.  Routing is uniform random top-k (tuning needs representative sizes, not a trained router).

    Args:
        shapes: list of (E, H, I, K).
        ms: tokens per forward to tune for; each becomes a bucket.
        out: JSON path; default ``~/.cache/moepatch/kernel_configs/<GPU>.json``.
        max_candidates: keep at most this many candidates per GEMM and BLOCK_M (evenly spaced), to
            bound the time.
        log: callable taking one line of progress (e.g. ``print``); None is silent.
    Returns:
        The path written.
    """
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("tune() times kernels on a CUDA GPU; none is available")
    if torch.device(device).type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(f"tune() on {device} needs TRITON_INTERPRET=1 (meant for tests only)")
    path = Path(out) if out is not None else USER_DIR / f"{device_key(device)}.json"
    table = json.loads(path.read_text()) if path.is_file() else {}
    for E, H, I, K in shapes:  # noqa: E741
        gen = torch.Generator(device=device).manual_seed(0)
        w1 = torch.randn(E, 2 * I, H, device=device, dtype=dtype, generator=gen) * H**-0.5
        w2 = torch.randn(E, H, I, device=device, dtype=dtype, generator=gen) * I**-0.5
        entry = table.setdefault(shape_key(E, H, I, K), {})
        for M in ms:
            x = torch.randn(M, H, device=device, dtype=dtype, generator=gen)
            ids = torch.rand(M, E, device=device, generator=gen).topk(K, dim=1).indices
            wts = torch.rand(M, K, device=device, generator=gen)
            best = None
            for bm, gate_ups, downs in candidate_configs(M, E, H, I, K):
                if max_candidates:
                    gate_ups, downs = _spread(gate_ups, max_candidates), _spread(downs, max_candidates)
                total, cfg = _tune_block_m(x, ids, wts, w1, w2, bm, gate_ups, downs, reps)
                if log:
                    log(f"tune {shape_key(E, H, I, K)} M={M} BLOCK_M={bm}: {total * 1e3:.1f} us")
                if best is None or total < best[0]:
                    best = (total, cfg)
            entry[str(M)] = best[1]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    get_config.cache_clear()
    return path


def _tune_block_m(x, ids, wts, w1, w2, block_m, gate_ups, downs, reps) -> tuple[float, dict]:
    """Best (milliseconds, configuration) for one BLOCK_M: each GEMM's fastest candidate, plus dispatch."""
    from . import experts as X

    E, two_i, _ = w1.shape
    layout = X.dispatch(ids, E, block_m)
    dev = x.device
    t_dispatch = _time(lambda: X.dispatch(ids, E, block_m), reps, dev)
    h = torch.empty(layout.rows, two_i // 2, device=x.device, dtype=x.dtype)
    t_gate_up, c_gate_up = min(((_time_safe(lambda c=c: X.gate_up(x, w1, layout, {"gate_up": c}, out=h), reps, dev), c)
                                for c in gate_ups), key=lambda tc: tc[0])
    X.gate_up(x, w1, layout, {"gate_up": c_gate_up}, out=h)
    t_down, c_down = min(((_time_safe(lambda c=c: X.down(h, w2, layout, wts, {"down": c}), reps, dev), c)
                          for c in downs), key=lambda tc: tc[0])
    return t_dispatch + t_gate_up + t_down, {"BLOCK_M": block_m, "gate_up": c_gate_up, "down": c_down}


def _spread(items: list, n: int) -> list:
    if len(items) <= n:
        return items
    step = len(items) / n
    return [items[int(i * step)] for i in range(n)]


def _time(fn, reps: int, device: torch.device) -> float:
    """Median milliseconds of ``fn`` over ``reps`` CUDA-event timings after two warm-up calls."""
    for _ in range(2):
        fn()
    times = []
    if device.type != "cuda":  # the interpreter (tests): wall clock
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return sorted(times)[len(times) // 2]
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def _time_safe(fn, reps: int, device: torch.device) -> float:
    """:func:`_time`, or infinity for a configuration this GPU cannot compile (too much shared memory)."""
    from triton.runtime.errors import OutOfResources

    try:
        return _time(fn, reps, device)
    except OutOfResources:
        return float("inf")


# The layers moepatch's benchmarks and shipped tables cover: (E, H, I, K).
PRESET_SHAPES = {
    "mixtral": (8, 4096, 14336, 2),
    "olmoe": (64, 2048, 1024, 8),
    "deepseek_v2_lite": (64, 2048, 1408, 6),
    "qwen3_30b_a3b": (128, 2048, 768, 8),
}


def main(argv: list[str] | None = None) -> int:
    """``moepatch tune``: autotune shapes on this GPU and write a table (see :func:`tune`)."""
    import argparse

    p = argparse.ArgumentParser(prog="moepatch tune", description="Autotune the fused experts kernels on this GPU.")
    p.add_argument("--shapes", default="mixtral",
                   help=f"comma list of presets ({', '.join(PRESET_SHAPES)}) or E:H:I:K tuples")
    p.add_argument("--ms", default="1,4,16,64,256,1024,4096,16384", help="token counts (M buckets)")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16"))
    p.add_argument("--max-candidates", type=int, default=8, help="candidates per GEMM and BLOCK_M (0: all)")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--out", default=None, help="JSON path (default ~/.cache/moepatch/kernel_configs/<GPU>.json)")
    args = p.parse_args(argv)
    shapes = []
    for s in args.shapes.split(","):
        if s in PRESET_SHAPES:
            shapes.append(PRESET_SHAPES[s])
        else:
            try:
                shapes.append(tuple(int(v) for v in s.split(":")))
            except ValueError:
                p.error(f"shape {s!r}: expected a preset ({', '.join(PRESET_SHAPES)}) or E:H:I:K")
            if len(shapes[-1]) != 4:
                p.error(f"shape {s!r}: expected E:H:I:K")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    path = tune(shapes, [int(m) for m in args.ms.split(",")], dtype=dtype, out=args.out, reps=args.reps,
                max_candidates=args.max_candidates or None, log=print)
    print(f"wrote {path}")
    return 0
