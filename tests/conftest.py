"""Shared fixtures: a tiny synthetic MVTec-layout dataset and a way to run the real scripts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
# Tiny random-weight models; the classifier's defaults (300 synthetic defects, 5 out-of-fold folds)
# are cut down here to keep CI short: tests/test_out_of_fold.py, test_classifier.py and the quality
# tests cover those paths at full size.
TINY = ["BACKBONE=resnet18", "WEIGHTS=none", "RESIZE=64", "CROP=64", "BATCH_SIZE=8", "NUM_WORKERS=0",
        "OUT_OF_FOLD_FOLDS=0", "CLASSIFIER_SYNTHETIC_DEFECTS=24"]


def texture(rng: np.random.Generator, size: int = 64) -> np.ndarray:
    """A striped part with mild noise: every good image looks alike, as on a production line."""
    yy, xx = np.mgrid[0:size, 0:size]
    stripes = 0.5 + 0.25 * np.sin(xx * 0.8 + rng.uniform(-0.2, 0.2))
    image = stripes + 0.03 * rng.standard_normal((size, size))
    return np.clip(np.repeat(image[:, :, None], 3, axis=2) * [1.0, 0.9, 0.8], 0, 1)


def with_defect(rng: np.random.Generator, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    image = texture(rng, size)
    mask = np.zeros((size, size), dtype=bool)
    y, x = rng.integers(12, size - 24, size=2)
    mask[y : y + 12, x : x + 12] = True
    image[mask] = [0.95, 0.1, 0.1]
    return image, mask


def save(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.clip(array, 0, 1) * 255).astype(np.uint8)).save(path)


def make_mvtec_category(root: Path, seed: int = 0, n_train: int = 16, n_test: int = 4) -> Path:
    rng = np.random.default_rng(seed)
    for number in range(n_train):
        save(texture(rng), root / "train" / "good" / f"{number:03d}.png")
    for number in range(4):
        save(texture(rng), root / "validation" / "good" / f"{number:03d}.png")
    for number in range(n_test):
        save(texture(rng), root / "test" / "good" / f"{number:03d}.png")
        image, mask = with_defect(rng)
        save(image, root / "test" / "blob" / f"{number:03d}.png")
        save(mask.astype(float), root / "ground_truth" / "blob" / f"{number:03d}_mask.png")
    return root


@pytest.fixture()
def tiny_category(tmp_path: Path) -> Path:
    return make_mvtec_category(tmp_path / "data" / "part")


def run_script(script: str, *args: str, cwd: Path = ROOT, timeout: int = 240) -> subprocess.CompletedProcess:
    """Run train.py / test.py / eval.py as a user would, through its real entry point."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, str(ROOT / script), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env
    )


def outputs(tmp_path: Path) -> list[str]:
    return [f"MODEL_DIR={tmp_path / 'models'}", f"RESULTS_DIR={tmp_path / 'results'}", f"REVIEW_DIR={tmp_path / 'review'}"]


def error_line(result) -> str:
    """The one `error: ...` line of a script that refused its input (exit 2, no traceback)."""
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.stderr
    return lines[0]
