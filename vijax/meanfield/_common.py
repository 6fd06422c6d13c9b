"""Shared pieces of the mean-field models: input checks and the categorical block q(Z).

Checks run on concrete arrays only (never on tracers), so they fire before tracing when a
public function is called eagerly or when its inputs are static, and cost nothing inside
``jit``. Shape checks always run (shapes are static).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.linalg import solve_triangular
from jax.scipy.special import logsumexp, xlogy

from vijax._checks import check_row_stochastic

Array = jax.Array


def is_concrete(value) -> bool:
    """True when ``value`` can be inspected with numpy (not a JAX tracer)."""
    return not isinstance(value, jax.core.Tracer)


def as_float_array(value, name: str) -> Array:
    """``value`` as a JAX floating array (ints become the default float dtype)."""
    if value is None:
        raise TypeError(f"{name} must be an array, got None")
    try:
        array = jnp.asarray(value)
    except TypeError as err:
        raise TypeError(f"{name} must be array-like, got {type(value).__name__}") from err
    if jnp.issubdtype(array.dtype, jnp.complexfloating):
        raise TypeError(f"{name} must be real, got dtype {array.dtype}")
    if not jnp.issubdtype(array.dtype, jnp.floating):
        array = array.astype(jnp.result_type(float))
    return array


def check_float_dtype(x, name: str) -> None:
    """Data must be float32 or float64 (no silent casts: ints, bools and half precision
    raise; the factorisations have no float16 kernels)."""
    dtype = getattr(x, "dtype", None)
    if dtype is None:
        try:
            dtype = jnp.asarray(x).dtype
        except TypeError as err:
            raise TypeError(f"{name} must be an array, got {type(x).__name__}") from err
    if dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise TypeError(f"{name} must be a float32 or float64 array, got dtype {dtype}; "
                        f"cast it first, e.g. {name}.astype(float)")


def check_data(x, name: str, *, ndim: int, min_rows: int = 1) -> Array:
    """Validate a data array: float32/float64, ``ndim`` dims, at least ``min_rows`` rows, all
    finite.

    Raises:
      TypeError: not a float32 or float64 array (ints, bools, float16 are not cast silently).
      ValueError: wrong number of dimensions, too few rows, zero columns, or non-finite rows
        (the message names ``name`` and the first offending rows).
    """
    check_float_dtype(x, name)
    x = jnp.asarray(x)
    if x.ndim != ndim:
        expected = "[num_points]" if ndim == 1 else "[num_points, dim]"
        raise ValueError(f"{name} must have shape {expected} ({ndim}-D), got shape {x.shape}")
    if x.shape[0] < min_rows:
        raise ValueError(f"{name} must have at least {min_rows} rows, got {x.shape[0]}")
    if ndim == 2 and x.shape[1] < 1:
        raise ValueError(f"{name} must have at least one column, got shape {x.shape}")
    if is_concrete(x):
        finite = np.isfinite(np.asarray(x))
        if ndim == 2:
            finite = finite.all(axis=1)
        if not finite.all():
            bad = np.flatnonzero(~finite)
            raise ValueError(f"{name} has non-finite (NaN or inf) values in rows "
                             f"{bad[:10].tolist()}{' ...' if bad.size > 10 else ''}")
    return x


def check_num_components(num_components, num_points: int, name_x: str = "x") -> int:
    """Validate K: a Python int with 1 <= K <= N."""
    if isinstance(num_components, bool) or not isinstance(num_components, (int, np.integer)):
        raise TypeError(f"num_components must be a Python int, got {num_components!r}")
    num_components = int(num_components)
    if num_components < 1:
        raise ValueError(f"num_components must be >= 1, got {num_components}")
    if num_points < num_components:
        raise ValueError(f"num_components (K={num_components}) exceeds the number of rows of "
                         f"{name_x} (N={num_points}); need N >= K")
    return num_components


def check_responsibilities(responsibilities, num_points: int, dtype, name: str = "responsibilities"
                           ) -> Array:
    """Validate an [N, K] row-stochastic matrix and cast it to ``dtype``."""
    r = as_float_array(responsibilities, name)
    if r.ndim != 2 or r.shape[0] != num_points:
        raise ValueError(f"{name} must have shape [num_points={num_points}, num_components], "
                         f"got {r.shape}")
    check_num_components(r.shape[1], num_points)
    check_row_stochastic(r, name)
    return r.astype(dtype)


def check_scalar(value, name: str, dtype, *, lower: float, strict: bool = True) -> Array:
    """A scalar parameter, cast to ``dtype``, checked to be finite and > (>=) ``lower``."""
    array = as_float_array(value, name)
    if array.shape != ():
        raise ValueError(f"{name} must be a scalar, got shape {array.shape}")
    if is_concrete(array):
        v = float(array)
        ok = np.isfinite(v) and (v > lower if strict else v >= lower)
        if not ok:
            raise ValueError(f"{name} must be finite and {'>' if strict else '>='} {lower:g}, "
                             f"got {v!r}")
    return array.astype(dtype)


def check_vector(value, name: str, dtype, *, size: int) -> Array:
    """A finite vector of length ``size`` cast to ``dtype``."""
    array = as_float_array(value, name)
    if array.shape != (size,):
        raise ValueError(f"{name} must have shape [{size}], got {array.shape}")
    if is_concrete(array) and not np.isfinite(np.asarray(array)).all():
        raise ValueError(f"{name} must be finite")
    return array.astype(dtype)


def check_psd_matrix(value, name: str, dtype, *, size: int, definite: bool = True) -> Array:
    """A symmetric positive (semi-)definite [size, size] matrix cast to ``dtype``."""
    array = as_float_array(value, name)
    if array.shape != (size, size):
        raise ValueError(f"{name} must have shape [{size}, {size}], got {array.shape}")
    if is_concrete(array):
        m = np.asarray(array, dtype=np.float64)
        if not np.isfinite(m).all():
            raise ValueError(f"{name} must be finite")
        if not np.allclose(m, m.T, rtol=1e-6, atol=1e-8 * max(1.0, np.abs(m).max())):
            raise ValueError(f"{name} must be symmetric")
        smallest = np.linalg.eigvalsh(m).min()
        if (smallest <= 0.0) if definite else (smallest < -1e-10 * max(1.0, np.abs(m).max())):
            kind = "definite" if definite else "semi-definite"
            raise ValueError(f"{name} must be positive {kind} (smallest eigenvalue "
                             f"{smallest:.3g})")
    return array.astype(dtype)


# --- Gaussian pieces ---------------------------------------------------------------------

def tril_inverse(tril: Array) -> Array:
    """Inverses of lower-triangular factors, [..., D, D] -> [..., D, D] (one small solve each;
    the inverse is then applied with matmuls, which XLA runs much faster on CPU than a
    triangular solve against N right-hand sides)."""
    eye = jnp.broadcast_to(jnp.eye(tril.shape[-1], dtype=tril.dtype), tril.shape)
    return solve_triangular(tril, eye, lower=True)


def sq_mahalanobis(x: Array, loc: Array, inv_tril: Array) -> Array:
    """``|A_k (x_n - loc_k)|^2`` for points x [N, D], centres loc [K, D] and whitening
    matrices A_k = ``inv_tril`` [K, D, D] (A_k^T A_k is the precision); returns [N, K].

    One [N, D] x [D, K D] matmul: A_k (x - m_k) = A_k x - A_k m_k for all k at once."""
    num_points, dim = x.shape
    num_components = loc.shape[0]
    weight = jnp.transpose(inv_tril, (2, 0, 1)).reshape(dim, num_components * dim)
    offset = jnp.einsum("ked,kd->ke", inv_tril, loc).reshape(num_components * dim)
    whitened = (x @ weight - offset[None, :]).reshape(num_points, num_components, dim)
    return jnp.sum(jnp.square(whitened), axis=-1)


# --- the categorical block q(Z) -------------------------------------------------------------

def categorical_update(log_rho: Array) -> Array:
    """Mean-field optimum of q(z_n): ``r_nk = exp(log_rho_nk) / sum_j exp(log_rho_nj)``.

    ``log_rho [N, K]`` is ``E_{-z} log p(x_n, z_n = k, ...)`` up to a per-row constant
    (PRML eqs 10.46-10.49; Blei et al. 2017 eq. 17). Returns responsibilities [N, K].
    """
    return jnp.exp(log_rho - logsumexp(log_rho, axis=-1, keepdims=True))


def categorical_elbo_term(log_rho: Array, responsibilities: Array) -> Array:
    """``sum_nk r_nk (log_rho_nk - log r_nk)`` in nats: E_q[log p(X, Z | .)] - E_q[log q(Z)].

    With ``log_rho`` the expected complete-data log joint of each (n, k) this is the part of
    the ELBO that depends on q(Z); it is maximised by :func:`categorical_update`, where it
    equals ``sum_n logsumexp_k log_rho_nk``. Uses ``0 log 0 = 0``.
    """
    return jnp.sum(responsibilities * log_rho) - jnp.sum(xlogy(responsibilities, responsibilities))


def nearest_centre_responsibilities(rng_key: Array, x: Array, num_components: int) -> Array:
    """One-hot q(Z) [N, K]: K distinct rows of ``x`` drawn as centres, each point assigned to
    its nearest centre (Euclidean). A simple random start for the mixture models."""
    idx = jax.random.choice(rng_key, x.shape[0], (num_components,), replace=False)
    sq_dist = jnp.sum(jnp.square(x[:, None, :] - x[idx][None, :, :]), axis=-1)
    return jax.nn.one_hot(jnp.argmin(sq_dist, axis=1), num_components, dtype=x.dtype)


def unpack_data(fn):
    """Adapt ``fn(state, x, prior)`` to the driver's ``(state, data)``, ``data = (x, prior)``."""

    def wrapped(state, data):
        x, prior = data
        return fn(state, x, prior)

    wrapped.__name__ = getattr(fn, "__name__", "update")
    wrapped.__doc__ = fn.__doc__
    return wrapped
