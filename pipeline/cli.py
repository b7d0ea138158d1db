"""What the scripts share: settings, dataset and model locations, and one-line errors."""

from __future__ import annotations

import os
import signal
import sys
import traceback
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from anomaly_model import distributed
from anomaly_model.errors import ModelError
from anomaly_model.base import AnomalyModel
from anomaly_model.files import STORAGE_ERRNOS, StorageError, storage_message
from anomaly_model.store import read_description
from dataset_manager import Category, DataError, find_categories, outputs_inside
from dataset_manager.demo import generate_demo_dataset
from settings import SettingsError

USER_ERRORS = (SettingsError, DataError, ModelError, StorageError)
DEMO_DATASET_DIR = Path(__file__).resolve().parents[1] / "dataset" / "demo"  # config.py's shipped DATASET_DIR, from the project folder
MAX_MODEL_NAME_BYTES = 200  # a model folder's name: its backups (.backup-N) and a save's temporary names (.<name>.locking-<run>) must fit in 255
# What to lower when memory runs out, per anomaly model (a new setting that drives memory gets
# its name added here): PaDiM's statistics grow with FEATURE_DIM squared, PatchCore's bank with
# every training patch, its search with the coreset (CORESET_RATIO) times the batch.
MEMORY_SETTINGS = {
    "padim": "BATCH_SIZE, IMAGE_SIZE (or TILE_SIZE) or FEATURE_DIM, or choose a smaller BACKBONE",
    "patchcore": "CORESET_RATIO, IMAGE_SIZE (or TILE_SIZE), BATCH_SIZE or PATCHCORE_FEATURE_DIM, or train on fewer "
    "images (PatchCore's memory bank holds every training patch)",
}
GENERAL_MEMORY_SETTINGS = "BATCH_SIZE or IMAGE_SIZE (or TILE_SIZE), or choose a smaller BACKBONE"
# How allocators word running out of memory when they raise a RuntimeError (torch's CPU and CUDA
# allocators, oneDNN) or a DataLoader worker the kernel's OOM killer ended.
_MEMORY_WORDS = ("out of memory", "can't allocate memory", "cannot allocate memory", "not enough memory", "killed by signal: killed")


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C: temporary folders are removed and nothing is overwritten."""


def _terminate(signum, frame) -> None:
    raise Terminated()


def memory_message(error: BaseException) -> str | None:
    """One line for an allocator that ran out of memory, or None when `error` is something else."""
    words = str(error).lower()
    if not isinstance(error, (MemoryError, torch.OutOfMemoryError)) and not (
        isinstance(error, RuntimeError) and any(phrase in words for phrase in _MEMORY_WORDS)
    ):
        return None
    if "killed by signal" in words:
        return "out of memory: a worker reading images was killed; lower NUM_WORKERS or BATCH_SIZE"
    kind = model_in_use(error)
    levers = MEMORY_SETTINGS.get(kind, GENERAL_MEMORY_SETTINGS)
    who = {"padim": "PaDiM ", "patchcore": "PatchCore "}.get(kind, "")
    if isinstance(error, torch.OutOfMemoryError) or "cuda" in words:
        return f"{who}out of GPU memory: lower {levers}, or set DEVICE=cpu"
    return f"{who}out of memory: lower {levers}"


def model_in_use(error: BaseException) -> str | None:
    """The type name of the anomaly model whose code was running when `error` was raised (the
    innermost model method on its traceback), so the advice fits that model; None outside one."""
    kind, frame = None, error.__traceback__
    while frame is not None:
        owner = frame.tb_frame.f_locals.get("self")
        if isinstance(owner, AnomalyModel):
            kind = owner.kind
        frame = frame.tb_next
    return kind


def _one_line(message) -> str:
    """The message on a line of its own: open progress bars are closed first (they end their line)."""
    for bar in list(getattr(tqdm, "_instances", [])):
        bar.close()
    return " ".join(str(message).split("\n"))


def run(main: Callable[[list[str]], None]) -> None:
    """Run a script's main: a user error, running out of memory or disk space prints one line and
    exits 2, never a traceback; Ctrl-C and SIGTERM remove temporary files and exit 130 / 143.

    Under torchrun (anomaly_model/distributed.py) every rank runs `main`; an error on any rank
    stops them all, and rank 0 prints that one line and exits with its code."""
    if {"-h", "--help"} & set(sys.argv[1:]):  # the script's own usage lines, and where the settings are
        usage = (getattr(sys.modules.get("__main__"), "__doc__", None) or "").strip()
        print(f"{usage}\n\nSettings are KEY=VALUE (config.py holds every one with its default; docs/settings.md explains them).")
        raise SystemExit(0)
    if hasattr(signal, "SIGTERM"):
        signal.signal(signal.SIGTERM, _terminate)
    code, line, from_peer = 0, None, False
    try:
        distributed.start()
        main(sys.argv[1:])
    except distributed.PeerFailed as failure:
        code, line, from_peer = failure.code, f"error: {failure}", True
    except USER_ERRORS as error:
        code, line = 2, f"error: {_one_line(error)}"
    except Terminated:
        code, line = 143, _one_line("terminated (SIGTERM): nothing was overwritten")
    except KeyboardInterrupt:
        code, line = 130, _one_line("interrupted: nothing was overwritten")
    except OSError as error:
        if error.errno not in STORAGE_ERRNOS:
            code, line = 1, traceback.format_exc().rstrip()
        else:
            code, line = 2, f"error: {_one_line(storage_message(error))}"
    except Exception as error:  # a bug, not bad input: keep the traceback for the report
        message = memory_message(error)
        code, line = (1, traceback.format_exc().rstrip()) if message is None else (2, f"error: {_one_line(message)}")
    distributed.finish(code, line, from_peer)


def load_categories(settings) -> list[Category]:
    """The categories at DATASET_DIR; the demo set is generated when DATASET_DIR is the project's own
    dataset/demo and absent (only there: a mistyped path, edited into config.py or not, is an error,
    never a folder filled with synthetic images)."""
    dataset_dir = Path(settings.DATASET_DIR)
    if dataset_dir.resolve() == DEMO_DATASET_DIR:
        if distributed.is_main() and not dataset_dir.exists():
            print(f"generating the synthetic demo dataset in {dataset_dir} ...", file=sys.stderr)
            generate_demo_dataset(dataset_dir, seed=settings.SEED)
        distributed.barrier()  # under torchrun the other ranks read it once rank 0 has written it
    return find_categories(dataset_dir, skip=outputs_to_skip(dataset_dir, "DATASET_DIR", settings))


def outputs_to_skip(folder: Path, purpose: str, settings) -> list[Path]:
    """The tool's own output folders that lie inside `folder` (the dataset, or the folder test.py
    scores), said in one note: heat maps and sorted or corrected copies are never read as inputs."""
    outputs = output_folders(settings)
    inside = outputs_inside(folder, outputs)
    if inside:
        print(f"note: {' and '.join(inside)} lie{'s' if len(inside) == 1 else ''} inside {purpose} {folder}: "
              "what the tool wrote there is not read as input images", file=sys.stderr)
    return [Path(outputs[name]) for name in inside]


def output_folders(settings) -> dict[str, str]:
    """The folders the tool writes to or sorts into, by setting name (those set): never training data."""
    names = ("MODEL_DIR", "RESULTS_DIR", "WATCH_DIR", "REVIEW_DIR")
    return {name: str(getattr(settings, name)) for name in names if getattr(settings, name, "")}


def model_dir_for(settings, category: str, n_categories: int) -> Path:
    """MODEL_DIR/<MODEL_NAME or category>; with several categories always MODEL_DIR/<category>."""
    root = Path(settings.MODEL_DIR)
    name = category if n_categories > 1 else (settings.MODEL_NAME or category)
    if name in ("", ".", "..") or "/" in name or "\\" in name:  # the model folder would be MODEL_DIR itself or lie outside it
        raise SettingsError(f"DATASET_DIR {settings.DATASET_DIR} gives no folder name to name its model: set MODEL_NAME=<name>")
    if len(os.fsencode(name)) > MAX_MODEL_NAME_BYTES:  # said now, not when the save's temporary names pass 255 bytes
        source = "MODEL_NAME" if name == settings.MODEL_NAME else f"the category folder's name ({category[:40]}...)"
        fix = "rename the category folder" if n_categories > 1 else "set a shorter MODEL_NAME=<name>"
        raise SettingsError(f"{source} is {len(os.fsencode(name))} bytes long, more than the {MAX_MODEL_NAME_BYTES} a model's "
                            f"name may have (its backups and temporary names add to it): {fix}")
    return root / name


def chosen_model_dir(settings, purpose: str) -> Path:
    """The one model a command uses (test.py FOLDER, serve.py, an update): MODEL_DIR/MODEL_NAME when
    MODEL_NAME is set, without reading DATASET_DIR (a plain folder needs no dataset, and the demo
    set is not generated for it); else the one category's model, or MODEL_NAME must pick one."""
    if settings.MODEL_NAME:
        return model_dir_for(settings, settings.MODEL_NAME, 1)
    categories = load_categories(settings)
    category = single_category(categories, settings, purpose)
    return model_dir_for(settings, category.name, len(categories))


