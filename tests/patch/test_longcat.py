"""LongCat-Flash: capacity-aware routing with zero-computation experts, on a tiny model from config.

The router is ``block.router`` (transformers 5.25 returns (logits, weights, ids), 5.17 only
(weights, ids)); ids >= E are identity experts (the token's state times its weight) that take no
capacity.  Expected outputs are computed here by hand from the weights with plain loops; the same
tests run on both releases (5.17: the experts module computes the identity experts; 5.25: the block).
"""

import math

import pytest
import torch
import torch.nn.functional as F

import moepatch
from moepatch.errors import ModelStateError
from moepatch.patch.registry import family_for, moe_blocks
from moepatch.routing import make_config, route
from moepatch.tiny import tiny_model

E, Z, K = 8, 2, 2  # the tiny config: computing experts, identity experts, top-k


@pytest.fixture(scope="module")
def model():
    return tiny_model("longcat_flash")


def _x(model, batch=3, seq=8, seed=1):
    return torch.randn(batch, seq, model.config.hidden_size, generator=torch.Generator().manual_seed(seed))


def _native(block, x_BSD):
    """Hand scores and the unpatched router's (weights, ids)."""
    router = block.router
    logits = x_BSD.reshape(-1, x_BSD.shape[-1]).float() @ router.classifier.weight.float().T
    out = router(x_BSD)
    return torch.softmax(logits, -1), out[-2], out[-1]


def _pair(experts, e, x_D):
    """One pair by hand: SwiGLU from the fused weights for a computing expert, x for an identity one."""
    if e >= E:
        return x_D
    width = experts.down_proj.shape[-1]
    h = experts.gate_up_proj[e] @ x_D
    return experts.down_proj[e] @ (F.silu(h[:width]) * h[width:])


def _routed(experts, x_TD, ids_TW, w_TW):
    """Σ over the non-empty slots (id < E + Z) of w · expert(x), in plain loops."""
    out = torch.zeros_like(x_TD)
    for t in range(x_TD.shape[0]):
        for j in range(ids_TW.shape[1]):
            e = int(ids_TW[t, j])
            if e < E + Z:
                out[t] += w_TW[t, j] * _pair(experts, e, x_TD[t])
    return out


def _capture(router):
    seen = []
    return seen, router.register_forward_hook(lambda m, a, o: seen.append(tuple(t.clone() for t in o)))


@torch.no_grad()
def test_router_logits_are_the_routers_own(model):
    spec = family_for(model)
    assert spec.model_type == "longcat_flash" and len(moe_blocks(model, spec)) == 2
    block = model.model.layers[0].mlp
    x = _x(model)
    logits = spec.router_logits(block.router, x)
    scores, w, ids = _native(block, x)
    out = block.router(x)
    if len(out) == 3:  # transformers 5.25 returns them: the recomputation is bit-identical
        assert torch.equal(out[0], logits)
    torch.testing.assert_close(torch.softmax(logits, -1), scores)
    # The native weights are the plain softmax score times routed_scaling_factor, bit for bit.
    assert torch.equal(w, torch.softmax(logits, -1).gather(1, ids) * block.router.routed_scaling_factor)
    assert block.router.num_experts == E and block.router.n_routed_experts == E + Z


