"""Building the classifier's training set from a fitted anomaly model, and training it.

Goods: anomaly maps of the validation images only (never the images the Gaussian was fitted on,
whose maps are unrealistically clean). Defects: the user's labeled defect images (train/defect/)
and, when there are fewer than CLASSIFIER_ENOUGH_REAL_DEFECTS of them, synthetic defects painted
onto the validation goods (classification_model/synthetic.py), run through the same anomaly model.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from anomaly_model import distributed
from anomaly_model.backbone import ModelError
from anomaly_model.base import AnomalyModel
from classification_model.features import FEATURE_NAMES, MONOTONE, map_features
from classification_model.synthetic import DEFECT_TYPES, make_defect
from classification_model.xgboost import ClassifierParams, DefectClassifier, train_classifier
from dataset_manager import DataError, ImageBatches, Preprocessor, read_rgb


def params_from_settings(settings) -> ClassifierParams:
    return ClassifierParams(
        max_depth=settings.CLASSIFIER_MAX_DEPTH,
        learning_rate=settings.CLASSIFIER_LEARNING_RATE,
        max_rounds=settings.CLASSIFIER_MAX_ROUNDS,
        early_stopping_rounds=settings.CLASSIFIER_EARLY_STOPPING_ROUNDS,
        subsample=settings.CLASSIFIER_SUBSAMPLE,
        colsample_bytree=settings.CLASSIFIER_COLSAMPLE,
        min_child_weight=settings.CLASSIFIER_MIN_CHILD_WEIGHT,
        folds=settings.CLASSIFIER_FOLDS,
        monotone=settings.CLASSIFIER_MONOTONE,
        seed=settings.SEED,
    )


def synthetic_defect_maps(
    model: AnomalyModel,
    preprocessor: Preprocessor,
    good_paths: list[Path],
    per_image: int,
    size_range: tuple[float, float],
    strength_range: tuple[float, float],
    seed: int,
    batch_size: int,
) -> tuple[torch.Tensor | None, np.ndarray, list[str]]:
    """(maps (M, CROP, CROP), source index per map, defect type per map) of `per_image` synthetic
    defects on each good image; types cycle so each image gets every type in turn.

    Under torchrun every rank paints every defect (one random stream, so the same set as one
    process) but runs the model only on its own batches (`distributed.owns_batch`); the maps are
    gathered on rank 0, None on the other ranks."""
    rng = np.random.default_rng(seed)
    scored, sources, kinds, pending = [], [], [], []

    def flush() -> None:
        if pending:
            number = (len(sources) - 1) // batch_size
            scored.append((number, model.anomaly_maps(torch.stack(pending)).cpu().numpy()))
            pending.clear()

    for index, path in enumerate(distributed.watched(tqdm(good_paths, desc="synthetic defects", unit="img", file=sys.stderr))):
        try:
            rgb = read_rgb(path)
        except DataError:
            continue
        for variant in range(per_image):
            kind = DEFECT_TYPES[(index + variant) % len(DEFECT_TYPES)]
            image = make_defect(rgb, kind, rng, size_range, strength_range, preprocessor.resize, preprocessor.crop)
            if distributed.owns_batch(len(sources) // batch_size):
                pending.append(preprocessor.image_tensor(image))
            sources.append(index)
            kinds.append(kind)
            if len(sources) % batch_size == 0:
                flush()
    flush()
    maps = distributed.gather_in_order(scored)
    if maps is None:
        return None, np.array(sources, dtype=int), kinds
    empty = torch.zeros(0, preprocessor.crop, preprocessor.crop)
    return (torch.from_numpy(np.concatenate(maps)) if maps else empty), np.array(sources, dtype=int), kinds


def image_maps(model: AnomalyModel, preprocessor: Preprocessor, paths: list[Path], batch_size: int, label: str) -> torch.Tensor | None:
    """Anomaly maps of image files, in order (unreadable ones are left out, with a warning). Under
    torchrun each rank scores its shard; rank 0 gets every map, the other ranks None."""
    mine = distributed.shard(len(paths), batch_size)
    batches = ImageBatches([paths[i] for i in mine], preprocessor, batch_size, 0)
    maps = [
        (mine[b.indices[0]], model.anomaly_maps(b.images).cpu().numpy())
        for b in distributed.watched(tqdm(batches, desc=label, unit="batch", file=sys.stderr))
    ]
    position = {path: index for index, path in enumerate(paths)}
    skipped = distributed.gather_in_order([(position[path], (path, reason)) for path, reason in batches.skipped])
    maps = distributed.gather_in_order(maps)
    if maps is None:
        return None
    for path, reason in skipped:
        print(f"WARNING: skipped {path}: {reason}", file=sys.stderr)
    return torch.from_numpy(np.concatenate(maps)) if maps else torch.zeros(0, preprocessor.crop, preprocessor.crop)


def fit_on_maps(
    good_maps: torch.Tensor,
    defect_maps: torch.Tensor,
    defect_groups: np.ndarray,
    levels: dict[str, float],
    params: ClassifierParams,
    false_reject_rate: float,
    defect_weights: np.ndarray | None = None,
) -> DefectClassifier:
    """Train on maps: good i is group i; `defect_groups` ties each defect to its source good
    (synthetic) or to a group of its own (>= len(good_maps), real defects)."""
    if good_maps.shape[0] == 0:
        raise ModelError("no good validation maps to train the classifier on: add validation/good images")
    good = map_features(good_maps, levels)
    defect = map_features(defect_maps, levels) if defect_maps.shape[0] else np.zeros((0, len(FEATURE_NAMES)), np.float32)
    features = np.concatenate([good, defect])
    labels = np.concatenate([np.zeros(len(good), int), np.ones(len(defect), int)])
    groups = np.concatenate([np.arange(len(good)), np.asarray(defect_groups, dtype=int)])
    weights = np.concatenate([np.ones(len(good)), np.ones(len(defect)) if defect_weights is None else defect_weights])
    return train_classifier(features, labels, groups, FEATURE_NAMES, params, false_reject_rate, weights, MONOTONE)


def train_for_model(
    model: AnomalyModel,
    preprocessor: Preprocessor,
    validation_paths: list[Path],
    validation_maps: torch.Tensor,
    defect_paths: list[Path],
    levels: dict[str, float],
    settings,
) -> tuple[DefectClassifier | None, dict | None]:
    """train.py's classifier step: returns the classifier and the `info["classifier"]` entry.

    Under torchrun every rank runs this and scores its share of the defect images; rank 0 (which
    alone holds `validation_maps` and `levels`) trains the classifier, the others return (None, None)."""
    if validation_maps is not None and len(validation_paths) != validation_maps.shape[0]:
        raise ModelError("internal: validation paths and maps differ in number")
    if validation_maps is not None and validation_maps.shape[0] < 2:
        raise ModelError(
            f"the classifier needs good validation images, got {validation_maps.shape[0]}: add validation/good/ images, "
            "raise VALIDATION_FRACTION, or set CLASSIFIER = False"
        )
    real_maps = image_maps(model, preprocessor, list(defect_paths), settings.BATCH_SIZE, "labeled defects") if defect_paths else None
    n_real = distributed.broadcast_object(0 if real_maps is None else real_maps.shape[0])  # every rank paints as many
    per_image = settings.CLASSIFIER_SYNTHETIC_PER_IMAGE if n_real < settings.CLASSIFIER_ENOUGH_REAL_DEFECTS else 0
    synthetic, sources, kinds = synthetic_defect_maps(
        model, preprocessor, validation_paths, per_image, settings.CLASSIFIER_DEFECT_SIZE,
        settings.CLASSIFIER_DEFECT_STRENGTH, settings.SEED, settings.BATCH_SIZE,
    ) if per_image > 0 else (torch.zeros(0, preprocessor.crop, preprocessor.crop), np.zeros(0, int), [])
    if not distributed.is_main():
        return None, None
    n_good = validation_maps.shape[0]
    defect_maps = torch.cat([synthetic] + ([real_maps] if n_real else []))
    groups = np.concatenate([sources, n_good + np.arange(n_real)])
    weights = np.concatenate([np.ones(len(sources)), np.full(n_real, settings.CLASSIFIER_REAL_DEFECT_WEIGHT)])
    classifier = fit_on_maps(
        validation_maps, defect_maps, groups, levels, params_from_settings(settings),
        settings.CLASSIFIER_FALSE_REJECT_RATE, weights,
    )
    info = {
        "booster_file": "classifier.json",
        "features": list(FEATURE_NAMES),
        "levels": levels,
        "threshold": classifier.threshold,
        "false_reject_rate": settings.CLASSIFIER_FALSE_REJECT_RATE,
        "n_good": n_good,
        "n_real_defects": n_real,
        "n_synthetic_defects": {kind: kinds.count(kind) for kind in DEFECT_TYPES},
        "synthetic_defect_size": list(settings.CLASSIFIER_DEFECT_SIZE),
        "synthetic_defect_strength": list(settings.CLASSIFIER_DEFECT_STRENGTH),
        **{k: v for k, v in classifier.report.items() if k != "out_of_fold_good_probabilities"},
    }
    return classifier, info
