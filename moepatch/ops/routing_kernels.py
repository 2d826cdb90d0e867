"""Token Drop in one launch: capacity, per-expert priority ranks and the kept slots, on the device.

Legend: T tokens, K slots per token (the native top-k), P = T * K pairs (pair p = t * K + k),
E experts, G capacity groups, BLOCK pairs per tile.

``_capacity_drop_kernel`` runs one program per (group g, expert e).  Every capacity group is a
contiguous range of tokens (a batch-major slice of sequences and/or simulated devices, see
``routing.capacity.group_ids``), so program (g, e) scans the pairs of its group and:

1. counts the group's active tokens (T_g) and its expert's active pairs (n);
2. computes C = max(min_capacity, ceil(γ·T_g·K/E − 1e-9)) in float64, bit for bit the
   reference's ``capacities`` (γ·K and the tolerance arrive as float64 bit patterns because
   Triton passes Python floats as float32);
3. if n > C, finds which pairs rank below C in the policy's order:
   ``score``: a radix select (8 passes of 4-bit digits) finds the C-th largest score key; pairs
   above it are kept, and of the pairs equal to it the first ones in token order, which is the
   reference's tie rule (stable sort of -score over token-major pairs).
   ``order`` / ``reverse``: the rank is the running count of the expert's pairs in token order;
   the first / last C are kept;
4. writes the slot of every pair of its expert in the group: the expert id when kept, else the
   sentinel E and weight 0, and its counts (load before / after, T_g, C) for the statistics.

Each pair is written by exactly one program (the one of its expert and group); out-of-range ids
are written as sentinels by the expert-0 program.  No atomics: the result does not depend on
scheduling.  Cost: E programs read each group's ids once or twice, plus ~10 passes for an expert
over capacity (its pairs only load scores); at Mixtral shapes a few microseconds.

Large groups (more than ``SORTED_MIN_PAIRS`` pairs): scanning every pair of the group in each of
E programs is E times the necessary work (0.36 ms at 16384 tokens, 128 experts, top-8 on an H200),
so the pairs are first sorted by expert with the dispatch kernels (one row per pair, ascending pair
numbers within an expert: the same token order) and program (g, e) walks only expert e's rows of
group g (found by binary search when groups share the list).  The outputs are pre-filled with the
sentinel, which out-of-range slots keep.  Same keys, same passes, same result.

Score keys: float32 scores map to int32 keys with the same order (−0.0 equals +0.0; NaN ranks
last, as in the reference's sort), biased to [0, 2^32) so digits are unsigned.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _pairs(ids_ptr, valid_ptr, sorted_ptr, i, hi, e, K, HAS_VALID: tl.constexpr, SORTED: tl.constexpr):
    """Tile ``i`` (indices below ``hi``) of the program's pairs: (pair, id, pair of expert e, active, in range).

    Unsorted: i are pair numbers of the group.  SORTED: i are rows of expert e's ascending pair list.
    """
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
def _capacity_drop_kernel(ids_ptr, w_ptr, scores_ptr, valid_ptr, sorted_ptr, start_ptr, out_ids_ptr, out_w_ptr,
                          stats_ptr, T, K, E, seq, ep, min_cap, gk_bits, tol_bits, stride_st, stride_se,
                          POLICY: tl.constexpr, GROUP_SEQ: tl.constexpr, HAS_VALID: tl.constexpr,
                          BLOCK: tl.constexpr, SINGLE: tl.constexpr, SORTED: tl.constexpr,
                          SEARCH: tl.constexpr):
    """POLICY 0 = score, 1 = order, 2 = reverse.  stats: before (G, E), after (G, E), T_g (G), C (G), int64.

    SORTED: the pairs arrive grouped by expert (sorted_ptr / start_ptr: a dispatch layout of one row
    per pair, ascending pair numbers within an expert), so a program visits only its expert's pairs;
    the outputs are pre-filled with the sentinel, which is what slots with an out-of-range id keep.
    SEARCH: several groups share an expert's list; each program binary-searches its group's rows.

    (Reductions are packed two per int64 where possible: each tl.sum is a JIT call that costs about
    a millisecond under the CPU interpreter the tests run on; on the GPU it makes no difference.)
    """
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
            # (the expert-0 test is broadcast first: the interpreter rejects a mask built with a scalar)
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


# Pairs per tile.  A group that fits one tile keeps its keys in registers across the radix passes;
# larger groups stream their tiles from L2 once per pass.  (Tests lower it to reach the tiled path.)
MAX_BLOCK = 512
# Groups of more pairs than this are first sorted by expert (the dispatch kernels), so that each
# program walks its expert's pairs only: E programs scanning every pair of a group is E times the work,
# which at 131072 pairs and 128 experts took a third of a millisecond.  Above one tile (MAX_BLOCK) an
# expert over capacity also re-reads the whole group in each of the 8 radix passes: at 2048 pairs
# over 128 experts (Qwen3 M = 256) that cost ~50 µs against ~10 µs for the sort.  (Tests lower it.)
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
