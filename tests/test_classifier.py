"""The good/defect classifier: features, training, saving, errors, and the scripts end to end.

Fast: tiny 64x64 synthetic images and a random-init backbone (WEIGHTS=none)."""

from __future__ import annotations

import csv
import functools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import xgboost as xgb
from PIL import Image

from dataset_manager import find_categories
from pipeline.inspection import load as load_model_folder
from pipeline.prediction import predict_folder
from pipeline.training import train_category
from settings import load

from anomaly_model.errors import ModelError
from classification_model.features import FEATURE_NAMES, MONOTONE, map_features
from classification_model.synthetic import DEFECT_TYPES, make_defect
from classification_model.evidence import FIRST_STAGE, IMAGE_SCORE, WITH_SIMILARITY
from classification_model.training import DefectPainting, VerdictRows, decide_verdict, synthetic_defect_maps, synthetic_plan
from classification_model.xgboost import Anchor, Anchoring, ClassifierParams, ClassifierRows, DefectClassifier, blend, plot_feature_importance, shrink_share, train_classifier

ROOT = Path(__file__).resolve().parents[1]
LEVELS = {"q99": 1.0, "q999": 2.0, "pixel": 1.5, "image": 4.0}
TINY = ["WEIGHTS=none", "RESIZE=64", "CROP=64", "BATCH_SIZE=8", "NUM_WORKERS=0", "SAVE_PICTURES=False",
        "CLASSIFIER_SYNTHETIC_DEFECTS=27", "CLASSIFIER_MAX_ROUNDS=60", "CLASSIFIER_FOLDS=3", "BACKBONE=resnet18", "LAYERS=(1,2)"]


def feature(row: np.ndarray, name: str) -> float:
    return float(row[FEATURE_NAMES.index(name)])


def test_features_of_a_known_blob():
    maps = torch.zeros(2, 64, 64)
    maps[0, 10:20, 10:30] = 5.0  # one 10 x 20 region of height 5
    maps[0, 50:52, 50:52] = 3.0  # a small second region, below the image level 4
    rows = map_features(maps, LEVELS)
    assert rows.shape == (2, len(FEATURE_NAMES)) and len(MONOTONE) == len(FEATURE_NAMES)
    assert set(MONOTONE) == {1}  # only "more anomalous" evidence: no shape fingerprints of synthetic defects
    blob = rows[0]
    assert feature(blob, "max") == 5.0
    assert feature(blob, "mean_top0.1pct") == 5.0  # 4 pixels, all inside the blob
    assert feature(blob, "mean_top5pct") == pytest.approx((200 * 5.0 + 4 * 3.0) / 205)  # 205 pixels: blob, square, one 0
    assert feature(blob, "mean") == pytest.approx((200 * 5.0 + 4 * 3.0) / 4096)
    assert feature(blob, "largest_area_pixel") == pytest.approx(200 / 4096)
    assert feature(blob, "area_pixel") == pytest.approx(204 / 4096)
    assert feature(blob, "area_image") == pytest.approx(200 / 4096) and feature(blob, "largest_area_image") == pytest.approx(200 / 4096)
    assert feature(blob, "excess_image") == pytest.approx(200 * 1.0 / 4096)
    assert feature(blob, "excess_q99") == pytest.approx((200 * 4.0 + 4 * 2.0) / 4096)
    empty = rows[1]
    assert feature(empty, "max") == 0 and feature(empty, "std") == 0
    assert feature(empty, "area_q99") == 0 and feature(empty, "largest_area_q99") == 0 and feature(empty, "excess_q99") == 0


