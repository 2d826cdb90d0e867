"""A quality sweep: the unpatched baseline once, then every capacity variant on the same requests.

The baseline is the model patched with ``capacity_factor=None``: bit-identical to the unpatched
model (tested), and it records the native load statistics the variants are compared with.
"""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import moepatch

from .presets import TaskSpec


@dataclass(frozen=True)
class Variant:
    """One patch configuration of a sweep."""

    capacity_factor: float | None
    strategy: str = "drop"
    policy: str | None = None
    options: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        if self.capacity_factor is None and self.strategy != "expert_drop":
            return "baseline"
        g = "" if self.strategy == "expert_drop" else f"γ={self.capacity_factor:g} "
        p = f"/{self.policy}" if self.policy else ""
        return f"{g}{self.strategy}{p}"

    def apply(self, model):
        return moepatch.apply(model, self.capacity_factor, self.strategy, self.policy, **self.options)


BASELINE = Variant(None)


def build_variants(gammas: Sequence[float], strategies: Sequence[str], policies: Sequence[str]) -> list[Variant]:
    """γ × strategy, with every policy for ``drop`` (and ``reroute`` when several are given);
    ``expert_drop`` does not use γ and appears once."""
    out = []
    for strategy in strategies:
        if strategy == "expert_drop":
            out.append(Variant(None, "expert_drop"))
            continue
        for g in gammas:
            if strategy == "drop" or (strategy == "reroute" and len(policies) > 1):
                out += [Variant(g, strategy, p) for p in policies]
            else:
                out.append(Variant(g, strategy))
    return out


@dataclass
class VariantResult:
    variant: Variant
    scores: dict[str, float]
    totals: dict
    layers: dict
    seconds: float


