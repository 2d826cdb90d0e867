"""CUDA-graph replay of the sync-free routing, for the strategies that route with small torch kernels.

Token Reroute and Expanded Drop (and the Token Drop policies the fused kernel does not cover)
route with one to two hundred small torch kernels per layer (:func:`moepatch.ops.routing._route_torch`).
Their GPU time is a few hundred microseconds but launching them costs the host milliseconds,
during which the GPU idles (H200, Mixtral layer, 4096 tokens: reroute's route 2.4-3.5 ms, the
fused Token Drop 0.5 ms).  The fused Token Drop is a handful of launches (the pair sort, the
kernel, the statistics buffer), which the replay also replaces where it is faster.
:func:`route_graphed` captures :func:`route_sync_free` once per
routing signature (config, shapes, dtypes, batch x seq, source rank, and the layer only where the
random policy uses it) and replays it: the inputs are copied into the graph's static buffers, and
the decision and the statistics are copied out, a handful of launches in all.

Same result as the eager call, bit for bit (the same kernels run; tests/ops, GPU).  It is used
only on CUDA, never when an input requires grad (training: the weights carry the router's
gradient, which a replay would cut), never while the caller is itself capturing a graph (then the eager sync-free
route, which is capture-safe, is inlined into the caller's graph), and only after a signature
was seen ``WARMUP_CALLS`` times (one-off shapes, e.g. each decode step of a growing batch, stay
eager).  At capture the replay and the eager call are timed once (three calls each, host time
included) and the faster is kept for the signature; a signature whose capture fails runs eagerly.  All graphs share one
memory pool (they run one at a time, on the routing stream).  ``MOEPATCH_ROUTE_GRAPHS=0`` (or
``ENABLED = False``) switches it off; :func:`clear` drops every graph.

Legend: T tokens, E experts, K slots per token.
"""

from __future__ import annotations

import os

import torch

from .graph_cache import GraphCache, on_device
from .graph_cache import wall as _wall
from .routing import _STAT_FIELDS, LazyRoutingResult, route_sync_free

ENABLED = os.environ.get("MOEPATCH_ROUTE_GRAPHS", "1") != "0"
WARMUP_CALLS = 2
MAX_GRAPHS = 256  # signatures kept; beyond that new ones run eagerly

_GRAPHS = GraphCache(MAX_GRAPHS)
_CACHE = _GRAPHS.entries  # signature -> calls seen (int), a _RouteGraph, or False (eager kept)


def clear() -> None:
    """Forget every captured graph (frees their static buffers; the pool goes with the last one)."""
    _GRAPHS.clear()


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
            res = route_sync_free(cfg, scores, ids, weights, factor, batch=batch, seq=seq, valid_BS=valid,
                                  layer=layer, source_rank=source_rank, **extra)
            self.ids = res.topk_ids_TW
            self.weights = res.topk_weights_TW
            stats = {f: getattr(res, f) for f in _STAT_FIELDS}
            # The int64 statistics (all of them, today) in one buffer, so that one copy takes them out
            # of the graph; any other tensor is copied on its own.
            self.fields = [(f, tuple(v.shape)) for f, v in stats.items()
                           if isinstance(v, torch.Tensor) and v.dtype == torch.long]
            self.others = {f: v for f, v in stats.items() if isinstance(v, torch.Tensor) and v.dtype != torch.long}
            self.constants = {f: v for f, v in stats.items() if not isinstance(v, torch.Tensor)}
            parts = [stats[f].reshape(-1) for f, _ in self.fields]
            self.stats = torch.cat(parts) if parts else None

    def replay(self, inputs) -> LazyRoutingResult:
        for dst, src in zip(self.static, inputs):
            if dst is not None:
                dst.copy_(src)
        self.graph.replay()
        ids, weights = self.ids.clone(), self.weights.clone()
        flat = None if self.stats is None else self.stats.clone()
        others = {f: v.clone() for f, v in self.others.items()}
        fields, constants = self.fields, self.constants

        def stats_fn():
            out, at = dict(constants, **others), 0
            for f, shape in fields:
                n = 1
                for s in shape:
                    n *= s
                out[f] = flat[at:at + n].view(shape)
                at += n
            return out

        return LazyRoutingResult(ids, weights, stats_fn)


def route_graphed(cfg, scores_TE: torch.Tensor, topk_ids_TK: torch.Tensor, topk_weights_TK: torch.Tensor,
                  factor_T: torch.Tensor | None, *, batch: int, seq: int, valid_BS: torch.Tensor | None = None,
                  layer: int = 0, source_rank: int | None = None, **extra):
    """:func:`moepatch.ops.routing.route_sync_free`, replayed from a CUDA graph where that pays (see above)."""
    with on_device(scores_TE):
        return _route_graphed(cfg, scores_TE, topk_ids_TK, topk_weights_TK, factor_T, batch=batch, seq=seq,
                              valid_BS=valid_BS, layer=layer, source_rank=source_rank, **extra)


def _route_graphed(cfg, scores_TE, topk_ids_TK, topk_weights_TK, factor_T, *, batch, seq, valid_BS, layer,
                   source_rank, **extra):
    def eager():
        return route_sync_free(cfg, scores_TE, topk_ids_TK, topk_weights_TK, factor_T, batch=batch, seq=seq,
                               valid_BS=valid_BS, layer=layer, source_rank=source_rank, **extra)

    inputs = [scores_TE, topk_ids_TK, topk_weights_TK, factor_T, valid_BS]
    if (not ENABLED or not scores_TE.is_cuda or cfg.unlimited or scores_TE.shape[0] == 0
            or torch.cuda.is_current_stream_capturing()
            # Training: the kept weights carry the router's gradient, which a replay would cut.
            or (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs))):
        return eager()
    key = _signature(cfg, inputs, batch, seq, layer, source_rank, extra)
    # Where the eager kernels are few and long (Expanded Drop over 64 experts at 16384 tokens) the
    # replay can lose (H200: 1.1 vs 0.95 ms): the cache keeps the faster, host time included.
    return _GRAPHS.call(key, inputs, eager,
                        lambda: _RouteGraph(cfg, inputs, batch, seq, layer, source_rank, extra),
                        warmup_calls=WARMUP_CALLS, wall=_wall)
