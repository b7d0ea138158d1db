"""Ablation: image ROCAUC of the model's image score (PaDiM: max of the map) vs. the good/defect
classifier, for every variant of the classifier that was tried (README, "Good/defect classifier").

    .venv/bin/python bench/classifier_ablation.py [SET ...] [--seeds 5] [--ks 5,10] [--cache DIR] [--work DIR] [--ceiling]

SET: tire, tire-gray (tire converted to gray, made under --work), ksdd (already gray: there is no
separate gray ksdd), demo (generate_demo_dataset, made under --work), ksdd-crop, tire-large,
ksdd-large (built from the shared data by bench/ablation_sets.py, under --work), or a category
folder in MVTec layout; default: the first four. The anomaly model (config.py defaults: MobileNetV2,
offline ImageNet weights) is fitted once per set on its training images and reused. Per seed: a
new synthetic set and classifier seed; for "+ k real", k test defects drawn with that seed join
the classifier's training set and are removed from the evaluation of both columns. Nothing is
chosen on a test split: the test images are only scored.

--cache DIR keeps the maps (validation goods, test images, the training images out-of-fold and
as the fitted model sees them, synthetic defects per seed; peak and background peak directions) as .npz, keyed by the model
settings, the data and the code that makes them, so a rerun that changes only the classifier
takes minutes. Without it everything is computed from scratch (the honest one-command run).

--ceiling adds, per set, how much any classifier on these map features could gain at all: each
feature's image ROCAUC on the test split, and classifiers trained *on the test split itself*
(5 x 5-fold stratified cross-validation over its goods and real defects). It uses test labels on
purpose, as an upper bound, and chooses nothing: where even it does not beat the max score, the
map features hold no more than the max about that set's real defects. It also prints how far the
test goods' image scores lie above the honest training goods' (ROCAUC of test goods vs. validation
and out-of-fold goods; 0.5 = no shift): a set whose test goods were taken differently ranks its
images by which feature the shift moves least, which synthetic defects cannot tell.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from anomaly_model.base import AnomalyModel  # noqa: E402
from anomaly_model.store import build_model  # noqa: E402
from classification_model.features import FEATURE_NAMES, MONOTONE, levels_from_description, map_features  # noqa: E402
from classification_model.synthetic import DEFECT_TYPES  # noqa: E402
from classification_model.training import (  # noqa: E402
    DefectPainting, VerdictRows, anchoring, decide_verdict, params_from_settings, synthetic_defect_maps, synthetic_plan,
)
from classification_model.xgboost import ClassifierRows, train_classifier  # noqa: E402
from dataset_manager import IMAGE_EXTENSIONS, ImageBatches, find_categories  # noqa: E402
from dataset_manager.demo import generate_demo_dataset  # noqa: E402
from evaluation.metrics import image_rocauc  # noqa: E402
from pipeline.training import GoodMapSample, assign_folds, calibrate, make_preprocessor, out_of_fold_maps, split_validation  # noqa: E402
from settings import load  # noqa: E402

from ablation_sets import ksdd_crop, large_area_set, shifted_test_set  # noqa: E402  (bench/, beside this script)

MODEL_KEYS = ("ANOMALY_MODEL", "BACKBONE", "WEIGHTS", "LAYERS", "FEATURE_DIM", "COVARIANCE_EPSILON", "BLUR_SIGMA", "SEED", "IMAGE_SIZE", "CENTER_CROP",
              "TILE_SIZE", "TILE_OVERLAP", "TILE_STATISTICS", "NORMALIZE_MEAN", "NORMALIZE_STD", "VALIDATION_FRACTION")


def _key(*parts) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


class MapSource:
    """The maps an ablation needs, computed once (the anomaly model fitted lazily) and optionally cached:
    validation goods, test images, the training images out-of-fold, synthetic defects per seed."""

    def __init__(self, category_dir: Path, settings, cache: Path | None) -> None:
        (self.category,) = find_categories(Path(category_dir))
        self.settings = settings
        self.train_paths, self.validation_paths = split_validation(self.category, settings.VALIDATION_FRACTION, settings.SEED)
        self._model = build_model(settings)  # fitted lazily: cached maps need no fit
        self._fitted = False
        self.preprocessor = make_preprocessor(settings, self.train_paths, self._model.stride)
        self.cache = cache
        files = [str(p) for p in self.train_paths + self.validation_paths] + [str(i.path) for i in self.category.test_images]
        keys = {k: getattr(settings, k) for k in MODEL_KEYS}
        self.model_key = _key(str(Path(category_dir).resolve()), files, keys, settings.OUT_OF_FOLD_FOLDS)

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

    def _score(self, paths: list[Path], label: str) -> tuple[np.ndarray, np.ndarray]:
        s = self.settings
        maps, scores = [], []
        for batch in tqdm(ImageBatches(paths, self.preprocessor, s.BATCH_SIZE, 0), desc=label, unit="batch", file=sys.stderr):
            m, sc = self.model.score(batch.images)
            maps.append(m.half().numpy())
            scores.append(sc.numpy())
        return np.concatenate(maps), np.concatenate(scores)

    def base(self) -> dict[str, np.ndarray]:
        """Validation goods, test images and out-of-fold training images: maps (float16) and image scores."""

        def compute():
            s = self.settings
            good, good_scores = self._score(self.validation_paths, "validation")
            test, test_scores = self._score([i.path for i in self.category.test_images], "test")
            folds = assign_folds(len(self.train_paths), s.OUT_OF_FOLD_FOLDS, s.SEED)
            oof_index, oof, oof_scores = [], [], []
            for indices, maps, scores, _ in out_of_fold_maps(self.model, self.train_paths, self.preprocessor, s, folds):
                oof_index += indices
                oof.append(maps.half().numpy())
                oof_scores.append(scores.numpy())
            return {
                "good": good, "good_scores": good_scores, "test": test, "test_scores": test_scores,
                "oof": np.concatenate(oof), "oof_scores": np.concatenate(oof_scores), "oof_index": np.array(oof_index),
                "oof_folds": folds[np.array(oof_index)],
                "labels": np.array([i.is_defect for i in self.category.test_images], dtype=int),
                "types": np.array([i.defect_type for i in self.category.test_images]),
            }

        return self._cached("base", compute)

    def peaks(self) -> dict[str, np.ndarray]:
        """Peak directions (`AnomalyModel.score_with_peaks`) of the validation goods and the test images,
        and the training images' out-of-fold ones ("oof", in the order of `base()["oof_index"]`)."""
        model_class = type(self._model)
        code = inspect.getsource(model_class.score_with_peaks) + inspect.getsource(model_class.patch_scores_and_peaks)
        if hasattr(model_class, "_directions_at"):
            code += inspect.getsource(model_class._directions_at)
        code += inspect.getsource(model_class.out_of_fold_scores)
        if hasattr(model_class, "_leave_out_peaks"):  # PaDiM's out-of-fold peak directions
            code += inspect.getsource(model_class._leave_out_peaks)

        def compute():
            directions = {}
            for name, paths in (("good", self.validation_paths), ("test", [i.path for i in self.category.test_images])):
                batches = ImageBatches(paths, self.preprocessor, self.settings.BATCH_SIZE, 0)
                directions[name] = np.concatenate([self.model.score_with_peaks(b.images)[2].numpy() for b in tqdm(batches, desc=f"{name} peaks", file=sys.stderr)])
            s = self.settings
            folds = assign_folds(len(self.train_paths), s.OUT_OF_FOLD_FOLDS, s.SEED)
            found = {}
            for indices, _, _, oof_directions in out_of_fold_maps(self.model, self.train_paths, self.preprocessor, s, folds, peaks=True):
                found.update(zip(indices, oof_directions.numpy()))
            directions["oof"] = np.stack([found[int(i)] for i in self.base()["oof_index"]])
            return directions

        return self._cached("peaks-" + _key(code), compute)

    def backgrounds(self) -> np.ndarray:
        """(N, d) the test images' background peak directions (`AnomalyModel.background_peaks`; NaN rows:
        none) at the pixel threshold of the honest goods (validation and out-of-fold), as train.py finds them."""
        from anomaly_model import base as model_base

        code = inspect.getsource(model_base.background_positions) + inspect.getsource(type(self._model).background_peaks)
        base = self.base()
        level = calibrate(torch.from_numpy(np.concatenate([base["good"], base["oof"]])).float(), torch.zeros(1), 0.0,
                          self.settings.PIXEL_FALSE_REJECT_RATE)["thresholds"]["pixel"]

        def compute():
            batches = ImageBatches([i.path for i in self.category.test_images], self.preprocessor, self.settings.BATCH_SIZE, 0)
            return {"test": np.concatenate([self.model.background_peaks(b.images, level).numpy() for b in tqdm(batches, desc="test backgrounds", file=sys.stderr)])}

        return self._cached("backgrounds-" + _key(code, level), compute)["test"]

    def fitted(self) -> dict[str, np.ndarray]:
        """The training images as the fitted model sees them (for the synthetic defects' maps)."""

        def compute():
            maps, scores = self._score(self.train_paths, "training images, fitted model")
            return {"maps": maps, "scores": scores}

        return self._cached("fitted", compute)

    def synthetic_before(self, seed: int, per_image: int = 6) -> dict[str, np.ndarray]:
        """The previous classifier's synthetic set: `per_image` defects on each validation good, fitted model."""
        s = self.settings
        source = (ROOT / "classification_model" / "synthetic.py").read_bytes()
        name = "synthetic-" + _key(seed, per_image, list(s.CLASSIFIER_DEFECT_SIZE), list(s.CLASSIFIER_DEFECT_STRENGTH), hashlib.sha1(source).hexdigest())

        def compute():
            kinds = [[DEFECT_TYPES[(i + v) % len(DEFECT_TYPES)] for v in range(per_image)] for i in range(len(self.validation_paths))]
            maps, scores, sources, made = synthetic_defect_maps(
                self.model, self.preprocessor, self.validation_paths, kinds,
                DefectPainting(s.CLASSIFIER_DEFECT_SIZE, s.CLASSIFIER_DEFECT_STRENGTH, np.random.default_rng(seed), s.BATCH_SIZE))
            return {"maps": maps.half().numpy(), "scores": scores.numpy(), "sources": sources, "kinds": np.array(made)}

        arrays = self._cached(name, compute)
        return {**arrays, "hosts": arrays["sources"]}

    def synthetic(self, seed: int) -> dict[str, np.ndarray]:
        """What train.py makes: CLASSIFIER_SYNTHETIC_DEFECTS defects spread over the validation goods and
        the training images (out-of-fold hosts: honest + fitted-model change), hosts numbered as train.py does."""
        s = self.settings
        code = (ROOT / "classification_model" / "synthetic.py").read_text() + inspect.getsource(synthetic_defect_maps) + inspect.getsource(synthetic_plan)
        name = "hosted-" + _key(seed, s.CLASSIFIER_SYNTHETIC_DEFECTS, list(s.CLASSIFIER_DEFECT_SIZE), list(s.CLASSIFIER_DEFECT_STRENGTH), code)

        def compute():
            base, fitted = self.base(), self.fitted()
            n_validation = len(self.validation_paths)
            plan = synthetic_plan(n_validation + len(self.train_paths), s.CLASSIFIER_SYNTHETIC_DEFECTS, seed)
            painting = DefectPainting(s.CLASSIFIER_DEFECT_SIZE, s.CLASSIFIER_DEFECT_STRENGTH, np.random.default_rng(seed), s.BATCH_SIZE)
            maps, scores, sources, kinds = synthetic_defect_maps(
                self.model, self.preprocessor, self.validation_paths, plan[:n_validation], painting)
            parts = [(maps.half().numpy(), scores.numpy(), sources, kinds)]
            order = base["oof_index"]
            for start in tqdm(range(0, len(order), 32), desc="synthetic on training images", file=sys.stderr):
                rows = np.arange(start, min(start + 32, len(order)))
                indices = order[rows]
                maps, scores, owners, kinds = synthetic_defect_maps(
                    self.model, self.preprocessor, [self.train_paths[i] for i in indices], [plan[n_validation + i] for i in indices],
                    painting, honest_maps=torch.from_numpy(base["oof"][rows]),
                    fitted_maps=torch.from_numpy(fitted["maps"][indices]))
                parts.append((maps.half().numpy(), scores.numpy(), n_validation + indices[owners], kinds))
            return {"maps": np.concatenate([p[0] for p in parts]), "scores": np.concatenate([p[1] for p in parts]),
                    "hosts": np.concatenate([p[2] for p in parts]).astype(int), "kinds": np.array(sum((list(p[3]) for p in parts), []))}

        return self._cached(name, compute)


