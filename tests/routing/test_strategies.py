"""Property tests of the spec's invariants on the strategies of moepatch.routing (random scores with ties).

The vectorised strategies are checked against the plain loops of tests/routing/oracle.py.
"""

import math

import oracle  # tests/routing/oracle.py
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from moepatch.routing import (
    capacities,
    expanded_drop,
    expert_drop,
    group_ids,
    make_config,
    random_keys,
    route,
    token_drop,
    token_reroute,
)
from moepatch.routing.scores import FamilyScoring

SETTINGS = settings(max_examples=60, deadline=None)


@st.composite
def routing_case(draw, max_tokens=24):
    E = draw(st.integers(1, 8))
    K = draw(st.integers(1, E))
    T = draw(st.integers(0, max_tokens))
    seed = draw(st.integers(0, 2**31 - 1))
    # Few score levels force exact ties; "one_expert" sends every token to expert 0 first.
    levels = draw(st.sampled_from([2, 3, 1000]))
    skew = draw(st.sampled_from(["none", "one_expert", "empty_expert"]))
    g = torch.Generator().manual_seed(seed)
    logits = torch.randint(0, levels, (T, E), generator=g).float()
    if skew == "one_expert":
        logits[:, 0] += levels
    elif skew == "empty_expert" and E > K:
        logits[:, E - 1] = -1e4
    scores = torch.softmax(logits, -1)
    ids = torch.topk(scores, K, dim=-1).indices if T else torch.zeros(0, K, dtype=torch.long)
    active = torch.rand(T, generator=g) > draw(st.sampled_from([0.0, 0.3, 1.01]))
    groups = draw(st.integers(1, 3))
    group = torch.randint(0, groups, (T,), generator=g)
    cap = torch.tensor([draw(st.integers(0, 6)) for _ in range(groups)])
    return scores, ids, active, group, cap


def _experts(E):
    return torch.arange(E), torch.ones(E, dtype=torch.long)


@SETTINGS
@given(routing_case(), st.sampled_from(["score", "order", "reverse"]))
def test_token_drop_matches_spec_loops(case, policy):
    scores, ids, active, group, cap = case
    bucket_E, size_B = _experts(scores.shape[1])
    keep = token_drop(scores, ids, active, group, cap, bucket_E, size_B, policy)
    assert torch.equal(keep, oracle.drop_pairs(scores, ids, active, group, cap, policy))


