"""Token Drop in one launch: capacity, per-expert priority ranks and the kept slots, on the device, no atomics.

Legend: T tokens, K slots per token (the native top-k), P = T * K pairs (pair p = t * K + k),
E experts, G capacity groups, BLOCK pairs per tile.  Algorithm and costs: docs/kernels.md, "Token Drop kernel".
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _pairs(ids_ptr, valid_ptr, sorted_ptr, i, hi, e, K, HAS_VALID: tl.constexpr, SORTED: tl.constexpr):
    """Tile ``i`` (below ``hi``): (pair, id, pair of expert e, active, in range); i are pair numbers, or
    with SORTED rows of expert e's ascending pair list."""
    in_range = i < hi
    if SORTED:
        p = tl.load(sorted_ptr + i, mask=in_range, other=0).to(tl.int64)
        ids = tl.where(in_range, e, -1).to(tl.int64)
    else:
        p = i
        ids = tl.load(ids_ptr + p, mask=in_range, other=-1)
    mine = (ids == e) & in_range
    if HAS_VALID:
        act = (tl.load(valid_ptr + p // K, mask=in_range, other=0) != 0) & in_range
    else:
        act = in_range
    return p, ids, mine, act, in_range


@triton.jit
def _first_row_at_least(sorted_ptr, lo, hi, value):
    """First row in [lo, hi) of an ascending pair list whose pair is >= value (hi if none): binary search."""
    while lo < hi:
        mid = (lo + hi) // 2
        below = tl.load(sorted_ptr + mid).to(tl.int64) < value
        lo = tl.where(below, mid + 1, lo)
        hi = tl.where(below, hi, mid)
    return lo


@triton.jit
def _score_key(scores_ptr, p, K, e, stride_st, stride_se, mask):
    s = tl.load(scores_ptr + (p // K) * stride_st + e * stride_se, mask=mask, other=0.0).to(tl.float32)
    s = tl.where(s == 0.0, 0.0, s)  # -0.0 and +0.0 tie, as they do in the reference's sort
    bits = s.to(tl.int32, bitcast=True)
    key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # signed int order == float order
    key = tl.where(s != s, -2147483647 - 1, key)  # NaN last
    return key.to(tl.int64) + tl.full([], 2147483648, tl.int64)


@triton.jit
def _digit_counts(digit, sel, bins):
    # (BLOCK, 16) int64: [digit > d] << 32 | [digit >= d] for the selected pairs.
    d = digit[:, None]
    b = bins[None, :]
    return ((((d > b) & sel[:, None]).to(tl.int64) << 32) + ((d >= b) & sel[:, None]).to(tl.int64))


@triton.jit
def capacity_drop_kernel(ids_ptr, w_ptr, scores_ptr, valid_ptr, sorted_ptr, start_ptr, out_ids_ptr, out_w_ptr,
                         stats_ptr, T, K, E, seq, ep, min_cap, gk_bits, tol_bits, stride_st, stride_se,
                         POLICY: tl.constexpr, GROUP_SEQ: tl.constexpr, HAS_VALID: tl.constexpr,
                         BLOCK: tl.constexpr, SINGLE: tl.constexpr, SORTED: tl.constexpr, SEARCH: tl.constexpr):
    """One program per (group, expert).  POLICY 0 = score, 1 = order, 2 = reverse.  stats (int64): before (G, E),
    after (G, E), T_g (G), C (G).  SORTED: sorted_ptr / start_ptr are a dispatch layout of one row per pair and
    the outputs are pre-filled with the sentinel; SEARCH: groups share an expert's list (binary search).
    Reductions are packed two per int64: each tl.sum costs about a millisecond under the interpreter."""
    pid = tl.program_id(0)
    e = pid % E
    g = (pid // E).to(tl.int64)
    GE = tl.num_programs(0)
    G = GE // E
    # Group g's tokens.  Simulated device d holds [ceil(d*T/ep), ceil((d+1)*T/ep)) (token_devices).
    if GROUP_SEQ:
        row = g // ep
        d = g % ep
        t_lo = tl.maximum(row * seq, (d * T + ep - 1) // ep)
        t_hi = tl.minimum((row + 1) * seq, ((d + 1) * T + ep - 1) // ep)
    else:
        t_lo = (g * T + ep - 1) // ep
        t_hi = ((g + 1) * T + ep - 1) // ep
    t_hi = tl.maximum(t_hi, t_lo)
    p_lo = t_lo * K
    p_hi = t_hi * K
    offs = tl.arange(0, BLOCK)
    low32 = tl.full([], 0xFFFFFFFF, tl.int64)

    # The index range the passes walk: pair numbers, or rows of expert e's list in this group.
    if SORTED:
        lo = tl.load(start_ptr + e).to(tl.int64)
        hi = tl.load(start_ptr + e + 1).to(tl.int64)
        if SEARCH:
            lo = _first_row_at_least(sorted_ptr, lo, hi, p_lo)
            hi = _first_row_at_least(sorted_ptr, lo, hi, p_hi)
    else:
        lo = p_lo
        hi = p_hi

    # 1. active tokens of the group and active pairs of this expert (packed: pairs << 32 | tokens).
    counts = tl.zeros([BLOCK], dtype=tl.int64)
    for i0 in range(lo, hi, BLOCK):
        _, _, mine, act, _ = _pairs(ids_ptr, valid_ptr, sorted_ptr, i0 + offs, hi, e, K, HAS_VALID, SORTED)
        counts += (mine & act).to(tl.int64) << 32
        if not SORTED:
            counts += act.to(tl.int64)
    if SORTED:  # the active tokens of the group are counted apart (the list holds one expert's pairs)
        if HAS_VALID:
            for t0 in range(t_lo, t_hi, BLOCK):
                t = t0 + offs
                counts += (tl.load(valid_ptr + t, mask=t < t_hi, other=0) != 0).to(tl.int64) * K
        else:
            counts += tl.where(offs == 0, (t_hi - t_lo) * K, 0)
    total = tl.sum(counts, axis=0)
    tokens = (total & low32) // K
    n = (total >> 32).to(tl.int32)

    # 2. C = max(min_capacity, ceil(tokens * (γ·K) / E − tol)) in float64, as routing.capacity does.
    raw = tokens.to(tl.float64) * tl.cast(gk_bits, tl.float64, bitcast=True) / tl.cast(E, tl.float64)
    raw = raw - tl.cast(tol_bits, tl.float64, bitcast=True)
    c = raw.to(tl.int64)  # truncation; raw > -1, so ceil is c + (c < raw)
    c = c + (c.to(tl.float64) < raw).to(tl.int64)
    min_c = tl.cast(min_cap, tl.int64)
    cap = tl.where(tokens > 0, tl.maximum(c, min_c), min_c)
    over = n.to(tl.int64) > cap

    # 3. score: radix select of the C-th largest key (only for an expert over capacity).
    thr = tl.zeros([], dtype=tl.int64)
    rem = n  # pairs equal to thr that are kept, in token order (all of them when not over)
    if POLICY == 0:
        if over:
            bins = tl.arange(0, 16)
            prefix = tl.zeros([], dtype=tl.int64)
            rem = cap.to(tl.int32)
            if SINGLE:  # the whole group is one tile: load its keys once
                p1, _, mine1, act1, _ = _pairs(ids_ptr, valid_ptr, sorted_ptr, lo + offs, hi, e, K, HAS_VALID, SORTED)
                match1 = mine1 & act1
                ukey1 = _score_key(scores_ptr, p1, K, e, stride_st, stride_se, match1)
            for i in tl.static_range(8):
                # A plain name: Triton 3.6 rejects re-binding a constexpr in every unrolled step.
                shift = 28 - 4 * i
                # Per digit d: pairs of the current prefix with a digit above d (<< 32) and at least d.
                if SINGLE:
                    sel = match1 & ((ukey1 >> (shift + 4)) == (prefix >> (shift + 4)))
                    digit = ((ukey1 >> shift) & 15).to(tl.int32)
                    both = tl.sum(_digit_counts(digit, sel, bins), axis=0)
                else:
                    both = tl.zeros([16], dtype=tl.int64)
                    for i0 in range(lo, hi, BLOCK):
                        p, _, mine, act, _ = _pairs(ids_ptr, valid_ptr, sorted_ptr, i0 + offs, hi, e, K, HAS_VALID,
                                                    SORTED)
                        match = mine & act
                        ukey = _score_key(scores_ptr, p, K, e, stride_st, stride_se, match)
                        sel = match & ((ukey >> (shift + 4)) == (prefix >> (shift + 4)))
                        both += tl.sum(_digit_counts(((ukey >> shift) & 15).to(tl.int32), sel, bins), axis=0)
                above = (both >> 32).to(tl.int32)
                at_least = (both & low32).to(tl.int32)
                # The rem-th largest key of the prefix has the digit where the count from the top
                # first reaches rem; rem becomes its rank among the pairs of that digit.
                hit = (above < rem) & (at_least >= rem)
                packed = tl.sum(tl.where(hit, above * 16 + bins, 0), axis=0)
                rem = rem - packed // 16
                prefix = prefix | ((packed % 16).to(tl.int64) << shift)
            thr = prefix

    # 4. write every slot of this expert in the group; count what is kept.
    running = tl.zeros([], dtype=tl.int32)
    kept = tl.zeros([BLOCK], dtype=tl.int32)
    for i0 in range(lo, hi, BLOCK):
        p, ids, mine, act, in_range = _pairs(ids_ptr, valid_ptr, sorted_ptr, i0 + offs, hi, e, K, HAS_VALID, SORTED)
        if SORTED:
            oob = in_range & (offs < 0)  # sentinel slots kept their pre-filled values
        else:
            # Out-of-range ids: the expert-0 program writes their sentinels (the test is broadcast first:
            # the interpreter rejects a mask built with a scalar).
            oob = ((ids < 0) | (ids >= E)) & in_range & ((offs * 0 + e) == 0)
        match = mine & act
        if POLICY == 0:
            ukey = _score_key(scores_ptr, p, K, e, stride_st, stride_se, match)
            m = (match & (ukey == thr)).to(tl.int32)  # ties at the threshold, kept in token order
        else:
            m = match.to(tl.int32)
        rank = running + tl.cumsum(m, axis=0) - m
        running += tl.sum(m, axis=0)
        if POLICY == 0:
            keep = match & ((ukey > thr) | ((m > 0) & (rank < rem)))
        elif POLICY == 1:
            keep = match & (rank.to(tl.int64) < cap)
        else:
            keep = match & (rank.to(tl.int64) >= n.to(tl.int64) - cap)
        w = tl.load(w_ptr + p, mask=mine, other=0.0)
        tl.store(out_ids_ptr + p, tl.where(keep, e, E).to(tl.int64), mask=mine | oob)
        tl.store(out_w_ptr + p, tl.where(keep, w, 0.0), mask=mine | oob)
        kept += keep.to(tl.int32)

    tl.store(stats_ptr + pid, n.to(tl.int64))
    tl.store(stats_ptr + GE + pid, tl.sum(kept, axis=0).to(tl.int64))
    if e == 0:
        tl.store(stats_ptr + 2 * GE + g, tokens.to(tl.int64))
        tl.store(stats_ptr + 2 * GE + G + g, cap)


# Pairs per tile: a group of one tile keeps its keys in registers across the radix passes.
MAX_BLOCK = 512
# Larger groups are sorted by expert first: E programs scanning a whole group is E times the work, and
# above one tile each radix pass re-reads the group (docs/kernels.md has the measurements).
SORTED_MIN_PAIRS = 512
MAX_SORTED_BLOCK = 1024


def block_size(max_group_pairs: int) -> tuple[int, bool]:
    """(BLOCK, SINGLE): pairs per tile, and whether a whole group fits one tile."""
    block = max(16, min(MAX_BLOCK, 1 << (max(1, max_group_pairs) - 1).bit_length()))
    return block, max_group_pairs <= block


def sorted_block_size(max_group_pairs: int, num_experts: int) -> int | None:
    """Rows per tile when the pairs should be sorted by expert first (None: scan the group's pairs)."""
    if max_group_pairs <= SORTED_MIN_PAIRS:
        return None
    per_expert = -(-max_group_pairs // num_experts)
    return max(16, min(MAX_SORTED_BLOCK, 1 << (max(1, per_expert) - 1).bit_length()))
