"""Qwen-MoE (Qwen1.5/Qwen2-MoE, Qwen3-MoE): softmax, ``norm_topk_prob``; the shared expert is untouched."""

from ..routing.scores import FamilyScoring
from .spec import FamilySpec


def _scoring(router):
    return FamilyScoring(kind="softmax", normalize=bool(router.norm_topk_prob))


SPECS = (
    FamilySpec(model_type="qwen2_moe", block_classes=("Qwen2MoeSparseMoeBlock",), scoring=_scoring),
    FamilySpec(model_type="qwen3_moe", block_classes=("Qwen3MoeSparseMoeBlock",), scoring=_scoring),
)
