"""train.py's work for one category: fit the anomaly model on good images, calibrate on held-out goods, save."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from anomaly_model import distributed
from anomaly_model.backbone import ModelError
from anomaly_model.base import AnomalyModel
from anomaly_model.files import check_writable
from anomaly_model.store import build_model, save_model
from dataset_manager import Category, DataError, ImageBatches, Preprocessor
from dataset_manager.images import image_size
from dataset_manager.loader import skipped_summary

PIXEL_SAMPLE_STRIDE = 4  # validation maps are smooth (blur sigma 4): every 4th pixel each way suffices
MIN_TRAIN_IMAGES = 2  # a covariance (and any spread of good features) needs at least two images


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


def split_validation(category: Category, fraction: float, seed: int) -> tuple[list[Path], list[Path]]:
    """(train, validation): the category's validation/good when present, else a seeded share of train."""
    if category.validation_images:
        return list(category.train_images), list(category.validation_images)
    if fraction > 0 and len(category.train_images) < MIN_TRAIN_IMAGES + 1:
        raise DataError(
            f"only {_images(len(category.train_images))} in {folder_of(category.train_images)}: training needs at least "
            f"{MIN_TRAIN_IMAGES} and choosing thresholds at least 1 more held out (or a validation/good folder); add good images"
        )
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


def _images(count: int, noun: str = "image") -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def folder_of(paths: list[Path]) -> Path:
    """The folder holding `paths` (their common parent), to name in messages."""
    return Path(os.path.commonpath([str(path.parent) for path in paths])) if paths else Path(".")


def readable_headers(paths: list[Path]) -> tuple[list[Path], list[tuple[Path, str]]]:
    """(paths whose header is an image, (path, reason) of the others): checked before any model
    is built, from headers only; files that fail later, in full decoding, are skipped then."""
    readable, skipped = [], []
    for path in paths:
        try:
            image_size(path)
            readable.append(path)
        except DataError as error:
            skipped.append((path, str(error)))
    return readable, skipped


def require_training_images(count: int, folder: Path, n_files: int, held_out: int, skipped: list) -> None:
    """DataError naming the folder and the count when fewer than MIN_TRAIN_IMAGES can be trained on."""
    if count >= MIN_TRAIN_IMAGES:
        return
    if count == 0 and skipped:
        raise DataError(f"none of the {n_files} training images in {folder} could be read ({skipped_summary(skipped)})")
    held = f" after holding out {held_out} for validation" if held_out else ""
    unreadable = f" ({skipped_summary(skipped)})" if skipped else ""
    raise DataError(
        f"only {_images(count, 'training image')} in {folder} can be used{held}{unreadable}: "
        f"at least {MIN_TRAIN_IMAGES} are needed; add good images"
    )


def make_preprocessor(settings) -> Preprocessor:
    return Preprocessor(settings.RESIZE, settings.CROP, settings.NORMALIZE_MEAN, settings.NORMALIZE_STD)


def _warn_skipped(skipped: list[tuple[Path, str]]) -> None:
    for path, reason in skipped:
        print(f"WARNING: skipped {path}: {reason}", file=sys.stderr)


def skipped_in_order(skipped: list[tuple[Path, str]], paths: list[Path]) -> list[tuple[Path, str]]:
    """Every rank's unreadable files among `paths`, in `paths` order, on every rank (alone: `skipped`)."""
    position = {path: index for index, path in enumerate(paths)}
    return distributed.all_gather_in_order([(position[path], (path, reason)) for path, reason in skipped])


