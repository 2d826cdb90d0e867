"""The one reference expert computation (pure torch) that tests, expert parallelism, ScMoE and benchmarks call:
SwiGLU experts over transformers' fused layout, a token's weighted slot outputs summed in slot order in fp32.

Legend: T tokens, R rows, D hidden, I intermediate, E experts, W slots per token.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def expert_mlp(x_RD: torch.Tensor, gate_up_2ID: torch.Tensor, down_DI: torch.Tensor,
               act: Callable = F.silu, apply_gate: Callable | None = None) -> torch.Tensor:
    """One expert on rows: down(act(gate) * up) -> (R, D).  x_RD (R, D); gate_up_2ID (2I, D) gate rows
    first; down_DI (D, I); apply_gate replaces ``act(gate) * up``, (R, 2I) -> (R, I) (e.g. a transformers
    experts module's bound ``_apply_gate``)."""
    h_RX = F.linear(x_RD, gate_up_2ID)
    if apply_gate is None:
        gate_RI, up_RI = h_RX.chunk(2, dim=-1)
        h_RX = act(gate_RI) * up_RI
    else:
        h_RX = apply_gate(h_RX)
    return F.linear(h_RX, down_DI)


def module_expert(experts: torch.nn.Module, e: int, x_RD: torch.Tensor) -> torch.Tensor:
    """Expert ``e`` of a transformers experts module (``use_experts_implementation``) on rows x_RD, unweighted,
    in any layout its flags describe: gated (its own ``_apply_gate``: concatenated or interleaved, clamped)
    or not (``act_fn``), biases, transposed weights, a post-expert norm.  (R, D) in x's dtype."""
    # Modules without the flags (moepatch's own ScMoE experts) are in the plain layout.
    transposed, bias = bool(getattr(experts, "is_transposed", False)), bool(getattr(experts, "has_bias", False))

    def linear(x, name):
        w = getattr(experts, name)[e]
        y = x @ w if transposed else F.linear(x, w)
        return y + getattr(experts, f"{name}_bias")[e] if bias else y

    if getattr(experts, "has_gate", True):
        h_RI = experts._apply_gate(linear(x_RD, "gate_up_proj"))
    else:
        h_RI = experts.act_fn(linear(x_RD, "up_proj"))
    y_RD = linear(h_RI, "down_proj")
    if getattr(experts, "has_post_expert_norm", False):
        y_RD = experts.post_expert_norm(y_RD)
    return y_RD.to(x_RD.dtype)


def sum_slots(y_TWD: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """(T, W, D) -> (T, D): each token's slots summed in slot order in float32 (deterministic, and
    the same rounding as the expert-parallel combine), cast to ``dtype`` (default y's)."""
    return y_TWD.float().sum(dim=1).to(dtype or y_TWD.dtype)


def reference_experts(x_TD: torch.Tensor, ids_TW: torch.Tensor, weights_TW: torch.Tensor,
                      gate_up_E2ID: torch.Tensor, down_EDI: torch.Tensor, *, act: Callable = F.silu,
                      apply_gate: Callable | None = None) -> torch.Tensor:
    """Routed experts, expert by expert: out[t] = sum over slots j of w[t, j] * expert_{ids[t, j]}(x[t]), (T, D).

    x_TD (T, D); ids_TW (T, W) int64, outside [0, E): dropped slots (a token may name one expert twice);
    weights_TW (T, W); gate_up_E2ID (E, 2I, D) gate rows first; down_EDI (E, D, I); act / apply_gate as
    :func:`expert_mlp`.  Products in the promoted dtype cast to x's, summed by :func:`sum_slots`."""
    T, W = ids_TW.shape
    E = gate_up_E2ID.shape[0]
    flat_P = ids_TW.reshape(-1)
    key_P = torch.where((flat_P >= 0) & (flat_P < E), flat_P, E)
    # Stable sort by expert: each expert's rows are contiguous, token order inside; dropped slots last.
    order_P = torch.sort(key_P, stable=True).indices
    counts = torch.bincount(key_P, minlength=E + 1)[:E].tolist()  # NOTE: host sync (loop bounds)
    sel_P = order_P[:sum(counts)]
    tok_P = torch.div(sel_P, W, rounding_mode="floor")
    x_PD = x_TD[tok_P]
    pieces, start = [], 0
    for e, n in enumerate(counts):
        if n:
            pieces.append(expert_mlp(x_PD[start:start + n], gate_up_E2ID[e], down_EDI[e], act, apply_gate))
            start += n
    buf_TWD = x_TD.new_zeros(T, W, x_TD.shape[-1])
    if pieces:
        y_PD = torch.cat(pieces)
        w_P = weights_TW.reshape(-1)[sel_P]
        buf_TWD = buf_TWD.index_put((tok_P, sel_P - tok_P * W), (y_PD * w_P[:, None]).to(x_TD.dtype))
    return sum_slots(buf_TWD)
