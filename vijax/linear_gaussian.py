"""The linear-Gaussian latent-variable model, whose posterior and evidence are exact.

    z ~ N(0, I_d),    x | z ~ N(W z + b, sigma^2 I_D)

so that p(x) = N(x; b, W W^T + sigma^2 I_D) and the posterior is Gaussian,

    p(z | x) = N(mu, Sigma),  Sigma = (I_d + W^T W / sigma^2)^{-1},  mu = Sigma W^T (x - b) / sigma^2

(probabilistic PCA; Bishop PRML §12.2, eqs. 12.35, 12.42). vijax uses it as ground truth for
its ELBO identities (log p(x) = ELBO + KL(q || p(z|x)); lecture 3 "Variational lower bound")
and gradient estimators: every closed form here is independent of ``vijax.elbo``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

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
    """Parameters of the model."""

    weight: Array  # [data_dim, latent_dim]  W
    bias: Array  # [data_dim]  b
    noise_scale: Array  # []  sigma > 0


def random_model(rng_key: Array, latent_dim: int, data_dim: int, *, noise_scale: float = 0.5,
                 dtype=jnp.float32) -> LinearGaussian:
    """A model with W ~ N(0, 1/latent_dim), b ~ N(0, 1)."""
    k_w, k_b = jax.random.split(rng_key)
    weight = jax.random.normal(k_w, (data_dim, latent_dim), dtype) / math.sqrt(latent_dim)
    bias = jax.random.normal(k_b, (data_dim,), dtype)
    return LinearGaussian(weight, bias, jnp.asarray(noise_scale, dtype))


def _mvn_diag_log_prob(x: Array, loc: Array, scale: Array) -> Array:
    d = x.shape[-1]
    r = (x - loc) / scale
    return -0.5 * jnp.sum(r * r, axis=-1) - d * jnp.log(scale) - 0.5 * d * math.log(2 * math.pi)


def log_likelihood(model: LinearGaussian, x: Array, z: Array) -> Array:
    """log p(x | z) for ``x: [batch, data_dim]``, ``z: [batch, latent_dim]`` -> ``[batch]`` (nats)."""
    mean = z @ model.weight.T + model.bias[None, :]
    return _mvn_diag_log_prob(x, mean, model.noise_scale)


def log_joint(model: LinearGaussian, x: Array, z: Array) -> Array:
    """log p(x, z) = log p(x | z) + log N(z; 0, I), ``[batch]`` (nats)."""
    d = z.shape[-1]
    log_prior = -0.5 * jnp.sum(z * z, axis=-1) - 0.5 * d * math.log(2 * math.pi)
    return log_likelihood(model, x, z) + log_prior


def log_marginal(model: LinearGaussian, x: Array) -> Array:
    """Exact log p(x) = log N(x; b, W W^T + sigma^2 I), ``[batch]`` (nats)."""
    data_dim = x.shape[-1]
    cov = model.weight @ model.weight.T + model.noise_scale**2 * jnp.eye(data_dim, dtype=x.dtype)
    chol = jnp.linalg.cholesky(cov)
    r = jax.scipy.linalg.solve_triangular(chol, (x - model.bias[None, :]).T, lower=True)
    return (
        -0.5 * jnp.sum(r * r, axis=0)
        - jnp.sum(jnp.log(jnp.diagonal(chol)))
        - 0.5 * data_dim * math.log(2 * math.pi)
    )


def posterior(model: LinearGaussian, x: Array) -> tuple[Array, Array]:
    """Exact p(z | x) = N(loc, cov): ``loc: [batch, latent_dim]``, ``cov: [latent_dim, latent_dim]``."""
    latent_dim = model.weight.shape[1]
    s2 = model.noise_scale**2
    precision = jnp.eye(latent_dim, dtype=x.dtype) + model.weight.T @ model.weight / s2
    cov = jnp.linalg.inv(precision)
    loc = (x - model.bias[None, :]) @ model.weight @ cov.T / s2
    return loc, cov


def sample(rng_key: Array, model: LinearGaussian, num: int) -> tuple[Array, Array]:
    """Ancestral samples ``(x [num, data_dim], z [num, latent_dim])``."""
    k_z, k_x = jax.random.split(rng_key)
    latent_dim = model.weight.shape[1]
    dtype = model.weight.dtype
    z = jax.random.normal(k_z, (num, latent_dim), dtype)
    noise = jax.random.normal(k_x, (num, model.weight.shape[0]), dtype)
    x = z @ model.weight.T + model.bias[None, :] + model.noise_scale * noise
    return x, z


def gaussian_kl(loc_q: Array, cov_q: Array, loc_p: Array, cov_p: Array) -> Array:
    """KL(N(loc_q, cov_q) || N(loc_p, cov_p)) in nats; ``loc: [batch, d]``, ``cov: [..., d, d]``
    (``cov`` may be shared ``[d, d]`` or per example ``[batch, d, d]``)."""
    d = loc_q.shape[-1]
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
