"""The benchmark scripts' CPU smoke runs (tiny shapes, interpreter) finish and pass their own checks."""

import json

import pytest
import torch
from repo_files import load_module  # tests/repo_files.py


def _load(name):
    return load_module(f"scripts/{name}.py")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU smoke path; GPUs run the real benchmark")
def test_bench_kernels_smoke(tmp_path):
    bench = _load("bench_kernels")
    assert bench.main(["--smoke", "--shapes", "olmoe", "--ms", "5", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "results.json").is_file() and (tmp_path / "results.md").is_file()


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU smoke path; GPUs run the real benchmark")
def test_bench_e2e_smoke(tmp_path):
    bench = _load("bench_e2e")
    assert bench.main(["--smoke", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "e2e.json").read_text())["rows"]
    for row in rows:  # each prefill split into the MoE blocks of both layers and the rest
        split = row["prefill_1x8_split"]
        assert split["blocks"] == 2 and 0 < split["moe_ms"] < split["forward_ms"]
        assert split["rest_ms"] == pytest.approx(split["forward_ms"] - split["moe_ms"])
    assert "at most" in (tmp_path / "e2e.md").read_text()
    # decode, timed in alternating rounds, for transformers and the fused path (capacity leaves decode alone)
    assert [r["variant"] for r in rows if r.get("decode_b1_tok_s", 0) > 0] == ["hf", "triton"]


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU smoke path; GPUs run the real profile")
@pytest.mark.parametrize("mode", [["--prefill", "1x8"], ["--profile-decode", "1"]])
def test_profile_host_smoke(tmp_path, mode):
    import pstats

    bench = _load("bench_e2e")
    assert bench.main(["--smoke", "--profile-host", "--reps", "1", "--profile-calls", "2", *mode,
                       "--out", str(tmp_path)]) == 0
    assert len((tmp_path / "summary.txt").read_text().splitlines()) == 2
    # The triton run's profile holds moepatch's experts call (twice per forward: two layers); transformers' does not.
    calls = {name: {f[2]: s[1] for f, s in pstats.Stats(str(tmp_path / f"cprofile_{name}.prof")).stats.items()}
             for name in ("hf", "triton")}
    assert calls["triton"].get("fused_experts_impl") == 4
    assert "fused_experts_impl" not in calls["hf"]
