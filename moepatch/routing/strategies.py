"""The capacity strategies of "Capacity-Aware Inference" in fixed-size tensor ops (no host sync).

Legend: T tokens, E routed experts (E + Z score columns, Z zero-computation experts last), K native
experts per token, G capacity groups, NB buckets per group (E, or D devices in device scope), P pairs.
Common inputs: scores_TE (float32); topk_ids_TK (int64) native picks; active_T (bool) tokens that take
part; group_T, capacity_G (int64) each token's group and each group's C; bucket_E, bucket_size_B (int64)
each expert's bucket and the experts per bucket (room C · size); zero_experts Z, always kept, never targets.
"""

from __future__ import annotations

import torch

from .capacity import bucket_rank, count, priority_order


def pair_tokens(T: int, width: int, device) -> torch.Tensor:
    """Token of each pair (T * width,) in token-major order (``arange // width``: no size query)."""
    return torch.arange(T * width, device=device) // width


def keep_first(group_P, expert_P, valid_P, order_P, bucket_E, room_GB):
    """keep_P (bool): the valid pairs among the first room_GB[g, b] of their (group, bucket) in priority
    order ``order_P``; also each pair's flat bucket (invalid ones: a trailing trash bucket) and the count."""
    G, NB = room_GB.shape
    trash = G * NB
    bucket_P = group_P * NB + bucket_E[expert_P]
    bucket_P = torch.where(valid_P, bucket_P, torch.full_like(bucket_P, trash))
    rank_P = bucket_rank(bucket_P, order_P, trash + 1)
    room_B = torch.cat([room_GB.reshape(-1), room_GB.new_zeros(1)])
    return valid_P & (rank_P < room_B[bucket_P]), bucket_P, trash + 1


def token_drop(scores_TE, topk_ids_TK, active_T, group_T, capacity_G, bucket_E, bucket_size_B,
               policy="score", keys_P=None, zero_experts=0, order_P=None):
    """Token Drop: each bucket keeps its first C pairs in policy order; returns keep_TK (bool).

    ``keys_P``: the random policy's keys, one per pair in token-major order, zero-expert pairs
    included; ``order_P``: the priority order itself, when known (it replaces ``keys_P``).
    """
    T, K = topk_ids_TK.shape
    token_P = pair_tokens(T, K, topk_ids_TK.device)
    expert_P = topk_ids_TK.reshape(-1)
    active_P = active_T[token_P]
    valid_P = active_P
    if zero_experts:
        exempt_P = expert_P >= scores_TE.shape[1] - zero_experts
        valid_P = active_P & ~exempt_P
    if order_P is None:
        order_P = priority_order(policy, scores_TE.gather(1, topk_ids_TK).reshape(-1), token_P, keys_P)
    room_GB = capacity_G[:, None] * bucket_size_B[None, :]
    keep_P, _, _ = keep_first(group_T[token_P], expert_P, valid_P, order_P, bucket_E, room_GB)
    if zero_experts:
        keep_P |= active_P & exempt_P
    return keep_P.view(T, K)


def token_reroute(scores_TE, topk_ids_TK, keep_TK, active_T, group_T, capacity_G, bucket_E,
                  bucket_size_B, target="score", rounds=1, zero_experts=0):
    """Token Reroute: offer each dropped pair to an expert with spare room, for exactly ``rounds`` rounds
    (a round after nothing moved changes nothing: no early stop, no host sync).

    Each round, t's u-th unplaced slot proposes t's u-th best expert e' not among its picks whose bucket
    has room (by s[t, e'], or by spare room for ``"least_loaded"``; ties to the lower expert); each bucket
    admits its proposals by s[t, e'] (ties to the lower token) up to its room.
    Returns ids_TK (int64) with rerouted slots replaced, keep_TK (bool) slots with an expert, rerouted_TK.
    """
    if target not in ("score", "least_loaded"):
        raise ValueError(f"unknown reroute_target {target!r}; accepted: 'score', 'least_loaded'")
    T, K = topk_ids_TK.shape
    E = scores_TE.shape[1]
    G, NB = capacity_G.numel(), bucket_size_B.numel()
    device = topk_ids_TK.device
    ids_TK = topk_ids_TK.clone()
    keep_TK = keep_TK.clone()
    rerouted_TK = torch.zeros_like(keep_TK)
    counted_TK = keep_TK
    if zero_experts:
        real_E = torch.arange(E, device=device) < E - zero_experts
        counted_TK = keep_TK & real_E[ids_TK]
    token_P = pair_tokens(T, K, device)
    group_P = group_T[token_P]
    load_GB = count(group_P * NB + bucket_E[ids_TK.reshape(-1)], G * NB, counted_TK.reshape(-1)).view(G, NB)
    spare_GB = capacity_G[:, None] * bucket_size_B[None, :] - load_GB
    picked_TE = torch.zeros(T, E, dtype=torch.bool, device=device).scatter_(1, topk_ids_TK, True)
    unplaced_TK = active_T[:, None] & ~keep_TK
    for _ in range(rounds):
        spare_TE = spare_GB[group_T][:, bucket_E]
        avail_TE = ~picked_TE & (spare_TE > 0)
        if zero_experts:
            avail_TE &= real_E
        key_TE = scores_TE if target == "score" else spare_TE.float()
        # Unavailable experts sort last; the stable sort sends ties to the lower expert index.
        key_TE = torch.where(avail_TE, key_TE, torch.full_like(key_TE, -torch.inf))
        cand_TE = torch.sort(key_TE, dim=1, descending=True, stable=True).indices
        slot_rank_TK = torch.cumsum(unplaced_TK.long(), dim=1) - 1
        proposing_TK = unplaced_TK & (slot_rank_TK < avail_TE.sum(1)[:, None])
        target_TK = cand_TE.gather(1, slot_rank_TK.clamp(0, E - 1))
        # Admission: every bucket takes its proposals by score, up to its spare room.
        order_P = priority_order("score", scores_TE.gather(1, target_TK).reshape(-1), token_P)
        admit_P, bucket_P, nb = keep_first(group_P, target_TK.reshape(-1), proposing_TK.reshape(-1), order_P,
                                           bucket_E, spare_GB)
        admit_TK = admit_P.view(T, K)
        ids_TK = torch.where(admit_TK, target_TK, ids_TK)
        keep_TK |= admit_TK
        rerouted_TK |= admit_TK
        unplaced_TK &= ~admit_TK
        picked_TE.scatter_(1, torch.where(admit_TK, target_TK, topk_ids_TK), True)
        spare_GB = spare_GB - count(bucket_P, nb, admit_P)[:-1].view(G, NB)
    return ids_TK, keep_TK, rerouted_TK


