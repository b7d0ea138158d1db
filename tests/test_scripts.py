"""train.py, test.py and eval.py through their real entry points, on good and on bad input."""

from __future__ import annotations

import csv
import os
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import TINY, error_line, make_mvtec_category, outputs, run_script, save, texture


@pytest.fixture(scope="module")
def trained_once(tmp_path_factory) -> Path:
    """A tiny dataset and its model, trained once for the module (training is the slow part)."""
    base = tmp_path_factory.mktemp("trained")
    category = make_mvtec_category(base / "data" / "part")
    result = run_script("train.py", f"DATASET_DIR={category}", *TINY, *outputs(base), "CLASSIFIER=False")
    assert result.returncode == 0, result.stderr
    return base


@pytest.fixture()
def trained(tmp_path, trained_once, tiny_category):
    """Settings pointing at a private copy of the trained model, for tests that change it."""
    shutil.copytree(trained_once / "models", tmp_path / "models")
    return [f"DATASET_DIR={tiny_category}", *TINY, *outputs(tmp_path), "CLASSIFIER=False"]


def test_train_test_eval_end_to_end(tmp_path, tiny_category, trained):
    model = tmp_path / "models" / "part"
    assert {"model.json", "mean.npy", "cholesky.npy"} <= {p.name for p in model.iterdir()}

    result = run_script("test.py", *trained)
    assert result.returncode == 0, result.stderr
    (run_dir,) = (tmp_path / "results" / "part").iterdir()
    with open(run_dir / "predictions.csv") as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == 8
    assert {"path", "image_score", "normalized_score", "verdict", "defect_area_fraction"} <= rows[0].keys()
    defects = [row for row in rows if "/blob/" in row["path"]]
    goods = [row for row in rows if "/good/" in row["path"]]
    assert min(float(r["image_score"]) for r in defects) > max(float(r["image_score"]) for r in goods)
    mask = Image.open(run_dir / rows[0]["mask"])
    assert mask.size == Image.open(rows[0]["path"]).size
    assert (run_dir / rows[0]["overlay"]).is_file()
    assert str(run_dir / "predictions.csv") in result.stdout

    result = run_script("eval.py", *trained)
    assert result.returncode == 0, result.stderr
    (eval_dir,) = [p for p in (tmp_path / "results").iterdir() if p.name.startswith("eval-")]
    metrics = json.loads((eval_dir / "part" / "metrics.json").read_text())
    assert metrics["image_rocauc"] == 1.0
    assert metrics["pixel_rocauc"] > 0.9
    assert metrics["model"]["type"] == "padim" and len(metrics["model"]["id"]) == 12  # which trained version was measured
    assert metrics["per_defect"]["blob"]["count"] == 4
    assert (eval_dir / "part" / "roc_image.png").is_file() and (eval_dir / "part" / "roc_pixel.png").is_file()
    # the model was trained on a copy of this data set at another path (the module's one training): said, nothing else
    assert [note for note in metrics["notes"] if "was trained on the data set at" not in note] == []
    assert any(note.startswith(f"the model {model} was trained on the data set at ") for note in metrics["notes"])
    assert "command line" not in metrics["operating"]["source"]
    shutil.copy(tiny_category / "train" / "good" / "003.png", tiny_category / "test" / "good" / "copied.png")  # a leak

    moved = run_script("eval.py", *trained, "IMAGE_FALSE_REJECT_RATE=0.5")  # the report says which point it measured
    assert moved.returncode == 0, moved.stderr
    (eval_dir,) = [p for p in (tmp_path / "results").iterdir() if p.name.startswith("eval-") and p != eval_dir]
    metrics = json.loads((eval_dir / "part" / "metrics.json").read_text())
    assert "command line" in metrics["operating"]["source"]
    assert any("IMAGE_FALSE_REJECT_RATE=0.5" in note for note in metrics["notes"])
    assert "IMAGE_FALSE_REJECT_RATE=0.5" in (eval_dir / "report.html").read_text()
    assert any(note.startswith("1 test image the model learned") and "1 as goods" in note and "copied.png" in note for note in metrics["notes"])


