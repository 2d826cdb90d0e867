"""Model aliases for the paper's checkpoints and task recipes (with shots and metrics)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

MODEL_ALIASES = {
    "mixtral": "mistralai/Mixtral-8x7B-Instruct-v0.1",
    "olmoe": "allenai/OLMoE-1B-7B-0924-Instruct",
    "deepseek-v2-lite": "deepseek-ai/DeepSeek-V2-Lite-Chat",
    "qwen-moe": "Qwen/Qwen1.5-MoE-A2.7B-Chat",
    "qwen3-moe": "Qwen/Qwen3-30B-A3B",
}


@dataclass(frozen=True)
class TaskSpec:
    """One lm-eval task with the shots and the metric a sweep reports for it."""

    task: str
    shots: int | None = None
    metric: str = "acc"
    higher_is_better: bool = True

    @property
    def metric_key(self) -> str:
        """The key in lm-eval's results: ``metric,filter`` (filter ``none`` unless given)."""
        return self.metric if "," in self.metric else f"{self.metric},none"


# The shipped model's offline tasks: perplexity as bits per byte (lower is better) and cloze accuracy.
EMBEDDED_TASK_SPECS = (
    TaskSpec("stdlib_cloze", 0, "acc"),
    TaskSpec("stdlib_ppl", 0, "bits_per_byte", higher_is_better=False),
)


def load_recipe(name: str) -> tuple[TaskSpec, ...]:
    """Task specs from ``recipes/eval/NAME.yaml``."""
    import yaml

    path = Path(__file__).resolve().parents[2] / "recipes" / "eval" / f"{name}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"task recipe {name!r} not found at {path} (recipes ship with the source tree)")
    data = yaml.safe_load(path.read_text())
    return tuple(TaskSpec(t["task"], t.get("shots"), t.get("metric", "acc"), t.get("higher_is_better", True))
                 for t in data["tasks"])


def parse_tasks(arg: str | None) -> tuple[TaskSpec, ...]:
    """``--tasks``: None (the embedded tasks), ``paper``, or comma-separated lm-eval task names."""
    if not arg:
        return EMBEDDED_TASK_SPECS
    if arg == "paper":
        return load_recipe("paper")
    embedded = {t.task: t for t in EMBEDDED_TASK_SPECS}
    return tuple(embedded.get(name, TaskSpec(name)) for name in arg.split(",") if name)
