"""PatchCore: the coreset and the nearest neighbours against brute force, the eq. 7 weight,
out-of-fold scores, saved models, and every bad input giving one clear error."""

from __future__ import annotations

import json
import shutil
import tempfile

import numpy as np
import pytest
import torch

import torch.nn.functional as F

import anomaly_model.bank as bank_module
import anomaly_model.coreset as coreset_module
import anomaly_model.patchcore as patchcore_module
from anomaly_model.errors import ModelError
from anomaly_model.coreset import GroupedNeighbors, greedy_coreset, group_order, nearest_neighbors, projection_matrix
from anomaly_model.padim import Padim, PadimSettings
from anomaly_model.patchcore import PatchCore, PatchCoreSettings
from anomaly_model.store import load_model, save_model
from test_coreset import brute_force_greedy

INFO = {"preprocessing": {"resize": 64, "crop": 64, "mean": [0.5] * 3, "std": [0.2] * 3}}


def images(count: int, seed: int, size: int = 64) -> torch.Tensor:
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def train_images() -> torch.Tensor:
    return images(10, 0)


@pytest.fixture(scope="module")
def fitted(train_images) -> PatchCore:
    model = PatchCore(PatchCoreSettings(backbone="resnet18", weights="none", neighbors=3), device="cpu")
    return model.fit([train_images[:6], train_images[6:]])


