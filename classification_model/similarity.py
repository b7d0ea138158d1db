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
way the part fails), and only labeled defects taken like the goods. On tire the labeled defects
come from a test split photographed differently from the training goods: every patch of theirs
deviates in that acquisition's direction, so the stage learned the acquisition rather than the
defects and ranked tire's test images 0.10-0.13 worse than the max. A defect raises part of the
map; an acquisition change raises all of it. So the stage is dropped (`fit_defect_similarity`
says why) when:
- the labeled defects' map *medians* lie above the honest goods' (one-sided Mann-Whitney,
  p < SHIFT_P_VALUE): tire p <= 0.0002, ksdd p >= 0.45, the demo p >= 0.86 (5 or 10 defects);
- the fit gives the similarity no positive weight, or the final log-odds does not rank the
  labeled defects above the goods better than the first stage alone, each row scored by a fit
  without that row (in-sample, a two-weight fit always looks better: on the demo it lifted 26
  training rows from 0.988 to 1.0 and then lost 0.016 on the test images). A held-out row is
  scored by the refit's unit weight direction alone: its intercept moves against the class left
  out (fewer defects: lower), which would bias leave-one-out ROCAUC down for any stage.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from anomaly_model.backbone import ModelError

MIN_DEFECTS = 3  # fewer labeled defects: each one's leave-one-out prototype is one or two images, too noisy to weigh
RIDGE = 1.0  # L2 penalty on the two standardized weights (inverse of sklearn's C); 1 = a prior of unit scale, not tuned
SHIFT_P_VALUE = 0.01  # labeled defects' map medians above the goods' at this significance: taken differently (any level in 0.0002-0.45 splits the sets the same way)


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


def leave_one_out_similarities(defect_directions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the prototype of all labeled defects, each one's cosine with the prototype of the others)."""
    units = _unit(defect_directions)
    total = units.sum(axis=0)
    others = _unit(total[None, :] - units)  # (k, d): row j, the prototype without defect j
    return _unit(total), (units * others).sum(axis=1)


def fit_defect_similarity(
    good_margins: np.ndarray,
    good_directions: np.ndarray,
    defect_margins: np.ndarray,
    defect_directions: np.ndarray,
    good_medians: np.ndarray,
    defect_medians: np.ndarray,
) -> tuple[DefectSimilarity | None, str]:
    """(the second stage, "") from goods and labeled defects (first-stage out-of-fold log-odds and
    peak directions of each); or (None, why not). `good_medians`, `defect_medians`: the median of
    each honest good's (any number of them) and each labeled defect's anomaly map."""
    from scipy.stats import mannwhitneyu
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    k, n_good = len(defect_directions), len(good_directions)
    if k < MIN_DEFECTS or n_good < 2:
        return None, f"it needs at least {MIN_DEFECTS} labeled defects and 2 validation goods, got {k} and {n_good}"
    shift = float(mannwhitneyu(np.asarray(defect_medians, np.float64), np.asarray(good_medians, np.float64), alternative="greater").pvalue)
    if shift < SHIFT_P_VALUE:
        return None, (
            f"the {k} labeled defects' maps lie higher overall than the {len(good_medians)} good images' (median of the map, "
            f"p = {shift:.2g}): they look taken differently, and the stage would learn that difference rather than the defects"
        )
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
        return None, "the labeled defects do not stand out from the goods by their peak directions"
    held_out = np.empty(len(labels))
    for row in range(len(labels)):
        weights_without = fit(np.arange(len(labels)) != row).coef_[0]
        held_out[row] = standardized[row] @ weights_without / max(np.linalg.norm(weights_without), 1e-12)
    with_stage, without = roc_auc_score(labels, held_out), roc_auc_score(labels, margins)
    if with_stage <= without:
        return None, f"it ranks the labeled defects above the goods no better than the first stage alone (ROCAUC {with_stage:.3f} vs {without:.3f}, leave-one-out)"
    intercept = float(everything.intercept_[0] - (everything.coef_[0] * center / scale).sum())
    return DefectSimilarity(prototype, intercept, float(verdict_weight), float(similarity_weight), k), ""
