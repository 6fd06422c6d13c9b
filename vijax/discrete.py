"""Discrete latent variables: Concrete (Gumbel-softmax) relaxations and straight-through draws.

A discrete latent has no pathwise gradient. Three ways around it, all usable as ``q`` (and the
relaxed ones as priors) in every ``vijax.elbo`` objective:

* ``RelaxedOneHotCategorical(temperature, logits)``: the Concrete distribution on the simplex
  (Maddison, Mnih & Teh 2017, "The Concrete Distribution", eq. 10 for the density; Jang, Gu &
  Poole 2017, "Categorical Reparameterization with Gumbel-Softmax", eq. 2 for the sampler):
  x = softmax((logits + G) / temperature), G i.i.d. Gumbel(0, 1). A reparameterized
  continuous relaxation: the ELBO of a relaxed model, with pathwise, STL and DReG gradients.
* ``RelaxedBernoulli(temperature, logits)``: the binary Concrete (Maddison et al. 2017, eq. 21):
  x = sigmoid((logits + L) / temperature), L ~ Logistic(0, 1).
* ``StraightThroughOneHotCategorical(temperature, logits)``: the forward value is the *hard*
  one-hot argmax of the relaxed draw (an exact categorical sample), the backward pass is the
  relaxed draw's gradient (Jang et al. 2017, §2.2, "Straight-Through Gumbel-Softmax"). Its
  ``log_prob`` is the categorical one. The gradient is **biased**.

Sampling is done in log space (log x = log_softmax((logits + G) / temperature)), so low
temperatures and logits of +-100 keep finite values; ``log_prob`` of a relaxed sample is
computed from log x, which ``sample_and_log_prob`` passes on without rounding x first.

Exact enumeration (E_q f = sum_z q(z) f(z)) for small discrete supports is
``vijax.elbo.Enumerate()``.
"""

from __future__ import annotations

import math
from typing import Any

import distrax
import jax
import jax.numpy as jnp
import numpy as np

from vijax._checks import check_real

Array = jax.Array

__all__ = ["RelaxedOneHotCategorical", "RelaxedBernoulli", "StraightThroughOneHotCategorical"]


def _check_temperature(temperature: Any) -> Array:
    """``temperature`` as a float array: a concrete scalar must be finite and > 0; an array
    (also traced, e.g. an annealing schedule inside ``jit``) must be real, checked when
    concrete."""
    if isinstance(temperature, (bool, np.bool_)):
        raise TypeError("`temperature` must be a real number > 0, got a bool")
    if isinstance(temperature, (int, float, np.integer, np.floating)):
        check_real(temperature, "`temperature`", exclusive_minimum=0.0)
        return jnp.asarray(temperature, jnp.result_type(float))
    dtype = getattr(temperature, "dtype", None)
    if dtype is None or not (jnp.issubdtype(dtype, jnp.floating)
                             or jnp.issubdtype(dtype, jnp.integer)):
        raise TypeError(f"`temperature` must be a real number or array > 0, got "
                        f"{type(temperature).__name__}")
    if not isinstance(temperature, jax.core.Tracer):
        arr = np.asarray(temperature)
        if not np.all(np.isfinite(arr)) or np.any(arr <= 0):
            raise ValueError("`temperature` must be finite and > 0 everywhere")
    return jnp.asarray(temperature)


def _check_logits(logits: Any) -> Array:
    dtype = getattr(logits, "dtype", None)
    if isinstance(logits, (bool, np.bool_)) or (dtype is not None
                                                and not jnp.issubdtype(dtype, jnp.floating)
                                                and not jnp.issubdtype(dtype, jnp.integer)):
        raise TypeError("`logits` must be a real array")
    logits = jnp.asarray(logits)
    if not jnp.issubdtype(logits.dtype, jnp.floating):
        logits = logits.astype(jnp.result_type(float))
    if not isinstance(logits, jax.core.Tracer) and not np.all(np.isfinite(np.asarray(logits))):
        raise ValueError("`logits` contains non-finite values (NaN or inf)")
    return logits


class _Relaxed(distrax.Distribution):
    """What the relaxed distributions share: ``temperature`` and ``logits`` (stored by the
    subclass's ``__init__`` as ``_temperature``, ``_logits`` and ``_batch_shape``), broadcast
    to the batch shape (the logits also to the event shape)."""

    @property
    def batch_shape(self):
        return self._batch_shape

    @property
    def temperature(self) -> Array:
        return jnp.broadcast_to(self._temperature, self._batch_shape)

    @property
    def logits(self) -> Array:
        return jnp.broadcast_to(self._logits, self._batch_shape + self.event_shape)


