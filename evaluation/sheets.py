"""Localization sheets: one figure per chosen test image showing what the model saw and flagged.

Panels: the image as the model sees it (at its working size, cropped if it crops), the ground truth, the anomaly map
over the image, the predicted mask (map at or above the pixel threshold), and both outlines on the
image (ground truth green, prediction red). Only the few chosen images are re-read from disk
after scoring, so evaluation never holds every image in memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from dataset_manager import Preprocessor, printable_path, read_rgb  # noqa: E402


@dataclass
class SheetImage:
    """One chosen test image with its scores; `mask` is None where no ground truth exists."""

    path: Path
    defect_type: str
    score: float
    anomaly_map: np.ndarray  # (H, W) at the model's working size
    mask: np.ndarray | None  # (H, W) bool
    reason: str  # why it was chosen, e.g. "worst-scored good #1"
    verdict: str  # what the detector said: "defect" or "good"


def choose(scores: np.ndarray, labels: np.ndarray, count: int) -> list[tuple[int, str]]:
    """(index, reason) of the highest-scored goods (likely false rejects), then the highest- and
    lowest-scored defects (clearest finds and likeliest escapes), `count` of each, no repeats."""
    scores, labels = np.asarray(scores), np.asarray(labels).astype(bool)
    good, defect = np.flatnonzero(~labels), np.flatnonzero(labels)
    chosen: list[tuple[int, str]] = []
    seen: set[int] = set()

    def take(indices: np.ndarray, reason: str) -> None:
        for rank, index in enumerate(indices[:count], start=1):
            if int(index) not in seen:
                seen.add(int(index))
                chosen.append((int(index), f"{reason} #{rank}"))

    take(good[np.argsort(-scores[good], kind="stable")], "worst-scored good")
    take(defect[np.argsort(-scores[defect], kind="stable")], "best-scored defect")
    take(defect[np.argsort(scores[defect], kind="stable")], "worst-scored defect")
    return chosen




def draw_sheet(
    item: SheetImage,
    preprocessor: Preprocessor,
    pixel_threshold: float,
    image_threshold: float,
    color_range: tuple[float, float],
    path: Path,
) -> Path:
    """Write the five-panel sheet of one image to `path`."""
    view = preprocessor.model_view(read_rgb(item.path, full_scale=preprocessor.gray_full_scale))
    predicted = item.anomaly_map >= pixel_threshold
    low, high = color_range
    aspect = min(3.0, max(0.25, view.shape[0] / view.shape[1]))  # panel height / width, for tall and wide parts
    figure, axes = plt.subplots(1, 5, figsize=(15, 0.4 + 2.8 * aspect), dpi=80)
    axes[0].imshow(view)
    axes[0].set_title("image")
    if item.mask is not None:
        axes[1].imshow(item.mask, cmap="gray", vmin=0, vmax=1)
        axes[1].set_title("ground truth")
    else:
        axes[1].imshow(np.zeros(view.shape[:2]), cmap="gray", vmin=0, vmax=1)
        axes[1].set_title("ground truth (none)" if item.defect_type != "good" else "ground truth (good)")
    axes[2].imshow(view)
    heat = axes[2].imshow(item.anomaly_map, cmap="jet", alpha=0.5, vmin=low, vmax=high)
    figure.colorbar(heat, ax=axes[2], fraction=0.046, pad=0.04)
    axes[2].set_title("anomaly map")
    axes[3].imshow(predicted, cmap="gray", vmin=0, vmax=1)
    axes[3].set_title(f"predicted (>= {pixel_threshold:.3g})")
    axes[4].imshow(view)
    if item.mask is not None and item.mask.any():
        axes[4].contour(item.mask.astype(float), levels=[0.5], colors="lime", linewidths=1.2)
    if predicted.any():
        axes[4].contour(predicted.astype(float), levels=[0.5], colors="red", linewidths=1.2)
    axes[4].set_title("contours: truth green, predicted red", fontsize=9)
    for axis in axes:
        axis.set_axis_off()
    figure.suptitle(
        f"{item.reason}: {printable_path(item.path.name)} ({item.defect_type}), score {item.score:.3g} vs threshold "
        f"{image_threshold:.3g}, verdict {item.verdict}",
        fontsize=10,
    )
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path
