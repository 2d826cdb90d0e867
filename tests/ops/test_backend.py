"""moepatch.patch.backend: kernel="triton" in moepatch.apply on tiny models of every family (the CPU
under the interpreter, from this directory's conftest), selection and exact undo."""

import os

import pytest
import torch

import moepatch
from moepatch.patch import backend
from moepatch.tiny import tiny_model

FAMILIES = ["mixtral", "olmoe", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3"]


def _interface_keys():
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    return set(ALL_EXPERTS_FUNCTIONS.keys())


def _impls(model):
    return [(id(c), c._experts_implementation_internal) for c in backend.experts_configs(model, [])]


@pytest.mark.parametrize("family", FAMILIES)
def test_triton_matches_torch_and_remove_restores(family, device):
    model = tiny_model(family).to(device)
    ids = torch.randint(3, 128, (2, 11), device=device)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding: capacity ignores it
    keys_before, impls_before = _interface_keys(), _impls(model)
    with torch.no_grad():
        with moepatch.patched(model, capacity_factor=1.0, kernel="torch"):
            ref = model(ids, attention_mask=mask).logits
        handle = moepatch.apply(model, capacity_factor=1.0, kernel="triton")
        assert model.config._experts_implementation == backend.TRITON
        out = model(ids, attention_mask=mask).logits
        stats_triton = moepatch.stats(model).records
        handle.remove()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert stats_triton and sum(r.dropped_pairs for r in stats_triton) > 0  # capacity really dropped pairs
    assert _impls(model) == impls_before
    assert _interface_keys() == keys_before


@pytest.mark.parametrize("strategy,opts", [("reroute", {"reroute_rounds": 2}), ("expanded", {"ep_size": 2}),
                                           ("drop", {"policy": "random"}), ("expert_drop", {})])
def test_other_strategies(strategy, opts, device):
    model = tiny_model("mixtral").to(device)
    ids = torch.randint(3, 128, (2, 9), device=device)
    gamma = 1.0 if strategy != "expert_drop" else None
    kw = dict(opts)
    with torch.no_grad():
        with moepatch.patched(model, gamma, strategy, kernel="torch", **kw):
            ref = model(ids).logits
        with moepatch.patched(model, gamma, strategy, kernel="triton", **kw):
            out = model(ids).logits
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_without_cuda_graphs_the_eager_entry_runs(device):
    model = tiny_model("mixtral").to(device)
    ids = torch.randint(3, 128, (2, 9), device=device)
    with torch.no_grad():
        with moepatch.patched(model, 1.0, kernel="triton"):
            want = model(ids).logits
        with moepatch.patched(model, 1.0, kernel="triton", cuda_graphs=False):
            assert model.config._experts_implementation == backend.TRITON_EAGER
            out = model(ids).logits
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)
    assert backend.TRITON_EAGER not in _interface_keys()


def test_unlimited_equals_unpatched(device):
    model = tiny_model("qwen3_moe").to(device)
    ids = torch.randint(3, 128, (1, 8), device=device)
    with torch.no_grad():
        base = model(ids).logits
        with moepatch.patched(model, None, kernel="triton"):
            out = model(ids).logits
    torch.testing.assert_close(out, base, rtol=1e-4, atol=1e-4)


def test_previous_implementation_restored_and_shared_registration():
    a, b = tiny_model("mixtral"), tiny_model("olmoe")
    a.set_experts_implementation("eager")
    ha = moepatch.apply(a, kernel="triton")
    hb = moepatch.apply(b, kernel="triton")
    ha.remove()
    assert a.config._experts_implementation == "eager"
    assert backend.TRITON in _interface_keys()  # still used by b
    assert b.config._experts_implementation == backend.TRITON
    hb.remove()
    assert backend.TRITON not in _interface_keys()
    assert b.config._experts_implementation == "grouped_mm"


def test_unavailable_reasons(monkeypatch):
    model = tiny_model("mixtral")
    assert backend.triton_problem(model) is None
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "CUDA" in backend.triton_problem(model)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    experts = model.model.layers[0].mlp.experts
    monkeypatch.setattr(experts, "has_bias", True)
    assert "has_bias" in backend.triton_problem(model)
    monkeypatch.setattr(experts, "has_bias", False)
    other = tiny_model("mixtral")
    other.model.layers[0].mlp.experts.act_fn = torch.nn.GELU()  # gated GELU: an ACT the kernels compute
    assert backend.triton_problem(other) is None
    monkeypatch.setattr(experts, "act_fn", torch.nn.Tanh())
    assert "activation Tanh" in backend.triton_problem(model)
    # A form the kernels do not compute falls back to transformers' experts with one warning.
    with pytest.warns(UserWarning, match="do not cover this model's experts.*activation Tanh") as caught:
        handle = moepatch.apply(model, kernel="triton")
    assert len(caught) == 1 and "hf experts backend" in repr(handle)
    assert model.config._experts_implementation == "grouped_mm"
    handle.remove()
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # not a form but no device: an explicit request fails
    with pytest.raises(moepatch.ModelStateError, match="not available"):
        moepatch.apply(model, kernel="triton")
    assert not moepatch.is_patched(model)


def test_interpreter_env_is_set():
    assert os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()


@pytest.mark.gpu
def test_patched_layer_captures_in_cuda_graph():
    """A patched block (router + sync-free capacity routing + fused experts) captures and replays."""
    model = tiny_model("mixtral", dtype=torch.bfloat16).cuda()
    block = model.model.layers[0].mlp
    x = torch.randn(4, 16, model.config.hidden_size, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad(), moepatch.patched(model, 1.5, kernel="triton", collect_stats=False):
        want = block(x)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = block(x)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, want)
