"""Per-image features of an anomaly map (PaDiM or PatchCore), for the good/defect classifier.

Why features and not the max alone: the max of the map only says how bad the single worst
patch is. A real defect also raises the map over a *region* (how large, how far above the
good-pixel level), while a good image with one noisy patch leaves a tiny one. The features pool
the map at several scales (the peak, the top 0.1 %, 1 %, 5 % of pixels, the whole map) and
measure the area and the excess above levels calibrated on the anomaly maps of held-out good
validation images, so the same feature means the same thing for every part type and image size.

Why only these (18, every one "more anomalous means larger"): the classifier is trained on
synthetic defects, and whatever tells synthetic defects from goods *other* than how anomalous the
map is, it learns as a fingerprint of the generator. The first version also had shape features
(skewness, kurtosis, peak / p90, number of regions, extent and elongation of the largest region)
and near-copies of the max (top-10 mean, p99.9, peak of the largest region, max / threshold).
Synthetic scratches and blobs are sharp isolated peaks, so "a peaky map" separated them from the
goods almost perfectly (skewness ROCAUC 1.0 on synthetic scratches), but real tire defects are
often broad and faint (skewness ROCAUC 0.55 on them): the classifier ranked real defects worse
than the max itself. With monotone evidence of anomaly only (enforced as monotone constraints),
the classifier can only choose how much each pooling scale and level counts; with no
near-copies of the max, its trees do not spend every split on variants of the peak.

Everything is computed on the map at the model's resolution (the working size, IMAGE_SIZE), vectorized in numpy
(sort once, read order statistics; sums in float64) and scipy.ndimage (connected regions, sizes
via bincount): no Python loop touches pixels; the only loop is over images for the region labels.
numpy and scipy only, no torch: a deployment with onnxruntime and xgboost (docs/deployment.md,
"Deploying without PyTorch") computes the classifier's features with this same module. scipy comes with
xgboost.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

# Levels the region features are computed at: key in the levels dict -> what it is.
LEVEL_KEYS = ("q99", "q999", "pixel", "image")
LEVEL_DOC = {
    "q99": "99th percentile of good validation pixels",
    "q999": "99.9th percentile of good validation pixels",
    "pixel": "pixel threshold of the validation goods (PIXEL_FALSE_REJECT_RATE of their pixels above it)",
    "image": "image threshold of the validation goods (IMAGE_FALSE_REJECT_RATE of their image scores above it)",
}
TOP_FRACTIONS = {"top0.1pct": 0.001, "top1pct": 0.01, "top5pct": 0.05}  # share of the map's pixels

# (name, direction, meaning). direction +1: larger means more anomalous, used as a monotone
# constraint by the classifier so it cannot learn "too anomalous means good". Every feature is +1
# (see the module docstring); the direction is kept so a future unconstrained one is explicit.
FEATURES: list[tuple[str, int, str]] = [
    ("max", 1, "maximum of the map (the plain PaDiM image score)"),
    *[(f"mean_{name}", 1, f"mean of the {name[3:].replace('pct', ' %')} highest pixels") for name in TOP_FRACTIONS],
    ("mean", 1, "mean of the map"),
    ("std", 1, "standard deviation of the map"),
]
for _level in LEVEL_KEYS:
    FEATURES += [
        (f"area_{_level}", 1, f"share of pixels above the {LEVEL_DOC[_level]}"),
        (f"excess_{_level}", 1, f"mean over the image of max(map - level, 0) for the {LEVEL_DOC[_level]}"),
        (f"largest_area_{_level}", 1, f"share of pixels of the largest connected region above the {LEVEL_DOC[_level]}"),
    ]
FEATURE_NAMES: list[str] = [name for name, _, _ in FEATURES]
MONOTONE: list[int] = [direction for _, direction, _ in FEATURES]


def levels_from_description(description: dict) -> dict[str, float]:
    """The feature levels from a calibration on the validation goods (`GoodMapSample.calibrate` in
    pipeline/training.py). train.py takes them before the out-of-fold maps arrive (their features are
    computed as they stream in) and saves them with the classifier; the model's own thresholds may
    then be recalibrated on all honest goods."""
    quantiles = description["validation"]["pixel_quantiles"]
    return {
        "q99": float(quantiles["0.99"]),
        "q999": float(quantiles["0.999"]),
        "pixel": float(description["thresholds"]["pixel"]),
        "image": float(description["thresholds"]["image"]),
    }


def _largest_region_area(above: np.ndarray) -> np.ndarray:
    """(N,) share of pixels of the largest 8-connected region of each (H, W) mask of (N, H, W)."""
    n, height, width = above.shape
    result = np.zeros(n, dtype=np.float64)
    structure = np.ones((3, 3), dtype=bool)  # 8-connectivity: a diagonal thin scratch stays one region
    for i in range(n):
        if not above[i].any():
            continue
        labels, count = ndimage.label(above[i], structure=structure)
        result[i] = np.bincount(labels.ravel(), minlength=count + 1)[1:].max() / (height * width)
    return result


def map_features(maps, levels: dict[str, float]) -> np.ndarray:
    """(N, len(FEATURE_NAMES)) float32 features of (N, H, W) anomaly maps (a numpy array, or a CPU torch
    tensor), columns in FEATURE_NAMES order."""
    maps = np.asarray(maps, dtype=np.float32)
    if maps.ndim == 2:
        maps = maps[None]
    n = maps.shape[0]
    flat = maps.reshape(n, -1)
    pixels = flat.shape[1]
    counts = {name: min(pixels, max(1, int(round(share * pixels)))) for name, share in TOP_FRACTIONS.items()}
    # only the highest pixels are ordered: a partition, then a sort of the top 5 % (a sort of the
    # whole map was half of these features' time for one 224 x 224 map); the same values in the
    # same order as a full sort gives them, so the same means
    kept = max(counts.values())
    top = np.partition(flat, pixels - kept, axis=1)[:, pixels - kept :]
    ordered = np.sort(top, axis=1)[:, ::-1]  # descending
    columns: dict[str, np.ndarray] = {"max": ordered[:, 0]}
    for name, count in counts.items():
        columns[f"mean_{name}"] = ordered[:, :count].mean(axis=1, dtype=np.float64)
    columns["mean"] = flat.mean(axis=1, dtype=np.float64)
    columns["std"] = flat.std(axis=1, dtype=np.float64)
    for level_key in LEVEL_KEYS:
        level = float(levels[level_key])
        above = maps > level
        columns[f"area_{level_key}"] = above.reshape(n, -1).mean(axis=1)
        columns[f"excess_{level_key}"] = np.maximum(flat - np.float32(level), 0).mean(axis=1, dtype=np.float64)
        columns[f"largest_area_{level_key}"] = _largest_region_area(above)
    return np.stack([np.asarray(columns[name], dtype=np.float64) for name in FEATURE_NAMES], axis=1).astype(np.float32)
