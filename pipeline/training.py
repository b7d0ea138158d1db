"""train.py's work for one category: fit the anomaly model on good images, calibrate on held-out goods, save."""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Iterator

import numpy as np
import torch
from tqdm import tqdm

from anomaly_model import distributed
from choices import PIXEL_THRESHOLD_POLICIES
from anomaly_model.errors import ModelError
from anomaly_model.base import AnomalyModel
from anomaly_model.files import backup_path, check_replaceable, check_writable, sweep_model
from anomaly_model.store import build_model, model_id, read_description, save_model
from evaluation.metrics import few_goods_note, threshold_at_rate
from dataset_manager import Category, DataError, ImageBatches, Preprocessor
from dataset_manager.images import image_size, readable_sizes, resolve_image_size, training_full_scale
from dataset_manager.loader import skipped_summary, warn_skipped
from settings import SettingsError

if TYPE_CHECKING:
    from classification_model.training import TrainingSet

# Files a model keeps for `pipeline.updating` (train.py ADD_GOOD / ADD_DEFECT): the sha256 of every
# image it learned (an image added again is skipped), and its honest goods' image scores and
# sampled pixels (the thresholds are re-picked on them and the new goods' maps).
LEARNED_IMAGES_FILE = "learned_images.json"
HONEST_GOODS_FILE = "honest_goods.npz"
PIXEL_SAMPLE_STRIDE = 4  # validation maps are smooth (blur sigma 4): every 4th pixel each way suffices
MIN_TRAIN_IMAGES = 2  # a covariance (and any spread of good features) needs at least two images


@dataclass
class TrainingSummary:
    category: str
    model_dir: Path
    n_train: int
    n_validation: int
    n_out_of_fold: int
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
        f"at least {MIN_TRAIN_IMAGES} are needed; add good images" + (", or lower VALIDATION_FRACTION" if held_out else "")
    )


def make_preprocessor(settings, train_paths: list[Path], stride: int) -> Preprocessor:
    """The preprocessing of a new model: IMAGE_SIZE resolved on the training images ("auto", a
    fraction of their size), rounded to the backbone's `stride`; CENTER_CROP around it."""
    size = resolve_image_size(settings.IMAGE_SIZE, train_paths, stride)
    preprocessor = Preprocessor.with_center_crop(size, settings.CENTER_CROP, settings.NORMALIZE_MEAN, settings.NORMALIZE_STD)
    preprocessor.gray_full_scale = training_full_scale(train_paths)  # 16-bit cameras: one scale for all their images
    if distributed.is_main():
        for note in geometry_notes(train_paths, preprocessor.resize, settings.IMAGE_SIZE):
            print(f"note: {note}", file=sys.stderr)
    return preprocessor


GEOMETRY_SAMPLE = 200  # training image headers read for the geometry notes (evenly spaced; a header is ~1 ms)
STRETCH_NOTED = 1.25  # aspect ratios (height / width) further apart than this are noted: each image is stretched to one shape
ENLARGE_NOTED = 2.0  # images enlarged more than this to the working size are noted: slower, and no detail gained


def sampled_sizes(paths: list[Path]) -> list[tuple[int, int]]:
    """(height, width) of up to GEOMETRY_SAMPLE of `paths`, evenly spaced, read from their headers."""
    return readable_sizes([paths[int(i)] for i in np.linspace(0, len(paths) - 1, min(len(paths), GEOMETRY_SAMPLE))] if paths else [])


def median_shape(paths: list[Path]) -> list[int] | None:
    """The training images' median (height, width), kept in model.json: an update's new goods are compared with it."""
    sizes = sampled_sizes(paths)
    return [int(value) for value in np.median(np.array(sizes), axis=0)] if sizes else None


def shape_note(paths: list[Path], shape: list[int] | None, resize: tuple[int, int]) -> str | None:
    """A note when some of an update's new goods are shaped unlike the model's training images
    (`shape`, their median): each is stretched to the working size, as in a training of mixed shapes."""
    sizes = sampled_sizes(paths)
    if not shape or not sizes:
        return None
    trained = shape[0] / shape[1]
    off = [size for size in sizes if max(size[0] / size[1] / trained, trained * size[1] / size[0]) > STRETCH_NOTED]
    if not off:
        return None
    return (f"{len(off)} of the {len(sizes)} new goods{' read' if len(sizes) < len(paths) else ''} are shaped unlike the model's training images "
            f"(e.g. {off[0][0]} x {off[0][1]} against {shape[0]} x {shape[1]}, height x width): each is stretched to {resize[0]} x {resize[1]}; "
            "parts photographed differently are best trained as separate categories")


