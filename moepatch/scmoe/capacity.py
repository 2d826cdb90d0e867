"""Capacity-aware routing on the shortcut MoE: ``moepatch.routing.route`` called by the ScMoE layers.

The hook-based patch (``moepatch.apply``) finds MoE blocks by their transformers class name, so it
does not see ScMoE layers.  They call :func:`moepatch.routing.route` themselves instead, whenever a
:class:`CapacityState` is attached to them by :func:`apply_capacity`: every strategy, policy and
option of ``moepatch.apply`` applies unchanged (the same ``make_config`` validates them), with the
same semantics (docs/semantics.md): γ=None leaves the routing untouched, so the
model is bit-identical to the unpatched one.  On CUDA they take the same decision through
``moepatch.ops``' sync-free route (the one ``moepatch.apply`` uses on GPUs), not the reference's
host-synchronising torch code.

The ScMoE layers that consult it: :class:`moepatch.scmoe.model.RoutedMoE` (native ScMoE models,
shortcut or baseline) and :class:`moepatch.scmoe.convert.ShortcutMoeBlock` (converted transformers
models).  Both expose ``capacity`` (the attached state or None), ``capacity_layer`` (an ordinal
for stats and the ``random`` policy's seed), ``num_experts`` and ``top_k``.

Legend: B sequences, S positions, T = B*S tokens, E routed experts, K picks per token, W slots.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import weakref
from dataclasses import dataclass, field

import torch

from ..errors import InvalidOptionError, ModelStateError, UnsupportedModelError
from ..patch.core import forward_batch
from ..routing.config import RoutingConfig, make_config
from ..routing.route import route
from ..routing.scores import FamilyScoring
from ..routing.stats import LoadStats, PendingRecord


@dataclass
class CapacityState:
    """One model's capacity configuration and its statistics, shared by all of its ScMoE layers.

    Attributes:
        config: the validated routing configuration.
        records: one pending record per (layer, forward), read by :meth:`stats`.
        skipped_decode: decode steps (one position per sequence) left alone (``apply_in_decode``).
        valid_BS: the padding mask of the forward in flight, recorded for converted transformers
            models by a model pre-hook (native ScMoE models pass it explicitly).
    """

    config: RoutingConfig
    records: list = field(default_factory=list)
    skipped_decode: int = 0
    valid_BS: torch.Tensor | None = None

    def decide(self, scoring: FamilyScoring, layer: int, logits_TE: torch.Tensor, ids_TK: torch.Tensor,
               weights_TK: torch.Tensor, *, batch: int, seq: int, valid_BS: torch.Tensor | None = None,
               native_ids_TK: torch.Tensor | None = None, source_rank: int | None = None):
        """The capacity-aware (ids_TW, weights_TW) of one layer call; the inputs when nothing applies.

        Args:
            scoring: how the layer's router turns logits into scores and weights.
            layer: the layer ordinal (stats, the ``random`` policy's seed).
            logits_TE: (T, E) router logits; ids_TK / weights_TK: (T, K) the layer's picks and weights.
            batch, seq: B and S with T = B * S.
            valid_BS: (B, S) bool, False at padding; None when every position is real.
            native_ids_TK: the router's full native top-k when the layer keeps only its first picks
                (converted models): the rerouting weight factor is the native normalisation's.
            source_rank: this rank under real expert parallelism (capacity per source rank).
        """
        cfg = self.config
        if ids_TK.shape[0] == 0:
            return ids_TK, weights_TK
        if seq == 1 and not cfg.apply_in_decode:
            self.skipped_decode += 1
            return ids_TK, weights_TK
        if valid_BS is None:
            valid_BS = self.valid_BS if self.valid_BS is not None and self.valid_BS.shape == (batch, seq) else None
        scores_TE = scoring.scores(logits_TE)
        factor_T = scoring.factor(scores_TE, ids_TK if native_ids_TK is None else native_ids_TK)
        result = _route_for(scores_TE)(cfg, scores_TE, ids_TK, weights_TK, factor_T, batch=batch, seq=seq,
                                       valid_BS=valid_BS, layer=layer, source_rank=source_rank)
        if cfg.collect_stats:
            self.records.append(PendingRecord(layer, ids_TK.shape[1], logits_TE.shape[1], cfg.ep_size, result))
        return result.topk_ids_TW, result.topk_weights_TW


def _route_for(scores_TE: torch.Tensor):
    """The routing function for a layer call: on CUDA moepatch.patch's (``route_sync_free``: no host
    sync, Triton kernels where they apply, replayed from CUDA graphs; the same decision as the
    reference, tests/ops and tests/scmoe), else the reference :func:`moepatch.routing.route`
    (its many host syncs cost milliseconds per layer at 16k tokens on a GPU)."""
    return (_cuda_route() or route) if scores_TE.is_cuda else route


@functools.cache
def _cuda_route():
    """moepatch.patch's GPU route (None without triton), looked up once, not on every layer call."""
    if importlib.util.find_spec("triton") is None:
        return None
    from ..ops.integration import route_fn

    return route_fn()