SETS = {  # name -> where its images come from (the derived ones are made under --work)
    "tire": "../shared/data/tire",
    "tire-gray": "tire, every image converted to gray (L)",
    "ksdd": "../shared/data/ksdd (already gray: there is no separate gray ksdd)",
    "demo": "dataset_manager.demo.generate_demo_dataset(seed 0)",
    "ksdd-crop": "ksdd cut to 500 x 500 windows (bench/ablation_sets.py)",
    "tire-large": "tire's training goods, 67 held out as test goods and hosts of large-area defects (bench/ablation_sets.py)",
    "ksdd-large": "the same from ksdd's training goods (gray)",
    "ksdd-shifted": "ksdd, its test split 15 % darker and blurred (bench/ablation_sets.py)",
}
DEFAULT_SETS = ("tire", "tire-gray", "ksdd", "demo")


def gray_copy(source: Path, target: Path) -> Path:
    """`source` (MVTec layout) with every image under train/validation/test converted to gray; masks linked."""
    if target.is_dir():
        return target
    staging = target.parent / f".{target.name}.partial"
    for path in sorted(source.rglob("*")):
        relative = path.relative_to(source)
        destination = staging / relative
        if path.is_dir():
            destination.mkdir(parents=True, exist_ok=True)
        elif relative.parts[0] in ("train", "validation", "test") and path.suffix.lower() in IMAGE_EXTENSIONS:
            destination.parent.mkdir(parents=True, exist_ok=True)
            Image.open(path).convert("L").save(destination.with_suffix(".png"))
        else:
            destination.parent.mkdir(parents=True, exist_ok=True)
            destination.symlink_to(path.resolve())
    staging.rename(target)
    return target


