"""Convert a loaded transformers MoE model (Mixtral, OLMoE, Qwen2-MoE, Qwen3-MoE) into ScMoE form.

**Conversion changes the function** (for continued training); what is and is not preserved:
docs/scmoe.md, "Converting a transformers model".
Legend: B sequences, S positions, T = B*S tokens, D hidden, E routed experts, K picks, W slots.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelStateError, UnsupportedModelError
from ..ops.reference import sum_slots
from ..routing.config import check_choice
from .model import COMBINES, POSITIONS, SwiGLU, active_parameters

SUPPORTED = ("mixtral", "olmoe", "qwen2_moe", "qwen3_moe")


def _stash_output(stash: dict, key: str, module, args, output) -> None:
    """Forward hook of a shortcut source norm: its output, by name, for the converted blocks of this forward."""
    stash[key] = output


class ShortcutMoeBlock(nn.Module):
    """A converted MoE block: c · SE(y) + c' · Σ g_i(x_s) E_i(x_s), y the block's normalised input, x_s the
    stashed shortcut source; ``gate`` and ``experts`` are the original modules (same state-dict names),
    ``capacity`` is set by ``moepatch.apply``."""

    def __init__(self, block: nn.Module, stash: dict, source_key: str, shared_expert: nn.Module,
                 combine: str, top_k: int, scoring, layer: int, shared_gate: nn.Module | None = None):
        super().__init__()
        self.gate = block.gate
        self.experts = block.experts
        self.shared_expert = shared_expert
        hidden = block.gate.weight.shape[-1]
        self.combine = combine
        if combine == "cg1":
            self.shared_expert_gate = shared_gate if shared_gate is not None else _zero_linear(hidden, 1)
        elif combine == "cg2":
            self.coef_gate = _zero_linear(hidden, 2)
        self.num_experts = int(block.gate.num_experts)
        self.top_k = top_k
        self.scoring = scoring
        self.capacity_layer = layer
        self.capacity = None
        self.source_key = source_key
        self._stash = stash  # source-norm name -> output of the forward in flight (not in the state dict)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        B, S, D = hidden_states.shape
        x_s = self._stash.get(self.source_key)
        if x_s is None or x_s.shape != hidden_states.shape:
            raise ModelStateError(
                f"converted MoE block (layer {self.capacity_layer}) found no shortcut source "
                f"{self.source_key!r} of shape {tuple(hidden_states.shape)}; converted decoder layers must run "
                "in order inside one model forward")
        y_TD = hidden_states.reshape(-1, D)
        x_s_TD = x_s.reshape(-1, D)
        logits_TE, weights_TK, ids_TK = self.gate(x_s_TD)
        # The router's picks are sorted by score (torch.topk): the first top_k are the best ones.
        ids_TW, weights_TW = ids_TK[:, :self.top_k], weights_TK[:, :self.top_k]
        if self.capacity is not None:
            ids_TW, weights_TW = self.capacity.decide(self.scoring, self.capacity_layer, logits_TE, ids_TW,
                                                      weights_TW, batch=B, seq=S, native_ids_TK=ids_TK)
            routed_TD = _lowered_experts(self.experts, x_s_TD, ids_TW, weights_TW, self.num_experts)
        else:
            routed_TD = self.experts(x_s_TD, ids_TW, weights_TW)
        se_TD = self.shared_expert(y_TD)
        if self.combine == "cg1":
            se_TD = torch.sigmoid(self.shared_expert_gate(y_TD)) * se_TD
        elif self.combine == "cg2":
            coef_T2 = torch.softmax(self.coef_gate(y_TD).float(), dim=-1)
            se_TD = (coef_T2[:, :1] * se_TD).to(se_TD.dtype)
            routed_TD = (coef_T2[:, 1:] * routed_TD).to(routed_TD.dtype)
        return (se_TD + routed_TD).reshape(B, S, D)


def _zero_linear(hidden: int, out: int) -> nn.Linear:
    lin = nn.Linear(hidden, out, bias=False)
    nn.init.zeros_(lin.weight)
    return lin


def _lowered_experts(experts: nn.Module, x_TD, ids_TW, weights_TW, num_experts: int) -> torch.Tensor:
    """transformers' experts on the kept pairs only, one row each, each token's rows summed in fp32 in slot
    order: the sentinel id E of a dropped slot never reaches an implementation (as in moepatch.patch.core)."""
    T, W = ids_TW.shape
    kept_TW = ids_TW < num_experts
    tok_P, slot_P = kept_TW.nonzero(as_tuple=True)  # NOTE: host sync (data-dependent size)
    buf_TWD = x_TD.new_zeros(T, W, x_TD.shape[-1])
    if tok_P.numel():
        y_PD = experts(x_TD[tok_P], ids_TW[tok_P, slot_P, None], weights_TW[tok_P, slot_P, None])
        buf_TWD = buf_TWD.index_put((tok_P, slot_P), y_PD.to(x_TD.dtype))
    return sum_slots(buf_TWD)


@dataclass
class ConvertReport:
    """What :func:`convert` did and measured.  ``ppl_*`` are None without evaluation text."""

    model_type: str
    position: int
    combine: str
    layers: list
    top_k_before: int
    top_k_after: int
    shared_expert: str
    total_params_before: int
    total_params_after: int
    active_params_before: int
    active_params_after: int
    added_gate_params: int
    hidden_shapes_kept: bool
    ppl_before: float | None = None
    ppl_after: float | None = None

    def __str__(self) -> str:
        ppl = ""
        if self.ppl_before is not None:
            ppl = (f"; perplexity {self.ppl_before:.3f} -> {self.ppl_after:.3f} "
                   f"({100 * (self.ppl_after / self.ppl_before - 1):+.1f}%: conversion changes the function)")
        return (f"converted {len(self.layers)} {self.model_type} MoE layers to ScMoE Pos-{self.position} "
                f"{self.combine}: top-{self.top_k_before} -> shared expert ({self.shared_expert}) + top-"
                f"{self.top_k_after} on the shortcut; active params {self.active_params_before:,} -> "
                f"{self.active_params_after:,} (+{self.added_gate_params:,} gate), hidden shapes "
                f"{'kept' if self.hidden_shapes_kept else 'CHANGED'}{ppl}")


@torch.no_grad()
def perplexity(model: nn.Module, tokenizer, text, seq_len: int = 256, batch_size: int = 8) -> float:
    """exp(mean next-token NLL) over non-overlapping windows of ``seq_len`` tokens of ``text`` (a string,
    tokenised without special tokens, or a 1-D int64 tensor); ``model`` returns ``.logits``."""
    if isinstance(text, str):
        if tokenizer is None:
            raise ValueError("perplexity of a string needs its tokenizer")
        ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    else:
        ids = torch.as_tensor(text, dtype=torch.long).reshape(-1)
    if ids.numel() < 2:
        raise ValueError("perplexity needs at least 2 tokens")
    L = min(seq_len, ids.numel())
    n = ids.numel() // L
    windows = ids[: n * L].view(n, L)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        sums = [next_token_nll(model, windows[i:i + batch_size].to(device)) for i in range(0, n, batch_size)]
    finally:
        model.train(was_training)
    return math.exp(sum(s[0] for s in sums) / sum(s[1] for s in sums))


@torch.no_grad()
def next_token_nll(model: nn.Module, ids_BS: torch.Tensor) -> tuple[float, int]:
    """The summed next-token NLL of (B, S) int64 ids (float32 logits) and the number of predicted tokens."""
    logits = model(input_ids=ids_BS).logits[:, :-1].float()
    target = ids_BS[:, 1:]
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum")
    return float(nll), target.numel()


def _hidden_shapes(model: nn.Module, ids_BS: torch.Tensor) -> list[tuple]:
    with torch.no_grad():
        out = model(input_ids=ids_BS, output_hidden_states=True)
    return [tuple(h.shape) for h in out.hidden_states] + [tuple(out.logits.shape)]


def convert(model: nn.Module, position: int = 2, combine: str = "cg1", *, top_k: int | None = None,
            shared_init: str | int = "mean", eval_text=None, tokenizer=None, eval_seq_len: int = 256,
            verbose: bool = True) -> ConvertReport:
    """Turn a loaded Mixtral / OLMoE / Qwen2-MoE / Qwen3-MoE ``*ForCausalLM`` into ScMoE form, in place.

    position: the shortcut source, 1, 2 (the paper's best) or 3; combine: "add", "cg1" or "cg2";
    top_k: routed picks on the shortcut (default keeps active parameters); shared_init: ``"mean"`` of the
    experts or an expert index to copy (new shared experts only); eval_text (a string with ``tokenizer``,
    or token ids): perplexity before and after in the report, printed with ``verbose``."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in SUPPORTED:
        raise UnsupportedModelError(f"moepatch.scmoe.convert cannot convert model_type {model_type!r}; "
                                    f"supported: {', '.join(SUPPORTED)}")
    if any(isinstance(m, ShortcutMoeBlock) for m in model.modules()):
        raise UnsupportedModelError("the model is already converted to ScMoE form")
    check_choice("position", position, POSITIONS)
    check_choice("combine", combine, COMBINES)
    if any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules()):
        raise ModelStateError("convert does not support gradient checkpointing (a recomputed layer would read a "
                              "stale shortcut source); disable it first")
    from ..patch.probe import read_router
    from ..patch.registry import family_for, moe_blocks

    spec = family_for(model)
    decoder_layers = model.model.layers
    blocks = {id(b): name for name, b in moe_blocks(model, spec)}
    moe_layer_ids = [i for i, layer in enumerate(decoder_layers) if id(getattr(layer, "mlp", None)) in blocks]
    if not moe_layer_ids:
        raise UnsupportedModelError(f"no MoE block ({', '.join(spec.block_classes)}) in this {model_type} model")
    first = decoder_layers[moe_layer_ids[0]].mlp
    native_k = int(first.gate.top_k)
    has_shared = hasattr(first, "shared_expert")
    if top_k is None:
        top_k = native_k if has_shared else max(native_k - 1, 1)
    if not isinstance(top_k, int) or not 1 <= top_k <= native_k:
        raise ValueError(f"top_k={top_k!r}: accepted an integer in [1, {native_k}] (the router's native top-k)")
    E = int(first.gate.num_experts)
    if not (shared_init == "mean" or (isinstance(shared_init, int) and 0 <= shared_init < E)):
        raise ValueError(f"shared_init={shared_init!r}: accepted 'mean' or an expert index in [0, {E})")

    if eval_text is not None:
        ppl_before = perplexity(model, tokenizer, eval_text, seq_len=eval_seq_len)
    device = next(model.parameters()).device
    probe = torch.randint(0, int(model.config.vocab_size), (1, 8), generator=torch.Generator().manual_seed(0))
    shapes_before = _hidden_shapes(model, probe.to(device))
    counts_before = active_parameters(model)

    stash: dict[str, torch.Tensor] = {}  # cleared after each forward
    source_modules: dict[str, nn.Module] = {}
    added_gate = 0
    for i in moe_layer_ids:
        layer = decoder_layers[i]
        block = layer.mlp
        # The source: Pos-1 (and the first layer) this layer's input norm, Pos-2 / Pos-3 the previous layer's.
        j, norm = (i, "input_layernorm") if i == 0 or position == 1 else (
            i - 1, "post_attention_layernorm" if position == 2 else "input_layernorm")
        key = f"layers.{j}.{norm}"
        source_modules[key] = getattr(decoder_layers[j], norm)
        shared_gate = block.shared_expert_gate if has_shared and combine == "cg1" else None
        if has_shared:
            shared, desc = block.shared_expert, "the model's own"
        else:
            shared = _new_shared_expert(block.experts, shared_init)
            desc = "mean of the experts" if shared_init == "mean" else f"copy of expert {shared_init}"
        new = ShortcutMoeBlock(block, stash, key, shared, combine, top_k, read_router(spec, model, block)[0], i,
                               shared_gate)
        if combine == "cg1" and shared_gate is None:
            added_gate += new.shared_expert_gate.weight.numel()
        elif combine == "cg2":
            added_gate += new.coef_gate.weight.numel()
        elif combine == "add" and has_shared:
            added_gate -= block.shared_expert_gate.weight.numel()
        layer.mlp = new.to(device=device, dtype=block.gate.weight.dtype)
    handles = [norm.register_forward_hook(functools.partial(_stash_output, stash, key))
               for key, norm in source_modules.items()]
    handles.append(model.register_forward_hook(lambda *_: stash.clear(), always_call=True))
    model._scmoe_convert_handles = handles  # kept with the model: the hooks live as long as it does
    model.config.scmoe_conversion = dict(position=position, combine=combine, top_k=top_k,
                                         shared_init=shared_init if not has_shared else "own")

    counts_after = active_parameters(model)
    shapes_after = _hidden_shapes(model, probe.to(device))
    report = ConvertReport(
        model_type=model_type, position=position, combine=combine, layers=moe_layer_ids, top_k_before=native_k,
        top_k_after=top_k, shared_expert=desc, total_params_before=counts_before["total"],
        total_params_after=counts_after["total"], active_params_before=counts_before["active"],
        active_params_after=counts_after["active"], added_gate_params=added_gate,
        hidden_shapes_kept=shapes_before == shapes_after)
    if eval_text is not None:
        report.ppl_before, report.ppl_after = ppl_before, perplexity(model, tokenizer, eval_text,
                                                                     seq_len=eval_seq_len)
        if verbose:
            print(report)
    return report


@torch.no_grad()
def _new_shared_expert(experts: nn.Module, shared_init) -> SwiGLU:
    """A shared expert of one expert's width from the fused weights (gate_up_proj (E, 2I, D) gate rows first,
    down_proj (E, D, I)): their mean or a copy of one."""
    gate_up, down = experts.gate_up_proj, experts.down_proj
    E, two_i, D = gate_up.shape
    inter = two_i // 2
    se = SwiGLU(D, inter, experts.act_fn).to(device=gate_up.device, dtype=gate_up.dtype)
    if shared_init == "mean":
        gu, dn = gate_up.float().mean(0), down.float().mean(0)
    else:
        gu, dn = gate_up[shared_init].float(), down[shared_init].float()
    se.gate_proj.weight.copy_(gu[:inter])
    se.up_proj.weight.copy_(gu[inter:])
    se.down_proj.weight.copy_(dn)
    return se
