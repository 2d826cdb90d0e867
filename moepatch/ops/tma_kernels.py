"""Large-M expert GEMMs on contiguous, pre-gathered rows, loaded with tensor descriptors (TMA on Hopper).

Legend: P pairs, R dispatch rows, E experts, H hidden, I intermediate.  Descriptors zero-fill past the edges
(docs/kernels.md, "Large M").  NUM_PROGRAMS > 0: persistent programs walking the tiles.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .gemm_kernels import block_coords, block_expert


@triton.jit
def gather_rows_kernel(x_ptr, sorted_ptr, start_ptr, xs_ptr, P, W, E, H, stride_xt, stride_xk,
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
def _tile_space(start_ptr, E, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NUM_PROGRAMS: tl.constexpr):
    """(row blocks in use, column blocks, tile stride of a program): the tiles cover the rows in use only."""
    num_m = tl.load(start_ptr + E) // BLOCK_M
    step = NUM_PROGRAMS if NUM_PROGRAMS > 0 else tl.num_programs(0)
    return num_m, tl.cdiv(N, BLOCK_N), step


@triton.jit
def _tile_origin(tile, num_m, num_n, start_ptr, E, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 GROUP_M: tl.constexpr, E_PAD: tl.constexpr):
    """(first row, expert, first column) of a tile, in the grouped order of block_coords."""
    pid_m, pid_n = block_coords(tile, num_m, num_n, GROUP_M)
    row0 = pid_m * BLOCK_M
    return row0, block_expert(start_ptr, row0, E, E_PAD), pid_n * BLOCK_N


@triton.jit
def gate_up_desc_kernel(a_desc, w_desc, h_ptr, h_desc, start_ptr, E, N, K, stride_hr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         GROUP_M: tl.constexpr, E_PAD: tl.constexpr, NUM_PROGRAMS: tl.constexpr,
                         FLATTEN: tl.constexpr, WARP_SPECIALIZE: tl.constexpr, JOINT: tl.constexpr,
                         H_STORE_SPLIT: tl.constexpr):
    """N = I, K = H.  a_desc: x_RH blocks [BLOCK_M, BLOCK_K]; w_desc: (E·2I, H) blocks [BLOCK_N, BLOCK_K],
    or with JOINT (E·2, I, H) blocks [2, BLOCK_N, BLOCK_K].  H_STORE_SPLIT 0 stores h through h_ptr; 1 or 2
    through h_desc in that many column parts (the descriptor clips the columns past I)."""
    num_m, num_n, step = _tile_space(start_ptr, E, N, BLOCK_M, BLOCK_N, NUM_PROGRAMS)
    for tile in tl.range(tl.program_id(0), num_m * num_n, step, flatten=FLATTEN, warp_specialize=WARP_SPECIALIZE):
        row0, e, n0 = _tile_origin(tile, num_m, num_n, start_ptr, E, BLOCK_M, BLOCK_N, GROUP_M, E_PAD)
        if JOINT:  # one (BLOCK_M, 2·BLOCK_N) product: gate then up rows of the same columns, A read once
            acc = tl.zeros([BLOCK_M, 2 * BLOCK_N], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                a = a_desc.load([row0, k0])
                b = w_desc.load([2 * e, n0, k0]).reshape(2 * BLOCK_N, BLOCK_K)
                acc = tl.dot(a, b.T, acc)
            acc_g, acc_u = tl.split(acc.reshape(BLOCK_M, 2, BLOCK_N).permute(0, 2, 1))
        else:
            g_row = e * 2 * N + n0  # gate rows of expert e in the (E·2I, H) view; up rows follow I later
            u_row = g_row + N
            acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                a = a_desc.load([row0, k0])
                bg = w_desc.load([g_row, k0])
                bu = w_desc.load([u_row, k0])
                acc_g = tl.dot(a, bg.T, acc_g)
                acc_u = tl.dot(a, bu.T, acc_u)
        h = (acc_g * tl.sigmoid(acc_g) * acc_u).to(h_ptr.dtype.element_ty)
        if H_STORE_SPLIT == 0:
            offs_m = row0 + tl.arange(0, BLOCK_M)
            offs_n = n0 + tl.arange(0, BLOCK_N)
            h_ptrs = h_ptr + offs_m[:, None].to(tl.int64) * stride_hr + offs_n[None, :]
            tl.store(h_ptrs, h, mask=(offs_n < N)[None, :])
        elif H_STORE_SPLIT == 1:
            h_desc.store([row0, n0], h)
        else:  # two column halves: half the staging buffer in shared memory
            h_lo, h_hi = tl.split(h.reshape(BLOCK_M, 2, BLOCK_N // 2).permute(0, 2, 1))
            h_desc.store([row0, n0], h_lo)
            h_desc.store([row0, n0 + BLOCK_N // 2], h_hi)


@triton.jit
def down_desc_kernel(a_desc, w_desc, y_ptr, sorted_ptr, start_ptr, weights_ptr, P, E, N, K, stride_yp,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      GROUP_M: tl.constexpr, E_PAD: tl.constexpr, NUM_PROGRAMS: tl.constexpr,
                      FLATTEN: tl.constexpr, WARP_SPECIALIZE: tl.constexpr):
    """N = H, K = I.  a_desc: h_RI blocks [BLOCK_M, BLOCK_K]; w_desc: (E·H, I) blocks [BLOCK_N, BLOCK_K]."""
    num_m, num_n, step = _tile_space(start_ptr, E, N, BLOCK_M, BLOCK_N, NUM_PROGRAMS)
    for tile in tl.range(tl.program_id(0), num_m * num_n, step, flatten=FLATTEN, warp_specialize=WARP_SPECIALIZE):
        row0, e, n0 = _tile_origin(tile, num_m, num_n, start_ptr, E, BLOCK_M, BLOCK_N, GROUP_M, E_PAD)
        b_row = e * N + n0
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            a = a_desc.load([row0, k0])
            b = w_desc.load([b_row, k0])
            acc = tl.dot(a, b.T, acc)
        pair = tl.load(sorted_ptr + row0 + tl.arange(0, BLOCK_M))
        row_ok = pair < P
        w = tl.load(weights_ptr + pair, mask=row_ok, other=0.0).to(tl.float32)
        acc = acc * w[:, None]
        offs_n = n0 + tl.arange(0, BLOCK_N)
        y_ptrs = y_ptr + pair[:, None].to(tl.int64) * stride_yp + offs_n[None, :]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & (offs_n < N)[None, :])
