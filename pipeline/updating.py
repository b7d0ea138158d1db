"""train.py ADD_GOOD=<folder> / ADD_DEFECT=<folder>: a trained model learns a reviewer's corrections in
seconds, without its training images.

Good images: their maps under the model as it is are honest goods (it never saw them), so they join
the honest goods the thresholds were set on (HONEST_GOODS_FILE) and, with a classifier, its rows;
the anomaly model learns them from the same backbone pass (`AnomalyModel.update_images`: PaDiM
exactly, from its saved running sums; PatchCore by continuing the greedy coreset over their
patches), each new image read and passed through the backbone once. Labeled defects: the
classifier's rows gain theirs and it is retrained (the anomaly model is left as it is). Images the
model already holds (same bytes, LEARNED_IMAGES_FILE) are skipped. The thresholds are re-picked at
the model's own rates. The new model replaces the old one atomically; the old one is kept as
`<name>.backup-1` (MODEL_BACKUPS of them), and model.json's "updates" lists every update.
"""

from __future__ import annotations

import copy
import os
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from tqdm import tqdm

from anomaly_model import distributed
from anomaly_model.errors import ModelError
from anomaly_model.base import AnomalyModel
from anomaly_model.files import model_lock, read_checked_bytes, read_checked_json
from anomaly_model.store import load_model, model_id, read_description, save_model
from dataset_manager import IMAGE_EXTENSIONS, ImageBatches, Preprocessor, find_images, is_mask_file
from dataset_manager.layouts import SORTED_FOLDERS
from dataset_manager.loader import warn_skipped
from pipeline.detector import settings_differences
from pipeline.training import (
    HONEST_GOODS_FILE, LEARNED_IMAGES_FILE, GoodMapSample, content_digest, learned_images, pixel_policies, report_verdict, shape_note,
)
from settings import SettingsError

# model.json sections the update rewrites from scratch (save_model writes them) or drops (an
# export of the old model does not fit the new one).
REWRITTEN_SECTIONS = ("format_version", "anomaly_model", "versions", "files", "export")


@dataclass
class NewImages:
    """The images of one folder an update learns, after those the model holds were set aside."""

    folder: Path
    paths: list[Path]  # not yet learned, each content once
    known: int  # skipped: the model already holds them
    repeated: int = 0  # skipped: a second copy of an image the folder holds already (learned once)


@dataclass
class Scored:
    """Maps of readable images under the model as it was before the update."""

    paths: list[Path]
    maps: torch.Tensor
    scores: torch.Tensor
    directions: torch.Tensor | None
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    learned: dict | None = None  # what the anomaly model reported of learning them (`score_files(learn=True)`)
    backgrounds: torch.Tensor | None = None  # background peak directions (`score_files(background_level=...)`)


@dataclass
class UpdateSummary:
    model_dir: Path
    n_good: int = 0
    n_defect: int = 0
    n_known: int = 0
    n_unreadable: int = 0
    seconds: float = 0.0
    image_threshold: float = 0.0
    pixel_threshold: float = 0.0
    thresholds_before: tuple[float, float] = (0.0, 0.0)  # (image, pixel) of the model before the update
    highest_new_good: tuple[float, Path] | None = None  # the new good that scored highest under the old model, and its score
    model_report: dict = field(default_factory=dict)  # what the anomaly model said of its update (PatchCore: covering radius)
    saved: bool = False
    stage_seconds: dict[str, float] = field(default_factory=dict)  # where the time went (bench/update_speed.py prints it)

    def lap(self, stage: str, since: float) -> float:
        """Record the seconds `stage` took since `since`; returns now (the next stage's start)."""
        now = time.perf_counter()
        self.stage_seconds[stage] = self.stage_seconds.get(stage, 0.0) + now - since
        return now


