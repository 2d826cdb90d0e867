"""Capacity-aware routing with the fused Token Drop kernel (routing_kernels.py) where it covers the case.

:func:`route` is :func:`moepatch.routing.route` (same arguments, same pairs, ties included): Token
Drop by ``score``, ``order`` or ``reverse`` in expert scope, fp32 scores, no zero-computation experts,
on CUDA or the interpreter is one kernel launch; Reroute's and Expanded Drop's drop steps run on it
too (``drop=``); everything else is moepatch.routing.route.

Legend: T tokens, E experts, K native experts per token, S slots per token, G capacity groups.
"""

from __future__ import annotations

import functools
import os
import struct

import torch

from ..routing.capacity import CEIL_TOLERANCE
from ..routing.config import RoutingConfig
from ..routing.route import RoutingResult, renormalize_kept
from ..routing.route import route as torch_route

# Tests switch the fused kernel off to check the torch path against the reference too.
USE_FUSED_DROP = True
POLICY_CODES = {"score": 0, "order": 1, "reverse": 2}


def fused_kernel_usable(cfg: RoutingConfig, scores_TE: torch.Tensor, topk_ids_TK: torch.Tensor) -> bool:
    """Whether the Token Drop kernel can run here (any strategy's drop step; expert scope, fp32 scores)."""
    if not (USE_FUSED_DROP and cfg.capacity_scope == "expert" and scores_TE.dtype == torch.float32
            and topk_ids_TK.numel() > 0):
        return False
    dev = scores_TE.device.type
    if not (dev == "cuda" or (dev == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")):
        return False
    try:
        from . import routing_kernels  # noqa: F401  (needs triton)
    except ImportError:
        return False
    return True


def fused_drop_applies(cfg: RoutingConfig, scores_TE: torch.Tensor, topk_ids_TK: torch.Tensor) -> bool:
    """Whether :func:`route` is one launch of the fused kernel (Token Drop by score / order / reverse)."""
    return cfg.strategy == "drop" and cfg.policy in POLICY_CODES and fused_kernel_usable(cfg, scores_TE, topk_ids_TK)


@functools.lru_cache(maxsize=256)
def _f64_bits(x: float) -> int:
    # Triton passes Python floats as float32; the capacity needs the reference's float64 values.
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def drop_launch(cfg, scores_TE, ids_TS, w_TS, batch, seq, valid_BS, source_rank, native_k: int, policy: str):
    """``capacity_drop_kernel`` over (T, S) slot ids (outside [0, E): empty); ``native_k`` is the K of
    C = γ·T·K/E.  Returns (ids with the sentinel E on dropped and empty slots, weights with 0 there,
    the statistics buffer, G, the valid mask or None)."""
    from . import routing_kernels as RK

    T, E = scores_TE.shape
    K = ids_TS.shape[1]
    device = scores_TE.device
    ep = cfg.ep_size if source_rank is None else 1
    by_seq = cfg.group == "sequence"
    G = (batch if by_seq else 1) * ep
    max_tokens = -(-T // ep)
    if by_seq:
        max_tokens = min(max_tokens, seq)
    ids_TK = ids_TS.contiguous()
    w_TK = w_TS.contiguous()
    has_valid = valid_BS is not None and not cfg.count_padding
    valid_T = valid_BS.reshape(-1).to(device=device, dtype=torch.bool) if has_valid else ids_TK
    block = RK.sorted_block_size(max_tokens * K, E)
    if block is None:  # one program per (group, expert) scans the group's pairs
        block, single = RK.block_size(max_tokens * K)
        sorted_R = start_E1 = ids_TK
        ids_TW = torch.empty_like(ids_TK)
        w_TW = torch.empty_like(w_TK)
    else:  # large groups: sort the pairs by expert first, each program walks its expert's rows
        from .experts import dispatch

        layout = dispatch(ids_TK, E, 1, fuse=False)
        sorted_R, start_E1, single = layout.sorted_pairs_R, layout.start_E1, False
        ids_TW = torch.full_like(ids_TK, E)
        w_TW = torch.zeros_like(w_TK)
    stats = torch.empty(2 * G * E + 2 * G, dtype=torch.long, device=device)
    RK.capacity_drop_kernel[(G * E,)](
        ids_TK, w_TK, scores_TE, valid_T, sorted_R, start_E1, ids_TW, w_TW, stats, T, K, E, seq, ep,
        cfg.min_capacity, _f64_bits(cfg.capacity_factor * native_k), _f64_bits(CEIL_TOLERANCE), scores_TE.stride(0),
        scores_TE.stride(1), POLICY=POLICY_CODES[policy], GROUP_SEQ=by_seq, HAS_VALID=has_valid, BLOCK=block,
        SINGLE=single, SORTED=sorted_R is not ids_TK, SEARCH=G > 1, num_warps=8 if block >= 256 else 4)
    return ids_TW, w_TW, stats, G, valid_T if has_valid else None


def _fused_drop(cfg, scores_TE, topk_ids_TK, topk_weights_TK, batch, seq, valid_BS, source_rank) -> RoutingResult:
    """Token Drop (score / order / reverse, expert scope) in one launch of ``capacity_drop_kernel``."""
    T, E = scores_TE.shape
    K = topk_ids_TK.shape[1]
    ids_TW, w_TW, stats, G, valid_T = drop_launch(cfg, scores_TE, topk_ids_TK, topk_weights_TK, batch, seq,
                                                  valid_BS, source_rank, K, cfg.policy)
    if cfg.renormalize == "kept":
        active_T = valid_T if valid_T is not None else torch.ones(T, dtype=torch.bool, device=scores_TE.device)
        w_TW = renormalize_kept(w_TW, topk_weights_TK, active_T)

    # stats: load before (G, E), load after (G, E), tokens (G), capacity (G); views cost no launch.
    GE = G * E
    tokens_G, capacity_G = stats[2 * GE:2 * GE + G], stats[2 * GE + G:]
    if not cfg.collect_stats:
        return RoutingResult(ids_TW, w_TW, tokens_G, capacity_G)
    before_GE, after_GE = stats[:GE].view(G, E), stats[GE:2 * GE].view(G, E)
    routed = tokens_G.sum() * K
    zero = torch.zeros((), dtype=torch.long, device=scores_TE.device)
    return RoutingResult(ids_TW, w_TW, tokens_G, capacity_G, before_GE[0] if G == 1 else before_GE.sum(0),
                         after_GE[0] if G == 1 else after_GE.sum(0), routed, routed - after_GE.sum(), zero, zero)


def route(cfg: RoutingConfig, scores_TE: torch.Tensor, topk_ids_TK: torch.Tensor, topk_weights_TK: torch.Tensor,
          factor_T: torch.Tensor | None, *, batch: int, seq: int, valid_BS: torch.Tensor | None = None,
          layer: int = 0, source_rank: int | None = None, zero_experts: int = 0) -> RoutingResult:
    """:func:`moepatch.routing.route` (same arguments, same result), on the fused kernel where it applies."""
    if cfg.unlimited or zero_experts or not fused_kernel_usable(cfg, scores_TE, topk_ids_TK):
        return torch_route(cfg, scores_TE, topk_ids_TK, topk_weights_TK, factor_T, batch=batch, seq=seq,
                           valid_BS=valid_BS, layer=layer, source_rank=source_rank, zero_experts=zero_experts)
    if batch * seq != scores_TE.shape[0]:
        raise ValueError(f"batch * seq = {batch} * {seq} does not match the {scores_TE.shape[0]} routed tokens")
    if cfg.strategy == "drop" and cfg.policy in POLICY_CODES:
        return _fused_drop(cfg, scores_TE, topk_ids_TK, topk_weights_TK, batch, seq, valid_BS, source_rank)
    E = scores_TE.shape[1]
    K = topk_ids_TK.shape[1]

    def drop(ids_TS, w_TS, policy):
        return drop_launch(cfg, scores_TE, ids_TS, w_TS, batch, seq, valid_BS, source_rank, K, policy)[0] < E

    uses_drop = cfg.strategy == "expanded" or (cfg.strategy == "reroute" and cfg.policy in POLICY_CODES)
    return torch_route(cfg, scores_TE, topk_ids_TK, topk_weights_TK, factor_T, batch=batch, seq=seq,
                       valid_BS=valid_BS, layer=layer, source_rank=source_rank, drop=drop if uses_drop else None)