@SETTINGS
@given(routing_case())
def test_random_policy_is_seeded_and_respects_capacity(case):
    scores, ids, active, group, cap = case
    bucket_E, size_B = _experts(scores.shape[1])
    runs = [token_drop(scores, ids, active, group, cap, bucket_E, size_B, "random", random_keys(7, 0, [ids.numel()]))
            for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    E = scores.shape[1]
    for g in range(cap.numel()):
        in_g = (group == g) & active
        load = torch.bincount(ids[in_g].reshape(-1), minlength=E)
        kept = torch.bincount(ids[in_g & runs[0].any(1)][runs[0][in_g & runs[0].any(1)]], minlength=E)
        assert torch.equal(kept, torch.minimum(load, cap[g].expand(E)))


@SETTINGS
@given(routing_case())
def test_score_drop_keeps_the_best(case):
    """Invariant 2: every kept pair of an over-capacity expert scores >= every dropped one."""
    scores, ids, active, group, cap = case
    bucket_E, size_B = _experts(scores.shape[1])
    keep = token_drop(scores, ids, active, group, cap, bucket_E, size_B, "score")
    for g in range(cap.numel()):
        for e in range(scores.shape[1]):
            sel = (ids == e) & (group[:, None] == g) & active[:, None]
            tok_kept = sel.nonzero()[:, 0][keep[sel]]
            tok_drop = sel.nonzero()[:, 0][~keep[sel]]
            assert tok_kept.numel() <= cap[g]
            if tok_kept.numel() and tok_drop.numel():
                assert scores[tok_kept, e].min() >= scores[tok_drop, e].max()


@SETTINGS
@given(routing_case(max_tokens=16), st.sampled_from(["score", "least_loaded"]), st.integers(1, 3))
def test_token_reroute_matches_spec_loops(case, target, rounds):
    scores, ids, active, group, cap = case
    bucket_E, size_B = _experts(scores.shape[1])
    keep = token_drop(scores, ids, active, group, cap, bucket_E, size_B, "score")
    got = token_reroute(scores, ids, keep, active, group, cap, bucket_E, size_B, target, rounds)
    want = oracle.reroute_pairs(scores, ids, keep, active, group, cap, target, rounds)
    ids_got, keep_got, moved_got = got
    assert torch.equal(keep_got, want[1]) and torch.equal(moved_got, want[2])
    assert torch.equal(torch.where(keep_got, ids_got, -1), torch.where(want[1], want[0], -1))
    # Invariant 1 and "not already one of t's picks": no expert over C, no expert twice per token.
    E = scores.shape[1]
    for g in range(cap.numel()):
        sel = (group[:, None] == g) & keep_got
        assert (torch.bincount(ids_got[sel], minlength=E) <= cap[g]).all()
    for t in range(ids.shape[0]):
        kept_ids = ids_got[t][keep_got[t]].tolist()
        assert len(kept_ids) == len(set(kept_ids))
        assert not set(ids_got[t][moved_got[t]].tolist()) & set(ids[t].tolist())


@SETTINGS
@given(routing_case(), st.sampled_from([None, 1, 2]))
def test_expanded_drop_keeps_top_c_candidates(case, max_per_token):
    scores, ids, active, group, cap = case
    T, E = scores.shape
    bucket_E, size_B = _experts(E)
    g = torch.Generator().manual_seed(T)
    local = torch.rand(T, E, generator=g) > 0.5
    keep = expanded_drop(scores, ids, active, group, cap, bucket_E, size_B, local, None)
    native = torch.zeros(T, E, dtype=torch.bool)
    if T:
        native.scatter_(1, ids, True)
    cand = (native | local) & active[:, None]
    assert not (keep & ~cand).any()
    for gi in range(cap.numel()):
        for e in range(E):
            toks = [t for t in range(T) if cand[t, e] and group[t] == gi]
            toks.sort(key=lambda t: (-scores[t, e].item(), t))
            want = set(toks[: int(cap[gi])])
            assert {t for t in range(T) if keep[t, e] and group[t] == gi} == want
    if max_per_token is not None:
        capped = expanded_drop(scores, ids, active, group, cap, bucket_E, size_B, local, max_per_token)
        assert (capped.sum(1) <= max_per_token).all()
        assert not (capped & ~keep).any()


@SETTINGS
@given(routing_case())
def test_device_scope_caps_devices(case):
    scores, ids, active, group, cap = case
    E = scores.shape[1]
    D = min(2, E)
    dev_E = torch.arange(E) * D // E
    size_B = torch.bincount(dev_E, minlength=D)
    keep = token_drop(scores, ids, active, group, cap, dev_E, size_B, "score")
    for g in range(cap.numel()):
        sel = (group[:, None] == g) & keep
        load_D = torch.bincount(dev_E[ids[sel]], minlength=D)
        assert (load_D <= cap[g] * size_B).all()


def test_expert_drop_skips_least_loaded():
    ids = torch.tensor([[0, 1], [0, 2], [0, 1], [3, 1]])
    keep, dropped = expert_drop(ids, torch.ones(4, dtype=torch.bool), num_experts=8, fraction=0.25)
    # 2 of 8 experts skipped: loads are [3, 3, 1, 1, 0, 0, 0, 0]; the lowest (and lowest index) are 4 and 5.
    assert dropped[0].nonzero().flatten().tolist() == [4, 5]
    assert keep.all()
    keep, dropped = expert_drop(ids, torch.ones(4, dtype=torch.bool), num_experts=4, fraction=0.5)
    assert dropped[0].nonzero().flatten().tolist() == [2, 3]
    assert keep.tolist() == [[True, True], [True, False], [True, True], [False, True]]


@pytest.mark.parametrize("gamma,T,k,E,want", [(1.0, 8, 2, 8, 2), (1.5, 8, 2, 8, 3), (1.1, 40, 2, 8, 11),
                                              (1.0, 3, 2, 8, 1), (2.0, 0, 2, 8, 0), (0.5, 7, 1, 4, 1)])
def test_capacity_formula(gamma, T, k, E, want):
    assert capacities(torch.tensor([T]), k, E, gamma).item() == want == oracle.capacity(T * k, E, gamma)
    assert capacities(torch.tensor([T]), k, E, gamma, min_capacity=5).item() == max(5, want)


# --- route(): the whole decision for one layer ---------------------------------------------------

def _layer(T=12, E=6, K=2, seed=0, scoring=FamilyScoring("softmax", normalize=True)):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, E, generator=g) * 3
    scores = scoring.scores(logits)
    ids = torch.topk(scores, K, -1).indices
    factor = scoring.factor(scores, ids)
    w = scores.gather(1, ids) * factor[:, None]
    return scores, ids, w, factor


