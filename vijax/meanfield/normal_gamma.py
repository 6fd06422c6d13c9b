"""Univariate Gaussian with unknown mean and precision: factorised q(mu) q(tau) by CAVI.

Source: Bishop, *Pattern Recognition and Machine Learning* (PRML) §10.1.3, eqs 10.21-10.30;
the general block optimum ``log q_j = E_{i != j} log p(X, T) + const`` is lecture 3,
"Mean field approximation".

Model (all densities in nats)::

    x_n | mu, tau ~ N(mu, 1 / tau),           n = 1..N
    mu | tau      ~ N(mu_0, 1 / (lambda_0 tau))
    tau           ~ Gam(a_0, b_0)              (shape a_0, rate b_0)

The exact posterior is again Normal-Gamma (:func:`exact_posterior`), which lets the tests
compare the factorised approximation with the truth: E_q[mu] equals the exact posterior mean
of mu and q(mu) is narrower than the exact (Student-t) marginal of mu.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.special import digamma, gammaln

from vijax.meanfield._cavi import CAVIInfo, cavi
from vijax.meanfield._common import check_data, check_scalar, check_state_type, unpack_data

Array = jax.Array

_LOG_2PI = math.log(2.0 * math.pi)


class NormalGammaPrior(NamedTuple):
    """Normal-Gamma prior p(mu | tau) p(tau) (PRML eqs 10.22-10.23). All fields scalars []."""

    loc: Array | float  # [] mu_0, prior mean of mu
    precision_scale: Array | float  # [] lambda_0 > 0: prior precision of mu is lambda_0 * tau
    concentration: Array | float  # [] a_0 > 0, Gamma shape
    rate: Array | float  # [] b_0 > 0, Gamma rate


class NormalGammaState(NamedTuple):
    """Variational factors q(mu) = N(loc, 1/precision), q(tau) = Gam(concentration, rate)."""

    loc: Array  # [] mu_N, mean of q(mu)
    precision: Array  # [] lambda_N, precision of q(mu)
    concentration: Array  # [] a_N, shape of q(tau)
    rate: Array  # [] b_N, rate of q(tau)


class NormalGammaPosterior(NamedTuple):
    """Exact posterior NG(mu, tau) = N(mu | loc, 1/(precision_scale tau)) Gam(tau | a, b)."""

    loc: Array  # [] posterior mean of mu
    precision_scale: Array  # [] lambda_0 + N
    concentration: Array  # [] a_0 + N/2
    rate: Array  # [] b_0 + (sum (x - xbar)^2 + lambda_0 N (xbar - mu_0)^2 / (lambda_0 + N)) / 2


class StudentT(NamedTuple):
    """Student-t marginal of mu under the exact posterior (PRML eq. 2.159)."""

    df: Array  # [] degrees of freedom 2 a
    loc: Array  # []
    scale: Array  # [] scale: variance is scale^2 df / (df - 2) for df > 2


class NormalGammaInfo(NamedTuple):
    """Per-iteration information from :func:`step`."""

    elbo: Array  # [] ELBO in nats after the sweep


def _prior_as(prior: NormalGammaPrior, dtype) -> NormalGammaPrior:
    if not isinstance(prior, NormalGammaPrior):
        raise TypeError(f"prior must be a NormalGammaPrior, got {type(prior).__name__}")
    return NormalGammaPrior(
        loc=check_scalar(prior.loc, "prior.loc", dtype),
        precision_scale=check_scalar(prior.precision_scale, "prior.precision_scale", dtype,
                                     exclusive_minimum=0.0),
        concentration=check_scalar(prior.concentration, "prior.concentration", dtype,
                                   exclusive_minimum=0.0),
        rate=check_scalar(prior.rate, "prior.rate", dtype, exclusive_minimum=0.0),
    )


def _checked(x, prior):
    x = check_data(x, "x", ndim=1)
    return x, _prior_as(prior, x.dtype)


def _check_state(state: NormalGammaState, dtype) -> NormalGammaState:
    if not isinstance(state, NormalGammaState):
        raise TypeError(f"state must be a NormalGammaState, got {type(state).__name__}")
    return NormalGammaState(
        loc=check_scalar(state.loc, "state.loc", dtype),
        precision=check_scalar(state.precision, "state.precision", dtype, exclusive_minimum=0.0),
        concentration=check_scalar(state.concentration, "state.concentration", dtype,
                                   exclusive_minimum=0.0),
        rate=check_scalar(state.rate, "state.rate", dtype, exclusive_minimum=0.0),
    )


def _expected_squares(state: NormalGammaState, x: Array, prior: NormalGammaPrior):
    """E_q(mu)[sum_n (x_n - mu)^2] and E_q(mu)[lambda_0 (mu - mu_0)^2]."""
    var_mu = 1.0 / state.precision
    data_term = jnp.sum(jnp.square(x - state.loc)) + x.shape[0] * var_mu
    prior_term = prior.precision_scale * (jnp.square(state.loc - prior.loc) + var_mu)
    return data_term, prior_term


def init(x, prior: NormalGammaPrior) -> NormalGammaState:
    """A starting state: q(tau) = p(tau) and q(mu) = N(mu_0, 1 / (lambda_0 E_p[tau])).

    Any valid state may be used instead (build a :class:`NormalGammaState`); the first CAVI
    block (:func:`update_q_mu`) only reads E_q[tau].

    Args:
      x: [N] data (float32 or float64; the state takes its dtype).
      prior: :class:`NormalGammaPrior`.
    Returns:
      :class:`NormalGammaState`, all fields [] in the dtype of ``x``.
    Raises:
      TypeError: ``x`` is not a float32/float64 array; ``prior`` is not a
        :class:`NormalGammaPrior` or one of its fields is not a real number.
      ValueError: ``x`` is not 1-D, is empty or has NaN/inf entries; a prior field is not a
        finite scalar, or ``precision_scale``, ``concentration`` or ``rate`` is not > 0.
    """
    x, prior = _checked(x, prior)
    expected_tau = prior.concentration / prior.rate
    return NormalGammaState(loc=prior.loc, precision=prior.precision_scale * expected_tau,
                            concentration=prior.concentration, rate=prior.rate)


def update_q_mu(state: NormalGammaState, x: Array, prior: NormalGammaPrior) -> NormalGammaState:
    """q(mu) block: PRML eqs 10.26-10.27.

    ``mu_N = (lambda_0 mu_0 + N xbar) / (lambda_0 + N)``,
    ``lambda_N = (lambda_0 + N) E_q[tau]``. Returns ``state`` with new ``loc`` and
    ``precision`` ([] each). Unchecked (used inside the CAVI loop).
    """
    n = x.shape[0]
    loc = (prior.precision_scale * prior.loc + jnp.sum(x)) / (prior.precision_scale + n)
    precision = (prior.precision_scale + n) * state.concentration / state.rate
    return state._replace(loc=loc, precision=precision)


def update_q_tau(state: NormalGammaState, x: Array, prior: NormalGammaPrior) -> NormalGammaState:
    """q(tau) block: PRML eqs 10.29-10.30.

    ``a_N = a_0 + (N + 1) / 2``,
    ``b_N = b_0 + (E_mu[sum (x_n - mu)^2] + lambda_0 E_mu[(mu - mu_0)^2]) / 2``.
    Returns ``state`` with new ``concentration`` and ``rate`` ([] each). Unchecked (used
    inside the CAVI loop).
    """
    data_term, prior_term = _expected_squares(state, x, prior)
    concentration = prior.concentration + 0.5 * (x.shape[0] + 1)
    rate = prior.rate + 0.5 * (data_term + prior_term)
    return state._replace(concentration=concentration, rate=rate)


def _elbo(state: NormalGammaState, x: Array, prior: NormalGammaPrior) -> Array:
    n = x.shape[0]
    a, b = state.concentration, state.rate
    e_tau = a / b
    e_log_tau = digamma(a) - jnp.log(b)
    data_term, prior_term = _expected_squares(state, x, prior)
    # E_q log p(x | mu, tau) + E_q log p(mu | tau)
    e_log_lik = 0.5 * n * (e_log_tau - _LOG_2PI) - 0.5 * e_tau * data_term
    e_log_p_mu = (0.5 * (jnp.log(prior.precision_scale) + e_log_tau - _LOG_2PI)
                  - 0.5 * e_tau * prior_term)
    # E_q log p(tau)
    a0, b0 = prior.concentration, prior.rate
    e_log_p_tau = a0 * jnp.log(b0) - gammaln(a0) + (a0 - 1.0) * e_log_tau - b0 * e_tau
    # entropies of q(mu) and q(tau)
    entropy_mu = 0.5 * (1.0 + _LOG_2PI - jnp.log(state.precision))
    entropy_tau = a - jnp.log(b) + gammaln(a) + (1.0 - a) * digamma(a)
    return e_log_lik + e_log_p_mu + e_log_p_tau + entropy_mu + entropy_tau


def elbo(state: NormalGammaState, x, prior: NormalGammaPrior) -> Array:
    """Closed-form ELBO E_q[log p(x, mu, tau) - log q(mu) - log q(tau)] in nats.

    Valid for any state (not only after an update): with E[tau] = a/b,
    E[log tau] = psi(a) - log b and ``S = E_mu[sum (x_n - mu)^2]``,
    ``P = lambda_0 E_mu[(mu - mu_0)^2]``::

        L = N/2 (E log tau - log 2 pi) - E[tau] S / 2                  E log p(x | mu, tau)
          + (log lambda_0 + E log tau - log 2 pi)/2 - E[tau] P / 2      E log p(mu | tau)
          + a_0 log b_0 - lnG(a_0) + (a_0 - 1) E log tau - b_0 E[tau]   E log p(tau)
          + (1 + log 2 pi - log lambda_N)/2                            H[q(mu)]
          + a - log b + lnG(a) + (1 - a) psi(a)                         H[q(tau)]

    Derivation in docs/meanfield.md; checked against a Monte Carlo estimate and against
    ``log p(x)`` (:func:`log_marginal_likelihood`) in tests.

    Args:
      state: :class:`NormalGammaState`; x: [N]; prior: :class:`NormalGammaPrior`.
    Returns:
      [] the ELBO (not its negative) in nats, dtype of ``x``.
    Raises:
      As :func:`step`.
    """
    x, prior = _checked(x, prior)
    return _elbo(_check_state(state, x.dtype), x, prior)


def step(state: NormalGammaState, x, prior: NormalGammaPrior
         ) -> tuple[NormalGammaState, NormalGammaInfo]:
    """One CAVI sweep: :func:`update_q_mu` then :func:`update_q_tau`; returns the ELBO after it.

    PRML eqs 10.26-10.27 then 10.29-10.30.

    Args:
      state: :class:`NormalGammaState` (e.g. from :func:`init`; cast to the dtype of ``x``);
      x: [N] data; prior: :class:`NormalGammaPrior`.
    Returns:
      ``(state, info)``: the updated :class:`NormalGammaState` (all fields [], dtype of ``x``)
      and a :class:`NormalGammaInfo` whose ``elbo`` [] is the closed-form ELBO of
      :func:`elbo` (all constants kept) at the returned state, in nats; it is the ELBO
      itself, not its negative, and never exceeds :func:`log_marginal_likelihood`.
    Raises:
      TypeError: ``x`` is not a float32/float64 array; ``prior`` is not a
        :class:`NormalGammaPrior` or ``state`` not a :class:`NormalGammaState`, or one of
        their fields is not a real number.
      ValueError: ``x`` is not 1-D, is empty or has NaN/inf entries; a prior or state field
        is not a finite scalar; the prior's ``precision_scale``, ``concentration``, ``rate``
        or the state's ``precision``, ``concentration``, ``rate`` is not > 0.
    Value checks (finiteness, ranges) run on concrete inputs only, not on traced ones under
    ``jit``; shapes and types are always checked.
    """
    x, prior = _checked(x, prior)
    state = _check_state(state, x.dtype)
    state = update_q_tau(update_q_mu(state, x, prior), x, prior)
    return state, NormalGammaInfo(elbo=_elbo(state, x, prior))


UPDATE_FNS = (unpack_data(update_q_mu), unpack_data(update_q_tau))
"""The two blocks in driver form ``(state, (x, prior)) -> state``."""


def fit(state: NormalGammaState, x, prior: NormalGammaPrior, *, tol: float = 1e-10,
        max_iter: int = 100) -> tuple[NormalGammaState, CAVIInfo]:
    """Run CAVI (:func:`vijax.meanfield.cavi`) on q(mu) q(tau) to convergence.

    Args:
      state: starting :class:`NormalGammaState` (e.g. from :func:`init`).
      x: [N] data. prior: :class:`NormalGammaPrior`.
      tol: relative ELBO tolerance; max_iter: maximum number of sweeps (static).
    Returns:
      ``(state, info)``: the final :class:`NormalGammaState` (fields [], dtype of ``x``) and a
      :class:`vijax.meanfield.CAVIInfo` with ``elbo`` [max_iter], the ELBO of :func:`elbo`
      after each sweep in nats (the ELBO, not its negative; NaN after the last sweep),
      ``initial_elbo`` [] (nats), ``num_iter`` [] int32 and ``converged`` [] bool.
    Raises:
      TypeError: ``x`` is not a float32/float64 array; ``prior`` is not a
        :class:`NormalGammaPrior` or ``state`` not a :class:`NormalGammaState`, or one of
        their fields is not a real number.
      ValueError: ``x`` is not 1-D, is empty or has NaN/inf entries; a prior or state field
        is not a finite scalar; the prior's ``precision_scale``, ``concentration``, ``rate``
        or the state's ``precision``, ``concentration``, ``rate`` is not > 0;
        ``max_iter`` < 1; ``tol`` is negative or NaN. (TypeError, not ValueError, for a
        ``max_iter`` that is not an int, e.g. ``10.0``, or a non-numeric ``tol``.)
    Value checks (finiteness, ranges) run on concrete inputs only, not on traced ones under
    ``jit``; shapes and types are always checked.
    """
    x, prior = _checked(x, prior)
    state = _check_state(state, x.dtype)
    return cavi(UPDATE_FNS, state, (x, prior), elbo_fn=unpack_data(_elbo), tol=tol,
                max_iter=max_iter)


def exact_posterior(x, prior: NormalGammaPrior) -> NormalGammaPosterior:
    """The exact conjugate posterior p(mu, tau | x) = NG (PRML exercise 2.44 / eq. 2.154 form).

    Args:
      x: [N] data; prior: :class:`NormalGammaPrior`.
    Returns:
      :class:`NormalGammaPosterior`, all fields [] in the dtype of ``x``.
    Raises:
      TypeError: ``x`` is not a float32/float64 array; ``prior`` is not a
        :class:`NormalGammaPrior` or one of its fields is not a real number.
      ValueError: ``x`` is not 1-D, is empty or has NaN/inf entries; a prior field is not a
        finite scalar, or ``precision_scale``, ``concentration`` or ``rate`` is not > 0.
    """
    x, prior = _checked(x, prior)
    n = x.shape[0]
    xbar = jnp.mean(x)
    precision_scale = prior.precision_scale + n
    loc = (prior.precision_scale * prior.loc + n * xbar) / precision_scale
    concentration = prior.concentration + 0.5 * n
    rate = prior.rate + 0.5 * (jnp.sum(jnp.square(x - xbar))
                               + prior.precision_scale * n * jnp.square(xbar - prior.loc)
                               / precision_scale)
    return NormalGammaPosterior(loc=loc, precision_scale=precision_scale,
                                concentration=concentration, rate=rate)


def exact_mu_marginal(posterior: NormalGammaPosterior) -> StudentT:
    """Marginal of mu under the exact posterior: Student-t(2a, loc, sqrt(b / (a lambda))).

    PRML eq. 2.159 (integrating tau out of N(mu | loc, 1/(lambda tau)) Gam(tau | a, b)).

    Args:
      posterior: :class:`NormalGammaPosterior` (e.g. from :func:`exact_posterior`).
    Returns:
      :class:`StudentT` with fields [] (df, loc, scale), in the dtype of the posterior.
    Raises:
      TypeError: ``posterior`` is not a :class:`NormalGammaPosterior` (e.g. a prior or a
        plain tuple), or a field is not a real number.
      ValueError: a field is not a finite scalar, or ``precision_scale``, ``concentration``
        or ``rate`` is not > 0 (concrete values only).
    """
    check_state_type(posterior, NormalGammaPosterior, "posterior")
    dtype = jnp.result_type(*(jnp.asarray(v) for v in posterior), float)
    posterior = NormalGammaPosterior(
        loc=check_scalar(posterior.loc, "posterior.loc", dtype),
        precision_scale=check_scalar(posterior.precision_scale, "posterior.precision_scale",
                                     dtype, exclusive_minimum=0.0),
        concentration=check_scalar(posterior.concentration, "posterior.concentration", dtype,
                                   exclusive_minimum=0.0),
        rate=check_scalar(posterior.rate, "posterior.rate", dtype, exclusive_minimum=0.0))
    df = 2.0 * posterior.concentration
    scale = jnp.sqrt(posterior.rate / (posterior.concentration * posterior.precision_scale))
    return StudentT(df=df, loc=posterior.loc, scale=scale)


def log_marginal_likelihood(x, prior: NormalGammaPrior) -> Array:
    """Exact evidence log p(x) in nats (closed form for the Normal-Gamma model)::

        log p(x) = lnG(a_N) - lnG(a_0) + a_0 log b_0 - a_N log b_N
                   + (log lambda_0 - log lambda_N) / 2 - N/2 log 2 pi

    with (a_N, b_N, lambda_N) from :func:`exact_posterior`. Every ELBO is <= this value.

    Args:
      x: [N] data; prior: :class:`NormalGammaPrior`.
    Returns:
      [] log p(x) in nats, dtype of ``x``.
    Raises:
      TypeError: ``x`` is not a float32/float64 array; ``prior`` is not a
        :class:`NormalGammaPrior` or one of its fields is not a real number.
      ValueError: ``x`` is not 1-D, is empty or has NaN/inf entries; a prior field is not a
        finite scalar, or ``precision_scale``, ``concentration`` or ``rate`` is not > 0.
    """
    x, prior = _checked(x, prior)
    post = exact_posterior(x, prior)
    return (gammaln(post.concentration) - gammaln(prior.concentration)
            + prior.concentration * jnp.log(prior.rate)
            - post.concentration * jnp.log(post.rate)
            + 0.5 * (jnp.log(prior.precision_scale) - jnp.log(post.precision_scale))
            - 0.5 * x.shape[0] * _LOG_2PI)


def _log_gamma_density(tau, concentration, rate):
    return (concentration * jnp.log(rate) - gammaln(concentration)
            + (concentration - 1.0) * jnp.log(tau) - rate * tau)


def _log_normal_density(value, loc, precision):
    return 0.5 * (jnp.log(precision) - _LOG_2PI) - 0.5 * precision * jnp.square(value - loc)


def log_density_q(state: NormalGammaState, mu, tau) -> Array:
    """log q(mu) + log q(tau) at (broadcast) points ``mu``, ``tau > 0``.

    Returns the log density in nats, shape of the broadcast of ``mu`` and ``tau``. The
    values are unchecked (``tau <= 0`` gives NaN or -inf).

    Raises:
      TypeError: ``state`` is not a :class:`NormalGammaState`.
    """
    check_state_type(state, NormalGammaState)
    mu, tau = jnp.asarray(mu), jnp.asarray(tau)
    return (_log_normal_density(mu, state.loc, state.precision)
            + _log_gamma_density(tau, state.concentration, state.rate))


def log_density_exact(posterior: NormalGammaPosterior, mu, tau) -> Array:
    """log p(mu, tau | x) of the exact Normal-Gamma posterior at (broadcast) points.

    Returns the log density in nats, shape of the broadcast of ``mu`` and ``tau``. The
    values are unchecked (``tau <= 0`` gives NaN or -inf).

    Raises:
      TypeError: ``posterior`` is not a :class:`NormalGammaPosterior`.
    """
    check_state_type(posterior, NormalGammaPosterior, "posterior")
    mu, tau = jnp.asarray(mu), jnp.asarray(tau)
    return (_log_normal_density(mu, posterior.loc, posterior.precision_scale * tau)
            + _log_gamma_density(tau, posterior.concentration, posterior.rate))


def log_joint(x, prior: NormalGammaPrior, mu, tau) -> Array:
    """log p(x, mu, tau) at (broadcast) points ``mu``, ``tau``; for Monte Carlo ELBO checks.

    Args:
      x: [N] data; prior: :class:`NormalGammaPrior`; mu, tau: points (``tau > 0``), any
        broadcast-compatible shapes; not checked.
    Returns:
      log p(x, mu, tau) in nats, shape of the broadcast of ``mu`` and ``tau``, dtype of ``x``.
    Raises:
      TypeError: ``x`` is not a float32/float64 array; ``prior`` is not a
        :class:`NormalGammaPrior` or one of its fields is not a real number.
      ValueError: ``x`` is not 1-D, is empty or has NaN/inf entries; a prior field is not a
        finite scalar, or ``precision_scale``, ``concentration`` or ``rate`` is not > 0.
    """
    x, prior = _checked(x, prior)
    mu, tau = jnp.asarray(mu, x.dtype), jnp.asarray(tau, x.dtype)
    log_lik = jnp.sum(_log_normal_density(x, mu[..., None], tau[..., None]), axis=-1)
    return (log_lik + _log_normal_density(mu, prior.loc, prior.precision_scale * tau)
            + _log_gamma_density(tau, prior.concentration, prior.rate))


__all__ = [
    "NormalGammaPrior", "NormalGammaState", "NormalGammaPosterior", "NormalGammaInfo", "StudentT",
    "init", "update_q_mu", "update_q_tau", "elbo", "step", "fit", "UPDATE_FNS",
    "exact_posterior", "exact_mu_marginal", "log_marginal_likelihood", "log_density_q",
    "log_density_exact", "log_joint",
]
