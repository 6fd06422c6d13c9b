"""``vijax._linalg``: Cholesky factor, its inverse and triangular inverses from matrix products
only, checked against numpy's LAPACK in float64."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vijax._linalg import cholesky_and_inverse, tril_inverse


def _spd(rng, batch, d):
    a = rng.normal(size=(batch, d, d))
    return a @ np.swapaxes(a, -1, -2) + 0.1 * np.eye(d)[None]


@pytest.mark.parametrize("dim", [1, 2, 3, 7, 16, 33])
def test_cholesky_and_inverse_match_lapack(x64, dim):
    s = _spd(np.random.default_rng(dim), 4, dim)
    chol, inv = jax.jit(cholesky_and_inverse)(s)
    assert chol.shape == inv.shape == (4, dim, dim) and chol.dtype == jnp.float64
    ref = np.linalg.cholesky(s)
    cond = np.linalg.cond(s).max()
    np.testing.assert_allclose(chol, ref, atol=1e-13 * np.sqrt(cond) * np.abs(ref).max())
    np.testing.assert_allclose(inv, np.linalg.inv(ref),
                               atol=1e-13 * cond * np.abs(np.linalg.inv(ref)).max())
    assert np.all(np.triu(np.asarray(chol), 1) == 0) and np.all(np.triu(np.asarray(inv), 1) == 0)


def test_cholesky_of_indefinite_matrix_is_nan(x64):
    s = np.diag([1.0, -1.0, 2.0])
    chol, inv = cholesky_and_inverse(jnp.asarray(s))
    assert np.isnan(np.asarray(chol)).any() and np.isnan(np.asarray(inv)).any()


@pytest.mark.parametrize("dim", [1, 2, 5, 16, 33])
def test_tril_inverse_matches_lapack(x64, dim):
    ref = np.linalg.cholesky(_spd(np.random.default_rng(100 + dim), 3, dim))
    noisy_upper = ref + np.triu(np.ones((dim, dim)), 1)[None]  # must not be read
    inv = jax.jit(tril_inverse)(noisy_upper)
    assert inv.shape == (3, dim, dim) and inv.dtype == jnp.float64
    expected = np.linalg.inv(ref)
    cond = np.linalg.cond(ref).max()
    np.testing.assert_allclose(inv, expected, atol=1e-13 * cond * np.abs(expected).max())
    assert np.all(np.triu(np.asarray(inv), 1) == 0)
