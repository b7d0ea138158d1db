"""Ablation: image ROCAUC of the plain max-of-map score vs. the good/defect classifier.

    .venv/bin/python bench/classifier_ablation.py [CATEGORY_DIR] [--seeds 5] [--ks 5,10] [--cache DIR]

CATEGORY_DIR is an MVTec-layout category (default ../shared/data/tire). PaDiM (config.py
defaults: MobileNetV2, offline ImageNet weights) is fitted once on train/good and reused. Per seed:
(i) classifier on synthetic defects only (synthetic set drawn with that seed); (ii) classifier on
synthetic defects plus k real defect images drawn from the test set with that seed, which are
then removed from the evaluation of every method in that row (so max score and classifier are
compared on the same images). Goods for the classifier are validation images only; nothing is
tuned on the test set.

--cache DIR stores the PaDiM maps (validation goods, test images, synthetic defects per seed) in
DIR as .npz, keyed by the model settings, the data and the source of synthetic.py, so a rerun
that only changes the features or the classifier takes seconds. Without it, everything is
computed from scratch (the honest one-command run).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from anomaly_model.base import AnomalyModel  # noqa: E402
from anomaly_model.store import build_model  # noqa: E402
from classification_model.features import levels_from_description, map_features  # noqa: E402
from classification_model.training import fit_on_maps, image_maps, params_from_settings, synthetic_defect_maps  # noqa: E402
from classification_model.xgboost import _rocauc  # noqa: E402
from dataset_manager import ImageBatches, find_categories  # noqa: E402
from pipeline.training import calibrate, make_preprocessor, split_validation, validation_maps  # noqa: E402
from settings import load  # noqa: E402

MODEL_KEYS = ("ANOMALY_MODEL", "BACKBONE", "WEIGHTS", "LAYERS", "FEATURE_DIM", "COVARIANCE_EPSILON", "BLUR_SIGMA", "SEED", "IMAGE_SIZE", "CENTER_CROP",
              "TILE_SIZE", "TILE_OVERLAP", "TILE_STATISTICS", "NORMALIZE_MEAN", "NORMALIZE_STD", "VALIDATION_FRACTION")


def _key(*parts) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


class MapSource:
    """The maps an ablation needs, computed once (PaDiM fitted lazily) and optionally cached."""

    def __init__(self, category_dir: Path, settings, cache: Path | None) -> None:
        (self.category,) = find_categories(Path(category_dir))
        self.settings = settings
        self.train_paths, self.validation_paths = split_validation(self.category, settings.VALIDATION_FRACTION, settings.SEED)
        self._model = build_model(settings)  # fitted lazily: cached maps need no fit
        self._fitted = False
        self.preprocessor = make_preprocessor(settings, self.train_paths, self._model.stride)
        self.cache = cache
        files = [str(p) for p in self.train_paths + self.validation_paths] + [str(i.path) for i in self.category.test_images]
        self.model_key = _key(str(Path(category_dir).resolve()), files, {k: getattr(settings, k) for k in MODEL_KEYS})

    @property
    def model(self) -> AnomalyModel:
        if not self._fitted:
            s = self.settings
            self._model.fit_images(b.images for b in ImageBatches(self.train_paths, self.preprocessor, s.BATCH_SIZE, 0))
            self._fitted = True
        return self._model

    def _cached(self, name: str, compute) -> dict[str, np.ndarray]:
        path = None if self.cache is None else self.cache / f"{self.category.name}-{self.model_key}-{name}.npz"
        if path is not None and path.exists():
            with np.load(path) as data:
                return dict(data)
        arrays = compute()
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            np.savez(path.with_suffix(".tmp.npz"), **arrays)
            path.with_suffix(".tmp.npz").rename(path)
        return arrays

    def base(self) -> dict[str, np.ndarray]:
        """Validation-good maps, test maps, test labels and defect types."""

        def compute():
            s = self.settings
            good, _, _ = validation_maps(self.model, self.validation_paths, self.preprocessor, s)
            test = image_maps(self.model, self.preprocessor, [i.path for i in self.category.test_images], s.BATCH_SIZE, "test")
            return {
                "good": good.numpy(),
                "test": test.numpy(),
                "labels": np.array([i.is_defect for i in self.category.test_images], dtype=int),
                "types": np.array([i.defect_type for i in self.category.test_images]),
            }

        return self._cached("base", compute)

    def synthetic(self, seed: int, per_image: int, size: tuple, strength: tuple) -> dict[str, np.ndarray]:
        source = (ROOT / "classification_model" / "synthetic.py").read_bytes()
        name = "synthetic-" + _key(seed, per_image, list(size), list(strength), hashlib.sha1(source).hexdigest())

        def compute():
            maps, sources, kinds = synthetic_defect_maps(
                self.model, self.preprocessor, self.validation_paths, per_image, size, strength, seed, self.settings.BATCH_SIZE)
            return {"maps": maps.numpy(), "sources": sources, "kinds": np.array(kinds)}

        return self._cached(name, compute)


def run_ablation(source: MapSource, seeds: int, ks: list[int], fit=None, verbose: bool = True,
                 kinds: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
    """{row name: (seeds, 2) [max-score ROCAUC, classifier ROCAUC]}; `fit(good, defects, groups, levels,
    params, rate, weights) -> classifier` defaults to the shipped `fit_on_maps`; `kinds` keeps only
    those synthetic defect types (what each type contributes)."""
    s = source.settings
    fit = fit or fit_on_maps
    base = source.base()
    good_maps, test_maps = torch.from_numpy(base["good"]), torch.from_numpy(base["test"])
    labels = base["labels"]
    levels = levels_from_description(calibrate(good_maps, good_maps.flatten(1).max(dim=1).values, s.IMAGE_FALSE_REJECT_RATE, s.PIXEL_FALSE_REJECT_RATE))
    max_scores = test_maps.flatten(1).max(dim=1).values.double().numpy()
    params = params_from_settings(s)
    rows: dict[str, list] = {"synthetic only": []} | {f"synthetic + {k} real": [] for k in ks}
    defect_indices = np.flatnonzero(labels == 1)
    for seed in range(seeds):
        params.seed = seed
        synthetic = source.synthetic(seed, s.CLASSIFIER_SYNTHETIC_PER_IMAGE, s.CLASSIFIER_DEFECT_SIZE, s.CLASSIFIER_DEFECT_STRENGTH)
        chosen_kinds = np.isin(synthetic["kinds"], kinds) if kinds else np.ones(len(synthetic["kinds"]), bool)
        synthetic_maps, sources = torch.from_numpy(synthetic["maps"][chosen_kinds]), synthetic["sources"][chosen_kinds]
        for name, k in [("synthetic only", 0)] + [(f"synthetic + {k} real", k) for k in ks]:
            chosen = np.random.default_rng(1000 + seed).choice(defect_indices, size=k, replace=False) if k else np.zeros(0, int)
            keep = np.setdiff1d(np.arange(len(labels)), chosen)
            defect_maps = torch.cat([synthetic_maps, test_maps[chosen]])
            groups = np.concatenate([sources, good_maps.shape[0] + np.arange(k)])
            weights = np.concatenate([np.ones(len(sources)), np.full(k, s.CLASSIFIER_REAL_DEFECT_WEIGHT)])
            classifier = fit(good_maps, defect_maps, groups, levels, params, s.CLASSIFIER_FALSE_REJECT_RATE, weights)
            if hasattr(classifier, "predict_maps"):
                probability = classifier.predict_maps(test_maps[keep])
            else:
                probability = classifier.predict(map_features(test_maps[keep], levels))
            rows[name].append((_rocauc(labels[keep], max_scores[keep]), _rocauc(labels[keep], probability)))
            if verbose:
                oof = classifier.report.get("out_of_fold_rocauc")
                print(f"seed {seed} {name}: max {rows[name][-1][0]:.4f} classifier {rows[name][-1][1]:.4f} "
                      f"(OOF ROCAUC {oof if oof is None else round(oof, 3)})", file=sys.stderr)
    return {name: np.array(values) for name, values in rows.items()}


def table(rows: dict[str, np.ndarray]) -> str:
    lines = ["| classifier training defects | max score | classifier | difference |", "| --- | --- | --- | --- |"]
    for name, array in rows.items():
        diff = array[:, 1] - array[:, 0]
        lines.append(f"| {name} | {array[:, 0].mean():.4f} ± {array[:, 0].std():.4f} | {array[:, 1].mean():.4f} ± "
                     f"{array[:, 1].std():.4f} | {diff.mean():+.4f} ± {diff.std():.4f} (worst {diff.min():+.4f}) |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("category", nargs="?", default="../shared/data/tire")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--per-image", type=int, default=None, help="synthetic defects per validation image (config default)")
    parser.add_argument("--ks", default="5,10", help="numbers of real test defects added to the training set")
    parser.add_argument("--cache", type=Path, default=None, help="folder for cached PaDiM maps (.npz)")
    parser.add_argument("--kinds", default="", help="comma-separated synthetic defect types to keep (default: all)")
    parser.add_argument("overrides", nargs="*", default=[], help="config overrides KEY=VALUE")
    args = parser.parse_intermixed_args()
    settings, _ = load(["NUM_WORKERS=0", *args.overrides])
    if args.per_image is not None:
        settings.CLASSIFIER_SYNTHETIC_PER_IMAGE = args.per_image
    torch.set_num_threads(2)
    started = time.perf_counter()
    source = MapSource(Path(args.category), settings, args.cache)
    base = source.base()
    print(f"maps: {time.perf_counter() - started:.0f} s; {len(source.train_paths)} train, {len(base['good'])} validation, "
          f"{base['labels'].sum()} defect / {(1 - base['labels']).sum()} good test images", file=sys.stderr)
    kinds = tuple(k for k in args.kinds.split(",") if k) or None
    rows = run_ablation(source, args.seeds, [int(k) for k in args.ks.split(",") if k], kinds=kinds)
    print(f"\n{source.category.name}: image ROCAUC over {args.seeds} seeds (mean ± std), {time.perf_counter() - started:.0f} s\n")
    print(table(rows))


if __name__ == "__main__":
    main()
