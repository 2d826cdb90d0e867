"""The Triton kernels against float64 references, on tiny odd shapes (interpreter on the CPU)."""

import pytest
import torch

from moepatch.ops import experts as X
from moepatch.ops.tuning import default_config

TOL = {torch.float32: 1e-5, torch.float16: 3e-3}


def _dispatch_reference(ids_TW, E, block_m):
    """Expected (sorted pairs, starts): per expert its pairs ascending, padded to block_m with P."""
    P = ids_TW.numel()
    ids_P = ids_TW.reshape(-1)
    rows, starts = [], [0]
    for e in range(E):
        pairs = (ids_P == e).nonzero().flatten().tolist()
        pad = -len(pairs) % block_m
        rows += pairs + [P] * pad
        starts.append(len(rows))
    R = X.max_rows(P, E, block_m)
    return torch.tensor(rows + [P] * (R - len(rows)), dtype=torch.int32), torch.tensor(starts, dtype=torch.int32)


def _ids(kind, T, W, E, gen):
    if kind == "random":  # includes sentinels (E) and empty experts by chance
        return torch.randint(0, E + 1, (T, W), generator=gen)
    if kind == "distinct":  # every token a distinct set of W experts (top-k shape), W == E allowed
        return torch.rand(T, E, generator=gen).argsort(dim=1)[:, :W]
    if kind == "one_expert":  # all tokens on one expert, the other slots dropped
        ids = torch.full((T, W), E)
        ids[:, 0] = E - 1
        return ids
    if kind == "all_sentinel":
        return torch.full((T, W), E)
    if kind == "empty_expert":  # expert 1 never chosen
        ids = torch.randint(0, E, (T, W), generator=gen)
        return torch.where(ids == 1, torch.zeros_like(ids), ids)
    raise ValueError(kind)


KINDS = ["random", "distinct", "one_expert", "all_sentinel", "empty_expert"]


# (kind, T, W, E, block_m); the large case (a scan of the chunk counts in several steps) runs two kinds,
# being slow under the interpreter.
_DISPATCH_CASES = [(kind, *shape) for shape in [(1, 2, 8, 16), (13, 2, 8, 16), (7, 3, 3, 16), (37, 4, 5, 32),
                                                (150, 2, 128, 16), (611, 2, 8, 16),
                                                (97, 3, 8, 1), (300, 2, 64, 128)]
                   for kind in KINDS if not (kind == "distinct" and shape[1] > shape[2])]
_DISPATCH_CASES += [(kind, 2100, 2, 128, 16) for kind in ("random", "one_expert")]


@pytest.mark.parametrize("kind,T,W,E,block_m", _DISPATCH_CASES)
def test_dispatch_layout(kind, T, W, E, block_m, device, monkeypatch):
    gen = torch.Generator().manual_seed(T * 31 + E)
    ids = _ids(kind, T, W, E, gen)
    want_rows, want_starts = _dispatch_reference(ids, E, block_m)
    # Default chunks; 16-pair chunks (many of them, one-hot sub-blocks of fewer pairs than a chunk at
    # 128 experts); a scan of the chunk counts in several steps.
    for chunk, scan_block in ((X.dispatch_kernels.CHUNK, X.dispatch_kernels.SCAN_BLOCK_C), (16, 16),
                              (X.dispatch_kernels.CHUNK, 4)):
        monkeypatch.setattr(X.dispatch_kernels, "CHUNK", chunk)
        monkeypatch.setattr(X.dispatch_kernels, "SCAN_BLOCK_C", scan_block)
        layout = X.dispatch(ids.to(device), E, block_m, fuse=False)
        assert torch.equal(layout.start_E1.cpu(), want_starts), (chunk, scan_block)
        assert torch.equal(layout.sorted_pairs_R.cpu(), want_rows), (chunk, scan_block)


def _reference(x, ids, w, w1, w2):
    """float64 experts: sum over kept slots of w * down(silu(gate x) * up x)."""
    E, two_i, _ = w1.shape
    I = two_i // 2  # noqa: E741
    x64, w1_64, w2_64 = x.double().cpu(), w1.double().cpu(), w2.double().cpu()
    out = torch.zeros(x.shape, dtype=torch.float64)
    ids, w = ids.cpu(), w.double().cpu()
    for e in range(E):
        tok, slot = (ids == e).nonzero(as_tuple=True)
        if tok.numel() == 0:
            continue
        g = x64[tok] @ w1_64[e, :I].T
        u = x64[tok] @ w1_64[e, I:].T
        y = (torch.nn.functional.silu(g) * u) @ w2_64[e].T
        out.index_add_(0, tok, y * w[tok, slot][:, None])
    return out


