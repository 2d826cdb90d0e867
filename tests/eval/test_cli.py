"""The command line: the sweep writes its table and files; bad input gets a clear error."""

import json

import pytest

from moepatch.cli import demo_tables, main


def test_eval_sweep_writes_table_json_csv_png(tmp_path, capsys):
    out = tmp_path / "sweep"
    rc = main(["eval", "--limit", "6", "--capacity-factor", "1.0", "--strategy", "drop,expert_drop",
               "--policy", "score,random", "--batch-size", "4", "--output", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "baseline" in text and "γ=1 drop/score" in text and "expert_drop" in text and "dropped" in text
    assert max(len(line) for line in text.splitlines()) <= 120
    data = json.loads((out / "results.json").read_text())
    names = [r["name"] for r in data["results"]]
    assert names == ["baseline", "γ=1 drop/score", "γ=1 drop/random", "expert_drop"]
    base, score = data["results"][0], data["results"][1]
    assert base["totals"]["dropped_fraction"] == 0 and score["totals"]["dropped_fraction"] > 0
    assert set(base["scores"]) == {"stdlib_cloze", "stdlib_ppl"}
    assert (out / "results.csv").read_text().count("\n") == 1 + 4 * 2
    for png in ("score_vs_gamma.png", "expert_load.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("argv,needle", [
    (["eval", "--tasks", "hellaswagg"], "unknown lm-eval task(s): 'hellaswagg' (did you mean hellaswag"),
    (["eval", "--capacity-factor", "0"], "capacity_factor=0.0 is not valid"),
    (["eval", "--strategy", "dropout"], "strategy='dropout' is not supported"),
    (["eval", "--model", "/nonexistent/model"], "model path '/nonexistent/model' does not exist"),
    (["eval", "--model", "olmoe", "--limit", "1"],
     "could not load 'allenai/OLMoE-1B-7B-0924-Instruct' (alias 'olmoe')"),
])
def test_eval_errors(argv, needle, capsys):
    assert main(argv) == 2
    assert needle in capsys.readouterr().err


def test_demo_table_of_tiny_models():
    text = demo_tables(["qwen3_moe"], gammas=(1.0,), batch=2, seq=16)
    assert "qwen3_moe" in text and "γ=1.0" in text
    assert len(text.splitlines()) == 3 + 2  # title, header, rule, one row per layer


def test_lm_eval_plugin_registers_the_model_lazily(tmp_path):
    """What the .pth line does at start-up: `lm_eval --model moepatch` then resolves to MoePatchLM."""
    import subprocess
    import sys

    from moepatch.cli import PTH_LINE, main

    assert main(["install-lm-eval-plugin", "--site-dir", str(tmp_path)]) == 0
    line = (tmp_path / "moepatch_lm_eval.pth").read_text()
    assert line == PTH_LINE
    code = (f"{line.strip()}\nimport sys\nassert 'moepatch.eval' not in sys.modules\n"
            "from lm_eval.api.registry import get_model\n"
            "print(get_model('moepatch').__name__, get_model('hf').__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["MoePatchLM", "HFLM"]