class RelaxedOneHotCategorical(_Relaxed):
    """Concrete / Gumbel-softmax distribution over the probability simplex.

    Args:
      temperature: lambda > 0, a number or an array broadcastable to the batch shape (it may be
        traced, for annealing).
      logits: ``[*batch, K]`` unnormalised log class probabilities (K >= 2).

    Event shape ``[K]``, batch shape ``logits.shape[:-1]`` broadcast with ``temperature``'s.
    As lambda -> 0 draws approach one-hot vectors with P(argmax = k) = softmax(logits)_k
    exactly at every lambda (Maddison et al. 2017, Proposition 1).

    Density (Maddison et al. 2017, eq. 10), for x in the open simplex:
    log p(x) = log (K-1)! + (K-1) log lambda + sum_k [logits_k - (lambda + 1) log x_k]
    - K logsumexp_k(logits_k - lambda log x_k), in nats, with respect to the Lebesgue measure
    on the first K - 1 coordinates.

    Raises:
      TypeError / ValueError: ``temperature`` not a real > 0 (checked when concrete);
        ``logits`` not real, non-finite (when concrete) or of rank 0 / with K < 2.
    """

    def __init__(self, temperature: Any, logits: Any):
        super().__init__()
        self._temperature = _check_temperature(temperature)
        logits = _check_logits(logits)
        if logits.ndim < 1 or logits.shape[-1] < 2:
            raise ValueError(f"`logits` must have shape [*batch, K] with K >= 2, got "
                             f"{tuple(logits.shape)}")
        self._logits = logits
        self._batch_shape = jax.lax.broadcast_shapes(self._temperature.shape, logits.shape[:-1])

    @property
    def event_shape(self):
        return (self._logits.shape[-1],)

    def _log_sample(self, key, n: int) -> Array:
        """log x for n draws, ``[n, *batch, K]`` (log-space Gumbel-softmax)."""
        logits = self.logits
        gumbel = jax.random.gumbel(key, (n,) + logits.shape, logits.dtype)
        temperature = self.temperature[None, ..., None]
        return jax.nn.log_softmax((logits[None] + gumbel) / temperature, axis=-1)

    def _log_prob_from_log_x(self, log_x: Array) -> Array:
        k = self.event_shape[0]
        lam = self.temperature
        logits = jax.nn.log_softmax(self.logits, axis=-1)  # invariant to a shift of the logits
        with jax.numpy_rank_promotion("allow"):
            inner = logits - lam[..., None] * log_x
            return (math.lgamma(k) + (k - 1) * jnp.log(lam)
                    + jnp.sum(logits - (lam[..., None] + 1) * log_x, axis=-1)
                    - k * jax.nn.logsumexp(inner, axis=-1))

    def _sample_n(self, key, n: int) -> Array:
        return jnp.exp(self._log_sample(key, n))

    def _sample_n_and_log_prob(self, key, n: int):
        log_x = self._log_sample(key, n)
        return jnp.exp(log_x), self._log_prob_from_log_x(log_x)

    def log_prob(self, value: Array) -> Array:
        """log p(x) in nats for x on the simplex (``[*batch, K]``, broadcastable).

        A coordinate that is exactly 0 (a low-temperature draw whose exp(log x) underflowed)
        is read as the dtype's smallest normal number, so the density stays finite; the exact
        value is available from ``sample_and_log_prob``, which never rounds x."""
        value = jnp.asarray(value)
        tiny = jnp.finfo(value.dtype).tiny if jnp.issubdtype(value.dtype, jnp.floating) else 0
        return self._log_prob_from_log_x(jnp.log(jnp.maximum(value, tiny)))

    def probs(self) -> Array:
        """softmax(logits): the class probabilities of the limiting categorical."""
        return jax.nn.softmax(self.logits, axis=-1)


