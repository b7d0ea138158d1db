"""train.py, test.py and eval.py under torchrun (2 CPU processes, Gloo) against one process.

The ranks run one thread each (OMP_NUM_THREADS=1), and so does the single-process reference here,
so scoring the same model gives the same floats and the comparisons can be exact; the fitted
models differ only by the order the ranks' sums are added in."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from anomaly_model import distributed
from conftest import ROOT, make_mvtec_category
from dataset_manager import find_categories
from pipeline.detector import Detector
from pipeline.evaluation_run import evaluate_category
from pipeline.prediction import predict_folder
from pipeline.training import train_category
from settings import load

# BATCH_SIZE=4: 16 train images are 4 batches (2 per rank), the 4 validation images one batch
# (rank 1 has none), 8 test images 2 batches.
TINY = ["BACKBONE=resnet18", "WEIGHTS=none", "RESIZE=64", "CROP=64", "BATCH_SIZE=4", "NUM_WORKERS=0",
        "CLASSIFIER_SYNTHETIC_DEFECTS=12", "CLASSIFIER_MAX_ROUNDS=60", "CLASSIFIER_FOLDS=3",
        "OUT_OF_FOLD_FOLDS=2"]  # rank 0's out-of-fold maps after the distributed fit


def torchrun(script: str, *args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node=N script args` (torchrun is torch.distributed.run)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(ROOT / script), *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)


def single_threaded(function, *args):
    """Run in this process with one thread, as each torchrun rank does."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return function(*args)
    finally:
        torch.set_num_threads(threads)


def relative_difference(folder_a: Path, folder_b: Path, name: str) -> float:
    a, b = np.load(folder_a / name), np.load(folder_b / name)
    return float(np.abs(a - b).max() / np.abs(a).max())