def set_folder(name: str, work: Path) -> Path:
    """The category folder of an ablation set, made under `work` when it is derived."""
    if name == "tire":
        return ROOT.parent / "shared" / "data" / "tire"
    if name == "ksdd":
        return ROOT.parent / "shared" / "data" / "ksdd"
    if name == "tire-gray":
        return gray_copy(ROOT.parent / "shared" / "data" / "tire", work / "tire-gray")
    if name == "ksdd-crop":
        return ksdd_crop(ROOT.parent / "shared" / "data" / "ksdd", work / "ksdd-crop")
    if name == "ksdd-shifted":
        return shifted_test_set(ROOT.parent / "shared" / "data" / "ksdd", work / "ksdd-shifted")
    if name in ("tire-large", "ksdd-large"):
        return large_area_set(ROOT.parent / "shared" / "data" / name.split("-")[0], work / name)
    if name == "demo":
        target = work / "demo"
        return target if target.is_dir() else generate_demo_dataset(target, seed=0)
    if Path(name).is_dir():
        return Path(name)
    raise SystemExit(f"unknown set {name!r}: use {', '.join(SETS)} or a category folder")


VARIANTS = {  # name -> how the classifier is trained (see run_variant); "mode": CLASSIFIER_ANCHOR
    "before: validation goods only, trees": {"goods": "validation", "synthetic": "validation hosts", "mode": "none"},
    "cross-fitted goods, trees": {"goods": "all", "synthetic": "all hosts", "mode": "none"},
    "cross-fitted, margin (base_margin)": {"goods": "all", "synthetic": "all hosts", "mode": "margin"},
    "cross-fitted, shrink toward image score (default)": {"goods": "all", "synthetic": "all hosts", "mode": "shrink"},
    "cross-fitted, guard": {"goods": "all", "synthetic": "all hosts", "mode": "guard"},
    # Tried for labeled defects, not kept (README): they weigh as much as all synthetic ones together ...
    "shrink, real defects weigh as much as the synthetic": {"goods": "all", "synthetic": "all hosts", "mode": "shrink", "real_weight": "balanced"},
    # ... and, in addition, the trees' share is the one (of 0, 1/4, .., 1) that ranks them best out-of-fold.
    "shrink, balanced, share chosen on real defects": {"goods": "all", "synthetic": "all hosts", "mode": "shrink", "real_weight": "balanced",
                                                       "share": "real evidence"},
    # shrink, then the labeled defects' peak-direction similarity as a second stage (classification_model/similarity.py), always kept
    "shrink + labeled-defect similarity, always kept": {"goods": "all", "synthetic": "all hosts", "mode": "shrink", "similarity": "always"},
    # what train.py does: the held-out evidence keeps the first stage, the similarity stage or the image score (classification_model/evidence.py),
    # the similarity stage only where the labeled defects' peaks stand out from their own images' backgrounds (evidence.OwnBackgrounds)
    "held-out evidence decides (default)": {"goods": "all", "synthetic": "all hosts", "mode": "shrink", "similarity": "evidence", "backgrounds": True},
    # the same, the out-of-fold goods' peak directions weighed too (not only the validation goods')
    "held-out evidence, out-of-fold goods' directions too": {"goods": "all", "synthetic": "all hosts", "mode": "shrink", "similarity": "evidence",
                                                             "good_peaks": "all"},
    "similarity always kept, out-of-fold goods' directions too": {"goods": "all", "synthetic": "all hosts", "mode": "shrink", "similarity": "always",
                                                                  "good_peaks": "all"},
    # the default before 2026-12-07: no own-background check
    "held-out evidence, no own-background check": {"goods": "all", "synthetic": "all hosts", "mode": "shrink", "similarity": "evidence"},
    "held-out evidence, out-of-fold goods' directions, own-background check": {"goods": "all", "synthetic": "all hosts", "mode": "shrink",
                                                                               "similarity": "evidence", "good_peaks": "all", "backgrounds": True},
}
DEFAULT_VARIANT = "held-out evidence decides (default)"  # what train.py does
SHARES = (0.0, 0.25, 0.5, 0.75, 1.0)  # the "share chosen on real defects" candidates


