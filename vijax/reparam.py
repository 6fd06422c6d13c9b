"""The reparameterization trick, with log q(z) by change of variables.

z = g(eps; phi) with eps ~ r(eps) a fixed base density, so E_q[f(z)] = E_r[f(g(eps; phi))]
and gradients flow through g (lecture 3, "Reparametrization trick"; CENG796 notes §4.2).
The density of z follows from the change of variables (lecture 3, "Second term"):

    log q(z) = log r(eps) - log |det dg/deps|.

* ``sample_diag_gaussian``: z = loc + scale * eps, log q = log N(eps; 0, I) - sum_i log scale_i.
* ``sample_full_gaussian``: z = loc + L eps (L lower-triangular Cholesky factor),
  log q = log N(eps; 0, I) - sum_i log |L_ii|.
* ``sample_transformed``: any distrax base distribution and bijector.

Each returns ``(z, log_q)``; ``log_q`` is in nats and equals distrax's ``log_prob(z)``.
"""

from __future__ import annotations

import math
from typing import Sequence

import distrax
import jax
import jax.numpy as jnp

from vijax import _q
from vijax._checks import check_int_sequence, check_rng_key, is_concrete

Array = jax.Array

__all__ = ["sample_diag_gaussian", "sample_full_gaussian", "sample_transformed"]


def _check_floating(x: Array, name: str) -> Array:
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"`{name}` must be a floating-point array; got dtype {x.dtype}")
    if x.ndim < 1:
        raise ValueError(f"`{name}` must have at least one (event) axis; got a scalar")
    _q.check_finite(x, name)
    return x


def _std_normal_log_prob(eps: Array) -> Array:
    """log N(eps; 0, I) summed over the last axis."""
    d = eps.shape[-1]
    return -0.5 * jnp.sum(eps * eps, axis=-1) - 0.5 * d * math.log(2.0 * math.pi)


def _lead(x: Array, n: int) -> Array:
    """``x`` with ``n`` leading singleton axes (explicit broadcasting, no rank promotion)."""
    return x.reshape((1,) * n + x.shape)


def sample_diag_gaussian(
    rng_key: Array, loc: Array, scale: Array, *, sample_shape: Sequence[int] = ()
) -> tuple[Array, Array]:
    """z = loc + scale * eps, eps ~ N(0, I), and log q(z) by change of variables.

    log q(z) = log N(eps; 0, I) - sum_i log scale_i: lecture 3, "Variational assumption"
    (z = sigma * eps + mu) and "Second term" (log q = log r(eps) - sum_i log sigma_i);
    CENG796 notes §4.2.

    Args:
      rng_key: a JAX PRNG key.
      loc: ``[*batch, latent_dim]`` means.
      scale: ``[*batch, latent_dim]`` positive standard deviations (same shape as ``loc``),
        each at least the smallest normal number of its dtype (``jnp.finfo(dtype).tiny``,
        1.2e-38 in float32): a denormal scale is flushed to zero on CPU. The same rule as for
        the scales of a ``q`` in :mod:`vijax.elbo`.
      sample_shape: leading sample axes ``S``, a tuple of Python/NumPy ints >= 0.

    Returns:
      ``z``: ``[*S, *batch, latent_dim]``, dtype of ``loc`` (promoted with ``scale``'s if they
      differ); ``log_q``: ``[*S, *batch]``, log q(z) itself in nats (not its negative).

    Raises:
      TypeError: ``rng_key`` not a JAX PRNG key; non-floating ``loc``/``scale``;
        ``sample_shape`` not a sequence of ints (a float such as 2.5, or a bool, included).
      ValueError: shape mismatch; concrete non-finite ``loc``/``scale``, or a ``scale`` entry
        below ``jnp.finfo(dtype).tiny`` (zero, negative or denormal); a negative
        ``sample_shape`` entry.
    """
    check_rng_key(rng_key)
    loc = _check_floating(loc, "loc")
    scale = _check_floating(scale, "scale")
    if loc.shape != scale.shape:
        raise ValueError(f"`loc` and `scale` must have the same shape; got {loc.shape} and {scale.shape}")
    _q.check_scale_values(scale, "`scale`")
    sample_shape = check_int_sequence(sample_shape, "`sample_shape`", minimum=0)
    n = len(sample_shape)
    eps = jax.random.normal(rng_key, sample_shape + loc.shape, dtype=loc.dtype)
    z = _lead(loc, n) + _lead(scale, n) * eps
    log_q = _std_normal_log_prob(eps) - _lead(jnp.sum(jnp.log(scale), axis=-1), n)
    return z, log_q


