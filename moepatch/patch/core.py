"""The one way to patch: ``apply`` / ``patched`` / ``remove`` / ``stats`` for every family and ScMoE.

Forward hooks only (parameters, config and forwards stay as they are), all taken off by ``remove``;
layers that route themselves (ScMoE) get ``layer.capacity``.  docs/design.md follows one call.
Legend: T tokens, E routed experts, Z zero-computation experts, K experts per token, W slots, D hidden.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import inspect
import re
import warnings
import weakref
from dataclasses import dataclass, field

import torch

from ..errors import InvalidOptionError, ModelStateError, UnsupportedModelError
from ..routing.config import RoutingConfig, make_config
from ..routing.route import route
from ..routing.scores import FamilyScoring
from ..routing.stats import LoadStats, PendingRecord, describe_config
from ..versions import tested_range
from . import backend
from .lowering import experts_post_hook, experts_pre_hook
from .probe import check_structure, read_router
from .registry import family_for, moe_blocks
from .spec import join_router_output, split_router_output

_STATES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")


@dataclass
class _ForwardContext:
    """Shape and padding of the forward in flight, read by the router hooks."""

    batch: int
    seq: int
    valid_BS: torch.Tensor | None


@dataclass
class _Block:
    """Per-MoE-block patch state."""

    name: str
    layer: int
    num_experts: int
    scoring: FamilyScoring
    layout: tuple = (0, 1, 2)  # positions of (logits, weights, ids) in the router's output
    zero_experts: int = 0
    expert_ids: int = 0  # ids the experts module computes; the experts hooks lower the others
    router_logits: object = None  # (router, hidden_states) -> logits, for routers that return none
    pair_experts: object = None  # (experts, x_PD, ids_P, w_P) -> (P, D), see FamilySpec.pair_experts
    shape: tuple[int, int] | None = None  # (B, S) of the block's input in the forward in flight
    lower: bool = False  # the router produced sentinels that the experts hook must lower
    compact: tuple | None = None


@dataclass
class PatchState:
    """Everything one patch owns, kept outside the model (a weak map).  ``backend``: "hf", "triton", "ep" or
    "layers" (ScMoE); ``route_fn``: :func:`route`'s signature; ``source_rank``: this rank under real EP."""

    config: RoutingConfig
    model_type: str
    names: list[str]  # the patched MoE blocks' (or routing layers') module names
    blocks: list[_Block] = field(default_factory=list)
    backend: str = "hf"
    route_fn: object = route
    source_rank: int | None = None
    handles: list = field(default_factory=list)
    records: list = field(default_factory=list)
    context: _ForwardContext | None = None
    by_router: dict = field(default_factory=dict)  # id(router module) -> _Block
    depth: int = 0
    skipped_decode: int = 0


class PatchHandle:
    """Returned by :func:`apply`; ``remove()`` undoes the patch, ``stats()`` reads the statistics."""

    def __init__(self, model: torch.nn.Module):
        self._model = weakref.ref(model)

    @property
    def model(self) -> torch.nn.Module:
        m = self._model()
        if m is None:
            raise ModelStateError("the patched model no longer exists")
        return m

    @property
    def config(self) -> RoutingConfig:
        return _state(self.model).config

    def remove(self) -> None:
        remove(self.model)

    def stats(self) -> LoadStats:
        return stats(self.model)

    def reset_stats(self) -> None:
        reset_stats(self.model)

    def __repr__(self) -> str:
        model = self._model()
        state = _STATES.get(model) if model is not None else None
        if state is None:
            return "<PatchHandle: removed>" if model is not None else "<PatchHandle: the model no longer exists>"
        names = state.names
        span = names[0] if len(names) == 1 else f"{names[0]} .. {names[-1]}"
        recorded = stats(model)
        layers = recorded.layers()
        tail = "nothing recorded yet"
        if layers:
            forwards = next(iter(layers.values()))["forwards"]
            tail = (f"{forwards} forward(s) recorded, dropped {100 * recorded.totals()['dropped_fraction']:.1f}% "
                    "of routed pairs")
        return (f"<PatchHandle {state.model_type}: {len(names)} MoE layers ({span}), "
                f"{describe_config(state.config.to_dict())}, {state.backend} experts backend; {tail}>")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def _state(model: torch.nn.Module) -> PatchState:
    state = _STATES.get(model)
    if state is None:
        raise ModelStateError(f"{type(model).__name__} is not patched by moepatch (call moepatch.apply first)")
    return state


