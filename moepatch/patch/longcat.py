"""LongCat-Flash (``longcat_flash``): softmax router over E computing and Z zero-computation experts,
weights the plain scores times ``routed_scaling_factor``.  transformers 5.17 returns no logits (they
are recomputed); up to 5.24 the experts module computes the identity experts and cannot run one slot
per row (:func:`pair_rows`).  docs/semantics.md, "Zero-computation experts", has the rules.
Legend: P kept (token, expert) pairs, D hidden, I expert width.
"""

import torch
import torch.nn.functional as F

from ..errors import ModelStateError
from ..ops.reference import expert_mlp
from ..routing.scores import FamilyScoring
from .spec import FamilySpec


def _router_logits(router: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    # The router's own expression: float32 and no bias (transformers ignores classifier.bias).
    x_TD = hidden_states.view(-1, router.hidden_dim)
    return F.linear(x_TD.type(torch.float32), router.classifier.weight.type(torch.float32))


def _identity_in_experts(experts: torch.nn.Module) -> bool:
    """True for the 5.17-5.24 layout, where the experts module computes the identity experts."""
    return hasattr(experts, "identity_expert")


def pair_rows(experts: torch.nn.Module, x_PD: torch.Tensor, ids_P: torch.Tensor, w_P: torch.Tensor) -> torch.Tensor:
    """(P, D) in x_PD's dtype: each kept pair's w · SwiGLU_e(x), or w · x where ids_P >= E (identity expert),
    as the 5.17-5.24 ``LongcatFlashExperts.forward`` computes one slot; ids_P (P,) int64, w_P (P,) float32."""
    if experts.gate_up_proj is not None and experts.gate_up_proj.device.type == "meta":
        raise ModelStateError(
            "LongCat-Flash experts offloaded by accelerate (weights on the meta device outside their forward) "
            "cannot be capped: moepatch computes the kept pairs from the weights; load the experts on a device")
    E = 0 if experts.down_proj is None else experts.down_proj.shape[0]
    out_PD = torch.zeros_like(x_PD)
    for e in torch.unique(ids_P).tolist():  # NOTE: host sync (which experts are hit)
        sel_P = (ids_P == e).nonzero().squeeze(1)
        x_ND = x_PD[sel_P]
        if e >= E:
            y_ND = x_ND  # an identity expert
        else:
            y_ND = expert_mlp(x_ND, experts.gate_up_proj[e], experts.down_proj[e], experts.act_fn)
        out_PD[sel_P] = (y_ND * w_P[sel_P, None]).to(x_PD.dtype)
    return out_PD


SPEC = FamilySpec(
    model_type="longcat_flash",
    block_classes=("LongcatFlashMoE",),
    scoring=lambda router: FamilyScoring(kind="softmax", normalize=False, scale=float(router.routed_scaling_factor)),
    router_attr="router",
    count_attr="router.num_experts",
    router_logits=_router_logits,
    zero_experts=lambda router: int(router.n_routed_experts) - int(router.num_experts),
    experts_interface=False,
    experts_ids=lambda experts: int(experts.total_experts if _identity_in_experts(experts) else experts.num_experts),
    pair_experts=lambda experts: pair_rows if _identity_in_experts(experts) else None,
    structure=("router.hidden_dim", "router.classifier", "experts.gate_up_proj", "experts.down_proj", "experts.act_fn"),
)
