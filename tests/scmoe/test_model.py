"""The native ScMoE model: every variant's shapes, active parameters, shortcut sources, KV cache, training."""

import pytest
import torch

from moepatch.scmoe import ScMoEConfig, active_parameters, build_scmoe
from moepatch.scmoe.model import FusedExperts

DIMS = dict(vocab_size=64, hidden_size=32, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=40,
            expert_intermediate_size=24, num_experts=4)
# (arch, position, combine, moe_every_layer): every architecture, source and combine at least once.
VARIANTS = [
    ("top2", 2, "cg1", False), ("top2", 2, "cg1", True),
    ("shared", 2, "add", False), ("shared", 2, "cg1", True),
    ("scmoe", 1, "add", False), ("scmoe", 2, "add", False), ("scmoe", 3, "add", False),
    ("scmoe", 1, "cg1", False), ("scmoe", 2, "cg1", False), ("scmoe", 3, "cg1", False),
    ("scmoe", 2, "cg2", False), ("scmoe", 1, "cg2", True),
    ("scmoe2", 2, "cg1", False), ("scmoe2", 1, "add", True),
]


def _ids(batch=2, seq=7, seed=0):
    return torch.randint(0, 64, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _model(arch, position, combine, every, **kw):
    torch.manual_seed(0)
    return build_scmoe(arch=arch, position=position, combine=combine, moe_every_layer=every, **dict(DIMS, **kw))


def _router_and_source(model, router, source):
    """(router input, source module output) of one forward, captured with hooks."""
    seen = {}
    h1 = source.register_forward_hook(lambda m, a, o: seen.setdefault("source", o))
    h2 = router.register_forward_pre_hook(lambda m, a: seen.setdefault("router", a[0]))
    with torch.no_grad():
        model(_ids())
    h1.remove()
    h2.remove()
    return seen["router"], seen["source"]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: f"{v[0]}-pos{v[1]}-{v[2]}{'-every' if v[3] else ''}")
def test_shapes_and_active_parameters(variant):
    arch, position, combine, every = variant
    model = _model(*variant)
    out = model(_ids(), labels=_ids())
    assert out.logits.shape == (2, 7, 64)
    assert torch.isfinite(out.loss) and out.aux_loss is not None
    D, width, E = DIMS["hidden_size"], DIMS["expert_intermediate_size"], DIMS["num_experts"]
    n_moe = DIMS["num_layers"] if every else DIMS["num_layers"] // 2
    assert len(model.moe_layers()) == n_moe
    expert = 3 * D * width  # one SwiGLU expert (= one shared expert)
    gate = {"add": 0, "cg1": D, "cg2": 2 * D}[combine]
    base = active_parameters(_model("top2", 2, "cg1", every))
    got = active_parameters(model)
    # The top-2 baseline and SE + top-1 activate the same parameters, up to the CG gate's weights;
    # ScMoE-2 activates one expert more.
    extra_active = {"top2": 0, "shared": gate, "scmoe": gate, "scmoe2": expert + gate}[arch]
    assert got["active"] - base["active"] == n_moe * extra_active
    assert got["total"] - base["total"] == n_moe * (0 if arch == "top2" else expert + gate)
    assert got["routed_experts"] == n_moe * E * expert


@pytest.mark.parametrize("position", [0, 1, 2, 3])
def test_routed_experts_read_the_shortcut_source(position):
    """The router's input is the norm output the spec names for each position."""
    arch = "shared" if position == 0 else "scmoe"
    model = _model(arch, max(position, 1), "cg1", False)
    dense, moe = model.blocks[0], model.blocks[1]
    source = {0: moe.post_norm, 1: moe.input_norm, 2: dense.post_norm, 3: dense.input_norm}[position]
    router_in, source_out = _router_and_source(model, moe.moe.router, source)
    assert torch.equal(router_in, source_out.reshape(-1, DIMS["hidden_size"]))


def test_every_layer_mode_reads_the_block_input():
    model = _model("scmoe", 1, "cg1", True)
    for b in model.blocks:
        assert b.kind == "scmoe"
    router_in, source_out = _router_and_source(model, model.blocks[2].moe.router, model.blocks[2].input_norm)
    assert torch.equal(router_in, source_out.reshape(-1, DIMS["hidden_size"]))