def _problem(T, W, E, H, I, dtype, kind, device, seed=0):  # noqa: E741
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=gen).to(dtype)
    w1 = (torch.randn(E, 2 * I, H, generator=gen) * H**-0.5).to(dtype)
    w2 = (torch.randn(E, H, I, generator=gen) * I**-0.5).to(dtype)
    ids = _ids(kind, T, W, E, gen)
    wts = torch.rand(T, W, generator=gen)
    return [t.to(device) for t in (x, ids, wts, w1, w2)]


def _rel(out, ref):
    ref_norm = ref.norm().item()
    return (out.double().cpu() - ref).norm().item() / (ref_norm if ref_norm > 0 else 1.0)


def _config(T, W, E, H, I, block_m=16, split=1, bn=32, bk=32):  # noqa: E741
    cfg = default_config(T, E, H, I, W, "cpu")
    cfg["BLOCK_M"] = block_m
    cfg["gate_up"] = dict(cfg["gate_up"], BLOCK_N=bn, BLOCK_K=bk)
    cfg["down"] = dict(cfg["down"], BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split)
    return cfg


def _desc_config(T, W, E, H, I, persistent=0, joint=0, h_store=0):  # noqa: E741
    """The large-M path: gathered rows and descriptor GEMMs (BLOCK_N 16 so tiles run past I and H);
    h_store: H_STORE_SPLIT, gate_up's h stored by pointers (0) or through a descriptor in 1 or 2 parts."""
    cfg = _config(T, W, E, H, I, bn=16, bk=16)
    cfg["DESC"] = True
    for part in ("gate_up", "down"):
        cfg[part] = dict(cfg[part], PERSISTENT=persistent, FLATTEN=persistent, SPLIT_K=1, JOINT=joint)
    cfg["gate_up"]["H_STORE_SPLIT"] = h_store
    return cfg


def _token_config(T, W, E, H, I):  # noqa: E741
    """One token's down GEMM and combine in one kernel (BLOCK_N 16 so tiles run past H)."""
    cfg = _config(T, W, E, H, I, bn=16, bk=16)
    cfg["down"] = dict(cfg["down"], TOKEN=1)
    return cfg


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("T,W,E,H,I", [(1, 2, 8, 32, 48), (13, 2, 8, 32, 48), (7, 3, 3, 40, 24), (19, 5, 5, 24, 40),
                                       (1, 5, 5, 24, 40)])
def test_fused_experts_matches_reference(T, W, E, H, I, kind, dtype, device):  # noqa: E741
    if kind == "distinct" and W > E:
        pytest.skip("more slots than experts")
    x, ids, wts, w1, w2 = _problem(T, W, E, H, I, dtype, kind, device)
    ref = _reference(x, ids, wts, w1, w2)
    for cfg in (_config(T, W, E, H, I), _config(T, W, E, H, I, block_m=32, split=3, bn=16, bk=16),
                _desc_config(T, W, E, H, I, h_store=2), _desc_config(T, W, E, H, I, persistent=1, joint=1, h_store=1),
                _desc_config(T, W, E, H, I, persistent=1), _token_config(T, W, E, H, I)):
        out = X.fused_experts_impl(x, ids, wts, w1, w2, cfg)
        assert out.dtype == dtype and out.shape == x.shape
        assert torch.isfinite(out).all()
        if kind == "all_sentinel":
            assert (out == 0).all()
        else:
            assert _rel(out, ref) < TOL[dtype], (cfg, _rel(out, ref))


