"""Inspecting parts at their own shape and resolution: non-square sizes, "auto", the optional centre
crop, tiles (stitching, statistics per location, bounded chunks), their errors, and the old
RESIZE / CROP spellings. Tiny images and a random-init ResNet18."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from anomaly_model import base
from anomaly_model.errors import ModelError
from anomaly_model.base import TILE_CHUNK, AnomalyModel, ModelSettings
from anomaly_model.maps import MapMaker, blur_matrix, upsample_matrix
from anomaly_model.padim import Padim, PadimSettings
from anomaly_model.patchcore import PatchCore, PatchCoreSettings
from anomaly_model.store import load_model, save_model
from anomaly_model.tiles import TileLayout
from conftest import outputs, run_script, save, texture
from dataset_manager.images import DataError, Preprocessor, resolve_image_size
from settings import SettingsError, load

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _images(count: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(count, 3, height, width, generator=torch.Generator().manual_seed(seed))


def _padim(**tiling) -> Padim:
    return Padim(PadimSettings(backbone="resnet18", weights="none", feature_dim=16, **tiling), device="cpu")


class CellMean(AnomalyModel):
    """A context-free stand-in model: a patch's score is the mean of its 4 x 4 input cell. Only
    `fit` and `patch_scores` are written: tiling must come from the base class alone."""

    kind = "cellmean"

    def fit(self, batches):
        self.seen = []
        for images in batches:
            self.seen.append(len(images))
            self.grid_size_ = (images.shape[-2] // 4, images.shape[-1] // 4)
        return self

    def patch_scores(self, images):
        self.calls.append(len(images))
        return torch.nn.functional.avg_pool2d(images.mean(dim=1, keepdim=True), 4)[:, 0]


def _cell_mean(**tiling) -> CellMean:
    model = CellMean(ModelSettings(backbone="resnet18", weights="none", **tiling), device="cpu")
    model.calls = []
    return model


# --- preprocessing ---------------------------------------------------------------------------------


def test_non_square_preprocessing_keeps_the_geometry():
    prep = Preprocessor.with_center_crop((96, 48), 1.0, MEAN, STD)
    rgb = np.zeros((1260, 500, 3), np.uint8)
    rgb[:630] = 255  # top half bright
    tensor = prep.image_tensor(rgb)
    assert tensor.shape == (3, 96, 48)
    assert tensor[:, :47].min() > tensor[:, 49:].max()  # the top half stays the top half
    assert prep.crop_box(1260, 500) == (0, 0, 1260, 500)
    anomaly_map = torch.zeros(96, 48)
    anomaly_map[:48] = 1
    full = prep.map_to_original(anomaly_map, 1260, 500)
    assert full.shape == (1260, 500) and full[0, 0] == 1 and full[-1, -1] == 0
    mask = np.zeros((1260, 500), bool)
    mask[-10:, :] = True  # a defect at the bottom border is inspected, not cropped away
    assert prep.mask_tensor(mask)[-1].all()


def test_centre_crop_of_a_non_square_size():
    prep = Preprocessor.with_center_crop((64, 32), 0.5, MEAN, STD)
    assert prep.resize == (128, 64) and prep.offset == (32, 16)
    assert prep.image_tensor(np.zeros((300, 200, 3), np.uint8)).shape == (3, 64, 32)
    top, left, bottom, right = prep.crop_box(300, 200)
    assert (top, left, bottom, right) == (75.0, 50.0, 225.0, 150.0)
    full = prep.map_to_original(torch.ones(64, 32), 300, 200)
    assert full[0, 0] == 0 and full[150, 100] == 1
    assert prep.model_view(np.zeros((300, 200, 3), np.uint8)).shape == (64, 32, 3)


def test_models_saved_before_image_size_existed_keep_their_preprocessing():
    prep = Preprocessor.from_description({"resize": 256, "crop": 224, "mean": list(MEAN), "std": list(STD)})
    assert prep.resize == (256, 256) and prep.size == (224, 224) and prep.offset == (16, 16)


def test_auto_keeps_the_median_aspect_ratio_at_the_published_pixel_count(tmp_path):
    paths = []
    for index, height in enumerate((1250, 1260, 1270)):
        path = tmp_path / f"{index}.png"
        Image.new("L", (500, height)).save(path)
        paths.append(path)
    assert resolve_image_size("auto", paths, 16) == (352, 144)  # ksdd's 500 x 1260: 2.52 : 1, ~224^2 pixels
    assert resolve_image_size(1.0, paths, 16) == (1264, 496)  # its own size, on the stride
    assert resolve_image_size(0.5, paths, 16) == (624, 256)
    assert resolve_image_size((100, 60), paths, 16) == (100, 60)  # a given size is kept as it is
    with pytest.raises(DataError, match="IMAGE_SIZE='big'"):
        resolve_image_size("big", paths, 16)


# --- settings: new and old spellings ------------------------------------------------------------


def test_image_size_setting_forms():
    assert load(["IMAGE_SIZE=auto"])[0].IMAGE_SIZE == "auto"
    assert load(["IMAGE_SIZE=(320, 128)"])[0].IMAGE_SIZE == (320, 128)
    assert load(["IMAGE_SIZE=0.5"])[0].IMAGE_SIZE == 0.5
    with pytest.raises(SettingsError, match="IMAGE_SIZE=big"):
        load(["IMAGE_SIZE=big"])


def test_old_resize_and_crop_spellings_mean_what_they_meant():
    settings, _ = load(["RESIZE=256", "CROP=224"])
    assert settings.IMAGE_SIZE == (224, 224) and settings.CENTER_CROP == 224 / 256
    prep = Preprocessor.with_center_crop(settings.IMAGE_SIZE, settings.CENTER_CROP, MEAN, STD)
    assert prep.resize == (256, 256) and prep.size == (224, 224)
    settings, _ = load(["RESIZE=64", "CROP=64"])
    assert settings.IMAGE_SIZE == (64, 64) and settings.CENTER_CROP == 1.0
    settings, _ = load(["CROP=128"])  # the other keeps its old default, 256
    assert settings.IMAGE_SIZE == (128, 128) and settings.CENTER_CROP == 0.5
    with pytest.raises(SettingsError, match="CROP=300 is larger than RESIZE=256"):
        load(["CROP=300"])
    with pytest.raises(SettingsError, match="old spelling of IMAGE_SIZE"):
        load(["RESIZE=256", "IMAGE_SIZE=(224, 224)"])


# --- non-square models ----------------------------------------------------------------------------


@pytest.mark.parametrize("tiling", [{}, {"tile_size": 32, "tile_overlap": 8}], ids=["whole", "tiles"])
def test_non_square_fit_save_load_maps(tmp_path, tiling):
    model = _padim(**tiling).fit_images([_images(6, 48, 80), _images(4, 48, 80, seed=1)])
    probe = _images(2, 48, 80, seed=2)
    maps = model.anomaly_maps(probe)
    assert maps.shape == (2, 48, 80)
    assert model.n_train_images_ == 10
    save_model(tmp_path / "model", model, {})
    loaded, description = load_model(tmp_path / "model", "cpu")
    assert description["anomaly_model"]["state"]["image_size"] == [48, 80]
    assert torch.equal(loaded.anomaly_maps(probe), maps)
    with pytest.raises(ModelError, match="IMAGE_SIZE"):
        loaded.anomaly_maps(_images(1, 80, 48))


# --- tiles ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("statistics", ["shared", "location"])
def test_one_tile_covering_the_image_gives_the_untiled_map(statistics):
    good, probe = _images(8, 64, 64), _images(2, 64, 64, seed=3)
    whole = _padim().fit_images([good]).anomaly_maps(probe)
    tiled = _padim(tile_size=64, tile_overlap=16, tile_statistics=statistics).fit_images([good]).anomaly_maps(probe)
    torch.testing.assert_close(tiled, whole, rtol=1e-5, atol=1e-5)


def test_a_tiled_patchcore_scores_like_the_untiled_one_when_one_tile_covers_the_image():
    """PatchCore's own scoring (eq. 7 on the worst patch, out-of-fold exclusion) goes through tiles too."""
    def patchcore(**tiling) -> PatchCore:
        settings = PatchCoreSettings(backbone="resnet18", weights="none", coreset_ratio=0.5, neighbors=3, **tiling)
        return PatchCore(settings, device="cpu").fit_images([_images(6, 64, 64)])

    probe = _images(3, 64, 64, seed=3)
    whole, tiled = patchcore(), patchcore(tile_size=64, tile_overlap=16)
    assert tiled.tile_layout_ is not None
    for got, expected in zip(tiled.score(probe), whole.score(probe)):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    excluded = torch.zeros(whole.memory_.shape[0], dtype=torch.bool)
    excluded[::2] = True
    for got, expected in zip(tiled._score(probe, excluded)[:2], whole._score(probe, excluded)[:2]):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("overlap", [0, 8, 24])
