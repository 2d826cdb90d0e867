"""Fused experts on Triton: dispatch -> gate_up (+bias, activation) -> down (+bias, routing weight) -> combine.

Legend: T tokens, W slots per token, P = T * W pairs, R dispatch rows, E experts, H hidden,
I intermediate, S split-K parts of the down GEMM.  Slots whose id is outside [0, E) add nothing.
No host sync, no atomics (CUDA-graph safe, bit-identical run to run).  Launchers take an explicit
tile configuration (what tune.py times); the custom op ``moepatch::fused_experts`` looks it up.
What an expert computes between its GEMMs is an :class:`ExpertForm` (default: SiLU(gate) * up, [gate; up]);
transposed weights are strided views ((E, 2I, H) / (E, H, I) of (E, H, 2I) / (E, I, H)), nothing else.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from triton.runtime.errors import OutOfResources
from triton.tools.tensor_descriptor import TensorDescriptor

from . import dispatch_kernels
from .dispatch_kernels import (
    dispatch_count_kernel,
    dispatch_scan_kernel,
    dispatch_scatter_kernel,
    ep_prepare_kernel,
    padded_send_kernel,
)
from .expert_graphs import experts_graphed
from .gemm_kernels import combine_kernel, down_kernel, down_token_kernel, gate_up_kernel, weighted_combine_kernel
from .graph_cache import on_device
from .tma_kernels import down_desc_kernel, gate_up_desc_kernel, gather_rows_kernel
from .tuning import device_key, get_config, max_rows

ACT_NAMES = ("silu", "gelu_tanh", "gelu", "relu2", "swiglu_oai")  # index: the kernels' ACT
CLAMP_NAMES = ("none", "before", "after")  # the kernels' CLAMP: gate <= limit before / after the activation


@dataclass(frozen=True)
class ExpertForm:
    """The expert computation between the GEMMs, as the kernels' compile-time flags (hashable: keys caches).

    gated: h = act(gate) * up from a 2I projection, else h = act(up) from I rows; act: index in ACT_NAMES
    ("swiglu_oai": gate * sigmoid(alpha * gate) * (up + 1), gpt-oss); interleaved: gate rows 0::2, up 1::2
    (else [gate; up]); clamp: index in CLAMP_NAMES, gate <= limit and up in [-limit, limit]."""

    gated: bool = True
    act: int = 0
    interleaved: bool = False
    clamp: int = 0
    limit: float = 0.0
    alpha: float = 1.0

    def __post_init__(self):
        if not 0 <= self.act < len(ACT_NAMES) or not 0 <= self.clamp < len(CLAMP_NAMES):
            raise ValueError(f"act must index {ACT_NAMES} and clamp {CLAMP_NAMES}, got {self.act}, {self.clamp}")
        if not self.gated and (self.interleaved or self.clamp or self.act == 4):
            raise ValueError(f"an ungated form has no interleaving, clamp or {ACT_NAMES[4]}: {self}")

    @property
    def plain(self) -> bool:
        return self == PLAIN

    def apply_gate(self, h_RX: torch.Tensor) -> torch.Tensor:
        """The form in torch, (R, 2I or I) -> (R, I) in h's dtype (what backend's probe matches modules with)."""
        f = h_RX.float()
        if not self.gated:
            return _act_torch(f, self.act, self.alpha).to(h_RX.dtype)
        g, u = (f[:, 0::2], f[:, 1::2]) if self.interleaved else f.chunk(2, dim=-1)
        if self.clamp == 1:
            g = g.clamp(max=self.limit)
        if self.clamp:
            u = u.clamp(-self.limit, self.limit)
        g = _act_torch(g, self.act, self.alpha)
        if self.clamp == 2:
            g = g.clamp(max=self.limit)
        return (g * (u + 1) if self.act == 4 else g * u).to(h_RX.dtype)

    def constexprs(self) -> dict:
        return dict(GATED=self.gated, INTERLEAVED=self.interleaved, ACT=self.act, CLAMP=self.clamp,
                    LIMIT=float(self.limit), ALPHA=float(self.alpha))

    def op_args(self) -> tuple:
        """The custom op's form arguments (gated, act, interleaved, clamp, limit, alpha)."""
        return self.gated, self.act, self.interleaved, self.clamp, float(self.limit), float(self.alpha)


PLAIN = ExpertForm()


def _act_torch(x: torch.Tensor, act: int, alpha: float) -> torch.Tensor:
    if act == 0:
        return torch.nn.functional.silu(x)
    if act == 1:
        return torch.nn.functional.gelu(x, approximate="tanh")
    if act == 2:
        return torch.nn.functional.gelu(x)
    if act == 3:
        return torch.relu(x).square()
    return x * torch.sigmoid(alpha * x)


