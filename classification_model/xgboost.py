"""The XGBoost good/defect classifier on anomaly-map features: training with grouped
cross-validation, the verdict threshold, saving in XGBoost's own JSON format, and plots.

Why cross-validation: good examples are only the few held-out validation images (the Gaussian
was fitted on the train images, so their maps are too clean to stand for new goods). With ~20-30
of them, a single held-out split is too small to pick both the number of trees and the verdict
threshold; out-of-fold predictions use every good image once as an unseen one. Folds are grouped
by source image: a good image and the synthetic defects made from it always land in the same
fold, so the classifier is never scored on a defect painted onto an image it was trained on.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import xgboost as xgb

from anomaly_model.backbone import ModelError
from evaluation.metrics import image_rocauc

BOOSTER_FILE = "classifier.json"


@dataclass
class ClassifierParams:
    """XGBoost settings (config.py "Classifier" section)."""

    max_depth: int = 3
    learning_rate: float = 0.05
    max_rounds: int = 400
    early_stopping_rounds: int = 40
    subsample: float = 0.8
    colsample_bytree: float = 0.8
    min_child_weight: float = 1.0
    folds: int = 5
    monotone: bool = True
    seed: int = 0
    threads: int = 1  # the sets are a few hundred rows: more threads only add OpenMP overhead on a busy machine


@dataclass
class DefectClassifier:
    """A trained booster, the features it expects (in order) and its verdict threshold."""

    booster: xgb.Booster
    feature_names: list[str]
    threshold: float
    report: dict = field(default_factory=dict)

    def predict(self, features: np.ndarray) -> np.ndarray:
        """Defect probability of each row of `features` (columns in `feature_names` order)."""
        matrix = xgb.DMatrix(np.asarray(features, dtype=np.float32), feature_names=self.feature_names)
        return self.booster.predict(matrix).astype(np.float64)

    def to_bytes(self) -> bytes:
        """The booster in XGBoost's JSON format (no pickle), for `save_model(extra_files=...)`."""
        return bytes(self.booster.save_raw(raw_format="json"))

    @classmethod
    def from_bytes(cls, data: bytes, feature_names: list[str], threshold: float, expected_names: list[str]) -> "DefectClassifier":
        """Load a booster saved by `to_bytes`; refuse one trained on other features than this code computes."""
        if list(feature_names) != list(expected_names):
            missing = [n for n in expected_names if n not in feature_names]
            extra = [n for n in feature_names if n not in expected_names]
            raise ModelError(
                f"the model's classifier was trained on {len(feature_names)} features but this code computes "
                f"{len(expected_names)} (missing {missing[:3]}, unknown {extra[:3]}, or another order): retrain with python train.py"
            )
        booster = xgb.Booster()
        try:
            booster.load_model(bytearray(data))
        except xgb.core.XGBoostError as error:
            raise ModelError(f"the model's classifier file is damaged ({str(error).splitlines()[0]}): retrain") from None
        if booster.feature_names is not None and list(booster.feature_names) != list(feature_names):
            raise ModelError("the classifier file's feature list differs from model.json's: retrain with python train.py")
        return cls(booster, list(feature_names), float(threshold))


def _booster_params(params: ClassifierParams, scale_pos_weight: float, monotone: list[int] | None) -> dict:
    result = {
        "objective": "binary:logistic",
        "eval_metric": "logloss",
        "max_depth": params.max_depth,
        "eta": params.learning_rate,
        "subsample": params.subsample,
        "colsample_bytree": params.colsample_bytree,
        "min_child_weight": params.min_child_weight,
        "scale_pos_weight": scale_pos_weight,
        "tree_method": "hist",
        "seed": params.seed,
        "nthread": params.threads,
        "verbosity": 0,
    }
    if monotone is not None:
        result["monotone_constraints"] = "(" + ",".join(str(int(m)) for m in monotone) + ")"
    return result


