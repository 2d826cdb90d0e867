"""moepatch.ops.expert_graphs: the fused experts layer replayed from CUDA graphs at small token counts."""

import itertools

import pytest
import torch

from moepatch.ops import expert_graphs as G
from moepatch.ops import experts as X


@pytest.fixture
def graphs_kept(monkeypatch):
    """Fresh cache, and the capture-time speed check told the replay won (at tiny sizes eager can win)."""
    walls = itertools.cycle([0.0, 1.0])  # replay first, then eager: see experts_graphed
    monkeypatch.setattr(G, "_wall", lambda fn, reps=3: next(walls))
    G.clear()
    yield
    G.clear()


def _weights(E, H, I, gen, device="cuda", dtype=torch.bfloat16):  # noqa: E741
    w1 = (torch.randn(E, 2 * I, H, device=device, generator=gen) * H**-0.5).to(dtype)
    w2 = (torch.randn(E, H, I, device=device, generator=gen) * I**-0.5).to(dtype)
    return w1, w2


def _inputs(T, E, H, K, gen, device="cuda", dtype=torch.bfloat16, drop_every=3):
    x = torch.randn(T, H, device=device, generator=gen).to(dtype)
    ids = torch.rand(T, E, device=device, generator=gen).topk(K, dim=1).indices
    ids[::drop_every, -1] = E  # dropped slots (moepatch's sentinel) on some tokens
    wts = torch.rand(T, K, device=device, generator=gen)
    return x, ids, wts


def test_cpu_calls_never_capture(device):
    """On the CPU (the interpreter in CI) every call runs the launchers; nothing is cached."""
    if device != "cpu":
        pytest.skip("the CPU path")
    G.clear()
    gen = torch.Generator().manual_seed(0)
    E, H, I, K = 4, 32, 48, 2  # noqa: E741
    w1, w2 = _weights(E, H, I, gen, "cpu", torch.float32)
    for _ in range(G.WARMUP_CALLS + 2):
        x, ids, wts = _inputs(3, E, H, K, gen, "cpu", torch.float32)
        assert torch.equal(X.moe_experts(x, ids, wts, w1, w2), X.fused_experts_impl(x, ids, wts, w1, w2))
    assert not G._CACHE


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 5, 64])
def test_replay_equals_eager_bit_for_bit(T, graphs_kept):
    """After the warm-up calls each layer's signature is captured once and replayed; every call (new
    inputs each time, dropped slots included) equals the eager layer bit for bit, also when the
    outputs are read after later replays; two layers (other weights) get their own graphs."""
    gen = torch.Generator(device="cuda").manual_seed(T)
    E, H, I, K = 8, 256, 512, 2  # noqa: E741
    layers = [_weights(E, H, I, gen) for _ in range(2)]
    results = []
    for _ in range(G.WARMUP_CALLS + 3):
        for w1, w2 in layers:
            x, ids, wts = _inputs(T, E, H, K, gen)
            results.append((X.moe_experts(x, ids, wts, w1, w2), X.fused_experts_impl(x, ids, wts, w1, w2)))
    assert G.graphs() == 2
    for got, want in results:
        assert torch.equal(got, want)
    # Weights changed in place are read by the replay (a graph reads them where they are).
    w1, w2 = layers[0]
    w1.mul_(-1.5)
    x, ids, wts = _inputs(T, E, H, K, gen)
    assert torch.equal(X.moe_experts(x, ids, wts, w1, w2), X.fused_experts_impl(x, ids, wts, w1, w2))
    assert G.graphs() == 2


