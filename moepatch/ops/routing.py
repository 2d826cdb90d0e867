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
CPU generators (``routing.route.policy_keys``), so the pairs match the reference bit for bit.  The
permutation depends only on (seed, layer, T, K, ep_size, source rank), so it is computed once, kept
on the device, and reused: after a warm-up forward at the same shape no copy happens and the layer
can be captured.

Launch count.  A patched layer calls this once per forward, so its cost is paid at every M:

- no capacity: nothing is launched; the result carries the native picks and computes its
  statistics (loads, token counts) only when they are read (:class:`LazyRoutingResult`);
- Token Drop with the ``score``, ``order`` or ``reverse`` policy in expert scope (any group,
  simulated EP or ``source_rank``) on CUDA or under the interpreter: one Triton launch
  (routing_kernels.py) computes capacities, ranks and the kept slots (groups of more than
  ``routing_kernels.SORTED_MIN_PAIRS`` pairs are first sorted by expert: one to three dispatch
  launches and two fills before it); statistics again on read;
- everything else (reroute, expanded, expert_drop, ``random``, device scope): the torch path
  below, ~100 small kernels (sorts, scatters), fine for studies but not for timing.  Token
  Reroute's first drop (score / order / reverse) and Expanded Drop's drop over its candidates
  (Token Drop by score over (T, E) slots) run on the same Triton kernel in expert scope, and the
  statistics of this path are computed on read too: 149 → 100 torch ops plus one launch for one
  reroute round, 100 → 53 plus one for expanded (counted on the CPU, T = 256, E = 8, K = 2, views
  excluded; checked against the reference at real sizes on the H200, run 8).

Legend: T tokens, E routed experts, K native experts per token, W output slots, G capacity
groups, NB buckets per group, P pairs.
"""

from __future__ import annotations

import functools
import os
import struct
from collections import OrderedDict

import torch

from ..routing.capacity import capacities, group_ids, priority_order, token_devices
from ..routing.config import RoutingConfig
from ..routing.route import RoutingResult, expanded_layout, policy_keys, renormalize_kept
from ..routing.strategies import _bucket_capacity, _flat_buckets

# Random-policy permutations kept on the device, keyed by (seed, layer, shape, EP, device); bounded so a
# long run over many shapes cannot grow without limit.
_RANDOM_ORDERS: OrderedDict = OrderedDict()
_RANDOM_ORDERS_MAX = 256


_STAT_FIELDS = ("load_before_E", "load_after_E", "tokens_G", "capacity_G", "routed_pairs", "dropped_pairs",
                "rerouted_pairs", "added_pairs")


class LazyRoutingResult(RoutingResult):
    """A :class:`RoutingResult` whose statistics are computed the first time one is read.

    The routing decision (``topk_ids_TW``, ``topk_weights_TW``) is computed eagerly; the loads,
    token counts and pair counts cost a handful of small kernels that most forwards never need
    (the patch core reads them only when ``collect_stats`` is on, and then only when the
    statistics are materialised).  The tensors they come from are kept alive until then.
    """

    def __init__(self, ids_TW: torch.Tensor, weights_TW: torch.Tensor, stats_fn):
        self.topk_ids_TW = ids_TW
        self.topk_weights_TW = weights_TW
        self._stats_fn = stats_fn

    def __getattr__(self, name):
        # Only reached for attributes not set yet, i.e. the statistics before their first read.
        fn = self.__dict__.get("_stats_fn")
        if fn is None or name not in _STAT_FIELDS:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        self.__dict__.update(fn())
        del self.__dict__["_stats_fn"]
        return self.__dict__[name]


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


def _random_order(cfg: RoutingConfig, T: int, K: int, layer: int, source_rank: int | None, device) -> torch.Tensor:
    key = (cfg.seed, layer, T, K, cfg.ep_size, source_rank, str(device))
    order = _RANDOM_ORDERS.get(key)
    if order is None:
        # The reference's keys (policy_keys: seeded CPU generators, one per source device); a stable
        # sort of them is the same permutation on any device.  NOTE: host-to-device copy, once per key.
        order = torch.sort(policy_keys(cfg, T, K, layer, source_rank), stable=True).indices.to(device)
        _RANDOM_ORDERS[key] = order
        if len(_RANDOM_ORDERS) > _RANDOM_ORDERS_MAX:
            _RANDOM_ORDERS.popitem(last=False)
    else:
        _RANDOM_ORDERS.move_to_end(key)
    return order


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
               policy, random_order_P=None):
    T, K = topk_ids_TK.shape
    G, NB = capacity_G.numel(), bucket_size_B.numel()
    token_P = _pair_tokens(T, K, topk_ids_TK.device)
    expert_P = topk_ids_TK.reshape(-1)
    valid_P = active_T[token_P]
    bucket_P, nb = _flat_buckets(group_T[token_P], expert_P, valid_P, bucket_E, NB, G)
    score_P = scores_TE.gather(1, topk_ids_TK).reshape(-1)
    order_P = random_order_P if policy == "random" else priority_order(policy, score_P, token_P)
    rank_P = bucket_rank(bucket_P, order_P, nb)
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
                  local_TE, max_experts_per_token=None, select=None):
    """Expanded Drop's kept (token, expert) candidates; ``select(cand_TE)``, if given, does the drop step."""
    T, E = scores_TE.shape
    G, NB = capacity_G.numel(), bucket_size_B.numel()
    device = scores_TE.device
    native_TE = torch.zeros(T, E, dtype=torch.bool, device=device).scatter_(1, topk_ids_TK, True)
    cand_TE = (native_TE | local_TE) & active_T[:, None]
    if select is not None:
        keep_TE = select(cand_TE)
    else:
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


