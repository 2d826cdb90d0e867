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
import json
import os
import time
from pathlib import Path

import torch

from ..arguments import ArgumentParser, HelpFormatter

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


# Compute capability of each GPU key seen in this process (filled by _cuda_device_key): the defaults
# use the descriptor GEMMs only where TMA exists (Hopper and later).
_CAPABILITY: dict[str, tuple[int, int]] = {}


@functools.cache
def _cuda_device_key(index: int) -> str:
    # Cached: the experts function asks on every call and the name never changes.
    key = torch.cuda.get_device_name(index).replace(" ", "_").replace("/", "_")
    _CAPABILITY[key] = tuple(torch.cuda.get_device_capability(index))
    return key


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


def default_config(M: int, E: int, H: int, I: int, K: int, device_type: str = "cuda",  # noqa: E741
                   descriptors: bool = False) -> dict:
    """A sensible configuration for any shape, from how many rows an expert gets on average.

    Few rows per expert: the layer is bound by reading weights, so tiles are thin (BLOCK_M 16),
    the down GEMM is split along K to put enough programs in flight, and BLOCK_N shrinks when the
    experts are narrow so the grid still covers every SM several times.  Many rows: compute-bound,
    so the large tiles and deep pipelines that reach tensor-core peak on Hopper.  With ``descriptors``
    (a GPU with TMA, compute capability >= 9) and at least 24 rows per expert, the descriptor layer of
    tma_kernels.py (64-row tiles up to 192 rows per expert, 128 above) wherever its peak memory stays
    under grouped_mm's: measured faster than the pointer GEMMs on seven shapes (docs/kernels.md).
    """
    if device_type != "cuda":
        # The interpreter runs one program at a time: the fewest, largest tiles are fastest.
        return {"BLOCK_M": 16,
                "gate_up": {"BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 1, "num_warps": 4, "num_stages": 1},
                "down": {"BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 1, "SPLIT_K": 1, "num_warps": 4,
                         "num_stages": 1}}
    rows = M * K / E  # mean rows per expert
    if descriptors and rows >= 24:
        bm = 128 if rows > 192 else 64
        if _desc_memory_ok(M * K, E, H, I, bm):
            return _desc_default(bm)
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


def _desc_memory_ok(P: int, E: int, H: int, I: int, block_m: int) -> bool:  # noqa: E741
    """Whether the descriptor layer's peak (gathered rows and h: R_max x (H + I), padding included) stays
    under a lower bound of transformers' grouped_mm (inputs, gate/up, activation, output: P x (2H + 3I))."""
    from .experts import max_rows  # experts imports this module

    return max_rows(P, E, block_m) * (H + I) <= P * (2 * H + 3 * I)


def _desc_default(block_m: int) -> dict:
    """The descriptor layer the shipped H200 table chose for every shape it covers: the first of the tuner's
    descriptor candidates for that BLOCK_M (128-row tiles with 8 warps, 64-row tiles with one warp group)."""
    gate_ups, downs = (_DESC_GATE_UP, _DESC_DOWN) if block_m == 128 else (_DESC64_GATE_UP, _DESC64_DOWN)
    return {"BLOCK_M": block_m, "DESC": True, "gate_up": dict(gate_ups[0]), "down": dict(downs[0])}


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
    if dev_key == "cpu":
        return default_config(M, E, H, I, K, "cpu")
    return default_config(M, E, H, I, K, "cuda", descriptors=_CAPABILITY.get(dev_key, (0, 0)) >= (9, 0))


def _gu(bn, bk, g, w, st):
    return dict(BLOCK_N=bn, BLOCK_K=bk, GROUP_M=g, num_warps=w, num_stages=st)


def _dn(bn, bk, g, split, w, st):
    return dict(BLOCK_N=bn, BLOCK_K=bk, GROUP_M=g, SPLIT_K=split, num_warps=w, num_stages=st)


# Curated H200 candidates per regime, most promising first (tune() takes the first N).  Weight
# streaming (few rows per expert): thin tiles, deep pipelines, split-K for down; compute-bound:
# 128-row tiles with 8 warps, as vLLM's tuned H200 tables for the same layer shapes.  gate_up's
# BLOCK_N is per half (two accumulators), so vLLM's BLOCK_N 256 on the fused [gate; up] is 128 here.
_STREAM_GATE_UP = [_gu(32, 128, 8, 4, 4), _gu(32, 128, 8, 4, 3), _gu(64, 128, 8, 4, 4), _gu(64, 128, 16, 4, 5),
                   _gu(32, 256, 8, 4, 3), _gu(64, 256, 8, 4, 3), _gu(16, 256, 8, 4, 4), _gu(128, 128, 8, 8, 3),
                   _gu(64, 64, 8, 4, 5)]
# SPLIT_K 3: Mixtral's 2 slots x 64 column blocks x 3 parts = 384 programs, one wave at 3 per SM on an
# H200 (132 SMs), where 4 parts made 1.3 waves (explore_token.py --sweep, docs/benchmarks.md run 8).
_STREAM_DOWN = [_dn(64, 128, 8, 4, 4, 4), _dn(64, 128, 8, 3, 4, 4), _dn(64, 128, 8, 2, 4, 4), _dn(128, 128, 8, 2, 4, 4),
                _dn(64, 256, 8, 4, 4, 3), _dn(32, 128, 8, 8, 4, 4), _dn(128, 128, 8, 4, 4, 4), _dn(64, 128, 8, 1, 4, 5),
                _dn(128, 64, 8, 1, 4, 5)]
_MID_GATE_UP = [_gu(64, 128, 8, 4, 3), _gu(64, 128, 16, 4, 4), _gu(128, 128, 16, 8, 3), _gu(64, 64, 8, 4, 4),
                _gu(32, 128, 8, 4, 4), _gu(128, 64, 16, 8, 4)]
_MID_DOWN = [_dn(128, 128, 8, 1, 4, 3), _dn(64, 128, 8, 1, 4, 4), _dn(128, 128, 16, 2, 8, 3), _dn(256, 64, 16, 1, 8, 4),
             _dn(128, 64, 8, 2, 4, 4), _dn(64, 128, 8, 2, 4, 4)]
_BIG_GATE_UP = [_gu(128, 64, 16, 8, 3), _gu(128, 64, 16, 8, 4), _gu(64, 64, 8, 4, 4), _gu(128, 64, 32, 8, 4),
                _gu(64, 128, 8, 4, 3), _gu(128, 32, 16, 8, 5)]
_BIG_DOWN = [_dn(256, 64, 16, 1, 8, 3), _dn(256, 64, 16, 1, 8, 4), _dn(128, 64, 16, 1, 8, 4), _dn(128, 128, 8, 1, 8, 3),
             _dn(256, 64, 32, 1, 8, 4), _dn(256, 64, 16, 2, 8, 3)]


# One token (M = 1): the down GEMM and the combine in one kernel (_down_token_kernel), programs per
# BLOCK_N outputs walking every slot's weights; BLOCK_N 16 gives Mixtral 256 programs, the 2048-wide
# models 128.
_TOKEN_DOWN = [dict(_dn(16, 256, 1, 1, 4, 4), TOKEN=1), dict(_dn(16, 128, 1, 1, 4, 6), TOKEN=1),
               dict(_dn(16, 512, 1, 1, 4, 3), TOKEN=1), dict(_dn(32, 256, 1, 1, 4, 4), TOKEN=1),
               dict(_dn(16, 256, 1, 1, 8, 4), TOKEN=1)]


# The descriptor GEMMs of tma_kernels.py (DESC), for the compute-bound regime: joint gate/up boxes,
# persistent programs whose tile loop Triton flattens (the next tile's loads overlap this tile's
# epilogue) and h stored through a descriptor in two halves: the winners on the H200 for every shape
# at M >= 1024 (docs/kernels.md, "Large M: per-tile overhead"), then the earlier ones (run 3).  The first
# of each list is also default_config's choice on Hopper for shapes no table has.
_PF = dict(PERSISTENT=1, FLATTEN=1)
_DESC_GATE_UP = [dict(_gu(128, 64, 16, 8, 4), JOINT=1, H_STORE_SPLIT=2, **_PF),
                 dict(_gu(128, 64, 16, 8, 3), JOINT=1, H_STORE_SPLIT=1, **_PF),
                 dict(_gu(128, 64, 16, 8, 4), JOINT=1, **_PF), dict(_gu(128, 64, 16, 8, 4), JOINT=1),
                 dict(_gu(128, 64, 16, 8, 3), JOINT=1), _gu(128, 64, 16, 8, 4)]
_DESC_DOWN = [dict(_dn(256, 64, 16, 1, 8, 4), **_PF), _dn(256, 64, 16, 1, 8, 4),
              dict(_dn(256, 64, 16, 1, 8, 4), PERSISTENT=1), dict(_dn(256, 64, 16, 1, 8, 3), **_PF),
              _dn(256, 64, 8, 1, 8, 4)]
# 64-row descriptor tiles (one warp group): the many-expert layers at 32-96 rows per expert.
_DESC64_GATE_UP = [dict(_gu(128, 64, 16, 4, 4), JOINT=1, H_STORE_SPLIT=2, **_PF),
                   dict(_gu(128, 64, 16, 4, 3), JOINT=1, **_PF)]
_DESC64_DOWN = [_dn(128, 64, 16, 1, 4, 4), dict(_dn(128, 64, 16, 1, 4, 4), **_PF), _dn(256, 64, 16, 1, 4, 3)]


def candidate_configs(M: int, E: int, H: int, I: int, K: int) -> list[tuple]:  # noqa: E741
    """The search space of :func:`tune` for one shape and M: [(BLOCK_M, gate_up list, down list[, "desc"])].

    Per BLOCK_M the regime's curated lists (see above), most promising first; BLOCK_M values are
    chosen from the mean rows per expert (M * K / E) so that an expert's rows fill one or two
    blocks.  Entries ending in "desc" are the descriptor GEMMs on gathered rows.  Configurations
    whose pipeline exceeds the H200's shared memory are left out.
    """
    rows = M * K / E
    if M == 1:
        plan = [(16, _STREAM_GATE_UP, _TOKEN_DOWN + _STREAM_DOWN)]
    elif rows <= 4:
        plan = [(16, _STREAM_GATE_UP, _STREAM_DOWN)]
    elif rows <= 24:
        plan = [(16, _STREAM_GATE_UP, _STREAM_DOWN), (32, _MID_GATE_UP, _MID_DOWN)]
    elif rows <= 96:
        plan = [(64, _MID_GATE_UP, _MID_DOWN), (64, _DESC64_GATE_UP, _DESC64_DOWN, "desc"),
                (128, _BIG_GATE_UP, _BIG_DOWN), (32, _MID_GATE_UP, _MID_DOWN)]
    elif rows <= 192:
        plan = [(128, _BIG_GATE_UP, _BIG_DOWN), (128, _DESC_GATE_UP, _DESC_DOWN, "desc"),
                (64, _DESC64_GATE_UP, _DESC64_DOWN, "desc"), (64, _MID_GATE_UP, _MID_DOWN)]
    else:
        plan = [(128, _BIG_GATE_UP, _BIG_DOWN), (128, _DESC_GATE_UP, _DESC_DOWN, "desc"),
                (64, _BIG_GATE_UP, _BIG_DOWN)]
    return [(p[0], [c for c in p[1] if _fits(p[0], c, 2)], [c for c in p[2] if _fits(p[0], c, 1)], *p[3:])
            for p in plan]


_SMEM_BYTES = 227 * 1024  # H200 shared memory per block


def _fits(block_m: int, c: dict, b_tiles: int) -> bool:
    return c["num_stages"] * 2 * c["BLOCK_K"] * (block_m + b_tiles * c["BLOCK_N"]) <= _SMEM_BYTES


def tune(shapes: list[tuple[int, int, int, int]], ms: list[int], *, dtype: torch.dtype = torch.bfloat16,
         out: str | os.PathLike | None = None, reps: int = 20, max_candidates: int | None = None,
         device: str = "cuda", log=None, budget_s: float | None = None) -> Path:
    """Autotune (E, H, I, K) shapes over token counts ``ms`` on the current GPU and write a table.

    For each M the configuration the lookup gives today is timed first (the baseline, and the
    reference every candidate's output is checked against), then the candidates of
    :func:`candidate_configs`: per BLOCK_M each gate_up candidate alone, then each down candidate
    together with the combine (split-K parts cost the combine more), CUDA events, median of
    ``reps`` after warm-up.  The best BLOCK_M (dispatch + gate_up + down/combine) wins; a
    candidate whose output differs from the baseline's (rel err > 2e-2) is discarded.  Buckets
    not tuned keep the configuration the lookup had, so the table is complete.  Routing is uniform
    random top-k (tuning needs representative sizes, not a trained router).

    Args:
        shapes: list of (E, H, I, K).
        ms: tokens per forward to tune for; each becomes a bucket.
        out: JSON path; default ``~/.cache/moepatch/kernel_configs/<GPU>.json``.
        max_candidates: at most this many candidates per GEMM and BLOCK_M (the first of each list).
        budget_s: wall-clock budget for the whole call (compiles included), shared evenly by the
            (shape, M) pairs; a pair out of time keeps its best so far (at least the baseline).
        log: callable taking one line of progress (e.g. ``print``); None is silent.
    Returns:
        The path written.
    """
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("tune() times kernels on a CUDA GPU; none is available")
    if torch.device(device).type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(f"tune() on {device} needs TRITON_INTERPRET=1 (meant for tests only)")
    dev_key = device_key(device)
    path = Path(out) if out is not None else USER_DIR / f"{dev_key}.json"
    table = json.loads(path.read_text()) if path.is_file() else {}
    t_start = time.perf_counter()
    n_pairs = max(1, len(shapes) * len(ms))
    done = 0
    for E, H, I, K in shapes:  # noqa: E741
        key = shape_key(E, H, I, K)
        # Start from what the lookup serves now, so untuned buckets stay as they were.
        entry = table.setdefault(key, {str(m): get_config(m, E, H, I, K, dev_key) for m in M_BUCKETS})
        gen = torch.Generator(device=device).manual_seed(0)
        w1 = torch.randn(E, 2 * I, H, device=device, dtype=dtype, generator=gen) * H**-0.5
        w2 = torch.randn(E, H, I, device=device, dtype=dtype, generator=gen) * I**-0.5
        for M in ms:
            deadline = None
            if budget_s is not None:
                deadline = t_start + budget_s * (done + 1) / n_pairs
            x = torch.randn(M, H, device=device, dtype=dtype, generator=gen)
            ids = torch.rand(M, E, device=device, generator=gen).topk(K, dim=1).indices
            wts = torch.rand(M, K, device=device, generator=gen)
            base = get_config(M, E, H, I, K, dev_key)
            best = _tune_m(x, ids, wts, w1, w2, base, candidate_configs(M, E, H, I, K), reps, max_candidates,
                           deadline, log, f"{key} M={M}")
            entry[str(M)] = best
            done += 1
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    get_config.cache_clear()
    return path


def _tune_m(x, ids, wts, w1, w2, base, plan, reps, max_candidates, deadline, log, label) -> dict:
    """The best configuration for one (shape, M); see :func:`tune`."""
    from . import experts as X

    E = w1.shape[0]
    dev = x.device
    ref = X.fused_experts_impl(x, ids, wts, w1, w2, base).float()

    def agrees(out):
        den = ref.norm().item() or 1.0
        return torch.isfinite(out).all().item() and (out.float() - ref).norm().item() / den < 2e-2

    def out_of_time():
        return deadline is not None and time.perf_counter() > deadline

    results = []  # (ms, config)
    t_base = _time_safe(lambda: X.fused_experts_impl(x, ids, wts, w1, w2, base), reps, dev)
    results.append((t_base, base))
    if log:
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
        if max_candidates:
            gate_ups, downs = gate_ups[:max_candidates], downs[:max_candidates]
        layout = X.dispatch(ids, E, bm, fuse=False if desc else None)
        if desc and not X.descriptors_fit(layout, x, w1, w2):
            continue
        t_dispatch = 0.0 if layout.fused else _time(lambda bm=bm: X.dispatch(ids, E, bm), reps, dev)
        h = torch.empty(layout.rows, w1.shape[1] // 2, device=dev, dtype=x.dtype)
        if desc:
            x_rows = X.gather_rows(x, layout)
            t_dispatch += _time(lambda lay=layout: X.gather_rows(x, lay), reps, dev)

            def gate_up_run(c, lay=layout, h=h, xr=x_rows):
                X.gate_up_desc(xr, w1, lay, {"gate_up": c}, out=h)

            def down_run(c, h, lay=layout):
                return X.down_desc(h, w2, lay, wts, {"down": c})
        else:
            def gate_up_run(c, lay=layout, h=h):
                X.gate_up(x, w1, lay, {"gate_up": c}, out=h)

            def down_run(c, h, lay=layout):
                return X.down(h, w2, lay, wts, {"down": c})
        best_gu = (float("inf"), None)
        for c in gate_ups:
            if out_of_time() and best_gu[1] is not None:
                break
            t = _time_safe(lambda c=c: gate_up_run(c), reps, dev)
            if t < best_gu[0]:
                best_gu = (t, c)
        if best_gu[1] is None:
            continue
        gate_up_run(best_gu[1])
        best_dn = (float("inf"), None)
        for c in downs:
            if out_of_time() and best_dn[1] is not None:
                break

            def run(c=c, h=h, lay=layout, desc=desc):
                if desc:
                    return X.combine(down_run(c, h), ids, E, x.dtype)
                return X.down_and_combine(h, w2, lay, ids, wts, {"down": c}, x.dtype)

            t = _time_safe(run, reps, dev)
            if t < best_dn[0] and agrees(run()):
                best_dn = (t, c)
        if best_dn[1] is None:
            continue
        cfg = {"BLOCK_M": bm, "gate_up": best_gu[1], "down": best_dn[1], **({"DESC": True} if desc else {})}
        total = t_dispatch + best_gu[0] + best_dn[0]
        if log:
            log(f"tune {label}: BLOCK_M={bm}{' desc' if desc else ''} {total * 1e3:.1f} us "
                f"(gate_up {best_gu[0] * 1e3:.1f}, down+combine {best_dn[0] * 1e3:.1f})")
        if agrees(X.fused_experts_impl(x, ids, wts, w1, w2, cfg)):
            # Re-time the whole layer: the sum of parts misses launch gaps and L2 effects.
            results.append((_time_safe(lambda cfg=cfg: X.fused_experts_impl(x, ids, wts, w1, w2, cfg), reps, dev),
                            cfg))
    t_best, cfg_best = min(results, key=lambda r: r[0])
    if log and TUNE_FAILURES:
        log(f"tune {label}: {len(TUNE_FAILURES)} candidate(s) failed so far; last: {TUNE_FAILURES[-1]}")
    if log:
        log(f"tune {label}: chose BLOCK_M={cfg_best['BLOCK_M']} {t_best * 1e3:.1f} us "
            f"({t_base / t_best:.2f}x the baseline) {json.dumps(cfg_best, sort_keys=True)}")
    return cfg_best


# Cycles of the spin kernel queued ahead of a timed call when the launch is to be hidden (~0.2 ms).
BUSY_CYCLES = 400_000


def busy_gpu() -> None:
    """Queue ~0.2 ms of spinning on the current stream.

    Events recorded right after it, around a CUDA-graph replay, then time the device's work alone:
    the host enqueues the start event, the graph and the end event while the GPU still spins, so the
    ~5-15 µs the host takes to launch the graph is not counted (it is, after an idle GPU, because the
    start event fires at once and the GPU then waits for the graph).  A model captured as one graph
    pays that launch once per forward, not once per layer.
    """
    torch.cuda._sleep(BUSY_CYCLES)


def _time(fn, reps: int, device: torch.device, hide_launch: bool = False) -> float:
    """Median milliseconds of ``fn`` over ``reps`` CUDA-event timings after two warm-up calls.

    hide_launch: start each timing behind :func:`busy_gpu` (device time of a graph replay).
    """
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
        if hide_launch:
            busy_gpu()
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


# Candidates that failed to compile or run during tuning, with the error (reported by tune's log).
TUNE_FAILURES: list[str] = []


def _time_safe(fn, reps: int, device: torch.device) -> float:
    """:func:`_time`, or infinity for a configuration this GPU cannot compile or run.

    A tuner explores configurations nobody has run before: one that exceeds shared memory or trips
    the compiler is recorded in TUNE_FAILURES and loses, instead of ending the whole run.
    """
    from triton.runtime.errors import OutOfResources

    try:
        return _time(fn, reps, device)
    except OutOfResources:
        return float("inf")
    except Exception as exc:  # recorded and reported, see above
        TUNE_FAILURES.append(f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")
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
                max_candidates=args.max_candidates or None, log=print, budget_s=args.budget)
    print(f"wrote {path}")
    return 0