def geometry_notes(paths: list[Path], resize: tuple[int, int], setting) -> list[str]:
    """What IMAGE_SIZE does to these training images that a user would not guess: parts of several
    aspect ratios stretched to one shape, small images enlarged several times (read from headers)."""
    sizes = sampled_sizes(paths)
    if not sizes:
        return []
    notes = []
    ratios = np.array([height / width for height, width in sizes])
    low, high = sizes[int(ratios.argmin())], sizes[int(ratios.argmax())]
    if ratios.max() / ratios.min() > STRETCH_NOTED:
        notes.append(f"the training images come in several shapes (e.g. {low[0]} x {low[1]} and {high[0]} x {high[1]}, height x width): "
                     f"each is stretched to {resize[0]} x {resize[1]}; parts photographed differently are best trained as separate categories")
    heights, widths = np.array(sizes, dtype=np.float64).T
    enlarged = min(resize[0] / np.median(heights), resize[1] / np.median(widths))
    if enlarged > ENLARGE_NOTED:
        notes.append(f"IMAGE_SIZE={setting!r} enlarges the training images (median {np.median(heights):.0f} x {np.median(widths):.0f}) "
                     f"{enlarged:.1f} times to {resize[0]} x {resize[1]}: slower, and no detail is gained; IMAGE_SIZE=1.0 inspects them at their own size")
    return notes


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


def assign_folds(count: int, folds: int, seed: int) -> np.ndarray:
    """Fold of each of `count` training images: a seeded shuffle dealt round-robin, so folds differ
    in size by at most one and do not follow the file order (a drift in time spreads over all folds)."""
    order = np.random.default_rng(seed).permutation(count)
    assignment = np.empty(count, dtype=int)
    assignment[order] = np.arange(count) % folds
    return assignment


def out_of_fold_maps(
    model: AnomalyModel, train_paths: list[Path], preprocessor: Preprocessor, settings, folds: np.ndarray, peaks: bool = False
) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """(indices into train_paths, maps, image scores, peak directions if `peaks` else None) of the
    training images, each scored by the model fitted without its fold (`AnomalyModel.out_of_fold_scores`),
    streamed batch by batch."""

    def batches(wanted: list[int] | None = None):
        chosen = list(range(len(train_paths))) if wanted is None else wanted
        loader = ImageBatches([train_paths[i] for i in chosen], preprocessor, settings.BATCH_SIZE, settings.NUM_WORKERS)
        return ((batch.images, [chosen[i] for i in batch.indices]) for batch in loader)

    with tqdm(total=model.n_train_images_, desc="out-of-fold maps", unit="img", file=sys.stderr) as progress:
        for indices, maps, scores, directions in model.out_of_fold_scores(batches, folds, peaks):
            progress.update(len(indices))
            yield indices, maps, scores, directions


class GoodMapSample:
    """Image scores and every PIXEL_SAMPLE_STRIDE-th pixel of good maps, collected as the maps arrive:
    all the calibration needs, ~25 KB per 224 x 224 map (float64), so hundreds of out-of-fold maps cost little."""

    def __init__(self) -> None:
        self.scores: list[np.ndarray] = []
        self.pixels: list[np.ndarray] = []

    def add(self, maps: torch.Tensor, image_scores: torch.Tensor) -> None:
        self.scores.append(image_scores.double().numpy())
        self.pixels.append(maps[:, ::PIXEL_SAMPLE_STRIDE, ::PIXEL_SAMPLE_STRIDE].reshape(-1).double().numpy())

    @property
    def count(self) -> int:
        return int(sum(len(scores) for scores in self.scores))

    def to_bytes(self) -> bytes:
        """The sample as an .npz (HONEST_GOODS_FILE): what a model update re-picks its thresholds on."""
        buffer = io.BytesIO()
        np.savez(buffer, scores=np.concatenate(self.scores), pixels=np.concatenate(self.pixels).astype(np.float32))
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> "GoodMapSample":
        """The sample `to_bytes` saved (no pickled objects are read)."""
        with np.load(io.BytesIO(data), allow_pickle=False) as stored:
            sample = cls()
            sample.scores.append(stored["scores"].astype(np.float64))
            sample.pixels.append(stored["pixels"].astype(np.float64))
        return sample

    def calibrate(self, image_rate: float, pixel_rate: float) -> dict:
        """Thresholds that reject the given shares of these good images / pixels, and their statistics."""
        for name, rate in (("IMAGE_FALSE_REJECT_RATE", image_rate), ("PIXEL_FALSE_REJECT_RATE", pixel_rate)):
            if not 0 <= rate < 1:
                raise ModelError(f"{name}={rate} must be in [0, 1)")
        scores, pixels = np.concatenate(self.scores), np.concatenate(self.pixels)
        return {
            "thresholds": {
                "image": threshold_at_rate(scores, image_rate),
                "pixel": threshold_at_rate(pixels, pixel_rate),
                "image_false_reject_rate": image_rate,
                "pixel_false_reject_rate": pixel_rate,
            },
            "validation": {
                "n_images": int(len(scores)),
                "image_scores": [float(f"{s:.7g}") for s in scores],  # significant digits: tiny scores (5e-15) must not become 0
                "image_score_mean": float(scores.mean()),
                "image_score_std": float(scores.std()),
                "pixel_quantiles": {str(q): float(np.quantile(pixels, q)) for q in (0.5, 0.9, 0.99, 0.999)},
            },
        }


