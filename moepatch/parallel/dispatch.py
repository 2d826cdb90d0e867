"""Dispatch and combine for expert parallelism: the only moepatch module that calls torch.distributed
collectives for MoE layers.

Legend: T tokens on this rank, W routing slots per token, H hidden size, E routed experts of the
layer, D ranks, M header slots for per-expert counts (the most experts any rank hosts in any
layer), P (token, slot) pairs this rank sends, R rows it receives, C compact combine width.

Experts sit on ranks in contiguous blocks, ``moepatch.routing.capacity.expert_devices(E, D)``
(torch.tensor_split semantics: the first E % D ranks hold one more).  One MoE layer call on every
rank is one *round*:

1. header: a fixed-size ``all_to_all_single`` of int64 ``[status, tag, dtype, H, count_0..count_{M-1}]``
   from every rank to every rank, ``count_j`` = rows this rank sends for the receiver's j-th
   local expert.  Every rank reads every rank's status, so all ranks take the same decision;
2. rows: ``all_to_all_single`` of the hidden rows with input/output split sizes; the rows sent to a
   rank are sorted by expert, token order inside an expert.  Sentinel slots (id E) are never sent;
3. the caller computes its local experts on the received rows;
4. combine: the reverse ``all_to_all_single``; the source multiplies each row by its weight and
   sums each token's rows in float32 in slot order (deterministic, like the core's lowering in
   ``moepatch.patch.core._experts_post_hook``).

Statuses make uneven work safe: a rank that has no forward to run serves rounds as IDLE (it sends
nothing and computes what it receives) until every rank is IDLE, and a rank that failed sends
ABORT so the others raise instead of waiting.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..routing.capacity import expert_devices
from .errors import CollectiveError, PeerFailedError, ProtocolError

ACTIVE, IDLE, ABORT = 1, 0, -1
_STATUS_NAMES = {ACTIVE: "active", IDLE: "idle", ABORT: "abort"}
# The header carries the sender's hidden dtype so an idle rank can allocate its receive buffer.
_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_HEADER_FIXED = 4  # status, tag, dtype code, hidden size


def dtype_code(dtype: torch.dtype) -> int:
    if dtype not in _DTYPES:
        raise TypeError(f"expert parallelism sends {dtype} hidden states, which it does not support; "
                        f"accepted: {', '.join(map(str, _DTYPES))}")
    return _DTYPES.index(dtype)


@dataclass
class Dispatched:
    """One round as agreed by every rank, and what the source needs to combine.

    Attributes:
        tag: the MoE layer ordinal the active ranks run.
        x_RH: rows received, grouped by source rank, inside a source by local expert.
        counts_SM: rows per (source rank, local expert), host ints.
        send_splits / recv_splits: rows sent to / received from each rank, host ints.
        tok_P, col_P, sel_P: token, compact combine column and flat (T*W) slot of each sent row
            (col_P None after the kernel sort: the torch combine derives it from sel_P).
        pos_P: (T*W,) row of every slot among the sent rows, -1 where nothing was sent (from the
            kernel sort; None otherwise: the kernel combine derives it from sel_P).
        num_tokens, width: T and the compact combine width C (most kept slots of one token; W,
            an upper bound, after the kernel sort).
        invalid_pairs: slots whose id was outside [0, E]; the caller raises once the round is done.
    """

    tag: int
    x_RH: torch.Tensor
    counts_SM: list
    send_splits: list
    recv_splits: list
    tok_P: torch.Tensor
    col_P: torch.Tensor | None
    sel_P: torch.Tensor
    num_tokens: int
    width: int
    invalid_pairs: int
    pos_P: torch.Tensor | None = None


def device_ints(values: list, device: torch.device) -> torch.Tensor:
    """int64 tensor of host ints on ``device``; on CUDA through pinned memory, so the copy does not
    block the host (a pageable host-to-device copy waits for the stream: a hidden host sync)."""
    t = torch.tensor(values, dtype=torch.long)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t


# The counting-sort kernels of moepatch.ops sort the slots on CUDA (and, for tests, in the Triton
# interpreter on the CPU when USE_KERNEL_SORT is True: MOEPATCH_KERNEL_SORT=1); off, the torch stable sort.
USE_KERNEL_SORT: bool | None = {"1": True, "0": False}.get(os.environ.get("MOEPATCH_KERNEL_SORT", ""))


def _kernel_sort_usable(x_TH: torch.Tensor, num_tokens: int) -> bool:
    if num_tokens == 0 or USE_KERNEL_SORT is False or (USE_KERNEL_SORT is None and not x_TH.is_cuda):
        return False
    try:
        from ..ops import experts  # noqa: F401  (needs triton)
    except ImportError:
        return False
    return True


class _HostValues:
    """int64 values (1-D tensors, concatenated) on their way to the host: non-blocking copies into
    one pinned buffer on CUDA."""

    def __init__(self, parts: list[torch.Tensor]):
        if parts[0].is_cuda:
            self._host = torch.empty(sum(t.numel() for t in parts), dtype=torch.long, pin_memory=True)
            start = 0
            for t in parts:
                self._host[start:start + t.numel()].copy_(t, non_blocking=True)
                start += t.numel()
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host, self._event = torch.cat(parts), None

    def ready(self) -> bool:
        """Whether :meth:`result` would return without waiting (never blocks)."""
        return self._event is None or self._event.query()

    def result(self) -> list:
        if self._event is not None:
            self._event.synchronize()  # NOTE: host sync (the header), waits for this copy only
        return self._host.tolist()


@dataclass
class HeaderInFlight:
    """A round between :meth:`Dispatcher.begin` and :meth:`Dispatcher.complete`: the exchanged
    header on its way to the host, and every slot's token, column and row in send order."""

    values: _HostValues
    order_P: torch.Tensor
    tok_P: torch.Tensor
    col_P: torch.Tensor | None
    rows_PH: torch.Tensor | None
    num_tokens: int
    device: torch.device
    width: int | None = None  # known on the host (the kernel sort's bound W); else among the values
    pos_P: torch.Tensor | None = None