@pytest.mark.parametrize("fuse", [False, True], ids=["dispatched", "fused"])
def test_token_path_is_one_launch_after_gate_up_and_leaves_no_y(fuse, device, monkeypatch):
    """T = 1 with a TOKEN down configuration: no down / combine launch, the same result as split-K + combine."""
    T, W, E, H, I = 1, 3, 6, 40, 56  # noqa: E741
    x, ids, wts, w1, w2 = _problem(T, W, E, H, I, torch.float32, "distinct", device, seed=5)
    ids[0, 1] = E  # one dropped slot
    cfg = _token_config(T, W, E, H, I)
    layout = X.dispatch(ids, E, cfg["BLOCK_M"], fuse=fuse)
    assert X.token_path(layout, cfg) and not X.token_path(layout, _config(T, W, E, H, I))
    h = X.gate_up(x, w1, layout, cfg)
    split = X.combine(X.down(h, w2, layout, wts, _config(T, W, E, H, I, split=2, bn=16, bk=16)), ids, E, x.dtype)
    for name in ("down", "combine"):
        monkeypatch.setattr(X, name, lambda *a, **k: pytest.fail("the token path launched a separate kernel"))
    out = X.down_and_combine(h, w2, layout, ids, wts, cfg, x.dtype)
    assert out.shape == (1, H) and torch.allclose(out, split, rtol=1e-5, atol=1e-6)
    assert _rel(out, _reference(x, ids, wts, w1, w2)) < TOL[torch.float32]


@pytest.mark.parametrize("kind", ["random", "one_expert", "all_sentinel", "empty_expert"])
@pytest.mark.parametrize("T,W,E,block_m,split", [(1, 2, 8, 16, 4), (13, 2, 8, 16, 1), (9, 3, 5, 32, 2)])
def test_fused_dispatch_equals_dispatch_kernel(T, W, E, block_m, split, kind, device):
    """GEMMs that derive their rows from the ids (decode) give bit for bit the dispatch-kernel result."""
    H, I = 32, 48  # noqa: E741
    assert X.fuse_dispatch(T * W, E, block_m)
    x, ids, wts, w1, w2 = _problem(T, W, E, H, I, torch.float32, kind, device, seed=T)
    cfg = _config(T, W, E, H, I, block_m=block_m, split=split)
    fused = X.fused_experts_impl(x, ids, wts, w1, w2, cfg, fuse_dispatch=True)
    plain = X.fused_experts_impl(x, ids, wts, w1, w2, cfg, fuse_dispatch=False)
    assert torch.equal(fused, plain)
    if kind != "all_sentinel":
        assert _rel(fused, _reference(x, ids, wts, w1, w2)) < TOL[torch.float32]


def test_h_rows_follow_the_layout(device):
    """h is kept by pair (P rows) except for fused layouts with BLOCK_M >= 32 (padded rows, measured faster)."""
    T, W, E, H, I = 9, 2, 4, 32, 24  # noqa: E741
    x, ids, wts, w1, w2 = _problem(T, W, E, H, I, torch.float32, "random", device)
    outs = []
    for block_m, fuse, by_pair in ((16, True, True), (32, True, False), (32, False, True)):
        layout = X.dispatch(ids, E, block_m, fuse=fuse)
        assert layout.h_by_pair == by_pair
        cfg = _config(T, W, E, H, I, block_m=block_m)
        h = X.gate_up(x, w1, layout, cfg)
        assert h.shape == ((T * W) if by_pair else layout.rows, I)
        outs.append(X.combine(X.down(h, w2, layout, wts, cfg), ids, E, x.dtype))
    assert torch.equal(outs[0], outs[2]) and torch.equal(outs[1], outs[2])


def test_dropped_pairs_never_reach_a_gemm(device):
    """A token whose every slot is a sentinel is exactly 0 even when its input row and weights are NaN."""
    T, W, E, H, I = 9, 2, 4, 32, 32  # noqa: E741
    x, ids, wts, w1, w2 = _problem(T, W, E, H, I, torch.float32, "distinct", device)
    ids[3] = E
    ids[5, 1] = E
    x[3] = float("nan")
    wts[3] = float("nan")
    wts[5, 1] = float("nan")
    out = X.fused_experts_impl(x, ids, wts, w1, w2, _config(T, W, E, H, I))
    assert (out[3] == 0).all() and torch.isfinite(out).all()
    keep = torch.ones(T, dtype=torch.bool)
    keep[3] = False
    ref = _reference(x.nan_to_num(), ids, wts.nan_to_num(), w1, w2)
    assert _rel(out[keep], ref[keep]) < TOL[torch.float32]


