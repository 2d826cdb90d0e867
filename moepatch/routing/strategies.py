"""The capacity strategies of "Capacity-Aware Inference" in fixed-size tensor ops (no host sync).

Legend: T tokens, E routed experts (E + Z score columns, the Z zero-computation experts last), K
native experts per token, G capacity groups, NB buckets per group (E in expert scope, D in device
scope), P pairs.  Common inputs: scores_TE (float32) s[t, e]; topk_ids_TK (int64) the native picks
in slot order; active_T (bool) the tokens that take part (the others get no expert); group_T and
capacity_G (int64) each token's group and each group's C; bucket_E and bucket_size_B (int64) each
expert's bucket and the experts per bucket (a bucket holds at most C · size pairs); zero_experts: Z,
whose pairs are always kept and which are never targets or candidates.
"""

from __future__ import annotations

import torch

from .capacity import bucket_rank, count, priority_order


def pair_tokens(T: int, width: int, device) -> torch.Tensor:
    """Token of each pair (T * width,) in token-major order (``arange // width``: no size query)."""
    return torch.arange(T * width, device=device) // width


def flat_buckets(group_P, expert_P, valid_P, bucket_E, num_buckets_per_group, num_groups):
    """Bucket id of each pair and the number of buckets; invalid pairs go to a trailing trash bucket."""
    bucket_P = group_P * num_buckets_per_group + bucket_E[expert_P]
    trash = num_groups * num_buckets_per_group
    return torch.where(valid_P, bucket_P, torch.full_like(bucket_P, trash)), trash + 1


def bucket_capacity(capacity_G, bucket_size_B):
    """Flattened (G * NB + 1,) capacity per bucket, the trash bucket last with capacity 0."""
    cap_GB = capacity_G[:, None] * bucket_size_B[None, :]
    return torch.cat([cap_GB.reshape(-1), cap_GB.new_zeros(1)])


def token_drop(scores_TE, topk_ids_TK, active_T, group_T, capacity_G, bucket_E, bucket_size_B,
               policy="score", keys_P=None, zero_experts=0, order_P=None):
    """Token Drop: each bucket keeps its first C pairs in policy order; returns keep_TK (bool).

    ``keys_P``: the random policy's keys, one per pair in token-major order, zero-expert pairs
    included; ``order_P``: the priority order itself, when known (it replaces ``keys_P``).
    """
    T, K = topk_ids_TK.shape
    G, NB = capacity_G.numel(), bucket_size_B.numel()
    token_P = pair_tokens(T, K, topk_ids_TK.device)
    expert_P = topk_ids_TK.reshape(-1)
    active_P = active_T[token_P]
    valid_P = active_P
    if zero_experts:
        exempt_P = expert_P >= scores_TE.shape[1] - zero_experts
        valid_P = active_P & ~exempt_P
    bucket_P, nb = flat_buckets(group_T[token_P], expert_P, valid_P, bucket_E, NB, G)
    if order_P is None:
        order_P = priority_order(policy, scores_TE.gather(1, topk_ids_TK).reshape(-1), token_P, keys_P)
    rank_P = bucket_rank(bucket_P, order_P, nb)
    keep_P = (rank_P < bucket_capacity(capacity_G, bucket_size_B)[bucket_P]) & valid_P
    if zero_experts:
        keep_P |= active_P & exempt_P
    return keep_P.view(T, K)


def bucket_load(group_T, ids_TK, keep_TK, bucket_E, num_groups, num_buckets):
    """Kept pairs per (group, bucket), shape (G, NB); ``keep_TK`` must leave zero-expert pairs out."""
    T, K = ids_TK.shape
    b_P = group_T[pair_tokens(T, K, ids_TK.device)] * num_buckets + bucket_E[ids_TK.reshape(-1)]
    return count(b_P, num_groups * num_buckets, keep_TK.reshape(-1)).view(num_groups, num_buckets)