def test_stitched_patch_scores_equal_the_whole_image_where_scores_need_no_context(overlap):
    """Placement and averaging: a context-free score must come out of the tiles as from the whole image."""
    images = _images(3, 80, 112)
    whole = _cell_mean().fit_images([images])
    tiled = _cell_mean(tile_size=32, tile_overlap=overlap).fit_images([images])
    assert tiled.tile_layout_.count > 1
    torch.testing.assert_close(tiled.image_patch_scores(images), whole.image_patch_scores(images))
    torch.testing.assert_close(tiled.anomaly_maps(images), whole.anomaly_maps(images))


def test_long_map_axes_use_sparse_operators_with_the_same_result():
    """Tiled working images make maps thousands of pixels long: their operators are sparse, same maps."""
    scores = torch.rand(2, 520, 6, generator=torch.Generator().manual_seed(0))
    maps = MapMaker(4.0)(scores, (2080, 24))
    assert MapMaker(4.0).operators((520, 6), (2080, 24), torch.device("cpu"))[0].is_sparse
    rows, columns = (blur_matrix(t, 4.0) @ upsample_matrix(s, t) for s, t in ((520, 2080), (6, 24)))
    torch.testing.assert_close(maps, rows @ scores @ columns.T, rtol=1e-5, atol=1e-5)


