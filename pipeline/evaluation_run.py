"""eval.py's work for one category: score the labeled test set, compute metrics, draw pictures.

Everything is computed at the model's own resolution (its working size: the (H, W) anomaly maps,
masks resized and cropped like the images), as the PaDiM reference code does. Thresholds come from the model (chosen on validation goods at
training time): the test set is never used to pick one, except for the F1-max, which says so.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from anomaly_model import distributed
from anomaly_model.files import read_checked_json
from anomaly_model.store import model_id
from dataset_manager import Category, DataError, printable_path, read_mask
from dataset_manager.images import image_size
from dataset_manager.loader import warn_skipped
from evaluation.metrics import (
    bootstrap_rocauc_gain,
    f1_max,
    image_rocauc,
    per_defect_rocauc,
    pixel_auc,
    pixel_curves,
    pr_points,
    pro_auc,
    roc_points,
    verdict_metrics,
)
from evaluation.plots import PIXEL_AXES, plot_histogram, plot_pr, plot_pro, plot_roc, thin
from evaluation.sheets import SheetImage, choose, draw_sheet
from pipeline.cli import trained_elsewhere
from pipeline.detector import Detector
from pipeline.inspection import Inspector, honest_good_scores
from pipeline.training import LEARNED_IMAGES_FILE, content_digest
from pipeline.pictures import color_range


def check_masks(category: Category) -> None:
    """Every mask must have its image's size; checked from file headers before any scoring."""
    for item in category.test_images:
        if item.mask_path is None:
            continue
        mask_size, size = image_size(item.mask_path), image_size(item.path)
        if mask_size != size:
            raise DataError(
                f"mask {item.mask_path} is {mask_size[1]}x{mask_size[0]} but its image {item.path} is "
                f"{size[1]}x{size[0]}: fix or remove the mask"
            )


def warn(message: str) -> None:
    print(f"WARNING: {message}", file=sys.stderr)


@dataclass
class CategoryEvaluation:
    """One category's metrics (what metrics.json holds) and its curves, kept for the overall figures."""

    metrics: dict
    image_curves: dict[str, tuple] = field(default_factory=dict)  # {"max score": (fpr, tpr, auc), ...}
    pixel_curve: tuple | None = None  # (fpr, tpr, auc)
    pro_curve: tuple | None = None  # (fpr, pro, normalized area)


@dataclass
class _Scored:
    """What scoring the test set leaves: per image scores and verdicts, maps and masks at the working size."""

    scores: np.ndarray
    probabilities: np.ndarray | None
    verdicts: np.ndarray
    maps: np.ndarray  # (N, H, W) float32
    masks: np.ndarray  # (N, H, W) bool; all False for goods and unmasked defects
    has_mask: np.ndarray  # (N,) bool
    skipped: list


def _score(inspector: Inspector, category: Category, settings) -> _Scored | None:
    """Every test image's score, verdict, map and mask, inspected as test.py and serve.py inspect.
    Under torchrun each rank scores (and reads the masks of) its shard; rank 0 gets everything in
    the category's order, the others None."""
    detector = inspector.detector
    items = category.test_images
    height, width = detector.preprocessor.size
    count = len(items)
    has_mask = np.array([item.mask_path is not None for item in items], dtype=bool)
    mine = distributed.shard(count, settings.BATCH_SIZE)
    results, batches = inspector.inspect_paths([items[i].path for i in mine], settings.BATCH_SIZE, settings.NUM_WORKERS, label=f"eval {category.name}")
    scored = []
    for result, inspection in distributed.watched(results):
        index = mine[result.index]
        mask = detector.preprocessor.mask_tensor(read_mask(items[index].mask_path)).numpy() if has_mask[index] else None
        judged = (inspection.image_score, inspection.classifier_probability, inspection.is_defect, inspection.anomaly_map.float().numpy())
        scored.append((index, (index, *judged, mask)))
    position = {item.path: index for index, item in enumerate(items)} if batches.skipped else {}
    skipped = distributed.gather_in_order([(position[path], (path, reason)) for path, reason in batches.skipped])
    scored = distributed.gather_in_order(scored)
    if scored is None:
        return None
    scores = np.full(count, np.nan)
    probabilities = np.full(count, np.nan)
    verdicts = np.zeros(count, dtype=bool)
    maps = np.zeros((count, height, width), dtype=np.float32)
    masks = np.zeros((count, height, width), dtype=bool)
    has_mask = np.array([item.mask_path is not None for item in items], dtype=bool)
    any_missing_probability = False
    for index, score, probability, verdict, anomaly_map, mask in scored:
        scores[index] = score
        verdicts[index] = verdict
        if probability is None:
            any_missing_probability = True
        else:
            probabilities[index] = probability
        maps[index] = anomaly_map
        if mask is not None:
            masks[index] = mask
    warn_skipped(skipped)
    empty = has_mask & np.array([item.is_defect for item in items], dtype=bool) & ~masks.any(axis=(1, 2))
    if empty.any():  # a defect image's mask that marks nothing: its defect pixels would count as good ones
        first = items[int(np.flatnonzero(empty)[0])].mask_path
        warn(f"{category.name}: {int(empty.sum())} defect image mask{'s' if empty.sum() != 1 else ''} mark{'' if empty.sum() != 1 else 's'} no defect pixel "
             f"at the working size (e.g. {printable_path(first)}): left out of the pixel figures like images without a mask")
        has_mask &= ~empty
    return _Scored(scores, None if any_missing_probability else probabilities, verdicts, maps, masks, has_mask, skipped)


