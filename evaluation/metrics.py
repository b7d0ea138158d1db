"""Detection and localization metrics, computed as the PaDiM paper and MVTec AD compute them."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve


def image_rocauc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    """Area under the ROC curve of image scores; None when only one class is present."""
    labels = np.asarray(labels).astype(bool)
    if labels.all() or not labels.any():
        return None
    return float(roc_auc_score(labels, scores))


def pixel_rocauc(masks: np.ndarray, maps: np.ndarray) -> float | None:
    """ROCAUC over all pixels of all given images pooled together (None if one class only)."""
    return image_rocauc(np.asarray(masks).reshape(-1), np.asarray(maps).reshape(-1))


def per_defect_rocauc(defect_types: list[str], scores: np.ndarray) -> dict[str, dict]:
    """Image ROCAUC of each defect type against the good images, with counts."""
    types = np.asarray(defect_types)
    good = types == "good"
    table = {}
    for kind in sorted(set(defect_types) - {"good"}):
        chosen = good | (types == kind)
        table[kind] = {"count": int((types == kind).sum()), "image_rocauc": image_rocauc(types[chosen] == kind, scores[chosen])}
    return table


def roc_points(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rates, true positive rates) of the ROC curve."""
    fpr, tpr, _ = roc_curve(np.asarray(labels).astype(bool), scores)
    return fpr, tpr
