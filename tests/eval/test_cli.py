"""The command line: the sweep writes its table and files; bad input gets one clear line and exit 2,
before anything heavy loads; help shows every default."""

import json
import subprocess
import sys

import pytest

from moepatch.cli import demo_tables, main
from moepatch.eval.tasks import embedded_model_path

EMBEDDED = str(embedded_model_path())


def test_eval_sweep_writes_table_json_csv_png(tmp_path, capsys, caplog):
    out = tmp_path / "sweep"
    rc = main(["eval", "--limit", "6", "--capacity-factor", "1.0", "--strategy", "drop,expert_drop",
               "--policy", "score,random", "--batch-size", "4", "--output", str(out)])
    assert rc == 0
    captured = capsys.readouterr()
    text = captured.out
    # No warning that does not apply: moepatch passes lm-eval a built model on purpose.
    logged = captured.err + "\n".join(r.getMessage() for r in caplog.records)
    assert "model kwarg is not of type" not in logged and "Overwriting default num_fewshot" not in logged
    assert "it/s]" not in captured.err  # no library progress bars in a log
    assert "baseline" in text and "γ=1 drop/score" in text and "expert_drop" in text and "dropped" in text
    table = [line for line in text.splitlines() if not line.startswith(("model:", "wrote "))]
    assert [line for line in table if len(line) > 120] == []
    data = json.loads((out / "results.json").read_text())
    names = [r["name"] for r in data["results"]]
    assert names == ["baseline", "γ=1 drop/score", "γ=1 drop/random", "expert_drop"]
    base, score = data["results"][0], data["results"][1]
    assert base["totals"]["dropped_fraction"] == 0 and score["totals"]["dropped_fraction"] > 0
    assert set(base["scores"]) == {"stdlib_cloze", "stdlib_ppl"}
    assert (out / "results.csv").read_text().count("\n") == 1 + 4 * 2
    for png in ("score_vs_gamma.png", "expert_load.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def nothing_heavy(monkeypatch):
    """Loading a model or starting lm-eval's run fails the test: bad input must be caught first."""
    def boom(*args, **kwargs):
        raise AssertionError("loaded something heavy before the input was checked")

    monkeypatch.setattr("moepatch.eval.loading.load_model", boom)
    monkeypatch.setattr("moepatch.cli._run_lm_eval", boom)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    import transformers

    root = tmp_path_factory.mktemp("inputs")
    llama = root / "llama"
    transformers.LlamaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                             intermediate_size=32).save_pretrained(llama)
    (root / "empty.txt").write_text("")
    (root / "notes.txt").write_text("def f(x):\n    return x\n" * 400)
    (root / "a_file").write_text("x")
    return {"llama": str(llama), "empty": str(root / "empty.txt"), "text": str(root / "notes.txt"),
            "file": str(root / "a_file"), "dir": str(root)}