def _medians(maps: np.ndarray) -> np.ndarray:
    return np.concatenate([np.median(maps[i : i + 64].reshape(len(maps[i : i + 64]), -1).astype(np.float32), axis=1)
                           for i in range(0, len(maps), 64)] or [np.zeros(0)]).astype(np.float64)


def _features(maps: np.ndarray, levels: dict) -> np.ndarray:
    chunks = [map_features(torch.from_numpy(maps[i : i + 64]).float(), levels) for i in range(0, len(maps), 64)]
    return np.concatenate(chunks) if chunks else np.zeros((0, len(FEATURE_NAMES)), np.float32)


class Prepared:
    """One set's features: goods, test images, synthetic defects of each kind per seed."""

    def __init__(self, source: MapSource, seeds: int, synthetic_kinds: set[str], peaks: bool = False, backgrounds: bool = False) -> None:
        s = source.settings
        base = source.base()
        self.name = source.category.name
        self.labels = base["labels"]
        self.test_scores = base["test_scores"].astype(np.float64)
        sample = GoodMapSample()
        sample.add(torch.from_numpy(base["good"]).float(), torch.from_numpy(base["good_scores"]))
        self.levels = levels_from_description(sample.calibrate(s.IMAGE_FALSE_REJECT_RATE, s.PIXEL_FALSE_REJECT_RATE))
        n_validation = len(base["good"])
        self.goods = {
            "validation": (_features(base["good"], self.levels), base["good_scores"], np.arange(n_validation)),
            "out_of_fold": (_features(base["oof"], self.levels), base["oof_scores"], n_validation + base["oof_index"]),
        }
        self.test = _features(base["test"], self.levels)
        self.medians = {name: _medians(base[name]) for name in ("good", "oof", "test")}  # each map's median (the evidence's kernel)
        makers = {"validation hosts": source.synthetic_before, "all hosts": source.synthetic}
        self.synthetic = {kind: [] for kind in synthetic_kinds}  # only the synthetic sets the chosen variants train on
        for seed in range(seeds):
            for kind in synthetic_kinds:
                arrays = makers[kind](seed)
                self.synthetic[kind].append((_features(arrays["maps"], self.levels), arrays["scores"], arrays["hosts"], _medians(arrays["maps"])))
        self.n_train, self.n_validation = len(base["oof"]), n_validation
        self.peaks = None  # {"good": validation goods', "test": test images' peak directions}, for the similarity stage
        if peaks:
            self.peaks = source.peaks()
        self.backgrounds = source.backgrounds() if backgrounds else None  # the test images' background peak directions


