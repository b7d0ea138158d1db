"""What cross-fitting costs: the anomaly model's fit against its out-of-fold maps of the same images.

    .venv/bin/python bench/out_of_fold_cost.py [CATEGORY_DIR] [--folds 5] [--limit-train N] [KEY=VALUE ...]

Fits the model (config.py defaults, or KEY=VALUE overrides such as BACKBONE=wide_resnet50_2
WEIGHTS=none) on the category's training images, then runs `out_of_fold_scores` with train.py's
folds, and prints both times (each includes reading the images), the ratio, and the process's peak
memory after each step. The ratio is the figure to quote: both steps run in the same process
under the same machine load.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from anomaly_model.store import build_model  # noqa: E402
from dataset_manager import ImageBatches, find_categories  # noqa: E402
from pipeline.training import assign_folds, make_preprocessor, split_validation  # noqa: E402
from settings import load  # noqa: E402


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("category", nargs="?", default=str(ROOT.parent / "shared" / "data" / "tire"))
    parser.add_argument("--folds", type=int, default=None, help="default: OUT_OF_FOLD_FOLDS")
    parser.add_argument("--limit-train", type=int, default=0, help="use only the first N training images")
    args, overrides = parser.parse_known_args()
    settings, _ = load(["NUM_WORKERS=0", *overrides])
    (category,) = find_categories(Path(args.category))
    train_paths, _ = split_validation(category, settings.VALIDATION_FRACTION, settings.SEED)
    if args.limit_train:
        train_paths = train_paths[: args.limit_train]
    folds = args.folds or settings.OUT_OF_FOLD_FOLDS
    model = build_model(settings)
    preprocessor = make_preprocessor(settings, train_paths, model.stride)

    def batches(wanted=None):
        chosen = list(range(len(train_paths))) if wanted is None else wanted
        return ((b.images, [chosen[i] for i in b.indices]) for b in ImageBatches([train_paths[i] for i in chosen], preprocessor, settings.BATCH_SIZE, 0))

    fitted: list[int] = []  # told to the fit as train.py does (PatchCore's out-of-fold pass then knows the fit's order)

    def fit_batches():
        for images, indices in batches():
            fitted.extend(indices)
            yield images

    started = time.perf_counter()
    model.plan_fit(len(train_paths), fitted)
    model.fit_images(fit_batches())
    fit_seconds = time.perf_counter() - started
    fit_peak = peak_gb()
    started = time.perf_counter()
    count = 0
    for indices, maps, scores, _ in model.out_of_fold_scores(batches, assign_folds(len(train_paths), folds, settings.SEED)):
        count += len(indices)
    oof_seconds = time.perf_counter() - started
    print(
        f"{category.name}, {settings.BACKBONE} ({settings.WEIGHTS}), {len(train_paths)} training images, {folds} folds, "
        f"torch threads {torch.get_num_threads()}: fit {fit_seconds:.1f} s (peak RSS {fit_peak:.2f} GB); out-of-fold maps of "
        f"{count} images {oof_seconds:.1f} s (peak RSS {peak_gb():.2f} GB); out-of-fold / fit = {oof_seconds / fit_seconds:.2f}"
    )


if __name__ == "__main__":
    main()
