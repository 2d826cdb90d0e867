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


def default_timeout_s() -> float:
    """``$MOEPATCH_EP_TIMEOUT_S`` or 300 s: long enough for the first NCCL all-to-all and a slow
    rank's large prefill, short enough that a dead peer ends a job in minutes."""
    return float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))


def init_distributed(backend: str | None = None, timeout_s: float | None = None) -> tuple[int, int, torch.device]:
    """Initialise the default process group from the launcher's environment (torchrun / accelerate).

    Args:
        backend: ``"nccl"`` or ``"gloo"``; default NCCL when CUDA is available, else gloo.
        timeout_s: per-collective timeout; default :func:`default_timeout_s`.
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
        timeout = datetime.timedelta(seconds=timeout_s if timeout_s is not None else default_timeout_s())
        kwargs = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(backend=backend, timeout=timeout, **kwargs)
    return dist.get_rank(), dist.get_world_size(), device