def run_variant(data: Prepared, spec: dict, settings, seeds: int, ks: list[int], verbose: bool = False) -> dict[int, np.ndarray]:
    """{k: (seeds, 4) [image-score ROCAUC, classifier ROCAUC, trees kept (0/1), classifier test false-reject rate]}."""
    params = params_from_settings(settings)
    defect_indices = np.flatnonzero(data.labels == 1)
    results = {}
    for k in ks:
        rows = []
        for seed in range(seeds):
            params.seed = seed
            parts = [data.goods["validation"]] + ([data.goods["out_of_fold"]] if spec["goods"] == "all" else [])
            synthetic = data.synthetic[spec["synthetic"]][seed]
            chosen = np.random.default_rng(1000 + seed).choice(defect_indices, size=k, replace=False) if k else np.zeros(0, int)
            features = np.concatenate([p[0] for p in parts] + [synthetic[0], data.test[chosen]])
            scores = np.concatenate([p[1] for p in parts] + [synthetic[1], data.test_scores[chosen]]).astype(np.float64)
            groups = np.concatenate([p[2] for p in parts] + [synthetic[2], 10**6 + np.arange(k)])
            n_good = sum(len(p[0]) for p in parts)
            labels = np.r_[np.zeros(n_good), np.ones(len(synthetic[0]) + k)]
            real_weight = settings.CLASSIFIER_REAL_DEFECT_WEIGHT
            if spec.get("real_weight") == "balanced" and k:
                real_weight = max(real_weight, len(synthetic[0]) / k)
            weights = np.r_[np.ones(n_good + len(synthetic[0])), np.full(k, real_weight)]
            anchor = anchoring(SimpleNamespace(**{**vars(settings), "CLASSIFIER_ANCHOR": spec["mode"]}))  # as train.py does
            classifier = train_classifier(ClassifierRows(features, labels, groups, weights, scores), FEATURE_NAMES, params,
                                          settings.CLASSIFIER_FALSE_REJECT_RATE, MONOTONE, anchor)
            if spec.get("share") == "real evidence" and k:
                choose_share_on_real_defects(classifier, features, labels, groups, weights, scores, params, n_good + len(synthetic[0]),
                                             settings.CLASSIFIER_FALSE_REJECT_RATE)
            keep = np.setdiff1d(np.arange(len(data.labels)), chosen)
            directions = None
            if spec.get("similarity"):  # as train.py: validation goods are the first rows, labeled defects the last
                medians = np.concatenate([data.medians["good"]] + ([data.medians["oof"]] if spec["goods"] == "all" else [])
                                         + [synthetic[3], data.medians["test"][chosen]])
                n_rows = len(labels)
                with_peaks = data.peaks is not None and k > 0
                good_rows, good_peaks = slice(0, data.n_validation), data.peaks["good"] if with_peaks else None
                if with_peaks and spec.get("good_peaks") == "all" and spec["goods"] == "all":  # validation then out-of-fold goods
                    good_rows, good_peaks = slice(0, n_good), np.concatenate([data.peaks["good"], data.peaks["oof"]])
                rows_weighed = VerdictRows(labels, scores, weights, medians, slice(n_rows - k, n_rows), good_rows,
                                           good_peaks, data.peaks["test"][chosen] if with_peaks else None,
                                           data.backgrounds[chosen] if with_peaks and spec.get("backgrounds") else None)
                if spec["similarity"] == "evidence":
                    decide_verdict(classifier, rows_weighed, settings.CLASSIFIER_FALSE_REJECT_RATE, seed)
                elif with_peaks:
                    always_keep_similarity(classifier, rows_weighed, settings.CLASSIFIER_FALSE_REJECT_RATE)
                directions = data.peaks["test"][keep] if classifier.similarity is not None else None
            margin = classifier.margin(data.test[keep], data.test_scores[keep], directions)  # the verdict's log-odds, as test.py computes it
            threshold = np.log(classifier.threshold / (1 - classifier.threshold))
            labels_kept = data.labels[keep]
            image_auc, classifier_auc = image_rocauc(labels_kept, data.test_scores[keep]), image_rocauc(labels_kept, margin)
            trees = float(classifier.report["rounds"] > 0 and classifier.tree_share != 0.0) if not spec.get("similarity") else verdict_code(classifier)
            rows.append((image_auc, classifier_auc, trees, float((margin[labels_kept == 0] >= threshold).mean())))
            if verbose:
                r = classifier.report
                print(f"{data.name} k={k} seed {seed}: image score {image_auc:.4f} classifier {classifier_auc:.4f} rounds {r['rounds']} "
                      f"OOF trees {r.get('out_of_fold_rocauc_trees', float('nan')):.4f} image {r.get('out_of_fold_rocauc_image_score', float('nan')):.4f}",
                      file=sys.stderr)
        results[k] = np.array(rows)
    return results


