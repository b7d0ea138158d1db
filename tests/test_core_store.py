"""Saved models: identical maps after a round trip, clear errors for damaged or foreign models."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from anomaly_model.errors import ModelError
from anomaly_model.padim import Padim, PadimSettings
from anomaly_model.store import load_model, save_model
from pipeline.detector import settings_differences
from settings import defaults

INFO = {"preprocessing": {"image_size": [64, 64], "resize": [64, 64], "image_size_setting": [64, 64], "center_crop": 1.0, "mean": [0.5] * 3, "std": [0.2] * 3}}


@pytest.fixture(scope="module")
def fitted() -> Padim:
    images = torch.randn(10, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    return Padim(PadimSettings(backbone="resnet18", weights="none", feature_dim=16), device="cpu").fit([images[:6], images[6:]])


@pytest.fixture()
def saved(tmp_path, fitted):
    folder = tmp_path / "model"
    save_model(folder, fitted, INFO)
    return folder


def test_round_trip_gives_identical_maps(saved, fitted):
    loaded, description = load_model(saved, "cpu")
    probe = torch.randn(2, 3, 64, 64)
    assert torch.equal(loaded.anomaly_maps(probe), fitted.anomaly_maps(probe))
    assert description["preprocessing"] == INFO["preprocessing"]
    assert torch.equal(loaded.channel_indices_, fitted.channel_indices_)


def test_inspection_never_reads_the_sums_and_a_loaded_model_saved_again_keeps_them(saved, tmp_path):
    loaded, description = load_model(saved, "cpu")
    assert loaded.sums_ is None and loaded.has_sums  # read only when an update (or a save) needs them
    loaded.anomaly_maps(torch.randn(1, 3, 64, 64))
    assert loaded.sums_ is None
    save_model(tmp_path / "again", loaded, INFO)
    again = json.loads((tmp_path / "again" / "model.json").read_text())["files"]
    for name in ("sums_outer.npy", "sums_shift.npy", "sums_total.npy", "cholesky.npy"):
        assert again[name] == description["files"][name]


def test_a_bfloat16_model_is_scored_in_bfloat16_after_loading(tmp_path):
    images = torch.randn(10, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    fitted = Padim(PadimSettings(backbone="resnet18", weights="none", feature_dim=16, precision="bfloat16"), device="cpu").fit([images])
    save_model(tmp_path / "model", fitted, INFO)
    loaded, description = load_model(tmp_path / "model", "cpu")
    assert description["anomaly_model"]["settings"]["precision"] == loaded.precision == "bfloat16"
    probe = torch.randn(2, 3, 64, 64)
    assert torch.equal(loaded.anomaly_maps(probe), fitted.anomaly_maps(probe))


def test_stored_factors_are_packed_triangles(saved, fitted):
    d = fitted.feature_dim
    positions = fitted.mean_.shape[0]
    size = (saved / "cholesky.npy").stat().st_size
    assert size < 0.55 * positions * (d * d + d) * 4


def test_missing_model_says_to_train(tmp_path):
    with pytest.raises(ModelError, match="run python train.py"):
        load_model(tmp_path / "nothing", "cpu")
    for name in ("tire", "ksdd", "tire.backup-1"):  # MODEL_DIR itself, given where one of its models was meant
        (tmp_path / "models" / name).mkdir(parents=True)
        (tmp_path / "models" / name / "model.json").write_text("{}")
    with pytest.raises(ModelError, match=r"models holds models, it is not one: give one of .*models/ksdd, .*models/tire$"):
        load_model(tmp_path / "models", "cpu")


def test_truncated_statistics_are_reported(saved):
    path = saved / "cholesky.npy"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ModelError, match="cholesky.npy.*(damaged|truncated)"):
        load_model(saved, "cpu")


def test_flipped_byte_is_caught_by_checksum(saved):
    path = saved / "mean.npy"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="checksum"):
        load_model(saved, "cpu")


def test_a_shape_claimed_by_model_json_allocates_nothing_before_its_file_holds_it(saved, monkeypatch):
    """model.json is untrusted (models are copied between machines): a grid far larger than the
    statistics' files, with a mean.npy made to match and checksums to suit, is a damaged model,
    refused before the factors (positions x d x d) are allocated."""
    import hashlib

    import numpy as np

    description = json.loads((saved / "model.json").read_text())
    description["anomaly_model"]["state"]["grid_size"] = [300, 300]
    mean = saved / "mean.npy"
    np.save(mean, np.zeros((300 * 300, 16), np.float32))
    rows = np.zeros((300 * 300, 16), np.float32).tobytes()
    description["files"]["mean.npy"] = {"sha256": hashlib.sha256(rows).hexdigest(), "bytes": mean.stat().st_size}  # the rows' hash
    (saved / "model.json").write_text(json.dumps(description))
    allocated = []
    real_zeros = torch.zeros
    monkeypatch.setattr(torch, "zeros", lambda *shape, **kwargs: allocated.append(shape) or real_zeros(*shape, **kwargs))
    with pytest.raises(ModelError, match="cholesky.npy holds \\(256, 136\\) float32, expected \\(90000, 136\\)"):
        load_model(saved, "cpu")
    with open(saved / "cholesky.npy", "wb") as file:  # a header that agrees, and a few rows
        np.lib.format.write_array_header_1_0(file, {"descr": "<f4", "fortran_order": False, "shape": (90000, 136)})
        file.write(np.zeros((4, 136), np.float32).tobytes())
    with pytest.raises(ModelError, match="cholesky.npy is damaged or truncated .*shorter than \\(90000, 136\\) values"):
        load_model(saved, "cpu")
    assert not [shape for shape in allocated if shape and shape[0] == 90000]


def test_damaged_description(saved):
    (saved / "model.json").write_text("{ not json")
    with pytest.raises(ModelError, match="damaged"):
        load_model(saved, "cpu")
    (saved / "model.json").write_text('{"format_version": 3, "x": ' + "[" * 200_000 + "]" * 200_000 + "}")  # past the parser's depth
    with pytest.raises(ModelError, match="damaged \\(nested too deeply\\)"):
        load_model(saved, "cpu")


def test_model_of_an_older_format_asks_for_retraining(saved):
    description = json.loads((saved / "model.json").read_text())
    description["format_version"] = 0
    (saved / "model.json").write_text(json.dumps(description))
    with pytest.raises(ModelError, match="retrain"):
        load_model(saved, "cpu")


def test_changed_backbone_weights_are_refused(saved):
    description = json.loads((saved / "model.json").read_text())
    description["anomaly_model"]["settings"]["seed"] = 1  # random-init weights are seeded: another seed, other weights
    (saved / "model.json").write_text(json.dumps(description))
    with pytest.raises(ModelError, match="backbone weights"):
        load_model(saved, "cpu")


def test_failed_save_keeps_previous_model(saved, fitted):
    before = (saved / "mean.npy").read_bytes()
    with pytest.raises(TypeError):
        save_model(saved, fitted, {"not serializable": object()})
    assert (saved / "mean.npy").read_bytes() == before
    assert [p.name for p in saved.parent.iterdir()] == ["model"]


def test_differences_from_config_are_listed(saved):
    _, description = load_model(saved, "cpu")
    settings = SimpleNamespace(**defaults())
    notes = settings_differences(description, settings)
    assert any(note.startswith("BACKBONE: model has 'resnet18'") for note in notes)
    assert any(note.startswith("IMAGE_SIZE: model has [64, 64]") for note in notes)
