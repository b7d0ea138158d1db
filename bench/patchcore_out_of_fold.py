"""How honest PatchCore's out-of-fold scores are: exclusion against a real refit without the fold.

    .venv/bin/python bench/patchcore_out_of_fold.py MODEL_DIR CATEGORY_DIR [--folds 5] [--refit-folds 1]

`PatchCore.out_of_fold_scores` scores each training image against the fitted coreset minus the
points that came from its own fold; the coreset itself was chosen with that fold present. This
script compares, for the images of `--refit-folds` folds, those scores with the scores of a
PatchCore fitted from scratch without the fold (the honest, expensive answer), and with the
validation goods' scores under the full model (images no fit ever saw). MODEL_DIR is a PatchCore
model train.py wrote for CATEGORY_DIR with config.py's defaults (the same split is rebuilt).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from anomaly_model.patchcore import PatchCore, PatchCoreSettings  # noqa: E402
from anomaly_model.store import load_model  # noqa: E402
from dataset_manager import ImageBatches, Preprocessor, find_categories  # noqa: E402
from pipeline.training import split_validation  # noqa: E402
from settings import defaults  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("category_dir")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--refit-folds", type=int, default=1)
    args = parser.parse_args()
    settings = defaults()
    model, description = load_model(Path(args.model_dir), "cpu")
    preprocessor = Preprocessor.from_description(description["preprocessing"])
    (category,) = find_categories(Path(args.category_dir))
    train, validation = split_validation(category, settings["VALIDATION_FRACTION"], settings["SEED"])
    folds = np.random.default_rng(0).permutation(len(train)) % args.folds

    def batches(wanted=None):
        chosen = list(range(len(train))) if wanted is None else wanted
        return ((batch.images, [chosen[i] for i in batch.indices]) for batch in ImageBatches([train[i] for i in chosen], preprocessor, 16, 0))

    started = time.perf_counter()
    oof = np.full(len(train), np.nan)
    for indices, _, scores, _ in model.out_of_fold_scores(batches, folds):
        oof[indices] = scores.numpy()
    oof_seconds = time.perf_counter() - started
    in_sample = np.concatenate([model.score(b.images)[1].numpy() for b in ImageBatches(train, preprocessor, 16, 0)])
    held_out = np.concatenate([model.score(b.images)[1].numpy() for b in ImageBatches(validation, preprocessor, 16, 0)])

    print(f"{category.name}: {len(train)} training images in {args.folds} folds; out-of-fold scoring took {oof_seconds:.0f} s")
    print("image scores, mean [5th, 50th, 95th percentile]:")
    for name, values in (("in-sample (the full model, its own training images)", in_sample),
                         ("out-of-fold by exclusion (training images)", oof),
                         ("validation goods (full model, never fitted on)", held_out)):
        print(f"  {name}: {values.mean():.3f} [{np.percentile(values, 5):.3f}, {np.median(values):.3f}, {np.percentile(values, 95):.3f}]")
    entry = description["anomaly_model"]
    for fold in range(args.refit_folds):
        kept = [path for path, f in zip(train, folds) if f != fold]
        left = [i for i, f in enumerate(folds) if f == fold]
        refit = PatchCore(PatchCoreSettings(**entry["settings"]), device="cpu")
        refit.fit(b.images for b in ImageBatches(kept, preprocessor, 16, 0))
        honest = np.concatenate([refit.score(b.images)[1].numpy() for b in ImageBatches([train[i] for i in left], preprocessor, 16, 0)])
        excluded = oof[left]
        ratio = excluded / honest
        print(f"fold {fold} ({len(left)} images): refit without the fold gives mean {honest.mean():.3f}, exclusion {excluded.mean():.3f}; "
              f"exclusion / refit per image: mean {ratio.mean():.3f} [min {ratio.min():.3f}, max {ratio.max():.3f}], "
              f"Spearman {spearmanr(excluded, honest).statistic:.3f}")


if __name__ == "__main__":
    main()
