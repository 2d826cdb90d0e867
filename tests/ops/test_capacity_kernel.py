"""The fused Token Drop kernel (routing_kernels.py) against the reference, on hard cases.

Exact ties at the capacity threshold, -0.0 and NaN scores, groups spread over several tiles,
sequence groups split by simulated devices, ``source_rank``, K == E, one token, every pair on one
expert, capacity 0, a huge minimum capacity, and weights that must pass through bit for bit.
"""

import pytest
import torch
from routing_asserts import assert_same_routing  # tests/ops/routing_asserts.py

from moepatch.ops import route as ops_route
from moepatch.ops import routing_kernels
from moepatch.ops.route import route as fused_route
from moepatch.routing import FamilyScoring, RoutingResult, make_config, route


def _problem(T, E, K, seed, kind="ties", wdtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    if kind == "ties":  # three score levels: long runs of equal scores inside every expert
        scores = torch.randint(0, 3, (T, E), generator=g).float() / 3 + 0.1
    elif kind == "signed_zero_nan":  # -0.0 ties with +0.0; NaN ranks last in the reference's sort
        scores = torch.randint(0, 3, (T, E), generator=g).float() - 1.0
        scores[scores == 0] = torch.where(torch.rand(int((scores == 0).sum()), generator=g) < 0.5, -0.0, 0.0)
        scores[torch.rand(T, E, generator=g) < 0.1] = float("nan")
    elif kind == "one_expert":  # every token's first pick is expert 0
        scores = torch.rand(T, E, generator=g)
        scores[:, 0] = 2.0 + torch.randint(0, 2, (T,), generator=g).float()
    else:
        scores = torch.softmax(torch.randn(T, E, generator=g) * 3, dim=-1)
    if kind == "signed_zero_nan":  # picks independent of the scores, so NaN and zero scores get picked
        ids = torch.rand(T, E, generator=g).argsort(dim=1)[:, :K]
    else:
        ids = torch.topk(scores, K, dim=1).indices
    w = (torch.rand(T, K, generator=g) + 0.5).to(wdtype)
    factor = FamilyScoring().factor(scores, ids)
    return scores, ids, w, factor


@pytest.fixture(params=[16, 512, "sorted"], ids=["tiled", "one_tile", "sorted"])
def max_block(request, monkeypatch):
    """Each path of the kernel: a group over several tiles, one tile, or pairs sorted by expert first."""
    if request.param == "sorted":
        monkeypatch.setattr(routing_kernels, "SORTED_MIN_PAIRS", 0)
        monkeypatch.setattr(routing_kernels, "MAX_SORTED_BLOCK", 16)
    else:
        monkeypatch.setattr(routing_kernels, "MAX_BLOCK", request.param)
    monkeypatch.setattr(ops_route, "USE_FUSED_DROP", True)
    return request.param


@pytest.mark.parametrize("policy", ["score", "order", "reverse"])
@pytest.mark.parametrize("opts", [{}, {"group": "sequence", "ep_size": 2}, {"min_capacity": 3, "renormalize": "kept"}],
                         ids=["batch", "seq-ep2", "mincap-kept"])
def test_fused_drop_matches_reference(policy, opts, max_block):
    B, S, E, K = 2, 23, 6, 2
    valid = torch.ones(B, S, dtype=torch.bool)
    valid[0, :4] = False
    valid[1, -2:] = False
    for gamma, kind, v, seed in ((0.7, "ties", valid, 0), (1.0, "signed_zero_nan", None, 1)):
        cfg = make_config(gamma, "drop", policy, num_experts=E, **opts)
        scores, ids, w, factor = _problem(B * S, E, K, seed, kind)
        kw = dict(batch=B, seq=S, valid_BS=v, layer=seed)
        got = fused_route(cfg, scores, ids, w, factor, **kw)
        assert isinstance(got, RoutingResult)
        assert_same_routing(got, route(cfg, scores, ids, w, factor, **kw))


@pytest.mark.parametrize("T,E,K,kind,gamma,opts", [
    (1, 4, 2, "ties", 0.5, {}),                       # one token
    (9, 5, 5, "ties", 0.5, {}),                       # K == E
    (40, 4, 1, "one_expert", 1.0, {}),                # every pair on expert 0, top-1
    (12, 4, 2, "ties", 1e-9, {}),                     # capacity 0: everything dropped
    (12, 4, 2, "ties", 0.5, {"min_capacity": 10**6}),  # capacity above every load
    (30, 8, 2, "softmax", 1.0, {"ep_size": 3}),       # unequal device chunks
])
@pytest.mark.parametrize("sort_first", [False, True], ids=["scan", "sorted"])
def test_fused_drop_odd_shapes(T, E, K, kind, gamma, opts, sort_first, monkeypatch):
    monkeypatch.setattr(routing_kernels, "MAX_BLOCK", 16)
    monkeypatch.setattr(routing_kernels, "MAX_SORTED_BLOCK", 16)
    if sort_first:
        monkeypatch.setattr(routing_kernels, "SORTED_MIN_PAIRS", 0)
    cfg = make_config(gamma, "drop", num_experts=E, **opts)
    scores, ids, w, factor = _problem(T, E, K, T + E, kind)
    for src in (None, 1) if opts.get("ep_size", 1) == 1 else (None,):
        kw = dict(batch=1, seq=T, source_rank=src)
        assert_same_routing(fused_route(cfg, scores, ids, w, factor, **kw),
                            route(cfg, scores, ids, w, factor, **kw))


def test_weights_pass_through_bitwise():
    cfg = make_config(0.8, "drop", num_experts=8, collect_stats=False)
    scores, ids, w, factor = _problem(33, 8, 2, 3, "softmax", wdtype=torch.bfloat16)
    got = fused_route(cfg, scores, ids, w, factor, batch=3, seq=11)
    ref = route(cfg, scores, ids, w, factor, batch=3, seq=11)
    kept = got.topk_ids_TW < 8
    assert got.topk_weights_TW.dtype == torch.bfloat16
    assert torch.equal(got.topk_weights_TW[kept], w[kept]) and (got.topk_weights_TW[~kept] == 0).all()
    assert_same_routing(got, ref)
    assert (~kept).any() and got.dropped_pairs is None and got.load_after_E is None  # no statistics asked for


def test_unlimited_returns_native_picks_without_host_sync():
    """No capacity: the native picks come back as they are; the statistics need no host sync."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Ops.names.append(str(func))
            return func(*args, **(kwargs or {}))

    cfg = make_config(None, num_experts=8)
    scores, ids, w, factor = _problem(10, 8, 2, 0, "softmax")
    with Ops():
        got = fused_route(cfg, scores, ids, w, factor, batch=2, seq=5)
    assert not [n for n in Ops.names if "_local_scalar_dense" in n or "nonzero" in n or "bincount" in n]
    assert got.topk_ids_TW is ids and got.topk_weights_TW is w
    assert_same_routing(got, route(cfg, scores, ids, w, factor, batch=2, seq=5))


@pytest.mark.gpu
@pytest.mark.parametrize("strategy", ["drop", "reroute", "expanded"])
@pytest.mark.parametrize("T,E,K,opts", [(4096, 8, 2, {}), (16384, 128, 8, {}), (3000, 64, 6, {"group": "sequence"}),
                                        (2048, 8, 2, {"ep_size": 4, "policy": "reverse"})])
def test_fused_drop_real_sizes_on_gpu(T, E, K, opts, strategy):
    """Groups of thousands of pairs (many tiles, every radix pass; Token Reroute's and Expanded Drop's drop
    steps run on the same kernel) on the GPU: the reference's pairs exactly."""
    if strategy == "expanded":
        opts = {k: v for k, v in opts.items() if k != "policy"}  # Expanded Drop ranks by score only
    g = torch.Generator(device="cuda").manual_seed(T)
    # Skewed softmax routing (a few hot experts) with ties from rounding the logits.
    logits = (torch.randn(T, E, device="cuda", generator=g) * 2 + torch.linspace(0, 3, E, device="cuda")).round(
        decimals=1)
    scores = torch.softmax(logits, dim=-1)
    ids = torch.topk(scores, K, dim=1).indices
    factor = FamilyScoring(normalize=True).factor(scores, ids)
    w = (scores.gather(1, ids) * factor[:, None]).bfloat16()
    batch = 4 if opts.get("group") == "sequence" else 1
    valid = torch.rand(batch, T // batch, device="cuda", generator=g) > 0.05
    for gamma in (1.0, 1.5):
        cfg = make_config(gamma, strategy, num_experts=E, **opts)
        for v in (None, valid):
            kw = dict(batch=batch, seq=T // batch, valid_BS=v)
            got = fused_route(cfg, scores, ids, w, factor, **kw)
            ref = route(cfg, scores, ids, w, factor, **kw)
            if strategy == "drop":
                assert int(ref.dropped_pairs) > 0
            assert_same_routing(got, ref)
