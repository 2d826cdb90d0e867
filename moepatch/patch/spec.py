"""A model family as data: which modules are its MoE blocks, where their router is and how it scores."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..routing.scores import FamilyScoring


@dataclass(frozen=True)
class FamilySpec:
    """How to patch one model family.  A block has a router (``forward(x) -> (logits, weights, ids)``,
    or ``(weights, ids)``) with ``num_experts`` and ``top_k``, and ``experts``.

    Attributes:
        model_type: ``config.model_type``; block_classes: class names of its sparse MoE blocks.
        scoring: router module -> the family's :class:`FamilyScoring`; router_attr: the block's router.
        router_logits: ``(router, hidden_states) -> (T, E + Z)`` logits as the router computes them,
            for releases whose router returns none.
        zero_experts: ``router -> Z`` zero-computation (identity) experts, ids after the computing ones.
        experts_interface: the experts module runs through transformers' ``ExpertsInterface`` (so the
            Triton and expert-parallel backends can run it).
        experts_ids: ``experts -> n``, the ids the experts module computes (the hooks lower every id
            >= n); None: E + Z.
        pair_experts: ``experts -> fn or None``: for modules that cannot run one slot per row,
            ``fn(experts, x_PD, ids_P, w_P) -> (P, D)`` computes each kept pair's weighted output.
        structure: further dotted attribute paths of a block the patch reads (checked at ``apply``).
    """

    model_type: str
    block_classes: tuple[str, ...]
    scoring: Callable[[torch.nn.Module], FamilyScoring]
    router_attr: str = "gate"
    router_logits: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor] | None = None
    zero_experts: Callable[[torch.nn.Module], int] | None = None
    experts_interface: bool = True
    experts_ids: Callable[[torch.nn.Module], int] | None = None
    pair_experts: Callable[[torch.nn.Module], Callable[..., torch.Tensor] | None] | None = None
    structure: tuple[str, ...] = ()

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
