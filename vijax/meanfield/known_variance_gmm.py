"""The known-variance Bayesian mixture of Blei, Kucukelbir & McAuliffe (2017), Algorithm 2.

Source: D. M. Blei, A. Kucukelbir, J. D. McAuliffe, "Variational Inference: A Review for
Statisticians", JASA 2017, §3 (model eqs 7-9, CAVI updates eqs 17-20 / Algorithm 2, ELBO
eq. 21). Mean-field block optimum: lecture 3, "Mean field approximation".

Model (the paper's unit-variance mixture, generalised to D dimensions and a known noise
variance ``s_x^2``; ``noise_variance = 1`` is the paper exactly)::

    mu_k ~ N(0, sigma^2 I_D),  k = 1..K
    c_i  ~ Cat(1/K, ..., 1/K)
    x_i | c_i, mu ~ N(mu_{c_i}, s_x^2 I_D)

Variational family: q(mu_k) = N(m_k, s_k^2 I_D), q(c_i) = Cat(phi_i).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from vijax._checks import check_num_components, check_rng_key
from vijax.meanfield._cavi import CAVIInfo, cavi, sweep
from vijax.meanfield._common import (
    categorical_elbo_term,
    categorical_update,
    check_data,
    check_field_shapes,
    check_responsibilities,
    check_scalar,
    check_state_type,
    check_state_values,
    mixture_num_components,
    unpack_data,
)

Array = jax.Array

_LOG_2PI = math.log(2.0 * math.pi)


class KnownVarianceGMMPrior(NamedTuple):
    """Hyper-parameters of the model (both variances known, in squared data units)."""

    prior_variance: Array | float  # [] sigma^2 > 0: prior variance of each mean coordinate
    noise_variance: Array | float = 1.0  # [] s_x^2 > 0: likelihood variance (1 in the paper)


class KnownVarianceGMMState(NamedTuple):
    """Variational parameters (Blei et al. 2017 notation)."""

    responsibilities: Array  # [N, K] phi_ik = q(c_i = k)
    loc: Array  # [K, D] m_k, mean of q(mu_k)
    variance: Array  # [K] s_k^2, per-coordinate variance of q(mu_k)


class KnownVarianceGMMInfo(NamedTuple):
    """Per-iteration information from :func:`step`."""

    elbo: Array  # [] ELBO (Blei et al. 2017 eq. 21; the ELBO, not its negative) in nats
    #   after the sweep, dtype of x


def _prior_as(prior: KnownVarianceGMMPrior, dtype) -> KnownVarianceGMMPrior:
    if not isinstance(prior, KnownVarianceGMMPrior):
        raise TypeError(f"prior must be a KnownVarianceGMMPrior, got {type(prior).__name__}")
    return KnownVarianceGMMPrior(
        prior_variance=check_scalar(prior.prior_variance, "prior.prior_variance", dtype,
                                    exclusive_minimum=0.0),
        noise_variance=check_scalar(prior.noise_variance, "prior.noise_variance", dtype,
                                    exclusive_minimum=0.0),
    )


def _checked(x, prior):
    x = check_data(x, "x", ndim=2)
    return x, _prior_as(prior, x.dtype)


def _check_state(state: KnownVarianceGMMState, x: Array, *, responsibilities: bool = False
                 ) -> KnownVarianceGMMState:
    """Type and shapes of ``state`` against ``x``, and for concrete values ``loc`` finite,
    ``variance`` > 0 (and, with ``responsibilities``, row-stochastic responsibilities).
    Returns the state cast to ``x``'s dtype."""
    check_state_type(state, KnownVarianceGMMState)
    n, d = x.shape
    k = mixture_num_components(state, n)
    check_field_shapes(state, {"loc": (k, d), "variance": (k,)})
    state = KnownVarianceGMMState(*(jnp.asarray(v, x.dtype) for v in state))
    check_state_values(state, finite=("loc",), lower={"variance": 0.0},
                       row_stochastic=("responsibilities",) if responsibilities else ())
    return state


