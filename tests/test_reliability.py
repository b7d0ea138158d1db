"""Bad settings, odd images, damaged model files, full disks, kills and concurrent runs (issue 13):
each gives one clear line (exit 2) or the right result, and nothing the user had is lost."""

from __future__ import annotations

import csv
import errno
import importlib.util
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import config
from anomaly_model.errors import ModelError
from anomaly_model.files import AtomicFolder, StorageError, check_writable
from anomaly_model.store import load_model
from dataset_manager import DataError, read_mask, read_rgb
from dataset_manager.images import gray_to_uint8, image_size
from settings import RULES, SettingsError, check_value, defaults, load, validate

from conftest import ROOT, TINY, make_mvtec_category, outputs, run_script, save, texture


def error_line(result_or_code, stderr: str = "") -> str:
    """The one 'error: ...' line of a run that must fail cleanly with exit code 2: a finished
    subprocess, or an exit code and stderr."""
    if isinstance(result_or_code, subprocess.CompletedProcess):
        code, stderr = result_or_code.returncode, result_or_code.stdout + result_or_code.stderr
    else:
        code = result_or_code
    assert code == 2, stderr
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, stderr
    return lines[0]


def script_main(name: str):
    """train.py / test.py's main, loaded from its file (a module named `test` would clash)."""
    spec = importlib.util.spec_from_file_location(f"{name}_script", ROOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def run_in_process(main, argv: list[str], monkeypatch, capsys) -> tuple[int, str]:
    """pipeline.cli.run(main) as the script runs it: (exit code, stderr)."""
    from pipeline.cli import run

    monkeypatch.setattr(sys, "argv", ["script.py", *argv])
    handler = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit) as exited:
            run(main)
    finally:
        signal.signal(signal.SIGTERM, handler)
    return exited.value.code, capsys.readouterr().err


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def trained_once(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("reliability")
    category = make_mvtec_category(base / "data" / "part", n_train=8, n_test=1)
    result = run_script("train.py", f"DATASET_DIR={category}", *TINY, *outputs(base), "CLASSIFIER=False")
    assert result.returncode == 0, result.stderr
    return base


@pytest.fixture()
def trained(tmp_path, trained_once) -> list[str]:
    """Settings pointing at a private copy of the trained model and its dataset."""
    shutil.copytree(trained_once / "models", tmp_path / "models")
    shutil.copytree(trained_once / "data", tmp_path / "data")
    return [f"DATASET_DIR={tmp_path / 'data' / 'part'}", *TINY, *outputs(tmp_path), "CLASSIFIER=False"]


# --- settings: checked once, up front, against one table of rules --------------------------------


@pytest.mark.parametrize(
    "override, allowed",
    [
        ("CROP=-5", "an integer >= 32"),
        ("CROP=0", "an integer >= 32"),
        ("RESIZE=0", "an integer >= 32"),
        ("NORMALIZE_STD=(0,0,0)", "3 values, each a number in [0.001, 10]"),
        ("NORMALIZE_MEAN=(0.5,0.5)", "3 values"),
        ("VALIDATION_FRACTION=1.5", "a number in [0, 1)"),
        ("SEED=-1", "an integer from 0"),
    ],
)
def test_bad_setting_is_one_line_naming_key_value_and_what_is_allowed(tmp_path, override, allowed, monkeypatch, capsys):
    code, stderr = run_in_process(script_main("train"), [*TINY, override, *outputs(tmp_path)], monkeypatch, capsys)
    line = error_line(code, stderr)
    key, value = override.split("=")
    assert f"{key}=" in line and value.strip("()").split(",")[0] in line and allowed in line
    assert not (tmp_path / "models").exists()  # refused before any work


def test_bad_setting_through_the_scripts_themselves(tmp_path):
    line = error_line(run_script("train.py", *TINY, "CROP=-5", *outputs(tmp_path)))
    assert "CROP=-5 is not allowed: CROP must be an integer >= 32" in line
    if getattr(torch.backends, "mps", None) is None or not torch.backends.mps.is_available():
        line = error_line(run_script("test.py", *TINY, "DEVICE=mps", *outputs(tmp_path)))
        assert "DEVICE=mps" in line and "auto, cpu" in line


def test_every_setting_has_a_rule_and_every_default_passes_it():
    keys = set(defaults())
    assert keys - set(RULES) == set(), "config.py keys without a rule in settings.RULES"
    assert set(RULES) - keys == set(), "rules for keys config.py no longer has"
    validate(defaults())


def test_an_unknown_anomaly_model_is_refused_naming_the_registered_ones():
    with pytest.raises(SettingsError, match="ANOMALY_MODEL=nope .*one of 'padim', 'patchcore'"):
        load(["ANOMALY_MODEL=nope"])
    check_value("ANOMALY_MODEL", "patchcore")


def test_values_edited_into_config_py_are_checked_too(monkeypatch):
    monkeypatch.setattr(config, "BATCH_SIZE", 0)
    with pytest.raises(SettingsError, match="BATCH_SIZE=0 .*an integer >= 1"):
        load([])
    monkeypatch.setattr(config, "BATCH_SIZE", 8)
    with pytest.raises(SettingsError, match="CROP=300 is larger than RESIZE=256"):
        load(["CROP=300", "RESIZE=256"])


def test_a_name_in_config_py_that_is_no_setting_is_refused_not_ignored(monkeypatch):
    """A typo or a lower-case setting in config.py would otherwise be ignored without a word (the
    command line refuses the same typo): one line naming it and the setting meant."""
    monkeypatch.setattr(config, "IMAGE_FALSE_REJECTRATE", 0.02, raising=False)
    with pytest.raises(SettingsError, match=r"config.py sets IMAGE_FALSE_REJECTRATE, which is no setting \(did you mean IMAGE_FALSE_REJECT_RATE\?\)"):
        load([])
    monkeypatch.delattr(config, "IMAGE_FALSE_REJECTRATE")
    monkeypatch.setattr(config, "image_size", 128, raising=False)
    with pytest.raises(SettingsError, match=r"config.py sets image_size, which is no setting: settings are written in upper case \(IMAGE_SIZE\)"):
        load([])


def test_a_path_starting_with_a_tilde_is_the_home_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setattr(config, "MODEL_DIR", "~/models")
    settings, _ = load(["DATASET_DIR=~/data/tire"])
    assert settings.DATASET_DIR == str(tmp_path / "data" / "tire") and settings.MODEL_DIR == str(tmp_path / "models")


def test_a_mistyped_dataset_dir_in_config_py_is_an_error_not_a_demo_set(tmp_path, monkeypatch, capsys):
    """Only the project's own dataset/demo is generated when absent; any other missing DATASET_DIR,
    edited into config.py or not, is one line (it was filled with synthetic images and trained on)."""
    missing = tmp_path / "data" / "tyre"
    monkeypatch.setattr(config, "DATASET_DIR", str(missing))
    line = error_line(*run_in_process(script_main("train"), [*TINY, *outputs(tmp_path)], monkeypatch, capsys))
    assert f"{missing} does not exist" in line and not missing.exists() and not (tmp_path / "models").exists()


# --- too little data ---------------------------------------------------------------------------------


def test_one_training_image_with_a_validation_folder(tmp_path, monkeypatch, capsys):
    category = make_mvtec_category(tmp_path / "data" / "part", n_train=1, n_test=1)
    line = error_line(*run_in_process(script_main("train"), [f"DATASET_DIR={category}", *TINY, *outputs(tmp_path)], monkeypatch, capsys))
    assert f"only 1 training image in {category / 'train' / 'good'}" in line and "at least 2" in line


def test_too_few_honest_goods_for_the_false_reject_rate_are_named(tmp_path, monkeypatch, capsys):
    category = make_mvtec_category(tmp_path / "data" / "part")
    common = [f"DATASET_DIR={category}", *TINY, "CLASSIFIER=False", *outputs(tmp_path)]
    code, stderr = run_in_process(script_main("train"), [*common, "IMAGE_FALSE_REJECT_RATE=0.01"], monkeypatch, capsys)
    assert code == 0, stderr
    (note,) = [line for line in stderr.splitlines() if "IMAGE_FALSE_REJECT_RATE=0.01 asks for 1 good part in 100" in line]
    assert note.startswith("note: ") and "validation/good" in note
    code, stderr = run_in_process(script_main("train"), [*common, "IMAGE_FALSE_REJECT_RATE=0.5"], monkeypatch, capsys)
    assert code == 0 and "asks for 1 good part" not in stderr  # a few goods do show 1 in 2


def test_labeled_defects_a_model_without_classifier_cannot_use_are_named(tmp_path, monkeypatch, capsys):
    category = make_mvtec_category(tmp_path / "data" / "part")
    (category / "train" / "defect").mkdir()
    for source in sorted((category / "test" / "blob").iterdir())[:2]:
        (category / "train" / "defect" / source.name).write_bytes(source.read_bytes())
    code, stderr = run_in_process(script_main("train"), [f"DATASET_DIR={category}", *TINY, "CLASSIFIER=False", *outputs(tmp_path)], monkeypatch, capsys)
    assert code == 0, stderr
    assert f"note: 2 labeled defects in {category / 'train' / 'defect'} not used: only the classifier learns from them" in stderr


def test_no_readable_training_image_names_the_folder_and_the_files(tmp_path, monkeypatch, capsys):
    category = make_mvtec_category(tmp_path / "data" / "part", n_train=5, n_test=1)
    for path in (category / "train" / "good").iterdir():
        path.write_bytes(b"not an image")
    line = error_line(*run_in_process(script_main("train"), [f"DATASET_DIR={category}", *TINY, *outputs(tmp_path)], monkeypatch, capsys))
    assert f"none of the 5 training images in {category / 'train' / 'good'} could be read (5 skipped: 000.png (" in line
    assert "002.png (" in line and "and 2 more" in line


# --- images read as a viewer shows them ---------------------------------------------------------------


@pytest.fixture(scope="module")
def odd_images_scored(trained_once, tmp_path_factory) -> tuple[dict, Path]:
    """test.py on a folder of the same pictures stored in different ways: {file name: csv row}."""
    folder = tmp_path_factory.mktemp("odd") / "incoming"
    rng = np.random.default_rng(5)
    upright = (texture(rng)[:, :48] * 255).astype(np.uint8)  # 64 x 48, stripes along x
    # a phone's JPEG: pixels stored turned a quarter (clockwise view = counterclockwise storage), tag 6
    stored = Image.fromarray(np.ascontiguousarray(np.rot90(upright, 1)))
    exif = stored.getexif()
    exif[0x0112] = 6
    folder.mkdir()
    stored.save(folder / "phone.jpg", exif=exif, quality=95)
    decoded = np.asarray(Image.open(folder / "phone.jpg").convert("RGB"))
    Image.fromarray(np.ascontiguousarray(np.rot90(decoded, -1))).save(folder / "phone_upright.png")
    Image.fromarray(decoded).save(folder / "phone_as_stored.png")
    gray = (texture(rng)[:, :, 0] * 255).astype(np.uint8)
    Image.fromarray(gray).save(folder / "gray.png")
    Image.fromarray(gray.astype(np.float32), mode="F").save(folder / "gray_float.tiff")
    args = [f"DATASET_DIR={trained_once / 'data' / 'part'}", *TINY, *outputs(trained_once), "CLASSIFIER=False"]
    result = run_script("test.py", str(folder), *args)
    assert result.returncode == 0, result.stderr
    predictions = Path(result.stdout.split("predictions: ")[1].split()[0])
    rows = {Path(row["path"]).name: row for row in csv.DictReader(open(predictions))}
    return rows, predictions.parent


def test_exif_rotated_jpeg_scores_as_its_upright_copy(odd_images_scored):
    rows, run_dir = odd_images_scored
    phone, upright, as_stored = (float(rows[name]["image_score"]) for name in ("phone.jpg", "phone_upright.png", "phone_as_stored.png"))
    assert phone == pytest.approx(upright, rel=1e-5)
    assert abs(as_stored - upright) > 0.05 * upright  # read unturned, the picture scores differently
    mask = Image.open(run_dir / rows["phone.jpg"]["mask"])
    assert mask.size == (48, 64) == Image.open(run_dir / rows["phone_upright.png"]["mask"]).size  # as displayed
    assert image_size(Path(rows["phone.jpg"]["path"])) == (64, 48)


def test_float_tiff_with_values_0_to_255_scores_as_its_png(odd_images_scored):
    rows, _ = odd_images_scored
    assert float(rows["gray_float.tiff"]["image_score"]) == pytest.approx(float(rows["gray.png"]["image_score"]), rel=1e-6)


def test_every_number_type_is_scaled_from_its_real_range(tmp_path):
    values = np.array([[0, 64, 128, 255]], dtype=np.float64)
    expected = values.astype(np.uint8)
    assert (gray_to_uint8(values.astype(np.float32) / 255) == expected).all()  # float in [0, 1]
    assert (gray_to_uint8(values.astype(np.float32)) == expected).all()  # float in [0, 255]
    assert (gray_to_uint8((values * 257).astype(np.uint16)) == expected).all()  # 16-bit
    assert (gray_to_uint8((values * 4095 / 255).round().astype(np.uint16)) == expected).all()  # 12-bit data
    assert (gray_to_uint8((values * 1e6).astype(np.int32)) == expected).all()  # 32-bit: its own maximum
    assert (gray_to_uint8(values - 1000) == expected).all()  # negative: its own minimum to maximum
    Image.fromarray(np.array([[np.nan, 1]], np.float32), mode="F").save(tmp_path / "nan.tiff")
    with pytest.raises(DataError, match=r"nan.tiff: .*NaN"):
        read_rgb(tmp_path / "nan.tiff")
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (255, 255, 255, 255)
    rgba[1, 1, 3] = 255  # opaque black: not defect
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "mask.png")
    assert read_mask(tmp_path / "mask.png").tolist() == [[True, False], [False, False]]