@pytest.mark.gpu
def test_not_used_above_max_tokens_inside_a_capture_or_when_disabled(graphs_kept):
    gen = torch.Generator(device="cuda").manual_seed(0)
    E, H, I, K = 8, 256, 512, 2  # noqa: E741
    w1, w2 = _weights(E, H, I, gen)
    for _ in range(G.WARMUP_CALLS + 2):
        x, ids, wts = _inputs(G.MAX_TOKENS + 1, E, H, K, gen)
        X.moe_experts(x, ids, wts, w1, w2)
    assert not G._CACHE
    for _ in range(G.WARMUP_CALLS + 2):
        x, ids, wts = _inputs(4, E, H, K, gen)
        X.moe_experts(x, ids, wts, w1, w2, graphs=False)
    assert not G._CACHE
    # Inside a caller's capture the launchers go into the caller's graph (no nested capture).
    x, ids, wts = _inputs(4, E, H, K, gen)
    for _ in range(G.WARMUP_CALLS + 1):
        X.moe_experts(x, ids, wts, w1, w2)
    torch.cuda.synchronize()
    G.clear()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = X.moe_experts(x, ids, wts, w1, w2)
    assert not G._CACHE
    x.copy_(torch.randn(x.shape, device="cuda", generator=gen))
    graph.replay()
    assert torch.equal(out, X.fused_experts_impl(x, ids, wts, w1, w2))


@pytest.mark.gpu
def test_slower_replay_is_not_kept(monkeypatch):
    """Where the capture-time check finds eager faster, the signature stays eager for good."""
    walls = itertools.cycle([1.0, 0.0])  # replay slower than eager
    monkeypatch.setattr(G, "_wall", lambda fn, reps=3: next(walls))
    G.clear()
    gen = torch.Generator(device="cuda").manual_seed(1)
    E, H, I, K = 8, 256, 512, 2  # noqa: E741
    w1, w2 = _weights(E, H, I, gen)
    for _ in range(G.WARMUP_CALLS + 3):
        x, ids, wts = _inputs(2, E, H, K, gen)
        assert torch.equal(X.moe_experts(x, ids, wts, w1, w2), X.fused_experts_impl(x, ids, wts, w1, w2))
    assert G.graphs() == 0 and list(G._CACHE.values()) == [False]
    G.clear()


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("T", [4, 200])  # replayed from a graph, and launched eagerly
def test_layer_on_another_gpu_than_the_current_one(T, graphs_kept):
    """A model spread over GPUs (device_map): the layer's tensors on cuda:1 while cuda:0 is current
    give what the launchers give with cuda:1 current, call after call."""
    from moepatch.ops.route import route as fused_route
    from moepatch.ops.route_graphs import route_graphed
    from moepatch.routing import make_config

    dev = "cuda:1"
    gen = torch.Generator(device=dev).manual_seed(T)
    E, H, I, K = 8, 256, 512, 2  # noqa: E741
    w1, w2 = _weights(E, H, I, gen, dev)
    calls = [_inputs(T, E, H, K, gen, dev) for _ in range(G.WARMUP_CALLS + 2)]
    cfg = make_config(1.0, "reroute", num_experts=E, collect_stats=False)
    scores = [torch.rand(T, E, device=dev, generator=gen) for _ in calls]
    routes = []
    for s in scores:  # softmax scores, their top-K, weights renormalised (factor 1 / the kept mass)
        s = s.softmax(dim=1)
        top = s.topk(K, dim=1)
        factor = 1.0 / top.values.sum(dim=1)
        routes.append((s, top.indices, top.values * factor[:, None], factor))
    with torch.cuda.device(1):
        want = [X.fused_experts_impl(*c, w1, w2) for c in calls]
        want_ids = [fused_route(cfg, *r, batch=1, seq=T).topk_ids_TW for r in routes]
    torch.cuda.set_device(0)
    for c, r, expected, expected_ids in zip(calls, routes, want, want_ids):
        assert torch.equal(X.moe_experts(*c, w1, w2), expected)
        assert torch.equal(route_graphed(cfg, *r, batch=1, seq=T).topk_ids_TW, expected_ids)
    assert G.graphs() == (1 if T <= G.MAX_TOKENS else 0)
