"""LongCat-Flash under the ScMoE expert-parallel schedule: each decoder layer is one Pos-2 shortcut unit
built from its own modules, nothing in the model changes (docs/scmoe.md, "LongCat-Flash status").
Legend: B sequences, S positions, T = B*S tokens, D hidden, E computing experts, Z identity experts,
W slots per token, P rows sent by this rank.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch

from ..errors import ModelStateError
from ..ops.reference import sum_slots
from ..parallel.dispatch import PaddedRound, weigh_padded
from ..patch.core import PatchHandle, capacity_decision, is_patched
from .model import FusedExperts, ScMoEOutput, UnitProgram


@dataclass
class LongcatContext:
    """What every layer needs about the forward in flight (the decoder layer's keyword arguments)."""

    batch: int
    seq: int
    attention_mask: object  # transformers' causal mask (a tensor, a BlockMask or None)
    position_ids: torch.Tensor
    position_embeddings: tuple
    valid_BS: torch.Tensor | None  # padding of the current tokens (capacity)
    source_rank: int | None = None  # set by the expert-parallel schedule


class _ComputingExperts:
    """The E computing experts of a ``LongcatFlashExperts`` in FusedExperts' layout (what EP reads)."""

    _apply_gate = FusedExperts._apply_gate

    def __init__(self, experts: torch.nn.Module, num_experts: int):
        # A view: transformers 5.17-5.24 keep E + Z rows in gate_up_proj, and rows E.. compute nothing.
        self.num_experts = num_experts
        self.gate_up_proj = experts.gate_up_proj.detach()[:num_experts]
        self.down_proj = experts.down_proj.detach()
        self.act_fn = experts.act_fn


class LongcatRouted:
    """One layer's routed branch for the schedule: ``gate``, ``num_experts`` (E, computing),
    ``zero_experts`` (Z), ``experts`` (the computing experts' weights) and ``capacity``."""

    def __init__(self, model: torch.nn.Module, moe: torch.nn.Module):
        self.model, self.router = model, moe.router
        self.num_experts = int(moe.router.num_experts)
        self.zero_experts = int(moe.router.n_routed_experts) - self.num_experts
        self.experts = _ComputingExperts(moe.experts, self.num_experts)

    @property
    def capacity(self):
        """The ``moepatch.apply`` handle of the model (its ``config``), or None when it is not patched."""
        return PatchHandle(self.model) if is_patched(self.model) else None

    def gate(self, x_s_TD: torch.Tensor, ctx: LongcatContext) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids_TW, weights_TW): the router's picks, capacity-aware per source rank when patched."""
        x_BSD = x_s_TD.view(ctx.batch, ctx.seq, -1)
        output = self.router.forward(x_BSD)  # the native decision, without the patch's hook
        if self.capacity is None:
            return output[-1], output[-2]
        w_TW, ids_TW = capacity_decision(self.model, self.router, x_BSD, output, valid_BS=ctx.valid_BS,
                                         source_rank=ctx.source_rank)
        return ids_TW, w_TW

    def computing_ids(self, ids_TW: torch.Tensor) -> torch.Tensor:
        """The slots to dispatch: computing experts keep their id, the rest become the sentinel E."""
        return torch.where(ids_TW < self.num_experts, ids_TW, self.num_experts)

    def combine(self, back_PD: torch.Tensor, d, weights_TW: torch.Tensor, ids_TW: torch.Tensor,
                x_s_TD: torch.Tensor) -> torch.Tensor:
        """``weigh_and_sum`` / ``weigh_padded`` with identity experts: out[t] = Σ over t's slots, in slot order,
        of w · y (a returned row) or w · x_s[t] (an identity expert), each product cast, summed in fp32."""
        T, W = ids_TW.shape
        E, D = self.num_experts, x_s_TD.shape[-1]
        ident_TW = (ids_TW >= E) & (ids_TW < E + self.zero_experts)
        if isinstance(d, PaddedRound):
            if not self.zero_experts:  # (the CUDA combine kernel takes no identity rows)
                return weigh_padded(back_PD, d, weights_TW)
            x_PD = x_s_TD if W == 1 else x_s_TD.repeat_interleave(W, dim=0)
            return weigh_padded(back_PD, d, weights_TW, x_PD, ident_TW.reshape(-1))
        buf_TWD = x_s_TD.new_zeros(T, W, D)
        if back_PD.shape[0]:  # the returned rows in send order: slot sel_P of each
            w_P = weights_TW.reshape(-1)[d.sel_P]
            buf_TWD.view(T * W, D)[d.sel_P] = (back_PD * w_P[:, None]).to(x_s_TD.dtype)
        tok_N, slot_N = ident_TW.nonzero(as_tuple=True)  # NOTE: host sync (data-dependent size)
        buf_TWD[tok_N, slot_N] = (x_s_TD[tok_N] * weights_TW[tok_N, slot_N, None]).to(x_s_TD.dtype)
        return sum_slots(buf_TWD)


