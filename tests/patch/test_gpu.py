"""CUDA checks of the patch (run on the GPU machine with `pytest -m gpu`)."""

import pytest
import torch
from families import HAND

import moepatch
from moepatch.tiny import tiny_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("family", HAND)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@torch.no_grad()
def test_cuda_patch_matches_cpu_reference(family, dtype):
    model = tiny_model(family).to("cuda", dtype)
    x = torch.randint(3, 128, (4, 16), device="cuda")
    mask = torch.ones_like(x)
    mask[0, :6] = 0
    mask[1] = 0
    base = model(input_ids=x, attention_mask=mask).logits
    for kernel in ("torch", "auto"):  # auto keeps transformers' experts without capacity: bit-identical
        with moepatch.patched(model, capacity_factor=None, kernel=kernel):
            assert torch.equal(model(input_ids=x, attention_mask=mask).logits, base)
    for strategy in ("drop", "reroute", "expanded"):
        with moepatch.patched(model, capacity_factor=1.0, strategy=strategy, kernel="torch") as h:
            out = model(input_ids=x, attention_mask=mask).logits
            gpu_stats = h.stats().records
        assert torch.isfinite(out).all()
        cpu = tiny_model(family)
        with moepatch.patched(cpu, capacity_factor=1.0, strategy=strategy) as h:
            cpu(input_ids=x.cpu(), attention_mask=mask.cpu())
            cpu_stats = h.stats().records
        if dtype == torch.float32:  # same routing decisions as on the CPU
            assert [r.load_after for r in gpu_stats] == [r.load_after for r in cpu_stats]
        out = model.generate(x, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
        assert out.shape == (4, 19)


@torch.no_grad()
def test_device_map_split_model():
    """A model spread over cuda:0 and the CPU (accelerate's dispatch) patches and generates."""
    from accelerate import dispatch_model

    model = tiny_model("mixtral")
    x = torch.randint(3, 128, (2, 12))
    with moepatch.patched(model, capacity_factor=1.0) as h:
        ref = model(x).logits
        ref_stats = [r.load_after for r in h.stats().records]
    device_map = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": "cpu", "model.norm": "cpu",
                  "model.rotary_emb": 0, "lm_head": "cpu"}
    model = dispatch_model(model, device_map=device_map)
    with moepatch.patched(model, capacity_factor=1.0) as h:
        out = model(x.to("cuda")).logits
        assert [r.load_after for r in h.stats().records] == ref_stats
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["gpt_oss", "nemotron_h", "aria_text", "minimax_m3_vl_text"])
@torch.no_grad()
def test_cuda_triton_expert_forms_match_the_torch_path(family):
    """The expert forms beyond plain SwiGLU (bias, interleaved, transposed, clamped SwiGLU, ungated relu^2)
    compiled: kernel='triton' runs (no fallback) and agrees with the torch path in bf16."""
    from moepatch.patch import backend
    from moepatch.tiny import moe_model_types

    if family not in moe_model_types():
        pytest.skip(f"{family} is not in this transformers")
    model = tiny_model(family, dtype=torch.bfloat16).to("cuda")
    assert backend.uncovered_layout(model) is None
    x = torch.randint(3, 128, (4, 16), device="cuda")
    with moepatch.patched(model, capacity_factor=1.0, kernel="torch"):
        want = model(x).logits.float()
    with moepatch.patched(model, capacity_factor=1.0, kernel="triton") as handle:
        assert "triton experts backend" in repr(handle)
        got = model(x).logits.float()
    assert ((got - want).norm() / want.norm()).item() < 2e-2
