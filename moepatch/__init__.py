"""moepatch: capacity-aware routing for Hugging Face Mixture-of-Experts models, patched in place.

    import moepatch
    handle = moepatch.apply(model, capacity_factor=1.5)          # token drop, score policy
    print(moepatch.stats(model).table())
    moepatch.remove(model)                                        # exactly the original model
"""

from .errors import InvalidOptionError, ModelStateError, MoePatchError, UnsupportedModelError
from .patch import PatchHandle, apply, is_patched, patched, remove, reset_stats, stats, supported_model_types
from .patch.backend import register_backend
from .routing import LoadStats, RoutingConfig


def _ep_backend():
    from .parallel.ep import BACKEND

    return BACKEND


# Expert parallelism lives above the patch core (it needs torch.distributed); the core finds it here.
register_backend("ep", _ep_backend)

__version__ = "0.1.0"

__all__ = [
    "InvalidOptionError", "LoadStats", "ModelStateError", "MoePatchError", "PatchHandle", "RoutingConfig",
    "UnsupportedModelError", "apply", "is_patched", "patched", "remove", "reset_stats", "stats",
    "supported_model_types",
]