def _rocauc_note(labels: np.ndarray) -> str | None:
    if not labels.any():
        return "image ROCAUC is undefined: the test set has no defect images (the other figures are still reported)"
    if labels.all():
        return "image ROCAUC is undefined: the test set has no good images (the other figures are still reported)"
    return None


SHIFT_P_VALUE = 0.001  # one-sided rank test: below this, the test goods score higher than chance allows


def _shift_note(good_scores: np.ndarray, description: dict) -> str | None:
    """A note when the good test images score systematically higher than the honest goods (validation
    and out-of-fold images the model never saw) that the thresholds were set on.

    Why: such test goods were most likely taken differently (lighting, position, camera, batch).
    Then the image figures measure that shift as much as the defects, the verdicts reject more goods
    than the false-reject rate promises, and which score wins, the max or the classifier, depends
    on which one the shift moves least (docs/classifier.md, tire's shifted test goods). A rank test, not a count
    above the threshold: with the usual 20-70 test goods a count cannot tell 5 % from 12 %."""
    honest = honest_good_scores(description)
    if not honest.size or good_scores.size < 5:
        return None
    from scipy.stats import mannwhitneyu

    honest = np.asarray(honest, dtype=np.float64)
    test = mannwhitneyu(good_scores, honest, alternative="greater")
    if test.pvalue >= SHIFT_P_VALUE:
        return None
    higher = test.statistic / (good_scores.size * honest.size)
    return (
        f"the {good_scores.size} good test images score higher than the {honest.size} good images the thresholds were set on "
        f"(a test good beats a calibration good {higher:.0%} of the time, p = {test.pvalue:.1g}): they look taken differently "
        "(lighting, position, batch?); image ROCAUC and false-reject rates measure that shift too; train with goods like them"
    )


CLASSIFIER_WORSE_SHARE = 0.95  # bootstrap resamples in which the classifier must rank worse for a note


def _classifier_note(labels: np.ndarray, scores: np.ndarray, probabilities: np.ndarray | None) -> str | None:
    """A note when the classifier ranks this test set worse than the model's image score, beyond what
    resampling its images explains. Why: the classifier's gain depends on the part and on how its
    test goods were taken (docs/classifier.md, tire's shifted test goods), and no training data can tell; the user's
    own labeled test set can, and this says when it does."""
    if probabilities is None:
        return None
    gains = bootstrap_rocauc_gain(labels, scores, probabilities)
    if gains is None or (gains < 0).mean() < CLASSIFIER_WORSE_SHARE:
        return None
    return (
        f"the classifier ranks these images worse than the image score (ROCAUC {image_rocauc(labels, probabilities):.3f} vs "
        f"{image_rocauc(labels, scores):.3f}, worse in {(gains < 0).mean():.0%} of {gains.size} bootstrap resamples): on this part "
        "the image score's verdict may serve better; compare both, or retrain with CLASSIFIER = False"
    )


def _pixel_metrics(masks: np.ndarray, maps: np.ndarray, limit: float) -> tuple[dict, object]:
    curves = pixel_curves(masks, maps)
    return {"pixel_rocauc": pixel_auc(curves), "pro": pro_auc(curves, limit)}, curves


