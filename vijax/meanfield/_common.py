"""Shared pieces of the mean-field models: input checks and the categorical block q(Z).

Checks run on concrete arrays only (never on tracers), so they fire before tracing when a
public function is called eagerly or when its inputs are static, and cost nothing inside
``jit``. Shape checks always run (shapes are static).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.linalg import solve_triangular
from jax.scipy.special import xlogy

from vijax._checks import check_num_components, check_real, check_row_stochastic, is_concrete
from vijax._softmax import normalize_log_weights

Array = jax.Array


def as_float_array(value, name: str) -> Array:
    """``value`` as a JAX floating array (ints become the default float dtype; bools and
    complex numbers raise TypeError naming ``name``)."""
    if value is None:
        raise TypeError(f"{name} must be an array, got None")
    try:
        array = jnp.asarray(value)
    except TypeError as err:
        raise TypeError(f"{name} must be array-like, got {type(value).__name__}") from err
    if jnp.issubdtype(array.dtype, jnp.complexfloating):
        raise TypeError(f"{name} must be real, got dtype {array.dtype}")
    if array.dtype == jnp.bool_:
        raise TypeError(f"{name} must be real, got a bool array")
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


def check_state_type(state, expected: type, name: str = "state") -> None:
    """Raise TypeError naming ``name`` unless ``state`` is an instance of ``expected`` (a
    plain tuple with the same fields is refused: the field names carry the meaning)."""
    if not isinstance(state, expected):
        raise TypeError(f"{name} must be a {expected.__name__}, got {type(state).__name__}")


def check_field_shapes(state, shapes: dict, name: str = "state") -> None:
    """Raise ValueError naming ``name.field`` for the first field of ``state`` whose shape is
    not ``shapes[field]``."""
    for field, shape in shapes.items():
        got = jnp.shape(getattr(state, field))
        if got != tuple(shape):
            raise ValueError(f"{name}.{field} must have shape {list(shape)}, got {list(got)}")


def mixture_dims(state, k_field: str, dim: int | None = None) -> tuple[int, int]:
    """``(K, D)`` of a mixture state: K from ``state.<k_field>`` ``[K]`` (K >= 1), D = ``dim``
    when given, else the width of ``state.loc`` ``[K, D]``; ValueError naming the field."""
    k_shape = jnp.shape(getattr(state, k_field))
    if len(k_shape) != 1 or k_shape[0] < 1:
        raise ValueError(f"state.{k_field} must have shape [K] with K >= 1, got {list(k_shape)}")
    k, loc_shape = k_shape[0], jnp.shape(state.loc)
    if dim is None and len(loc_shape) != 2:
        raise ValueError(f"state.loc must have shape [K={k}, D], got {list(loc_shape)}")
    return k, loc_shape[-1] if dim is None else dim


def mixture_num_components(state, num_points: int) -> int:
    """K of ``state.responsibilities`` ``[N, K]`` with N = ``num_points`` rows of ``x`` and
    1 <= K <= N; ValueError naming ``state.responsibilities`` (or ``num_components``)."""
    r_shape = jnp.shape(state.responsibilities)
    if len(r_shape) != 2 or r_shape[0] != num_points:
        raise ValueError(f"state.responsibilities must have shape [N={num_points}, K], got "
                         f"{list(r_shape)} (does state belong to this x?)")
    return check_num_components(r_shape[1], num_points)


def check_mixture_state(state, x: Array, state_type: type, k_field: str,
                        check_params: Callable[[Any, int], Any], *,
                        responsibilities: bool = False):
    """``state`` (a ``state_type`` with ``responsibilities`` [N, K] and a [K] field ``k_field``)
    checked against ``x`` [N, D] and cast to ``x``'s dtype; ``check_params(state, D)`` then
    checks the parameter fields, and with ``responsibilities`` the responsibilities must be
    row-stochastic when concrete. TypeError / ValueError naming the field."""
    check_state_type(state, state_type)
    n, d = x.shape
    check_field_shapes(state, {k_field: (mixture_num_components(state, n),)})
    state = state_type(*(jnp.asarray(v, x.dtype) for v in state))
    check_params(state, d)
    if responsibilities:
        check_state_values(state, row_stochastic=("responsibilities",))
    return state


# Tolerance on sum_k pi_k - 1 for a probability vector (as check_row_stochastic's rows).
_PROBABILITY_ATOL = 1e-4


def check_state_values(state, name: str = "state", *, finite=(), lower=None,
                       probability=(), cholesky=(), row_stochastic=()) -> None:
    """Value checks on fields of a concrete state (one host transfer; tracers are skipped).

    Args:
      state: a NamedTuple; ``name`` prefixes the field names in messages (``state.dof``).
      finite: fields that must be finite.
      lower: ``{field: bound}`` or ``{field: (bound, text)}``: fields that must be finite
        and > bound elementwise (``text`` describes the bound in the message).
      probability: fields ([K]) that must be finite, >= 0 and sum to 1 (within 1e-4).
      cholesky: fields ([K, D, D]) that must be finite with a positive diagonal (lower
        Cholesky factors; the upper triangle is not read by the models).
      row_stochastic: fields ([N, K]) checked by :func:`vijax._checks.check_row_stochastic`.
    Raises:
      ValueError: naming ``name.field`` for the first field that fails.

    Meant for the small parameter arrays (K-sized) on every call, and for the [N, K]
    responsibilities only where their values are used (the ELBO).
    """
    lower = {f: b if isinstance(b, tuple) else (b, f"{b:g}") for f, b in (lower or {}).items()}
    fields = [f for f in (*finite, *lower, *probability, *cholesky, *row_stochastic)
              if is_concrete(getattr(state, f))]
    if not fields:
        return
    values = jax.device_get({f: getattr(state, f) for f in fields})
    values = {f: np.asarray(v, dtype=np.float64) for f, v in values.items()}
    for f in fields:
        v, label = values[f], f"{name}.{f}"
        if f in row_stochastic:
            check_row_stochastic(v, label)
            continue
        if not np.isfinite(v).all():
            raise ValueError(f"{label} must be finite")
        if f in lower and not (v > lower[f][0]).all():
            raise ValueError(f"{label} must be > {lower[f][1]}, got min {v.min():.6g}")
        if f in probability:
            deviation = abs(float(v.sum()) - 1.0)
            if (v < 0).any() or deviation > _PROBABILITY_ATOL:
                raise ValueError(f"{label} must be non-negative and sum to 1 (got "
                                 f"{np.array2string(v, precision=6)}, "
                                 f"sum - 1 = {v.sum() - 1.0:+.3g})")
        if f in cholesky and not (np.diagonal(v, axis1=-2, axis2=-1) > 0).all():
            raise ValueError(f"{label} must be lower Cholesky factors with a positive "
                             "diagonal")


def check_scalar(value, name: str, dtype, **bounds) -> Array:
    """A scalar parameter cast to ``dtype``; when concrete, finite and within ``bounds``
    (``minimum=`` / ``exclusive_minimum=``, as in :func:`vijax._checks.check_real`)."""
    array = as_float_array(value, name)
    check_real(array, name, array=True, **bounds)
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

    One [N, D] x [D, K D] matmul: A_k (x - m_k) = A_k x - A_k m_k for all k at once, with
    x and the centres first shifted by the centres' mean c (a property of ``loc`` alone, so a
    row's value does not depend on the other rows): the expanded form then loses accuracy
    only with the data's distance from c, not from the origin (float32 data at an offset of
    1e5 would otherwise lose about 1e-2 nats per point)."""
    num_points, dim = x.shape
    num_components = loc.shape[0]
    centre = jnp.mean(loc, axis=0)
    x, loc = x - centre[None, :], loc - centre[None, :]
    weight = jnp.transpose(inv_tril, (2, 0, 1)).reshape(dim, num_components * dim)
    offset = jnp.einsum("ked,kd->ke", inv_tril, loc).reshape(num_components * dim)
    whitened = (x @ weight - offset[None, :]).reshape(num_points, num_components, dim)
    return jnp.sum(jnp.square(whitened), axis=-1)


