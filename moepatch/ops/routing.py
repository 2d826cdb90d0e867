"""Capacity-aware routing without host synchronisation, for the Triton backend.

:func:`route_sync_free` has the signature and the result of :func:`moepatch.routing.route` and
chooses exactly the same pairs (ties included) for every strategy, policy and option; the tests
check it against the reference on random scores with exact ties.  It differs only in *how* it
computes, so that a patched layer can be captured in a CUDA graph:

- every count is a fixed-size ``scatter_add_`` (``torch.bincount`` sizes its output from the data
  and boolean indexing sizes it from the mask: both copy a number to the host);
- reroute runs exactly ``cfg.reroute_rounds`` rounds; the reference stops early when nothing
  moved, and a round after that point changes nothing, so the result is the same;
- the expert-to-device map is computed on the device instead of being copied from the host.

The one exception is the ``random`` policy: its priority keys come from the reference's seeded
CPU generator, so the pairs match the reference bit for bit.  The permutation depends only on
(seed, layer, number of pairs), so it is computed once, kept on the device, and reused: after a
warm-up forward at the same shape no copy happens and the layer can be captured.

Legend: T tokens, E routed experts, K native experts per token, W output slots, G capacity
groups, NB buckets per group, P pairs.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from ..routing.capacity import capacities, group_ids, priority_order, token_devices
from ..routing.config import RoutingConfig
from ..routing.route import RoutingResult, _generator
from ..routing.strategies import _bucket_capacity, _flat_buckets

# Random-policy permutations kept on the device, keyed by (seed, layer, P, device); bounded so a
# long run over many shapes cannot grow without limit.
_RANDOM_ORDERS: OrderedDict = OrderedDict()
_RANDOM_ORDERS_MAX = 256


def _count(index: torch.Tensor, size: int, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Fixed-size histogram (size,) int64 of ``index`` (values in [0, size)), optionally weighted by a bool mask."""
    src = torch.ones_like(index, dtype=torch.long) if weight is None else weight.to(torch.long).expand_as(index)
    return torch.zeros(size, dtype=torch.long, device=index.device).scatter_add_(
        0, index.reshape(-1), src.reshape(-1))


