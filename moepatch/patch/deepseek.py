"""DeepSeek-V2 and V3.

V2: softmax scores, greedy or group-limited greedy top-k, weights times ``routed_scaling_factor``
and never renormalised.  V3: sigmoid scores; selection adds ``e_score_correction_bias`` and is
group-limited, but the weights use the plain sigmoid scores, renormalised (``norm_topk_prob``, with
1e-20 in the denominator) and scaled.  Selection stays the router's own: moepatch reads the native
picks and only needs the scores to rank and weigh.  Shared experts are untouched.
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
