"""A trained model ready to inspect images: its anomaly model, preprocessing, thresholds and classifier."""

from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from tqdm import tqdm

from anomaly_model.errors import ModelError
from anomaly_model.files import read_checked_bytes, reading
from anomaly_model.onnx_file import OnnxScorer
from anomaly_model.store import DETECTOR_SCHEMA, check_description, load_model, model_class, model_file_guard, read_description
from classification_model.features import FEATURE_NAMES, map_features
from choices import RUNTIMES
from classification_model.xgboost import DefectClassifier
from dataset_manager import ImageBatches, Preprocessor
from settings import SettingsError

# Preprocessing settings a model carries itself (its anomaly model's settings come from its class:
# `AnomalyModel.setting_names`); config.py values that differ are reported and not used.
# IMAGE_SIZE is compared as the setting the model was trained with ("auto" stays "auto"); the
# size it resolved to is what the model uses.
PREPROCESSING_SETTINGS = {"IMAGE_SIZE": "image_size_setting", "CENTER_CROP": "center_crop", "NORMALIZE_MEAN": "mean", "NORMALIZE_STD": "std"}
# Settings whose 0 / () in config.py means "the model's own default" (saved resolved): not a difference.
MODEL_DEFAULT_SETTINGS = ("FEATURE_DIM", "PATCHCORE_FEATURE_DIM", "LAYERS")


@dataclass
class ImageResult:
    """What the model says about one image."""

    index: int  # position in the list of paths given
    anomaly_map: torch.Tensor  # (H, W) at the model's working size, on the CPU
    score: float  # the model's image score (PaDiM: max of the map)
    size: tuple[int, int]  # original (height, width)
    preview: np.ndarray | None  # small RGB copy for pictures
    probability: float | None = None  # the classifier's defect probability, when the model has one


def settings_differences(description: dict, settings) -> list[str]:
    """'KEY: model has X, config.py has Y' for each model setting config.py disagrees with."""
    entry = description["anomaly_model"]
    cls = model_class(entry["type"])
    defaults = {name: parameter.default for name, parameter in inspect.signature(cls.__init__).parameters.items()}
    stored_values = {"ANOMALY_MODEL": entry["type"]}
    # a setting added after the model was saved is absent from it: the model runs with its default
    stored_values.update({key: entry["settings"].get(name, defaults.get(name)) for key, name in cls.setting_names().items()})
    stored_values.update({key: description["preprocessing"][name] for key, name in PREPROCESSING_SETTINGS.items() if name in description["preprocessing"]})
    stored_values["PIXEL_THRESHOLD_POLICY"] = description.get("thresholds", {}).get("pixel_policy", "validation")
    notes = []
    for key, stored in stored_values.items():
        wanted = getattr(settings, key)
        if key in MODEL_DEFAULT_SETTINGS and not wanted:
            continue  # config.py asks for the model's default: whatever the model resolved it to
        same = list(stored) == list(wanted) if isinstance(stored, list) else stored == wanted
        if not same:
            notes.append(f"{key}: model has {stored!r}, config has {wanted!r}")
    return notes


def no_onnx_for_similarity(model_dir: Path, n_defects: int) -> str:
    """Why a model whose verdict has the similarity stage has no ONNX runtime (export.py and RUNTIME=onnxruntime)."""
    return (
        f"model {model_dir}'s verdict compares each image's worst patch with its {n_defects} labeled defects, which the ONNX "
        "graph does not compute yet: use RUNTIME=torch, or retrain with CLASSIFIER_DEFECT_SIMILARITY=False to deploy without PyTorch"
    )


def load_classifier(model_dir: Path, description: dict) -> tuple[DefectClassifier, dict[str, float]]:
    """The classifier train.py saved with the model, and the map levels its features are computed at;
    a classifier trained on another feature list than this code computes is refused."""
    entry = description["classifier"]
    data = read_checked_bytes(model_dir, entry["booster_file"], description["files"], "classifier.booster_file")
    classifier = DefectClassifier.from_bytes(
        data, entry["features"], entry["threshold"], FEATURE_NAMES, entry.get("anchor"), entry.get("tree_share"), entry.get("similarity")
    )
    # A loaded classifier only predicts a batch's few rows (microseconds each): one thread. XGBoost's
    # default, every core, made one image's prediction take 48 ms instead of 0.3 ms on the busy 2-core
    # machine (its OpenMP threads wait for each other); the probabilities are the same.
    classifier.booster.set_param({"nthread": 1})
    return classifier, {key: float(value) for key, value in entry["levels"].items()}


