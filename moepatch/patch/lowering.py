"""Dropped pairs never reach transformers' experts: these experts-module hooks run the kept (token,
expert) pairs (sentinel ids >= ``block.expert_ids`` left out) as one row each, or through the family's
``pair_experts``, and sum them back per token in a fixed order.  Legend: T tokens, W slots, P kept pairs, D hidden.
"""

from __future__ import annotations

import torch

from ..ops.reference import sum_slots


def experts_pre_hook(block, module, args, kwargs):
    block.compact = None
    if not block.lower:
        return None
    block.lower = False
    names = ("hidden_states", "top_k_index", "top_k_weights")
    vals = {**dict(zip(names, args)), **kwargs}
    x_TD, ids_TW, w_TW = (vals[n] for n in names)
    T, W = ids_TW.shape
    # Ids the module computes (zero-computation experts too, where the module handles them) are kept.
    kept_TW = ids_TW < block.expert_ids
    if bool(kept_TW.all()):  # NOTE: host sync
        # Nothing dropped: the module runs the routing as is, exactly as the unpatched model would.
        return None
    # Column of each kept pair among its token's kept pairs: the compact output is (T, Wk, D).
    col_TW = torch.cumsum(kept_TW.long(), dim=1) - 1
    tok_P, slot_P = kept_TW.nonzero(as_tuple=True)  # NOTE: host sync (data-dependent size)
    P = tok_P.numel()
    width = int(kept_TW.sum(1).max()) if T else 0  # NOTE: host sync
    x_PD, ids_P, w_P = x_TD[tok_P], ids_TW[tok_P, slot_P], w_TW[tok_P, slot_P]
    pairs = None if block.pair_experts is None else (x_PD, ids_P, w_P)
    block.compact = (T, width, tok_P, col_TW[tok_P, slot_P], pairs)
    if pairs is not None:
        # The module cannot run one slot per row: it gets an empty call (it returns at once) and
        # the post hook computes the kept pairs with the family's pair_experts.
        return (x_TD[:0], ids_TW[:0], w_TW[:0]), {}
    if P == 0:
        # Every pair was dropped: run one zero-weight row so the experts module sees a valid
        # call; the post hook discards it and returns zeros.
        return (torch.zeros_like(x_TD[:1]), ids_TW.new_zeros(1, 1), w_TW.new_zeros(1, 1)), {}
    return (x_PD, ids_P[:, None], w_P[:, None]), {}


def experts_post_hook(block, module, args, output):
    if block.compact is None:
        return None
    T, width, tok_P, col_P, pairs = block.compact
    block.compact = None
    if pairs is not None:
        output = block.pair_experts(module, *pairs)
    out_TWD = output.new_zeros(T, max(width, 1), output.shape[-1])
    if tok_P.numel():
        out_TWD[tok_P, col_P] = output
    return sum_slots(out_TWD)
