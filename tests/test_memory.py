"""The fit must be memory-flat: its accumulated state may not grow with the number of batches.

A fit that kept every embedding (as the published implementation does) needs memory in
proportion to the training set; the streaming fit keeps per-position sums only. Counting the
bytes of the accumulator's tensors catches a regression deterministically, where a peak-RSS
check would be flaky on a shared machine.
"""

from __future__ import annotations

import pytest
import torch

from anomaly_model.gaussian import StreamingGaussian
from anomaly_model.padim import Padim, PadimSettings


def _state_bytes(accumulator: StreamingGaussian) -> int:
    """Bytes of every tensor the accumulator holds (whatever attributes it has)."""
    return sum(value.element_size() * value.nelement() for value in vars(accumulator).values() if isinstance(value, torch.Tensor))


@pytest.fixture(scope="module")
def padim() -> Padim:
    """One tiny random-init model for the module: building the backbone is the slow part."""
    return Padim(PadimSettings(backbone="resnet18", weights="none", layers=(1, 2), feature_dim=16), device="cpu")


def test_fit_state_does_not_grow_with_batches(padim):
    torch.manual_seed(0)
    accumulator = StreamingGaussian()
    sizes = []
    for _ in range(6):
        accumulator.update(padim.embed(torch.randn(4, 3, 32, 32))[0])
        sizes.append(_state_bytes(accumulator))
    assert accumulator.count == 24
    assert sizes[0] > 0
    assert sizes == [sizes[0]] * len(sizes), f"fit state grew with the number of batches: {sizes}"
    positions, dim = 8 * 8, 16  # layer-1 grid of a 32 px image, d channels
    # shift and sum (P, d) plus the sum of outer products (P, d, d): nothing per image
    assert sizes[0] <= positions * dim * 8 * 2 + positions * dim * dim * 8


def test_fit_with_more_batches_keeps_the_same_model_size(padim):
    torch.manual_seed(1)
    images = torch.randn(12, 3, 32, 32)
    shapes = []
    for batches in ([images[:4]], images.split(2)):
        padim.fit(batches)
        shapes.append((tuple(padim.mean_.shape), tuple(padim.cholesky_.shape)))
    assert padim.n_train_images_ == 12
    assert shapes[0] == shapes[1]
