"""Offline lm-eval tasks from held-out Python stdlib files (data: ``recipes/embedded/make_tasks.py``) and the
embedded model's location.  lm-eval reads them through YAML configs in :func:`task_config_dir`, which the
lm-eval plugin adds to every ``TaskManager`` (``lm_eval --tasks stdlib_cloze`` then works offline)."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

EMBEDDED_TASKS = ("stdlib_ppl", "stdlib_cloze")

# Bump when the task definition or data changes in a way that affects scores.
TASK_VERSION = 1.0


def data_dir() -> Path:
    """Directory of the package data (``moepatch/data``)."""
    return Path(__file__).resolve().parent.parent / "data"


def embedded_model_path() -> Path:
    """Directory of the shipped embedded OLMoE model (``save_pretrained`` layout + tokenizer)."""
    return data_dir() / "embedded_model"


def task_data_path(task: str) -> Path:
    """Absolute path of a task's JSONL data file (FileNotFoundError when it is missing)."""
    if task not in EMBEDDED_TASKS:
        raise ValueError(f"unknown embedded task {task!r}; expected one of {EMBEDDED_TASKS}")
    path = data_dir() / "tasks" / f"{task}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"task data {path} is missing; reinstall moepatch or run "
                                "recipes/embedded/make_tasks.py")
    return path


def _metrics(*entries: tuple[str, str, str]) -> list[str]:
    out = ["metric_list:"]
    for metric, aggregation, higher in entries:
        out += [f"  - metric: {metric}", f"    aggregation: {aggregation}", f"    higher_is_better: {higher}"]
    return out


def _task_yaml(task: str) -> str:
    # The path as a JSON string: a valid YAML scalar that quotes any path safely.
    lines = [f"task: {task}", "dataset_path: json", "dataset_kwargs:", "  data_files:",
             f"    test: {json.dumps(str(task_data_path(task)))}", "test_split: test"]
    if task == "stdlib_ppl":
        # Feature names (not Jinja templates): Jinja would drop the documents' trailing newline.
        lines += ["output_type: loglikelihood_rolling", 'doc_to_text: ""', "doc_to_target: text"]
        ppl = "weighted_perplexity"
        lines += _metrics(("word_perplexity", ppl, "false"), ("byte_perplexity", ppl, "false"),
                          ("bits_per_byte", "bits_per_byte", "false"))
    else:
        # Choices are whole lines (indentation and newline included) right after the context's final newline.
        lines += ["output_type: multiple_choice", "doc_to_text: context", "doc_to_choice: choices",
                  "doc_to_target: label", 'target_delimiter: ""']
        lines += _metrics(("acc", "mean", "true"), ("acc_norm", "mean", "true"))
    lines += ["metadata:", f"  version: {TASK_VERSION}"]
    return "\n".join(lines) + "\n"


def write_task_configs(dest_dir: str) -> list[str]:
    """Write the embedded tasks' lm-eval YAML configs into ``dest_dir``; returns the task names (raises
    FileNotFoundError without the package data)."""
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    for task in EMBEDDED_TASKS:
        (dest / f"{task}.yaml").write_text(_task_yaml(task), encoding="utf-8")
    return list(EMBEDDED_TASKS)


def task_config_dir() -> Path:
    """The embedded tasks' lm-eval configs for this installation (written if missing or stale), under
    ``$XDG_CACHE_HOME/moepatch/lm_eval_tasks`` (default ``~/.cache``), else a temporary directory."""
    texts = {t: _task_yaml(t) for t in EMBEDDED_TASKS}  # (FileNotFoundError without the data)
    tag = hashlib.sha1(f"{data_dir()}:{TASK_VERSION}".encode()).hexdigest()[:12]
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "moepatch" / "lm_eval_tasks"
    for root in (base, Path(tempfile.gettempdir()) / "moepatch-lm-eval-tasks"):
        dest = root / tag
        try:
            if not all((dest / f"{t}.yaml").is_file() and (dest / f"{t}.yaml").read_text() == text
                       for t, text in texts.items()):
                write_task_configs(str(dest))
            return dest
        except OSError:
            continue
    raise OSError(f"cannot write the embedded task configs under {base} nor the temporary directory")