def is_patched(model: torch.nn.Module) -> bool:
    return model in _STATES


def _check_model(model: torch.nn.Module):
    if not isinstance(model, torch.nn.Module):
        raise UnsupportedModelError(f"expected a transformers model (torch.nn.Module), got {type(model).__name__}")
    spec = family_for(model)
    # accelerate's offload keeps weights on the meta device and loads them in its `_hf_hook`: that is real.
    meta = [f"{mn}.{pn}" if mn else pn for mn, m in model.named_modules() if not hasattr(m, "_hf_hook")
            for pn, p in m.named_parameters(recurse=False) if p.device.type == "meta"]
    if meta:
        raise ModelStateError(
            f"the model has {len(meta)} parameter(s) on the meta device (e.g. {meta[0]}); load real weights "
            "first (from_pretrained, or to_empty() then load_state_dict) and patch the loaded model")
    blocks = moe_blocks(model, spec)
    if not blocks:
        raise UnsupportedModelError(
            f"no MoE block ({', '.join(spec.block_classes)}) found in this {spec.model_type} model; "
            f"{tested_range()}")
    return spec, blocks


def apply(model: torch.nn.Module, capacity_factor: float | None = 1.5, strategy: str = "drop",
          policy: str | None = None, **options) -> PatchHandle:
    """Patch ``model`` (a supported transformers model or an ScMoE model) in place; returns a PatchHandle.

    capacity_factor: γ in C = max(min_capacity, ceil(γ·T·k/E)), None or inf for none; strategy: "drop",
    "reroute", "expanded" or "expert_drop"; policy and **options: docs/usage.md.  Applying again
    reconfigures (never stacks) and resets the statistics; on an error the model is left untouched.
    """
    layers = routing_layers(model) if isinstance(model, torch.nn.Module) else []
    if layers:
        return _apply_layers(model, layers, capacity_factor, strategy, policy, options)
    spec, blocks = _check_model(model)
    check_structure(spec, blocks)
    cfg = make_config(capacity_factor, strategy, policy, num_experts=min(spec.num_experts(b) for _, b in blocks),
                      **options)
    key = _choose_backend(model, cfg, spec)
    chosen = backend.get_backend(key)
    cfg, source_rank = chosen.prepare(model, cfg)
    state = _STATES.get(model)
    # Each router's reading, while no hook of ours is installed (the router's own output).
    readings = [read_router(spec, model, b) for _, b in blocks] if state is None or key != state.backend else None
    if state is not None and key != state.backend:
        # A different experts backend means different hooks: undo the old patch, then install afresh.
        remove(model)
        state = None
    if state is not None:
        _reset(state, cfg)
        return PatchHandle(model)

    state = PatchState(config=cfg, model_type=spec.model_type, names=[n for n, _ in blocks], backend=key,
                       source_rank=source_rank)
    try:
        _install(model, state, blocks, spec, readings)
        modules = [b for _, b in blocks]
        state.handles.extend(chosen.install(model, modules, cfg))
        if chosen.device_route and any(p.is_cuda for b in modules for p in b.experts.parameters()):
            state.route_fn = device_route()
    except BaseException:
        for h in reversed(state.handles):
            h.remove()
        raise
    _STATES[model] = state
    return PatchHandle(model)


@functools.cache
def device_route():
    """The routing for experts on CUDA: moepatch.ops' graphed :func:`route` (same decision), or route without triton."""
    if importlib.util.find_spec("triton") is None:
        return route
    from ..ops.route_graphs import route_graphed

    return route_graphed