# --- model.json validated as data -----------------------------------------------------------------------


def _edit_description(tmp_path: Path, edit) -> Path:
    path = tmp_path / "models" / "part" / "model.json"
    description = json.loads(path.read_text())
    edit(description)
    path.write_text(json.dumps(description))
    return path


def test_model_json_with_a_key_removed(tmp_path, trained, monkeypatch, capsys):
    path = _edit_description(tmp_path, lambda d: d.pop("thresholds"))
    line = error_line(*run_in_process(script_main("test"), trained, monkeypatch, capsys))
    assert f"model {path} is damaged or incompatible (thresholds is missing): retrain" in line


def test_model_json_with_a_value_of_the_wrong_type(tmp_path, trained, monkeypatch, capsys):
    path = _edit_description(tmp_path, lambda d: d["anomaly_model"]["settings"].update(feature_dim="16x"))
    line = error_line(*run_in_process(script_main("test"), trained, monkeypatch, capsys))
    assert f"model {path} is damaged or incompatible (anomaly_model.settings.feature_dim is '16x'" in line
    assert "retrain" in line


def test_model_state_is_checked_by_its_model_type(tmp_path, trained):
    folder = tmp_path / "models" / "part"
    for edit, key in [
        (lambda d: d["anomaly_model"]["state"].pop("channel_indices"), "channel_indices"),
        (lambda d: d["anomaly_model"]["state"].update(grid_size=["a", 2]), "state.grid_size"),
        (lambda d: d["anomaly_model"]["state"].update(channel_indices=[10_000] * 16), "state.channel_indices"),
        (lambda d: d["anomaly_model"]["settings"].update(extra=1), "extra"),
        (lambda d: d["files"]["mean.npy"].pop("sha256"), "files.mean.npy.sha256"),
    ]:
        original = (folder / "model.json").read_text()
        _edit_description(tmp_path, edit)
        with pytest.raises(Exception, match=f"damaged or incompatible.*{key}") as raised:
            load_model(folder, "cpu")
        assert type(raised.value).__name__ == "ModelError"
        (folder / "model.json").write_text(original)


