"""Figures a person would rather look at than read: ROC curves."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from evaluation.metrics import roc_points  # noqa: E402


def plot_roc(curves: dict[str, tuple], title: str, path: Path) -> Path:
    """One figure with a ROC curve per entry of `curves`: {label: (labels, scores, auc)}."""
    figure, axis = plt.subplots(figsize=(5, 5), dpi=100)
    for name, (labels, scores, auc) in curves.items():
        fpr, tpr = roc_points(labels, scores)
        axis.plot(fpr, tpr, label=f"{name} (AUC {auc:.3f})" if auc is not None else name)
    axis.plot([0, 1], [0, 1], color="gray", linestyle=":", linewidth=1)
    axis.set(xlabel="false positive rate", ylabel="true positive rate", title=title, xlim=(0, 1), ylim=(0, 1.01))
    axis.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path
