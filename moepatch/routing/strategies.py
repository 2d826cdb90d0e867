"""The capacity strategies of "Capacity-Aware Inference" in pure torch: the executable spec.

Legend: T tokens, E routed experts, K native experts per token, W output slots per token,
G capacity groups, NB buckets per group (E in expert scope, D in device scope).

Common inputs:
    scores_TE (float32): the family's score s[t, e].
    topk_ids_TK (int64): the family's native picks, in native slot order.
    active_T (bool): tokens that take part in capacity (real tokens; padding is inactive
        unless ``count_padding``).  Inactive tokens get no expert at all.
    group_T (int64): capacity group of each token; capacity_G (int64): capacity per group.
    bucket_E (int64): bucket of each expert (``arange(E)`` in expert scope, the expert's device
        in device scope); bucket_size_B (int64): experts per bucket; a bucket holds at most
        capacity_G[g] * bucket_size_B[b] pairs.
"""

from __future__ import annotations

import torch

from .capacity import bucket_rank, priority_order


def _flat_buckets(group_P, expert_P, valid_P, bucket_E, num_buckets_per_group, num_groups):
    """Bucket id of each pair; invalid pairs go to a trailing trash bucket of capacity 0."""
    bucket_P = group_P * num_buckets_per_group + bucket_E[expert_P]
    trash = num_groups * num_buckets_per_group
    return torch.where(valid_P, bucket_P, torch.full_like(bucket_P, trash)), trash + 1


def _bucket_capacity(capacity_G, bucket_size_B):
    """Flattened (G * NB + 1,) capacity per bucket, the trash bucket last with capacity 0."""
    cap_GB = capacity_G[:, None] * bucket_size_B[None, :]
    return torch.cat([cap_GB.reshape(-1), cap_GB.new_zeros(1)])


def token_drop(scores_TE, topk_ids_TK, active_T, group_T, capacity_G, bucket_E, bucket_size_B,
               policy="score", keys_P=None, zero_experts=0):
    """Token Drop: each bucket keeps its first C pairs in policy order (``keys_P``: the random
    policy's keys, one per pair in token-major order, zero-expert pairs included).

    Returns:
        keep_TK (bool): the native pairs that stay (zero-expert pairs of active tokens always do).
    """
    T, K = topk_ids_TK.shape
    G, NB = capacity_G.numel(), bucket_size_B.numel()
    token_P = torch.arange(T, device=topk_ids_TK.device).repeat_interleave(K)
    expert_P = topk_ids_TK.reshape(-1)
    active_P = active_T[token_P]
    exempt_P = expert_P >= scores_TE.shape[1] - zero_experts
    valid_P = active_P & ~exempt_P
    bucket_P, nb = _flat_buckets(group_T[token_P], expert_P, valid_P, bucket_E, NB, G)
    score_P = scores_TE.gather(1, topk_ids_TK).reshape(-1)
    order_P = priority_order(policy, score_P, token_P, keys_P)
    rank_P = bucket_rank(bucket_P, order_P, nb)
    keep_P = rank_P < _bucket_capacity(capacity_G, bucket_size_B)[bucket_P]
    return ((keep_P & valid_P) | (active_P & exempt_P)).view(T, K)


def _bucket_load(group_T, ids_TK, keep_TK, bucket_E, num_groups, num_buckets):
    """Kept pairs per (group, bucket), shape (G, NB); ``keep_TK`` must leave zero-expert pairs out."""
    T, K = ids_TK.shape
    token_P = torch.arange(T, device=ids_TK.device).repeat_interleave(K)
    keep_P = keep_TK.reshape(-1)
    b = group_T[token_P[keep_P]] * num_buckets + bucket_E[ids_TK.reshape(-1)[keep_P]]
    return torch.bincount(b, minlength=num_groups * num_buckets).view(num_groups, num_buckets)