# --- resource faults ---------------------------------------------------------------------------------------


def test_running_out_of_memory_names_the_settings_to_lower(tmp_path):
    category = make_mvtec_category(tmp_path / "data" / "part", n_train=3, n_test=1)

    def limit_memory():  # a 6 GB address-space limit: the allocator fails instead of the OOM killer
        resource.setrlimit(resource.RLIMIT_AS, (6 * 2**30, 6 * 2**30))

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    settings = ["BACKBONE=resnet18", "WEIGHTS=none", "RESIZE=384", "CROP=384", "FEATURE_DIM=448", "BATCH_SIZE=1", "NUM_WORKERS=0"]
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), f"DATASET_DIR={category}", *settings, *outputs(tmp_path), "CLASSIFIER=False"],
        cwd=ROOT, capture_output=True, text=True, timeout=240, env=env, preexec_fn=limit_memory,
    )  # the (P, d, d) sums alone would take 7.4 GB
    line = error_line(result)
    assert "out of memory" in line and "BATCH_SIZE" in line and "IMAGE_SIZE" in line and "FEATURE_DIM" in line
    assert not (tmp_path / "models").exists() or leftovers(tmp_path / "models") == []


def test_disk_full_while_retraining_keeps_the_previous_model(tmp_path, trained, monkeypatch, capsys):
    models = tmp_path / "models"
    before = (models / "part" / "mean.npy").read_bytes()

    def disk_full(descriptor):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    line = error_line(*run_in_process(script_main("train"), trained, monkeypatch, capsys))
    assert f"the disk holding {models / 'part'} is full" in line and "nothing was overwritten" in line
    assert (models / "part" / "mean.npy").read_bytes() == before
    assert sorted(p.name for p in models.iterdir()) == ["part"]  # nothing half-written beside it


