"""export.py's work for one model: write it as ONNX for runtimes without PyTorch, after proving that
the file gives the maps the torch model gives.

The check runs a few good images of the model's dataset through both runtimes and refuses to
write anything when a map differs by more than MAX_RELATIVE_DIFFERENCE of that map's range (its
max - min), or an image score by more than that share of its map's range. The file is written
into a hidden folder inside the model folder, checked there, then moved into place and recorded
(with its checksums) in model.json's "export" section: test.py RUNTIME=onnxruntime uses only
the file recorded there, and retraining replaces the whole folder, so a model is never scored
with the file of another version.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from anomaly_model.errors import ModelError
from anomaly_model.files import (EXPORT_STAGING_PREFIX, STORAGE_ERRNOS, StorageError, check_writable, file_checksum, model_file, model_lock,
                                 remove_entry, storage_message, swapping)
from anomaly_model.onnx_file import ONNX_FILE, open_session, require, run_session, write_onnx
from anomaly_model.store import add_section, model_id, read_description
from dataset_manager import Category, DataError, ImageBatches, Preprocessor
from pipeline.detector import Detector, no_onnx_for_similarity

MAX_RELATIVE_DIFFERENCE = 1e-4  # of a map's range (max - min): what "the same maps" means here
PREPROCESSING_STEPS = (
    "read as 8-bit RGB; resize to resize = [height, width] (PIL bilinear); centre-crop to image_size = [height, width] "
    "(nothing to crop when they are equal); scale to [0, 1]; subtract mean and divide by std per channel; "
    "channels first (N, 3, height, width) float32"
)


@dataclass
class ExportSummary:
    model_dir: Path
    files: dict[str, int]  # file name -> bytes
    seconds: float
    n_check_images: int
    max_map_difference: float  # largest |onnx - torch| / map range over the check images
    max_score_difference: float  # largest |onnx - torch| image score / map range


def check_paths(category: Category, count: int) -> list[Path]:
    """`count` good images to compare the runtimes on, spread over the validation images (else train)."""
    pool = list(category.validation_images) or list(category.train_images)
    if not pool:
        raise DataError(f"export checks the ONNX file on good images of {category.root}: none found there")
    picks = np.unique(np.linspace(0, len(pool) - 1, min(count, len(pool))).round().astype(int))
    return [pool[i] for i in picks]


def deployment_metadata(description: dict) -> dict:
    """Everything a runtime needs besides the graph, as the ONNX file's "anomaly_detector" entry."""
    preprocessor = Preprocessor.from_description(description["preprocessing"])  # older models: square ints
    height, width = preprocessor.size
    metadata = {
        "model_id": model_id(description),
        "category": description.get("dataset", {}).get("category"),
        "anomaly_model": {"type": description["anomaly_model"]["type"], "settings": description["anomaly_model"]["settings"]},
        "input": {"name": "images", "shape": ["N", 3, height, width], "dtype": "float32"},
        "outputs": {"anomaly_maps": ["N", height, width], "image_scores": ["N"]},
        "preprocessing": {
            **description["preprocessing"], "resize": list(preprocessor.resize), "image_size": [height, width], "steps": PREPROCESSING_STEPS,
        },
        "thresholds": description["thresholds"],
        "verdict": "the classifier's probability >= classifier.threshold when there is a classifier, else image score >= thresholds.image",
    }
    if "classifier" in description:
        entry = description["classifier"]
        metadata["classifier"] = {
            "booster_file": entry["booster_file"],
            "booster_sha256": description["files"][entry["booster_file"]]["sha256"],
            "features": entry["features"],
            "levels": entry["levels"],
            "threshold": entry["threshold"],
            **{key: entry[key] for key in ("anchor_mode", "anchor", "tree_share") if key in entry},
        }
    return metadata


def _check_images(detector: Detector, paths: list[Path]) -> torch.Tensor:
    batches = ImageBatches(paths, detector.preprocessor, len(paths), 0)
    images = [batch.images for batch in batches]
    if not images:
        raise DataError(f"none of the {len(paths)} images chosen to check the export could be read (first: {paths[0]})")
    return torch.cat(images)


def relative_differences(maps: np.ndarray, scores: np.ndarray, reference_maps: np.ndarray, reference_scores: np.ndarray) -> tuple[float, float]:
    """(largest map difference, largest image score difference), each per image relative to the
    reference map's range (max - min; 1 for a flat map)."""
    flat = reference_maps.reshape(len(reference_maps), -1).astype(np.float64)
    spread = flat.max(axis=1) - flat.min(axis=1)
    spread = np.where(spread > 0, spread, 1.0)
    map_difference = np.abs(maps.reshape(len(maps), -1) - flat).max(axis=1) / spread
    score_difference = np.abs(scores.astype(np.float64) - reference_scores) / spread
    return float(map_difference.max()), float(score_difference.max())


