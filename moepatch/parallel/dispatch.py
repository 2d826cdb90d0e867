"""Dispatch and combine for expert parallelism: the only module that calls collectives for MoE layers.
A round (one MoE layer call on every rank): the header all-to-all (int64 ``[status, tag, dtype, H, counts...]``),
the rows, the caller's local experts, the rows back; docs/expert-parallel.md.  Legend: T tokens, W slots per
token, H hidden, E experts, D ranks, M header slots, P sent rows, R received rows, C combine width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..routing.capacity import expert_devices
from .errors import CollectiveError, PeerFailedError, ProtocolError

ACTIVE, IDLE, ABORT = 1, 0, -1
# The header carries the sender's hidden dtype so an idle rank can allocate its receive buffer.
_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
HEADER_FIXED = 4  # status, tag, dtype code, hidden size


def local_range(num_experts: int, world: int, rank: int) -> tuple[int, int]:
    """[first, stop) of this rank's experts, as ``moepatch.routing.capacity.expert_devices`` places them."""
    base, extra = divmod(num_experts, world)
    first = rank * base + min(rank, extra)
    return first, first + base + (1 if rank < extra else 0)


def dtype_code(dtype: torch.dtype) -> int:
    if dtype not in _DTYPES:
        raise TypeError(f"expert parallelism sends {dtype} hidden states, which it does not support; "
                        f"accepted: {', '.join(map(str, _DTYPES))}")
    return _DTYPES.index(dtype)


@dataclass
class Dispatched:
    """One agreed round. ``x_RH``: rows received, by source then local expert; ``tok_P`` / ``col_P`` /
    ``sel_P``: token, combine column (None after the kernel sort) and flat slot of each sent row; ``pos_P``:
    (T*W,) row of each slot, -1 unsent (kernel sort only); ``width``: C; ``invalid_pairs``: ids outside [0, E]."""

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


def _sort_kernels(kernel_sort: bool | None, x_TH: torch.Tensor, num_tokens: int):
    """``moepatch.ops.experts`` where its counting sort applies (it needs triton), else None."""
    if num_tokens == 0 or kernel_sort is False or (kernel_sort is None and not x_TH.is_cuda):
        return None
    try:
        from ..ops import experts
    except ImportError:
        return None
    return experts


def _expert_order(ids_TW: torch.Tensor, E: int):
    """(flat ids, kept mask, sort key, stable sort by expert) of the slots; empty and invalid ones sort last."""
    flat_P = ids_TW.reshape(-1)
    kept_P = (flat_P >= 0) & (flat_P < E)
    key_P = torch.where(kept_P, flat_P, torch.full_like(flat_P, E))
    return flat_P, kept_P, key_P, torch.sort(key_P, stable=True).indices


