"""Outlier rules over the reconstruction errors R, LayerCAM-AE eq. (13)-(15) and a robust variant.

Each rule returns ``OutlierDecision``: ``benign`` is O_t (True = 1 = benign, eq. 15), ``scores``
a continuous suspicion score (higher = more suspicious, for ROC/AUC) and ``threshold`` the cut
applied to the scores.

- ``upper_rule`` is the paper's: delta = mean(R) + beta * std(R) (eq. 13-14, population std),
  O = 1 iff R <= delta. It assumes poisoned maps reconstruct *worse*.
- ``two_sided_rule`` scores |R - median(R)| / (1.4826 * MAD(R)) and flags scores above z. It
  also catches colluding attackers whose near-identical maps form a tight mode that the AE
  reconstructs *better* than the diverse benign maps, which the paper's rule cannot see.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAD_TO_STD = 1.4826
"""MAD x 1.4826 estimates the standard deviation of normally distributed data."""


@dataclass(frozen=True)
class OutlierDecision:
    benign: np.ndarray
    scores: np.ndarray
    threshold: float


def upper_rule(errors: np.ndarray, beta: float = 1.0) -> OutlierDecision:
    """The paper's rule: benign iff R_l <= mean(R) + beta * std(R), eq. (13)-(15)."""
    errors = np.asarray(errors, dtype=np.float64)
    delta = float(errors.mean() + beta * errors.std())
    return OutlierDecision(benign=errors <= delta, scores=errors, threshold=delta)


def robust_z(errors: np.ndarray, reference: np.ndarray | None = None) -> np.ndarray:
    """Signed robust scores (R_l - median(R)) / (1.4826 * MAD(R)); ``reference``: the indices
    of the errors the median and the MAD are taken over (default: all).

    When more than half the errors are identical (MAD = 0), the scale falls back to the mean
    absolute deviation from the median, then to 1, so distinct values are still told apart.
    """
    errors = np.asarray(errors, dtype=np.float64)
    basis = errors if reference is None else errors[reference]
    centre = np.median(basis)
    spread = np.abs(basis - centre)
    scale = MAD_TO_STD * float(np.median(spread))
    if scale <= 0:
        scale = float(spread.mean()) or 1.0
    return (errors - centre) / scale


def two_sided_rule(errors: np.ndarray, z: float = 3.0) -> OutlierDecision:
    """Robust two-sided rule: benign iff |R_l - median(R)| <= z * 1.4826 * MAD(R)."""
    scores = np.abs(robust_z(errors))
    return OutlierDecision(benign=scores <= z, scores=scores, threshold=float(z))
