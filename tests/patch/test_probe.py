"""A model whose modules changed upstream fails at apply with UnsupportedModelError, untouched.

Two kinds of change: an attribute the patch reads is renamed (structure), and the router computes
something else under the same names (behaviour: the probe at apply runs the router on a few rows).
"""

import types

import pytest
import torch
from families import HAND

import moepatch
from moepatch.patch.registry import family_for, moe_blocks
from moepatch.tiny import tiny_model
from moepatch.versions import TESTED_TRANSFORMERS, installed_transformers


def _router(model):
    spec = family_for(model)
    return spec.router(moe_blocks(model, spec)[0][1])


def _expect_unsupported(model, match, runs=True):
    """apply raises a one-line UnsupportedModelError naming the versions; the model is as before
    (its forward, where the change leaves it runnable, gives the same logits)."""
    x = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = model(x).logits if runs else None
        with pytest.raises(moepatch.UnsupportedModelError, match=match) as info:
            moepatch.apply(model, capacity_factor=1.0)
        message = str(info.value)
        assert "\n" not in message
        assert model.config.model_type in message
        assert f"transformers {installed_transformers()} is installed" in message
        assert f"newest tested: {TESTED_TRANSFORMERS[-1]}" in message
        hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
        assert not moepatch.is_patched(model) and hooks == 0
        if runs:
            assert torch.equal(model(x).logits, base)


def _rename(module, old, new):
    """``old`` becomes ``new`` as an upstream rename would make it: the module's own forward still
    works (it finds the value under the old name only while it runs), moepatch's reading does not."""
    setattr(module, new, getattr(module, old))
    delattr(module, old)
    native = module.forward

    def forward(self, *args, **kwargs):
        setattr(self, old, getattr(self, new))
        try:
            return native(*args, **kwargs)
        finally:
            delattr(self, old)

    module.forward = types.MethodType(forward, module)


@pytest.mark.parametrize("family", HAND)
def test_a_renamed_expert_count(family):
    """The number of experts is read from the experts module (LongCat-Flash: its router); renamed, the
    experts module is no longer recognised as one of transformers' experts interface."""
    model = tiny_model(family)
    spec = family_for(model)
    owner, attr = spec.count_attr.rsplit(".", 1)
    for _, block in moe_blocks(model, spec):
        _rename(getattr(block, owner), attr, "n_experts")
    _expect_unsupported(model, r"has no `router\.num_experts`|no MoE experts module behind transformers' experts")


def test_a_renamed_experts_attribute():
    model = tiny_model("longcat_flash")
    for _, block in moe_blocks(model, family_for(model)):
        _rename(block.experts, "act_fn", "activation")
    _expect_unsupported(model, r"LongcatFlashMoE\) has no `experts\.act_fn`")


def test_a_renamed_scoring_attribute():
    model = tiny_model("deepseek_v3")
    _rename(_router(model), "routed_scaling_factor", "scaling")  # read as 1: the weights are 2.5 times that
    _expect_unsupported(model, r"weights differ .*scale=1\)")


def _rewrap(router, change):
    native = router.forward

    def forward(self, hidden_states):
        return change(*native(hidden_states))

    router.forward = types.MethodType(forward, router)


@pytest.mark.parametrize("family,change", [
    # Weights no longer renormalised over the picks (the router's norm_topk_prob says they are).
    ("qwen3_moe", lambda logits, w, ids: (logits, w * w.new_tensor(1.0).add(w.sum(-1, keepdim=True)), ids)),
    # A routed scaling factor the config does not say.
    ("deepseek_v3", lambda logits, w, ids: (logits, w * 2.0, ids)),
    # Weights that are no scoring of the logits times a factor per token.
    ("olmoe", lambda logits, w, ids: (logits, w + 0.05, ids)),
    # Logits no longer the ones the weights come from.
    ("qwen3_moe", lambda logits, w, ids: (logits * 3.0, w, ids)),
])
def test_a_router_that_computes_something_else(family, change):
    model = tiny_model(family)
    _rewrap(_router(model), change)
    _expect_unsupported(model, "router's weights differ from moepatch's reading")


def test_longcat_router_without_its_scaling():
    model = tiny_model("longcat_flash")
    router = _router(model)
    scale = float(router.routed_scaling_factor)
    _rewrap(router, lambda *out: (*out[:-2], out[-2] / scale, out[-1]))
    _expect_unsupported(model, r"weights differ .*scale=2")


@pytest.mark.parametrize("change,match", [
    (lambda logits, w, ids: (logits, w, ids.float()), r"ids of shape \(16, 2\) and dtype torch.float32"),
    (lambda logits, w, ids: (logits, w, ids[:, :1]), r"no weights of its ids' shape \(16, 1\)"),
    (lambda logits, w, ids: logits, "returns Tensor of 1 value"),
    (lambda logits, w, ids: (logits, w, torch.zeros_like(ids)), "the same expert twice"),
    (lambda logits, w, ids: (logits[:, :-1], w, ids.clamp(max=logits.shape[1] - 2)), r"logits of shape \(16, 7\)"),
])
def test_router_outputs_of_another_shape(change, match):
    model = tiny_model("mixtral")
    _rewrap(_router(model), change)
    _expect_unsupported(model, match, runs=False)  # the block itself cannot read such an output


def test_the_probe_leaves_the_global_rng_alone():
    model = tiny_model("mixtral")
    state = torch.random.get_rng_state()
    with moepatch.patched(model, capacity_factor=1.0):
        pass
    assert torch.equal(torch.random.get_rng_state(), state)


@pytest.mark.parametrize("family,kind,normalize,scale", [
    ("mixtral", "softmax", True, 1.0), ("olmoe", "softmax", False, 1.0), ("qwen3_moe", "softmax", True, 1.0),
    ("deepseek_v2", "softmax", False, 1.5), ("deepseek_v3", "sigmoid", True, 2.5)])
def test_the_reading_is_derived_from_the_router(family, kind, normalize, scale):
    from moepatch.patch.probe import read_router

    model = tiny_model(family)
    spec = family_for(model)
    got, _ = read_router(spec, model, moe_blocks(model, spec)[0][1])
    assert (got.kind, got.normalize, got.scale) == (kind, normalize, scale)


def test_a_router_that_moved_to_sigmoid_is_read_as_sigmoid():
    """A changed computation that is still a reading (sigmoid scores, as is) is derived, not refused."""
    from moepatch.patch.probe import read_router

    model = tiny_model("olmoe")
    _rewrap(_router(model), lambda logits, w, ids: (logits, torch.sigmoid(logits).gather(1, ids).to(w.dtype), ids))
    spec = family_for(model)
    got, _ = read_router(spec, model, moe_blocks(model, spec)[0][1])
    assert (got.kind, got.normalize, got.scale) == ("sigmoid", False, 1.0)


def test_a_router_that_reorders_its_outputs_is_read_by_type():
    """(ids, weights, logits), the order of transformers 5.17's GraniteMoE router, is read by type."""
    from moepatch.patch.probe import read_router

    model = tiny_model("mixtral")
    _rewrap(_router(model), lambda logits, w, ids: (ids, w, logits))
    spec = family_for(model)
    scoring, layout = read_router(spec, model, moe_blocks(model, spec)[0][1])
    assert layout == (2, 1, 0) and (scoring.kind, scoring.normalize) == ("softmax", True)
