"""Expert parallelism as an experts backend (``moepatch.apply(model, ..., expert_parallel=True)``): each rank
keeps its block of experts and computes them on the rows the other ranks send it; routing is the core's.
Legend: T tokens, W slots, H hidden, I intermediate, E experts, L local experts, R rows received.
"""

from __future__ import annotations

import contextlib
import dataclasses
import types
import weakref
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import ModelStateError, UnsupportedModelError
from ..ops.reference import module_expert
from ..patch import backend
from .dispatch import IDLE, AllToAllDispatcher, Dispatched, Dispatcher, LocalDispatcher, local_range, weigh_and_sum
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
    first: int  # index in the module's parameters of this rank's first expert (0 where install sliced them)
    local: int  # L, the experts this rank holds
    restore: dict | None  # original parameters when install sliced them


class Runtime:
    """The dispatcher and the local experts of one expert-parallel model."""

    def __init__(self, dispatcher: Dispatcher, blocks: list[EPBlock], device, dtype, hidden: int):
        self.dispatcher, self.blocks = dispatcher, blocks
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

    def _collective(self, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ExpertParallelError as exc:
            # Every rank decided the same at this header, or the transport broke: no further message.
            self.failure = type(exc).__name__
            raise

    def _finish_round(self, d: Dispatched, y_RH: torch.Tensor) -> torch.Tensor:
        return self._collective(self.dispatcher.return_rows, y_RH, d)

    def forward(self, blk: EPBlock, x_TH: torch.Tensor, ids_TW: torch.Tensor, w_TW: torch.Tensor) -> torch.Tensor:
        """One MoE layer call: dispatch, local experts, combine; (T, H) like ``x_TH``."""
        self._check_usable()
        if torch.is_grad_enabled() and (x_TH.requires_grad or w_TW.requires_grad):
            raise ModelStateError("the expert-parallel path is inference-only (its all-to-all is not differentiable); "
                                  "run the forward under torch.no_grad() or torch.inference_mode()")
        self._mark("dispatch")
        d = self._collective(self.dispatcher.dispatch, x_TH, ids_TW, num_experts=blk.num_experts, tag=blk.ordinal)
        self.rounds += 1
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
            # Zeros complete the round (no peer waits); ep_session tells every rank at the next header.
            self._finish_round(d, torch.zeros_like(d.x_RH))
            raise

    def serve_until_done(self) -> None:
        """Serve the other ranks' rounds as an idle rank until every rank is idle."""
        while True:
            self._check_usable()
            x_0H = torch.empty(0, self.hidden, dtype=self.dtype, device=self.device)
            ids_0W = torch.empty(0, 1, dtype=torch.long, device=self.device)
            d = self._collective(self.dispatcher.dispatch, x_0H, ids_0W, num_experts=self.blocks[0].num_experts,
                                 tag=-1, status=IDLE)
            if d is None:
                return
            self.rounds += 1
            self._finish_round(d, self._compute_or_zeros(d))

    def abort(self) -> None:
        self.failure = "this rank aborted"
        self.dispatcher.abort(device=self.device)


def compute_local_experts(blk: EPBlock, x_RH: torch.Tensor, counts_SM: list) -> torch.Tensor:
    """``blk``'s local experts (``moepatch.ops.reference.module_expert``) on x_RH (R, H), rows by source, then by
    local expert (``counts_SM``: rows per (source, local expert slot), host ints): (R, H) in receive order."""
    L = blk.local
    per_expert = [sum(c[j] for c in counts_SM) for j in range(len(counts_SM[0]))]
    if any(per_expert[L:]):
        raise ProtocolError(f"a peer sent rows for local expert slots >= {L}; the ranks split the experts differently")
    if x_RH.shape[0] == 0:
        return torch.empty_like(x_RH)
    experts = blk.experts()
    if experts is None:
        raise ModelStateError("the experts module of an expert-parallel block no longer exists")
    S = len(counts_SM)
    # Each expert's rows made contiguous by concatenating the (source, expert) blocks, whose sizes are
    # host ints: one copy kernel each way instead of a sort, a gather and a scatter.
    if S > 1:
        blocks = x_RH.split([counts_SM[s][j] for s in range(S) for j in range(L)])  # as received
        x_RH = torch.cat([blocks[s * L + j] for j in range(L) for s in range(S)])
    start = 0
    out_RH = torch.empty_like(x_RH)
    for j, n in enumerate(per_expert[:L]):
        if n:
            out_RH[start:start + n] = module_expert(experts, blk.first + j, x_RH[start:start + n])
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
    """Register ``"moepatch_ep"`` process-wide (it changes no model; a sharded model selects it to fail clearly)."""
    backend.register(EXPERTS_IMPLEMENTATION, _ep_experts_forward)


def _check_block(ordinal: int, block, rank: int, world: int) -> ShardInfo | None:
    """Refuse a block expert parallelism cannot run; its ShardInfo when it was loaded sharded."""
    experts, E, name = block.experts, int(block.experts.num_experts), f"MoE block {ordinal}"
    cls = type(experts)
    if not (hasattr(cls, "_apply_gate") and hasattr(experts, "config")
            and hasattr(experts.config, "_experts_implementation_internal")):
        raise UnsupportedModelError(
            f"{name}: {cls.__name__} does not dispatch through transformers' ExpertsInterface "
            "(@use_experts_implementation); expert parallelism needs transformers >= 5.17")
    for pname in (_first_weight(experts), "down_proj"):
        p = getattr(experts, pname, None)
        if not isinstance(p, torch.Tensor) or p.dim() != 3:
            raise UnsupportedModelError(f"{name}: {cls.__name__}.{pname} is not a 3-D expert tensor")
    shard = SHARDS.get(experts)
    if shard is not None and (shard.rank, shard.world, shard.num_experts) != (rank, world, E):
        raise ModelStateError(f"{name} was loaded for rank {shard.rank} of {shard.world} with {shard.num_experts} "
                              f"experts; this process is rank {rank} of {world}")
    held = getattr(experts, _first_weight(experts)).shape[0]
    if shard is None and (held != E or experts.down_proj.shape[0] != E):
        raise ModelStateError(f"{name} holds {held} experts, its module says {E}; a model sharded by something "
                              "other than moepatch.parallel.load_expert_parallel cannot be re-sliced")
    return shard


def _first_weight(experts) -> str:
    return "gate_up_proj" if getattr(experts, "has_gate", True) else "up_proj"


def _per_expert(experts, E: int) -> list[str]:
    """The module's own parameters with one entry per expert (weights, biases): what a rank slices."""
    return [n for n, p in experts._parameters.items() if p is not None and p.dim() >= 1 and p.shape[0] == E]


def install(model: torch.nn.Module, blocks: list, cfg) -> list:
    """Run ``blocks``' experts (MoE blocks in forward order: ``.gate`` with ``num_experts``, ``.experts`` a
    transformers fused experts module) under expert parallelism over the default process group;
    ``cfg.ep_size`` must equal its size.  Returns handles whose ``remove()`` undo it exactly."""
    if not (dist.is_available() and dist.is_initialized()):
        raise ModelStateError("expert parallelism needs an initialised torch.distributed process group")
    rank, world = dist.get_rank(), dist.get_world_size()
    if cfg.ep_size != world:
        raise ModelStateError(f"routing config has ep_size={cfg.ep_size}, the process group has {world} ranks")
    if model in _RUNTIMES:
        raise ModelStateError("expert parallelism is already installed on this model; remove the patch first")
    register_experts_implementation()

    # Validate everything first so a refused install leaves the model untouched.
    shards = [_check_block(ordinal, block, rank, world) for ordinal, block in enumerate(blocks)]
    first_p = blocks[0].experts.down_proj
    if world > 1 and dist.get_backend() == "gloo" and first_p.device.type != "cpu":
        raise ModelStateError(f"the experts live on {first_p.device} but the process group uses gloo; "
                              "initialise it with NCCL (moepatch.parallel.init_distributed does)")

    ep_blocks: list[EPBlock] = []
    for ordinal, (block, shard) in enumerate(zip(blocks, shards)):
        experts, E, restore = block.experts, int(block.experts.num_experts), None
        if shard is None:
            first, stop = local_range(E, world, rank)
            restore = {n: experts._parameters[n] for n in _per_expert(experts, E)}
            # Views of the full parameters: remove() puts the very same Parameter objects back, so
            # the full weights stay allocated (load with load_expert_parallel to hold only a slice).
            for n, p in restore.items():
                experts._parameters[n] = torch.nn.Parameter(p.detach()[first:stop], requires_grad=p.requires_grad)
        ep_blocks.append(EPBlock(ordinal, E, weakref.ref(experts), 0, int(experts.down_proj.shape[0]), restore))
    header_slots = max(1, *(-(-blk.num_experts // world) for blk in ep_blocks))
    dispatcher = AllToAllDispatcher(header_slots) if world > 1 else LocalDispatcher(header_slots)
    hidden = int(model.config.get_text_config().hidden_size)
    runtime = Runtime(dispatcher, ep_blocks, first_p.device, first_p.dtype, hidden)

    model_ref = weakref.ref(model)  # the core keeps these handles in a map keyed weakly by the model

    def undo():  # the parameters and the registries as they were (idempotent)
        for blk, block in zip(ep_blocks, blocks):
            _EXPERTS.pop(block.experts, None)
            if blk.restore is not None:
                block.experts._parameters.update(blk.restore)
        m = model_ref()
        if m is not None:
            _RUNTIMES.pop(m, None)

    try:
        handles = [backend.select(model, blocks, EXPERTS_IMPLEMENTATION), types.SimpleNamespace(remove=undo)]
    except BaseException:
        undo()
        raise
    for blk, block in zip(ep_blocks, blocks):
        _EXPERTS[block.experts] = (runtime, blk)
    _RUNTIMES[model] = runtime
    return handles


def runtime(model: torch.nn.Module) -> Runtime:
    rt = _RUNTIMES.get(model)
    if rt is None:
        raise ModelStateError("the model is not patched with expert parallelism; call "
                              "moepatch.apply(model, ..., expert_parallel=True) first")
    return rt


def set_phase_timer(model: torch.nn.Module, timer) -> None:
    """``timer.mark(phase)`` at each MoE layer's dispatch, experts, combine and done (None: off)."""
    runtime(model).timer = timer


def finish(model: torch.nn.Module) -> None:
    """Serve the other ranks' MoE layers until every rank has called ``finish`` (a collective)."""
    runtime(model).serve_until_done()


@contextlib.contextmanager
def ep_session(model: torch.nn.Module):
    """A rank's share of work, never deadlocked by uneven work or failures: on normal exit the rank serves
    the others' MoE layers until every rank has left; if the body raises, the others raise PeerFailedError."""
    rt = runtime(model)
    try:
        yield rt
    except BaseException:
        # Tell the others, unless they know (rt.failure) or a round is open (they wait for rows and fail
        # at the timeout); a failed abort means the transport is gone, and the original error matters more.
        if not rt.dispatcher.round_open and rt.failure is None:
            with contextlib.suppress(ExpertParallelError):
                rt.abort()
        raise
    else:
        rt.serve_until_done()


def ep_barrier_loop(model: torch.nn.Module, batches, step) -> list:
    """``[step(b) for b in batches]`` inside :func:`ep_session`; each rank's list may be shorter or empty."""
    with ep_session(model):
        return [step(batch) for batch in batches]


class EPBackend(backend.Backend):
    """The ``"ep"`` experts backend of the patch core (registered by the package root)."""

    name = "ep"
    device_route = True

    def prepare(self, model, cfg):
        if not (dist.is_available() and dist.is_initialized()):
            raise ModelStateError("expert_parallel=True needs an initialised torch.distributed process group; launch "
                                  "with `accelerate launch` or `torchrun` (see docs/expert-parallel.md)")
        return dataclasses.replace(cfg, ep_size=dist.get_world_size()), dist.get_rank()

    def install(self, model, blocks, cfg) -> list:
        return install(model, blocks, cfg)


BACKEND = EPBackend()
