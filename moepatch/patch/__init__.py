"""Model-family patches: a registry keyed by ``config.model_type`` and the hooks that apply routing."""

from .core import PatchHandle, apply, is_patched, patched, remove, reset_stats, stats
from .registry import supported_model_types
from .spec import FamilySpec

__all__ = ["FamilySpec", "PatchHandle", "apply", "is_patched", "patched", "remove", "reset_stats", "stats",
           "supported_model_types"]
