"""Detection and localization metrics, computed as the PaDiM paper and MVTec AD compute them.

Image level: ROCAUC of the image score (the anomaly map's maximum), as in PaDiM's Table 2.
Pixel level: ROCAUC over every pixel of every test image pooled together, at the resolution the
model sees (IMAGE_SIZE, height x width), as the PaDiM reference code and anomalib do; and PRO, MVTec AD's
per-region overlap, which weights every connected defect region equally so that one big defect
cannot hide many missed small ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import label

# sklearn is imported inside the functions that use it: ~60 MB that train.py would otherwise hold
# through its out-of-fold pass, its memory peak (docs/performance.md, "Lean training run").

# Pixels sorted and accumulated per chunk: bounds the temporaries for a few hundred maps.
_CHUNK = 1 << 22


def image_rocauc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    """Area under the ROC curve of image scores; None when only one class is present."""
    labels = np.asarray(labels).astype(bool)
    if labels.all() or not labels.any():
        return None
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(labels, scores))


def bootstrap_rocauc_gain(labels: np.ndarray, baseline: np.ndarray, other: np.ndarray, resamples: int = 1000, seed: int = 0) -> np.ndarray | None:
    """(resamples,) ROCAUC(other) - ROCAUC(baseline) over stratified bootstrap resamples of the images
    (goods and defects each drawn with replacement, both scores on the same draw); None when a class
    is missing or the pair table would exceed ~4 M entries.

    Why paired and stratified: eval.py asks whether the classifier ranks *this* test set worse than
    the image score beyond what resampling the same few dozen images explains. Vectorized: each
    score's defect-vs-good comparison table C (1 above, 0.5 tie) is built once, and a resample's
    ROCAUC is counts_defects @ C @ counts_goods / (n_defects * n_goods)."""
    labels = np.asarray(labels).astype(bool)
    n_defect, n_good = int(labels.sum()), int((~labels).sum())
    if n_defect == 0 or n_good == 0 or n_defect * n_good > 4_000_000:
        return None
    rng = np.random.default_rng(seed)
    defect_counts = rng.multinomial(n_defect, np.full(n_defect, 1 / n_defect), size=resamples).astype(np.float64)
    good_counts = rng.multinomial(n_good, np.full(n_good, 1 / n_good), size=resamples).astype(np.float64)

    def resampled_auc(scores: np.ndarray) -> np.ndarray:
        scores = np.asarray(scores, dtype=np.float64)
        table = np.sign(scores[labels][:, None] - scores[~labels][None, :]) * 0.5 + 0.5
        return ((defect_counts @ table) * good_counts).sum(axis=1) / (n_defect * n_good)  # one BLAS product, not einsum's triple loop

    return resampled_auc(other) - resampled_auc(baseline)


def roc_points(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rates, true positive rates) of the ROC curve."""
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(np.asarray(labels).astype(bool), scores)
    return fpr, tpr


