"""The good/defect classifier: features, training, saving, errors, and the scripts end to end.

Fast: tiny 64x64 synthetic images and a random-init backbone (WEIGHTS=none)."""

from __future__ import annotations

import csv
import functools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dataset_manager import find_categories
from pipeline.detector import Detector
from pipeline.prediction import predict_folder
from pipeline.training import train_category
from settings import load

from anomaly_model.backbone import ModelError
from classification_model.features import FEATURE_NAMES, MONOTONE, map_features
from classification_model.synthetic import DEFECT_TYPES, make_defect
from classification_model.xgboost import ClassifierParams, DefectClassifier, plot_feature_importance, train_classifier

ROOT = Path(__file__).resolve().parents[1]
LEVELS = {"q99": 1.0, "q999": 2.0, "pixel": 1.5, "image": 4.0}
TINY = ["WEIGHTS=none", "RESIZE=64", "CROP=64", "BATCH_SIZE=8", "NUM_WORKERS=0", "SAVE_PICTURES=False",
        "CLASSIFIER_SYNTHETIC_PER_IMAGE=3", "CLASSIFIER_MAX_ROUNDS=60", "CLASSIFIER_FOLDS=3", "BACKBONE=resnet18", "LAYERS=(1,2)"]


def feature(row: np.ndarray, name: str) -> float:
    return float(row[FEATURE_NAMES.index(name)])


def test_features_of_a_known_blob():
    maps = torch.zeros(2, 64, 64)
    maps[0, 10:20, 10:30] = 5.0  # one 10 x 20 region of height 5
    maps[0, 50:52, 50:52] = 3.0  # a small second region, below the image level 4
    rows = map_features(maps, LEVELS)
    assert rows.shape == (2, len(FEATURE_NAMES)) and len(MONOTONE) == len(FEATURE_NAMES)
    assert set(MONOTONE) == {1}  # only "more anomalous" evidence: no shape fingerprints of synthetic defects
    blob = rows[0]
    assert feature(blob, "max") == 5.0
    assert feature(blob, "mean_top0.1pct") == 5.0  # 4 pixels, all inside the blob
    assert feature(blob, "mean_top5pct") == pytest.approx((200 * 5.0 + 4 * 3.0) / 205)  # 205 pixels: blob, square, one 0
    assert feature(blob, "mean") == pytest.approx((200 * 5.0 + 4 * 3.0) / 4096)
    assert feature(blob, "largest_area_pixel") == pytest.approx(200 / 4096)
    assert feature(blob, "area_pixel") == pytest.approx(204 / 4096)
    assert feature(blob, "area_image") == pytest.approx(200 / 4096) and feature(blob, "largest_area_image") == pytest.approx(200 / 4096)
    assert feature(blob, "excess_image") == pytest.approx(200 * 1.0 / 4096)
    assert feature(blob, "excess_q99") == pytest.approx((200 * 4.0 + 4 * 2.0) / 4096)
    empty = rows[1]
    assert feature(empty, "max") == 0 and feature(empty, "std") == 0
    assert feature(empty, "area_q99") == 0 and feature(empty, "largest_area_q99") == 0 and feature(empty, "excess_q99") == 0


def test_a_broad_faint_defect_raises_the_pooled_features_not_the_max():
    """A faint defect over a large area (common in real parts) is seen by the wider pooling scales."""
    maps = torch.ones(2, 64, 64)
    maps[0, 5, 5] = 4.0  # a good map with one noisy pixel
    maps[1, 8:40, 8:40] = 3.0  # a broad faint rise, lower peak
    noisy, broad = map_features(maps, LEVELS)
    assert feature(broad, "max") < feature(noisy, "max")
    for name in ("mean_top1pct", "mean_top5pct", "mean", "std", "area_q999", "largest_area_pixel", "excess_q99"):
        assert feature(broad, name) > feature(noisy, name), name


def test_synthetic_defects_change_the_image_and_are_seeded():
    rgb = np.full((80, 60, 3), 128, np.uint8)
    box = (5.0, 3.75, 75.0, 56.25)  # the centre crop of a 64 -> 56 preprocessing, in the image's pixels
    for kind in DEFECT_TYPES:
        a = make_defect(rgb, kind, np.random.default_rng(1), (0.1, 0.3), (0.8, 1.0), box)
        b = make_defect(rgb, kind, np.random.default_rng(1), (0.1, 0.3), (0.8, 1.0), box)
        assert np.array_equal(a, b) and a.shape == rgb.shape
        if kind != "cutpaste":  # pasting a uniform image onto itself changes nothing, by design
            assert np.abs(a.astype(int) - rgb).max() > 20
    gray = make_defect(rgb, "texture", np.random.default_rng(2), (0.2, 0.3), (1.0, 1.0), (0, 0, 80, 60))
    assert np.array_equal(gray[..., 0], gray[..., 1])  # gray images get gray defects


def _toy_maps(rng: np.random.Generator, n: int, defect: bool) -> torch.Tensor:
    maps = torch.from_numpy(rng.gamma(4.0, 0.5, size=(n, 32, 32)).astype(np.float32))
    if defect:
        for i in range(n):
            y, x = rng.integers(4, 24, size=2)
            maps[i, y : y + 6, x : x + 6] += 6.0
    return maps


