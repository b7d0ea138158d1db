"""train.py ADD_GOOD / ADD_DEFECT: a trained model learns new images without its training images.

Tiny random-weight models on the synthetic striped parts; the update runs in process (pipeline.updating,
what train.py calls) except where the command line itself is what is tested."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from anomaly_model.base import AnomalyModel
from anomaly_model.store import load_model
from dataset_manager import Preprocessor, find_categories
from dataset_manager.layouts import find_images
from pipeline.training import train_category
from pipeline.updating import score_files, update_model
from settings import SettingsError, load

from conftest import ROOT, TINY, error_line, outputs, run_script, save, texture, with_defect

PLAIN = TINY + ["CLASSIFIER=False", "OUT_OF_FOLD_FOLDS=0", "FEATURE_DIM=40"]


def _dataset(root: Path, n_train: int, n_new: int, seed: int = 0) -> tuple[Path, Path]:
    """A category of `n_train` training goods and a folder of `n_new` further goods, all alike."""
    rng = np.random.default_rng(seed)
    for number in range(n_train):
        save(texture(rng), root / "part" / "train" / "good" / f"{number:03d}.png")
    for number in range(4):
        save(texture(rng), root / "part" / "validation" / "good" / f"{number:03d}.png")
    for number in range(3):
        image, mask = with_defect(rng)
        save(image, root / "part" / "test" / "blob" / f"{number:03d}.png")
        save(mask.astype(float), root / "part" / "ground_truth" / "blob" / f"{number:03d}_mask.png")
    for number in range(n_new):
        save(texture(rng), root / "new" / f"new{number:03d}.png")
    return root / "part", root / "new"


def _defect_folder(folder: Path, count: int, seed: int) -> Path:
    """`count` labeled defect images (a blob on the striped part) in `folder`, as the review page saves them."""
    rng = np.random.default_rng(seed)
    for number in range(count):
        save(with_defect(rng)[0], folder / f"d{number}.png")
    return folder


def _train(category_dir: Path, model_dir: Path, extra: list[str]):
    settings, _ = load([*extra, f"DATASET_DIR={category_dir}", f"MODEL_DIR={model_dir.parent}"])
    train_category(find_categories(category_dir)[0], settings, model_dir)
    return settings


def _maps(model_dir: Path, paths: list[Path]) -> torch.Tensor:
    model, description = load_model(model_dir, "cpu")
    return score_files(model, Preprocessor.from_description(description["preprocessing"]), paths, 8, "test").maps


def test_padim_update_equals_a_full_fit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    part, new = _dataset(tmp_path / "data", 10, 6)
    settings = _train(part, tmp_path / "models" / "part", PLAIN)
    through_backbone = []
    slices = AnomalyModel.backbone_slices  # every backbone pass over images goes through it
    monkeypatch.setattr(AnomalyModel, "backbone_slices", lambda self, images: through_backbone.append(len(images)) or slices(self, images))
    summary = update_model(tmp_path / "models" / "part", settings, str(new), "")
    monkeypatch.undo()
    assert summary.saved and summary.n_good == 6
    assert sum(through_backbone) == 6  # one backbone pass per new image: its honest map and what the model learns
    everything = tmp_path / "all"
    shutil.copytree(part, everything)
    for path in find_images(new):
        shutil.copy(path, everything / "train" / "good" / path.name)
    _train(everything, tmp_path / "full" / "part", PLAIN)
    probes = find_images(part / "test") + find_images(part / "validation")
    updated, full = _maps(tmp_path / "models" / "part", probes), _maps(tmp_path / "full" / "part", probes)
    assert torch.allclose(updated, full, rtol=1e-4, atol=1e-5 * float(full.abs().max()))
    description = json.loads((tmp_path / "models" / "part" / "model.json").read_text())
    assert description["anomaly_model"]["state"]["n_train_images"] == 16
    assert description["updates"][-1]["images"] == 6 and description["updates"][-1]["folder"] == str(new)
    # the 6 new goods, scored before they were learned, joined the 4 validation goods the thresholds stand on
    assert description["validation"]["n_images"] == 10

    again = update_model(tmp_path / "models" / "part", settings, str(new), "")  # the same images: nothing to learn
    assert not again.saved and again.n_known == 6


def test_backups_history_and_the_command_line(tmp_path: Path) -> None:
    part, new = _dataset(tmp_path / "data", 8, 6)
    models = tmp_path / "models"
    _train(part, models / "part", PLAIN)
    base = [*PLAIN, f"DATASET_DIR={part}", *outputs(tmp_path), "MODEL_BACKUPS=2"]
    batches = [new / f"batch{number}" for number in range(3)]
    for number, folder in enumerate(batches):
        folder.mkdir()
        for path in sorted(new.glob("*.png"))[2 * number : 2 * number + 2]:
            shutil.copy(path, folder / path.name)
    ids, settings = [], load([*base])[0]
    for folder in batches:
        ids.append(json.loads((models / "part" / "model.json").read_text())["files"]["mean.npy"]["sha256"])
        assert update_model(models / "part", settings, str(folder), "").n_good == 2
    history = json.loads((models / "part" / "model.json").read_text())["updates"]
    assert [entry["folder"] for entry in history] == [str(folder) for folder in batches]
    assert sorted(path.name for path in models.iterdir() if not path.name.startswith(".")) == ["part", "part.backup-1", "part.backup-2"]
    # the backups are the two models before the last update, whole and loadable
    assert json.loads((models / "part.backup-1" / "model.json").read_text())["files"]["mean.npy"]["sha256"] == ids[2]
    assert json.loads((models / "part.backup-2" / "model.json").read_text())["files"]["mean.npy"]["sha256"] == ids[1]
    load_model(models / "part.backup-2", "cpu")

    result = run_script("train.py", *base, f"ADD_GOOD={new}")  # the command line: its 12 files (6 in batch folders) learned already: skipped, counted
    assert result.returncode == 0, result.stderr
    assert "12 good images in" in result.stderr and "already known to the model" in result.stderr and "unchanged" in result.stderr

    retrained = run_script("train.py", *base)  # a full training replaces the updated model: said, with the folders
    assert retrained.returncode == 0, retrained.stderr
    assert "learned 6 images in 3 updates" in retrained.stderr and str(batches[0]) in retrained.stderr

    odd = tmp_path / "odd"  # a reviewer's wrong "good": pure noise, far above every good
    odd.mkdir()
    Image.fromarray(np.random.default_rng(5).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(odd / "noise.png")
    raised = run_script("train.py", *base, f"ADD_GOOD={odd}", "FEATURE_DIM=7")  # a model setting an update cannot change: said
    assert raised.returncode == 0, raised.stderr
    assert "the update keeps model" in raised.stderr and "FEATURE_DIM: model has" in raised.stderr
    rates = run_script("train.py", *base, f"ADD_GOOD={odd}", "IMAGE_FALSE_REJECT_RATE=0.3")  # silently kept at the model's own before
    assert "the update keeps model" in rates.stderr and "IMAGE_FALSE_REJECT_RATE: model has 0.05, config has 0.3" in rates.stderr, rates.stderr
    before, after = (float(value) for value in re.search(r"thresholds image ([\d.]+) -> ([\d.]+)", raised.stdout).groups())
    assert after > before and "raised the image threshold" in raised.stderr and "noise.png" in raised.stderr and "restore part.backup-1" in raised.stderr


def test_two_updates_at_once_both_reach_the_model(tmp_path: Path) -> None:
    """Two train.py ADD_GOOD runs on one model: the second waits for the first, then learns on top of it."""
    part, new = _dataset(tmp_path / "data", 8, 4)
    models = tmp_path / "models"
    _train(part, models / "part", PLAIN)
    folders = [new / "first", new / "second"]
    for number, folder in enumerate(folders):
        folder.mkdir()
        for path in sorted(new.glob("*.png"))[2 * number : 2 * number + 2]:
            shutil.copy(path, folder / path.name)
    command = [sys.executable, str(ROOT / "train.py"), *PLAIN, f"DATASET_DIR={part}", *outputs(tmp_path)]
    runs = [subprocess.Popen([*command, f"ADD_GOOD={folder}"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for folder in folders]
    for run in runs:
        _, err = run.communicate(timeout=240)
        assert run.returncode == 0, err
    history = json.loads((models / "part" / "model.json").read_text())["updates"]
    assert sorted(entry["folder"] for entry in history) == sorted(str(folder) for folder in folders)
    assert all(entry["images"] == 2 for entry in history)


def test_an_update_that_lands_while_a_retrain_runs_is_named_when_the_retrain_replaces_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """A retrain started before an update swapped its model in after it: the update's images were
    then only in backup-1, and nobody was told."""
    import pipeline.training as training

    part, new = _dataset(tmp_path / "data", 8, 3)
    model_dir = tmp_path / "models" / "part"
    settings = _train(part, model_dir, PLAIN)
    thresholds = training.set_thresholds

    def update_meanwhile(run) -> None:  # the update runs between the retrain's start and its save
        update_model(model_dir, settings, str(new), "")
        thresholds(run)

    monkeypatch.setattr(training, "set_thresholds", update_meanwhile)
    capsys.readouterr()
    train_category(find_categories(part)[0], settings, model_dir)
    err = capsys.readouterr().err
    assert f"note: model {model_dir} changed while this training ran (1 update learned 3 images from {new}: run train.py " in err, err
    assert "this training replaced that version too: it is kept as part.backup-1" in err
    assert json.loads((model_dir.parent / "part.backup-1" / "model.json").read_text())["updates"][0]["images"] == 3
    monkeypatch.undo()
    train_category(find_categories(part)[0], settings, model_dir)  # nothing changed meanwhile: no note
    assert "changed while this training ran" not in capsys.readouterr().err


def test_a_threshold_rise_is_blamed_on_a_new_good_only_when_it_scored_above_the_old_threshold() -> None:
    """A model saved before the thresholds became goods' own scores rose at its first update though
    every new good scored below it, and the note named an innocent image; the pixel threshold
    could double without a word."""
    from types import SimpleNamespace

    from train import threshold_notes

    summary = SimpleNamespace(highest_new_good=(40.0, Path("new/059.png")), thresholds_before=(55.2, 30.0), image_threshold=58.5, pixel_threshold=30.5)
    notes = threshold_notes(summary, Path("models/part"), 3)
    assert len(notes) == 1 and "though every new good scored below it" in notes[0] and "059.png" not in notes[0]
    summary.highest_new_good, summary.pixel_threshold = (70.0, Path("new/bad.png")), 60.0
    image, pixel = threshold_notes(summary, Path("models/part"), 3)
    assert "raised the image threshold by 6%" in image and "new/bad.png" in image and "restore part.backup-1" in image
    assert "raised the pixel threshold by 100%" in pixel and "smaller defect areas" in pixel
    summary.image_threshold, summary.pixel_threshold = 56.0, 31.0  # within the goods' ordinary spread: nothing said
    assert threshold_notes(summary, Path("models/part"), 3) == []


def test_add_good_left_in_config_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import config
    import settings as settings_module

    monkeypatch.setattr(config, "ADD_GOOD", "review/good")
    with pytest.raises(settings_module.SettingsError, match="ADD_GOOD.*command line only"):
        load([])
    assert load(["ADD_GOOD=review/good"])[0].ADD_GOOD == "review/good"
    monkeypatch.setattr(config, "ADD_GOOD", "")
    for key in ("ADD_GOOD", "ADD_DEFECT"):  # an unset shell variable: it retrained from DATASET_DIR and dropped every update
        with pytest.raises(settings_module.SettingsError, match=f"{key}= is empty on the command line: give the folder"):
            load([f"{key}="])


def test_a_model_saved_before_updates_is_refused(tmp_path: Path) -> None:
    part, new = _dataset(tmp_path / "data", 6, 2)
    model_dir = tmp_path / "models" / "part"
    _train(part, model_dir, PLAIN)
    description = json.loads((model_dir / "model.json").read_text())  # as an older version saved it: no sums, no honest goods
    for name in ("sums_shift.npy", "sums_total.npy", "sums_outer.npy", "honest_goods.npz", "learned_images.json"):
        (model_dir / name).unlink()
        del description["files"][name]
    del description["anomaly_model"]["state"]["sums_count"]
    (model_dir / "model.json").write_text(json.dumps(description))
    before = (model_dir / "model.json").read_bytes()
    result = run_script("train.py", *PLAIN, f"DATASET_DIR={part}", *outputs(tmp_path), f"ADD_GOOD={new}")
    assert "retrain it once with python train.py" in error_line(result)
    assert (model_dir / "model.json").read_bytes() == before


def test_patchcore_update_covers_the_new_patches(tmp_path: Path) -> None:
    part, new = _dataset(tmp_path / "data", 8, 6)
    model_dir = tmp_path / "models" / "part"
    settings = _train(part, model_dir, [*PLAIN, "ANOMALY_MODEL=patchcore", "CORESET_RATIO=0.1"])
    new_paths = find_images(new)
    before = _maps(model_dir, new_paths).flatten(1).amax(1)
    summary = update_model(model_dir, settings, str(new), "")
    report = summary.model_report
    assert 0 < report["coreset_added"] <= int(np.ceil(0.1 * report["new_patches"]))
    assert report["covering_radius_after"] < report["covering_radius_before"]
    model, _ = load_model(model_dir, "cpu")
    assert model.n_train_images_ == 14 and len(model.memory_) == json.loads((model_dir / "model.json").read_text())["anomaly_model"]["state"]["coreset_size"]
    after = _maps(model_dir, new_paths).flatten(1).amax(1)
    assert float(after.mean()) < float(before.mean())  # learned images now lie closer to the coreset
    defects, goods = _maps(model_dir, find_images(part / "test")), _maps(model_dir, find_images(part / "validation"))
    assert float(defects.flatten(1).amax(1).min()) > float(goods.flatten(1).amax(1).max())  # ROCAUC 1 on the tiny set still


def test_add_defect_retrains_the_classifier_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    from classification_model.training import TrainingSet

    part, new = _dataset(tmp_path / "data", 8, 4)
    defects = _defect_folder(tmp_path / "data" / "defects", 4, seed=5)
    model_dir = tmp_path / "models" / "part"
    settings = _train(part, model_dir, [*TINY, "FEATURE_DIM=40", "CLASSIFIER_SYNTHETIC_DEFECTS=12"])
    before = json.loads((model_dir / "model.json").read_text())
    summary = update_model(model_dir, settings, "", str(defects))
    assert summary.saved and summary.n_defect == 4
    after = json.loads((model_dir / "model.json").read_text())
    for name in ("mean.npy", "cholesky.npy", "sums_outer.npy", "honest_goods.npz"):
        assert after["files"][name] == before["files"][name]
    assert after["anomaly_model"] == before["anomaly_model"] and after["thresholds"] == before["thresholds"]
    assert after["classifier"]["n_real_defects"] == 4 and before["classifier"]["n_real_defects"] == 0
    assert after["files"]["classifier.json"] != before["files"]["classifier.json"]
    # goods and defects in one run (the review page's two folders): the defects stay the classifier's last rows
    summary = update_model(model_dir, settings, str(new), str(defects))
    assert summary.n_good == 4 and summary.n_defect == 0 and summary.n_known == 4
    final = json.loads((model_dir / "model.json").read_text())
    assert final["classifier"]["n_added_goods"] == 4 and final["classifier"]["n_real_defects"] == 4
    # a model that stored no goods' peak directions: the defects teach the first stage only, and a note says so (it was silent)
    monkeypatch.setattr(TrainingSet, "has_good_directions", property(lambda self: False))
    capsys.readouterr()
    update_model(model_dir, settings, "", str(_defect_folder(tmp_path / "data" / "more", 3, seed=9)))
    assert "the model stored no peak directions of its validation goods" in capsys.readouterr().err


def test_update_folders_are_checked_for_what_they_hold(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A review folder given whole is refused (its defect/ would be learned as goods); mask files are
    not images of parts; an image learned before as the other kind is learned with a note."""
    part, new = _dataset(tmp_path / "data", 8, 2)
    model_dir = tmp_path / "models" / "part"
    settings = _train(part, model_dir, [*TINY, "FEATURE_DIM=40", "CLASSIFIER_SYNTHETIC_DEFECTS=12"])
    review = tmp_path / "review"
    _defect_folder(review / "defect", 2, seed=3)
    shutil.copytree(new, review / "good")
    with pytest.raises(SettingsError, match=f"ADD_GOOD={review} holds sorted folders \\(good/, defect/\\): give e.g. ADD_GOOD={review / 'good'}"):
        update_model(model_dir, settings, str(review), "")
    shutil.copy(part / "ground_truth" / "blob" / "000_mask.png", review / "defect" / "000_mask.png")
    shutil.copy(part / "train" / "good" / "000.png", review / "defect" / "was_good.png")  # a training good, now called a defect
    first = sorted((review / "good").iterdir())[0]
    shutil.copy(first, review / "good" / "copy-of-first.png")  # the same picture twice in the folder: learned once, said so
    capsys.readouterr()
    summary = update_model(model_dir, settings, str(review / "good"), str(review / "defect"))
    assert summary.n_good == 2 and summary.n_defect == 3 and summary.n_known == 0  # two defects and the relabeled good; not the mask
    notes = capsys.readouterr().err
    assert "1 good image in" in notes and "repeats another of the folder (same bytes): learned once" in notes and "already known" not in notes
    assert "1 mask file in" in notes and "000_mask.png" in notes
    assert "1 image in" in notes and "was_good.png" in notes and "learned before as goods" in notes
    history = json.loads((model_dir / "model.json").read_text())["updates"]
    assert [(entry["kind"], entry["images"], entry["repeated_in_folder"]) for entry in history] == [("good", 2, 1), ("defect", 3, 0)]
    (tmp_path / "empty").mkdir()  # a mistyped or still empty review folder: said, the model unchanged
    assert update_model(model_dir, settings, str(tmp_path / "empty"), "").n_good == 0
    assert f"note: ADD_GOOD={tmp_path / 'empty'} holds no images" in capsys.readouterr().err
    update_model(model_dir, settings, "", str(part / "test" / "blob"))  # the data set's own test defects: eval.py would then measure learned images
    assert f"ADD_DEFECT={part / 'test' / 'blob'} lies in the test folder of the data set this model was trained on" in capsys.readouterr().err


