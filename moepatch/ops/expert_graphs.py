"""CUDA-graph replay of the fused experts layer at 1-64 tokens, where the host bounds it: captured once per
signature (function, device, the inputs' shapes, dtypes and strides, the weights' and biases' addresses,
the expert form), bit for bit the eager output (docs/kernels.md, "Small M").
Legend: T tokens, W slots, H hidden, E experts, I intermediate.
"""

from __future__ import annotations

import torch

from .graph_cache import GraphCache, on_device
from .graph_cache import wall as _wall

MAX_TOKENS = 64  # the decode path's range; above it the GPU time dominates the launches
WARMUP_CALLS = 2
MAX_GRAPHS = 1024  # signatures kept (layers x token counts); beyond that new ones run eagerly

_GRAPHS = GraphCache(MAX_GRAPHS)
_CACHE = _GRAPHS.entries  # signature -> calls seen (int), an _ExpertsGraph, or False (eager kept)
clear = _GRAPHS.clear  # forget every graph (tuning.set_tables does: a graph keeps its capture's tile configuration)


def graphs() -> int:
    """How many signatures are replayed from a graph now."""
    return _GRAPHS.captured(_ExpertsGraph)


def _tensor_key(t: torch.Tensor, address: bool) -> tuple:
    return tuple(t.shape), t.dtype, t.stride(), t.data_ptr() if address else None


def _signature(fn, tensors, extra: dict) -> tuple:
    """Tensors past the first three (the weights) and tensor keyword arguments (biases) by address too."""
    return (fn, tensors[0].device.index) + tuple(_tensor_key(t, i >= 3) for i, t in enumerate(tensors)) + tuple(
        (k, _tensor_key(v, True) if isinstance(v, torch.Tensor) else v) for k, v in sorted(extra.items()))


class _ExpertsGraph:
    def __init__(self, fn, x_TH, ids_TW, weights_TW, gate_up_EIH, down_EHI, extra):
        self.static = [x_TH.clone(), ids_TW.clone(), weights_TW.clone()]
        self.graph = torch.cuda.CUDAGraph()
        with _GRAPHS.recording(self.graph, x_TH.device):
            self.out_TH = fn(*self.static, gate_up_EIH, down_EHI, **extra)

    def replay(self, inputs) -> torch.Tensor:
        for dst, src in zip(self.static, inputs):
            dst.copy_(src)
        self.graph.replay()
        return self.out_TH.clone()  # the next replay rewrites out_TH; a caller may keep what it got


def experts_graphed(fn, x_TH: torch.Tensor, ids_TW: torch.Tensor, weights_TW: torch.Tensor,
                    gate_up_EIH: torch.Tensor, down_EHI: torch.Tensor, **extra) -> torch.Tensor:
    """``fn(x_TH, ids_TW, weights_TW, gate_up_EIH, down_EHI, **extra)``, replayed from a CUDA graph where that
    pays: on CUDA, 1..MAX_TOKENS tokens, not inside the caller's own capture, after WARMUP_CALLS calls.
    extra: fixed arguments (biases, the expert form; tensors kept by address, others hashable)."""
    with on_device(x_TH):
        if not x_TH.is_cuda or not 0 < x_TH.shape[0] <= MAX_TOKENS or torch.cuda.is_current_stream_capturing():
            return fn(x_TH, ids_TW, weights_TW, gate_up_EIH, down_EHI, **extra)
        inputs = (x_TH, ids_TW, weights_TW)
        key = _signature(fn, inputs + (gate_up_EIH, down_EHI), extra)

        def eager():
            return fn(x_TH, ids_TW, weights_TW, gate_up_EIH, down_EHI, **extra)

        with torch.no_grad():
            return _GRAPHS.call(key, inputs, eager,
                                lambda: _ExpertsGraph(fn, x_TH, ids_TW, weights_TW, gate_up_EIH, down_EHI, extra),
                                warmup_calls=WARMUP_CALLS, wall=_wall)