def _per_defect(types: np.ndarray, scores: np.ndarray, probabilities, pixel_set: np.ndarray, scored: _Scored, limit: float) -> dict:
    """Per defect type against the good images: image ROCAUC (and the classifier's), pixel ROCAUC, PRO."""
    table = per_defect_rocauc(list(types), scores)
    good = types == "good"
    for kind, entry in table.items():
        chosen = good | (types == kind)
        if probabilities is not None:
            entry["classifier_rocauc"] = image_rocauc(types[chosen] == kind, probabilities[chosen])
        pixels = chosen & pixel_set
        entry["n_masked"] = int((pixels & (types == kind)).sum())
        values, _ = _pixel_metrics(_take(scored.masks, pixels), _take(scored.maps, pixels), limit) if entry["n_masked"] else ({"pixel_rocauc": None, "pro": None}, None)
        entry.update(values)
    return table


def _pixel_thresholds(thresholds: dict, maps: np.ndarray, masks: np.ndarray, good: np.ndarray, masked: np.ndarray) -> dict:
    """Each pixel threshold the model carries (the validation quantile; the Chebyshev bound's level
    when the model has one) with what training measured on good validation pixels, and on this
    test set the share of good images' pixels at or above it (the bound must hold for them too)
    and of defect pixels (inside the masks) at or above it."""
    in_use = thresholds.get("pixel_policy", "validation")
    policies = thresholds.get("pixel_policies") or {"validation": {"threshold": thresholds["pixel"], "rate": thresholds.get("pixel_false_reject_rate")}}
    good_maps, defect_maps, defect_masks = maps[good], maps[masked], masks[masked]
    outside = defect_maps[~defect_masks]
    n_outside = good_maps.size + outside.size
    table = {}
    for name, entry in policies.items():
        level = entry["threshold"]
        n_defect = int(defect_masks.sum())
        good_flagged = int((good_maps >= level).sum())
        table[name] = {
            **entry,
            "in_use": name == in_use,
            "test_good_exceedance": good_flagged / good_maps.size if good_maps.size else None,
            "test_defect_pixel_recall": int((defect_maps[defect_masks] >= level).sum()) / n_defect if n_defect else None,
            # the pixel ROC's own x: every pixel outside the masks, of the good and the masked defect images
            "test_pixel_false_positive_rate": (good_flagged + int((outside >= level).sum())) / n_outside if n_outside else None,
        }
    return table


def learned_test_images(detector: Detector, category: Category) -> dict[str, list[Path]]:
    """The test images whose bytes the model learned (LEARNED_IMAGES_FILE), by how it learned them:
    "good" (training and added goods) and "defect" (labeled defects); empty for a model saved before
    it kept that list."""
    files = detector.description.get("files", {})
    if LEARNED_IMAGES_FILE not in files:
        return {}
    learned = read_checked_json(detector.model_dir, LEARNED_IMAGES_FILE, files, f"files.{LEARNED_IMAGES_FILE}")
    kinds = {digest: kind for kind in ("good", "defect") for digest in learned.get(kind, [])}
    found: dict[str, list[Path]] = {}
    for item in category.test_images:
        try:
            kind = kinds.get(content_digest(item.path))
        except OSError:  # unreadable (a link to nothing): the scoring skips and names it
            continue
        if kind:
            found.setdefault(kind, []).append(item.path)
    return found


def _learned_note(learned: dict[str, list[Path]]) -> str:
    """'3 test images the model learned (same bytes): 2 as goods (training or ADD_GOOD, e.g. a.png), 1 as ...'."""
    total = sum(len(paths) for paths in learned.values())
    how = {"good": "as goods (training images or ADD_GOOD)", "defect": "as labeled defects (train/defect/ or ADD_DEFECT)"}
    parts = [f"{len(paths)} {how[kind]}, e.g. {printable_path(paths[0])}" for kind, paths in learned.items()]
    return (f"{total} test image{'s' if total != 1 else ''} the model learned (same bytes): {'; '.join(parts)}: "
            "the figures on them are not those of new parts")