@dataclass
class DispatchLayout:
    """The dispatch of one call: sorted_pairs_R (R,) int32 pair of each row (P on padding rows) and
    start_E1 (E + 1,) int32 first row of each expert (start_E1[E]: rows in use), or, *fused* (small P),
    ids_P (P,) the slot ids from which every GEMM program derives its rows.  rows: R (``max_rows``)."""

    sorted_pairs_R: torch.Tensor | None
    start_E1: torch.Tensor | None
    num_pairs: int
    width: int
    num_experts: int
    block_m: int
    rows: int
    ids_P: torch.Tensor | None = None

    @property
    def fused(self) -> bool:
        return self.ids_P is not None

    def kernel_args(self) -> tuple:
        """(ids, sorted, start) pointers for the GEMM kernels; unused ones get any int tensor."""
        if self.fused:
            return self.ids_P, self.ids_P, self.ids_P
        return self.sorted_pairs_R, self.sorted_pairs_R, self.start_E1

    @property
    def h_by_pair(self) -> bool:
        """Whether the pointer GEMMs keep h by pair (P rows) rather than by dispatch row (R rows)."""
        return not (self.fused and self.block_m >= 32)

    @property
    def h_rows(self) -> int:
        return self.num_pairs if self.h_by_pair else self.rows

    def kernel_constexprs(self) -> dict:
        return dict(FUSED=self.fused, P_PAD=_pow2(max(16, self.num_pairs)) if self.fused else 16,
                    H_BY_PAIR=self.h_by_pair)


# (kernel name, tile sizes) -> the pipeline depth that compiled, where this GPU had too little shared memory.
_STAGES_THAT_FIT: dict = {}
# Programmatic dependent launch between the pointer path's kernels on Hopper and later (False: off).
PDL = True


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


@functools.cache
def _pdl_supported() -> bool:
    """This Triton has the ``launch_pdl`` launch option."""
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:
        return False
    return "launch_pdl" in getattr(CUDAOptions, "__dataclass_fields__", {})


def use_pdl(device: torch.device) -> bool:
    """Programmatic dependent launch on ``device``: CUDA, compute capability >= 9, a Triton that has it."""
    if not PDL or device.type != "cuda" or not _pdl_supported():
        return False
    return _capability(device.index if device.index is not None else torch.cuda.current_device())[0] >= 9


def _launch(kernel, grid, args, constexprs: dict, num_warps: int, num_stages: int, pdl: bool = False):
    """Launch ``kernel``, with fewer stages where this GPU lacks the shared memory for ``num_stages`` (the
    tables target the H200's 227 KiB); only a configuration's first launch can fail so."""
    extra = {"launch_pdl": True} if pdl else {}
    stages = num_stages
    key = None
    if _STAGES_THAT_FIT:  # empty unless a configuration ever failed: no key to build on the fast path
        key = (kernel.fn.__name__, tuple(sorted(constexprs.items())), num_warps)
        stages = min(num_stages, _STAGES_THAT_FIT.get(key, num_stages))
    while True:
        try:
            kernel[grid](*args, **constexprs, num_warps=num_warps, num_stages=stages, **extra)
            return
        except OutOfResources:
            if stages <= 1:
                raise
            stages -= 1
            key = key or (kernel.fn.__name__, tuple(sorted(constexprs.items())), num_warps)
            _STAGES_THAT_FIT[key] = stages


# Plain-Python cdiv and next power of 2: Triton's JIT-aware ones cost microseconds a call, a layer makes a dozen.
def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2(n: int) -> int:
    return max(2, 1 << (int(n) - 1).bit_length()) if n > 1 else 2


# Fuse the dispatch into the GEMMs while every program's extra work stays small: a P_PAD x E_PAD
# count and a BLOCK_M x P_PAD selection (Mixtral up to M = 64, the 64/128-expert models up to M = 4).
_FUSE_MAX_PE = 4096
_FUSE_MAX_PM = 8192


def fuse_dispatch(num_pairs: int, num_experts: int, block_m: int) -> bool:
    """Whether the GEMMs derive the layout themselves (no dispatch launch) at this size."""
    p_pad = _pow2(max(16, num_pairs))
    return 0 < num_pairs and p_pad * _pow2(num_experts) <= _FUSE_MAX_PE and p_pad * block_m <= _FUSE_MAX_PM