BAD = [
    # eval: options, the model (config only), tasks, datasets
    (["eval", "--capacity-factor", "0"], "capacity_factor=0.0 is not valid; accepted: a number > 0"),
    (["eval", "--capacity-factor", "x"], "capacity factor 'x' is not a number"),
    (["eval", "--strategy", "dropout"], "strategy='dropout' is not supported; accepted: 'drop'"),
    (["eval", "--policy", "best"], "policy='best' is not supported"),
    (["eval", "--limit", "0"], "argument --limit: '0' must be > 0"),
    (["eval", "--batch-size", "x"], "argument --batch-size: 'x' is not a whole number"),
    (["eval", "--dtype", "int8"], "argument --dtype: invalid choice: 'int8'"),
    (["eval", "--device", "cuda:7"], "--device 'cuda:7': this machine has"),
    (["eval", "--device", "tpu"], "--device 'tpu' is not valid; accepted: auto, cpu, cuda, cuda:N"),
    (["eval", "--output", "{file}"], "exists and is not a directory"),
    (["eval", "--model", "/nonexistent/model"], "model path '/nonexistent/model' does not exist"),
    (["eval", "--model", "{dir}"], "is a directory without config.json"),
    (["eval", "--model", "olmoe"], "'allenai/OLMoE-1B-7B-0924-Instruct' (alias 'olmoe') is not a local directory and "
                                   "not in the Hugging Face cache, and the hub is offline"),
    (["eval", "--model", "{llama}"], "is a 'llama' model, not a Mixture-of-Experts family moepatch patches"),
    (["eval", "--tasks", "hellaswagg"], "unknown lm-eval task(s): 'hellaswagg' (did you mean hellaswag"),
    (["eval", "--tasks", "stdlib_cloze,piqa"], "the data of 1 of 2 task(s) cannot be loaded (piqa (baber/piqa)); "
                                               "they are not in the local datasets cache and the hub is offline"),
    (["eval", "--tasks", "paper"], "the data of 9 of 9 task(s) cannot be loaded (openbookqa (allenai/openbookqa main), "
                                   "piqa (baber/piqa), rte (nyu-mll/glue rte)"),
    (["eval", "--nope"], "unrecognized arguments: --nope (see `moepatch eval --help`)"),
    # stats
    (["stats", "--text", "{text}", "--capacity-factor", "0"], "capacity_factor=0.0 is not valid"),
    (["stats", "--text", "{text}", "--strategy", "nope"], "argument --strategy: invalid choice: 'nope'"),
    (["stats", "--text", "{text}", "--model", "{llama}"], "is a 'llama' model, not a Mixture-of-Experts family"),
    (["stats", "--text", "{text}", "--model", "/nonexistent/model"], "model path '/nonexistent/model' does not exist"),
    (["stats", "--text", "/nonexistent/notes.txt"], "--text /nonexistent/notes.txt: no such file"),
    (["stats", "--text", "{dir}"], "not a file"),
    (["stats"], "the following arguments are required: --text"),
    # lm-eval: what lm-eval would find out only after loading the model
    (["lm-eval", "--model", "moepatch", "--model_args", "pretrained=/nonexistent/m", "--tasks", "stdlib_cloze"],
     "model path '/nonexistent/m' does not exist"),
    (["lm-eval", "--model", "moepatch", "--model_args", "pretrained={llama}", "--tasks", "stdlib_cloze"],
     "is a 'llama' model"),
    (["lm-eval", "--model", "moepatch", "--model_args", f"pretrained={EMBEDDED},capacity_factor=0",
      "--tasks", "stdlib_cloze"], "capacity_factor=0 is not valid"),  # lm-eval parses "0" as an int
    (["lm-eval", "--model", "moepatch", "--model_args", f"pretrained={EMBEDDED},strategy=nope",
      "--tasks", "stdlib_cloze"], "strategy='nope' is not supported"),
    (["lm-eval", "--model", "moepatch", "--model_args", f"pretrained={EMBEDDED}", "--tasks", "piqa"],
     "the data of 1 of 1 task(s) cannot be loaded (piqa (baber/piqa))"),
    (["lm-eval", "--model", "moepatch", "--model_args", f"pretrained={EMBEDDED}", "--tasks", "stdlib_clozee"],
     "unknown lm-eval task(s): 'stdlib_clozee' (did you mean stdlib_cloze"),
    # bench, demo
    (["bench", "nope"], "unknown benchmark 'nope'; accepted: kernels, e2e, ep, scmoe"),
    (["bench"], "unknown benchmark; accepted: kernels, e2e, ep, scmoe"),
    (["bench", "kernels", "--nope"], "unrecognized arguments: --nope (see `moepatch bench kernels --help`)"),
    (["bench", "ep", "--smoke"], "the following arguments are required: --out"),
    (["bench", "scmoe", "--shapes", "narrow"], "the following arguments are required: --out"),
    (["demo", "--families", "nope"], "--families: unknown model type(s) nope; accepted: afmoe"),
    (["demo", "--capacity-factor", "0"], "argument --capacity-factor: '0' must be > 0"),
    (["nope"], "argument command: invalid choice: 'nope'"),
]


@pytest.mark.parametrize("argv,needle", BAD, ids=[" ".join(a)[:60] for a, _ in BAD])
def test_bad_input_is_one_line_and_exit_2(argv, needle, files, nothing_heavy, capsys):
    argv = [a.format(**files) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"moepatch {argv[0] if argv[0] != 'nope' else ''}".rstrip())
    assert needle in lines[0], lines[0]
    assert "Traceback" not in err


@pytest.mark.parametrize("argv,needle", [
    (["eval", "--model", "someorg/some-moe"], "'someorg/some-moe' is not a local directory and not in the Hugging "
                                              "Face cache, and the hub cannot be reached (127.0.0.1:9: "),
    (["eval", "--tasks", "piqa"], "cannot be loaded (piqa (baber/piqa)); they are not in the local datasets cache "
                                  "and the hub cannot be reached (127.0.0.1:9: "),
    (["stats", "--text", "{text}", "--model", "someorg/some-moe"], "the hub cannot be reached (127.0.0.1:9: "),
    (["lm-eval", "--model", "moepatch", "--model_args", f"pretrained={EMBEDDED}", "--tasks", "piqa"],
     "the hub cannot be reached (127.0.0.1:9: "),
])
def test_no_network_fails_at_once_from_the_local_caches(argv, needle, files, nothing_heavy, capsys, monkeypatch):
    """Downloads allowed (HF_HUB_OFFLINE=0) but no route to the hub (here: a closed local port): one line
    that says so, without tens of seconds of retries."""
    import time

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    start = time.monotonic()
    assert main([a.format(**files) for a in argv]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], lines
    assert "HF_HUB_OFFLINE=0" not in lines[0]  # allowing downloads would not help: no route
    assert time.monotonic() - start < 30


