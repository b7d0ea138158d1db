"""The PaDiM arithmetic against plain per-position numpy/scipy computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter
from scipy.spatial.distance import mahalanobis as scipy_mahalanobis

from anomaly_model.errors import ModelError
from anomaly_model.gaussian import StreamingGaussian, mahalanobis, whitening_factors
from anomaly_model.maps import blurred_upsample_matrix, gaussian_blur
from anomaly_model.padim import Padim, PadimSettings


def _random_embeddings(n: int = 40, d: int = 6, positions: int = 5, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(d, d, generator=generator)
    return torch.randn(positions, n, d, generator=generator) @ mixing + 3.0  # (P, N, d)


def test_mahalanobis_matches_per_position_numpy():
    train = _random_embeddings()
    test = _random_embeddings(n=7, seed=1)
    accumulator = StreamingGaussian()
    accumulator.update(train.clone())
    mean, factor = accumulator.finalize(epsilon=0.01)
    solved = mahalanobis(test, mean, factor).numpy()  # (N, P)
    multiplied = mahalanobis(test, mean, factor, whitening_factors(factor)).numpy()  # the inverses in row blocks (d = 6: 4 blocks of 2, 1, 1, 2 rows)

    data = train.double().numpy()
    for distances in (solved, multiplied):
        for position in range(data.shape[0]):
            samples = data[position]
            covariance = np.cov(samples, rowvar=False) + 0.01 * np.eye(samples.shape[1])
            precision = np.linalg.inv(covariance)
            expected = [scipy_mahalanobis(x, samples.mean(axis=0), precision) for x in test.double().numpy()[position]]
            np.testing.assert_allclose(distances[:, position], expected, rtol=1e-4)
    np.testing.assert_allclose(multiplied, solved, rtol=1e-5)


def test_padim_scores_with_the_inverses_of_its_current_factors():
    """The fitted model scores by products with its factors' inverses, built once and rebuilt when the
    factors are replaced (an update, a load): the same maps as the triangular solves, never stale ones."""
    images = torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    model = Padim(PadimSettings(backbone="resnet18", weights="none", feature_dim=12), device="cpu").fit([images[:6]])
    embedding, _ = model.embed(images[6:])
    solved = mahalanobis(embedding, model.mean_, model.cholesky_)
    whitening = model.whitening()
    assert whitening is not None and model.whitening() is whitening
    torch.testing.assert_close(model.embedding_scores(embedding, model.mean_, model.cholesky_), solved, rtol=1e-5, atol=0)
    model.cholesky_ = model.cholesky_ * 2  # new factors: every distance halves
    assert model.whitening() is not whitening
    torch.testing.assert_close(model.embedding_scores(embedding, model.mean_, model.cholesky_), solved / 2, rtol=1e-5, atol=0)


def test_streaming_fit_equals_one_shot_for_any_batch_size():
    data = _random_embeddings(n=37)
    results = []
    for batch_size in (37, 10, 3):
        accumulator = StreamingGaussian()
        for start in range(0, 37, batch_size):
            accumulator.update(data[:, start : start + batch_size].clone())
        results.append(accumulator.finalize(epsilon=0.01))
    for mean, factor in results[1:]:
        torch.testing.assert_close(mean, results[0][0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(factor, results[0][1], rtol=1e-4, atol=1e-4)


def test_padim_maps_do_not_depend_on_training_batch_size():
    images = torch.randn(12, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    probe = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    maps = []
    for batch_size in (12, 5):
        model = Padim(PadimSettings(backbone="resnet18", weights="none", feature_dim=20), device="cpu")
        model.fit(images[start : start + batch_size] for start in range(0, 12, batch_size))
        maps.append(model.anomaly_maps(probe))
    torch.testing.assert_close(maps[0], maps[1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape, sigma", [((40, 56), 4.0), ((8, 8), 4.0), ((16, 20), 4.0), ((32, 32), 8.0), ((5, 70), 2.5)])
def test_blur_matches_scipy_gaussian_filter(shape, sigma):
    # sides shorter than the kernel's radius (BLUR_SIGMA large for a small map) reflect again, as scipy does
    maps = np.random.default_rng(0).random((2, *shape)).astype(np.float32)
    expected = np.stack([gaussian_filter(m, sigma=sigma) for m in maps])
    np.testing.assert_allclose(gaussian_blur(torch.from_numpy(maps), sigma).numpy(), expected, atol=1e-5)


@pytest.mark.parametrize("source, target", [((4, 7), (12, 20)), ((14, 14), (56, 72))])
def test_upsampled_blurred_map_matches_interpolate_then_scipy(source, target):
    patches = torch.from_numpy(np.random.default_rng(1).random((1, 1, *source)).astype(np.float32))
    upsampled = torch.nn.functional.interpolate(patches, size=target, mode="bilinear", align_corners=False)[0, 0].numpy()
    rows = blurred_upsample_matrix(source[0], target[0], 4.0)
    columns = blurred_upsample_matrix(source[1], target[1], 4.0)
    np.testing.assert_allclose((rows @ patches[0, 0] @ columns.T).numpy(), gaussian_filter(upsampled, sigma=4.0), atol=1e-5)


def test_anomaly_map_is_highest_where_the_image_differs():
    generator = torch.Generator().manual_seed(0)
    good = 0.1 * torch.randn(16, 3, 64, 64, generator=generator)
    model = Padim(PadimSettings(backbone="resnet18", weights="none", feature_dim=30), device="cpu").fit([good[:8], good[8:]])
    odd = 0.1 * torch.randn(1, 3, 64, 64, generator=generator)
    odd[:, :, 40:56, 40:56] = 3.0
    heat = model.anomaly_maps(odd)[0]
    assert heat[40:56, 40:56].mean() > 2 * heat[:24, :24].mean()


def test_singular_covariance_names_the_setting_to_change():
    accumulator = StreamingGaussian()
    accumulator.update(_random_embeddings(n=3, d=6))  # 3 images cannot span 6 dimensions
    with pytest.raises(ModelError, match="COVARIANCE_EPSILON"):
        accumulator.finalize(epsilon=0.0)


def test_negative_epsilon_is_refused():
    with pytest.raises(ModelError, match="COVARIANCE_EPSILON=-0.1"):
        Padim(PadimSettings(backbone="resnet18", weights="none", feature_dim=8, epsilon=-0.1), device="cpu")


def test_backbone_precision_is_checked():
    with pytest.raises(ModelError, match="BACKBONE_PRECISION='float8'"):
        Padim(PadimSettings(backbone="resnet18", weights="none", feature_dim=8, precision="float8"), device="cpu")
    with pytest.raises(ModelError, match="float16 needs a CUDA GPU"):
        Padim(PadimSettings(backbone="resnet18", weights="none", feature_dim=8, precision="float16"), device="cpu")


def test_bfloat16_backbone_keeps_maps_close_to_float32():
    """Reduced precision is a speed option: the maps it gives must stay near the float32 ones."""
    generator = torch.Generator().manual_seed(5)
    good = torch.randn(12, 3, 64, 64, generator=generator)
    probe = torch.randn(3, 3, 64, 64, generator=generator)
    maps = [Padim(PadimSettings(backbone="resnet18", weights="none", feature_dim=20, precision=p), device="cpu").fit([good]).anomaly_maps(probe)
            for p in ("float32", "bfloat16")]
    assert maps[1].dtype == torch.float32
    relative = (maps[1] - maps[0]).abs().max() / maps[0].abs().max()
    assert 0 < relative < 0.05, relative


@pytest.mark.parametrize("backbone", ["resnet18", "mobilenet_v2"])  # slices of 8 + 3, and of 4 + 4 + 3
def test_embedding_of_a_batch_equals_each_image_embedded_alone(backbone):
    """The backbone runs in slices and writes into one buffer: every image's columns must be its own."""
    model = Padim(PadimSettings(backbone=backbone, weights="none", feature_dim=24), device="cpu")
    images = torch.randn(11, 3, 64, 64, generator=torch.Generator().manual_seed(6))
    batch, grid = model.embed(images)
    assert batch.shape == (grid[0] * grid[1], 11, 24)
    for index in (0, 3, 4, 7, 8, 10):  # each side of a slice boundary (ResNet18: 8; MobileNetV2: 4)
        alone, _ = model.embed(images[index : index + 1])
        torch.testing.assert_close(batch[:, index], alone[:, 0], rtol=1e-4, atol=1e-4)


def test_images_of_another_size_than_the_fit_name_the_image_size_setting():
    model = Padim(PadimSettings(backbone="resnet18", weights="none", feature_dim=16), device="cpu").fit([torch.randn(6, 3, 64, 64)])
    with pytest.raises(ModelError, match="IMAGE_SIZE"):
        model.anomaly_maps(torch.randn(1, 3, 96, 96))
