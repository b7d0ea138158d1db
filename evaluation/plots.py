"""Figures a person would rather look at than read: ROC, PR and PRO curves, score histograms.

Every function takes precomputed curve points (pixel curves cost one sort of millions of pixels:
done once in evaluation.metrics, drawn here as many times as needed) and writes one PNG.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

# A defect type named in a script the bundled font lacks (穴) is drawn as boxes; matplotlib's warning
# per missing glyph, with its source line, would bury eval.py's own output.
warnings.filterwarnings("ignore", message=r"Glyph \d+ .*missing from font", category=UserWarning)

# A drawn curve needs no more points than the figure has pixels across.
_MAX_POINTS = 4000


def thin(x: np.ndarray, y: np.ndarray, max_points: int = _MAX_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """At most `max_points` evenly spaced points of a curve, its ends kept: for drawing only."""
    x, y = np.asarray(x), np.asarray(y)
    if len(x) <= max_points:
        return x, y
    keep = np.unique(np.linspace(0, len(x) - 1, max_points).round().astype(int))
    return x[keep], y[keep]


def _label(name: str, value: float | None, what: str) -> str:
    return f"{name} ({what} {value:.3f})" if value is not None else name


def _save(figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path


# What a ROC curve's axes count, in the words of the report's tables: of images, or of pixels.
IMAGE_AXES = ("false-reject rate (good images flagged)", "recall (defect images found)")
PIXEL_AXES = ("good pixels flagged (false positive rate)", "defect pixels found (true positive rate)")


def plot_roc(curves: dict[str, tuple], title: str, path: Path, operating: tuple[float, float] | None = None, axes: tuple[str, str] = IMAGE_AXES) -> Path:
    """One figure with a ROC curve per entry of `curves`: {name: (fpr, tpr, auc or None)}; the
    operating point in force (its false positive rate and recall, on `axes`) as a dot."""
    figure, axis = plt.subplots(figsize=(5, 5), dpi=100)
    for name, (fpr, tpr, auc) in curves.items():
        axis.plot(*thin(fpr, tpr), label=_label(name, auc, "AUC"))
    if operating is not None:
        what = "threshold in force" if axes == IMAGE_AXES else "pixel threshold in force"
        axis.plot(*operating, "o", color="black", label=f"{what} ({operating[0]:.2f} flagged, {operating[1]:.2f} found)")
    axis.plot([0, 1], [0, 1], color="gray", linestyle=":", linewidth=1)
    axis.set(xlabel=axes[0], ylabel=axes[1], title=title, xlim=(0, 1), ylim=(0, 1.01))
    axis.legend(loc="lower right", fontsize=9)
    return _save(figure, path)


def plot_pr(curves: dict[str, tuple], operating: tuple[float, float] | None, title: str, path: Path) -> Path:
    """Precision-recall curves {name: (recall, precision, f1max)}; the operating point as a dot."""
    figure, axis = plt.subplots(figsize=(5, 5), dpi=100)
    for name, (recall, precision, best) in curves.items():
        axis.plot(recall, precision, drawstyle="steps-post", label=_label(name, best, "F1-max, optimistic"))
    if operating is not None:
        axis.plot(*operating, "o", color="black", label=f"threshold in force (recall {operating[0]:.2f}, precision {operating[1]:.2f})")
    axis.set(xlabel="recall (defect images found)", ylabel="precision (flagged images that are defects)", title=title, xlim=(0, 1.01), ylim=(0, 1.01))
    axis.legend(loc="lower left", fontsize=9)
    return _save(figure, path)


def plot_pro(curves: dict[str, tuple], fpr_limit: float, title: str, path: Path) -> Path:
    """PRO against pixel FPR up to the integration limit: {name: (fpr, pro, normalized area or None)}."""
    figure, axis = plt.subplots(figsize=(5, 5), dpi=100)
    for name, (fpr, pro, area) in curves.items():
        inside = int(np.searchsorted(fpr, fpr_limit, side="right")) + 1
        axis.plot(*thin(fpr[:inside], pro[:inside]), label=_label(name, area, f"AU-PRO@{fpr_limit:g}"))
    axis.set(xlabel="good pixels flagged (false positive rate)", ylabel="per-region overlap (share of each defect found)", title=title,
             xlim=(0, fpr_limit), ylim=(0, 1.01))
    axis.legend(loc="lower right", fontsize=9)
    return _save(figure, path)


def plot_histogram(good: np.ndarray, defect: np.ndarray, threshold: float | None, title: str, xlabel: str, path: Path,
                   threshold_label: str = "threshold in force") -> Path:
    """Overlaid histograms of good and defect scores, the threshold as a vertical line (`threshold_label`:
    what it is; the threshold in force unless another score decides the verdict)."""
    figure, axis = plt.subplots(figsize=(6, 4), dpi=100)
    values = np.concatenate([np.asarray(good, dtype=float), np.asarray(defect, dtype=float)])
    bins = np.histogram_bin_edges(values, bins=30) if len(values) else 10
    for values_of, color, name in ((good, "tab:green", "good"), (defect, "tab:red", "defect")):  # light fills, each with its own outline:
        if len(values_of):  # where the two share a bin both counts stay readable
            axis.hist(values_of, bins=bins, histtype="stepfilled", alpha=0.25, color=color)
            axis.hist(values_of, bins=bins, histtype="step", linewidth=1.5, color=color, label=f"{name} ({len(values_of)})")
    if threshold is not None:
        axis.axvline(threshold, color="black", linestyle="--", label=f"{threshold_label} {threshold:.3g}")
    axis.set(xlabel=xlabel, ylabel="images", title=title)
    axis.legend(fontsize=9)
    return _save(figure, path)
