"""train.py, test.py and eval.py with ANOMALY_MODEL=patchcore: several categories, the classifier,
both layouts; and a loaded PatchCore model wins over config.py's ANOMALY_MODEL, saying so."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from conftest import TINY, make_mvtec_category, outputs, run_script, save, texture, with_defect

PATCHCORE = ["ANOMALY_MODEL=patchcore", "CORESET_RATIO=0.25", "PATCHCORE_NEIGHBORS=3"]
SMALL_CLASSIFIER = ["CLASSIFIER_SYNTHETIC_DEFECTS=20", "CLASSIFIER_MAX_ROUNDS=40", "CLASSIFIER_FOLDS=3"]


def _rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "predictions.csv") as file:
        return list(csv.DictReader(file))


def test_two_categories_with_the_classifier_end_to_end(tmp_path):
    root = tmp_path / "data"
    for seed, name in enumerate(("bolt", "nut")):
        make_mvtec_category(root / name, seed=seed, n_train=8, n_test=3)
    settings = [f"DATASET_DIR={root}", *TINY, *outputs(tmp_path), *PATCHCORE, *SMALL_CLASSIFIER]
    trained = run_script("train.py", *settings)
    assert trained.returncode == 0, trained.stderr
    for name in ("bolt", "nut"):
        model = tmp_path / "models" / name
        assert {"model.json", "coreset.npy", "coreset_mean.npy", "coreset_sources.npy", "classifier.json"} <= {p.name for p in model.iterdir()}
        description = json.loads((model / "model.json").read_text())
        assert description["anomaly_model"]["type"] == "patchcore"
        assert description["anomaly_model"]["settings"]["layers"] == [2, 3]  # LAYERS=() is PatchCore's own default
        assert description["anomaly_model"]["state"]["coreset_size"] == 8 * 64 // 4

    # config.py says PaDiM: the saved model's type is used, and the note says so
    tested = run_script("test.py", str(root / "nut" / "test"), "MODEL_NAME=nut", *[s for s in settings if s not in PATCHCORE])
    assert tested.returncode == 0, tested.stderr
    assert "ANOMALY_MODEL: model has 'patchcore', config has 'padim'" in tested.stderr
    (run_dir,) = (tmp_path / "results" / "nut").iterdir()
    rows = _rows(run_dir)
    assert len(rows) == 6 and all(row["classifier_probability"] for row in rows)
    defects = [float(r["image_score"]) for r in rows if "/blob/" in r["path"]]
    goods = [float(r["image_score"]) for r in rows if "/good/" in r["path"]]
    assert min(defects) > max(goods)

    evaluated = run_script("eval.py", *settings)
    assert evaluated.returncode == 0, evaluated.stderr
    (eval_dir,) = [p for p in (tmp_path / "results").iterdir() if p.name.startswith("eval-")]
    for name in ("bolt", "nut"):
        metrics = json.loads((eval_dir / name / "metrics.json").read_text())
        assert metrics["image_rocauc"] == 1.0 and metrics["pixel_rocauc"] > 0.9
        assert metrics["classifier_rocauc"] is not None
        assert (eval_dir / name / "pro_curve.png").is_file()
    assert (eval_dir / "report.html").is_file()


def test_simple_layout_and_bad_coreset_settings(tmp_path):
    rng = np.random.default_rng(4)
    root = tmp_path / "line"
    for number in range(14):
        save(texture(rng), root / "train_dataset_folder" / f"{number:03d}.png")
    for number in range(3):
        save(texture(rng), root / "test_dataset_folder" / "good" / f"{number:03d}.png")
        save(with_defect(rng)[0], root / "test_dataset_folder" / "defect" / f"{number:03d}.png")
    settings = [f"DATASET_DIR={root}", *TINY, *outputs(tmp_path), *PATCHCORE, "CLASSIFIER=False", "SAVE_PICTURES=False"]
    trained = run_script("train.py", *settings)
    assert trained.returncode == 0, trained.stderr
    assert "trained on 13 images, calibrated on 1 validation images" in trained.stdout  # VALIDATION_FRACTION
    tested = run_script("test.py", *settings)
    assert tested.returncode == 0, tested.stderr
    (run_dir,) = (tmp_path / "results" / "line").iterdir()
    rows = _rows(run_dir)
    assert len(rows) == 6 and {row["verdict"] for row in rows if "/defect/" in row["path"]} == {"defect"}

    before = (tmp_path / "models" / "line" / "coreset.npy").read_bytes()
    for setting, message in [
        ("CORESET_RATIO=1.5", "CORESET_RATIO=1.5 is not allowed: CORESET_RATIO must be a number in (0, 1]"),
        ("CORESET_RATIO=0.0001", "CORESET_RATIO=0.0001 keeps 1 of 832 training patches, fewer than the PATCHCORE_NEIGHBORS=3"),
    ]:
        failed = run_script("train.py", *settings, setting)
        assert failed.returncode == 2 and "Traceback" not in failed.stderr, failed.stderr
        errors = [line for line in failed.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and message in errors[0], failed.stderr
        assert (tmp_path / "models" / "line" / "coreset.npy").read_bytes() == before

    # a training image whose header reads but whose pixels do not: the fit and the out-of-fold maps
    # leave it out alike (the coreset's sources are numbered in the fit's order, not the file list's)
    broken = root / "train_dataset_folder" / "004.png"
    broken.write_bytes(broken.read_bytes()[:100])
    retrained = run_script("train.py", *settings, "OUT_OF_FOLD_FOLDS=3")
    assert retrained.returncode == 0, retrained.stderr
    assert f"skipped {broken}" in retrained.stderr
    description = json.loads((tmp_path / "models" / "line" / "model.json").read_text())
    assert (description["out_of_fold"]["n_images"], description["out_of_fold"]["folds"]) == (12, 3)
