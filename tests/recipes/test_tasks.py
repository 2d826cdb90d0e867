"""Checks for the embedded recipe's offline lm-eval tasks (``moepatch/data/tasks``).

* the shipped JSONL parses and has the documented shape;
* every held-out file is in the eval split of the recipe's hash rule, hence
  never in the train split (and, when this interpreter's stdlib is the one the
  data was built from, the list and the task data are reproduced exactly);
* ``write_task_configs`` yields YAML that lm-eval's ``TaskManager`` loads
  offline, and a tiny random OLMoE runs both tasks end to end.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import pytest
from repo_files import load_module  # tests/repo_files.py

# Offline before datasets / lm_eval are first imported (they read it at import).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "recipes" / "embedded"
DATA = REPO / "moepatch" / "data"
TASKS = DATA / "tasks"


def _load_recipe_module(name: str):
    return load_module(f"recipes/embedded/{name}.py")


def _read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def _heldout() -> list[str]:
    return [x for x in (DATA / "heldout_files.txt").read_text(encoding="utf-8").splitlines() if x]


def _manifest() -> dict:
    return json.loads((TASKS / "manifest.json").read_text(encoding="utf-8"))


def _same_stdlib() -> bool:
    return platform.python_version() == _manifest()["python_version"]


def test_jsonl_files_parse_and_have_the_documented_shape():
    total = sum((TASKS / n).stat().st_size for n in ("stdlib_ppl.jsonl", "stdlib_cloze.jsonl"))
    assert total <= 3_000_000
    heldout = set(_heldout())

    ppl = _read_jsonl(TASKS / "stdlib_ppl.jsonl")
    assert 150 <= len(ppl) <= 300
    assert len({d["id"] for d in ppl}) == len(ppl)
    for doc in ppl:
        assert doc["source"] in heldout
        assert isinstance(doc["text"], str) and doc["text"].strip()
        assert 500 <= len(doc["text"]) <= 3000
        assert doc["text"].endswith("\n")  # cut at line boundaries
        assert doc["start_line"] <= doc["end_line"]

    cloze = _read_jsonl(TASKS / "stdlib_cloze.jsonl")
    assert 400 <= len(cloze) <= 600
    assert len({d["id"] for d in cloze}) == len(cloze)
    labels = [0, 0, 0, 0]
    for item in cloze:
        assert item["source"] in heldout
        choices = item["choices"]
        assert len(choices) == 4 and len({c.strip() for c in choices}) == 4
        assert all(c.endswith("\n") and c.strip() for c in choices)
        assert 0 <= item["label"] < 4
        labels[item["label"]] += 1
        assert item["context"].endswith("\n") and len(item["context"].splitlines()) >= 8
    # The gold position is shuffled, not fixed.
    assert min(labels) >= len(cloze) // 8

    manifest = _manifest()
    assert manifest["stdlib_ppl"]["docs"] == len(ppl)
    assert manifest["stdlib_cloze"]["items"] == len(cloze)
    assert sorted(manifest["heldout_files"]) == sorted(heldout)


def test_heldout_files_are_disjoint_from_the_train_split():
    corpus = _load_recipe_module("stdlib_corpus")
    heldout = _heldout()
    assert len(heldout) >= 10
    assert all(corpus.split_of(rel) == "eval" for rel in heldout)
    # The rule is a pure function of the path: it puts no held-out file in train.
    assert not {rel for rel in heldout if corpus.split_of(rel) == "train"}

    if not _same_stdlib():
        pytest.skip("local stdlib differs from the one the task data was built from")
    files = corpus.list_stdlib_files(corpus.default_stdlib_dir())
    splits = corpus.split_files(files)
    assert splits["eval"] == sorted(heldout)
    assert not set(splits["train"]) & set(heldout)
    assert not set(splits["validation"]) & set(heldout)


def test_task_data_is_reproduced_by_make_tasks(tmp_path):
    if not _same_stdlib():
        pytest.skip("local stdlib differs from the one the task data was built from")
    import sys

    sys.path.insert(0, str(RECIPE))  # make_tasks imports its sibling stdlib_corpus
    try:
        make_tasks = _load_recipe_module("make_tasks")
        make_tasks.main(["--out-dir", str(tmp_path), "--heldout-list", str(DATA / "heldout_files.txt")])
    finally:
        sys.path.remove(str(RECIPE))
    for name in ("stdlib_ppl.jsonl", "stdlib_cloze.jsonl", "manifest.json"):
        assert (tmp_path / name).read_bytes() == (TASKS / name).read_bytes(), name


def _tiny_tokenizer(texts: list[str]):
    """A byte-level BPE tokenizer like the recipe's, but tiny and built in milliseconds."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    eot = "<|endoftext|>"
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=eot, eos_token=eot, unk_token=eot,
                                   pad_token=eot, model_max_length=512)


def test_task_configs_load_and_run_offline(tmp_path):
    import torch
    from lm_eval.evaluator import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import OlmoeConfig, OlmoeForCausalLM

    from moepatch.eval.tasks import EMBEDDED_TASKS, embedded_model_path, write_task_configs

    names = write_task_configs(str(tmp_path))
    assert tuple(names) == EMBEDDED_TASKS
    assert embedded_model_path().name == "embedded_model"
    for name in names:
        text = (tmp_path / f"{name}.yaml").read_text(encoding="utf-8")
        data_file = Path(json.loads(text.split("test: ", 1)[1].splitlines()[0]))
        assert data_file.is_absolute() and data_file.is_file()

    manager = TaskManager(include_path=str(tmp_path), include_defaults=False)
    assert set(names) <= set(manager.all_tasks)

    tok = _tiny_tokenizer([d["text"] for d in _read_jsonl(TASKS / "stdlib_ppl.jsonl")[:20]])
    torch.manual_seed(0)
    config = OlmoeConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_experts=4, num_experts_per_tok=2,
                         max_position_embeddings=512, pad_token_id=None, bos_token_id=0, eos_token_id=0)
    model = OlmoeForCausalLM(config).eval()
    lm = HFLM(pretrained=model, tokenizer=tok, max_length=512, batch_size=4)
    results = simple_evaluate(model=lm, tasks=names, task_manager=manager, limit=2)["results"]
    assert results["stdlib_ppl"]["bits_per_byte,none"] > 0
    assert 0.0 <= results["stdlib_cloze"]["acc,none"] <= 1.0
    assert "acc_norm,none" in results["stdlib_cloze"]