def test_test_py_scores_a_plain_folder_and_skips_bad_files(tmp_path, tiny_category, trained):
    folder = tmp_path / "incoming"
    folder.mkdir()
    for source in sorted((tiny_category / "test" / "blob").iterdir())[:2]:
        (folder / source.name).write_bytes(source.read_bytes())
    (folder / "broken.png").write_bytes(b"\x89PNG garbage")
    (folder / "notes.txt").write_text("not an image")
    (folder / "000_mask.png").write_bytes((tiny_category / "test" / "good" / "000.png").read_bytes())  # a mask beside its image
    result = run_script("test.py", str(folder), *trained)
    assert result.returncode == 0, result.stderr
    assert "skipped" in result.stderr and "broken.png" in result.stderr
    assert "note: 1 mask file (<stem>_mask.*, e.g." in result.stderr and "000_mask.png) not scored" in result.stderr
    (run_dir,) = (tmp_path / "results" / "part").iterdir()
    rows = list(csv.DictReader(open(run_dir / "predictions.csv")))
    assert sorted(Path(row["path"]).name for row in rows) == ["000.png", "001.png"]
    assert all(row["verdict"] == "defect" for row in rows)


def test_model_settings_win_over_config_and_say_so(tmp_path, trained):
    result = run_script("test.py", *trained, "CROP=32", "SAVE_PICTURES=False", "PIXEL_FALSE_REJECT_RATE=0.2", "CLASSIFIER=False")
    assert result.returncode == 0, result.stderr
    assert "IMAGE_SIZE: model has [64, 64], config has (32, 32)" in result.stderr
    (note,) = [line for line in result.stderr.splitlines() if "on this command line change nothing here: train.py reads them" in line]
    assert "CLASSIFIER, " in note and "PIXEL_FALSE_REJECT_RATE" in note and "IMAGE_SIZE" not in note and "SAVE_PICTURES" not in note


def test_a_dataset_given_as_dot_names_its_model_after_its_folder(tmp_path, tiny_category, trained):
    """DATASET_DIR=. from inside the category: the model is MODEL_DIR/<folder name>, never MODEL_DIR
    itself (whose other models a swap would have replaced)."""
    settings = [arg for arg in trained if not arg.startswith("DATASET_DIR=")]
    shutil.copytree(tmp_path / "models" / "part", tmp_path / "models" / "other")
    result = run_script("train.py", "DATASET_DIR=.", *settings, cwd=tiny_category)
    assert result.returncode == 0, result.stderr
    assert f"model {tmp_path / 'models' / 'part'} " in result.stdout
    assert (tmp_path / "models" / "other" / "model.json").is_file()
    assert not (tmp_path / "models" / "model.json").exists()


