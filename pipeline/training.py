"""train.py's work for one category: fit the anomaly model on good images, calibrate on held-out goods, save."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from anomaly_model.backbone import ModelError
from anomaly_model.base import AnomalyModel
from anomaly_model.files import check_writable
from anomaly_model.store import build_model, save_model
from dataset_manager import Category, ImageBatches, Preprocessor
from dataset_manager.images import resolve_image_size

PIXEL_SAMPLE_STRIDE = 4  # validation maps are smooth (blur sigma 4): every 4th pixel each way suffices


@dataclass
class TrainingSummary:
    category: str
    model_dir: Path
    n_train: int
    n_validation: int
    seconds: float
    model_bytes: int
    image_threshold: float
    pixel_threshold: float
    skipped: list[tuple[Path, str]]
    image_size: tuple[int, int] = (0, 0)  # the working size (height, width) IMAGE_SIZE resolved to
    tiles: int = 0  # tiles per image, 0 = untiled


def split_validation(category: Category, fraction: float, seed: int) -> tuple[list[Path], list[Path]]:
    """(train, validation): the category's validation/good when present, else a seeded share of train."""
    if category.validation_images:
        return list(category.train_images), list(category.validation_images)
    count = int(round(len(category.train_images) * fraction))
    if fraction > 0 and len(category.train_images) >= 3:
        count = max(1, count)
    if count < 1:
        raise ModelError(
            f"no validation images for {category.name}: add {category.root}/validation/good/ "
            "or set VALIDATION_FRACTION > 0 (thresholds are chosen on held-out good images)"
        )
    order = np.random.default_rng(seed).permutation(len(category.train_images))
    held_out = set(order[:count].tolist())
    train = [p for i, p in enumerate(category.train_images) if i not in held_out]
    validation = [p for i, p in enumerate(category.train_images) if i in held_out]
    return train, validation


def make_preprocessor(settings, train_paths: list[Path], stride: int) -> Preprocessor:
    """The preprocessing of a new model: IMAGE_SIZE resolved on the training images ("auto", a
    fraction of their size), rounded to the backbone's `stride`; CENTER_CROP around it."""
    size = resolve_image_size(settings.IMAGE_SIZE, train_paths, stride)
    return Preprocessor.with_center_crop(size, settings.CENTER_CROP, settings.NORMALIZE_MEAN, settings.NORMALIZE_STD)


def _warn_skipped(skipped: list[tuple[Path, str]]) -> None:
    for path, reason in skipped:
        print(f"WARNING: skipped {path}: {reason}", file=sys.stderr)


def validation_maps(model: AnomalyModel, paths: list[Path], preprocessor: Preprocessor, settings) -> tuple[torch.Tensor, torch.Tensor, list]:
    """(N, H, W) anomaly maps and (N,) image scores of held-out good images, and the files that could not be read."""
    batches = ImageBatches(paths, preprocessor, settings.BATCH_SIZE, settings.NUM_WORKERS)
    scored = [model.score(batch.images) for batch in tqdm(batches, desc="validation", unit="batch", file=sys.stderr)]
    if not scored:
        raise ModelError("none of the validation images could be read: thresholds cannot be calibrated")
    return torch.cat([maps for maps, _ in scored]), torch.cat([scores for _, scores in scored]), batches.skipped


def calibrate(maps: torch.Tensor, image_scores: torch.Tensor, image_rate: float, pixel_rate: float) -> dict:
    """Thresholds that reject the given shares of good images / pixels, and the score statistics."""
    for name, rate in (("IMAGE_FALSE_REJECT_RATE", image_rate), ("PIXEL_FALSE_REJECT_RATE", pixel_rate)):
        if not 0 <= rate < 1:
            raise ModelError(f"{name}={rate} must be in [0, 1)")
    scores = image_scores.double().numpy()
    pixels = maps[:, ::PIXEL_SAMPLE_STRIDE, ::PIXEL_SAMPLE_STRIDE].reshape(-1).double().numpy()
    return {
        "thresholds": {
            "image": float(np.quantile(scores, 1 - image_rate)),
            "pixel": float(np.quantile(pixels, 1 - pixel_rate)),
            "image_false_reject_rate": image_rate,
            "pixel_false_reject_rate": pixel_rate,
        },
        "validation": {
            "n_images": int(len(scores)),
            "image_scores": [round(float(s), 6) for s in scores],
            "image_score_mean": float(scores.mean()),
            "image_score_std": float(scores.std()),
            "pixel_quantiles": {str(q): float(np.quantile(pixels, q)) for q in (0.5, 0.9, 0.99, 0.999)},
        },
    }


def train_category(category: Category, settings, model_dir: Path) -> TrainingSummary:
    """Fit, calibrate and save one model; the previous model at `model_dir` survives any failure."""
    started = time.perf_counter()
    check_writable(model_dir.parent)
    train_paths, validation_paths = split_validation(category, settings.VALIDATION_FRACTION, settings.SEED)
    model = build_model(settings)
    preprocessor = make_preprocessor(settings, train_paths, model.stride)
    model.start_fit(preprocessor.size)  # a wrong tile size or too large statistics fail here, before any reading
    batches = ImageBatches(train_paths, preprocessor, settings.BATCH_SIZE, settings.NUM_WORKERS)
    model.fit_images(batch.images for batch in tqdm(batches, desc=f"fit {category.name}", unit="batch", file=sys.stderr))
    skipped = list(batches.skipped)
    maps, scores, skipped_validation = validation_maps(model, validation_paths, preprocessor, settings)
    skipped += skipped_validation
    _warn_skipped(skipped)
    info = calibrate(maps, scores, settings.IMAGE_FALSE_REJECT_RATE, settings.PIXEL_FALSE_REJECT_RATE)
    info["preprocessing"] = preprocessor.description(settings.IMAGE_SIZE, settings.CENTER_CROP)
    info["dataset"] = {
        "category": category.name,
        "dataset_dir": str(category.root),
        "n_train_images": model.n_train_images_,
        "n_validation_images": int(maps.shape[0]),
        "skipped_files": [str(path) for path, _ in skipped],
    }
    extra_files = {}
    if settings.CLASSIFIER:
        from classification_model.features import levels_from_description
        from classification_model.training import train_for_model

        unreadable = {path for path, _ in skipped_validation}
        readable = [path for path in validation_paths if path not in unreadable]
        classifier, info["classifier"] = train_for_model(
            model, preprocessor, readable, maps, category.train_defect_images, levels_from_description(info), settings
        )
        extra_files[info["classifier"]["booster_file"]] = classifier.to_bytes()
    model_bytes = save_model(model_dir, model, info, extra_files=extra_files)
    return TrainingSummary(
        category=category.name,
        model_dir=model_dir,
        n_train=model.n_train_images_,
        n_validation=int(maps.shape[0]),
        seconds=time.perf_counter() - started,
        model_bytes=model_bytes,
        image_threshold=info["thresholds"]["image"],
        pixel_threshold=info["thresholds"]["pixel"],
        skipped=skipped,
        image_size=preprocessor.size,
        tiles=model.tile_layout_.count if model.tile_layout_ is not None else 0,
    )