ALL_STRATEGIES = [dict(strategy="drop", policy=p) for p in ("score", "order", "reverse", "random")] + [
    dict(strategy="reroute"), dict(strategy="reroute", reroute_target="least_loaded", reroute_rounds=3),
    dict(strategy="expanded"), dict(strategy="expanded", ep_size=2), dict(strategy="expanded", ep_size=3,
                                                                            max_experts_per_token=2),
    dict(strategy="expert_drop"), dict(strategy="drop", capacity_scope="device", ep_size=2),
    dict(strategy="drop", group="sequence"), dict(strategy="drop", renormalize="kept"),
]


@pytest.mark.parametrize("opts", ALL_STRATEGIES, ids=lambda o: "-".join(f"{v}" for v in o.values()))
@pytest.mark.parametrize("gamma", [0.5, 1.0, 1.5])
def test_route_invariants(opts, gamma):
    scores, ids, w, factor = _layer()
    T, E = scores.shape
    cfg = make_config(gamma, num_experts=E, **opts)
    valid = torch.ones(3, 4, dtype=torch.bool)
    valid[0, :2] = False  # left padding in the first sequence
    valid[2, :] = False  # an all-padding row
    r = route(cfg, scores, ids, w, factor, batch=3, seq=4, valid_BS=valid)
    ids_W, w_W = r.topk_ids_TW, r.topk_weights_TW
    kept = ids_W < E
    assert torch.isfinite(w_W).all()
    assert (w_W[~kept] == 0).all()
    # Padding takes no slot and gets no expert.
    assert not kept.view(3, 4, -1)[~valid].any()
    assert r.tokens_G.sum() == valid.sum()
    assert r.load_after_E.sum() == kept.sum()
    if cfg.strategy != "expert_drop" and opts.get("capacity_scope") != "device":
        group_T, G = group_ids(3, 4, cfg.group, cfg.ep_size)
        for g in range(G):
            in_g = kept & (group_T[:, None] == g)
            assert (torch.bincount(ids_W[in_g], minlength=E) <= r.capacity_G[g]).all()
    # No expert twice for one token.
    for t in range(T):
        e = ids_W[t][kept[t]].tolist()
        assert len(e) == len(set(e))
    # Weights: native where the native pick stays, s * factor for new experts (before renormalisation).
    if opts.get("renormalize") != "kept":
        want = (scores.gather(1, ids_W.clamp(max=E - 1)) * factor[:, None])
        assert torch.allclose(torch.where(kept, w_W, 0), torch.where(kept, want, 0), atol=1e-6)
    else:
        sums = w_W.sum(1)
        has = kept.any(1)
        assert torch.allclose(sums[has], w.sum(1)[has], atol=1e-6)


@pytest.mark.parametrize("opts", ALL_STRATEGIES[:-1], ids=lambda o: "-".join(f"{v}" for v in o.values()))
def test_route_is_identity_without_capacity(opts):
    scores, ids, w, factor = _layer()
    if opts["strategy"] == "expert_drop":
        return
    E = scores.shape[1]
    for gamma in (None, math.inf):
        r = route(make_config(gamma, num_experts=E, **opts), scores, ids, w, factor, batch=3, seq=4)
        assert r.topk_ids_TW is ids and r.topk_weights_TW is w
    if opts["strategy"] == "expanded":  # a large capacity adds local experts there: not an identity
        return
    # A capacity at or above the largest load changes nothing either (invariant 3).
    r = route(make_config(100.0, num_experts=E, **opts), scores, ids, w, factor, batch=3, seq=4)
    assert torch.equal(r.topk_ids_TW, ids) and torch.equal(r.topk_weights_TW, w)
    assert r.dropped_pairs == 0


