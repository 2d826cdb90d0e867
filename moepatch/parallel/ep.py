"""Expert parallelism as an experts backend: each rank keeps its block of experts and computes them
on the rows the other ranks send it (``moepatch.apply(model, ..., expert_parallel=True)``).

The core's router hooks compute capacity on this rank's tokens and hand the experts module global
ids (sentinel E on dropped slots); this module never changes a routing decision.  :func:`install`
slices each block's experts to this rank (unless loaded sharded) and selects ``"moepatch_ep"``.
Legend: T tokens, W slots, H hidden, I intermediate, E experts, L local experts, R rows received.
"""

from __future__ import annotations

import contextlib
import dataclasses
import weakref
from dataclasses import dataclass

import torch

from ..errors import ModelStateError, UnsupportedModelError
from ..ops.reference import expert_mlp
from ..patch import backend
from .dispatch import (ACTIVE, IDLE, AllToAllDispatcher, Dispatched, Dispatcher, LocalDispatcher, local_range,
                       weigh_and_sum)
from .errors import ExpertParallelError, ProtocolError

EXPERTS_IMPLEMENTATION = "moepatch_ep"

_RUNTIMES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> Runtime
_EXPERTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # experts module -> (Runtime, EPBlock)
SHARDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # experts module -> ShardInfo (loader)


@dataclass(frozen=True)
class ShardInfo:
    """The experts a sharded load materialised: global ids ``first`` .. ``stop - 1`` of ``num_experts``."""

    rank: int
    world: int
    first: int
    stop: int
    num_experts: int


@dataclass
class EPBlock:
    """One MoE block under expert parallelism."""

    ordinal: int
    num_experts: int
    experts: weakref.ref
    gate_up_LIH: torch.Tensor  # (L, 2I, H) this rank's experts
    down_LHI: torch.Tensor  # (L, H, I)
    restore: dict | None  # original parameters when install sliced them


class Runtime:
    """The dispatcher and the local experts of one expert-parallel model."""

    def __init__(self, dispatcher: Dispatcher, blocks: list[EPBlock], device, dtype, hidden: int):
        self.dispatcher = dispatcher
        self.blocks = blocks
        self.device, self.dtype, self.hidden = device, dtype, hidden
        self.failure: str | None = None  # set once a round failed: no further collective is issued
        self.timer = None
        self.rounds = 0  # rounds this rank took part in (active or serving), for tests and stats

    def _mark(self, phase: str) -> None:
        if self.timer is not None:
            self.timer.mark(phase)

    def _check_usable(self):
        if self.failure is not None:
            raise ExpertParallelError(f"the expert-parallel session already failed ({self.failure}); "
                                      "restart the process group to continue")

    def _dispatch(self, *args, **kwargs) -> Dispatched | None:
        try:
            d = self.dispatcher.dispatch(*args, **kwargs)
        except ExpertParallelError as exc:
            # Every rank took the same decision at this header (a peer aborted, the ranks
            # disagree) or the transport broke: no further message may be sent.
            self.failure = type(exc).__name__
            raise
        if d is not None:
            self.rounds += 1
        return d

    def _finish_round(self, d: Dispatched, y_RH: torch.Tensor) -> torch.Tensor:
        try:
            return self.dispatcher.return_rows(y_RH, d)
        except ExpertParallelError as exc:
            self.failure = type(exc).__name__
            raise

    def forward(self, blk: EPBlock, x_TH: torch.Tensor, ids_TW: torch.Tensor, w_TW: torch.Tensor) -> torch.Tensor:
        """One MoE layer call: dispatch, local experts, combine; (T, H) like ``x_TH``."""
        self._check_usable()
        if torch.is_grad_enabled() and (x_TH.requires_grad or w_TW.requires_grad):
            raise ModelStateError(
                "the expert-parallel path is inference-only (its all-to-all is not differentiable); run the "
                "forward under torch.no_grad() or torch.inference_mode()")
        self._mark("dispatch")
        d = self._dispatch(x_TH, ids_TW, num_experts=blk.num_experts, tag=blk.ordinal, status=ACTIVE)
        self._mark("experts")
        y_RH = self._compute_or_zeros(d)
        self._mark("combine")
        out_TH = weigh_and_sum(self._finish_round(d, y_RH), d, w_TW)
        self._mark("done")
        if d.invalid_pairs:
            raise ValueError(f"the router produced {d.invalid_pairs} expert id(s) outside [0, {blk.num_experts}] "
                             "(the sentinel is E); the round was completed with those slots left empty")
        return out_TH

    def _compute_or_zeros(self, d: Dispatched) -> torch.Tensor:
        try:
            if not 0 <= d.tag < len(self.blocks):
                raise ProtocolError(f"rank {self.dispatcher.rank}: a peer runs MoE layer {d.tag}, this model "
                                    f"has {len(self.blocks)}")
            return compute_local_experts(self.blocks[d.tag], d.x_RH, d.counts_SM)
        except BaseException:
            # Complete the round with zeros so no peer waits in the return exchange; the exception
            # then reaches ep_session, which tells every rank at the next header.
            self._finish_round(d, torch.zeros_like(d.x_RH))
            raise

    def serve_round(self) -> bool:
        """Serve one round as an idle rank; False once every rank is idle."""
        self._check_usable()
        x_0H = torch.empty(0, self.hidden, dtype=self.dtype, device=self.device)
        ids_0W = torch.empty(0, 1, dtype=torch.long, device=self.device)
        d = self._dispatch(x_0H, ids_0W, num_experts=self.blocks[0].num_experts, tag=-1, status=IDLE)
        if d is None:
            return False
        self._finish_round(d, self._compute_or_zeros(d))
        return True

    def serve_until_done(self) -> None:
        while self.serve_round():
            pass

    def abort(self) -> None:
        self.failure = "this rank aborted"
        self.dispatcher.abort(device=self.device)


