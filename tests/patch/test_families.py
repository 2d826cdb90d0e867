"""Patched vs unpatched tiny models of every supported family (built from configs, no hub)."""

import json

import pytest
import torch
import torch.nn.functional as F
from families import HAND

import moepatch
from moepatch.ops.reference import expert_mlp
from moepatch.patch.registry import family_for, moe_blocks
from moepatch.tiny import tiny_model

FAMILIES = HAND
# Families whose router is `block.gate` and whose experts run through transformers' ExpertsInterface;
# LongCat-Flash (block.router, zero-computation experts) has its own tests in test_longcat.py.
GATE_FAMILIES = [f for f in FAMILIES if f != "longcat_flash"]


def _ids(batch=3, seq=9, seed=0):
    return torch.randint(3, 128, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.fixture(params=FAMILIES)
def model(request):
    return tiny_model(request.param)


@pytest.fixture(params=GATE_FAMILIES)
def gate_model(request):
    return tiny_model(request.param)


@torch.no_grad()
def test_no_capacity_is_bit_identical(model):
    x = _ids()
    base = model(x).logits
    for gamma in (None, float("inf"), 1e6):
        with moepatch.patched(model, capacity_factor=gamma):
            assert torch.equal(model(x).logits, base), gamma
    with moepatch.patched(model, capacity_factor=None, strategy="reroute"):
        assert torch.equal(model(x).logits, base)


@torch.no_grad()
def test_no_capacity_without_statistics_launches_nothing(model):
    """gamma=None, collect_stats=False: nothing to decide or record, so the hooks run no tensor op."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    def ops():
        Count.n = 0
        with Count():
            model(x)
        return Count.n

    x = _ids()
    base = ops()
    with moepatch.patched(model, capacity_factor=None, collect_stats=False) as handle:
        assert ops() == base
        assert len(handle.stats()) == 0
    with moepatch.patched(model, capacity_factor=None):  # statistics asked for: the routing runs
        assert ops() > base


@torch.no_grad()
def test_remove_restores_exactly(model):
    x = _ids()
    base = model(x).logits
    state = {k: v.clone() for k, v in model.state_dict().items()}
    n_hooks = _hooks(model)
    handle = moepatch.apply(model, capacity_factor=0.5, strategy="reroute")
    assert _hooks(model) > n_hooks
    assert not torch.equal(model(x).logits, base)
    handle.remove()
    assert _hooks(model) == n_hooks
    assert torch.equal(model(x).logits, base)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert not moepatch.is_patched(model)


@torch.no_grad()
def test_block_output_matches_hand_computation(gate_model):
    """γ=1.0 score drop on one block, computed from the spec with plain loops."""
    model = gate_model
    spec = family_for(model)
    _, block = moe_blocks(model, spec)[0]
    x_BSD = torch.randn(2, 6, model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    x_TD = x_BSD.reshape(-1, x_BSD.shape[-1])
    T = x_TD.shape[0]
    _, w_TK, ids_TK = block.gate(x_BSD if spec.model_type.startswith("deepseek") else x_TD)
    logits = F.linear(x_TD.float(), block.gate.weight.float())
    scores = torch.sigmoid(logits) if spec.model_type == "deepseek_v3" else torch.softmax(logits, -1)
    E, K = scores.shape[1], ids_TK.shape[1]
    cap = -(-T * K // E)  # γ = 1.0
    keep = torch.zeros_like(ids_TK, dtype=torch.bool)
    for e in range(E):
        pairs = sorted(((t, j) for t in range(T) for j in range(K) if ids_TK[t, j] == e),
                       key=lambda p: (-scores[p[0], e].item(), p[0]))
        for t, j in pairs[:cap]:
            keep[t, j] = True

    def routed(mask):
        ex = block.experts
        out = torch.zeros_like(x_TD)
        for t in range(T):
            for j in range(K):
                if mask[t, j]:
                    e = int(ids_TK[t, j])
                    y_D = expert_mlp(x_TD[t:t + 1], ex.gate_up_proj[e], ex.down_proj[e], ex.act_fn)[0]
                    out[t] += w_TK[t, j].to(x_TD.dtype) * y_D
        return out

    base = block(x_BSD).reshape(T, -1)
    shared = base - routed(torch.ones_like(keep))
    assert keep.sum() < keep.numel(), "the tiny router must overflow some expert"
    with moepatch.patched(model, capacity_factor=1.0):
        got = block(x_BSD).reshape(T, -1)
    torch.testing.assert_close(got, shared + routed(keep), rtol=1e-5, atol=1e-5)
    # A token whose every pair was dropped gets exactly its shared part.
    for t in (~keep.any(1)).nonzero().flatten().tolist():
        torch.testing.assert_close(got[t], shared[t], rtol=0, atol=1e-6)


@torch.no_grad()
@pytest.mark.parametrize("strategy", ["drop", "reroute", "expanded"])
def test_every_experts_implementation_agrees(gate_model, strategy):
    model = gate_model
    x = _ids()
    outs = {}
    with moepatch.patched(model, capacity_factor=1.0, strategy=strategy):
        for impl in ("eager", "batched_mm", "grouped_mm"):
            model.set_experts_implementation(impl)
            outs[impl] = model(x).logits
    model.set_experts_implementation("grouped_mm")
    for impl in ("eager", "batched_mm"):
        torch.testing.assert_close(outs[impl], outs["grouped_mm"], rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_stats_match_a_manual_count(gate_model):
    model = gate_model
    spec = family_for(model)
    seen = {}
    # Registered before the patch, these hooks run first and see each router's native picks.
    hooks = [b.gate.register_forward_hook(lambda m, a, o, n=name: seen.__setitem__(n, o[2].clone()))
             for name, b in moe_blocks(model, spec)]
    x = _ids()
    handle = moepatch.apply(model, capacity_factor=1.0)
    model(x)
    for h in hooks:
        h.remove()
    stats = handle.stats()
    assert len(stats.records) == len(seen)
    for rec, ids in zip(stats.records, seen.values()):
        E = rec.num_experts
        assert rec.load_before == torch.bincount(ids.reshape(-1), minlength=E).tolist()
        assert rec.tokens == x.numel()
        cap = -(-x.numel() * rec.top_k // E)
        assert rec.capacity == [cap]
        assert rec.load_after == [min(n, cap) for n in rec.load_before]
        assert rec.dropped_pairs == sum(rec.load_before) - sum(rec.load_after)
        assert rec.straggler_after <= rec.straggler_before
    exported = json.loads(stats.to_json())
    assert exported["totals"]["forwards"] == len(seen)
    assert exported["config"]["capacity_factor"] == 1.0
    assert "max/mean before" in stats.table()
    moepatch.reset_stats(model)
    assert len(moepatch.stats(model)) == 0
    handle.remove()


@torch.no_grad()
def test_padding_takes_no_capacity(model):
    x = _ids(batch=2, seq=8)
    mask = torch.ones_like(x)
    mask[0, :5] = 0  # left padding
    with moepatch.patched(model, capacity_factor=1.0) as handle:
        out = model(input_ids=x, attention_mask=mask).logits
        rec = handle.stats().records[0]
    assert rec.tokens == int(mask.sum())
    assert sum(rec.load_before) + rec.identity_pairs == int(mask.sum()) * rec.top_k
    assert torch.isfinite(out).all()
    with moepatch.patched(model, capacity_factor=1.0, count_padding=True) as handle:
        model(input_ids=x, attention_mask=mask)
        assert handle.stats().records[0].tokens == x.numel()


@torch.no_grad()
def test_generate_runs_patched(model):
    x = _ids(batch=2, seq=6)
    mask = torch.ones_like(x)
    mask[1, :2] = 0
    kw = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    base = model.generate(x, **kw)
    with moepatch.patched(model, capacity_factor=None):
        assert torch.equal(model.generate(x, **kw), base)
    with moepatch.patched(model, capacity_factor=0.5) as handle:
        out = model.generate(x, **kw)
        st = handle.stats()
    assert out.shape == base.shape
    # Prefill is capped once per layer; the 3 single-token decode steps are left alone by default.
    assert len(st.records) == len(moe_blocks(model, family_for(model)))
    assert st.config["skipped_decode_steps"] == 3 * len(st.records)
    with moepatch.patched(model, capacity_factor=0.5, apply_in_decode=True) as handle:
        model.generate(x, **kw)
        assert len(handle.stats().records) == 4 * len(st.records)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("strategy", ["drop", "reroute", "expanded"])
@torch.no_grad()
def test_low_precision_and_all_padding_rows_stay_finite(dtype, strategy):
    model = tiny_model("mixtral", dtype=dtype)
    x = _ids(batch=3, seq=5)
    mask = torch.ones_like(x)
    mask[1] = 0  # an all-padding row
    mask[2, :3] = 0
    with moepatch.patched(model, capacity_factor=0.5, strategy=strategy):
        out = model(input_ids=x, attention_mask=mask).logits
    assert torch.isfinite(out).all()


@torch.no_grad()
def test_apply_again_reconfigures_without_stacking(model):
    x = _ids()
    moepatch.apply(model, capacity_factor=0.5)
    n = _hooks(model)
    once = model(x).logits
    moepatch.apply(model, capacity_factor=2.0, strategy="reroute")
    moepatch.apply(model, capacity_factor=0.5)
    assert _hooks(model) == n
    assert torch.equal(model(x).logits, once)
    with moepatch.patched(model, capacity_factor=None):
        pass
    assert moepatch.is_patched(model) and moepatch.stats(model).config["capacity_factor"] == 0.5
    moepatch.remove(model)


def test_save_pretrained_saves_the_unpatched_model(model, tmp_path):
    import transformers

    x = _ids()
    with torch.no_grad():
        base = model(x).logits
    with moepatch.patched(model, capacity_factor=0.5):
        model.save_pretrained(tmp_path)
    text = (tmp_path / "config.json").read_text()
    assert "moepatch" not in text and "capacity" not in text
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, base)


@torch.no_grad()
def test_repr_of_the_handle_and_the_stats_say_what_is_patched():
    model = tiny_model("olmoe")
    handle = moepatch.apply(model, capacity_factor=0.5, strategy="reroute", policy="random")
    text = repr(handle)
    assert text.startswith("<PatchHandle olmoe: 2 MoE layers (model.layers.0.mlp .. model.layers.1.mlp)")
    assert "reroute/random γ=0.5" in text and "nothing recorded yet" in text
    model(_ids())
    stats = moepatch.stats(model)
    dropped = 100 * stats.totals()["dropped_fraction"]
    assert f"1 forward(s) recorded, dropped {dropped:.1f}% of routed pairs" in repr(handle)
    assert repr(stats) == (f"LoadStats(olmoe, reroute/random γ=0.5: 2 MoE layers, 1 forward(s), 27 tokens; "
                           f"dropped {dropped:.1f}% of routed pairs, max/mean load "
                           f"{stats.totals()['straggler_before']:.2f} -> {stats.totals()['straggler_after']:.2f})")
    moepatch.apply(model, capacity_factor=None)
    assert "reroute" not in repr(handle) and "drop/score no capacity" in repr(handle)
    handle.remove()
    assert repr(handle) == "<PatchHandle: removed>"
