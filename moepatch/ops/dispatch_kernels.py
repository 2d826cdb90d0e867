"""Dispatch: sort the (token, slot) pairs into per-expert blocks of BLOCK_M rows, without a host sync.

Legend: T tokens, W slots, P = T * W pairs (p = t * W + w), E experts, R rows, C chunks of BLOCK_P pairs.
Count, scan over chunks, scatter (one chunk: the scatter alone); the layout: experts.DispatchLayout.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Pairs per chunk (the rank comparison is CHUNK x CHUNK), elements of the count kernel's one-hot
# sub-blocks, warps of the count and scatter kernels (tuned on the H200).
CHUNK = 64
TILE_ELEMS = 2048
NUM_WARPS = 4
SCAN_BLOCK_C = 256  # chunks per step of dispatch_scan_kernel (tests lower it)


@triton.jit
def _count(ids_ptr, p0, P, E, SUB_P: tl.constexpr, SUBS: tl.constexpr, E_PAD: tl.constexpr):
    """(E_PAD,) pairs per expert among the SUB_P * SUBS pairs from p0, in (SUB_P, E_PAD) one-hot sub-blocks."""
    e_x = tl.arange(0, E_PAD)
    total = tl.zeros([E_PAD], dtype=tl.int32)
    for sub in range(SUBS):
        offs_p = p0 + sub * SUB_P + tl.arange(0, SUB_P)
        ids = tl.load(ids_ptr + offs_p, mask=offs_p < P, other=-1).to(tl.int32)
        total += tl.sum(((ids[:, None] == e_x[None, :]) & (e_x[None, :] < E)).to(tl.int32), axis=0)
    return total


@triton.jit
def dispatch_count_kernel(ids_ptr, counts_ptr, P, E, BLOCK_P: tl.constexpr, SUB_P: tl.constexpr,
                           E_PAD: tl.constexpr):
    pid = tl.program_id(0)
    e_x = tl.arange(0, E_PAD)
    total = _count(ids_ptr, pid * BLOCK_P, P, E, SUB_P, BLOCK_P // SUB_P, E_PAD)
    tl.store(counts_ptr + pid * E + e_x, total, mask=e_x < E)


@triton.jit
def dispatch_scan_kernel(counts_ptr, offs_ptr, C, E, BLOCK_C: tl.constexpr, BLOCK_E: tl.constexpr):
    """offs[c, e] = pairs of expert e in chunks before c; offs[C, e] = all of them.  counts: (C, E)."""
    e_x = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    e_ok = e_x < E
    carry = tl.zeros([BLOCK_E], dtype=tl.int32)
    for c0 in range(0, C, BLOCK_C):
        c_x = c0 + tl.arange(0, BLOCK_C)
        ok = (c_x[:, None] < C) & e_ok[None, :]
        cnt = tl.load(counts_ptr + c_x[:, None] * E + e_x[None, :], mask=ok, other=0)
        tl.store(offs_ptr + c_x[:, None] * E + e_x[None, :], tl.cumsum(cnt, axis=0) - cnt + carry[None, :], mask=ok)
        carry += tl.sum(cnt, axis=0)
    tl.store(offs_ptr + C * E + e_x, carry, mask=e_ok)


@triton.jit
def dispatch_scatter_kernel(ids_ptr, offs_ptr, sorted_ptr, start_ptr, P, E, R, num_chunks, rows_per_program,
                             BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, SUB_P: tl.constexpr,
                             E_PAD: tl.constexpr, BLOCK_R: tl.constexpr, SINGLE: tl.constexpr):
    """offs_ptr: (C + 1, E) from dispatch_scan_kernel; row pid is overwritten (unused when SINGLE)."""
    pid = tl.program_id(0)
    e_x = tl.arange(0, E_PAD)
    e_ok = e_x < E

    # Pairs per expert over all chunks, and over the chunks before this one.
    if SINGLE:
        total_e = _count(ids_ptr, 0, P, E, SUB_P, BLOCK_P // SUB_P, E_PAD)
        before_e = tl.zeros([E_PAD], dtype=tl.int32)
        base_ptr = start_ptr
    else:
        total_e = tl.load(offs_ptr + num_chunks * E + e_x, mask=e_ok, other=0)
        before_e = tl.load(offs_ptr + pid * E + e_x, mask=e_ok, other=0)
        base_ptr = offs_ptr + pid * E

    padded_e = (total_e + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    end_e = tl.cumsum(padded_e, axis=0)
    start_e = end_e - padded_e
    used = tl.sum(padded_e, axis=0)
    if pid == 0:
        tl.store(start_ptr + e_x, start_e, mask=e_ok)
        tl.store(start_ptr + E, used)
    # This chunk's first row per expert, for the pairs below (one chunk: start_E1, stored just above);
    # the barrier makes the program's own stores visible to it.
    if not SINGLE:
        tl.store(base_ptr + e_x, start_e + before_e, mask=e_ok)
    tl.debug_barrier()

    # A pair's row: the chunk's base row of its expert + its rank among the chunk's earlier pairs of it.
    offs_p = pid * BLOCK_P + tl.arange(0, BLOCK_P)
    ids = tl.load(ids_ptr + offs_p, mask=offs_p < P, other=-1).to(tl.int32)
    valid = (ids >= 0) & (ids < E)
    earlier = tl.arange(0, BLOCK_P)[None, :] < tl.arange(0, BLOCK_P)[:, None]
    rank = tl.sum(((ids[:, None] == ids[None, :]) & earlier).to(tl.int32), axis=1)
    base = tl.load(base_ptr + ids, mask=valid, other=0)
    tl.store(sorted_ptr + base + rank, offs_p.to(tl.int32), mask=valid)

    # Padding rows after each expert's pairs: expert e's by program e mod C.  Then the rows past `used`,
    # by slices.  Real rows are written only above, so no address is written twice.
    if BLOCK_M > 1:
        j = tl.arange(0, BLOCK_M)
        for e in range(pid, E, num_chunks):
            mine = e_x == e
            first = tl.sum(tl.where(mine, start_e + total_e, 0), axis=0)
            count = tl.sum(tl.where(mine, padded_e - total_e, 0), axis=0)
            tl.store(sorted_ptr + first + j, tl.full([BLOCK_M], 0, tl.int32) + P, mask=j < count)
    row_end = tl.minimum((pid + 1) * rows_per_program, R)
    for r0 in range(pid * rows_per_program, row_end, BLOCK_R):
        r_x = r0 + tl.arange(0, BLOCK_R)
        tl.store(sorted_ptr + r_x, tl.full([BLOCK_R], 0, tl.int32) + P, mask=(r_x >= used) & (r_x < row_end))


@triton.jit
def ep_prepare_kernel(ids_ptr, sorted_ptr, start_ptr, dev_ptr, local_ptr, fixed_ptr, header_ptr, meta_ptr,
                       order_ptr, tok_ptr, pos_ptr, P, E, D, M, W, BLOCK: tl.constexpr, E_PAD: tl.constexpr,
                       FIXED: tl.constexpr):
    """Expert parallelism's bookkeeping after the sort (block_m 1; outputs: experts.ep_prepare): per row r,
    order[r], tok[r] and pos[order[r]] = r; program 0 also the header and meta."""
    pid = tl.program_id(0)
    r_x = pid * BLOCK + tl.arange(0, BLOCK)
    used = tl.load(start_ptr + E)
    in_p = r_x < P
    pair = tl.load(sorted_ptr + r_x, mask=in_p, other=0)
    pair = tl.where(r_x < used, pair, P).to(tl.int64)
    tl.store(order_ptr + r_x, pair, mask=in_p)
    tl.store(tok_ptr + r_x, pair // W, mask=in_p)
    tl.store(pos_ptr + pair, r_x.to(tl.int64), mask=r_x < used)
    ids = tl.load(ids_ptr + r_x, mask=in_p, other=0)
    tl.store(pos_ptr + r_x, tl.full([BLOCK], -1, tl.int64), mask=in_p & ((ids < 0) | (ids >= E)))
    if pid == 0:
        X = FIXED + M
        for d in range(D):  # zeros, then the fixed values, in every row (the counts go on top below)
            for c0 in range(0, X, BLOCK):
                c_x = c0 + tl.arange(0, BLOCK)
                fixed = tl.load(fixed_ptr + c_x, mask=c_x < FIXED, other=0)
                tl.store(header_ptr + d * X + c_x, fixed, mask=c_x < X)
        e_x = tl.arange(0, E_PAD)
        e_ok = e_x < E
        count = (tl.load(start_ptr + 1 + e_x, mask=e_ok, other=0) - tl.load(start_ptr + e_x, mask=e_ok, other=0))
        dev = tl.load(dev_ptr + e_x, mask=e_ok, other=0)
        loc = tl.load(local_ptr + e_x, mask=e_ok, other=0)
        tl.debug_barrier()
        tl.store(header_ptr + dev * X + FIXED + loc, count.to(tl.int64), mask=e_ok)
        for d in range(D):
            tl.store(meta_ptr + d, tl.sum(tl.where(e_ok & (dev == d), count, 0), axis=0).to(tl.int64))
        bad = tl.zeros([BLOCK], dtype=tl.int32)
        for p0 in range(0, P, BLOCK):
            p_x = p0 + tl.arange(0, BLOCK)
            v = tl.load(ids_ptr + p_x, mask=p_x < P, other=0)
            bad += ((p_x < P) & ((v < 0) | (v > E))).to(tl.int32)
        tl.store(meta_ptr + D, tl.sum(bad, axis=0).to(tl.int64))


@triton.jit
def padded_send_kernel(x_ptr, ids_ptr, sorted_ptr, start_ptr, dev_ptr, local_ptr, first_ptr, send_ptr, send_local_ptr,
                        dest_ptr, P, W, E, H, Q, stride_xt, stride_xk, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
    """The expert-parallel send buffers (experts.padded_send): rank d's block is rows [d·Q, (d+1)·Q), its kept
    pairs first in sorted order; row r, pair p = sorted[r], e = ids[p] goes to dev[e]·Q + r − start[first[dev[e]]]."""
    r_x = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    in_p = r_x < P
    ids_r = tl.load(ids_ptr + r_x, mask=in_p, other=0)
    tl.store(dest_ptr + r_x, tl.full([BLOCK_R], -1, tl.int64), mask=in_p & ((ids_r < 0) | (ids_r >= E)))
    used = tl.load(start_ptr + E)
    ok = r_x < used
    pair = tl.load(sorted_ptr + r_x, mask=ok, other=0).to(tl.int64)
    e = tl.load(ids_ptr + pair, mask=ok, other=0)
    peer = tl.load(dev_ptr + e, mask=ok, other=0)
    row0 = tl.load(start_ptr + tl.load(first_ptr + peer, mask=ok, other=0), mask=ok, other=0)
    dest = peer * Q + (r_x - row0).to(tl.int64)
    tl.store(dest_ptr + pair, dest, mask=ok)
    tl.store(send_local_ptr + dest, tl.load(local_ptr + e, mask=ok, other=0), mask=ok)
    tok = pair // W
    for h0 in range(0, H, BLOCK_H):
        h_x = h0 + tl.arange(0, BLOCK_H)
        m = ok[:, None] & (h_x < H)[None, :]
        v = tl.load(x_ptr + tok[:, None] * stride_xt + h_x[None, :] * stride_xk, mask=m, other=0.0)
        tl.store(send_ptr + dest[:, None] * H + h_x[None, :], v, mask=m)
