"""moepatch.ops.route.route (fused Token Drop where it applies) and route_graphed equal moepatch.routing.route."""

import itertools

import pytest
import torch
from routing_asserts import assert_same_routing  # tests/ops/routing_asserts.py

from moepatch.ops import route as ops_route
from moepatch.ops.route import fused_drop_applies
from moepatch.ops.route import route as fused_route
from moepatch.routing import FamilyScoring, make_config, route


def _inputs(T, E, K, seed, ties, scoring=FamilyScoring(kind="softmax", normalize=True)):
    g = torch.Generator().manual_seed(seed)
    if ties:
        # Four score levels: many exact ties between pairs of one expert and between experts.
        scores_TE = torch.randint(0, 4, (T, E), generator=g).float() / 4 + 0.125
    else:
        scores_TE = torch.softmax(torch.randn(T, E, generator=g) * 3, dim=-1)
    ids_TK = torch.topk(scores_TE, K, dim=1).indices
    factor_T = scoring.factor(scores_TE, ids_TK)
    w_TK = scores_TE.gather(1, ids_TK) * factor_T[:, None]
    return scores_TE, ids_TK, w_TK, factor_T


CASES = (
    [dict(strategy="drop", policy=p) for p in ("score", "order", "reverse", "random")]
    + [dict(strategy="drop", policy="score", group="sequence"),
       dict(strategy="drop", policy="random", seed=7, ep_size=3),
       dict(strategy="drop", policy="score", ep_size=2, capacity_scope="device"),
       dict(strategy="drop", policy="order", min_capacity=2, renormalize="kept"),
       dict(strategy="drop", policy="score", count_padding=True)]
    + [dict(strategy="reroute", policy=p, reroute_target=t, reroute_rounds=r)
       for p, t, r in itertools.product(("score", "random"), ("score", "least_loaded"), (1, 3))]
    + [dict(strategy="reroute", policy="reverse", ep_size=2, capacity_scope="device", group="sequence",
            reroute_rounds=2, renormalize="kept")]
    + [dict(strategy="expanded"), dict(strategy="expanded", ep_size=3),
       dict(strategy="expanded", ep_size=2, local_experts="all", max_experts_per_token=3),
       dict(strategy="expanded", ep_size=4, capacity_scope="device", group="sequence", renormalize="kept")]
    + [dict(strategy="expert_drop"), dict(strategy="expert_drop", expert_drop_fraction=0.3)]
)


def _fused_applies(strategy, opts):
    """Where the Token Drop kernel runs: Token Drop itself, Token Reroute's first drop (same policies),
    and Expanded Drop's drop over the candidates; expert scope only."""
    if opts.get("capacity_scope", "expert") != "expert":
        return False
    if strategy in ("drop", "reroute"):
        return opts.get("policy", "score") in ("score", "order", "reverse")
    return strategy == "expanded"


def _runs():
    """(case, γ, path) without duplicates: expert_drop takes no γ, and the torch path is a separate
    run only where the fused kernel applies (elsewhere both settings run the same code)."""
    for case in CASES:
        opts = {k: v for k, v in case.items() if k != "strategy"}
        gammas = [None] if case["strategy"] == "expert_drop" else [0.5, 1.0, 1.5, None]
        for gamma in gammas:
            fused = _fused_applies(case["strategy"], opts) and gamma is not None
            for path in ("fused", "torch") if fused else ("torch",):
                name = "-".join(f"{k}={v}" for k, v in case.items())
                yield pytest.param(case, gamma, path, id=f"{name}-{gamma}-{path}")


@pytest.mark.parametrize("ties", [True, False], ids=["ties", "distinct"])
@pytest.mark.parametrize("case,gamma,path", list(_runs()))
def test_same_pairs_as_reference(case, gamma, ties, path, monkeypatch):
    # Token Drop runs fused (one Triton launch) where it applies; the torch path is checked too.
    monkeypatch.setattr(ops_route, "USE_FUSED_DROP", path == "fused")
    opts = dict(case)
    strategy = opts.pop("strategy")
    fused = path == "fused"
    B, S, E, K = 3, 7, 8, 2
    cfg = make_config(gamma if strategy != "expert_drop" else 1.0, strategy, num_experts=E, **opts)
    # The interpreter runs the fused kernel slowly: one seed there, its hard cases are in test_capacity_kernel.
    for seed in range(1 if fused and path == "fused" else 3):
        scores, ids, w, factor = _inputs(B * S, E, K, seed, ties)
        valid = torch.ones(B, S, dtype=torch.bool)
        valid[0, :3] = False  # left padding
        valid[2, -1] = False
        for v in (None, valid):
            kw = dict(batch=B, seq=S, valid_BS=v, layer=seed)
            assert_same_routing(fused_route(cfg, scores, ids, w, factor, **kw),
                                route(cfg, scores, ids, w, factor, **kw))


@pytest.mark.parametrize("strategy", ["drop", "reroute", "expanded"])
def test_source_rank_and_odd_shapes(strategy):
    for T, E, K in ((1, 4, 4), (5, 5, 5), (13, 6, 3), (2, 16, 1)):  # K == E, one token, non-power-of-two
        scores, ids, w, factor = _inputs(T, E, K, T + E, ties=True)
        for src, ep in ((None, 1), (1, 2)):
            opts = {"ep_size": ep} if strategy != "reroute" else {"ep_size": ep, "reroute_rounds": 2}
            cfg = make_config(1.0, strategy, num_experts=E, **opts)
            kw = dict(batch=1, seq=T, source_rank=src)
            assert_same_routing(fused_route(cfg, scores, ids, w, factor, **kw),
                                route(cfg, scores, ids, w, factor, **kw))