def trained_elsewhere(description: dict, category: Category) -> str:
    """Where the model was trained, when that is not `category` ("" when it is): another category
    (MODEL_NAME picked another part's model), or another data set of the same name (the folder
    moved, or a second data set called alike replaced the model). test.py and eval.py say it."""
    dataset = description.get("dataset", {})
    trained_on, root = dataset.get("category"), dataset.get("dataset_dir")
    if trained_on and trained_on != category.name:
        return f"category {trained_on!r}"
    if root and os.path.realpath(root) != os.path.realpath(category.root):
        return f"the data set at {root}"
    return ""


def require_models(model_dirs: list[Path]) -> None:
    """Every model a run over several categories uses, checked before the first is scored (one
    untrained category stopped test.py and eval.py after the others' work, and the advice "run
    python train.py" would retrain them all)."""
    if len(model_dirs) < 2:
        return
    missing = []
    for model_dir in model_dirs:
        try:
            read_description(model_dir)
        except ModelError:
            if (model_dir / "model.json").is_file():
                raise  # there, but damaged or of another version: its own one-line error says which
            missing.append(model_dir.name)
    if missing:
        names = ", ".join(repr(name) for name in missing)
        raise SettingsError(f"no trained model for {names} in {model_dirs[0].parent}: train {'it' if len(missing) == 1 else 'each'} with "
                            f"python train.py MODEL_NAME=<name>, or give MODEL_NAME=<one of the trained categories>")


def single_category(categories: list[Category], settings, purpose: str) -> Category:
    """The one category a command needs; several found need MODEL_NAME to pick one."""
    if len(categories) == 1:
        return categories[0]
    names = [c.name for c in categories]
    wanted = [c for c in categories if c.name == settings.MODEL_NAME]
    if wanted:
        return wanted[0]
    if settings.MODEL_NAME:
        raise SettingsError(f"MODEL_NAME={settings.MODEL_NAME} is not one of the {len(names)} categories in DATASET_DIR ({', '.join(names)})")
    raise SettingsError(f"DATASET_DIR holds {len(names)} categories ({', '.join(names)}): {purpose} set MODEL_NAME=<one of them>")


def chosen_categories(settings) -> list[Category]:
    """The categories train.py, test.py and eval.py work on: every one at DATASET_DIR, or on a root
    of several the one MODEL_NAME names (refused in one line when it names none of them)."""
    categories = load_categories(settings)
    if len(categories) > 1 and settings.MODEL_NAME:
        return [single_category(categories, settings, "")]
    return categories