def test_odd_hidden_sizes_and_multichunk_dispatch(device):
    """H, I not multiples of BLOCK_K (masked K loop) and more pairs than one dispatch chunk."""
    T, W, E, H, I = 97, 3, 64, 20, 28  # noqa: E741  (E=64: 128 pairs per chunk, 3 chunks)
    x, ids, wts, w1, w2 = _problem(T, W, E, H, I, torch.float32, "random", device, seed=3)
    ref = _reference(x, ids, wts, w1, w2)
    out = X.fused_experts_impl(x, ids, wts, w1, w2, _config(T, W, E, H, I, split=2, bn=16, bk=16))
    assert _rel(out, ref) < TOL[torch.float32]


def test_deterministic(device):
    T, W, E, H, I = 29, 2, 8, 32, 32  # noqa: E741
    x, ids, wts, w1, w2 = _problem(T, W, E, H, I, torch.float16, "random", device, seed=5)
    for split in (1, 4):
        cfg = _config(T, W, E, H, I, split=split, bk=16, bn=16)
        a = X.fused_experts_impl(x, ids, wts, w1, w2, cfg)
        b = X.fused_experts_impl(x, ids, wts, w1, w2, cfg)
        assert torch.equal(a, b)


def test_combine_is_a_fixed_order_sum(device):
    """The combine equals a float32 sum over slots in ascending order, bit for bit."""
    T, W, E, H = 11, 3, 4, 40
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, E + 1, (T, W), generator=gen)
    y = torch.randn(2, T * W, H, generator=gen)
    out = X.combine(y.to(device), ids.to(device), E, torch.float32).cpu()
    want = torch.zeros(T, H)
    kept = (ids < E).reshape(-1)
    y_kept = torch.where(kept[None, :, None], y, 0.0).view(2, T, W, H)
    for w in range(W):
        for s in range(2):
            want += y_kept[s, :, w]
    assert torch.equal(out, want)


def test_custom_op_agrees_with_launchers(device):
    T, W, E, H, I = 10, 2, 4, 32, 32  # noqa: E741
    x, ids, wts, w1, w2 = _problem(T, W, E, H, I, torch.float32, "random", device)
    ref = X.fused_experts_impl(x, ids, wts, w1, w2)
    assert torch.equal(torch.ops.moepatch.fused_experts(x, ids, wts, w1, w2), ref)


