"""convert(): transformers MoE models in ScMoE form keep shapes and active parameters and still generate."""

import pytest
import torch

import moepatch
from moepatch.errors import ModelStateError, UnsupportedModelError
from moepatch.scmoe import ShortcutMoeBlock, active_parameters, convert, perplexity
from moepatch.tiny import tiny_model

FAMILIES = ["mixtral", "olmoe", "qwen2_moe", "qwen3_moe"]


def _ids(batch=2, seq=9, seed=0):
    return torch.randint(3, 128, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _eval_ids():
    return torch.randint(3, 128, (96,), generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("family", FAMILIES)
def test_convert_keeps_shapes_and_active_parameters(family, capsys):
    model = tiny_model(family)
    before = active_parameters(model)
    with torch.no_grad():
        logits_before = model(_ids()).logits
    report = convert(model, eval_text=_eval_ids(), eval_seq_len=32)
    printed = capsys.readouterr().out
    assert "perplexity" in printed and "changes the function" in printed
    assert report.ppl_before > 0 and report.ppl_after > 0
    assert report.hidden_shapes_kept
    after = active_parameters(model)
    assert (report.active_params_before, report.active_params_after) == (before["active"], after["active"])
    D = model.config.hidden_size
    n = len(report.layers)
    assert n == model.config.num_hidden_layers
    if family == "qwen2_moe":  # its own shared expert and sigmoid gate (= CG-1): nothing added
        assert report.top_k_after == report.top_k_before == 2
        assert after == before
    else:
        assert (report.top_k_before, report.top_k_after) == (2, 1)
        assert after["active"] - before["active"] == report.added_gate_params == n * D  # the CG-1 gates only
        expert = 3 * D * model.config.intermediate_size if family != "qwen3_moe" else 3 * D * 48
        assert after["total"] - before["total"] == n * (expert + D)
    with torch.no_grad():
        logits_after = model(_ids()).logits
    assert logits_after.shape == logits_before.shape
    assert not torch.equal(logits_after, logits_before)  # conversion changes the function


@pytest.mark.parametrize("family", ["mixtral", "olmoe"])
@torch.no_grad()
def test_converted_model_generates_with_the_kv_cache(family):
    model = tiny_model(family)
    convert(model, position=2, combine="cg1", verbose=False)
    prompt = _ids(2, 5, seed=1)
    cached = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    full = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0, use_cache=False)
    assert cached.shape == (2, 11)
    assert torch.equal(cached, full)


@pytest.mark.parametrize("position", [1, 2, 3])
def test_routers_read_the_shortcut_source(position):
    model = tiny_model("mixtral")
    convert(model, position=position, verbose=False)
    layers = model.model.layers
    src = {1: layers[1].input_layernorm, 2: layers[0].post_attention_layernorm, 3: layers[0].input_layernorm}[position]
    seen = {}
    hooks = [src.register_forward_hook(lambda m, a, o: seen.setdefault("source", o)),
             layers[1].mlp.gate.register_forward_pre_hook(lambda m, a: seen.setdefault("router", a[0])),
             layers[0].input_layernorm.register_forward_hook(lambda m, a, o: seen.setdefault("l0_input", o)),
             layers[0].mlp.gate.register_forward_pre_hook(lambda m, a: seen.setdefault("l0_router", a[0]))]
    with torch.no_grad():
        model(_ids())
    for h in hooks:
        h.remove()
    D = model.config.hidden_size
    assert torch.equal(seen["router"], seen["source"].reshape(-1, D))
    # Layer 0 has no previous layer: it reads its own normalised input (Pos-1).
    assert torch.equal(seen["l0_router"], seen["l0_input"].reshape(-1, D))


@pytest.mark.parametrize("combine", ["add", "cg2"])
def test_other_combines_and_shared_init(combine):
    model = tiny_model("olmoe")
    experts = model.model.layers[0].mlp.experts
    gate_up, down = experts.gate_up_proj.detach().clone(), experts.down_proj.detach().clone()
    report = convert(model, combine=combine, shared_init=3, verbose=False)
    se = model.model.layers[0].mlp.shared_expert
    inter = gate_up.shape[1] // 2
    assert torch.equal(se.gate_proj.weight, gate_up[3, :inter]) and torch.equal(se.up_proj.weight, gate_up[3, inter:])
    assert torch.equal(se.down_proj.weight, down[3])
    assert report.added_gate_params == (0 if combine == "add" else 2 * len(report.layers) * model.config.hidden_size)
    assert report.active_params_after - report.active_params_before == report.added_gate_params


@torch.no_grad()
@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_capacity_on_converted_models(family):
    model = tiny_model(family)
    convert(model, verbose=False)
    ids = _ids(3, 12)
    base = model(ids).logits
    with moepatch.apply(model, None):
        assert torch.equal(model(ids).logits, base)
    mask = torch.ones_like(ids)
    mask[0, -4:] = 0
    with moepatch.apply(model, 0.5) as h:
        capped = model(ids).logits
        stats = h.stats()
        assert stats.totals()["dropped_fraction"] > 0
        assert all(max(r.load_after) <= max(r.capacity) for r in stats.records)
        h.reset_stats()
        model(ids, attention_mask=mask)  # padding takes no slot
        assert all(r.tokens == 3 * 12 - 4 for r in h.stats().records)
        out = model.generate(ids[:, :5], max_new_tokens=3, do_sample=False, pad_token_id=0)
        assert out.shape == (3, 8)
    assert torch.isfinite(capped).all() and not torch.equal(capped, base)


def test_continued_training_reduces_the_loss():
    model = tiny_model("mixtral").train()
    convert(model, verbose=False)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batch = _ids(4, 16, seed=2)
    losses, router_grads = [], []
    for _ in range(10):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        # Top-1 of Mixtral's renormalised top-2 keeps the native weight p1/(p1+p2): the router learns.
        router_grads.append(float(model.model.layers[1].mlp.gate.weight.grad.abs().sum()))
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses
    assert min(router_grads) > 0
    assert isinstance(model.model.layers[1].mlp, ShortcutMoeBlock)


def test_refusals():
    with pytest.raises(UnsupportedModelError, match="supported"):
        convert(tiny_model("deepseek_v3"))
    model = tiny_model("mixtral")
    with pytest.raises(ValueError, match="position"):
        convert(model, position=4)
    with pytest.raises(ValueError, match="top_k"):
        convert(model, top_k=3)
    convert(model, verbose=False)
    with pytest.raises(UnsupportedModelError, match="already"):
        convert(model)
    other = tiny_model("olmoe")
    enable = getattr(other, "activation_checkpointing_enable", None) or other.gradient_checkpointing_enable
    enable()
    with pytest.raises(ModelStateError, match="checkpointing"):
        convert(other)


def test_perplexity_of_text_needs_a_tokenizer():
    model = tiny_model("olmoe")
    with pytest.raises(ValueError, match="tokenizer"):
        perplexity(model, None, "some text")
    assert perplexity(model, None, _eval_ids(), seq_len=32) > 1.0