def _choose_backend(model: torch.nn.Module, cfg: RoutingConfig, spec) -> str:
    """Which experts backend runs the patched layers: "hf", "triton" or "ep"."""
    if not spec.experts_interface:
        # The Triton and expert-parallel backends plug into transformers' ExpertsInterface.
        if cfg.expert_parallel:
            raise ModelStateError(
                f"expert_parallel=True is not supported for {spec.model_type}: its experts module is not behind "
                "transformers' ExpertsInterface; accepted: expert_parallel=False (simulate EP with ep_size=n)")
        if cfg.kernel == "triton":
            raise ModelStateError(
                f"kernel='triton' is not available for {spec.model_type}: its experts module is not behind "
                "transformers' ExpertsInterface; accepted alternatives: kernel='torch' or kernel='auto'")
        return "hf"
    if cfg.expert_parallel:
        return "ep"
    on_cuda = any(p.device.type == "cuda" for p in model.parameters())
    # Without capacity, "auto" keeps transformers' own experts so the model stays bit-identical to the
    # unpatched one (the Triton kernels agree only to bf16 rounding); kernel="triton" asks for speed.
    if cfg.kernel == "triton" or (cfg.kernel == "auto" and on_cuda and not cfg.unlimited):
        problem = backend.triton_problem(model)
        if problem is None:
            return "triton"
        if problem == backend.uncovered_layout(model):
            # A form the kernels do not compute: transformers' own experts, never a wrong result.
            warnings.warn(f"moepatch: the Triton kernels do not cover this model's experts ({problem}); they run on "
                          "transformers' own experts backend (kernel='torch')", stacklevel=3)
            return "hf"
        if cfg.kernel == "triton":
            raise ModelStateError(f"kernel='triton' is not available for this model: {problem}; accepted "
                                  "alternatives: kernel='torch' or kernel='auto'")
    return "hf"


def _install_context(model, state):
    """Hooks on the model (and its decoder) that record the shape and padding of each forward."""
    entry_points = [model]
    decoder = getattr(model, "model", None)
    if isinstance(decoder, torch.nn.Module) and decoder is not model:
        entry_points.append(decoder)
    for m in entry_points:
        pre = functools.partial(_enter_forward, state, inspect.signature(m.forward))
        state.handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
        state.handles.append(m.register_forward_hook(functools.partial(_leave_forward, state), always_call=True))


def _install(model, state, blocks, spec, readings):
    _install_context(model, state)
    for i, ((name, block), (scoring, layout)) in enumerate(zip(blocks, readings)):
        match = _LAYER_RE.search(name)
        router = spec.router(block)
        b = _Block(name=name, layer=int(match.group(1)) if match else i, num_experts=spec.num_experts(block),
                   scoring=scoring, layout=layout, zero_experts=spec.num_zero_experts(block),
                   expert_ids=spec.num_expert_ids(block), router_logits=spec.router_logits,
                   pair_experts=spec.pair_fn(block))
        state.blocks.append(b)
        state.by_router[id(router)] = b
        state.handles.append(block.register_forward_pre_hook(functools.partial(_block_pre_hook, b)))
        state.handles.append(router.register_forward_hook(functools.partial(_router_hook, state, b)))
        pre, post = functools.partial(experts_pre_hook, b), functools.partial(experts_post_hook, b)
        state.handles.append(block.experts.register_forward_pre_hook(pre, with_kwargs=True))
        state.handles.append(block.experts.register_forward_hook(post, always_call=True))