def verdict_code(classifier) -> float:
    """What a verdict kept: 0 the image score's ranking, 1 the first stage, 2 with the similarity stage."""
    if classifier.similarity is not None:
        return 2.0
    return 0.0 if classifier.tree_share == 0.0 else 1.0


def always_keep_similarity(classifier, rows: VerdictRows, false_reject_rate: float) -> None:
    """The "always kept" variant: the similarity stage added whenever it can be fitted, no evidence asked."""
    from classification_model.similarity import fit_defect_similarity

    good_margins, real_margins = classifier.out_of_fold_margin[rows.good_rows], classifier.out_of_fold_margin[rows.real_rows]
    goods, real = ~np.isnan(good_margins), ~np.isnan(real_margins)
    backgrounds = None if rows.real_backgrounds is None else rows.real_backgrounds[real]
    similarity, _, _ = fit_defect_similarity(good_margins[goods], rows.good_directions[goods], real_margins[real], rows.real_directions[real], backgrounds)
    if similarity is not None:
        classifier.add_similarity(similarity, good_margins[goods], rows.good_directions[goods], false_reject_rate)


def ceiling(data: Prepared, repeats: int = 5) -> dict[str, float]:
    """Image ROCAUC on the test split of the max score, of the best single feature, and of a logistic
    regression and a monotone XGBoost trained by cross-validation on the test split (see --ceiling)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from xgboost import XGBClassifier

    labels, features = data.labels, data.test.astype(np.float64)
    per_feature = {name: image_rocauc(labels, features[:, j]) for j, name in enumerate(FEATURE_NAMES)}
    best = max(per_feature, key=per_feature.get)
    learners = {
        "logistic": lambda: make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=5000)),
        "xgboost": lambda: XGBClassifier(n_estimators=100, max_depth=2, learning_rate=0.05, n_jobs=1,
                                         monotone_constraints="(" + ",".join(str(m) for m in MONOTONE) + ")"),
    }
    inputs = {"logistic": np.log1p(np.maximum(features, 0)), "xgboost": features}
    honest = np.concatenate([data.goods["validation"][1], data.goods["out_of_fold"][1]])
    test_goods = data.test_scores[labels == 0]
    result = {
        # 0.5: the test goods score like the honest training goods; above: they look more anomalous (acquisition shift)
        "shift (test goods vs honest goods, image score)": image_rocauc(np.r_[np.zeros(len(honest)), np.ones(len(test_goods))], np.r_[honest, test_goods]),
        "image score": image_rocauc(labels, data.test_scores), f"best feature ({best})": per_feature[best],
    }
    honest_features = np.concatenate([data.goods["validation"][0], data.goods["out_of_fold"][0]]).astype(np.float64)

    def against_honest(rows: np.ndarray, j: int) -> float:
        return image_rocauc(np.r_[np.zeros(len(honest_features)), np.ones(len(rows))], np.r_[honest_features[:, j], rows[:, j]])

    for name in ("max", "mean", "std"):  # which pooling the shift moves, and how well each sees defects without it
        j = FEATURE_NAMES.index(name)
        result[f"shift of {name}"] = against_honest(features[labels == 0], j)
        result[f"real defects vs honest goods, {name}"] = against_honest(features[labels == 1], j)
    for name, make in learners.items():
        aucs = [image_rocauc(labels, cross_val_predict(make(), inputs[name], labels, method="predict_proba",
                                                       cv=StratifiedKFold(5, shuffle=True, random_state=r))[:, 1])
                for r in range(repeats)]
        result[f"{name}, trained on the test split"] = float(np.mean(aucs))
    return result


def choose_share_on_real_defects(classifier, features, labels, groups, weights, scores, params, first_real: int,
                                 false_reject_rate: float) -> None:
    """The "share chosen on real defects" variant: the same grouped cross-validation as train_classifier
    (each real defect is a group of its own, so its out-of-fold margin is honest); of SHARES, the one
    whose blend ranks the goods vs. the real defects (rows from `first_real`) best out-of-fold, ties
    to the one nearest the goods-based share. Sets the classifier's share and threshold."""
    from classification_model.xgboost import _fold_boosters, _group_folds, blend

    fold = _group_folds(groups, labels, classifier.report["folds"], params.seed)
    rows = ClassifierRows(features, labels, groups, weights, scores).checked()
    trees, anchor, _ = _fold_boosters(rows, fold, params, MONOTONE if params.monotone else None, False)
    rows = (labels == 0) | (np.arange(len(labels)) >= first_real)
    rows &= ~np.isnan(trees)
    aucs = {share: image_rocauc(labels[rows], blend(trees[rows], anchor[rows], share)) for share in SHARES}
    best = max(aucs.values())
    classifier.tree_share = min((s for s, a in aucs.items() if a >= best - 1e-12), key=lambda s: abs(s - classifier.tree_share))
    goods = (labels == 0) & ~np.isnan(trees)
    probabilities = 1 / (1 + np.exp(-blend(trees[goods], anchor[goods], classifier.tree_share)))
    classifier.threshold = float(np.quantile(probabilities, 1 - false_reject_rate))


