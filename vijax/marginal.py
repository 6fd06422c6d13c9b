"""Estimators of the marginal log-likelihood log p(x) (in nats).

Both estimators average K unnormalised weights w_k and return log (1/K) sum_k w_k, computed
stably with logsumexp. Their *exponent* is unbiased for p(x); the log is biased downwards
(Jensen), which is why the importance-sampling value is also the IWAE lower bound.

* ``naive_monte_carlo``: w_k = p(x | z_k), z_k ~ p(z) (CENG796 notes §3.2 "Naive Monte
  Carlo"). Unbiased for p(x) but hopeless in high dimension: almost no prior sample explains x.
* ``importance_sampling``: w_k = p(x, z_k) / q(z_k), z_k ~ q (CENG796 notes §3.2
  "Importance Sampling"; Burda et al. 2016, eq. 8). Equal in value to
  ``vijax.elbo.iwae_bound`` at the same K and key.
* ``importance_log_weights``: the K log weights of ``importance_sampling`` themselves,
  ``[K, batch]``, for diagnostics that need all of them (Pareto k-hat, ``vijax.ais``).

Samples are drawn ``chunk_size`` at a time inside ``lax.scan`` with a running logsumexp, so
memory grows with ``chunk_size x batch``, not ``num_samples x batch``: K = 5000 over 10,000
examples runs in bounded memory. To bound memory over examples as well, call on batches of
examples (``jax.lax.map`` over example batches).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

from vijax import _q
from vijax._checks import check_int

Array = jax.Array
PyTree = Any

__all__ = ["importance_sampling", "naive_monte_carlo", "log_mean_exp_chunked",
           "importance_log_weights"]


def log_mean_exp_chunked(
    rng_key: Array,
    log_weight_fn: Callable[[Array], Array],
    *,
    num_samples: int,
    chunk_size: int | None = None,
) -> Array:
    """log (1/K) sum_k exp(log_weight_fn(key_k)) over K = ``num_samples`` independent keys.

    ``log_weight_fn(key) -> [batch]`` gives one sample's log weight. The K samples are drawn
    ``chunk_size`` at a time (``vmap`` inside a chunk, ``lax.scan`` across chunks, a final
    partial chunk if ``chunk_size`` does not divide K), keeping a running logsumexp.
    The result does not depend on ``chunk_size`` beyond float rounding: sample k always uses
    the k-th key of ``jax.random.split(rng_key, K)`` (``rng_key`` itself for K = 1).

    Returns:
      ``[batch]`` log-mean-exp of the weights (nats), dtype of ``log_weight_fn``'s output.

    Raises:
      TypeError: ``rng_key`` not a JAX PRNG key (e.g. an int seed); ``log_weight_fn`` not
        callable.
      TypeError / ValueError: ``num_samples`` or ``chunk_size`` not a positive int.
    """
    num_samples = _q.check_estimator_call(rng_key, log_weight_fn, "log_weight_fn", num_samples)
    chunk_size = check_int(chunk_size, "`chunk_size`", minimum=1, optional=True)
    chunk = num_samples if chunk_size is None else min(chunk_size, num_samples)
    keys = _q.sample_keys(rng_key, num_samples)
    num_full, remainder = divmod(num_samples, chunk)

    def chunk_lse(chunk_keys):
        return jax.nn.logsumexp(jax.vmap(log_weight_fn)(chunk_keys), axis=0)

    full_keys = keys[: num_full * chunk].reshape((num_full, chunk) + keys.shape[1:])
    if num_full == 1:
        total = chunk_lse(full_keys[0])
    else:
        first = chunk_lse(full_keys[0])

        def body(running, chunk_keys):
            return jnp.logaddexp(running, chunk_lse(chunk_keys)), None

        total, _ = jax.lax.scan(body, first, full_keys[1:])
    if remainder:
        total = jnp.logaddexp(total, chunk_lse(keys[num_full * chunk :]))
    return total - math.log(num_samples)


def importance_sampling(
    rng_key: Array,
    log_joint_fn: Callable[[PyTree], Array],
    q: PyTree,
    *,
    num_samples: int,
    chunk_size: int | None = None,
) -> Array:
    """Importance-sampling estimate of log p(x) with proposal q (in nats).

    log p^(x) = log (1/K) sum_k p(x, z_k) / q(z_k), z_k ~ q. exp of it is unbiased for p(x);
    the log is a stochastic lower bound equal in value to ``vijax.elbo.iwae_bound`` with the same
    ``rng_key`` and K (CENG796 notes §3.2; Burda et al. 2016, eq. 8).

    Args:
      rng_key: a JAX PRNG key.
      log_joint_fn: ``z -> log p(x, z)``, ``[batch, latent_dim] -> [batch]`` for one sample.
      q: proposal, a distrax distribution (batch ``[batch]``) or pytree of them.
      num_samples: K >= 1.
      chunk_size: samples drawn at once (memory ~ ``chunk_size x batch x latent_dim``);
        ``None`` draws all K at once.

    Returns:
      ``[batch]`` log p(x) estimates (nats): the stochastic lower bound itself, not its
      negative.

    Raises:
      TypeError: ``rng_key`` not a JAX PRNG key; ``log_joint_fn`` not callable.
      TypeError / ValueError: bad ``num_samples``/``chunk_size``/``q`` (as
        ``vijax.elbo.elbo``); ``log_joint_fn`` output not ``[batch]`` (q's batch shape).
    """
    _q.check_estimator_call(rng_key, log_joint_fn, "log_joint_fn")
    log_weight = _importance_log_weight_fn(log_joint_fn, q)
    return log_mean_exp_chunked(rng_key, log_weight, num_samples=num_samples, chunk_size=chunk_size)


def _importance_log_weight_fn(log_joint_fn, q) -> Callable[[Array], Array]:
    """``key -> log p(x, z) - log q(z)`` at ``z ~ q`` drawn with ``key``, ``[batch]`` (checks q)."""
    shape = _q.check_q(q)

    def log_weight(key):
        z, log_q = _q.sample_and_log_prob(key, q)  # no bijector inverse: finite for a saturated Tanh
        return _q.call_log_density(log_joint_fn, z, shape, "log_joint_fn", q) - log_q

    return log_weight


def importance_log_weights(
    rng_key: Array,
    log_joint_fn: Callable[[PyTree], Array],
    q: PyTree,
    *,
    num_samples: int,
    chunk_size: int | None = None,
) -> Array:
    """All K importance log weights log w_k = log p(x, z_k) - log q(z_k), z_k ~ q (nats).

    The samples of :func:`importance_sampling` with the same ``rng_key`` (sample k uses the
    k-th key of ``jax.random.split(rng_key, K)``, ``rng_key`` itself for K = 1):
    ``logsumexp(log_w, axis=0) - log K`` equals
    its estimate up to float rounding. For diagnostics that need every weight, such as the
    Pareto k-hat (``vijax.ais.psis_khat``). Computed ``chunk_size`` samples at a time
    (``lax.map``); the result itself holds ``num_samples x batch`` floats.

    Args:
      rng_key, log_joint_fn, q, num_samples, chunk_size: as :func:`importance_sampling`.

    Returns:
      ``[num_samples, *batch]`` log weights (nats).

    Raises:
      TypeError / ValueError: as :func:`importance_sampling`.
    """
    num_samples = _q.check_estimator_call(rng_key, log_joint_fn, "log_joint_fn", num_samples)
    chunk_size = check_int(chunk_size, "`chunk_size`", minimum=1, optional=True)
    log_weight = _importance_log_weight_fn(log_joint_fn, q)
    keys = _q.sample_keys(rng_key, num_samples)
    chunk = num_samples if chunk_size is None else min(chunk_size, num_samples)
    return jax.lax.map(log_weight, keys, batch_size=chunk)


def naive_monte_carlo(
    rng_key: Array,
    log_likelihood_fn: Callable[[PyTree], Array],
    prior: PyTree,
    *,
    num_samples: int,
    chunk_size: int | None = None,
) -> Array:
    """Naive Monte Carlo estimate of log p(x): log (1/K) sum_k p(x | z_k), z_k ~ p(z) (nats).

    CENG796 notes §3.2 "Naive Monte Carlo". exp of it is unbiased for p(x), with a variance that
    explodes with the latent dimension; prefer ``importance_sampling``.

    Args:
      rng_key: a JAX PRNG key.
      log_likelihood_fn: ``z -> log p(x | z)`` for one prior sample, returning ``[batch]``.
      prior: p(z), a distrax distribution (or pytree). Batch shape ``[batch]`` draws an
        independent z per example; batch shape ``[]`` shares each z_k across the examples
        (still unbiased per example).
      num_samples: K >= 1.
      chunk_size: samples drawn at once; ``None`` draws all K at once.

    Returns:
      ``[batch]`` log p(x) estimates (nats), an estimate of log p(x) itself (not its negative;
      a lower bound in expectation). ``[batch]`` is prior's batch shape, or, for a prior of
      batch shape ``[]``, whatever shape ``log_likelihood_fn`` returns.

    Raises:
      TypeError: ``rng_key`` not a JAX PRNG key; ``log_likelihood_fn`` not callable.
      TypeError / ValueError: bad ``num_samples``/``chunk_size``/``prior`` (as ``q`` in
        ``vijax.elbo.elbo``).
      ValueError: for a prior with a non-empty batch shape, ``log_likelihood_fn`` output not
        of that shape (checked at trace time, as ``importance_sampling`` checks
        ``log_joint_fn``).
    """
    _q.check_estimator_call(rng_key, log_likelihood_fn, "log_likelihood_fn")
    shape = _q.check_q(prior, "prior")
    expected = shape if shape else None  # a batch-[] prior is shared: any output shape

    def log_weight(key):
        return _q.call_log_density(log_likelihood_fn, _q.sample(key, prior), expected,
                                   "log_likelihood_fn", prior, "prior")

    return log_mean_exp_chunked(rng_key, log_weight, num_samples=num_samples, chunk_size=chunk_size)