def pr_points(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(recall, precision) of the precision-recall curve of image scores."""
    from sklearn.metrics import precision_recall_curve

    precision, recall, _ = precision_recall_curve(np.asarray(labels).astype(bool), scores)
    return recall, precision


def f1_max(labels: np.ndarray, scores: np.ndarray) -> dict | None:
    """The best F1 over every threshold of the test set itself, and that threshold.

    Optimistic by construction (the threshold is tuned on the very images it is scored on):
    an upper bound on what the operating threshold can reach, not an estimate of it.
    """
    labels = np.asarray(labels).astype(bool)
    if not labels.any():
        return None
    from sklearn.metrics import precision_recall_curve

    precision, recall, thresholds = precision_recall_curve(labels, scores)
    f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0.0)[:-1]
    best = int(np.argmax(f1))
    return {"f1": float(f1[best]), "threshold": float(thresholds[best])}


def _ratio(numerator: int, denominator: int) -> float | None:
    return numerator / denominator if denominator else None


def verdict_metrics(labels: np.ndarray, predicted: np.ndarray) -> dict:
    """Confusion matrix and the rates a line manager asks about, for fixed good/defect verdicts.

    False-reject rate: share of good parts judged defect (scrap and re-inspection cost).
    Escape rate: share of defective parts judged good (what reaches the customer).
    A rate whose denominator is empty (no goods, no defects, nothing flagged) is None.
    """
    labels = np.asarray(labels).astype(bool)
    predicted = np.asarray(predicted).astype(bool)
    tp = int((labels & predicted).sum())
    fp = int((~labels & predicted).sum())
    tn = int((~labels & ~predicted).sum())
    fn = int((labels & ~predicted).sum())
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    f1 = None if recall is None else (2 * tp / (2 * tp + fp + fn))  # 0 when nothing found, even with nothing flagged
    return {
        "confusion": {"true_defect": tp, "false_defect": fp, "true_good": tn, "false_good": fn},
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "false_reject_rate": _ratio(fp, fp + tn),
        "escape_rate": _ratio(fn, fn + tp),
        "accuracy": _ratio(tp + tn, len(labels)),
    }


def label_regions(masks: np.ndarray) -> tuple[np.ndarray, int]:
    """Each pixel's connected defect region (8-connected, per image, numbered 1..K over all images; 0 = good).

    8-connectivity as in MVTec AD's evaluation code (scipy.ndimage.label with a 3x3 structure).
    """
    masks = np.asarray(masks).astype(bool)
    masks = masks.reshape((-1,) + masks.shape[-2:])
    regions = np.zeros(masks.shape, dtype=np.int32)
    count = 0
    structure = np.ones((3, 3), dtype=int)
    for index, mask in enumerate(masks):
        labeled, found = label(mask, structure=structure)
        regions[index] = np.where(labeled > 0, labeled + count, 0)
        count += found
    return regions, count


@dataclass
class PixelCurves:
    """Pixel ROC and PRO curves on shared thresholds, from the highest score down.

    fpr: share of good pixels at or above each threshold; tpr: share of defect pixels;
    pro: mean over defect regions of each region's share of pixels at or above it.
    Starts at (0, 0, 0) and ends at (1, 1, 1). Points inside straight runs are dropped (areas are exact).
    """

    fpr: np.ndarray
    tpr: np.ndarray
    pro: np.ndarray
    n_regions: int
    n_good_pixels: int
    n_defect_pixels: int


def _drop_collinear(fpr: np.ndarray, tpr: np.ndarray, pro: np.ndarray) -> np.ndarray:
    """Indices to keep: interior points of a vertical or horizontal run add nothing to any area."""
    if len(fpr) < 3:
        return np.arange(len(fpr))
    vertical = (fpr[1:-1] == fpr[:-2]) & (fpr[1:-1] == fpr[2:])
    horizontal = (tpr[1:-1] == tpr[:-2]) & (tpr[1:-1] == tpr[2:]) & (pro[1:-1] == pro[:-2]) & (pro[1:-1] == pro[2:])
    keep = np.ones(len(fpr), dtype=bool)
    keep[1:-1] = ~(vertical | horizontal)
    return np.flatnonzero(keep)


def pixel_curves(masks: np.ndarray, maps: np.ndarray) -> PixelCurves | None:
    """Pixel ROC and PRO curves of all maps pooled; None without good pixels or without defect pixels.

    One sort of all pixel scores, then running sums: each good pixel adds 1/(good pixels) to the
    FPR, each defect pixel adds 1/(defect pixels) to the TPR and 1/(K * size of its region) to the
    PRO (K regions). Ties share one threshold: only the last pixel of a run of equal scores makes a
    point. Done chunk by chunk over the sorted order so temporaries stay small.
    """
    maps = np.asarray(maps)  # float32 halves the sort's memory; float64 maps keep their finer distinctions
    scores = np.ascontiguousarray(maps, dtype=np.float64 if maps.dtype == np.float64 else np.float32).reshape(-1)
    regions, n_regions = label_regions(masks)
    regions = regions.reshape(-1)
    if len(scores) != len(regions):
        raise ValueError(f"{len(scores)} map pixels but {len(regions)} mask pixels")
    sizes = np.bincount(regions, minlength=n_regions + 1)
    n_good, n_defect = int(sizes[0]), int(sizes[1:].sum())
    if n_good == 0 or n_regions == 0:
        return None
    pro_step = np.zeros(n_regions + 1)
    pro_step[1:] = 1.0 / (n_regions * sizes[1:])
    order = np.argsort(scores, kind="stable")[::-1]
    fp_total, tp_total, pro_total = 0, 0, 0.0
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = [(np.zeros(1), np.zeros(1), np.zeros(1))]
    for start in range(0, len(order), _CHUNK):
        chosen = order[start : start + _CHUNK]
        chunk_scores, chunk_regions = scores[chosen], regions[chosen]
        fp = fp_total + np.cumsum(chunk_regions == 0)
        tp = tp_total + np.cumsum(chunk_regions > 0)
        pro = pro_total + np.cumsum(pro_step[chunk_regions])
        following = scores[order[start + _CHUNK]] if start + _CHUNK < len(order) else None
        last = np.empty(len(chosen), dtype=bool)
        last[:-1] = chunk_scores[1:] != chunk_scores[:-1]
        last[-1] = following is None or following != chunk_scores[-1]
        ends = np.flatnonzero(last)
        parts.append((fp[ends] / n_good, tp[ends] / n_defect, pro[ends]))
        fp_total, tp_total, pro_total = int(fp[-1]), int(tp[-1]), float(pro[-1])
    fpr, tpr, pro = (np.concatenate(column) for column in zip(*parts))
    pro[-1] = 1.0  # the running sum of 1/(K*size) lands on 1 up to rounding
    keep = _drop_collinear(fpr, tpr, pro)
    return PixelCurves(fpr[keep], tpr[keep], pro[keep], n_regions, n_good, n_defect)


def area_up_to(x: np.ndarray, y: np.ndarray, limit: float) -> float:
    """Trapezoid area under y(x) for x in [0, limit], y interpolated linearly at the limit.

    x must be non-decreasing and start at 0 (as an FPR does).
    """
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    inside = int(np.searchsorted(x, limit, side="right"))  # points with x <= limit
    xs, ys = list(x[:inside]), list(y[:inside])
    if inside < len(x) and xs[-1] < limit:
        x0, x1, y0, y1 = x[inside - 1], x[inside], y[inside - 1], y[inside]
        xs.append(limit)
        ys.append(y0 + (y1 - y0) * (limit - x0) / (x1 - x0))
    return float(np.trapezoid(ys, xs))


def pro_auc(curves: PixelCurves | None, fpr_limit: float) -> float | None:
    """Area under the PRO curve up to `fpr_limit` divided by the limit: 1 is perfect, MVTec AD's AU-PRO."""
    if curves is None:
        return None
    if not 0 < fpr_limit <= 1:
        raise ValueError(f"the PRO FPR limit must be in (0, 1], got {fpr_limit}")
    return area_up_to(curves.fpr, curves.pro, fpr_limit) / fpr_limit


def pixel_auc(curves: PixelCurves | None) -> float | None:
    """Pooled pixel ROCAUC from the curves (equal to roc_auc_score on all pixels)."""
    return None if curves is None else float(np.trapezoid(curves.tpr, curves.fpr))


def pixel_rocauc(masks: np.ndarray, maps: np.ndarray) -> float | None:
    """ROCAUC over all pixels of all given images pooled together (None if one class only)."""
    return pixel_auc(pixel_curves(masks, maps))


def per_defect_rocauc(defect_types: list[str], scores: np.ndarray) -> dict[str, dict]:
    """Image ROCAUC of each defect type against the good images, with counts."""
    types = np.asarray(defect_types)
    scores = np.asarray(scores)
    good = types == "good"
    table = {}
    for kind in sorted(set(defect_types) - {"good"}):
        chosen = good | (types == kind)
        table[kind] = {"count": int((types == kind).sum()), "image_rocauc": image_rocauc(types[chosen] == kind, scores[chosen])}
    return table


def threshold_at_rate(goods: np.ndarray, rate: float) -> float:
    """The threshold at false-reject `rate` on the honest goods' values (a verdict flags value >=
    threshold): the lowest of their own values that flags at most floor(rate x count) of them, and
    just above the highest when that is 0 (rate 0 flags none). Always one of the goods' values or
    just above one, never a point between two: so for the log-odds of the image score (a monotone
    map) the threshold is the map of the image score's threshold, and the two never disagree."""
    ordered = np.sort(np.asarray(goods, dtype=np.float64).ravel())
    allowed = int(np.floor(rate * ordered.size + 1e-9))
    if ordered.size == 0:
        raise ValueError("a threshold needs at least one good value")
    if np.isnan(ordered[-1]):  # sorted last: a NaN threshold would pass every image without a word
        raise ValueError("a threshold cannot be set on NaN values: the model's scores are not numbers")
    if allowed == 0:
        return float(np.nextafter(ordered[-1], np.inf))
    candidate = ordered[ordered.size - allowed]
    if ordered.size - np.searchsorted(ordered, candidate, side="left") > allowed:  # ties below it would be flagged too
        above = ordered[ordered > candidate]
        return float(above[0]) if above.size else float(np.nextafter(ordered[-1], np.inf))
    return float(candidate)


def few_goods_note(count: int, rate: float, key: str, out_of_fold: bool = True) -> str:
    """Why a threshold set on `count` honest good images cannot hold the false-reject `rate` (setting
    `key`) when they are fewer than 1 / rate: it is then close to their highest score and flags about
    1 good part in count + 1; "" otherwise. `out_of_fold`: whether OUT_OF_FOLD_FOLDS can add goods
    (not for tiled models)."""
    if rate <= 0 or count * rate >= 1:
        return ""
    return (f"{key}={rate:g} asks for 1 good part in {1 / rate:.0f} flagged, but the threshold rests on "
            f"{count} good images the model was not fitted on, which can only show about 1 in {count + 1} (the threshold is near "
            f"their highest score): {'keep OUT_OF_FOLD_FOLDS on, ' if out_of_fold else ''}add good images (validation/good/ in the "
            "MVTec layout) or raise VALIDATION_FRACTION, and retrain")