def compute_local_experts(blk: EPBlock, x_RH: torch.Tensor, counts_SM: list) -> torch.Tensor:
    """The local experts on received rows, expert by expert through ``moepatch.ops.reference.expert_mlp``.

    Args:
        blk: the block whose local experts run.
        x_RH: (R, H) rows grouped by source rank, inside a source by local expert.
        counts_SM: rows per (source, local expert slot), host ints.
    Returns:
        (R, H) unweighted expert outputs in receive order.
    """
    L = blk.gate_up_LIH.shape[0]
    per_expert = [sum(c[j] for c in counts_SM) for j in range(len(counts_SM[0]))]
    if any(per_expert[L:]):
        raise ProtocolError(f"a peer sent rows for local expert slots >= {L}; the ranks split the experts differently")
    if x_RH.shape[0] == 0:
        return torch.empty_like(x_RH)
    experts = blk.experts()
    if experts is None:
        raise ModelStateError("the experts module of an expert-parallel block no longer exists")
    cls_gate = type(experts)._apply_gate

    def apply_gate(h):
        return cls_gate(experts, h)

    S = len(counts_SM)
    # Rows arrive source-major (inside a source by local expert); each expert's rows are made
    # contiguous by concatenating the (source, expert) blocks, whose sizes are host ints: one copy
    # kernel each way instead of a sort, a gather and a scatter.
    if S > 1:
        blocks = x_RH.split([counts_SM[s][j] for s in range(S) for j in range(L)])  # as received
        x_RH = torch.cat([blocks[s * L + j] for j in range(L) for s in range(S)])
    start = 0
    out_RH = torch.empty_like(x_RH)
    for j in range(L):
        n = per_expert[j]
        if n == 0:
            continue
        out_RH[start:start + n] = expert_mlp(x_RH[start:start + n], blk.gate_up_LIH[j], blk.down_LHI[j],
                                             apply_gate=apply_gate)
        start += n
    if S == 1:
        return out_RH
    # Back to receive order.
    blocks = out_RH.split([counts_SM[s][j] for j in range(L) for s in range(S)])  # expert-major
    return torch.cat([blocks[j * S + s] for s in range(S) for j in range(L)])


def _ep_experts_forward(self, hidden_states, top_k_index, top_k_weights, *extra):
    """The ``"moepatch_ep"`` entry of transformers' ExpertsInterface."""
    entry = _EXPERTS.get(self)
    if entry is None:
        shard = SHARDS.get(self)
        if shard is not None:
            raise ModelStateError(
                f"this model holds only experts {shard.first}..{shard.stop - 1} of {shard.num_experts} (rank "
                f"{shard.rank} of {shard.world}, loaded by moepatch.parallel); run it with "
                "moepatch.apply(model, ..., expert_parallel=True) under that process group")
        raise ModelStateError(f"experts implementation {EXPERTS_IMPLEMENTATION!r} is selected for a module that "
                              "moepatch.parallel did not install; call moepatch.apply(..., expert_parallel=True)")
    if extra:
        raise UnsupportedModelError(f"{type(self).__name__} passes {len(extra)} extra argument(s) to its experts; "
                                    "expert parallelism supports (hidden_states, top_k_index, top_k_weights)")
    runtime, blk = entry
    return runtime.forward(blk, hidden_states, top_k_index, top_k_weights)