class RelaxedBernoulli(_Relaxed):
    """Binary Concrete distribution on (0, 1) (Maddison et al. 2017, eq. 21).

    Args:
      temperature: lambda > 0 (number or array broadcastable to the batch shape; may be traced).
      logits: ``[*batch]`` log-odds.

    Event shape ``[]`` (wrap in ``distrax.Independent`` for a vector of bits). As lambda -> 0
    draws approach {0, 1} with P(x > 1/2) = sigmoid(logits) exactly at every lambda.

    log p(x) = log lambda + logits - (lambda + 1)(log x + log(1 - x))
    - 2 log(exp(logits - lambda log x) + exp(-lambda log(1 - x))), in nats.

    Raises:
      TypeError / ValueError: as :class:`RelaxedOneHotCategorical` (no event axis needed).
    """

    def __init__(self, temperature: Any, logits: Any):
        super().__init__()
        self._temperature = _check_temperature(temperature)
        self._logits = _check_logits(logits)
        self._batch_shape = jax.lax.broadcast_shapes(self._temperature.shape, self._logits.shape)

    @property
    def event_shape(self):
        return ()

    def _pre_sigmoid(self, key, n: int) -> Array:
        logits = self.logits
        noise = jax.random.logistic(key, (n,) + logits.shape, logits.dtype)
        return (logits[None] + noise) / self.temperature[None]

    def _log_prob_from_pre_sigmoid(self, y: Array) -> Array:
        # log x = log_sigmoid(y), log(1 - x) = log_sigmoid(-y): finite for |y| large
        return self._log_prob_from_logs(jax.nn.log_sigmoid(y), jax.nn.log_sigmoid(-y))

    def _log_prob_from_logs(self, log_x: Array, log_1mx: Array) -> Array:
        lam, logits = self.temperature, self.logits
        with jax.numpy_rank_promotion("allow"):  # values may carry sample axes [n, *batch]
            return (jnp.log(lam) + logits - (lam + 1) * (log_x + log_1mx)
                    - 2 * jnp.logaddexp(logits - lam * log_x, -lam * log_1mx))

    def _sample_n(self, key, n: int) -> Array:
        return jax.nn.sigmoid(self._pre_sigmoid(key, n))

    def _sample_n_and_log_prob(self, key, n: int):
        y = self._pre_sigmoid(key, n)
        return jax.nn.sigmoid(y), self._log_prob_from_pre_sigmoid(y)

    def log_prob(self, value: Array) -> Array:
        """log p(x) in nats for x in (0, 1) (an x rounded to exactly 0 or 1 is read as the
        nearest representable interior point, as in :class:`RelaxedOneHotCategorical`)."""
        value = jnp.asarray(value)
        tiny = jnp.finfo(value.dtype).tiny if jnp.issubdtype(value.dtype, jnp.floating) else 0
        return self._log_prob_from_logs(jnp.log(jnp.maximum(value, tiny)),
                                        jnp.log(jnp.maximum(1 - value, tiny)))

    def probs(self) -> Array:
        """sigmoid(logits): P(x > 1/2), the limiting Bernoulli's probability of 1."""
        return jax.nn.sigmoid(self.logits)


class StraightThroughOneHotCategorical(RelaxedOneHotCategorical):
    """One-hot categorical draws with the straight-through Gumbel-softmax gradient.

    The sample is ``hard + y - stop_gradient(y)``: in value the exact one-hot argmax of the
    relaxed draw y (an exact sample of OneHotCategorical(logits), by the Gumbel-max trick), in
    gradient that of y (Jang et al. 2017, §2.2). ``log_prob`` is the categorical log
    probability sum_k x_k log softmax(logits)_k of a one-hot x, so the ELBO *value* is the
    discrete model's. The gradient is biased (it is the relaxed model's gradient evaluated at a
    hard sample); prefer ``ScoreFunction(LeaveOneOut())`` or ``Enumerate()`` where the bias
    matters.

    Args and Raises: as :class:`RelaxedOneHotCategorical`.
    """

    def _sample_n(self, key, n: int) -> Array:
        y = jnp.exp(self._log_sample(key, n))
        hard = jax.nn.one_hot(jnp.argmax(y, axis=-1), y.shape[-1], dtype=y.dtype)
        return hard + (y - jax.lax.stop_gradient(y))  # exactly one-hot in value

    def _sample_n_and_log_prob(self, key, n: int):
        x = self._sample_n(key, n)
        return x, self.log_prob(x)

    def log_prob(self, value: Array) -> Array:
        """Categorical log probability (nats) of a one-hot ``value``."""
        log_p = jax.nn.log_softmax(self.logits, axis=-1)
        with jax.numpy_rank_promotion("allow"):
            return jnp.sum(jnp.where(value != 0, value * log_p, 0.0), axis=-1)

    def probs(self) -> Array:
        return jax.nn.softmax(self.logits, axis=-1)