@functools.lru_cache(maxsize=None)
def _toy_classifier(seed: int = 0) -> tuple[DefectClassifier, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    good, bad = _toy_maps(rng, 30, False), _toy_maps(rng, 40, True)
    x = np.concatenate([map_features(good, LEVELS), map_features(bad, LEVELS)])
    y = np.r_[np.zeros(30), np.ones(40)]
    groups = np.r_[np.arange(30), np.arange(40) % 30]
    params = ClassifierParams(max_rounds=50, folds=3)
    return train_classifier(x, y, groups, FEATURE_NAMES, params, 0.05, monotone=MONOTONE), x, y


def test_training_separates_obvious_defects_and_saves_identically(tmp_path):
    classifier, _, _ = _toy_classifier()
    rng = np.random.default_rng(7)
    test_good = classifier.predict(map_features(_toy_maps(rng, 20, False), LEVELS))
    test_bad = classifier.predict(map_features(_toy_maps(rng, 20, True), LEVELS))
    assert test_bad.min() > test_good.max()
    assert 0 < classifier.threshold < 1 and classifier.report["out_of_fold_rocauc"] > 0.95
    copy = DefectClassifier.from_bytes(classifier.to_bytes(), FEATURE_NAMES, classifier.threshold, FEATURE_NAMES)
    x = map_features(_toy_maps(rng, 10, True), LEVELS)
    assert np.array_equal(copy.predict(x), classifier.predict(x))
    plot_feature_importance(classifier, tmp_path / "importance.png")
    assert (tmp_path / "importance.png").stat().st_size > 1000


def test_one_class_and_mismatched_features_are_refused():
    x = np.random.default_rng(0).random((10, len(FEATURE_NAMES)))
    with pytest.raises(ModelError, match="only good"):
        train_classifier(x, np.zeros(10), np.arange(10), FEATURE_NAMES, ClassifierParams(), 0.05)
    classifier, _, _ = _toy_classifier()
    with pytest.raises(ModelError, match="retrain"):
        DefectClassifier.from_bytes(classifier.to_bytes(), FEATURE_NAMES[:-1], 0.5, FEATURE_NAMES)


def _write_dataset(root: Path) -> Path:
    """A tiny MVTec-layout category: smooth gray gradients; defects are dark squares."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:64, 0:64]

    def good() -> np.ndarray:
        base = 120 + 40 * np.sin(xx / 6.0 + rng.uniform(-0.2, 0.2)) + rng.normal(0, 3, (64, 64))
        return np.clip(base, 0, 255).astype(np.uint8)

    def bad() -> np.ndarray:
        image = good()
        y, x = rng.integers(12, 40, size=2)
        image[y : y + 12, x : x + 12] = 10
        return image

    for folder, count, make in (("train/good", 24, good), ("validation/good", 9, good), ("test/good", 6, good), ("test/hole", 6, bad)):
        (root / folder).mkdir(parents=True)
        for i in range(count):
            Image.fromarray(make()).save(root / folder / f"{i:03d}.png")
    return root


def _script(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, name, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_scripts_end_to_end_with_the_classifier(tmp_path):
    data = _write_dataset(tmp_path / "parts")
    common = [f"DATASET_DIR={data}", f"MODEL_DIR={tmp_path / 'models'}", f"RESULTS_DIR={tmp_path / 'results'}", *TINY]
    trained = _script("train.py", *common)
    assert trained.returncode == 0, trained.stderr[-2000:]
    description = json.loads((tmp_path / "models" / "parts" / "model.json").read_text())
    entry = description["classifier"]
    assert entry["features"] == FEATURE_NAMES and "classifier.json" in description["files"]
    assert 0 <= entry["threshold"] <= 1 and sum(entry["n_synthetic_defects"].values()) == 27

    tested = _script("test.py", *common)
    assert tested.returncode == 0, tested.stderr[-2000:]
    (csv_path,) = (tmp_path / "results" / "parts").glob("test-*/predictions.csv")
    rows = list(csv.DictReader(csv_path.open()))
    assert len(rows) == 12 and all(0 <= float(r["classifier_probability"]) <= 1 for r in rows)
    evaluated = _script("eval.py", *common)
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]

    # a classifier saved with another feature list: one clear line, no traceback
    entry["features"] = entry["features"][:-1]
    (tmp_path / "models" / "parts" / "model.json").write_text(json.dumps(description))
    refused = _script("test.py", *common)
    assert refused.returncode == 2 and "retrain" in refused.stderr and "Traceback" not in refused.stderr



def _settings(tmp_path: Path, data: Path, *extra: str):
    return load([f"DATASET_DIR={data}", f"MODEL_DIR={tmp_path / 'models'}", f"RESULTS_DIR={tmp_path / 'results'}", *TINY, *extra])[0]


def test_training_errors_are_one_line_model_errors(tmp_path):
    data = _write_dataset(tmp_path / "parts")
    (category,) = find_categories(data)
    with pytest.raises(ModelError, match="only good"):
        train_category(category, _settings(tmp_path, data, "CLASSIFIER_SYNTHETIC_PER_IMAGE=0"), tmp_path / "models" / "a")
    category.validation_images = []
    with pytest.raises(ModelError, match="no validation images"):
        train_category(category, _settings(tmp_path, data, "VALIDATION_FRACTION=0.0"), tmp_path / "models" / "b")
    assert not (tmp_path / "models" / "a").exists() and not (tmp_path / "models" / "b").exists()


def test_without_the_classifier_the_column_is_empty(tmp_path):
    data = _write_dataset(tmp_path / "parts")
    (category,) = find_categories(data)
    settings = _settings(tmp_path, data, "CLASSIFIER=False")
    train_category(category, settings, tmp_path / "models" / "parts")
    detector = Detector(tmp_path / "models" / "parts", "cpu")
    assert detector.classifier is None
    summary = predict_folder(detector, data / "test", tmp_path / "results", settings)
    rows = list(csv.DictReader((summary.run_dir / "predictions.csv").open()))
    assert len(rows) == 12 and all(row["classifier_probability"] == "" for row in rows)
