"""A model family as data: which modules are its MoE blocks, where their router is and how it scores.

Most families are derived from the model's own modules (``registry.derive_spec``); a hand-written spec
holds only what cannot be derived (LongCat-Flash's zero-computation experts and older experts module).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..routing.scores import FamilyScoring


@dataclass(frozen=True)
class FamilySpec:
    """How to patch one model family.  A block (one of ``block_classes``) has ``experts`` and a router
    ``block.<router_attr>`` whose ``forward(x)`` returns (logits, weights, ids, *extra) or (weights, ids)."""

    model_type: str  # config.model_type
    block_classes: tuple[str, ...]
    router_attr: str = "gate"
    # router -> the family's scoring; None: read from the router's output at apply (patch/probe.py)
    scoring: Callable[[torch.nn.Module], FamilyScoring] | None = None
    count_attr: str = "experts.num_experts"  # attribute path of a block: E, its routed (computing) experts
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

    def num_experts(self, block: torch.nn.Module) -> int:
        obj = block
        for part in self.count_attr.split("."):
            obj = getattr(obj, part)
        return int(obj)

    def num_zero_experts(self, block: torch.nn.Module) -> int:
        return 0 if self.zero_experts is None else int(self.zero_experts(self.router(block)))

    def num_expert_ids(self, block: torch.nn.Module) -> int:
        if self.experts_ids is not None:
            return int(self.experts_ids(block.experts))
        return self.num_experts(block) + self.num_zero_experts(block)

    def pair_fn(self, block: torch.nn.Module):
        return None if self.pair_experts is None else self.pair_experts(block.experts)

    def required(self) -> tuple[str, ...]:
        """Every attribute path of a block the patch reads (see ``structure``)."""
        return (self.router_attr, "experts", self.count_attr, *self.structure)


DEFAULT_LAYOUT = (0, 1, 2)  # positions of (logits, weights, ids) in a router's output; logits None: absent


def router_layout(output: tuple) -> tuple[int | None, int | None, int]:
    """Where a router puts (logits, weights, ids): the ids are its first integer tensor of two or more
    dimensions, the weights the floating one of the same shape, the logits the next floating one."""
    tensors = [(i, t) for i, t in enumerate(output) if isinstance(t, torch.Tensor) and t.dim() >= 2]
    ints = [i for i, t in tensors if not t.is_floating_point()]
    if not ints:
        return (None, 0, 1) if len(output) == 2 else DEFAULT_LAYOUT
    ids = ints[0]
    floats = [i for i, t in tensors if t.is_floating_point()]
    same = [i for i in floats if output[i].shape == output[ids].shape]
    weights = same[0] if same else None
    rest = [i for i in floats if i != weights and output[i].shape[:-1] == output[ids].shape[:-1]]
    return (rest[0] if rest else None, weights, ids)


def split_router_output(output: tuple, layout=DEFAULT_LAYOUT):
    """(logits or None, weights_TK, ids_TK) of a router output at ``layout``'s positions, each flattened
    to (T, ...) where the router kept the batch dimensions."""
    at_logits, at_weights, at_ids = layout
    logits = None if at_logits is None else output[at_logits]
    weights, ids = output[at_weights], output[at_ids]
    if isinstance(ids, torch.Tensor) and ids.dim() > 2:
        weights, ids = weights.reshape(-1, weights.shape[-1]), ids.reshape(-1, ids.shape[-1])
        logits = None if logits is None else logits.reshape(-1, logits.shape[-1])
    return logits, weights, ids


def join_router_output(output: tuple, layout, weights_TW, ids_TW) -> tuple:
    """``output`` with its weights and ids replaced, in the router's own order and batch dimensions."""
    _, at_weights, at_ids = layout
    lead = tuple(output[at_ids].shape[:-1])
    if len(lead) > 1:
        weights_TW, ids_TW = weights_TW.reshape(*lead, -1), ids_TW.reshape(*lead, -1)
    out = list(output)
    out[at_weights], out[at_ids] = weights_TW, ids_TW
    return tuple(out)