def read_rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "predictions.csv") as file:
        return list(csv.DictReader(file))


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The tiny dataset, and a model trained, a folder scored and an evaluation made in this process."""
    base = tmp_path_factory.mktemp("distributed")
    category_dir = make_mvtec_category(base / "data" / "part")
    settings, _ = load([f"DATASET_DIR={category_dir}", *TINY, f"MODEL_DIR={base / 'one'}", f"RESULTS_DIR={base / 'one-results'}"])
    (category,) = find_categories(category_dir)
    single_threaded(train_category, category, settings, base / "one" / "part")
    detector = Detector(base / "one" / "part", "cpu")
    summary = single_threaded(predict_folder, detector, category.test_dir, base / "one-results", settings)
    evaluation = single_threaded(evaluate_category, detector, category, settings, base / "one-eval" / "part")
    return base, category_dir, summary.run_dir, json.loads(json.dumps(evaluation.metrics))


def test_torchrun_train_test_eval_equal_one_process(one_process):
    base, category_dir, single_run, single_metrics = one_process
    data = [f"DATASET_DIR={category_dir}", *TINY]

    result = torchrun("train.py", *data, f"MODEL_DIR={base / 'two'}")
    assert result.returncode == 0, result.stderr
    one, two = base / "one" / "part", base / "two" / "part"
    assert relative_difference(one, two, "mean.npy") < 1e-5
    assert relative_difference(one, two, "cholesky.npy") < 1e-5
    saved_one, saved_two = (json.loads((folder / "model.json").read_text()) for folder in (one, two))
    assert saved_two["anomaly_model"]["state"] == saved_one["anomaly_model"]["state"]  # 16 images, grid, channels
    assert saved_two["thresholds"]["image"] == pytest.approx(saved_one["thresholds"]["image"], rel=1e-5)
    assert saved_two["thresholds"]["pixel"] == pytest.approx(saved_one["thresholds"]["pixel"], rel=1e-5)
    assert saved_two["validation"]["image_scores"] == pytest.approx(saved_one["validation"]["image_scores"], rel=1e-5)
    assert saved_two["classifier"]["n_synthetic_defects"] == saved_one["classifier"]["n_synthetic_defects"]
    assert not [p for p in (base / "two").iterdir() if p.name.startswith(".")]  # nothing half-written

    # Scoring the single-process model with two ranks gives that process's results exactly.
    shared = [*data, f"MODEL_DIR={base / 'one'}", f"RESULTS_DIR={base / 'two-results'}"]
    result = torchrun("test.py", *shared)
    assert result.returncode == 0, result.stderr
    (run_dir,) = (base / "two-results" / "part").iterdir()
    rows, expected = read_rows(run_dir), read_rows(single_run)
    assert [row["path"] for row in rows] == sorted({row["path"] for row in rows})  # each image once, in order
    assert rows == expected
    assert all((run_dir / row["overlay"]).is_file() and (run_dir / row["mask"]).is_file() for row in rows)
    assert len(list((run_dir / "pictures").iterdir())) == 2 * len(rows)

    result = torchrun("eval.py", *shared)
    assert result.returncode == 0, result.stderr
    (eval_dir,) = [p for p in (base / "two-results").iterdir() if p.name.startswith("eval-")]
    metrics = json.loads((eval_dir / "metrics.json").read_text())["categories"][0]
    assert metrics == single_metrics
    assert result.stdout.count("report:") == 1  # rank 0 alone speaks


def test_more_ranks_than_batches(one_process, tmp_path):
    """16 train and 4 validation images in one batch each: rank 1 has nothing to fit or score."""
    base, category_dir, _, _ = one_process
    data = [f"DATASET_DIR={category_dir}", *TINY, "BATCH_SIZE=16", "CLASSIFIER=False"]
    settings, _ = load([*data, f"MODEL_DIR={tmp_path / 'one'}"])
    (category,) = find_categories(category_dir)
    single_threaded(train_category, category, settings, tmp_path / "one" / "part")
    result = torchrun("train.py", *data, f"MODEL_DIR={tmp_path / 'two'}")
    assert result.returncode == 0, result.stderr
    assert relative_difference(tmp_path / "one" / "part", tmp_path / "two" / "part", "mean.npy") < 1e-5
    assert relative_difference(tmp_path / "one" / "part", tmp_path / "two" / "part", "cholesky.npy") < 1e-5
    assert "trained on 16 images, calibrated on 4 validation images" in result.stdout


def test_bad_input_on_one_rank_stops_all_with_its_one_line_error(one_process, tmp_path):
    """A damaged mask read by rank 1 only: rank 0 prints rank 1's error, every rank exits 2, no results left."""
    base, category_dir, _, _ = one_process
    bad = tmp_path / "part"
    subprocess.run(["cp", "-r", str(category_dir), str(bad)], check=True)
    # BATCH_SIZE=2: test images blob/000-001 go to rank 0, blob/002-003 to rank 1.
    mask = bad / "ground_truth" / "blob" / "002_mask.png"
    buffer = io.BytesIO()
    Image.open(mask).convert("L").save(buffer, "JPEG")
    data = buffer.getvalue()
    mask.write_bytes(data[: data.index(b"\xff\xda") + 20])  # a cut JPEG: its header (size) reads, its pixels do not
    result = torchrun("eval.py", f"DATASET_DIR={bad}", *TINY, "BATCH_SIZE=2", f"MODEL_DIR={base / 'one'}", f"RESULTS_DIR={tmp_path / 'results'}")
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(f"error: rank 1: cannot read mask {mask}: image file is truncated"), result.stderr
    ours = [f'File "{ROOT / name}' for name in ("eval.py", "pipeline", "anomaly_model")]
    assert not any(frame in result.stderr for frame in ours)  # no traceback from this project (torchrun prints its own report)
    codes = re.findall(r"rank\s*:\s*(\d+) \(local_rank: \d+\)\s*\n\s*exitcode\s*:\s*(-?\d+)", result.stderr)
    assert dict(codes).get("0") == "2", result.stderr  # torchrun's report: rank 0 exited 2, not killed
    assert not (tmp_path / "results").exists() or not list((tmp_path / "results").iterdir())


def test_shards_cover_every_image_once_in_whole_batches(monkeypatch):
    for world_size in (1, 2, 3, 5):
        monkeypatch.setattr(distributed._job, "world_size", world_size)
        shards = []
        for rank in range(world_size):
            monkeypatch.setattr(distributed._job, "rank", rank)
            shards.append(distributed.shard(10, 4))
        assert sorted(i for shard in shards for i in shard) == list(range(10))
        assert shards[0][:4] == [0, 1, 2, 3]  # rank 0 holds the first batch: the shift of PaDiM's sums
        for shard in shards:  # whole batches, as one process would make them
            assert all(len([i for i in shard if i // 4 == b]) in (0, min(4, 10 - 4 * b)) for b in range(3))
    monkeypatch.setattr(distributed._job, "rank", 0)
    monkeypatch.setattr(distributed._job, "world_size", 1)
    assert distributed.gather_in_order([(2, "c"), (0, "a"), (1, "b")]) == ["a", "b", "c"]  # alone: no process group
    assert not distributed.active()