def _expert_devices(num_experts: int, ep_size: int, device) -> torch.Tensor:
    """Same map as ``routing.capacity.expert_devices`` (``tensor_split`` blocks), built on the device."""
    q, r = divmod(num_experts, ep_size)  # ep_size <= num_experts is validated, so q >= 1
    e_E = torch.arange(num_experts, device=device)
    boundary = r * (q + 1)
    return torch.where(e_E < boundary, e_E // (q + 1), r + (e_E - boundary) // q)


def _random_order(num_pairs: int, seed: int, layer: int, device) -> torch.Tensor:
    key = (seed, layer, num_pairs, str(device))
    order = _RANDOM_ORDERS.get(key)
    if order is None:
        # The reference's keys, from its own generator; a stable sort of distinct keys is the
        # same permutation on any device.  NOTE: host-to-device copy, once per (seed, layer, P).
        keys = torch.rand(num_pairs, generator=_generator(seed, layer), dtype=torch.float64)
        order = torch.sort(keys, stable=True).indices.to(device)
        _RANDOM_ORDERS[key] = order
        if len(_RANDOM_ORDERS) > _RANDOM_ORDERS_MAX:
            _RANDOM_ORDERS.popitem(last=False)
    else:
        _RANDOM_ORDERS.move_to_end(key)
    return order


def _priority(policy: str, score_P, token_P, seed: int, layer: int) -> torch.Tensor:
    if policy == "random":
        return _random_order(score_P.numel(), seed, layer, score_P.device)
    return priority_order(policy, score_P, token_P)


def bucket_rank(bucket_P: torch.Tensor, order_P: torch.Tensor, num_buckets: int) -> torch.Tensor:
    """``routing.capacity.bucket_rank`` with a fixed-size count and a scatter instead of bincount."""
    P = bucket_P.numel()
    sorted_bucket, perm = torch.sort(bucket_P[order_P], stable=True)
    pair_at = order_P[perm]
    counts_B = _count(sorted_bucket, num_buckets)
    starts_B = torch.cumsum(counts_B, 0) - counts_B
    rank_sorted = torch.arange(P, device=bucket_P.device) - starts_B[sorted_bucket]
    return torch.empty_like(rank_sorted).scatter_(0, pair_at, rank_sorted)


def _pair_tokens(T: int, width: int, device) -> torch.Tensor:
    # Token of each pair in token-major order; arange // width avoids repeat_interleave's size query.
    return torch.arange(T * width, device=device) // width


def token_drop(scores_TE, topk_ids_TK, active_T, group_T, capacity_G, bucket_E, bucket_size_B,
               policy, seed, layer):
    T, K = topk_ids_TK.shape
    G, NB = capacity_G.numel(), bucket_size_B.numel()
    token_P = _pair_tokens(T, K, topk_ids_TK.device)
    expert_P = topk_ids_TK.reshape(-1)
    valid_P = active_T[token_P]
    bucket_P, nb = _flat_buckets(group_T[token_P], expert_P, valid_P, bucket_E, NB, G)
    score_P = scores_TE.gather(1, topk_ids_TK).reshape(-1)
    rank_P = bucket_rank(bucket_P, _priority(policy, score_P, token_P, seed, layer), nb)
    keep_P = rank_P < _bucket_capacity(capacity_G, bucket_size_B)[bucket_P]
    return (keep_P & valid_P).view(T, K)


def _bucket_load(group_T, ids_TK, keep_TK, bucket_E, num_groups, num_buckets):
    T, K = ids_TK.shape
    token_P = _pair_tokens(T, K, ids_TK.device)
    b_P = group_T[token_P] * num_buckets + bucket_E[ids_TK.reshape(-1)]
    return _count(b_P, num_groups * num_buckets, keep_TK.reshape(-1)).view(num_groups, num_buckets)


def token_reroute(scores_TE, topk_ids_TK, keep_TK, active_T, group_T, capacity_G, bucket_E, bucket_size_B,
                  target, rounds):
    """``routing.strategies.token_reroute`` for exactly ``rounds`` rounds (see the module docstring)."""
    T, K = topk_ids_TK.shape
    E = scores_TE.shape[1]
    G, NB = capacity_G.numel(), bucket_size_B.numel()
    device = topk_ids_TK.device
    ids_TK = topk_ids_TK.clone()
    keep_TK = keep_TK.clone()
    rerouted_TK = torch.zeros_like(keep_TK)
    spare_GB = capacity_G[:, None] * bucket_size_B[None, :] - _bucket_load(
        group_T, ids_TK, keep_TK, bucket_E, G, NB)
    picked_TE = torch.zeros(T, E, dtype=torch.bool, device=device).scatter_(1, topk_ids_TK, True)
    unplaced_TK = active_T[:, None] & ~keep_TK
    token_P = _pair_tokens(T, K, device)
    if target not in ("score", "least_loaded"):
        raise ValueError(f"unknown reroute_target {target!r}; accepted: 'score', 'least_loaded'")
    for _ in range(rounds):
        spare_TE = spare_GB[group_T][:, bucket_E]
        avail_TE = ~picked_TE & (spare_TE > 0)
        key_TE = scores_TE if target == "score" else spare_TE.float()
        key_TE = torch.where(avail_TE, key_TE, torch.full_like(key_TE, -torch.inf))
        cand_TE = torch.sort(key_TE, dim=1, descending=True, stable=True).indices
        n_avail_T = avail_TE.sum(1)
        slot_rank_TK = torch.cumsum(unplaced_TK.long(), dim=1) - 1
        proposing_TK = unplaced_TK & (slot_rank_TK < n_avail_T[:, None])
        target_TK = cand_TE.gather(1, slot_rank_TK.clamp(0, E - 1))
        prop_P = proposing_TK.reshape(-1)
        tgt_P = target_TK.reshape(-1)
        bucket_P, nb = _flat_buckets(group_T[token_P], tgt_P, prop_P, bucket_E, NB, G)
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
        spare_GB = spare_GB - _count(bucket_P, nb, admit_P)[:-1].view(G, NB)
    return ids_TK, keep_TK, rerouted_TK


def expanded_drop(scores_TE, topk_ids_TK, active_T, group_T, capacity_G, bucket_E, bucket_size_B,
                  local_TE, max_experts_per_token=None):
    T, E = scores_TE.shape
    G, NB = capacity_G.numel(), bucket_size_B.numel()
    device = scores_TE.device
    native_TE = torch.zeros(T, E, dtype=torch.bool, device=device).scatter_(1, topk_ids_TK, True)
    cand_TE = (native_TE | local_TE) & active_T[:, None]
    token_P = _pair_tokens(T, E, device)
    expert_P = torch.arange(E, device=device).repeat(T)
    valid_P = cand_TE.reshape(-1)
    bucket_P, nb = _flat_buckets(group_T[token_P], expert_P, valid_P, bucket_E, NB, G)
    rank_P = bucket_rank(bucket_P, priority_order("score", scores_TE.reshape(-1), token_P), nb)
    keep_TE = (valid_P & (rank_P < _bucket_capacity(capacity_G, bucket_size_B)[bucket_P])).view(T, E)
    if max_experts_per_token is not None and max_experts_per_token < E:
        key_TE = torch.where(keep_TE, scores_TE, torch.full_like(scores_TE, -torch.inf))
        best_TM = torch.sort(key_TE, dim=1, descending=True, stable=True).indices[:, :max_experts_per_token]
        keep_TE &= torch.zeros_like(keep_TE).scatter_(1, best_TM, True)
    return keep_TE


def expert_drop(topk_ids_TK, active_T, num_experts, fraction):
    n_skip = max(1, round(fraction * num_experts))
    load_E = _count(topk_ids_TK, num_experts, active_T[:, None])
    order_E = torch.sort(load_E, stable=True).indices
    dropped_E = torch.zeros(num_experts, dtype=torch.bool, device=topk_ids_TK.device).scatter_(
        0, order_E[:n_skip], True)
    return ~dropped_E[topk_ids_TK] & active_T[:, None]


def route_sync_free(cfg: RoutingConfig, scores_TE: torch.Tensor, topk_ids_TK: torch.Tensor,
                    topk_weights_TK: torch.Tensor, factor_T: torch.Tensor, *, batch: int, seq: int,
                    valid_BS: torch.Tensor | None = None, layer: int = 0,
                    source_rank: int | None = None) -> RoutingResult:
    """:func:`moepatch.routing.route` without host synchronisation; same arguments, same result."""
    T, E = scores_TE.shape
    K = topk_ids_TK.shape[1]
    device = scores_TE.device
    if batch * seq != T:
        raise ValueError(f"batch * seq = {batch} * {seq} does not match the {T} routed tokens")
    if valid_BS is None or cfg.count_padding:
        active_T = torch.ones(T, dtype=torch.bool, device=device)
    else:
        active_T = valid_BS.reshape(-1).to(device=device, dtype=torch.bool)
    if source_rank is None:
        group_T, G = group_ids(batch, seq, cfg.group, cfg.ep_size, device)
        token_dev_T = token_devices(T, cfg.ep_size, device)
    else:
        group_T, G = group_ids(batch, seq, cfg.group, 1, device)
        token_dev_T = torch.full((T,), source_rank, dtype=torch.long, device=device)
    tokens_G = _count(group_T, G, active_T)
    load_before_E = _count(topk_ids_TK, E, active_T[:, None])
    routed = active_T.sum() * K
    zero = torch.zeros((), dtype=torch.long, device=device)

    if cfg.unlimited:
        return RoutingResult(topk_ids_TK, topk_weights_TK, load_before_E, load_before_E, tokens_G, None,
                             routed, zero, zero, zero)

    dev_E = _expert_devices(E, cfg.ep_size, device)
    if cfg.capacity_scope == "expert":
        bucket_E = torch.arange(E, device=device)
        bucket_size_B = torch.ones(E, dtype=torch.long, device=device)
    else:
        bucket_E = dev_E
        bucket_size_B = _count(dev_E, cfg.ep_size)
    capacity_G = None
    if cfg.strategy != "expert_drop":
        capacity_G = capacities(tokens_G, K, E, cfg.capacity_factor, cfg.min_capacity)
    sentinel = torch.full_like(topk_ids_TK, E)
    w_zero = torch.zeros_like(topk_weights_TK)
    rerouted = added = zero

    if cfg.strategy in ("drop", "expert_drop"):
        if cfg.strategy == "drop":
            keep_TK = token_drop(scores_TE, topk_ids_TK, active_T, group_T, capacity_G, bucket_E,
                                 bucket_size_B, cfg.policy, cfg.seed, layer)
        else:
            keep_TK = expert_drop(topk_ids_TK, active_T, E, cfg.expert_drop_fraction)
        ids_TW = torch.where(keep_TK, topk_ids_TK, sentinel)
        w_TW = torch.where(keep_TK, topk_weights_TK, w_zero)
        dropped = routed - keep_TK.sum()
    elif cfg.strategy == "reroute":
        keep_TK = token_drop(scores_TE, topk_ids_TK, active_T, group_T, capacity_G, bucket_E,
                             bucket_size_B, cfg.policy, cfg.seed, layer)
        ids_TK, placed_TK, moved_TK = token_reroute(scores_TE, topk_ids_TK, keep_TK, active_T, group_T,
                                                    capacity_G, bucket_E, bucket_size_B,
                                                    cfg.reroute_target, cfg.reroute_rounds)
        moved_w_TK = (scores_TE.gather(1, ids_TK) * factor_T[:, None]).to(topk_weights_TK.dtype)
        ids_TW = torch.where(placed_TK, ids_TK, sentinel)
        w_TW = torch.where(moved_TK, moved_w_TK, torch.where(placed_TK, topk_weights_TK, w_zero))
        dropped = routed - placed_TK.sum()
        rerouted = moved_TK.sum()
    else:  # expanded
        if cfg.local_experts == "all" or cfg.ep_size == 1:
            local_TE = torch.ones(T, E, dtype=torch.bool, device=device)
            m = E
        else:
            local_TE = dev_E[None, :] == token_dev_T[:, None]
            m = -(-E // cfg.ep_size)
        keep_TE = expanded_drop(scores_TE, topk_ids_TK, active_T, group_T, capacity_G, bucket_E, bucket_size_B,
                                local_TE, cfg.max_experts_per_token)
        keep_TK = keep_TE.gather(1, topk_ids_TK)
        native_TE = torch.zeros_like(keep_TE).scatter_(1, topk_ids_TK, True)
        extra_TE = keep_TE & ~native_TE
        n_extra = min(E, K + m) - K
        W = K + n_extra
        # Extra experts go to consecutive slots after the native ones, in ascending expert order;
        # every other (token, expert) is scattered into a trash column W that is cut off after.
        slot_TE = torch.where(extra_TE, K + torch.cumsum(extra_TE.long(), dim=1) - 1, W)
        ids_TX = torch.cat([torch.where(keep_TK, topk_ids_TK, sentinel),
                            torch.full((T, n_extra + 1), E, dtype=torch.long, device=device)], dim=1)
        ids_TX.scatter_(1, slot_TE, torch.arange(E, device=device).expand(T, E))
        extra_w_TE = (scores_TE * factor_T[:, None]).to(topk_weights_TK.dtype)
        w_TX = torch.cat([torch.where(keep_TK, topk_weights_TK, w_zero),
                          torch.zeros((T, n_extra + 1), dtype=topk_weights_TK.dtype, device=device)], dim=1)
        w_TX.scatter_(1, slot_TE, extra_w_TE)
        ids_TW, w_TW = ids_TX[:, :W].contiguous(), w_TX[:, :W].contiguous()
        dropped = routed - keep_TK.sum()
        added = extra_TE.sum()

    if cfg.renormalize == "kept":
        native_T = torch.where(active_T, topk_weights_TK.float().sum(1), 0.0)
        kept_T = w_TW.float().sum(1)
        scale_T = torch.where(kept_T > 0, native_T / torch.where(kept_T > 0, kept_T, 1.0), 0.0)
        w_TW = (w_TW.float() * scale_T[:, None]).to(w_TW.dtype)

    load_after_E = _count(ids_TW, E + 1)[:E]
    return RoutingResult(ids_TW, w_TW, load_before_E, load_after_E, tokens_G, capacity_G,
                         routed, dropped, rerouted, added)
