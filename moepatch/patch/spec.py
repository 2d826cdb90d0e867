"""A model family as data: which modules are its MoE blocks and how its router scores and weighs.

Every block has a router (``block.gate`` by default, ``forward(x) -> (logits, weights, ids)`` or,
where a release does not return the logits, ``(weights, ids)``) with ``num_experts`` and ``top_k``,
and ``experts`` (transformers' fused experts module, behind its experts interface unless the spec
says otherwise).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..routing.scores import FamilyScoring


@dataclass(frozen=True)
class FamilySpec:
    """How to patch one model family.

    Attributes:
        model_type: ``config.model_type``.
        block_classes: class names of the family's sparse MoE blocks (stable across transformers 5.x).
        scoring: builds the family's :class:`FamilyScoring` from a block's router module.
        router_attr: the attribute of a block that holds its router.
        router_logits: ``(router, hidden_states) -> (T, E + Z) logits`` exactly as the router computes
            them, for releases whose router returns only ``(weights, ids)``; None when every
            supported release returns the logits.
        zero_experts: ``router -> Z``, the number of zero-computation (identity) experts, whose ids
            follow the router's ``num_experts`` computing experts; None: the family has none.
        experts_interface: the experts module is dispatched through transformers'
            ``ExpertsInterface``, so the Triton and expert-parallel backends can run it.
        experts_ids: ``experts -> n``, the expert ids the experts module computes (identity experts
            it handles itself included); the experts hooks lower every id >= n.  None: E + Z.
        pair_experts: ``experts -> fn or None``, for experts modules that cannot be called with one
            slot per row (how capacity leaves dropped pairs out): ``fn(experts, x_PD, ids_P, w_P) ->
            (P, D)`` computes each kept (token, expert) pair's weighted output as one row.  None, or
            a None result: the module itself is called so.
        structure: dotted attribute paths of a block that the patch reads besides the router's
            ``num_experts`` and ``top_k`` and ``experts`` (checked at ``apply``).
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
