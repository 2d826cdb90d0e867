"""Grouped expert GEMMs over the dispatch layout, and the deterministic combine (no atomics).

Legend: T tokens, W slots per token, P = T * W pairs, R dispatch rows, E experts, H hidden,
I intermediate, S split-K parts.  H_BY_PAIR: h has P rows, else (fused layouts with BLOCK_M >= 32) R.
FUSED (small P): each program derives the dispatch layout from the slot ids.  PDL (Hopper, fused
layouts): the next kernel launches early and waits (gdc_wait) before reading.  Detail: docs/kernels.md.
Expert forms (experts.ExpertForm): GATED / INTERLEAVED gate and up rows, ACT, CLAMP at LIMIT, HAS_BIAS;
at their defaults (SiLU(gate) * up, [gate; up], no bias) the kernels compile to the plain SwiGLU code.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait  # Triton >= 3.3 (pyproject: >= 3.6)


@triton.jit
def block_coords(pid, num_m, num_n, GROUP_M: tl.constexpr):
    width = GROUP_M * num_n
    group = pid // width
    first_m = group * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    return pid_m, pid_n


@triton.jit
def block_expert(start_ptr, row0, E, E_PAD: tl.constexpr):
    # Expert owning rows [row0, row0 + BLOCK_M): the number of experts whose rows end at or before
    # row0 (empty experts end where they start, so they are counted and skipped).
    e_x = tl.arange(0, E_PAD)
    end_e = tl.load(start_ptr + 1 + e_x, mask=e_x < E, other=2147483647)
    return tl.sum((end_e <= row0).to(tl.int32), axis=0)


@triton.jit
def _fused_block_rows(ids_ptr, row0, P, E, BLOCK_M: tl.constexpr, E_PAD: tl.constexpr, P_PAD: tl.constexpr):
    """(expert, pair of each row, rows in use) of the row block at row0 from the slot ids: the layout of
    dispatch_kernels.py (experts in order padded to BLOCK_M rows, pairs ascending, padding rows P)."""
    p_x = tl.arange(0, P_PAD)
    e_x = tl.arange(0, E_PAD)
    ids = tl.load(ids_ptr + p_x, mask=p_x < P, other=-1).to(tl.int32)
    onehot = ((ids[:, None] == e_x[None, :]) & (e_x[None, :] < E)).to(tl.int32)
    padded = (tl.sum(onehot, axis=0) + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    end = tl.cumsum(padded, axis=0)
    used = tl.sum(padded, axis=0)
    e = tl.sum(((end <= row0) & (e_x < E)).to(tl.int32), axis=0)
    start = tl.sum(tl.where(e_x == e, end - padded, 0), axis=0)
    match = (ids == e).to(tl.int32)
    rank = tl.cumsum(match, axis=0) - match
    want = row0 - start + tl.arange(0, BLOCK_M)
    sel = (match[None, :] > 0) & (rank[None, :] == want[:, None])
    pair = tl.sum(tl.where(sel, p_x[None, :], 0), axis=1)
    pair = tl.where(tl.sum(sel.to(tl.int32), axis=1) > 0, pair, P)
    return e, pair, used


@triton.jit
def _block_rows(ids_ptr, sorted_ptr, start_ptr, row0, P, E, BLOCK_M: tl.constexpr, E_PAD: tl.constexpr,
                FUSED: tl.constexpr, P_PAD: tl.constexpr):
    """(expert, pair of each row, rows in use) of the row block at row0: from the dispatch layout, or FUSED."""
    if FUSED:
        e, pair, used = _fused_block_rows(ids_ptr, row0, P, E, BLOCK_M, E_PAD, P_PAD)
    else:
        used = tl.load(start_ptr + E)
        e = block_expert(start_ptr, row0, E, E_PAD)
        pair = tl.load(sorted_ptr + row0 + tl.arange(0, BLOCK_M))
    return e.to(tl.int64), pair, used


@triton.jit
def _activation(x, ACT: tl.constexpr, ALPHA: tl.constexpr):
    """ACT 0 silu, 1 gelu (tanh approximation), 2 gelu (erf), 3 relu^2, 4 gpt-oss's x * sigmoid(ALPHA * x); fp32."""
    if ACT == 0:
        y = x * tl.sigmoid(x)
    elif ACT == 1:  # 0.5 x (1 + tanh(z)) = x sigmoid(2z), z = sqrt(2/pi) (x + 0.044715 x^3)
        y = x * tl.sigmoid(1.5957691216057308 * (x + 0.044715 * x * x * x))
    elif ACT == 2:
        y = 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))
    elif ACT == 3:
        r = tl.maximum(x, 0.0)
        y = r * r
    else:
        y = x * tl.sigmoid(ALPHA * x)
    return y


