"""CUDA-graph replay of the fused experts layer at 1-64 tokens, where the host bounds it: captured once per
signature (function, device, the inputs' shapes, dtypes and strides, the weights' addresses), bit for bit the
eager output (docs/kernels.md, "Small M").  Legend: T tokens, W slots, H hidden, E experts, I intermediate.
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


def _signature(fn, tensors) -> tuple:
    return (fn, tensors[0].device.index) + tuple(
        (tuple(t.shape), t.dtype, t.stride(), t.data_ptr() if i >= 3 else None) for i, t in enumerate(tensors))


class _ExpertsGraph:
    def __init__(self, fn, x_TH, ids_TW, weights_TW, gate_up_EIH, down_EHI):
        self.static = [x_TH.clone(), ids_TW.clone(), weights_TW.clone()]
        self.graph = torch.cuda.CUDAGraph()
        with _GRAPHS.recording(self.graph, x_TH.device):
            self.out_TH = fn(*self.static, gate_up_EIH, down_EHI)

    def replay(self, inputs) -> torch.Tensor:
        for dst, src in zip(self.static, inputs):
            dst.copy_(src)
        self.graph.replay()
        return self.out_TH.clone()  # the next replay rewrites out_TH; a caller may keep what it got


def experts_graphed(fn, x_TH: torch.Tensor, ids_TW: torch.Tensor, weights_TW: torch.Tensor,
                    gate_up_EIH: torch.Tensor, down_EHI: torch.Tensor) -> torch.Tensor:
    """``fn(x_TH, ids_TW, weights_TW, gate_up_EIH, down_EHI)``, replayed from a CUDA graph where that pays:
    on CUDA, 1..MAX_TOKENS tokens, not inside the caller's own capture, after WARMUP_CALLS calls."""
    with on_device(x_TH):
        if not x_TH.is_cuda or not 0 < x_TH.shape[0] <= MAX_TOKENS or torch.cuda.is_current_stream_capturing():
            return fn(x_TH, ids_TW, weights_TW, gate_up_EIH, down_EHI)
        inputs = (x_TH, ids_TW, weights_TW)
        key = _signature(fn, inputs + (gate_up_EIH, down_EHI))

        def eager():
            return fn(x_TH, ids_TW, weights_TW, gate_up_EIH, down_EHI)

        with torch.no_grad():
            return _GRAPHS.call(key, inputs, eager,
                                lambda: _ExpertsGraph(fn, x_TH, ids_TW, weights_TW, gate_up_EIH, down_EHI),
                                warmup_calls=WARMUP_CALLS, wall=_wall)
