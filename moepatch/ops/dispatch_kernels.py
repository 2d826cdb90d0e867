"""Dispatch: sort the (token, slot) pairs into per-expert blocks of BLOCK_M rows, without a host sync.

Legend: T tokens, W slots per token, P = T * W pairs (pair p = t * W + w), E experts, R rows of
the padded sorted layout, NB = R / BLOCK_M blocks, C chunks of pairs.

Layout produced (every size is a function of P, E and BLOCK_M only, so it is static):
    sorted_pairs_R (int32): the pair each row computes; P on padding rows.  Expert e owns rows
        [start_E[e], start_E[e+1]); its pairs come first in ascending pair order, then padding up
        to a multiple of BLOCK_M.  Sentinel slots (id outside [0, E)) get no row at all.
    start_E1 (int32, E + 1): padded row offsets; start_E1[E] is the number of rows in use.
R is bounded by P + min(E, P) * (BLOCK_M - 1): every expert with pairs wastes at most BLOCK_M - 1 rows.

Three kernels, all deterministic (no atomics, pairs keep their order inside an expert):
    _dispatch_count_kernel: pairs per (chunk, expert).
    _dispatch_scan_kernel: per expert, the pairs of the chunks before each chunk (an exclusive
        running sum over chunks, one program per block of experts) and, in row C, the totals.
    _dispatch_scatter_kernel: every program reads its chunk's offsets and the totals (2·E integers),
        writes the padding sentinels of its slice of rows and the rows of its own chunk.  With one
        chunk (decode, small prefill) it counts by itself: one launch.
A chunk is SUBS sub-blocks of BLOCK_P pairs (BLOCK_P x E_PAD one-hot tiles in registers), walked in
order with a running count per expert, so there are at most MAX_CHUNKS chunks whatever P.
History (H200, 131072 pairs over 128 experts, 64-pair chunks): every scatter program summing the
count rows of all earlier chunks read 2 GB from L2; a torch.cumsum over the (2048, 128) counts ran
one thread per column and took ~0.4 ms; 128 chunks of 16 sub-blocks left 128 programs doing 16
serial steps each (0.1 ms).
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

MAX_CHUNKS = 1024
# Elements of the (BLOCK_P, E_PAD) one-hot and (BLOCK_R, E_PAD) row tiles, and warps per program of the
# count and scatter kernels (environment overrides for measuring, see scripts/profile_route.py).
TILE_ELEMS = int(os.environ.get("MOEPATCH_DISPATCH_TILE", "2048"))
NUM_WARPS = int(os.environ.get("MOEPATCH_DISPATCH_WARPS", "4"))
SCAN_BLOCK_C = 256  # chunks per step of _dispatch_scan_kernel (tests lower it)


@triton.jit
def _onehot(ids_ptr, p0, P, E, BLOCK_P: tl.constexpr, E_PAD: tl.constexpr):
    """(pair numbers, their ids, (BLOCK_P, E_PAD) int32 one-hot of their experts) of the sub-block at p0."""
    offs_p = p0 + tl.arange(0, BLOCK_P)
    e_x = tl.arange(0, E_PAD)
    ids = tl.load(ids_ptr + offs_p, mask=offs_p < P, other=-1).to(tl.int32)
    return offs_p, ids, ((ids[:, None] == e_x[None, :]) & (e_x[None, :] < E)).to(tl.int32)


@triton.jit
def _dispatch_count_kernel(ids_ptr, counts_ptr, P, E, BLOCK_P: tl.constexpr, E_PAD: tl.constexpr,
                           SUBS: tl.constexpr):
    pid = tl.program_id(0)
    e_x = tl.arange(0, E_PAD)
    total = tl.zeros([E_PAD], dtype=tl.int32)
    for sub in range(SUBS):
        _, _, onehot = _onehot(ids_ptr, (pid * SUBS + sub) * BLOCK_P, P, E, BLOCK_P, E_PAD)
        total += tl.sum(onehot, axis=0)
    tl.store(counts_ptr + pid * E + e_x, total, mask=e_x < E)


@triton.jit
def _dispatch_scan_kernel(counts_ptr, offs_ptr, C, E, BLOCK_C: tl.constexpr, BLOCK_E: tl.constexpr):
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
def _dispatch_scatter_kernel(ids_ptr, offs_ptr, sorted_ptr, start_ptr, P, E, R, num_chunks, rows_per_program,
                             BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, E_PAD: tl.constexpr,
                             BLOCK_R: tl.constexpr, SINGLE: tl.constexpr, SUBS: tl.constexpr):
    """offs_ptr: (C + 1, E) from _dispatch_scan_kernel (unused when SINGLE)."""
    pid = tl.program_id(0)
    e_x = tl.arange(0, E_PAD)
    e_ok = e_x < E

    # Pairs per expert over all chunks, and over the chunks before this one.
    if SINGLE:
        total_e = tl.zeros([E_PAD], dtype=tl.int32)
        for sub in range(SUBS):
            _, _, onehot = _onehot(ids_ptr, sub * BLOCK_P, P, E, BLOCK_P, E_PAD)
            total_e += tl.sum(onehot, axis=0)
        before_e = tl.zeros([E_PAD], dtype=tl.int32)
    else:
        total_e = tl.load(offs_ptr + num_chunks * E + e_x, mask=e_ok, other=0)
        before_e = tl.load(offs_ptr + pid * E + e_x, mask=e_ok, other=0)

    padded_e = (total_e + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    end_e = tl.cumsum(padded_e, axis=0)
    start_e = end_e - padded_e
    used = tl.sum(padded_e, axis=0)
    if pid == 0:
        tl.store(start_ptr + e_x, start_e, mask=e_ok)
        tl.store(start_ptr + E, used)

    # Padding rows of this program's slice: rows past the expert's pairs, and rows past `used`.
    # Real rows are written below by the program owning their chunk, so no address is written twice.
    for r0 in range(pid * rows_per_program, tl.minimum((pid + 1) * rows_per_program, R), BLOCK_R):
        r_x = r0 + tl.arange(0, BLOCK_R)
        owner = (end_e[None, :] <= r_x[:, None]) & e_ok[None, :]
        e_r = tl.sum(owner.to(tl.int32), axis=1)  # expert of the row (E past the last one)
        mine = (e_x[None, :] == e_r[:, None])
        row_start = tl.sum(tl.where(mine, start_e[None, :], 0), axis=1)
        row_count = tl.sum(tl.where(mine, total_e[None, :], 0), axis=1)
        pad = (e_r >= E) | (r_x - row_start >= row_count)
        row_end = tl.minimum((pid + 1) * rows_per_program, R)
        tl.store(sorted_ptr + r_x, tl.full([BLOCK_R], 0, tl.int32) + P, mask=pad & (r_x < row_end))

    # Rows of this chunk's pairs, sub-block by sub-block: expert start + pairs of earlier chunks and
    # sub-blocks + rank inside the sub-block.
    base_e = start_e + before_e
    for sub in range(SUBS):
        offs_p, ids, onehot = _onehot(ids_ptr, (pid * SUBS + sub) * BLOCK_P, P, E, BLOCK_P, E_PAD)
        if BLOCK_P <= 128:
            # Rank = earlier pairs of the sub-block on the same expert, from a BLOCK_P x BLOCK_P comparison:
            # on the H200 a scan down the (BLOCK_P, E_PAD) one-hot cost more than the rest of the kernel.
            same = (ids[:, None] == ids[None, :]) & (tl.arange(0, BLOCK_P)[None, :] < tl.arange(0, BLOCK_P)[:, None])
            rank = tl.sum(same.to(tl.int32), axis=1)
        else:
            rank = tl.sum((tl.cumsum(onehot, axis=0) - onehot) * onehot, axis=1)
        base = tl.sum(onehot * base_e[None, :], axis=1)
        valid = tl.sum(onehot, axis=1) > 0
        tl.store(sorted_ptr + base + rank, offs_p.to(tl.int32), mask=valid)
        base_e += tl.sum(onehot, axis=0)
