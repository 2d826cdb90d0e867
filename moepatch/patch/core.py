"""Patch a loaded transformers MoE model in place with forward hooks, and undo it exactly.

Nothing about the model changes but three kinds of hooks, all removed by ``remove``:

1. a pre/post hook pair on the model (and its decoder) that records the batch shape and the
   attention mask of the current forward, so capacity can ignore padding and split groups;
2. a forward hook on each MoE block's router (``block.gate``, or the family's ``router_attr``)
   that rewrites its (weights, ids) output with the capacity-aware decision of
   :func:`moepatch.routing.route`, returning as many values as the router did (LongCat-Flash's
   router in transformers 5.17 returns no logits: the hook recomputes them from its input);
3. a pre/post hook pair on each block's fused experts module that lowers dropped slots (sentinel
   id E + Z) for transformers' experts implementations: the kept (token, expert) pairs are computed
   as one row each, so no dropped pair reaches a GEMM and no implementation ever sees an
   out-of-range id (transformers 5.17 and later releases treat those ids differently, and
   LongCat-Flash's experts one-hot encode them with E + Z classes).

Parameters, buffers, config and forward methods are never modified, so ``save_pretrained`` saves
the original model and ``remove`` restores it bit for bit.

Legend: T tokens, E routed (computing) experts, Z zero-computation experts (LongCat-Flash; 0
elsewhere), K native experts per token, W slots per token, D hidden.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import re
import weakref
from dataclasses import dataclass, field

import torch

from ..errors import ModelStateError, UnsupportedModelError
from ..routing.config import RoutingConfig, make_config
from ..routing.route import route
from ..routing.scores import FamilyScoring
from ..routing.stats import LoadStats, PendingRecord, describe_config
from ..versions import tested_range
from .probe import check_router, check_structure
from .registry import family_for, moe_blocks

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
    top_k: int
    scoring: FamilyScoring
    zero_experts: int = 0
    expert_ids: int = 0  # ids the experts module computes; the experts hooks lower the others
    router_logits: object = None  # (router, hidden_states) -> logits, for routers that return none
    pair_experts: object = None  # (experts, x_PD, ids_P, w_P) -> (P, D), see FamilySpec.pair_experts
    shape: tuple[int, int] | None = None  # (B, S) of the block's input in the forward in flight
    lower: bool = False  # the router produced sentinels that the experts hook must lower
    compact: tuple | None = None


@dataclass
class PatchState:
    """Everything one patch owns; kept outside the model (a weak map), never in its state_dict.

    ``backend`` says who computes the experts: ``"hf"`` (transformers' own implementations, with
    sentinels lowered by the experts hooks), ``"triton"`` (moepatch.ops, consumes sentinels) or
    ``"ep"`` (moepatch.parallel, dispatches kept pairs to their ranks).  ``route_fn`` has the
    signature of :func:`moepatch.routing.route`; ``source_rank`` is this rank under real EP.
    """

    config: RoutingConfig
    model_type: str
    blocks: list[_Block]
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
        names = [b.name for b in state.blocks]
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
    # accelerate's CPU/disk offload keeps offloaded weights on the meta device and loads them in its
    # own forward hooks (`_hf_hook`); such a model is real.  A meta parameter without one is not.
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
    """Patch ``model`` in place with capacity-aware routing.

    Args:
        model: a loaded transformers model of a supported family (Mixtral, OLMoE, Qwen2-MoE,
            Qwen3-MoE, DeepSeek-V2, DeepSeek-V3, LongCat-Flash), on any device or spread with
            ``device_map``.
        capacity_factor: γ in C = max(min_capacity, ceil(γ·T·k/E)); None or inf: no capacity.
        strategy: ``"drop"``, ``"reroute"``, ``"expanded"`` or ``"expert_drop"``.
        policy: which pairs an over-capacity expert keeps (``drop``/``reroute``): ``"score"``
            (default), ``"order"``, ``"reverse"``, ``"random"`` (with ``seed``).
        **options: see :class:`moepatch.routing.config.RoutingConfig` and docs/usage.md.
    Returns:
        A :class:`PatchHandle`.  Applying again reconfigures the patch (it never stacks) and
        resets the statistics.
    Raises:
        UnsupportedModelError, ModelStateError, InvalidOptionError: the model is left untouched.
    """
    spec, blocks = _check_model(model)
    check_structure(spec, blocks)
    routers = [spec.router(b) for _, b in blocks]
    cfg = make_config(capacity_factor, strategy, policy, num_experts=min(r.num_experts for r in routers), **options)
    backend, source_rank = _choose_backend(model, cfg, spec)
    if backend == "ep":
        cfg = dataclasses.replace(cfg, ep_size=_world_size())
    state = _STATES.get(model)
    if state is None:
        check_router(spec, model, blocks[0][1])  # the hooks are not installed yet: the router's own output
    if state is not None and backend != state.backend:
        # A different experts backend means different hooks: undo the old patch, then install afresh.
        remove(model)
        state = None
    if state is not None:
        state.config = cfg
        state.records.clear()
        state.skipped_decode = 0
        return PatchHandle(model)

    state = PatchState(config=cfg, model_type=spec.model_type, blocks=[], backend=backend, source_rank=source_rank)
    try:
        _install(model, state, blocks, spec)
        if backend == "triton":
            from ..ops import integration

            state.route_fn = integration.route_fn()
            state.handles.extend(integration.install(model, [b for _, b in blocks]))
        elif backend == "ep":
            from ..parallel import ep

            state.handles.extend(ep.install(model, [b for _, b in blocks], cfg))
            if blocks[0][1].experts.gate_up_proj.device.type == "cuda":
                # The reference route() syncs with the host many times per layer; this one does
                # not and chooses the same pairs (source rank included; tests/ops).
                from ..ops.integration import route_fn

                state.route_fn = route_fn()
    except BaseException:
        for h in reversed(state.handles):
            h.remove()
        raise
    _STATES[model] = state
    return PatchHandle(model)


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size()


def _choose_backend(model: torch.nn.Module, cfg: RoutingConfig, spec) -> tuple[str, int | None]:
    """Which experts backend runs the patched layers, and this process's rank under real EP."""
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
        return "hf", None
    if cfg.expert_parallel:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise ModelStateError(
                "expert_parallel=True needs an initialised torch.distributed process group; launch with "
                "`accelerate launch` or `torchrun` (see docs/expert-parallel.md)")
        return "ep", dist.get_rank()
    on_cuda = any(p.device.type == "cuda" for p in model.parameters())
    # Without capacity, "auto" keeps transformers' own experts so the model stays bit-identical to the
    # unpatched one (the Triton kernels agree only to bf16 rounding); kernel="triton" asks for speed.
    if cfg.kernel == "triton" or (cfg.kernel == "auto" and on_cuda and not cfg.unlimited):
        try:
            from ..ops import integration
        except ImportError as exc:
            if cfg.kernel == "auto":
                return "hf", None
            raise ModelStateError(
                f"kernel='triton' needs Triton and a CUDA device ({exc}); install triton or use kernel='torch'"
            ) from exc
        problem = integration.unavailable_reason(model)
        if problem is None:
            return "triton", None
        if cfg.kernel == "triton":
            raise ModelStateError(f"kernel='triton' is not available for this model: {problem}; accepted "
                                  "alternatives: kernel='torch' or kernel='auto'")
    return "hf", None


