"""test.py's work: score every image under a folder, write predictions.csv and the pictures."""

from __future__ import annotations

import csv
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from anomaly_model.files import AtomicFolder
from dataset_manager import DataError, find_images
from dataset_manager.loader import skipped_summary
from pipeline.detector import Detector
from pipeline.pictures import color_range, write_pictures

PREVIEW_SIZE = 640  # longest side of the overlay pictures, in pixels
COLUMNS = ["path", "image_score", "normalized_score", "verdict", "defect_area_fraction", "overlay", "mask", "classifier_probability"]


@dataclass
class PredictionSummary:
    run_dir: Path
    n_images: int
    n_defects: int
    skipped: list
    seconds: float


def picture_stem(path: Path, folder: Path) -> str:
    """A unique file stem from the path under `folder` (good/001.png and cut/001.png differ)."""
    relative = path.relative_to(folder) if path.is_relative_to(folder) else Path(path.name)
    return "__".join(relative.with_suffix("").parts)


def run_folder(folder: Path) -> str:
    """test-<folder>-<time>; a second run in the same second (or of another folder of the same
    name) gets -2, -3, ... appended when it finishes (AtomicFolder replace=False): never the same folder."""
    return f"test-{folder.name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def predict_folder(detector: Detector, folder: Path, results_dir: Path, settings) -> PredictionSummary:
    """Streams the images under `folder` through the model; outputs appear only once complete."""
    started = time.perf_counter()
    folder = Path(folder)
    paths = find_images(folder)
    if not paths:
        raise DataError(f"no images under {folder}: expected files ending in .png, .jpg, .jpeg, .bmp, .tif or .tiff")
    scale = color_range(detector.description)
    preview_size = PREVIEW_SIZE if settings.SAVE_PICTURES else 0
    n_defects = 0
    with AtomicFolder(results_dir / run_folder(folder), replace=False) as out:
        pictures = out.temporary / "pictures"
        pictures.mkdir()
        results, batches = detector.inspect(paths, settings.BATCH_SIZE, settings.NUM_WORKERS, preview_size)
        with open(out.temporary / "predictions.csv", "w", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(COLUMNS)
            for result in results:
                path = paths[result.index]
                defect = detector.is_defect(result)
                n_defects += defect
                area = float((result.anomaly_map > detector.pixel_threshold).float().mean())
                overlay_path = mask_path = ""
                if settings.SAVE_PICTURES:
                    overlay_file, mask_file = write_pictures(
                        pictures, picture_stem(path, folder), result.anomaly_map, result.size, result.preview,
                        detector.preprocessor, detector.pixel_threshold, scale,
                    )
                    overlay_path, mask_path = f"pictures/{overlay_file.name}", f"pictures/{mask_file.name}"
                writer.writerow([
                    str(path), f"{result.score:.6g}", f"{result.score / detector.image_threshold:.4f}",
                    "defect" if defect else "good", f"{area:.6f}", overlay_path, mask_path,
                    "" if result.probability is None else f"{result.probability:.6f}",
                ])
        for path, reason in batches.skipped:
            print(f"WARNING: skipped {path}: {reason}", file=sys.stderr)
        n_scored = len(paths) - len(batches.skipped)
        if n_scored == 0:
            raise DataError(f"none of the {len(paths)} images under {folder} could be read ({skipped_summary(batches.skipped)})")
    return PredictionSummary(out.target, n_scored, int(n_defects), batches.skipped, time.perf_counter() - started)