@triton.jit
def gate_up_kernel(x_ptr, w1_ptr, h_ptr, ids_ptr, sorted_ptr, start_ptr,
                    P, W, E, N, K, num_m,
                    stride_xt, stride_xk, stride_we, stride_wn, stride_wk, stride_hr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                    E_PAD: tl.constexpr, EVEN_K: tl.constexpr, PRECISION: tl.constexpr,
                    FUSED: tl.constexpr, P_PAD: tl.constexpr, H_BY_PAIR: tl.constexpr, PDL: tl.constexpr = False,
                    b1_ptr=None, GATED: tl.constexpr = True, INTERLEAVED: tl.constexpr = False,
                    ACT: tl.constexpr = 0, CLAMP: tl.constexpr = 0, LIMIT: tl.constexpr = 0.0,
                    ALPHA: tl.constexpr = 1.0, HAS_BIAS: tl.constexpr = False):
    """N = I (outputs per half), K = H.  Gate row n at n (up at N + n), INTERLEAVED at 2n (up 2n + 1);
    not GATED: one projection of N rows, h = act(up).  b1 (E, 2N or N) contiguous, added in fp32.
    CLAMP 1: gate <= LIMIT before the activation, 2: after it; either way up in [-LIMIT, LIMIT]."""
    if PDL:
        gdc_launch_dependents()
    pid = tl.program_id(0)
    pid_m, pid_n = block_coords(pid, num_m, tl.cdiv(N, BLOCK_N), GROUP_M)
    row0 = pid_m * BLOCK_M
    if not FUSED:  # the cheap exit before anything else is read
        if row0 >= tl.load(start_ptr + E):
            return
    e, pair, used = _block_rows(ids_ptr, sorted_ptr, start_ptr, row0, P, E, BLOCK_M, E_PAD, FUSED, P_PAD)
    if row0 >= used:
        return

    row_ok = pair < P
    tok = (pair // W).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + tok[:, None] * stride_xt + offs_k[None, :] * stride_xk
    if INTERLEAVED:
        g_row = offs_n * 2
        u_off = stride_wn
    else:
        g_row = offs_n
        u_off = N * stride_wn
    g_ptrs = w1_ptr + e * stride_we + g_row[None, :].to(tl.int64) * stride_wn + offs_k[:, None] * stride_wk
    u_ptrs = g_ptrs + u_off

    acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)  # not GATED: the up projection
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
            bg = tl.load(g_ptrs, mask=n_ok[None, :], other=0.0)
            if GATED:
                bu = tl.load(u_ptrs, mask=n_ok[None, :], other=0.0)
        else:
            k_ok = offs_k < K - k0
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            bg = tl.load(g_ptrs, mask=n_ok[None, :] & k_ok[:, None], other=0.0)
            if GATED:
                bu = tl.load(u_ptrs, mask=n_ok[None, :] & k_ok[:, None], other=0.0)
        acc_g = tl.dot(a, bg, acc_g, input_precision=PRECISION)
        if GATED:
            acc_u = tl.dot(a, bu, acc_u, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_xk
        g_ptrs += BLOCK_K * stride_wk
        if GATED:
            u_ptrs += BLOCK_K * stride_wk

    if HAS_BIAS:  # fp32, on the unrounded accumulators
        if GATED:
            b_ptrs = b1_ptr + e * (2 * N) + g_row
            if INTERLEAVED:
                u_b = 1
            else:
                u_b = N
            acc_u += tl.load(b_ptrs + u_b, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        else:
            b_ptrs = b1_ptr + e * N + g_row
        acc_g += tl.load(b_ptrs, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    # The activation in fp32 on the unrounded accumulator, one rounding for the stored product.
    if GATED:
        if CLAMP == 1:
            acc_g = tl.minimum(acc_g, LIMIT)
        if CLAMP != 0:
            acc_u = tl.minimum(tl.maximum(acc_u, -LIMIT), LIMIT)
        g = _activation(acc_g, ACT, ALPHA)
        if CLAMP == 2:
            g = tl.minimum(g, LIMIT)
        if ACT == 4:  # gpt-oss: (up + 1) * glu
            h = g * (acc_u + 1.0)
        else:
            h = g * acc_u
    else:
        h = _activation(acc_g, ACT, ALPHA)
    h_row = pair if H_BY_PAIR else row0 + tl.arange(0, BLOCK_M)
    h_ptrs = h_ptr + h_row[:, None].to(tl.int64) * stride_hr + offs_n[None, :]
    tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def down_kernel(h_ptr, w2_ptr, y_ptr, ids_ptr, sorted_ptr, start_ptr, weights_ptr,
                 P, E, N, K, num_m, k_per_split,
                 stride_hr, stride_we, stride_wn, stride_wk, stride_ys, stride_yp,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                 E_PAD: tl.constexpr, EVEN_K: tl.constexpr, PRECISION: tl.constexpr,
                 FUSED: tl.constexpr, P_PAD: tl.constexpr, H_BY_PAIR: tl.constexpr, PDL: tl.constexpr = False,
                 b2_ptr=None, HAS_BIAS: tl.constexpr = False):
    """N = H, K = I; program_id(1) is the split-K part, covering [s * k_per_split, (s + 1) * k_per_split).
    HAS_BIAS: b2 (E, N) contiguous, added in fp32 by part 0, before the routing weight."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    pid_m, pid_n = block_coords(pid, num_m, tl.cdiv(N, BLOCK_N), GROUP_M)
    row0 = pid_m * BLOCK_M
    if not FUSED:
        if row0 >= tl.load(start_ptr + E):
            return
    e, pair, used = _block_rows(ids_ptr, sorted_ptr, start_ptr, row0, P, E, BLOCK_M, E_PAD, FUSED, P_PAD)
    if row0 >= used:
        return

    row_ok = pair < P
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    k_lo = split * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    offs_k = k_lo + tl.arange(0, BLOCK_K)
    h_row = tl.where(row_ok, pair, 0) if H_BY_PAIR else row0 + tl.arange(0, BLOCK_M)
    a_ptrs = h_ptr + h_row[:, None].to(tl.int64) * stride_hr + offs_k[None, :]
    b_ptrs = w2_ptr + e * stride_we + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None] * stride_wk
    if PDL:  # h comes from gate_up: wait for it; let the combine launch
        gdc_wait()
        gdc_launch_dependents()

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
            b = tl.load(b_ptrs, mask=n_ok[None, :], other=0.0)
        else:
            k_ok = offs_k < k_hi - (k0 - k_lo)
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=n_ok[None, :] & k_ok[:, None], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K * stride_wk

    if HAS_BIAS:
        b_ok = n_ok & (offs_n * 0 + split == 0)  # (a tensor: the interpreter rejects masks built from scalars)
        acc += tl.load(b2_ptr + e * N + offs_n, mask=b_ok, other=0.0).to(tl.float32)[None, :]
    # The routing weight in fp32 before the single rounding to the output dtype.
    w = tl.load(weights_ptr + pair, mask=row_ok, other=0.0).to(tl.float32)
    acc = acc * w[:, None]
    y_ptrs = y_ptr + split.to(tl.int64) * stride_ys + pair[:, None].to(tl.int64) * stride_yp + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def _token_tile(N, BLOCK_N: tl.constexpr):
    """Grid (T, N / BLOCK_N) of the combine kernels: this program's token and columns."""
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    return tl.program_id(0).to(tl.int64), offs_n, offs_n < N


@triton.jit
def combine_kernel(y_ptr, ids_ptr, out_ptr, E, N, stride_ys, stride_yp, stride_ot,
                    W: tl.constexpr, S: tl.constexpr, BLOCK_N: tl.constexpr, PDL: tl.constexpr = False):
    """out[t] = sum over slots w, then split-K parts s, of y[s, t * W + w] (fp32, in that order).
    W and S are compile-time: the loops unroll and every load is in flight at once."""
    if PDL:
        gdc_wait()
    t, offs_n, n_ok = _token_tile(N, BLOCK_N)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for w in tl.static_range(W):
        p = t * W + w
        # Sentinel slots were never computed: their rows hold garbage and must not be read.
        eid_n = tl.load(ids_ptr + p + offs_n * 0)
        mask = n_ok & (eid_n >= 0) & (eid_n < E)
        for s in tl.static_range(S):
            acc += tl.load(y_ptr + s * stride_ys + p * stride_yp + offs_n, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * stride_ot + offs_n, acc.to(out_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def weighted_combine_kernel(y_ptr, pos_ptr, w_ptr, out_ptr, N, stride_yp, stride_ot,
                             W: tl.constexpr, BLOCK_N: tl.constexpr):
    """out[t] = fp32 sum over slots w, in slot order, of (y[pos[t, w]] * weight[t, w]) rounded to y's dtype
    (as torch's ``(y * w).to(y.dtype)``); pos: row of each (token, slot) in y, -1 where none (never read)."""
    t, offs_n, n_ok = _token_tile(N, BLOCK_N)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for w in tl.static_range(W):
        p = t * W + w
        row_n = tl.load(pos_ptr + p + offs_n * 0)
        wt = tl.load(w_ptr + p).to(tl.float32)
        mask = n_ok & (row_n >= 0)
        y = tl.load(y_ptr + row_n * stride_yp + offs_n, mask=mask, other=0.0)
        acc += (y.to(tl.float32) * wt).to(y_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + t * stride_ot + offs_n, acc.to(out_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def down_token_kernel(h_ptr, w2_ptr, out_ptr, ids_ptr, weights_ptr, W, E, N, K,
                       stride_hr, stride_we, stride_wn, stride_wk,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, W_PAD: tl.constexpr, EVEN_K: tl.constexpr,
                       PRECISION: tl.constexpr, PDL: tl.constexpr = False):
    """N = H, K = I; h has one row per slot of the single token.  A 16-row tl.dot whose row 0 is the token
    (rows 1-15 masked, never loaded) keeps the GEMMs' pipelined loads."""
    pid_n = tl.program_id(0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    rows = tl.arange(0, 16)
    row0 = rows == 0
    w_x = tl.arange(0, W_PAD)
    ids_w = tl.load(ids_ptr + w_x, mask=w_x < W, other=-1).to(tl.int64)
    wts_w = tl.load(weights_ptr + w_x, mask=w_x < W, other=0.0).to(tl.float32)
    nk = tl.cdiv(K, BLOCK_K)
    if PDL:
        gdc_wait()

    acc = tl.zeros([16, BLOCK_N], dtype=tl.float32)
    total = tl.zeros([16, BLOCK_N], dtype=tl.float32)
    for it in range(0, W * nk):
        w = it // nk
        k0 = (it - w * nk) * BLOCK_K
        e = tl.sum(tl.where(w_x == w, ids_w, 0), axis=0)
        e_k = offs_k * 0 + e  # (a tensor: the interpreter rejects masks built from scalars)
        ok_k = (e_k >= 0) & (e_k < E)
        if not EVEN_K:
            ok_k = ok_k & (offs_k < K - k0)
        a_ptrs = h_ptr + w.to(tl.int64) * stride_hr + (k0 + offs_k)[None, :] + rows[:, None] * 0
        b_ptrs = (w2_ptr + tl.where(ok_k, e_k, 0)[:, None] * stride_we + offs_n[None, :].to(tl.int64) * stride_wn
                  + (k0 + offs_k)[:, None] * stride_wk)
        a = tl.load(a_ptrs, mask=row0[:, None] & ok_k[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=n_ok[None, :] & ok_k[:, None], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        # After the slot's last K block: add it with its routing weight (fp32), start the next slot.
        last = k0 + BLOCK_K >= K
        wt = tl.sum(tl.where(w_x == w, wts_w, 0.0), axis=0)
        total = tl.where(last, total + acc * wt, total)
        acc = tl.where(last, 0.0, acc)
    out = tl.sum(total, axis=0)  # rows 1..15 are zero
    tl.store(out_ptr + offs_n, out.to(out_ptr.dtype.element_ty), mask=n_ok)