def token_reroute(scores_TE, topk_ids_TK, keep_TK, active_T, group_T, capacity_G, bucket_E,
                  bucket_size_B, target="score", rounds=1, zero_experts=0):
    """Token Reroute: offer each dropped pair to an expert with spare room, for exactly ``rounds`` rounds.

    Each round, t's u-th unplaced slot proposes t's u-th best expert e' that is not among t's picks
    and whose bucket has room (by s[t, e'] for ``target="score"``, by the bucket's spare room for
    ``"least_loaded"``; ties to the lower expert); every bucket admits its proposals by s[t, e']
    (ties to the lower token) up to its room.  A round after nothing moved changes nothing, so
    there is no early stop (and no host sync).

    Returns:
        ids_TK (int64) the picks with rerouted slots replaced; keep_TK (bool) slots with an expert;
        rerouted_TK (bool) the moved slots.
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
    spare_GB = capacity_G[:, None] * bucket_size_B[None, :] - bucket_load(
        group_T, ids_TK, counted_TK, bucket_E, G, NB)
    picked_TE = torch.zeros(T, E, dtype=torch.bool, device=device).scatter_(1, topk_ids_TK, True)
    unplaced_TK = active_T[:, None] & ~keep_TK
    token_P = pair_tokens(T, K, device)
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
        prop_P = proposing_TK.reshape(-1)
        bucket_P, nb = flat_buckets(group_T[token_P], target_TK.reshape(-1), prop_P, bucket_E, NB, G)
        score_P = scores_TE.gather(1, target_TK).reshape(-1)
        rank_P = bucket_rank(bucket_P, priority_order("score", score_P, token_P), nb)
        spare_flat = torch.cat([spare_GB.reshape(-1), spare_GB.new_zeros(1)])
        admit_P = prop_P & (rank_P < spare_flat[bucket_P])
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
    """Expanded Drop: candidates are the top-k plus the token's local experts; each bucket keeps
    its top-C candidates by s[t, e] (ties to the lower token).  Returns keep_TE (bool).

    ``max_experts_per_token`` then keeps each token's best M (ties to the lower expert; the freed
    capacity goes to nobody).  Zero-computation picks are kept and do not count toward M.
    ``select(cand_TE) -> keep_TE`` does the drop step when given (moepatch.ops.route's kernel).
    """
    T, E = scores_TE.shape
    G, NB = capacity_G.numel(), bucket_size_B.numel()
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
        valid_P = cand_TE.reshape(-1)
        bucket_P, nb = flat_buckets(group_T[token_P], torch.arange(E, device=device).repeat(T), valid_P,
                                    bucket_E, NB, G)
        rank_P = bucket_rank(bucket_P, priority_order("score", scores_TE.reshape(-1), token_P), nb)
        keep_TE = (valid_P & (rank_P < bucket_capacity(capacity_G, bucket_size_B)[bucket_P])).view(T, E)
    if max_experts_per_token is not None and max_experts_per_token < E:
        key_TE = torch.where(keep_TE, scores_TE, torch.full_like(scores_TE, -torch.inf))
        best_TM = torch.sort(key_TE, dim=1, descending=True, stable=True).indices[:, :max_experts_per_token]
        keep_TE &= torch.zeros_like(keep_TE).scatter_(1, best_TM, True)
    if zero_experts:
        keep_TE |= native_TE & active_T[:, None] & ~real_E
    return keep_TE


def expert_drop(topk_ids_TK, active_T, num_experts, fraction=0.1, group_T=None, num_groups=1, zero_experts=0):
    """The paper's baseline: skip the n = max(1, round(fraction * E)) least-loaded computing experts
    (load over the active tokens; ties: the lower expert first), per group of ``group_T`` (a source
    device under expert parallelism) when given.

    Returns:
        keep_TK (bool), dropped_GE (bool, (G, E)): kept native pairs and the skipped experts per group.
    """
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