def new_images(folder: str, learned: dict, kind: str) -> NewImages:
    """The `kind` ("good" or "defect") images under `folder` whose content the model does not hold
    yet. Refused in one line: a missing folder (DataError), a folder that holds sorted subfolders
    (give the one of this kind). Skipped with a note: mask files (`*_mask.*`). Noted: images the
    model learned before as the other kind (it then holds them as both; a backup undoes an update)."""
    root = Path(folder)
    setting = "ADD_GOOD" if kind == "good" else "ADD_DEFECT"
    if not root.is_dir():
        raise SettingsError(f"{setting}={folder}: {'no such folder' if not root.exists() else 'not a folder'}: give the folder of {kind} images to learn")
    mixed = [name for name in SORTED_FOLDERS if (root / name).is_dir()]
    if mixed:
        hint = f"e.g. {setting}={root / kind}" if kind in mixed else f"a folder of {kind} images only"
        raise SettingsError(f"{setting}={folder} holds sorted folders ({', '.join(name + '/' for name in mixed)}): give {hint}")
    known, other = set(learned.get(kind, [])), set(learned.get("defect" if kind == "good" else "good", []))
    paths, skipped, repeated, masks, relabeled = [], 0, 0, [], []
    new: set[str] = set()
    for path in find_images(root):
        if is_mask_file(path):
            masks.append(path)
            continue
        try:
            digest = content_digest(path)
        except OSError as error:  # removed meanwhile, not ours to read: skipped and named, as train.py does
            warn_skipped([(path, f"cannot be read ({error.strerror or error})")])
            continue
        if digest in known or digest in new:
            skipped += digest in known
            repeated += digest in new
            continue
        if digest in other:
            relabeled.append(path)
        new.add(digest)
        paths.append(path)
    if masks:
        print(f"note: {len(masks)} mask file{'s' if len(masks) != 1 else ''} in {folder} (e.g. {masks[0].name}) not learned as images", file=sys.stderr)
    if not (paths or skipped or repeated or masks):  # an empty review folder is normal; a mistyped one looks the same
        print(f"note: {setting}={folder} holds no images (files ending in {', '.join(IMAGE_EXTENSIONS)}): nothing to learn from it", file=sys.stderr)
    if relabeled:
        print(
            f"note: {len(relabeled)} image{'s' if len(relabeled) != 1 else ''} in {folder} (e.g. {relabeled[0]}) the model learned before as "
            f"{'defects' if kind == 'good' else 'goods'}: it now holds them as both; to undo, restore the backup made before that update",
            file=sys.stderr,
        )
    return NewImages(root, paths, skipped, repeated)


def score_files(model: AnomalyModel, preprocessor: Preprocessor, paths: list[Path], batch_size: int, label: str, peaks: bool = False,
                learn: bool = False, background_level: float | None = None) -> Scored:
    """Maps, image scores (and peak directions when `peaks`, background peak directions at
    `background_level` when given) of the readable files among `paths` under the model as it is; with
    `learn` the model also learns them from the same backbone pass (`AnomalyModel.update_images`: the
    maps are those before it learned them), its report in `learned`."""
    batches = ImageBatches(paths, preprocessor, batch_size, 0)
    readable, maps, scores, directions, backgrounds = [], [], [], [], []

    def images():  # each batch's images; the paths of those read, in order
        for batch in tqdm(batches, desc=label, unit="batch", file=sys.stderr):
            readable.extend(paths[i] for i in batch.indices)
            yield batch.images

    def keep(*result: torch.Tensor) -> None:
        maps.append(result[0])
        scores.append(result[1])
        if peaks:
            directions.append(result[2])

    learned = None
    if learn:
        learned = model.update_images(images(), keep)
    else:
        for batch_images in images():
            keep(*(model.score_with_peaks(batch_images) if peaks else model.score(batch_images)))
            if background_level is not None:
                backgrounds.append(model.background_peaks(batch_images, background_level))
    warn_skipped(batches.skipped)
    if not readable:
        return Scored([], torch.zeros(0, *preprocessor.size), torch.zeros(0), None, list(batches.skipped))
    return Scored(readable, torch.cat(maps), torch.cat(scores), torch.cat(directions) if peaks else None, list(batches.skipped), learned,
                  torch.cat(backgrounds) if backgrounds else None)


def _old_model(model_dir: Path) -> ModelError:
    return ModelError(
        f"model {model_dir} was saved before models could be updated (it lacks what an exact update needs): "
        "retrain it once with python train.py; later updates take seconds"
    )