def expanded_drop(scores_TE, topk_ids_TK, active_T, group_T, capacity_G, bucket_E, bucket_size_B,
                  local_TE, max_experts_per_token=None, zero_experts=0, select=None):
    """Expanded Drop: candidates are the top-k plus the token's local experts; each bucket keeps its top-C
    by s[t, e] (ties to the lower token), then each token its best ``max_experts_per_token`` (ties to the
    lower expert, freed room unused; zero-expert picks kept, not counted).  Returns keep_TE (bool).
    ``select(cand_TE) -> keep_TE`` does the drop step when given (moepatch.ops.route's kernel)."""
    T, E = scores_TE.shape
    device = scores_TE.device
    native_TE = torch.zeros(T, E, dtype=torch.bool, device=device).scatter_(1, topk_ids_TK, True)
    cand_TE = (native_TE | local_TE) & active_T[:, None]
    if zero_experts:
        real_E = torch.arange(E, device=device) < E - zero_experts
        cand_TE &= real_E
    if select is not None:
        keep_TE = select(cand_TE)
    else:
        token_P = pair_tokens(T, E, device)
        order_P = priority_order("score", scores_TE.reshape(-1), token_P)
        keep_P, _, _ = keep_first(group_T[token_P], torch.arange(E, device=device).repeat(T), cand_TE.reshape(-1),
                                  order_P, bucket_E, capacity_G[:, None] * bucket_size_B[None, :])
        keep_TE = keep_P.view(T, E)
    if max_experts_per_token is not None and max_experts_per_token < E:
        key_TE = torch.where(keep_TE, scores_TE, torch.full_like(scores_TE, -torch.inf))
        best_TM = torch.sort(key_TE, dim=1, descending=True, stable=True).indices[:, :max_experts_per_token]
        keep_TE &= torch.zeros_like(keep_TE).scatter_(1, best_TM, True)
    if zero_experts:
        keep_TE |= native_TE & active_T[:, None] & ~real_E
    return keep_TE


def expert_drop(topk_ids_TK, active_T, num_experts, fraction=0.1, group_T=None, num_groups=1, zero_experts=0):
    """The paper's baseline: skip the max(1, round(fraction * E)) least-loaded computing experts (load over
    active tokens, ties to the lower expert) per group of ``group_T`` (a source device under EP) if given.
    Returns keep_TK (bool) the kept native pairs and dropped_GE (bool, (G, E)) the skipped experts."""
    E = num_experts - zero_experts
    T, K = topk_ids_TK.shape
    device = topk_ids_TK.device
    if group_T is None:
        group_T = torch.zeros(T, dtype=torch.long, device=device)
    n_skip = max(1, round(fraction * E))
    ids_TK, counted_TK = topk_ids_TK, active_T[:, None]
    if zero_experts:
        real_TK = topk_ids_TK < E
        ids_TK, counted_TK = topk_ids_TK.clamp(max=E - 1), counted_TK & real_TK
    load_GE = count(group_T[:, None] * E + ids_TK, num_groups * E, counted_TK).view(num_groups, E)
    order_GE = torch.sort(load_GE, dim=1, stable=True).indices
    dropped_GE = torch.zeros(num_groups, E, dtype=torch.bool, device=device).scatter_(1, order_GE[:, :n_skip], True)
    skipped_TK = dropped_GE[group_T[:, None], ids_TK]
    if zero_experts:
        skipped_TK &= real_TK
    return ~skipped_TK & active_T[:, None], dropped_GE
