"""A model family as data: which modules are its MoE blocks, where their router is and how it scores."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..routing.scores import FamilyScoring


@dataclass(frozen=True)
class FamilySpec:
    """How to patch one model family.  A block (one of ``block_classes``) has ``experts`` and a router
    (``forward(x) -> (logits, weights, ids)`` or ``(weights, ids)``) with ``num_experts`` and ``top_k``."""

    model_type: str  # config.model_type
    block_classes: tuple[str, ...]
    scoring: Callable[[torch.nn.Module], FamilyScoring]  # router -> the family's scoring
    router_attr: str = "gate"
    # (router, hidden_states) -> (T, E + Z) logits as the router computes them, for routers that return none
    router_logits: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor] | None = None
    zero_experts: Callable[[torch.nn.Module], int] | None = None  # router -> Z identity experts (ids after E)
    experts_interface: bool = True  # behind transformers' ExpertsInterface (Triton and EP backends need it)
    experts_ids: Callable[[torch.nn.Module], int] | None = None  # experts -> ids it computes (>= lowered); None: E+Z
    # experts -> fn(experts, x_PD, ids_P, w_P) -> (P, D), for modules that cannot run one slot per row
    pair_experts: Callable[[torch.nn.Module], Callable[..., torch.Tensor] | None] | None = None
    structure: tuple[str, ...] = ()  # further dotted attribute paths of a block the patch reads

    def router(self, block: torch.nn.Module) -> torch.nn.Module:
        return getattr(block, self.router_attr)

    def num_zero_experts(self, block: torch.nn.Module) -> int:
        return 0 if self.zero_experts is None else int(self.zero_experts(self.router(block)))

    def num_expert_ids(self, block: torch.nn.Module) -> int:
        if self.experts_ids is not None:
            return int(self.experts_ids(block.experts))
        return int(self.router(block).num_experts) + self.num_zero_experts(block)

    def pair_fn(self, block: torch.nn.Module):
        return None if self.pair_experts is None else self.pair_experts(block.experts)

    def required(self) -> tuple[str, ...]:
        """Every attribute path of a block the patch reads (see ``structure``)."""
        r = self.router_attr
        return (r, f"{r}.num_experts", f"{r}.top_k", "experts", *self.structure)
