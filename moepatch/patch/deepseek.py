"""DeepSeek-V2 (softmax, weights scaled, never renormalised) and V3 (sigmoid; selection adds
``e_score_correction_bias``, weights renormalised with 1e-20 and scaled).  The router's own top-k is
read as is; shared experts are untouched.
"""

from ..routing.scores import FamilyScoring
from .spec import FamilySpec

SPECS = (
    FamilySpec(
        model_type="deepseek_v2",
        block_classes=("DeepseekV2Moe",),
        scoring=lambda router: FamilyScoring(kind="softmax", normalize=False,
                                             scale=float(router.routed_scaling_factor)),
    ),
    FamilySpec(
        model_type="deepseek_v3",
        block_classes=("DeepseekV3MoE",),
        scoring=lambda router: FamilyScoring(kind="sigmoid", normalize=bool(router.norm_topk_prob), eps=1e-20,
                                             scale=float(router.routed_scaling_factor)),
    ),
)