def test_fake_tensor_shapes():
    """register_fake gives the real output shape (what torch.compile and graph capture rely on)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    T, W, E, H, I = 10, 2, 4, 32, 24  # noqa: E741
    x, ids, wts, w1, w2 = _problem(T, W, E, H, I, torch.float32, "random", "cpu")
    with FakeTensorMode() as mode:
        fx, fids, fw, fw1, fw2 = (mode.from_tensor(t) for t in (x, ids, wts, w1, w2))
        assert torch.ops.moepatch.fused_experts(fx, fids, fw, fw1, fw2).shape == (T, H)
    assert torch.ops.moepatch.fused_experts(x, ids, wts, w1, w2).shape == (T, H)


def test_descriptor_path_is_taken_and_falls_back(device, monkeypatch):
    """DESC configurations run the descriptor GEMMs when the operands allow it; otherwise the pointer GEMMs."""
    calls = []
    real = X.gate_up_desc
    monkeypatch.setattr(X, "gate_up_desc", lambda *a, **k: calls.append(1) or real(*a, **k))
    for H, taken in ((32, True), (13, False)):  # 13 fp32 values per row: rows not 16-byte aligned
        x, ids, wts, w1, w2 = _problem(21, 2, 4, H, 24, torch.float32, "random", device, seed=H)
        calls.clear()
        out = X.fused_experts_impl(x, ids, wts, w1, w2, _desc_config(21, 2, 4, H, 24, persistent=1))
        assert bool(calls) == taken
        assert _rel(out, _reference(x, ids, wts, w1, w2)) < TOL[torch.float32]



def test_descriptor_h_store_split_is_checked(device):
    x, ids, wts, w1, w2 = _problem(9, 2, 4, 32, 24, torch.float32, "random", device, seed=1)
    cfg = _desc_config(9, 2, 4, 32, 24, h_store=3)
    with pytest.raises(ValueError, match="H_STORE_SPLIT must be 0, 1 or 2, got 3"):
        X.fused_experts_impl(x, ids, wts, w1, w2, cfg)


def test_gathered_rows_are_the_dispatch_rows(device):
    x, ids, wts, w1, w2 = _problem(29, 3, 5, 32, 16, torch.float32, "random", device)
    layout = X.dispatch(ids, 5, 16, fuse=False)
    xs = X.gather_rows(x, layout).cpu()
    used = int(layout.start_E1[5])
    pairs = layout.sorted_pairs_R[:used].long().cpu()
    real = pairs < ids.numel()
    assert torch.equal(xs[:used][real], x.cpu()[pairs[real] // 3])
    assert (xs[:used][~real] == 0).all()  # padding rows are zeros, never garbage fed to a GEMM


def test_empty_batch(device):
    x, ids, wts, w1, w2 = _problem(0, 2, 4, 32, 32, torch.float32, "random", device)
    assert X.fused_experts_impl(x, ids, wts, w1, w2).shape == (0, 32)


def _gpu_problem(M, E, H, I, K, seed, drop_every=0):  # noqa: E741
    """bf16 inputs and weights on CUDA, top-K ids from random scores (every drop_every-th token's last slot dropped)."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(M, H, device="cuda", generator=gen).bfloat16()
    w1 = (torch.randn(E, 2 * I, H, device="cuda", generator=gen) * H**-0.5).bfloat16()
    w2 = (torch.randn(E, H, I, device="cuda", generator=gen) * I**-0.5).bfloat16()
    ids = torch.rand(M, E, device="cuda", generator=gen).topk(K, dim=1).indices
    if drop_every:
        ids[::drop_every, -1] = E
    wts = torch.rand(M, K, device="cuda", generator=gen)
    return x, w1, w2, ids, wts, gen


def _assert_sync_free_and_replayable(fn, ids, gen, E):
    """fn() makes no host sync, and a CUDA graph of it replays new ids (of E experts) exactly like an eager call."""
    want = fn()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    ids.copy_(torch.rand(ids.shape[0], E, device="cuda", generator=gen).topk(ids.shape[1], dim=1).indices)
    graph.replay()
    assert torch.equal(out, fn())
    assert not torch.equal(out, want)


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 4, 64, 256, 1024])
@pytest.mark.parametrize("shape", [(8, 4096, 14336, 2), (64, 2048, 1024, 8), (128, 2048, 768, 8)],
                         ids=["mixtral", "olmoe", "qwen3"])
def test_bf16_real_shapes(shape, M):
    E, H, I, K = shape  # noqa: E741
    x, w1, w2, ids, wts, _ = _gpu_problem(M, E, H, I, K, seed=0, drop_every=3)  # some dropped slots
    out = torch.full_like(x, float("nan"))
    out.copy_(X.fused_experts(x, ids, wts, w1, w2))
    # fp32 reference on the GPU, expert by expert
    ref = torch.zeros(M, H, device="cuda")
    for e in range(E):
        tok, slot = (ids == e).nonzero(as_tuple=True)
        if tok.numel():
            g, u = (x[tok].float() @ w1[e].float().T).chunk(2, dim=-1)
            ref.index_add_(0, tok, ((torch.nn.functional.silu(g) * u) @ w2[e].float().T) * wts[tok, slot, None])
    assert ((out.float() - ref).norm() / ref.norm()).item() < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("kind,T,W,E,block_m", [("random", 16384, 8, 128, 1), ("random", 16384, 8, 128, 128),
                                                ("one_expert", 16384, 8, 128, 64), ("empty_expert", 4096, 8, 64, 64),
                                                ("random", 16384, 2, 8, 128), ("all_sentinel", 1024, 8, 128, 16)])
def test_dispatch_layout_real_sizes_on_gpu(kind, T, W, E, block_m, monkeypatch):
    """The compiled dispatch (its scatter reads back rows it wrote itself, after a barrier) at the
    benchmarks' pair counts, with the default chunks and with 16-pair chunks (8192 programs)."""
    gen = torch.Generator().manual_seed(T + E + block_m)
    ids = _ids(kind, T, W, E, gen)
    want_rows, want_starts = _dispatch_reference(ids, E, block_m)
    for chunk in (X.dispatch_kernels.CHUNK, 16):
        monkeypatch.setattr(X.dispatch_kernels, "CHUNK", chunk)
        layout = X.dispatch(ids.cuda(), E, block_m, fuse=False)
        assert torch.equal(layout.start_E1.cpu(), want_starts), chunk
        assert torch.equal(layout.sorted_pairs_R.cpu(), want_rows), chunk


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 3, 16, 64])
def test_bf16_fused_dispatch_is_the_dispatch_layout(M):
    """On the GPU small M fuses the dispatch into the GEMMs: same bits as the dispatch kernel's layout."""
    E, H, I, K = 8, 512, 1024, 2  # noqa: E741
    x, w1, w2, ids, wts, _ = _gpu_problem(M, E, H, I, K, seed=M, drop_every=2)
    cfg = X.config_for(x, ids, w1)
    assert X.dispatch(ids, E, cfg["BLOCK_M"]).fused
    fused = X.fused_experts_impl(x, ids, wts, w1, w2, cfg, fuse_dispatch=True)
    plain = X.fused_experts_impl(x, ids, wts, w1, w2, cfg, fuse_dispatch=False)
    assert torch.equal(fused, plain)