@pytest.mark.parametrize("feature_dim", [0, 101])
def test_features_are_the_published_recipe(feature_dim):
    """3x3 average pooling per stage, the deeper stage bilinearly upsampled to the first one's grid,
    concatenated; a PATCHCORE_FEATURE_DIM averages each stage down to an equal share of channels."""
    model = PatchCore(PatchCoreSettings(backbone="resnet18", weights="none", feature_dim=feature_dim), device="cpu")
    probe = images(3, 9)
    layer2, layer3 = (F.avg_pool2d(f.float(), 3, 1, 1) for f in model.extractor(probe))
    layer3 = F.interpolate(layer3, size=layer2.shape[-2:], mode="bilinear", align_corners=False)
    rows = [layer.permute(0, 2, 3, 1).reshape(-1, layer.shape[1]) for layer in (layer2, layer3)]
    if feature_dim:
        rows = [F.adaptive_avg_pool1d(r[:, None, :], share)[:, 0] for r, share in zip(rows, (51, 50))]
    embedding, grid = model.embed(probe)
    assert grid == (8, 8) and embedding.shape == (3 * 64, feature_dim or 384)
    torch.testing.assert_close(embedding, torch.cat(rows, dim=1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["dense", "pruned", "blocked"])
@pytest.mark.parametrize("n, dim, count", [(600, 16, 80), (1500, 6, 400), (200, 64, 200)])
def test_coreset_equals_brute_force_greedy(method, n, dim, count):
    generator = torch.Generator().manual_seed(n)
    points = torch.randn(n, dim, generator=generator) * 2 + 5  # off-centre: the expansion must stay exact
    assert greedy_coreset(points, count, 11, method, progress=False).tolist() == brute_force_greedy(points, count, 11)


def test_fitted_coreset_is_the_greedy_selection_on_the_seeded_projection(fitted, train_images):
    """Same start, same projection: the model keeps exactly the rows brute-force greedy picks."""
    bank = torch.cat([fitted.embed(part)[0] for part in (train_images[:6], train_images[6:])])
    projected = bank @ projection_matrix(bank.shape[1], 128, fitted.seed)
    start = int(torch.randint(len(bank), (1,), generator=torch.Generator().manual_seed(fitted.seed)))
    chosen = brute_force_greedy(projected, len(fitted.memory_), start)
    kept = torch.cdist(fitted.memory_ + fitted.memory_mean_, bank).argmin(dim=1)  # bank row of each coreset row
    assert sorted(kept.tolist()) == sorted(chosen)  # the same points (stored in groups, not in selection order)
    torch.testing.assert_close(fitted.memory_ + fitted.memory_mean_, bank[kept], rtol=0, atol=1e-5)
    positions = fitted.grid_size_[0] * fitted.grid_size_[1]
    assert fitted.memory_sources_.tolist() == (kept // positions).tolist()
    assert len(fitted.memory_) == int(np.ceil(0.1 * len(bank)))


def test_nearest_neighbours_equal_cdist_across_blocks(monkeypatch):
    monkeypatch.setattr(coreset_module, "NEIGHBOR_BLOCK", 4096)  # many query and bank blocks
    generator = torch.Generator().manual_seed(3)
    queries, bank = torch.randn(700, 40, generator=generator), torch.randn(1500, 40, generator=generator)
    distances, index = nearest_neighbors(queries, bank)
    expected = torch.cdist(queries.double(), bank.double()).min(dim=1)
    torch.testing.assert_close(distances.double(), expected.values, rtol=1e-5, atol=1e-5)
    assert torch.equal(index, expected.indices)

    excluded = torch.zeros(len(bank), dtype=torch.bool)
    excluded[expected.indices[:100]] = True  # the true nearest of the first 100 queries
    norms = (bank * bank).sum(dim=1).masked_fill(excluded, float("inf"))
    distances, index = nearest_neighbors(queries, bank, norms)
    kept = torch.cdist(queries.double(), bank.double())[:, ~excluded].min(dim=1)
    torch.testing.assert_close(distances.double(), kept.values, rtol=1e-5, atol=1e-5)
    assert not excluded[index].any()


@pytest.mark.parametrize("groups, dense_share", [(0, 0.25), (1, 0.25), (7, 0.25), (0, 1.0), (0, 0.0)])
def test_grouped_search_equals_cdist(monkeypatch, groups, dense_share):
    """The triangle-inequality search skips groups, never the nearest point: same rows as brute force,
    whether queries are searched group by group (DENSE_SHARE 1), all densely (0) or mixed."""
    monkeypatch.setattr(coreset_module, "NEIGHBOR_BLOCK", 8192)  # several query chunks
    monkeypatch.setattr(coreset_module, "DENSE_SHARE", dense_share)
    monkeypatch.setattr(coreset_module, "DENSE_ROWS", 96)  # several bank chunks, the last one short
    monkeypatch.setattr(coreset_module, "DENSE_QUERIES", 50)
    generator = torch.Generator().manual_seed(groups)
    clusters = torch.randn(12, 24, generator=generator) * 4
    points = clusters[torch.randint(12, (3000,), generator=generator)] + torch.randn(3000, 24, generator=generator)
    coreset = points[greedy_coreset(points, 400, 0, progress=False)]
    order, offsets = group_order(coreset, groups)
    assert offsets[0] == 0 and offsets[-1] == 400 and len(offsets) == (groups or 40) + 1
    coreset = coreset[order]
    queries = torch.cat([points[:500] + 0.1 * torch.randn(500, 24, generator=generator), 3 * torch.randn(300, 24, generator=generator)])
    distances, rows = GroupedNeighbors(coreset, offsets)(queries)
    expected = torch.cdist(queries.double(), coreset.double()).min(dim=1)
    torch.testing.assert_close(distances.double(), expected.values, rtol=0, atol=1e-3)  # float32 rounding at norms ~20
    assert torch.equal(rows, expected.indices)


def test_model_scores_with_the_grouped_search_equal_the_full_search(fitted):
    probe = images(2, 8)
    _, grouped, grouped_rows, _ = fitted.nearest_patches(probe)
    _, full, full_rows, _ = fitted.nearest_patches(probe, excluded=torch.zeros(len(fitted.memory_), dtype=torch.bool))
    torch.testing.assert_close(grouped, full, rtol=1e-5, atol=1e-5)
    assert torch.equal(grouped_rows, full_rows)


def test_eq7_weight_of_the_most_anomalous_patch(fitted):
    probe = images(2, 5)
    embedding, distances, nearest, grid = fitted.nearest_patches(probe)
    maps, scores = fitted.score(probe)
    memory = fitted.memory_.double()
    for image in range(2):
        rows = slice(image * grid[0] * grid[1], (image + 1) * grid[0] * grid[1])
        worst = int(distances[rows].argmax())
        query = embedding[rows][worst].double()
        match = int(torch.cdist(query[None], memory).argmin())
        support = torch.cdist(memory[match][None], memory)[0].argsort()[:3]  # m* and its 2 nearest
        assert int(support[0]) == match
        to_support = (memory[support] - query).norm(dim=1)
        weight = 1 - torch.exp(to_support[0]) / torch.exp(to_support).sum()
        assert scores[image].item() == pytest.approx(weight.item() * maps[image].max().item(), rel=1e-4)
        assert 0 < weight < 1


def test_save_load_gives_identical_maps_and_scores(tmp_path, fitted):
    save_model(tmp_path / "model", fitted, INFO)
    loaded, description = load_model(tmp_path / "model", "cpu")
    assert isinstance(loaded, PatchCore) and description["anomaly_model"]["type"] == "patchcore"
    probe = images(3, 7)
    for got, expected in zip(loaded.score(probe), fitted.score(probe)):
        assert torch.equal(got, expected)
    for name in ("coreset.npy", "coreset_mean.npy", "coreset_sources.npy"):
        np.load(tmp_path / "model" / name, allow_pickle=False)  # plain arrays, nothing to unpickle
    assert torch.equal(loaded.memory_sources_, fitted.memory_sources_)


def test_a_patchcore_model_is_never_read_as_padim(tmp_path, fitted):
    save_model(tmp_path / "model", fitted, INFO)
    path = tmp_path / "model" / "model.json"
    description = json.loads(path.read_text())
    description["anomaly_model"]["type"] = "padim"
    path.write_text(json.dumps(description))
    with pytest.raises(ModelError, match="damaged or incompatible"):
        load_model(tmp_path / "model", "cpu")
    description["anomaly_model"]["type"] = "mystery"
    path.write_text(json.dumps(description))
    with pytest.raises(ModelError, match="damaged or incompatible.*one of 'padim', 'patchcore'"):
        load_model(tmp_path / "model", "cpu")


def test_a_padim_model_is_never_read_as_patchcore(tmp_path, train_images):
    padim = Padim(PadimSettings(backbone="resnet18", weights="none", feature_dim=16), device="cpu").fit([train_images])
    save_model(tmp_path / "model", padim, INFO)
    path = tmp_path / "model" / "model.json"
    description = json.loads(path.read_text())
    assert description["anomaly_model"]["settings"]["layers"] == [1, 2, 3]  # LAYERS=() resolved per model
    description["anomaly_model"]["type"] = "patchcore"
    path.write_text(json.dumps(description))
    with pytest.raises(ModelError, match="damaged or incompatible"):
        load_model(tmp_path / "model", "cpu")


def test_out_of_fold_scores_exclude_the_images_own_fold(train_images):
    """With every patch in the coreset an image's own score is ~0; out of fold it is clearly not,
    and it equals the score against the coreset rows of the other folds only."""
    model = PatchCore(PatchCoreSettings(backbone="resnet18", weights="none", coreset_ratio=1.0), device="cpu").fit([train_images[:6], train_images[6:]])
    before = model.memory_.clone()
    folds = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    reads = []

    def batches(wanted=None):
        chosen = list(range(10)) if wanted is None else list(wanted)
        reads.extend(chosen)
        return [(train_images[chosen[start : start + 4]], chosen[start : start + 4]) for start in range(0, len(chosen), 4)]

    results = list(model.out_of_fold_scores(batches, folds, peaks=True))
    assert sorted(reads) == sorted(list(range(10)) * 2)  # the fit was not told its order: one reading for it, then each fold's images once
    seen = sorted(index for indices, *_ in results for index in indices)
    assert seen == list(range(10))
    in_sample = model.score(train_images)[1]
    assert in_sample.max() < 0.05
    for indices, maps, scores, directions in results:
        torch.testing.assert_close(directions.norm(dim=1), torch.ones(len(indices)))
        assert maps.shape == (len(indices), 64, 64) and maps.device.type == "cpu"
        assert scores.min() > 20 * in_sample.max() + 0.5
        fold = folds[indices[0]]
        others = torch.as_tensor(folds[model.memory_sources_.long()] != fold)
        embedding, grid = model.embed(train_images[indices])
        distances = torch.cdist(embedding.double() - model.memory_mean_.double(), model.memory_[others].double()).min(dim=1).values
        expected = model.map_maker(distances.float().view(len(indices), *grid), (64, 64)).flatten(1).max(dim=1).values
        torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(model.memory_, before)
    model.plan_fit(10, list(range(10)))  # as train.py does: the fit is told each image's training-list number
    model.fit([train_images[:6], train_images[6:]])
    reads.clear()
    told = list(model.out_of_fold_scores(batches, folds))
    assert [index for indices, *_ in told for index in indices] == [0, 3, 6, 9, 1, 4, 7, 2, 5, 8]  # fold by fold
    assert sorted(reads) == list(range(10))  # each image read once
    for (indices, _, scores, _), (same, _, expected, _) in zip(sorted(told, key=lambda r: r[0][0]), sorted(results, key=lambda r: r[0][0])):
        assert indices == same
        torch.testing.assert_close(scores, expected)


def test_out_of_fold_scores_need_the_fit_images_and_another_fold(train_images):
    model = PatchCore(PatchCoreSettings(backbone="resnet18", weights="none", coreset_ratio=1.0), device="cpu").fit([train_images])
    with pytest.raises(ModelError, match="got 4 training images, the model was fitted on 10"):
        list(model.out_of_fold_scores(lambda: [(train_images[:4], [0, 1, 2, 3])], np.zeros(10, int)))
    with pytest.raises(ModelError, match="fold 0 holds the sources of all .* coreset points"):
        list(model.out_of_fold_scores(lambda: [(train_images, list(range(10)))], np.zeros(10, int)))


@pytest.mark.parametrize("ratio", [0.0, -0.1, 1.5])
def test_coreset_ratio_outside_0_1(ratio):
    with pytest.raises(ModelError, match=f"CORESET_RATIO={ratio} must be in \\(0, 1\\]"):
        PatchCore(PatchCoreSettings(backbone="resnet18", weights="none", coreset_ratio=ratio), device="cpu")


def test_bad_neighbour_count_and_feature_dim():
    with pytest.raises(ModelError, match="PATCHCORE_NEIGHBORS=1"):
        PatchCore(PatchCoreSettings(backbone="resnet18", weights="none", neighbors=1), device="cpu")
    with pytest.raises(ModelError, match="PATCHCORE_FEATURE_DIM=5000 must be 0 .*384"):
        PatchCore(PatchCoreSettings(backbone="resnet18", weights="none", feature_dim=5000), device="cpu")


def test_too_few_coreset_points_for_the_reweighting(train_images):
    model = PatchCore(PatchCoreSettings(backbone="resnet18", weights="none", coreset_ratio=0.001, neighbors=9), device="cpu")
    with pytest.raises(ModelError, match="CORESET_RATIO=0.001 keeps 1 of 640 training patches.*PATCHCORE_NEIGHBORS=9"):
        model.fit([train_images])

    def one_batch_then_more():  # told how many images come, the fit refuses at the first batch, not after reading them all
        yield train_images[:2]
        raise AssertionError("read a second batch")

    model.plan_fit(len(train_images))
    with pytest.raises(ModelError, match="keeps 1 of 640 training patches"):
        model.fit(one_batch_then_more())


def test_a_bank_too_large_for_memory_is_refused_before_the_fit(monkeypatch, train_images):
    monkeypatch.setattr(patchcore_module, "available_memory", lambda: 50_000_000)
    model = PatchCore(PatchCoreSettings(backbone="resnet18", weights="none"), device="cpu")
    model.plan_fit(100_000)
    fed = []

    def batches():
        for part in (train_images[:2], train_images[2:]):
            fed.append(len(part))
            yield part

    with pytest.raises(ModelError, match="fit for 100000 training images .* needs 8.0 GB of RAM even with its memory bank on disk, only 50 MB is free: train on fewer images \\(about 564 fit\\)"):
        model.fit(batches())
    assert fed == [2]  # refused at the first batch


def test_a_bank_outgrowing_memory_without_a_plan_is_refused(monkeypatch, train_images):
    monkeypatch.setattr(patchcore_module, "available_memory", lambda: 500_000)  # 2 images fit, 10 do not
    # what is free counts the bank already held (2 images' worth), not only what is left beside it
    with pytest.raises(ModelError, match="fit for the first 10 training images .* needs 1 MB of RAM even with its memory bank on disk, only 1 MB"):
        PatchCore(PatchCoreSettings(backbone="resnet18", weights="none"), device="cpu").fit([train_images[:2], train_images[2:]])


def test_a_bank_that_fits_in_no_ram_is_kept_on_disk_with_the_same_model(monkeypatch, capsys, tmp_path):
    """Memory for the projection and the selection but not for the bank even in float16: the bank
    goes to an unnamed file in TMPDIR and the fit is the RAM fit's, bit for bit; nothing is left
    in the folder; a folder without room for the bank gives one line naming TMPDIR."""
    train = images(6, 0)
    settings = PatchCoreSettings(backbone="resnet18", weights="none", coreset_ratio=0.2)
    reference = PatchCore(settings, device="cpu").fit([train[:3], train[3:]])
    model = PatchCore(settings, device="cpu")
    positions = 8 * 8
    between = (model.fit_memory_bytes(6, positions, bank_bytes=0) + model.fit_memory_bytes(6, positions, bank_bytes=2)) / 2
    monkeypatch.setattr(patchcore_module, "available_memory", lambda: int(between / patchcore_module.MEMORY_HEADROOM))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    model.plan_fit(6)
    model.fit([train[:3], train[3:]])
    assert model.bank_precision_ == "disk"
    assert f"kept on disk, in a temporary file in {tmp_path}" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    assert torch.equal(model.memory_sources_, reference.memory_sources_) and model.group_offsets_ == reference.group_offsets_
    assert torch.equal(model.memory_, reference.memory_) and torch.equal(model.memory_mean_, reference.memory_mean_)
    monkeypatch.setattr(bank_module.shutil, "disk_usage", lambda folder: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    refused = PatchCore(settings, device="cpu")
    refused.plan_fit(6)
    with pytest.raises(ModelError, match=f"fits in neither RAM nor the temporary folder {tmp_path} .*: set TMPDIR to a folder with room"):
        refused.fit([train[:3], train[3:]])


def test_images_of_another_size_than_the_fit(fitted):
    with pytest.raises(ModelError, match="patch grid.*use the model's IMAGE_SIZE"):
        fitted.score(images(1, 2, size=96))


def test_grouped_search_finds_a_member_nearer_than_a_center_the_query_almost_touches():
    """Far from the origin (norms ~100) a query 0.002 from its group's center has that distance lost
    to float32 cancellation in |q|^2 - 2 q.c + |c|^2; the search must still find the member 1e-5 away
    (groups of 3 rows: all of them among the NEIGHBOR_CANDIDATES measured exactly)."""
    generator = torch.Generator().manual_seed(3)
    centers = 100 + torch.randn(8, 16, generator=generator)
    members = centers.repeat_interleave(3, dim=0) + 0.002 * torch.randn(24, 16, generator=generator)
    members[::3] = centers  # each group's first row is its center
    offsets = list(range(0, 25, 3))
    queries = members[1::3] + 1e-5 * torch.randn(8, 16, generator=generator)
    distances, rows = GroupedNeighbors(members, offsets)(queries)
    assert torch.equal(rows, torch.arange(1, 24, 3))
    assert (distances < 1e-4).all()


def test_a_bank_that_does_not_fit_in_float32_is_kept_in_float16_with_the_same_coreset(monkeypatch, capsys):
    """Memory for the float16 bank but not the float32 one (planned, as train.py plans): the bank is
    float16, the same points are chosen (the projection stays float32) and the kept features are
    float32's rounded to float16."""
    train = images(6, 0)
    reference = PatchCore(PatchCoreSettings(backbone="resnet18", weights="none", coreset_ratio=0.2), device="cpu").fit([train[:3], train[3:]])
    model = PatchCore(PatchCoreSettings(backbone="resnet18", weights="none", coreset_ratio=0.2), device="cpu")
    positions = 8 * 8  # 64 px: ResNet18's layer 2 grid
    between = (model.fit_memory_bytes(6, positions, bank_bytes=2) + model.fit_memory_bytes(6, positions)) / 2
    monkeypatch.setattr(patchcore_module, "available_memory", lambda: int(between / patchcore_module.MEMORY_HEADROOM))
    model.plan_fit(6)
    model.fit([train[:3], train[3:]])
    assert model.bank_precision_ == "float16" and reference.bank_precision_ == "float32"
    assert "kept in float16" in capsys.readouterr().err
    assert torch.equal(model.memory_sources_, reference.memory_sources_) and model.group_offsets_ == reference.group_offsets_
    kept, expected = model.memory_ + model.memory_mean_, reference.memory_ + reference.memory_mean_
    scale = float(expected.abs().max())
    torch.testing.assert_close(kept, expected.half().float(), rtol=1e-3, atol=1e-6 * scale)  # float32's rounded to float16 (to an ulp)
    probe = images(2, 5)
    (maps, scores), (reference_maps, reference_scores) = model.score(probe), reference.score(probe)
    torch.testing.assert_close(maps, reference_maps, rtol=0, atol=2e-3 * float(reference_maps.max()))
    torch.testing.assert_close(scores, reference_scores, rtol=2e-3, atol=0)
