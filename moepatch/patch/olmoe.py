"""OLMoE: softmax scores, renormalised only when ``norm_topk_prob`` (False for the released models)."""

from ..routing.scores import FamilyScoring
from .spec import FamilySpec

SPEC = FamilySpec(
    model_type="olmoe",
    block_classes=("OlmoeSparseMoeBlock",),
    scoring=lambda router: FamilyScoring(kind="softmax", normalize=bool(router.norm_topk_prob)),
)