@pytest.mark.gpu
@pytest.mark.parametrize("persistent", [0, 1])
def test_bf16_descriptor_path_graph_and_no_host_sync(persistent):
    """The large-M descriptor GEMMs: bf16 accuracy, no host sync, replayable in a CUDA graph."""
    E, H, I, K, M = 8, 1024, 2048, 2, 1024  # noqa: E741
    x, w1, w2, ids, wts, gen = _gpu_problem(M, E, H, I, K, seed=persistent, drop_every=5)
    cfg = {"BLOCK_M": 128, "DESC": True,
           "gate_up": dict(BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4, PERSISTENT=persistent,
                           JOINT=persistent, FLATTEN=persistent, H_STORE_SPLIT=2 * persistent),
           "down": dict(BLOCK_N=256, BLOCK_K=64, GROUP_M=16, num_warps=8, num_stages=4, PERSISTENT=persistent,
                        FLATTEN=persistent, SPLIT_K=1)}
    pointer = {k: v for k, v in cfg.items() if k != "DESC"}
    want = X.fused_experts_impl(x, ids, wts, w1, w2, pointer)
    out = X.fused_experts_impl(x, ids, wts, w1, w2, cfg)
    assert ((out.float() - want.float()).norm() / want.float().norm()).item() < 1e-2
    _assert_sync_free_and_replayable(lambda: X.fused_experts_impl(x, ids, wts, w1, w2, cfg), ids, gen, E)
    assert torch.equal(X.fused_experts_impl(x, ids, wts, w1, w2, cfg), X.fused_experts_impl(x, ids, wts, w1, w2, cfg))


@pytest.mark.gpu
@pytest.mark.parametrize("M,block_m", [(1024, 128), (192, 64)])  # 512 and 96 rows per expert
def test_default_for_a_shape_without_table_on_hopper(M, block_m):
    """A shape no table has: on Hopper the default is the descriptor layer, equal to the pointer GEMMs' result."""
    from moepatch.ops import tuning

    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("descriptor defaults are for GPUs with TMA")
    E, H, I, K = 4, 1024, 1536, 2  # noqa: E741
    x, w1, w2, ids, wts, gen = _gpu_problem(M, E, H, I, K, seed=M, drop_every=7)
    cfg = X.config_for(x, ids, w1)
    assert cfg.get("DESC") and cfg["BLOCK_M"] == block_m
    want = X.fused_experts_impl(x, ids, wts, w1, w2, tuning.default_config(M, E, H, I, K, "cuda"))
    out = X.fused_experts_impl(x, ids, wts, w1, w2)
    assert torch.isfinite(out).all() and ((out.float() - want.float()).norm() / want.float().norm()).item() < 1e-2


@pytest.mark.gpu
def test_cuda_graph_and_no_host_sync():
    E, H, I, K, M = 8, 256, 512, 2, 48  # noqa: E741
    x, w1, w2, ids, wts, gen = _gpu_problem(M, E, H, I, K, seed=0)
    _assert_sync_free_and_replayable(lambda: X.fused_experts(x, ids, wts, w1, w2), ids, gen, E)