def update_model(model_dir: Path, settings, good_folder: str, defect_folder: str) -> UpdateSummary:
    """Teach the model at `model_dir` the good images of `good_folder` and the labeled defects of
    `defect_folder` (either may be ""), save it atomically beside numbered backups. Holds the
    model's lock from loading to saving: a second update of the same model waits and then learns
    on top of the first's (two at once each saved its own, and the first one's images were lost)."""
    if distributed.active():
        raise SettingsError("ADD_GOOD / ADD_DEFECT update a model on one process: run python train.py without torchrun")
    with model_lock(model_dir, "train.py ADD_GOOD / ADD_DEFECT is updating it", wait=True):
        return _update_locked(model_dir, settings, good_folder, defect_folder)


def _update_locked(model_dir: Path, settings, good_folder: str, defect_folder: str) -> UpdateSummary:
    started = time.perf_counter()
    model, description = load_model(model_dir, settings.DEVICE)
    loaded_at = time.perf_counter()
    loaded = model_id(description)
    files = description["files"]
    if HONEST_GOODS_FILE not in files or LEARNED_IMAGES_FILE not in files:
        raise _old_model(model_dir)
    learned = read_checked_json(model_dir, LEARNED_IMAGES_FILE, files, f"files.{LEARNED_IMAGES_FILE}")
    differences = settings_differences(description, settings) + _kept_operating_point(description, settings)
    if differences:  # an update learns into the model as it is: its size, backbone, statistics stay
        print(f"note: the update keeps model {model_dir}'s own settings where the settings differ (retrain to change them): "
              + "; ".join(differences), file=sys.stderr)
    goods = new_images(good_folder, learned, "good") if good_folder else None
    defects = new_images(defect_folder, learned, "defect") if defect_folder else None
    for key, folder in (("ADD_GOOD", good_folder), ("ADD_DEFECT", defect_folder)):
        note = _test_folder_note(key, folder, description)
        if note:
            print(f"note: {note}", file=sys.stderr)
    summary = UpdateSummary(model_dir, n_known=sum(part.known for part in (goods, defects) if part is not None))
    summary.stage_seconds["load model"] = loaded_at - started
    lap = summary.lap("find new images", loaded_at)
    has_classifier = "classifier" in description
    if defects is not None and not has_classifier:
        raise ModelError(f"model {model_dir} has no classifier (trained with CLASSIFIER=False): labeled defects teach only the classifier; retrain with CLASSIFIER=True")
    if model.kind == "padim" and goods is not None and goods.paths and not model.has_sums:
        raise _old_model(model_dir)
    for part, kind in ((goods, "good"), (defects, "defect")):
        if part is not None and part.repeated:
            print(f"{part.repeated} {kind} image{'s' if part.repeated != 1 else ''} in {part.folder} repeat{'s' if part.repeated == 1 else ''} "
                  "another of the folder (same bytes): learned once", file=sys.stderr)
        if part is not None and part.known:
            print(f"{part.known} {kind} image{'s' if part.known != 1 else ''} in {part.folder} already known to the model: skipped"
                  f"{' (its training and validation goods and earlier updates count)' if kind == 'good' else ''}", file=sys.stderr)
    if not any(part is not None and part.paths for part in (goods, defects)):
        print(f"nothing new to learn: model {model_dir} is unchanged", file=sys.stderr)
        summary.seconds = time.perf_counter() - started
        return summary

    preprocessor = Preprocessor.from_description(description["preprocessing"])
    info = copy.deepcopy({key: value for key, value in description.items() if key not in REWRITTEN_SECTIONS})
    extra_files: dict[str, bytes] = {}
    training_set = _restored_training_set(model_dir, description) if has_classifier else None
    history = list(description.get("updates", []))
    when = datetime.now(timezone.utc).isoformat(timespec="seconds")
    sample = GoodMapSample.from_bytes(read_checked_bytes(model_dir, HONEST_GOODS_FILE, files, f"files.{HONEST_GOODS_FILE}"))
    good_scored = None
    lap = summary.lap("read stored rows", lap)
    if goods is not None and goods.paths:
        note = shape_note(goods.paths, description.get("dataset", {}).get("image_shape"), tuple(preprocessor.resize))
        if note:
            print(f"note: {note}", file=sys.stderr)
        # one backbone pass: the maps are honest (scored before the model learned them), the same features learned
        good_scored = score_files(model, preprocessor, goods.paths, settings.BATCH_SIZE, "new goods", learn=True)
        lap = summary.lap("score and learn new goods", lap)
        summary.n_unreadable += len(good_scored.skipped)
        if good_scored.paths:
            summary.model_report = good_scored.learned
            top = int(good_scored.scores.argmax())
            summary.highest_new_good = (float(good_scored.scores[top]), good_scored.paths[top])
            sample.add(good_scored.maps, good_scored.scores)
            _set_thresholds(model, description, info, sample)
            if training_set is not None:
                training_set.add_goods(good_scored.maps, good_scored.scores)
            summary.n_good = len(good_scored.paths)
            history.append({"kind": "good", "folder": str(goods.folder), "images": summary.n_good, "already_learned": goods.known,
                            "repeated_in_folder": goods.repeated, "when": when, **summary.model_report})
            info.setdefault("dataset", {})["n_train_images"] = model.n_train_images_
    defect_scored = None
    if defects is not None and defects.paths:
        peaks = bool(settings.CLASSIFIER_DEFECT_SIMILARITY and model.has_peak_directions and training_set.has_good_directions)
        if settings.CLASSIFIER_DEFECT_SIMILARITY and not peaks:
            why = (f"{model.kind} models{' with tiles' if model.tile_size else ''} give no peak directions" if not model.has_peak_directions
                   else "the model stored no peak directions of its validation goods (trained before 2026-12-06 without labeled defects)")
            print(f"note: {why}: the labeled defects teach the classifier's first stage only", file=sys.stderr)
        level = info["thresholds"]["pixel"] if peaks else None  # a defect's region: its patches above the pixel threshold in force
        defect_scored = score_files(model, preprocessor, defects.paths, settings.BATCH_SIZE, "labeled defects", peaks, background_level=level)
        summary.n_unreadable += len(defect_scored.skipped)
        if defect_scored.paths:
            training_set.add_real_defects(defect_scored.maps, defect_scored.scores, settings.CLASSIFIER_REAL_DEFECT_WEIGHT, defect_scored.directions,
                                          defect_scored.backgrounds)
            summary.n_defect = len(defect_scored.paths)
            history.append({"kind": "defect", "folder": str(defects.folder), "images": summary.n_defect, "already_learned": defects.known,
                            "repeated_in_folder": defects.repeated, "when": when})
    if not (summary.n_good or summary.n_defect):
        print(f"none of the new images could be read: model {model_dir} is unchanged", file=sys.stderr)
        summary.seconds = time.perf_counter() - started
        return summary
    lap = summary.lap("thresholds, defects", lap)
    if training_set is not None:
        _retrain_classifier(training_set, description["classifier"], settings, info, extra_files)
        lap = summary.lap("retrain classifier", lap)
    extra_files[HONEST_GOODS_FILE] = sample.to_bytes()
    extra_files[LEARNED_IMAGES_FILE] = learned_images(
        good_scored.paths if good_scored is not None else [], defect_scored.paths if defect_scored is not None else [], learned)
    info["updates"] = history
    if "export" in description:
        print(f"note: model {model_dir}'s ONNX export was of the model before this update: run python export.py again", file=sys.stderr)
    if model_id(read_description(model_dir)) != loaded:
        raise ModelError(f"model {model_dir} was replaced while this update ran: run the update again")
    save_model(model_dir, model, info, extra_files, backups=settings.MODEL_BACKUPS)
    summary.lap("save with backup", lap)
    summary.saved = True
    summary.image_threshold, summary.pixel_threshold = info["thresholds"]["image"], info["thresholds"]["pixel"]
    summary.thresholds_before = (description["thresholds"]["image"], description["thresholds"]["pixel"])
    summary.seconds = time.perf_counter() - started
    return summary