def test_a_broad_faint_defect_raises_the_pooled_features_not_the_max():
    """A faint defect over a large area (common in real parts) is seen by the wider pooling scales."""
    maps = torch.ones(2, 64, 64)
    maps[0, 5, 5] = 4.0  # a good map with one noisy pixel
    maps[1, 8:40, 8:40] = 3.0  # a broad faint rise, lower peak
    noisy, broad = map_features(maps, LEVELS)
    assert feature(broad, "max") < feature(noisy, "max")
    for name in ("mean_top1pct", "mean_top5pct", "mean", "std", "area_q999", "largest_area_pixel", "excess_q99"):
        assert feature(broad, name) > feature(noisy, name), name


def test_synthetic_defects_change_the_image_and_are_seeded():
    rgb = np.full((80, 60, 3), 128, np.uint8)
    box = (5.0, 3.75, 75.0, 56.25)  # the centre crop of a 64 -> 56 preprocessing, in the image's pixels
    for kind in DEFECT_TYPES:
        a = make_defect(rgb, kind, np.random.default_rng(1), (0.1, 0.3), (0.8, 1.0), box)
        b = make_defect(rgb, kind, np.random.default_rng(1), (0.1, 0.3), (0.8, 1.0), box)
        assert np.array_equal(a, b) and a.shape == rgb.shape
        if kind != "cutpaste":  # pasting a uniform image onto itself changes nothing, by design
            assert np.abs(a.astype(int) - rgb).max() > 20
    gray = make_defect(rgb, "texture", np.random.default_rng(2), (0.2, 0.3), (1.0, 1.0), (0, 0, 80, 60))
    assert np.array_equal(gray[..., 0], gray[..., 1])  # gray images get gray defects


def _toy_maps(rng: np.random.Generator, n: int, defect: bool) -> torch.Tensor:
    maps = torch.from_numpy(rng.gamma(4.0, 0.5, size=(n, 32, 32)).astype(np.float32))
    if defect:
        for i in range(n):
            y, x = rng.integers(4, 24, size=2)
            maps[i, y : y + 6, x : x + 6] += 6.0
    return maps