def _group_folds(groups: np.ndarray, labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Fold index per row; whole groups per fold, groups holding goods spread evenly over folds."""
    unique = np.unique(groups)
    rng = np.random.default_rng(seed)
    has_good = np.array([np.any(labels[groups == g] == 0) for g in unique])
    assignment = {}
    for subset in (unique[has_good], unique[~has_good]):
        order = rng.permutation(subset)
        offset = int(rng.integers(folds))
        for i, group in enumerate(order):
            assignment[group] = (i + offset) % folds
    return np.array([assignment[g] for g in groups])


def train_classifier(
    features: np.ndarray,
    labels: np.ndarray,
    groups: np.ndarray,
    feature_names: list[str],
    params: ClassifierParams,
    false_reject_rate: float,
    weights: np.ndarray | None = None,
    monotone: list[int] | None = None,
    threshold_rows: np.ndarray | None = None,
) -> DefectClassifier:
    """Fit the classifier; the verdict threshold rejects `false_reject_rate` of the goods' out-of-fold
    probabilities (`threshold_rows` picks which goods count, e.g. only untouched validation images)."""
    features = np.asarray(features, dtype=np.float32)
    labels = np.asarray(labels).astype(int)
    groups = np.asarray(groups)
    weights = np.ones(len(labels)) if weights is None else np.asarray(weights, dtype=np.float64)
    n_good, n_defect = int((labels == 0).sum()), int((labels == 1).sum())
    if n_good == 0 or n_defect == 0:
        raise ModelError(
            f"classifier training data holds only {'defect' if n_good == 0 else 'good'} images "
            f"({n_good} good, {n_defect} defect): it needs both (set CLASSIFIER_SYNTHETIC_PER_IMAGE > 0 "
            "or add labeled defects to train/defect/), or set CLASSIFIER = False"
        )
    if not 0 <= false_reject_rate < 1:
        raise ModelError(f"CLASSIFIER_FALSE_REJECT_RATE={false_reject_rate} must be in [0, 1)")
    good_groups = np.unique(groups[labels == 0])
    folds = max(2, min(params.folds, len(good_groups)))
    if len(good_groups) < 2:
        raise ModelError(f"the classifier needs at least 2 good validation images, got {len(good_groups)}: add validation images")
    fold = _group_folds(groups, labels, folds, params.seed)
    monotone = monotone if params.monotone else None
    out_of_fold = np.full(len(labels), np.nan)
    best_rounds = []
    for k in range(folds):
        train, held = fold != k, fold == k
        if len(np.unique(labels[train])) < 2 or not held.any():
            continue
        scale = weights[train][labels[train] == 0].sum() / weights[train][labels[train] == 1].sum()
        dtrain = xgb.DMatrix(features[train], labels[train], weight=weights[train], feature_names=feature_names)
        dheld = xgb.DMatrix(features[held], labels[held], weight=weights[held], feature_names=feature_names)
        booster = xgb.train(
            _booster_params(params, scale, monotone), dtrain, num_boost_round=params.max_rounds,
            evals=[(dheld, "held_out")], early_stopping_rounds=params.early_stopping_rounds, verbose_eval=False,
        )
        best_rounds.append(booster.best_iteration + 1)
        out_of_fold[held] = booster.predict(dheld, iteration_range=(0, booster.best_iteration + 1))
    rounds = int(np.median(best_rounds)) if best_rounds else params.max_rounds
    scale = weights[labels == 0].sum() / weights[labels == 1].sum()
    booster = xgb.train(
        _booster_params(params, scale, monotone),
        xgb.DMatrix(features, labels, weight=weights, feature_names=feature_names),
        num_boost_round=rounds,
    )
    chosen = (labels == 0) & ~np.isnan(out_of_fold)
    if threshold_rows is not None:
        chosen &= np.asarray(threshold_rows, dtype=bool)
    good_probabilities = out_of_fold[chosen]
    threshold = float(np.quantile(good_probabilities, 1 - false_reject_rate)) if good_probabilities.size else 0.5
    scored = ~np.isnan(out_of_fold)
    report = {
        "n_good": n_good,
        "n_defect": n_defect,
        "folds": folds,
        "rounds": rounds,
        "fold_best_rounds": best_rounds,
        "scale_pos_weight": float(scale),
        "out_of_fold_rocauc": image_rocauc(labels[scored], out_of_fold[scored]),
        "out_of_fold_good_probabilities": [round(float(p), 6) for p in good_probabilities],
    }
    return DefectClassifier(booster, list(feature_names), threshold, report)


def feature_importance(classifier: DefectClassifier) -> dict[str, float]:
    """Total gain of each feature (0 for features no tree uses), in feature order."""
    gains = classifier.booster.get_score(importance_type="total_gain")
    return {name: float(gains.get(name, 0.0)) for name in classifier.feature_names}


def plot_feature_importance(classifier: DefectClassifier, path, top: int = 20) -> None:
    """A horizontal bar chart of the `top` features by total gain, written to `path` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gains = sorted(feature_importance(classifier).items(), key=lambda item: item[1], reverse=True)[:top]
    total = sum(g for _, g in gains) or 1.0
    figure, axis = plt.subplots(figsize=(7, 0.3 * len(gains) + 1.2))
    axis.barh([name for name, _ in gains][::-1], [g / total for _, g in gains][::-1], color="tab:blue")
    axis.set_xlabel("share of total gain")
    axis.set_title("classifier feature importance")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