def test_capacity_zero_and_all_padding():
    scores, ids, w, factor = _inputs(6, 4, 2, 0, ties=True)
    cfg = make_config(1e-9, "drop", num_experts=4)  # C = ceil(tiny) = 1; min over padding-only groups
    valid = torch.zeros(2, 3, dtype=torch.bool)
    for c in (cfg, make_config(1.0, "reroute", num_experts=4, group="sequence")):
        kw = dict(batch=2, seq=3, valid_BS=valid)
        a, b = fused_route(c, scores, ids, w, factor, **kw), route(c, scores, ids, w, factor, **kw)
        assert_same_routing(a, b)
        assert (a.topk_ids_TW == 4).all()  # every slot a sentinel


@pytest.mark.gpu
def test_no_host_sync_and_graph_capture():
    """Every strategy runs under torch.cuda.set_sync_debug_mode('error') and captures in a CUDA graph."""
    dev = "cuda"
    scores, ids, w, factor = (t.to(dev) for t in _inputs(64, 8, 2, 0, ties=True))
    for strategy, opts in (("drop", {}), ("drop", {"policy": "random"}), ("reroute", {"reroute_rounds": 2}),
                           ("expanded", {"ep_size": 2}), ("expert_drop", {})):
        cfg = make_config(1.0, strategy, num_experts=8, **opts)
        fused_route(cfg, scores, ids, w, factor, batch=4, seq=16)  # warm-up fills the random-order cache
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            res = fused_route(cfg, scores, ids, w, factor, batch=4, seq=16)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        ref = route(cfg, scores, ids, w, factor, batch=4, seq=16)
        assert_same_routing(res, ref)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fused_route(cfg, scores, ids, w, factor, batch=4, seq=16)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out.topk_ids_TW, ref.topk_ids_TW)


@pytest.mark.parametrize("strategy,opts", [("reroute", {"reroute_rounds": 2}), ("reroute", {"policy": "order"}),
                                           ("expanded", {"ep_size": 2}),
                                           ("expanded", {"group": "sequence", "max_experts_per_token": 3})])
def test_reroute_and_expanded_drop_step_on_the_sorted_kernel_path(strategy, opts, monkeypatch):
    """Their drop step on the fused kernel with the pairs sorted by expert first (the large-P path)."""
    from moepatch.ops import routing_kernels

    monkeypatch.setattr(ops_route, "USE_FUSED_DROP", True)
    monkeypatch.setattr(routing_kernels, "SORTED_MIN_PAIRS", 0)
    monkeypatch.setattr(routing_kernels, "MAX_SORTED_BLOCK", 16)
    B, S, E, K = 3, 7, 8, 2
    cfg = make_config(1.0, strategy, num_experts=E, **opts)
    scores, ids, w, factor = _inputs(B * S, E, K, 4, ties=True)
    valid = torch.ones(B, S, dtype=torch.bool)
    valid[1, :2] = False
    for v in (None, valid):
        kw = dict(batch=B, seq=S, valid_BS=v, layer=0)
        assert_same_routing(fused_route(cfg, scores, ids, w, factor, **kw),
                            route(cfg, scores, ids, w, factor, **kw))


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_graph_replay_equals_eager(case, monkeypatch):
    """moepatch.ops.route_graphs: after its warm-up calls a signature is captured once and replayed;
    every call (new scores each time, with and without padding, several layers) gives the eager
    sync-free route's result, statistics included, also when they are read after later replays.
    (The capture-time speed check is told the replay won: at these tiny sizes eager can be faster.)"""
    import itertools

    from moepatch.ops import route_graphs

    walls = itertools.cycle([0.0, 1.0])  # replay first, then eager: see route_graphed
    monkeypatch.setattr(route_graphs, "_wall", lambda fn, reps=3: next(walls))
    route_graphs.clear()
    opts = dict(case)
    strategy = opts.pop("strategy")
    cfg = make_config(1.0, strategy, num_experts=8, **opts)
    B, S, K = 4, 16, 2
    valid = torch.ones(B, S, dtype=torch.bool, device="cuda")
    valid[1, :5] = False
    results = []
    for call in range(6):
        scores, ids, w, factor = (t.cuda() for t in _inputs(B * S, 8, K, 100 + call, ties=call % 2 == 0))
        for layer in (0, 1):
            for v in (None, valid):
                kw = dict(batch=B, seq=S, valid_BS=v, layer=layer)
                got = route_graphs.route_graphed(cfg, scores, ids, w, factor, **kw)
                results.append((got, fused_route(cfg, scores, ids, w, factor, **kw)))
    graphs = [g for g in route_graphs._CACHE.values() if isinstance(g, route_graphs._RouteGraph)]
    assert graphs, "no signature was captured"
    for got, want in results:  # statistics read only now, after every replay
        assert_same_routing(got, want)
    # Training: weights that need the router's gradient are never replayed from a graph (the eager
    # route carries it, except the fused Token Drop kernel, which has no backward on either path).
    scores, ids, w, factor = (t.cuda() for t in _inputs(B * S, 8, K, 7, ties=False))
    w.requires_grad_(True)
    got = route_graphs.route_graphed(cfg, scores, ids, w, factor, batch=B, seq=S, valid_BS=valid, layer=0)
    want = fused_route(cfg, scores, ids, w, factor, batch=B, seq=S, valid_BS=valid, layer=0)
    assert got.topk_weights_TW.requires_grad == want.topk_weights_TW.requires_grad
    assert want.topk_weights_TW.requires_grad or fused_drop_applies(cfg, scores, ids)
    route_graphs.clear()