def _move_into_place(staging: Path, model_dir: Path, names: list[str]) -> None:
    """External data first, the .onnx file that refers to it last."""
    for name in sorted(names, key=lambda name: name == ONNX_FILE):
        os.replace(staging / name, model_dir / name)


def export_model(model_dir: Path, paths: list[Path]) -> ExportSummary:
    """Write model_dir/model.onnx (+ model.onnx.data past 2 GB) and record it in model.json, once
    onnxruntime's maps on `paths` equal the torch model's; on any failure nothing is written.

    The export holds the model's lock throughout (`files.model_lock`): a second export of the same
    model says it is busy, and a retrain's swap waits until this one is done."""
    for name in ("onnx", "onnxscript", "onnxruntime"):  # before any long work
        require(name)
    with model_lock(model_dir, "export.py is exporting it", wait=False):
        return _export_locked(Path(model_dir), paths)


def _export_locked(model_dir: Path, paths: list[Path]) -> ExportSummary:
    started = time.perf_counter()
    detector = Detector(model_dir, "cpu")
    description = detector.description
    if detector.needs_peaks:
        raise ModelError("nothing was written: " + no_onnx_for_similarity(model_dir, detector.classifier.similarity.n_defects))
    check_writable(model_dir)
    images = _check_images(detector, paths)
    reference_maps, reference_scores = (tensor.numpy().astype(np.float64) for tensor in detector.model.score(images))
    size = detector.preprocessor.size
    module = detector.model.export_module(size, release=True)  # the model's last use
    del detector
    for leftover in model_dir.glob(f"{EXPORT_STAGING_PREFIX}*"):  # from an export that was killed (we hold the lock)
        remove_entry(leftover)
    staging = model_dir / f"{EXPORT_STAGING_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        staging.mkdir()
        print(f"exporting {model_dir.name} to ONNX ...", file=sys.stderr)
        metadata = deployment_metadata(description)
        try:
            names = write_onnx(module, size, staging, metadata)
        except OSError as error:  # the ONNX writer's errors name no file: the model folder is where it wrote
            if error.errno not in STORAGE_ERRNOS:
                raise
            raise StorageError(storage_message(error, model_dir) + "; nothing was written") from None
        del module
        maps, scores = run_session(open_session(staging / ONNX_FILE, "cpu"), images.numpy())
        map_difference, score_difference = relative_differences(maps, scores, reference_maps, reference_scores)
        if max(map_difference, score_difference) > MAX_RELATIVE_DIFFERENCE:
            raise ModelError(
                f"the exported model disagrees with the torch model on {len(images)} images (maps differ by up to "
                f"{map_difference:.2e}, image scores by {score_difference:.2e} of the map's range; the limit is "
                f"{MAX_RELATIVE_DIFFERENCE:g}): nothing was written; score with RUNTIME=torch"
            )
        checksums = {name: file_checksum(staging / name) for name in names}
        if model_id(read_description(model_dir)) != metadata["model_id"]:
            raise ModelError(f"model {model_dir} was trained again while it was being exported: run python export.py again")
        # files of the previous export this one does not write (e.g. external data a larger export
        # needed): each name checked before anything moves, so no name in model.json reaches outside
        stale = [model_file(model_dir, name, f"export.files.{name}") for name in description.get("export", {}).get("files", {}) if name not in names]
        with swapping(model_dir):  # a load sees the old export or the new one, never half of each
            _move_into_place(staging, model_dir, names)
            add_section(model_dir, "export", {
                "onnx_file": ONNX_FILE,
                "files": checksums,
                "exported_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "check": {
                    "images": [str(path) for path in paths],
                    "max_relative_map_difference": map_difference,
                    "max_relative_score_difference": score_difference,
                    "limit": MAX_RELATIVE_DIFFERENCE,
                },
                "versions": export_versions(),
            })
            for path in stale:
                path.unlink(missing_ok=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ExportSummary(
        model_dir, {name: entry["bytes"] for name, entry in checksums.items()}, time.perf_counter() - started,
        len(images), map_difference, score_difference,
    )


def export_versions() -> dict:
    return {name: require(name).__version__ for name in ("onnx", "onnxscript", "onnxruntime")} | {"torch": torch.__version__}
