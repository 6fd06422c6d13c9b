"""The linear-Gaussian latent-variable model, whose posterior and evidence are exact.

    z ~ N(0, I_d),    x | z ~ N(W z + b, sigma^2 I_D)

so that p(x) = N(x; b, W W^T + sigma^2 I_D) and the posterior is Gaussian,

    p(z | x) = N(mu, Sigma),  Sigma = (I_d + W^T W / sigma^2)^{-1},  mu = Sigma W^T (x - b) / sigma^2

(probabilistic PCA; Bishop PRML §12.2, eqs. 12.31-12.33 model, 12.35-12.36 evidence,
12.41-12.42 posterior). vijax uses it as ground truth for its ELBO identities
(log p(x) = ELBO + KL(q || p(z|x)); lecture 3 "Variational lower bound") and gradient
estimators: every closed form here is independent of ``vijax.elbo``.

Argument checks: shapes and types always (they are static, so also under ``jit``); values
(``noise_scale > 0``, positive-definite covariances) only on concrete arrays, never on
tracers, so that the functions stay jit- and vmap-able.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from vijax._checks import check_int, check_real, check_rng_key, is_concrete

Array = jax.Array

__all__ = [
    "LinearGaussian",
    "random_model",
    "log_likelihood",
    "log_joint",
    "log_marginal",
    "posterior",
    "sample",
    "gaussian_kl",
]


class LinearGaussian(NamedTuple):
    """Parameters of the model (PRML eqs. 12.31-12.32, with mu = b)."""

    weight: Array  # [data_dim, latent_dim]  W
    bias: Array  # [data_dim]  b
    noise_scale: Array  # []  sigma > 0 (data units)


# --- argument checks (static shapes; concrete values only) ---------------------------------

def _as_real_array(value, name: str) -> Array:
    """``value`` as a JAX array of a real (integer or floating) dtype; TypeError otherwise."""
    try:
        array = jnp.asarray(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real array, got {type(value).__name__}") from None
    if not (jnp.issubdtype(array.dtype, jnp.floating) or jnp.issubdtype(array.dtype, jnp.integer)):
        raise TypeError(f"{name} must be a real (integer or floating) array, got dtype "
                        f"{array.dtype}")
    return array


def _check_model(model) -> tuple[int, int]:
    """``(data_dim, latent_dim)`` of a valid :class:`LinearGaussian`."""
    if not isinstance(model, LinearGaussian):
        raise TypeError(f"model must be a LinearGaussian, got {type(model).__name__}")
    weight_shape = jnp.shape(model.weight)
    if len(weight_shape) != 2 or 0 in weight_shape:
        raise ValueError(f"model.weight must have shape [data_dim, latent_dim] (both >= 1), "
                         f"got {list(weight_shape)}")
    data_dim, latent_dim = weight_shape
    if jnp.shape(model.bias) != (data_dim,):
        raise ValueError(f"model.bias must have shape [data_dim={data_dim}], got "
                         f"{list(jnp.shape(model.bias))}")
    check_real(model.noise_scale, "model.noise_scale", exclusive_minimum=0.0, array=True)
    return data_dim, latent_dim


def _check_rows(value, name: str, width: int, width_name: str) -> Array:
    """``value`` as a real ``[batch, width]`` array (ValueError naming ``name`` otherwise)."""
    array = _as_real_array(value, name)
    if array.ndim != 2 or array.shape[1] != width:
        raise ValueError(f"{name} must have shape [batch, {width_name}={width}], got "
                         f"{list(array.shape)}")
    return array


def _check_spd(cov: Array, name: str) -> None:
    """Concrete ``cov`` ``[..., d, d]`` must be finite, symmetric (within sqrt(eps) of its
    largest entry) and positive definite (a Cholesky factorisation in float64 succeeds)."""
    if not is_concrete(cov):
        return
    m = np.asarray(cov, dtype=np.float64)
    if not np.isfinite(m).all():
        raise ValueError(f"{name} must be finite")
    tol = math.sqrt(float(jnp.finfo(jnp.promote_types(cov.dtype, jnp.float32)).eps))
    scale = max(1.0, float(np.abs(m).max())) if m.size else 1.0
    if np.abs(m - np.swapaxes(m, -1, -2)).max(initial=0.0) > tol * scale:
        raise ValueError(f"{name} must be symmetric")
    try:
        np.linalg.cholesky(m)
    except np.linalg.LinAlgError:
        raise ValueError(f"{name} must be symmetric positive definite") from None


# --- the model -------------------------------------------------------------------------------

def random_model(rng_key: Array, latent_dim: int, data_dim: int, *, noise_scale: float = 0.5,
                 dtype=jnp.float32) -> LinearGaussian:
    """A random model with W_ij ~ N(0, 1/latent_dim) and b_i ~ N(0, 1) (i.i.d.).

    The 1/latent_dim variance keeps W z of unit scale per coordinate under the prior
    z ~ N(0, I) (PRML eq. 12.31).

    Args:
      rng_key: PRNG key (``jax.random.key(seed)``).
      latent_dim: d, a Python int >= 1.
      data_dim: D, a Python int >= 1.
      noise_scale: sigma, the observation noise standard deviation, finite and > 0 (checked
        when concrete).
      dtype: floating dtype of the parameters.
    Returns:
      :class:`LinearGaussian` with weight ``[data_dim, latent_dim]``, bias ``[data_dim]`` and
      noise_scale ``[]``, all in ``dtype``.
    Raises:
      TypeError: ``rng_key`` is not a JAX PRNG key (e.g. an int seed); ``latent_dim`` or
        ``data_dim`` is not an int (e.g. ``2.0``); ``noise_scale`` is not a real number;
        ``dtype`` is not a floating dtype.
      ValueError: ``latent_dim`` or ``data_dim`` < 1; ``noise_scale`` not a scalar, or (when
        concrete) not finite and > 0.
    """
    check_rng_key(rng_key)
    latent_dim = check_int(latent_dim, "latent_dim", minimum=1)
    data_dim = check_int(data_dim, "data_dim", minimum=1)
    check_real(noise_scale, "noise_scale", exclusive_minimum=0.0, array=True)
    try:
        dtype = jnp.dtype(dtype)
    except TypeError:
        raise TypeError(f"dtype must be a floating dtype, got {dtype!r}") from None
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"dtype must be a floating dtype, got {dtype}")
    k_w, k_b = jax.random.split(rng_key)
    weight = jax.random.normal(k_w, (data_dim, latent_dim), dtype) / math.sqrt(latent_dim)
    bias = jax.random.normal(k_b, (data_dim,), dtype)
    return LinearGaussian(weight, bias, jnp.asarray(noise_scale, dtype))


def _mvn_diag_log_prob(x: Array, loc: Array, scale: Array) -> Array:
    d = x.shape[-1]
    r = (x - loc) / scale
    return -0.5 * jnp.sum(r * r, axis=-1) - d * jnp.log(scale) - 0.5 * d * math.log(2 * math.pi)


def _check_model_x(model, x) -> tuple[Array, int, int]:
    """``(x, data_dim, latent_dim)`` for a valid ``model`` and ``x`` ``[batch, data_dim]``."""
    data_dim, latent_dim = _check_model(model)
    return _check_rows(x, "x", data_dim, "data_dim"), data_dim, latent_dim


def _check_x_z(model, x, z) -> tuple[Array, Array]:
    x, _, latent_dim = _check_model_x(model, x)
    z = _check_rows(z, "z", latent_dim, "latent_dim")
    if x.shape[0] != z.shape[0]:
        raise ValueError(f"x and z must have the same batch size, got x {list(x.shape)} and "
                         f"z {list(z.shape)}")
    return x, z


def log_likelihood(model: LinearGaussian, x: Array, z: Array) -> Array:
    """log p(x | z) = log N(x; W z + b, sigma^2 I_D) in nats (PRML eq. 12.32).

    Args:
      model: :class:`LinearGaussian`.
      x: ``[batch, data_dim]`` observations.
      z: ``[batch, latent_dim]`` latents, one per row of ``x`` (same batch size).
    Returns:
      ``[batch]`` log-likelihoods in nats, in the floating dtype the inputs promote to.
    Raises:
      TypeError: ``model`` is not a :class:`LinearGaussian`; ``x`` or ``z`` is not a real
        array.
      ValueError: ``x`` is not ``[batch, data_dim]`` or ``z`` not ``[batch, latent_dim]``
        (the model's dimensions), or their batch sizes differ (no broadcasting); the model's
        fields have inconsistent shapes, or (when concrete) ``model.noise_scale`` is not
        finite and > 0.
    """
    x, z = _check_x_z(model, x, z)
    return _log_likelihood(model, x, z)


def _log_likelihood(model: LinearGaussian, x: Array, z: Array) -> Array:
    mean = z @ model.weight.T + model.bias[None, :]
    return _mvn_diag_log_prob(x, mean, model.noise_scale)


def log_joint(model: LinearGaussian, x: Array, z: Array) -> Array:
    """log p(x, z) = log p(x | z) + log N(z; 0, I_d) in nats (PRML eqs. 12.31-12.32).

    Args:
      model: :class:`LinearGaussian`.
      x: ``[batch, data_dim]`` observations.
      z: ``[batch, latent_dim]`` latents (same batch size as ``x``).
    Returns:
      ``[batch]`` log joint densities in nats.
    Raises:
      As :func:`log_likelihood`.
    """
    x, z = _check_x_z(model, x, z)
    d = z.shape[-1]
    log_prior = -0.5 * jnp.sum(z * z, axis=-1) - 0.5 * d * math.log(2 * math.pi)
    return _log_likelihood(model, x, z) + log_prior


def log_marginal(model: LinearGaussian, x: Array) -> Array:
    """Exact evidence log p(x) = log N(x; b, W W^T + sigma^2 I_D) in nats (PRML eqs.
    12.35-12.36), via a Cholesky factor of the D x D covariance.

    Args:
      model: :class:`LinearGaussian`.
      x: ``[batch, data_dim]`` observations.
    Returns:
      ``[batch]`` log p(x_n) in nats.
    Raises:
      TypeError: ``model`` is not a :class:`LinearGaussian`; ``x`` is not a real array.
      ValueError: ``x`` is not ``[batch, data_dim]``; the model's fields have inconsistent
        shapes, or (when concrete) ``model.noise_scale`` is not finite and > 0.
    """
    x, data_dim, _ = _check_model_x(model, x)
    cov = model.weight @ model.weight.T + model.noise_scale**2 * jnp.eye(data_dim, dtype=x.dtype)
    chol = jnp.linalg.cholesky(cov)
    r = jax.scipy.linalg.solve_triangular(chol, (x - model.bias[None, :]).T, lower=True)
    return (
        -0.5 * jnp.sum(r * r, axis=0)
        - jnp.sum(jnp.log(jnp.diagonal(chol)))
        - 0.5 * data_dim * math.log(2 * math.pi)
    )


def posterior(model: LinearGaussian, x: Array) -> tuple[Array, Array]:
    """Exact posterior p(z | x) = N(loc, cov) (PRML eqs. 12.41-12.42):
    cov = sigma^2 M^{-1} = (I_d + W^T W / sigma^2)^{-1} with M = W^T W + sigma^2 I_d, and
    loc = cov W^T (x - b) / sigma^2.

    Args:
      model: :class:`LinearGaussian`.
      x: ``[batch, data_dim]`` observations.
    Returns:
      ``(loc, cov)``: ``loc`` ``[batch, latent_dim]`` posterior means and ``cov``
      ``[latent_dim, latent_dim]``, the posterior covariance shared by every row.
    Raises:
      As :func:`log_marginal`.
    """
    x, _, latent_dim = _check_model_x(model, x)
    s2 = model.noise_scale**2
    precision = jnp.eye(latent_dim, dtype=x.dtype) + model.weight.T @ model.weight / s2
    cov = jnp.linalg.inv(precision)
    loc = (x - model.bias[None, :]) @ model.weight @ cov.T / s2
    return loc, cov


def sample(rng_key: Array, model: LinearGaussian, num: int) -> tuple[Array, Array]:
    """Ancestral samples: z ~ N(0, I_d), then x = W z + b + sigma eps with eps ~ N(0, I_D)
    (PRML eq. 12.33; ancestral sampling, PRML §8.1.2).

    Args:
      rng_key: PRNG key (``jax.random.key(seed)``).
      model: :class:`LinearGaussian`.
      num: number of samples, a Python int >= 1 (static).
    Returns:
      ``(x [num, data_dim], z [num, latent_dim])`` in the dtype of ``model.weight``.
    Raises:
      TypeError: ``rng_key`` is not a JAX PRNG key (e.g. an int seed); ``model`` is not a
        :class:`LinearGaussian`; ``num`` is not an int (e.g. ``2.5``).
      ValueError: ``num`` < 1; the model's fields have inconsistent shapes, or (when
        concrete) ``model.noise_scale`` is not finite and > 0.
    """
    check_rng_key(rng_key)
    data_dim, latent_dim = _check_model(model)
    num = check_int(num, "num", minimum=1)
    k_z, k_x = jax.random.split(rng_key)
    dtype = model.weight.dtype
    z = jax.random.normal(k_z, (num, latent_dim), dtype)
    noise = jax.random.normal(k_x, (num, data_dim), dtype)
    x = z @ model.weight.T + model.bias[None, :] + model.noise_scale * noise
    return x, z


def gaussian_kl(loc_q: Array, cov_q: Array, loc_p: Array, cov_p: Array) -> Array:
    """KL(N(loc_q, cov_q) || N(loc_p, cov_p)) in nats, per row:

        KL = 1/2 [Tr(cov_p^{-1} cov_q) + (loc_p - loc_q)^T cov_p^{-1} (loc_p - loc_q) - d
                  + log|cov_p| - log|cov_q|]

    (Rasmussen & Williams, *Gaussian Processes for Machine Learning*, 2006, eq. A.23).

    Args:
      loc_q: ``[batch, d]`` means of q.
      cov_q: ``[d, d]`` (shared) or ``[batch, d, d]`` covariances of q, symmetric positive
        definite.
      loc_p: ``[batch, d]``, or ``[d]`` shared by every row, means of p.
      cov_p: ``[d, d]`` or ``[batch, d, d]`` covariances of p, symmetric positive definite.
    Returns:
      ``[batch]`` KL divergences in nats (>= 0).
    Raises:
      TypeError: an argument is not a real array.
      ValueError: ``loc_q`` is not 2-D ``[batch, d]``; ``loc_p``, ``cov_q`` or ``cov_p`` has
        a shape other than those above (e.g. another d or batch size); for concrete arrays,
        ``cov_q`` or ``cov_p`` is not finite, not symmetric (within sqrt(eps) of its
        largest entry) or not positive definite. Traced covariances are not inspected: a
        non-positive-definite one then gives NaN.
    """
    loc_q = _as_real_array(loc_q, "loc_q")
    if loc_q.ndim != 2:
        raise ValueError(f"loc_q must have shape [batch, d], got {list(loc_q.shape)}")
    batch, d = loc_q.shape
    loc_p = _as_real_array(loc_p, "loc_p")
    if loc_p.shape not in ((d,), (batch, d)):
        raise ValueError(f"loc_p must have shape [d={d}] or [batch={batch}, d={d}] like loc_q, "
                         f"got {list(loc_p.shape)}")
    covs = []
    for name, cov in (("cov_q", cov_q), ("cov_p", cov_p)):
        cov = _as_real_array(cov, name)
        if cov.shape not in ((d, d), (batch, d, d)):
            raise ValueError(f"{name} must have shape [d, d] or [batch, d, d] with d={d}, "
                             f"batch={batch} (from loc_q), got {list(cov.shape)}")
        _check_spd(cov, name)
        covs.append(cov)
    cov_q, cov_p = covs
    cov_q = jnp.broadcast_to(cov_q, loc_q.shape + (d,))
    cov_p = jnp.broadcast_to(cov_p, loc_q.shape + (d,))
    chol_p = jnp.linalg.cholesky(cov_p)
    solve = jax.vmap(lambda c, b: jax.scipy.linalg.cho_solve((c, True), b))
    trace = jnp.trace(solve(chol_p, cov_q), axis1=-2, axis2=-1)
    diff = loc_p - loc_q
    maha = jnp.sum(diff * solve(chol_p, diff[..., None])[..., 0], axis=-1)
    logdet_p = 2 * jnp.sum(jnp.log(jnp.diagonal(chol_p, axis1=-2, axis2=-1)), axis=-1)
    logdet_q = jnp.linalg.slogdet(cov_q)[1]
    return 0.5 * (trace + maha - d + logdet_p - logdet_q)
