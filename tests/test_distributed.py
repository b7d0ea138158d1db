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
from anomaly_model import patchcore as patchcore_module
from anomaly_model.errors import ModelError
from anomaly_model.patchcore import PatchCore, PatchCoreSettings
from conftest import ROOT, make_mvtec_category
from dataset_manager import find_categories
from pipeline.detector import Detector
from pipeline.evaluation_run import evaluate_category
from pipeline.inspection import Inspector
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
    summary = single_threaded(predict_folder, Inspector(detector), category.test_dir, base / "one-results", settings)
    evaluation = single_threaded(evaluate_category, Inspector(detector), category, settings, base / "one-eval" / "part")
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
    cut_image(mask)
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


def cut_image(path: Path) -> None:
    """Leave `path` with a readable header (its size) but pixels that cannot be decoded."""
    buffer = io.BytesIO()
    Image.open(path).convert("RGB").save(buffer, "JPEG")
    data = buffer.getvalue()
    path.write_bytes(data[: data.index(b"\xff\xda") + 20])


def test_torchrun_patchcore_keeps_one_process_coreset(one_process, tmp_path):
    """3 ranks, 4 batches of 4 training images: rank 0 fits batches 0 and 3, rank 1 batch 1, and
    batch 2 (rank 2's) cannot be decoded, so rank 2 fits nothing and rank 0's rows reach the
    selection out of one process's order. The coreset (rows, their order, their source images) is
    one process's, and so are the out-of-fold thresholds (rank 0 scores with coreset_sources)."""
    base, category_dir, _, _ = one_process
    part = tmp_path / "part"
    subprocess.run(["cp", "-r", str(category_dir), str(part)], check=True)
    for number in range(8, 12):
        cut_image(part / "train" / "good" / f"{number:03d}.png")
    data = [f"DATASET_DIR={part}", *TINY, "ANOMALY_MODEL=patchcore", "CLASSIFIER=False"]
    settings, _ = load([*data, f"MODEL_DIR={tmp_path / 'one'}"])
    (category,) = find_categories(part)
    single_threaded(train_category, category, settings, tmp_path / "one" / "part")
    result = torchrun("train.py", *data, f"MODEL_DIR={tmp_path / 'three'}", nproc=3)
    assert result.returncode == 0, result.stderr
    assert "trained on 12 images" in result.stdout
    one, three = tmp_path / "one" / "part", tmp_path / "three" / "part"
    assert np.array_equal(np.load(one / "coreset_sources.npy"), np.load(three / "coreset_sources.npy"))
    for name in ("coreset.npy", "coreset_mean.npy"):
        np.testing.assert_allclose(np.load(three / name), np.load(one / name), rtol=1e-6, atol=1e-7)
    saved_one, saved_three = (json.loads((folder / "model.json").read_text()) for folder in (one, three))
    assert saved_three["anomaly_model"]["state"] == saved_one["anomaly_model"]["state"]  # sizes, groups, 12 images
    assert saved_three["thresholds"]["image"] == pytest.approx(saved_one["thresholds"]["image"], rel=1e-6)
    assert saved_three["thresholds"]["pixel"] == pytest.approx(saved_one["thresholds"]["pixel"], rel=1e-6)
    rows = [read_rows(single_threaded(predict_folder, Inspector(Detector(model, "cpu")), category.test_dir, tmp_path / f"results-{model.parent.name}", settings).run_dir)
            for model in (one, three)]
    assert [row["image_score"] for row in rows[0]] == [row["image_score"] for row in rows[1]] and len(rows[0]) == 8


def test_patchcore_memory_check_counts_the_projection_rank_0_gathers(monkeypatch):
    """Rank 0 holds every rank's projected rows for the selection, the other ranks only their own bank."""
    model = PatchCore(PatchCoreSettings(backbone="resnet18", weights="none"), device="cpu")  # 384 features, projected to 128
    alone = model.fit_memory_bytes(100, 3136)
    monkeypatch.setattr(distributed, "active", lambda: True)
    monkeypatch.setattr(distributed._job, "world_size", 2)
    needs = {}
    for rank in (0, 1):
        monkeypatch.setattr(distributed._job, "rank", rank)
        needs[rank] = model.fit_memory_bytes(50, 3136, 100)
    assert needs[1] < needs[0] < alone
    assert needs[0] - needs[1] == 4 * 100 * 3136 * (128 + 4)  # the gathered projection (and its centred copy's share)
    monkeypatch.setattr(patchcore_module, "available_memory", lambda: int((needs[0] + needs[1]) / 2 / patchcore_module.MEMORY_HEADROOM))
    assert model._check_memory(100, 3136, planned=True) == "float32"  # rank 1: fits in float32
    monkeypatch.setattr(distributed._job, "rank", 0)
    assert model._check_memory(100, 3136, planned=True) == "float16"  # rank 0: its bank in float16
    on_disk = model.fit_memory_bytes(50, 3136, 100, bank_bytes=0)
    monkeypatch.setattr(patchcore_module, "available_memory", lambda: int(0.99 * on_disk / patchcore_module.MEMORY_HEADROOM))
    with pytest.raises(ModelError, match="fit for 100 training images .* of RAM on rank 0 \\(it gathers every rank's projected patches\\) even with its memory bank on disk"):
        model._check_memory(100, 3136, planned=True)
