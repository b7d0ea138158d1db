"""The Python API for line software: load a trained model once, then inspect images one at a time.

    from pipeline.inspection import load
    inspector = load("model/tire")            # MODEL_DIR/<name>, as train.py wrote it
    result = inspector.inspect("part.png")    # a path, the file's bytes, a PIL image or a numpy array
    print(result.verdict, result.image_score, result.fields())

`test.py` and `serve.py` inspect through this module, so its numbers are theirs: one scoring step
(`Detector.score_images`) and one way to turn a map into a verdict, a normalized score and a defect
area (`Inspector.judge`). The operating point can be moved at run time (`OperatingPoint`): the
thresholds are re-picked from the honest good scores the model stores, without retraining.
"""

from __future__ import annotations

import io
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from anomaly_model.store import model_id
from evaluation.metrics import few_goods_note, threshold_at_rate
from dataset_manager import DataError, ImageBatches, Preprocessor, read_rgb
from dataset_manager.images import gray_to_uint8, pil_to_rgb, preview
from pipeline.detector import Detector, ImageResult
from pipeline.pictures import color_range, picture_arrays
from settings import SettingsError, check_value, command_line_keys, training_only

# What `inspect` accepts: a file path, the file's bytes, a PIL image, or an (H, W) / (H, W, 3|4) array.
ImageInput = str | Path | bytes | bytearray | memoryview | Image.Image | np.ndarray


@dataclass
class Inspection:
    """What the model says about one image: the fields test.py's predictions.csv and serve.py's
    JSON carry, and the map the pictures are drawn from."""

    verdict: str  # "good" or "defect"
    image_score: float  # the model's image score (PaDiM: max of the map)
    normalized_score: float  # image_score / image threshold: >= 1 is above the threshold
    classifier_probability: float | None  # the classifier's defect probability; None without a classifier
    defect_area_fraction: float  # share of the working map at or above the pixel threshold (as the threshold counts the goods)
    model: str  # the id of the model that judged it (anomaly_model.store.model_id)
    seconds: float  # from preprocessing to verdict, this image's share of its batch included
    anomaly_map: torch.Tensor  # (H, W) at the model's working size, on the CPU
    size: tuple[int, int]  # the original (height, width)

    @property
    def is_defect(self) -> bool:
        return self.verdict == "defect"

    def fields(self) -> dict:
        """The result as plain JSON-ready values."""
        return {
            "verdict": self.verdict,
            "image_score": self.image_score,
            "normalized_score": self.normalized_score,
            "classifier_probability": self.classifier_probability,
            "defect_area_fraction": self.defect_area_fraction,
            "model": self.model,
            "seconds": self.seconds,
        }


@dataclass
class PreparedImage:
    """An image decoded and preprocessed for one model (its preprocessing is the model's own)."""

    rgb: np.ndarray  # (h, w, 3) uint8 as read
    tensor: torch.Tensor  # (3, H, W) what the model sees
    prepared_for: str  # model id whose preprocessing made `tensor`
    started: float  # time.perf_counter() when preparation began


@dataclass(frozen=True)
class OperatingPoint:
    """False-reject rates asked for at run time; None keeps the model's own threshold."""

    image_false_reject_rate: float | None = None
    classifier_false_reject_rate: float | None = None

    def __post_init__(self) -> None:
        """The rates a caller of the Python API gives are checked as the command line's are (SettingsError);
        numpy numbers count as the Python numbers they hold."""
        for field in ("image_false_reject_rate", "classifier_false_reject_rate"):
            value = getattr(self, field)
            if isinstance(value, (np.floating, np.integer)) or (isinstance(value, np.ndarray) and value.ndim == 0 and value.dtype.kind in "iuf"):
                object.__setattr__(self, field, float(value))
        for key, rate in (("IMAGE_FALSE_REJECT_RATE", self.image_false_reject_rate), ("CLASSIFIER_FALSE_REJECT_RATE", self.classifier_false_reject_rate)):
            if rate is not None:
                check_value(key, rate)

    @classmethod
    def from_command_line(cls, argv: Sequence[str], settings) -> "OperatingPoint":
        """The rates given as KEY=VALUE on this command line (config.py's values do not count:
        without them on the command line the model's own operating point stands)."""
        given = command_line_keys(argv)
        return cls(
            settings.IMAGE_FALSE_REJECT_RATE if "IMAGE_FALSE_REJECT_RATE" in given else None,
            settings.CLASSIFIER_FALSE_REJECT_RATE if "CLASSIFIER_FALSE_REJECT_RATE" in given else None,
        )