def _logits(state: KnownVarianceGMMState, x: Array, prior: KnownVarianceGMMPrior) -> Array:
    """Blei et al. eq. 17's k-dependent part, [N, K]: (x_i.m_k - (|m_k|^2 + D (s_k^2 - s_min^2))
    / 2) / s_x^2 with s_min^2 = min_j s_j^2. Leaving out |x_i|^2 and D s_min^2 (constant in k)
    keeps the values small: ``init`` sets every s_k^2 = sigma^2 (perhaps 1e8), whose rounding
    in float32 would otherwise swamp the differences between components."""
    n_dim = x.shape[-1]
    spread = n_dim * (state.variance - jnp.min(state.variance))  # D (s_k^2 - s_min^2)
    expected_sq = jnp.sum(jnp.square(state.loc), axis=-1) + spread
    return (x @ state.loc.T - 0.5 * expected_sq[None, :]) / prior.noise_variance


def _log_rho(state: KnownVarianceGMMState, x: Array, prior: KnownVarianceGMMPrior) -> Array:
    """E_q(mu)[log p(c_i = k) + log p(x_i | c_i = k, mu)], [N, K] (unnormalised log phi).

    = -log K - D/2 log(2 pi s_x^2) - (|x_i|^2 - 2 x_i.m_k + |m_k|^2 + D s_k^2) / (2 s_x^2):
    :func:`_logits` plus the terms constant in k.
    """
    n_dim = x.shape[-1]
    num_components = state.loc.shape[0]
    row_sq = jnp.sum(jnp.square(x), axis=-1, keepdims=True) + n_dim * jnp.min(state.variance)
    return (-math.log(num_components) - 0.5 * n_dim * (_LOG_2PI + jnp.log(prior.noise_variance))
            - 0.5 * row_sq / prior.noise_variance + _logits(state, x, prior))


def update_responsibilities(state: KnownVarianceGMMState, x: Array,
                            prior: KnownVarianceGMMPrior) -> KnownVarianceGMMState:
    """q(c_i) block: phi_ik ∝ exp{E[mu_k].x_i / s_x^2 - E[|mu_k|^2] / (2 s_x^2)} (eq. 17),
    from :func:`_logits`.

    Returns ``state`` with new responsibilities [N, K]. Unchecked (used inside the CAVI loop).
    """
    return state._replace(responsibilities=categorical_update(_logits(state, x, prior)))


def update_q_mu(state: KnownVarianceGMMState, x: Array,
                prior: KnownVarianceGMMPrior) -> KnownVarianceGMMState:
    """q(mu_k) block (eqs 19-20 with noise variance s_x^2)::

        s_k^2 = 1 / (1/sigma^2 + N_k / s_x^2),   m_k = s_k^2 sum_i phi_ik x_i / s_x^2.

    Returns ``state`` with new ``loc`` [K, D] and ``variance`` [K]. Unchecked (used inside
    the CAVI loop).
    """
    counts = jnp.sum(state.responsibilities, axis=0)
    variance = 1.0 / (1.0 / prior.prior_variance + counts / prior.noise_variance)
    loc = variance[:, None] * (state.responsibilities.T @ x) / prior.noise_variance
    return state._replace(loc=loc, variance=variance)


UPDATE_FNS = (unpack_data(update_responsibilities), unpack_data(update_q_mu))
"""Algorithm 2's two blocks in driver form ``(state, (x, prior)) -> state``."""


def _elbo(state: KnownVarianceGMMState, x: Array, prior: KnownVarianceGMMPrior) -> Array:
    n_dim = x.shape[-1]
    # sum_i E[log p(c_i)] + E[log p(x_i | c_i, mu)] - E[log q(c_i)]
    term_c = categorical_elbo_term(_log_rho(state, x, prior), state.responsibilities)
    # sum_k E[log p(mu_k)] - E[log q(mu_k)]  (= -KL(N(m_k, s_k^2 I) || N(0, sigma^2 I)))
    expected_sq = jnp.sum(jnp.square(state.loc), axis=-1) + n_dim * state.variance
    e_log_prior = -0.5 * n_dim * (_LOG_2PI + jnp.log(prior.prior_variance)) \
        - 0.5 * expected_sq / prior.prior_variance
    entropy = 0.5 * n_dim * (1.0 + _LOG_2PI + jnp.log(state.variance))
    return term_c + jnp.sum(e_log_prior + entropy)