def kept(codes: np.ndarray) -> str:
    """How many seeds' verdicts use any tree ("trees kept"), and how many of those the similarity stage (`verdict_code` 2)."""
    stage = int((codes == 2).sum())
    return f"{int((codes >= 1).sum())}/{len(codes)}" + (f", {stage} with the similarity stage" if stage else "")


def table(results: dict[str, dict[str, dict[int, np.ndarray]]]) -> str:
    """The README table: one row per set, variant and k."""
    lines = ["| set | variant | classifier training defects | image score | classifier | difference (worst seed) | trees kept |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for set_name, variants in results.items():
        for variant, by_k in variants.items():
            for k, array in by_k.items():
                diff = array[:, 1] - array[:, 0]
                training = "synthetic only" if k == 0 else f"synthetic + {k} real"
                lines.append(f"| {set_name} | {variant} | {training} | {array[:, 0].mean():.4f} ± {array[:, 0].std():.4f} | "
                             f"{array[:, 1].mean():.4f} ± {array[:, 1].std():.4f} | {diff.mean():+.4f} ± {diff.std():.4f} ({diff.min():+.4f}) | "
                             f"{kept(array[:, 2])} |")
    return "\n".join(lines)


def summary(results: dict[str, dict[str, dict[int, np.ndarray]]]) -> str:
    """Mean difference to the image score per variant and k, over the sets (and the worst set)."""
    lines = ["| variant | classifier training defects | mean difference over sets | worst set (mean over seeds) |", "| --- | --- | --- | --- |"]
    variants = next(iter(results.values())).keys()
    for variant in variants:
        for k in next(iter(results.values()))[variant]:
            per_set = {name: float((v[variant][k][:, 1] - v[variant][k][:, 0]).mean()) for name, v in results.items()}
            worst = min(per_set, key=per_set.get)
            training = "synthetic only" if k == 0 else f"synthetic + {k} real"
            lines.append(f"| {variant} | {training} | {np.mean(list(per_set.values())):+.4f} | {worst} {per_set[worst]:+.4f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sets", nargs="*", default=list(DEFAULT_SETS))
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--ks", default="5,10", help="numbers of real test defects added to the training set")
    parser.add_argument("--cache", type=Path, default=None, help="folder for cached maps (.npz)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/classifier_ablation"), help="where derived sets are made")
    parser.add_argument("--variants", default="", help="comma-separated variant numbers (1-based) to run; default all")
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--ceiling", action="store_true", help="also measure what any classifier on these features could gain (uses test labels)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "classifier_ablation.json")
    args, overrides = parser.parse_known_args()
    overrides += [a for a in args.sets if "=" in a]  # KEY=VALUE settings may come anywhere
    args.sets = [a for a in args.sets if "=" not in a] or list(DEFAULT_SETS)
    settings, _ = load(["NUM_WORKERS=0", *overrides])
    torch.set_num_threads(2)
    chosen = [list(VARIANTS)[int(i) - 1] for i in args.variants.split(",") if i] or list(VARIANTS)
    ks = [0] + [int(k) for k in args.ks.split(",") if k]
    results, ceilings = {}, {}
    for name in args.sets:
        started = time.perf_counter()
        source = MapSource(set_folder(name, args.work), settings, args.cache)
        data = Prepared(source, args.seeds, {VARIANTS[variant]["synthetic"] for variant in chosen},
                        peaks=any(VARIANTS[variant].get("similarity") for variant in chosen),
                        backgrounds=any(VARIANTS[variant].get("backgrounds") for variant in chosen))
        print(f"{name}: maps and features in {time.perf_counter() - started:.0f} s; {data.n_train} train (out-of-fold), "
              f"{data.n_validation} validation, {int(data.labels.sum())} defect / {int((1 - data.labels).sum())} good test images",
              file=sys.stderr)
        results[name] = {variant: run_variant(data, VARIANTS[variant], settings, args.seeds, ks, args.verbose) for variant in chosen}
        print(table({name: results[name]}), flush=True)
        if args.ceiling:
            ceilings[name] = ceiling(data)
    print("\n" + table(results) + "\n\n" + summary(results))
    if ceilings:
        print("\nCeiling (image ROCAUC on the test split; the classifiers are trained on it by cross-validation):")
        for name, values in ceilings.items():
            print(f"| {name} | " + " | ".join(f"{key} {value:.4f}" for key, value in values.items()) + " |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    saved = {s: {v: {k: a.tolist() for k, a in by_k.items()} for v, by_k in r.items()} for s, r in results.items()}
    args.out.write_text(json.dumps({**saved, **({"ceiling": ceilings} if ceilings else {})}, indent=1))


if __name__ == "__main__":
    main()
