"""Capacity-aware routing on the shortcut MoE: moepatch.routing.route applied by the ScMoE layers."""

import pytest
import torch

import moepatch
from moepatch.errors import InvalidOptionError, ModelStateError, UnsupportedModelError
from moepatch.routing import make_config, route
from moepatch.scmoe import build_scmoe
from moepatch.scmoe.model import ForwardContext

DIMS = dict(vocab_size=64, hidden_size=32, num_layers=4, num_heads=4, intermediate_size=40, num_experts=4)
# (gamma, strategy, options): every strategy and policy the patch offers.
CASES = [
    (1.0, "drop", {}), (1.0, "drop", {"policy": "order"}), (1.0, "drop", {"policy": "reverse"}),
    (1.0, "drop", {"policy": "random", "seed": 3}), (1.0, "reroute", {}),
    (1.0, "reroute", {"reroute_target": "least_loaded", "reroute_rounds": 2}), (1.0, "expanded", {}),
    (1.5, "expanded", {"max_experts_per_token": 2}), (1.0, "drop", {"capacity_scope": "device", "ep_size": 2}),
    (1.0, "drop", {"group": "sequence"}), (1.0, "drop", {"renormalize": "kept"}), (None, "expert_drop", {}),
]


def _ids(batch=3, seq=11, seed=0):
    return torch.randint(0, 64, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(params=["scmoe", "scmoe2", "top2"])
def model(request):
    torch.manual_seed(0)
    m = build_scmoe(arch=request.param, **DIMS).eval()
    with torch.no_grad():
        for layer in m.moe_layers():  # imbalanced routers, as trained ones are
            layer.router.weight.normal_(0.0, 2.0)
    return m


@torch.no_grad()
def test_no_capacity_is_bit_identical(model):
    ids = _ids()
    base = model(ids).logits
    for gamma in (None, float("inf")):
        with moepatch.apply(model, gamma) as h:
            assert torch.equal(model(ids).logits, base), gamma
            assert h.stats().totals()["dropped_fraction"] == 0.0
    assert all(layer.capacity is None for layer in model.moe_layers())
    assert torch.equal(model(ids).logits, base)


CASE_IDS = lambda c: f"{c[1]}-{'-'.join(f'{k}={v}' for k, v in c[2].items())}"  # noqa: E731


@torch.no_grad()
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_layer_routes_as_route_says(model, case):
    """The shortcut layer's decision and output are route()'s decision on the router's own picks."""
    _check_layer_routes_as_route_says(model, case, calls=1)


@torch.no_grad()
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_layer_routes_as_route_says_on_the_gpu(model, case):
    """On CUDA the layers route with moepatch.patch's sync-free route (Triton kernels, CUDA-graph
    replays after a few calls): every call, replays included, is the reference route()'s decision."""
    _check_layer_routes_as_route_says(model.cuda(), case, calls=5)


def _check_layer_routes_as_route_says(model, case, calls):
    gamma, strategy, opts = case
    layer = model.moe_layers()[0]
    device = layer.router.weight.device
    x_TD = torch.randn(3 * 11, DIMS["hidden_size"], generator=torch.Generator().manual_seed(1)).to(device)
    ctx = ForwardContext(3, 11, None, None, None, None, True, None)
    logits, w_TK, ids_TK = layer.router(x_TD)
    scoring = layer.router.scoring
    scores = scoring.scores(logits)
    expected = route(make_config(gamma, strategy, **opts), scores, ids_TK, w_TK, scoring.factor(scores, ids_TK),
                     batch=3, seq=11, layer=layer.capacity_layer)
    with moepatch.apply(model, gamma, strategy, **opts) as h:
        for _ in range(calls):
            ids_TW, w_TW = layer.gate(x_TD, ctx)
            assert torch.equal(ids_TW, expected.topk_ids_TW) and torch.equal(w_TW, expected.topk_weights_TW)
        assert torch.equal(layer(x_TD, ctx), layer.experts(x_TD, expected.topk_ids_TW, expected.topk_weights_TW))
        logits_full = model(_ids().to(device)).logits
        assert torch.isfinite(logits_full).all()
        records = h.stats().records
        assert len(records) == calls + 1 + len(model.moe_layers())  # the direct calls, then one per layer
        one_group = opts.get("capacity_scope", "expert") == "expert" and opts.get("group", "batch") == "batch"
        if strategy in ("drop", "reroute") and one_group:
            for r in records:
                assert max(r.load_after) <= max(r.capacity)


@torch.no_grad()
def test_finite_capacity_drops_and_changes_the_output(model):
    ids = _ids()
    base = model(ids).logits
    with moepatch.apply(model, 0.5) as h:
        capped = model(ids).logits
        totals = h.stats().totals()
    assert totals["dropped_fraction"] > 0
    assert not torch.equal(capped, base)


@torch.no_grad()
def test_decode_steps_are_left_alone_unless_asked(model):
    prompt = _ids(2, 6)
    with moepatch.apply(model, 0.5) as h:
        model.generate(prompt, max_new_tokens=3)
        # The prefill, then 2 one-position steps (the last new token needs no forward).
        assert h.stats().config["skipped_decode_steps"] == 2 * len(model.moe_layers())
    with moepatch.apply(model, 0.5, apply_in_decode=True) as h:
        model.generate(prompt, max_new_tokens=3)
        assert h.stats().config["skipped_decode_steps"] == 0


def test_reapplying_replaces_and_errors():
    torch.manual_seed(0)
    m = build_scmoe(**DIMS)
    h1 = moepatch.apply(m, 1.0)
    h2 = moepatch.apply(m, 2.0, "reroute")
    # One patch per model: the second apply reconfigured the first one's patch.
    assert h2.config.strategy == "reroute" and h1.config is h2.config
    assert len({id(layer.capacity) for layer in m.moe_layers()}) == 1
    h2.remove()
    assert not moepatch.is_patched(m)
    assert all(layer.capacity is None for layer in m.moe_layers())
    with pytest.raises(InvalidOptionError):
        moepatch.apply(m, 1.0, expert_parallel=True)
    with pytest.raises(InvalidOptionError):
        moepatch.apply(m, 1.0, bogus=1)
    with pytest.raises(UnsupportedModelError):
        moepatch.apply(torch.nn.Linear(2, 2), 1.0)
    # A layer that already carries a capacity decision not made by this model's patch is refused.
    m.moe_layers()[0].capacity = object()
    with pytest.raises(ModelStateError):
        moepatch.apply(m, 1.0)
