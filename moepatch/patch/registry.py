"""Supported model families, keyed by ``config.model_type``."""

from __future__ import annotations

import torch

from ..errors import UnsupportedModelError
from . import deepseek, longcat, mixtral, olmoe, qwen_moe
from .spec import FamilySpec

_FAMILIES = {s.model_type: s for s in (mixtral.SPEC, olmoe.SPEC, *qwen_moe.SPECS, *deepseek.SPECS, longcat.SPEC)}


def supported_model_types() -> tuple[str, ...]:
    return tuple(sorted(_FAMILIES))


def family_for(model: torch.nn.Module) -> FamilySpec:
    """The family of a loaded transformers model; UnsupportedModelError when it has none."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in _FAMILIES:
        what = f"model_type {model_type!r}" if model_type else f"{type(model).__name__} (no transformers config)"
        raise UnsupportedModelError(
            f"moepatch cannot patch {what}; supported model types: {', '.join(sorted(_FAMILIES))}")
    return _FAMILIES[model_type]


def moe_blocks(model: torch.nn.Module, spec: FamilySpec) -> list[tuple[str, torch.nn.Module]]:
    """(qualified name, block) of every MoE block of ``spec`` in ``model``, in module order."""
    return [(name, m) for name, m in model.named_modules() if type(m).__name__ in spec.block_classes]