def _test_folder_note(key: str, folder: str, description: dict) -> str:
    """A note when `folder` lies in the test folder of the data set the model was trained on: eval.py
    then measures images the model learned (it names them, but only after the fact)."""
    root = description.get("dataset", {}).get("dataset_dir")
    if not folder or not root:
        return ""
    inside = os.path.realpath(folder)
    for name in ("test", "test_dataset_folder"):
        test = os.path.realpath(os.path.join(root, name))
        if inside == test or inside.startswith(test + os.sep):
            return (f"{key}={folder} lies in the test folder of the data set this model was trained on ({test}): "
                    "eval.py's figures on the images it learns are no longer those of unseen parts")
    return ""


def _kept_operating_point(description: dict, settings) -> list[str]:
    """The rates and the classifier an update keeps as the model has them, where the settings differ
    (they were kept without a word; test.py, eval.py and serve.py take the rates at run time)."""
    thresholds = description["thresholds"]
    stored = {"IMAGE_FALSE_REJECT_RATE": thresholds["image_false_reject_rate"], "PIXEL_FALSE_REJECT_RATE": thresholds["pixel_false_reject_rate"],
              "CLASSIFIER": "classifier" in description}
    if "false_reject_rate" in description.get("classifier", {}):
        stored["CLASSIFIER_FALSE_REJECT_RATE"] = description["classifier"]["false_reject_rate"]
    return [f"{key}: model has {value!r}, config has {getattr(settings, key)!r}" for key, value in stored.items() if getattr(settings, key) != value]