def test_layout_covers_the_image_with_the_asked_overlap():
    layout = TileLayout.build((1264, 496), 224, 64, 4)
    assert layout.tops[0] == 0 and layout.tops[-1] == 1264 - 224 and layout.lefts == (0, 136, 272)
    assert min(np.diff(layout.tops)) <= 224 - 64 and all(v % 4 == 0 for v in layout.tops + layout.lefts)
    assert layout.coverage(torch.device("cpu")).min() >= 1


def test_statistics_per_location_are_each_locations_own_gaussians():
    """With TILE_STATISTICS="location" a tile is scored by the Gaussians fitted on that location only."""
    good, probe = _images(10, 32, 80), _images(2, 32, 80, seed=4)
    model = _padim(tile_size=32, tile_overlap=8, tile_statistics="location").fit_images([good[:6], good[6:]])
    lefts = model.tile_layout_.lefts
    assert len(lefts) == 3 and model.tile_layout_.count == 3
    for location, left in enumerate(lefts):
        alone = _padim().fit([good[..., left : left + 32]])
        crops = probe[..., left : left + 32]
        tiles = torch.cat([probe[..., x : x + 32] for x in lefts])  # location by location, as the base passes them
        scores = model.patch_scores(tiles).view(3, 2, *model.grid_size_)[location]
        torch.testing.assert_close(scores, alone.patch_scores(crops), rtol=1e-4, atol=1e-4)