def routing_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Layers that route themselves (ScMoE's): ``capacity``, ``capacity_layer`` (ordinal), ``num_experts``, top_k."""
    return [m for m in model.modules() if hasattr(m, "capacity") and hasattr(m, "capacity_layer")]


class LayerCapacity:
    """``layer.capacity`` of a patched routing layer: the patch's decision, taken by the layer itself."""

    def __init__(self, state: PatchState):
        self._state = state

    @property
    def config(self) -> RoutingConfig:
        return self._state.config

    def decide(self, scoring: FamilyScoring, layer: int, logits_TE: torch.Tensor, ids_TK: torch.Tensor,
               weights_TK: torch.Tensor, *, batch: int, seq: int, valid_BS: torch.Tensor | None = None,
               native_ids_TK: torch.Tensor | None = None, source_rank: int | None = None):
        """Capacity-aware (ids_TW, weights_TW) of one layer call from logits_TE (T, E) and its picks
        ids_TK / weights_TK (T, K); the inputs when nothing applies.  valid_BS None: the forward's mask;
        native_ids_TK: the router's full top-k when the layer keeps only its first picks (for the factor)."""
        state = self._state
        ctx = state.context
        if valid_BS is None and ctx is not None and ctx.valid_BS is not None and ctx.valid_BS.shape == (batch, seq):
            valid_BS = ctx.valid_BS
        result = None
        if ids_TK.shape[0]:
            route_fn = device_route() if logits_TE.is_cuda else route
            result = _route_call(state, route_fn, scoring, layer, (ids_TK.shape[1], logits_TE.shape[1]), logits_TE,
                                 ids_TK, weights_TK, batch, seq, valid_BS, source_rank, native_ids_TK=native_ids_TK)
        return (ids_TK, weights_TK) if result is None else (result.topk_ids_TW, result.topk_weights_TW)


class _Detach:
    """Handle that takes a patch's LayerCapacity off its layers."""

    def __init__(self, layers, capacity):
        self._layers, self._capacity = layers, capacity

    def remove(self) -> None:
        for layer in self._layers:
            if layer.capacity is self._capacity:
                layer.capacity = None


def _apply_layers(model, layers, capacity_factor, strategy, policy, options) -> PatchHandle:
    cfg = make_config(capacity_factor, strategy, policy, num_experts=min(int(m.num_experts) for m in layers),
                      **options)
    if cfg.expert_parallel:
        raise InvalidOptionError("expert_parallel=True is not available for ScMoE layers; run them with "
                                 "moepatch.scmoe.schedule.ShortcutEP, which applies capacity per source rank")
    if cfg.kernel == "triton":
        raise InvalidOptionError("kernel='triton' is not available for ScMoE layers; accepted: 'auto' or 'torch'")
    state = _STATES.get(model)
    if state is not None:
        _reset(state, cfg)
        return PatchHandle(model)
    if any(layer.capacity is not None for layer in layers):
        raise ModelStateError("the model's ScMoE layers carry a capacity decision of another patch; remove it first")
    names = {id(m): n for n, m in model.named_modules()}
    state = PatchState(config=cfg, model_type="scmoe", names=[names[id(m)] for m in layers], backend="layers")
    _install_context(model, state)
    capacity = LayerCapacity(state)
    for layer in layers:
        layer.capacity = capacity
    state.handles.append(_Detach(layers, capacity))
    _STATES[model] = state
    return PatchHandle(model)


def forward_batch(sig: inspect.Signature, args, kwargs) -> _ForwardContext | None:
    """Batch shape and padding of a model forward call, from its ``input_ids`` (or ``inputs_embeds``)
    and a 2-D ``attention_mask``; None when the call has no batch-shaped input."""
    try:
        bound = sig.bind_partial(*args, **kwargs).arguments
    except TypeError:
        bound = kwargs
    x = bound.get("input_ids")
    if x is None:
        x = bound.get("inputs_embeds")
    if x is None or x.dim() < 2:
        return None
    batch, seq = int(x.shape[0]), int(x.shape[1])
    mask = bound.get("attention_mask")
    valid = None
    # A 2-D mask covers the cached positions too; the current tokens are its last `seq` columns.
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[0] == batch and mask.shape[1] >= seq:
        valid = mask[:, -seq:].bool()
    return _ForwardContext(batch, seq, valid)


def _enter_forward(state: PatchState, sig: inspect.Signature, module, args, kwargs):
    state.depth += 1
    if state.depth == 1:  # the decoder inside the CausalLM sees depth 2: the outer call already set it
        state.context = forward_batch(sig, args, kwargs)


def _leave_forward(state: PatchState, module, args, output):
    state.depth = max(state.depth - 1, 0)
    if state.depth == 0:
        state.context = None


def _route_call(state: PatchState, route_fn, scoring: FamilyScoring, layer: int, dims: tuple[int, int], logits_TE,
                ids_TK, weights_TK, batch: int, seq: int, valid_BS, source_rank, *, native_ids_TK=None,
                zero_experts: int = 0):
    """One layer's routing, or None for a skipped decode step; ``dims``: (top_k, num_experts) for the statistics."""
    cfg = state.config
    if seq == 1 and not cfg.apply_in_decode:
        state.skipped_decode += 1
        return None
    if cfg.unlimited and not cfg.collect_stats:  # nothing to decide and nothing to record
        return None
    scores_TE = scoring.scores(logits_TE)
    # Only experts a token did not pick natively need the family's weight factor.
    factor_T = None
    if cfg.strategy in ("reroute", "expanded"):
        factor_T = scoring.factor(scores_TE, ids_TK if native_ids_TK is None else native_ids_TK, weights_TK)
    extra = {"zero_experts": zero_experts} if zero_experts else {}
    result = route_fn(cfg, scores_TE, ids_TK, weights_TK, factor_T, batch=batch, seq=seq, valid_BS=valid_BS,
                      layer=layer, source_rank=source_rank, **extra)
    if cfg.collect_stats:
        state.records.append(PendingRecord(layer, *dims, cfg.ep_size, result))
    return result


def _decide(state: PatchState, block: _Block, router, x, output, batch: int, seq: int, valid,
            source_rank: int | None):
    """The capacity-aware router output (same arity as ``output``), or None to leave it untouched."""
    # A router may return no logits (LongCat-Flash in transformers 5.17): they are recomputed if needed.
    logits, weights_TK, ids_TK = split_router_output(output, block.layout)
    if ids_TK.shape[0] == 0 or (state.config.unlimited and not state.config.collect_stats):
        return None
    if seq == 1 and not state.config.apply_in_decode:
        state.skipped_decode += 1
        return None
    logits = block.router_logits(router, x) if logits is None else logits
    dims = (ids_TK.shape[1], block.num_experts)
    result = _route_call(state, state.route_fn, block.scoring, block.layer, dims, logits, ids_TK, weights_TK, batch,
                         seq, valid, source_rank, zero_experts=block.zero_experts)
    if state.config.unlimited:
        return None
    return join_router_output(output, block.layout, result.topk_weights_TW, result.topk_ids_TW)


def _block_pre_hook(block: _Block, module, args):
    x = args[0] if args else None
    # Some blocks flatten (B, S, D) before calling the router (LongCat-Flash in transformers 5.25).
    block.shape = (int(x.shape[0]), int(x.shape[1])) if isinstance(x, torch.Tensor) and x.dim() == 3 else None


def _router_hook(state: PatchState, block: _Block, module, args, output):
    block.lower = False
    shape, block.shape = block.shape, None  # consumed: a later direct router call gets no stale shape
    T = split_router_output(output, block.layout)[2].shape[0]
    ctx = state.context
    if ctx is not None and ctx.batch * ctx.seq == T:
        batch, seq, valid = ctx.batch, ctx.seq, ctx.valid_BS
    elif shape is not None and shape[0] * shape[1] == T:
        (batch, seq), valid = shape, None
    elif args and args[0].dim() == 3 and args[0].shape[0] * args[0].shape[1] == T:
        batch, seq, valid = int(args[0].shape[0]), int(args[0].shape[1]), None
    else:
        batch, seq, valid = 1, T, None
    out = _decide(state, block, module, args[0], output, batch, seq, valid, state.source_rank)
    if out is not None:
        block.lower = state.backend == "hf"
    return out


def capacity_decision(model: torch.nn.Module, router: torch.nn.Module, hidden_states: torch.Tensor, output: tuple,
                      *, valid_BS: torch.Tensor | None = None, source_rank: int | None = None):
    """The patch's (weights_TW, ids_TW) for a router call made outside the hooks (a schedule calling
    ``router.forward``) on hidden_states (B, S, D) with native ``output``; the native ones when nothing
    applies.  source_rank: this rank under real expert parallelism, None to simulate ``ep_size``."""
    state = _state(model)
    block = state.by_router.get(id(router))
    if block is None:
        raise ModelStateError(f"{type(router).__name__} is not a router of this patched model")
    B, S = int(hidden_states.shape[0]), int(hidden_states.shape[1])
    out = _decide(state, block, router, hidden_states, output, B, S, valid_BS, source_rank) or output
    return split_router_output(out, block.layout)[1:3]


def remove(model: torch.nn.Module) -> None:
    """Undo :func:`apply` exactly: every hook is removed and the model is as it was."""
    state = _state(model)
    for h in state.handles:
        h.remove()
    state.handles.clear()
    del _STATES[model]


@contextlib.contextmanager
def patched(model: torch.nn.Module, capacity_factor: float | None = 1.5, strategy: str = "drop",
            policy: str | None = None, **options):
    """Patch for the ``with`` block only; a patch that was there before comes back afterwards."""
    previous = _STATES[model].config if model in _STATES else None
    handle = apply(model, capacity_factor, strategy, policy, **options)
    try:
        yield handle
    finally:
        if previous is None:
            remove(model)
        else:
            explicit = {k: getattr(previous, k) for k in previous._explicit}
            apply(model, previous.capacity_factor, previous.strategy, **explicit)


def stats(model: torch.nn.Module) -> LoadStats:
    """Load statistics collected since the last reset (or the last ``apply``)."""
    state = _state(model)
    records = [r.materialize() for r in state.records]
    cfg = dict(state.config.to_dict(), model_type=state.model_type, skipped_decode_steps=state.skipped_decode)
    return LoadStats(records, cfg)


def reset_stats(model: torch.nn.Module) -> None:
    _reset(_state(model))


def _reset(state: PatchState, cfg: RoutingConfig | None = None) -> None:
    """Clear the statistics; with ``cfg``, reconfigure too."""
    state.config = cfg or state.config
    state.records.clear()
    state.skipped_decode = 0
