"""export.py and RUNTIME=onnxruntime: the exported file gives torch's maps for every backbone,
test.py's verdicts, a runtime without torch (the example in docs/deployment.md), and clear errors.

Fast: tiny images, random weights (WEIGHTS=none), each export done once."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import anomaly_model.coreset as coreset_module
import anomaly_model.onnx_file as onnx_file
import anomaly_model.padim as padim
from anomaly_model.errors import ModelError
from anomaly_model.onnx_file import ONNX_FILE, open_session, require, run_session, write_onnx
from anomaly_model.padim import Padim, PadimSettings
from anomaly_model.patchcore import PatchCore, PatchCoreSettings
from conftest import ROOT, TINY, make_mvtec_category, outputs, run_script
from dataset_manager import find_categories
from pipeline.detector import Detector
from pipeline.exporting import MAX_RELATIVE_DIFFERENCE, check_paths, export_model, relative_differences

CLASSIFIER_FAST = ["CLASSIFIER_SYNTHETIC_DEFECTS=12", "CLASSIFIER_MAX_ROUNDS=60", "CLASSIFIER_FOLDS=3"]
# Imports of torch fail in the docs example's process, as on a machine without PyTorch.
NO_TORCH = """
import importlib.abc, runpy, sys
class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "torchvision"):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked: no PyTorch here)")
sys.meta_path.insert(0, NoTorch())
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
assert not [m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision")]
"""


def _error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    return line


def _fitted(backbone: str, size: int = 32) -> Padim:
    torch.manual_seed(0)
    model = Padim(PadimSettings(backbone=backbone, weights="none"), device="cpu")
    images = torch.randn(10, 3, size, size)
    return model.fit([images[:5], images[5:]])


@pytest.mark.parametrize("backbone", ["resnet18", "wide_resnet50_2", "mobilenet_v2"])
def test_onnxruntime_maps_equal_torch_maps(tmp_path, monkeypatch, backbone):
    model = _fitted(backbone)
    if backbone == "resnet18":  # statistics split into several constants, as Wide-ResNet's are at 224 px
        monkeypatch.setattr(padim, "EXPORT_CHUNK_ELEMENTS", model.feature_dim**2 * 10)
    module = model.export_module((32, 32))
    assert module.patch_scores.chunks == (7 if backbone == "resnet18" else 1)  # 64 positions
    assert write_onnx(module, (32, 32), tmp_path, {"model_id": "test"}) == [ONNX_FILE]
    session = open_session(tmp_path / ONNX_FILE, "cpu")
    images = 1.5 * torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    images[0, :, 8:16, 8:16] = 3.0  # a "defect": maps with a clear peak
    for batch in (images, images[:1]):  # the batch size is free
        maps, scores = run_session(session, batch.numpy())
        reference_maps, reference_scores = model.score(batch)
        assert maps.shape == tuple(reference_maps.shape) and scores.shape == (len(batch),)
        differences = relative_differences(maps, scores, reference_maps.double().numpy(), reference_scores.double().numpy())
        assert max(differences) <= MAX_RELATIVE_DIFFERENCE, differences


@pytest.mark.parametrize("dense_share", [coreset_module.DENSE_SHARE, 0.0, 1.0])
def test_onnxruntime_patchcore_maps_and_reweighted_scores_equal_torch(tmp_path, monkeypatch, dense_share):
    """PatchCore's graph: pooled features, the grouped nearest-row search with its data-dependent
    group skipping (traced on zeros, run on other images and batch sizes: no branch frozen at the
    trace) and its dense pass for the queries the groups prune poorly (DENSE_SHARE 0: every query,
    1: none), eq. 7 weights (PATCHCORE_NEIGHBORS=3) and averaged-down channels (PATCHCORE_FEATURE_DIM)."""
    monkeypatch.setattr(coreset_module, "DENSE_SHARE", dense_share)
    monkeypatch.setattr(coreset_module, "DENSE_ROWS", 64)  # several bank chunks in the graph too
    torch.manual_seed(0)
    model = PatchCore(PatchCoreSettings(backbone="resnet18", weights="none", neighbors=3, feature_dim=200, coreset_ratio=0.25), device="cpu")
    images = torch.randn(10, 3, 32, 32)
    model.fit([images[:5], images[5:]])
    images = 1.5 * torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    images[0, :, 8:16, 8:16] = 3.0
    references = [model.score(batch) for batch in (images, images[:1])]
    module = model.export_module((32, 32), release=True)
    assert len(module.patch_scores.search.offsets) > 3 and model.memory_ is None  # several groups; released: no second coreset
    write_onnx(module, (32, 32), tmp_path, {"model_id": "test"})
    session = open_session(tmp_path / ONNX_FILE, "cpu")
    for batch, (reference_maps, reference_scores) in zip((images, images[:1]), references):
        maps, scores = run_session(session, batch.numpy())
        differences = relative_differences(maps, scores, reference_maps.double().numpy(), reference_scores.double().numpy())
        assert max(differences) <= MAX_RELATIVE_DIFFERENCE, differences
        assert (scores < 0.9 * maps.reshape(len(batch), -1).max(axis=1)).all()  # eq. 7 weights (< 1) in the graph, not the plain max


def test_the_export_module_computes_the_model_s_maps_and_release_takes_its_factors():
    model = _fitted("resnet18")
    images = torch.randn(2, 3, 32, 32)
    maps, scores = model.score(images)
    for release in (False, True):  # release: export's last use of a model, no second copy of the factors
        with torch.no_grad():
            exported_maps, exported_scores = model.export_module((32, 32), release=release)(images)
        assert torch.allclose(exported_maps, maps, rtol=1e-5, atol=1e-5 * float(maps.max())) and torch.allclose(exported_scores, scores, rtol=1e-5)
    assert model.cholesky_ is None


def test_a_reduced_precision_model_is_not_exported():
    model = Padim(PadimSettings(backbone="resnet18", weights="none", layers=(1,), precision="bfloat16"), device="cpu")
    model.fit([torch.randn(4, 3, 32, 32)])
    with pytest.raises(ModelError, match="BACKBONE_PRECISION=float32"):
        model.export_module((32, 32))


# --- export.py, test.py RUNTIME=onnxruntime and the docs example on a trained tiny model -------


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, list[str]]:
    """A tiny category, its model (with a classifier) and the model's export, made once."""
    base = tmp_path_factory.mktemp("exported")
    category = make_mvtec_category(base / "data" / "part")
    settings = [f"DATASET_DIR={category}", *TINY, *CLASSIFIER_FAST, *outputs(base)]
    trained = run_script("train.py", *settings)
    assert trained.returncode == 0, trained.stderr[-3000:]
    result = run_script("export.py", *settings)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "model.onnx" in result.stdout
    return base, settings


@pytest.fixture()
def model_copy(tmp_path, exported) -> Path:
    """A private copy of the exported model folder, for tests that change it."""
    shutil.copytree(exported[0] / "models" / "part", tmp_path / "part")
    return tmp_path / "part"


def _predictions(results: Path, runtime: str, settings: list[str]) -> tuple[Path, list[dict]]:
    result = run_script("test.py", *settings, f"RESULTS_DIR={results}", f"RUNTIME={runtime}")
    assert result.returncode == 0, result.stderr[-3000:]
    (path,) = (results / "part").glob("test-*/predictions.csv")
    return path.parent, list(csv.DictReader(path.open()))


@pytest.fixture(scope="module")
def onnx_predictions(exported) -> tuple[Path, list[dict]]:
    """test.py RUNTIME=onnxruntime on the tiny category's test folder: (run folder, CSV rows)."""
    base, settings = exported
    return _predictions(base / "results-onnx", "onnxruntime", settings)


def test_test_py_with_onnxruntime_gives_torch_verdicts(tmp_path, exported, onnx_predictions):
    base, settings = exported
    description = json.loads((base / "models" / "part" / "model.json").read_text())
    check = description["export"]["check"]
    assert check["max_relative_map_difference"] <= MAX_RELATIVE_DIFFERENCE and len(check["images"]) == 4
    _, torch_rows = _predictions(tmp_path / "torch", "torch", settings)
    run_dir, onnx_rows = onnx_predictions
    assert len(onnx_rows) == len(torch_rows) == 8
    for ours, theirs in zip(onnx_rows, torch_rows):
        assert ours["path"] == theirs["path"] and ours["verdict"] == theirs["verdict"]
        assert float(ours["image_score"]) == pytest.approx(float(theirs["image_score"]), rel=1e-4)
        assert float(ours["classifier_probability"]) == pytest.approx(float(theirs["classifier_probability"]), abs=1e-4)
        assert float(ours["defect_area_fraction"]) == pytest.approx(float(theirs["defect_area_fraction"]), abs=2e-3)
        assert (run_dir / ours["overlay"]).is_file() and (run_dir / ours["mask"]).is_file()
    decisions = {float(row["normalized_score"]) >= 1 for row in onnx_rows}
    assert decisions == {True, False}  # the blobs score above the image threshold, the goods below


def _docs_example() -> str:
    """The Python block of docs/deployment.md's "Deploying without PyTorch" section."""
    text = (ROOT / "docs" / "deployment.md").read_text()
    section = text[text.index("## Deploying without PyTorch") :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_docs_example_scores_without_torch(tmp_path, exported, onnx_predictions):
    example = tmp_path / "score_onnx.py"
    example.write_text(_docs_example())
    base, (_, rows) = exported[0], onnx_predictions
    for row in rows[:1] + rows[-1:]:  # a defect and a good image
        result = subprocess.run(
            [sys.executable, "-c", NO_TORCH, str(example), str(base / "models" / "part"), row["path"]],
            cwd=ROOT, capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        assert result.returncode == 0, result.stderr[-3000:]
        printed = json.loads(result.stdout)
        assert printed["image_score"] == pytest.approx(float(row["image_score"]), rel=1e-5)
        assert printed["classifier_probability"] == pytest.approx(float(row["classifier_probability"]), abs=1e-6)
        assert printed["defect"] == (row["verdict"] == "defect")
        assert printed["defect_area_fraction"] == pytest.approx(float(row["defect_area_fraction"]), abs=1e-6)


def test_large_models_keep_their_tensors_in_external_data(model_copy, monkeypatch):
    monkeypatch.setattr(onnx_file, "EXTERNAL_DATA_BYTES", 0)  # as if past protobuf's 2 GB
    (category,) = find_categories(Path(json.loads((model_copy / "model.json").read_text())["dataset"]["dataset_dir"]))
    summary = export_model(model_copy, check_paths(category, 2))
    assert sorted(summary.files) == ["model.onnx", "model.onnx.data"] and summary.max_map_difference <= MAX_RELATIVE_DIFFERENCE
    assert summary.files["model.onnx.data"] > 10 * summary.files["model.onnx"]
    detector = Detector(model_copy, "cpu", "onnxruntime")
    images = torch.randn(2, 3, 64, 64)
    maps, _ = detector.score(images)
    reference, _ = Detector(model_copy, "cpu").score(images)
    assert torch.allclose(maps, reference, rtol=1e-4, atol=1e-4 * float(reference.max() - reference.min()))
    assert not [path for path in model_copy.iterdir() if path.name.startswith(".")]  # no staging folder left


def test_an_export_that_disagrees_with_torch_writes_nothing(model_copy, monkeypatch):
    class Wrong(nn.Module):
        def forward(self, images):
            maps = images.mean(dim=1)
            return maps, maps.flatten(1).max(dim=1).values

    monkeypatch.setattr(Padim, "export_module", lambda self, size, release=False: Wrong())
    before = {path.name: path.read_bytes() for path in model_copy.iterdir()}
    (category,) = find_categories(Path(json.loads((model_copy / "model.json").read_text())["dataset"]["dataset_dir"]))
    with pytest.raises(ModelError, match="disagrees with the torch model.*nothing was written"):
        export_model(model_copy, check_paths(category, 2))
    assert {path.name: path.read_bytes() for path in model_copy.iterdir()} == before


def test_a_full_disk_during_the_export_names_the_model_folder_and_writes_nothing(model_copy, monkeypatch):
    """The ONNX writer's OSError names no file: the line said "the disk holding the output folder is full"."""
    import errno

    from anomaly_model.files import StorageError
    from pipeline import exporting

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(exporting, "write_onnx", full)
    before = {path.name: path.read_bytes() for path in model_copy.iterdir()}
    (category,) = find_categories(Path(json.loads((model_copy / "model.json").read_text())["dataset"]["dataset_dir"]))
    with pytest.raises(StorageError, match=f"the disk holding {model_copy} is full.*nothing was written"):
        export_model(model_copy, check_paths(category, 2))
    assert {path.name: path.read_bytes() for path in model_copy.iterdir()} == before


# --- errors ----------------------------------------------------------------------------------


def test_onnxruntime_without_an_export_says_run_export(tmp_path, exported, model_copy):
    description = json.loads((model_copy / "model.json").read_text())
    del description["export"]  # as train.py writes it
    (model_copy / "model.json").write_text(json.dumps(description))
    (model_copy / ONNX_FILE).unlink()
    settings = [*exported[1], f"MODEL_DIR={model_copy.parent}"]
    line = _error_line(run_script("test.py", *settings, "RUNTIME=onnxruntime"))
    assert "has not been exported" in line and "python export.py" in line


def test_a_retrain_of_an_exported_model_says_the_export_does_not_carry_over(model_copy, capsys):
    from pipeline.training import warn_of_updates

    warn_of_updates(model_copy)
    assert f"note: the ONNX export of model {model_copy} belongs to the model this training replaces" in capsys.readouterr().err


def test_an_onnx_file_of_another_model_version_is_refused(model_copy):
    description = json.loads((model_copy / "model.json").read_text())
    # a retrained model (model.json without an export) next to an old model.onnx
    trained_only = {key: value for key, value in description.items() if key != "export"}
    (model_copy / "model.json").write_text(json.dumps(trained_only))
    with pytest.raises(ModelError, match="not recorded in .*model.json.*python export.py"):
        Detector(model_copy, "cpu", "onnxruntime")
    # model.json kept its export record, but the model changed since (e.g. its thresholds)
    description["thresholds"]["image"] += 1.0
    (model_copy / "model.json").write_text(json.dumps(description))
    with pytest.raises(ModelError, match="exported from another version.*python export.py"):
        Detector(model_copy, "cpu", "onnxruntime")
    # a model.onnx that is not the file export.py recorded
    description["thresholds"]["image"] -= 1.0
    (model_copy / "model.json").write_text(json.dumps(description))
    Detector(model_copy, "cpu", "onnxruntime")
    with open(model_copy / ONNX_FILE, "ab") as file:
        file.write(b"\0")
    with pytest.raises(ModelError, match="not the file export.py wrote.*python export.py"):
        Detector(model_copy, "cpu", "onnxruntime")


def test_missing_onnx_packages_are_named(model_copy, monkeypatch):
    for name, package in (("onnxruntime", "onnxruntime==1.32.*"), ("onnx", "onnx==1.23.*"), ("onnxscript", "onnxscript==0.7.*")):
        with monkeypatch.context() as patch:
            patch.setitem(sys.modules, name, None)  # import fails, as when not installed
            with pytest.raises(ModelError, match=re.escape(f"pip install '{package}'")):
                require(name)
            with pytest.raises(ModelError, match=re.escape(f"pip install '{package}'")):
                export_model(model_copy, [])
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ModelError, match=re.escape("pip install 'onnxruntime==1.32.*'")):
        Detector(model_copy, "cpu", "onnxruntime")


def test_export_without_a_trained_model_says_train_first(tmp_path, exported):
    line = _error_line(run_script("export.py", *exported[1], f"MODEL_DIR={tmp_path / 'nothing'}"))
    assert "no trained model" in line and "python train.py" in line


def test_unknown_runtime_is_refused(model_copy):
    with pytest.raises(ValueError, match="RUNTIME='tensorrt' is not supported"):
        Detector(model_copy, "cpu", "tensorrt")


def test_runtime_onnxruntime_does_not_send_unexportable_models_to_export_py():
    """RUNTIME=onnxruntime on a model export.py would refuse says why and to use RUNTIME=torch."""
    from anomaly_model.onnx_file import not_exportable

    def described(**settings):
        return {"anomaly_model": {"settings": {"tile_size": 0, "precision": "float32", "score_kind": "mahalanobis", **settings}}}

    assert not_exportable(described()) == "" and not_exportable(described(score_kind="hybrid", chebyshev_weight=1)) == ""
    assert "TILE_SIZE" in not_exportable(described(tile_size=64))
    assert "BACKBONE_PRECISION=bfloat16" in not_exportable(described(precision="bfloat16"))
    assert "PADIM_SCORE='chebyshev'" in not_exportable(described(score_kind="chebyshev"))
