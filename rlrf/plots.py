"""Figures, saved as PNG (matplotlib, headless): the evaluate stage's, and the helpers the check's and the DPO
stage's figures use."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def ci_errorbar(ax, xs, cis, **kw):
    """Points at xs with each paired_bootstrap figure's mean and its (asymmetric) interval as the bar."""
    means = [c["mean"] for c in cis]
    return ax.errorbar(list(xs), means, yerr=[[m - c["low"] for m, c in zip(means, cis)],
                                              [c["high"] - m for m, c in zip(means, cis)]], capsize=3, **kw)


def pyplot():
    """matplotlib.pyplot on the headless Agg backend (no display on a compute node)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path: Path, dpi: int = 110) -> Path:
    """Lay out, write atomically (nothing half-written at `path`), close."""
    from rlrf.files import atomic_path

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    pyplot().close(fig)
    return path


def round_label(k: int) -> str:
    return "original" if k == 0 else f"round {k}"


def plot_rounds(per_round: dict, base: dict, path: Path, metrics=("map@5", "ndcg@5")) -> Path:
    """Figure 4 analogue: test MAP@5 / NDCG@5 of the reranker trained on generator k's knowledge, per k.

    per_round: {backbone: {k: {metric: {"mean", "std"}}}}; base: {backbone: {metric: {...}}} drawn as a
    dotted line (the reranker without knowledge) so a reader sees how much of the gain is the knowledge."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.6), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for i, (backbone, rounds) in enumerate(sorted(per_round.items())):
            ks = sorted(rounds)
            mean = [rounds[k][metric]["mean"] for k in ks]
            std = [rounds[k][metric]["std"] for k in ks]
            color = f"C{i}"
            ax.errorbar(ks, mean, yerr=std, marker="o", capsize=3, color=color, label=f"{backbone.upper()} + knowledge")
            if backbone in base:
                ax.axhline(base[backbone][metric]["mean"], ls=":", color=color, label=f"{backbone.upper()} base")
        ks = sorted({k for r in per_round.values() for k in r})
        ax.set_xticks(ks, [round_label(k) for k in ks])
        ax.set_ylabel(f"test {metric.upper()}")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Reranker quality with each generator's profiles (mean ± std over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_rewards(r0: np.ndarray, rk: np.ndarray, k: int, ci: tuple[float, float], metric: str, path: Path) -> Path:
    """Reward distributions of the original vs generator k's profiles on the same test users, and the
    per-user paired difference with its bootstrap 95% interval."""
    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    bins = np.linspace(min(r0.min(), rk.min()), max(r0.max(), rk.max()) + 1e-9, 21)
    a.hist(r0, bins=bins, alpha=0.55, label=f"original (mean {r0.mean():.3f})")
    a.hist(rk, bins=bins, alpha=0.55, label=f"{round_label(k)} (mean {rk.mean():.3f})")
    a.set_xlabel(f"reward ({metric}) per test user")
    a.set_ylabel("users")
    a.legend(fontsize=8)
    d = rk - r0
    b.hist(d, bins=21, color="C2", alpha=0.8)
    b.axvline(0, color="k", lw=0.8)
    b.axvline(d.mean(), color="C3", label=f"mean {d.mean():+.4f}, 95% CI [{ci[0]:+.4f}, {ci[1]:+.4f}]")
    b.axvspan(ci[0], ci[1], color="C3", alpha=0.15)
    b.set_xlabel(f"paired difference ({round_label(k)} - original)")
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