def test_pdl_is_requested_only_where_it_exists(monkeypatch):
    """Programmatic dependent launch: never on the CPU/interpreter, never when switched off or unsupported."""
    assert not X.use_pdl(torch.device("cpu"))
    monkeypatch.setattr(X, "_capability", lambda index: (9, 0))
    monkeypatch.setattr(X, "_pdl_supported", lambda: True)
    assert X.use_pdl(torch.device("cuda", 0))
    monkeypatch.setattr(X, "_capability", lambda index: (8, 0))
    assert not X.use_pdl(torch.device("cuda", 0))  # Ampere has no griddepcontrol
    monkeypatch.setattr(X, "_capability", lambda index: (9, 0))
    monkeypatch.setattr(X, "PDL", False)  # switched off (bench_kernels --no-pdl)
    assert not X.use_pdl(torch.device("cuda", 0))
    monkeypatch.setattr(X, "PDL", True)
    monkeypatch.setattr(X, "_pdl_supported", lambda: False)  # a Triton without launch_pdl
    assert not X.use_pdl(torch.device("cuda", 0))


# Expert forms: real transformers experts modules of tiny models (each family's own flags and gate), run
# through the patched forward's arguments (backend.fused_weights / expert_form) against module_expert.
FORM_FAMILIES = ["gpt_oss", "nemotron_h", "aria_text", "hy_v4", "minimax_m3_vl_text", "lfm2_moe", "gemma4_text"]
FORM_TOL = {torch.float32: 1e-5, torch.float16: 5e-3}  # bf16: test_bf16_expert_forms_on_gpu (compiled)


def _experts_of(model_type, dtype):
    from moepatch.patch.registry import experts_modules
    from moepatch.tiny import moe_model_types, tiny_model

    if model_type not in moe_model_types():
        pytest.skip(f"{model_type} is not in this transformers")
    m = experts_modules(tiny_model(model_type))[0][1]
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in m.parameters():  # biases and weights large enough that a clamp at the module's limit bites
            p.copy_(torch.randn(p.shape, generator=gen) * (3.0 if p.dim() == 2 else p.shape[-1] ** -0.5 * 4))
    return m.to(dtype)


def _module_reference(m, x, ids, wts):
    """sum over kept slots of w * module_expert(m, e, x) (the project's reference expert loop; m in fp32)."""
    from moepatch.ops.reference import module_expert

    out = torch.zeros(x.shape, dtype=torch.float64)
    for e in range(m.num_experts):
        tok, slot = (ids == e).nonzero(as_tuple=True)
        if tok.numel():
            y = module_expert(m, e, x[tok].float()).double()
            out.index_add_(0, tok, y * wts[tok, slot].double()[:, None])
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("kind", ["random", "empty_expert", "all_sentinel"])
@pytest.mark.parametrize("model_type", FORM_FAMILIES)
def test_expert_forms_match_module_expert(model_type, kind, dtype, device):
    import copy

    from moepatch.patch import backend

    m = _experts_of(model_type, dtype)
    assert backend.layout_problem(model_type, m) is None
    gu, dn, b1, b2 = backend.fused_weights(m)
    form = backend.expert_form(m, gu.shape[1])
    E, H = m.num_experts, dn.shape[1]
    T, W = 7, 2
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(T, H, generator=gen).to(dtype)
    ids = _ids(kind, T, W, E, gen)
    ids[0, 1] = ids[0, 0]  # a token naming one expert twice
    wts = torch.rand(T, W, generator=gen)
    wts[1, 1] = wts[1, 0]  # tied weights
    ref = _module_reference(copy.deepcopy(m).float(), x, ids, wts)
    I = dn.shape[2]  # noqa: E741
    for cfg in (_config(T, W, E, H, I, bn=16, bk=16), _config(T, W, E, H, I, block_m=32, split=2, bn=16, bk=16),
                _desc_config(T, W, E, H, I), _token_config(1, W, E, H, I)):
        n = 1 if cfg["down"].get("TOKEN") else T
        out = X.fused_experts_impl(x[:n], ids[:n], wts[:n], gu, dn, cfg, gate_up_bias=b1, down_bias=b2, form=form)
        assert out.dtype == dtype and torch.isfinite(out).all()
        if kind == "all_sentinel":
            assert (out == 0).all()
        else:
            assert _rel(out, ref[:n]) < FORM_TOL[dtype], (cfg, _rel(out, ref[:n]))


