"""Large-M expert GEMMs on contiguous, pre-gathered rows, loaded with tensor descriptors (TMA on Hopper).

Legend: T tokens, W slots per token, P = T * W pairs, R dispatch rows, E experts, H hidden,
I intermediate.

At large M the layer is compute-bound and the gathered-A GEMMs of gemm_kernels.py (one pointer
per row, cp.async) leave the tensor cores waiting.  Here the dispatch rows are first copied into a
contiguous buffer (``_gather_rows_kernel``: x_RH[r] = x[token of row r], zeros on padding rows:
R·H·2 bytes written once, ~1 % of the layer at Mixtral M = 4096), so every operand tile of both
GEMMs is a plain rectangle of a 2-D tensor: A from x_RH / h_RI, B from the weights viewed as
(E·2I, H) and (E·H, I).  Tiles go through ``tensor_descriptor.load`` (TMA bulk copies into shared
memory, then wgmma), which is what brings Triton close to cuBLAS on Hopper.

Out-of-range reads are safe by construction: a descriptor zero-fills past the tensor's edges; a
gate tile whose last columns run past I reads up rows instead, and a down tile past H reads the
next expert's rows: those columns are never stored.

    _gate_up_desc_kernel: h_RI[r] = silu(x_RH[r] @ Wg_e^T) * (x_RH[r] @ Wu_e^T), as _gate_up_kernel.
    _down_desc_kernel:    y_PH[p] = w[p] * (h_RI[r] @ Wd_e^T), rows stored by pair, as _down_kernel
                          (no split-K: large M has programs enough).

Tiles cover only the row blocks in use (read from the layout on the GPU, so the grid stays static):
with NUM_PROGRAMS > 0 the kernels are persistent (program p walks tiles p, p + NUM_PROGRAMS, ...,
FLATTEN lets Triton pipeline across tiles); else the grid has one program per possible tile and
programs past the tiles in use exit.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .gemm_kernels import _block_coords, _block_expert


@triton.jit
def _gather_rows_kernel(x_ptr, sorted_ptr, start_ptr, xs_ptr, P, W, E, H, stride_xt, stride_xk,
                        BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
    r_x = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    used = tl.load(start_ptr + E)
    if tl.program_id(0) * BLOCK_R >= used:
        return
    pair = tl.load(sorted_ptr + r_x, mask=r_x < used, other=P)
    ok = pair < P
    tok = (pair // W).to(tl.int64)
    for h0 in range(0, H, BLOCK_H):
        h_x = h0 + tl.arange(0, BLOCK_H)
        h_ok = h_x < H
        v = tl.load(x_ptr + tok[:, None] * stride_xt + h_x[None, :] * stride_xk, mask=ok[:, None] & h_ok[None, :],
                    other=0.0)
        tl.store(xs_ptr + r_x[:, None].to(tl.int64) * H + h_x[None, :], v, mask=(r_x < used)[:, None] & h_ok[None, :])


@triton.jit
def _tile_space(start_ptr, E, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NUM_PROGRAMS: tl.constexpr,
                TAIL: tl.constexpr, E_PAD: tl.constexpr):
    """(full row blocks, tail blocks, column blocks, tile stride of a program): the tiles cover the rows in use.

    TAIL 0: the layout is padded to BLOCK_M, every block is full and there are no tails.  TAIL =
    BLOCK_M // 2: the layout is padded to TAIL rows per expert; each expert's rows split into full
    BLOCK_M blocks and, where its padded rows are an odd number of TAIL blocks, one TAIL-row block.
    """
    step = NUM_PROGRAMS if NUM_PROGRAMS > 0 else tl.num_programs(0)
    if TAIL == 0:
        return tl.load(start_ptr + E) // BLOCK_M, 0, tl.cdiv(N, BLOCK_N), step
    _, full_e, tail_e = _mixed_blocks(start_ptr, E, BLOCK_M, E_PAD)
    return tl.sum(full_e, axis=0), tl.sum(tail_e, axis=0), tl.cdiv(N, BLOCK_N), step


@triton.jit
def _mixed_blocks(start_ptr, E, BLOCK_M: tl.constexpr, E_PAD: tl.constexpr):
    """Per expert (E_PAD,): first row, full BLOCK_M blocks, tail blocks (0 or 1) of a layout padded to BLOCK_M // 2."""
    e_x = tl.arange(0, E_PAD)
    ok = e_x < E
    first = tl.load(start_ptr + e_x, mask=ok, other=0)
    rows = tl.load(start_ptr + 1 + e_x, mask=ok, other=0) - first
    return first, rows // BLOCK_M, (rows % BLOCK_M) // (BLOCK_M // 2)