def validation_maps(
    model: AnomalyModel, paths: list[Path], preprocessor: Preprocessor, settings
) -> tuple[torch.Tensor | None, torch.Tensor | None, list]:
    """(N, H, W) anomaly maps and (N,) image scores of held-out good images, in `paths` order, and the
    files that could not be read. Under torchrun each rank scores its shard: maps and scores are
    gathered on rank 0 (None on the other ranks), the unreadable files are known to every rank."""
    mine = distributed.shard(len(paths), settings.BATCH_SIZE)
    batches = ImageBatches([paths[i] for i in mine], preprocessor, settings.BATCH_SIZE, settings.NUM_WORKERS)
    scored = []
    for batch in distributed.watched(tqdm(batches, desc="validation", unit="batch", file=sys.stderr)):
        maps, scores = model.score(batch.images)
        scored += [(mine[i], (maps[row].numpy(), float(scores[row]))) for row, i in enumerate(batch.indices)]
    skipped = skipped_in_order(batches.skipped, paths)
    everything = distributed.gather_in_order(scored)
    if everything is None:
        return None, None, skipped
    if not everything:
        raise DataError(
            f"none of the {len(paths)} validation images in {folder_of(paths)} could be read "
            f"({skipped_summary(skipped)}): thresholds cannot be calibrated"
        )
    maps = torch.from_numpy(np.stack([image_map for image_map, _ in everything]))
    return maps, torch.tensor([score for _, score in everything], dtype=maps.dtype), skipped


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
    """Fit, calibrate and save one model; the previous model at `model_dir` survives any failure.

    Under torchrun every rank runs this: each fits on its shard of the training images and scores
    its shard of the validation and classifier images; rank 0 calibrates, trains the classifier
    and saves; every rank returns rank 0's summary."""
    started = time.perf_counter()
    if distributed.is_main():
        check_writable(model_dir.parent)
    train_paths, validation_paths = split_validation(category, settings.VALIDATION_FRACTION, settings.SEED)
    folder, n_files = folder_of(category.train_images), len(train_paths)
    held_out = 0 if category.validation_images else len(validation_paths)
    mine = distributed.shard(len(train_paths), settings.BATCH_SIZE)
    _, unreadable = readable_headers([train_paths[i] for i in mine])  # each rank checks its share of the headers
    skipped = skipped_in_order(unreadable, train_paths)
    unreadable = {path for path, _ in skipped}
    train_paths = [path for path in train_paths if path not in unreadable]
    require_training_images(len(train_paths), folder, n_files, held_out, skipped)
    preprocessor = make_preprocessor(settings)
    model = build_model(settings)
    mine = distributed.shard(len(train_paths), settings.BATCH_SIZE)
    batches = ImageBatches([train_paths[i] for i in mine], preprocessor, settings.BATCH_SIZE, settings.NUM_WORKERS)

    def counted_images():
        """The batches' images; once they are all read, fewer than 2 is a DataError before any fit
        ends. Alone only: under torchrun a rank sees its shard, and the fit checks the total."""
        count = 0
        for batch in distributed.watched(tqdm(batches, desc=f"fit {category.name}", unit="batch", file=sys.stderr)):
            count += len(batch.indices)
            yield batch.images
        if not distributed.active():
            require_training_images(count, folder, n_files, held_out, skipped + batches.skipped)

    model.fit(counted_images())
    skipped += skipped_in_order(batches.skipped, train_paths)
    maps, scores, skipped_validation = validation_maps(model, validation_paths, preprocessor, settings)
    skipped += skipped_validation
    info = None
    if distributed.is_main():  # maps and scores were gathered here
        _warn_skipped(skipped)
        info = calibrate(maps, scores, settings.IMAGE_FALSE_REJECT_RATE, settings.PIXEL_FALSE_REJECT_RATE)
        info["preprocessing"] = {
            "resize": preprocessor.resize,
            "crop": preprocessor.crop,
            "mean": list(settings.NORMALIZE_MEAN),
            "std": list(settings.NORMALIZE_STD),
        }
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
        levels = levels_from_description(info) if info is not None else None
        classifier, entry = train_for_model(model, preprocessor, readable, maps, category.train_defect_images, levels, settings)
        if classifier is not None:  # rank 0
            info["classifier"] = entry
            extra_files[entry["booster_file"]] = classifier.to_bytes()
    summary = None
    if distributed.is_main():
        model_bytes = save_model(model_dir, model, info, extra_files=extra_files)
        summary = TrainingSummary(
            category=category.name,
            model_dir=model_dir,
            n_train=model.n_train_images_,
            n_validation=int(maps.shape[0]),
            seconds=time.perf_counter() - started,
            model_bytes=model_bytes,
            image_threshold=info["thresholds"]["image"],
            pixel_threshold=info["thresholds"]["pixel"],
            skipped=skipped,
        )
    return distributed.broadcast_object(summary)