@pytest.mark.parametrize("model_type", ["gpt_oss", "nemotron_h"])
def test_expert_forms_match_transformers_and_the_custom_op(model_type, device):
    """No dropped slots: transformers' own batched_mm experts; the custom op and moe_experts agree bit for bit."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    from moepatch.patch import backend

    m = _experts_of(model_type, torch.float32)
    gu, dn, b1, b2 = backend.fused_weights(m)
    form = backend.expert_form(m, gu.shape[1])
    T, W, E, H = 5, 2, m.num_experts, dn.shape[1]
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(T, H, generator=gen)
    ids = _ids("distinct", T, W, E, gen)
    wts = torch.rand(T, W, generator=gen)
    want = ALL_EXPERTS_FUNCTIONS["batched_mm"](m, x, ids, wts)
    out = X.moe_experts(x, ids, wts, gu, dn, gate_up_bias=b1, down_bias=b2, form=form)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)
    op = torch.ops.moepatch.fused_experts(x, ids, wts, gu, dn, b1, b2, *form.op_args())
    assert torch.equal(op, out)


@pytest.mark.parametrize("form", [X.ExpertForm(gated=False, act=a) for a in range(4)]
                         + [X.ExpertForm(act=a) for a in (1, 2, 3)]
                         + [X.ExpertForm(act=0, clamp=2, limit=0.5), X.ExpertForm(act=4, interleaved=True,
                                                                                  clamp=1, limit=1.0, alpha=1.7)],
                         ids=lambda f: f"{'g' if f.gated else 'u'}-{X.ACT_NAMES[f.act]}-{X.CLAMP_NAMES[f.clamp]}")
def test_every_activation_matches_the_reference(form, device):
    """Each ACT / CLAMP kind against reference_experts with the form's torch gate (odd I, masked tiles)."""
    from moepatch.ops.reference import reference_experts

    T, W, E, H, I = 9, 2, 4, 24, 20  # noqa: E741
    x, ids, wts, w1, w2 = _problem(T, W, E, H, I, torch.float32, "random", device, seed=2)
    if not form.gated:
        w1 = w1[:, :I].contiguous()
    want = reference_experts(x.double(), ids, wts.double(), w1.double(), w2.double(), apply_gate=form.apply_gate)
    out = X.fused_experts_impl(x, ids, wts, w1, w2, _config(T, W, E, H, I, bn=16, bk=16), form=form)
    assert _rel(out, want) < TOL[torch.float32]


def test_plain_form_compiles_the_default_kernel(device, monkeypatch):
    """The plain form passes only the kernels' default form flags (the plain SwiGLU code path)."""
    seen = []
    real = X._launch
    monkeypatch.setattr(X, "_launch", lambda k, g, a, c, *r, **kw: seen.append((k.fn.__name__, c)) or real(k, g, a, c,
                                                                                                            *r, **kw))
    T, W, E, H, I = 5, 2, 4, 32, 16  # noqa: E741
    x, ids, wts, w1, w2 = _problem(T, W, E, H, I, torch.float32, "random", device)
    X.fused_experts_impl(x, ids, wts, w1, w2, _config(T, W, E, H, I))
    flags = dict(X.PLAIN.constexprs(), HAS_BIAS=False)
    for name, c in seen:
        if name in ("gate_up_kernel", "down_kernel"):
            assert all(c[k] == v for k, v in flags.items() if k in c) and c.get("b1_ptr") is None


@pytest.mark.gpu
@pytest.mark.parametrize("model_type", ["gpt_oss", "nemotron_h", "aria_text"])
@pytest.mark.parametrize("M", [1, 16, 256])
def test_bf16_expert_forms_on_gpu(model_type, M):
    """The new forms compiled (bf16, CUDA graphs through moe_experts) against the fp32 module reference."""
    import copy

    from moepatch.patch import backend

    m = _experts_of(model_type, torch.bfloat16).cuda()
    gu, dn, b1, b2 = backend.fused_weights(m)
    form = backend.expert_form(m, gu.shape[1])
    E, H = m.num_experts, dn.shape[1]
    gen = torch.Generator().manual_seed(M)
    x = torch.randn(M, H, generator=gen).bfloat16()
    ids = _ids("random", M, 2, E, gen)
    wts = torch.rand(M, 2, generator=gen)
    ref = _module_reference(copy.deepcopy(m).float().cpu(), x, ids, wts)
    for _ in range(4):  # past the graph warm-up
        out = X.moe_experts(x.cuda(), ids.cuda(), wts.cuda(), gu, dn, gate_up_bias=b1, down_bias=b2, form=form)
        assert _rel(out, ref) < 2e-2