def token_reroute(scores_TE, topk_ids_TK, keep_TK, active_T, group_T, capacity_G, bucket_E,
                  bucket_size_B, target="score", rounds=1, zero_experts=0):
    """Token Reroute: offer each dropped pair to an expert with spare room.

    In each round every still-unplaced pair of token t proposes to a distinct expert e' that is
    not among t's picks and whose bucket has spare room: t's u-th unplaced slot takes t's u-th
    best candidate (by s[t, e'] for ``target="score"``, by the bucket's spare room for
    ``"least_loaded"``; ties go to the lower expert index).  Every bucket admits its proposals by
    s[t, e'] (ties to the lower token) up to its spare room.  Rejected pairs try again next round.
    Zero-computation experts are never targets.

    Returns:
        ids_TK (int64): the native picks with rerouted slots replaced by their new expert.
        keep_TK (bool): slots that end up with an expert (kept or rerouted).
        rerouted_TK (bool): slots that were moved.
    """
    T, K = topk_ids_TK.shape
    E = scores_TE.shape[1]
    G, NB = capacity_G.numel(), bucket_size_B.numel()
    device = topk_ids_TK.device
    ids_TK = topk_ids_TK.clone()
    keep_TK = keep_TK.clone()
    rerouted_TK = torch.zeros_like(keep_TK)
    real_E = torch.arange(E, device=device) < E - zero_experts
    spare_GB = capacity_G[:, None] * bucket_size_B[None, :] - _bucket_load(
        group_T, ids_TK, keep_TK & real_E[ids_TK], bucket_E, G, NB)
    picked_TE = torch.zeros(T, E, dtype=torch.bool, device=device).scatter_(1, topk_ids_TK, True)
    unplaced_TK = active_T[:, None] & ~keep_TK
    for _ in range(rounds):
        # NOTE: host sync; the reference stops as soon as nothing is left to place.
        if not bool(unplaced_TK.any()):
            break
        spare_TE = spare_GB[group_T][:, bucket_E]  # (T, E)
        avail_TE = ~picked_TE & (spare_TE > 0) & real_E
        if target == "score":
            key_TE = scores_TE.clone()
        elif target == "least_loaded":
            key_TE = spare_TE.float()
        else:
            raise ValueError(f"unknown reroute_target {target!r}; accepted: 'score', 'least_loaded'")
        # Unavailable experts sort last; the stable sort sends ties to the lower expert index.
        key_TE = torch.where(avail_TE, key_TE, torch.full_like(key_TE, -torch.inf))
        cand_TE = torch.sort(key_TE, dim=1, descending=True, stable=True).indices
        n_avail_T = avail_TE.sum(1)
        slot_rank_TK = torch.cumsum(unplaced_TK.long(), dim=1) - 1
        proposing_TK = unplaced_TK & (slot_rank_TK < n_avail_T[:, None])
        target_TK = cand_TE.gather(1, slot_rank_TK.clamp(0, E - 1))
        # Admission: every bucket takes its proposals by score, up to its spare room.
        token_P = torch.arange(T, device=device).repeat_interleave(K)
        prop_P = proposing_TK.reshape(-1)
        tgt_P = target_TK.reshape(-1)
        bucket_P, nb = _flat_buckets(group_T[token_P], tgt_P, prop_P, bucket_E, NB, G)
        score_P = scores_TE[token_P, tgt_P]
        rank_P = bucket_rank(bucket_P, priority_order("score", score_P, token_P), nb)
        spare_flat = torch.cat([spare_GB.reshape(-1), spare_GB.new_zeros(1)])
        admit_P = prop_P & (rank_P < spare_flat[bucket_P])
        if not bool(admit_P.any()):  # NOTE: host sync
            break
        admit_TK = admit_P.view(T, K)
        ids_TK = torch.where(admit_TK, target_TK, ids_TK)
        keep_TK |= admit_TK
        rerouted_TK |= admit_TK
        unplaced_TK &= ~admit_TK
        picked_TE.scatter_(1, torch.where(admit_TK, target_TK, topk_ids_TK), True)
        spare_GB = spare_GB - torch.bincount(bucket_P[admit_P], minlength=nb)[:-1].view(G, NB)
    return ids_TK, keep_TK, rerouted_TK