def register_experts_implementation() -> None:
    """Make ``"moepatch_ep"`` a valid experts implementation, process-wide: it changes no model by
    itself, and models loaded sharded select it so that running them unpatched fails clearly."""
    backend.register(EXPERTS_IMPLEMENTATION, _ep_experts_forward)


def _check_experts(name: str, experts: torch.nn.Module, num_experts: int):
    cls = type(experts)
    if not (hasattr(cls, "_apply_gate") and hasattr(experts, "config")
            and hasattr(experts.config, "_experts_implementation_internal")):
        raise UnsupportedModelError(
            f"{name}: {cls.__name__} does not dispatch through transformers' ExpertsInterface "
            "(@use_experts_implementation); expert parallelism needs transformers >= 5.17")
    for flag, wanted in (("is_transposed", False), ("has_bias", False), ("has_gate", True)):
        if getattr(experts, flag, wanted) != wanted:
            raise UnsupportedModelError(f"{name}: {cls.__name__} has {flag}={not wanted}; expert parallelism "
                                        "supports gated, untransposed, bias-free experts")
    for pname, dims in (("gate_up_proj", 3), ("down_proj", 3)):
        p = getattr(experts, pname, None)
        if not isinstance(p, torch.Tensor) or p.dim() != dims:
            raise UnsupportedModelError(f"{name}: {cls.__name__}.{pname} is not a 3-D expert tensor")
    if getattr(experts, "num_experts", num_experts) != num_experts:
        raise UnsupportedModelError(f"{name}: router has {num_experts} experts, experts module "
                                    f"{experts.num_experts}")


class _Handle:
    def __init__(self, fn):
        self._fn = fn

    def remove(self) -> None:
        fn, self._fn = self._fn, None
        if fn is not None:
            fn()


