"""A quality sweep: the baseline (``capacity_factor=None``: bit-identical to the unpatched model, recording the
native load) once, then every capacity variant on the same requests."""

from __future__ import annotations

import csv
import functools
import json
import sys
import textwrap
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

from ..patch import core as patch_core
from .loading import build_tasks
from .plots import plot_expert_load, plot_score_vs_gamma
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
        return patch_core.apply(model, self.capacity_factor, self.strategy, self.policy, **self.options)


def build_variants(gammas: Sequence[float], strategies: Sequence[str], policies: Sequence[str]) -> list[Variant]:
    """γ × strategy, with every policy for ``drop`` (and ``reroute`` when several are given); ``expert_drop``
    does not use γ and appears once."""
    out = []
    for strategy in strategies:
        per_policy = strategy == "drop" or (strategy == "reroute" and len(policies) > 1)
        if strategy == "expert_drop":
            out.append(Variant(None, "expert_drop"))
        else:
            out += [Variant(g, strategy, p) for g in gammas for p in (policies if per_policy else [None])]
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

    def table(self, wide: bool = False, width: int = 120) -> str:
        """A row per variant: each task's score and delta to the baseline, the average accuracy, the dropped
        share of routed pairs and max/mean load before -> after; per-task columns are left out past ``width``
        (results.csv has them) unless ``wide``."""
        base, avg_base = self.baseline, self.average(self.baseline)

        def score(r, t):
            v = r.scores.get(t.task)
            if v is None:
                return "-"
            return t.fmt(v) if r is base else f"{t.fmt(v)} ({t.fmt(v - base.scores[t.task], '+')})"

        def avg(r):
            a = self.average(r)
            return f"{100 * a:.2f}" + ("" if r is base else f" ({100 * (a - avg_base):+.2f})")

        # (header, cell(r), whether it is a per-task column)
        cols = [(f"{t.task} {_METRIC_SHORT.get(t.metric_name, t.metric_name)}", lambda r, t=t: score(r, t), True)
                for t in self.tasks]
        if avg_base is not None and sum(t.higher_is_better for t in self.tasks) > 1:
            cols.append(("avg acc", avg, False))
        cols.append(("dropped", lambda r: f"{100 * r.totals['dropped_fraction']:.1f}%", False))
        cols.append(("max/mean load", lambda r: f"{r.totals['straggler_before']:.2f} -> "
                                                f"{r.totals['straggler_after']:.2f}", False))

        def render(chosen):
            rows = [("variant", [c[0] for c in chosen])]
            rows += [(r.variant.name, [c[1](r) for c in chosen]) for r in self.results]
            name_w = max(len(name) for name, _ in rows)
            widths = [max(len(cells[i]) for _, cells in rows) for i in range(len(chosen))]
            lines = ["  ".join([f"{name:<{name_w}}", *(f"{v:>{w}}" for v, w in zip(cells, widths))])
                     for name, cells in rows]
            return [lines[0], "-" * len(lines[0]), *lines[1:]]

        lines = render(cols)
        if not wide and max(map(len, lines)) > width:
            lines = render([c for c in cols if not c[2]])
            lines.append(f"(per-task scores left out to fit {width} columns: --wide prints them; results.csv has them)")
        units = "; ".join(f"{t.task}: {t.metric_name}" + (" in %" if t.higher_is_better else ", lower is better")
                          for t in self.tasks)
        note = f"{units}; (delta): to the baseline; dropped: routed pairs left without an expert"
        lines += textwrap.wrap(note, width, initial_indent="(", subsequent_indent=" ")
        lines[-1] += ")"
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return dict(tasks=[asdict(t) for t in self.tasks],
                    results=[dict(variant=asdict(r.variant), name=r.variant.name, scores=r.scores,
                                  average=self.average(r), totals=r.totals, layers=r.layers, seconds=r.seconds)
                             for r in self.results])

    def write(self, out_dir: str | Path, model_name: str = "model") -> list[Path]:
        """results.json, results.csv, score_vs_gamma.png and expert_load.png under ``out_dir``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = [out / "results.json", out / "results.csv"]
        paths[0].write_text(json.dumps(dict(self.to_dict(), model=model_name), indent=1))
        with open(paths[1], "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["variant", "capacity_factor", "strategy", "policy", "task", "metric", "value",
                        "delta_to_baseline", "dropped_fraction", "straggler_before", "straggler_after"])
            w.writerows([r.variant.name, r.variant.capacity_factor, r.variant.strategy, r.variant.policy, t.task,
                         t.metric, r.scores[t.task], r.scores[t.task] - self.baseline.scores[t.task],
                         r.totals["dropped_fraction"], r.totals["straggler_before"], r.totals["straggler_after"]]
                        for r in self.results for t in self.tasks if t.task in r.scores)
        paths.append(plot_score_vs_gamma(self, out / "score_vs_gamma.png", model_name))
        paths.append(plot_expert_load(self, out / "expert_load.png", model_name))
        return paths


_METRIC_SHORT = {"bits_per_byte": "bpb", "word_perplexity": "word ppl", "byte_perplexity": "byte ppl"}


def load_tasks(tasks: Sequence[TaskSpec], task_manager) -> dict:
    """lm-eval task objects built once (datasets loaded, shots set) for every variant, in ``TaskManager.load``'s
    layout ``{"tasks", "groups", "group_map"}``; raises DatasetUnavailableError naming every missing dataset."""
    built = build_tasks(task_manager, [t.task for t in tasks])
    merged: dict = {"tasks": {}, "groups": {}, "group_map": {}}
    for spec in tasks:
        loaded = built[spec.task]
        for obj in loaded["tasks"].values():
            # As lm-eval's simple_evaluate does: explicit shots win unless the task pins 0; default 0.
            default = obj.get_config("num_fewshot")
            if spec.shots is not None and default != 0:
                obj.set_config(key="num_fewshot", value=spec.shots)
            elif default is None:
                obj.set_config(key="num_fewshot", value=0)
        for key in merged:
            merged[key].update(loaded.get(key) or {})
    return merged


def run_sweep(lm, tasks: Sequence[TaskSpec], variants: Sequence[Variant], loaded: dict, limit=None) -> SweepResult:
    """The baseline and every variant with one lm-eval model object (same requests; ``loaded`` from
    :func:`load_tasks`), with one bar over the variants when stderr is a terminal."""
    import lm_eval.api.task as task_module
    import transformers
    from lm_eval.evaluator import evaluate

    model, results = lm.model, []
    # Held back meanwhile: lm-eval's per-task request bars (it has no switch), transformers' note that a
    # document exceeds the model's window.
    task_bar, verbosity = task_module.tqdm, transformers.logging.get_verbosity()
    task_module.tqdm = functools.partial(task_bar, disable=True)
    transformers.logging.set_verbosity_error()
    bar = tqdm([Variant(None), *variants], desc="evaluating", unit="variant", leave=False,
               disable=not sys.stderr.isatty())
    try:
        for v in bar:
            bar.set_postfix_str(v.name)
            t0 = time.perf_counter()
            handle = v.apply(model)
            # One lm-eval evaluate over every task (no environment report).
            res = evaluate(lm=lm, task_dict=loaded, limit=limit, bootstrap_iters=0, log_samples=False)["results"]
            scores = {}
            for t in tasks:
                if t.metric_key not in res[t.task]:
                    raise KeyError(f"task {t.task!r} reported no metric {t.metric_key!r}; it has: "
                                   f"{', '.join(k for k in res[t.task] if ',' in k)}")
                scores[t.task] = float(res[t.task][t.metric_key])
            st = handle.stats()
            results.append(VariantResult(v, scores, st.totals(), {str(k): s for k, s in st.layers().items()},
                                         time.perf_counter() - t0))
    finally:
        bar.close()
        patch_core.apply(model, None)
        task_module.tqdm = task_bar
        transformers.logging.set_verbosity(verbosity)
    return SweepResult(list(tasks), results)