def elbo(state: KnownVarianceGMMState, x, prior: KnownVarianceGMMPrior) -> Array:
    """ELBO of Blei et al. (2017) eq. 21, in nats (all constants kept), for any valid state.

    ``sum_k E[log p(mu_k)] + sum_i (E[log p(c_i)] + E[log p(x_i | c_i, mu)])
    - sum_i E[log q(c_i)] - sum_k E[log q(mu_k)]``.

    Args:
      state: :class:`KnownVarianceGMMState`; x: [N, D]; prior: :class:`KnownVarianceGMMPrior`.
    Returns:
      [] the ELBO itself (not its negative) in nats, dtype of ``x``.
    Raises:
      TypeError / ValueError: as :func:`step` (``x``, ``prior``, the state's type, shapes
        and parameter values), and also, for concrete values, ValueError naming
        ``state.responsibilities`` when they are negative, non-finite or have rows not
        summing to 1 (within 1e-4).
    """
    x, prior = _checked(x, prior)
    return _elbo(_check_state(state, x, responsibilities=True), x, prior)


def init(rng_key: Array, x, num_components: int, prior: KnownVarianceGMMPrior
         ) -> KnownVarianceGMMState:
    """Algorithm 2's initialisation: m_k = K distinct random data points, s_k^2 = sigma^2,
    phi uniform (it is overwritten by the first block).

    Args:
      rng_key: PRNG key (``jax.random.key(seed)``); x: [N, D]; num_components: K (Python
      int, K <= N); prior: :class:`KnownVarianceGMMPrior`.
    Returns:
      :class:`KnownVarianceGMMState`: responsibilities [N, K], loc [K, D], variance [K], in
      the dtype of ``x``.
    Raises:
      TypeError: ``rng_key`` is not a JAX PRNG key (e.g. an int seed); ``x`` is not a
        float32/float64 array; ``prior`` is not a
        :class:`KnownVarianceGMMPrior` or one of its fields is not a real number;
        ``num_components`` is not a Python int.
      ValueError: ``x`` is not 2-D, has no rows or no columns, or has NaN/inf rows;
        ``prior.prior_variance`` or ``prior.noise_variance`` is not a scalar, finite and > 0;
        ``num_components`` < 1 or > N.
    """
    check_rng_key(rng_key)
    x, prior = _checked(x, prior)
    k = check_num_components(num_components, x.shape[0])
    idx = jax.random.choice(rng_key, x.shape[0], (k,), replace=False)
    return KnownVarianceGMMState(
        responsibilities=jnp.full((x.shape[0], k), 1.0 / k, x.dtype), loc=x[idx],
        variance=jnp.full((k,), prior.prior_variance, x.dtype))


def init_from_responsibilities(x, responsibilities, prior: KnownVarianceGMMPrior
                               ) -> KnownVarianceGMMState:
    """State with the given q(c) and the optimal q(mu) for it (:func:`update_q_mu`).

    Args:
      x: [N, D]; responsibilities: [N, K] q(c), rows summing to 1;
      prior: :class:`KnownVarianceGMMPrior`.
    Returns:
      :class:`KnownVarianceGMMState`: responsibilities [N, K], loc [K, D], variance [K], in
      the dtype of ``x``.
    Raises:
      TypeError: ``x`` is not a float32/float64 array; ``prior`` is not a
        :class:`KnownVarianceGMMPrior` or one of its fields is not a real number;
        ``responsibilities`` is not real array-like.
      ValueError: ``x`` is not 2-D, has no rows or no columns, or has NaN/inf rows;
        ``prior.prior_variance`` or ``prior.noise_variance`` is not a scalar, finite and > 0;
        ``responsibilities`` is not [N, K] with 1 <= K <= N, or has negative or
        non-finite entries or rows not summing to 1 (within 1e-4; concrete values only).
    """
    x, prior = _checked(x, prior)
    r = check_responsibilities(responsibilities, x.shape[0], x.dtype)
    k = r.shape[1]
    empty = KnownVarianceGMMState(r, jnp.zeros((k, x.shape[1]), x.dtype), jnp.ones((k,), x.dtype))
    return update_q_mu(empty, x, prior)


