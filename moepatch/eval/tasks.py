"""Offline lm-eval tasks built from held-out Python stdlib files, and the embedded model's location.

The JSONL data under ``moepatch/data/tasks/`` comes from ``recipes/embedded/make_tasks.py``. lm-eval
finds tasks through YAML configs, which can point at data only by path, so the configs are written
once into a cache directory (:func:`task_config_dir`) that the lm-eval plugin adds to every
``TaskManager``: ``lm_eval --tasks stdlib_cloze`` then works without flags, offline.
"""

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
    """Absolute path of a task's JSONL data file."""
    if task not in EMBEDDED_TASKS:
        raise ValueError(f"unknown embedded task {task!r}; expected one of {EMBEDDED_TASKS}")
    return data_dir() / "tasks" / f"{task}.jsonl"


def _q(value: str) -> str:
    # JSON strings are valid YAML scalars and quote any path safely.
    return json.dumps(value)


def _common_header(task: str) -> list[str]:
    return [
        f"task: {task}",
        "dataset_path: json",
        "dataset_kwargs:",
        "  data_files:",
        f"    test: {_q(str(task_data_path(task)))}",
        "test_split: test",
    ]


def _task_yaml(task: str) -> str:
    lines = _common_header(task)
    if task == "stdlib_ppl":
        lines += [
            "output_type: loglikelihood_rolling",
            # Feature names (not Jinja templates): Jinja would drop the
            # documents' trailing newline.
            'doc_to_text: ""',
            "doc_to_target: text",
            "metric_list:",
            "  - metric: word_perplexity",
            "    aggregation: weighted_perplexity",
            "    higher_is_better: false",
            "  - metric: byte_perplexity",
            "    aggregation: weighted_perplexity",
            "    higher_is_better: false",
            "  - metric: bits_per_byte",
            "    aggregation: bits_per_byte",
            "    higher_is_better: false",
        ]
    else:
        lines += [
            "output_type: multiple_choice",
            "doc_to_text: context",
            "doc_to_choice: choices",
            "doc_to_target: label",
            # Choices are whole lines (indentation and newline included) that
            # directly follow the context's final newline.
            'target_delimiter: ""',
            "metric_list:",
            "  - metric: acc",
            "    aggregation: mean",
            "    higher_is_better: true",
            "  - metric: acc_norm",
            "    aggregation: mean",
            "    higher_is_better: true",
        ]
    lines += ["metadata:", f"  version: {TASK_VERSION}"]
    return "\n".join(lines) + "\n"


def write_task_configs(dest_dir: str) -> list[str]:
    """Write lm-eval YAML configs for the embedded tasks into ``dest_dir``.

    Returns the task names, ready for ``TaskManager(include_path=dest_dir)``
    and ``simple_evaluate(tasks=...)``.  Raises ``FileNotFoundError`` if the
    package data is missing.
    """
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    for task in EMBEDDED_TASKS:
        path = task_data_path(task)
        if not path.is_file():
            raise FileNotFoundError(f"task data {path} is missing; run recipes/embedded/make_tasks.py")
        (dest / f"{task}.yaml").write_text(_task_yaml(task), encoding="utf-8")
    return list(EMBEDDED_TASKS)


def task_config_dir() -> Path:
    """A directory holding the embedded tasks' lm-eval configs for this installation (written if
    missing or stale): ``$XDG_CACHE_HOME/moepatch/lm_eval_tasks/<installation>`` (``~/.cache`` by
    default), or a temporary directory where the cache cannot be written."""
    for task in EMBEDDED_TASKS:
        if not task_data_path(task).is_file():
            raise FileNotFoundError(f"task data {task_data_path(task)} is missing; reinstall moepatch or run "
                                    "recipes/embedded/make_tasks.py")
    tag = hashlib.sha1(f"{data_dir()}:{TASK_VERSION}".encode()).hexdigest()[:12]
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "moepatch" / "lm_eval_tasks"
    for root in (base, Path(tempfile.gettempdir()) / "moepatch-lm-eval-tasks"):
        dest = root / tag
        try:
            if not all((dest / f"{t}.yaml").is_file() and (dest / f"{t}.yaml").read_text() == _task_yaml(t)
                       for t in EMBEDDED_TASKS):
                write_task_configs(str(dest))
            return dest
        except OSError:
            continue
    raise OSError(f"cannot write the embedded task configs under {base} nor the temporary directory")
