"""Sharded loading and random building: only this rank's experts, never re-sliced by apply."""

import pytest
import torch

from moepatch.errors import ModelStateError
from moepatch.parallel import build_random_expert_parallel, load_expert_parallel
from moepatch.parallel.dispatch import LocalDispatcher, weigh_and_sum
from moepatch.parallel.ep import local_range
from moepatch.routing.capacity import expert_devices
from moepatch.tiny import tiny_config, tiny_model


@pytest.mark.distributed
def test_loaded_shards_run_under_ep_and_refuse_to_run_without(clean_scenarios):
    for rank, res in enumerate(r["loaded"] for r in clean_scenarios):
        assert len(res) == 4  # mixtral and deepseek_v3, per-expert and fused checkpoints
        for key, r in res.items():
            assert r["max_abs"] <= 1e-5, (rank, key, r)
            assert r["local_shape"][0] == 4 and r["shape_under_ep"] == r["local_shape"]  # not re-sliced
            assert "loaded by moepatch.parallel" in r["unpatched"]


@pytest.mark.parametrize("E, world", [(8, 2), (8, 3), (6, 4), (2, 2), (5, 5)])
def test_local_range_is_expert_devices(E, world):
    dev_E = expert_devices(E, world)
    for rank in range(world):
        first, stop = local_range(E, world, rank)
        assert (dev_E == rank).nonzero().flatten().tolist() == list(range(first, stop))


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe"])
def test_random_shards_are_slices_of_the_single_rank_build(model_type):
    cfg = tiny_config(model_type)
    full = build_random_expert_parallel(cfg, 0, 1, dtype=torch.float32).state_dict()
    parts = [build_random_expert_parallel(cfg, r, 3, dtype=torch.float32).state_dict() for r in range(3)]
    for name, t in full.items():
        if name.endswith(("gate_up_proj", "down_proj")):
            assert torch.equal(torch.cat([p[name] for p in parts]), t), name
            assert [p[name].shape[0] for p in parts] == [3, 3, 2]
        else:
            assert all(torch.equal(p[name], t) for p in parts), name


def test_sharded_model_refuses_to_run_unpatched():
    model = build_random_expert_parallel(tiny_config("olmoe"), 1, 2, dtype=torch.float32)
    with pytest.raises(ModelStateError, match="experts 4..7 of 8"), torch.no_grad():
        model(torch.tensor([[3, 4, 5]]))


def test_loader_reports_missing_tensors(tmp_path):
    from safetensors.torch import save_file

    model = tiny_model("mixtral")
    model.config.save_pretrained(tmp_path)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if "layers.1.mlp.experts" not in k}
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(KeyError, match="layers.1.mlp.experts.gate_up_proj"):
        load_expert_parallel(tmp_path, 0, 2, dtype=torch.float32)


def test_loader_needs_safetensors(tmp_path):
    tiny_config("mixtral").save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_expert_parallel(tmp_path, 0, 2)


def test_local_dispatcher_round_trip():
    # EP = 1 without a process group: dispatch + identity expert + combine == weighted sum of inputs.
    g = torch.Generator().manual_seed(0)
    T, W, H, E = 9, 4, 6, 5
    x_TH = torch.randn(T, H, generator=g)
    ids_TW = torch.randint(0, E + 1, (T, W), generator=g)  # E is the sentinel
    w_TW = torch.where(ids_TW == E, 0.0, torch.rand(T, W, generator=g))
    d = LocalDispatcher(header_slots=E).dispatch(x_TH, ids_TW, num_experts=E, tag=0)
    assert d.x_RH.shape[0] == int((ids_TW < E).sum())  # sentinels are never sent
    assert d.counts_SM[0] == torch.bincount(ids_TW[ids_TW < E], minlength=E).tolist()
    out_TH = LocalDispatcher(header_slots=E).combine(d.x_RH, d, w_TW)
    torch.testing.assert_close(out_TH, x_TH * w_TW.sum(1, keepdim=True), rtol=1e-6, atol=1e-6)


# (bf16 only with a tolerance: the CPU interpreter's float32 -> bf16 cast does not round to nearest.)
@pytest.mark.parametrize("W,dtype", [(2, torch.float16), (2, torch.float32), (3, torch.float16), (2, torch.bfloat16)])
def test_kernel_combine_equals_torch_combine(W, dtype):
    """The Triton slot sum (CUDA default; here the interpreter) gives the torch path's values."""
    g = torch.Generator().manual_seed(W)
    T, H, E = 11, 24, 4
    x_TH = torch.randn(T, H, generator=g).to(dtype)
    ids_TW = torch.randint(0, E + 1, (T, W), generator=g)
    ids_TW[0] = E  # a token with every slot dropped sums to 0
    w_TW = torch.where(ids_TW == E, 0.0, torch.rand(T, W, generator=g))
    disp = LocalDispatcher(header_slots=E)
    d = disp.dispatch(x_TH, ids_TW, num_experts=E, tag=0)
    y_PH = disp.return_rows(d.x_RH * 3, d)
    want = weigh_and_sum(y_PH, d, w_TW, kernel=False)
    got = weigh_and_sum(y_PH, d, w_TW, kernel=True)
    assert got.dtype == want.dtype and got.shape == (T, H)
    assert (got[0] == 0).all()
    if W <= 2 and dtype != torch.bfloat16:
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)
