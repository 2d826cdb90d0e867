"""Capacity-aware routing written from the spec (docs/semantics.md) as slow per-token Python loops.

The test oracle for moepatch.routing, which is both the reference and what runs: this file reads
only its inputs (a RoutingConfig's fields and plain tensors) and imports nothing from the package,
so a change in the vectorised code cannot move its tests along with it.

Where the spec leaves a tie open, the rule is written here once: pairs of one expert tie toward
the lower token, then the lower native slot; a token's candidates tie toward the lower expert.

Legend: T tokens, E computing experts, Z zero-computation experts (ids E .. E+Z-1), K native picks
per token, W output slots, G capacity groups, D expert-parallel devices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import torch


def capacity(pairs: int, num_experts: int, gamma: float, min_capacity: int = 0) -> int:
    """C = max(min_capacity, ceil(γ · pairs / E)) with pairs = T·k, in exact arithmetic.

    γ is taken as the decimal it is written as (``1.1`` is 11/10, not the float 1.1000000000000000888),
    so ceil(1.1 · 80 / 8) is 11.
    """
    return max(int(min_capacity), math.ceil(Fraction(repr(float(gamma))) * pairs / num_experts))


def device_blocks(num_experts: int, num_devices: int) -> list[int]:
    """Device of each expert: contiguous blocks, the first E % D devices hold one expert more."""
    q, r = divmod(num_experts, num_devices)
    out = []
    for d in range(num_devices):
        out += [d] * (q + (d < r))
    return out


def token_device(t: int, num_tokens: int, num_devices: int) -> int:
    """Simulated source device of token t: the batch-major token list cut into D contiguous chunks."""
    return t * num_devices // num_tokens


def _priority(policy, s, ids, keys):
    """Sort key of pair (t, j) for a drop policy: smaller first (ties: lower token, then lower slot)."""
    K = len(ids[0]) if ids else 0
    if policy == "score":
        return lambda p: (-s[p[0]][ids[p[0]][p[1]]], p[0], p[1])
    if policy == "order":
        return lambda p: (p[0], p[1])
    if policy == "reverse":
        return lambda p: (-p[0], p[1])
    if policy == "random":
        return lambda p: (keys[p[0] * K + p[1]], p[0], p[1])
    raise ValueError(policy)


def _lists(*tensors):
    return [x.tolist() if isinstance(x, torch.Tensor) else x for x in tensors]


def drop_pairs(scores, ids, active, group, cap, policy, zero=0, keys=None, bucket=None, bucket_size=None):
    """Token Drop: in each (group, bucket) keep the first C·n_b pairs of the active tokens in policy order.

    A bucket is one expert (``bucket=None``) or one device's experts (device scope, n_b experts).
    Pairs on the last ``zero`` experts (zero-computation) are kept, uncapped.  ``keys``: the random
    policy's key of each pair in token-major order (lower first).  Returns keep (T, K) bool.
    """
    T, K = ids.shape
    E = scores.shape[1] - zero
    s, ids, active, group, cap, keys = _lists(scores, ids, active, group, cap, keys)
    bucket = bucket or list(range(E))
    bucket_size = bucket_size or [1] * E
    keep = [[bool(active[t]) and ids[t][j] >= E for j in range(K)] for t in range(T)]
    buckets: dict = {}
    for t in range(T):
        for j in range(K):
            if active[t] and ids[t][j] < E:
                buckets.setdefault((group[t], bucket[ids[t][j]]), []).append((t, j))
    for (g, b), pairs in buckets.items():
        for t, j in sorted(pairs, key=_priority(policy, s, ids, keys))[: cap[g] * bucket_size[b]]:
            keep[t][j] = True
    return torch.tensor(keep, dtype=torch.bool).view(T, K)


def reroute_pairs(scores, ids, keep, active, group, cap, target, rounds, zero=0, bucket=None, bucket_size=None):
    """Token Reroute after a drop: each round, every unplaced slot of token t proposes one expert.

    t's u-th unplaced slot proposes t's u-th best expert that is not one of t's picks (native or
    already rerouted) and whose bucket has spare room: best by s[t, e] (``target="score"``) or by the
    bucket's spare room (``"least_loaded"``), ties to the lower expert.  Each bucket admits its
    proposals by s[t, e] up to its spare room; the rest try again next round.  Zero-computation
    experts take no capacity and are never targets.  Returns (ids, keep, moved), (T, K) each.
    """
    s, ids0, keep0, active, group, cap = _lists(scores, ids, keep, active, group, cap)
    T, K = ids.shape
    E = scores.shape[1] - zero
    bucket = bucket or list(range(E))
    bucket_size = bucket_size or [1] * E
    ids, keep = [list(r) for r in ids0], [list(r) for r in keep0]
    moved = [[False] * K for _ in range(T)]
    picked = [set(r) for r in ids0]
    spare = {(g, b): cap[g] * bucket_size[b] for g in range(len(cap)) for b in set(bucket)}
    for t in range(T):
        for j in range(K):
            if keep[t][j] and ids[t][j] < E:
                spare[(group[t], bucket[ids[t][j]])] -= 1
    unplaced = [(t, j) for t in range(T) for j in range(K) if active[t] and not keep[t][j]]
    for _ in range(rounds):
        proposals = []
        for t in sorted({t for t, _ in unplaced}):
            g = group[t]
            avail = [e for e in range(E) if e not in picked[t] and spare[(g, bucket[e])] > 0]
            if target == "score":
                avail.sort(key=lambda e: (-s[t][e], e))
            else:
                avail.sort(key=lambda e: (-spare[(g, bucket[e])], e))
            slots = [j for tt, j in unplaced if tt == t]
            proposals += [(t, j, e) for j, e in zip(slots, avail)]
        admitted = []
        for key in spare:
            cands = sorted((p for p in proposals if (group[p[0]], bucket[p[2]]) == key),
                           key=lambda p: (-s[p[0]][p[2]], p[0], p[1]))
            admitted += cands[: spare[key]]
        for t, j, e in admitted:
            ids[t][j], keep[t][j], moved[t][j] = e, True, True
            picked[t].add(e)
            spare[(group[t], bucket[e])] -= 1
            unplaced.remove((t, j))
    as_t = lambda x, dt: torch.tensor(x, dtype=dt).view(T, K)  # noqa: E731
    return as_t(ids, torch.long), as_t(keep, torch.bool), as_t(moved, torch.bool)


def expanded_pairs(scores, ids, active, group, cap, local, max_per_token=None, zero=0, bucket=None,
                   bucket_size=None):
    """Expanded Drop: candidates are each active token's picks and its local experts (computing
    experts only); each (group, bucket) keeps its best C·n_b candidates by s[t, e].  With
    ``max_per_token`` M each token then keeps only its best M kept experts (ties to the lower expert).
    Zero-computation picks of active tokens are kept and do not count toward M.  Returns keep (T, E+Z).
    """
    T, E_all = scores.shape
    s, ids, active, group, cap, local = _lists(scores, ids, active, group, cap, local)
    E = E_all - zero
    bucket = bucket or list(range(E))
    bucket_size = bucket_size or [1] * E
    keep = [[False] * E_all for _ in range(T)]
    buckets: dict = {}
    for t in range(T):
        if not active[t]:
            continue
        for e in range(E):
            if e in ids[t] or local[t][e]:
                buckets.setdefault((group[t], bucket[e]), []).append((t, e))
    for (g, b), pairs in buckets.items():
        for t, e in sorted(pairs, key=lambda p: (-s[p[0]][p[1]], p[0], p[1]))[: cap[g] * bucket_size[b]]:
            keep[t][e] = True
    for t in range(T):
        if max_per_token is not None:
            best = sorted((e for e in range(E) if keep[t][e]), key=lambda e: (-s[t][e], e))[:max_per_token]
            keep[t][:E] = [e in best for e in range(E)]
        for e in ids[t]:
            if active[t] and e >= E:
                keep[t][e] = True
    return torch.tensor(keep, dtype=torch.bool).view(T, E_all)


def expert_drop_pairs(ids, active, group, num_groups, num_experts, fraction, zero=0):
    """Expert Drop: each group skips its n = max(1, round(f·E)) least-loaded computing experts (load
    over the group's active tokens; ties: the lower expert is skipped first).  Returns keep (T, K)."""
    T, K = ids.shape
    ids, active, group = _lists(ids, active, group)
    E = num_experts - zero
    n = max(1, round(fraction * E))
    skipped = []
    for g in range(num_groups):
        load = [0] * E
        for t, row in enumerate(ids):
            for e in row:
                if active[t] and group[t] == g and e < E:
                    load[e] += 1
        skipped.append(set(sorted(range(E), key=lambda e: (load[e], e))[:n]))
    return torch.tensor([[bool(active[t]) and e not in skipped[group[t]] for e in row] for t, row in enumerate(ids)],
                        dtype=torch.bool).view(T, K)


@dataclass
class Expected:
    """What the spec says :func:`moepatch.routing.route` returns (same field names as RoutingResult)."""

    topk_ids_TW: torch.Tensor
    topk_weights_TW: torch.Tensor
    load_before_E: list
    load_after_E: list
    tokens_G: list
    capacity_G: list | None
    routed_pairs: int
    dropped_pairs: int
    rerouted_pairs: int
    added_pairs: int
    identity_pairs: int | None


def route(cfg, scores_TE, topk_ids_TK, topk_weights_TK, factor_T, *, batch, seq, valid_BS=None,
          source_rank=None, zero_experts=0, keys=None) -> Expected:
    """One layer's capacity-aware routing, loop by loop, for a RoutingConfig ``cfg``.

    Inputs as moepatch.routing.route; ``keys``: the random policy's key per native pair (token-major,
    lower first), which only the caller knows how to draw.  Groups are numbered as the routing's
    (sequence b on device d is group b·D + d); dropped or empty slots hold E + Z with weight 0.
    """
    T, E_all = scores_TE.shape
    Z = zero_experts
    E = E_all - Z
    K = topk_ids_TK.shape[1]
    sentinel = E_all
    s, ids, w = scores_TE.tolist(), topk_ids_TK.tolist(), topk_weights_TK.tolist()
    if valid_BS is None or cfg.count_padding:
        active = [True] * T
    else:
        active = [bool(v) for v in valid_BS.reshape(-1).tolist()]
    # Devices and capacity groups.  Under real EP (source_rank) every token sits on that rank.
    D = cfg.ep_size if source_rank is None else 1
    dev_T = [token_device(t, T, D) for t in range(T)]
    if cfg.group == "batch":
        group, G = dev_T, D
    else:
        group, G = [(t // seq) * D + dev_T[t] for t in range(T)], batch * D
    tokens_G = [sum(1 for t in range(T) if active[t] and group[t] == g) for g in range(G)]
    load_before = [sum(1 for t in range(T) if active[t] for e in ids[t] if e == x) for x in range(E)]
    identity = sum(1 for t in range(T) if active[t] for e in ids[t] if e >= E) if Z else None
    routed = sum(load_before)
    if cfg.strategy != "expert_drop" and cfg.capacity_factor is None:
        return Expected(topk_ids_TK, topk_weights_TK, load_before, load_before, tokens_G, None, routed, 0, 0, 0,
                        identity)

    if cfg.capacity_scope == "expert":
        bucket, bucket_size = list(range(E)), [1] * E
    else:
        bucket = device_blocks(E, cfg.ep_size)
        bucket_size = [bucket.count(d) for d in range(cfg.ep_size)]
    cap_G = None
    if cfg.strategy != "expert_drop":
        pairs_G = [sum(1 for t in range(T) if active[t] and group[t] == g for e in ids[t] if e < E) for g in range(G)]
        cap_G = [capacity(p, E, cfg.capacity_factor, cfg.min_capacity) for p in pairs_G]
    args = dict(zero=Z, bucket=bucket, bucket_size=bucket_size)

    def mixed(e, t):  # the family's weight of a new expert e for token t, as route computes it
        return float(torch.tensor(s[t][e] * factor_T[t].item()).float())

    moved = [[False] * K for _ in range(T)]
    extra = [[] for _ in range(T)]
    if cfg.strategy == "drop":
        keep = drop_pairs(scores_TE, topk_ids_TK, active, group, cap_G, cfg.policy, keys=keys, **args).tolist()
        new_ids = ids
    elif cfg.strategy == "expert_drop":
        dev_group = dev_T if source_rank is None else [0] * T
        keep = expert_drop_pairs(topk_ids_TK, active, dev_group, D, E_all, cfg.expert_drop_fraction, zero=Z).tolist()
        new_ids = ids
    elif cfg.strategy == "reroute":
        first = drop_pairs(scores_TE, topk_ids_TK, active, group, cap_G, cfg.policy, keys=keys, **args)
        new_ids, keep, moved = (x.tolist() for x in reroute_pairs(
            scores_TE, topk_ids_TK, first, active, group, cap_G, cfg.reroute_target, cfg.reroute_rounds, **args))
    else:
        if cfg.local_experts == "all" or cfg.ep_size == 1:
            local = [[e < E for e in range(E_all)] for _ in range(T)]
            m = E
        else:
            home = [source_rank if source_rank is not None else dev_T[t] for t in range(T)]
            dev_E = device_blocks(E, cfg.ep_size)
            local = [[e < E and dev_E[e] == home[t] for e in range(E_all)] for t in range(T)]
            m = max(dev_E.count(d) for d in range(cfg.ep_size))
        keep_TE = expanded_pairs(scores_TE, topk_ids_TK, active, group, cap_G, local, cfg.max_experts_per_token,
                                 **args).tolist()
        keep = [[keep_TE[t][e] for e in ids[t]] for t in range(T)]
        extra = [[e for e in range(E) if keep_TE[t][e] and e not in ids[t]] for t in range(T)]
        new_ids = ids
    W = K if cfg.strategy != "expanded" else min(E_all, K + m)
    out_ids = [[sentinel] * W for _ in range(T)]
    out_w = [[0.0] * W for _ in range(T)]
    for t in range(T):
        for j in range(K):
            if keep[t][j]:
                out_ids[t][j] = new_ids[t][j]
                out_w[t][j] = mixed(new_ids[t][j], t) if moved[t][j] else w[t][j]
        assert K + len(extra[t]) <= W
        for i, e in enumerate(extra[t]):
            out_ids[t][K + i], out_w[t][K + i] = e, mixed(e, t)
    if cfg.renormalize == "kept":
        for t in range(T):
            kept = sum(out_w[t])
            native = sum(w[t]) if active[t] else 0.0
            out_w[t] = [x * native / kept if kept > 0 else 0.0 for x in out_w[t]]
    load_after = [sum(row.count(x) for row in out_ids) for x in range(E)]
    dropped = sum(1 for t in range(T) if active[t] for j in range(K) if ids[t][j] < E and not keep[t][j])
    return Expected(torch.tensor(out_ids, dtype=torch.long).view(T, W),
                    torch.tensor(out_w, dtype=torch.float64).view(T, W).to(topk_weights_TK.dtype),
                    load_before, load_after, tokens_G, cap_G, routed, dropped,
                    sum(map(sum, moved)), sum(map(len, extra)), identity)
