"""PNG figures of a sweep: score against γ per strategy, and per-layer expert load before/after."""

from __future__ import annotations

from pathlib import Path


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def plot_score_vs_gamma(sweep, path: Path) -> Path:
    """One panel per task: the metric against γ, a line per strategy/policy, the baseline dashed."""
    plt = _plt()
    tasks = sweep.tasks
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 3.8), squeeze=False)
    base = sweep.baseline
    lines: dict[str, list] = {}
    for r in sweep.results[1:]:
        if r.variant.capacity_factor is None:
            continue
        key = r.variant.strategy + (f"/{r.variant.policy}" if r.variant.policy else "")
        lines.setdefault(key, []).append(r)
    for ax, t in zip(axes[0], tasks):
        for key, rs in sorted(lines.items()):
            rs = sorted(rs, key=lambda r: r.variant.capacity_factor)
            ax.plot([r.variant.capacity_factor for r in rs], [r.scores[t.task] for r in rs], marker="o", label=key)
        ax.axhline(base.scores[t.task], color="k", ls="--", lw=1, label="baseline")
        for r in sweep.results[1:]:
            if r.variant.strategy == "expert_drop":
                ax.axhline(r.scores[t.task], color="gray", ls=":", lw=1, label="expert drop")
        ax.set_xlabel("capacity factor γ")
        ax.set_ylabel(t.metric.split(",")[0] + ("" if t.higher_is_better else " (lower is better)"))
        ax.set_title(t.task)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_expert_load(sweep, path: Path) -> Path:
    """Per layer, tokens per expert: the baseline (before) and the tightest score-drop variant (after)."""
    plt = _plt()
    base = sweep.baseline
    capped = [r for r in sweep.results[1:] if r.variant.capacity_factor is not None]
    after = min(capped, key=lambda r: (r.variant.policy not in (None, "score"), r.variant.capacity_factor),
                default=None)
    layers = sorted(base.layers, key=int)
    fig, axes = plt.subplots(len(layers), 1, figsize=(8, 2.2 * len(layers)), squeeze=False)
    for ax, layer in zip(axes[:, 0], layers):
        load = base.layers[layer]["load_before"]
        xs = range(len(load))
        ax.bar([x - 0.2 for x in xs], load, width=0.4, label="before (native routing)")
        if after is not None:
            ax.bar([x + 0.2 for x in xs], after.layers[layer]["load_after"], width=0.4,
                   label=f"after ({after.variant.name})")
        ax.set_ylabel(f"layer {layer}")
        ax.grid(alpha=0.3, axis="y")
    axes[0, 0].legend(fontsize=7)
    axes[-1, 0].set_xlabel("expert")
    fig.suptitle("pairs per expert over the evaluation")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
