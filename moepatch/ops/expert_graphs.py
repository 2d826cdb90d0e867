"""CUDA-graph replay of the fused experts layer for small token counts (decode steps, short prompts).

At a few tokens per layer call the fused experts layer is bound by the host, not the GPU: its two
to four Triton launches go through Triton's Python launcher (tens of microseconds each) after the
Python that picks the configuration and the layout, and a greedy decode step of a patched model
spends more host time in that than its kernels take on the GPU (H200, Mixtral layer, one token:
0.13-0.23 ms of host per call for 0.17 ms of kernels; docs/benchmarks.md, runs 10d and 12).  :func:`experts_graphed`
captures :func:`moepatch.ops.experts.fused_experts_impl` once per signature and replays it: the
activations, ids and weights are copied into the graph's static buffers and the output is copied
out, four small launches whatever the path inside.

A signature is the function, the device, the token count, the inputs' shapes, dtypes and strides, and the expert
weights' addresses, shapes and strides (each layer has its own graphs; a graph reads the weights in
place, so weights changed in place are seen, while weights replaced by new tensors make a new
signature).  Graphs are used only on CUDA, for 1..``MAX_TOKENS`` tokens, never while the caller is
itself capturing a graph (the eager launchers are capture-safe and go into the caller's graph), and
only after a signature was seen ``WARMUP_CALLS`` times, so every kernel is compiled before a capture
and one-off shapes stay eager.  At capture the replay and the eager call are timed (three calls
each, host time included) and the faster is kept.  The tile configuration is the one in force at
capture: after changing the tables (``MOEPATCH_KERNEL_CONFIGS``, ``moepatch tune``) call
:func:`clear`.  ``MOEPATCH_EXPERT_GRAPHS=0`` (or ``ENABLED = False``) switches replay off.

Same output as the eager call, bit for bit (the same kernels run on the same inputs; GPU tests).
Neither path records autograd (the fused kernels have no backward).

Legend: T tokens, W slots per token, H hidden, E experts, I intermediate.
"""

from __future__ import annotations

import os

import torch

from .graph_cache import GraphCache, on_device
from .graph_cache import wall as _wall

ENABLED = os.environ.get("MOEPATCH_EXPERT_GRAPHS", "1") != "0"
MAX_TOKENS = 64  # the decode path's range; above it the GPU time dominates the launches
WARMUP_CALLS = 2
MAX_GRAPHS = 1024  # signatures kept (layers x token counts); beyond that new ones run eagerly

_GRAPHS = GraphCache(MAX_GRAPHS)
_CACHE = _GRAPHS.entries  # signature -> calls seen (int), an _ExpertsGraph, or False (eager kept)


def clear() -> None:
    """Forget every captured graph (frees their static buffers; the pool goes with the last one)."""
    _GRAPHS.clear()


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
    """``fn(x_TH, ids_TW, weights_TW, gate_up_EIH, down_EHI)``, replayed from a CUDA graph where that pays."""
    with on_device(x_TH):
        return _experts_graphed(fn, x_TH, ids_TW, weights_TW, gate_up_EIH, down_EHI)


def _experts_graphed(fn, x_TH, ids_TW, weights_TW, gate_up_EIH, down_EHI):
    T = x_TH.shape[0]
    if (not ENABLED or not x_TH.is_cuda or not 0 < T <= MAX_TOKENS
            or torch.cuda.is_current_stream_capturing()):
        return fn(x_TH, ids_TW, weights_TW, gate_up_EIH, down_EHI)
    inputs = (x_TH, ids_TW, weights_TW)
    key = _signature(fn, inputs + (gate_up_EIH, down_EHI))

    def eager():
        return fn(x_TH, ids_TW, weights_TW, gate_up_EIH, down_EHI)

    with torch.no_grad():
        return _GRAPHS.call(key, inputs, eager,
                            lambda: _ExpertsGraph(fn, x_TH, ids_TW, weights_TW, gate_up_EIH, down_EHI),
                            warmup_calls=WARMUP_CALLS, wall=_wall)