@pytest.mark.parametrize("argv,needle", [
    (["demo", "--model-type", "nope"], "model type 'nope' is not supported; accepted: afmoe"),
    (["demo", "--capacity-factor", "0"], "capacity_factor=0.0 is not valid"),
    (["demo", "--strategy", "drop", "--policy", "best"], "argument --policy: invalid choice: 'best'"),
    (["demo", "--nproc", "0"], "argument --nproc: '0' must be >= 1"),
    (["eval", "--checkpoint", "/nonexistent/ckpt", "--random-tokens", "64"], "no config.json there"),
    (["eval", "--tiny", "mixtral", "--text", "notes.txt"], "--text needs --checkpoint"),
    (["eval", "--tiny", "mixtral", "--random-tokens", "64", "--capacity-factor", "x"], "'x' is not a number"),
    (["bench", "--smoke"], "unknown command 'bench'; accepted: demo, eval"),
    (["nope"], "unknown command 'nope'; accepted: demo, eval"),
])
def test_the_ep_launcher_checks_before_starting_ranks(argv, needle, capsys, monkeypatch):
    """`moepatch ep ...` and `python -m moepatch.launch ...` refuse bad input in one line, before any rank."""
    from moepatch import launch

    monkeypatch.setattr(launch, "relaunch", lambda *a, **k: pytest.fail("ranks started before the input was checked"))
    monkeypatch.delenv("RANK", raising=False)
    for entry in (lambda: main(["ep", *argv]), lambda: launch.main(argv)):
        assert entry() == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0], lines


def test_the_ep_launcher_starts_nproc_ranks_of_itself(monkeypatch):
    from moepatch import launch

    started = []
    monkeypatch.setattr(launch, "relaunch", lambda target, nproc=None: started.append((target, nproc)) or 0)
    monkeypatch.delenv("RANK", raising=False)
    assert main(["ep", "demo", "--nproc", "3", "--strategy", "reroute"]) == 0
    assert started == [(["-m", "moepatch.launch", "demo", "--nproc", "3", "--strategy", "reroute"], 3)]


def test_debug_shows_the_traceback():
    import moepatch

    with pytest.raises(moepatch.InvalidOptionError, match="capacity_factor=0.0"):
        main(["--debug", "eval", "--capacity-factor", "0"])


@pytest.mark.parametrize("command", ["eval", "stats", "demo", "install-lm-eval-plugin", "bench kernels",
                                     "bench e2e", "bench ep", "bench scmoe", "ep demo", "ep eval"])
def test_help_names_the_command_and_shows_every_default(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([*command.split(), "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: moepatch {command} ")
    text = " ".join(text.split())  # help wraps lines
    if command == "eval":
        for default in ("(default: 1.0,1.5,2.0)", "(default: drop,reroute,expanded)", "(default: score,order,random)",
                        "(default: 16)", "(default: auto)"):
            assert default in text
    if command == "bench kernels":
        assert "(default: 20)" in text and "(default: bf16)" in text


def test_stats_prints_the_table_without_the_tokenizer_length_note(files, capsys):
    rc = main(["stats", "--text", files["text"], "--capacity-factor", "1.0", "--seq-len", "64", "--max-tokens", "700"])
    assert rc == 0
    captured = capsys.readouterr()
    assert "max/mean before" in captured.out
    assert "longer than the specified maximum sequence length" not in captured.err + captured.out


def test_demo_table_of_tiny_models():
    text = demo_tables(["qwen3_moe"], gammas=(1.0,), batch=2, seq=16)
    assert "qwen3_moe" in text and "γ=1.0" in text
    assert len(text.splitlines()) == 3 + 2  # title, header, rule, one row per layer


def test_lm_eval_plugin_registers_the_model_and_the_tasks_lazily(tmp_path):
    """What the .pth line does at start-up: `lm_eval --model moepatch` resolves to MoePatchLM, and any
    TaskManager that includes lm-eval's tasks (as `lm_eval --tasks` does) finds the shipped ones."""
    from moepatch.cli import PTH_LINE

    assert main(["install-lm-eval-plugin", "--site-dir", str(tmp_path)]) == 0
    line = (tmp_path / "moepatch_lm_eval.pth").read_text()
    assert line == PTH_LINE
    code = (f"{line.strip()}\nimport sys\nassert 'moepatch.eval' not in sys.modules\n"
            "from lm_eval.api.registry import get_model\n"
            "from lm_eval.tasks import TaskManager\n"
            "tm = TaskManager()\n"
            "print(get_model('moepatch').__name__, get_model('hf').__name__, 'stdlib_cloze' in tm.all_tasks,\n"
            "      'stdlib_ppl' in tm.all_tasks, 'hellaswag' in tm.all_tasks)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["MoePatchLM", "HFLM", "True", "True", "True"]