def dispatch(ids_TW: torch.Tensor, num_experts: int, block_m: int, fuse: bool | None = None) -> DispatchLayout:
    """Sort the pairs of ``ids_TW`` (T, W) into per-expert blocks of ``block_m`` rows.  ``fuse``: True, a
    fused layout (no launch); None: on CUDA where :func:`fuse_dispatch` allows (slow under the interpreter)."""
    T, W = ids_TW.shape
    P, E = T * W, num_experts
    ids_P = ids_TW.reshape(-1)
    R = max_rows(P, E, block_m)
    if fuse is None:
        fuse = ids_TW.is_cuda and fuse_dispatch(P, E, block_m)
    if fuse and P > 0:
        return DispatchLayout(None, None, P, W, E, block_m, R, ids_P)
    sorted_R = torch.empty(R, dtype=torch.int32, device=ids_TW.device)
    start_E1 = torch.empty(E + 1, dtype=torch.int32, device=ids_TW.device)
    if P == 0:
        start_E1.zero_()
        return DispatchLayout(sorted_R, start_E1, P, W, E, block_m, R)
    e_pad = _pow2(E)
    block_p = _pow2(max(16, dispatch_kernels.CHUNK))  # pairs per chunk (see dispatch_kernels.py)
    sub_p = max(16, min(block_p, dispatch_kernels.TILE_ELEMS // e_pad))
    chunks = _cdiv(P, block_p)
    single = chunks == 1
    # One chunk: the scatter kernel counts by itself and never reads `offs` (any int32 buffer will do).
    offs = sorted_R
    if not single:
        counts = torch.empty(chunks, E, dtype=torch.int32, device=ids_TW.device)
        offs = torch.empty(chunks + 1, E, dtype=torch.int32, device=ids_TW.device)
        dispatch_count_kernel[(chunks,)](ids_P, counts, P, E, BLOCK_P=block_p, SUB_P=sub_p, E_PAD=e_pad,
                                         num_warps=dispatch_kernels.NUM_WARPS)
        block_e = min(e_pad, 8)
        dispatch_scan_kernel[(_cdiv(E, block_e),)](counts, offs, chunks, E,
                                                   BLOCK_C=dispatch_kernels.SCAN_BLOCK_C, BLOCK_E=block_e)
    rows_per_program = _cdiv(R, chunks)
    dispatch_scatter_kernel[(chunks,)](
        ids_P, offs, sorted_R, start_E1, P, E, R, chunks, rows_per_program,
        BLOCK_M=block_m, BLOCK_P=block_p, SUB_P=sub_p, E_PAD=e_pad,
        BLOCK_R=max(16, min(1024, _pow2(rows_per_program))), SINGLE=single, num_warps=dispatch_kernels.NUM_WARPS)
    return DispatchLayout(sorted_R, start_E1, P, W, E, block_m, R)


def ep_prepare(ids_TW: torch.Tensor, layout: DispatchLayout, dev_E: torch.Tensor, local_E: torch.Tensor,
               fixed: torch.Tensor, world: int, header_slots: int) -> tuple[torch.Tensor, ...]:
    """Expert parallelism's bookkeeping after :func:`dispatch` (unfused, block_m 1), in one launch.

    ids_TW (T, W) the ids ``layout`` sorted; dev_E, local_E (E,) int64 rank of each expert and its index
    there; fixed (F,) int64 values in front of every header row; world D, header_slots M.  Returns int64
    header_DX (D, F + M) (fixed values, then pairs per (rank, local expert)), meta (D + 1,) (pairs per rank,
    then ids outside [0, E]), order_P, tok_P (P,) (pair and token of every row, P past the kept pairs) and
    pos_P (P,) (row of every pair, -1: not sent)."""
    if layout.fused or layout.block_m != 1:
        raise ValueError("ep_prepare needs an unfused dispatch layout with block_m 1")
    P, E, W = layout.num_pairs, layout.num_experts, layout.width
    dev = ids_TW.device
    header = torch.empty(world, fixed.numel() + header_slots, dtype=torch.long, device=dev)
    meta = torch.empty(world + 1, dtype=torch.long, device=dev)
    order_P, tok_P, pos_P = (torch.empty(P, dtype=torch.long, device=dev) for _ in range(3))
    block = 1024
    ep_prepare_kernel[(max(1, _cdiv(P, block)),)](
        ids_TW.reshape(-1), layout.sorted_pairs_R, layout.start_E1, dev_E, local_E, fixed, header, meta,
        order_P, tok_P, pos_P, P, E, world, header_slots, W, BLOCK=block, E_PAD=_pow2(E), FIXED=fixed.numel(),
        num_warps=4)
    return header, meta, order_P, tok_P, pos_P


def padded_send(x_TH: torch.Tensor, ids_TW: torch.Tensor, layout: DispatchLayout, dev_E: torch.Tensor,
                local_E: torch.Tensor, first_D: torch.Tensor, send_NH: torch.Tensor, send_local_N: torch.Tensor,
                dest_P: torch.Tensor, slots_per_peer: int) -> None:
    """Fill the fixed-size expert-parallel send buffers in one launch (see ``padded_send_kernel``).

    x_TH (T, H); ids_TW, dev_E, local_E as :func:`ep_prepare`; first_D (D,) int64 first expert of each
    rank; send_NH (D·Q, H) contiguous in x's dtype and send_local_N (D·Q,) int64 (rows no pair takes keep
    their values); dest_P (T·W,) int64, written: each slot's row, −1 where it sends nothing; slots_per_peer Q.
    """
    if layout.fused or layout.block_m != 1:
        raise ValueError("padded_send needs an unfused dispatch layout with block_m 1")
    P, W, E = layout.num_pairs, layout.width, layout.num_experts
    if P == 0:
        return
    H = x_TH.shape[1]
    block_r = 32
    padded_send_kernel[(_cdiv(P, block_r),)](
        x_TH, ids_TW.reshape(-1), layout.sorted_pairs_R, layout.start_E1, dev_E, local_E, first_D, send_NH,
        send_local_N, dest_P, P, W, E, H, slots_per_peer, x_TH.stride(0), x_TH.stride(1), BLOCK_R=block_r,
        BLOCK_H=min(512, _pow2(H)), num_warps=4)


def _precision(dtype: torch.dtype) -> str:
    # fp32 models get true fp32 products (Triton would use TF32 on tensor cores otherwise).
    return "ieee" if dtype == torch.float32 else "tf32"


def _pointer_constexprs(layout: DispatchLayout, c: dict, E: int, K: int, dtype: torch.dtype) -> dict:
    """Compile-time arguments of gate_up_kernel / down_kernel for tile config ``c`` (K: the reduced dim)."""
    return dict(BLOCK_M=layout.block_m, BLOCK_N=c["BLOCK_N"], BLOCK_K=c["BLOCK_K"], GROUP_M=c["GROUP_M"],
                E_PAD=_pow2(E), EVEN_K=K % c["BLOCK_K"] == 0, PRECISION=_precision(dtype),
                **layout.kernel_constexprs())


def gate_up(x_TH: torch.Tensor, gate_up_EIH: torch.Tensor, layout: DispatchLayout, config: dict,
            out: torch.Tensor | None = None, *, form: ExpertForm = PLAIN, bias: torch.Tensor | None = None
            ) -> torch.Tensor:
    """h = silu(x @ gate^T) * (x @ up^T) (or ``form``'s computation) for every kept pair, by pair or by row
    (``layout.h_by_pair``); x_TH (T, H) in the weights' dtype, gate_up_EIH (E, 2I, H) [gate; up] rows
    (any strides; (E, I, H) ungated); bias (E, 2I or I) contiguous, or None."""
    E, two_i, H = gate_up_EIH.shape
    I = two_i // 2 if form.gated else two_i  # noqa: E741
    h_RI = out if out is not None else torch.empty(layout.h_rows, I, device=x_TH.device, dtype=x_TH.dtype)
    if layout.num_pairs == 0:
        return h_RI
    c = config["gate_up"]
    num_m = layout.rows // layout.block_m
    grid = (num_m * _cdiv(I, c["BLOCK_N"]),)
    _launch(gate_up_kernel, grid,
            (x_TH, gate_up_EIH, h_RI, *layout.kernel_args(),
             layout.num_pairs, layout.width, E, I, H, num_m,
             x_TH.stride(0), x_TH.stride(1), gate_up_EIH.stride(0), gate_up_EIH.stride(1), gate_up_EIH.stride(2),
             h_RI.stride(0)),
            dict(_pointer_constexprs(layout, c, E, H, x_TH.dtype), PDL=layout.fused and use_pdl(x_TH.device),
                 b1_ptr=bias, HAS_BIAS=bias is not None, **form.constexprs()),
            c["num_warps"], c["num_stages"])
    return h_RI


def down(h_RI: torch.Tensor, down_EHI: torch.Tensor, layout: DispatchLayout, weights_TW: torch.Tensor,
         config: dict, *, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y_SPH[s, p] = weight[p] * (h[row of p] @ down_e^T (+ bias_e on part 0)) over split-K part s (rows of
    dropped pairs unwritten): (S, P, H) in h's dtype when S == 1, else fp32 parts for the combine to add.
    down_EHI (E, H, I) any strides; bias (E, H) contiguous, or None."""
    E, H, I = down_EHI.shape  # noqa: E741
    c = config["down"]
    split = max(1, min(int(c.get("SPLIT_K", 1)), _cdiv(I, c["BLOCK_K"])))
    y_dtype = h_RI.dtype if split == 1 else torch.float32
    y_SPH = torch.empty(split, layout.num_pairs, H, device=h_RI.device, dtype=y_dtype)
    if layout.num_pairs == 0:
        return y_SPH
    k_per_split = _cdiv(_cdiv(I, split), c["BLOCK_K"]) * c["BLOCK_K"]
    num_m = layout.rows // layout.block_m
    pdl = layout.fused and use_pdl(h_RI.device)
    grid = (num_m * _cdiv(H, c["BLOCK_N"]), split)
    _launch(down_kernel, grid,
            (h_RI, down_EHI, y_SPH, *layout.kernel_args(), weights_TW.reshape(-1),
             layout.num_pairs, E, H, I, num_m, k_per_split,
             h_RI.stride(0), down_EHI.stride(0), down_EHI.stride(1), down_EHI.stride(2), y_SPH.stride(0),
             y_SPH.stride(1)),
            dict(_pointer_constexprs(layout, c, E, I, h_RI.dtype), PDL=pdl, b2_ptr=bias, HAS_BIAS=bias is not None),
            c["num_warps"], c["num_stages"], pdl=pdl)
    return y_SPH


def descriptors_fit(layout: DispatchLayout, *tensors: torch.Tensor) -> bool:
    """Whether the descriptor GEMMs take these operands: contiguous, 16-byte aligned, an unfused layout."""
    if layout.fused or layout.num_pairs == 0:
        return False
    return all(t.is_contiguous() and t.data_ptr() % 16 == 0 and (t.shape[-1] * t.element_size()) % 16 == 0
               for t in tensors)


@functools.cache
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _programs(c: dict, tiles: int, device: torch.device) -> tuple[tuple[int], dict]:
    """(grid, tile loop constexprs): one program per tile, or ``PERSISTENT`` programs per SM walking the tiles."""
    per_sm = int(c.get("PERSISTENT", 0))
    if per_sm <= 0:
        return (tiles,), dict(NUM_PROGRAMS=0, FLATTEN=False, WARP_SPECIALIZE=False)
    # The interpreter (CPU) pretends to have 2 SMs, so tests walk several tiles per program.
    sms = _num_sms(device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else 2
    n = max(1, min(tiles, per_sm * sms))
    return (n,), dict(NUM_PROGRAMS=n, FLATTEN=bool(c.get("FLATTEN", 0)),
                      WARP_SPECIALIZE=bool(c.get("WARP_SPECIALIZE", 0)))


def gather_rows(x_TH: torch.Tensor, layout: DispatchLayout) -> torch.Tensor:
    """x_RH[r] = x[token of row r] for the rows in use (zeros on their padding rows); rows past them unwritten."""
    T, H = x_TH.shape
    x_RH = torch.empty(layout.rows, H, device=x_TH.device, dtype=x_TH.dtype)
    block_r = 32
    block_h = min(512, _pow2(H))
    gather_rows_kernel[(_cdiv(layout.rows, block_r),)](
        x_TH, layout.sorted_pairs_R, layout.start_E1, x_RH, layout.num_pairs, layout.width, layout.num_experts, H,
        x_TH.stride(0), x_TH.stride(1), BLOCK_R=block_r, BLOCK_H=block_h, num_warps=4)
    return x_RH


def gate_up_desc(x_RH: torch.Tensor, gate_up_EIH: torch.Tensor, layout: DispatchLayout, config: dict,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`gate_up` on gathered rows (see :func:`gather_rows`) through tensor descriptors."""
    E, two_i, H = gate_up_EIH.shape
    I = two_i // 2  # noqa: E741
    h_RI = out if out is not None else torch.empty(layout.rows, I, device=x_RH.device, dtype=x_RH.dtype)
    c = config["gate_up"]
    bm, bn, bk = layout.block_m, c["BLOCK_N"], c["BLOCK_K"]
    num_m = layout.rows // bm
    grid, loop = _programs(c, num_m * _cdiv(I, bn), x_RH.device)
    a_desc = TensorDescriptor.from_tensor(x_RH, [bm, bk])
    joint = bool(c.get("JOINT", 0))
    if joint:  # gate and up blocks of the same columns in one [2, BLOCK_N, BLOCK_K] box
        w_desc = TensorDescriptor.from_tensor(gate_up_EIH.view(E * 2, I, H), [2, bn, bk])
    else:
        w_desc = TensorDescriptor.from_tensor(gate_up_EIH.view(E * two_i, H), [bn, bk])
    split = int(c.get("H_STORE_SPLIT", 0))  # 0: pointer stores of h; 1, 2: descriptor stores in that many parts
    if split not in (0, 1, 2):
        raise ValueError(f"H_STORE_SPLIT must be 0, 1 or 2, got {split}")
    h_desc = TensorDescriptor.from_tensor(h_RI, [bm, bn // split]) if split else None
    _launch(gate_up_desc_kernel, grid,
            (a_desc, w_desc, h_RI, h_desc, layout.start_E1, E, I, H, h_RI.stride(0)),
            dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=c["GROUP_M"], E_PAD=_pow2(E), JOINT=joint,
                 H_STORE_SPLIT=split, **loop),
            c["num_warps"], c["num_stages"])
    return h_RI


def down_desc(h_RI: torch.Tensor, down_EHI: torch.Tensor, layout: DispatchLayout, weights_TW: torch.Tensor,
              config: dict) -> torch.Tensor:
    """:func:`down` (without split-K) through tensor descriptors; returns (1, P, H)."""
    E, H, I = down_EHI.shape  # noqa: E741
    c = config["down"]
    bm, bn, bk = layout.block_m, c["BLOCK_N"], c["BLOCK_K"]
    y_SPH = torch.empty(1, layout.num_pairs, H, device=h_RI.device, dtype=h_RI.dtype)
    num_m = layout.rows // bm
    grid, loop = _programs(c, num_m * _cdiv(H, bn), h_RI.device)
    a_desc = TensorDescriptor.from_tensor(h_RI, [bm, bk])
    w_desc = TensorDescriptor.from_tensor(down_EHI.view(E * H, I), [bn, bk])
    _launch(down_desc_kernel, grid,
            (a_desc, w_desc, y_SPH, layout.sorted_pairs_R, layout.start_E1, weights_TW.reshape(-1),
             layout.num_pairs, E, H, I, y_SPH.stride(1)),
            dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=c["GROUP_M"], E_PAD=_pow2(E), **loop),
            c["num_warps"], c["num_stages"])
    return y_SPH


def combine(y_SPH: torch.Tensor, ids_TW: torch.Tensor, num_experts: int, out_dtype: torch.dtype,
            pdl: bool = False) -> torch.Tensor:
    """out_TH[t] = fixed-order fp32 sum of the token's kept rows of y_SPH (0 when none is kept); pdl: a
    programmatic dependent of the down GEMM (CUDA only)."""
    T, W = ids_TW.shape
    S, _, H = y_SPH.shape
    out_TH = torch.empty(T, H, device=y_SPH.device, dtype=out_dtype)
    if T == 0:
        return out_TH
    block_n = min(512, _pow2(H))
    pdl = pdl and use_pdl(y_SPH.device)
    _launch(combine_kernel, (T, _cdiv(H, block_n)),
            (y_SPH, ids_TW.reshape(-1), out_TH, num_experts, H, y_SPH.stride(0), y_SPH.stride(1),
             out_TH.stride(0)), dict(W=W, S=S, BLOCK_N=block_n, PDL=pdl), 4, 1, pdl=pdl)
    return out_TH


def weighted_combine(y_PH: torch.Tensor, pos_TW: torch.Tensor, weights_TW: torch.Tensor,
                     out_dtype: torch.dtype) -> torch.Tensor:
    """The expert-parallel combine: out_TH[t] = fp32 sum over t's slots of (y_PH[pos[t, w]] * w[t, w]).to(y's
    dtype), pos -1: no row; one pass over the returned rows, no (T*W, H) scatter buffer."""
    T, W = pos_TW.shape
    H = y_PH.shape[1]
    out_TH = torch.empty(T, H, device=y_PH.device, dtype=out_dtype)
    if T == 0:
        return out_TH
    block_n = min(512, _pow2(H))
    weighted_combine_kernel[(T, _cdiv(H, block_n))](
        y_PH, pos_TW.reshape(-1), weights_TW.reshape(-1), out_TH, H, y_PH.stride(0), out_TH.stride(0),
        W=W, BLOCK_N=block_n, num_warps=4)
    return out_TH


def token_path(layout: DispatchLayout, config: dict, has_bias: bool = False) -> bool:
    """Whether the down GEMM runs as :func:`down_token` (one token, a "TOKEN" down configuration, no
    down bias: biased experts take :func:`down` and :func:`combine`)."""
    return (bool(config["down"].get("TOKEN")) and layout.num_pairs == layout.width and layout.h_by_pair
            and not has_bias)


def down_token(h_RI: torch.Tensor, down_EHI: torch.Tensor, ids_TW: torch.Tensor, weights_TW: torch.Tensor,
               config: dict, out_dtype: torch.dtype, fused: bool = False) -> torch.Tensor:
    """:func:`down` and :func:`combine` in one launch for a single token (h by pair): (1, H).  fused: h
    came from a fused-layout gate_up (then launched as its programmatic dependent on CUDA)."""
    E, H, I = down_EHI.shape  # noqa: E741
    W = ids_TW.shape[1]
    c = config["down"]
    pdl = fused and use_pdl(h_RI.device)
    out_TH = torch.empty(1, H, device=h_RI.device, dtype=out_dtype)
    _launch(down_token_kernel, (_cdiv(H, c["BLOCK_N"]),),
            (h_RI, down_EHI, out_TH, ids_TW, weights_TW, W, E, H, I,
             h_RI.stride(0), down_EHI.stride(0), down_EHI.stride(1), down_EHI.stride(2)),
            dict(BLOCK_N=c["BLOCK_N"], BLOCK_K=c["BLOCK_K"], W_PAD=_pow2(W), EVEN_K=I % c["BLOCK_K"] == 0,
                 PRECISION=_precision(h_RI.dtype), PDL=pdl),
            c["num_warps"], c["num_stages"], pdl=pdl)
    return out_TH


def down_and_combine(h_RI: torch.Tensor, down_EHI: torch.Tensor, layout: DispatchLayout, ids_TW: torch.Tensor,
                     weights_TW: torch.Tensor, config: dict, out_dtype: torch.dtype, *,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """The pointer path's down GEMM and combine: (T, H) in ``out_dtype``; bias (E, H) or None."""
    if token_path(layout, config, bias is not None):
        return down_token(h_RI, down_EHI, ids_TW, weights_TW, config, out_dtype, fused=layout.fused)
    return combine(down(h_RI, down_EHI, layout, weights_TW, config, bias=bias), ids_TW, layout.num_experts,
                   out_dtype, pdl=layout.fused)


def config_for(x_TH: torch.Tensor, ids_TW: torch.Tensor, gate_up_EIH: torch.Tensor,
               down_EHI: torch.Tensor | None = None) -> dict:
    """The table's configuration for this call's shape and GPU (I from down_EHI where given, else gate_up's 2I)."""
    E, two_i, H = gate_up_EIH.shape
    I = down_EHI.shape[2] if down_EHI is not None else two_i // 2  # noqa: E741
    return get_config(x_TH.shape[0], E, H, I, ids_TW.shape[1], device_key(x_TH.device))


def _check(x_TH, ids_TW, weights_TW, gate_up_EIH, down_EHI, gate_up_bias, down_bias, form):
    T, H = x_TH.shape
    E, two_i, H1 = gate_up_EIH.shape
    I = two_i // 2 if form.gated else two_i  # noqa: E741
    if H1 != H or (form.gated and two_i % 2) or tuple(down_EHI.shape) != (E, H, I):
        want = "(E, 2I, H)" if form.gated else "(E, I, H) (ungated)"
        raise ValueError(f"expert weights do not match: x {tuple(x_TH.shape)}, gate_up {tuple(gate_up_EIH.shape)}, "
                         f"down {tuple(down_EHI.shape)}; expected gate_up {want} and down (E, H, I)")
    for name, b, shape in (("gate_up_bias", gate_up_bias, (E, two_i)), ("down_bias", down_bias, (E, H))):
        if b is not None and tuple(b.shape) != shape:
            raise ValueError(f"{name} {tuple(b.shape)} does not match the weights: expected {shape}")
    if ids_TW.shape != weights_TW.shape or ids_TW.shape[0] != T:
        raise ValueError(f"routing shapes {tuple(ids_TW.shape)} / {tuple(weights_TW.shape)} do not match {T} tokens")


def fused_experts_impl(x_TH: torch.Tensor, ids_TW: torch.Tensor, weights_TW: torch.Tensor,
                       gate_up_EIH: torch.Tensor, down_EHI: torch.Tensor, config: dict | None = None,
                       fuse_dispatch: bool | None = None, *, gate_up_bias: torch.Tensor | None = None,
                       down_bias: torch.Tensor | None = None, form: ExpertForm = PLAIN) -> torch.Tensor:
    """The whole fused experts layer: (T, H) in x_TH's dtype.  x_TH (T, H) any float dtype (computed in
    the weights'); ids_TW (T, W) integer ids, outside [0, E): empty slots; weights_TW (T, W) any float
    dtype (applied in fp32); gate_up_EIH (E, 2I, H) [gate; up] ((E, I, H) for an ungated ``form``);
    down_EHI (E, H, I), both any strides (a transposed layout: ``w.transpose(1, 2)``); gate_up_bias (E, 2I
    or I), down_bias (E, H) or None, added in fp32; config None: looked up.  The descriptor GEMMs run the
    plain form without biases only; other forms take the pointer GEMMs."""
    _check(x_TH, ids_TW, weights_TW, gate_up_EIH, down_EHI, gate_up_bias, down_bias, form)
    E = gate_up_EIH.shape[0]
    cfg = config if config is not None else config_for(x_TH, ids_TW, gate_up_EIH, down_EHI)
    x_c = x_TH.to(gate_up_EIH.dtype)
    ids_c = ids_TW.contiguous()
    layout = dispatch(ids_c, E, cfg["BLOCK_M"], fuse_dispatch)
    w_c = weights_TW.contiguous()
    plain = form.plain and gate_up_bias is None and down_bias is None
    if cfg.get("DESC") and plain and descriptors_fit(layout, x_c, gate_up_EIH, down_EHI):
        h_RI = gate_up_desc(gather_rows(x_c, layout), gate_up_EIH, layout, cfg)
        return combine(down_desc(h_RI, down_EHI, layout, w_c, cfg), ids_c, E, x_TH.dtype)
    b1 = gate_up_bias.contiguous() if gate_up_bias is not None else None
    b2 = down_bias.contiguous() if down_bias is not None else None
    h_RI = gate_up(x_c, gate_up_EIH, layout, cfg, form=form, bias=b1)
    return down_and_combine(h_RI, down_EHI, layout, ids_c, w_c, cfg, x_TH.dtype, bias=b2)


def moe_experts(x_TH: torch.Tensor, ids_TW: torch.Tensor, weights_TW: torch.Tensor, gate_up_EIH: torch.Tensor,
                down_EHI: torch.Tensor, *, graphs: bool = True, gate_up_bias: torch.Tensor | None = None,
                down_bias: torch.Tensor | None = None, form: ExpertForm = PLAIN) -> torch.Tensor:
    """What patched models call (arguments as :func:`fused_experts_impl`): the custom op under torch.compile,
    else the launchers directly (a custom op costs host time per layer), replayed from CUDA graphs at 1-64
    tokens unless ``graphs`` is False.  Same result on every path; none records autograd."""
    extra = {} if form.plain and gate_up_bias is None and down_bias is None else \
        dict(gate_up_bias=gate_up_bias, down_bias=down_bias, form=form)
    if torch.compiler.is_compiling():
        return fused_experts(x_TH, ids_TW, weights_TW, gate_up_EIH, down_EHI, gate_up_bias, down_bias,
                             *form.op_args())
    if not graphs:
        with on_device(x_TH):
            return fused_experts_impl(x_TH, ids_TW, weights_TW, gate_up_EIH, down_EHI, **extra)
    return experts_graphed(fused_experts_impl, x_TH, ids_TW, weights_TW, gate_up_EIH, down_EHI, **extra)


@torch.library.custom_op("moepatch::fused_experts", mutates_args=())
def fused_experts(x_TH: torch.Tensor, ids_TW: torch.Tensor, weights_TW: torch.Tensor, gate_up_EIH: torch.Tensor,
                  down_EHI: torch.Tensor, gate_up_bias: torch.Tensor | None = None,
                  down_bias: torch.Tensor | None = None, gated: bool = True, act: int = 0,
                  interleaved: bool = False, clamp: int = 0, limit: float = 0.0, alpha: float = 1.0) -> torch.Tensor:
    """:func:`fused_experts_impl` (the configuration looked up) as one custom op, opaque to torch.compile;
    the form as :class:`ExpertForm`'s fields (``ExpertForm.op_args``)."""
    form = ExpertForm(gated, act, interleaved, clamp, limit, alpha)
    return fused_experts_impl(x_TH, ids_TW, weights_TW, gate_up_EIH, down_EHI, gate_up_bias=gate_up_bias,
                              down_bias=down_bias, form=form)


@fused_experts.register_fake
def _(x_TH, ids_TW, weights_TW, gate_up_EIH, down_EHI, gate_up_bias=None, down_bias=None, gated=True, act=0,
      interleaved=False, clamp=0, limit=0.0, alpha=1.0):
    return torch.empty_like(x_TH)