def test_add_defect_needs_a_classifier(tmp_path: Path) -> None:
    part, new = _dataset(tmp_path / "data", 6, 2)
    model_dir = tmp_path / "models" / "part"
    settings = _train(part, model_dir, PLAIN)
    with pytest.raises(Exception, match="no classifier"):
        update_model(model_dir, settings, "", str(new))


def test_validation_goods_keep_their_peak_directions_so_reviewed_defects_can_teach_the_similarity_stage(tmp_path: Path) -> None:
    """A model trained without labeled defects stores its validation goods' peak directions, so that
    defects added later (ADD_DEFECT, the review page's corrections) can teach the similarity stage;
    an update with goods keeps those rows and directions."""
    from classification_model.training import CLASSIFIER_ROWS_FILE, TrainingSet

    part, new = _dataset(tmp_path / "data", 9, 3)
    defects = _defect_folder(tmp_path / "data" / "defects", 4, seed=7)
    model_dir = tmp_path / "models" / "part"
    settings = _train(part, model_dir, [*TINY, "FEATURE_DIM=40", "OUT_OF_FOLD_FOLDS=3", "CLASSIFIER_SYNTHETIC_DEFECTS=12"])

    def stored_rows() -> tuple[TrainingSet, dict]:
        description = json.loads((model_dir / "model.json").read_text())
        return TrainingSet.restored({}, (model_dir / CLASSIFIER_ROWS_FILE).read_bytes(), {}, 0), description

    training_set, _ = stored_rows()
    rows, directions = training_set.directions_of_goods()
    labels = np.concatenate(training_set.labels)
    assert np.array_equal(rows, np.arange(training_set.validation_rows.start, training_set.validation_rows.stop)) and len(rows) == 4
    assert (labels[rows] == 0).all() and np.allclose(np.linalg.norm(directions, axis=1), 1)
    assert training_set.real_directions is None
    assert update_model(model_dir, settings, "", str(defects)).n_defect == 4
    taught, description = stored_rows()
    taught.put_back_real_defects()
    assert taught.real_directions.shape == (4, 40) and np.array_equal(taught.directions_of_goods()[0], rows)
    assert taught.real_backgrounds.shape == (4, 40)  # their own images' background peaks, kept for the check of later updates
    assert description["classifier"]["verdict"]["evidence"]["classifier"]["n_defects"] == 4  # the evidence weighed them
    assert update_model(model_dir, settings, "", str(_defect_folder(tmp_path / "data" / "more", 2, seed=8))).n_defect == 2
    more, _ = stored_rows()
    more.put_back_real_defects()
    assert more.real_directions.shape == (6, 40) and more.real_backgrounds.shape == (6, 40)
    assert np.allclose(np.nan_to_num(more.real_backgrounds[:4]), np.nan_to_num(taught.real_backgrounds))
    assert update_model(model_dir, settings, str(new), "").n_good == 3
    updated, _ = stored_rows()
    assert np.array_equal(updated.directions_of_goods()[0], rows) and np.allclose(updated.directions_of_goods()[1], directions)