def install(model: torch.nn.Module, blocks: list, cfg) -> list:
    """Run ``blocks``' experts under expert parallelism over the default process group.

    Args:
        model: the model being patched (core has validated it).
        blocks: its MoE blocks in forward order; ``block.gate`` (router with ``num_experts``) and
            ``block.experts`` (transformers fused experts module).
        cfg: the RoutingConfig; ``cfg.ep_size`` must equal the world size.
    Returns:
        Handles whose ``remove()`` restore the parameters, the experts implementation and the
        registries exactly.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise ModelStateError("expert parallelism needs an initialised torch.distributed process group")
    rank, world = dist.get_rank(), dist.get_world_size()
    if cfg.ep_size != world:
        raise ModelStateError(f"routing config has ep_size={cfg.ep_size}, the process group has {world} ranks")
    if model in _RUNTIMES:
        raise ModelStateError("expert parallelism is already installed on this model; remove the patch first")
    register_experts_implementation()

    # Validate everything first so a refused install leaves the model untouched.
    plan = []
    header_slots = 1
    for ordinal, block in enumerate(blocks):
        experts = block.experts
        E = int(block.gate.num_experts)
        name = f"MoE block {ordinal}"
        _check_experts(name, experts, E)
        header_slots = max(header_slots, -(-E // world))
        shard = SHARDS.get(experts)
        if shard is not None and (shard.rank, shard.world, shard.num_experts) != (rank, world, E):
            raise ModelStateError(
                f"{name} was loaded for rank {shard.rank} of {shard.world} with {shard.num_experts} experts; "
                f"this process is rank {rank} of {world}")
        if shard is None and (experts.gate_up_proj.shape[0] != E or experts.down_proj.shape[0] != E):
            raise ModelStateError(
                f"{name} holds {experts.gate_up_proj.shape[0]} experts, its router {E}; a model sharded by "
                "something other than moepatch.parallel.load_expert_parallel cannot be re-sliced")
        plan.append((ordinal, block, E, shard))
    first_p = blocks[0].experts.gate_up_proj
    if world > 1 and dist.get_backend() == "gloo" and first_p.device.type != "cpu":
        raise ModelStateError(f"the experts live on {first_p.device} but the process group uses gloo; "
                              "initialise it with NCCL (moepatch.parallel.init_distributed does)")

    ep_blocks: list[EPBlock] = []
    for ordinal, block, E, shard in plan:
        experts = block.experts
        if shard is not None:
            gate_up, down, restore = experts.gate_up_proj, experts.down_proj, None
        else:
            first, stop = local_range(E, world, rank)
            restore = {n: experts._parameters[n] for n in ("gate_up_proj", "down_proj")}
            # Views of the full parameters: remove() puts the very same Parameter objects back, so
            # the full weights stay allocated (load with load_expert_parallel to hold only a slice).
            for n, p in restore.items():
                experts._parameters[n] = torch.nn.Parameter(p.detach()[first:stop], requires_grad=p.requires_grad)
            gate_up, down = experts.gate_up_proj, experts.down_proj
        ep_blocks.append(EPBlock(ordinal, E, weakref.ref(experts), gate_up, down, restore))
    dispatcher = AllToAllDispatcher(header_slots) if world > 1 else LocalDispatcher(header_slots)
    runtime = Runtime(dispatcher, ep_blocks, first_p.device, first_p.dtype, int(first_p.shape[-1]))

    handles = [_Handle(lambda: _restore_all(blocks, ep_blocks))]
    try:
        handles.append(backend.select(model, blocks, EXPERTS_IMPLEMENTATION))
    except BaseException:
        handles[0].remove()
        raise
    for blk, block in zip(ep_blocks, blocks):
        _EXPERTS[block.experts] = (runtime, blk)
    _RUNTIMES[model] = runtime
    model_ref = weakref.ref(model)  # the core keeps these handles in a map keyed weakly by the model

    def unregister():
        for block in blocks:
            _EXPERTS.pop(block.experts, None)
        m = model_ref()
        if m is not None:
            _RUNTIMES.pop(m, None)

    handles.append(_Handle(unregister))
    return handles


def _restore_all(blocks, ep_blocks):
    for blk, block in zip(ep_blocks, blocks):
        if blk.restore is not None:
            block.experts._parameters.update(blk.restore)


def runtime(model: torch.nn.Module) -> Runtime:
    rt = _RUNTIMES.get(model)
    if rt is None:
        raise ModelStateError("the model is not patched with expert parallelism; call "
                              "moepatch.apply(model, ..., expert_parallel=True) first")
    return rt


def set_phase_timer(model: torch.nn.Module, timer) -> None:
    """Call ``timer.mark(phase)`` at ``"dispatch"``, ``"experts"``, ``"combine"`` and ``"done"`` of every
    MoE layer (benchmarks); None switches it off."""
    runtime(model).timer = timer


def finish(model: torch.nn.Module) -> None:
    """Serve the other ranks' MoE layers until every rank has called ``finish`` (a collective)."""
    runtime(model).serve_until_done()


@contextlib.contextmanager
def ep_session(model: torch.nn.Module):
    """Run a rank's share of work so that uneven work and failures never deadlock: on normal exit
    the rank serves the others' MoE layers until every rank has left its session; if the body
    raises, the others raise :class:`PeerFailedError` at their next MoE layer."""
    rt = runtime(model)
    try:
        yield rt
    except BaseException:
        # Tell the others, unless they already know (the error was decided at a header every rank
        # read, or the transport broke: rt.failure) or a round is open (the peers wait for rows,
        # not for a header; they then fail at the process-group timeout).
        if not rt.dispatcher.round_open and rt.failure is None:
            with contextlib.suppress(ExpertParallelError):
                # A failed abort means the transport is gone; the original error matters more.
                rt.abort()
        raise
    else:
        rt.serve_until_done()


def ep_barrier_loop(model: torch.nn.Module, batches, step) -> list:
    """``[step(b) for b in batches]`` inside :func:`ep_session`; each rank's list may be shorter or empty."""
    results = []
    with ep_session(model):
        for batch in batches:
            results.append(step(batch))
    return results


class EPBackend(backend.Backend):
    """The ``"ep"`` experts backend of the patch core (registered by the package root)."""

    name = "ep"
    device_route = True

    def prepare(self, model, cfg):
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise ModelStateError(
                "expert_parallel=True needs an initialised torch.distributed process group; launch with "
                "`accelerate launch` or `torchrun` (see docs/expert-parallel.md)")
        return dataclasses.replace(cfg, ep_size=dist.get_world_size()), dist.get_rank()

    def install(self, model, blocks, cfg) -> list:
        return install(model, blocks, cfg)


BACKEND = EPBackend()
