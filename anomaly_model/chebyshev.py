"""Chebyshev's inequality in PaDiM: the per-channel Chebyshev score term, and pixel thresholds
with a distribution-free false-alarm guarantee.

The hybrid Gaussian-Chebyshev PaDiM (the "Hybrid Gaussian-Chebyshev" anomalib 0.3 variant, its
`anomaly_map.py`) scores a patch with its Mahalanobis distance M beside a Chebyshev term
C = max over channels c of (1 - 1/k_c^2), k_c = |x_c - mu_c| / sigma_c, Chebyshev's lower bound
on the probability that a good patch deviates less than this one in that channel
(P(|X - mu| >= k sigma) <= 1/k^2). Since 1 - 1/k^2 grows with k, C = 1 - 1/k^2 at the largest
k_c; below k = 1 the bound says nothing, so C is 0 there; it stays below 1 (float32's largest
value under 1), so k = 0, sigma = 0 or an overflowing k never give NaN or inf. The variance
sigma_c^2 is the fitted covariance's diagonal, COVARIANCE_EPSILON included (see gaussian.py).

Two facts decide how far the Chebyshev term can help (docs/models.md, "Chebyshev"):
- k_c <= M for every channel (Cauchy-Schwarz: (x_c - mu_c)^2 <= Sigma_cc * M^2), so C <= 1 - 1/M^2;
- as tail probabilities the Gaussian's is always the smaller: P(chi2_d >= M^2) <= d / M^2
  (Markov) <= d / max_c k_c^2, the Chebyshev bound with a union over the d channels. A "min" or
  Bonferroni combination of the two is the Gaussian tail alone, a "max" the Chebyshev one alone.

Distribution-free pixel thresholds (`pixel_threshold`). An anomaly map pixel is a convex
combination of patch scores (bilinear weights and a normalized blur kernel, both non-negative
and summing to 1): m = sum_p w_p s_p. For good patches with the fitted mean and covariance
(or less spread: the epsilon on the diagonal only makes them look less spread),
E[M_p^2] = trace(Sigma^-1 Cov) <= d for any distribution. Then
- Mahalanobis maps: m^2 <= sum_p w_p M_p^2 (Jensen), so E[m^2] <= d and, by Markov,
  P(m >= t) <= d / t^2: t = sqrt(d / rate) (the multivariate Chebyshev P(M >= k sqrt(d)) <= 1/k^2,
  carried through upsampling and blur, whatever the dependence between patches);
- hybrid maps: m = w M_map + (1 - w) C_map with C_map < 1, so m >= w t + (1 - w) implies M_map >= t:
  the same guarantee at t_hybrid = w sqrt(d / rate) + (1 - w);
- Chebyshev maps: 1 - C_p = min(1, 1/kmax_p^2) >= 1 / (1 + Q_p) with Q_p = sum_c k_c^2 >= kmax_p^2,
  and 1/(1 + q) is convex, so 1 - m >= 1 / (1 + sum_p w_p Q_p); E[Q_p] <= d (only the per-channel
  variances enter), so P(m >= c) <= d (1 - c) / c: c = d / (d + rate).
Each bound holds per pixel of a good image, so the expected share of flagged good pixels is at
most `rate` too. What it rests on: the good patches' mean and covariance are the fitted ones;
training measures how often good validation pixels exceed the threshold, and eval.py reports it.
"""

from __future__ import annotations

import math

import torch

from choices import PADIM_SCORES

SCORES = PADIM_SCORES  # the patch scores PaDiM computes (PADIM_SCORE)
_BELOW_ONE = 1.0 - 2.0**-24  # float32's largest value under 1


def chebyshev_term(k_squared: torch.Tensor) -> torch.Tensor:
    """1 - 1/k^2 from k^2, clamped to [0, 1): 0 where k <= 1 (the bound says nothing there), finite
    for k = 0 and for an infinite k."""
    return k_squared.clamp_min(1.0).reciprocal_().neg_().add_(1.0).clamp_(0.0, _BELOW_ONE)


def pixel_threshold(score: str, weight: float, dim: int, rate: float) -> float:
    """The map level a good pixel reaches with probability at most `rate`, for a map of `score`
    with Mahalanobis share `weight` over d = `dim` channels (derivations: module docstring)."""
    if not 0 < rate < 1:
        raise ValueError(f"a false-alarm rate must be in (0, 1), got {rate}")
    if score == "chebyshev" or (score == "hybrid" and weight == 0):
        return dim / (dim + rate)
    distance = math.sqrt(dim / rate)
    if score == "mahalanobis" or weight == 1:
        return distance
    return weight * distance + (1 - weight)


def pixel_threshold_rule(score: str, weight: float) -> str:
    """The formula `pixel_threshold` uses, in words a report can show."""
    if score == "chebyshev" or (score == "hybrid" and weight == 0):
        return "d / (d + rate): Chebyshev per channel, through upsampling and blur (Jensen), E[sum_c k_c^2] <= d"
    if score == "mahalanobis" or weight == 1:
        return "sqrt(d / rate): multivariate Chebyshev P(M >= t) <= d / t^2, through upsampling and blur (Jensen)"
    return f"{weight:g} sqrt(d / rate) + {1 - weight:g}: the Mahalanobis share's bound; the Chebyshev term is below 1"
