"""The XGBoost good/defect classifier on anomaly-map features: training with grouped
cross-validation, the verdict threshold, saving in XGBoost's own JSON format, and plots.

Why cross-validation: good examples are only maps of goods the anomaly model never fitted on
(validation images and, with OUT_OF_FOLD_FOLDS, out-of-fold maps of the training images; the
training images' own maps are too clean to stand for new goods). A single held-out split of them
is too small to pick both the number of trees and the verdict threshold; out-of-fold predictions
use every good image once as an unseen one. Folds are grouped
by source image: a good image and the synthetic defects made from it always land in the same
fold, so the classifier is never scored on a defect painted onto an image it was trained on.

How the verdict relates to the model's image score (`Anchor`, CLASSIFIER_ANCHOR): the trees alone;
the trees starting from the score's log-odds (`anchored`); the score alone unless the trees win
out-of-fold (`guard`); or a blend of the two log-odds whose trees' share grows with the number of
goods the classifier learned from (`shrink_goods`, the default: README, Ablation).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import xgboost as xgb

# xgboost (and the sklearn it pulls in) are imported inside the functions that use them: ~80 MB
# that train.py would otherwise hold from the start of its out-of-fold pass, the run's memory peak
# (docs/performance.md, "Lean training run").

from anomaly_model.errors import ModelError
from choices import CLASSIFIER_ANCHORS
from classification_model.similarity import DefectSimilarity
from evaluation.metrics import image_rocauc, threshold_at_rate

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
class Anchor:
    """The model's image score as log-odds of "defect": where the classifier starts.

    margin = intercept + slope * (score - center) / scale, with center and scale the good examples'
    image-score mean and standard deviation and (intercept, slope >= 0) a weighted logistic fit of
    the labels on that one number. The boosted trees start from this margin (XGBoost `base_margin`)
    and learn a correction; with no trees the verdict ranks images exactly as the image score does."""

    center: float
    scale: float
    intercept: float
    slope: float

    def margin(self, scores: np.ndarray) -> np.ndarray:
        return self.intercept + self.slope * (np.asarray(scores, dtype=np.float64) - self.center) / self.scale

    @classmethod
    def fit(cls, scores: np.ndarray, labels: np.ndarray, weights: np.ndarray, ridge: float = 0.01) -> "Anchor":
        """Weighted logistic regression on the standardized score (Newton steps; a small ridge keeps
        the slope finite when the score separates the classes perfectly)."""
        scores, labels, weights = (np.asarray(a, dtype=np.float64) for a in (scores, labels, weights))
        goods = scores[labels == 0]
        center, scale = float(goods.mean()), float(goods.std()) or 1.0
        x = np.stack([np.ones_like(scores), (scores - center) / scale], axis=1)
        weights = weights / weights.mean()
        beta = np.zeros(2)
        for _ in range(50):
            p = 1 / (1 + np.exp(-np.clip(x @ beta, -30, 30)))
            gradient = x.T @ (weights * (p - labels)) + ridge * np.array([0.0, beta[1]])
            hessian = (x * (weights * p * (1 - p))[:, None]).T @ x + ridge * np.diag([1e-6, 1.0])
            step = np.linalg.solve(hessian, gradient)
            beta -= step
            if np.abs(step).max() < 1e-8:
                break
        return cls(center, scale, float(beta[0]), float(max(beta[1], 0.0)))

    def to_dict(self) -> dict:
        return {"center": self.center, "scale": self.scale, "intercept": self.intercept, "slope": self.slope}


def _sigmoid(margin: np.ndarray) -> np.ndarray:
    """Probabilities in float64, so that large margins do not all become 1.0 (ties would cost ROCAUC)."""
    return 1.0 / (1.0 + np.exp(-np.asarray(margin, dtype=np.float64)))


def shrink_share(n_good: int, shrink_goods: float) -> float:
    """The trees' share of a "shrink" verdict: n_good / (n_good + shrink_goods). Few goods: the trees
    have seen little of what good parts look like, so the image score keeps most of the say."""
    return float(n_good / (n_good + shrink_goods)) if n_good + shrink_goods > 0 else 1.0


@dataclass
class DefectClassifier:
    """A trained booster, the features it expects (in order) and its verdict threshold.

    With an `anchor` and no `tree_share`, the trees start from the anchor's margin (XGBoost
    `base_margin`); with both ("shrink"), the verdict's log-odds is
    tree_share * trees + (1 - tree_share) * anchor, the trees having been trained alone. With a
    `similarity` (labeled defects), that log-odds is the first stage of `DefectSimilarity.margin`."""

    booster: xgb.Booster
    feature_names: list[str]
    threshold: float
    report: dict = field(default_factory=dict)
    anchor: Anchor | None = None  # None: the trees alone, not anchored on the image score
    tree_share: float | None = None  # "shrink": the trees' weight in the blend with the anchor
    similarity: DefectSimilarity | None = None  # the second stage learned from labeled defects
    # training only (not saved): each training row's out-of-fold log-odds, what the second stage is fitted on
    out_of_fold_margin: np.ndarray | None = field(default=None, repr=False)
    # training only: the goods' out-of-fold probabilities the threshold was picked on; model.json keeps
    # them so a run can re-pick it at another CLASSIFIER_FALSE_REJECT_RATE without retraining
    threshold_goods: np.ndarray | None = field(default=None, repr=False)

    @property
    def uses_trees(self) -> bool:
        """Whether the verdict reads the trees, and so the map features: not when it is the image
        score's log-odds alone (`rank_like_image_score`, the verdict of every model whose evidence kept
        no candidate), where a share of 0 would weigh the trees' margin by exactly nothing."""
        return not (self.tree_share == 0.0 and self.anchor is not None)

    @property
    def ranks_like_image_score(self) -> bool:
        """Whether the verdict is the image score's log-odds alone (no trees, no similarity stage): it
        then orders images exactly as the image score does, and one threshold decides both."""
        return not self.uses_trees and self.similarity is None

    def margin(self, features: np.ndarray | None, image_scores: np.ndarray | None = None, directions: np.ndarray | None = None) -> np.ndarray:
        """Log-odds of "defect" of each row of `features` (columns in `feature_names` order; None
        when not `uses_trees`); an anchored or shrunk classifier also needs the model's image score of
        each row, one with a `similarity` stage each image's peak direction (`AnomalyModel.score_with_peaks`)."""
        first = self._first_stage_margin(features, image_scores)
        if self.similarity is None:
            return first
        if directions is None:
            raise ModelError("internal: a classifier with a defect similarity stage needs the images' peak directions")
        return self.similarity.margin(first, directions)

    def _first_stage_margin(self, features: np.ndarray | None, image_scores: np.ndarray | None) -> np.ndarray:
        import xgboost as xgb
        anchor_margin = None
        if self.anchor is not None:
            if image_scores is None:
                raise ModelError("internal: an anchored classifier needs the image scores")
            anchor_margin = self.anchor.margin(image_scores)
            if not self.uses_trees:  # the image score's log-odds alone: what blend() would give, bit for bit
                return anchor_margin
        if features is None:
            raise ModelError("internal: this classifier's verdict needs the map features")
        features = np.asarray(features, dtype=np.float32)
        if self.tree_share is None:
            matrix = xgb.DMatrix(features, feature_names=self.feature_names, base_margin=anchor_margin)
            return self.booster.predict(matrix, output_margin=True).astype(np.float64)
        trees = self.booster.predict(xgb.DMatrix(features, feature_names=self.feature_names), output_margin=True)
        return blend(trees.astype(np.float64), anchor_margin, self.tree_share)

    def predict(self, features: np.ndarray | None, image_scores: np.ndarray | None = None, directions: np.ndarray | None = None) -> np.ndarray:
        """Defect probability of each row of `features` (and its image score and peak direction, when needed)."""
        return _sigmoid(self.margin(features, image_scores, directions))

    def add_similarity(self, similarity: DefectSimilarity, good_margins: np.ndarray, good_directions: np.ndarray, false_reject_rate: float) -> None:
        """Make `similarity` the verdict's second stage; the verdict threshold then rejects
        `false_reject_rate` of these goods' final probabilities (first stage out-of-fold)."""
        self.similarity = similarity
        probabilities = _sigmoid(similarity.margin(good_margins, good_directions))
        self.threshold = threshold_at_rate(probabilities, false_reject_rate)
        self.threshold_goods = probabilities

    def rank_like_image_score(self, anchor: Anchor, good_scores: np.ndarray, false_reject_rate: float) -> None:
        """Make the verdict the image score's log-odds alone (`anchor`, no trees, no second stage): it then
        ranks images exactly as the image score does; the threshold rejects `false_reject_rate` of the
        honest goods (`good_scores`: their image scores)."""
        if anchor.slope <= 0:  # a flat anchor would tie every image: keep the image score's order
            anchor = Anchor(anchor.center, anchor.scale, anchor.intercept, 1e-6)
        self.anchor, self.tree_share, self.similarity = anchor, 0.0, None
        probabilities = _sigmoid(anchor.margin(good_scores))
        self.threshold = threshold_at_rate(probabilities, false_reject_rate)
        self.threshold_goods = probabilities
        self.report["anchor"], self.report["tree_share"] = anchor.to_dict(), 0.0

    def to_bytes(self) -> bytes:
        """The booster in XGBoost's JSON format (no pickle), for `save_model(extra_files=...)`."""
        return bytes(self.booster.save_raw(raw_format="json"))

    @classmethod
    def from_bytes(
        cls,
        data: bytes,
        feature_names: list[str],
        threshold: float,
        expected_names: list[str],
        anchor: dict | None = None,
        tree_share: float | None = None,
        similarity: dict | None = None,
    ) -> "DefectClassifier":
        """Load a booster saved by `to_bytes` (and its anchor, `Anchor.to_dict`, and the trees' share
        of a "shrink" verdict and the labeled-defect similarity stage, from model.json); refuse one
        trained on other features than this code computes."""
        import xgboost as xgb

        if tree_share is not None and anchor is None:
            raise ModelError("model.json's classifier has a tree_share but no anchor to blend with: retrain with python train.py")
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
        return cls(
            booster, list(feature_names), float(threshold), anchor=None if anchor is None else Anchor(**anchor),
            tree_share=None if tree_share is None else float(tree_share),
            similarity=None if similarity is None else DefectSimilarity.from_dict(similarity),
        )


