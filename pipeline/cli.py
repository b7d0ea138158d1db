"""What the three scripts share: settings, dataset and model locations, and one-line errors."""

from __future__ import annotations

import sys
import traceback
from pathlib import Path
from typing import Callable

from anomaly_model import distributed
from anomaly_model.backbone import ModelError
from dataset_manager import Category, DataError, find_categories
from dataset_manager.demo import generate_demo_dataset
from settings import SettingsError, defaults

USER_ERRORS = (SettingsError, DataError, ModelError)


def run(main: Callable[[list[str]], None]) -> None:
    """Run a script's main: a user error prints one line and exits 2, never a traceback.

    Under torchrun (anomaly_model/distributed.py) every rank runs `main`; an error on any rank
    stops them all, and rank 0 prints that one line and exits 2."""
    code, line, from_peer = 0, None, False
    try:
        distributed.start()
        main(sys.argv[1:])
    except distributed.PeerFailed as failure:
        code, line, from_peer = failure.code, f"error: {failure}", True
    except USER_ERRORS as error:
        code, line = 2, f"error: {error}"
    except KeyboardInterrupt:
        code, line = 130, "interrupted: nothing was overwritten"
    except MemoryError:
        code, line = 2, "error: out of memory: lower BATCH_SIZE or FEATURE_DIM"
    except Exception:  # a bug, not bad input: keep the traceback for the report
        code, line = 1, traceback.format_exc().rstrip()
    distributed.finish(code, line, from_peer)


def load_categories(settings) -> list[Category]:
    """The categories at DATASET_DIR; the demo set is generated when DATASET_DIR is its default and absent."""
    dataset_dir = Path(settings.DATASET_DIR)
    demo_dir = Path(defaults()["DATASET_DIR"])
    if dataset_dir.resolve() == demo_dir.resolve():
        if distributed.is_main() and not dataset_dir.exists():
            print(f"generating the synthetic demo dataset in {dataset_dir} ...", file=sys.stderr)
            generate_demo_dataset(dataset_dir, seed=settings.SEED)
        distributed.barrier()  # under torchrun the other ranks read it once rank 0 has written it
    return find_categories(dataset_dir)


def model_dir_for(settings, category: str, n_categories: int) -> Path:
    """MODEL_DIR/<MODEL_NAME or category>; with several categories always MODEL_DIR/<category>."""
    root = Path(settings.MODEL_DIR)
    return root / category if n_categories > 1 else root / (settings.MODEL_NAME or category)


def single_category(categories: list[Category], settings, purpose: str) -> Category:
    """The one category a command needs; several found need MODEL_NAME to pick one."""
    if len(categories) == 1:
        return categories[0]
    names = [c.name for c in categories]
    wanted = [c for c in categories if c.name == settings.MODEL_NAME]
    if wanted:
        return wanted[0]
    raise SettingsError(f"DATASET_DIR holds {len(names)} categories ({', '.join(names)}): {purpose} set MODEL_NAME=<one of them>")