@triton.jit
def _nth_block(start_ptr, b, E, BLOCK_M: tl.constexpr, E_PAD: tl.constexpr, TAIL_BLOCK: tl.constexpr):
    """(first row, expert) of full block b (TAIL_BLOCK False) or of tail block b, in expert order."""
    e_x = tl.arange(0, E_PAD)
    first, full_e, tail_e = _mixed_blocks(start_ptr, E, BLOCK_M, E_PAD)
    n_e = tail_e if TAIL_BLOCK else full_e
    end_e = tl.cumsum(n_e, axis=0)
    e = tl.sum(((end_e <= b) & (e_x < E)).to(tl.int32), axis=0)
    mine = e_x == e
    row0 = tl.sum(tl.where(mine, first, 0), axis=0)
    if TAIL_BLOCK:
        row0 += tl.sum(tl.where(mine, full_e, 0), axis=0) * BLOCK_M
    else:
        row0 += (b - tl.sum(tl.where(mine, end_e - n_e, 0), axis=0)) * BLOCK_M
    return row0, e


@triton.jit
def _tile_origin(tile, num_m, num_n, start_ptr, E, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 GROUP_M: tl.constexpr, E_PAD: tl.constexpr, TAIL: tl.constexpr, TAIL_BLOCK: tl.constexpr):
    """(first row, expert, first column) of a tile, in the grouped order of _block_coords."""
    pid_m, pid_n = _block_coords(tile, num_m, num_n, GROUP_M)
    if TAIL == 0:
        row0 = pid_m * BLOCK_M
        return row0, _block_expert(start_ptr, row0, E, E_PAD), pid_n * BLOCK_N
    row0, e = _nth_block(start_ptr, pid_m, E, BLOCK_M, E_PAD, TAIL_BLOCK)
    return row0, e, pid_n * BLOCK_N


