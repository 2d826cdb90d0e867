"""Bad input: a clear error naming what is accepted, and the model left untouched."""

import pytest
import torch

import moepatch
from moepatch.tiny import tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model("olmoe")


def _untouched(model):
    return not moepatch.is_patched(model) and all(
        not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("kwargs,match", [
    (dict(capacity_factor=0), "capacity_factor=0 .*accepted: a number > 0"),
    (dict(capacity_factor=-1.5), "capacity_factor=-1.5"),
    (dict(capacity_factor=float("nan")), "capacity_factor=nan"),
    (dict(capacity_factor="1.5"), "capacity_factor='1.5'"),
    (dict(capacity_factor=True), "capacity_factor=True"),
    (dict(strategy="dropout"), "strategy='dropout' .*'drop', 'reroute', 'expanded', 'expert_drop'"),
    (dict(policy="best"), "policy='best' .*'score', 'order', 'reverse', 'random'"),
    (dict(strategy="expanded", policy="order"), "policy do not apply to strategy 'expanded'"),
    (dict(strategy="drop", reroute_rounds=2), "reroute_rounds belongs to strategy reroute"),
    (dict(strategy="reroute", local_experts="all"), "local_experts belongs to strategy expanded"),
    (dict(capacity_facter=1.0), "unknown option.*capacity_facter"),
    (dict(reroute_target="far", strategy="reroute"), "reroute_target='far'"),
    (dict(ep_size=9), "ep_size=9 .*in \\[1, 8\\]"),
    (dict(group="doc"), "group='doc' .*'batch', 'sequence'"),
    (dict(renormalize="all"), "renormalize='all'"),
    (dict(kernel="cuda"), "kernel='cuda' .*'auto', 'torch', 'triton'"),
    (dict(min_capacity=-1), "min_capacity=-1"),
    (dict(strategy="expert_drop", expert_drop_fraction=1.5), "expert_drop_fraction=1.5"),
])
def test_invalid_options(model, kwargs, match):
    with pytest.raises(moepatch.InvalidOptionError, match=match):
        moepatch.apply(model, **kwargs)
    assert _untouched(model)


def test_errors_are_value_errors(model):
    with pytest.raises(ValueError):
        moepatch.apply(model, capacity_factor=0)


def test_unsupported_family():
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=32)
    llama = transformers.LlamaForCausalLM(cfg)
    with pytest.raises(moepatch.UnsupportedModelError, match="model_type 'llama'.*mixtral.*olmoe.*qwen2_moe"):
        moepatch.apply(llama)
    with pytest.raises(moepatch.UnsupportedModelError, match="no transformers config"):
        moepatch.apply(torch.nn.Linear(2, 2))


def test_meta_device_model():
    import transformers

    from moepatch.tiny import tiny_config

    with torch.device("meta"):
        meta = transformers.AutoModelForCausalLM.from_config(tiny_config("mixtral"))
    with pytest.raises(moepatch.ModelStateError, match="meta device"):
        moepatch.apply(meta)
    assert _untouched(meta)


def test_remove_of_an_unpatched_model(model):
    with pytest.raises(moepatch.ModelStateError, match="not patched"):
        moepatch.remove(model)
    with pytest.raises(moepatch.ModelStateError, match="not patched"):
        moepatch.stats(model)


def test_expert_parallel_needs_a_process_group(model):
    with pytest.raises(moepatch.ModelStateError, match="process group"):
        moepatch.apply(model, expert_parallel=True)
    assert _untouched(model)
