"""PADIM_SCORE (Mahalanobis, hybrid Gaussian-Chebyshev, Chebyshev) and the Chebyshev pixel threshold."""

from __future__ import annotations

import json
import math

import pytest
import torch

from anomaly_model.errors import ModelError
from anomaly_model.chebyshev import pixel_threshold
from anomaly_model.gaussian import mahalanobis
from anomaly_model.maps import MapMaker
from anomaly_model.padim import Padim, PadimSettings
from anomaly_model.store import load_model, save_model
from conftest import SHARED, TINY, error_line, make_mvtec_category, outputs, run_script
from dataset_manager import ImageBatches, find_categories
from pipeline.training import calibrate, check_pixel_policy, make_preprocessor, pixel_policies, split_validation
from settings import SettingsError, load

INFO = {"preprocessing": {"resize": 64, "crop": 64, "mean": [0.5] * 3, "std": [0.2] * 3}}
TIRE = SHARED / "data" / "tire"
WEIGHTS = SHARED / "weights" / "mobilenet_v2_imagenet_features.pt"


@pytest.fixture(scope="module")
def model() -> Padim:
    """A small PaDiM, fitted on random images; tests switch its score (one backbone for them all)."""
    images = torch.randn(10, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    return Padim(PadimSettings(backbone="resnet18", weights="none", feature_dim=16), device="cpu").fit([images[:6], images[6:]])


def _scores(model: Padim, kind: str, weight: float, embedding, mean, cholesky) -> torch.Tensor:
    model.score_kind, model.chebyshev_weight = kind, weight
    return model.embedding_scores(embedding, mean, cholesky)


def _maps(model: Padim, kind: str, weight: float, probe: torch.Tensor) -> torch.Tensor:
    model.score_kind, model.chebyshev_weight = kind, weight
    return model.anomaly_maps(probe)


def _diagonal_statistics(sigma: list[float], positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero means and diagonal Cholesky factors diag(sigma) at every position."""
    return torch.zeros(positions, len(sigma)), torch.diag(torch.tensor(sigma))[None].repeat(positions, 1, 1)


def test_chebyshev_term_is_one_minus_one_over_k_squared(model):
    mean, cholesky = _diagonal_statistics([1.0, 2.0, 0.5], positions=4)
    embedding = torch.zeros(4, 1, 3)  # one image, four patches
    embedding[0, 0, 0] = 2.0  # k = 2 in channel 0
    embedding[1, 0, 1] = 6.0  # k = 3 in channel 1 (sigma 2)
    embedding[2, 0] = torch.tensor([0.5, 1.0, 0.25])  # k = 0.5 everywhere: below 1, the bound says nothing
    # patch 3 sits on the mean: k = 0
    term = _scores(model, "chebyshev", 0.5, embedding, mean, cholesky)[0]
    assert term.tolist() == pytest.approx([0.75, 8 / 9, 0.0, 0.0], abs=1e-6)


def test_zero_sigma_and_huge_deviations_stay_finite_and_below_one(model):
    mean, cholesky = _diagonal_statistics([1.0, 0.0, 1.0], positions=3)
    embedding = torch.zeros(3, 1, 3)
    embedding[1, 0, 1] = 1.0  # a channel that never varied, now off its mean
    embedding[2, 0, 0] = 1e30  # overflows k^2
    term = _scores(model, "chebyshev", 0.5, embedding, mean, cholesky)[0]
    assert torch.isfinite(term).all() and (term >= 0).all() and (term < 1).all()
    assert term[0] == 0 and term[1] > 0.999 and term[2] > 0.999


def test_hybrid_is_the_weighted_sum_of_distance_and_term(model):
    mean, cholesky = _diagonal_statistics([1.0, 2.0, 0.5], positions=2)
    embedding = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 0.0, 1.5]], [[1.0, 2.0, 0.5], [0.0, 0.0, 0.0]]])
    distance = mahalanobis(embedding, mean, cholesky)
    term = _scores(model, "chebyshev", 0.5, embedding, mean, cholesky)
    for weight in (0.0, 0.25, 0.5, 0.9):
        assert torch.allclose(_scores(model, "hybrid", weight, embedding, mean, cholesky), weight * distance + (1 - weight) * term)
    assert _scores(model, "hybrid", 0.5, embedding, mean, cholesky)[0, 0] == pytest.approx((2.0 + 0.75) / 2)


def test_weight_one_gives_exactly_the_mahalanobis_maps(model):
    probe = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    reference = _maps(model, "mahalanobis", 0.5, probe)
    assert torch.equal(_maps(model, "hybrid", 1.0, probe), reference)
    assert not torch.equal(_maps(model, "hybrid", 0.5, probe), reference)
    assert torch.isfinite(_maps(model, "chebyshev", 0.5, probe)).all()


def test_hybrid_model_round_trip_gives_identical_maps(tmp_path, model):
    model.score_kind, model.chebyshev_weight = "hybrid", 0.75
    save_model(tmp_path / "model", model, INFO)
    loaded, description = load_model(tmp_path / "model", "cpu")
    assert description["anomaly_model"]["settings"]["score_kind"] == loaded.score_kind == "hybrid"
    assert description["anomaly_model"]["settings"]["chebyshev_weight"] == loaded.chebyshev_weight == 0.75
    probe = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    assert torch.equal(loaded.anomaly_maps(probe), _maps(model, "hybrid", 0.75, probe))


def test_bad_score_settings_are_refused():
    with pytest.raises(ModelError, match="PADIM_SCORE='gauss'"):
        Padim(PadimSettings(backbone="resnet18", weights="none", score_kind="gauss"), device="cpu")
    with pytest.raises(ModelError, match="CHEBYSHEV_WEIGHT=1.5 must be between 0 and 1"):
        Padim(PadimSettings(backbone="resnet18", weights="none", score_kind="hybrid", chebyshev_weight=1.5), device="cpu")


def test_thresholds_follow_the_bound():
    d, rate = 100, 0.01
    assert pixel_threshold("mahalanobis", 0.5, d, rate) == pytest.approx(100.0)  # sqrt(d / rate)
    assert pixel_threshold("hybrid", 1.0, d, rate) == pytest.approx(100.0)
    assert pixel_threshold("hybrid", 0.5, d, rate) == pytest.approx(0.5 * 100 + 0.5)
    assert pixel_threshold("chebyshev", 0.5, d, rate) == pytest.approx(d / (d + rate))
    assert pixel_threshold("hybrid", 0.0, d, rate) == pytest.approx(d / (d + rate))


def test_map_pixels_are_convex_combinations_of_patch_scores():
    """What carries the patch-level bounds to the map (Jensen): upsampling and blur weigh the
    patch scores with non-negative weights that sum to 1."""
    rows, columns = MapMaker(4.0).operators((56, 56), (224, 224), torch.device("cpu"))
    for operator in (rows, columns):
        assert (operator >= 0).all()
        assert torch.allclose(operator.sum(dim=1), torch.ones(224), atol=1e-6)


@pytest.mark.skipif(not (TIRE.is_dir() and WEIGHTS.is_file()), reason="../shared (tire data and weights) is absent")
def test_good_tire_validation_patches_respect_chebyshev():
    """Real features, real good parts: the share of good validation patches beyond k sigma in a
    channel is at most 1/k^2, and the Chebyshev pixel thresholds are exceeded no more often than
    their bound. Fitted on every third training image to stay quick."""
    settings, _ = load([f"DATASET_DIR={TIRE}", "BACKBONE=mobilenet_v2", f"WEIGHTS={WEIGHTS}", "NUM_WORKERS=0"])
    (category,) = find_categories(TIRE)
    train, validation = split_validation(category, settings.VALIDATION_FRACTION, settings.SEED)
    model = Padim(PadimSettings(backbone="mobilenet_v2", weights=str(WEIGHTS)), device="cpu")
    preprocessor = make_preprocessor(settings, train, model.stride)
    model.fit(batch.images for batch in ImageBatches(train[::3], preprocessor, 16, 0))
    embedding = torch.cat([model.embed(batch.images)[0] for batch in ImageBatches(validation, preprocessor, 16, 0)], dim=1)
    sigma = torch.linalg.vector_norm(model.cholesky_, dim=2)[:, None, :]  # the covariance diagonal, epsilon included
    deviation = (embedding - model.mean_[:, None, :]).abs_().div_(sigma)
    for k in (1.5, 2.0, 3.0):
        assert float((deviation >= k).float().mean()) <= 1 / k**2
    for kind, rate in (("mahalanobis", 0.005), ("mahalanobis", 0.25), ("hybrid", 0.25), ("chebyshev", 0.25)):
        model.score_kind = kind
        maps = model.map_maker(model.embedding_scores(embedding, model.mean_, model.cholesky_).view(-1, *model.grid_size_), (224, 224))
        thresholds = calibrate(maps, maps.flatten(1).amax(dim=1), 0.05, rate)["thresholds"]
        pixel_policies(model, maps, thresholds, "chebyshev")
        entry = thresholds["pixel_policies"]["chebyshev"]
        assert thresholds["pixel"] == entry["threshold"] and entry["bound"] == rate
        assert entry["validation_exceedance"] <= rate, (kind, rate, entry)
    assert math.isclose(pixel_threshold("mahalanobis", 1, model.feature_dim, 0.25), 2 * math.sqrt(152))


@pytest.mark.parametrize(
    "setting, message",
    [
        ("CHEBYSHEV_WEIGHT=2", "CHEBYSHEV_WEIGHT=2.0 is not allowed: CHEBYSHEV_WEIGHT must be a number in [0, 1]"),
        ("PIXEL_THRESHOLD_POLICY=tight", "PIXEL_THRESHOLD_POLICY=tight is not allowed: PIXEL_THRESHOLD_POLICY must be one of"),
        ("PADIM_SCORE=cosine", "PADIM_SCORE=cosine is not allowed: PADIM_SCORE must be one of 'mahalanobis', 'hybrid', 'chebyshev'"),
    ],
)
def test_bad_values_give_one_clear_line(tmp_path, tiny_category, setting, message):
    arguments = [f"DATASET_DIR={tiny_category}", *TINY, *outputs(tmp_path), "PIXEL_THRESHOLD_POLICY=chebyshev", setting]
    assert message in error_line(run_script("train.py", *arguments))
    assert not (tmp_path / "models" / "part").exists()


def test_chebyshev_policy_needs_a_rate_and_is_checked_before_fitting(model):
    check_pixel_policy(model, "chebyshev", 0.005)
    check_pixel_policy(model, "validation", 0.0)
    with pytest.raises(SettingsError, match=r"needs PIXEL_FALSE_REJECT_RATE in \(0, 1\), got 0"):
        check_pixel_policy(model, "chebyshev", 0.0)
    with pytest.raises(SettingsError, match="PIXEL_THRESHOLD_POLICY='both' is not supported"):
        check_pixel_policy(model, "both", 0.005)


def test_hybrid_scripts_end_to_end_with_the_chebyshev_threshold(tmp_path):
    category = make_mvtec_category(tmp_path / "data" / "part")
    settings = [f"DATASET_DIR={category}", *TINY, *outputs(tmp_path), "PADIM_SCORE=hybrid", "PIXEL_THRESHOLD_POLICY=chebyshev",
                "PIXEL_FALSE_REJECT_RATE=0.05", "CLASSIFIER_SYNTHETIC_DEFECTS=20", "CLASSIFIER_FOLDS=2"]
    trained = run_script("train.py", *settings)
    assert trained.returncode == 0, trained.stderr
    description = json.loads((tmp_path / "models" / "part" / "model.json").read_text())
    assert description["anomaly_model"]["settings"]["score_kind"] == "hybrid"
    thresholds = description["thresholds"]
    bound = thresholds["pixel_policies"]["chebyshev"]
    assert thresholds["pixel_policy"] == "chebyshev" and thresholds["pixel"] == bound["threshold"]
    assert bound["threshold"] == pytest.approx(0.5 * math.sqrt(description["anomaly_model"]["settings"]["feature_dim"] / 0.05) + 0.5)
    assert bound["validation_exceedance"] <= 0.05
    assert "classifier" in description

    plain = settings[:-5]  # config.py's score and policy: the model's own settings win, and test.py says so
    tested = run_script("test.py", *plain)
    assert tested.returncode == 0, tested.stderr
    assert "PADIM_SCORE: model has 'hybrid', config has 'mahalanobis'" in tested.stderr
    assert "PIXEL_THRESHOLD_POLICY: model has 'chebyshev', config has 'validation'" in tested.stderr
    (run_dir,) = (tmp_path / "results" / "part").iterdir()
    rows = (run_dir / "predictions.csv").read_text().splitlines()
    assert len(rows) == 9 and all("nan" not in row and "inf" not in row for row in rows)

    evaluated = run_script("eval.py", *plain)
    assert evaluated.returncode == 0, evaluated.stderr
    (eval_dir,) = [p for p in (tmp_path / "results").iterdir() if p.name.startswith("eval-")]
    metrics = json.loads((eval_dir / "part" / "metrics.json").read_text())
    assert metrics["image_rocauc"] == 1.0
    rows = metrics["pixel_thresholds"]
    assert rows["chebyshev"]["in_use"] and not rows["validation"]["in_use"]
    assert rows["chebyshev"]["test_good_exceedance"] <= 0.05
    assert 0 <= rows["validation"]["test_defect_pixel_recall"] <= 1
    assert "| chebyshev |" in (eval_dir / "metrics.md").read_text()
    assert "Pixel thresholds" in (eval_dir / "report.html").read_text()
