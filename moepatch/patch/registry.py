"""Supported model families, keyed by ``config.model_type``.

A family tells moepatch which modules are its MoE blocks and how its router scores and weighs
experts.  Every block has a ``gate`` (the router: ``forward(x) -> (logits, weights, ids)``) and
``experts`` (transformers' fused experts module behind the ``ExpertsInterface`` registry).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import UnsupportedModelError
from ..routing.scores import FamilyScoring


@dataclass(frozen=True)
class FamilySpec:
    """How to patch one model family.

    Attributes:
        model_type: ``config.model_type``.
        block_classes: class names of the family's sparse MoE blocks (stable across transformers 5.x).
        scoring: builds the family's :class:`FamilyScoring` from a block's router module.
    """

    model_type: str
    block_classes: tuple[str, ...]
    scoring: Callable[[torch.nn.Module], FamilyScoring]


def _families() -> dict[str, FamilySpec]:
    from . import deepseek, mixtral, olmoe, qwen_moe

    specs = (mixtral.SPEC, olmoe.SPEC, *qwen_moe.SPECS, *deepseek.SPECS)
    return {s.model_type: s for s in specs}


def supported_model_types() -> tuple[str, ...]:
    return tuple(sorted(_families()))


def family_for(model: torch.nn.Module) -> FamilySpec:
    """The family of a loaded transformers model.

    Raises:
        UnsupportedModelError: the model has no config or its model_type is not supported.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    families = _families()
    if model_type not in families:
        what = f"model_type {model_type!r}" if model_type else f"{type(model).__name__} (no transformers config)"
        raise UnsupportedModelError(
            f"moepatch cannot patch {what}; supported model types: {', '.join(sorted(families))}")
    return families[model_type]


def moe_blocks(model: torch.nn.Module, spec: FamilySpec) -> list[tuple[str, torch.nn.Module]]:
    """(qualified name, block) of every MoE block of ``spec`` in ``model``, in module order."""
    return [(name, m) for name, m in model.named_modules() if type(m).__name__ in spec.block_classes]