def evaluate_category(inspector: Inspector, category: Category, settings, out_dir: Path) -> CategoryEvaluation | None:
    """Metrics of one category, written with its pictures to `out_dir` (relative paths in metrics.json).

    Under torchrun every rank scores its shard of the test images; rank 0 computes, draws and
    writes everything and returns the evaluation, the other ranks return None."""
    detector = inspector.detector
    if not category.test_images:
        simple = (category.root / "train_dataset_folder").is_dir()
        test_dir = category.test_dir or category.root / ("test_dataset_folder" if simple else "test")
        raise DataError(
            f"no labeled test images for {category.name}: expected images in {test_dir}/good/ and {test_dir}/<defect type>/ folders"
        )
    check_masks(category)
    limit = float(settings.EVAL_PRO_FPR_LIMIT)
    if not 0 < limit <= 1:
        raise DataError(f"EVAL_PRO_FPR_LIMIT={limit}: must be in (0, 1], e.g. 0.3 as in MVTec AD")
    notes: list[str] = list(detector.operating_notes)  # the thresholds re-picked on the command line, if any
    elsewhere = trained_elsewhere(detector.description, category)
    if elsewhere:
        notes.append(f"the model {detector.model_dir} was trained on {elsewhere}, evaluated here on {category.name!r} ({category.root})")
        warn(f"{category.name}: {notes[-1]}")
    learned = learned_test_images(detector, category)
    if learned:
        notes.append(_learned_note(learned))
        warn(f"{category.name}: {notes[-1]}")
    scored = _score(inspector, category, settings)
    if scored is None:
        return None
    items = category.test_images
    ok = ~np.isnan(scored.scores)
    labels = np.array([item.is_defect for item in items], dtype=bool)
    types = np.array([item.defect_type for item in items])
    scores = scored.scores
    probabilities = scored.probabilities
    notes_on_scores = (
        _rocauc_note(labels[ok]),
        _shift_note(scores[ok & ~labels], detector.description),
        _classifier_note(labels[ok], scores[ok], probabilities[ok] if probabilities is not None else None),
    )
    for note in notes_on_scores:
        if note:
            notes.append(note)
            warn(f"{category.name}: {note}")
    unmasked = ok & labels & ~scored.has_mask
    pixel_set = ok & (~labels | scored.has_mask)
    masked, defects = int((ok & labels & scored.has_mask).sum()), int((ok & labels).sum())
    if unmasked.any() and masked:
        notes.append(
            f"{int(unmasked.sum())} of {defects} defect images have no ground-truth mask: "
            f"pixel ROCAUC and PRO use the {masked} that have one and the {int((ok & ~labels).sum())} good images"
        )
        warn(f"{category.name}: {notes[-1]}")
    elif unmasked.any():
        notes.append(
            f"none of the {defects} defect images has a ground-truth mask (ground_truth/<type>/<stem>_mask.png in the category folder, "
            "or <stem>_mask.png beside the image; other image formats too): "
            "pixel ROCAUC and PRO are not computed"
        )
        warn(f"{category.name}: {notes[-1]}")
    pixel_values, curves = _pixel_metrics(_take(scored.masks, pixel_set), _take(scored.maps, pixel_set), limit)
    if curves is None and (masked or not defects):  # "none ... has a mask" was said above
        notes.append("pixel ROCAUC and PRO are undefined: " + ("the test set holds no defect images" if not defects
                                                               else "no defect image has a ground-truth mask with defect pixels"))
    if detector.classifier is None:
        source = f"image score >= threshold {detector.image_threshold:.4g}"
    elif detector.classifier.ranks_like_image_score:
        source = "classifier verdict ranking like the image score (train.py kept no classifier candidate)"
    else:
        source = "classifier verdict"
    if detector.needs_peaks:
        source += f" (with the similarity stage learned from {detector.classifier.similarity.n_defects} labeled defects)"
    if detector.operating_notes:
        source += ", at the operating point given on the command line (notes)"
    description = detector.description
    metrics = {
        "category": category.name,
        "trained_category": detector.description.get("dataset", {}).get("category"),
        "model": {  # which trained version this run measured (a retrain or an update changes the id)
            "folder": str(detector.model_dir), "id": model_id(description)[:12], "type": description.get("anomaly_model", {}).get("type"),
            "backbone": description.get("anomaly_model", {}).get("settings", {}).get("backbone"), "updates": len(description.get("updates", [])),
            "runtime": detector.runtime,  # torch or onnxruntime: which one scored these figures
        },
        "n_images": int(ok.sum()),
        "n_good": int((ok & ~labels).sum()),
        "n_defect": int((ok & labels).sum()),
        "image_rocauc": image_rocauc(labels[ok], scores[ok]),
        "classifier_rocauc": image_rocauc(labels[ok], probabilities[ok]) if probabilities is not None else None,
        "pixel_rocauc": pixel_values["pixel_rocauc"],
        "pro": pixel_values["pro"],
        "pro_fpr_limit": limit,
        "resolution": list(detector.preprocessor.size),
        "n_pixel_images": int(pixel_set.sum()),
        "n_defects_without_mask": int(unmasked.sum()),
        "n_regions": curves.n_regions if curves is not None else 0,
        "pixel_thresholds": _pixel_thresholds(detector.description["thresholds"], scored.maps, scored.masks, ok & ~labels, ok & labels & scored.has_mask),
        "per_defect": _per_defect(types[ok], scores[ok], probabilities[ok] if probabilities is not None else None, pixel_set[ok], _subset(scored, ok), limit),
        "operating": {
            "source": source, "image_threshold": detector.image_threshold,
            "classifier_threshold": getattr(detector.classifier, "threshold", None), **verdict_metrics(labels[ok], scored.verdicts[ok]),
        },
        "f1_max": {"image score": f1_max(labels[ok], scores[ok])},
        "notes": notes,
        "skipped_files": [str(path) for path, _ in scored.skipped],
    }
    flagged, n_defects = int((scored.verdicts[ok] & labels[ok]).sum()), int((ok & labels).sum())
    if n_defects and not flagged:  # an operating point that escapes every defect deserves more than a table cell
        note = (f"the verdict flags none of the {n_defects} defect images at the operating point in force (thresholds chosen on "
                "honest goods): a higher IMAGE_FALSE_REJECT_RATE or CLASSIFIER_FALSE_REJECT_RATE on eval.py's command line shows another point")
        notes.append(note)
        warn(f"{category.name}: {note}")
    if probabilities is not None:
        metrics["f1_max"]["classifier probability"] = f1_max(labels[ok], probabilities[ok])
        metrics["operating_score_threshold"] = verdict_metrics(labels[ok], scores[ok] >= detector.image_threshold)
    out_dir.mkdir(parents=True, exist_ok=True)
    evaluation = CategoryEvaluation(metrics)
    _draw(evaluation, detector, labels[ok], scores[ok], probabilities[ok] if probabilities is not None else None, curves, out_dir)
    _draw_sheets(evaluation, detector, category, scored, ok, settings, out_dir)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return evaluation