def test_test_py_on_a_folder_with_model_name_reads_no_dataset(tmp_path, tiny_category, trained):
    """test.py FOLDER MODEL_NAME=<name> needs the model only: no DATASET_DIR, no demo set generated."""
    settings = [arg for arg in trained if not arg.startswith("DATASET_DIR=")]
    result = run_script("test.py", str(tiny_category / "test"), "MODEL_NAME=part", *settings, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "demo" not in result.stderr and not (tmp_path / "dataset").exists()
    (run_dir,) = (tmp_path / "results" / "part").iterdir()
    assert len(list(csv.DictReader(open(run_dir / "predictions.csv")))) == 8


def test_pictures_of_files_sharing_a_stem_do_not_overwrite_each_other(tmp_path, tiny_category, trained):
    folder = tmp_path / "line"
    (folder / "good").mkdir(parents=True)
    source = Image.open(tiny_category / "test" / "blob" / "000.png")
    source.save(folder / "good" / "a.png")
    source.convert("L").save(folder / "good" / "a.jpg")
    Image.open(tiny_category / "test" / "good" / "000.png").save(folder / "good__a.png")  # the folder joined to the name
    source.save(folder / os.fsdecode(b"caf\xe9.png"))  # a Latin-1 name (not UTF-8): its row and pictures are written too
    for end in ("x", "y"):  # legal names (250 bytes) whose picture names would pass 255: shortened, still distinct
        source.save(folder / ("é" * 123 + f"{end}.png"))
    result = run_script("test.py", str(folder), *trained)
    assert result.returncode == 0, result.stderr
    (run_dir,) = (tmp_path / "results" / "part").iterdir()
    rows = list(csv.DictReader(open(run_dir / "predictions.csv", encoding="utf-8")))
    assert len(rows) == 6 and sum(row["path"].endswith("caf\\xe9.png") for row in rows) == 1
    for column in ("overlay", "mask"):
        assert len({row[column] for row in rows}) == 6
        assert all((run_dir / row[column]).is_file() for row in rows)
    assert len(list((run_dir / "pictures").iterdir())) == 12


def test_model_name_picks_one_category_of_a_root_for_every_script(tmp_path):
    """MODEL_NAME on a root of several categories: train.py trains, test.py scores and eval.py
    evaluates that one only; a name that is none of them is refused in one line naming them."""
    for name in ("alpha", "beta"):
        make_mvtec_category(tmp_path / "data" / name, n_train=6, n_test=1)
    common = [f"DATASET_DIR={tmp_path / 'data'}", *TINY, *outputs(tmp_path), "CLASSIFIER=False", "SAVE_PICTURES=False"]
    result = run_script("train.py", *common, "MODEL_NAME=beta")
    assert result.returncode == 0, result.stderr
    assert sorted(path.name for path in (tmp_path / "models").iterdir() if not path.name.startswith(".")) == ["beta"]
    assert run_script("test.py", *common, "MODEL_NAME=beta").returncode == 0
    assert [path.name for path in (tmp_path / "results").iterdir()] == ["beta"]
    evaluated = run_script("eval.py", *common, "MODEL_NAME=beta")
    assert evaluated.returncode == 0, evaluated.stderr
    (run_dir,) = [path for path in (tmp_path / "results").iterdir() if path.name.startswith("eval-")]
    assert sorted(path.name for path in run_dir.iterdir() if path.is_dir()) == ["beta"]
    for script in ("train.py", "test.py", "eval.py"):
        line = error_line(run_script(script, *common, "MODEL_NAME=gamma"))
        assert line == "error: MODEL_NAME=gamma is not one of the 2 categories in DATASET_DIR (alpha, beta)", line


def test_help_prints_the_usage_and_where_the_settings_are():
    for script in ("train.py", "test.py", "eval.py", "serve.py", "export.py"):
        result = run_script(script, "--help")
        assert result.returncode == 0 and f"python {script}" in result.stdout and "config.py holds every one" in result.stdout, script


def test_missing_dataset_path(tmp_path):
    line = error_line(run_script("train.py", f"DATASET_DIR={tmp_path / 'nowhere'}", *TINY, *outputs(tmp_path)))
    assert "nowhere does not exist" in line


def test_empty_dataset_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    line = error_line(run_script("train.py", f"DATASET_DIR={tmp_path / 'empty'}", *TINY, *outputs(tmp_path)))
    assert "holds no dataset" in line


def test_folder_with_no_images(tmp_path, trained):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "a.txt").write_text("x")
    line = error_line(run_script("test.py", str(folder), *trained))
    assert f"no images under {folder}" in line


def test_corrupt_training_image_is_skipped_and_named(tmp_path, tiny_category):
    bad = tiny_category / "train" / "good" / "005.png"
    bad.write_bytes(bad.read_bytes()[:60])
    result = run_script("train.py", f"DATASET_DIR={tiny_category}", *TINY, *outputs(tmp_path), "CLASSIFIER=False")
    assert result.returncode == 0, result.stderr
    assert "005.png" in result.stderr and "trained on 15 images" in result.stdout


def test_a_model_that_tells_nothing_apart_is_refused(tmp_path, tiny_category):
    """Identical images (or a normalization far from the pixels) give constant maps: thresholds of 0
    and a verdict that never changes. train.py refuses it in one line, and keeps the previous model."""
    first = (tiny_category / "train" / "good" / "000.png").read_bytes()
    for folder in ("train/good", "validation/good"):
        for path in (tiny_category / folder).iterdir():
            path.write_bytes(first)
    line = error_line(run_script("train.py", f"DATASET_DIR={tiny_category}", *TINY, *outputs(tmp_path), "CLASSIFIER=False"))
    assert "anomaly map is" in line and "everywhere: the model tells nothing apart" in line and "NORMALIZE_MEAN" in line
    assert not (tmp_path / "models" / "part").exists()


def test_a_classifier_with_nothing_to_learn_is_refused_before_the_fit(tmp_path, tiny_category):
    result = run_script("train.py", f"DATASET_DIR={tiny_category}", *TINY, *outputs(tmp_path), "CLASSIFIER_SYNTHETIC_DEFECTS=0", "CORESET_RATIO=0.2")
    assert "the classifier would have no defect to learn from" in error_line(result) and "fit part" not in result.stderr
    assert "note: CORESET_RATIO is not used by ANOMALY_MODEL=padim" in result.stderr  # PatchCore's setting, given to PaDiM