def _install(model, state, blocks, spec):
    entry_points = [model]
    decoder = getattr(model, "model", None)
    if isinstance(decoder, torch.nn.Module) and decoder is not model:
        entry_points.append(decoder)
    for m in entry_points:
        sig = inspect.signature(m.forward)
        state.handles.append(m.register_forward_pre_hook(_context_pre_hook(state, sig), with_kwargs=True))
        state.handles.append(m.register_forward_hook(_context_post_hook(state), always_call=True))
    for i, (name, block) in enumerate(blocks):
        match = _LAYER_RE.search(name)
        router = spec.router(block)
        b = _Block(name=name, layer=int(match.group(1)) if match else i, num_experts=int(router.num_experts),
                   top_k=int(router.top_k), scoring=spec.scoring(router), zero_experts=spec.num_zero_experts(block),
                   expert_ids=spec.num_expert_ids(block), router_logits=spec.router_logits,
                   pair_experts=spec.pair_fn(block))
        state.blocks.append(b)
        state.by_router[id(router)] = b
        state.handles.append(block.register_forward_pre_hook(_block_pre_hook(b)))
        state.handles.append(router.register_forward_hook(_router_hook(state, b)))
        state.handles.append(block.experts.register_forward_pre_hook(_experts_pre_hook(b), with_kwargs=True))
        state.handles.append(block.experts.register_forward_hook(_experts_post_hook(b), always_call=True))


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