@functools.lru_cache(maxsize=None)
def _toy_classifier(seed: int = 0) -> tuple[DefectClassifier, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    good, bad = _toy_maps(rng, 30, False), _toy_maps(rng, 40, True)
    x = np.concatenate([map_features(good, LEVELS), map_features(bad, LEVELS)])
    y = np.r_[np.zeros(30), np.ones(40)]
    groups = np.r_[np.arange(30), np.arange(40) % 30]
    params = ClassifierParams(max_rounds=50, folds=3)
    return train_classifier(ClassifierRows(x, y, groups), FEATURE_NAMES, params, 0.05, monotone=MONOTONE), x, y


def test_training_separates_obvious_defects_and_saves_identically(tmp_path):
    classifier, _, _ = _toy_classifier()
    rng = np.random.default_rng(7)
    test_good = classifier.predict(map_features(_toy_maps(rng, 20, False), LEVELS))
    test_bad = classifier.predict(map_features(_toy_maps(rng, 20, True), LEVELS))
    assert test_bad.min() > test_good.max()
    assert 0 < classifier.threshold < 1 and classifier.report["out_of_fold_rocauc"] > 0.95
    copy = DefectClassifier.from_bytes(classifier.to_bytes(), FEATURE_NAMES, classifier.threshold, FEATURE_NAMES)
    x = map_features(_toy_maps(rng, 10, True), LEVELS)
    assert np.array_equal(copy.predict(x), classifier.predict(x))
    plot_feature_importance(classifier, tmp_path / "importance.png")
    assert (tmp_path / "importance.png").stat().st_size > 1000


def test_one_class_and_mismatched_features_are_refused():
    x = np.random.default_rng(0).random((10, len(FEATURE_NAMES)))
    with pytest.raises(ModelError, match="holds only good images"):
        train_classifier(ClassifierRows(x, np.zeros(10), np.arange(10)), FEATURE_NAMES, ClassifierParams(), 0.05)
    classifier, _, _ = _toy_classifier()
    with pytest.raises(ModelError, match="retrain"):
        DefectClassifier.from_bytes(classifier.to_bytes(), FEATURE_NAMES[:-1], 0.5, FEATURE_NAMES)


def _noise_and_score(seed: int, n_good: int = 120, n_defect: int = 80):
    """Rows whose features are noise: only the image score (which the features do not see) tells defects apart."""
    rng = np.random.default_rng(seed)
    labels = np.r_[np.zeros(n_good), np.ones(n_defect)]
    scores = rng.normal(10, 1, len(labels)) + 1.5 * labels
    features = rng.random((len(labels), len(FEATURE_NAMES))).astype(np.float32)
    return features, labels, np.arange(len(labels)), scores


def test_anchor_is_the_image_score_as_log_odds():
    scores = np.r_[np.linspace(1, 2, 50), np.linspace(1.5, 4, 50)]
    labels = np.r_[np.zeros(50), np.ones(50)]
    anchor = Anchor.fit(scores, labels, np.ones(100))
    assert anchor.slope > 0 and np.all(np.diff(anchor.margin(np.unique(scores))) > 0)
    separated = Anchor.fit(np.r_[np.zeros(20), np.ones(20) * 5], np.r_[np.zeros(20), np.ones(20)], np.ones(40))
    assert np.isfinite(separated.slope) and separated.margin(np.array([5.0]))[0] > 3  # finite even when the score separates perfectly


def test_the_guard_falls_back_to_the_image_score_when_trees_do_not_help(tmp_path):
    """Trees on uninformative features lose to the image score out-of-fold: the verdict then ranks images
    exactly as the image score does, and its threshold still comes from out-of-fold goods."""
    features, labels, groups, scores = _noise_and_score(0)
    params = ClassifierParams(max_rounds=60, folds=3)
    classifier = train_classifier(ClassifierRows(features, labels, groups, image_scores=scores), FEATURE_NAMES, params, 0.05, anchoring=Anchoring("guard"))
    report = classifier.report
    assert report["rounds"] == 0 and report["out_of_fold_rocauc_trees"] < report["out_of_fold_rocauc_image_score"]
    test_features, _, _, test_scores = _noise_and_score(1)
    probability = classifier.predict(test_features, test_scores)
    assert np.array_equal(np.argsort(probability, kind="stable"), np.argsort(test_scores, kind="stable"))
    assert 0 < classifier.threshold < 1
    copy = DefectClassifier.from_bytes(classifier.to_bytes(), FEATURE_NAMES, classifier.threshold, FEATURE_NAMES, classifier.anchor.to_dict())
    assert np.array_equal(copy.predict(test_features, test_scores), probability)
    with pytest.raises(ModelError, match="image scores"):
        classifier.predict(test_features)


def test_the_guard_keeps_trees_that_help_and_margin_anchoring_starts_from_the_score():
    classifier, x, y = _toy_classifier()
    scores = np.random.default_rng(3).normal(size=len(y)) + 0.5 * y  # a weak image score: the features see the defects far better
    params = ClassifierParams(max_rounds=50, folds=3)
    groups = np.r_[np.arange(30), np.arange(40) % 30]
    guarded = train_classifier(ClassifierRows(x, y, groups, image_scores=scores), FEATURE_NAMES, params, 0.05, MONOTONE, Anchoring("guard"))
    assert guarded.anchor is None and guarded.report["rounds"] > 0
    margin = train_classifier(ClassifierRows(x, y, groups, image_scores=scores), FEATURE_NAMES, params, 0.05, MONOTONE, Anchoring("margin"))
    assert margin.anchor is not None and margin.report["out_of_fold_rocauc"] > 0.95


def test_shrink_blends_the_trees_with_the_image_score_by_the_number_of_goods(tmp_path):
    """"shrink" (the default): trees trained alone, verdict log-odds = share * trees + (1 - share) * anchor,
    share = goods / (goods + shrink_goods); the threshold comes from out-of-fold blended goods; saving keeps it exact."""
    classifier, x, y = _toy_classifier()  # the trees alone, same data, seed and folds
    scores = np.random.default_rng(3).normal(size=len(y)) + 0.5 * y
    groups = np.r_[np.arange(30), np.arange(40) % 30]
    params = ClassifierParams(max_rounds=50, folds=3)
    shrunk = train_classifier(ClassifierRows(x, y, groups, image_scores=scores), FEATURE_NAMES, params, 0.05, MONOTONE, Anchoring("shrink", shrink_goods=20))
    assert shrunk.tree_share == pytest.approx(30 / 50) == shrink_share(30, 20) and shrunk.report["rounds"] == classifier.report["rounds"]
    anchor = Anchor.fit(scores, y, np.ones(len(y)))
    assert shrunk.anchor == anchor
    rng = np.random.default_rng(11)
    test_features = map_features(torch.cat([_toy_maps(rng, 10, False), _toy_maps(rng, 10, True)]), LEVELS)
    test_scores = rng.normal(size=20)
    expected = 0.6 * classifier.margin(test_features) + 0.4 * anchor.margin(test_scores)
    np.testing.assert_allclose(shrunk.margin(test_features, test_scores), expected, rtol=1e-12, atol=1e-12)
    assert 0 < shrunk.threshold < 1 and shrunk.threshold != classifier.threshold  # from the blended out-of-fold goods
    with pytest.raises(ModelError, match="image scores"):
        shrunk.predict(test_features)

    copy = DefectClassifier.from_bytes(shrunk.to_bytes(), FEATURE_NAMES, shrunk.threshold, FEATURE_NAMES, anchor.to_dict(), shrunk.tree_share)
    assert np.array_equal(copy.predict(test_features, test_scores), shrunk.predict(test_features, test_scores))
    with pytest.raises(ModelError, match="no anchor"):
        DefectClassifier.from_bytes(shrunk.to_bytes(), FEATURE_NAMES, shrunk.threshold, FEATURE_NAMES, None, shrunk.tree_share)

    # share 0: the trees have no say, the verdict ranks images exactly as the image score does
    nothing = DefectClassifier(shrunk.booster, FEATURE_NAMES, shrunk.threshold, anchor=anchor, tree_share=0.0)
    order = np.argsort(nothing.predict(test_features, test_scores), kind="stable")
    assert np.array_equal(order, np.argsort(test_scores, kind="stable"))
    assert shrink_share(30, 0) == 1.0  # CLASSIFIER_SHRINK_GOODS = 0: the trees alone


def _with_labeled_defects(image_score_quality: float, k: int):
    """The toy goods and synthetic defects plus `k` labeled defects (the last rows, groups of their own),
    an image score of the given strength, a "shrink" classifier and the rows `decide_verdict` weighs."""
    _, x, y = _toy_classifier()
    rng = np.random.default_rng(5)
    real = map_features(_toy_maps(rng, k, True), LEVELS) if k else np.zeros((0, x.shape[1]), np.float32)
    features, labels = np.concatenate([x, real]), np.r_[y, np.ones(k)]
    groups = np.r_[np.arange(30), np.arange(40) % 30, 100 + np.arange(k)]
    scores = rng.normal(size=len(labels)) + image_score_quality * labels
    weights = np.r_[np.ones(70), np.full(k, 4.0)]
    classifier = train_classifier(ClassifierRows(features, labels, groups, weights, scores), FEATURE_NAMES, ClassifierParams(max_rounds=50, folds=3),
                                  0.05, MONOTONE, Anchoring("shrink", shrink_goods=20))
    rows = VerdictRows(labels, scores, weights, np.zeros(len(labels)), slice(70, 70 + k), slice(0, 30), None, None)
    return classifier, rows, features, scores


def test_held_out_evidence_keeps_a_classifier_that_ranks_labeled_defects_better():
    """The labeled defects, each scored by trees that never saw it, rank far above the goods by the
    features and barely by the weak image score: the first stage is kept, with the numbers behind it."""
    classifier, rows, _, _ = _with_labeled_defects(0.3, 12)
    choice, _ = decide_verdict(classifier, rows, 0.05, seed=0)
    assert choice.verdict == FIRST_STAGE, choice.why
    evidence = classifier.report["verdict"]["evidence"][FIRST_STAGE]
    assert evidence["lower_bound"] > 0 and evidence["n_defects"] == 12 and evidence["n_goods"] == 30
    assert 0 < classifier.tree_share < 1 and "beats the image score" in choice.why


def test_the_similarity_stage_needs_defects_that_stand_out_from_their_own_backgrounds():
    """Labeled defects whose peaks share a direction: where their own images' background patches share
    it too (how they were taken, not what they are), the similarity stage is not even a candidate;
    where the backgrounds deviate every way, it is weighed. model.json records the check."""
    rng = np.random.default_rng(7)
    dim, k = 24, 12
    unit = lambda v: v / np.linalg.norm(v, axis=-1, keepdims=True)  # noqa: E731
    shared = unit(rng.standard_normal(dim))
    defects = unit(2.0 * shared + rng.standard_normal((k, dim)) / np.sqrt(dim))
    goods = unit(rng.standard_normal((30, dim)))
    taken_alike = np.roll(defects, 1, axis=0)  # each image's background deviates as another labeled defect's peak does
    every_way = unit(rng.standard_normal((k, dim)))
    every_way[0] = np.nan  # a defect whose region covers its whole image has no background: left out
    outcomes = {}
    for name, backgrounds in (("alike", taken_alike), ("every way", every_way)):
        classifier, rows, _, _ = _with_labeled_defects(0.3, k)
        rows.good_directions, rows.real_directions, rows.real_backgrounds = goods, defects, backgrounds
        choice, note = decide_verdict(classifier, rows, 0.05, seed=0)
        outcomes[name] = (choice, note, classifier.report["verdict"]["own_backgrounds"])
    choice, note, check = outcomes["alike"]
    assert WITH_SIMILARITY not in choice.evidence and check["lower_bound"] <= 0.5 and check["n_defects"] == k
    assert "do not stand out from their own images' backgrounds" in note
    choice, note, check = outcomes["every way"]
    assert WITH_SIMILARITY in choice.evidence and check["lower_bound"] > 0.5 and check["rocauc"] > 0.9 and check["n_defects"] == k - 1
    # 4 validation goods with peak directions: no bound can show a gain, and the note says so and how to get more
    classifier, rows, _, _ = _with_labeled_defects(0.3, k)
    rows.good_rows, rows.good_directions, rows.real_directions, rows.real_backgrounds = slice(0, 4), goods[:4], defects, every_way
    choice, note = decide_verdict(classifier, rows, 0.05, seed=0)
    assert choice.verdict != WITH_SIMILARITY and note.startswith("too few goods to judge it: 4 validation goods carry peak directions")


def test_without_clear_held_out_evidence_the_verdict_ranks_exactly_like_the_image_score():
    """No labeled defects (synthetic ones held out are no evidence about real ones), or a perfect image
    score the trees cannot beat: the verdict is the image score's log-odds, the threshold from the goods."""
    for quality, k, reason in ((0.3, 0, "no labeled defects"), (20.0, 12, "no classifier beats the image score clearly")):
        classifier, rows, features, scores = _with_labeled_defects(quality, k)
        choice, _ = decide_verdict(classifier, rows, 0.05, seed=0)
        assert choice.verdict == IMAGE_SCORE and reason in choice.why
        assert classifier.tree_share == 0.0 and classifier.report["verdict"]["verdict"] == IMAGE_SCORE
        probability = classifier.predict(features, scores)
        assert np.array_equal(np.argsort(probability, kind="stable"), np.argsort(scores, kind="stable"))
        goods = probability[rows.labels == 0]
        assert np.mean(goods > classifier.threshold) <= 0.05 + 1 / len(goods) and 0 < classifier.threshold < 1  # one good of interpolation
        # such a verdict reads no trees, so test.py and serve.py skip the map features: the same probabilities, bit for bit
        assert not classifier.uses_trees and np.array_equal(classifier.predict(None, scores), probability)
        trees = classifier.booster.predict(xgb.DMatrix(np.asarray(features, dtype=np.float32), feature_names=classifier.feature_names), output_margin=True)
        assert np.array_equal(classifier.margin(None, scores), blend(trees.astype(np.float64), classifier.anchor.margin(scores), 0.0))


class _MeanModel:
    """A stand-in anomaly model whose map is the image's channel mean: enough to check how synthetic
    defect maps are made honest."""

    def score(self, images: torch.Tensor):
        maps = images.mean(dim=1)
        return maps, self.image_scores(maps)

    def image_scores(self, maps: torch.Tensor) -> torch.Tensor:
        return maps.flatten(1).max(dim=1).values


def test_synthetic_defects_on_fitted_images_get_their_hosts_honest_background(tmp_path):
    """honest + (map(defect) - map(host)): away from the defect the map is the host's honest one."""
    from dataset_manager import Preprocessor

    rng = np.random.default_rng(0)
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray((rng.random((48, 48, 3)) * 60 + 100).astype(np.uint8)).save(paths[-1])
    preprocessor = Preprocessor(48, 48, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    model = _MeanModel()
    fitted, _ = model.score(torch.stack([preprocessor.image_tensor(np.asarray(Image.open(p))) for p in paths]))
    honest = fitted + 2.0  # out-of-fold maps: here simply the fitted ones, raised
    plan = synthetic_plan(3, 5, seed=0)
    assert sorted(len(kinds) for kinds in plan) == [1, 2, 2] and sum(plan, []).count("cutpaste") == 2
    made = synthetic_defect_maps(model, preprocessor, paths, plan, DefectPainting((0.2, 0.3), (1.0, 1.0), np.random.default_rng(1), 4), honest_maps=honest)
    maps, scores, owners, kinds = made
    again = synthetic_defect_maps(model, preprocessor, paths, plan, DefectPainting((0.2, 0.3), (1.0, 1.0), np.random.default_rng(1), 4),
                                  honest_maps=honest, fitted_maps=fitted)
    assert torch.allclose(again[0], maps) and list(again[2]) == list(owners)
    plain, _, _, _ = synthetic_defect_maps(model, preprocessor, paths, plan, DefectPainting((0.2, 0.3), (1.0, 1.0), np.random.default_rng(1), 4))
    assert len(kinds) == 5 and sorted(owners.tolist()) == sorted(i for i, k in enumerate(plan) for _ in k)
    torch.testing.assert_close(maps, plain + 2.0)  # the defect's change on the honest background
    assert torch.equal(scores, maps.flatten(1).max(dim=1).values)


def _write_dataset(root: Path) -> Path:
    """A tiny MVTec-layout category: smooth gray gradients; defects are dark squares."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:64, 0:64]

    def good() -> np.ndarray:
        base = 120 + 40 * np.sin(xx / 6.0 + rng.uniform(-0.2, 0.2)) + rng.normal(0, 3, (64, 64))
        return np.clip(base, 0, 255).astype(np.uint8)

    def bad() -> np.ndarray:
        image = good()
        y, x = rng.integers(12, 40, size=2)
        image[y : y + 12, x : x + 12] = 10
        return image

    for folder, count, make in (("train/good", 24, good), ("validation/good", 9, good), ("test/good", 6, good), ("test/hole", 6, bad)):
        (root / folder).mkdir(parents=True)
        for i in range(count):
            Image.fromarray(make()).save(root / folder / f"{i:03d}.png")
    return root


def _script(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, name, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_scripts_end_to_end_with_the_classifier(tmp_path):
    data = _write_dataset(tmp_path / "parts")
    common = [f"DATASET_DIR={data}", f"MODEL_DIR={tmp_path / 'models'}", f"RESULTS_DIR={tmp_path / 'results'}", *TINY]
    trained = _script("train.py", *common)
    assert trained.returncode == 0, trained.stderr[-2000:]
    description = json.loads((tmp_path / "models" / "parts" / "model.json").read_text())
    entry = description["classifier"]
    assert entry["features"] == FEATURE_NAMES and "classifier.json" in description["files"]
    assert 0 <= entry["threshold"] <= 1 and sum(entry["n_synthetic_defects"].values()) == 27
    assert entry["anchor_mode"] == "shrink" and set(entry["anchor"]) == {"center", "scale", "intercept", "slope"}
    # synthetic defects only: no evidence about real defects, the verdict ranks like the image score (and train.py says so)
    assert entry["tree_share"] == 0.0 and entry["verdict"]["verdict"] == "image score" and "no labeled defects" in entry["verdict"]["why"]
    assert "verdict: image score (no labeled defects" in trained.stderr

    tested = _script("test.py", *common)
    assert tested.returncode == 0, tested.stderr[-2000:]
    (csv_path,) = (tmp_path / "results" / "parts").glob("test-*/predictions.csv")
    rows = list(csv.DictReader(csv_path.open()))
    assert len(rows) == 12 and all(0 <= float(r["classifier_probability"]) <= 1 for r in rows)
    evaluated = _script("eval.py", *common)
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]

    # a "shrink" classifier without its share would silently become another verdict: refused
    del entry["tree_share"]
    (tmp_path / "models" / "parts" / "model.json").write_text(json.dumps(description))
    refused = _script("test.py", *common)
    assert refused.returncode == 2 and "tree_share is missing" in refused.stderr and "Traceback" not in refused.stderr
    entry["tree_share"] = 0.5

    # a classifier saved with another feature list: one clear line, no traceback
    entry["features"] = entry["features"][:-1]
    (tmp_path / "models" / "parts" / "model.json").write_text(json.dumps(description))
    refused = _script("test.py", *common)
    assert refused.returncode == 2 and "retrain" in refused.stderr and "Traceback" not in refused.stderr



def _settings(tmp_path: Path, data: Path, *extra: str):
    return load([f"DATASET_DIR={data}", f"MODEL_DIR={tmp_path / 'models'}", f"RESULTS_DIR={tmp_path / 'results'}", *TINY, *extra])[0]


def test_training_errors_are_one_line_model_errors(tmp_path):
    data = _write_dataset(tmp_path / "parts")
    (category,) = find_categories(data)
    with pytest.raises(ModelError, match="no defect to learn from"):
        train_category(category, _settings(tmp_path, data, "CLASSIFIER_SYNTHETIC_DEFECTS=0"), tmp_path / "models" / "a")
    category.validation_images = []
    with pytest.raises(ModelError, match="no validation images"):
        train_category(category, _settings(tmp_path, data, "VALIDATION_FRACTION=0.0"), tmp_path / "models" / "b")
    assert not (tmp_path / "models" / "a").exists() and not (tmp_path / "models" / "b").exists()


def test_without_the_classifier_the_column_is_empty(tmp_path):
    data = _write_dataset(tmp_path / "parts")
    (category,) = find_categories(data)
    settings = _settings(tmp_path, data, "CLASSIFIER=False")
    train_category(category, settings, tmp_path / "models" / "parts")
    inspector = load_model_folder(tmp_path / "models" / "parts", "cpu")
    assert inspector.detector.classifier is None
    summary = predict_folder(inspector, data / "test", tmp_path / "results", settings)
    rows = list(csv.DictReader((summary.run_dir / "predictions.csv").open()))
    assert len(rows) == 12 and all(row["classifier_probability"] == "" for row in rows)