def _set_thresholds(model: AnomalyModel, description: dict, info: dict, sample: GoodMapSample) -> None:
    """The thresholds re-picked at the model's own rates and pixel policy on `sample`: the stored
    honest goods plus the new goods' maps (scored before the model learned them)."""
    old = description["thresholds"]
    pooled = sample.calibrate(old["image_false_reject_rate"], old["pixel_false_reject_rate"])
    pixels = torch.from_numpy(np.concatenate(sample.pixels))[None]  # the sampled pixels stand for the maps
    pixel_policies(model, pixels, pooled["thresholds"], old.get("pixel_policy", "validation"))
    info["thresholds"] = pooled["thresholds"]
    if "out_of_fold" in info:
        info["out_of_fold"] = {**info["out_of_fold"], "goods_for_thresholds": pooled["validation"]["n_images"],
                               "image_scores": pooled["validation"]["image_scores"]}
    else:
        info["validation"] = pooled["validation"]


def _restored_training_set(model_dir: Path, description: dict):
    """The classifier's stored rows (CLASSIFIER_ROWS_FILE), ready for new goods and defects."""
    from classification_model.training import CLASSIFIER_ROWS_FILE, TrainingSet  # xgboost only for models with a classifier

    files, entry = description["files"], description["classifier"]
    if CLASSIFIER_ROWS_FILE not in files:
        raise _old_model(model_dir)
    counts = {
        "validation_goods": entry.get("n_validation_goods", 0), "out_of_fold_goods": entry.get("n_out_of_fold_goods", 0),
        "real_defects": entry.get("n_real_defects", 0), "added_goods": entry.get("n_added_goods", 0), **entry.get("n_synthetic_defects", {}),
    }
    data = read_checked_bytes(model_dir, CLASSIFIER_ROWS_FILE, files, f"files.{CLASSIFIER_ROWS_FILE}")
    levels = {key: float(value) for key, value in entry["levels"].items()}
    return TrainingSet.restored(levels, data, counts, int(description["anomaly_model"]["settings"].get("seed", 0)))


def _retrain_classifier(training_set, entry: dict, settings, info: dict, extra_files: dict[str, bytes]) -> None:
    """The classifier retrained on its rows at the model's own verdict rate and anchoring."""
    from classification_model.training import CLASSIFIER_ROWS_FILE, classifier_info

    values = vars(settings).copy()
    values["CLASSIFIER_FALSE_REJECT_RATE"] = entry.get("false_reject_rate", settings.CLASSIFIER_FALSE_REJECT_RATE)
    values["CLASSIFIER_ANCHOR"] = entry.get("anchor_mode", settings.CLASSIFIER_ANCHOR)
    own = SimpleNamespace(**values)
    classifier = training_set.train(own)
    report_verdict(training_set)
    info["classifier"] = classifier_info(classifier, training_set, own)
    info["classifier"]["n_added_goods"] = int(training_set.counts.get("added_goods", 0))
    extra_files[info["classifier"]["booster_file"]] = classifier.to_bytes()
    extra_files[CLASSIFIER_ROWS_FILE] = training_set.to_bytes()