@triton.jit
def _gate_up_tile(a_desc, w_desc, h_ptr, h_desc, row0, e, n0, N, K, stride_hr, BM: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, JOINT: tl.constexpr, H_STORE_SPLIT: tl.constexpr):
    """h rows [row0, row0 + BM) x columns [n0, n0 + BLOCK_N) of expert e (descriptors with BM-row boxes)."""
    if JOINT:
        # One (BM, 2·BLOCK_N) product: w_desc is 3-D (E·2, I, H) with blocks [2, BLOCK_N, BLOCK_K],
        # the gate rows then the up rows of the same columns, so A is read once per 2·BLOCK_N columns.
        acc = tl.zeros([BM, 2 * BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            a = a_desc.load([row0, k0])
            b = w_desc.load([2 * e, n0, k0]).reshape(2 * BLOCK_N, BLOCK_K)
            acc = tl.dot(a, b.T, acc)
        acc_g, acc_u = tl.split(acc.reshape(BM, 2, BLOCK_N).permute(0, 2, 1))
    else:
        g_row = e * 2 * N + n0  # gate rows of expert e in the (E·2I, H) view; up rows follow I later
        u_row = g_row + N
        acc_g = tl.zeros([BM, BLOCK_N], dtype=tl.float32)
        acc_u = tl.zeros([BM, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            a = a_desc.load([row0, k0])
            bg = w_desc.load([g_row, k0])
            bu = w_desc.load([u_row, k0])
            acc_g = tl.dot(a, bg.T, acc_g)
            acc_u = tl.dot(a, bu.T, acc_u)
    h = (acc_g * tl.sigmoid(acc_g) * acc_u).to(h_ptr.dtype.element_ty)
    if H_STORE_SPLIT == 0:
        offs_m = row0 + tl.arange(0, BM)
        offs_n = n0 + tl.arange(0, BLOCK_N)
        h_ptrs = h_ptr + offs_m[:, None].to(tl.int64) * stride_hr + offs_n[None, :]
        tl.store(h_ptrs, h, mask=(offs_n < N)[None, :])
    elif H_STORE_SPLIT == 1:
        h_desc.store([row0, n0], h)
    else:  # two column halves: half the staging buffer in shared memory
        h_lo, h_hi = tl.split(h.reshape(BM, 2, BLOCK_N // 2).permute(0, 2, 1))
        h_desc.store([row0, n0], h_lo)
        h_desc.store([row0, n0 + BLOCK_N // 2], h_hi)


@triton.jit
def _gate_up_desc_kernel(a_desc, w_desc, h_ptr, h_desc, a_tail_desc, h_tail_desc, start_ptr, E, N, K, stride_hr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         GROUP_M: tl.constexpr, E_PAD: tl.constexpr, NUM_PROGRAMS: tl.constexpr,
                         FLATTEN: tl.constexpr, WARP_SPECIALIZE: tl.constexpr, JOINT: tl.constexpr,
                         H_STORE_SPLIT: tl.constexpr, TAIL: tl.constexpr):
    """N = I, K = H.  a_desc: x_RH blocks [BLOCK_M, BLOCK_K]; w_desc: (E·2I, H) blocks [BLOCK_N, BLOCK_K],
    or with JOINT the 3-D view (E·2, I, H) in blocks [2, BLOCK_N, BLOCK_K].

    H_STORE_SPLIT 0 stores h through h_ptr; 1 or 2 through h_desc (blocks [BLOCK_M, BLOCK_N // H_STORE_SPLIT],
    a bulk copy out of shared memory; the descriptor clips the columns past I).

    Tiles cover only the rows in use; program p takes tiles p, p + step, ... where step is
    NUM_PROGRAMS (persistent) or the grid size (one tile each).  With TAIL (= BLOCK_M // 2) the
    tail blocks follow the full ones, through a_tail_desc / h_tail_desc (TAIL-row boxes).
    """
    num_m, num_t, num_n, step = _tile_space(start_ptr, E, N, BLOCK_M, BLOCK_N, NUM_PROGRAMS, TAIL, E_PAD)
    for tile in tl.range(tl.program_id(0), num_m * num_n, step, flatten=FLATTEN, warp_specialize=WARP_SPECIALIZE):
        row0, e, n0 = _tile_origin(tile, num_m, num_n, start_ptr, E, BLOCK_M, BLOCK_N, GROUP_M, E_PAD, TAIL, False)
        _gate_up_tile(a_desc, w_desc, h_ptr, h_desc, row0, e, n0, N, K, stride_hr, BLOCK_M, BLOCK_N, BLOCK_K,
                      JOINT, H_STORE_SPLIT)
    if TAIL > 0:
        # Continue the program's stride over the tail tiles (their count is known only here).
        first = (tl.program_id(0) + step - (num_m * num_n) % step) % step
        for tile in tl.range(first, num_t * num_n, step, flatten=FLATTEN, warp_specialize=WARP_SPECIALIZE):
            row0, e, n0 = _tile_origin(tile, num_t, num_n, start_ptr, E, BLOCK_M, BLOCK_N, 1, E_PAD, TAIL, True)
            _gate_up_tile(a_tail_desc, w_desc, h_ptr, h_tail_desc, row0, e, n0, N, K, stride_hr, TAIL, BLOCK_N,
                          BLOCK_K, JOINT, H_STORE_SPLIT)


@triton.jit
def _down_tile(a_desc, w_desc, y_ptr, sorted_ptr, weights_ptr, row0, e, n0, P, N, K, stride_yp, BM: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """y rows of the pairs of rows [row0, row0 + BM) x columns [n0, n0 + BLOCK_N), weighted (BM-row boxes)."""
    b_row = e * N + n0
    acc = tl.zeros([BM, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = a_desc.load([row0, k0])
        b = w_desc.load([b_row, k0])
        acc = tl.dot(a, b.T, acc)
    pair = tl.load(sorted_ptr + row0 + tl.arange(0, BM))
    row_ok = pair < P
    w = tl.load(weights_ptr + pair, mask=row_ok, other=0.0).to(tl.float32)
    acc = acc * w[:, None]
    offs_n = n0 + tl.arange(0, BLOCK_N)
    y_ptrs = y_ptr + pair[:, None].to(tl.int64) * stride_yp + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & (offs_n < N)[None, :])


@triton.jit
def _down_desc_kernel(a_desc, w_desc, a_tail_desc, y_ptr, sorted_ptr, start_ptr, weights_ptr, P, E, N, K, stride_yp,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      GROUP_M: tl.constexpr, E_PAD: tl.constexpr, NUM_PROGRAMS: tl.constexpr,
                      FLATTEN: tl.constexpr, WARP_SPECIALIZE: tl.constexpr, TAIL: tl.constexpr):
    """N = H, K = I.  a_desc: h_RI blocks [BLOCK_M, BLOCK_K]; w_desc: (E·H, I) blocks [BLOCK_N, BLOCK_K];
    a_tail_desc: h_RI blocks [TAIL, BLOCK_K] for the tail tiles (TAIL > 0)."""
    num_m, num_t, num_n, step = _tile_space(start_ptr, E, N, BLOCK_M, BLOCK_N, NUM_PROGRAMS, TAIL, E_PAD)
    for tile in tl.range(tl.program_id(0), num_m * num_n, step, flatten=FLATTEN, warp_specialize=WARP_SPECIALIZE):
        row0, e, n0 = _tile_origin(tile, num_m, num_n, start_ptr, E, BLOCK_M, BLOCK_N, GROUP_M, E_PAD, TAIL, False)
        _down_tile(a_desc, w_desc, y_ptr, sorted_ptr, weights_ptr, row0, e, n0, P, N, K, stride_yp, BLOCK_M,
                   BLOCK_N, BLOCK_K)
    if TAIL > 0:
        first = (tl.program_id(0) + step - (num_m * num_n) % step) % step
        for tile in tl.range(first, num_t * num_n, step, flatten=FLATTEN, warp_specialize=WARP_SPECIALIZE):
            row0, e, n0 = _tile_origin(tile, num_t, num_n, start_ptr, E, BLOCK_M, BLOCK_N, 1, E_PAD, TAIL, True)
            _down_tile(a_tail_desc, w_desc, y_ptr, sorted_ptr, weights_ptr, row0, e, n0, P, N, K, stride_yp, TAIL,
                       BLOCK_N, BLOCK_K)
