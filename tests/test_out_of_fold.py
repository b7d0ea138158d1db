"""Cross-fitting: out-of-fold anomaly maps of the training images equal those of a model refitted
without each fold (PaDiM's leave-fold-out Gaussians are exact), and the fitted model is unchanged."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from anomaly_model.padim import Padim, PadimSettings
from pipeline.training import assign_folds

IMAGES = 26


def _images() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    ramp = torch.linspace(-1, 1, 64)[None, None, None, :]
    return torch.randn(IMAGES, 3, 64, 64, generator=generator) * 0.3 + ramp


def _model() -> Padim:
    return Padim(PadimSettings(backbone="resnet18", weights="none", layers=(1, 2), feature_dim=40), device="cpu")


@pytest.mark.filterwarnings("ignore")
def test_out_of_fold_maps_equal_a_model_refitted_without_the_fold(monkeypatch):
    images = _images()
    skipped = 5  # an unreadable training image: the fit and the second pass both leave it out
    kept = [i for i in range(IMAGES) if i != skipped]
    folds = assign_folds(IMAGES, 3, seed=1)

    def batches(wanted=None):
        chosen = [i for i in kept if wanted is None or i in wanted]
        for start in range(0, len(chosen), 8):
            rows = chosen[start : start + 8]
            yield images[rows], rows

    model = _model().fit(b for b, _ in batches())
    mean, factor = model.mean_.clone(), model.cholesky_.clone()
    import anomaly_model.padim as padim

    monkeypatch.setattr(padim, "OUT_OF_FOLD_BYTES", 1)  # one fold per pass: the multi-pass path too
    results = {}
    for indices, maps, scores, directions in model.out_of_fold_scores(batches, folds, peaks=True):
        assert maps.device.type == "cpu" and maps.shape == (len(indices), 64, 64) and scores.shape == (len(indices),)
        assert directions.device.type == "cpu" and directions.shape == (len(indices), 40)
        results.update({index: (maps[row], scores[row], directions[row]) for row, index in enumerate(indices)})
    assert sorted(results) == kept
    assert torch.equal(model.mean_, mean) and torch.equal(model.cholesky_, factor)
    for fold in range(3):
        held = [i for i in kept if folds[i] == fold]
        refit = _model().fit([images[[i for i in kept if folds[i] != fold]]])
        expected_maps, expected_scores, expected_directions = refit.score_with_peaks(images[held])
        got_maps = torch.stack([results[i][0] for i in held])
        got_scores = torch.stack([results[i][1] for i in held])
        torch.testing.assert_close(got_maps, expected_maps, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(got_scores, expected_scores, rtol=1e-4, atol=1e-4)
        # the peak directions the similarity stage weighs the goods by: those of the refitted model
        torch.testing.assert_close(torch.stack([results[i][2] for i in held]), expected_directions, rtol=1e-3, atol=1e-4)
        # and not merely the full model's maps: the training images' own maps are cleaner
        assert model.score(images[held])[1].mean() < got_scores.mean()


def test_folds_are_balanced_shuffled_and_seeded():
    folds = assign_folds(103, 5, seed=0)
    assert sorted(np.bincount(folds).tolist()) == [20, 20, 21, 21, 21]
    assert not np.array_equal(folds, np.arange(103) % 5)  # not the file order
    assert np.array_equal(folds, assign_folds(103, 5, seed=0)) and not np.array_equal(folds, assign_folds(103, 5, seed=1))