def test_disk_full_while_writing_test_results_keeps_earlier_results(tmp_path, trained, monkeypatch, capsys):
    earlier = tmp_path / "results" / "part" / "test-earlier"
    earlier.mkdir(parents=True)
    (earlier / "predictions.csv").write_text("path\n")

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("pipeline.prediction.write_pictures", disk_full)
    line = error_line(*run_in_process(script_main("test"), trained, monkeypatch, capsys))
    assert f"the disk holding {tmp_path / 'results' / 'part'}" in line and "is full" in line
    assert [p.name for p in (tmp_path / "results" / "part").iterdir()] == ["test-earlier"]
    assert (earlier / "predictions.csv").read_text() == "path\n"


# --- crash-safe swaps ----------------------------------------------------------------------------------------

# A second run that saves the model again and is stopped at a chosen instant.
_SAVER = """
import os, signal, sys
from pathlib import Path
from anomaly_model import files
from anomaly_model.store import load_model, save_model
from pipeline.cli import run

folder, when = Path(sys.argv[1]), sys.argv[2]
model, description = load_model(folder, "cpu")
info = {k: v for k, v in description.items() if k not in ("format_version", "anomaly_model", "versions", "files")}
info["thresholds"]["image"] += 1.0  # tells the new model from the old one
real_replace, real_write = os.replace, files.AtomicFolder.write_npy_chunks

def replace(source, target):
    real_replace(source, target)
    if when == "between-renames" and ".previous-" in str(target):
        os.kill(os.getpid(), signal.SIGKILL)

def write(self, *args, **kwargs):
    real_write(self, *args, **kwargs)
    if when == "while-writing":
        os.kill(os.getpid(), signal.SIGKILL)
    if when == "sigterm":
        os.kill(os.getpid(), signal.SIGTERM)

os.replace, files.AtomicFolder.write_npy_chunks = replace, write
run(lambda argv: save_model(folder, model, info))
"""


