"""Non-negative least squares (Lawson-Hanson active set) in numpy: calibration needs it and scipy is not a
dependency of moeflux."""

from __future__ import annotations

import numpy as np


def nnls(a: np.ndarray, b: np.ndarray, max_iter: int | None = None) -> np.ndarray:
    """``argmin ||a x - b||`` subject to ``x >= 0`` (a: [m, n], b: [m])."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    n = a.shape[1]
    x = np.zeros(n)
    passive = np.zeros(n, dtype=bool)
    tol = 10 * np.finfo(np.float64).eps * np.linalg.norm(a, 1) * max(a.shape)
    for _ in range(max_iter or 3 * n + 10):
        w = a.T @ (b - a @ x)
        if passive.all() or w[~passive].max(initial=-np.inf) <= tol:
            break
        passive[np.argmax(np.where(passive, -np.inf, w))] = True
        while passive.any():
            z = np.zeros(n)
            z[passive] = np.linalg.lstsq(a[:, passive], b, rcond=None)[0]
            if z[passive].min() > 0:
                x = z
                break
            # Step back to the feasible boundary and drop the variables that hit zero.
            blocking = passive & (z <= 0)
            gap = x[blocking] - z[blocking]
            step = np.min(np.divide(x[blocking], gap, out=np.zeros_like(gap), where=gap > 0))
            x = x + step * (z - x)
            passive &= x > tol
            x[~passive] = 0.0
    return x
