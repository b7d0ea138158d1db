"""test.py's work: score every image under a folder, write predictions.csv and the pictures."""

from __future__ import annotations

import csv
import hashlib
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from anomaly_model import distributed
from dataset_manager import IMAGE_EXTENSIONS, DataError, find_images, is_mask_file, printable_path
from dataset_manager.loader import skipped_summary, warn_skipped
from pipeline.cli import outputs_to_skip
from pipeline.inspection import Inspection, Inspector
from pipeline.pictures import picture_arrays, short_stem, write_pictures

PREVIEW_SIZE = 640  # longest side of the overlay pictures, in pixels
COLUMNS = ["path", "image_score", "normalized_score", "verdict", "defect_area_fraction", "overlay", "mask", "classifier_probability"]


@dataclass
class PredictionSummary:
    run_dir: Path
    n_images: int
    n_defects: int
    skipped: list
    seconds: float


def picture_stems(paths: list[Path], folder: Path) -> list[str]:
    """Each path's picture file stem, from its path under `folder` (good/001.png -> good__001).
    Stems that two paths would share (001.png beside 001.jpg, a/b__c.png and a__b/c.png) get a short
    hash of their relative path appended, so no picture overwrites another's."""
    relatives = [path.relative_to(folder) if path.is_relative_to(folder) else Path(path.name) for path in paths]
    stems = [printable_path("__".join(relative.with_suffix("").parts)) for relative in relatives]  # the CSV names them
    taken = Counter(stems)
    return [
        stem if taken[stem] == 1 else f"{stem}-{hashlib.sha1(os.fsencode(relative.as_posix())).hexdigest()[:8]}"
        for stem, relative in zip(stems, relatives)
    ]


def run_folder(folder: Path) -> str:
    """test-<folder>-<time> (a dataset's own test folder is named by its category: test-tire-..., not
    test-test-...); a second run in the same second (or of another folder of the same name) gets -2,
    -3, ... appended when it finishes (AtomicFolder replace=False): never the same folder."""
    name = folder.resolve().parent.name if folder.name.lower() in ("test", "test_dataset_folder") else folder.name
    # a long folder name shortened: the temporary names beside the run add ~30 bytes to the 255 a name may have
    return f"test-{short_stem(name or folder.name, 160)}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def csv_values(path: Path, inspection: Inspection, overlay_path: str, mask_path: str) -> list[str]:
    """One predictions.csv row (COLUMNS) as test.py writes it, also the watched folder's (serve.py)."""
    return [
        printable_path(path), f"{inspection.image_score:.6g}", f"{inspection.normalized_score:.6g}", inspection.verdict,
        f"{inspection.defect_area_fraction:.6f}", overlay_path, mask_path,
        "" if inspection.classifier_probability is None else f"{inspection.classifier_probability:.6f}",
    ]


def predict_folder(inspector: Inspector, folder: Path, results_dir: Path, settings) -> PredictionSummary:
    """Streams the images under `folder` through the model; outputs appear only once complete.
    The tool's own output folders inside `folder` (RESULTS_DIR, MODEL_DIR, ...) are not scored.

    Under torchrun each rank scores its shard and writes its pictures into rank 0's temporary
    folder (`distributed.SharedFolder`); rank 0 writes predictions.csv in path order, as one
    process would; every rank returns rank 0's summary."""
    started = time.perf_counter()
    folder = Path(folder)
    paths = find_images(folder, skip=outputs_to_skip(folder, "the folder", settings))
    masks = [path for path in paths if is_mask_file(path)]
    paths = [path for path in paths if not is_mask_file(path)]
    if masks and distributed.is_main():
        print(f"note: {len(masks)} mask file{'s' if len(masks) != 1 else ''} (<stem>_mask.*, e.g. {printable_path(masks[0])}) "
              "not scored: they mark the defects of the images beside them", file=sys.stderr)
    if not paths:
        raise DataError(f"no images under {folder}: expected files ending in {', '.join(IMAGE_EXTENSIONS)}")
    detector = inspector.detector
    preview_size = PREVIEW_SIZE if settings.SAVE_PICTURES else 0
    mine = distributed.shard(len(paths), settings.BATCH_SIZE)
    with distributed.SharedFolder(results_dir / run_folder(folder), replace=False) as out:
        pictures = out.temporary / "pictures"
        if settings.SAVE_PICTURES:
            out.check_visible()  # every rank writes the pictures of the images it scored
        if settings.SAVE_PICTURES or distributed.is_main():
            pictures.mkdir(exist_ok=True)
        results, batches = inspector.inspect_paths([paths[i] for i in mine], settings.BATCH_SIZE, settings.NUM_WORKERS, preview_size)
        rows = []
        stems = picture_stems(paths, folder) if settings.SAVE_PICTURES else []
        for result, inspection in distributed.watched(results):
            index = mine[result.index]
            path = paths[index]
            overlay_path = mask_path = ""
            if settings.SAVE_PICTURES:
                arrays = picture_arrays(result.anomaly_map, result.size, result.preview,
                                        detector.preprocessor, detector.pixel_threshold, inspector.color_scale)
                overlay_file, mask_file = write_pictures(pictures, stems[index], arrays)
                overlay_path, mask_path = f"pictures/{overlay_file.name}", f"pictures/{mask_file.name}"
            rows.append((index, csv_values(path, inspection, overlay_path, mask_path)))
        position = {path: index for index, path in enumerate(paths)} if batches.skipped else {}
        skipped = distributed.gather_in_order([(position[path], (path, reason)) for path, reason in batches.skipped])
        rows = distributed.gather_in_order(rows)
        if distributed.is_main():
            with open(out.temporary / "predictions.csv", "w", newline="") as file:
                writer = csv.writer(file)
                writer.writerow(COLUMNS)
                writer.writerows(rows)
            warn_skipped(skipped)
            if not rows:
                raise DataError(f"none of the {len(paths)} images under {folder} could be read ({skipped_summary(skipped)})")
    summary = None
    if distributed.is_main():  # out.target is the folder's final name (-2, -3, ... when taken)
        n_defects = sum(row[3] == "defect" for row in rows)
        summary = PredictionSummary(out.target, len(rows), n_defects, skipped, time.perf_counter() - started)
    return distributed.broadcast_object(summary)
