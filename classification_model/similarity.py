"""The verdict's second stage: how much an image's worst patch resembles the user's labeled defects.

Why: the map says *how* anomalous an image's worst patch is, never *in which way*. Where the
map's features hold no more about a part's real defects than its maximum (KolektorSDD's thin
cracks: classifiers trained on the test split itself do not beat the max, docs/classifier.md, Ablation), no
classifier on them can learn from labeled defects. The direction of the peak patch's whitened
deviation from the good patches there (`AnomalyModel.score_with_peaks`) can: a part's defects of
one kind deviate the same way, good parts' noise every way. On ksdd the cosine between a test
image's peak direction and the mean of 5 labeled cracks' ranks the test images at 0.89 (10: 0.92)
where the max ranks them at 0.82.

How: the labeled defects' unit peak directions are averaged into a unit `prototype`; an image's
similarity is its peak direction's cosine with it. A logistic regression on two numbers, the
first stage's verdict log-odds (out-of-fold) and the similarity, over the validation goods and the
labeled defects (each labeled defect's similarity to the prototype of the *others*, so it is as
honest as a new defect's) gives the final log-odds. Its ridge penalty keeps the similarity's
weight small unless the labeled defects clearly stand out by it.

Only labeled defects can teach this (synthetic ones deviate the way the generator paints, not the
way the part fails). Whether the verdict keeps the stage is not decided here: `fit_defect_similarity`
also returns each row's held-out score (the two numbers weighed by a fit without that row: its unit
weight direction only, since a refit's intercept moves against the class left out and would bias any
held-out ROCAUC down), and `classification_model.evidence` keeps the stage only when those scores
beat the image score clearly. Labeled defects taken differently from the goods (tire's ablation
draws them from a test split photographed differently) deviate in that acquisition's direction in
every patch; the evidence then compares them with goods whose maps lie as high overall, which is
where such a stage shows whether it learned the defects or the acquisition.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from anomaly_model.errors import ModelError

MIN_DEFECTS = 3  # fewer labeled defects: each one's leave-one-out prototype is one or two images, too noisy to weigh
RIDGE = 1.0  # L2 penalty on the two standardized weights (inverse of sklearn's C); 1 = a prior of unit scale, not tuned


@dataclass
class DefectSimilarity:
    """final log-odds = intercept + verdict_weight * (first stage's log-odds) + similarity_weight * cosine(peak direction, prototype)."""

    prototype: np.ndarray  # (d,) unit vector: the mean of the labeled defects' peak directions
    intercept: float
    verdict_weight: float
    similarity_weight: float
    n_defects: int

    def similarity(self, directions: np.ndarray) -> np.ndarray:
        """(N,) cosine of each (N, d) unit peak direction with the prototype."""
        directions = np.asarray(directions, dtype=np.float64)
        if directions.ndim != 2 or directions.shape[1] != len(self.prototype):
            raise ModelError(
                f"the classifier's similarity stage does not fit its anomaly model (a prototype of {len(self.prototype)} numbers, "
                f"peak directions of {directions.shape[-1]}): retrain with python train.py"
            )
        return directions @ self.prototype

    def margin(self, verdict_margin: np.ndarray, directions: np.ndarray) -> np.ndarray:
        """The final log-odds of images with first-stage log-odds `verdict_margin` and peak `directions`."""
        return self.intercept + self.verdict_weight * np.asarray(verdict_margin, dtype=np.float64) + self.similarity_weight * self.similarity(directions)

    def to_dict(self) -> dict:
        return {
            "prototype": [round(float(v), 7) for v in self.prototype],
            "intercept": self.intercept,
            "verdict_weight": self.verdict_weight,
            "similarity_weight": self.similarity_weight,
            "n_defects": self.n_defects,
        }

    @classmethod
    def from_dict(cls, entry: dict) -> "DefectSimilarity":
        prototype = np.asarray(entry["prototype"], dtype=np.float64)
        return cls(prototype / np.linalg.norm(prototype), float(entry["intercept"]), float(entry["verdict_weight"]),
                   float(entry["similarity_weight"]), int(entry["n_defects"]))


def _unit(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float64)
    return vectors / np.maximum(np.linalg.norm(vectors, axis=-1, keepdims=True), 1e-12)


def _prototypes_without_each(units: np.ndarray) -> np.ndarray:
    """(k, d): row j, the unit prototype of the labeled defects' unit directions `units` without defect j."""
    return _unit(units.sum(axis=0)[None, :] - units)


def leave_one_out_similarities(defect_directions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the prototype of all labeled defects, each one's cosine with the prototype of the others)."""
    units = _unit(defect_directions)
    return _unit(units.sum(axis=0)), (units * _prototypes_without_each(units)).sum(axis=1)


def background_similarities(defect_directions: np.ndarray, background_directions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(each labeled defect's peak cosine with the prototype of the others, its own image's background
    peak cosine with that same prototype; NaN where the image has no background)."""
    units = _unit(defect_directions)
    others = _prototypes_without_each(units)
    backgrounds = np.asarray(background_directions, dtype=np.float64)
    missing = np.isnan(backgrounds).any(axis=1)
    return (units * others).sum(axis=1), np.where(missing, np.nan, (_unit(np.nan_to_num(backgrounds)) * others).sum(axis=1))


def fit_defect_similarity(
    good_margins: np.ndarray,
    good_directions: np.ndarray,
    defect_margins: np.ndarray,
    defect_directions: np.ndarray,
) -> tuple[DefectSimilarity | None, np.ndarray | None, str]:
    """(the second stage, each row's held-out score (goods first, then defects), "") from goods and
    labeled defects (first-stage out-of-fold log-odds and peak directions of each); or (None, None,
    why not)."""
    from sklearn.linear_model import LogisticRegression

    k, n_good = len(defect_directions), len(good_directions)
    if k < MIN_DEFECTS or n_good < 2:
        return None, None, f"it needs at least {MIN_DEFECTS} labeled defects and 2 goods with peak directions, got {k} and {n_good}"
    prototype, defect_similarity = leave_one_out_similarities(defect_directions)
    margins = np.r_[np.asarray(good_margins, dtype=np.float64), np.asarray(defect_margins, dtype=np.float64)]
    similarity = np.r_[_unit(good_directions) @ prototype, defect_similarity]
    labels = np.r_[np.zeros(n_good), np.ones(k)]
    columns = np.stack([margins, similarity], axis=1)
    center, scale = columns[:n_good].mean(axis=0), columns[:n_good].std(axis=0)
    scale = np.where(scale > 0, scale, 1.0)
    weights = np.where(labels == 1, n_good / k, 1.0)  # the classes weigh the same
    weights *= len(labels) / weights.sum()
    standardized = (columns - center) / scale

    def fit(rows: np.ndarray) -> LogisticRegression:
        return LogisticRegression(C=1.0 / RIDGE).fit(standardized[rows], labels[rows], sample_weight=weights[rows])

    everything = fit(np.ones(len(labels), dtype=bool))
    verdict_weight, similarity_weight = everything.coef_[0] / scale
    if similarity_weight <= 0 or verdict_weight < 0:
        return None, None, "the labeled defects do not stand out from the goods by their peak directions"
    held_out = np.empty(len(labels))
    for row in range(len(labels)):
        weights_without = fit(np.arange(len(labels)) != row).coef_[0]
        held_out[row] = standardized[row] @ weights_without / max(np.linalg.norm(weights_without), 1e-12)
    intercept = float(everything.intercept_[0] - (everything.coef_[0] * center / scale).sum())
    return DefectSimilarity(prototype, intercept, float(verdict_weight), float(similarity_weight), k), held_out, ""
