"""The blocked (lazy) coreset selection, the CPU default, against the paper's greedy k-center: the
same points on banks of many blocks, whether the data is homogeneous (where triangle-inequality
pruning lets every point through) or clustered, with blocks brought up to date in chunks."""

from __future__ import annotations

import pytest
import torch

import anomaly_model.coreset as coreset_module
from anomaly_model.coreset import SelectionStats, greedy_coreset


def brute_force_greedy(points: torch.Tensor, count: int, start: int) -> list[int]:
    """Algorithm 1 as written: full float64 distance matrix, min over the chosen points."""
    distances = torch.cdist(points.double(), points.double())
    chosen, nearest = [start], distances[start].clone()
    for _ in range(count - 1):
        chosen.append(int(nearest.argmax()))
        nearest = torch.minimum(nearest, distances[chosen[-1]])
    return chosen


def homogeneous(n: int, dim: int, seed: int) -> torch.Tensor:
    """One Gaussian cloud, off-centre: every point about as far from every other (gray texture-like)."""
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)) + 3


def clustered(n: int, dim: int, seed: int) -> torch.Tensor:
    """Clusters at spread-out centres: blocks fall below the radius at different times (within
    float32 reach: much tighter clusters leave near-ties that every method breaks differently)."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(20, dim, generator=generator) * 4
    return centres[torch.randint(20, (n,), generator=generator)] + torch.randn(n, dim, generator=generator)


@pytest.mark.parametrize("make", [homogeneous, clustered])
@pytest.mark.parametrize("block, chunk", [(64, 16), (300, 1024)])
def test_blocked_selection_equals_brute_force(monkeypatch, make, block, chunk):
    monkeypatch.setattr(coreset_module, "SELECTION_BLOCK", block)  # 40 blocks, or 8 with a ragged last one
    monkeypatch.setattr(coreset_module, "SELECTION_CHUNK", chunk)  # blocks measured against chosen points in chunks
    points = make(2500, 24, seed=0)
    stats = SelectionStats()
    chosen = greedy_coreset(points, 250, 7, "blocked", progress=False, stats=stats).tolist()
    assert chosen == brute_force_greedy(points, 250, 7)
    assert stats.steps == 250 and 0 < stats.rows_touched < 250 * len(points)  # fewer rows read than a pass per step


def test_cpu_default_is_the_blocked_selection(monkeypatch):
    monkeypatch.setattr(coreset_module, "SELECTION_BLOCK", 128)
    points = homogeneous(1500, 16, seed=1)
    auto, blocked = SelectionStats(), SelectionStats()
    assert greedy_coreset(points, 150, 0, progress=False, stats=auto).tolist() == greedy_coreset(
        points, 150, 0, "blocked", progress=False, stats=blocked).tolist()
    assert auto == blocked


def test_selection_of_the_whole_bank_and_of_one_point(monkeypatch):
    monkeypatch.setattr(coreset_module, "SELECTION_BLOCK", 50)
    points = clustered(300, 8, seed=2)
    assert sorted(greedy_coreset(points, 300, 5, "blocked", progress=False).tolist()) == list(range(300))
    assert greedy_coreset(points, 1, 5, "blocked", progress=False).tolist() == [5]


def test_unknown_method_is_named():
    with pytest.raises(ValueError, match="coreset method 'fast'"):
        greedy_coreset(torch.zeros(4, 2), 2, 0, "fast", progress=False)