def honest_good_scores(description: dict) -> np.ndarray:
    """The image scores of the good images the model never fitted on (out-of-fold and validation;
    validation alone for models trained without out-of-fold maps): what its threshold was set on."""
    scores = description.get("out_of_fold", {}).get("image_scores") or description.get("validation", {}).get("image_scores")
    return np.asarray(scores or [], dtype=np.float64)


def apply_operating_point(detector: Detector, point: OperatingPoint) -> list[str]:
    """Re-pick the thresholds `point` asks for from the honest good scores the model stores; returns
    one line per threshold saying what changed (or why it could not). A verdict that ranks like the
    image score (train.py kept no classifier candidate) has one threshold: whichever rate is given
    moves both, CLASSIFIER_FALSE_REJECT_RATE when both are, so normalized_score 1.0 stays the boundary."""
    lines = []
    name = detector.model_dir.name
    classifier = detector.classifier
    rank_like = classifier is not None and classifier.ranks_like_image_score
    image_rate, classifier_rate, image_key = point.image_false_reject_rate, point.classifier_false_reject_rate, "IMAGE_FALSE_REJECT_RATE"
    if rank_like and classifier_rate is not None:
        if image_rate is not None and image_rate != classifier_rate:
            lines.append(f"operating point: {name}'s verdict ranks like the image score, so one threshold decides it: "
                         f"CLASSIFIER_FALSE_REJECT_RATE={classifier_rate} sets it, IMAGE_FALSE_REJECT_RATE={image_rate} is not used")
        image_rate, classifier_rate, image_key = classifier_rate, None, "CLASSIFIER_FALSE_REJECT_RATE"
    # the model's own rate given again: its own threshold stands, as without the setting (a re-pick
    # would apply this version's rule to an older model's scores, and their rounding in model.json)
    own = {"IMAGE_FALSE_REJECT_RATE": detector.description.get("thresholds", {}).get("image_false_reject_rate"),
           "CLASSIFIER_FALSE_REJECT_RATE": (detector.description.get("classifier") or {}).get("false_reject_rate")}
    if image_rate is not None and image_rate == own[image_key]:
        lines.append(f"operating point: {image_key}={image_rate} is {name}'s own rate: its image threshold {detector.image_threshold:.6g} stands")
        image_rate = None
    if classifier_rate is not None and classifier is not None and classifier_rate == own["CLASSIFIER_FALSE_REJECT_RATE"]:
        lines.append(f"operating point: CLASSIFIER_FALSE_REJECT_RATE={classifier_rate} is {name}'s own rate: "
                     f"its classifier threshold {classifier.threshold:.6g} stands")
        classifier_rate = None
    if image_rate is not None:
        scores = honest_good_scores(detector.description)
        if scores.size == 0:
            raise SettingsError(f"{image_key}: model {detector.model_dir} stores no honest good scores to re-pick from: retrain with python train.py")
        old, detector.image_threshold = detector.image_threshold, threshold_at_rate(scores, image_rate)
        if classifier is None:
            used = "it decides the verdict"
        elif rank_like:  # the verdict is the image score's log-odds: its threshold follows
            classifier.threshold = float(classifier.predict(None, np.array([detector.image_threshold]))[0])
            used = f"the verdict ranks like the image score, so it follows this threshold: classifier threshold {classifier.threshold:.6g}"
        elif (detector.description.get("classifier") or {}).get("good_probabilities"):
            used = "the classifier decides the verdict (CLASSIFIER_FALSE_REJECT_RATE moves it); this threshold scales normalized_score"
        else:
            used = ("the classifier decides the verdict, and this model (trained before the classifier's good probabilities were "
                    "stored) needs a retrain for CLASSIFIER_FALSE_REJECT_RATE to move it; this threshold scales normalized_score")
        lines.append(
            f"operating point: {name}'s image threshold {old:.6g} -> {detector.image_threshold:.6g} "
            f"({image_key}={image_rate} of the {scores.size} honest good scores in the model, no retraining; {used})"
        )
        few = few_goods_note(scores.size, image_rate, image_key)
        if few:
            lines.append(f"operating point: {name}: {few}")
    if classifier_rate is not None:
        entry = detector.description.get("classifier")
        if classifier is None or entry is None:
            lines.append(f"operating point: {name} has no classifier, CLASSIFIER_FALSE_REJECT_RATE={classifier_rate} changes nothing")
        elif not entry.get("good_probabilities"):
            lines.append(
                f"operating point: {name} was trained before models stored the classifier's out-of-fold good probabilities: "
                f"retrain (python train.py) to re-pick CLASSIFIER_FALSE_REJECT_RATE={classifier_rate}; its threshold {classifier.threshold:.6g} stands"
            )
        else:
            goods = np.asarray(entry["good_probabilities"], dtype=np.float64)
            old, classifier.threshold = classifier.threshold, threshold_at_rate(goods, classifier_rate)
            lines.append(
                f"operating point: {name}'s classifier threshold {old:.6g} -> {classifier.threshold:.6g} "
                f"(CLASSIFIER_FALSE_REJECT_RATE={classifier_rate} of the {goods.size} honest (held-out) good probabilities in the model, no retraining)"
            )
            few = few_goods_note(goods.size, classifier_rate, "CLASSIFIER_FALSE_REJECT_RATE")
            if few:
                lines.append(f"operating point: {name}: {few}")
    detector.operating_notes += lines
    return lines


