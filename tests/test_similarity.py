"""The verdict's second stage, learned from labeled defects (classification_model/similarity.py):
fitted when the labeled defects' worst patches deviate alike, with held-out scores that show it
ranks them better; kept by the held-out evidence (classification_model/evidence.py) only when that
gain over the image score is clear, not when the defects' whole maps lie above every good's, are
too few, or the first stage leaves nothing to add; saved and reloaded as trained; and refused where
the peak directions cannot be computed (onnxruntime, export)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from anomaly_model.errors import ModelError
from anomaly_model.padim import Padim, PadimSettings
from classification_model.features import FEATURE_NAMES
from classification_model.evidence import IMAGE_SCORE, WITH_SIMILARITY, HeldOutRows, choose_verdict
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
    return shared, (good_margins, good_directions, defect_margins, defect_directions)


def _evidence(held_out: np.ndarray, arguments, shift: float = 0.0, seed: int = 0):
    """The similarity candidate's held-out evidence against an image score that ranks like the first
    stage; the defects' map medians `shift` above the goods' (which spread with std 0.2)."""
    good_margins, _, defect_margins, _ = arguments
    rng = np.random.default_rng(seed)
    n_good, k = len(good_margins), len(defect_margins)
    labels = np.r_[np.zeros(n_good), np.ones(k)]
    medians = np.r_[rng.normal(5, 0.2, n_good), rng.normal(5 + shift, 0.2, k)]
    rows = HeldOutRows(labels, held_out, np.r_[good_margins, defect_margins], medians)
    return choose_verdict({WITH_SIMILARITY: rows}, seed)


def test_the_stage_is_kept_when_labeled_defects_deviate_alike_and_ranks_new_ones_higher():
    shared, arguments = _examples(k=12)
    similarity, held_out, why = fit_defect_similarity(*arguments)
    assert similarity is not None, why
    assert why == "" and similarity.similarity_weight > 0 and similarity.verdict_weight >= 0 and similarity.n_defects == 12
    assert similarity.prototype @ shared > 0.9  # the prototype found the defects' shared direction
    choice = _evidence(held_out, arguments)
    assert choice.verdict == WITH_SIMILARITY, choice.why
    entry = choice.evidence[WITH_SIMILARITY]
    assert entry.lower_bound > 0 and entry.gain > entry.lower_bound and entry.n_defects == 12 and entry.n_goods == 40
    # new images: the same first-stage overlap, defects deviating the shared way
    rng = np.random.default_rng(1)
    goods, defects = _unit(rng.standard_normal((50, DIM))), _unit(1.5 * shared + rng.standard_normal((50, DIM)) / np.sqrt(DIM))
    first = np.r_[rng.normal(0, 1, 50), rng.normal(0.8, 1, 50)]
    labels = np.r_[np.zeros(50), np.ones(50)]
    final = similarity.margin(first, np.r_[goods, defects])
    assert image_rocauc(labels, final) > image_rocauc(labels, first) + 0.1


def test_labeled_defects_whose_whole_maps_lie_above_every_goods_are_thin_evidence_and_fall_back():
    """Defects whose maps lie higher overall than every good's (another acquisition, or a kind that
    raises the whole map) meet few goods taken like them: the same gain no longer counts as clear."""
    _, arguments = _examples(k=12)
    _, held_out, _ = fit_defect_similarity(*arguments)
    shifted = _evidence(held_out, arguments, shift=2.0)
    assert shifted.verdict == IMAGE_SCORE and "the labeled defects do not change the verdict" in shifted.why
    assert shifted.evidence[WITH_SIMILARITY].effective_goods < 2 < _evidence(held_out, arguments).evidence[WITH_SIMILARITY].effective_goods


def test_defects_among_the_goods_count_at_most_fully_and_never_more_goods_than_there_are():
    """A defect whose map median sits where the goods' medians crowd weighs no more than a plain
    pair: the held-out gain is at most the plain ROCAUC difference, the goods counted alike at most
    the goods there are, so a handful of goods cannot pass MIN_ALIKE_GOODS."""
    rng = np.random.default_rng(3)
    for n_good in (8, 60):
        medians = np.r_[rng.normal(5, 0.2, n_good), np.full(10, 5.0)]  # every defect at the goods' centre
        labels = np.r_[np.zeros(n_good), np.ones(10)]
        image_scores = rng.normal(0, 1, n_good + 10)
        candidate = np.r_[rng.normal(0, 1, n_good), np.full(10, 9.0)]  # ranks every defect first
        rows = HeldOutRows(labels, candidate, image_scores, medians)
        evidence = choose_verdict({WITH_SIMILARITY: rows}, 0).evidence[WITH_SIMILARITY]
        plain = 1.0 - image_rocauc(labels, image_scores)
        assert 0 < evidence.gain <= plain + 1e-12
        assert evidence.effective_goods <= n_good
    assert choose_verdict({WITH_SIMILARITY: HeldOutRows(labels[-18:], candidate[-18:], image_scores[-18:], medians[-18:])}, 0).verdict == IMAGE_SCORE


def test_too_few_labeled_defects_or_no_shared_direction_leave_no_stage():
    _, arguments = _examples(k=MIN_DEFECTS - 1)
    similarity, held_out, why = fit_defect_similarity(*arguments)
    assert similarity is None and held_out is None and f"at least {MIN_DEFECTS} labeled defects" in why
    _, arguments = _examples(alike=0.0)  # defects deviate every way, like the goods
    similarity, _, why = fit_defect_similarity(*arguments)
    if similarity is not None:  # a fit may still weigh the noise a little: held out, it is no clear gain
        assert _evidence(fit_defect_similarity(*arguments)[1], arguments).verdict == IMAGE_SCORE
    else:
        assert why


def test_a_stage_that_only_looks_better_in_sample_is_not_kept():
    """A perfect first stage leaves the similarity nothing to add: held out, it ranks no better."""
    _, (good_margins, good_directions, _, defect_directions) = _examples()
    perfect = np.full(len(defect_directions), 10.0)  # every labeled defect far above every good
    arguments = (good_margins, good_directions, perfect, defect_directions)
    similarity, held_out, why = fit_defect_similarity(*arguments)
    assert similarity is None or _evidence(held_out, arguments).verdict == IMAGE_SCORE


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


def test_background_peak_is_the_highest_patch_outside_the_grown_region_of_the_peak():
    """`background_positions` against a plain flood fill: the patches above the level connected (8
    neighbours) to the peak, grown by 2, are the defect's region; the highest patch outside it is the
    background peak, none (-1) when the region covers the image."""
    from scipy import ndimage

    from anomaly_model.base import background_positions

    rng = np.random.default_rng(0)
    scores = torch.from_numpy(rng.random((8, 12, 14)).astype(np.float32))
    scores[0] = 0.1
    scores[0, 3:6, 4:9] = 0.9  # a defect: a block above the level
    scores[1] = 0.95  # everything above the level: no background
    found = background_positions(scores, 0.8, grow=2)
    for image, grid in enumerate(scores.numpy()):
        peak = np.unravel_index(grid.argmax(), grid.shape)
        components, _ = ndimage.label(grid > 0.8, structure=np.ones((3, 3)))
        region = components == components[peak] if components[peak] else np.zeros(grid.shape, bool)
        region[peak] = True
        region = ndimage.binary_dilation(region, structure=np.ones((3, 3)), iterations=2)
        outside = np.where(region, -np.inf, grid)
        assert int(found[image]) == (int(outside.argmax()) if np.isfinite(outside.max()) else -1)
    assert int(found[1]) == -1 and not (3 - 2 <= int(found[0]) // 14 < 6 + 2 and 4 - 2 <= int(found[0]) % 14 < 9 + 2)


def test_background_peak_directions_are_the_peak_directions_of_that_patch():
    """PaDiM and PatchCore give at the background peak the same kind of unit vector as at the peak."""
    from anomaly_model.base import background_positions
    from anomaly_model.patchcore import PatchCore, PatchCoreSettings

    torch.manual_seed(0)
    train, new = torch.randn(6, 3, 64, 64), torch.randn(3, 3, 64, 64)
    padim = Padim(PadimSettings(backbone="resnet18", weights="none", feature_dim=16), device="cpu").fit_images([train])
    patch = padim.patch_scores(new)
    level = float(patch.quantile(0.9))
    where = background_positions(patch, level)
    directions = padim.background_peaks(new, level)
    embedding, _ = padim.embed(new)
    for image in range(3):
        position = int(where[image])
        deviation = embedding[position, image] - padim.mean_[position]
        back = padim.cholesky_[position] @ directions[image]
        assert torch.allclose(back / back.norm(), deviation / deviation.norm(), atol=1e-4)
    assert torch.isnan(padim.background_peaks(new, -1.0)).all()  # every patch above the level: no background
    patchcore = PatchCore(PatchCoreSettings(backbone="resnet18", weights="none", coreset_ratio=0.5), device="cpu")
    patchcore.fit_images([train])
    embedding, distances, nearest, grid = patchcore.nearest_patches(new)
    level = float(distances.quantile(0.9))
    rows = background_positions(distances.view(3, *grid), level) + torch.arange(3) * grid[0] * grid[1]
    deviation = embedding[rows] - patchcore.memory_[nearest[rows]]
    assert torch.allclose(patchcore.background_peaks(new, level), deviation / deviation.norm(dim=1, keepdim=True), atol=1e-5)


def test_too_few_goods_to_judge_is_said_as_such():
    """With 2 goods no bound means anything: the line says the goods are too few and how to get more,
    not that the classifier lost; a gain that rounds to nothing is never printed as -0.000."""
    from classification_model.evidence import HeldOutRows, choose_verdict

    labels = np.r_[np.zeros(2), np.ones(6)]
    rows = HeldOutRows(labels, np.r_[0.1, 0.2, np.linspace(1, 2, 6)], np.r_[0.1, 0.2, np.linspace(1, 2, 6)] - 1e-9, np.zeros(8))
    choice = choose_verdict({"classifier": rows}, seed=0)
    assert choice.verdict == IMAGE_SCORE and "too few good images taken like the labeled defects" in choice.why
    assert "add good images" in choice.why and "-0.000" not in choice.why
