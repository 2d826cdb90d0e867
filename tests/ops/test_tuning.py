"""Tile configuration tables: shipped H200 defaults, lookup, and the autotuner (interpreter run)."""

import json

import pytest
import torch

from moepatch.ops import tune as tuner
from moepatch.ops import tuning

SHIPPED = tuning.SHIPPED_DIR / "NVIDIA_H200.json"
SMEM_H200 = 227 * 1024


def _smem(cfg, gemm):
    """Shared memory of a pipelined GEMM tile in bf16: stages * (A tile + B tile(s))."""
    c = cfg[gemm]
    b_tiles = 2 if gemm == "gate_up" else 1
    return c["num_stages"] * 2 * c["BLOCK_K"] * (cfg["BLOCK_M"] + b_tiles * c["BLOCK_N"])


def test_shipped_table_is_well_formed():
    table = json.loads(SHIPPED.read_text())
    for key in ("E=8,H=4096,I=14336,K=2", "E=64,H=2048,I=1024,K=8", "E=64,H=2048,I=1408,K=6",
                "E=128,H=2048,I=768,K=8"):
        assert key in table
        for m, cfg in table[key].items():
            assert int(m) in tuning.M_BUCKETS
            assert cfg["BLOCK_M"] in (16, 32, 64, 128)
            for gemm in ("gate_up", "down"):
                c = cfg[gemm]
                for k in ("BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages"):
                    assert c[k] > 0 and (k == "num_stages" or c[k] & (c[k] - 1) == 0), (key, m, gemm, k)
                assert _smem(cfg, gemm) <= SMEM_H200, (key, m, gemm)
            assert cfg["down"]["SPLIT_K"] >= 1


def test_lookup_nearest_bucket_and_default(tmp_path):
    tuning.set_tables(tmp_path)
    table = json.loads(SHIPPED.read_text())["E=8,H=4096,I=14336,K=2"]
    assert tuning.get_config(1, 8, 4096, 14336, 2, "NVIDIA_H200") == table["1"]
    assert tuning.get_config(5000, 8, 4096, 14336, 2, "NVIDIA_H200") == table["4096"]
    assert tuning.get_config(100, 3, 40, 24, 3, "NVIDIA_H200") == tuning.default_config(100, 3, 40, 24, 3)
    assert tuning.get_config(7, 8, 4096, 14336, 2, "some_other_gpu") == tuning.default_config(7, 8, 4096, 14336, 2)
    # A user table wins over the shipped one.
    custom = {"E=8,H=4096,I=14336,K=2": {"64": tuning.default_config(4096, 8, 4096, 14336, 2)}}
    (tmp_path / "NVIDIA_H200.json").write_text(json.dumps(custom))
    tuning.get_config.cache_clear()
    assert tuning.get_config(1, 8, 4096, 14336, 2, "NVIDIA_H200")["BLOCK_M"] == 128
    tuning.set_tables(None)


@pytest.mark.parametrize("M", [1, 64, 1024, 16384])
def test_default_configs_fit_and_scale(M):
    for E, H, I, K in ((8, 4096, 14336, 2), (64, 2048, 1024, 8), (128, 2048, 768, 8)):  # noqa: E741
        cfg = tuning.default_config(M, E, H, I, K)
        assert _smem(cfg, "gate_up") <= SMEM_H200 and _smem(cfg, "down") <= SMEM_H200
        if M * K / E <= 32:
            assert cfg["BLOCK_M"] == 16  # weight streaming: thinnest tensor-core tile


