"""Reliability and security, second round (issue 27): a model folder is a boundary (nothing read,
hashed or deleted outside it), exports and retrains of one model run side by side safely, result
folders are never trained on, links behave, paths are paths, nothing is unpickled between
torchrun ranks, and the advice fits the model in use.

Fast: one tiny random-weight model with a classifier and an export, shared by the tests."""

from __future__ import annotations

import inspect
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from anomaly_model import distributed
from anomaly_model.errors import ModelError
from anomaly_model.files import model_lock, reading
from anomaly_model.store import build_model, load_model, named_files, save_model
from conftest import ROOT, TINY, make_mvtec_category, outputs, run_script, save, texture
from dataset_manager import find_categories
from dataset_manager.images import resolve_image_size
from pipeline.cli import memory_message
from pipeline.detector import Detector
from pipeline.exporting import check_paths, export_model
from settings import SettingsError, load

CLASSIFIER_FAST = ["CLASSIFIER_SYNTHETIC_DEFECTS=12", "CLASSIFIER_MAX_ROUNDS=60", "CLASSIFIER_FOLDS=3"]
SECRET = b"the user's own file: never read, hashed or deleted by the suite\n"

# Every file this process opens, removes or renames while `_touched` is collecting (audit hooks
# see os.open, builtins.open and io.open alike, and cannot be removed: collect only when asked).
_touched: list[str] | None = None


def _audit(event: str, args: tuple) -> None:
    if _touched is not None and event in ("open", "os.remove", "os.rename", "os.replace", "shutil.rmtree", "os.rmdir"):
        _touched.extend(os.path.realpath(arg) for arg in args[:2] if isinstance(arg, (str, bytes, os.PathLike)))


sys.addaudithook(_audit)


def error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stdout + result.stderr[-3000:]
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    return line


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """A trained model with a classifier (classifier.json) and an ONNX export (model.onnx)."""
    base = tmp_path_factory.mktemp("boundary")
    category = make_mvtec_category(base / "data" / "part", n_train=8, n_test=1)
    settings = [f"DATASET_DIR={category}", *TINY, *CLASSIFIER_FAST, *outputs(base)]
    for script in ("train.py", "export.py"):
        result = run_script(script, *settings)
        assert result.returncode == 0, result.stderr
    return base


@pytest.fixture()
def copy(tmp_path, exported) -> tuple[Path, list[str]]:
    """(a private copy of the exported model's folder, settings pointing at it and its dataset)."""
    shutil.copytree(exported / "models", tmp_path / "models")
    shutil.copytree(exported / "data", tmp_path / "data")
    settings = [f"DATASET_DIR={tmp_path / 'data' / 'part'}", *TINY, *CLASSIFIER_FAST, *outputs(tmp_path)]
    return tmp_path / "models" / "part", settings


def _point_outside(model_dir: Path, key: str, name: str) -> str:
    """model.json's entry `key` (a name in a "files" table, or a "..._file" value) set to `name`;
    returns the entry's key as an error names it."""
    path = model_dir / "model.json"
    description = json.loads(path.read_text())
    *parents, last = key.split(".")
    entry = description
    for number, part in enumerate(parents):
        if part == "files":
            table, old = entry["files"], ".".join([*parents[number + 1 :], last])
            table[name] = table.pop(old)
            key = ".".join([*parents[: number + 1], name])
            break
        entry = entry[part]
    else:
        entry[last] = name
    path.write_text(json.dumps(description))
    return key


# --- 1. a model folder is a boundary ------------------------------------------------------------