def expert_drop(topk_ids_TK, active_T, num_experts, fraction, group_T, num_groups):
    """``routing.strategies.expert_drop``: each group (source device) skips its least-loaded experts."""
    E = num_experts
    n_skip = max(1, round(fraction * E))
    load_GE = _count(group_T[:, None] * E + topk_ids_TK, num_groups * E, active_T[:, None]).view(num_groups, E)
    order_GE = torch.sort(load_GE, dim=1, stable=True).indices
    dropped_GE = torch.zeros(num_groups, E, dtype=torch.bool, device=topk_ids_TK.device).scatter_(
        1, order_GE[:, :n_skip], True)
    return ~dropped_GE[group_T[:, None], topk_ids_TK] & active_T[:, None]


def route_sync_free(cfg: RoutingConfig, scores_TE: torch.Tensor, topk_ids_TK: torch.Tensor,
                    topk_weights_TK: torch.Tensor, factor_T: torch.Tensor, *, batch: int, seq: int,
                    valid_BS: torch.Tensor | None = None, layer: int = 0,
                    source_rank: int | None = None) -> RoutingResult:
    """:func:`moepatch.routing.route` without host synchronisation; same arguments, same result."""
    T, E = scores_TE.shape
    if batch * seq != T:
        raise ValueError(f"batch * seq = {batch} * {seq} does not match the {T} routed tokens")
    if cfg.unlimited:
        return LazyRoutingResult(topk_ids_TK, topk_weights_TK,
                                 lambda: _native_stats(cfg, topk_ids_TK, E, batch, seq, valid_BS, source_rank))
    if _fused_drop_applies(cfg, scores_TE, topk_ids_TK):
        return _fused_drop(cfg, scores_TE, topk_ids_TK, topk_weights_TK, batch, seq, valid_BS, source_rank)
    return _route_torch(cfg, scores_TE, topk_ids_TK, topk_weights_TK, factor_T, batch, seq, valid_BS, layer,
                        source_rank)


def _active_groups(cfg, T, batch, seq, valid_BS, source_rank, device):
    if valid_BS is None or cfg.count_padding:
        active_T = torch.ones(T, dtype=torch.bool, device=device)
    else:
        active_T = valid_BS.reshape(-1).to(device=device, dtype=torch.bool)
    group_T, G = group_ids(batch, seq, cfg.group, cfg.ep_size if source_rank is None else 1, device)
    return active_T, group_T, G


def _native_stats(cfg, topk_ids_TK, E, batch, seq, valid_BS, source_rank) -> dict:
    """Statistics of the uncapped routing (what the reference returns for γ = None)."""
    T, K = topk_ids_TK.shape
    device = topk_ids_TK.device
    active_T, group_T, G = _active_groups(cfg, T, batch, seq, valid_BS, source_rank, device)
    load_E = _count(topk_ids_TK, E, active_T[:, None])
    zero = torch.zeros((), dtype=torch.long, device=device)
    return dict(load_before_E=load_E, load_after_E=load_E, tokens_G=_count(group_T, G, active_T), capacity_G=None,
                routed_pairs=active_T.sum() * K, dropped_pairs=zero, rerouted_pairs=zero, added_pairs=zero)


# The fused Token Drop (routing_kernels.py) is used where it applies; tests switch it off to check
# the torch path against the reference too.
USE_FUSED_DROP = True
_POLICY_CODES = {"score": 0, "order": 1, "reverse": 2}


