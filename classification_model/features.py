"""Per-image features of a PaDiM anomaly map, for the good/defect classifier.

Why features and not the max alone: the max of the map only says how bad the single worst
patch is. A real defect also leaves a *region* above the good-pixel level (its area, how many
pieces, how far it sticks out), while a good image with one noisy patch leaves a tiny one. The
features below describe the map's value distribution and its above-threshold regions; the
thresholds ("levels") are calibrated on the anomaly maps of held-out good validation images, so
the same feature means the same thing for every part type and image size.

Everything is computed on the map at the model's resolution (CROP x CROP), vectorized in torch
(sort once, read order statistics) and scipy.ndimage (connected regions, per-region sums via
bincount): no Python loop touches pixels; the only loop is over images for the region labels.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

# Levels the region features are computed at: key in the levels dict -> what it is.
LEVEL_KEYS = ("q99", "q999", "pixel", "image")
LEVEL_DOC = {
    "q99": "99th percentile of good validation pixels",
    "q999": "99.9th percentile of good validation pixels",
    "pixel": "the model's pixel threshold (PIXEL_FALSE_REJECT_RATE of good pixels above it)",
    "image": "the model's image threshold (IMAGE_FALSE_REJECT_RATE of good images have their max above it)",
}
TOP_FRACTIONS = {"top10": 10, "top0.1pct": 0.001, "top1pct": 0.01, "top5pct": 0.05}  # int: pixel count; float: share
PERCENTILES = (50, 90, 99, 99.9)

# (name, direction, meaning). direction +1: larger means more anomalous (used as a monotone
# constraint by the classifier so it cannot learn "too anomalous means good"); 0: no constraint.
FEATURES: list[tuple[str, int, str]] = [
    ("max", 1, "maximum of the map (the plain PaDiM image score)"),
    *[(f"mean_{name}", 1, f"mean of the {name} highest pixels") for name in TOP_FRACTIONS],
    *[(f"p{p:g}", 1, f"{p:g}th percentile of the map's pixels") for p in PERCENTILES],
    ("mean", 1, "mean of the map"),
    ("std", 1, "standard deviation of the map"),
    ("max_minus_median", 1, "how far the peak sticks out of the image's own background"),
    ("max_over_p90", 0, "peak relative to the image's 90th percentile (a sharp spike vs. a raised floor)"),
    ("skewness", 0, "skewness of the map's values: a heavy upper tail means a localized anomaly"),
    ("kurtosis", 0, "excess kurtosis of the map's values"),
]
for _level in LEVEL_KEYS:
    FEATURES += [
        (f"area_{_level}", 1, f"share of pixels above the {LEVEL_DOC[_level]}"),
        (f"excess_{_level}", 1, f"mean over the image of max(map - level, 0) for the {LEVEL_DOC[_level]}"),
        (f"regions_{_level}", 0, f"number of connected regions above the {LEVEL_DOC[_level]}"),
        (f"largest_area_{_level}", 1, f"share of pixels of the largest region above the {LEVEL_DOC[_level]}"),
        (f"largest_peak_{_level}", 1, f"peak of the largest region above the {LEVEL_DOC[_level]} (0 when none)"),
    ]
FEATURES += [
    ("largest_extent", 0, "largest region above the pixel threshold: its area / its bounding box area (1: a filled box)"),
    ("largest_elongation", 0, "largest region above the pixel threshold: sqrt of the ratio of its inertia axes (1: round; large: a line)"),
    ("peak_over_image_threshold", 1, "max / the image threshold (1.0 is the plain score's decision boundary)"),
]
FEATURE_NAMES: list[str] = [name for name, _, _ in FEATURES]
MONOTONE: list[int] = [direction for _, direction, _ in FEATURES]


def levels_from_description(description: dict) -> dict[str, float]:
    """The calibrated levels of a model's model.json (`calibrate` in pipeline/training.py wrote them)."""
    quantiles = description["validation"]["pixel_quantiles"]
    return {
        "q99": float(quantiles["0.99"]),
        "q999": float(quantiles["0.999"]),
        "pixel": float(description["thresholds"]["pixel"]),
        "image": float(description["thresholds"]["image"]),
    }


