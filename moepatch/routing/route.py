"""One routing decision for one MoE layer and one forward in fixed-size tensor ops (no host sync,
capturable in a CUDA graph): the reference every kernel matches, and what runs.

Legend: B sequences of S positions, T = B * S tokens (batch-major), E routed experts, K native
experts per token, W output slots per token, G capacity groups, Z zero-computation experts (ids
E .. E+Z-1, last).  Dropped slots hold the sentinel E + Z with weight 0.  docs/semantics.md has the
rules, zero-computation experts included.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, fields

import torch

from .capacity import capacities, chunk_sizes, count, expert_devices, group_ids, random_keys, token_devices
from .config import RoutingConfig
from .strategies import expanded_drop, expert_drop, token_drop, token_reroute

# Random-policy orders on the device per (seed, layer, shape, EP, device); bounded for runs over many shapes.
_RANDOM_ORDERS: OrderedDict = OrderedDict()
_RANDOM_ORDERS_MAX = 256


@dataclass
class RoutingResult:
    """Output of :func:`route`; every tensor stays on the routing device (no host sync).

    Attributes:
        topk_ids_TW: (T, W) int64 expert of each slot, E + Z where the slot is empty.
        topk_weights_TW: (T, W) combine weights in the native weights' dtype, 0 on empty slots.
        tokens_G: (G,) int64 real tokens per capacity group; capacity_G: (G,) int64 or None.
        load_before_E / load_after_E: (E,) int64 pairs per computing expert before / after capacity.
        routed_pairs / dropped_pairs / rerouted_pairs / added_pairs / identity_pairs: int64 scalars, the
            real tokens' native pairs on computing experts / left without an expert / moved / added
            by expanded drop / on zero-computation experts (None: a family without them).
        The loads and pair counts are None under ``collect_stats=False`` (they cost ~20 small kernels).
    """

    topk_ids_TW: torch.Tensor
    topk_weights_TW: torch.Tensor
    tokens_G: torch.Tensor | None = None
    capacity_G: torch.Tensor | None = None
    load_before_E: torch.Tensor | None = None
    load_after_E: torch.Tensor | None = None
    routed_pairs: torch.Tensor | None = None
    dropped_pairs: torch.Tensor | None = None
    rerouted_pairs: torch.Tensor | None = None
    added_pairs: torch.Tensor | None = None
    identity_pairs: torch.Tensor | None = None


# The statistics of a RoutingResult (everything but the decision), in field order.
STAT_FIELDS = tuple(f.name for f in fields(RoutingResult))[2:]


def expanded_layout(keep_TE, topk_ids_TK, topk_weights_TK, scores_TE, factor_T, keep_TK, width):
    """Expanded drop's (ids_TW, w_TW, extra_TE) from its (T, E) keep mask: native picks keep their
    slots (sentinel E where dropped), extra experts follow in ascending order with weight
    s[t, e] * factor[t]; everything else lands in a trash column W, cut off afterwards."""
    T, E = keep_TE.shape
    K = topk_ids_TK.shape[1]
    device = keep_TE.device
    native_TE = torch.zeros_like(keep_TE).scatter_(1, topk_ids_TK, True)
    extra_TE = keep_TE & ~native_TE
    n_extra = width - K
    slot_TE = torch.where(extra_TE, K + torch.cumsum(extra_TE.long(), dim=1) - 1, width)
    ids_TX = torch.cat([torch.where(keep_TK, topk_ids_TK, E),
                        torch.full((T, n_extra + 1), E, dtype=torch.long, device=device)], dim=1)
    ids_TX.scatter_(1, slot_TE, torch.arange(E, device=device).expand(T, E))
    w_dtype = topk_weights_TK.dtype
    w_TX = torch.cat([torch.where(keep_TK, topk_weights_TK, torch.zeros_like(topk_weights_TK)),
                      torch.zeros((T, n_extra + 1), dtype=w_dtype, device=device)], dim=1)
    w_TX.scatter_(1, slot_TE, (scores_TE * factor_T[:, None]).to(w_dtype))
    return ids_TX[:, :width].contiguous(), w_TX[:, :width].contiguous(), extra_TE


def renormalize_kept(w_TW, topk_weights_TK, active_T):
    """``renormalize="kept"``: each token's kept weights rescaled to its native weights' sum (0 if none kept)."""
    native_T = torch.where(active_T, topk_weights_TK.float().sum(1), 0.0)
    kept_T = w_TW.float().sum(1)
    scale_T = torch.where(kept_T > 0, native_T / torch.where(kept_T > 0, kept_T, 1.0), 0.0)
    return (w_TW.float() * scale_T[:, None]).to(w_TW.dtype)


def random_order(cfg: RoutingConfig, T: int, K: int, layer: int, source_rank: int | None, device) -> torch.Tensor:
    """The ``random`` policy's priority order (P,) on ``device``, keys seeded per (seed, layer, source device)
    so a simulated device draws what its real rank would; cached per shape, so a warm route can be captured."""
    key = (cfg.seed, layer, T, K, cfg.ep_size, source_rank, str(device))
    order = _RANDOM_ORDERS.get(key)
    if order is None:
        if source_rank is not None:
            keys_P = random_keys(cfg.seed, layer, [T * K], first_device=source_rank)
        else:
            keys_P = random_keys(cfg.seed, layer, [n * K for n in chunk_sizes(T, cfg.ep_size)])
        # NOTE: host sync (host-to-device copy), once per key.
        order = torch.sort(keys_P, stable=True).indices.to(device)
        _RANDOM_ORDERS[key] = order
        if len(_RANDOM_ORDERS) > _RANDOM_ORDERS_MAX:
            _RANDOM_ORDERS.popitem(last=False)
    else:
        _RANDOM_ORDERS.move_to_end(key)
    return order


def route(cfg: RoutingConfig, scores_TE: torch.Tensor, topk_ids_TK: torch.Tensor, topk_weights_TK: torch.Tensor,
          factor_T: torch.Tensor | None, *, batch: int, seq: int, valid_BS: torch.Tensor | None = None,
          layer: int = 0, source_rank: int | None = None, zero_experts: int = 0, drop=None) -> RoutingResult:
    """Apply capacity-aware routing to one layer's native top-k decision.

    Args:
        scores_TE: (T, E + Z) float32 family scores s[t, e], zero-computation experts last.
        topk_ids_TK: (T, K) int64 native picks; topk_weights_TK: (T, K) native combine weights.
        factor_T: (T,) float32, expert e weighs s[t, e] * factor_T[t]; read by reroute and expanded only.
        batch, seq: T = B * S, batch-major; valid_BS: (B, S) bool, False at padding, None: all real.
        layer: seeds the ``random`` policy.
        source_rank: under real EP, the rank all T tokens sit on (its experts are their local ones);
            None simulates ``cfg.ep_size`` devices.  zero_experts: Z, no capacity and on no device.
        drop: ``drop(ids_TS, weights_TS, policy) -> keep_TS`` (bool), a fused Token Drop over (T, S) slot
            ids (>= E: empty) choosing the pairs this function would (moepatch.ops.route); Z = 0 only.
    """
    T, E_all = scores_TE.shape
    Z = int(zero_experts)
    E = E_all - Z
    K = topk_ids_TK.shape[1]
    device = scores_TE.device
    if batch * seq != T:
        raise ValueError(f"batch * seq = {batch} * {seq} does not match the {T} routed tokens")
    if cfg.unlimited and not cfg.collect_stats:
        return RoutingResult(topk_ids_TK, topk_weights_TK)
    if valid_BS is None or cfg.count_padding:
        active_T = torch.ones(T, dtype=torch.bool, device=device)
    else:
        active_T = valid_BS.reshape(-1).to(device=device, dtype=torch.bool)
    group_T, G = group_ids(batch, seq, cfg.group, cfg.ep_size if source_rank is None else 1, device)
    tokens_G = count(group_T, G, active_T)
    zero_TK = (topk_ids_TK >= E) & active_T[:, None] if Z else None
    capacity_G = None

    def result(ids_TW, w_TW, keep_TK=None, moved_TK=None, extra_TE=None):  # keep_TK None: unlimited
        if not cfg.collect_stats:
            return RoutingResult(ids_TW, w_TW, tokens_G, capacity_G)
        native = active_T.sum() * K  # every native pair of the real tokens, zero experts included
        identity = zero_TK.sum() if Z else None
        zero = torch.zeros((), dtype=torch.long, device=device)
        load_before_E = count(topk_ids_TK, E_all, active_T[:, None])[:E]
        routed = native if identity is None else native - identity
        if keep_TK is None:
            return RoutingResult(ids_TW, w_TW, tokens_G, None, load_before_E, load_before_E, routed, zero, zero, zero,
                                 identity)
        # Zero-expert pairs of real tokens are always kept, so the difference counts computing pairs only.
        return RoutingResult(ids_TW, w_TW, tokens_G, capacity_G, load_before_E, count(ids_TW, E_all + 1)[:E], routed,
                             native - keep_TK.sum(), zero if moved_TK is None else moved_TK.sum(),
                             zero if extra_TE is None else extra_TE.sum(), identity)

    if cfg.unlimited:
        return result(topk_ids_TK, topk_weights_TK)
    moved_TK = extra_TE = None  # set by reroute / expanded drop

    def token_dev():
        if source_rank is None:
            return token_devices(T, cfg.ep_size, device)
        return torch.full((T,), source_rank, dtype=torch.long, device=device)

    if cfg.capacity_scope == "expert":
        bucket_E = torch.arange(E, device=device)
        bucket_size_B = torch.ones(E, dtype=torch.long, device=device)
    else:
        bucket_E = expert_devices(E, cfg.ep_size, device)
        bucket_size_B = count(bucket_E, cfg.ep_size)
    if Z:
        # Zero-computation experts belong to no bucket; the strategies ignore their entries.
        bucket_E = torch.cat([bucket_E, bucket_E.new_zeros(Z)])
    if cfg.strategy != "expert_drop":
        if Z:
            # The mean load counts the pairs on computing experts only: N̄ = P_g / E.
            pairs_G = count(group_T[:, None].expand(T, K), G, active_T[:, None] & ~zero_TK)
            capacity_G = capacities(pairs_G, 1, E, cfg.capacity_factor, cfg.min_capacity)
        else:
            capacity_G = capacities(tokens_G, K, E, cfg.capacity_factor, cfg.min_capacity)

    def first_drop():
        if drop is not None:
            return drop(topk_ids_TK, topk_weights_TK, cfg.policy)
        order_P = random_order(cfg, T, K, layer, source_rank, device) if cfg.policy == "random" else None
        return token_drop(scores_TE, topk_ids_TK, active_T, group_T, capacity_G, bucket_E, bucket_size_B,
                          cfg.policy, zero_experts=Z, order_P=order_P)

    if cfg.strategy in ("drop", "expert_drop"):
        if cfg.strategy == "drop":
            keep_TK = first_drop()
        else:
            # Each source device skips the experts least loaded by its own tokens (all it knows under EP).
            n_dev = 1 if source_rank is not None else cfg.ep_size
            keep_TK, _ = expert_drop(topk_ids_TK, active_T, E_all, cfg.expert_drop_fraction,
                                     token_dev() if source_rank is None else None, n_dev, zero_experts=Z)
        ids_TW = torch.where(keep_TK, topk_ids_TK, E_all)
        w_TW = torch.where(keep_TK, topk_weights_TK, 0.0)
    elif cfg.strategy == "reroute":
        ids_TK, keep_TK, moved_TK = token_reroute(scores_TE, topk_ids_TK, first_drop(), active_T, group_T,
                                                  capacity_G, bucket_E, bucket_size_B,
                                                  cfg.reroute_target, cfg.reroute_rounds, zero_experts=Z)
        moved_w_TK = (scores_TE.gather(1, ids_TK) * factor_T[:, None]).to(topk_weights_TK.dtype)
        ids_TW = torch.where(keep_TK, ids_TK, E_all)
        w_TW = torch.where(moved_TK, moved_w_TK, torch.where(keep_TK, topk_weights_TK, 0.0))
    else:  # expanded
        if cfg.local_experts == "all" or cfg.ep_size == 1:
            local_TE = torch.ones(T, E_all, dtype=torch.bool, device=device)
            m = E
        else:
            dev_E = expert_devices(E, cfg.ep_size, device)
            # Zero-computation experts sit on no device (-1): never local.
            dev_all_E = torch.cat([dev_E, dev_E.new_full((Z,), -1)]) if Z else dev_E
            local_TE = dev_all_E[None, :] == token_dev()[:, None]
            m = -(-E // cfg.ep_size)  # the largest device block of expert_devices
        select = None
        if drop is not None:
            # The candidates' drop is Token Drop by score over (T, E) slots.
            e_TE = torch.arange(E, device=device).expand(T, E)

            def select(cand_TE):
                return drop(torch.where(cand_TE, e_TE, E), scores_TE, "score")

        keep_TE = expanded_drop(scores_TE, topk_ids_TK, active_T, group_T, capacity_G, bucket_E, bucket_size_B,
                                local_TE, cfg.max_experts_per_token, zero_experts=Z, select=select)
        keep_TK = keep_TE.gather(1, topk_ids_TK)
        ids_TW, w_TW, extra_TE = expanded_layout(keep_TE, topk_ids_TK, topk_weights_TK, scores_TE, factor_T,
                                                 keep_TK, min(E_all, K + m))

    if cfg.renormalize == "kept":
        w_TW = renormalize_kept(w_TW, topk_weights_TK, active_T)

    return result(ids_TW, w_TW, keep_TK, moved_TK, extra_TE)