def blend(tree_margin: np.ndarray, anchor_margin: np.ndarray, tree_share: float) -> np.ndarray:
    """The "shrink" verdict's log-odds: tree_share of the trees', the rest the image score's."""
    return tree_share * tree_margin + (1.0 - tree_share) * anchor_margin


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


def _fold_boosters(rows: ClassifierRows, fold: np.ndarray, params: ClassifierParams, monotone: list[int] | None, anchored: bool):
    """Grouped cross-validation: per fold the anchor and the trees are fitted on the other folds,
    early-stopped on this one. Returns out-of-fold margins of the classifier and of the anchor
    alone, and the number of trees each fold kept (0 when no tree beat the anchor on held-out logloss)."""
    import xgboost as xgb
    features, labels, weights, image_scores = rows.features, rows.labels, rows.weights, rows.image_scores
    margins = np.full(len(labels), np.nan)
    anchor_margins = np.full(len(labels), np.nan)
    best_rounds = []
    for k in np.unique(fold):
        train, held = fold != k, fold == k
        if len(np.unique(labels[train])) < 2 or not held.any():
            continue
        base_train = base_held = None
        if image_scores is not None:
            anchor = Anchor.fit(image_scores[train], labels[train], weights[train])
            anchor_margins[held] = anchor.margin(image_scores[held])
            if anchored:
                base_train, base_held = anchor.margin(image_scores[train]), anchor_margins[held]
        scale = weights[train][labels[train] == 0].sum() / weights[train][labels[train] == 1].sum()
        dtrain = xgb.DMatrix(features[train], labels[train], weight=weights[train], base_margin=base_train)
        dheld = xgb.DMatrix(features[held], labels[held], weight=weights[held], base_margin=base_held)
        booster = xgb.train(
            _booster_params(params, scale, monotone), dtrain, num_boost_round=params.max_rounds,
            evals=[(dheld, "held_out")], early_stopping_rounds=params.early_stopping_rounds, verbose_eval=False,
        )
        rounds = booster.best_iteration + 1
        held_margin = booster.predict(dheld, iteration_range=(0, rounds), output_margin=True)
        if anchored and _logloss(labels[held], base_held, weights[held], scale) <= _logloss(labels[held], held_margin, weights[held], scale):
            rounds, held_margin = 0, base_held  # the trees did not beat the image score on unseen images
        best_rounds.append(rounds)
        margins[held] = held_margin
    return margins, anchor_margins, best_rounds


