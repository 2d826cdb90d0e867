"""Tile configurations per GPU and shape: the table lookup and the defaults (the autotuner is tune.py).

Tables, configurations and where they are looked up: docs/kernels.md, "Configurations and tuning".
Legend: M tokens, E experts, H hidden, I intermediate, K experts per token (slots W at run time).
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import torch

from . import expert_graphs

SHIPPED_DIR = Path(__file__).with_name("configs")
M_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
# The layers moepatch's benchmarks and shipped tables cover: (E, H, I, K).
PRESET_SHAPES = {"mixtral": (8, 4096, 14336, 2), "olmoe": (64, 2048, 1024, 8),
                 "deepseek_v2_lite": (64, 2048, 1408, 6), "qwen3_30b_a3b": (128, 2048, 768, 8)}
_TABLES: list[Path] = []  # the directory of set_tables, if any


def user_dir() -> Path:
    """Where :func:`moepatch.ops.tune.tune` writes by default: ~/.cache/moepatch/kernel_configs."""
    return Path(os.path.expanduser("~/.cache/moepatch/kernel_configs"))


def set_tables(directory: str | os.PathLike | None) -> None:
    """Look tables up in ``directory`` first (None: ``$MOEPATCH_KERNEL_CONFIGS`` again); forgets the cached
    lookups and the experts' CUDA graphs, which keep the configuration of their capture."""
    _TABLES[:] = [Path(directory)] if directory is not None else []
    get_config.cache_clear()
    expert_graphs.clear()


def shape_key(E: int, H: int, I: int, K: int) -> str:  # noqa: E741 (I is the intermediate size)
    return f"E={E},H={H},I={I},K={K}"


def device_key(device: torch.device | str) -> str:
    """File stem for the GPU of ``device`` ("NVIDIA_H200"), or "cpu" (the interpreter)."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return "cpu"
    return _cuda_device_key(dev.index if dev.index is not None else torch.cuda.current_device())


# Compute capability of each GPU key seen here: the defaults use the descriptor GEMMs only with TMA (Hopper on).
_CAPABILITY: dict[str, tuple[int, int]] = {}


@functools.cache
def _cuda_device_key(index: int) -> str:
    key = torch.cuda.get_device_name(index).replace(" ", "_").replace("/", "_")
    _CAPABILITY[key] = tuple(torch.cuda.get_device_capability(index))
    return key


def _dirs() -> list[Path]:
    env = os.environ.get("MOEPATCH_KERNEL_CONFIGS")  # read at lookup, not at import
    return (_TABLES or ([Path(env)] if env else [])) + [user_dir(), SHIPPED_DIR]


@functools.lru_cache(maxsize=64)
def _table(path: str, mtime: float) -> dict:  # cached per modification time
    return json.loads(Path(path).read_text())


def max_rows(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Static bound on the dispatch rows: each expert with pairs pads at most BLOCK_M - 1 rows."""
    return -(-(num_pairs + min(num_experts, num_pairs) * (block_m - 1)) // block_m) * block_m


def gu(bn, bk, g, w, st) -> dict:  # a gate_up tile configuration
    return dict(BLOCK_N=bn, BLOCK_K=bk, GROUP_M=g, num_warps=w, num_stages=st)


def dn(bn, bk, g, split, w, st) -> dict:  # a down tile configuration
    return dict(BLOCK_N=bn, BLOCK_K=bk, GROUP_M=g, SPLIT_K=split, num_warps=w, num_stages=st)


# The descriptor layer the shipped H200 table chose for every shape it covers, per BLOCK_M: 128-row
# tiles with 8 warps, 64-row tiles with one warp group (persistent, flattened tile loop, joint
# gate/up boxes, h stored in two halves).  Also the first descriptor candidates of tune.py.
PF = dict(PERSISTENT=1, FLATTEN=1)
DESC_DEFAULT = {128: (dict(gu(128, 64, 16, 8, 4), JOINT=1, H_STORE_SPLIT=2, **PF),
                      dict(dn(256, 64, 16, 1, 8, 4), **PF)),
                64: (dict(gu(128, 64, 16, 4, 4), JOINT=1, H_STORE_SPLIT=2, **PF), dn(128, 64, 16, 1, 4, 4))}


def default_config(M: int, E: int, H: int, I: int, K: int, device_type: str = "cuda",  # noqa: E741
                   descriptors: bool = False) -> dict:
    """A configuration for any shape from the mean rows per expert (M * K / E): weight streaming (thin
    tiles, split-K) for few rows, large compute-bound tiles for many; with ``descriptors`` (TMA) from 24
    rows the descriptor layer where its peak memory stays under grouped_mm's (docs/kernels.md)."""
    if device_type != "cuda":  # the interpreter runs one program at a time: few, large tiles
        return {"BLOCK_M": 16, "gate_up": gu(32, 32, 1, 4, 1), "down": dn(32, 32, 1, 1, 4, 1)}
    rows = M * K / E
    if descriptors and rows >= 24:
        bm = 128 if rows > 192 else 64
        # Gathered rows and h (R_max x (H + I), padding included) under a lower bound of grouped_mm's
        # peak (inputs, gate/up, activation, output: P x (2H + 3I)).
        if max_rows(M * K, E, bm) * (H + I) <= M * K * (2 * H + 3 * I):
            gate_up, down = DESC_DEFAULT[bm]
            return {"BLOCK_M": bm, "DESC": True, "gate_up": dict(gate_up), "down": dict(down)}
    if rows <= 32:
        # Weight streaming: programs per (expert hit, N tile); keep >= ~4 waves of 132 SMs.
        experts_hit = min(E, M * K)
        bn = 64
        while bn > 16 and experts_hit * (I // bn) < 512:
            bn //= 2
        tiles_down = experts_hit * (H // 64)
        split = 1
        while split < 8 and tiles_down * split < 512 and I // (split * 2) >= 256:
            split *= 2
        return {"BLOCK_M": 16, "gate_up": gu(bn, 128, 8, 4, 4), "down": dn(64, 128, 8, split, 4, 4)}
    if rows <= 96:
        return {"BLOCK_M": 32, "gate_up": gu(64, 128, 8, 4, 3), "down": dn(128, 128, 8, 1, 4, 3)}
    if rows <= 192:
        return {"BLOCK_M": 64, "gate_up": gu(64, 64, 8, 4, 4), "down": dn(128, 64, 8, 1, 4, 4)}
    # Two (128 x 128) fp32 accumulators hold as many registers as vLLM's single 128 x 256 tile;
    # three stages of (128 + 2 * 128) x 64 bf16 tiles fit Hopper's shared memory.
    return {"BLOCK_M": 128, "gate_up": gu(128, 64, 16, 8, 3), "down": dn(256, 64, 16, 1, 8, 3)}


@functools.lru_cache(maxsize=4096)
def get_config(M: int, E: int, H: int, I: int, K: int, dev_key: str) -> dict:  # noqa: E741
    """The configuration for M tokens of this shape on this GPU: the nearest bucket of a table, else
    :func:`default_config` (cached: :func:`set_tables` forgets)."""
    key = shape_key(E, H, I, K)
    for d in _dirs():
        path = d / f"{dev_key}.json"
        table = _table(str(path), path.stat().st_mtime).get(key) if path.is_file() else None
        if table:
            return table[str(min((int(k) for k in table), key=lambda k: (abs(k - M), k)))]
    return default_config(M, E, H, I, K, "cpu" if dev_key == "cpu" else "cuda",
                          descriptors=_CAPABILITY.get(dev_key, (0, 0)) >= (9, 0))
