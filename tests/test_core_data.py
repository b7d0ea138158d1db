"""Finding and reading images: layouts, image modes, unreadable files, settings overrides."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from anomaly_model.backbone import FeatureExtractor, _offline_state_dict
from dataset_manager import DataError, ImageBatches, Preprocessor, find_categories, find_images, read_rgb
from dataset_manager.images import training_full_scale
from settings import SettingsError, load

from conftest import SHARED, make_mvtec_category, save, texture


def test_mvtec_category_is_found_with_masks(tiny_category):
    (category,) = find_categories(tiny_category)
    assert category.name == "part"
    assert len(category.train_images) == 16 and len(category.validation_images) == 4
    defects = [item for item in category.test_images if item.is_defect]
    assert defects and all(item.mask_path and item.mask_path.name.endswith("_mask.png") for item in defects)


def test_root_with_several_categories(tmp_path):
    for name in ("alpha", "beta"):
        make_mvtec_category(tmp_path / name, n_train=4, n_test=1)
    assert [c.name for c in find_categories(tmp_path)] == ["alpha", "beta"]
    rng = np.random.default_rng(0)
    for number in range(3):  # a simple-layout category beside them: it was left out without a word
        save(texture(rng), tmp_path / "gamma" / "train_dataset_folder" / f"{number}.png")
    make_mvtec_category(tmp_path.parent / f"{tmp_path.name}-elsewhere" / "kept", n_train=4, n_test=1)
    (tmp_path / "delta").symlink_to(tmp_path.parent / f"{tmp_path.name}-elsewhere" / "kept")  # named as the root lists it, not as its target
    assert [c.name for c in find_categories(tmp_path)] == ["alpha", "beta", "delta", "gamma"]
    assert find_categories(tmp_path / "alpha" / ".." / "beta" / ".")[0].name == "beta"


def test_simple_layout(tmp_path):
    rng = np.random.default_rng(0)
    for number in range(3):
        save(texture(rng), tmp_path / "train_dataset_folder" / f"{number}.jpg")
        save(texture(rng), tmp_path / "test_dataset_folder" / "good" / f"{number}.jpg")
        save(texture(rng), tmp_path / "test_dataset_folder" / "defect" / f"{number}.bmp")
    save(texture(rng), tmp_path / "train_dataset_folder" / "defect" / "d.png")
    save(texture(rng), tmp_path / "train_dataset_folder" / "defect" / "d_mask.png")  # a mask put beside its defect
    (tmp_path / "train_dataset_folder" / "notes.txt").write_text("not an image")
    (category,) = find_categories(tmp_path)
    assert len(category.train_images) == 3 and [path.name for path in category.train_defect_images] == ["d.png"]
    assert [path.name for path in category.mask_files] == ["d_mask.png"]  # named in a note, never learned as a defect
    save(texture(rng), tmp_path / "train_dataset_folder" / "defects" / "e.png")  # misspelt: named in a note, not read
    assert [path.name for path in find_categories(tmp_path)[0].ignored_folders] == ["defects"]
    assert sorted({item.defect_type for item in category.test_images}) == ["defect", "good"]
    assert all(item.mask_path is None for item in category.test_images)
    # masks beside the test images, or under ground_truth/<type>/ as in MVTec AD: the defect's, never a test image
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(tmp_path / "test_dataset_folder" / "defect" / "0_mask.png")
    (tmp_path / "ground_truth" / "defect").mkdir(parents=True)
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(tmp_path / "ground_truth" / "defect" / "1_mask.png")
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(tmp_path / "test_dataset_folder" / "defect" / "2_mask.jpg")  # any image format
    (category,) = find_categories(tmp_path)
    assert len(category.test_images) == 6
    masks = {item.path.name: item.mask_path and item.mask_path.relative_to(tmp_path).as_posix() for item in category.test_images if item.is_defect}
    assert masks == {"0.bmp": "test_dataset_folder/defect/0_mask.png", "1.bmp": "ground_truth/defect/1_mask.png",
                     "2.bmp": "test_dataset_folder/defect/2_mask.jpg"}


def test_goods_only_in_other_subfolders_of_the_simple_layout_are_named(tmp_path):
    """The simple layout reads its training folder's own images and good/ (any depth): goods kept
    only in other subfolders get an error naming them and where to move them, not "no images"."""
    rng = np.random.default_rng(0)
    save(texture(rng), tmp_path / "train_dataset_folder" / "line A" / "batch 1" / "0.png")
    save(texture(rng), tmp_path / "train_dataset_folder" / "line B" / "0.png")
    with pytest.raises(DataError, match=r"its subfolders \(line A, line B\) are not read; move the good images into .*train_dataset_folder/good/"):
        find_categories(tmp_path)
    (tmp_path / "train_dataset_folder" / "line A").rename(tmp_path / "train_dataset_folder" / "good")
    (category,) = find_categories(tmp_path)
    assert [path.name for path in category.train_images] == ["0.png"] and [p.name for p in category.ignored_folders] == ["line B"]


def test_a_test_folder_named_good_in_any_case_holds_goods(tmp_path):
    rng = np.random.default_rng(0)
    save(texture(rng), tmp_path / "simple" / "train_dataset_folder" / "0.png")
    save(texture(rng), tmp_path / "simple" / "test_dataset_folder" / "Good" / "0.png")
    save(texture(rng), tmp_path / "simple" / "test_dataset_folder" / "Defect" / "0.png")
    save(texture(rng), tmp_path / "mvtec" / "train" / "good" / "0.png")
    save(texture(rng), tmp_path / "mvtec" / "test" / "GOOD" / "0.png")
    for layout in ("simple", "mvtec"):
        (category,) = find_categories(tmp_path / layout)
        assert [item.is_defect for item in category.test_images if item.path.parent.name.lower() == "good"] == [False]


def test_missing_and_empty_dataset_dirs(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        find_categories(tmp_path / "absent")
    with pytest.raises(DataError, match="holds no dataset"):
        find_categories(tmp_path)
    (tmp_path / "train" / "good").mkdir(parents=True)
    (tmp_path / "train" / "good" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match="no images in"):
        find_categories(tmp_path)


@pytest.mark.parametrize(
    "mode, array",
    [
        ("L", np.full((20, 30), 128, np.uint8)),
        ("RGBA", np.full((20, 30, 4), 200, np.uint8)),
        ("I;16", np.full((20, 30), 65535 // 2, np.uint16)),
        ("RGB", np.full((20, 30, 3), 50, np.uint8)),
    ],
)
def test_any_image_mode_becomes_rgb(tmp_path, mode, array):
    path = tmp_path / "image.png"
    Image.fromarray(array).save(path)
    with Image.open(path) as stored:
        assert stored.mode == mode
    rgb = read_rgb(path)
    assert rgb.shape == (20, 30, 3) and rgb.dtype == np.uint8
    if mode == "I;16":
        assert abs(int(rgb[0, 0, 0]) - 127) <= 1  # scaled by the 16-bit range, not clipped


def test_a_16_bit_camera_is_read_against_one_scale_for_the_model(tmp_path):
    """12-bit camera data in 16-bit files: each image alone would fill the 8-bit range from its own
    maximum, so a frame at a quarter of the exposure looked as bright as a normal one. A model reads
    all of them against the full scale of its training images, saved with it."""
    rng = np.random.default_rng(0)
    normal = [rng.integers(1000, 4000, (24, 32)).astype(np.uint16) for _ in range(3)]
    for number, values in enumerate(normal):
        Image.fromarray(values).save(tmp_path / f"train{number}.png")
    Image.fromarray((normal[0] // 4).astype(np.uint16)).save(tmp_path / "dark.png")
    Image.fromarray(np.full((24, 32), 90, np.uint8)).save(tmp_path / "eight_bit.png")
    train = [tmp_path / f"train{number}.png" for number in range(3)]
    assert training_full_scale(train + [tmp_path / "eight_bit.png"]) == 4095.0
    assert training_full_scale([tmp_path / "eight_bit.png"]) is None  # 8-bit data needs no scale
    preprocessor = Preprocessor(24, 24, (0.5,) * 3, (0.2,) * 3)
    preprocessor.gray_full_scale = 4095.0
    restored = Preprocessor.from_description(preprocessor.description((24, 24), 1.0))
    assert restored.gray_full_scale == 4095.0
    dark_alone, normal_alone = read_rgb(tmp_path / "dark.png").mean(), read_rgb(train[0]).mean()
    assert dark_alone > 0.8 * normal_alone  # per image: the dark frame hides its exposure
    dark, bright = (read_rgb(path, full_scale=restored.gray_full_scale).mean() for path in (tmp_path / "dark.png", train[0]))
    assert 0.2 < dark / bright < 0.3  # the model's one scale keeps it a quarter as bright
    (batch,) = ImageBatches([tmp_path / "dark.png", train[0]], restored, batch_size=2)  # what scoring reads
    assert float(batch.images[0].mean()) < float(batch.images[1].mean())


def test_unreadable_files_are_skipped_and_named(tmp_path):
    rng = np.random.default_rng(0)
    for number in range(5):
        save(texture(rng), tmp_path / f"{number}.png")
    (tmp_path / "3.png").write_bytes(b"not a png at all")
    good = tmp_path / "1.png"
    good.write_bytes(good.read_bytes()[:100])  # truncated
    (tmp_path / "4.png").write_bytes(b"")  # a copy that never arrived
    batches = ImageBatches(find_images(tmp_path), Preprocessor(64, 64, (0.5,) * 3, (0.2,) * 3), batch_size=2)
    seen = [index for batch in batches for index in batch.indices]
    assert seen == [0, 2]
    assert sorted(path.name for path, _ in batches.skipped) == ["1.png", "3.png", "4.png"]
    assert "it is empty (0 bytes): copy it again" in dict((path.name, reason) for path, reason in batches.skipped)["4.png"]


def test_preprocessor_shapes_and_crop_box():
    prep = Preprocessor(256, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    tensor = prep.image_tensor(np.zeros((400, 300, 3), np.uint8))
    assert tensor.shape == (3, 224, 224)
    top, left, bottom, right = prep.crop_box(400, 300)
    assert (round(top), round(left), round(bottom), round(right)) == (25, 19, 375, 281)
    full = prep.map_to_original(torch.ones(224, 224), 400, 300)
    assert full.shape == (400, 300) and full[0, 0] == 0 and full[200, 150] == 1


def test_settings_overrides_are_typed(capsys):
    settings, rest = load(["SEED=3", "BLUR_SIGMA=2", "LAYERS=(1,2)", "DATASET_DIR=x", "folder"])
    assert (settings.SEED, settings.BLUR_SIGMA, settings.LAYERS, settings.DATASET_DIR) == (3, 2.0, (1, 2), "x")
    assert rest == ["folder"]
    with pytest.raises(SettingsError, match="unknown setting BATCHSIZE"):
        load(["BATCHSIZE=3"])
    with pytest.raises(SettingsError, match="SEED=abc"):
        load(["SEED=abc"])
    with pytest.raises(SettingsError, match="SEED=1.5 is not allowed: SEED must be an integer"):
        load(["SEED=1.5"])
    assert load(["SEED=1", "SEED=2"])[0].SEED == 2  # the last counts (wrapper scripts), with a note
    assert "note: SEED is given more than once on the command line: the last, SEED=2, counts" in capsys.readouterr().err
    with pytest.raises(SettingsError, match="TILE_SIZE=16 is not allowed"):
        load(["TILE_SIZE=16", "TILE_OVERLAP=0"])  # thousands of tiles per image
    with pytest.raises(SettingsError, match=r"CENTER_CROP=0.1 is not allowed: CENTER_CROP must be a number in \[0.25, 1\]"):
        load(["CENTER_CROP=0.1"])  # would resize 10x to keep 1 % of the image


def test_no_folder_setting_lies_in_model_dir_whose_folders_a_retrain_moves_away(tmp_path):
    """RESULTS_DIR = MODEL_DIR put test.py's predictions in the model's folder: the next retrain moved
    them to a backup, and later ones deleted it."""
    models = tmp_path / "models"
    for key, folder in (("RESULTS_DIR", models), ("REVIEW_DIR", models / "demo" / "review"), ("WATCH_DIR", models / "incoming")):
        with pytest.raises(SettingsError, match=f"{key}=.* lies in MODEL_DIR=.*: set {key} to a folder outside MODEL_DIR"):
            load([f"MODEL_DIR={models}", f"{key}={folder}"])
    beside = load([f"MODEL_DIR={models}", f"RESULTS_DIR={tmp_path / 'models-results'}"])[0]  # a name that only begins alike
    assert beside.RESULTS_DIR == str(tmp_path / "models-results")
    results = tmp_path / "results"  # test.py's overlays were learned as 8 good parts
    with pytest.raises(SettingsError, match="ADD_GOOD=.* lies in RESULTS_DIR=.*no pictures of parts"):
        load([f"RESULTS_DIR={results}", f"ADD_GOOD={results / 'part' / 'test-good' / 'pictures'}"])
    reviewed = load([f"RESULTS_DIR={results}", f"REVIEW_DIR={results / 'review'}", f"ADD_GOOD={results / 'review' / 'good'}"])[0]
    assert reviewed.ADD_GOOD == str(results / "review" / "good")  # the review page's folder, kept under RESULTS_DIR: learned


def test_settings_as_users_type_them(monkeypatch, tmp_path):
    import config

    assert load(["IMAGE_SIZE=1"])[0].IMAGE_SIZE == 1.0  # full resolution, never a 1 x 1 pixel model
    assert load(["IMAGE_SIZE=64"])[0].IMAGE_SIZE == (64, 64)  # one whole number of pixels: a square (it was refused as "64.0")
    with pytest.raises(SettingsError, match="IMAGE_SIZE=16.0 is not allowed"):
        load(["IMAGE_SIZE=16"])
    monkeypatch.setattr(config, "CENTER_CROP", 1)  # a whole number where the default is a float
    assert load(["CENTER_CROP=0.9"])[0].CENTER_CROP == 0.9
    monkeypatch.setattr(config, "CROP", 160, raising=False)  # the old spelling left beside IMAGE_SIZE: it was ignored silently
    with pytest.raises(SettingsError, match="config.py sets both IMAGE_SIZE and the old CROP: delete the old line"):
        load([])
    assert load(["CROP=128", "RESIZE=128"])[0].IMAGE_SIZE == (128, 128)  # on the command line it is clear
    monkeypatch.delattr(config, "CROP")
    monkeypatch.setattr(config, "BATCH_SIZE", "16")  # quoted by mistake: the message says so
    with pytest.raises(SettingsError, match="'16' is text: write it without quotes"):
        load([])
    monkeypatch.delattr(config, "BATCH_SIZE")  # deleted, or an older config.py
    with pytest.raises(SettingsError, match="config.py has no BATCH_SIZE: add it back"):
        load([])
    broken = tmp_path / "config.py"
    broken.write_text("SEED = 0\nBATCH_SIZE = 16)\n")
    code = f"import sys; sys.path[:0] = [{str(tmp_path)!r}, {str(Path(__file__).resolve().parents[1])!r}]; import settings"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: config.py line 2: unmatched ')'")


@pytest.mark.skipif(not (SHARED / "weights").is_dir(), reason="../shared is absent")
def test_offline_weights_map_onto_torchvision_names():
    import torchvision

    reference = torch.load(SHARED / "weights" / "mobilenet_v2_imagenet_features.pt", weights_only=True)
    mapped = _offline_state_dict(torchvision.models.mobilenet_v2())
    assert mapped.keys() == reference.keys()
    assert all(torch.equal(mapped[key], reference[key]) for key in reference)
    extractor = FeatureExtractor("mobilenet_v2", "imagenet-offline", (1, 2, 3))
    assert extractor.channels == [24, 32, 96]


def test_imagenet_download_failure_says_how_to_use_a_local_file(monkeypatch, tmp_path):
    import urllib.error

    import torchvision

    from anomaly_model import backbone

    def offline(weights, *args, **kwargs):
        raise urllib.error.URLError("no internet")

    monkeypatch.setattr(type(torchvision.models.ResNet18_Weights.DEFAULT), "get_state_dict", offline)
    with pytest.raises(backbone.ModelError, match=r"set WEIGHTS=/path/to/resnet18-.*\.pth"):
        backbone.build_backbone("resnet18", "imagenet")


@pytest.mark.parametrize("name", ["resnet18", "wide_resnet50_2", "mobilenet_v2"])
def test_our_networks_are_torchvisions_without_importing_it(name):
    """Weights files in torchvision's names load unchanged and seeded random weights stay as they were."""
    import torchvision

    from anomaly_model.networks import build_network

    torch.manual_seed(3)
    ours = build_network(name).eval()
    torch.manual_seed(3)
    reference = torchvision.models.get_model(name, weights=None).eval()
    assert list(ours.state_dict()) == list(reference.state_dict())
    assert all(torch.equal(value, reference.state_dict()[key]) for key, value in ours.state_dict().items())
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(ours(images), reference(images))


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_folded_batch_norms_give_the_same_features_and_the_same_fingerprint(tmp_path, name):
    """The extractor folds each batch norm into its convolution (MobileNetV2's features in half the
    time): its features are the unfolded network's up to float rounding, and model.json's
    backbone fingerprint is still that of the weights as loaded, so models saved before still load."""
    from torch import nn

    from anomaly_model.backbone import _stages, build_backbone, weights_fingerprint
    from anomaly_model.networks import build_network

    torch.manual_seed(7)
    network = build_network(name)
    for module in network.modules():  # batch norms that do something (a random network's are near identities)
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    weights = tmp_path / "weights.pt"
    torch.save(network.state_dict(), weights)
    extractor = FeatureExtractor(name, str(weights), (1, 2, 3))
    assert not any(isinstance(module, nn.BatchNorm2d) for module in extractor.modules())
    unfolded = nn.Module()
    unfolded.stages = nn.ModuleList(_stages(name, build_backbone(name, str(weights)))[:3])
    assert extractor.fingerprint == weights_fingerprint(unfolded)
    images = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        expected, x = [], images
        for stage in unfolded.stages:
            x = stage(x)
            expected.append(x)
    for ours, reference in zip(extractor(images), expected):
        assert ours.shape == reference.shape
        assert float((ours - reference).abs().max() / reference.abs().max()) < 1e-5


def test_the_scripts_do_not_import_torchvision():
    """It brings torch._dynamo: ~170 MB of memory and ~1.2 s at every start, for nothing used."""
    import subprocess
    import sys

    probe = "import sys, pipeline.cli, pipeline.inspection, anomaly_model.backbone; print('torchvision' in sys.modules)"
    imported = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=Path(__file__).parent.parent)
    assert imported.stdout.strip() == "False", imported.stderr


def test_local_weights_file_is_used_and_checked(tmp_path):
    import torchvision

    from anomaly_model.backbone import build_backbone
    from anomaly_model.errors import ModelError

    torch.manual_seed(7)
    source = torchvision.models.resnet18()
    path = tmp_path / "resnet18.pth"
    torch.save({"state_dict": source.state_dict()}, path)
    loaded = build_backbone("resnet18", str(path))
    assert torch.equal(loaded.layer1[0].conv1.weight, source.layer1[0].conv1.weight)
    with pytest.raises(ModelError, match="do not fit torchvision's mobilenet_v2"):
        build_backbone("mobilenet_v2", str(path))
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(ModelError, match="cannot read weights file"):
        build_backbone("resnet18", str(tmp_path / "junk.pth"))