def _region_features(above: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For (N, H, W) masks: (N, 3) [count, largest area share, largest peak] and (N, 2) [extent, elongation]
    of the largest region. Labels per image; per-region statistics with bincount, no pixel loops."""
    n, height, width = above.shape
    stats = np.zeros((n, 3), dtype=np.float64)
    shape = np.zeros((n, 2), dtype=np.float64)
    structure = np.ones((3, 3), dtype=bool)  # 8-connectivity: a diagonal thin scratch stays one region
    rows, cols = np.mgrid[0:height, 0:width]
    for i in range(n):
        labels, count = ndimage.label(above[i], structure=structure)
        if count == 0:
            continue
        flat = labels.ravel()
        sizes = np.bincount(flat, minlength=count + 1)[1:]
        largest = int(np.argmax(sizes)) + 1
        peak = ndimage.maximum(values[i], labels, largest)
        stats[i] = (count, sizes[largest - 1] / (height * width), peak)
        ys, xs = rows[labels == largest], cols[labels == largest]
        box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
        shape[i, 0] = ys.size / box
        if ys.size >= 2:
            eigen = np.linalg.eigvalsh(np.cov(np.stack([ys, xs]).astype(np.float64)) + np.eye(2) / 12.0)
            shape[i, 1] = np.sqrt(eigen[1] / eigen[0])
        else:
            shape[i, 1] = 1.0
    return stats, shape


def map_features(maps: torch.Tensor, levels: dict[str, float]) -> np.ndarray:
    """(N, len(FEATURE_NAMES)) float32 features of (N, H, W) anomaly maps, columns in FEATURE_NAMES order."""
    if maps.ndim == 2:
        maps = maps[None]
    maps = maps.detach().float().cpu()
    n = maps.shape[0]
    flat = maps.flatten(1)
    pixels = flat.shape[1]
    ordered = flat.sort(dim=1, descending=True).values
    columns: dict[str, torch.Tensor] = {"max": ordered[:, 0]}
    for name, size in TOP_FRACTIONS.items():
        k = int(size) if isinstance(size, int) else max(1, int(round(size * pixels)))
        columns[f"mean_{name}"] = ordered[:, : min(k, pixels)].mean(dim=1)
    for p in PERCENTILES:
        index = min(pixels - 1, max(0, int(round((1 - p / 100) * (pixels - 1)))))
        columns[f"p{p:g}"] = ordered[:, index]
    mean = flat.mean(dim=1)
    std = flat.std(dim=1, unbiased=False)
    centred = (flat - mean[:, None]) / std.clamp_min(1e-12)[:, None]
    median = ordered[:, (pixels - 1) // 2]
    columns.update(
        mean=mean,
        std=std,
        max_minus_median=ordered[:, 0] - median,
        max_over_p90=ordered[:, 0] / columns["p90"].clamp_min(1e-12),
        skewness=(centred**3).mean(dim=1),
        kurtosis=(centred**4).mean(dim=1) - 3.0,
    )
    values = maps.numpy()
    largest_shape = np.zeros((n, 2))
    for level_key in LEVEL_KEYS:
        level = float(levels[level_key])
        above = values > level
        columns[f"area_{level_key}"] = torch.from_numpy(above.reshape(n, -1).mean(axis=1))
        columns[f"excess_{level_key}"] = (flat - level).clamp_min(0).mean(dim=1)
        stats, shape = _region_features(above, values)
        columns[f"regions_{level_key}"] = torch.from_numpy(stats[:, 0])
        columns[f"largest_area_{level_key}"] = torch.from_numpy(stats[:, 1])
        columns[f"largest_peak_{level_key}"] = torch.from_numpy(stats[:, 2])
        if level_key == "pixel":
            largest_shape = shape
    columns["largest_extent"] = torch.from_numpy(largest_shape[:, 0])
    columns["largest_elongation"] = torch.from_numpy(largest_shape[:, 1])
    columns["peak_over_image_threshold"] = ordered[:, 0] / max(float(levels["image"]), 1e-12)
    return np.stack([columns[name].double().numpy() for name in FEATURE_NAMES], axis=1).astype(np.float32)