class Detector:
    """Loads MODEL_DIR/<name> and turns images into anomaly maps, scores and verdicts."""

    def __init__(self, model_dir: Path, device: str = "auto", runtime: str = "torch") -> None:
        self.model_dir = Path(model_dir)
        if runtime not in RUNTIMES:
            raise SettingsError(f"RUNTIME={runtime!r} is not supported: choose one of {', '.join(RUNTIMES)}")
        self.runtime = runtime
        with reading(self.model_dir):  # a retrain swapping the model in waits: the old or the new one, whole
            self._load(device)

    def _load(self, device: str) -> None:
        """The model, its classifier and (RUNTIME=onnxruntime) its exported file, all of one version."""
        runtime = self.runtime
        self.model = None  # the anomaly model, with RUNTIME=torch
        if runtime == "torch":
            self.model, self.description = load_model(self.model_dir, device)
        else:
            self.description = read_description(self.model_dir)
        check_description(self.model_dir, self.description, DETECTOR_SCHEMA)
        self.classifier = None  # the good/defect classifier saved with the model, when there is one
        self.classifier_levels: dict[str, float] = {}
        if "classifier" in self.description:
            with model_file_guard(self.model_dir, "classifier"):
                self.classifier, self.classifier_levels = load_classifier(self.model_dir, self.description)
            if self.classifier.similarity is not None:
                self._check_similarity_stage()  # before any ONNX file is looked for: such a model is never exported
        # preprocessed (B, 3, H, W) images -> (maps (B, H, W), image scores (B,)) on the CPU
        self.score: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
        self.score = self.model.score if self.model is not None else OnnxScorer(self.model_dir, self.description, device).score
        self.preprocessor = Preprocessor.from_description(self.description["preprocessing"])
        self.image_threshold = float(self.description["thresholds"]["image"])
        self.pixel_threshold = float(self.description["thresholds"]["pixel"])
        self.operating_notes: list[str] = []  # what an operating point given at run time changed (eval.py reports it)

    @property
    def needs_peaks(self) -> bool:
        """Whether the verdict needs each image's peak direction (a classifier with a similarity stage)."""
        return self.classifier is not None and self.classifier.similarity is not None

    def _check_similarity_stage(self) -> None:
        """The similarity stage needs the torch model's peak directions (their length is checked as they meet the prototype)."""
        if self.model is None:
            raise ModelError(no_onnx_for_similarity(self.model_dir, self.classifier.similarity.n_defects))
        if not self.model.has_peak_directions:
            raise ModelError(f"model {self.model_dir}'s classifier has a similarity stage but its anomaly model gives no peak directions: retrain with python train.py")

    def is_defect(self, result: ImageResult) -> bool:
        """The verdict: the classifier's when the model has one, else the map score's threshold."""
        if self.classifier is not None and result.probability is not None:
            return result.probability >= self.classifier.threshold
        return result.score >= self.image_threshold

    def report_differences(self, settings) -> None:
        """Print which config.py settings this model overrides, so nobody wonders why."""
        differences = settings_differences(self.description, settings)
        if differences:
            print(
                f"note: using model {self.model_dir}'s own settings where config.py differs: " + "; ".join(differences),
                file=sys.stderr,
            )

    def score_images(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[float | None]]:
        """Preprocessed (B, 3, H, W) images -> maps (B, H, W), image scores (B,) and the classifier's
        defect probabilities (None each without a classifier): the one scoring step test.py, eval.py
        and serve.py share."""
        directions = None
        if self.needs_peaks:
            maps, scores, directions = self.model.score_with_peaks(images)
            directions = directions.numpy()
        else:
            maps, scores = self.score(images)
        probabilities: list[float | None] = [None] * int(images.shape[0])
        if self.classifier is not None:
            features = map_features(maps, self.classifier_levels) if self.classifier.uses_trees else None
            probabilities = self.classifier.predict(features, scores.numpy(), directions).tolist()
        return maps, scores, probabilities

    def inspect(
        self, paths: list[Path], batch_size: int, num_workers: int = 0, preview_size: int = 0, label: str = "scoring"
    ) -> tuple[Iterator[ImageResult], ImageBatches]:
        """Results image by image, streamed; the ImageBatches object lists skipped files once done."""
        batches = ImageBatches(paths, self.preprocessor, batch_size, num_workers, preview_size)

        def results() -> Iterator[ImageResult]:
            with tqdm(total=len(paths), desc=label, unit="img", file=sys.stderr) as progress:
                for batch in batches:
                    maps, scores, probabilities = self.score_images(batch.images)
                    for row, index in enumerate(batch.indices):
                        yield ImageResult(
                            index, maps[row], float(scores[row]), batch.sizes[row], batch.previews[row], probabilities[row]
                        )
                    progress.update(len(batch.indices))

        return results(), batches
