"""Ablation: image ROCAUC of the plain max-of-map score vs. the XGBoost classifier.

    .venv/bin/python bench/classifier_ablation.py [CATEGORY_DIR] [--seeds 5] [--per-image 6]

CATEGORY_DIR is an MVTec-layout category (default ../shared/data/tire). PaDiM (MobileNetV2,
offline ImageNet weights, config.py defaults) is fitted once on train/good and reused. Per seed:
(i) classifier on synthetic defects only (synthetic set drawn with that seed); (ii) classifier on
synthetic defects plus k real defect images drawn from the test set with that seed, which are
then removed from the evaluation of every method in that row (so max score and classifier are
compared on the same images). Goods for the classifier are validation images only; nothing is
tuned on the test set.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from anomaly_model.padim import Padim  # noqa: E402
from classification_model.features import map_features  # noqa: E402
from classification_model.training import fit_on_maps, image_maps, params_from_settings, synthetic_defect_maps  # noqa: E402
from classification_model.xgboost import _rocauc  # noqa: E402
from dataset_manager import ImageBatches, find_categories  # noqa: E402
from pipeline.training import calibrate, make_preprocessor, split_validation, validation_maps  # noqa: E402
from settings import load  # noqa: E402
from classification_model.features import levels_from_description  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("category", nargs="?", default="../shared/data/tire")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--per-image", type=int, default=None, help="synthetic defects per validation image (config default)")
    parser.add_argument("--ks", default="5,10")
    args = parser.parse_args()
    settings, _ = load(["NUM_WORKERS=0"])
    if args.per_image is not None:
        settings.CLASSIFIER_SYNTHETIC_PER_IMAGE = args.per_image
    torch.set_num_threads(2)
    (category,) = find_categories(Path(args.category))
    started = time.perf_counter()
    train_paths, validation_paths = split_validation(category, settings.VALIDATION_FRACTION, settings.SEED)
    preprocessor = make_preprocessor(settings)
    padim = Padim(settings.BACKBONE, settings.WEIGHTS, settings.LAYERS, settings.FEATURE_DIM, settings.COVARIANCE_EPSILON,
                  settings.BLUR_SIGMA, settings.SEED, settings.DEVICE)
    padim.fit(b.images for b in ImageBatches(train_paths, preprocessor, settings.BATCH_SIZE, 0))
    good_maps, skipped = validation_maps(padim, validation_paths, preprocessor, settings)
    levels = levels_from_description(calibrate(good_maps, settings.IMAGE_FALSE_REJECT_RATE, settings.PIXEL_FALSE_REJECT_RATE))
    test_items = category.test_images
    test_maps = image_maps(padim, preprocessor, [item.path for item in test_items], settings.BATCH_SIZE, "test")
    labels = np.array([item.is_defect for item in test_items], dtype=int)
    max_scores = test_maps.flatten(1).max(dim=1).values.double().numpy()
    test_features = map_features(test_maps, levels)
    print(f"PaDiM fit + maps: {time.perf_counter() - started:.0f} s; {len(train_paths)} train, {good_maps.shape[0]} validation, "
          f"{labels.sum()} defect / {(1 - labels).sum()} good test images", file=sys.stderr)
    params = params_from_settings(settings)
    ks = [int(k) for k in args.ks.split(",") if k]
    rows: dict[str, list[tuple[float, float]]] = {"synthetic only": []} | {f"synthetic + {k} real": [] for k in ks}
    defect_indices = np.flatnonzero(labels == 1)
    for seed in range(args.seeds):
        params.seed = seed
        synthetic, sources, _ = synthetic_defect_maps(
            padim, preprocessor, validation_paths, settings.CLASSIFIER_SYNTHETIC_PER_IMAGE, settings.CLASSIFIER_DEFECT_SIZE,
            settings.CLASSIFIER_DEFECT_STRENGTH, seed, settings.BATCH_SIZE,
        )
        for name, k in [("synthetic only", 0)] + [(f"synthetic + {k} real", k) for k in ks]:
            chosen = np.random.default_rng(1000 + seed).choice(defect_indices, size=k, replace=False) if k else np.zeros(0, int)
            keep = np.setdiff1d(np.arange(len(labels)), chosen)
            defect_maps = torch.cat([synthetic, test_maps[chosen]])
            groups = np.concatenate([sources, good_maps.shape[0] + np.arange(k)])
            weights = np.concatenate([np.ones(len(sources)), np.full(k, settings.CLASSIFIER_REAL_DEFECT_WEIGHT)])
            classifier = fit_on_maps(good_maps, defect_maps, groups, levels, params, settings.CLASSIFIER_FALSE_REJECT_RATE, weights)
            probability = classifier.predict(test_features[keep])
            rows[name].append((_rocauc(labels[keep], max_scores[keep]), _rocauc(labels[keep], probability)))
            print(f"seed {seed} {name}: max {rows[name][-1][0]:.4f} classifier {rows[name][-1][1]:.4f} "
                  f"(OOF ROCAUC {classifier.report['out_of_fold_rocauc']:.3f}, {classifier.report['rounds']} rounds)", file=sys.stderr)
    print(f"\n{category.name}: image ROCAUC over {args.seeds} seeds (mean ± std), {time.perf_counter() - started:.0f} s\n")
    print("| classifier training defects | max score | classifier | difference |")
    print("| --- | --- | --- | --- |")
    for name, values in rows.items():
        array = np.array(values)
        diff = array[:, 1] - array[:, 0]
        print(f"| {name} | {array[:, 0].mean():.4f} ± {array[:, 0].std():.4f} | {array[:, 1].mean():.4f} ± {array[:, 1].std():.4f} "
              f"| {diff.mean():+.4f} ± {diff.std():.4f} (worst {diff.min():+.4f}) |")


if __name__ == "__main__":
    main()