def test_all_padding_batch_routes_nothing():
    scores, ids, w, factor = _layer(T=6)
    valid = torch.zeros(2, 3, dtype=torch.bool)
    for strategy in ("drop", "reroute", "expanded"):
        r = route(make_config(1.0, strategy, num_experts=6), scores, ids, w, factor, batch=2, seq=3, valid_BS=valid)
        assert (r.topk_ids_TW == 6).all() and (r.topk_weights_TW == 0).all()
        assert r.routed_pairs == 0 and r.dropped_pairs == 0


def test_count_padding_lets_padding_compete():
    scores, ids, w, factor = _layer(T=6)
    valid = torch.tensor([[False, True, True], [True, True, True]])
    r = route(make_config(1.0, num_experts=6, count_padding=True), scores, ids, w, factor, batch=2, seq=3,
              valid_BS=valid)
    assert r.tokens_G.sum() == 6


def test_simulated_ep_groups_follow_device_chunks():
    """ep_size=n: each contiguous chunk of the batch has its own capacity."""
    scores, ids, w, factor = _layer(T=16, E=4)
    cfg = make_config(1.0, num_experts=4, ep_size=2)
    r = route(cfg, scores, ids, w, factor, batch=4, seq=4)
    assert r.tokens_G.tolist() == [8, 8]
    halves = [route(make_config(1.0, num_experts=4), scores[s], ids[s], w[s], factor[s], batch=2, seq=4)
              for s in (slice(0, 8), slice(8, 16))]
    assert torch.equal(r.topk_ids_TW, torch.cat([h.topk_ids_TW for h in halves]))
    # Real EP: each rank routes its own tokens with source_rank and gets the same decision.
    for opts in (dict(strategy="expanded"), dict(policy="random", seed=3), dict(strategy="expert_drop")):
        cfg_rank = make_config(1.0, num_experts=4, ep_size=2, **opts)
        sim = route(cfg_rank, scores, ids, w, factor, batch=4, seq=4)
        ranks = [route(cfg_rank, scores[s], ids[s], w[s], factor[s], batch=2, seq=4, source_rank=i)
                 for i, s in enumerate((slice(0, 8), slice(8, 16)))]
        assert torch.equal(sim.topk_ids_TW, torch.cat([x.topk_ids_TW for x in ranks])), opts


# --- zero-computation experts (LongCat-Flash): exempt from capacity ------------------------------

@st.composite
def zero_case(draw):
    """A routing case whose last Z experts are zero-computation (identity) experts."""
    scores, ids, active, group, cap = draw(routing_case())
    assume(scores.shape[1] >= 2)
    return scores, ids, active, group, cap, draw(st.integers(1, scores.shape[1] - 1))


@SETTINGS
@given(zero_case(), st.sampled_from(["score", "order", "reverse"]))
def test_token_drop_never_drops_zero_experts(case, policy):
    scores, ids, active, group, cap, Z = case
    bucket_E, size_B = _experts(scores.shape[1])
    keep = token_drop(scores, ids, active, group, cap, bucket_E, size_B, policy, zero_experts=Z)
    assert torch.equal(keep, oracle.drop_pairs(scores, ids, active, group, cap, policy, zero=Z))


@SETTINGS
@given(zero_case(), st.sampled_from(["score", "least_loaded"]), st.integers(1, 3))
def test_token_reroute_never_targets_zero_experts(case, target, rounds):
    scores, ids, active, group, cap, Z = case
    bucket_E, size_B = _experts(scores.shape[1])
    keep = token_drop(scores, ids, active, group, cap, bucket_E, size_B, "score", zero_experts=Z)
    ids_got, keep_got, moved_got = token_reroute(scores, ids, keep, active, group, cap, bucket_E, size_B, target,
                                                 rounds, zero_experts=Z)
    want = oracle.reroute_pairs(scores, ids, keep, active, group, cap, target, rounds, zero=Z)
    assert torch.equal(keep_got, want[1]) and torch.equal(moved_got, want[2])
    assert torch.equal(torch.where(keep_got, ids_got, -1), torch.where(want[1], want[0], -1))
    real = scores.shape[1] - Z
    assert not (moved_got & (ids_got >= real)).any()


