"""Process-group setup for expert parallelism with a bounded timeout.

Every collective of a failed peer returns or raises within the process-group timeout instead of
waiting forever: gloo raises in the calling thread; NCCL's watchdog aborts the communicator and
ends the process (``TORCH_NCCL_ASYNC_ERROR_HANDLING``, on by default).  Ranks that fail inside an
``ep_session`` tell the others at once, so the timeout only matters for crashes and for ranks
blocked outside moepatch's collectives.
"""

from __future__ import annotations

import datetime
import os

import torch

DEFAULT_TIMEOUT_S = 300.0
TIMEOUT_ENV = "MOEPATCH_EP_TIMEOUT_S"
PRIORITY_ENV = "MOEPATCH_NCCL_HIGH_PRIORITY"


def default_timeout_s() -> float:
    """``$MOEPATCH_EP_TIMEOUT_S`` or 300 s: long enough for the first NCCL all-to-all and a slow
    rank's large prefill, short enough that a dead peer ends a job in minutes."""
    return float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))


def _timeout(timeout_s: float | None) -> datetime.timedelta:
    return datetime.timedelta(seconds=timeout_s if timeout_s is not None else default_timeout_s())


def default_high_priority() -> bool:
    """``$MOEPATCH_NCCL_HIGH_PRIORITY`` (``0`` turns it off) or True."""
    value = os.environ.get(PRIORITY_ENV, "1").strip().lower()
    if value not in ("0", "1", "true", "false", "yes", "no", "on", "off"):
        raise ValueError(f"${PRIORITY_ENV}={value!r}; accepted: 1/0, true/false, yes/no, on/off")
    return value in ("1", "true", "yes", "on")


def nccl_options(high_priority: bool, timeout: datetime.timedelta | None = None):
    """``ProcessGroupNCCL.Options`` whose communication streams have high (or default) CUDA priority.

    NCCL's kernels run on streams of NCCL's own; with the default priority a kernel queued beside a
    long GEMM gets SMs only when that GEMM's blocks drain, so an all-to-all meant to overlap compute
    (ScMoE's schedule) waits behind it.  High priority lets its blocks go first as SMs free up."""
    import torch.distributed as dist

    opts = dist.ProcessGroupNCCL.Options()
    opts.is_high_priority_stream = bool(high_priority)
    if timeout is not None:  # the same as the group's (torch warns when they differ)
        opts._timeout = timeout
    return opts


def new_group_with_priority(high_priority: bool, timeout_s: float | None = None):
    """A process group over every rank of the default group with the given NCCL stream priority
    (the default group itself under gloo, where streams do not apply).  A collective."""
    import torch.distributed as dist

    if dist.get_backend() != "nccl":
        return dist.group.WORLD
    timeout = _timeout(timeout_s)
    return dist.new_group(timeout=timeout, pg_options=nccl_options(high_priority, timeout))


def init_distributed(backend: str | None = None, timeout_s: float | None = None,
                     high_priority: bool | None = None) -> tuple[int, int, torch.device]:
    """Initialise the default process group from the launcher's environment (torchrun / accelerate).

    Args:
        backend: ``"nccl"`` or ``"gloo"``; default NCCL when CUDA is available, else gloo.
        timeout_s: per-collective timeout; default :func:`default_timeout_s`.
        high_priority: NCCL only: run NCCL's kernels on high-priority CUDA streams (default
            :func:`default_high_priority`, on), so an exchange meant to overlap compute is not
            queued behind it.  A group initialised elsewhere (accelerate) keeps its own setting.
    Returns:
        (rank, world size, this rank's device: ``cuda:LOCAL_RANK`` under NCCL, else ``cpu``).
    """
    import torch.distributed as dist

    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        timeout = _timeout(timeout_s)
        kwargs = {}
        if backend == "nccl":
            hp = default_high_priority() if high_priority is None else high_priority
            kwargs = {"device_id": device, "pg_options": nccl_options(hp, timeout)}
        dist.init_process_group(backend=backend, timeout=timeout, **kwargs)
    return dist.get_rank(), dist.get_world_size(), device


def all_gather_floats(values: list[float], device: torch.device) -> list[list[float]]:
    """Every rank's ``values`` (the same length on every rank) in rank order, as float64; a collective."""
    import torch.distributed as dist

    mine = torch.tensor(values, dtype=torch.float64, device=device)
    parts = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, mine)
    return [p.tolist() for p in parts]


def shutdown() -> None:
    """Destroy the default process group (the end of a launched command)."""
    import torch.distributed as dist

    dist.destroy_process_group()
