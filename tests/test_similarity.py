"""The verdict's second stage, learned from labeled defects (classification_model/similarity.py):
kept when the labeled defects' worst patches deviate alike and that ranks them better, dropped (with
the reason) when they look taken differently, are too few, or gain nothing; saved and reloaded as
trained; and refused where the peak directions cannot be computed (onnxruntime, export)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from anomaly_model.backbone import ModelError
from anomaly_model.padim import Padim, PadimSettings
from classification_model.features import FEATURE_NAMES
from classification_model.similarity import MIN_DEFECTS, DefectSimilarity, fit_defect_similarity, leave_one_out_similarities
from classification_model.xgboost import Anchoring, ClassifierParams, ClassifierRows, DefectClassifier, train_classifier
from conftest import TINY, error_line, outputs, run_script, save, texture
from evaluation.metrics import image_rocauc

DIM = 32


def _unit(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.linalg.norm(vectors, axis=-1, keepdims=True)


def _examples(seed: int = 0, n_good: int = 40, k: int = 8, alike: float = 1.5):
    """Goods whose peaks deviate every way, defects whose peaks deviate along one shared direction
    (`alike`: its weight against the noise), and a first stage that ranks them imperfectly."""
    rng = np.random.default_rng(seed)
    shared = _unit(rng.standard_normal(DIM))
    good_directions = _unit(rng.standard_normal((n_good, DIM)))
    defect_directions = _unit(alike * shared + rng.standard_normal((k, DIM)) / np.sqrt(DIM))
    good_margins, defect_margins = rng.normal(0, 1, n_good), rng.normal(0.8, 1, k)
    good_medians, defect_medians = rng.normal(5, 0.2, 200), rng.normal(5, 0.2, k)
    return shared, (good_margins, good_directions, defect_margins, defect_directions, good_medians, defect_medians)


def test_the_stage_is_kept_when_labeled_defects_deviate_alike_and_ranks_new_ones_higher():
    shared, arguments = _examples()
    similarity, why = fit_defect_similarity(*arguments)
    assert similarity is not None, why
    assert why == "" and similarity.similarity_weight > 0 and similarity.verdict_weight >= 0 and similarity.n_defects == 8
    assert similarity.prototype @ shared > 0.9  # the prototype found the defects' shared direction
    # new images: the same first-stage overlap, defects deviating the shared way
    rng = np.random.default_rng(1)
    goods, defects = _unit(rng.standard_normal((50, DIM))), _unit(1.5 * shared + rng.standard_normal((50, DIM)) / np.sqrt(DIM))
    first = np.r_[rng.normal(0, 1, 50), rng.normal(0.8, 1, 50)]
    labels = np.r_[np.zeros(50), np.ones(50)]
    final = similarity.margin(first, np.r_[goods, defects])
    assert image_rocauc(labels, final) > image_rocauc(labels, first) + 0.1


def test_labeled_defects_whose_whole_maps_lie_higher_are_taken_as_another_acquisition_and_dropped():
    _, arguments = _examples()
    shifted = (*arguments[:5], arguments[5] + 2.0)  # every labeled defect's map median above every good's
    similarity, why = fit_defect_similarity(*shifted)
    assert similarity is None
    assert "taken differently" in why and "8 labeled defects" in why and "200 good images" in why


def test_too_few_labeled_defects_or_no_shared_direction_drop_the_stage():
    _, arguments = _examples(k=MIN_DEFECTS - 1)
    similarity, why = fit_defect_similarity(*arguments)
    assert similarity is None and f"at least {MIN_DEFECTS} labeled defects" in why
    _, arguments = _examples(alike=0.0)  # defects deviate every way, like the goods
    similarity, why = fit_defect_similarity(*arguments)
    assert similarity is None and why


def test_a_stage_that_only_looks_better_in_sample_is_dropped():
    """A perfect first stage leaves the similarity nothing to add: held out, it ranks no better."""
    _, (good_margins, good_directions, _, defect_directions, good_medians, defect_medians) = _examples()
    perfect = np.full(len(defect_directions), 10.0)  # every labeled defect far above every good
    similarity, why = fit_defect_similarity(good_margins, good_directions, perfect, defect_directions, good_medians, defect_medians)
    assert similarity is None and "no better than the first stage alone" in why


def test_leave_one_out_similarity_leaves_each_defect_out_of_its_own_prototype():
    rng = np.random.default_rng(3)
    directions = _unit(rng.standard_normal((5, DIM)))
    prototype, loo = leave_one_out_similarities(directions)
    assert np.isclose(np.linalg.norm(prototype), 1)
    others = _unit(directions[1:].sum(axis=0))
    assert np.isclose(loo[0], directions[0] @ others)


def _classifier_with_stage() -> tuple[DefectClassifier, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    features = rng.random((60, len(FEATURE_NAMES))).astype(np.float32)
    labels = np.r_[np.zeros(30), np.ones(30)]
    features[labels == 1] += 0.3
    scores = features[:, 0].astype(np.float64)
    classifier = train_classifier(ClassifierRows(features, labels, np.arange(60), image_scores=scores), FEATURE_NAMES,
                                  ClassifierParams(max_rounds=20), 0.05, anchoring=Anchoring("shrink", shrink_goods=200))
    assert classifier.out_of_fold_margin.shape == (60,)  # what the second stage is fitted on
    similarity = DefectSimilarity(_unit(rng.standard_normal(DIM)), -1.0, 0.5, 3.0, 6)
    directions = _unit(rng.standard_normal((60, DIM)))
    classifier.add_similarity(similarity, classifier.out_of_fold_margin[:30], directions[:30], 0.1)
    return classifier, features, scores, directions


def test_a_classifier_with_the_stage_saves_and_reloads_the_same_verdicts_and_needs_directions():
    classifier, features, scores, directions = _classifier_with_stage()
    first = DefectClassifier(classifier.booster, classifier.feature_names, 0.5, anchor=classifier.anchor, tree_share=classifier.tree_share)
    expected = classifier.similarity.margin(first.margin(features, scores), directions)
    assert np.allclose(classifier.margin(features, scores, directions), expected)
    # the threshold rejects 10 % of the goods' final probabilities
    assert np.isclose((classifier.predict(features[:30], scores[:30], directions[:30]) >= classifier.threshold).mean(), 0.1, atol=0.04)
    loaded = DefectClassifier.from_bytes(classifier.to_bytes(), classifier.feature_names, classifier.threshold, FEATURE_NAMES,
                                         classifier.anchor.to_dict(), classifier.tree_share, classifier.similarity.to_dict())
    assert np.allclose(loaded.margin(features, scores, directions), classifier.margin(features, scores, directions), atol=1e-5)
    with pytest.raises(ModelError, match="peak directions"):
        loaded.margin(features, scores)


def test_padim_peak_directions_are_unit_whitened_deviations_of_the_worst_patch_and_leave_maps_unchanged():
    torch.manual_seed(0)
    model = Padim(PadimSettings(backbone="resnet18", weights="none", feature_dim=16), device="cpu")
    train, new = torch.randn(6, 3, 64, 64), torch.randn(3, 3, 64, 64)
    model.fit_images([train])
    maps, scores = model.score(new)
    maps_too, scores_too, directions = model.score_with_peaks(new)
    assert torch.equal(maps, maps_too) and torch.equal(scores, scores_too)
    assert directions.shape == (3, 16) and torch.allclose(directions.norm(dim=1), torch.ones(3))
    embedding, _ = model.embed(new)
    patch = model.patch_scores(new).flatten(1)
    peak = patch.argmax(dim=1)
    for image in range(3):  # L u is parallel to x - mu at the peak, and |L^-1 (x - mu)| is the peak's distance
        deviation = embedding[peak[image], image] - model.mean_[peak[image]]
        back = model.cholesky_[peak[image]] @ directions[image]
        assert torch.allclose(back / back.norm(), deviation / deviation.norm(), atol=1e-4)


def _tiny_model_with_stage(tmp_path) -> list[str]:
    """A tiny trained model whose classifier then gets a similarity stage written into model.json
    (random weights cannot learn one: every defect moves their whole map)."""
    rng = np.random.default_rng(0)
    root = tmp_path / "data" / "part"
    for number in range(12):
        save(texture(rng), root / "train" / "good" / f"{number:03d}.png")
    for number in range(4):
        save(texture(rng), root / "validation" / "good" / f"{number:03d}.png")
        save(texture(rng), root / "test" / "good" / f"{number:03d}.png")
    settings = [*TINY, f"DATASET_DIR={root}", "SAVE_PICTURES=False", *outputs(tmp_path)]
    trained = run_script("train.py", *settings)
    assert trained.returncode == 0, trained.stderr[-2000:]
    path = tmp_path / "models" / "part" / "model.json"
    description = json.loads(path.read_text())
    dim = description["anomaly_model"]["settings"]["feature_dim"]
    stage = DefectSimilarity(_unit(np.ones(dim)), 0.0, 1.0, 2.0, 5)
    description["classifier"]["similarity"] = stage.to_dict()
    path.write_text(json.dumps(description))
    return settings


def test_a_model_with_the_stage_scores_with_torch_and_refuses_onnx_in_one_line(tmp_path):
    settings = _tiny_model_with_stage(tmp_path)
    tested = run_script("test.py", str(tmp_path / "data" / "part" / "test"), *settings)
    assert tested.returncode == 0, tested.stderr[-2000:]
    (csv_path,) = (tmp_path / "results").rglob("predictions.csv")
    rows = csv_path.read_text().splitlines()[1:]
    assert len(rows) == 4 and all(row.split(",")[-1] for row in rows)  # every image has a classifier probability
    line = error_line(run_script("export.py", *settings))
    assert "labeled defects" in line and "RUNTIME=torch" in line and "nothing was written" in line
    assert not (tmp_path / "models" / "part" / "model.onnx").exists()
    line = error_line(run_script("test.py", str(tmp_path / "data" / "part" / "test"), *settings, "RUNTIME=onnxruntime"))
    assert "labeled defects" in line and "RUNTIME=torch" in line


def test_a_stage_that_does_not_fit_the_anomaly_model_is_refused_in_one_line(tmp_path):
    settings = _tiny_model_with_stage(tmp_path)
    path = tmp_path / "models" / "part" / "model.json"
    description = json.loads(path.read_text())
    description["classifier"]["similarity"]["prototype"] = [1.0, 0.0, 0.0]
    path.write_text(json.dumps(description))
    line = error_line(run_script("test.py", str(tmp_path / "data" / "part" / "test"), *settings))
    assert "similarity stage does not fit its anomaly model" in line and "3 numbers" in line and "retrain" in line


def test_patchcore_peak_directions_point_from_the_nearest_coreset_feature_and_keep_eq7_scores():
    from anomaly_model.patchcore import PatchCore, PatchCoreSettings

    torch.manual_seed(0)
    model = PatchCore(PatchCoreSettings(backbone="resnet18", weights="none", coreset_ratio=0.5, neighbors=3), device="cpu")
    model.fit_images([torch.randn(6, 3, 64, 64)])
    new = torch.randn(3, 3, 64, 64)
    maps, scores = model.score(new)
    maps_too, scores_too, directions = model.score_with_peaks(new)
    assert torch.equal(maps, maps_too) and torch.equal(scores, scores_too)  # eq. 7 weights included
    embedding, distances, nearest, grid = model.nearest_patches(new)
    worst = distances.view(3, -1).argmax(dim=1) + torch.arange(3) * grid[0] * grid[1]
    deviation = embedding[worst] - model.memory_[nearest[worst]]
    assert torch.allclose(directions, deviation / deviation.norm(dim=1, keepdim=True), atol=1e-5)