@dataclass
class SweepResult:
    tasks: list[TaskSpec]
    results: list[VariantResult]

    @property
    def baseline(self) -> VariantResult:
        return self.results[0]

    def average(self, r: VariantResult) -> float | None:
        """Mean of the higher-is-better task scores (accuracies), None when there are none."""
        vals = [r.scores[t.task] for t in self.tasks if t.higher_is_better and t.task in r.scores]
        return sum(vals) / len(vals) if vals else None

    def table(self) -> str:
        """Tasks × variants with the delta to the baseline, then average, dropped %, straggler ratios."""
        cols = [r.variant.name for r in self.results]
        width = max(12, *(len(c) + 2 for c in cols))
        head = f"{'':<22}" + "".join(f"{c:>{width}}" for c in cols)
        lines = [head, "-" * len(head)]
        base = self.baseline
        for t in self.tasks:
            row = f"{t.task + ' ' + t.metric.split(',')[0]:<22}"
            for r in self.results:
                v = r.scores.get(t.task)
                if v is None:
                    row += f"{'-':>{width}}"
                elif r is base:
                    row += f"{_fmt(v, t):>{width}}"
                else:
                    row += f"{_fmt(v, t) + ' (' + _delta(v - base.scores[t.task], t) + ')':>{width}}"
            lines.append(row)
        avg_base = self.average(base)
        if avg_base is not None:
            row = f"{'average (acc tasks)':<22}"
            for r in self.results:
                a = self.average(r)
                cell = f"{100 * a:.2f}" + ("" if r is base else f" ({100 * (a - avg_base):+.2f})")
                row += f"{cell:>{width}}"
            lines.append(row)
        lines.append(f"{'dropped pairs':<22}" + "".join(
            f"{100 * r.totals['dropped_fraction']:>{width - 1}.1f}%" for r in self.results))
        lines.append(f"{'max/mean load before':<22}" + "".join(
            f"{r.totals['straggler_before']:>{width}.2f}" for r in self.results))
        lines.append(f"{'max/mean load after':<22}" + "".join(
            f"{r.totals['straggler_after']:>{width}.2f}" for r in self.results))
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return dict(tasks=[asdict(t) for t in self.tasks],
                    results=[dict(variant=asdict(r.variant), name=r.variant.name, scores=r.scores,
                                  average=self.average(r), totals=r.totals, layers=r.layers, seconds=r.seconds)
                             for r in self.results])

    def write(self, out_dir: str | Path) -> list[Path]:
        """results.json, results.csv, score_vs_gamma.png and expert_load.png under ``out_dir``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = [out / "results.json", out / "results.csv"]
        paths[0].write_text(json.dumps(self.to_dict(), indent=1))
        with open(paths[1], "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["variant", "capacity_factor", "strategy", "policy", "task", "metric", "value",
                        "delta_to_baseline", "dropped_fraction", "straggler_before", "straggler_after"])
            for r in self.results:
                for t in self.tasks:
                    if t.task in r.scores:
                        v = r.scores[t.task]
                        w.writerow([r.variant.name, r.variant.capacity_factor, r.variant.strategy, r.variant.policy,
                                    t.task, t.metric, v, v - self.baseline.scores[t.task],
                                    r.totals["dropped_fraction"], r.totals["straggler_before"],
                                    r.totals["straggler_after"]])
        from .plots import plot_expert_load, plot_score_vs_gamma

        paths.append(plot_score_vs_gamma(self, out / "score_vs_gamma.png"))
        paths.append(plot_expert_load(self, out / "expert_load.png"))
        return paths


def _fmt(v: float, t: TaskSpec) -> str:
    return f"{100 * v:.2f}" if t.higher_is_better else f"{v:.4f}"


def _delta(d: float, t: TaskSpec) -> str:
    return f"{100 * d:+.2f}" if t.higher_is_better else f"{d:+.4f}"


def load_tasks(tasks: Sequence[TaskSpec], task_manager) -> dict:
    """Build lm-eval task objects once, so every variant reuses the loaded datasets.

    Groups (e.g. mmlu) stay names: lm-eval expands them on each run.
    """
    from lm_eval.api.task import Task
    from lm_eval.tasks import get_task_dict

    built = get_task_dict([t.task for t in tasks], task_manager)
    return {t.task: built[t.task] if isinstance(built.get(t.task), Task) else t.task for t in tasks}


def evaluate_tasks(lm, tasks: Sequence[TaskSpec], task_manager, limit=None, prebuilt: dict | None = None
                   ) -> dict[str, float]:
    """One lm-eval run per distinct shot count; returns {task: metric value}."""
    from lm_eval.evaluator import simple_evaluate

    scores: dict[str, float] = {}
    by_shots: dict = {}
    for t in tasks:
        by_shots.setdefault(t.shots, []).append(t)
    for shots, group in by_shots.items():
        todo = [prebuilt[t.task] if prebuilt else t.task for t in group]
        res = simple_evaluate(model=lm, tasks=todo, num_fewshot=shots, limit=limit, task_manager=task_manager,
                              bootstrap_iters=0, log_samples=False, verbosity="ERROR")
        for t in group:
            metrics = res["results"][t.task]
            if t.metric_key not in metrics:
                raise KeyError(f"task {t.task!r} reported no metric {t.metric_key!r}; it has: "
                               f"{', '.join(k for k in metrics if ',' in k)}")
            scores[t.task] = float(metrics[t.metric_key])
    return scores


def run_sweep(lm, tasks: Sequence[TaskSpec], variants: Sequence[Variant], task_manager, limit=None,
              progress: Callable[[str], None] = print) -> SweepResult:
    """Evaluate the baseline and every variant with one lm-eval model object (same requests)."""
    model = lm.model
    results = []
    todo = [BASELINE, *variants]
    prebuilt = load_tasks(tasks, task_manager)
    for i, v in enumerate(todo, 1):
        progress(f"[{i}/{len(todo)}] {v.name} ...")
        t0 = time.perf_counter()
        handle = v.apply(model)
        scores = evaluate_tasks(lm, tasks, task_manager, limit, prebuilt)
        st = handle.stats()
        results.append(VariantResult(v, scores, st.totals(), {str(k): s for k, s in st.layers().items()},
                                     time.perf_counter() - t0))
        summary = ", ".join(f"{t.task}={_fmt(scores[t.task], t)}" for t in tasks)
        progress(f"[{i}/{len(todo)}] {v.name}: {summary} (dropped {100 * st.totals()['dropped_fraction']:.1f}%, "
                 f"{time.perf_counter() - t0:.0f}s)")
    moepatch.apply(model, None)
    return SweepResult(list(tasks), results)
