"""Saving and loading a trained model folder, whatever the anomaly model: one format for all.

MODEL_DIR/<name>/
  model.json         "anomaly_model": its type, settings and small fitted state; thresholds,
                     validation statistics, library versions, every file's checksum
  *.npy              the model's arrays (Padim: mean.npy, cholesky.npy; see each model's class)
  ...                files other components add (the classifier's booster JSON)

Everything is written through `files.AtomicFolder`: into a temporary folder beside the target,
renamed into place when complete, so a crash never leaves a half-written model.
"""

from __future__ import annotations

import hashlib
import json
import platform
from pathlib import Path

import numpy as np
import torch

from anomaly_model.backbone import ModelError
from anomaly_model.base import AnomalyModel
from anomaly_model.files import AtomicFolder, write_file_atomically
from anomaly_model.padim import Padim

FORMAT_VERSION = 3  # 3: "anomaly_model" section with a type (2: PaDiM only, "padim" section)
# Sections of model.json that other commands add to a trained model (export.py: "export"); the
# trained model's identity (`model_id`) leaves them out.
ADDED_SECTIONS = ("export",)
MODEL_TYPES: dict[str, type[AnomalyModel]] = {Padim.kind: Padim}


def library_versions() -> dict:
    import torchvision

    return {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__, "numpy": np.__version__}


def backbone_fingerprint(model: AnomalyModel) -> str:
    """sha256 of the backbone tensors in use, to notice weights that changed since training."""
    digest = hashlib.sha256()
    for key, value in model.extractor.state_dict().items():
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def model_class(kind: str) -> type[AnomalyModel]:
    """The anomaly model class of a type name (ANOMALY_MODEL, or model.json's saved type)."""
    if kind not in MODEL_TYPES:
        raise ModelError(f"ANOMALY_MODEL={kind!r} is not supported: choose one of {', '.join(MODEL_TYPES)}")
    return MODEL_TYPES[kind]


def build_model(settings) -> AnomalyModel:
    """A new, unfitted model of type settings.ANOMALY_MODEL built from config.py's settings."""
    cls = model_class(settings.ANOMALY_MODEL)
    arguments = {argument: getattr(settings, key) for key, argument in cls.setting_names().items()}
    return cls(**arguments, device=settings.DEVICE)


def save_model(folder: Path, model: AnomalyModel, info: dict, extra_files: dict[str, bytes] | None = None) -> int:
    """Write the fitted model and `info` (thresholds, preprocessing, ...) atomically; returns bytes written."""
    with AtomicFolder(folder) as out:
        model.save_arrays(out)
        for name, data in (extra_files or {}).items():
            out.write_bytes(name, data)
        description = {
            "format_version": FORMAT_VERSION,
            "anomaly_model": {
                "type": model.kind,
                "settings": model.settings(),
                "state": model.fitted_state(),
                "backbone_sha256": backbone_fingerprint(model),
            },
            **info,
            "versions": library_versions(),
            "files": out.checksums,
        }
        out.write_json("model.json", description)
    return sum(entry["bytes"] for entry in out.checksums.values()) + len(json.dumps(description, indent=2))


def read_description(folder: Path) -> dict:
    """model.json of a model folder, with clear errors for a missing, old or damaged model."""
    folder = Path(folder)
    path = folder / "model.json"
    if not path.is_file():
        raise ModelError(f"no trained model at {folder} (model.json missing): run python train.py first")
    try:
        description = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelError(f"{path} is damaged ({error}): retrain with python train.py") from None
    version = description.get("format_version") if isinstance(description, dict) else None
    if version != FORMAT_VERSION:
        raise ModelError(
            f"model {folder} has format {version}, this code reads format {FORMAT_VERSION}: retrain with python train.py"
        )
    return description


def load_model(folder: Path, device: str = "auto") -> tuple[AnomalyModel, dict]:
    """The fitted model (of the type it was saved as) and the model's description."""
    folder = Path(folder)
    description = read_description(folder)
    entry = description["anomaly_model"]
    model = model_class(entry["type"])(**entry["settings"], device=device)
    if backbone_fingerprint(model) != entry["backbone_sha256"]:
        raise ModelError(
            f"the backbone weights {entry['settings']['weights']!r} differ from those model {folder} was trained with: "
            "restore them or retrain"
        )
    model.load_fitted_state(entry["state"])
    model.load_arrays(folder, description["files"])
    return model, description


def model_id(description: dict) -> str:
    """sha256 of model.json as train.py wrote it (sections added later left out): names one trained
    version of a model. The exported ONNX file carries it, so a file from another version is refused."""
    trained = {key: value for key, value in description.items() if key not in ADDED_SECTIONS}
    return hashlib.sha256(json.dumps(trained, sort_keys=True).encode()).hexdigest()


def add_section(folder: Path, key: str, entry: dict) -> dict:
    """Add or replace section `key` (one of ADDED_SECTIONS) of a trained model's model.json, in one
    atomic rewrite of that file; the model's own files and identity are untouched."""
    if key not in ADDED_SECTIONS:
        raise ValueError(f"model.json section {key!r} is not one that may be added to a trained model")
    description = read_description(folder)
    description[key] = entry
    write_file_atomically(Path(folder) / "model.json", json.dumps(description, indent=2).encode())
    return description
