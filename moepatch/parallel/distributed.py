"""Process-group setup for expert parallelism with a bounded timeout: a failed peer's collectives
raise (gloo) or end the process (NCCL's watchdog) within it; docs/expert-parallel.md, "Failure behaviour".
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 300.0
TIMEOUT_ENV = "MOEPATCH_EP_TIMEOUT_S"
PRIORITY_ENV = "MOEPATCH_NCCL_HIGH_PRIORITY"


def default_timeout_s() -> float:
    """``$MOEPATCH_EP_TIMEOUT_S`` or 300 s: room for the first NCCL all-to-all and a slow rank's
    large prefill, short enough that a dead peer ends a job in minutes."""
    return float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))


def default_high_priority() -> bool:
    """``$MOEPATCH_NCCL_HIGH_PRIORITY`` (``0`` turns it off) or True."""
    value = os.environ.get(PRIORITY_ENV, "1").strip().lower()
    if value not in ("0", "1", "true", "false", "yes", "no", "on", "off"):
        raise ValueError(f"${PRIORITY_ENV}={value!r}; accepted: 1/0, true/false, yes/no, on/off")
    return value in ("1", "true", "yes", "on")


def _group_args(timeout_s: float | None, high_priority: bool | None = None) -> dict:
    """``timeout`` and, given ``high_priority``, NCCL ``pg_options`` with high (or default) stream priority:
    at default priority an all-to-all meant to overlap a long GEMM (ScMoE) gets SMs only as its blocks drain."""
    timeout = datetime.timedelta(seconds=timeout_s if timeout_s is not None else default_timeout_s())
    if high_priority is None:
        return {"timeout": timeout}
    opts = dist.ProcessGroupNCCL.Options()
    opts.is_high_priority_stream = bool(high_priority)
    opts._timeout = timeout  # the same as the group's (torch warns when they differ)
    return {"timeout": timeout, "pg_options": opts}


def new_group_with_priority(high_priority: bool, timeout_s: float | None = None):
    """A group over every rank of the default group with this NCCL stream priority (under gloo the
    default group itself).  A collective."""
    if dist.get_backend() != "nccl":
        return dist.group.WORLD
    return dist.new_group(**_group_args(timeout_s, high_priority))


def init_distributed(backend: str | None = None, timeout_s: float | None = None,
                     high_priority: bool | None = None) -> tuple[int, int, torch.device]:
    """Initialise the default process group from the launcher's environment (torchrun / accelerate), NCCL
    when CUDA is available, else gloo; ``timeout_s`` per collective (:func:`default_timeout_s`); ``high_priority``:
    NCCL's kernels on high-priority streams (:func:`default_high_priority`; a group initialised elsewhere keeps
    its own).  Returns (rank, world size, device: ``cuda:LOCAL_RANK`` under NCCL, else ``cpu``)."""
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if backend == "nccl" else torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(device)
    if not dist.is_initialized() and backend != "nccl":
        dist.init_process_group(backend=backend, **_group_args(timeout_s))
    elif not dist.is_initialized():
        hp = default_high_priority() if high_priority is None else high_priority
        dist.init_process_group(backend=backend, device_id=device, **_group_args(timeout_s, hp))
    return dist.get_rank(), dist.get_world_size(), device


def all_gather_floats(values: list[float], device: torch.device) -> list[list[float]]:
    """Every rank's ``values`` (the same length on every rank) in rank order, as float64; a collective."""
    mine = torch.tensor(values, dtype=torch.float64, device=device)
    parts = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, mine)
    return [p.tolist() for p in parts]


def shutdown() -> None:
    """Destroy the default process group (the end of a launched command)."""
    dist.destroy_process_group()
