"""How PATCHCORE_NEIGHBORS (the paper's eq. 7 image-score reweighting) changes image ROCAUC.

    .venv/bin/python bench/patchcore_neighbors.py MODEL_DIR CATEGORY_DIR [--neighbors 0,2,3,5,9,15] [--seeds 3]

MODEL_DIR is a PatchCore model train.py wrote for CATEGORY_DIR (the reweighting is applied at
scoring time, so one fitted coreset serves every b). The choice is made on data the fit never
saw and that is not the test split: the category's validation goods (validation/good, else the
seeded VALIDATION_FRACTION share of train, as train.py splits it) against synthetic defects
(classification_model/synthetic.py, every type, `--per-image` per good, one set per seed).
The test split's image ROCAUC is printed beside it for information only.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from anomaly_model.store import load_model  # noqa: E402
from classification_model.synthetic import DEFECT_TYPES, make_defect  # noqa: E402
from dataset_manager import DataError, Preprocessor, find_categories, read_rgb  # noqa: E402
from evaluation.metrics import image_rocauc  # noqa: E402
from pipeline.training import split_validation  # noqa: E402
from settings import defaults  # noqa: E402


def scores_for(model, images: torch.Tensor, choices: list[int]) -> dict[int, np.ndarray]:
    """Image score of each image for every b in `choices`, from one nearest-neighbour search."""
    embedding, distances, nearest, grid = model.nearest_patches(images, model.memory_norms_)
    count, positions = len(images), grid[0] * grid[1]
    maps = model.map_maker(distances.view(count, *grid), tuple(images.shape[-2:]))
    peak = maps.flatten(1).max(dim=1).values
    worst = distances.view(count, positions).argmax(dim=1) + torch.arange(count) * positions
    result = {}
    for b in choices:
        weight = model.reweighting(embedding[worst], nearest[worst], model.memory_norms_, b) if b else torch.ones(count)
        result[b] = (peak * weight).numpy()
    return result


def score_images(model, tensors: list[torch.Tensor], choices: list[int], batch: int = 16) -> dict[int, np.ndarray]:
    parts = [scores_for(model, torch.stack(tensors[i : i + batch]), choices) for i in range(0, len(tensors), batch)]
    return {b: np.concatenate([p[b] for p in parts]) for b in choices}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("category_dir")
    parser.add_argument("--neighbors", default="0,2,3,5,9,15")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--per-image", type=int, default=6)
    args = parser.parse_args()
    choices = [int(b) for b in args.neighbors.split(",")]
    settings = defaults()
    model, description = load_model(Path(args.model_dir), "cpu")
    prep = description["preprocessing"]
    preprocessor = Preprocessor.from_description(prep)
    (category,) = find_categories(Path(args.category_dir))
    _, validation = split_validation(category, settings["VALIDATION_FRACTION"], settings["SEED"])
    goods = []
    for path in validation:
        try:
            goods.append(read_rgb(path))
        except DataError:
            pass
    good_scores = score_images(model, [preprocessor.image_tensor(g) for g in goods], choices)
    rows = {b: [] for b in choices}
    for seed in range(args.seeds):
        rng = np.random.default_rng(1000 + seed)
        defects = [
            preprocessor.image_tensor(make_defect(g, DEFECT_TYPES[(i + v) % 3], rng, (0.03, 0.15), (0.3, 1.0), preprocessor.crop_box(*g.shape[:2])))
            for i, g in enumerate(goods) for v in range(args.per_image)
        ]
        defect_scores = score_images(model, defects, choices)
        for b in choices:
            labels = np.r_[np.zeros(len(goods), bool), np.ones(len(defects), bool)]
            rows[b].append(image_rocauc(labels, np.r_[good_scores[b], defect_scores[b]]))
    tests = [item for item in category.test_images]
    test_tensors = [preprocessor.image_tensor(read_rgb(item.path)) for item in tests]
    test_scores = score_images(model, test_tensors, choices)
    test_labels = np.array([item.is_defect for item in tests])
    print(f"{category.name}: {len(goods)} validation goods, {args.per_image} synthetic defects each, {args.seeds} seeds")
    print("| b | validation vs synthetic image ROCAUC (mean ± std) | test image ROCAUC (not used to choose) |")
    print("|---|---|---|")
    for b in choices:
        values = np.array(rows[b])
        print(f"| {b} | {values.mean():.4f} ± {values.std():.4f} | {image_rocauc(test_labels, test_scores[b]):.4f} |")


if __name__ == "__main__":
    main()