@pytest.mark.parametrize("outside", ["relative", "absolute"])
def test_no_file_name_in_model_json_reaches_outside_the_folder(copy, tmp_path, outside):
    """For every file name any section of model.json holds: load (torch and onnxruntime) and
    export refuse it as a damaged model naming the entry, and never touch the file it names."""
    model_dir, settings = copy
    target = model_dir.parent / "outside.txt" if outside == "relative" else tmp_path / "elsewhere" / "outside.txt"
    target.parent.mkdir(exist_ok=True)
    target.write_bytes(SECRET)
    name = "../outside.txt" if outside == "relative" else str(target)
    original = (model_dir / "model.json").read_text()
    keys = [key for key, _ in named_files(json.loads(original))]
    assert {"classifier.booster_file", "files.classifier.json", "files.mean.npy", "export.onnx_file", "export.files.model.onnx"} <= set(keys)
    (category,) = find_categories(tmp_path / "data" / "part")
    global _touched
    for key in keys:
        (model_dir / "model.json").write_text(original)
        named = _point_outside(model_dir, key, name)
        attempts = [lambda: Detector(model_dir, "cpu"), lambda: Detector(model_dir, "cpu", "onnxruntime"),
                    lambda: export_model(model_dir, check_paths(category, 2))]
        for attempt in attempts:
            _touched = []
            try:
                with pytest.raises(ModelError, match="damaged or incompatible") as raised:
                    attempt()
            finally:
                touched, _touched = _touched, None
            assert f"{named} names {name!r}" in str(raised.value) and "retrain" in str(raised.value), str(raised.value)
            assert os.path.realpath(target) not in touched, key
        assert target.read_bytes() == SECRET
    assert hidden(model_dir) == [] and hidden(model_dir.parent) == []


def test_scripts_leave_a_file_named_outside_untouched_through_test_export_and_retrain(copy, tmp_path):
    model_dir, settings = copy
    relative, absolute = model_dir.parent / "outside.txt", tmp_path / "elsewhere.onnx"
    for path in (relative, absolute):
        path.write_bytes(SECRET)
    _point_outside(model_dir, "classifier.booster_file", "../outside.txt")
    _point_outside(model_dir, "export.files.model.onnx", str(absolute))
    for script in ("test.py", "export.py"):  # export.py once unlinked every name the old export listed
        line = error_line(run_script(script, *settings))
        assert f"model {model_dir / 'model.json'} is damaged or incompatible" in line and "retrain" in line
    retrained = run_script("train.py", *settings, "CLASSIFIER=False")
    assert retrained.returncode == 0, retrained.stderr
    assert relative.read_bytes() == SECRET and absolute.read_bytes() == SECRET
    assert sorted(p.name for p in model_dir.parent.iterdir()) == ["outside.txt", "part", "part.backup-1"]  # the replaced model kept, as it was


def test_a_link_leading_out_of_the_model_folder_is_refused(copy, tmp_path):
    model_dir, _ = copy
    outside = tmp_path / "classifier-copy.json"
    shutil.copy(model_dir / "classifier.json", outside)  # the same bytes: the checksum alone would pass
    (model_dir / "classifier.json").unlink()
    (model_dir / "classifier.json").symlink_to(outside)
    with pytest.raises(ModelError, match="classifier.booster_file names 'classifier.json', a symbolic link leading out"):
        Detector(model_dir, "cpu")
    (model_dir / "classifier.json").unlink()
    (model_dir / "classifier.json").symlink_to("../part/" + outside.name)  # a link that stays inside would do
    shutil.move(outside, model_dir / outside.name)
    Detector(model_dir, "cpu")


# --- 2. concurrent runs on one model ------------------------------------------------------------


def test_an_export_while_another_holds_the_model_says_busy(copy):
    model_dir, settings = copy
    before = (model_dir / "model.json").read_bytes()
    with model_lock(model_dir, "a test holding it", wait=False):
        line = error_line(run_script("export.py", *settings))
    assert f"model {model_dir} is busy: pid {os.getpid()} (a test holding it)" in line
    assert (model_dir / "model.json").read_bytes() == before and hidden(model_dir) == [] and hidden(model_dir.parent) == []


