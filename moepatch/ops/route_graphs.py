"""CUDA-graph replay of :func:`moepatch.ops.route.route` (bit for bit) for the routes made of many small kernels:
Reroute, Expanded Drop and the drops the fused kernel does not cover launch one to two hundred per layer.
"""

from __future__ import annotations

import math

import torch

from ..routing.route import STAT_FIELDS, RoutingResult
from . import route as _route
from .graph_cache import CapturedGraph, GraphCache, on_device
from .graph_cache import wall as _wall

WARMUP_CALLS = 2
MAX_GRAPHS = 256  # signatures kept; beyond that new ones run eagerly

_GRAPHS = GraphCache(MAX_GRAPHS)
_CACHE = _GRAPHS.entries  # signature -> calls seen (int), a _RouteGraph, or False (eager kept)
clear = _GRAPHS.clear  # forget every graph


class _RouteGraph(CapturedGraph):
    def __init__(self, inputs, route):
        def run(*static):
            res = route(*static)
            stats = {f: getattr(res, f) for f in STAT_FIELDS}
            # The int64 statistics (all of them) in one buffer, so that one copy takes them out of the graph.
            self.fields = [(f, tuple(v.shape)) for f, v in stats.items() if v is not None]
            return res.topk_ids_TW, res.topk_weights_TW, torch.cat([stats[f].reshape(-1) for f, _ in self.fields])

        super().__init__(_GRAPHS, inputs, run)

    def replay(self, inputs) -> RoutingResult:
        ids, weights, stats = super().replay(inputs)
        out = dict.fromkeys(STAT_FIELDS)
        parts = stats.clone().split([math.prod(shape) for _, shape in self.fields])  # views of the one copy: no launch
        for (f, shape), part in zip(self.fields, parts):
            out[f] = part.view(shape)
        return RoutingResult(ids.clone(), weights.clone(), **out)


def route_graphed(cfg, scores_TE: torch.Tensor, topk_ids_TK: torch.Tensor, topk_weights_TK: torch.Tensor,
                  factor_T: torch.Tensor | None, *, batch: int, seq: int, valid_BS: torch.Tensor | None = None,
                  layer: int = 0, source_rank: int | None = None, **extra) -> RoutingResult:
    """:func:`moepatch.ops.route.route` (same arguments, same result), replayed from a CUDA graph where that pays:
    with ``cfg.cuda_graphs`` on CUDA, never when an input requires grad nor inside the caller's own capture."""
    with on_device(scores_TE):
        def route(scores, ids, weights, factor, valid):
            return _route.route(cfg, scores, ids, weights, factor, batch=batch, seq=seq, valid_BS=valid, layer=layer,
                                source_rank=source_rank, **extra)

        inputs = [scores_TE, topk_ids_TK, topk_weights_TK, factor_T, valid_BS]
        if (not cfg.cuda_graphs or not scores_TE.is_cuda or cfg.unlimited or scores_TE.shape[0] == 0
                or torch.cuda.is_current_stream_capturing()
                # Training: the kept weights carry the router's gradient, which a replay would cut.
                or (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs))):
            return route(*inputs)
        shapes = tuple(None if t is None else (tuple(t.shape), t.dtype, t.stride()) for t in inputs)
        key = (cfg, shapes, scores_TE.device.index, batch, seq, layer if cfg.policy == "random" else None, source_rank,
               tuple(sorted(extra.items())))
        # Where the eager kernels are few and long the replay can lose: the cache keeps the faster.
        return _GRAPHS.call(key, inputs, lambda: route(*inputs), lambda: _RouteGraph(inputs, route),
                            warmup_calls=WARMUP_CALLS, wall=_wall)