def _save_and_stop(folder: Path, when: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", _SAVER, str(folder), when], cwd=ROOT, capture_output=True, text=True, timeout=240, env=env)


def test_kill_between_the_two_renames_leaves_a_loadable_model(tmp_path, trained):
    models = tmp_path / "models"
    threshold = json.loads((models / "part" / "model.json").read_text())["thresholds"]["image"]
    result = _save_and_stop(models / "part", "between-renames")
    assert result.returncode == -signal.SIGKILL, result.stderr
    assert not (models / "part").exists()  # the window the issue describes: old and new both stranded
    assert any(".previous-" in name for name in leftovers(models)) and any(".partial-" in name for name in leftovers(models))
    model, description = load_model(models / "part", "cpu")  # the next run
    assert description["thresholds"]["image"] == threshold  # the old model, back at its path
    assert leftovers(models) == []


def test_kill_while_writing_leaves_the_old_model_and_the_next_run_cleans_up_but_not_a_live_run(tmp_path, trained):
    models = tmp_path / "models"
    before = (models / "part" / "model.json").read_bytes()
    with AtomicFolder(models / "other") as live:  # a concurrent run, still writing all along
        live.write_bytes("a", b"1")
        result = _save_and_stop(models / "part", "while-writing")
        assert result.returncode == -signal.SIGKILL, result.stderr
        assert len([name for name in leftovers(models) if ".part.partial-" in name]) == 1
        load_model(models / "part", "cpu")  # the next run
        assert leftovers(models) == sorted([live.temporary.name, f".other.lock-{live.run}"])
    assert leftovers(models) == [] and (models / "other" / "a").read_bytes() == b"1"
    assert (models / "part" / "model.json").read_bytes() == before


def test_sigterm_is_handled_like_ctrl_c(tmp_path, trained):
    models = tmp_path / "models"
    before = (models / "part" / "model.json").read_bytes()
    result = _save_and_stop(models / "part", "sigterm")
    assert result.returncode == 143, result.stderr
    assert "terminated (SIGTERM): nothing was overwritten" in result.stderr and "Traceback" not in result.stderr
    assert leftovers(models) == [] and (models / "part" / "model.json").read_bytes() == before


def test_two_test_runs_in_the_same_second_keep_both_results(tmp_path, trained, monkeypatch):
    from pipeline import prediction
    from pipeline.detector import Detector
    from pipeline.inspection import Inspector

    class FrozenClock(datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime(2026, 1, 2, 3, 4, 5)

    monkeypatch.setattr(prediction, "datetime", FrozenClock)
    settings, _ = load(trained)
    detector = Detector(tmp_path / "models" / "part", "cpu")
    results = tmp_path / "results" / "part"
    written = []
    for line in ("a", "b"):
        folder = tmp_path / line / "incoming"  # two folders of the same name
        save(texture(np.random.default_rng(1)), folder / f"{line}.png")
        written.append(prediction.predict_folder(Inspector(detector), folder, results, settings).run_dir)
    assert [p.name for p in written] == ["test-incoming-20260102-030405", "test-incoming-20260102-030405-2"]
    for run_dir, name in zip(written, ("a.png", "b.png")):
        rows = list(csv.DictReader(open(run_dir / "predictions.csv")))
        assert [Path(row["path"]).name for row in rows] == [name]


@pytest.mark.parametrize(
    "existing, keep, expected",
    [
        ([1, 2, 3], 3, {1: "v4", 2: "v3", 3: "v2"}),  # the oldest falls off
        ([1, 2, 3], 1, {1: "v4"}),  # a lowered MODEL_BACKUPS keeps the newest, not the oldest
        ([2, 3], 3, {1: "v4", 2: "v3", 3: "v2"}),  # backup-1 restored by hand: the gap closes
        ([3, 4], 3, {1: "v4", 2: "v3", 3: "v2"}),  # two gaps: renamed without overwriting one another
        ([1, 2], 0, {}),  # MODEL_BACKUPS=0: none kept, none stale left behind as backup-1
    ],
)
def test_backups_stay_newest_first_without_gaps(tmp_path, existing, keep, expected, capsys):
    """backup-1 is always the model before the last save, backup-2 the one before that, ...: so the
    documented restore (rename backup-1) gives the previous model whatever was kept or restored before."""
    models = tmp_path / "models"
    (models / "part").mkdir(parents=True)
    (models / "part" / "version").write_text("v4")  # the model being replaced
    (models / "part" / "model.json").write_text("{}")
    for number, version in zip(existing, ("v3", "v2", "v1")):
        (models / f"part.backup-{number}").mkdir()
        (models / f"part.backup-{number}" / "version").write_text(version)
    with AtomicFolder(models / "part", backups=keep) as out:
        out.write_bytes("version", b"v5")
    assert (models / "part" / "version").read_text() == "v5"
    found = {int(path.name.rsplit("-", 1)[1]): (path / "version").read_text() for path in models.glob("part.backup-*")}
    assert found == expected
    assert not [path for path in models.iterdir() if path.name.startswith(".")]  # nothing left aside
    removed = max(0, len(existing) + 1 - keep) - (keep == 0)  # earlier backups past the count (with 0, the replaced model goes too)
    note = capsys.readouterr().err
    assert (f"note: MODEL_BACKUPS={keep}: removed {removed} older backup" in note) == (removed > 0)  # never silently


def test_names_too_long_for_the_file_system_are_said_before_the_work_or_shortened(tmp_path):
    """A 240-character category trained fully, then failed with a traceback on the save's lock name
    (255 bytes at most); a 220-character test folder failed test.py the same way."""
    from types import SimpleNamespace

    from pipeline.cli import model_dir_for
    from pipeline.prediction import run_folder

    settings = SimpleNamespace(MODEL_DIR=str(tmp_path), MODEL_NAME="", DATASET_DIR=str(tmp_path / "data"))
    with pytest.raises(SettingsError, match="230 bytes long.*set a shorter MODEL_NAME"):
        model_dir_for(settings, "c" * 230, 1)
    with pytest.raises(SettingsError, match="rename the category folder"):
        model_dir_for(settings, "c" * 230, 2)
    assert model_dir_for(settings, "c" * 200, 1).name == "c" * 200
    name = run_folder(tmp_path / ("f" * 240))
    assert name.startswith("test-ffff") and len(name.encode()) <= 190


def test_a_backup_that_cannot_be_removed_is_named(tmp_path, monkeypatch, capsys):
    """A read-only backup past MODEL_BACKUPS stayed as a hidden 10 MB folder while the note said "removed"."""
    from anomaly_model import files

    models = tmp_path / "models"
    for name in ("part", "part.backup-1"):
        (models / name).mkdir(parents=True)
        (models / name / "model.json").write_text("{}")
    monkeypatch.setattr(files, "remove_entry", lambda path: None)  # as rmtree(ignore_errors=True) on a folder not ours
    with AtomicFolder(models / "part", backups=1) as out:
        out.write_bytes("model.json", b"{}")
    assert "note: could not remove" in capsys.readouterr().err


@pytest.mark.parametrize("keep", [0, 3])
def test_a_save_never_replaces_what_is_not_a_model(tmp_path, keep):
    """MODEL_BACKUPS=0 deletes the model a save replaces: a user's own folder or file at
    MODEL_DIR/<name> (no model.json) was deleted with it, silently. It is refused and kept, and so
    is a link to a missing folder (an unmounted disk: the model landed on the system disk)."""
    models = tmp_path / "models"
    (models / "part").mkdir(parents=True)
    (models / "part" / "notes.txt").write_text("mine")
    (models / "file").write_text("mine too")
    (models / "linked").symlink_to(tmp_path / "unmounted" / "part")
    for name, problem in (("part", "holds files that are not a model"), ("file", "holds a file"), ("linked", "which does not exist")):
        with pytest.raises(ModelError, match=problem):
            with AtomicFolder(models / name, backups=keep) as out:
                out.write_bytes("model.json", b"{}")
    assert (models / "part" / "notes.txt").read_text() == "mine" and (models / "file").read_text() == "mine too"
    assert sorted(path.name for path in models.iterdir()) == ["file", "linked", "part"] and not (tmp_path / "unmounted").exists()
    with pytest.raises(StorageError, match="link to .*which does not exist"):  # as MODEL_DIR or RESULTS_DIR: it said "File exists"
        check_writable(models / "linked")
    (models / "empty").mkdir()  # an empty folder is no loss
    with AtomicFolder(models / "empty", backups=keep) as out:
        out.write_bytes("model.json", b"{}")
    assert (models / "empty" / "model.json").is_file()


_KILLED_AT_RENAME = """
import os, signal, sys
from pathlib import Path
from anomaly_model.files import AtomicFolder

models, kill_at = Path(sys.argv[1]), int(sys.argv[2])
real_replace, count = os.replace, [0]

def replace(source, target):
    count[0] += 1
    if count[0] == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    real_replace(source, target)

os.replace = replace
with AtomicFolder(models / "part", backups=3) as out:
    out.write_bytes("version", b"v5")
print(count[0])
"""


def test_a_kill_at_any_rename_of_a_save_loses_no_model_but_the_oldest_backup(tmp_path):
    """A save with backups renames several folders (the backups make room, the old model goes
    aside, the new one in, the old one becomes backup-1, the oldest goes). Killed before any of
    them, the next run (`sweep`) finds every version: the replaced model as `part` or `part.backup-1`,
    never removed, and the backups in order; only the one past MODEL_BACKUPS may be gone."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    renames = None
    for kill_at in range(1, 12):
        models = tmp_path / str(kill_at)
        (models / "part").mkdir(parents=True)
        (models / "part" / "version").write_text("v4")  # the model being replaced
        (models / "part" / "model.json").write_text("{}")
        for number, version in zip((1, 2, 3), ("v3", "v2", "v1")):
            (models / f"part.backup-{number}").mkdir()
            (models / f"part.backup-{number}" / "version").write_text(version)
        result = subprocess.run([sys.executable, "-c", _KILLED_AT_RENAME, str(models), str(kill_at)], cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
        if result.returncode == 0:
            renames = int(result.stdout)
            break
        assert result.returncode == -signal.SIGKILL, result.stderr
        AtomicFolder(models / "other").__enter__()  # the next save here sweeps first (as every load does)
        backups = sorted(models.glob("part.backup-*"), key=lambda path: int(path.name.rsplit("-", 1)[1]))
        chain = [(path / "version").read_text() for path in [models / "part", *backups]]  # newest first (gaps in the numbers allowed)
        assert chain in (["v4", "v3", "v2", "v1"], ["v5", "v4", "v3", "v2", "v1"], ["v5", "v4", "v3", "v2"]), (kill_at, chain)
        assert not [path for path in models.iterdir() if path.name.startswith(".part.")], (kill_at, leftovers(models))
    assert renames is not None and renames >= 5  # every rename of the save was killed once


def test_a_retrain_keeps_the_model_it_replaces_as_a_backup(tmp_path, trained, monkeypatch, capsys):
    """A full retrain can be worse than the model it replaces (which may hold updates): that model is
    kept as backup-1, like an update's; MODEL_BACKUPS=0 keeps none."""
    before = (tmp_path / "models" / "part" / "model.json").read_text()
    code, stderr = run_in_process(script_main("train"), list(trained), monkeypatch, capsys)
    assert code == 0, stderr
    assert (tmp_path / "models" / "part.backup-1" / "model.json").read_text() == before
    code, stderr = run_in_process(script_main("train"), [*trained, "MODEL_BACKUPS=0"], monkeypatch, capsys)
    assert code == 0 and not list((tmp_path / "models").glob("part.backup-*"))
    assert "note: MODEL_BACKUPS=0: removed 1 older backup (named part.backup-1 before this save)" in stderr
