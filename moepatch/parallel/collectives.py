"""Collectives of the overlapped ScMoE schedule (moepatch.scmoe.schedule) beyond one dispatch
round: row exchanges left in flight, an element-wise max over the ranks, a barrier, the group size.

Legend: N rows, H hidden.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .dispatch import HEADER_FIXED, AllToAllDispatcher


def world_size(group=None) -> int:
    """Ranks of ``group`` (default: the default group); 1 without an initialised process group."""
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


class AsyncAllToAllDispatcher(AllToAllDispatcher):
    """moepatch.parallel's all-to-all dispatcher whose row exchanges can be left in flight.

    Inside :meth:`in_flight`, the rows' ``all_to_all_single`` is issued with ``async_op=True`` and
    the receive buffer returned at once; :meth:`take_pending` hands over the work handles, and the
    buffer may be read only after :meth:`PendingRows.wait`.  Outside it, the plain dispatcher.
    """

    def __init__(self, header_slots: int, group=None):
        super().__init__(header_slots, group)
        self._async = False
        self._pending: PendingRows | None = None

    @contextlib.contextmanager
    def in_flight(self):
        self._async = True
        try:
            yield
        finally:
            self._async = False

    def _exchange_rows(self, send_NH, send_splits, recv_splits):
        if not self._async:
            return super()._exchange_rows(send_NH, send_splits, recv_splits)
        recv_NH = send_NH.new_empty(sum(recv_splits), send_NH.shape[1])
        work = self._call("rows", lambda: self._dist.all_to_all_single(
            recv_NH, send_NH, output_split_sizes=recv_splits, input_split_sizes=send_splits, group=self.group,
            async_op=True))
        # The send buffer must outlive the exchange: the pending handle keeps it.  Exchanges issued
        # before the handle is taken join it (the fixed-size dispatch sends ids, then rows).
        if self._pending is None:
            self._pending = PendingRows(self, [work], [send_NH])
        else:
            self._pending.works.append(work)
            self._pending.keep.append(send_NH)
        return recv_NH

    def take_pending(self) -> PendingRows | None:
        pending, self._pending = self._pending, None
        return pending

    def wait_work(self, work) -> None:
        self._call("rows", work.wait)

    def reduce_max(self, values: list[float]) -> list[float]:
        """Element-wise max over the ranks (so every rank picks the same slots)."""
        device = "cuda" if self._dist.get_backend(self.group) == "nccl" else "cpu"
        t = torch.tensor(values, dtype=torch.float64, device=device)
        self._call("timing", lambda: self._dist.all_reduce(t, op=self._dist.ReduceOp.MAX, group=self.group))
        return t.tolist()

    def barrier(self) -> None:
        self._dist.barrier(group=self.group)

    def blank_header(self, device: torch.device) -> torch.Tensor:
        """A header of the size a dispatch sends, for timing the exchange alone."""
        return torch.zeros(self.world, HEADER_FIXED + self.header_slots, dtype=torch.long, device=device)

    def exchange_header(self, header_DX: torch.Tensor) -> torch.Tensor:
        return self._exchange_header(header_DX)

    def exchange_rows(self, send_NH: torch.Tensor, send_splits: list, recv_splits: list) -> torch.Tensor:
        """One rows exchange with these split sizes (synchronous outside :meth:`in_flight`)."""
        return self._exchange_rows(send_NH, send_splits, recv_splits)


@dataclass
class PendingRows:
    """All-to-alls of rows in flight (issued in this order) and the send buffers they read."""

    dispatcher: AsyncAllToAllDispatcher
    works: list
    keep: list

    def wait(self) -> None:
        """Host-blocking on gloo; on NCCL the current stream waits, the host does not."""
        works, self.works = self.works, []
        for work in works:
            self.dispatcher.wait_work(work)
        self.keep = []
