"""Detection quality on real data with real ImageNet MobileNetV2 weights: MVTec 3D-AD tire and
KolektorSDD. The good/defect classifier (default settings, synthetic defects only) must never rank
test images worse than the image score it is built on, and with labeled defects it must win
clearly (issue 9)."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from conftest import ROOT, SHARED, outputs, run_script
from settings import load

TIRE = SHARED / "data" / "tire"
KSDD = SHARED / "data" / "ksdd"
WEIGHTS = SHARED / "weights" / "mobilenet_v2_imagenet_features.pt"


def _train_and_evaluate(tmp_path, data, name: str) -> tuple[dict, str]:
    settings = [f"DATASET_DIR={data}", "BACKBONE=mobilenet_v2", f"WEIGHTS={WEIGHTS}", "SAVE_PICTURES=False", *outputs(tmp_path)]
    trained = run_script("train.py", *settings, timeout=900)
    assert trained.returncode == 0, trained.stderr[-3000:]
    evaluated = run_script("eval.py", *settings, "EVAL_SHEET_COUNT=0", timeout=900)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    (run_dir,) = [p for p in (tmp_path / "results").iterdir() if p.name.startswith("eval-")]
    return json.loads((run_dir / name / "metrics.json").read_text()), trained.stdout


@pytest.mark.skipif(not (TIRE.is_dir() and WEIGHTS.is_file()), reason="../shared (tire data and weights) is absent")
def test_tire_rocauc_and_the_classifier_never_below_the_image_score(tmp_path):
    metrics, stdout = _train_and_evaluate(tmp_path, TIRE, "tire")
    assert "trained on 210 images, calibrated on 29 validation images and 210 training images out-of-fold" in stdout
    assert metrics["n_good"] == 25 and metrics["n_defect"] == 87
    assert metrics["image_rocauc"] >= 0.75
    assert metrics["pixel_rocauc"] >= 0.93
    assert metrics["classifier_rocauc"] >= metrics["image_rocauc"] - 0.005


@pytest.mark.skipif(not (KSDD.is_dir() and WEIGHTS.is_file()), reason="../shared (ksdd data and weights) is absent")
def test_ksdd_classifier_never_below_the_image_score_over_five_seeds():
    """Issue 9's bar on ksdd: the default classifier (synthetic defects only) at least the image
    score - 0.005, mean over 5 seeds, measured as bench/classifier_ablation.py measures it: one
    fitted model, then per seed a new synthetic set and classifier seed, through train_classifier
    and DefectClassifier.margin as train.py and eval.py use them. A single seed is noisier than the
    bar: seed 0 through train.py and eval.py measures -0.0052 (docs/classifier.md, Ablation)."""
    sys.path.insert(0, str(ROOT / "bench"))
    import classifier_ablation as ablation

    settings, _ = load(["NUM_WORKERS=0", f"WEIGHTS={WEIGHTS}"])
    data = ablation.Prepared(ablation.MapSource(KSDD, settings, cache=None), 5, {"all hosts"})
    rocaucs = ablation.run_variant(data, ablation.VARIANTS[ablation.DEFAULT_VARIANT], settings, 5, [0])[0]
    image, classifier = rocaucs[:, 0], rocaucs[:, 1]
    assert image.min() >= 0.78 and len(classifier) == 5
    assert (classifier - image).mean() >= -0.005  # 0 exactly since issue 24: no labeled defects, the verdict ranks like the image score


def _ksdd_with_labeled_cracks(root, count: int, seed: int):
    """ksdd with `count` test cracks (a seeded draw) moved into train/defect/: links, nothing copied."""
    cracks = sorted((KSDD / "test" / "crack").iterdir())
    chosen = {cracks[i].name for i in np.random.default_rng(seed).choice(len(cracks), size=count, replace=False)}
    for sub in ("train/good", "test/good"):
        (root / sub).parent.mkdir(parents=True, exist_ok=True)
        (root / sub).symlink_to(KSDD / sub)
    for folder in ("train/defect", "test/crack", "ground_truth/crack"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for image in cracks:
        if image.name in chosen:
            (root / "train" / "defect" / image.name).symlink_to(image)
        else:
            (root / "test" / "crack" / image.name).symlink_to(image)
            mask = f"{image.stem}_mask.png"
            (root / "ground_truth" / "crack" / mask).symlink_to(KSDD / "ground_truth" / "crack" / mask)
    return root


@pytest.mark.skipif(not (KSDD.is_dir() and WEIGHTS.is_file()), reason="../shared (ksdd data and weights) is absent")
def test_ksdd_labeled_cracks_never_make_the_verdict_worse_than_the_image_score(tmp_path):
    """Issue 24, point 4: with 10 labeled cracks the verdict must not lose to the image score, and the
    model says which verdict its held-out evidence kept and why. This asserted a gain of +0.03 before,
    from the similarity stage that gates designed on the test splits let through; the held-out
    evidence (classification_model/evidence.py) cannot show that gain from 10 cracks against 28
    validation goods (its lower bound stays below 0 on every ablation draw: docs/classifier.md,
    held-out evidence), so the verdict then ranks like the image score: the issue's safety bar."""
    data = _ksdd_with_labeled_cracks(tmp_path / "data" / "ksdd", 10, seed=0)
    metrics, stdout = _train_and_evaluate(tmp_path, data, "ksdd")
    description = json.loads((tmp_path / "models" / "ksdd" / "model.json").read_text())
    entry = description["classifier"]
    assert entry["n_real_defects"] == 10
    assert entry["verdict"]["evidence"]["classifier"]["n_defects"] == 10 and entry["verdict"]["why"]
    assert metrics["n_good"] == 70 and metrics["n_defect"] == 42 and metrics["image_rocauc"] >= 0.78
    assert metrics["classifier_rocauc"] >= metrics["image_rocauc"] - 0.005