def capacity_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The ScMoE layers of ``model`` that route through :class:`CapacityState`, in module order."""
    return [m for m in model.modules() if hasattr(m, "capacity") and hasattr(m, "capacity_layer")]


class CapacityHandle:
    """Returned by :func:`apply_capacity`: ``remove()`` restores native routing, ``stats()`` reads loads."""

    def __init__(self, model: torch.nn.Module, state: CapacityState, hooks: list):
        self._model = weakref.ref(model)
        self.state = state
        self._hooks = hooks

    @property
    def config(self) -> RoutingConfig:
        return self.state.config

    def stats(self) -> LoadStats:
        records = [r.materialize() for r in self.state.records]
        return LoadStats(records, dict(self.state.config.to_dict(), model_type="scmoe",
                                       skipped_decode_steps=self.state.skipped_decode))

    def reset_stats(self) -> None:
        self.state.records.clear()
        self.state.skipped_decode = 0

    def remove(self) -> None:
        model = self._model()
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        if model is not None:
            for layer in capacity_layers(model):
                if layer.capacity is self.state:
                    layer.capacity = None
            _HANDLES.pop(model, None)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


_HANDLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def apply_capacity(model: torch.nn.Module, capacity_factor: float | None = 1.5, strategy: str = "drop",
                   policy: str | None = None, **options) -> CapacityHandle:
    """Capacity-aware routing on every shortcut (and baseline) MoE layer of an ScMoE model.

    Works on native models (:func:`moepatch.scmoe.build_scmoe`) and on converted transformers
    models (:func:`moepatch.scmoe.convert`).  Arguments are those of ``moepatch.apply``; applying
    again replaces the configuration (never stacks) and resets the statistics.

    Raises:
        UnsupportedModelError: the model has no ScMoE layer.
        InvalidOptionError: a bad option, ``expert_parallel=True`` (use
            :class:`moepatch.scmoe.schedule.ShortcutEP`, which routes per source rank) or
            ``kernel="triton"`` (the ScMoE layers compute their experts in torch).
    """
    layers = capacity_layers(model)
    if not layers:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no ScMoE layer; build one with moepatch.scmoe.build_scmoe or convert a "
            "transformers model with moepatch.scmoe.convert (use moepatch.apply for unconverted models)")
    cfg = make_config(capacity_factor, strategy, policy, num_experts=min(int(m.num_experts) for m in layers),
                      **options)
    if cfg.expert_parallel:
        raise InvalidOptionError("expert_parallel=True is not an apply_capacity option for ScMoE models; run them "
                                 "with moepatch.scmoe.schedule.ShortcutEP, which applies capacity per source rank")
    if cfg.kernel == "triton":
        raise InvalidOptionError("kernel='triton' is not available for ScMoE layers; accepted: 'auto' or 'torch'")
    handle = _HANDLES.get(model)
    if handle is not None:
        handle.state.config = cfg
        handle.reset_stats()
        return handle
    if any(layer.capacity is not None for layer in layers):
        raise ModelStateError("the model's ScMoE layers carry a capacity state from another handle; remove it first")
    state = CapacityState(cfg)
    hooks = []
    from .model import ScMoEForCausalLM

    if not isinstance(model, ScMoEForCausalLM):
        # A converted transformers model: its MoE blocks never see the attention mask, so record it here
        # (native ScMoE models hand it to their layers).
        sig = inspect.signature(model.forward)
        hooks.append(model.register_forward_pre_hook(_mask_pre_hook(state, sig), with_kwargs=True))
        hooks.append(model.register_forward_hook(_mask_post_hook(state), always_call=True))
    for layer in layers:
        layer.capacity = state
    handle = CapacityHandle(model, state, hooks)
    _HANDLES[model] = handle
    return handle


def _mask_pre_hook(state: CapacityState, sig: inspect.Signature):
    def hook(module, args, kwargs):
        ctx = forward_batch(sig, args, kwargs)
        state.valid_BS = None if ctx is None else ctx.valid_BS
        return None

    return hook


def _mask_post_hook(state: CapacityState):
    def hook(module, args, output):
        state.valid_BS = None
        return None

    return hook