def _take(array: np.ndarray, chosen: np.ndarray) -> np.ndarray:
    """`array[chosen]`, without copying the maps when every image is chosen."""
    return array if chosen.all() else array[chosen]


def _subset(scored: _Scored, chosen: np.ndarray) -> _Scored:
    """The scored images at `chosen`; no copy of the maps when every image was scored."""
    if chosen.all():
        return scored
    probabilities = scored.probabilities[chosen] if scored.probabilities is not None else None
    return _Scored(scored.scores[chosen], probabilities, scored.verdicts[chosen], scored.maps[chosen], scored.masks[chosen], scored.has_mask[chosen], [])


SAME_RANKING = "max score = classifier verdict (same ranking)"


def _draw(evaluation: CategoryEvaluation, detector: Detector, labels, scores, probabilities, curves, out_dir: Path) -> None:
    """ROC (image: score and classifier side by side; pixel), PR, PRO curves and the score histogram."""
    metrics, name, figures = evaluation.metrics, evaluation.metrics["category"], {}
    limit = metrics["pro_fpr_limit"]
    # a verdict that ranks like the image score has the same curves: drawn once, not one hidden under the other
    same = probabilities is not None and detector.classifier.ranks_like_image_score
    if metrics["image_rocauc"] is not None:
        evaluation.image_curves["max score"] = (*roc_points(labels, scores), metrics["image_rocauc"])
        if probabilities is not None:
            evaluation.image_curves["classifier"] = (*roc_points(labels, probabilities), metrics["classifier_rocauc"])
        operating = metrics["operating"]
        on_roc = (operating["false_reject_rate"], operating["recall"]) if operating["recall"] is not None and operating["false_reject_rate"] is not None else None
        shown = {SAME_RANKING: evaluation.image_curves["max score"]} if same else evaluation.image_curves
        figures["image ROC"] = plot_roc(shown, f"{name}: image ROC", out_dir / "roc_image.png", on_roc)
        pr = {"max score": (*pr_points(labels, scores), metrics["f1_max"]["image score"]["f1"])}
        if probabilities is not None:
            pr["classifier"] = (*pr_points(labels, probabilities), metrics["f1_max"]["classifier probability"]["f1"])
        point = (operating["recall"], operating["precision"]) if operating["precision"] is not None else None
        figures["PR curve"] = plot_pr({SAME_RANKING: pr["max score"]} if same else pr, point, f"{name}: image precision-recall", out_dir / "pr_image.png")
    if curves is not None:
        evaluation.pixel_curve = (*thin(curves.fpr, curves.tpr, 20000), metrics["pixel_rocauc"])
        inside = int(np.searchsorted(curves.fpr, limit, side="right")) + 1
        evaluation.pro_curve = (*thin(curves.fpr[:inside], curves.pro[:inside], 20000), metrics["pro"])
        in_use = [entry for entry in metrics["pixel_thresholds"].values() if entry["in_use"] and entry["test_defect_pixel_recall"] is not None]
        pixel_point = (in_use[0]["test_pixel_false_positive_rate"], in_use[0]["test_defect_pixel_recall"]) if in_use else None
        figures["pixel ROC"] = plot_roc({"pixels": evaluation.pixel_curve}, f"{name}: pixel ROC", out_dir / "roc_pixel.png", pixel_point, PIXEL_AXES)
        figures["PRO curve"] = plot_pro({name: evaluation.pro_curve}, limit, f"{name}: per-region overlap", out_dir / "pro_curve.png")
    classifier = detector.classifier
    deciding = classifier is None or classifier.ranks_like_image_score  # the image score's ranking decides
    figures["score histogram"] = plot_histogram(
        scores[~labels], scores[labels], detector.image_threshold, f"{name}: image scores", "image score", out_dir / "histogram.png",
        "threshold in force" if deciding else "image threshold (the classifier decides the verdict)",
    )
    if probabilities is not None:
        figures["probability histogram"] = plot_histogram(
            probabilities[~labels], probabilities[labels], getattr(detector.classifier, "threshold", None), f"{name}: classifier probabilities", "defect probability", out_dir / "histogram_classifier.png"
        )
    if detector.classifier is not None and not detector.classifier.ranks_like_image_score:  # else its features decide nothing
        from classification_model.xgboost import plot_feature_importance

        plot_feature_importance(detector.classifier, out_dir / "feature_importance.png", f"{name}: classifier feature importance")
        figures["classifier feature importance"] = out_dir / "feature_importance.png"
    metrics["figures"] = {title: f"{name}/{Path(path).name}" for title, path in figures.items()}


