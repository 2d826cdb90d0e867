"""Family routing scores s[t, e] and the weight s[t, e] * factor[t] a family gives an expert.

The native weights always come from the unpatched router (bit-exact); the factor weighs an expert
that capacity-aware routing moves a token onto (reroute, expanded drop).  Legend: T tokens, E
experts, K experts per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class FamilyScoring:
    """How a model family turns router logits into scores and combine weights.

    Attributes:
        kind: ``"softmax"`` (Mixtral, OLMoE, Qwen-MoE, DeepSeek-V2) or ``"sigmoid"`` (DeepSeek-V3).
        normalize: the top-k weights are divided by their sum over the token's picks.
        eps: added to that sum (DeepSeek-V3 uses 1e-20).
        scale: ``routed_scaling_factor`` (DeepSeek), 1.0 elsewhere.
    """

    kind: str = "softmax"
    normalize: bool = False
    eps: float = 0.0
    scale: float = 1.0
    per_token: bool = False  # factor[t] read from the native weights: sum_k w[t, k] / sum_k s[t, ids[t, k]]

    def scores(self, logits_TE: torch.Tensor) -> torch.Tensor:
        """Scores s[t, e] in float32 from router logits (T, E) of any float dtype."""
        if self.kind == "softmax":
            return torch.softmax(logits_TE.float(), dim=-1)
        if self.kind == "sigmoid":
            return torch.sigmoid(logits_TE.float())
        raise ValueError(f"unknown score kind {self.kind!r}; accepted: 'softmax', 'sigmoid'")

    def factor(self, scores_TE: torch.Tensor, topk_ids_TK: torch.Tensor,
               weights_TK: torch.Tensor | None = None) -> torch.Tensor:
        """factor[t] (T,) float32: the family's weight of expert e is s[t, e] * factor[t], normalised over
        the token's original picks (a rerouted expert weighs what it would in the dropped one's place).
        ``per_token`` families (a factor no formula here gives) need the native ``weights_TK``."""
        T = scores_TE.shape[0]
        if self.per_token:
            picked_T = scores_TE.gather(1, topk_ids_TK).sum(dim=-1)
            return weights_TK.float().sum(dim=-1) / picked_T.clamp_min(torch.finfo(torch.float32).tiny)
        factor_T = torch.full((T,), float(self.scale), dtype=torch.float32, device=scores_TE.device)
        if self.normalize:
            denom_T = scores_TE.gather(1, topk_ids_TK).sum(dim=-1) + self.eps
            # A zero denominator only happens for softmax underflow on garbage rows; keep it finite.
            factor_T = factor_T / denom_T.clamp_min(torch.finfo(torch.float32).tiny)
        return factor_T