def _context_pre_hook(state: PatchState, sig: inspect.Signature):
    def hook(module, args, kwargs):
        state.depth += 1
        if state.depth == 1:  # the decoder inside the CausalLM sees depth 2: the outer call already set it
            state.context = forward_batch(sig, args, kwargs)
        return None

    return hook


def _context_post_hook(state: PatchState):
    def hook(module, args, output):
        state.depth = max(state.depth - 1, 0)
        if state.depth == 0:
            state.context = None
        return None

    return hook


def _decide(state: PatchState, block: _Block, router, x, output, batch: int, seq: int, valid,
            source_rank: int | None):
    """The capacity-aware router output (same arity as ``output``), or None to leave it untouched."""
    cfg = state.config
    if len(output) == 3:
        logits, weights_TK, ids_TK = output
    else:  # a router that returns no logits (LongCat-Flash in transformers 5.17)
        logits = None
        weights_TK, ids_TK = output
    if seq == 1 and not cfg.apply_in_decode:
        state.skipped_decode += 1
        return None
    scores_TE = block.scoring.scores(block.router_logits(router, x) if logits is None else logits)
    # Only experts a token did not pick natively need the family's weight factor.
    factor_T = block.scoring.factor(scores_TE, ids_TK) if cfg.strategy in ("reroute", "expanded") else None
    # Only the reference route() knows zero-computation experts; such families run on the "hf" backend.
    extra = {"zero_experts": block.zero_experts} if block.zero_experts else {}
    result = state.route_fn(cfg, scores_TE, ids_TK, weights_TK, factor_T, batch=batch, seq=seq,
                            valid_BS=valid, layer=block.layer, source_rank=source_rank, **extra)
    if cfg.collect_stats:
        state.records.append(PendingRecord(block.layer, block.top_k, block.num_experts, cfg.ep_size, result))
    if cfg.unlimited:
        return None
    if logits is None:
        return (result.topk_weights_TW, result.topk_ids_TW)
    return (logits, result.topk_weights_TW, result.topk_ids_TW)


def _block_pre_hook(block: _Block):
    def hook(module, args):
        x = args[0] if args else None
        # Some blocks flatten (B, S, D) before calling the router (LongCat-Flash in transformers 5.25).
        block.shape = (int(x.shape[0]), int(x.shape[1])) if isinstance(x, torch.Tensor) and x.dim() == 3 else None
        return None

    return hook


def _router_hook(state: PatchState, block: _Block):
    def hook(module, args, output):
        block.lower = False
        shape, block.shape = block.shape, None  # consumed: a later direct router call gets no stale shape
        T = output[-1].shape[0]
        if T == 0:
            return None
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

    return hook


