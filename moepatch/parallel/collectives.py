"""Collectives of the overlapped ScMoE schedule (moepatch.scmoe.schedule) beyond one dispatch round:
row exchanges left in flight, an element-wise max over the ranks, a barrier, the group size.  N rows, H hidden.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .dispatch import AllToAllDispatcher


def world_size(group=None) -> int:
    """Ranks of ``group`` (default: the default group); 1 without an initialised process group."""
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


class AsyncAllToAllDispatcher(AllToAllDispatcher):
    """The all-to-all dispatcher whose row exchanges, inside :meth:`in_flight`, are issued with ``async_op=True``:
    the receive buffer comes back at once and may be read only after ``take_pending().wait()``."""

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
        recv_NH, work = self._rows_all_to_all(send_NH, send_splits, recv_splits, async_op=True)
        # The handle keeps the send buffer alive; exchanges before it is taken join it (ids, then rows).
        if self._pending is None:
            self._pending = PendingRows(self, [], [])
        self._pending.works.append(work)
        self._pending.keep.append(send_NH)
        return recv_NH

    exchange_header = AllToAllDispatcher._exchange_header
    exchange_rows = _exchange_rows  # one rows exchange (synchronous outside in_flight)

    def take_pending(self) -> PendingRows | None:
        pending, self._pending = self._pending, None
        return pending

    def reduce_max(self, values: list[float]) -> list[float]:
        """Element-wise max over the ranks (so every rank picks the same slots)."""
        device = "cuda" if dist.get_backend(self.group) == "nccl" else "cpu"
        t = torch.tensor(values, dtype=torch.float64, device=device)
        self._call("timing", lambda: dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group))
        return t.tolist()

    def barrier(self) -> None:
        dist.barrier(group=self.group)


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
            self.dispatcher._call("rows", work.wait)
        self.keep = []