@torch.no_grad()
@pytest.mark.parametrize("policy", ["score", "order", "reverse"])
@pytest.mark.parametrize("gamma", [1.0, 0.25])
def test_drop_matches_hand_computation(model, policy, gamma):
    """C = ceil(γ · pairs on computing experts / E); identity pairs are always kept."""
    block = model.model.layers[0].mlp
    x_BSD = _x(model)
    x_TD = x_BSD.reshape(-1, x_BSD.shape[-1])
    T = x_TD.shape[0]
    scores, w, ids = _native(block, x_BSD)
    real = ids < E
    assert (~real).any() and real.any(), "the tiny router must pick both kinds of expert"
    cap = math.ceil(gamma * int(real.sum()) / E)
    keep = ~real
    for e in range(E):
        pairs = [(t, j) for t in range(T) for j in range(K) if ids[t, j] == e]
        if policy == "score":
            pairs.sort(key=lambda p: (-scores[p[0], e].item(), p[0]))
        elif policy == "reverse":
            pairs.sort(key=lambda p: -p[0])
        for t, j in pairs[:cap]:
            keep[t, j] = True
    assert (real & ~keep).any(), "some computing expert must overflow"
    want = _routed(block.experts, x_TD, torch.where(keep, ids, E + Z), w)
    base = block(x_BSD).reshape(T, -1)
    torch.testing.assert_close(base, _routed(block.experts, x_TD, ids, w), rtol=1e-5, atol=1e-6)
    with moepatch.patched(model, capacity_factor=gamma, policy=policy) as handle:
        got = block(x_BSD).reshape(T, -1)
        rec = handle.stats().records[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # A token whose computing pairs were all dropped keeps exactly its identity part (0 without one).
    lost = (real & ~keep).any(1) & ~(real & keep).any(1)
    assert lost.any() or gamma == 1.0
    for t in lost.nonzero().flatten().tolist():
        ident = sum((w[t, j] * x_TD[t] for j in range(K) if ids[t, j] >= E), torch.zeros_like(x_TD[t]))
        torch.testing.assert_close(got[t], ident, rtol=0, atol=1e-6)
    assert rec.capacity == [cap]
    assert rec.identity_pairs == int((~real).sum()) and rec.routed_pairs == int(real.sum())
    assert rec.dropped_pairs == int((real & ~keep).sum())


STRATEGIES = [dict(strategy="drop", policy=p) for p in ("score", "order", "reverse", "random")] + [
    dict(strategy="reroute"), dict(strategy="reroute", reroute_target="least_loaded", reroute_rounds=3),
    dict(strategy="expanded"), dict(strategy="expanded", ep_size=2), dict(strategy="expanded", local_experts="all",
                                                                            max_experts_per_token=1),
    dict(strategy="expert_drop", expert_drop_fraction=0.3), dict(strategy="drop", capacity_scope="device", ep_size=2),
    dict(strategy="drop", group="sequence"), dict(strategy="drop", renormalize="kept"),
]


@torch.no_grad()
@pytest.mark.parametrize("opts", STRATEGIES, ids=lambda o: "-".join(f"{v}" for v in o.values()))
def test_every_strategy_equals_the_reference_and_the_hand_sum(model, opts):
    """The hook's decision is route()'s with zero_experts=Z; the block computes exactly its kept pairs."""
    block = model.model.layers[1].mlp
    x_BSD = _x(model, seed=2)
    x_TD = x_BSD.reshape(-1, x_BSD.shape[-1])
    B, S = x_BSD.shape[:2]
    scores, w, ids = _native(block, x_BSD)
    arity = len(block.router(x_BSD))
    cfg = make_config(0.5, num_experts=E, **opts)
    factor = torch.full((B * S,), float(block.router.routed_scaling_factor))
    ref = route(cfg, scores, ids, w, factor, batch=B, seq=S, layer=1, zero_experts=Z)
    with moepatch.patched(model, capacity_factor=0.5, **opts):
        seen, hook = _capture(block.router)
        got = block(x_BSD).reshape(B * S, -1)
        hook.remove()
    assert len(seen[0]) == arity  # the router's own arity: 5.17 returns no logits
    w_TW, ids_TW = seen[0][-2], seen[0][-1]
    torch.testing.assert_close(w_TW, ref.topk_weights_TW, rtol=0, atol=0)
    assert torch.equal(ids_TW, ref.topk_ids_TW)
    torch.testing.assert_close(got, _routed(block.experts, x_TD, ids_TW, w_TW), rtol=1e-5, atol=1e-6)
    # Identity experts: every native pick stays with its native weight, none is ever added.
    for t in range(B * S):
        native_z = {(int(e), float(v)) for e, v in zip(ids[t], w[t]) if e >= E}
        patched_z = {(int(e), float(v)) for e, v in zip(ids_TW[t], w_TW[t]) if E <= e < E + Z}
        if opts.get("renormalize") == "kept":
            assert {e for e, _ in native_z} == {e for e, _ in patched_z}
        else:
            assert native_z == patched_z
    assert (ids_TW < E).sum() < (ids < E).sum() or opts["strategy"] == "expanded"
    if opts["strategy"] != "expert_drop" and "capacity_scope" not in opts:
        assert ref.capacity_G is not None
        group = torch.arange(B * S) * cfg.ep_size // (B * S) if cfg.group == "batch" else torch.arange(B * S) // S
        for g in range(ref.capacity_G.numel()):
            load = torch.bincount(ids_TW[(group == g)[:, None] & (ids_TW < E)], minlength=E)
            assert (load <= ref.capacity_G[g]).all()


@torch.no_grad()
def test_stats_count_computing_and_identity_pairs(model):
    seen = {}
    hooks = [b.router.register_forward_hook(lambda m, a, o, n=name: seen.__setitem__(n, o[-1].clone()))
             for name, b in moe_blocks(model, family_for(model))]
    ids_in = torch.randint(3, 128, (4, 8), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids_in)
    mask[0, :3] = 0
    try:
        for ep in (1, 2):
            seen.clear()
            with moepatch.patched(model, capacity_factor=1.0, ep_size=ep) as handle:
                model(input_ids=ids_in, attention_mask=mask)
                st = handle.stats()
            assert len(st.records) == 2
            valid = mask.reshape(-1).bool()
            chunks = torch.arange(valid.numel()) * ep // valid.numel()
            for rec, nat in zip(st.records, seen.values()):
                nat = nat[valid]
                real = nat[nat < E]
                assert rec.num_experts == E and rec.tokens == int(valid.sum())
                assert rec.load_before == torch.bincount(real, minlength=E).tolist()
                assert rec.identity_pairs == int((nat >= E).sum()) > 0
                assert rec.routed_pairs == real.numel() == rec.tokens * K - rec.identity_pairs
                caps = [math.ceil(int((nat[chunks[valid] == d] < E).sum()) / E) for d in range(ep)]
                assert rec.capacity == caps
                if ep == 1:
                    assert rec.load_after == [min(n, caps[0]) for n in rec.load_before]
                assert rec.dropped_pairs == sum(rec.load_before) - sum(rec.load_after) > 0
                assert rec.mean_load == real.numel() / E
                assert rec.straggler_before == max(rec.load_before) / rec.mean_load
                assert rec.to_dict()["identity_pairs"] == rec.identity_pairs
            layer = st.layers()[0]
            assert layer["identity_pairs"] == st.records[0].identity_pairs
    finally:
        for h in hooks:
            h.remove()


def test_backends_without_the_experts_interface_are_refused(model):
    for opts in (dict(kernel="triton"), dict(expert_parallel=True)):
        with pytest.raises(ModelStateError, match="ExpertsInterface"):
            moepatch.apply(model, capacity_factor=1.0, **opts)
        assert not moepatch.is_patched(model)


@pytest.fixture(scope="module")
def bf16_model():
    return tiny_model("longcat_flash", dtype=torch.bfloat16)


@pytest.mark.parametrize("gamma", [0.5, 1.0, 1.5])
@pytest.mark.parametrize("strategy", ["drop", "reroute", "expanded", "expert_drop"])
@torch.no_grad()
def test_bf16_and_all_padding_rows_stay_finite(bf16_model, strategy, gamma):
    """No NaN under any strategy: transformers 5.25 hands the experts module id E for an empty slot,
    which its grouped_mm does not skip (uninitialised rows); the experts hooks lower it first."""
    x = torch.randint(3, 128, (3, 5), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(x)
    mask[1] = 0
    mask[2, :3] = 0
    with moepatch.patched(bf16_model, capacity_factor=gamma, strategy=strategy) as handle:
        out = bf16_model(input_ids=x, attention_mask=mask).logits
        rec = handle.stats().records[0]
    assert rec.tokens == int(mask.sum())
    assert torch.isfinite(out).all()
    if gamma == 0.5 and strategy == "drop":
        assert rec.dropped_pairs > 0  # the case that produced NaN: some slot is empty
