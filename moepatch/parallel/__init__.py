"""Expert parallelism: dispatch/combine over torch.distributed with capacity applied per source rank.

    rank, world, device = moepatch.parallel.init_distributed()
    model = moepatch.parallel.load_expert_parallel(ckpt_dir, rank, world, device=device)
    moepatch.apply(model, capacity_factor=1.5, expert_parallel=True)
    with moepatch.parallel.ep_session(model):
        for batch in my_share_of_the_data:
            model(**batch)

Model code never imports torch.distributed: only this package does.  See docs/expert-parallel.md.
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
