"""The training recipe and the benchmark run their CPU smoke modes end to end."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from repo_files import load_module  # tests/repo_files.py

from moepatch.errors import UsageError

REPO = Path(__file__).resolve().parents[2]


def _load(path: Path, name: str):
    return load_module(str(path.relative_to(REPO)), name)


def test_recipe_smoke_trains_both_models_on_equal_tokens(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    # A learnable stream: a short repeated pattern with noise, vocabulary 128.
    pattern = rng.integers(0, 128, 50)
    train = np.tile(pattern, 120) ^ (rng.random(6000) < 0.05)
    np.save(data / "train.npy", train.astype(np.uint16))
    np.save(data / "validation.npy", np.tile(pattern, 20).astype(np.uint16))
    (data / "meta.json").write_text(json.dumps({"vocab_size": 128, "eot_id": 0}))
    recipe = _load(REPO / "recipes" / "scmoe" / "train.py", "scmoe_recipe")
    out = tmp_path / "out"
    assert recipe.main(["--smoke", "--data-dir", str(data), "--out", str(out), "--max-steps", "8"]) == 0
    report = json.loads((out / "scmoe_train.json").read_text())
    top2, scmoe = report["models"]["top2"], report["models"]["scmoe"]
    assert top2["steps"] == scmoe["steps"] == report["data"]["steps"] == 8
    # Equal active parameters up to the CG-1 gate vectors (hidden 32, 2 MoE blocks).
    assert scmoe["params"]["active"] - top2["params"]["active"] == 2 * 32
    assert scmoe["config"]["position"] == 2 and scmoe["config"]["combine"] == "cg1"
    for r in (top2, scmoe):
        curve = [p["val_loss"] for p in r["validation"]]
        assert curve[-1] < curve[0]
    assert (out / "scmoe_val_loss.png").stat().st_size > 1000


@pytest.mark.distributed
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU smoke path; GPUs run the real benchmark")
def test_bench_smoke(tmp_path):
    bench = _load(REPO / "scripts" / "bench_scmoe.py", "bench_scmoe")
    assert bench.main(["--smoke", "--out", str(tmp_path), "--limit-s", "120"]) == 0
    report = json.loads((tmp_path / "bench_scmoe.json").read_text())
    assert {(r["variant"]) for r in report["rows"]} == {"top2", "scmoe"}
    assert report["environment"]["world"] == 2
    assert all(r["overlap_minus_sequential_max_abs"] == 0.0 and r["check_relative_error"] < 1e-4
               for r in report["rows"])
    assert (tmp_path / "bench_scmoe.md").read_text().startswith("# ScMoE")
    # Every routed slot of both ranks' tokens (2 x 2 x 16) is counted once: top-2 two, ScMoE one.
    rows = {r["variant"]: r["routed_rows_per_rank"] for r in report["rows"]}
    assert sum(rows["top2"]) == 2 * 64 and sum(rows["scmoe"]) == 64


@pytest.mark.distributed
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU smoke path; GPUs run the real benchmark")
def test_bench_smoke_capacity_and_launch_points(tmp_path):
    """--capacity applies to both variants (Token Reroute at 1.0 evens the ranks' loads out),
    --dispatch-after-ops adds a ScMoE row per extra value, --exchange a top-2 and a ScMoE row per extra
    exchange (the faster top-2 is the baseline); bad values are refused."""
    bench = _load(REPO / "scripts" / "bench_scmoe.py", "bench_scmoe")
    assert bench.main(["--smoke", "--out", str(tmp_path), "--limit-s", "120", "--capacity", "reroute@1.0",
                       "--dispatch-after-ops", "1,0", "--exchange", "counts,padded"]) == 0
    report = json.loads((tmp_path / "bench_scmoe.json").read_text())
    assert [(r["variant"], r["dispatch_after_ops"], r["exchange"]) for r in report["rows"]] == [
        ("top2", 1, "counts"), ("top2", 1, "padded"), ("scmoe", 1, "counts"), ("scmoe", 0, "counts"),
        ("scmoe", 1, "padded")]
    top2 = [r["unit_sequential_ms"] for r in report["rows"] if r["variant"] == "top2"]
    (summary,) = report["summary"]
    assert summary["top2_ms"] == min(top2) and summary["scmoe_exchange"] == "counts"
    assert all(r["capacity"] == "reroute@1.0" and r["load_max_over_mean"] <= 1.05 for r in report["rows"])
    assert all(r["overlap_minus_sequential_max_abs"] == 0.0 for r in report["rows"])
    for bad in (["--capacity", "reroute"], ["--capacity", "sort@1.0"], ["--dispatch-after-ops", "-1"],
                ["--router", "trained"], ["--exchange", "counts,fixed"]):
        with pytest.raises(UsageError, match=bad[0]):
            bench.parse_args(["--out", str(tmp_path), *bad])


@pytest.mark.distributed
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU smoke path; GPUs run the real benchmark")
def test_bench_smoke_unbiased_routers_even_the_loads(tmp_path):
    """--router unbiased takes the routed states' common direction out of the routers: both variants'
    loads over the ranks come closer to even than with the routers as initialised."""
    bench = _load(REPO / "scripts" / "bench_scmoe.py", "bench_scmoe")
    loads = {}
    for router in ("init", "unbiased"):
        out = tmp_path / router
        assert bench.main(["--smoke", "--out", str(out), "--limit-s", "120", "--router", router]) == 0
        report = json.loads((out / "bench_scmoe.json").read_text())
        assert all(r["router"] == router and r["check_relative_error"] < 1e-4 for r in report["rows"])
        loads[router] = {r["variant"]: r["load_max_over_mean"] for r in report["rows"]}
    for variant in ("top2", "scmoe"):
        assert loads["unbiased"][variant] < loads["init"][variant], loads