def test_defaults_use_descriptor_gemms_only_with_tma_and_many_rows(monkeypatch):
    """Shapes without a table: Hopper (capability >= 9) gets the descriptor layer from 24 rows per expert
    (64-row tiles up to 192, 128 above) unless its peak memory would pass grouped_mm's; older GPUs, fewer
    rows and that memory case keep the pointer GEMMs."""
    monkeypatch.setitem(tuning._CAPABILITY, "hopper_gpu", (9, 0))
    monkeypatch.setitem(tuning._CAPABILITY, "ampere_gpu", (8, 0))
    tuning.get_config.cache_clear()
    E, H, I, K = 60, 2048, 1408, 4  # noqa: E741  (Qwen1.5-MoE: a shape no table has)
    for rows, bm in ((400, 128), (100, 64)):
        cfg = tuning.get_config(E * rows // K, E, H, I, K, "hopper_gpu")
        assert cfg["DESC"] and cfg["BLOCK_M"] == bm and cfg["gate_up"]["PERSISTENT"] and cfg["gate_up"]["JOINT"]
        staging = cfg["BLOCK_M"] * cfg["gate_up"]["BLOCK_N"] // cfg["gate_up"]["H_STORE_SPLIT"] * 2
        assert _smem(cfg, "gate_up") + staging <= SMEM_H200 and _smem(cfg, "down") <= SMEM_H200
        # the memory rule: gathered rows and h, padding included, under grouped_mm's P x (2H + 3I)
        P = E * rows
        assert -(-(P + E * (bm - 1)) // bm) * bm * (H + I) <= P * (2 * H + 3 * I)
    for dev_key, rows in (("ampere_gpu", 400), ("hopper_gpu", 10), ("unknown_gpu", 400)):
        assert not tuning.get_config(E * rows // K, E, H, I, K, dev_key).get("DESC"), (dev_key, rows)
    # OLMoE's shape at M = 256 (32 rows per expert): 64-row tiles would hold 6080 padded rows of H + I,
    # more than grouped_mm's peak, so the default stays on the pointer GEMMs.
    assert not tuning.default_config(256, 64, 2048, 1024, 8, "cuda", descriptors=True).get("DESC")
    assert tuning.default_config(512, 64, 2048, 1024, 8, "cuda", descriptors=True)["BLOCK_M"] == 64
    tuning.get_config.cache_clear()


def test_descriptor_default_computes_the_layer():
    """The descriptor default runs (interpreter, fp32) and matches the pointer default."""
    if torch.cuda.is_available():
        pytest.skip("the CPU variant; the GPU tests run the descriptor path at real sizes")
    from moepatch.ops import experts as X

    E, H, I, K = 2, 32, 48, 1  # noqa: E741
    for M, bm in ((500, 128), (200, 64)):  # 250 and 100 rows per expert
        cfg = tuning.default_config(M, E, H, I, K, "cuda", descriptors=True)
        assert cfg["DESC"] and cfg["BLOCK_M"] == bm
        gen = torch.Generator().manual_seed(M)
        x, w1, w2 = (torch.randn(*s, generator=gen) for s in ((M, H), (E, 2 * I, H), (E, H, I)))
        ids, wts = torch.randint(0, E, (M, K), generator=gen), torch.rand(M, K, generator=gen)
        want = X.fused_experts_impl(x, ids, wts, w1, w2, tuning.default_config(M, E, H, I, K, "cpu"))
        assert torch.allclose(X.fused_experts_impl(x, ids, wts, w1, w2, cfg), want, rtol=1e-4, atol=1e-4)


def test_tune_writes_a_table_used_by_lookup(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("the CPU variant of this test; the GPU run tunes for real")
    tuning.set_tables(tmp_path)
    path = tuner.tune([(4, 32, 32, 2)], [3], dtype=torch.float32, out=tmp_path / "cpu.json", reps=1,
                       max_candidates=1, device="cpu")
    table = json.loads(path.read_text())
    cfg = table["E=4,H=32,I=32,K=2"]["3"]
    assert set(cfg) == {"BLOCK_M", "gate_up", "down"}
    assert tuning.get_config(3, 4, 32, 32, 2, "cpu") == cfg
    tuning.set_tables(None)


def test_tune_times_the_descriptor_path_at_large_m(tmp_path):
    """Many rows per expert: the descriptor GEMMs are candidates, and whatever wins computes the layer."""
    if torch.cuda.is_available():
        pytest.skip("the CPU variant of this test; the GPU run tunes for real")
    lines = []
    path = tuner.tune([(1, 16, 16, 1)], [100], dtype=torch.float32, out=tmp_path / "cpu.json", reps=1,
                       max_candidates=1, device="cpu", log=lines.append)
    assert any("BLOCK_M=128 desc" in line for line in lines), lines
    cfg = json.loads(path.read_text())["E=1,H=16,I=16,K=1"]["100"]
    from moepatch.ops import experts as X

    gen = torch.Generator().manual_seed(0)
    x, w1, w2 = (torch.randn(*s, generator=gen) for s in ((100, 16), (1, 32, 16), (1, 16, 16)))
    ids, wts = torch.zeros(100, 1, dtype=torch.long), torch.rand(100, 1, generator=gen)
    want = X.fused_experts_impl(x, ids, wts, w1, w2, tuning.default_config(100, 1, 16, 16, 1, "cpu"))
    assert torch.allclose(X.fused_experts_impl(x, ids, wts, w1, w2, cfg), want, rtol=1e-4, atol=1e-4)


def test_tune_at_one_token_tries_the_token_kernel(tmp_path):
    """M = 1: the one-kernel down + combine configurations are candidates, timed with their combine."""
    if torch.cuda.is_available():
        pytest.skip("the CPU variant of this test; the GPU run tunes for real")
    (bm, _, downs), = tuner.candidate_configs(1, 8, 4096, 14336, 2)
    assert bm == 16 and downs[0].get("TOKEN") and any(not c.get("TOKEN") for c in downs)
    assert not any(c.get("TOKEN") for p in tuner.candidate_configs(2, 8, 4096, 14336, 2) for c in p[2])
    path = tuner.tune([(4, 32, 48, 3)], [1], dtype=torch.float32, out=tmp_path / "cpu.json", reps=1,
                       max_candidates=1, device="cpu")
    cfg = json.loads(path.read_text())["E=4,H=32,I=48,K=3"]["1"]
    from moepatch.ops import experts as X

    gen = torch.Generator().manual_seed(1)
    x, w1, w2 = (torch.randn(*s, generator=gen) for s in ((1, 32), (4, 96, 32), (4, 32, 48)))
    ids, wts = torch.tensor([[2, 0, 3]]), torch.rand(1, 3, generator=gen)
    want = X.fused_experts_impl(x, ids, wts, w1, w2, tuning.default_config(1, 4, 32, 48, 3, "cpu"))
    assert torch.allclose(X.fused_experts_impl(x, ids, wts, w1, w2, cfg), want, rtol=1e-4, atol=1e-5)