def test_tiles_reach_the_model_in_bounded_chunks_and_the_fit_stays_flat():
    images = _images(2, 256, 320)  # 11 x 13 tiles of 32 px each
    model = _cell_mean(tile_size=32, tile_overlap=8).fit_images([images, images])
    assert model.tile_layout_.count > TILE_CHUNK
    assert max(model.seen) <= TILE_CHUNK and sum(model.seen) == 4 * model.tile_layout_.count
    model.image_patch_scores(images)
    assert max(model.calls) <= TILE_CHUNK and sum(model.calls) == 2 * model.tile_layout_.count
    padim = _padim(tile_size=32, tile_overlap=8)
    sizes = []
    for count in (1, 3):
        padim.fit_images([_images(2, 96, 128, seed=s) for s in range(count)])
        sizes.append(sum(t.nelement() for t in (padim.mean_, padim.cholesky_)))
    assert padim.n_train_images_ == 6 and sizes[0] == sizes[1]
    assert padim.mean_.shape[0] == 8 * 8  # one Gaussian per position of a tile, shared by every tile


# --- errors -------------------------------------------------------------------------------------------


def test_tile_setting_errors():
    with pytest.raises(ModelError, match="TILE_OVERLAP=32 must be >= 0 and smaller than TILE_SIZE=32"):
        _padim(tile_size=32, tile_overlap=32)
    with pytest.raises(ModelError, match="TILE_SIZE=40 must be a multiple of 16.*use 32 or 48"):
        _padim(tile_size=40)
    with pytest.raises(ModelError, match=r"TILE_SIZE=64 is larger than the inspected image \(48 x 80"):
        _padim(tile_size=64).fit_images([_images(4, 48, 80)])
    with pytest.raises(ModelError, match=r"multiple of 4.*IMAGE_SIZE=\(48, 80\)"):
        _padim(tile_size=32).fit_images([_images(4, 50, 80)])
    with pytest.raises(ModelError, match="TILE_STATISTICS='location' is not available for cellmean"):
        _cell_mean(tile_size=32, tile_statistics="location")


def test_statistics_too_large_for_memory_say_the_estimate_and_what_to_lower(monkeypatch):
    monkeypatch.setattr(base, "available_memory", lambda device: 1_000_000_000)
    model = lambda **tiling: Padim(PadimSettings(backbone="resnet18", weights="none", feature_dim=100, **tiling), device="cpu")  # noqa: E731 63 kB per position (sums kept for updates)
    with pytest.raises(ModelError, match=r"about 66\.1 GB \(1048576 patch positions\) but 1\.0 GB .*lower IMAGE_SIZE or FEATURE_DIM"):
        model().start_fit((4096, 4096))
    with pytest.raises(ModelError, match=r"\(313600 patch positions\).*use TILE_STATISTICS='shared'"):
        model(tile_size=224, tile_statistics="location").start_fit((2048, 2048))  # 10 x 10 tile locations
    model(tile_size=224, tile_statistics="shared").start_fit((2048, 2048))  # one tile's statistics fit


# --- the scripts: masks, pictures, CSV and eval at the images' own geometry -----------------------


def _non_square_category(root: Path) -> Path:
    rng = np.random.default_rng(0)
    wide = lambda: np.concatenate([texture(rng), texture(rng)[:, :16]], axis=1)[:48]  # noqa: E731 48 x 80
    for number in range(12):
        save(wide(), root / "train" / "good" / f"{number:03d}.png")
    for number in range(3):
        save(wide(), root / "test" / "good" / f"{number:03d}.png")
        image, mask = wide(), np.zeros((48, 80), bool)
        mask[20:30, 60:75] = True  # near the right border
        image[mask] = [0.95, 0.1, 0.1]
        save(image, root / "test" / "blob" / f"{number:03d}.png")
        save(mask.astype(float), root / "ground_truth" / "blob" / f"{number:03d}_mask.png")
    return root