def test_classifier_rows_saved_before_every_good_kept_its_direction_still_restore() -> None:
    """A rows file written before `good_direction_rows` existed (its validation goods' directions under
    "validation_directions") restores them on the validation rows, so its updates keep the similarity stage."""
    import io

    from classification_model.training import TrainingSet

    rng = np.random.default_rng(3)
    directions = rng.standard_normal((3, 8))
    old = {
        "features": rng.standard_normal((7, 5)).astype(np.float32), "image_scores": rng.random(7), "labels": np.array([0, 0, 0, 1, 1, 0, 1]),
        "groups": np.arange(7), "weights": np.ones(7), "medians": rng.random(7), "validation_rows": np.array([0, 3]),
        "real_rows": np.array([6, 7]), "next_group": np.array([7]), "validation_directions": directions,
        "real_directions": rng.standard_normal((1, 8)),
    }
    buffer = io.BytesIO()
    np.savez(buffer, **old)
    restored = TrainingSet.restored({}, buffer.getvalue(), {}, 0)
    rows, kept = restored.directions_of_goods()
    assert np.array_equal(rows, [0, 1, 2]) and np.allclose(kept, directions)
    assert np.allclose(restored.put_back_real_defects(), old["real_directions"])


def test_new_images_that_cannot_be_read_are_skipped_and_named(tmp_path, capsys):
    """An image removed while ADD_GOOD was read, or a link whose file is gone, stopped the update
    with a traceback (or was passed over without a word); like train.py, it is skipped and named."""
    from pipeline.updating import new_images

    folder = tmp_path / "new"
    folder.mkdir()
    for index in range(2):
        save(texture(np.random.default_rng(index), 32), folder / f"{index}.png")
    (folder / "gone.png").symlink_to(tmp_path / "nowhere.png")
    found = new_images(str(folder), {}, "good")
    assert [path.name for path in found.paths] == ["0.png", "1.png"]
    assert f"WARNING: skipped {folder / 'gone.png'}: cannot be read" in capsys.readouterr().err