def _weighted_rocauc(labels: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> float:
    """ROCAUC with sample weights (a labeled defect counts as much as its training weight)."""
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(labels, scores, sample_weight=weights))


def _logloss(labels: np.ndarray, margin: np.ndarray, weights: np.ndarray, scale_pos_weight: float) -> float:
    """Weighted logloss as XGBoost's early stopping measures it (defects weighted by scale_pos_weight)."""
    weights = weights * np.where(labels == 1, scale_pos_weight, 1.0)
    margin = np.asarray(margin, dtype=np.float64)
    losses = np.logaddexp(0, -margin) * labels + np.logaddexp(0, margin) * (1 - labels)
    return float((weights * losses).sum() / weights.sum())


@dataclass
class ClassifierRows:
    """The classifier's training examples, one row each; `rows()` checks and converts them."""

    features: np.ndarray  # (N, F) map features
    labels: np.ndarray  # (N,) 0 good, 1 defect
    groups: np.ndarray  # (N,) cross-validation groups: a good image and the defects painted on it
    weights: np.ndarray | None = None  # (N,) sample weights, None = all 1
    image_scores: np.ndarray | None = None  # (N,) the anomaly model's image score (the anchor's input)

    def checked(self) -> "ClassifierRows":
        """The same rows as float32 features, int labels, float64 weights and scores."""
        labels = np.asarray(self.labels).astype(int)
        weights = np.ones(len(labels)) if self.weights is None else np.asarray(self.weights, dtype=np.float64)
        scores = None if self.image_scores is None else np.asarray(self.image_scores, dtype=np.float64)
        return ClassifierRows(np.asarray(self.features, dtype=np.float32), labels, np.asarray(self.groups), weights, scores)