class Dispatcher:
    """dispatch/combine over D ranks; subclasses provide the two exchanges.

    Args:
        rank, world: this rank and the number of ranks D.
        header_slots: M, at least the most experts any rank hosts in any layer.
    """

    def __init__(self, rank: int, world: int, header_slots: int):
        self.rank, self.world, self.header_slots = rank, world, header_slots
        self._placement: dict = {}
        self._fixed: dict = {}  # header values in front of the counts, on the device, per layer call kind
        # True from this rank's header until its rows came back: peers are inside the same round,
        # so no other message (an abort) may be sent now.
        self.round_open = False

    # -- the transport ------------------------------------------------------------------------
    def _exchange_header(self, send_DX: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _exchange_rows(self, send_NH: torch.Tensor, send_splits: list, recv_splits: list) -> torch.Tensor:
        raise NotImplementedError

    # -- the protocol -------------------------------------------------------------------------
    def placement(self, num_experts: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(rank of each expert, index of the expert on its rank), both (E,) int64 on ``device``."""
        return self._placements(num_experts, device)[:2]

    def _placements(self, num_experts: int, device: torch.device) -> tuple[torch.Tensor, ...]:
        """:meth:`placement` and the first expert of each rank, (D,) int64, all on ``device``."""
        key = (num_experts, str(device))
        if key not in self._placement:
            dev_E = expert_devices(num_experts, self.world)
            first_D = torch.searchsorted(dev_E, torch.arange(self.world), right=False)
            local_E = torch.arange(num_experts) - first_D[dev_E]
            if int(local_E.max()) >= self.header_slots:
                raise ValueError(f"{num_experts} experts over {self.world} ranks need more than the "
                                 f"{self.header_slots} header slots this dispatcher was built with")
            self._placement[key] = (dev_E.to(device), local_E.to(device), first_D.to(device))
        return self._placement[key]

    def local_experts(self, num_experts: int) -> range:
        """The global ids of the experts this rank hosts."""
        dev_E = expert_devices(num_experts, self.world)
        ids = (dev_E == self.rank).nonzero().flatten().tolist()
        return range(ids[0], ids[-1] + 1) if ids else range(0)

    def dispatch(self, x_TH: torch.Tensor, ids_TW: torch.Tensor, *, num_experts: int, tag: int,
                 status: int = ACTIVE) -> Dispatched | None:
        """Send every kept (token, slot) row to the rank of its expert: :meth:`begin` then :meth:`complete`.

        Args:
            x_TH: (T, H) hidden states (float32/float16/bfloat16), T may be 0.
            ids_TW: (T, W) int64 global expert ids, E on empty slots.
            num_experts: E of this layer.
            tag: the layer ordinal; every active rank must send the same one.
            status: ACTIVE for a real layer call, IDLE for a rank that only serves others.
        Returns:
            The agreed round, or None when every rank is IDLE (nothing left to serve).
        Raises:
            PeerFailedError: a rank sent ABORT.  ProtocolError: the active ranks disagree.
            CollectiveError: the transport failed or timed out.
        """
        return self.complete(self.begin(x_TH, ids_TW, num_experts=num_experts, tag=tag, status=status))

    def begin(self, x_TH: torch.Tensor, ids_TW: torch.Tensor, *, num_experts: int, tag: int,
              status: int = ACTIVE) -> HeaderInFlight:
        """The first half of :meth:`dispatch`: everything that needs no host value, then the header.

        Sorts the slots by expert, gathers the rows of every slot in that order (the dropped ones
        sort last and are never sent), exchanges the header and starts copying its values to the
        host; on CUDA nothing here blocks the host, so a caller can enqueue other work (ScMoE's
        backbone) before :meth:`complete` waits for the header.  Arguments as :meth:`dispatch`.
        """
        T, W = ids_TW.shape
        device = x_TH.device
        E, D, M = num_experts, self.world, self.header_slots
        dev_E, local_E = self.placement(E, device)
        key = (status, tag, dtype_code(x_TH.dtype), x_TH.shape[1], str(device))
        if key not in self._fixed:
            self._fixed[key] = device_ints(list(key[:4]), device)
        fixed = self._fixed[key]
        if _kernel_sort_usable(x_TH, T):
            # moepatch.ops' counting sort (3 deterministic kernels, pairs in ascending order inside an
            # expert, sentinels left out), one kernel for the header, each row's pair and token and
            # each slot's row, and the row gather: five launches instead of ~35 (the sort alone is a
            # dozen radix passes) and a dozen small torch ops (host-bound: ~0.3 ms per layer).
            from ..ops.experts import dispatch as sort_pairs
            from ..ops.experts import ep_prepare, gather_rows

            layout = sort_pairs(ids_TW, E, block_m=1, fuse=False)
            header_DX, meta, order_P, tok_P, pos_P = ep_prepare(ids_TW, layout, dev_E, local_E, fixed, D, M)
            rows_PH = gather_rows(x_TH, layout) if status == ACTIVE else None
            self.round_open = True
            recv_DX = self._exchange_header(header_DX)
            # col_P: derived from sel_P by the torch combine when it runs (CPU / kernel=False); the
            # width W is a bound, for the torch combine only.
            return HeaderInFlight(_HostValues([meta, recv_DX.reshape(-1)]), order_P, tok_P, None, rows_PH, T,
                                  device, width=W, pos_P=pos_P)
        flat_P = ids_TW.reshape(-1)
        invalid = ((flat_P < 0) | (flat_P > E)).sum()
        kept_P = (flat_P >= 0) & (flat_P < E)
        # Sorting by expert groups the rows by destination rank (contiguous blocks) and, stably,
        # keeps token order inside an expert; empty and invalid slots sort last and are cut off.
        key_P = torch.where(kept_P, flat_P, torch.full_like(flat_P, E))
        order_P = torch.sort(key_P, stable=True).indices
        # (a fixed-size scatter: bincount sizes its output from the data, a second host sync)
        count_E = torch.zeros(E + 1, dtype=torch.long, device=device).scatter_add_(
            0, key_P, torch.ones_like(key_P))[:E]
        kept_TW = kept_P.view(T, W)
        width = kept_TW.sum(1).max() if T else torch.zeros((), dtype=torch.long, device=device)
        col_P = (torch.cumsum(kept_TW.long(), dim=1) - 1).reshape(-1)[order_P]
        if E == D * M:  # every rank hosts M experts: the counts are the header's layout already
            send_DM = count_E.view(D, M)
        else:
            send_DM = torch.zeros(D, M, dtype=torch.long, device=device)
            send_DM[dev_E, local_E] = count_E
        header_DX = torch.cat([fixed.expand(D, _HEADER_FIXED), send_DM], dim=1).contiguous()
        # Token and row of every slot in send order, before the header's host sync, so that after
        # it only the row exchange is left to launch.
        tok_P = torch.div(order_P, W, rounding_mode="floor")
        rows_PH = x_TH[tok_P] if status == ACTIVE else None
        self.round_open = True
        recv_DX = self._exchange_header(header_DX)
        meta = torch.cat([send_DM.sum(1), torch.stack([invalid, width])])
        return HeaderInFlight(_HostValues([meta, recv_DX.reshape(-1)]), order_P, tok_P, col_P, rows_PH, T, device)

    def complete(self, h: HeaderInFlight) -> Dispatched | None:
        """The second half of :meth:`dispatch`: read the header (the one host sync), check it, send the rows."""
        D, M = self.world, self.header_slots
        # NOTE: host sync: split sizes must be known on the host; one transfer for everything.
        host = h.values.result()
        # [pairs per destination rank (D), invalid slots, (width when not known here), the received headers]
        send_splits, invalid = host[:D], host[D]
        width, off = (h.width, D + 1) if h.width is not None else (host[D + 1], D + 2)
        recv = [host[off + s * (_HEADER_FIXED + M): off + (s + 1) * (_HEADER_FIXED + M)] for s in range(D)]

        statuses = [r[0] for r in recv]
        aborted = [s for s, st in enumerate(statuses) if st == ABORT and s != self.rank]
        active = [s for s, st in enumerate(statuses) if st == ACTIVE]
        if aborted or not active:
            self.round_open = False  # every rank takes the same decision here: the round ends
        if aborted:
            raise PeerFailedError(
                f"rank {self.rank}: rank(s) {aborted} raised and aborted the expert-parallel session "
                "(their log has the cause); this rank stops too")
        if not active:
            return None
        tags = {recv[s][1] for s in active}
        formats = {(recv[s][2], recv[s][3]) for s in active}
        if len(tags) > 1 or len(formats) > 1:
            self.round_open = False
            desc = ", ".join(f"rank {s}: layer {recv[s][1]} {_DTYPES[recv[s][2]]} H={recv[s][3]}" for s in active)
            raise ProtocolError(f"rank {self.rank}: the active ranks run different MoE layers ({desc}); every rank "
                                "must run the same model and call its MoE layers in the same order")
        agreed_tag = tags.pop()
        code, hidden = formats.pop()
        counts_SM = [r[_HEADER_FIXED:] for r in recv]
        recv_splits = [sum(c) for c in counts_SM]

        P = sum(send_splits)
        if h.rows_PH is not None:
            send_NH = h.rows_PH[:P]
        else:
            send_NH = torch.empty(0, hidden, dtype=_DTYPES[code], device=h.device)
        x_RH = self._exchange_rows(send_NH, send_splits, recv_splits)
        return Dispatched(agreed_tag, x_RH, counts_SM, send_splits, recv_splits, h.tok_P[:P],
                          None if h.col_P is None else h.col_P[:P], h.order_P[:P], h.num_tokens, int(width),
                          int(invalid), h.pos_P)

    def return_rows(self, y_RH: torch.Tensor, d: Dispatched) -> torch.Tensor:
        """The reverse exchange: every computed row goes back to its source, in send order (P, H)."""
        try:
            return self._exchange_rows(y_RH.contiguous(), d.recv_splits, d.send_splits)
        finally:
            self.round_open = False

    def combine(self, y_RH: torch.Tensor, d: Dispatched, weights_TW: torch.Tensor) -> torch.Tensor:
        """Return the rows, weigh them and sum each token's rows; (T, H) in the rows' dtype.

        Args:
            y_RH: (R, H) expert outputs for the received rows, in receive order.
            d: the round from :meth:`dispatch`.
            weights_TW: (T, W) combine weights (0 on empty slots; never read there).
        """
        y_PH = self.return_rows(y_RH, d)
        return weigh_and_sum(y_PH, d, weights_TW)

    # -- the fixed-size exchange: no header, no host value ---------------------------------------
    def begin_padded(self, x_TH: torch.Tensor, ids_TW: torch.Tensor, *, num_experts: int, tag: int,
                     slots_per_peer: int) -> PaddedRound:
        """Send every kept (token, slot) row to the rank of its expert in fixed-size blocks.

        Every rank sends ``slots_per_peer`` (Q) rows to every rank, the rows of its kept slots first
        (sorted by expert, token order inside an expert) and unspecified rows after them, with the
        local expert index of each row (``header_slots``, an index no rank hosts, on the rest).  The
        sizes are host ints known before any kernel runs, so nothing here reads a value back: the
        exchange can be queued ahead of its inputs (the price: Q rows per rank pair whatever the
        routing).  No status, tag or format is exchanged: every rank must run the same layers with
        the same Q (``ShortcutEP`` agrees on Q once per forward).

        Args:
            x_TH: (T, H) hidden states; ids_TW: (T, W) global expert ids, ids outside [0, E) send nothing.
            num_experts: E; tag: the layer ordinal (kept for the caller).
            slots_per_peer: Q >= T * W on every rank.
        """
        T, W = ids_TW.shape
        D, Q = self.world, slots_per_peer
        if T * W > Q:
            raise ValueError(f"{T * W} routing slots do not fit the {Q} rows per rank pair of the fixed-size exchange")
        dtype_code(x_TH.dtype)
        send_NH, send_N1, dest_P = self._padded_send(x_TH, ids_TW, num_experts, Q)
        splits = [Q] * D
        local_N = self._exchange_rows(send_N1, splits, splits).view(-1)
        x_NH = self._exchange_rows(send_NH, splits, splits)
        return PaddedRound(tag, x_NH, local_N, dest_P, Q)

    def _padded_send(self, x_TH: torch.Tensor, ids_TW: torch.Tensor, E: int, Q: int):
        """The send buffers of :meth:`begin_padded`: rows (D·Q, H), local expert ids (D·Q, 1) and each
        slot's row (T·W,), −1 where it sends nothing.  On CUDA moepatch.ops' counting sort and one
        kernel that fills all three (five launches); else the torch stable sort (the same rows)."""
        T, W = ids_TW.shape
        D, M, H = self.world, self.header_slots, x_TH.shape[1]
        device = x_TH.device
        dev_E, local_E, first_D = self._placements(E, device)
        if _kernel_sort_usable(x_TH, T):
            from ..ops.experts import dispatch as sort_pairs
            from ..ops.experts import padded_send

            ids_c = ids_TW.contiguous()
            layout = sort_pairs(ids_c, E, block_m=1, fuse=False)
            send_NH = x_TH.new_empty(D * Q, H)
            send_N1 = torch.full((D * Q, 1), M, dtype=torch.long, device=device)
            dest_P = torch.empty(T * W, dtype=torch.long, device=device)
            padded_send(x_TH, ids_c, layout, dev_E, local_E, first_D, send_NH, send_N1, dest_P, Q)
            return send_NH, send_N1, dest_P
        flat_P = ids_TW.reshape(-1)
        key_P = torch.where((flat_P >= 0) & (flat_P < E), flat_P, torch.full_like(flat_P, E))
        peer_P = torch.cat([dev_E, dev_E.new_full((1,), D)])[key_P]  # rank D: nowhere
        local_P = torch.cat([local_E, local_E.new_full((1,), M)])[key_P]
        # Experts sit on ranks in contiguous blocks, so sorting by expert sorts by rank too; a slot's
        # row in the send buffer is its rank's block start plus its place among that rank's slots.
        order_P = torch.sort(key_P, stable=True).indices
        count_D1 = torch.zeros(D + 1, dtype=torch.long, device=device).scatter_add_(0, peer_P, torch.ones_like(peer_P))
        start_D1 = torch.cumsum(count_D1, 0) - count_D1
        peer_sorted = peer_P[order_P]
        dest_sorted = peer_sorted * Q + torch.arange(T * W, device=device) - start_D1[peer_sorted]
        dest_P = torch.empty_like(order_P).scatter_(0, order_P, torch.where(peer_sorted < D, dest_sorted, -1))
        # One spare row (index D·Q) takes the slots that send nothing; it is never sent.
        spare_P = torch.where(dest_P >= 0, dest_P, D * Q)
        send_NH = x_TH.new_empty(D * Q + 1, H)
        send_NH.index_copy_(0, spare_P, x_TH if W == 1 else x_TH.repeat_interleave(W, dim=0))
        send_N1 = torch.full((D * Q + 1, 1), M, dtype=torch.long, device=device)
        send_N1.index_copy_(0, spare_P, local_P[:, None])
        return send_NH[:D * Q], send_N1[:D * Q], dest_P

    def return_padded(self, y_NH: torch.Tensor, r: PaddedRound) -> torch.Tensor:
        """The reverse fixed-size exchange: (D*Q, H) rows back in the source's send layout."""
        splits = [r.slots_per_peer] * self.world
        return self._exchange_rows(y_NH.contiguous(), splits, splits)

    def abort(self, device: torch.device | str = "cpu") -> None:
        """Tell every rank that this one failed; they raise PeerFailedError at their next round.

        Only valid between rounds (``round_open`` False): the peers then wait in a header exchange.
        """
        header_DX = torch.zeros(self.world, _HEADER_FIXED + self.header_slots, dtype=torch.long, device=device)
        header_DX[:, 0] = ABORT
        self._exchange_header(header_DX)


def weigh_and_sum(y_PH: torch.Tensor, d: Dispatched, weights_TW: torch.Tensor,
                  kernel: bool | None = None) -> torch.Tensor:
    """Source side of the combine: out[t] = sum over t's kept slots, in slot order, of w * y.

    The weight multiply promotes like transformers' experts implementations (a float32 weight
    against bf16 rows multiplies in float32) and is cast back, then the kept slots are summed in
    float32 in slot order, exactly as the core's lowering does.

    ``kernel`` (default: on CUDA) uses moepatch.ops' weighted combine: one pass per token over the
    returned rows through a (token, slot) -> row map, the product rounded as above and summed in
    fp32 in slot order (one read of the rows and one write of the output, against the torch
    path's float32 products, compact (T, C, H) buffer and its float32 copy).  Same values: for
    C <= 2 bit for bit, above that up to float32 rounding of the sum order.
    """
    T, H = d.num_tokens, y_PH.shape[-1]
    if kernel is None:
        kernel = y_PH.is_cuda
    if kernel and T and y_PH.shape[0]:
        from ..ops.experts import weighted_combine

        W = weights_TW.shape[1]
        # Row of each (token, slot) among the returned rows, -1 where the slot sent nothing.
        pos_N = d.pos_P
        if pos_N is None:
            pos_N = torch.full((T * W,), -1, dtype=torch.long, device=y_PH.device)
            pos_N.index_copy_(0, d.sel_P, torch.arange(d.sel_P.shape[0], device=y_PH.device))
        return weighted_combine(y_PH.contiguous(), pos_N.view(T, W), weights_TW.contiguous(), y_PH.dtype)
    buf_TCH = y_PH.new_zeros(T, max(d.width, 1), H)
    w_P = weights_TW.reshape(-1)[d.sel_P]
    if y_PH.shape[0]:
        col_P = d.col_P
        if col_P is None:  # the kernel sort leaves it out: each kept slot's rank among its token's kept slots
            W = weights_TW.shape[1]
            kept_TW = torch.zeros(T * W, dtype=torch.long, device=y_PH.device).index_fill_(0, d.sel_P, 1).view(T, W)
            col_P = (torch.cumsum(kept_TW, dim=1) - 1).reshape(-1)[d.sel_P]
        buf_TCH[d.tok_P, col_P] = (y_PH * w_P[:, None]).to(y_PH.dtype)
    return buf_TCH.float().sum(dim=1).to(y_PH.dtype)


@dataclass
class PaddedRound:
    """One round of the fixed-size exchange (:meth:`Dispatcher.begin_padded`).

    Attributes:
        tag: the layer ordinal.
        x_NH: (D*Q, H) rows received, Q from each source in rank order; only rows whose ``local_N``
            names a local expert hold data.
        local_N: (D*Q,) int64 local expert index of every received row, ``header_slots`` on the rest.
        dest_P: (T*W,) row of every (token, slot) in the send (and returned) layout, -1 where the
            slot sends nothing.
        slots_per_peer: Q.
    """

    tag: int
    x_NH: torch.Tensor
    local_N: torch.Tensor
    dest_P: torch.Tensor
    slots_per_peer: int


def weigh_padded(back_NH: torch.Tensor, r: PaddedRound, weights_TW: torch.Tensor,
                 extra_PH: torch.Tensor | None = None, extra_P: torch.Tensor | None = None) -> torch.Tensor:
    """Source side of the fixed-size combine: out[t] = sum over t's kept slots, in slot order, of w * y.

    As :func:`weigh_and_sum`: each product is taken in the weights' precision and cast to the
    rows' dtype, the sum is float32.  ``extra_PH`` / ``extra_P``: rows computed at the source
    (LongCat's identity experts) for the slots where ``extra_P`` is True.  Rows of slots that sent
    nothing are never read (they are selected away, not multiplied by zero).
    """
    T, W = weights_TW.shape
    H = back_NH.shape[1]
    if T == 0:
        return back_NH.new_zeros(0, H)
    if back_NH.is_cuda and extra_PH is None:
        from ..ops.experts import weighted_combine

        return weighted_combine(back_NH.contiguous(), r.dest_P.view(T, W), weights_TW.contiguous(), back_NH.dtype)
    w_P = weights_TW.reshape(-1)
    kept_P = r.dest_P >= 0
    rows_PH = back_NH[r.dest_P.clamp(min=0)]  # T > 0: Q >= T * W rows came back
    prod_PH = torch.where(kept_P[:, None], (rows_PH * w_P[:, None]).to(back_NH.dtype), back_NH.new_zeros(()))
    if extra_PH is not None:
        prod_PH = torch.where(extra_P[:, None], (extra_PH * w_P[:, None]).to(back_NH.dtype), prod_PH)
    return prod_PH.view(T, W, H).float().sum(dim=1).to(back_NH.dtype)


class LocalDispatcher(Dispatcher):
    """EP = 1: every expert is local; the exchanges are the identity (no process group needed)."""

    def __init__(self, header_slots: int):
        super().__init__(0, 1, header_slots)

    def _exchange_header(self, send_DX):
        return send_DX

    def _exchange_rows(self, send_NH, send_splits, recv_splits):
        return send_NH


class AllToAllDispatcher(Dispatcher):
    """torch.distributed ``all_to_all_single`` with split sizes (NCCL on GPU, gloo on CPU).

    gloo supports ``all_to_all_single`` with unequal split sizes but not the list form
    ``all_to_all`` with unequal sizes, so only the former is used.
    """

    def __init__(self, header_slots: int, group=None):
        import torch.distributed as dist

        self._dist = dist
        self.group = group
        super().__init__(dist.get_rank(group), dist.get_world_size(group), header_slots)

    def _call(self, what, fn):
        try:
            return fn()
        except RuntimeError as exc:
            raise CollectiveError(
                f"rank {self.rank}: the {what} all_to_all failed ({exc}). A peer died, raised outside an "
                "ep_session, or is blocked elsewhere; the process-group timeout bounds the wait "
                "(docs/expert-parallel.md, 'Failure behaviour')") from exc

    def _exchange_header(self, send_DX):
        recv_DX = torch.empty_like(send_DX)
        self._call("header", lambda: self._dist.all_to_all_single(recv_DX, send_DX, group=self.group))
        return recv_DX

    def _exchange_rows(self, send_NH, send_splits, recv_splits):
        recv_NH = send_NH.new_empty(sum(recv_splits), send_NH.shape[1])
        self._call("rows", lambda: self._dist.all_to_all_single(
            recv_NH, send_NH, output_split_sizes=recv_splits, input_split_sizes=send_splits, group=self.group))
        return recv_NH