def _draw_sheets(evaluation: CategoryEvaluation, detector: Detector, category: Category, scored: _Scored, ok: np.ndarray, settings, out_dir: Path) -> None:
    """Localization sheets of the worst goods and the best and worst defects, re-read from disk."""
    count = int(settings.EVAL_SHEET_COUNT)
    evaluation.metrics["sheets"] = []
    if count <= 0:
        return
    indices = np.flatnonzero(ok)
    labels = np.array([category.test_images[i].is_defect for i in indices], dtype=bool)
    folder = out_dir / "sheets"
    folder.mkdir(exist_ok=True)
    name = evaluation.metrics["category"]
    for position, reason in choose(scored.scores[indices], labels, count):
        index = int(indices[position])
        item = category.test_images[index]
        sheet = SheetImage(
            item.path,
            item.defect_type,
            float(scored.scores[index]),
            scored.maps[index],
            scored.masks[index] if scored.has_mask[index] or not item.is_defect else None,
            reason,
            "defect" if scored.verdicts[index] else "good",
        )
        file_name = f"{reason.replace(' ', '_').replace('#', '')}_{item.defect_type}_{printable_path(item.path.stem)}.png"
        try:
            draw_sheet(sheet, detector.preprocessor, detector.pixel_threshold, detector.image_threshold, color_range(detector.description), folder / file_name)
        except DataError as error:  # the file changed or vanished since scoring: skip its sheet
            warn(f"no localization sheet for {item.path}: {error}")
            continue
        evaluation.metrics["sheets"].append({"image": str(item.path), "reason": reason, "picture": f"{name}/sheets/{file_name}"})