def sample_full_gaussian(
    rng_key: Array, loc: Array, scale_tril: Array, *, sample_shape: Sequence[int] = ()
) -> tuple[Array, Array]:
    """z = loc + L eps, eps ~ N(0, I), L lower-triangular (covariance L L^T); log q by change
    of variables, log q(z) = log N(eps; 0, I) - sum_i log |L_ii|.

    Source: lecture 3, "Reparametrization trick" and "Second term" (there for diagonal sigma;
    here |det dz/deps| = |det L| = prod_i |L_ii| since L is triangular); CENG796 notes §4.2.

    Args:
      rng_key: a JAX PRNG key.
      loc: ``[*batch, latent_dim]``.
      scale_tril: ``[*batch, latent_dim, latent_dim]`` Cholesky factor (upper triangle ignored),
        non-zero diagonal: every |L_ii| at least ``jnp.finfo(dtype).tiny`` (not denormal).
      sample_shape: leading sample axes ``S``, a tuple of Python/NumPy ints >= 0.

    Returns:
      ``z``: ``[*S, *batch, latent_dim]``, dtype of ``loc`` (promoted with ``scale_tril``'s if
      they differ); ``log_q``: ``[*S, *batch]``, log q(z) itself in nats (not its negative),
      same dtype.

    Raises:
      TypeError: ``rng_key`` not a JAX PRNG key; non-floating inputs; ``sample_shape`` not a
        sequence of ints (a float such as 2.5, or a bool, included).
      ValueError: shape mismatch; concrete non-finite inputs or a zero (or denormal) entry on
        L's diagonal; a negative ``sample_shape`` entry.
    """
    check_rng_key(rng_key)
    loc = _check_floating(loc, "loc")
    scale_tril = _check_floating(scale_tril, "scale_tril")
    if scale_tril.shape != loc.shape + loc.shape[-1:]:
        raise ValueError(
            f"`scale_tril` must have shape {loc.shape + loc.shape[-1:]} to match `loc`; "
            f"got {scale_tril.shape}"
        )
    diag = jnp.diagonal(scale_tril, axis1=-2, axis2=-1)
    if is_concrete(diag):
        _q.check_scale_values(jnp.abs(diag), "`scale_tril` must have a non-zero diagonal (it "
                              "is singular otherwise): the absolute values of its diagonal")
    sample_shape = check_int_sequence(sample_shape, "`sample_shape`", minimum=0)
    n = len(sample_shape)
    eps = jax.random.normal(rng_key, sample_shape + loc.shape, dtype=loc.dtype)
    tril = jnp.tril(scale_tril)
    z = _lead(loc, n) + jnp.einsum("...ij,...j->...i", _lead(tril, n), eps)
    log_q = _std_normal_log_prob(eps) - _lead(jnp.sum(jnp.log(jnp.abs(diag)), axis=-1), n)
    return z, log_q


def sample_transformed(
    rng_key: Array,
    base: distrax.Distribution,
    bijector: distrax.Bijector,
    *,
    sample_shape: Sequence[int] = (),
) -> tuple[Array, Array]:
    """z = g(eps), eps ~ base, for any distrax bijector g; log q(z) = log r(eps) - log|det J_g|.

    Source: lecture 3, "Second term" (change of variables, q(z) = r(eps) |d eps / dz|) and
    "Reparametrization trick" (eta = g(xi, eps)); CENG796 notes §4.2.

    Args:
      rng_key: a JAX PRNG key.
      base: the base distribution r (reparameterizable for pathwise gradients).
      bijector: g, a ``distrax.Bijector`` (e.g. ``distrax.Block(distrax.Tanh(), 1)``).
      sample_shape: leading sample axes ``S``, a tuple of Python/NumPy ints >= 0.

    Returns:
      ``z``: ``[*S, *batch, *event]``; ``log_q``: ``[*S, *batch]``, log q(z) itself in nats
      (not its negative), equal to ``distrax.Transformed(base, bijector).log_prob(z)``.

    Raises:
      TypeError: ``rng_key`` not a single JAX PRNG key; ``base`` not a distrax distribution
        (or a Gaussian one with non-floating ``loc``/``scale``) or ``bijector`` not a distrax
        bijector; ``sample_shape`` not a sequence of ints (a float
        such as 2.5, or a bool, included).
      ValueError: ``bijector.event_ndims_in`` differs from the rank of ``base``'s event shape
        (an element-wise bijector such as ``distrax.Tanh()`` on a vector base needs
        ``distrax.Block``); concrete non-finite parameters of ``base``, or a concrete Gaussian
        scale of ``base`` below ``jnp.finfo(dtype).tiny`` (not positive, or denormal); a
        negative ``sample_shape`` entry.
    """
    check_rng_key(rng_key)
    if not isinstance(base, distrax.Distribution):
        raise TypeError(f"`base` must be a distrax.Distribution; got {type(base).__name__}")
    if not isinstance(bijector, distrax.Bijector):
        raise TypeError(f"`bijector` must be a distrax.Bijector; got {type(bijector).__name__}")
    if bijector.event_ndims_in != len(base.event_shape):
        raise ValueError(
            f"`bijector` acts on events of {bijector.event_ndims_in} dimension(s) but `base` has "
            f"event shape {tuple(base.event_shape)}; wrap an element-wise bijector as "
            f"distrax.Block(bijector, {len(base.event_shape)})"
        )
    _q.check_parameters(base, "base")
    sample_shape = check_int_sequence(sample_shape, "`sample_shape`", minimum=0)
    with jax.numpy_rank_promotion("allow"):  # distrax broadcasts [*S, *batch] implicitly
        eps, log_r = base.sample_and_log_prob(seed=rng_key, sample_shape=sample_shape)
    z, log_det = bijector.forward_and_log_det(eps)
    return z, log_r - log_det