def expanded_drop(scores_TE, topk_ids_TK, active_T, group_T, capacity_G, bucket_E, bucket_size_B,
                  local_TE, max_experts_per_token=None, zero_experts=0):
    """Expanded Drop: candidates are the top-k plus the token's local experts; each bucket keeps
    its top-C candidates by s[t, e] (ties to the lower token).

    ``max_experts_per_token`` then keeps each token's best M kept experts (ties to the lower
    expert index); capacity freed that way is not handed to anyone else.  Zero-computation
    experts are never candidates beyond the token's own picks, which are always kept and do not
    count toward M.

    Returns:
        keep_TE (bool): the (token, expert) pairs that are computed.
    """
    T, E = scores_TE.shape
    G, NB = capacity_G.numel(), bucket_size_B.numel()
    device = scores_TE.device
    native_TE = torch.zeros(T, E, dtype=torch.bool, device=device).scatter_(1, topk_ids_TK, True)
    real_E = torch.arange(E, device=device) < E - zero_experts
    cand_TE = (native_TE | local_TE) & active_T[:, None] & real_E
    token_P = torch.arange(T, device=device).repeat_interleave(E)
    expert_P = torch.arange(E, device=device).repeat(T)
    valid_P = cand_TE.reshape(-1)
    bucket_P, nb = _flat_buckets(group_T[token_P], expert_P, valid_P, bucket_E, NB, G)
    order_P = priority_order("score", scores_TE.reshape(-1), token_P)
    rank_P = bucket_rank(bucket_P, order_P, nb)
    keep_TE = (valid_P & (rank_P < _bucket_capacity(capacity_G, bucket_size_B)[bucket_P])).view(T, E)
    if max_experts_per_token is not None and max_experts_per_token < E:
        key_TE = torch.where(keep_TE, scores_TE, torch.full_like(scores_TE, -torch.inf))
        best_TM = torch.sort(key_TE, dim=1, descending=True, stable=True).indices[:, :max_experts_per_token]
        cap_TE = torch.zeros_like(keep_TE).scatter_(1, best_TM, True)
        keep_TE &= cap_TE
    if zero_experts:
        keep_TE |= native_TE & active_T[:, None] & ~real_E
    return keep_TE


def expert_drop(topk_ids_TK, active_T, num_experts, fraction=0.1, group_T=None, num_groups=1, zero_experts=0):
    """The paper's comparison baseline: skip the least-loaded experts of the layer.

    n = max(1, round(fraction * E)) experts with the lowest load over the active tokens are
    skipped (ties: the lower expert index is skipped first).  With ``group_T`` each group (a source
    device under expert parallelism) decides from its own tokens' load.  With ``zero_experts``,
    E = num_experts - zero_experts: only computing experts are counted and skipped.

    Returns:
        keep_TK (bool), dropped_GE (bool, (G, E)): kept native pairs and the skipped experts per group.
    """
    E = num_experts - zero_experts
    T, K = topk_ids_TK.shape
    device = topk_ids_TK.device
    if group_T is None:
        group_T = torch.zeros(T, dtype=torch.long, device=device)
    n_skip = max(1, round(fraction * E))
    real_TK = topk_ids_TK < E
    counted_TK = real_TK & active_T[:, None]
    pair_G = group_T[:, None].expand(T, K)[counted_TK]
    load_GE = torch.zeros(num_groups * E, dtype=torch.long, device=device)
    load_GE.index_add_(0, pair_G * E + topk_ids_TK[counted_TK],
                       torch.ones(pair_G.numel(), dtype=torch.long, device=device))
    order_GE = torch.sort(load_GE.view(num_groups, E), dim=1, stable=True).indices
    dropped_GE = torch.zeros(num_groups, E, dtype=torch.bool, device=device)
    dropped_GE.scatter_(1, order_GE[:, :n_skip], True)
    skipped_TK = dropped_GE[group_T[:, None], topk_ids_TK.clamp(max=E - 1)] & real_TK
    keep_TK = ~skipped_TK & active_T[:, None]
    return keep_TK, dropped_GE