def capacity_decision(model: torch.nn.Module, router: torch.nn.Module, hidden_states: torch.Tensor, output: tuple,
                      *, valid_BS: torch.Tensor | None = None, source_rank: int | None = None):
    """The patch's decision for one router call made outside the model's forward (e.g. a schedule
    that runs the layers itself and calls ``router.forward`` directly, bypassing the hooks).

    Args:
        model: the patched model; router: one of its MoE blocks' routers.
        hidden_states: (B, S, D) the router's input; output: the router's native output.
        valid_BS: (B, S) bool padding mask or None; source_rank: this rank under real expert
            parallelism (capacity per source rank) or None (``ep_size`` simulated).
    Returns:
        (weights_TW, ids_TW): capacity-aware, or the native ones when nothing applies (statistics are
        recorded as for a forward).
    """
    state = _state(model)
    block = state.by_router.get(id(router))
    if block is None:
        raise ModelStateError(f"{type(router).__name__} is not a router of this patched model")
    B, S = int(hidden_states.shape[0]), int(hidden_states.shape[1])
    out = None
    if output[-1].shape[0]:
        out = _decide(state, block, router, hidden_states, output, B, S, valid_BS, source_rank)
    out = output if out is None else out
    return out[-2], out[-1]


def _experts_pre_hook(block: _Block):
    def hook(module, args, kwargs):
        block.compact = None
        if not block.lower:
            return None
        block.lower = False
        names = ("hidden_states", "top_k_index", "top_k_weights")
        vals = dict(zip(names, args))
        vals.update({k: v for k, v in kwargs.items() if k in names})
        x_TD, ids_TW, w_TW = vals["hidden_states"], vals["top_k_index"], vals["top_k_weights"]
        T, W = ids_TW.shape
        # Ids the module computes (zero-computation experts too, where the module handles them) are kept.
        kept_TW = ids_TW < block.expert_ids
        if bool(kept_TW.all()):  # NOTE: host sync
            # Nothing dropped: the module runs the routing as is, exactly as the unpatched model would.
            return None
        # Column of each kept pair among its token's kept pairs: the compact output is (T, Wk, D).
        col_TW = torch.cumsum(kept_TW.long(), dim=1) - 1
        tok_P, slot_P = kept_TW.nonzero(as_tuple=True)  # NOTE: host sync (data-dependent size)
        P = tok_P.numel()
        width = int(kept_TW.sum(1).max()) if T else 0  # NOTE: host sync
        x_PD, ids_P, w_P = x_TD[tok_P], ids_TW[tok_P, slot_P], w_TW[tok_P, slot_P]
        if block.pair_experts is not None:
            # The module cannot run one slot per row: it gets an empty call (it returns at once) and
            # the post hook computes the kept pairs with the family's pair_experts.
            block.compact = (T, width, tok_P, col_TW[tok_P, slot_P], (x_PD, ids_P, w_P))
            return (x_TD[:0], ids_TW[:0], w_TW[:0]), {}
        block.compact = (T, width, tok_P, col_TW[tok_P, slot_P], None)
        if P == 0:
            # Every pair was dropped: run one zero-weight row so the experts module sees a valid
            # call; the post hook discards it and returns zeros.
            return (torch.zeros_like(x_TD[:1]), ids_TW.new_zeros(1, 1), w_TW.new_zeros(1, 1)), {}
        return (x_PD, ids_P[:, None], w_P[:, None]), {}

    return hook


def _experts_post_hook(block: _Block):
    def hook(module, args, output):
        if block.compact is None:
            return None
        T, width, tok_P, col_P, pairs = block.compact
        block.compact = None
        if pairs is not None:
            output = block.pair_experts(module, *pairs)
        out_TWD = output.new_zeros(T, max(width, 1), output.shape[-1])
        if tok_P.numel():
            out_TWD[tok_P, col_P] = output
        # A fixed-order sum over each token's kept pairs (deterministic, accumulated in float32).
        return out_TWD.float().sum(dim=1).to(output.dtype)

    return hook


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
    state = _state(model)
    state.records.clear()
    state.skipped_decode = 0