def _fused_drop_applies(cfg: RoutingConfig, scores_TE: torch.Tensor, topk_ids_TK: torch.Tensor) -> bool:
    return cfg.strategy == "drop" and cfg.policy in _POLICY_CODES and _fused_kernel_usable(cfg, scores_TE, topk_ids_TK)


def _fused_kernel_usable(cfg: RoutingConfig, scores_TE: torch.Tensor, topk_ids_TK: torch.Tensor) -> bool:
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


@functools.lru_cache(maxsize=256)
def _f64_bits(x: float) -> int:
    # Triton passes Python floats as float32; the capacity needs the reference's float64 values.
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def _drop_launch(cfg, scores_TE, ids_TS, w_TS, batch, seq, valid_BS, source_rank, native_k: int, policy: str):
    """Launch ``_capacity_drop_kernel`` over (T, S) slot ids (ids outside [0, E) are empty slots).

    S is the slots per token (the native top-k for Token Drop, E for the candidates of Expanded
    Drop); ``native_k`` the K of C = γ·T·K/E.  Returns (ids_TS with the sentinel E on dropped and
    empty slots, weights with 0 there, the kernel's statistics buffer, G, the valid mask or None).
    """
    from ..routing.capacity import _CEIL_TOLERANCE
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
    RK._capacity_drop_kernel[(G * E,)](
        ids_TK, w_TK, scores_TE, valid_T, sorted_R, start_E1, ids_TW, w_TW, stats, T, K, E, seq, ep,
        cfg.min_capacity, _f64_bits(cfg.capacity_factor * native_k), _f64_bits(_CEIL_TOLERANCE), scores_TE.stride(0),
        scores_TE.stride(1), POLICY=_POLICY_CODES[policy], GROUP_SEQ=by_seq, HAS_VALID=has_valid, BLOCK=block,
        SINGLE=single, SORTED=sorted_R is not ids_TK, SEARCH=G > 1, num_warps=8 if block >= 256 else 4)
    return ids_TW, w_TW, stats, G, valid_T if has_valid else None


def _fused_drop(cfg, scores_TE, topk_ids_TK, topk_weights_TK, batch, seq, valid_BS, source_rank) -> RoutingResult:
    """Token Drop (score / order / reverse, expert scope) in one launch of ``_capacity_drop_kernel``."""
    T, E = scores_TE.shape
    K = topk_ids_TK.shape[1]
    device = scores_TE.device
    ids_TW, w_TW, stats, G, valid_T = _drop_launch(cfg, scores_TE, topk_ids_TK, topk_weights_TK, batch, seq,
                                                   valid_BS, source_rank, K, cfg.policy)
    if cfg.renormalize == "kept":
        active_T = valid_T if valid_T is not None else torch.ones(T, dtype=torch.bool, device=device)
        w_TW = renormalize_kept(w_TW, topk_weights_TK, active_T)

    def stats_fn():
        GE = G * E
        after_GE = stats[GE:2 * GE].view(G, E)
        tokens_G = stats[2 * GE:2 * GE + G]
        routed = tokens_G.sum() * K
        zero = torch.zeros((), dtype=torch.long, device=device)
        return dict(load_before_E=stats[:GE].view(G, E).sum(0), load_after_E=after_GE.sum(0), tokens_G=tokens_G,
                    capacity_G=stats[2 * GE + G:], routed_pairs=routed, dropped_pairs=routed - after_GE.sum(),
                    rerouted_pairs=zero, added_pairs=zero)

    return LazyRoutingResult(ids_TW, w_TW, stats_fn)