def step(state: KnownVarianceGMMState, x, prior: KnownVarianceGMMPrior
         ) -> tuple[KnownVarianceGMMState, KnownVarianceGMMInfo]:
    """One pass of Algorithm 2 (all q(c_i), then all q(mu_k)); returns the ELBO after it.

    Args:
      state: :class:`KnownVarianceGMMState` (any dtype; cast to that of ``x``); x: [N, D];
      prior: :class:`KnownVarianceGMMPrior`.
    Returns:
      ``(state, info)``: the updated :class:`KnownVarianceGMMState` (responsibilities [N, K],
      loc [K, D], variance [K], dtype of ``x``) and a :class:`KnownVarianceGMMInfo` whose
      ``elbo`` [] is the ELBO of eq. 21 (all constants kept, :func:`elbo`) at the returned
      state, in nats; it is the ELBO itself, not its negative.
    Raises:
      TypeError: ``x`` is not a float32/float64 array; ``prior`` is not a
        :class:`KnownVarianceGMMPrior` or one of its fields is not a real number; ``state`` is
        not a :class:`KnownVarianceGMMState`.
      ValueError: ``x`` is not 2-D, has no rows or no columns, or has NaN/inf rows;
        ``prior.prior_variance`` or ``prior.noise_variance`` is not a scalar, finite and > 0;
        ``state.responsibilities`` is not [N, K] with 1 <= K <= N, or ``state.loc`` /
        ``state.variance`` is not [K, D] / [K]; ``state.loc`` not finite or
        ``state.variance`` not finite and > 0.
    Value checks (finiteness, ranges) run on concrete inputs only, not on traced ones under
    ``jit``; shapes and types are always checked. The values of
    ``state.responsibilities`` are not checked here (the first block replaces them).
    """
    x, prior = _checked(x, prior)
    state = sweep(UPDATE_FNS, _check_state(state, x), (x, prior))
    return state, KnownVarianceGMMInfo(elbo=_elbo(state, x, prior))


def fit(state: KnownVarianceGMMState, x, prior: KnownVarianceGMMPrior, *, tol: float = 1e-8,
        max_iter: int = 500) -> tuple[KnownVarianceGMMState, CAVIInfo]:
    """Algorithm 2 until the relative ELBO change is below ``tol`` (via :func:`cavi`).

    Stops after sweep t when ``|L_t - L_{t-1}| <= tol * max(1, |L_t|)`` or after ``max_iter``
    sweeps (the rule of :func:`vijax.meanfield.cavi`).

    Args:
      state: starting :class:`KnownVarianceGMMState` (e.g. from :func:`init`); x: [N, D];
      prior: :class:`KnownVarianceGMMPrior`.
      tol: relative ELBO tolerance, >= 0. max_iter: Python int >= 1, the maximum number of
        sweeps and the trace length.
    Returns:
      ``(state, info)``: the final :class:`KnownVarianceGMMState` (shapes as in :func:`step`)
      and a :class:`vijax.meanfield.CAVIInfo` with ``elbo`` [max_iter], the ELBO of eq. 21
      after each sweep in nats (the ELBO, not its negative; NaN after the last sweep),
      ``initial_elbo`` [] (nats, of the input state), ``num_iter`` [] int32 and
      ``converged`` [] bool.
    Raises:
      TypeError / ValueError: as :func:`elbo` (responsibilities included: they give the
      initial ELBO); also ValueError for ``max_iter`` < 1 or a concrete ``tol`` that is
      negative or NaN, TypeError for ``max_iter`` not an int (e.g. ``10.0``) or a
      non-numeric ``tol``.
    """
    x, prior = _checked(x, prior)
    state = _check_state(state, x, responsibilities=True)
    return cavi(UPDATE_FNS, state, (x, prior), elbo_fn=unpack_data(_elbo), tol=tol,
                max_iter=max_iter)


__all__ = ["KnownVarianceGMMPrior", "KnownVarianceGMMState", "KnownVarianceGMMInfo",
           "update_responsibilities", "update_q_mu", "UPDATE_FNS", "elbo", "init",
           "init_from_responsibilities", "step", "fit"]