def test_invalid_configs_raise():
    with pytest.raises(ValueError, match="position=1"):
        ScMoEConfig(arch="scmoe", position=2, moe_every_layer=True)
    with pytest.raises(ValueError, match="even"):
        ScMoEConfig(num_layers=3)
    with pytest.raises(ValueError, match="accepted"):
        ScMoEConfig(arch="top3")


@torch.no_grad()
def test_kv_cache_generation_equals_full_recompute():
    model = _model("scmoe", 2, "cg2", False).eval()
    prompt = _ids(2, 5, seed=3)
    cached = model.generate(prompt, max_new_tokens=6)
    full = model.generate(prompt, max_new_tokens=6, use_cache=False)
    assert cached.shape == (2, 11) and torch.equal(cached, full)
    # One cached step equals the last position of a full forward.
    out = model(prompt, use_cache=True)
    step = model(cached[:, 5:6], past_key_values=out.past_key_values).logits[:, -1]
    assert torch.allclose(step, model(cached[:, :6]).logits[:, -1], atol=1e-5)


@torch.no_grad()
def test_padding_is_masked():
    """A right-padded row's real positions equal the unpadded row's; padding changes nothing else."""
    model = _model("scmoe", 2, "cg1", False).eval()
    ids = _ids(2, 8)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    padded = model(ids, attention_mask=mask).logits
    alone = model(ids[1:, :5]).logits
    assert torch.allclose(padded[1, :5], alone[0], atol=1e-5)
    assert torch.isfinite(padded).all()
    assert torch.equal(model(ids, attention_mask=torch.ones_like(ids)).logits, model(ids).logits)


def test_fused_experts_match_a_per_token_loop():
    torch.manual_seed(0)
    ex = FusedExperts(8, 6, 3)
    torch.nn.init.normal_(ex.gate_up_proj)
    torch.nn.init.normal_(ex.down_proj)
    x = torch.randn(5, 8)
    ids = torch.tensor([[0, 2], [1, 3], [3, 3], [2, 0], [1, 1]])  # 3 = sentinel (dropped)
    w = torch.rand(5, 2)
    got = ex(x, ids, w)
    ref = torch.zeros(5, 8)
    for t in range(5):
        for j in range(2):
            e = int(ids[t, j])
            if e < 3:
                g, u = (ex.gate_up_proj[e] @ x[t]).chunk(2)
                ref[t] += w[t, j] * (ex.down_proj[e] @ (torch.nn.functional.silu(g) * u))
    assert torch.allclose(got, ref, atol=1e-5)
    assert torch.equal(got[2], torch.zeros(8))  # every slot dropped: exactly zero


@pytest.mark.parametrize("arch", ["top2", "scmoe"])
def test_a_few_training_steps_reduce_the_loss(arch):
    model = _model(arch, 2, "cg1", False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batch = _ids(4, 16, seed=5)
    losses = []
    for _ in range(12):
        out = model(batch, labels=batch)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(out.lm_loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_router_and_gates_receive_gradients():
    model = _model("scmoe", 2, "cg2", False)
    out = model(_ids(), labels=_ids())
    out.loss.backward()
    moe_block = model.blocks[1]
    assert moe_block.moe.router.weight.grad.abs().sum() > 0  # top-1 weight = softmax prob, not 1
    assert moe_block.coef_gate.weight.grad.abs().sum() > 0
    assert moe_block.moe.experts.gate_up_proj.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_scale_as_rounds_once_like_the_two_step_product(dtype):
    """The combine's coefficient product: one kernel without autograd, the same values as (c * x).to(dtype)."""
    from moepatch.scmoe.model import scale_as

    g = torch.Generator().manual_seed(0)
    coef = torch.rand(3, 5, 1, generator=g)
    x = torch.randn(3, 5, 16, generator=g).to(dtype)
    want = (coef * x).to(dtype)
    with torch.no_grad():
        got = scale_as(coef, x)
    assert got.dtype == dtype and torch.equal(got, want)
    assert torch.equal(scale_as(coef, x.float(), dtype), (coef * x.float()).to(dtype))
    coef.requires_grad_(True)  # training: the autograd path, same values, gradients flow
    out = scale_as(coef, x)
    assert torch.equal(out.detach(), want)
    out.float().sum().backward()
    assert coef.grad is not None and torch.isfinite(coef.grad).all()
