"""CUDA-graph replay of :func:`moepatch.ops.route.route` (bit for bit) for the routes made of many small kernels:
Reroute, Expanded Drop and the drops the fused kernel does not cover launch one to two hundred per layer.
"""

from __future__ import annotations

import math

import torch

from ..routing.route import STAT_FIELDS, RoutingResult
from . import route as _route
from .graph_cache import GraphCache, on_device
from .graph_cache import wall as _wall

WARMUP_CALLS = 2
MAX_GRAPHS = 256  # signatures kept; beyond that new ones run eagerly

_GRAPHS = GraphCache(MAX_GRAPHS)
_CACHE = _GRAPHS.entries  # signature -> calls seen (int), a _RouteGraph, or False (eager kept)
clear = _GRAPHS.clear  # forget every graph


def _signature(cfg, tensors, batch, seq, layer, source_rank, extra) -> tuple:
    shapes = tuple(None if t is None else (tuple(t.shape), t.dtype, t.stride()) for t in tensors)
    random = cfg.policy == "random"
    return (cfg, shapes, tensors[0].device.index, batch, seq, layer if random else None, source_rank,
            tuple(sorted(extra.items())))


class _RouteGraph:
    def __init__(self, cfg, inputs, batch, seq, layer, source_rank, extra):
        self.static = [None if t is None else t.clone() for t in inputs]
        self.graph = torch.cuda.CUDAGraph()
        with _GRAPHS.recording(self.graph, inputs[0].device):
            scores, ids, weights, factor, valid = self.static
            res = _route.route(cfg, scores, ids, weights, factor, batch=batch, seq=seq, valid_BS=valid,
                               layer=layer, source_rank=source_rank, **extra)
            self.ids = res.topk_ids_TW
            self.weights = res.topk_weights_TW
            stats = {f: getattr(res, f) for f in STAT_FIELDS}
            # The int64 statistics (all of them) in one buffer, so that one copy takes them out of the graph.
            self.fields = [(f, tuple(v.shape)) for f, v in stats.items() if v is not None]
            self.stats = torch.cat([stats[f].reshape(-1) for f, _ in self.fields])

    def replay(self, inputs) -> RoutingResult:
        for dst, src in zip(self.static, inputs):
            if dst is not None:
                dst.copy_(src)
        self.graph.replay()
        flat, out, at = self.stats.clone(), dict.fromkeys(STAT_FIELDS), 0
        for f, shape in self.fields:  # views of the one copy: no launch
            n = math.prod(shape)
            out[f] = flat[at:at + n].view(shape)
            at += n
        return RoutingResult(self.ids.clone(), self.weights.clone(), **out)


def route_graphed(cfg, scores_TE: torch.Tensor, topk_ids_TK: torch.Tensor, topk_weights_TK: torch.Tensor,
                  factor_T: torch.Tensor | None, *, batch: int, seq: int, valid_BS: torch.Tensor | None = None,
                  layer: int = 0, source_rank: int | None = None, **extra) -> RoutingResult:
    """:func:`moepatch.ops.route.route` (same arguments, same result), replayed from a CUDA graph where that pays:
    with ``cfg.cuda_graphs`` on CUDA, never when an input requires grad nor inside the caller's own capture."""
    with on_device(scores_TE):
        def eager():
            return _route.route(cfg, scores_TE, topk_ids_TK, topk_weights_TK, factor_T, batch=batch, seq=seq,
                                valid_BS=valid_BS, layer=layer, source_rank=source_rank, **extra)

        inputs = [scores_TE, topk_ids_TK, topk_weights_TK, factor_T, valid_BS]
        if (not cfg.cuda_graphs or not scores_TE.is_cuda or cfg.unlimited or scores_TE.shape[0] == 0
                or torch.cuda.is_current_stream_capturing()
                # Training: the kept weights carry the router's gradient, which a replay would cut.
                or (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs))):
            return eager()
        key = _signature(cfg, inputs, batch, seq, layer, source_rank, extra)
        # Where the eager kernels are few and long the replay can lose: the cache keeps the faster.
        return _GRAPHS.call(key, inputs, eager,
                            lambda: _RouteGraph(cfg, inputs, batch, seq, layer, source_rank, extra),
                            warmup_calls=WARMUP_CALLS, wall=_wall)