def to_rgb(image: ImageInput, name: str = "image", full_scale: float | None = None) -> np.ndarray:
    """(H, W, 3) uint8 from whatever `inspect` accepts, read as test.py reads files (EXIF
    orientation, any mode and bit depth; 16-bit gray against `full_scale`, the model's);
    undecodable input is a DataError naming `name`."""
    rgb = _decoded(image, name, full_scale)
    if rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise DataError(f"cannot read {name}: it has no pixels ({rgb.shape[0]} x {rgb.shape[1]})")
    return rgb


def _decoded(image: ImageInput, name: str, full_scale: float | None) -> np.ndarray:
    """`to_rgb`'s conversion, by the input's type."""
    if isinstance(image, (str, Path)):
        return read_rgb(Path(image), full_scale=full_scale)
    if isinstance(image, (bytes, bytearray, memoryview)):
        if len(image) == 0:
            raise DataError(f"cannot read {name}: it is empty (0 bytes)")
        try:
            return read_rgb(io.BytesIO(bytes(image)), name, full_scale)
        except DataError as error:  # PIL names the in-memory file by its repr: not useful to anyone
            raise DataError(re.sub(r" ?<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(error))) from None
    if isinstance(image, Image.Image):
        try:
            return pil_to_rgb(image, full_scale)
        except AssertionError:  # PIL's own check: the pixels were never loaded and the file is closed
            raise DataError(f"cannot read {name}: the PIL image's file was closed before its pixels were read: "
                            "call image.load() inside the `with Image.open(...)` block, or pass the path") from None
        except (OSError, ValueError) as error:
            raise DataError(f"cannot read {name}: {error}") from None
    if isinstance(image, np.ndarray):
        image = np.asarray(image)  # a subclass (np.matrix, a masked array) as the plain array of its values
        if image.ndim == 3 and image.shape[2] == 1:  # (H, W, 1), as OpenCV and Keras give gray images
            image = image[:, :, 0]
        if image.dtype == bool:  # True is white, as in PIL's mode "1"
            image = image.astype(np.uint8) * 255
        if image.dtype.kind not in "uif":
            raise DataError(f"cannot read {name}: a numpy image holds integers, floats or booleans, not {image.dtype}")
        if image.ndim == 2:
            try:
                gray = image if image.dtype == np.uint8 else gray_to_uint8(image, full_scale)
            except ValueError as error:  # NaN or infinite values, no pixels: bad input, not a bug
                raise DataError(f"cannot read {name}: {error}") from None
            return np.repeat(gray[:, :, None], 3, axis=2)
        if image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8:
            return np.ascontiguousarray(image)
        if image.ndim == 3 and image.shape[2] == 4 and image.dtype == np.uint8:  # RGBA: composited on white, as files are
            return pil_to_rgb(Image.fromarray(np.ascontiguousarray(image), "RGBA"))
        raise DataError(f"cannot read {name}: a numpy image must be (H, W) or (H, W, 1) gray, (H, W, 3) uint8 RGB or (H, W, 4) uint8 RGBA, got {image.shape} {image.dtype}")
    raise DataError(f"cannot read {name}: expected a path, bytes, a PIL image or a numpy array, got {type(image).__name__}")


@dataclass(frozen=True)
class PictureDrawer:
    """What drawing the pictures of a model's inspections needs, without the model: serve.py's
    review page keeps one per image (keeping the Inspector kept each swapped-out model alive,
    ~460 MB for MobileNetV2 on tire, until its last image left the page)."""

    preprocessor: Preprocessor
    pixel_threshold: float
    color_scale: tuple[float, float]

    def rgb(self, image: ImageInput, name: str = "image") -> np.ndarray:
        """`to_rgb` as this model reads images (its 16-bit full scale)."""
        return to_rgb(image, name, self.preprocessor.gray_full_scale)

    def pictures(self, inspection: Inspection, image: ImageInput, preview_size: int = 640) -> tuple[np.ndarray, np.ndarray]:
        """(overlay (h, w, 3) uint8 at most `preview_size` on its longer side, mask (H, W) bool at the original size)
        of the image `inspection` judged, given in any form `inspect` takes (a DataError for another image's size)."""
        if isinstance(preview_size, bool) or not isinstance(preview_size, (int, np.integer)) or preview_size < 1:
            raise ValueError(f"preview_size={preview_size!r}: give the overlay's longer side in pixels, a whole number >= 1 (serve.py uses 640)")
        rgb = self.rgb(image)
        if tuple(rgb.shape[:2]) != tuple(inspection.size):
            raise DataError(f"the image given for the pictures is {rgb.shape[0]} x {rgb.shape[1]} px, the inspected one was "
                            f"{inspection.size[0]} x {inspection.size[1]} (height x width): give the image that was inspected")
        return picture_arrays(inspection.anomaly_map, inspection.size, preview(rgb, preview_size), self.preprocessor,
                              self.pixel_threshold, self.color_scale)


class Inspector:
    """A loaded model that inspects images: `load(model_dir)` makes one."""

    def __init__(self, detector: Detector, batch_size: int = 16) -> None:
        self.detector = detector
        self.name = detector.model_dir.name
        self.model_id = model_id(detector.description)
        self.color_scale = color_range(detector.description)
        self.batch_size = detector.preprocessor.batch_size(batch_size)  # most images scored together
        if detector.model is not None:  # RUNTIME=torch: what scoring reuses is built now, not on the first image
            detector.model.prepare_scoring()

    @property
    def notes(self) -> list[str]:
        """What an operating point given at run time changed (`apply_operating_point`), for logs and /model."""
        return self.detector.operating_notes

    # --- one image or a few, from memory (serve.py, users' line software) ---
    @property
    def drawer(self) -> PictureDrawer:
        """What its pictures need, apart from the model."""
        return PictureDrawer(self.detector.preprocessor, self.detector.pixel_threshold, self.color_scale)

    def rgb(self, image: ImageInput, name: str = "image") -> np.ndarray:
        """`to_rgb` as this model reads images (its 16-bit full scale)."""
        return self.drawer.rgb(image, name)

    def prepare(self, image: ImageInput, name: str = "image") -> PreparedImage:
        """Decode and preprocess, apart from scoring, so a server can do it in request threads."""
        started = time.perf_counter()
        rgb = self.rgb(image, name)
        return PreparedImage(rgb, self.detector.preprocessor.image_tensor(rgb), self.model_id, started)

    def score(self, prepared: Sequence[PreparedImage]) -> list[Inspection]:
        """Score prepared images together (a batch); one prepared for another model is prepared again."""
        results: list[Inspection] = []
        for start in range(0, len(prepared), self.batch_size):
            chunk = list(prepared[start : start + self.batch_size])
            tensors = [
                item.tensor if item.prepared_for == self.model_id else self.detector.preprocessor.image_tensor(item.rgb) for item in chunk
            ]
            maps, scores, probabilities = self.detector.score_images(torch.stack(tensors))
            finished = time.perf_counter()
            for row, item in enumerate(chunk):
                size = (int(item.rgb.shape[0]), int(item.rgb.shape[1]))
                # clone: a view would keep the whole batch's maps alive as long as one result is kept
                results.append(self.judge(maps[row].clone(), float(scores[row]), probabilities[row], size, finished - item.started))
        return results

    def inspect(self, image: ImageInput) -> Inspection:
        """One image's verdict, scores and defect area (see `Inspection`)."""
        return self.score([self.prepare(image)])[0]

    def inspect_many(self, images: Sequence[ImageInput]) -> list[Inspection]:
        """Several images scored in batches of `batch_size`: faster per image than one `inspect` call
        each. All or nothing: an image that cannot be read raises its DataError (naming it "image
        <index>") and no result is returned; each result's `seconds` covers its own batch."""
        if isinstance(images, (str, bytes, bytearray, memoryview, Path, Image.Image, np.ndarray)) and not (
                isinstance(images, np.ndarray) and images.ndim == 4):
            raise DataError(f"inspect_many takes a list of images, not one {type(images).__name__}: use inspect() for one image")
        images = list(images)
        results: list[Inspection] = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            results += self.score([self.prepare(image, f"image {start + offset}") for offset, image in enumerate(chunk)])
        return results

    # --- what every caller shares ---
    def judge(self, anomaly_map: torch.Tensor, score: float, probability: float | None, size: tuple[int, int], seconds: float) -> Inspection:
        """The verdict, normalized score and defect area of one scored image."""
        detector = self.detector
        defect = detector.is_defect(ImageResult(0, anomaly_map, score, size, None, probability))
        return Inspection(
            verdict="defect" if defect else "good",
            image_score=score,
            normalized_score=score / detector.image_threshold if detector.image_threshold > 0 else float(score > 0) * float("inf"),
            classifier_probability=probability,
            defect_area_fraction=float((anomaly_map >= detector.pixel_threshold).float().mean()),
            model=self.model_id,
            seconds=seconds,
            anomaly_map=anomaly_map,
            size=size,
        )

    def pictures(self, inspection: Inspection, image: ImageInput, preview_size: int = 640) -> tuple[np.ndarray, np.ndarray]:
        """(overlay (h, w, 3) uint8 at most `preview_size` on its longer side, mask (H, W) bool at the original size)
        of the image `inspection` judged, given in any form `inspect` takes (a DataError for another image's size)."""
        return self.drawer.pictures(inspection, image, preview_size)

    # --- a folder of files (test.py) ---
    def inspect_paths(
        self, paths: list[Path], batch_size: int, num_workers: int = 0, preview_size: int = 0, label: str = "scoring"
    ) -> tuple[Iterator[tuple[ImageResult, Inspection]], ImageBatches]:
        """Each readable file's result (with its index and preview) and inspection, streamed in
        batches read by `num_workers` processes (`label` names the progress bar); the ImageBatches
        object lists skipped files once done."""
        results, batches = self.detector.inspect(paths, batch_size, num_workers, preview_size, label)

        def judged() -> Iterator[tuple[ImageResult, Inspection]]:
            started = time.perf_counter()
            for result in results:
                now = time.perf_counter()
                inspection = self.judge(result.anomaly_map, result.score, result.probability, result.size, now - started)
                started = now
                yield result, inspection

        return judged(), batches

    def description(self) -> dict:
        """What GET /model shows: type, backbone, sizes, thresholds in force, when it was saved."""
        description = self.detector.description
        entry = description["anomaly_model"]
        model_json = self.detector.model_dir / "model.json"
        classifier = self.detector.classifier
        return {
            "name": self.name,
            "id": self.model_id,
            "type": entry["type"],
            "backbone": entry["settings"].get("backbone"),
            "weights": entry["settings"].get("weights"),
            "image_size": description["preprocessing"].get("image_size") or description["preprocessing"].get("crop"),
            "runtime": self.detector.runtime,
            "thresholds": {
                "image": self.detector.image_threshold,
                "pixel": self.detector.pixel_threshold,
                "classifier": None if classifier is None else classifier.threshold,
                "model_image": float(description["thresholds"]["image"]),
                "model_classifier": description.get("classifier", {}).get("threshold"),
            },
            "operating_point_notes": self.notes,
            "trained_on": description.get("dataset", {}),
            "saved": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(model_json.stat().st_mtime)) if model_json.exists() else None,
        }


def load(
    model_dir: str | Path,
    device: str = "auto",
    runtime: str = "torch",
    operating_point: OperatingPoint | None = None,
    batch_size: int = 16,
) -> Inspector:
    """The model train.py saved in `model_dir` (MODEL_DIR/<name>), ready to inspect images.

    `runtime`: "torch", or "onnxruntime" for the file export.py wrote. `operating_point`: false-reject
    rates to re-pick the thresholds at (from the model's honest good scores; None keeps the model's).
    `batch_size`: most images `score` and `inspect_many` run through the model at once."""
    if operating_point is not None and not isinstance(operating_point, OperatingPoint):
        raise TypeError(f"operating_point must be an OperatingPoint (e.g. OperatingPoint(image_false_reject_rate=0.01)), "
                        f"not {type(operating_point).__name__}")
    check_value("BATCH_SIZE", batch_size)
    detector = Detector(Path(model_dir), device, runtime)
    if operating_point is not None:
        apply_operating_point(detector, operating_point)
    return Inspector(detector, batch_size)


def training_only_notes(argv: Sequence[str]) -> list[str]:
    """A note naming the settings on this command line that only train.py reads (test.py CLASSIFIER=False
    changes nothing: the model's classifier decides), so nobody waits for an effect that never comes."""
    unused = sorted(key for key in command_line_keys(argv) if training_only(key))
    if not unused:
        return []
    one = len(unused) == 1
    return [f"note: {', '.join(unused)} on this command line change{'s' if one else ''} nothing here: train.py reads "
            f"{'it' if one else 'them'} (retrain to change {'it' if one else 'them'})"]


def load_for_settings(model_dir: Path, settings, argv: Sequence[str]) -> Inspector:
    """`load` as the scripts call it: DEVICE and RUNTIME from the settings, the operating point from
    the command line, config.py's differences from the model and the re-picked thresholds said on stderr."""
    inspector = load(model_dir, settings.DEVICE, settings.RUNTIME, OperatingPoint.from_command_line(argv, settings), settings.BATCH_SIZE)
    inspector.detector.report_differences(settings)
    for line in [*training_only_notes(argv), *inspector.notes]:
        print(line, file=sys.stderr)
    return inspector