@dataclass(frozen=True)
class Anchoring:
    """How the verdict relates to the image score (CLASSIFIER_ANCHOR): "none", the trees alone;
    "margin", the trees start from the image score's log-odds (`Anchor`); "guard", the trees are kept
    only if their out-of-fold ROCAUC beats the image score's by more than `guard`, else the verdict is
    the image score's log-odds alone; "shrink", the trees are trained alone and the verdict is
    `blend`ed with the anchor's log-odds, the trees' share `shrink_share(n_good, shrink_goods)`."""

    mode: str = "none"
    guard: float = 0.0
    shrink_goods: float = 0.0


def train_classifier(
    rows: ClassifierRows,
    feature_names: list[str],
    params: ClassifierParams,
    false_reject_rate: float,
    monotone: list[int] | None = None,
    anchoring: Anchoring = Anchoring(),
) -> DefectClassifier:
    """Fit the classifier; the verdict threshold rejects `false_reject_rate` of the goods' out-of-fold
    probabilities. `anchoring`: how the verdict uses the rows' image scores (out-of-fold: each fold's
    trees with that fold's anchor)."""
    import xgboost as xgb
    rows = rows.checked()
    features, labels, groups, weights, image_scores = rows.features, rows.labels, rows.groups, rows.weights, rows.image_scores
    if anchoring.mode not in CLASSIFIER_ANCHORS:
        raise ModelError(f"CLASSIFIER_ANCHOR={anchoring.mode!r} is not one of {', '.join(CLASSIFIER_ANCHORS)}")
    anchored = anchoring.mode == "margin"
    guard = anchoring.guard if anchoring.mode == "guard" else None
    shrink_goods = anchoring.shrink_goods if anchoring.mode == "shrink" else None
    if anchoring.mode != "none" and image_scores is None:
        raise ModelError("internal: an anchored, guarded or shrunk classifier needs the image scores")
    n_good, n_defect = int((labels == 0).sum()), int((labels == 1).sum())
    if n_good == 0 or n_defect == 0:
        raise ModelError(
            f"classifier training data holds only {'defect' if n_good == 0 else 'good'} images "
            f"({n_good} good, {n_defect} defect): it needs both (set CLASSIFIER_SYNTHETIC_DEFECTS > 0 "
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
    out_of_fold, anchor_out_of_fold, best_rounds = _fold_boosters(rows, fold, params, monotone, anchored)
    rounds = int(np.median(best_rounds)) if best_rounds else params.max_rounds
    scale = weights[labels == 0].sum() / weights[labels == 1].sum()
    scored = ~np.isnan(out_of_fold)
    evidence = {}
    if image_scores is not None:
        evidence = {
            "out_of_fold_rocauc_trees": _weighted_rocauc(labels[scored], out_of_fold[scored], weights[scored]),
            "out_of_fold_rocauc_image_score": _weighted_rocauc(labels[scored], image_scores[scored], weights[scored]),
        }
    if guard is not None and evidence["out_of_fold_rocauc_trees"] <= evidence["out_of_fold_rocauc_image_score"] + guard:
        anchored, rounds, out_of_fold = True, 0, anchor_out_of_fold  # no evidence the trees do better: the image score decides
    tree_share = None
    if shrink_goods is not None:
        tree_share = shrink_share(n_good, shrink_goods)
        out_of_fold = blend(out_of_fold, anchor_out_of_fold, tree_share)  # the threshold sees the verdict it will gate
    anchor = Anchor.fit(image_scores, labels, weights) if anchored or tree_share is not None else None
    booster = xgb.train(
        _booster_params(params, scale, monotone),
        xgb.DMatrix(features, labels, weight=weights, feature_names=feature_names,
                    base_margin=anchor.margin(image_scores) if anchored else None),
        num_boost_round=rounds,
    )
    chosen = (labels == 0) & ~np.isnan(out_of_fold)
    good_probabilities = _sigmoid(out_of_fold[chosen])
    threshold = threshold_at_rate(good_probabilities, false_reject_rate) if good_probabilities.size else 0.5
    report = {
        "n_good": n_good,
        "n_defect": n_defect,
        "folds": folds,
        "rounds": rounds,
        "fold_best_rounds": best_rounds,
        "scale_pos_weight": float(scale),
        "out_of_fold_rocauc": image_rocauc(labels[scored], out_of_fold[scored]),
        "out_of_fold_good_probabilities": [float(f"{p:.7g}") for p in good_probabilities],
        **evidence,
    }
    if anchor is not None:
        report["anchor"] = anchor.to_dict()
    if tree_share is not None:
        report["tree_share"] = tree_share
    return DefectClassifier(
        booster, list(feature_names), threshold, report, anchor, tree_share, out_of_fold_margin=out_of_fold, threshold_goods=good_probabilities
    )


def feature_importance(classifier: DefectClassifier) -> dict[str, float]:
    """Total gain of each feature (0 for features no tree uses), in feature order."""
    gains = classifier.booster.get_score(importance_type="total_gain")
    return {name: float(gains.get(name, 0.0)) for name in classifier.feature_names}


def plot_feature_importance(classifier: DefectClassifier, path, title: str = "classifier feature importance", top: int = 20) -> None:
    """A horizontal bar chart of the `top` features by total gain, written to `path` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gains = sorted(feature_importance(classifier).items(), key=lambda item: item[1], reverse=True)[:top]
    total = sum(g for _, g in gains) or 1.0
    figure, axis = plt.subplots(figsize=(7, 0.3 * len(gains) + 1.2))
    axis.barh([name for name, _ in gains][::-1], [g / total for _, g in gains][::-1], color="tab:blue")
    axis.set_xlabel("share of total gain")
    axis.set_title(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
