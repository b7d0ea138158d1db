"""Saving and loading a trained model folder, whatever the anomaly model: one format for all.

MODEL_DIR/<name>/
  model.json         "anomaly_model": its type, settings and small fitted state; thresholds,
                     validation statistics, library versions, every file's checksum
  *.npy              the model's arrays (Padim: mean.npy, cholesky.npy; PatchCore: coreset*.npy;
                     see each model's class)
  ...                files other components add (the classifier's booster JSON)

Everything is written through `files.AtomicFolder`: into a temporary folder beside the target,
renamed into place when complete, so a crash never leaves a half-written model (and a model
stranded by a kill mid-swap is put back by the next load or save: `files.sweep`).

Loading checks model.json as data before using any of it: `MODEL_SCHEMA` for the sections
every model has (`DETECTOR_SCHEMA` for what inspecting needs, checked by `pipeline.detector`), the settings table of the model's own class (`setting_names`, checked with the
same rules as config.py), and the model's own `load_fitted_state` (run inside `model_file_guard`)
for its state. Anything missing or wrong is one line: damaged or incompatible, retrain.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import platform
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from anomaly_model.errors import ModelError
from anomaly_model.base import AnomalyModel
from anomaly_model.files import AtomicFolder, damaged_model, name_problem, reading, shown_name, sweep_model, write_file_atomically
from anomaly_model.padim import Padim
from anomaly_model.patchcore import PatchCore
from anomaly_model.schema import Each, Optional, SchemaError, check
from choices import ANOMALY_MODELS
from settings import RULES, Rule, choice, integer, number, sequence, text

FORMAT_VERSION = 3  # 3: "anomaly_model" section with a type (2: PaDiM only, "padim" section)
# Sections of model.json that other commands add to a trained model (export.py: "export"); the
# trained model's identity (`model_id`) leaves them out.
ADDED_SECTIONS = ("export",)
MODEL_TYPES: dict[str, type[AnomalyModel]] = {Padim.kind: Padim, PatchCore.kind: PatchCore}

_SHA256 = Rule(lambda v: isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v), "a sha256 hex digest")
_OBJECT = Rule(lambda v: isinstance(v, dict), "a JSON object")
_ANY = Rule(lambda v: True, "anything")
_SIZE = Rule(
    lambda v: integer(minimum=1).problem(v) is None or sequence(integer(minimum=1), length=2).problem(v) is None,
    "a size in pixels: an integer or [height, width]",
)
# What every model.json holds, whatever its anomaly model: what loading the model needs
# (`load_model` checks it, then the model's own settings with the rules of the config.py
# settings they came from, then its state through the model class) ...
MODEL_SCHEMA = {
    "format_version": integer(FORMAT_VERSION, FORMAT_VERSION),
    "anomaly_model": {"type": choice(ANOMALY_MODELS), "settings": _OBJECT, "state": _OBJECT, "backbone_sha256": _SHA256},
    "files": Each({"sha256": _SHA256, "bytes": integer(minimum=0), "header_bytes": Optional(integer(minimum=0))}),
}
# ... and what inspecting images with it needs (`pipeline.detector.Detector` checks it).
DETECTOR_SCHEMA = {
    "thresholds": {
        "image": number(),
        "pixel": number(),
        "image_false_reject_rate": RULES["IMAGE_FALSE_REJECT_RATE"],
        "pixel_false_reject_rate": RULES["PIXEL_FALSE_REJECT_RATE"],
    },
    "validation": {"n_images": integer(minimum=1), "pixel_quantiles": {q: number() for q in ("0.5", "0.9", "0.99", "0.999")}},
    # image_size: the working size; models saved before IMAGE_SIZE existed have square "resize" and "crop" ints
    # (mean and std as any model was saved with them: the settings' bounds for new ones came later)
    "preprocessing": {"image_size": Optional(_SIZE), "resize": _SIZE, "crop": Optional(_SIZE), "mean": sequence(number(), length=3),
                      "std": sequence(number(above=0), length=3), "gray_full_scale": Optional(number(above=0))},
    "classifier": Optional({
        "booster_file": text(empty=False),
        "features": sequence(text(empty=False)),
        "threshold": number(),
        "levels": Each(number()),
        "anchor_mode": Optional(RULES["CLASSIFIER_ANCHOR"]),
        # the image score's log-odds (classification_model.xgboost.Anchor) and, for "shrink", the trees' share of the verdict
        "anchor": Optional({"center": number(), "scale": number(above=0), "intercept": number(), "slope": number(minimum=0)}),
        "tree_share": Optional(number(minimum=0, maximum=1)),
        # the second stage learned from labeled defects (classification_model.similarity.DefectSimilarity)
        "similarity": Optional({
            "prototype": sequence(number()), "intercept": number(), "verdict_weight": number(minimum=0),
            "similarity_weight": number(above=0), "n_defects": integer(minimum=1),
        }),
    }),
}
# ... and what scoring with the exported ONNX file needs (`onnx_file.OnnxScorer` checks it).
EXPORT_SCHEMA = {
    "export": {"onnx_file": text(empty=False), "files": Each({"sha256": _SHA256, "bytes": integer(minimum=0)})},
}


def library_versions() -> dict:
    """Versions recorded in model.json (torchvision's read from its metadata: importing it is costly, `networks.py`)."""
    try:
        torchvision = importlib.metadata.version("torchvision")
    except importlib.metadata.PackageNotFoundError:
        torchvision = None
    return {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision, "numpy": np.__version__}


def backbone_fingerprint(model: AnomalyModel) -> str:
    """sha256 of the backbone's weights as loaded (before its batch norms are folded), to notice
    weights that changed since training."""
    return model.extractor.fingerprint


def model_class(kind: str) -> type[AnomalyModel]:
    """The anomaly model class of a type name (ANOMALY_MODEL, or model.json's saved type)."""
    if kind not in MODEL_TYPES:
        raise ModelError(f"ANOMALY_MODEL={kind!r} is not supported: choose one of {', '.join(MODEL_TYPES)}")
    return MODEL_TYPES[kind]


def other_models_settings(kind: str, keys: set[str]) -> list[str]:
    """Those of `keys` (settings given on a command line) that only other anomaly model types take:
    ANOMALY_MODEL=patchcore FEATURE_DIM=5 would otherwise ignore FEATURE_DIM without a word."""
    own = set(model_class(kind).setting_names())
    others = {key for other in MODEL_TYPES.values() for key in other.setting_names()} - own
    return sorted(keys & others)


def build_model(settings) -> AnomalyModel:
    """A new, unfitted model of type settings.ANOMALY_MODEL built from config.py's settings."""
    cls = model_class(settings.ANOMALY_MODEL)
    arguments = {argument: getattr(settings, key) for key, argument in cls.setting_names().items()}
    return cls(cls.SETTINGS(**arguments), device=settings.DEVICE)


def save_model(folder: Path, model: AnomalyModel, info: dict, extra_files: dict[str, bytes] | None = None, backups: int | None = None) -> int:
    """Write the fitted model and `info` (thresholds, preprocessing, ...) atomically; returns bytes
    written. `backups` (MODEL_BACKUPS): the model replaced is kept as `<name>.backup-1` and earlier
    backups renumbered after it, the newest `backups` kept (0: none); None leaves existing backups
    as they are and the replaced model is removed."""
    with AtomicFolder(folder, backups=backups) as out:
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


def damaged(folder: Path, detail: str) -> ModelError:
    """The one error for a model.json the code cannot use, naming the file and the entry."""
    return damaged_model(folder, detail)


def named_files(description, where: str = ""):
    """(dotted key, name) of every file name model.json holds, in any section, present or future:
    the keys of every "files" table and the values of every "..._file" entry."""
    if not isinstance(description, dict):
        return
    for key, value in description.items():
        dotted = f"{where}.{key}" if where else str(key)
        if key == "files" and isinstance(value, dict):
            yield from ((f"{dotted}.{name}", name) for name in value)
        elif str(key).endswith("_file"):
            yield dotted, value
        else:
            yield from named_files(value, dotted)


def check_file_names(folder: Path, description: dict) -> None:
    """Every file name in model.json is a plain name inside the model folder (`files.model_file`
    checks each again, links included, where it is read, hashed or deleted)."""
    for key, name in named_files(description):
        problem = name_problem(name)
        if problem is not None:
            raise damaged(folder, f"{key} names {shown_name(name)}, {problem}")


@contextmanager
def model_file_guard(folder: Path, section: str):
    """Turns any missing key or wrong value met while a section of model.json is used (a model's
    constructor and `load_fitted_state`, the classifier) into `damaged`; user errors pass as they are."""
    try:
        yield
    except ModelError:
        raise
    except KeyError as error:
        raise damaged(folder, f"{section}: {error.args[0]!r} is missing") from None
    except (TypeError, ValueError, IndexError, AttributeError) as error:
        raise damaged(folder, f"{section}: {str(error).splitlines()[0] if str(error) else type(error).__name__}") from None


def check_description(folder: Path, description: dict, schema: dict) -> None:
    """model.json's sections in `schema` checked as data; the first bad entry is `damaged`."""
    try:
        check(description, schema)
        if "preprocessing" in schema:
            prep = description["preprocessing"]
            if "image_size" not in prep and "crop" not in prep:
                raise SchemaError("preprocessing.image_size is missing")
            pair = lambda v: (v, v) if isinstance(v, int) else tuple(v)  # noqa: E731
            if any(s > r for s, r in zip(pair(prep.get("image_size", prep.get("crop"))), pair(prep["resize"]))):
                raise SchemaError("preprocessing.image_size is larger than preprocessing.resize")
        classifier = description.get("classifier") if "classifier" in schema else None
        if classifier and classifier.get("anchor_mode") == "shrink" and not {"anchor", "tree_share"} <= classifier.keys():
            raise SchemaError("classifier.anchor_mode is shrink but its anchor or tree_share is missing")
        if "anomaly_model" in schema:  # the model type's own settings, by the rules of the config.py keys they came from
            entry = description["anomaly_model"]
            names = model_class(entry["type"]).setting_names()
            check(entry["settings"], {name: RULES.get(key, _ANY) for key, name in names.items()}, "anomaly_model.settings")
    except SchemaError as error:
        raise damaged(folder, str(error)) from None


def read_description(folder: Path) -> dict:
    """model.json of a model folder, checked; clear errors for a missing, old or damaged model."""
    folder = Path(folder)
    if folder.name == "model.json" and folder.is_file():
        raise ModelError(f"{folder} is a model's description: give the model folder that holds it, {folder.parent}")
    sweep_model(folder)  # a model stranded by a kill mid-swap is put back first; a killed export's folder goes
    path = folder / "model.json"
    if not path.is_file():
        inside = sorted(child.name for child in folder.iterdir()
                        if (child / "model.json").is_file() and ".backup-" not in child.name and not child.name.startswith(".")) if folder.is_dir() else []
        if inside:  # MODEL_DIR itself, given where one of its models was meant
            shown = ", ".join(str(folder / name) for name in inside[:5]) + (", ..." if len(inside) > 5 else "")
            raise ModelError(f"{folder} holds models, it is not one: give one of {shown}")
        raise ModelError(f"no trained model at {folder} (model.json missing): run python train.py first")
    try:
        description = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelError(f"{path} is damaged ({error}): retrain with python train.py") from None
    except RecursionError:  # nested deeper than any model.json: the parser's depth limit
        raise ModelError(f"{path} is damaged (nested too deeply): retrain with python train.py") from None
    version = description.get("format_version") if isinstance(description, dict) else None
    if version != FORMAT_VERSION:
        raise ModelError(
            f"model {folder} has format {version}, this code reads format {FORMAT_VERSION}: retrain with python train.py"
        )
    check_description(folder, description, MODEL_SCHEMA)
    check_file_names(folder, description)
    return description


def load_model(folder: Path, device: str = "auto") -> tuple[AnomalyModel, dict]:
    """The fitted model (of the type it was saved as) and the model's description."""
    folder = Path(folder)
    with reading(folder):  # a retrain swapping the model in waits until every file is read
        return _load_model(folder, device)


def _load_model(folder: Path, device: str) -> tuple[AnomalyModel, dict]:
    description = read_description(folder)
    entry = description["anomaly_model"]
    with model_file_guard(folder, "anomaly_model"):
        cls = model_class(entry["type"])
        model = cls(cls.SETTINGS(**entry["settings"]), device=device)
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
