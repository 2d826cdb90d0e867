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

    @property
    def metric_name(self) -> str:
        return self.metric.split(",")[0]

    def shown(self, value: float) -> float:
        """A score as tables and plots show it: accuracies in percent, other metrics as they are."""
        return 100 * value if self.higher_is_better else value

    def fmt(self, value: float, sign: str = "") -> str:
        return f"{self.shown(value):{sign}.{2 if self.higher_is_better else 4}f}"


# The shipped model's offline tasks: perplexity as bits per byte (lower is better) and cloze accuracy.
EMBEDDED_TASK_SPECS = (
    TaskSpec("stdlib_cloze", 0, "acc"),
    TaskSpec("stdlib_ppl", 0, "bits_per_byte", higher_is_better=False),
)


def parse_tasks(arg: str | None) -> tuple[TaskSpec, ...]:
    """``--tasks``: None (the embedded tasks), ``paper`` (``recipes/eval/paper.yaml``), or comma-separated
    lm-eval task names."""
    if not arg:
        return EMBEDDED_TASK_SPECS
    if arg == "paper":
        import yaml

        path = Path(__file__).resolve().parents[2] / "recipes" / "eval" / "paper.yaml"
        if not path.is_file():
            raise FileNotFoundError(f"task recipe 'paper' not found at {path} (recipes ship with the source tree)")
        return tuple(TaskSpec(t["task"], t.get("shots"), t.get("metric", "acc"), t.get("higher_is_better", True))
                     for t in yaml.safe_load(path.read_text())["tasks"])
    embedded = {t.task: t for t in EMBEDDED_TASK_SPECS}
    return tuple(embedded.get(name, TaskSpec(name)) for name in arg.split(",") if name)
