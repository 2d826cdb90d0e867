"""Expert parallelism: dispatch/combine over torch.distributed with capacity applied per source rank
(usage: docs/expert-parallel.md).  Model code never imports torch.distributed: only this package does.
"""

from .dispatch import AllToAllDispatcher, Dispatcher, LocalDispatcher
from .distributed import default_timeout_s, init_distributed
from .ep import EXPERTS_IMPLEMENTATION, ep_barrier_loop, ep_session, finish, install, set_phase_timer
from .errors import CollectiveError, ExpertParallelError, PeerFailedError, ProtocolError
from .loading import build_random_expert_parallel, load_expert_parallel

__all__ = [
    "EXPERTS_IMPLEMENTATION", "AllToAllDispatcher", "CollectiveError", "Dispatcher", "ExpertParallelError",
    "LocalDispatcher", "PeerFailedError", "ProtocolError", "build_random_expert_parallel", "default_timeout_s",
    "ep_barrier_loop", "ep_session", "finish", "init_distributed", "install", "load_expert_parallel",
    "set_phase_timer",
]