class LongcatShortcut:
    """A ``LongcatFlashForCausalLM`` (eval mode, the same weights on every rank) as a chain of shortcut units."""

    def __init__(self, model: torch.nn.Module):
        if type(model).__name__ != "LongcatFlashForCausalLM":
            raise ModelStateError(f"LongcatShortcut runs LongcatFlashForCausalLM models, got {type(model).__name__}")
        if model.training:
            raise ModelStateError("the expert-parallel path is inference-only; call model.eval() first")
        self.model = model
        self.decoder = model.model
        self.config = model.config
        self._modeling = importlib.import_module(type(model).__module__)
        self.layers = list(self.decoder.layers[: self.config.num_layers])
        if any(layer.mlp.experts.gate_up_proj is None for layer in self.layers):
            raise ModelStateError("this LongCat-Flash model has no computing experts (n_routed_experts=0)")
        self.units = list(range(len(self.layers)))
        self._routed = [LongcatRouted(model, layer.mlp) for layer in self.layers]
        self.embed_tokens = self.decoder.embed_tokens

    def moe_layers(self) -> list[LongcatRouted]:
        return self._routed

    def context(self, input_ids_BS: torch.Tensor, attention_mask: torch.Tensor | None, cache) -> LongcatContext:
        """The decoder layers' keyword arguments, as ``LongcatFlashModel.forward`` builds them (``cache``: None)."""
        B, S = input_ids_BS.shape
        embeds_BSD = self.decoder.embed_tokens(input_ids_BS)
        position_ids = torch.arange(S, device=embeds_BSD.device)[None]
        # The 4th argument is the cache (named `past_key_values` in 5.17, `cache` in 5.24).
        mask = self._modeling.create_causal_mask(self.config, embeds_BSD, attention_mask, None, position_ids)
        rope = self.decoder.rotary_emb(embeds_BSD, position_ids)
        valid_BS = None
        if attention_mask is not None and not bool(attention_mask.bool().all()):  # NOTE: host sync
            valid_BS = attention_mask.bool()
        return LongcatContext(B, S, mask, position_ids, rope, valid_BS)

    def unit_program(self, u: int, h_BSD: torch.Tensor, ctx: LongcatContext) -> UnitProgram:
        """Layer ``u`` split at its shortcut source (the first sub-block's post-attention norm)."""
        layer = self.layers[u]
        kw = dict(attention_mask=ctx.attention_mask, position_ids=ctx.position_ids,
                  position_embeddings=ctx.position_embeddings)
        h_BSD = h_BSD + layer.self_attn[0](hidden_states=layer.input_layernorm[0](h_BSD), **kw)[0]
        x_s_BSD = layer.post_attention_layernorm[0](h_BSD)
        st = {"h": h_BSD}

        def mlp_l():
            st["h"] = st["h"] + layer.mlps[0](x_s_BSD)

        def attn_l1():
            st["h"] = st["h"] + layer.self_attn[1](hidden_states=layer.input_layernorm[1](st["h"]), **kw)[0]

        def se_l1():
            st["se"] = layer.mlps[1](layer.post_attention_layernorm[1](st["h"]))

        def merge(routed_TD: torch.Tensor) -> torch.Tensor:
            return st["h"] + st.pop("se") + routed_TD.view_as(st["h"])

        ops = [("mlp_l", mlp_l), ("attn_l+1", attn_l1), ("se_l+1", se_l1)]
        return UnitProgram(x_s_BSD.reshape(-1, x_s_BSD.shape[-1]), self._routed[u], ops, merge)

    def head(self, h_BSD: torch.Tensor, labels, cache) -> ScMoEOutput:
        return ScMoEOutput(self.model.lm_head(self.decoder.norm(h_BSD)))
