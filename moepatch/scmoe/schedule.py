"""ScMoE under expert parallelism: the sequential and the overlapped schedule of a shortcut unit.

``overlap`` runs backbone ops 0..K-1 while the rows travel and K..N-1 while the combine travels (K by
:func:`choose_slot`); both schedules give the same output bit for bit.  Inference only, every rank running
the same number of forwards; streams, exchanges and CUDA graphs: docs/scmoe.md.
Legend: B sequences, S positions, T = B*S tokens on this rank, D hidden, W slots per token, R rows
received, P rows sent, N rows of a fixed-size exchange.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import statistics
import time
import weakref
from dataclasses import dataclass

import torch

from ..errors import ModelStateError
from ..ops.graph_cache import GraphCache
from ..ops.reference import reference_experts
from ..parallel.collectives import AsyncAllToAllDispatcher, PendingRows, world_size
from ..parallel.dispatch import Dispatched, LocalDispatcher, PaddedRound, weigh_and_sum, weigh_padded
from ..parallel.ep import EPBlock, compute_local_experts
from ..patch.backend import layout_problem
from .model import ForwardContext, FusedExperts, ScMoEForCausalLM, UnitProgram

SCHEDULES = ("sequential", "overlap")
EXCHANGES = ("counts", "padded")


def compute_padded_experts(blk: EPBlock, x_NH: torch.Tensor, local_N: torch.Tensor) -> torch.Tensor:
    """The local experts on the rows of a fixed-size exchange, (N, H) in x's dtype (0 on rows naming no
    local expert): the fused kernel on CUDA (no host sync), moepatch.ops.reference elsewhere."""
    if x_NH.shape[0] == 0:
        return torch.empty_like(x_NH)
    experts = blk.experts()
    if experts is None:
        raise ModelStateError("the experts module of an expert-parallel block no longer exists")
    # Each row to its one expert with weight 1 in float32 (exact); ids >= L (no data) are dropped slots.
    args = (x_NH, local_N.view(-1, 1), torch.ones(x_NH.shape[0], 1, dtype=torch.float32, device=x_NH.device),
            experts.gate_up_proj[blk.first:blk.first + blk.local], experts.down_proj[blk.first:blk.first + blk.local])
    # moepatch.ops' fused SwiGLU kernel where it computes these experts (gated SiLU, [gate; up]).
    if x_NH.is_cuda and (isinstance(experts, FusedExperts) or layout_problem(type(experts).__name__, experts) is None):
        from ..ops.experts import fused_experts_impl

        return fused_experts_impl(*args)
    return reference_experts(*args, apply_gate=experts._apply_gate)


def choose_slot(comp_s: list[float], t_dispatch: float, t_combine: float) -> int:
    """The paper's slot rule: K in [0, N] minimising |Σ_{i<K} COMP_i − T_dispatch| + |Σ_{i≥K} COMP_i − T_combine|
    (ops 0..K-1 overlap the dispatch, K..N-1 the combine); ties go to the smaller K."""
    total = sum(comp_s)
    best_k, best_cost = 0, float("inf")
    for k, before in enumerate(itertools.accumulate(comp_s, initial=0.0)):  # before = Σ_{i<K} COMP_i
        cost = abs(before - t_dispatch) + abs(total - before - t_combine)
        if cost < best_cost - 1e-12:
            best_k, best_cost = k, cost
    return best_k


class _Clock:
    """Wall-clock phases; on CUDA every mark synchronises the device first (calibration and benchmarks only)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.t = time.perf_counter()

    def lap(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()  # NOTE: host sync (timing)
        now = time.perf_counter()
        dt, self.t = now - self.t, now
        return dt


@dataclass
class UnitTiming:
    """Seconds of one unit's phases in the sequential schedule (median over iterations, max over ranks)."""

    ops: dict[str, float]
    gate: float
    dispatch: float
    experts: float
    combine: float
    slot: int = 0


def _signature(v):
    """What a unit graph's inputs must match: tensors by shape, dtype, strides and device, a context's fields
    one by one, other values as they are."""
    if isinstance(v, torch.Tensor):
        return ("tensor", tuple(v.shape), v.dtype, v.stride(), v.device)
    if isinstance(v, dict):
        return tuple((k, _signature(x)) for k, x in v.items())
    return v if isinstance(v, (int, float, bool, str, type(None), torch.dtype)) else ("object", id(v))


class _UnitGraph:
    """One unit and schedule captured in a CUDA graph, on static copies of its input and context."""

    def __init__(self, ep: ShortcutEP, cache: GraphCache, u: int, h_BSD: torch.Tensor, ctx, schedule: str):
        self.h_BSD = h_BSD.clone()
        self.ctx = copy.copy(ctx)  # (native ScMoE only: a ForwardContext holds no tensor containers)
        for name, value in vars(ctx).items():
            if isinstance(value, torch.Tensor):
                setattr(self.ctx, name, value.clone())
        self.graph = torch.cuda.CUDAGraph()
        with cache.recording(self.graph, h_BSD.device):  # (torch.cuda.graph syncs the device first)
            self.out_BSD = ep._run_unit(u, self.h_BSD, self.ctx, schedule)

    def replay(self, h_BSD: torch.Tensor, ctx) -> torch.Tensor:
        self.h_BSD.copy_(h_BSD)
        for name, value in vars(ctx).items():
            if isinstance(value, torch.Tensor):
                getattr(self.ctx, name).copy_(value)
        self.graph.replay()
        return self.out_BSD


class ShortcutEP:
    """Run a native ScMoE (or baseline) model, or a transformers ``LongcatFlashForCausalLM``, in eval mode
    with the same weights on every rank, its routed experts split over the ranks of ``group`` (default:
    the default group; without a process group, one rank with identity exchanges).

    dispatch_after_ops: on CUDA, backbone ops queued before the overlapped dispatch; exchange: ``"counts"``
    or ``"padded"``; graphs: replay every unit from a CUDA graph (padded, native ScMoE).  No option changes
    the outputs; docs/scmoe.md compares them."""

    def __init__(self, model, group=None, dispatch_after_ops: int = 1, exchange: str = "counts",
                 graphs: bool = False):
        if isinstance(dispatch_after_ops, bool) or not isinstance(dispatch_after_ops, int) or dispatch_after_ops < 0:
            raise ValueError(f"dispatch_after_ops={dispatch_after_ops!r}; accepted: an integer >= 0 (backbone ops "
                             "queued before the overlapped dispatch is launched)")
        if exchange not in EXCHANGES:
            raise ValueError(f"exchange={exchange!r}; accepted: {', '.join(map(repr, EXCHANGES))}")
        if graphs and exchange != "padded":
            raise ValueError("graphs=True needs exchange='padded' (the counts exchange reads its header back to the "
                             "host, which a CUDA graph cannot)")
        if type(model).__name__ == "LongcatFlashForCausalLM":
            if graphs:
                raise ModelStateError("graphs=True runs native ScMoE models; LongCat-Flash runs eagerly")
            from .longcat import LongcatShortcut

            model = LongcatShortcut(model)
        elif not isinstance(model, ScMoEForCausalLM):
            raise ModelStateError(f"ShortcutEP runs native ScMoE models and LongcatFlashForCausalLM, got "
                                  f"{type(model).__name__}")
        world = world_size(group)
        self.model = model
        layers = model.moe_layers()
        header_slots = max(-(-m.num_experts // world) for m in layers)
        self.dispatcher = AsyncAllToAllDispatcher(header_slots, group) if world > 1 else LocalDispatcher(header_slots)
        self.rank, self.world = self.dispatcher.rank, world
        self._ordinal = {id(m): i for i, m in enumerate(layers)}
        self.blocks = []
        for i, m in enumerate(layers):
            cap = m.capacity
            if cap is not None and cap.config.ep_size != world:
                raise ModelStateError(f"capacity is configured for ep_size={cap.config.ep_size}; call "
                                      f"moepatch.apply(model, ..., ep_size={world}) for {world} ranks")
            local, ex = self.dispatcher.local_experts(m.num_experts), m.experts
            self.blocks.append(EPBlock(i, m.num_experts, weakref.ref(ex), local.start, len(local), None))
        self.slots: dict[int, int] = {}  # calibrated slots; before calibration choose_slot on unit costs
        self.timings: dict[int, UnitTiming] = {}
        self._side = None  # CUDA stream of the overlapped dispatch, made on first use
        self.dispatch_after_ops, self.exchange = dispatch_after_ops, exchange
        self.graphs = bool(graphs)
        self._unit_graphs = GraphCache(max_graphs=256)  # (unit, schedule, input signature) -> _UnitGraph | calls

    # -- one unit ---------------------------------------------------------------------------------
    def _in_flight(self, asynchronous: bool):
        """Row exchanges inside are left in flight when ``asynchronous`` (then :meth:`_pending` has them)."""
        if asynchronous and isinstance(self.dispatcher, AsyncAllToAllDispatcher):
            return self.dispatcher.in_flight()
        return contextlib.nullcontext()

    def _pending(self, asynchronous: bool) -> PendingRows | None:
        take = getattr(self.dispatcher, "take_pending", None)
        return take() if asynchronous and take is not None else None

    def _side_stream(self, x: torch.Tensor):
        """The high-priority CUDA stream the overlapped dispatch runs on (None on the CPU)."""
        if not x.is_cuda:
            return None
        if self._side is None or self._side.device != x.device:
            self._side = torch.cuda.Stream(device=x.device, priority=-1)
        return self._side

    @staticmethod
    def _on_side(side):
        # (not torch.cuda.stream(None): its constructor initialises CUDA, which a CPU run must not)
        return torch.cuda.stream(side) if side is not None else contextlib.nullcontext()

    def _round(self, prog: UnitProgram, ids_TW: torch.Tensor):
        """The ids a round dispatches (LongCat-Flash's zero-computation experts stay here) and its keywords."""
        computing = getattr(prog.moe, "computing_ids", None)
        ids_TW = computing(ids_TW) if computing is not None else ids_TW
        return ids_TW, dict(num_experts=prog.moe.num_experts, tag=self._ordinal[id(prog.moe)])

    def _begin(self, prog: UnitProgram, ids_TW: torch.Tensor, side=None, after=None):
        """Sort, gather and exchange the header; on ``side`` once the event ``after`` (the source) is reached."""
        if side is not None:
            side.wait_event(after)  # the source and the gate are ready
        with self._on_side(side):
            ids_TW, kw = self._round(prog, ids_TW)
            return self.dispatcher.begin(prog.x_s_TD, ids_TW, **kw)

    def _complete(self, hdr, asynchronous: bool, side=None):
        """Wait for the header on the host and send the rows (left in flight when ``asynchronous``)."""
        with self._on_side(side), self._in_flight(asynchronous):
            d = self.dispatcher.complete(hdr)
        if d is None:
            raise ModelStateError("every rank reported idle in a ShortcutEP forward; all ranks must run the same "
                                  "number of forwards")
        return d, self._pending(asynchronous)

    def _dispatch(self, prog: UnitProgram, ids_TW: torch.Tensor, asynchronous: bool, ctx: ForwardContext):
        if self.exchange == "counts":
            return self._complete(self._begin(prog, ids_TW), asynchronous)
        ids_TW, kw = self._round(prog, ids_TW)
        peer_tokens = getattr(ctx, "peer_tokens", None)
        if peer_tokens is None:
            raise ModelStateError("the padded exchange needs the forward context of ShortcutEP.prepare (it agrees on "
                                  "the rows per rank pair over the ranks)")
        with self._in_flight(asynchronous):
            r = self.dispatcher.begin_padded(prog.x_s_TD, ids_TW, slots_per_peer=peer_tokens * ids_TW.shape[1], **kw)
        return r, self._pending(asynchronous)

    def _experts(self, d: Dispatched | PaddedRound) -> torch.Tensor:
        if isinstance(d, PaddedRound):
            return compute_padded_experts(self.blocks[d.tag], d.x_NH, d.local_N)
        return compute_local_experts(self.blocks[d.tag], d.x_RH, d.counts_SM)

    def _combine(self, y_RD: torch.Tensor, d: Dispatched | PaddedRound, asynchronous: bool):
        with self._in_flight(asynchronous):
            back = self.dispatcher.return_padded if isinstance(d, PaddedRound) else self.dispatcher.return_rows
            back_PD = back(y_RD, d)
        return back_PD, self._pending(asynchronous)

    @staticmethod
    def _weigh(prog: UnitProgram, back_PD: torch.Tensor, d: Dispatched | PaddedRound, w_TW: torch.Tensor,
               ids_TW: torch.Tensor) -> torch.Tensor:
        combine = getattr(prog.moe, "combine", None)
        if combine is not None:  # the routed branch adds its identity experts here
            return combine(back_PD, d, w_TW, ids_TW, prog.x_s_TD)
        return (weigh_padded if isinstance(d, PaddedRound) else weigh_and_sum)(back_PD, d, w_TW)

    def run_unit(self, u: int, h_BSD: torch.Tensor, ctx: ForwardContext, schedule: str = "overlap",
                 clock: _Clock | None = None, phases: dict | None = None) -> torch.Tensor:
        """Unit ``u`` on this rank's tokens, (B, S, D); ``clock``/``phases`` record the sequential phases.  With
        ``graphs`` the second call of a signature captures the unit and later calls replay it: the result is
        then the graph's static output, rewritten by the next replay (clone it to keep it)."""
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule={schedule!r}; accepted: {', '.join(map(repr, SCHEDULES))}")
        if not self.graphs or clock is not None:
            return self._run_unit(u, h_BSD, ctx, schedule, clock, phases)
        if not h_BSD.is_cuda:
            raise ModelStateError("graphs=True replays CUDA graphs; this unit's input is on the "
                                  f"{h_BSD.device.type}")
        key = (u, schedule, _signature(h_BSD), _signature(vars(ctx)))
        cache = self._unit_graphs
        entry = cache.entries.get(key, 0)
        if isinstance(entry, _UnitGraph):
            return entry.replay(h_BSD, ctx)
        if entry == 0:  # the first call: eager (compiles, warms up); a full cache keeps new signatures eager
            if len(cache.entries) < cache.max_graphs:
                cache.entries[key] = 1
            return self._run_unit(u, h_BSD, ctx, schedule)
        try:
            graph = _UnitGraph(self, cache, u, h_BSD, ctx, schedule)
        except RuntimeError as exc:
            raise ModelStateError(f"capturing unit {u} ({schedule}) in a CUDA graph failed: {exc}") from exc
        cache.entries[key] = graph
        return graph.replay(h_BSD, ctx)

    def _run_unit(self, u: int, h_BSD: torch.Tensor, ctx, schedule: str, clock: _Clock | None = None,
                  phases: dict | None = None) -> torch.Tensor:
        prog = self.model.unit_program(u, h_BSD, ctx)
        if clock is not None:
            clock.lap()
        # Gating and dispatch preparation as early as possible: right after the source exists.
        ids_TW, w_TW = prog.moe.gate(prog.x_s_TD, ctx)
        if schedule == "sequential":
            def lap(name):
                if clock is not None:
                    phases[name] = clock.lap()

            lap("gate")
            d, _ = self._dispatch(prog, ids_TW, asynchronous=False, ctx=ctx)
            lap("dispatch")
            y_RD = self._experts(d)
            lap("experts")
            back_PD, _ = self._combine(y_RD, d, asynchronous=False)
            routed_TD = self._weigh(prog, back_PD, d, w_TW, ids_TW)
            lap("combine")
            for name, op in prog.ops:
                op()
                lap(name)
            return prog.merge(routed_TD)

        k = self.slots.get(u, choose_slot([1.0] * len(prog.ops), 0.5, 0.5))
        side = self._side_stream(prog.x_s_TD)
        if side is None:
            # gloo: the rows travel on gloo's worker thread while ops 0..K-1 run.
            d, pending = self._dispatch(prog, ids_TW, asynchronous=True, ctx=ctx)
            for _, op in prog.ops[:k]:
                op()
        else:
            # CUDA: the first ``dispatch_after_ops`` ops, then the dispatch on the side stream behind the
            # source's event, then the rest of ops 0..K-1.
            source_ready = torch.cuda.Event()
            source_ready.record()
            first = min(self.dispatch_after_ops, k)
            for _, op in prog.ops[:first]:
                op()
            window = prog.ops[first:k]
            if self.exchange == "padded":
                # Nothing waits for a value, so the host queues the window at once.
                side.wait_event(source_ready)
                with self._on_side(side):
                    d, pending = self._dispatch(prog, ids_TW, asynchronous=True, ctx=ctx)
                for _, op in window:
                    op()
                # Join the side stream (a no-op in time; a CUDA graph capture needs every fork joined).
                torch.cuda.current_stream().wait_stream(side)
            else:
                # The rows go once the header is on the host (backbone ops issue no collective, so the
                # ranks' collectives keep one order).
                hdr = self._begin(prog, ids_TW, side, after=source_ready)
                d = pending = None
                for _, op in window:
                    op()
                    if d is None and hdr.values.ready():
                        d, pending = self._complete(hdr, asynchronous=True, side=side)
                if d is None:
                    d, pending = self._complete(hdr, asynchronous=True, side=side)
        if pending is not None:
            pending.wait()  # the compute stream waits for the rows; the host does not
        y_RD = self._experts(d)
        back_PD, pending = self._combine(y_RD, d, asynchronous=True)
        for _, op in prog.ops[k:]:
            op()
        if pending is not None:
            pending.wait()
        # The final combine as late as possible: weigh, sum and merge last.
        return prog.merge(self._weigh(prog, back_PD, d, w_TW, ids_TW))

    # -- whole forwards -----------------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                schedule: str = "overlap") -> torch.Tensor:
        """Logits (B, S, V) of this rank's batch under expert parallelism."""
        ctx, h_BSD = self.prepare(input_ids, attention_mask)
        for u in range(len(self.model.units)):
            h_BSD = self.run_unit(u, h_BSD, ctx, schedule)
        return self.model.head(h_BSD, None, None).logits

    __call__ = forward

    def prepare(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        """The forward context (capacity per source rank) and the embeddings of this rank's batch."""
        if torch.is_grad_enabled():
            raise ModelStateError("the expert-parallel path is inference-only (its all-to-all is not differentiable); "
                                  "run it under torch.no_grad() or torch.inference_mode()")
        ctx = self.model.context(input_ids, attention_mask, None)
        ctx.source_rank = self.rank if self.world > 1 else None
        if self.exchange == "padded":  # the most tokens any rank has: the rows per rank pair (a collective)
            tokens = ctx.batch * ctx.seq
            if isinstance(self.dispatcher, AsyncAllToAllDispatcher):
                tokens = int(self.dispatcher.reduce_max([float(tokens)])[0])
            ctx.peer_tokens = tokens
        return ctx, self.model.embed_tokens(input_ids)

    @torch.no_grad()
    def time_exchanges(self, u: int, h_BSD: torch.Tensor, ctx: ForwardContext, iters: int = 10,
                       warmup: int = 2) -> tuple[float, float]:
        """Seconds of unit ``u``'s communication alone, (header + rows out, rows back): one real round's
        exchanges repeated after barriers, medians over ``iters``, maxima over ranks (a collective; 0 with one rank)."""
        if not isinstance(self.dispatcher, AsyncAllToAllDispatcher):
            return 0.0, 0.0
        disp = self.dispatcher
        prog = self.model.unit_program(u, h_BSD, ctx)
        ids_TW, _ = prog.moe.gate(prog.x_s_TD, ctx)
        d, _ = self._dispatch(prog, ids_TW, asynchronous=False, ctx=ctx)
        y_RD = self._experts(d)
        if isinstance(d, PaddedRound):  # ids, then rows, each way Q per rank pair
            splits = [d.slots_per_peer] * self.world
            header, sends = None, ([(d.local_N[:, None], splits, splits), (y_RD, splits, splits)],
                                   [(y_RD, splits, splits)])
        else:
            disp.return_rows(y_RD, d)
            send_PD = prog.x_s_TD[d.tok_P].contiguous()
            header = disp.blank_header(send_PD.device)
            sends = ([(send_PD, d.send_splits, d.recv_splits)], [(y_RD, d.recv_splits, d.send_splits)])
        times = ([], [])  # out, back
        for it in range(warmup + iters):
            for way, exchanges in enumerate(sends):
                disp.barrier()
                clock = _Clock(prog.x_s_TD.device)
                if way == 0 and header is not None:
                    disp.exchange_header(header)
                for args in exchanges:
                    disp.exchange_rows(*args)
                t = clock.lap()
                if it >= warmup:
                    times[way].append(t)
        return tuple(disp.reduce_max([statistics.median(t) for t in times]))

    @torch.no_grad()
    def calibrate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                  iters: int = 3, warmup: int = 1) -> dict[int, UnitTiming]:
        """Time every unit's phases in the sequential schedule and set its slot by :func:`choose_slot`; a
        collective (medians over ``iters``, maxima over the ranks, so every rank picks the same slots)."""
        ctx, h0 = self.prepare(input_ids, attention_mask)
        samples: dict[int, list[dict]] = {u: [] for u in range(len(self.model.units))}
        for it in range(warmup + iters):
            h_BSD = h0
            for u in range(len(self.model.units)):
                phases: dict = {}
                h_BSD = self.run_unit(u, h_BSD, ctx, "sequential", clock=_Clock(h0.device), phases=phases)
                if it >= warmup:
                    samples[u].append(phases)
        for u, runs in samples.items():
            names = list(runs[0])
            med = [statistics.median(r[n] for r in runs) for n in names]
            if isinstance(self.dispatcher, AsyncAllToAllDispatcher):
                med = self.dispatcher.reduce_max(med)
            vals = dict(zip(names, med))
            fixed = ("gate", "dispatch", "experts", "combine")  # UnitTiming's fields after ops
            t = UnitTiming({n: v for n, v in vals.items() if n not in fixed}, *(vals[n] for n in fixed))
            t.slot = self.slots[u] = choose_slot(list(t.ops.values()), t.dispatch, t.combine)
            self.timings[u] = t
        return self.timings