def _route_torch(cfg, scores_TE, topk_ids_TK, topk_weights_TK, factor_T, batch, seq, valid_BS, layer,
                 source_rank) -> RoutingResult:
    """Every strategy with small torch kernels (the general path; see the module docstring).

    The statistics (loads, pair counts) are computed when first read, as on the fused path.
    """
    T, E = scores_TE.shape
    K = topk_ids_TK.shape[1]
    device = scores_TE.device
    active_T, group_T, G = _active_groups(cfg, T, batch, seq, valid_BS, source_rank, device)

    def token_dev():
        if source_rank is None:
            return token_devices(T, cfg.ep_size, device)
        return torch.full((T,), source_rank, dtype=torch.long, device=device)

    tokens_G = _count(group_T, G, active_T)
    if cfg.capacity_scope == "expert":
        bucket_E = torch.arange(E, device=device)
        bucket_size_B = torch.ones(E, dtype=torch.long, device=device)
    else:
        bucket_E = _expert_devices(E, cfg.ep_size, device)
        bucket_size_B = _count(bucket_E, cfg.ep_size)
    capacity_G = None
    if cfg.strategy != "expert_drop":
        capacity_G = capacities(tokens_G, K, E, cfg.capacity_factor, cfg.min_capacity)
    moved_TK = extra_TE = None

    def random_order():
        return _random_order(cfg, T, K, layer, source_rank, device) if cfg.policy == "random" else None

    if cfg.strategy in ("drop", "expert_drop"):
        if cfg.strategy == "drop":
            keep_TK = token_drop(scores_TE, topk_ids_TK, active_T, group_T, capacity_G, bucket_E,
                                 bucket_size_B, cfg.policy, random_order())
        else:
            # Each source device skips the experts least loaded by its own tokens (the reference's rule).
            if source_rank is None:
                keep_TK = expert_drop(topk_ids_TK, active_T, E, cfg.expert_drop_fraction, token_dev(), cfg.ep_size)
            else:
                keep_TK = expert_drop(topk_ids_TK, active_T, E, cfg.expert_drop_fraction,
                                      torch.zeros(T, dtype=torch.long, device=device), 1)
        ids_TW = torch.where(keep_TK, topk_ids_TK, E)
        w_TW = torch.where(keep_TK, topk_weights_TK, 0.0)
    elif cfg.strategy == "reroute":
        if cfg.policy in _POLICY_CODES and _fused_kernel_usable(cfg, scores_TE, topk_ids_TK):
            # The first step is Token Drop: one launch of the fused kernel instead of ~25 torch ops.
            keep_TK = _drop_launch(cfg, scores_TE, topk_ids_TK, topk_weights_TK, batch, seq, valid_BS, source_rank,
                                   K, cfg.policy)[0] < E
        else:
            keep_TK = token_drop(scores_TE, topk_ids_TK, active_T, group_T, capacity_G, bucket_E,
                                 bucket_size_B, cfg.policy, random_order())
        ids_TK, keep_TK, moved_TK = token_reroute(scores_TE, topk_ids_TK, keep_TK, active_T, group_T,
                                                  capacity_G, bucket_E, bucket_size_B,
                                                  cfg.reroute_target, cfg.reroute_rounds)
        moved_w_TK = (scores_TE.gather(1, ids_TK) * factor_T[:, None]).to(topk_weights_TK.dtype)
        ids_TW = torch.where(keep_TK, ids_TK, E)
        w_TW = torch.where(moved_TK, moved_w_TK, torch.where(keep_TK, topk_weights_TK, 0.0))
    else:  # expanded
        if cfg.local_experts == "all" or cfg.ep_size == 1:
            local_TE = torch.ones(T, E, dtype=torch.bool, device=device)
            m = E
        else:
            local_TE = _expert_devices(E, cfg.ep_size, device)[None, :] == token_dev()[:, None]
            m = -(-E // cfg.ep_size)
        select = None
        if _fused_kernel_usable(cfg, scores_TE, topk_ids_TK):
            # The candidates' drop is Token Drop over (T, E) slots by score: one launch of the fused kernel.
            e_TE = torch.arange(E, device=device).expand(T, E)

            def select(cand_TE):
                ids_TE = torch.where(cand_TE, e_TE, E)
                return _drop_launch(cfg, scores_TE, ids_TE, scores_TE, batch, seq, valid_BS, source_rank, K,
                                    "score")[0] < E
        keep_TE = expanded_drop(scores_TE, topk_ids_TK, active_T, group_T, capacity_G, bucket_E, bucket_size_B,
                                local_TE, cfg.max_experts_per_token, select)
        keep_TK = keep_TE.gather(1, topk_ids_TK)
        ids_TW, w_TW, extra_TE = expanded_layout(keep_TE, topk_ids_TK, topk_weights_TK, scores_TE, factor_T,
                                                 keep_TK, min(E, K + m))

    if cfg.renormalize == "kept":
        w_TW = renormalize_kept(w_TW, topk_weights_TK, active_T)

    def stats_fn():
        routed = active_T.sum() * K
        zero = torch.zeros((), dtype=torch.long, device=device)
        return dict(load_before_E=_count(topk_ids_TK, E, active_T[:, None]),
                    load_after_E=_count(ids_TW, E + 1)[:E], tokens_G=tokens_G, capacity_G=capacity_G,
                    routed_pairs=routed, dropped_pairs=routed - keep_TK.sum(),
                    rerouted_pairs=moved_TK.sum() if moved_TK is not None else zero,
                    added_pairs=extra_TE.sum() if extra_TE is not None else zero)

    return LazyRoutingResult(ids_TW, w_TW, stats_fn)