@pytest.mark.parametrize("model", ["padim", "patchcore"])
def test_tiled_non_square_model_end_to_end(tmp_path, model):
    category = _non_square_category(tmp_path / "data" / "wide")
    settings = [
        f"DATASET_DIR={category}", *outputs(tmp_path), f"ANOMALY_MODEL={model}", "BACKBONE=resnet18", "WEIGHTS=none", "BATCH_SIZE=8", "NUM_WORKERS=0",
        "IMAGE_SIZE=1.0", "CENTER_CROP=1.0", "TILE_SIZE=32", "TILE_OVERLAP=8", "VALIDATION_FRACTION=0.25",
        "CLASSIFIER_SYNTHETIC_DEFECTS=12", "CLASSIFIER_MAX_ROUNDS=30", "CLASSIFIER_FOLDS=3",
    ]
    trained = run_script("train.py", *settings)
    assert trained.returncode == 0, trained.stderr
    description = json.loads((tmp_path / "models" / "wide" / "model.json").read_text())
    assert description["preprocessing"]["image_size"] == [48, 80] and description["preprocessing"]["image_size_setting"] == 1.0
    assert description["anomaly_model"]["state"]["tiles"]["count"] == 6
    assert description["classifier"]["n_synthetic_defects"]["scratch"] > 0

    tested = run_script("test.py", *settings, "IMAGE_SIZE=(224, 224)")  # the model's own size wins, and says so
    assert tested.returncode == 0, tested.stderr
    assert "IMAGE_SIZE: model has 1.0, config has (224, 224)" in tested.stderr
    (run_dir,) = (tmp_path / "results" / "wide").iterdir()
    rows = list(csv.DictReader(open(run_dir / "predictions.csv")))
    assert len(rows) == 6
    for row in rows:
        assert Image.open(run_dir / row["mask"]).size == (80, 48)  # (width, height) of the original
        assert Image.open(run_dir / row["overlay"]).size == (80, 48)

    evaluated = run_script("eval.py", *settings)
    assert evaluated.returncode == 0, evaluated.stderr
    (eval_dir,) = [p for p in (tmp_path / "results").iterdir() if p.name.startswith("eval-")]
    metrics = json.loads((eval_dir / "wide" / "metrics.json").read_text())
    assert metrics["resolution"] == [48, 80]
    assert metrics["pixel_rocauc"] > 0.8
    assert any((eval_dir / "wide" / "sheets").iterdir())


def test_stretched_shapes_and_enlarged_images_are_noted(tmp_path):
    """Parts of several aspect ratios stretched to one shape, and small images enlarged several times
    to the working size, are said (from the headers); images that fit it raise no note."""
    from pipeline.training import geometry_notes

    def images(shapes):
        paths = []
        for number, (height, width) in enumerate(shapes):
            paths.append(tmp_path / f"{len(shapes)}-{height}x{width}-{number}.png")
            Image.fromarray(np.zeros((height, width), np.uint8)).save(paths[-1])
        return paths

    assert geometry_notes(images([(300, 400)] * 4), (224, 224), "auto") == []
    (stretched,) = geometry_notes(images([(300, 400), (400, 300), (300, 400)]), (224, 288), "auto")
    assert "several shapes (e.g. 300 x 400 and 400 x 300, height x width): each is stretched to 224 x 288" in stretched
    (enlarged,) = geometry_notes(images([(40, 40)] * 5), (224, 224), (224, 224))
    assert "IMAGE_SIZE=(224, 224) enlarges the training images (median 40 x 40) 5.6 times to 224 x 224" in enlarged


def test_an_update_notes_new_goods_shaped_unlike_the_training_images(tmp_path):
    """train.py keeps the training images' median shape in model.json; an update whose new goods are
    shaped otherwise (a 9x other aspect ratio stretched to the working size) says so, like a training."""
    from pipeline.training import median_shape, shape_note

    def images(name, shapes):
        (tmp_path / name).mkdir()
        paths = []
        for number, (height, width) in enumerate(shapes):
            paths.append(tmp_path / name / f"{number}.png")
            Image.fromarray(np.zeros((height, width), np.uint8)).save(paths[-1])
        return paths

    shape = median_shape(images("strips", [(300, 2000)] * 3 + [(310, 2000)]))
    assert shape == [300, 2000]
    assert shape_note(images("alike", [(290, 2100), (300, 2000)]), shape, (48, 320)) is None
    note = shape_note(images("portrait", [(300, 2000), (400, 300)]), shape, (48, 320))
    assert note.startswith("1 of the 2 new goods are shaped unlike the model's training images (e.g. 400 x 300 against 300 x 2000")
    assert "stretched to 48 x 320" in note
    assert shape_note(images("old", [(400, 300)]), None, (48, 320)) is None  # a model saved before the shape was kept