# --- the categorical block q(Z) -------------------------------------------------------------

def categorical_update(log_rho: Array) -> Array:
    """Mean-field optimum of q(z_n): ``r_nk = exp(log_rho_nk) / sum_j exp(log_rho_nj)``.

    ``log_rho [N, K]`` is ``E_{-z} log p(x_n, z_n = k, ...)`` up to a per-row constant
    (PRML eqs 10.46-10.49; Blei et al. 2017 eq. 17). Returns responsibilities [N, K],
    each row summing to one to rounding even where |log_rho| is large
    (:func:`vijax._softmax.normalize_log_weights`).
    """
    return normalize_log_weights(log_rho)[2]


def categorical_elbo_term(log_rho: Array, responsibilities: Array) -> Array:
    """``sum_nk r_nk (log_rho_nk - log r_nk)`` in nats: E_q[log p(X, Z | .)] - E_q[log q(Z)].

    With ``log_rho`` the expected complete-data log joint of each (n, k) this is the part of
    the ELBO that depends on q(Z); it is maximised by :func:`categorical_update`, where it
    equals ``sum_n logsumexp_k log_rho_nk``. Uses ``0 log 0 = 0`` and ``0 * (-inf) = 0``.
    """
    # r = 0 contributes nothing, also where log_rho = -inf (a component of weight 0)
    joint = jnp.where(responsibilities > 0, responsibilities * log_rho, 0.0)
    return jnp.sum(joint) - jnp.sum(xlogy(responsibilities, responsibilities))


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