class _HostValues:
    """int64 1-D tensors on their way to the host: non-blocking copies into one pinned buffer on CUDA."""

    def __init__(self, parts: list[torch.Tensor]):
        if parts[0].is_cuda:
            self._host = torch.empty(sum(t.numel() for t in parts), dtype=torch.long, pin_memory=True)
            for dst, t in zip(self._host.split([t.numel() for t in parts]), parts):
                dst.copy_(t, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host, self._event = torch.cat(parts), None

    def ready(self) -> bool:  # never blocks
        return self._event is None or self._event.query()

    def result(self) -> list:
        if self._event is not None:
            self._event.synchronize()  # NOTE: host sync (the header), waits for this copy only
        return self._host.tolist()


@dataclass
class HeaderInFlight:
    """A round between :meth:`Dispatcher.begin` and :meth:`Dispatcher.complete`."""

    values: _HostValues
    order_P: torch.Tensor
    tok_P: torch.Tensor
    col_P: torch.Tensor | None
    rows_PH: torch.Tensor | None
    num_tokens: int
    width: int | None = None  # known on the host (the kernel sort's bound W); else among the values
    pos_P: torch.Tensor | None = None


class Dispatcher:
    """dispatch/combine over D ranks; subclasses provide ``_exchange_header`` and ``_exchange_rows``.
    ``header_slots``: M, at least the most experts a rank hosts; ``kernel_sort``: sort with moepatch.ops'
    kernels (True), the torch stable sort (False) or the kernels on CUDA only (None)."""

    def __init__(self, rank: int, world: int, header_slots: int, *, kernel_sort: bool | None = None):
        self.rank, self.world, self.header_slots = rank, world, header_slots
        self.kernel_sort = kernel_sort
        self._placement: dict = {}
        self._fixed: dict = {}  # header values in front of the counts, on the device, per layer call kind
        self.round_open = False  # from this rank's header until its rows came back: no abort may be sent

    def placement(self, num_experts: int, device: torch.device) -> tuple[torch.Tensor, ...]:
        """(rank of each expert, index of the expert on its rank), both (E,), and each rank's first expert
        (D,); int64 on ``device``."""
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
        """The global ids of the experts this rank hosts (``range(0)`` when none)."""
        return range(*local_range(num_experts, self.world, self.rank)) or range(0)

    def dispatch(self, x_TH: torch.Tensor, ids_TW: torch.Tensor, *, num_experts: int, tag: int,
                 status: int = ACTIVE) -> Dispatched | None:
        """Send every kept (token, slot) row of x_TH (T, H), T may be 0, to the rank of its expert (ids_TW:
        (T, W) int64 global ids, E on empty slots; tag: the layer ordinal; status: ACTIVE, or IDLE when only
        serving).  The agreed round, None when every rank is IDLE; raises PeerFailedError (a rank sent ABORT),
        ProtocolError (the active ranks disagree), CollectiveError (the transport failed)."""
        return self.complete(self.begin(x_TH, ids_TW, num_experts=num_experts, tag=tag, status=status))

    def begin(self, x_TH: torch.Tensor, ids_TW: torch.Tensor, *, num_experts: int, tag: int,
              status: int = ACTIVE) -> HeaderInFlight:
        """Sort the slots by expert, gather their rows, exchange the header and start its copy to the host;
        nothing here blocks the host on CUDA, so a caller can queue other work before :meth:`complete`."""
        T, W = ids_TW.shape
        device = x_TH.device
        E, D, M = num_experts, self.world, self.header_slots
        dev_E, local_E, _ = self.placement(E, device)
        key = (status, tag, dtype_code(x_TH.dtype), x_TH.shape[1], str(device))
        if key not in self._fixed:  # through pinned memory: a pageable copy would wait for the stream
            t = torch.tensor(list(key[:4]), dtype=torch.long)
            self._fixed[key] = t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t
        fixed = self._fixed[key]
        X = _sort_kernels(self.kernel_sort, x_TH, T)
        if X is not None:
            # Counting sort, header and row metadata, row gather: five launches instead of ~35 small torch ops.
            layout = X.dispatch(ids_TW, E, block_m=1, fuse=False)
            header_DX, meta, order_P, tok_P, pos_P = X.ep_prepare(ids_TW, layout, dev_E, local_E, fixed, D, M)
            rows_PH = X.gather_rows(x_TH, layout) if status == ACTIVE else None
            self.round_open = True
            recv_DX = self._exchange_header(header_DX)
            # col_P is derived from sel_P by the torch combine; W bounds the width.
            return HeaderInFlight(_HostValues([meta, recv_DX.reshape(-1)]), order_P, tok_P, None, rows_PH, T,
                                  width=W, pos_P=pos_P)
        # Sorting by expert groups the rows by destination rank (contiguous blocks) and, stably,
        # keeps token order inside an expert; empty and invalid slots sort last and are cut off.
        flat_P, kept_P, key_P, order_P = _expert_order(ids_TW, E)
        invalid = ((flat_P < 0) | (flat_P > E)).sum()
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
        header_DX = torch.cat([fixed.expand(D, HEADER_FIXED), send_DM], dim=1).contiguous()
        # Token and row of every slot before the header's host sync: after it only the row exchange is left.
        tok_P = torch.div(order_P, W, rounding_mode="floor")
        rows_PH = x_TH[tok_P] if status == ACTIVE else None
        self.round_open = True
        recv_DX = self._exchange_header(header_DX)
        meta = torch.cat([send_DM.sum(1), torch.stack([invalid, width])])
        return HeaderInFlight(_HostValues([meta, recv_DX.reshape(-1)]), order_P, tok_P, col_P, rows_PH, T)

    def complete(self, h: HeaderInFlight) -> Dispatched | None:
        """Read the header (the one host sync), check it, send the rows."""
        D, M = self.world, self.header_slots
        # NOTE: host sync: split sizes must be known on the host; one transfer for everything.
        host = h.values.result()
        # [pairs per destination rank (D), invalid slots, (width when not known here), the received headers]
        send_splits, invalid = host[:D], host[D]
        width, off = (h.width, D + 1) if h.width is not None else (host[D + 1], D + 2)
        recv = [host[off + s * (HEADER_FIXED + M): off + (s + 1) * (HEADER_FIXED + M)] for s in range(D)]

        aborted = [s for s, r in enumerate(recv) if r[0] == ABORT and s != self.rank]
        active = [s for s, r in enumerate(recv) if r[0] == ACTIVE]
        if aborted or not active:
            self.round_open = False  # every rank takes the same decision here: the round ends
            if aborted:
                raise PeerFailedError(f"rank {self.rank}: rank(s) {aborted} raised and aborted the expert-parallel "
                                      "session (their log has the cause); this rank stops too")
            return None
        if len({tuple(recv[s][1:HEADER_FIXED]) for s in active}) > 1:  # tag, dtype, hidden size
            self.round_open = False
            desc = ", ".join(f"rank {s}: layer {recv[s][1]} {_DTYPES[recv[s][2]]} H={recv[s][3]}" for s in active)
            raise ProtocolError(f"rank {self.rank}: the active ranks run different MoE layers ({desc}); every rank "
                                "must run the same model and call its MoE layers in the same order")
        agreed_tag, code, hidden = recv[active[0]][1:HEADER_FIXED]
        counts_SM = [r[HEADER_FIXED:] for r in recv]
        recv_splits = [sum(c) for c in counts_SM]

        P = sum(send_splits)
        send_NH = h.rows_PH[:P] if h.rows_PH is not None else torch.empty(0, hidden, dtype=_DTYPES[code],
                                                                          device=h.order_P.device)
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
        """Return the rows (R, H), weigh them with ``weights_TW`` (T, W), sum each token's: (T, H)."""
        return weigh_and_sum(self.return_rows(y_RH, d), d, weights_TW)

    def begin_padded(self, x_TH: torch.Tensor, ids_TW: torch.Tensor, *, num_experts: int, tag: int,
                     slots_per_peer: int) -> PaddedRound:
        """Send every kept (token, slot) row to its expert's rank in fixed-size blocks of Q >= T * W rows
        (``slots_per_peer``), kept rows first, each with its local expert (``header_slots`` on unused rows).
        No header and no host read: every rank runs the same layers with the same Q."""
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
        """Rows (D·Q, H), local ids (D·Q, 1) and each slot's row (T·W,), −1 unsent, for :meth:`begin_padded`."""
        T, W = ids_TW.shape
        D, M, H = self.world, self.header_slots, x_TH.shape[1]
        device = x_TH.device
        dev_E, local_E, first_D = self.placement(E, device)
        X = _sort_kernels(self.kernel_sort, x_TH, T)
        if X is not None:
            ids_c = ids_TW.contiguous()
            layout = X.dispatch(ids_c, E, block_m=1, fuse=False)
            send_NH = x_TH.new_empty(D * Q, H)
            send_N1 = torch.full((D * Q, 1), M, dtype=torch.long, device=device)
            dest_P = torch.empty(T * W, dtype=torch.long, device=device)
            X.padded_send(x_TH, ids_c, layout, dev_E, local_E, first_D, send_NH, send_N1, dest_P, Q)
            return send_NH, send_N1, dest_P
        # Experts sit on ranks in contiguous blocks, so sorting by expert sorts by rank too; a slot's
        # row in the send buffer is its rank's block start plus its place among that rank's slots.
        _, _, key_P, order_P = _expert_order(ids_TW, E)
        peer_P = torch.cat([dev_E, dev_E.new_full((1,), D)])[key_P]  # rank D: nowhere
        local_P = torch.cat([local_E, local_E.new_full((1,), M)])[key_P]
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

    def blank_header(self, device: torch.device | str) -> torch.Tensor:
        """A zero header of the size a dispatch sends (ScMoE times the exchange alone with it)."""
        return torch.zeros(self.world, HEADER_FIXED + self.header_slots, dtype=torch.long, device=device)

    def abort(self, device: torch.device | str = "cpu") -> None:
        """Tell every rank that this one failed (PeerFailedError at their next round); only between
        rounds (``round_open`` False), when the peers wait in a header exchange."""
        header_DX = self.blank_header(device)
        header_DX[:, 0] = ABORT
        self._exchange_header(header_DX)


def weigh_and_sum(y_PH: torch.Tensor, d: Dispatched, weights_TW: torch.Tensor,
                  kernel: bool | None = None) -> torch.Tensor:
    """Source side of the combine: out[t] = sum over t's kept slots, in slot order, of w * y (P, H); the
    product cast to the rows' dtype, the sum in float32, as the core's lowering.  ``kernel`` (default: on
    CUDA): moepatch.ops' weighted combine, bit for bit for C <= 2, else up to the float32 sum order."""
    T, W, H = d.num_tokens, weights_TW.shape[1], y_PH.shape[-1]
    if (y_PH.is_cuda if kernel is None else kernel) and T and y_PH.shape[0]:
        from ..ops.experts import weighted_combine

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
            kept_TW = torch.zeros(T * W, dtype=torch.long, device=y_PH.device).index_fill_(0, d.sel_P, 1).view(T, W)
            col_P = (torch.cumsum(kept_TW, dim=1) - 1).reshape(-1)[d.sel_P]
        buf_TCH[d.tok_P, col_P] = (y_PH * w_P[:, None]).to(y_PH.dtype)
    return buf_TCH.float().sum(dim=1).to(y_PH.dtype)


@dataclass
class PaddedRound:
    """One fixed-size round: ``x_NH`` (D*Q, H) rows received, Q per source; ``local_N`` (D*Q,) their local
    expert (``header_slots``: no data); ``dest_P`` (T*W,) each slot's row in the send layout, -1 unsent."""

    tag: int
    x_NH: torch.Tensor
    local_N: torch.Tensor
    dest_P: torch.Tensor
    slots_per_peer: int


def weigh_padded(back_NH: torch.Tensor, r: PaddedRound, weights_TW: torch.Tensor,
                 extra_PH: torch.Tensor | None = None, extra_P: torch.Tensor | None = None) -> torch.Tensor:
    """Source side of the fixed-size combine, as :func:`weigh_and_sum`; ``extra_PH`` (rows computed at the
    source, LongCat's identity experts) where ``extra_P``.  Unsent rows are selected away, never times zero."""
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

    def __init__(self, header_slots: int, *, kernel_sort: bool | None = None):
        super().__init__(0, 1, header_slots, kernel_sort=kernel_sort)

    def _exchange_header(self, send_DX):
        return send_DX

    def _exchange_rows(self, send_NH, send_splits, recv_splits):
        return send_NH


class AllToAllDispatcher(Dispatcher):
    """``all_to_all_single`` with split sizes (gloo has no list ``all_to_all`` with unequal sizes)."""

    def __init__(self, header_slots: int, group=None, *, kernel_sort: bool | None = None):
        self.group = group
        super().__init__(dist.get_rank(group), dist.get_world_size(group), header_slots, kernel_sort=kernel_sort)

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
        self._call("header", lambda: dist.all_to_all_single(recv_DX, send_DX, group=self.group))
        return recv_DX

    def _rows_all_to_all(self, send_NH, send_splits, recv_splits, async_op=False):
        recv_NH = send_NH.new_empty(sum(recv_splits), send_NH.shape[1])
        work = self._call("rows", lambda: dist.all_to_all_single(
            recv_NH, send_NH, output_split_sizes=recv_splits, input_split_sizes=send_splits, group=self.group,
            async_op=async_op))
        return recv_NH, work

    def _exchange_rows(self, send_NH, send_splits, recv_splits):
        return self._rows_all_to_all(send_NH, send_splits, recv_splits)[0]
