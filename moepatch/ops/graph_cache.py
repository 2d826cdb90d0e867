"""CUDA graphs kept per call signature (route_graphs.py, expert_graphs.py, scmoe): one memory pool per cache."""

from __future__ import annotations

import contextlib
import functools
import time

import torch


def on_device(t: torch.Tensor):
    """A context making ``t``'s CUDA device current where it is not (Triton launches and graphs use the
    current device; a ``device_map`` model calls layers on several GPUs)."""
    if t.is_cuda and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


@functools.cache
def _capture_stream(index: int):
    """A side stream on GPU ``index`` to capture on (torch.cuda.graph's default one lives on the first device used)."""
    return torch.cuda.Stream(device=index)


def wall(fn, reps: int = 3) -> float:
    """Seconds per call of ``fn`` called back to back (one-off, at capture time; syncs the device)."""
    fn()
    torch.cuda.synchronize()  # NOTE: host sync, once per signature
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps


class GraphCache:
    """Signature -> calls seen (int), a captured graph (has ``replay(inputs)``), or False (eager kept)."""

    def __init__(self, max_graphs: int):
        self.entries: dict = {}
        self.max_graphs = max_graphs
        self._pool = None

    def clear(self) -> None:
        """Forget every graph (frees their static buffers; the pool goes with the last one)."""
        self.entries.clear()
        self._pool = None

    def recording(self, graph: torch.cuda.CUDAGraph, device: torch.device):
        """The context that captures ``graph`` for tensors on ``device``: this cache's pool, a stream there."""
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        index = device.index if device.index is not None else torch.cuda.current_device()
        return torch.cuda.graph(graph, pool=self._pool, stream=_capture_stream(index))

    def captured(self, cls) -> int:
        return sum(isinstance(v, cls) for v in self.entries.values())

    def call(self, key, inputs, eager, capture, *, warmup_calls: int, wall):
        """``eager()`` until ``key`` was seen ``warmup_calls`` times, then the replay of ``capture()``'s graph with
        ``inputs``, kept only where it beat the eager call (``wall``); a capture raising RuntimeError stays eager."""
        entry = self.entries.get(key, 0)
        if entry is not False and not isinstance(entry, int):
            return entry.replay(inputs)
        if entry is False:
            return eager()
        # A new signature takes a slot only while the cache has room; one already counted keeps its own.
        if key not in self.entries and len(self.entries) >= self.max_graphs:
            return eager()
        if entry < warmup_calls:
            self.entries[key] = entry + 1
            return eager()
        try:
            graph = capture()
        except RuntimeError:
            self.entries[key] = False
            return eager()
        if wall(lambda: graph.replay(inputs)) >= wall(eager):
            self.entries[key] = False
            return eager()
        self.entries[key] = graph
        return graph.replay(inputs)