def test_two_exports_at_once_both_finish_or_one_says_busy(copy):
    model_dir, settings = copy
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    runs = [subprocess.Popen([sys.executable, str(ROOT / "export.py"), *settings], cwd=ROOT, env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    results = [(run.wait(timeout=240), *run.communicate()) for run in runs]
    for code, out, err in results:
        assert "Traceback" not in err, err
        assert code == 0 or (code == 2 and "is busy" in err), err
    assert any(code == 0 for code, _, _ in results)
    Detector(model_dir, "cpu", "onnxruntime")  # the recorded export is whole
    assert hidden(model_dir) == [] and hidden(model_dir.parent) == []


def test_a_retrain_waits_for_an_export_holding_the_model(copy):
    model_dir, settings = copy
    before = (model_dir / "model.json").read_bytes()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with model_lock(model_dir, "export.py is exporting it", wait=False):
        run = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *settings, "CLASSIFIER=False"], cwd=ROOT, env=env,
                               text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        waiting = ""
        while "waiting for" not in waiting:  # bounded: train.py ends (and stderr closes) within the timeout
            line = run.stderr.readline()
            assert line, run.communicate()
            waiting = line
        assert f"waiting for pid {os.getpid()} (export.py is exporting it) to finish with model {model_dir}" in waiting
        time.sleep(0.5)
        assert (model_dir / "model.json").read_bytes() == before  # not swapped while the export holds it
    out, err = run.communicate(timeout=240)
    assert run.returncode == 0, err
    assert (model_dir / "model.json").read_bytes() != before and hidden(model_dir.parent) == []


# A save of the model with a changed threshold (what a retrain's swap does), in another process.
_SAVER = """
import sys
from pathlib import Path
from anomaly_model.store import load_model, save_model
folder = Path(sys.argv[1])
model, description = load_model(folder, "cpu")
info = {k: v for k, v in description.items() if k not in ("format_version", "anomaly_model", "versions", "files", "export")}
info["thresholds"]["image"] += 1.0
info.pop("classifier", None)
print("saving", flush=True)
save_model(folder, model, info)
"""


def test_a_load_during_a_swap_sees_the_old_or_the_new_model_whole(copy):
    model_dir, _ = copy
    old = json.loads((model_dir / "model.json").read_text())["thresholds"]["image"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with reading(model_dir):  # a load in progress
        saver = subprocess.Popen([sys.executable, "-c", _SAVER, str(model_dir)], cwd=ROOT, env=env, text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert saver.stdout.readline() == "saving\n"
        time.sleep(1.0)
        model, description = load_model(model_dir, "cpu")  # every file of the old model, with its checksums
        assert description["thresholds"]["image"] == old
    assert saver.wait(timeout=120) == 0, saver.communicate()[1]
    assert load_model(model_dir, "cpu")[1]["thresholds"]["image"] == old + 1.0
    assert hidden(model_dir.parent) == []


def test_a_killed_export_s_folder_is_swept_by_the_next_load_but_not_a_live_one(copy, tmp_path):
    model_dir, settings = copy
    staging = model_dir / ".export-partial-999999-deadbeef"
    staging.mkdir()
    (staging / "model.onnx").write_bytes(b"half an export")
    with model_lock(model_dir, "export.py is exporting it", wait=False):  # alive: its folder is its own
        Detector(model_dir, "cpu")
        assert staging.is_dir()
    Detector(model_dir, "cpu")  # test.py's load, once the export is gone
    assert not staging.exists() and hidden(model_dir) == [] and hidden(model_dir.parent) == []
    staging.mkdir()  # and train.py, before it trains (a run that then fails still cleans up)
    save(texture(np.random.default_rng(0)), tmp_path / "few" / "part" / "train" / "good" / "000.png")
    result = run_script("train.py", f"DATASET_DIR={tmp_path / 'few' / 'part'}", *settings[1:])
    assert "at least" in error_line(result) and not staging.exists()
    assert (model_dir / "model.json").is_file()  # the model itself is left as it was


# --- 3. training data is never what the tool wrote ----------------------------------------------


def test_results_inside_the_training_or_tested_folder_are_not_read_as_images(copy, tmp_path, exported):
    model_dir, settings = copy
    good = tmp_path / "data" / "part" / "train" / "good"
    inside = [s for s in settings if not s.startswith("RESULTS_DIR=")] + [f"RESULTS_DIR={good / 'results'}", "CLASSIFIER=False"]
    assert run_script("test.py", str(tmp_path / "data" / "part" / "test"), *inside).returncode == 0
    assert list((good / "results").rglob("*.png"))  # heat maps and masks now lie among the training images
    (good / "results" / ".part.partial-1-abc").mkdir()
    save(texture(np.random.default_rng(5)), good / "results" / ".part.partial-1-abc" / "leftover.png")
    result = run_script("train.py", *inside)
    assert result.returncode == 0, result.stderr
    assert f"note: RESULTS_DIR lies inside DATASET_DIR {tmp_path / 'data' / 'part'}" in result.stderr
    assert "trained on 8 images" in result.stdout
    assert (model_dir / "mean.npy").read_bytes() == (exported / "models" / "part" / "mean.npy").read_bytes()
    scored = run_script("test.py", str(good), *inside)  # and test.py on that folder scores the 8 images only
    assert scored.returncode == 0, scored.stderr
    assert f"note: RESULTS_DIR lies inside the folder {good}" in scored.stderr
    (table,) = (good / "results" / "part").glob("test-good-*/predictions.csv")
    assert len(table.read_text().splitlines()) == 1 + 8


# --- 4. links behave ----------------------------------------------------------------------------


def test_a_linked_model_folder_is_replaced_where_it_leads_and_leaves_nothing(copy, tmp_path):
    model_dir, _ = copy
    real = tmp_path / "disk" / "part"
    real.parent.mkdir()
    shutil.move(model_dir, real)
    model_dir.symlink_to(real)
    (model_dir.parent / ".part.previous-1234-abcdef01").symlink_to(real)  # what an older version left beside a link
    (real.parent / ".notes.lock").write_bytes(SECRET)  # the user's own, beside the real folder: never swept
    model, description = load_model(model_dir, "cpu")
    info = {k: v for k, v in description.items() if k not in ("format_version", "anomaly_model", "versions", "files", "export", "classifier")}
    info["thresholds"]["image"] += 1.0
    save_model(model_dir, model, info)
    assert model_dir.is_symlink() and os.path.realpath(model_dir) == str(real)
    assert load_model(model_dir, "cpu")[1]["thresholds"]["image"] == info["thresholds"]["image"]
    assert hidden(model_dir.parent) == [] and hidden(real.parent) == [".notes.lock"] and real.is_dir()
    assert (real.parent / ".notes.lock").read_bytes() == SECRET


# --- 5. paths are paths -------------------------------------------------------------------------


def test_a_folder_named_like_a_setting_is_scored(copy, tmp_path):
    model_dir, settings = copy
    folder = tmp_path / "a=b"
    shutil.copytree(tmp_path / "data" / "part" / "test", folder)
    result = run_script("test.py", "a=b", *settings, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "part: 2 images scored" in result.stdout


def test_setting_or_path_is_said_when_both_could_be_meant(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "SEED=3").mkdir()
    settings, extra = load(["SEED=3"])
    assert settings.SEED == 3 and extra == []
    assert "note: SEED=3 is read as the setting SEED; to mean the file of that name, write ./SEED=3" in capsys.readouterr().err
    assert load(["./SEED=3"])[1] == ["./SEED=3"] and load(["--", "SEED=3"])[1] == ["SEED=3"]
    with pytest.raises(SettingsError, match="unknown setting BATCH_SIZ .did you mean BATCH_SIZE.*no file or folder 'BATCH_SIZ=4'"):
        load(["BATCH_SIZ=4"])


# --- 6. nothing unpickled between torchrun ranks ------------------------------------------------


def test_values_between_ranks_are_json_and_npy_never_pickle():
    from pipeline.training import TrainingSummary

    value = [(2, (np.arange(6, dtype=np.float32).reshape(2, 3), 0.5)), (0, (Path("/a/b.png"), "unreadable")),
             {"k": (1, None)}, np.float64(2.5), torch.arange(3),
             TrainingSummary("part", Path("m"), 8, 4, 0, 1.0, 5, 2.0, 3.0, [(Path("x.png"), "bad")], (64, 32), 0)]
    back = distributed.decode(distributed.encode(value))
    assert repr(back[1:4]) == repr(value[1:4]) and back[5] == value[5] and torch.equal(back[4], value[4])
    assert np.array_equal(back[0][1][0], value[0][1][0]) and back[0][1][1] == 0.5
    assert "import pickle" not in inspect.getsource(distributed)

    def crafted(tree: dict, arrays: list[bytes] = ()) -> bytes:  # bytes as another machine could send them
        header = json.dumps({"value": tree, "arrays": [len(data) for data in arrays]}).encode()
        return len(header).to_bytes(8, "little") + header + b"".join(arrays)

    for name in ("subprocess:Popen", "os:system", "pipeline.not_imported_module:Anything"):
        with pytest.raises(ValueError, match="not a dataclass of this project"):
            distributed.decode(crafted({"t": "dataclass", "v": [name, {"args": "true"}]}))
    pickled = io.BytesIO()
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="allow_pickle"):
        distributed.decode(crafted({"t": "array", "v": 0}, [pickled.getvalue()]))
    with pytest.raises(TypeError, match="cannot be sent between ranks"):
        distributed.encode(object())


# --- 7. the advice that fits the model in use ---------------------------------------------------


def _model(tmp_path, *settings: str):
    values, _ = load(["BACKBONE=resnet18", "WEIGHTS=none", "IMAGE_SIZE=(64, 64)", "DEVICE=cpu", *settings])
    return build_model(values)


def test_running_out_of_memory_names_the_levers_of_the_model_in_use(tmp_path, monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 123456789 bytes")

    lines = {}
    for kind in ("padim", "patchcore"):
        model = _model(tmp_path, f"ANOMALY_MODEL={kind}")
        model.fit_images([torch.rand(2, 3, 64, 64)])
        monkeypatch.setattr(model.extractor, "forward", out_of_memory)
        with pytest.raises(RuntimeError) as raised:
            model.score(torch.rand(1, 3, 64, 64))
        lines[kind] = memory_message(raised.value)
    assert "CORESET_RATIO" in lines["patchcore"] and "IMAGE_SIZE" in lines["patchcore"] and "BATCH_SIZE" in lines["patchcore"]
    assert "memory bank" in lines["patchcore"] and "CROP" not in lines["patchcore"] and " FEATURE_DIM" not in lines["patchcore"]
    assert "FEATURE_DIM" in lines["padim"] and "CORESET_RATIO" not in lines["padim"]

    import anomaly_model.patchcore as patchcore

    monkeypatch.setattr(patchcore, "available_memory", lambda: 1000)
    model = _model(tmp_path, "ANOMALY_MODEL=patchcore")
    model.plan_fit(100)
    with pytest.raises(ModelError, match="lower IMAGE_SIZE") as raised:
        model.fit_images([torch.rand(2, 3, 64, 64)])
    assert "CROP" not in str(raised.value)


def test_a_changed_coreset_size_names_the_model_file(tmp_path):
    model = _model(tmp_path, "ANOMALY_MODEL=patchcore", "CORESET_RATIO=0.5")
    model.fit_images([torch.rand(2, 3, 64, 64)])
    save_model(tmp_path / "part", model, {})
    path = tmp_path / "part" / "model.json"
    description = json.loads(path.read_text())
    description["anomaly_model"]["state"]["coreset_size"] += 1
    path.write_text(json.dumps(description))
    with pytest.raises(ModelError, match=f"model {path} is damaged or incompatible .anomaly_model: state.coreset_size .* retrain"):
        load_model(tmp_path / "part", "cpu")


def test_a_training_run_that_fails_before_saving_leaves_no_model_dir(tmp_path):
    save(texture(np.random.default_rng(0)), tmp_path / "data" / "part" / "train" / "good" / "000.png")
    result = run_script("train.py", f"DATASET_DIR={tmp_path / 'data' / 'part'}", *TINY, *outputs(tmp_path), "CLASSIFIER=False")
    assert "at least" in error_line(result)
    assert not (tmp_path / "models").exists()


# Ctrl-C arriving while the save writes cholesky.npy (as in train.py: the same save, under pipeline.cli.run).
_INTERRUPTED = """
import os, signal, sys
from pathlib import Path
from anomaly_model import files
from anomaly_model.store import load_model, save_model
from pipeline.cli import run
signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C as in a terminal: a background job (`.ci/run &`) inherits SIGINT ignored
folder = Path(sys.argv[1])
model, description = load_model(folder, "cpu")
info = {k: v for k, v in description.items() if k not in ("format_version", "anomaly_model", "versions", "files")}
real = files.AtomicFolder.write_npy_chunks
def write(self, name, shape, chunks, dtype="<f4"):
    def interrupted():
        for chunk in chunks:
            if name == "cholesky.npy":
                os.kill(os.getpid(), signal.SIGINT)
            yield chunk
    return real(self, name, shape, interrupted(), dtype)
files.AtomicFolder.write_npy_chunks = write
run(lambda argv: save_model(folder, model, info))
"""


def test_ctrl_c_while_writing_cholesky_is_one_line_and_keeps_the_model(copy):
    model_dir, _ = copy
    before = (model_dir / "model.json").read_bytes()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", _INTERRUPTED, str(model_dir)], cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 130 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1] == "interrupted: nothing was overwritten"
    assert (model_dir / "model.json").read_bytes() == before and hidden(model_dir.parent) == []


def test_auto_image_size_of_a_thin_strip_is_clamped_to_32_and_says_so(tmp_path, capsys):
    strip = tmp_path / "strip.png"
    save(np.zeros((16, 4000, 3)), strip)
    assert resolve_image_size("auto", [strip], 16) == (32, 3536)
    assert "below the minimum of 32 px: clamped to 32 x 3536" in capsys.readouterr().err