@SETTINGS
@given(zero_case(), st.sampled_from([None, 1]))
def test_expanded_drop_keeps_zero_picks_and_never_adds_zero_experts(case, max_per_token):
    scores, ids, active, group, cap, Z = case
    T, E_all = scores.shape
    real = E_all - Z
    bucket_E, size_B = _experts(E_all)
    local = torch.ones(T, E_all, dtype=torch.bool)
    keep = expanded_drop(scores, ids, active, group, cap, bucket_E, size_B, local, max_per_token, zero_experts=Z)
    native = torch.zeros(T, E_all, dtype=torch.bool)
    if T:
        native.scatter_(1, ids, True)
    assert torch.equal(keep[:, real:], native[:, real:] & active[:, None])
    plain = expanded_drop(scores[:, :real], ids.clamp(max=real - 1), active, group, cap, bucket_E[:real],
                          size_B[:real], local[:, :real], None)
    # On the computing experts: each keeps its top-C candidates (every active token is a candidate).
    for gi in range(cap.numel()):
        for e in range(real):
            toks = sorted((t for t in range(T) if active[t] and group[t] == gi),
                          key=lambda t: (-scores[t, e].item(), t))
            assert {t for t in range(T) if keep[t, e] and group[t] == gi} <= set(toks[: int(cap[gi])])
            if max_per_token is None:
                assert torch.equal(keep[:, e], plain[:, e])
    if max_per_token is not None:
        assert (keep[:, :real].sum(1) <= max_per_token).all()


def test_expert_drop_never_skips_zero_experts():
    ids = torch.tensor([[0, 4], [0, 1], [5, 1], [0, 3]])  # experts 4 and 5 are zero-computation
    keep, dropped = expert_drop(ids, torch.ones(4, dtype=torch.bool), num_experts=6, fraction=0.5, zero_experts=2)
    # Loads over the 4 computing experts: [3, 2, 0, 1]; half of them (2 and 3) are skipped.
    assert dropped[0].tolist() == [False, False, True, True]
    assert keep.tolist() == [[True, True], [True, True], [True, True], [True, False]]


@pytest.mark.parametrize("opts", ALL_STRATEGIES, ids=lambda o: "-".join(f"{v}" for v in o.values()))
def test_route_with_zero_experts(opts):
    """C = ceil(γ · pairs on computing experts / E) per group; zero-expert pairs are kept and counted apart."""
    Z = 2
    scores, ids, w, factor = _layer(T=12, E=8, K=3, seed=4, scoring=FamilyScoring("softmax", scale=2.0))
    E = 8 - Z
    assert (ids >= E).any() and (ids < E).any()
    cfg = make_config(0.75, num_experts=E, **opts)
    valid = torch.ones(3, 4, dtype=torch.bool)
    valid[0, :2] = False
    r = route(cfg, scores, ids, w, factor, batch=3, seq=4, valid_BS=valid, zero_experts=Z)
    active = valid.reshape(-1)
    ids_W, w_W = r.topk_ids_TW, r.topk_weights_TW
    kept = ids_W < E + Z
    assert (w_W[~kept] == 0).all() and not kept[~active].any()
    assert r.load_before_E.tolist() == torch.bincount(ids[active][ids[active] < E], minlength=E).tolist()
    assert int(r.identity_pairs) == int((ids[active] >= E).sum())
    assert int(r.routed_pairs) + int(r.identity_pairs) == int(active.sum()) * 3
    assert r.load_after_E.sum() == (ids_W < E).sum()
    # Zero-expert picks of real tokens stay, none is added; native slots hold the native pairs.
    for t in active.nonzero().flatten().tolist():
        assert sorted(e for e in ids_W[t].tolist() if E <= e < E + Z) == sorted(e for e in ids[t].tolist() if e >= E)
    assert int(r.dropped_pairs) == int(r.routed_pairs) - int((ids_W[:, :3] < E).sum())
    if opts.get("renormalize") != "kept":
        want = scores.gather(1, ids_W.clamp(max=E + Z - 1)) * factor[:, None]
        assert torch.equal(torch.where(kept, w_W, 0), torch.where(kept, want, 0))
    if cfg.strategy != "expert_drop":
        group_T, G = group_ids(3, 4, cfg.group, cfg.ep_size)
        for g in range(G):
            pairs = int(((ids < E) & (active & (group_T == g))[:, None]).sum())
            assert int(r.capacity_G[g]) == math.ceil(0.75 * pairs / E)
            if opts.get("capacity_scope") != "device":
                in_g = (ids_W < E) & (group_T[:, None] == g)
                assert (torch.bincount(ids_W[in_g], minlength=E) <= r.capacity_G[g]).all()
