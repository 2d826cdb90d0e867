"""PNG figures of a sweep, in the table's units: score against γ per strategy, and per-layer expert
load before and after capacity in one forward pass of one variant."""

from __future__ import annotations

from pathlib import Path


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def plot_score_vs_gamma(sweep, path: Path, model_name: str = "model") -> Path:
    """One panel per task: the metric against γ, a line per strategy/policy, the baseline dashed, expert drop dotted."""
    plt = _plt()
    tasks = sweep.tasks
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.6 * len(tasks) + 2.2, 3.8), squeeze=False)
    lines: dict[str, list] = {}  # strategy/policy -> its capped variants
    for r in sweep.results[1:]:
        if r.variant.capacity_factor is not None:
            lines.setdefault(r.variant.strategy + (f"/{r.variant.policy}" if r.variant.policy else ""), []).append(r)
    gammas = sorted({r.variant.capacity_factor for rs in lines.values() for r in rs})
    for ax, t in zip(axes[0], tasks):
        for key, rs in sorted(lines.items()):
            rs = sorted(rs, key=lambda r: r.variant.capacity_factor)
            ax.plot([r.variant.capacity_factor for r in rs], [t.shown(r.scores[t.task]) for r in rs],
                    marker="o", label=key)
        ax.axhline(t.shown(sweep.baseline.scores[t.task]), color="k", ls="--", lw=1, label="baseline (no capacity)")
        for r in sweep.results[1:]:
            if r.variant.strategy == "expert_drop":
                ax.axhline(t.shown(r.scores[t.task]), color="gray", ls=":", lw=1, label="expert drop")
        ax.set_xlabel("capacity factor γ")
        if gammas:
            ax.set_xticks(gammas)
        ax.set_ylabel(f"{t.metric_name} " + ("(%)" if t.higher_is_better else "(lower is better)"))
        ax.set_title(f"{model_name}: {t.task}, γ = {', '.join(f'{g:g}' for g in gammas)}", fontsize=9)
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1 - 2.0 / fig.get_figwidth(), 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_expert_load(sweep, path: Path, model_name: str = "model") -> Path:
    """Per layer, routed pairs per expert in one variant's forward passes: native (before) and kept (after capacity)."""
    plt = _plt()
    # The tightest γ of score-policy token drop, else of any capped variant, else the baseline.
    capped = [r for r in sweep.results[1:] if r.variant.capacity_factor is not None]
    shown = min(capped, key=lambda r: (r.variant.strategy != "drop", r.variant.policy not in (None, "score"),
                                       r.variant.capacity_factor), default=None) or sweep.baseline
    layers = sorted(shown.layers, key=int)
    fig, axes = plt.subplots(len(layers), 1, figsize=(8, 1.9 * len(layers) + 0.8), squeeze=False)
    for ax, layer in zip(axes[:, 0], layers):
        before, after = shown.layers[layer]["load_before"], shown.layers[layer]["load_after"]
        xs = range(len(before))
        ax.bar([x - 0.2 for x in xs], before, width=0.4, label="before: native routing")
        ax.bar([x + 0.2 for x in xs], after, width=0.4, label="after: kept by capacity")
        ax.set_ylabel(f"layer {layer}\npairs")
        ax.grid(alpha=0.3, axis="y")
    axes[0, 0].legend(fontsize=7, loc="lower left", bbox_to_anchor=(0, 1.02), ncol=2, frameon=False)
    axes[-1, 0].set_xlabel("expert")
    tasks = ", ".join(t.task for t in sweep.tasks)
    fig.suptitle(f"{model_name}: routed pairs per expert on {tasks}, {shown.variant.name}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
