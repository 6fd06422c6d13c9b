"""Input checks shared by :mod:`vijax.em` and :mod:`vijax.meanfield` (no imports of either)."""

from __future__ import annotations

import jax
import numpy as np


def check_row_stochastic(matrix, name: str, *, atol: float = 1e-4) -> None:
    """Raise ValueError naming ``name`` unless the concrete ``[N, K]`` ``matrix`` is finite,
    non-negative and has rows summing to 1 (within ``atol``); tracers are not inspected."""
    if isinstance(matrix, jax.core.Tracer):
        return
    value = np.asarray(matrix, dtype=np.float64)
    if not np.isfinite(value).all() or (value < 0).any():
        raise ValueError(f"{name} must be finite and non-negative")
    deviation = float(np.max(np.abs(value.sum(axis=1) - 1.0))) if value.size else 0.0
    if deviation > atol:
        raise ValueError(f"{name} rows must sum to 1 (max deviation {deviation:.3g})")