def test_three_goods_are_refused_before_the_fit_with_settings_that_work(tmp_path):
    """3 goods (1 held out for validation, 2 fitted) cannot give PaDiM's out-of-fold Gaussians; the
    one line names both settings that then work (the classifier has too few goods without the folds)."""
    rng = np.random.default_rng(0)
    for number in range(3):
        save(texture(rng), tmp_path / "three" / "train" / "good" / f"{number}.png")
    settings = [f"DATASET_DIR={tmp_path / 'three'}", *TINY, *outputs(tmp_path), "VALIDATION_FRACTION=0.3"]
    result = run_script("train.py", *settings, "OUT_OF_FOLD_FOLDS=5")
    line = error_line(result)
    assert "the out-of-fold maps of ANOMALY_MODEL=padim need 2 training images outside each of the OUT_OF_FOLD_FOLDS=2 folds" in line, result.stderr
    assert "set OUT_OF_FOLD_FOLDS = 0 and CLASSIFIER = False" in line and "fit three" not in result.stderr
    assert run_script("train.py", *settings, "OUT_OF_FOLD_FOLDS=0", "CLASSIFIER=False").returncode == 0


def test_unwritable_model_folder(tmp_path, tiny_category):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    line = error_line(run_script("train.py", f"DATASET_DIR={tiny_category}", *TINY, f"MODEL_DIR={blocker / 'models'}"))
    assert "cannot write to" in line


def test_mask_of_the_wrong_size(tmp_path, tiny_category, trained):
    mask = tiny_category / "ground_truth" / "blob" / "001_mask.png"
    Image.new("L", (10, 10)).save(mask)
    line = error_line(run_script("eval.py", *trained))
    assert "001_mask.png is 10x10" in line and "64x64" in line


def test_model_from_an_older_format(tmp_path, trained):
    path = tmp_path / "models" / "part" / "model.json"
    description = json.loads(path.read_text())
    description["format_version"] = 0
    path.write_text(json.dumps(description))
    line = error_line(run_script("test.py", *trained))
    assert "retrain" in line


def test_failed_retraining_keeps_the_previous_model(tmp_path, trained):
    before = (tmp_path / "models" / "part" / "mean.npy").read_bytes()
    line = error_line(run_script("train.py", *trained, "FEATURE_DIM=100000"))
    assert "FEATURE_DIM=100000" in line
    assert (tmp_path / "models" / "part" / "mean.npy").read_bytes() == before


def test_unknown_setting_and_wrong_type(tmp_path):
    assert "unknown setting BACKBONES" in error_line(run_script("train.py", "BACKBONES=resnet18"))
    assert "SEED=one" in error_line(run_script("eval.py", "SEED=one"))


def test_a_root_is_checked_for_every_model_before_any_is_scored_and_another_parts_model_is_named(tmp_path, trained_once):
    """On a root of several categories an untrained one stopped test.py after the others were scored
    (with advice that would retrain them all); a model picked by MODEL_NAME for another part's test
    folder scored it without a word."""
    root = tmp_path / "root"
    shutil.copytree(trained_once / "data" / "part", root / "part")
    shutil.copytree(trained_once / "data" / "part", root / "zeta")  # a category added later, never trained
    settings = [*TINY, f"MODEL_DIR={trained_once / 'models'}", f"RESULTS_DIR={tmp_path / 'results'}", "CLASSIFIER=False"]
    refused = run_script("test.py", f"DATASET_DIR={root}", *settings)
    assert error_line(refused) == (f"error: no trained model for 'zeta' in {trained_once / 'models'}: train it with python train.py "
                                   "MODEL_NAME=<name>, or give MODEL_NAME=<one of the trained categories>")
    assert not (tmp_path / "results").exists()  # nothing scored before the refusal
    models = tmp_path / "models"  # a damaged model is not called untrained: its own line says what is wrong
    shutil.copytree(trained_once / "models" / "part", models / "part")
    shutil.copytree(trained_once / "models" / "part", models / "zeta")
    (models / "zeta" / "model.json").write_text("{")
    damaged = run_script("test.py", f"DATASET_DIR={root}", *settings, f"MODEL_DIR={models}")
    assert "zeta/model.json is damaged" in error_line(damaged)
    other = run_script("test.py", f"DATASET_DIR={root / 'zeta'}", "MODEL_NAME=part", *settings)
    assert other.returncode == 0, other.stderr
    assert f"note: the model {trained_once / 'models' / 'part'} was trained on category 'part', scoring here the test folder of 'zeta'" in other.stderr