def content_digest(path: Path) -> str:
    """sha256 of an image file's bytes: the same picture under another name is the same image."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def learned_images(good: list[Path], defect: list[Path], before: dict | None = None) -> bytes:
    """LEARNED_IMAGES_FILE: the content digests of the goods and labeled defects a model learned
    (`before`: an earlier list, extended), so that an update skips what the model already holds."""
    learned = {"good": list((before or {}).get("good", [])), "defect": list((before or {}).get("defect", []))}
    for kind, paths in (("good", good), ("defect", defect)):
        known = set(learned[kind])
        for path in paths:
            try:
                digest = content_digest(path)
            except OSError:  # gone or unreadable since it was learned: only a later update will not know it again
                continue
            if digest not in known:
                learned[kind].append(digest)
                known.add(digest)
    return json.dumps(learned).encode()


def calibrate(maps: torch.Tensor, image_scores: torch.Tensor, image_rate: float, pixel_rate: float) -> dict:
    """Thresholds that reject the given shares of good images / pixels, and the score statistics."""
    sample = GoodMapSample()
    sample.add(maps, image_scores)
    return sample.calibrate(image_rate, pixel_rate)


def out_of_fold_folds(settings, n_train: int) -> int:
    """OUT_OF_FOLD_FOLDS, checked; at most one fold per training image."""
    folds = settings.OUT_OF_FOLD_FOLDS
    if folds == 1 or folds < 0:
        raise ModelError(f"OUT_OF_FOLD_FOLDS={folds} must be 0 (off) or at least 2")
    if folds > n_train and distributed.is_main():
        print(f"note: OUT_OF_FOLD_FOLDS={folds} with {n_train} training images: {n_train} folds (one image each)", file=sys.stderr)
    return min(folds, n_train)


def check_pixel_policy(model: AnomalyModel, policy: str, rate: float) -> None:
    """Refuse, before any fitting, a pixel threshold policy the model or the rate cannot give."""
    if policy not in PIXEL_THRESHOLD_POLICIES:
        raise SettingsError(f"PIXEL_THRESHOLD_POLICY={policy!r} is not supported: choose one of {', '.join(PIXEL_THRESHOLD_POLICIES)}")
    if policy == "chebyshev":
        if not 0 < rate < 1:
            raise SettingsError(f"PIXEL_THRESHOLD_POLICY=chebyshev needs PIXEL_FALSE_REJECT_RATE in (0, 1), got {rate}: it is the false-alarm bound")
        if model.bounded_pixel_threshold(rate) is None:
            raise SettingsError(f"PIXEL_THRESHOLD_POLICY=chebyshev needs a model with a distribution-free bound (padim), not {model.kind}")


def pixel_policies(model: AnomalyModel, maps: torch.Tensor, thresholds: dict, policy: str) -> None:
    """Adds to `thresholds` both pixel thresholds (the validation quantile and, when the model has
    one, the Chebyshev bound's level), how often good validation pixels reach each, and sets
    "pixel" to the one PIXEL_THRESHOLD_POLICY chooses."""
    rate = thresholds["pixel_false_reject_rate"]

    def exceedance(level: float) -> float:  # every pixel of every map, not the calibration's sample
        return int((maps >= level).sum()) / maps.numel()

    entries = {"validation": {"threshold": thresholds["pixel"], "rate": rate, "validation_exceedance": exceedance(thresholds["pixel"])}}
    bounded = model.bounded_pixel_threshold(rate) if rate > 0 else None
    if bounded is not None:
        level, rule = bounded
        entries["chebyshev"] = {"threshold": level, "bound": rate, "rule": rule, "validation_exceedance": exceedance(level)}
    thresholds["pixel_policy"] = policy
    thresholds["pixel_policies"] = entries
    thresholds["pixel"] = entries[policy]["threshold"]
    thresholds["n_validation_pixels"] = int(maps.numel())


@dataclass
class TrainingImages:
    """Which images a training run reads, fixed before the first is decoded."""

    train: list[Path]  # the readable training images (the fit, and the out-of-fold maps)
    validation: list[Path]  # held-out goods: validation/good, or a seeded share of train
    skipped: list[tuple[Path, str]]  # unreadable files so far, with the reason (stages add theirs)
    folds: int  # out-of-fold folds, 0 = none


@dataclass(frozen=True)
class ModelVersion:
    """Which version of a model a training replaces: its id and its update history."""

    id: str
    updates: list


def model_version(model_dir: Path) -> ModelVersion | None:
    """The model at `model_dir` now, or None when there is none that can be read."""
    try:
        description = read_description(model_dir)
    except (ModelError, OSError, ValueError):
        return None
    return ModelVersion(model_id(description), list(description.get("updates") or []))


@dataclass
class TrainingRun:
    """One category's training as it moves through the stages of `train_category`: what the
    settings and the data fixed first, then what each stage leaves for the next."""

    category: Category
    settings: SimpleNamespace
    model_dir: Path
    images: TrainingImages
    model: AnomalyModel
    preprocessor: Preprocessor
    started: float  # perf_counter at the start: the summary's seconds
    maps: torch.Tensor | None = field(default=None, init=False)  # the validation goods' maps (rank 0), dropped once used
    scores: torch.Tensor | None = field(default=None, init=False)  # and their image scores
    skipped_validation: list[tuple[Path, str]] = field(default_factory=list, init=False)
    goods: GoodMapSample = field(default_factory=lambda: GoodMapSample(), init=False)  # every honest good: thresholds
    training_set: TrainingSet | None = field(default=None, init=False)  # the classifier's rows (CLASSIFIER)
    n_out_of_fold: int = field(default=0, init=False)  # training images scored out-of-fold
    peaks: bool = field(default=False, init=False)  # the validation goods and labeled defects get peak directions (the similarity stage)
    info: dict = field(default_factory=dict, init=False)  # model.json's sections, as the stages make them
    extra_files: dict[str, bytes] = field(default_factory=dict, init=False)  # files saved beside the model
    replacing: ModelVersion | None = field(default=None, init=False)  # the model at model_dir when the training began (rank 0)

    @property
    def readable_validation(self) -> list[Path]:
        unreadable = {path for path, _ in self.skipped_validation}
        return [path for path in self.images.validation if path not in unreadable]


def train_category(category: Category, settings, model_dir: Path) -> TrainingSummary:
    """Fit, calibrate and save one model; the previous model at `model_dir` survives any failure.

    The stages, in order: fit the anomaly model on the training images; score the validation goods;
    then, on one process, collect every honest good (the validation maps and, with
    OUT_OF_FOLD_FOLDS > 0, each training image's out-of-fold map), set the thresholds on them,
    train the classifier (CLASSIFIER) on them, on synthetic and on labeled defects, and save.

    Under torchrun every rank runs the first two stages on its shard of the images; rank 0 then
    does the rest alone and every rank returns rank 0's summary."""
    run = prepare(category, settings, model_dir)
    fit(run)
    score_validation_goods(run)
    summary = None
    if distributed.is_main():  # the validation maps and scores were gathered here
        collect_honest_goods(run)
        set_thresholds(run)
        if settings.CLASSIFIER:
            train_verdict(run)
        summary = save(run)
    return distributed.broadcast_object(summary)


def prepare(category: Category, settings, model_dir: Path) -> TrainingRun:
    """Everything checked before the first image is decoded: the validation split, readable headers,
    enough images, the model and its working size, the pixel threshold policy."""
    started = time.perf_counter()
    if distributed.is_main():
        check_writable(model_dir.parent)
        sweep_model(model_dir)  # a killed run's leftovers beside the model, a killed export's folder inside it
        check_replaceable(model_dir)  # a user's own folder at MODEL_DIR/<name> is refused now, not after the fit
        for folder in category.ignored_folders:
            print(f"note: {folder} is not read: of the folders in {folder.parent}, only good/ (good images) and defect/ "
                  "(labeled defects) are", file=sys.stderr)
        if category.mask_files:
            count = len(category.mask_files)
            print(f"note: {count} mask file{'s' if count != 1 else ''} among {category.name}'s training images (e.g. {category.mask_files[0]}) not learned as images", file=sys.stderr)
        if category.train_defect_images and not settings.CLASSIFIER:
            count = len(category.train_defect_images)
            print(f"note: {count} labeled defect{'s' if count != 1 else ''} in {folder_of(category.train_defect_images)} not used: only the classifier "
                  "learns from them (CLASSIFIER = True)", file=sys.stderr)
    train_paths, validation_paths = split_validation(category, settings.VALIDATION_FRACTION, settings.SEED)
    folder, n_files = folder_of(category.train_images), len(train_paths)
    held_out = 0 if category.validation_images else len(validation_paths)
    mine = distributed.shard(len(train_paths), settings.BATCH_SIZE)
    _, unreadable = readable_headers([train_paths[i] for i in mine])  # each rank checks its share of the headers
    skipped = skipped_in_order(unreadable, train_paths)
    unreadable = {path for path, _ in skipped}
    train_paths = [path for path in train_paths if path not in unreadable]
    require_training_images(len(train_paths), folder, n_files, held_out, skipped)
    folds = out_of_fold_folds(settings, len(train_paths))
    model = build_model(settings)
    preprocessor = make_preprocessor(settings, train_paths, model.stride)
    layout = model.start_fit(preprocessor.size)  # a wrong tile size or too large statistics fail here, before any reading
    if folds and layout is not None:
        print("note: out-of-fold maps are not made for tiled models; the classifier and thresholds use the validation goods", file=sys.stderr)
        folds = 0
    check_pixel_policy(model, settings.PIXEL_THRESHOLD_POLICY, settings.PIXEL_FALSE_REJECT_RATE)
    if folds:
        _check_folds(model, category, settings, len(train_paths), folds, len(validation_paths))
    if settings.CLASSIFIER:  # what the classifier will lack is known now, before minutes of fitting
        check_classifier_rows(category, settings, len(validation_paths), len(train_paths) if folds else 0)
    images = TrainingImages(train_paths, validation_paths, skipped, folds)
    run = TrainingRun(category, settings, model_dir, images, model, preprocessor, started)
    if distributed.is_main():
        run.replacing = model_version(model_dir)
    return run


def fit(run: TrainingRun) -> None:
    """Fit the anomaly model on this rank's shard of the training images, streamed batch by batch."""
    settings, train_paths = run.settings, run.images.train
    mine = distributed.shard(len(train_paths), settings.BATCH_SIZE)
    batches = ImageBatches([train_paths[i] for i in mine], run.preprocessor, settings.BATCH_SIZE, settings.NUM_WORKERS)
    fitted: list[int] = []  # train_paths number of each image this rank fits, filled as they are read (plan_fit)
    held_out = 0 if run.category.validation_images else len(run.images.validation)
    n_files = len(train_paths) + len(run.images.skipped)

    def counted_images():
        """The batches' images; once they are all read, fewer than 2 is a DataError before any fit
        ends. Alone only: under torchrun a rank sees its shard, and the fit checks the total."""
        count = 0
        for batch in distributed.watched(tqdm(batches, desc=f"fit {run.category.name}", unit="batch", file=sys.stderr)):
            count += len(batch.indices)
            fitted.extend(mine[i] for i in batch.indices)
            yield batch.images
        if not distributed.active():
            require_training_images(count, folder_of(run.category.train_images), n_files, held_out, run.images.skipped + batches.skipped)

    layout = run.model.tile_layout_
    run.model.plan_fit(len(train_paths) * (layout.count if layout is not None else 1), fitted)  # backbone inputs: images or tiles
    run.model.fit_images(counted_images())
    run.images.skipped += skipped_in_order(batches.skipped, train_paths)


def score_validation_goods(run: TrainingRun) -> None:
    """The validation goods' maps and image scores (gathered on rank 0), and their unreadable files."""
    run.maps, run.scores, run.skipped_validation = validation_maps(run.model, run.images.validation, run.preprocessor, run.settings)
    run.images.skipped += run.skipped_validation


def collect_honest_goods(run: TrainingRun) -> None:
    """Every map of a good image the model was not fitted on, into the threshold sample and (with
    CLASSIFIER) the classifier's rows with the synthetic defects painted on them: the validation
    goods, then each training image's out-of-fold map as it streams in (none is kept)."""
    settings, model, images = run.settings, run.model, run.images
    warn_skipped(images.skipped)
    run.peaks = _peak_directions_wanted(model, settings, bool(run.category.train_defect_images))
    run.goods.add(run.maps, run.scores)
    run.info.update(run.goods.calibrate(settings.IMAGE_FALSE_REJECT_RATE, settings.PIXEL_FALSE_REJECT_RATE))  # the validation goods'
    n_validation = int(run.maps.shape[0])
    if settings.CLASSIFIER:
        from classification_model.training import HonestGoods  # xgboost is imported only when a classifier is trained

        run.training_set = _classifier_training_set(run.category, settings, run.info, n_validation, len(images.train) if images.folds else 0)
        validation = run.readable_validation
        run.training_set.add_goods_and_synthetic(
            model, run.preprocessor, HonestGoods(validation, list(range(len(validation))), run.maps, run.scores, False), settings)
    if not images.folds:
        return
    folds = assign_folds(len(images.train), images.folds, settings.SEED)
    try:
        for indices, fold_maps, fold_scores, _ in out_of_fold_maps(model, images.train, run.preprocessor, settings, folds):
            run.goods.add(fold_maps, fold_scores)
            run.n_out_of_fold += len(indices)
            if run.training_set is not None:
                goods = HonestGoods([images.train[i] for i in indices], [n_validation + i for i in indices], fold_maps, fold_scores, True)
                run.training_set.add_goods_and_synthetic(model, run.preprocessor, goods, settings)
    except NotImplementedError:
        print(f"note: {model.kind} has no out-of-fold maps; only the validation goods are used", file=sys.stderr)


def set_thresholds(run: TrainingRun) -> None:
    """The image and pixel thresholds at the configured false-reject rates, on every honest good;
    both pixel policies are measured on every pixel of the validation maps, which are then dropped."""
    settings = run.settings
    low, high = float(run.maps.min()), float(run.maps.max())
    if not high > low:  # finite but constant: thresholds of 0 and a verdict that never changes
        raise DataError(f"every validation good's anomaly map is {high:.4g} everywhere: the model tells nothing apart "
                        "(NORMALIZE_MEAN / NORMALIZE_STD far from the images' values? all training images identical?)")
    if run.n_out_of_fold:
        pooled = run.goods.calibrate(settings.IMAGE_FALSE_REJECT_RATE, settings.PIXEL_FALSE_REJECT_RATE)
        run.info["thresholds"] = pooled["thresholds"]
        run.info["out_of_fold"] = {
            "folds": run.images.folds, "n_images": run.n_out_of_fold, "goods_for_thresholds": pooled["validation"]["n_images"],
            "image_scores": pooled["validation"]["image_scores"],  # every honest good: eval.py's shift check
        }
    pixel_policies(run.model, run.maps, run.info["thresholds"], settings.PIXEL_THRESHOLD_POLICY)  # on the thresholds in force
    run.maps = None
    note = few_goods_note(run.goods.count, settings.IMAGE_FALSE_REJECT_RATE, "IMAGE_FALSE_REJECT_RATE", not run.model.tile_size)
    if note:
        print(f"note: {note}", file=sys.stderr)


def train_verdict(run: TrainingRun) -> None:
    """The classifier on the collected goods and synthetic defects, plus the labeled defects
    (train/defect/) and, from them, the similarity stage where it may be learned."""
    from classification_model.training import CLASSIFIER_ROWS_FILE, classifier_info, image_maps

    settings, model, training_set, category = run.settings, run.model, run.training_set, run.category
    if run.peaks:  # the validation goods once more, for their peak directions (a few dozen images)
        validation, rows = run.readable_validation, training_set.validation_rows
        _, _, directions, _ = image_maps(model, run.preprocessor, validation, settings.BATCH_SIZE, "validation peaks", peaks=True)
        if len(directions) == rows.stop - rows.start:
            training_set.add_good_directions(np.arange(rows.start, rows.stop), directions)
        elif not training_set.has_good_directions:
            training_set.similarity_note = "some validation images could not be read a second time for their peak directions"
    if category.train_defect_images:
        level = run.info["thresholds"]["pixel"] if run.peaks else None  # a defect's region: its patches above the pixel threshold
        real_maps, real_scores, real_directions, real_backgrounds = image_maps(
            model, run.preprocessor, list(category.train_defect_images), settings.BATCH_SIZE, "labeled defects", run.peaks, level)
        training_set.add_real_defects(real_maps, real_scores, settings.CLASSIFIER_REAL_DEFECT_WEIGHT, real_directions, real_backgrounds)
    classifier = training_set.train(settings)
    report_verdict(training_set)
    run.info["classifier"] = classifier_info(classifier, training_set, settings)
    run.extra_files[run.info["classifier"]["booster_file"]] = classifier.to_bytes()
    run.extra_files[CLASSIFIER_ROWS_FILE] = training_set.to_bytes()  # what an update retrains it on


def report_verdict(training_set: TrainingSet) -> None:
    """The line saying which verdict the classifier keeps and why; with labeled defects, why their
    similarity stage is not used (without any there is none to miss: no note)."""
    print(f"verdict: {training_set.verdict.verdict} ({training_set.verdict.why})", file=sys.stderr)
    if training_set.similarity_note and training_set.counts.get("real_defects", 0):
        print(f"note: no labeled-defect similarity stage: {training_set.similarity_note}", file=sys.stderr)


def save(run: TrainingRun) -> TrainingSummary:
    """The model folder, written atomically, and what train.py reports of it."""
    settings, model = run.settings, run.model
    info = dict(run.info)
    info["preprocessing"] = run.preprocessor.description(settings.IMAGE_SIZE, settings.CENTER_CROP)
    info["dataset"] = {
        "category": run.category.name,
        "dataset_dir": str(run.category.root),
        "n_train_images": model.n_train_images_,
        "n_validation_images": run.goods.count - run.n_out_of_fold,
        "skipped_files": [str(path) for path, _ in run.images.skipped],
        "image_shape": median_shape(run.images.train),
    }
    unreadable = {path for path, _ in run.images.skipped}
    goods = [path for path in run.images.train + run.images.validation if path not in unreadable]
    run.extra_files[LEARNED_IMAGES_FILE] = learned_images(goods, list(run.category.train_defect_images) if settings.CLASSIFIER else [])
    run.extra_files[HONEST_GOODS_FILE] = run.goods.to_bytes()
    changed = _changed_meanwhile(run)
    model_bytes = save_model(run.model_dir, model, info, extra_files=run.extra_files, backups=settings.MODEL_BACKUPS)  # a retrain can be worse: the model it replaces is kept
    if changed:
        kept = f"it is kept as {backup_path(run.model_dir, 1).name}" if settings.MODEL_BACKUPS else "it is not kept (MODEL_BACKUPS = 0)"
        print(f"note: model {run.model_dir} changed while this training ran ({changed}); this training replaced that version too: {kept}",
              file=sys.stderr)
    return TrainingSummary(
        category=run.category.name,
        model_dir=run.model_dir,
        n_train=model.n_train_images_,
        n_validation=run.goods.count - run.n_out_of_fold,
        n_out_of_fold=run.n_out_of_fold,
        seconds=time.perf_counter() - run.started,
        model_bytes=model_bytes,
        image_threshold=info["thresholds"]["image"],
        pixel_threshold=info["thresholds"]["pixel"],
        skipped=run.images.skipped,
        image_size=run.preprocessor.size,
        tiles=model.tile_layout_.count if model.tile_layout_ is not None else 0,
    )


def _changed_meanwhile(run: TrainingRun) -> str:
    """What happened to the model at `run.model_dir` since the training began ("" when nothing): an
    update that landed meanwhile would otherwise vanish into a backup without a word."""
    now = model_version(run.model_dir)
    if now is None or (run.replacing is not None and now.id == run.replacing.id):
        return ""
    before = run.replacing.updates if run.replacing is not None else []
    if run.replacing is not None and now.updates[: len(before)] == before and len(now.updates) > len(before):
        added = now.updates[len(before) :]
        folders = ", ".join(sorted({str(entry.get("folder")) for entry in added}))
        images = sum(int(entry.get("images", 0)) for entry in added)
        return (f"{len(added)} update{'s' if len(added) != 1 else ''} learned {images} images from {folders}: "
                f"run train.py ADD_GOOD= / ADD_DEFECT= with {'that folder' if len(added) == 1 else 'those folders'} again to teach them to this model")
    return "another training or a restored backup replaced it"


def _peak_directions_wanted(model: AnomalyModel, settings, labeled: bool) -> bool:
    """Whether the validation goods (and labeled defects) get peak directions: the similarity stage may
    be learned, from `labeled` defects in train/defect/ now or from a later ADD_DEFECT (the review
    page's corrections), which needs the goods' directions stored. A note when labeled defects are
    given and the model cannot give directions. (The out-of-fold goods' directions are not used: with
    them the evidence kept the stage where labeled defects were taken unlike the goods, docs/classifier.md.)"""
    if not (settings.CLASSIFIER and settings.CLASSIFIER_DEFECT_SIMILARITY):
        return False
    if not model.has_peak_directions:
        if labeled:
            what = f"{model.kind} models{' with tiles' if model.tile_size else ''}"
            print(f"note: {what} give no peak directions: the labeled defects train the classifier's first stage only", file=sys.stderr)
        return False
    return True


def _check_folds(model: AnomalyModel, category: Category, settings, n_train: int, folds: int, n_validation: int) -> None:
    """Out-of-fold models need `MIN_IMAGES_OUTSIDE_FOLD` training images outside every fold (PaDiM's
    Gaussians a covariance): too few is refused before the fit, naming the settings that then work
    (the classifier may need its honest goods from the folds: then it must go too)."""
    needed = model.MIN_IMAGES_OUTSIDE_FOLD
    if n_train - -(-n_train // folds) >= needed:
        return
    fix = "set OUT_OF_FOLD_FOLDS = 0"
    if settings.CLASSIFIER:
        try:
            check_classifier_rows(category, settings, n_validation, 0)
        except ModelError:
            fix += f" and CLASSIFIER = False (it would be left with {n_validation} good image{'s' if n_validation != 1 else ''} it was not fitted on)"
    raise ModelError(f"the out-of-fold maps of ANOMALY_MODEL={model.kind} need {needed} training images outside each of the OUT_OF_FOLD_FOLDS={folds} folds, "
                     f"and {n_train} training image{'s' if n_train != 1 else ''} cannot give that: add training images, or {fix}")


def check_classifier_rows(category: Category, settings, n_validation: int, n_train: int) -> None:
    """Refuse a classifier that would have fewer than 2 honest goods (validation and out-of-fold
    training images, `n_train` of the latter) or no defect at all to learn from."""
    if n_validation + n_train < 2:
        raise ModelError(
            f"the classifier needs good images it was not fitted on, got {n_validation + n_train}: set OUT_OF_FOLD_FOLDS, "
            "raise VALIDATION_FRACTION, add good images (validation/good/ in the MVTec layout), or set CLASSIFIER = False"
        )
    labeled = len(category.train_defect_images)
    if not labeled and (settings.CLASSIFIER_SYNTHETIC_DEFECTS == 0 or settings.CLASSIFIER_ENOUGH_REAL_DEFECTS == 0):
        raise ModelError(
            "the classifier would have no defect to learn from: CLASSIFIER_SYNTHETIC_DEFECTS=0 (or CLASSIFIER_ENOUGH_REAL_DEFECTS=0) "
            "and no labeled defects in train/defect/: raise it, add labeled defects, or set CLASSIFIER = False"
        )


def _classifier_training_set(category: Category, settings, info: dict, n_validation: int, n_train: int):
    """An empty classifier training set: feature levels from the validation goods (known before the
    out-of-fold maps stream in), synthetic defects unless there are enough labeled ones."""
    from classification_model.features import levels_from_description
    from classification_model.training import TrainingSet

    check_classifier_rows(category, settings, n_validation, n_train)
    enough = len(category.train_defect_images) >= settings.CLASSIFIER_ENOUGH_REAL_DEFECTS
    synthetic = 0 if enough else settings.CLASSIFIER_SYNTHETIC_DEFECTS
    return TrainingSet(levels_from_description(info), n_validation, n_train, synthetic, settings.SEED)


def warn_of_updates(model_dir: Path) -> None:
    """A retrain replaces the model with one fitted on DATASET_DIR alone: say which images it had
    learned through updates (ADD_GOOD / ADD_DEFECT), so they can be added again, and that its ONNX
    export does not carry over."""
    try:
        description = read_description(model_dir)
    except (ModelError, OSError, ValueError):  # no model yet, or one that cannot be read: nothing learned to lose
        return
    if description.get("export"):
        print(f"note: the ONNX export of model {model_dir} belongs to the model this training replaces: run python export.py again "
              "for RUNTIME=onnxruntime", file=sys.stderr)
    updates = description.get("updates") or []
    if updates:
        folders = sorted({str(entry.get("folder")) for entry in updates})
        learned = sum(int(entry.get("images", 0)) for entry in updates)
        print(
            f"note: model {model_dir} learned {learned} images in {len(updates)} updates (from {', '.join(folders)}); this training "
            "replaces it without them (it is kept as the newest backup, MODEL_BACKUPS): put them in the training folders, "
            "or run train.py ADD_GOOD= / ADD_DEFECT= again afterwards",
            file=sys.stderr,
        )
