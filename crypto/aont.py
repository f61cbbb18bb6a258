"""The linear all-or-nothing transform of FAA-DL (section IV-C, equation 29).

U = M X with the n x n matrix M = [[I, 1], [1^T, lambda]] (lambda = 2): u_j = x_j + x_n for
j < n and u_n = sum_{j<n} x_j + lambda x_n, applied to the rows of each image (n = image
height). M is invertible whenever lambda != n - 1, with
x_n = (u_n - sum_{j<n} u_j) / (lambda - (n - 1)) and x_j = u_j - x_n, so integer images map to
integer U and back exactly. Without u_n, every row x_j is masked by the unknown last row; the
masked rows still reveal row differences x_j - x_k (this linear AONT hides single rows, not
every linear function of them).
"""

from __future__ import annotations

import numpy as np

LAMBDA = 2


def _check(n: int, lam: int) -> None:
    if n < 2:
        raise ValueError(f"the AONT needs at least 2 rows, got {n}")
    if lam == n - 1:
        raise ValueError(f"lambda = n - 1 = {n - 1} makes the AONT matrix singular")


def aont_matrix(n: int, lam: int = LAMBDA) -> np.ndarray:
    """M of equation (29), n x n integers."""
    _check(n, lam)
    m = np.eye(n, dtype=np.int64)
    m[:, -1] = 1
    m[-1, :] = 1
    m[-1, -1] = lam
    return m


def aont_transform(x: np.ndarray, lam: int = LAMBDA) -> np.ndarray:
    """U = M X over the second-to-last axis (the rows of ``... x H x W`` images), in int64."""
    x = np.asarray(x, dtype=np.int64)
    return np.einsum("ij,...jk->...ik", aont_matrix(x.shape[-2], lam), x)


def aont_inverse(u: np.ndarray, lam: int = LAMBDA) -> np.ndarray:
    """X = M^{-1} U, exactly; ``ValueError`` if U is not the transform of an integer X."""
    u = np.asarray(u, dtype=np.int64)
    n = u.shape[-2]
    _check(n, lam)
    numerator = u[..., -1, :] - u[..., :-1, :].sum(axis=-2)
    last, remainder = np.divmod(numerator, lam - (n - 1))
    if np.any(remainder):
        raise ValueError("the rows are not the AONT of an integer image")
    return np.concatenate([u[..., :-1, :] - last[..., None, :], last[..., None, :]], axis=-2)
