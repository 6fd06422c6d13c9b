"""EM as the special case of mean-field CAVI with q(theta) = delta(theta - theta_0).

Source: lecture 3, "Mean field approximation" -> "EM algorithm (special case)". Split the
latents of a Gaussian mixture into T = [Z, theta], theta = (pi, mu_k, Lambda_k), and
restrict q(theta) to Dirac deltas. The mean-field block rule then gives

* q(Z):  log q(Z) = E_{delta} log p(X, Z, theta) + const = log p(Z | X, theta_0) + const,
  the E-step (:func:`update_q_z`);
* theta_0: the ELBO restricted to deltas is log p_hat(X, theta_0) + const with
  log p_hat(X, theta) = E_{q(Z)} log p(X, Z | theta) + log p(theta) + const, so theta_0 is the
  mode of p_hat -- the M-step of MAP-EM (:func:`update_theta`).

The non-degenerate mean-field optimum q*(theta) ∝ p_hat(X, theta) is exactly the Bayesian
GMM's Dirichlet x Gaussian-Wishart update (:func:`vijax.meanfield.bayesian_gmm.conjugate_update`,
PRML 10.58-10.63). So :func:`update_theta` *is* that update followed by taking the mode of
p_hat in (pi, mu, Lambda): pi_k = (alpha_k - 1) / (sum alpha - K), mu_k = m_k,
Lambda_k = (nu_k - D) W_k. With the flat prior of :func:`flat_prior`
(alpha_0 = 1, beta_0 = 0, W_0^{-1} = 0, nu_0 = D, i.e. p(pi, mu, Lambda) ∝ 1) this is
maximum-likelihood EM: pi_k = N_k / N, mu_k = xbar_k, Sigma_k = S_k (PRML 9.24-9.27); the
tests reproduce :mod:`vijax.em`'s trajectories this way.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import xlogy

from vijax._checks import check_int, check_num_components, check_rng_key, is_concrete
from vijax.meanfield import bayesian_gmm
from vijax.meanfield._cavi import CAVIInfo, cavi, sweep
from vijax.meanfield._common import (
    categorical_elbo_term,
    categorical_update,
    check_data,
    check_field_shapes,
    check_mixture_state,
    check_psd_matrix,
    check_responsibilities,
    check_scalar,
    check_state_type,
    check_state_values,
    check_vector,
    mixture_dims,
    nearest_centre_responsibilities,
    sq_mahalanobis,
    tril_inverse,
    unpack_data,
)
from vijax.meanfield.bayesian_gmm import BGMMPrior

Array = jax.Array

_LOG_2PI = math.log(2.0 * math.pi)


class DiracEMState(NamedTuple):
    """q(Z) and the point mass theta_0 = (pi, mu, Sigma) of q(theta) = delta(theta - theta_0)."""

    responsibilities: Array  # [N, K] q(z_n = k)
    weights: Array  # [K] pi_k
    loc: Array  # [K, D] mu_k
    covariance_tril: Array  # [K, D, D] lower Cholesky factor of Sigma_k = Lambda_k^{-1}


class DiracEMInfo(NamedTuple):
    """Per-iteration information from :func:`step`."""

    elbo: Array  # [] restricted ELBO (see :func:`elbo`; the ELBO, not its negative) in nats
    #   after the sweep, dtype of x


def flat_prior(dim: int, dtype=float) -> BGMMPrior:
    """The improper flat prior p(pi, mu, Lambda) ∝ 1 as a limit of the Dirichlet x
    Gaussian-Wishart family: alpha_0 = 1, beta_0 = 0, m_0 = 0, nu_0 = D, W_0^{-1} = 0
    (the Gaussian's |beta_0 Lambda|^{1/2} and the Wishart's |Lambda|^{(nu_0 - D - 1)/2} cancel).
    Under it the Dirac-delta updates are maximum-likelihood EM.

    Args:
      dim: D, a Python int >= 1. dtype: floating dtype of the fields (default: JAX's
        default float, float32 unless x64 is enabled).
    Returns:
      :class:`~vijax.meanfield.bayesian_gmm.BGMMPrior` with scalar concentration,
      mean_precision and dof, loc [D] and scale_inv [D, D].
    Raises:
      TypeError: ``dim`` is not an int (e.g. ``2.0`` or a bool); ``dtype`` is not a
        floating dtype.
      ValueError: ``dim`` < 1.
    """
    dim = check_int(dim, "dim", minimum=1)
    try:
        dtype = jnp.dtype(jnp.result_type(dtype))
    except TypeError as err:
        raise TypeError(f"dtype must be a floating dtype, got {dtype!r}") from err
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"dtype must be a floating dtype, got {dtype}")
    return BGMMPrior(concentration=jnp.asarray(1.0, dtype), mean_precision=jnp.asarray(0.0, dtype),
                     loc=jnp.zeros((dim,), dtype), dof=jnp.asarray(float(dim), dtype),
                     scale_inv=jnp.zeros((dim, dim), dtype))


def check_prior(prior: BGMMPrior, dim: int, dtype) -> BGMMPrior:
    """Validate a MAP prior: like :func:`bayesian_gmm.check_prior` but allowing the flat limit
    (alpha_0 >= 1 so the Dirichlet mode is interior, beta_0 >= 0, nu_0 >= D, W_0^{-1} PSD).

    Args:
      prior: :class:`~vijax.meanfield.bayesian_gmm.BGMMPrior`; dim: D; dtype: target dtype.
    Returns:
      The prior with every field cast to ``dtype``.
    Raises:
      TypeError: ``prior`` is not a BGMMPrior, or a field is not real array-like.
      ValueError: ``loc`` / ``scale_inv`` is not [D] / [D, D]; concentration, mean_precision
        or dof is not a scalar; concentration < 1, mean_precision < 0, dof < D; loc not
        finite; scale_inv not finite, not symmetric or not positive semi-definite (the
        message names the field). Range checks run on concrete values only.
    """
    bayesian_gmm.check_prior_dimension(prior, dim)
    return BGMMPrior(
        concentration=check_scalar(prior.concentration, "prior.concentration", dtype, minimum=1.0),
        mean_precision=check_scalar(prior.mean_precision, "prior.mean_precision", dtype,
                                    minimum=0.0),
        loc=check_vector(prior.loc, "prior.loc", dtype, size=dim),
        dof=check_scalar(prior.dof, "prior.dof", dtype, minimum=float(dim)),
        scale_inv=check_psd_matrix(prior.scale_inv, "prior.scale_inv", dtype, size=dim,
                                   definite=False),
    )


def _checked(x, prior):
    x = check_data(x, "x", ndim=2)
    return x, check_prior(prior, x.shape[1], x.dtype)


def _check_params(state: DiracEMState, dim: int | None = None) -> None:
    """Type, shapes and (concrete) values of theta_0 = (weights, loc, covariance_tril).

    Raises:
      TypeError: ``state`` is not a :class:`DiracEMState`.
      ValueError: ``state.weights`` is not [K] (K >= 1), ``state.loc`` not [K, D] (D =
        ``dim`` when given) or ``state.covariance_tril`` not [K, D, D]; for concrete values,
        ``weights`` not a probability vector (finite, >= 0, summing to 1 within 1e-4),
        ``loc`` not finite, ``covariance_tril`` not finite with a positive diagonal (the
        message names the field).
    """
    check_state_type(state, DiracEMState)
    k, d = mixture_dims(state, "weights", dim)
    check_field_shapes(state, {"loc": (k, d), "covariance_tril": (k, d, d)})
    check_state_values(state, finite=("loc",), probability=("weights",),
                       cholesky=("covariance_tril",))


def _check_state(state: DiracEMState, x: Array, *, responsibilities: bool = False
                 ) -> DiracEMState:
    """:func:`_check_params` plus responsibilities [N, K] matching ``x`` (row-stochastic
    when concrete, with ``responsibilities``); the state cast to ``x``'s dtype."""
    return check_mixture_state(state, x, DiracEMState, "weights", _check_params,
                               responsibilities=responsibilities)


def _log_det_tril(tril: Array) -> Array:
    return 2.0 * jnp.sum(jnp.log(jnp.diagonal(tril, axis1=-2, axis2=-1)), axis=-1)


def _log_rho(state: DiracEMState, x: Array) -> Array:
    """E_delta log p(x_n, z_n = k | theta) = log pi_k + log N(x_n | mu_k, Sigma_k), [N, K]."""
    dim = x.shape[-1]
    maha = sq_mahalanobis(x, state.loc, tril_inverse(state.covariance_tril))  # [N, K]
    log_norm = jnp.log(state.weights) - 0.5 * _log_det_tril(state.covariance_tril) \
        - 0.5 * dim * _LOG_2PI
    return log_norm[None, :] - 0.5 * maha


def update_q_z(state: DiracEMState, x: Array, prior: BGMMPrior) -> DiracEMState:
    """q(Z) block = E-step: r_nk = p(z_n = k | x_n, theta_0) (lecture 3, "EM-algorithm
    (E-step)"; PRML 9.23). Returns ``state`` with new responsibilities [N, K]. Unchecked."""
    del prior
    return state._replace(responsibilities=categorical_update(_log_rho(state, x)))


def update_theta(state: DiracEMState, x: Array, prior: BGMMPrior) -> DiracEMState:
    """theta_0 block = M-step of MAP-EM: the mode of q*(theta) ∝ exp E_q(Z) log p(X, Z, theta).

    q* is the Bayesian GMM's conjugate update (PRML 10.58-10.63); its joint mode in
    (pi, mu, Lambda) is pi_k = (alpha_k - 1)/(sum_j alpha_j - K), mu_k = m_k,
    Sigma_k = W_k^{-1} / (nu_k - D). Returns ``state`` with new weights [K], loc [K, D] and
    covariance_tril [K, D, D]. Unchecked.
    """
    upd = bayesian_gmm._conjugate_update(bayesian_gmm._statistics(state.responsibilities, x),
                                         prior)
    num_components, dim = upd.loc.shape
    weights = (upd.concentration - 1.0) / (jnp.sum(upd.concentration) - num_components)
    tril = jnp.linalg.cholesky(upd.scale_inv) / jnp.sqrt(upd.dof - dim)[:, None, None]
    return state._replace(weights=weights, loc=upd.loc, covariance_tril=tril)


UPDATE_FNS = (unpack_data(update_q_z), unpack_data(update_theta))
"""E-step then M-step, in driver form ``(state, (x, prior)) -> state``."""


def _log_prior_kernel(state: DiracEMState, prior: BGMMPrior) -> Array:
    """log p(theta_0) up to its normalising constant (finite also for the flat limit)::

        (alpha_0 - 1) sum log pi_k + sum_k [ (nu_0 - D) / 2 log|Lambda_k|
            - beta_0 / 2 (mu_k - m_0)^T Lambda_k (mu_k - m_0) - Tr(W_0^{-1} Lambda_k) / 2 ]
    """
    dim = state.loc.shape[-1]
    log_det_lambda = -_log_det_tril(state.covariance_tril)
    whitening = tril_inverse(state.covariance_tril)  # C_k^{-1}, Lambda_k = C^{-T} C^{-1}
    quad = sq_mahalanobis(prior.loc[None, :], state.loc, whitening)[0]  # [K]
    # Tr(W_0^{-1} Lambda_k) = Tr(C^{-1} W_0^{-1} C^{-T}) (W_0^{-1} may be singular: no Cholesky)
    trace = jnp.einsum("ked,df,kef->k", whitening, prior.scale_inv, whitening)
    # xlogy: a weight of 0 under the flat prior (alpha_0 = 1) adds 0, not 0 * (-inf)
    return (jnp.sum(xlogy(prior.concentration - 1.0, state.weights))
            + jnp.sum(0.5 * (prior.dof - dim) * log_det_lambda - 0.5 * prior.mean_precision * quad
                      - 0.5 * trace))


def _elbo(state: DiracEMState, x: Array, prior: BGMMPrior) -> Array:
    return categorical_elbo_term(_log_rho(state, x), state.responsibilities) \
        + _log_prior_kernel(state, prior)


def elbo(state: DiracEMState, x, prior: BGMMPrior) -> Array:
    """The ELBO restricted to q(theta) = delta(theta - theta_0), in nats, up to constants:

        L = sum_nk r_nk [log p(x_n, z_n = k | theta_0) - log r_nk] + log p~(theta_0)

    where log p~ is the log prior without its normaliser and the infinite -E log delta is
    dropped (lecture 3: both are const(theta_0)). After :func:`update_q_z` it equals
    log p(X | theta_0) + log p~(theta_0), the MAP-EM objective (for :func:`flat_prior`,
    the log-likelihood). Never decreases along :func:`fit`.

    Args:
      state: :class:`DiracEMState`; x: [N, D]; prior: BGMMPrior (e.g. :func:`flat_prior`).
    Returns:
      [] the restricted ELBO itself (not its negative) in nats, up to the additive constants
      above, dtype of ``x``.
    Raises:
      TypeError / ValueError: as :func:`step` (``x``, ``prior``, the state's type, shapes
        and parameter values), and also, for concrete values, ValueError naming
        ``state.responsibilities`` when they are negative, non-finite or have rows not
        summing to 1 (within 1e-4).
    """
    x, prior = _checked(x, prior)
    return _elbo(_check_state(state, x, responsibilities=True), x, prior)


def _from_responsibilities(r: Array, x: Array, prior: BGMMPrior) -> DiracEMState:
    k, d = r.shape[1], x.shape[1]
    empty = DiracEMState(r, jnp.full((k,), 1.0 / k, x.dtype), jnp.zeros((k, d), x.dtype),
                         jnp.broadcast_to(jnp.eye(d, dtype=x.dtype), (k, d, d)))
    state = update_theta(empty, x, prior)
    params = (state.weights, state.loc, state.covariance_tril)
    if all(is_concrete(p) for p in params) and not all(np.all(np.isfinite(p)) for p in params):
        raise ValueError(
            "the initial responsibilities give non-finite parameters: a component has too few "
            "distinct points of `x` for its covariance (under the flat prior, the "
            "maximum-likelihood M-step, it needs D + 1 points in general position, e.g. "
            "repeated rows of x can leave it one); use fewer `num_components`, other "
            "responsibilities, or a proper prior such as bayesian_gmm.default_prior(x, K)")
    return state


def init_from_responsibilities(x, responsibilities, prior: BGMMPrior) -> DiracEMState:
    """theta_0 = MAP M-step of the given q(Z) [N, K] (as EM initialised from responsibilities).

    Args:
      x: [N, D]; responsibilities: [N, K], rows summing to 1; prior: BGMMPrior.
    Returns:
      :class:`DiracEMState` (responsibilities [N, K], weights [K], loc [K, D],
      covariance_tril [K, D, D], dtype of ``x``).
    Raises:
      TypeError: ``x`` is not a float32/float64 array; ``prior`` is not a
        :class:`~vijax.meanfield.bayesian_gmm.BGMMPrior` or one of its fields is not real
        array-like; ``responsibilities`` is not real array-like.
      ValueError: ``x`` is not 2-D, has no rows or no columns, or has NaN/inf rows;
        ``prior.loc`` / ``prior.scale_inv`` is not [D] / [D, D]; ``prior.concentration``,
        ``mean_precision`` or ``dof`` is not a scalar; a prior field is out of range (see
        :func:`check_prior`);
        ``responsibilities`` is not [N, K] with 1 <= K <= N, or has negative or non-finite
        entries or rows not summing to 1 (within 1e-4; concrete values only); the M-step
        gives non-finite parameters (concrete values only: a component with too few
        distinct points under the flat prior).
    """
    x, prior = _checked(x, prior)
    r = check_responsibilities(responsibilities, x.shape[0], x.dtype)
    return _from_responsibilities(r, x, prior)


def init(rng_key: Array, x, num_components: int, prior: BGMMPrior) -> DiracEMState:
    """Random start: nearest of K random data points (one-hot q(Z)), then the M-step.

    Args:
      rng_key: PRNG key (``jax.random.key(seed)``); x: [N, D]; num_components: K (Python
      int, 1 <= K <= N); prior: BGMMPrior.
    Returns:
      :class:`DiracEMState` (shapes as in :func:`init_from_responsibilities`).
    Raises:
      TypeError: ``rng_key`` is not a JAX PRNG key (e.g. an int seed); ``x`` is not a
        float32/float64 array; ``prior`` is not a
        :class:`~vijax.meanfield.bayesian_gmm.BGMMPrior` or one of its fields is not real
        array-like; ``num_components`` is not a Python int.
      ValueError: ``x`` is not 2-D, has no rows or no columns, or has NaN/inf rows;
        ``prior.loc`` / ``prior.scale_inv`` is not [D] / [D, D]; ``prior.concentration``,
        ``mean_precision`` or ``dof`` is not a scalar; a prior field is out of range (see
        :func:`check_prior`);
        ``num_components`` < 1 or > N; the initial M-step gives non-finite parameters
        (concrete values only: e.g. repeated rows of ``x`` leaving a component one distinct
        point under the flat prior).
    """
    check_rng_key(rng_key)
    x, prior = _checked(x, prior)
    k = check_num_components(num_components, x.shape[0])
    return _from_responsibilities(nearest_centre_responsibilities(rng_key, x, k), x, prior)


def step(state: DiracEMState, x, prior: BGMMPrior) -> tuple[DiracEMState, DiracEMInfo]:
    """One Dirac-delta CAVI sweep = one (MAP-)EM iteration: :func:`update_q_z` then
    :func:`update_theta`; returns the restricted ELBO after it.

    Args:
      state: :class:`DiracEMState` (cast to the dtype of ``x``); x: [N, D];
      prior: BGMMPrior (e.g. :func:`flat_prior`).
    Returns:
      ``(state, info)``: the updated :class:`DiracEMState` (responsibilities [N, K],
      weights [K], loc [K, D], covariance_tril [K, D, D], dtype of ``x``) and a
      :class:`DiracEMInfo` whose ``elbo`` [] is the restricted ELBO of :func:`elbo` at the
      returned state (this sweep's q(Z), the new theta_0), in nats, up to an additive
      constant independent of theta_0; it is the ELBO, not its negative. It lies between the
      MAP-EM objective log p(X | theta_0) + log p~(theta_0) at the old and the new theta_0.
    Raises:
      TypeError: ``x`` is not a float32/float64 array; ``prior`` is not a
        :class:`~vijax.meanfield.bayesian_gmm.BGMMPrior` or one of its fields is not real
        array-like; ``state`` is not a :class:`DiracEMState`.
      ValueError: ``x`` is not 2-D, has no rows or no columns, or has NaN/inf rows;
        ``prior.loc`` / ``prior.scale_inv`` is not [D] / [D, D]; ``prior.concentration``,
        ``mean_precision`` or ``dof`` is not a scalar; a prior field is out of range (see
        :func:`check_prior`);
        ``state`` fields are not responsibilities [N, K] (1 <= K <= N), weights [K],
        loc [K, D], covariance_tril [K, D, D]; ``state.weights`` not a probability vector
        (finite, >= 0, summing to 1 within 1e-4), ``state.loc`` not finite,
        ``state.covariance_tril`` not finite with a positive diagonal.
    Value checks (finiteness, ranges, definiteness) run on concrete inputs only, not on
    traced ones under ``jit``; shapes and types are always checked. The values of
    ``state.responsibilities`` are not checked here (the E-step replaces them first).
    """
    x, prior = _checked(x, prior)
    state = sweep(UPDATE_FNS, _check_state(state, x), (x, prior))
    return state, DiracEMInfo(elbo=_elbo(state, x, prior))


def fit(state: DiracEMState, x, prior: BGMMPrior, *, tol: float = 1e-8, max_iter: int = 500
        ) -> tuple[DiracEMState, CAVIInfo]:
    """(MAP-)EM through the generic :func:`vijax.meanfield.cavi` driver.

    Stops after sweep t when ``|L_t - L_{t-1}| <= tol * max(1, |L_t|)`` or after ``max_iter``
    sweeps.

    Args:
      state: starting :class:`DiracEMState` (e.g. from :func:`init`).
      x: [N, D] data.
      prior: BGMMPrior.
      tol: relative ELBO tolerance, >= 0.
      max_iter: Python int >= 1, the maximum number of sweeps and the trace length.
    Returns:
      ``(state, info)``: the final :class:`DiracEMState` (shapes as in :func:`step`) and a
      :class:`vijax.meanfield.CAVIInfo` with ``elbo`` [max_iter], the restricted ELBO of
      :func:`elbo` after each sweep in nats (the ELBO, not its negative; up to an additive
      constant; NaN after the last sweep), ``initial_elbo`` [] (nats, of the input state),
      ``num_iter`` [] int32 and ``converged`` [] bool.
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


def covariances(state: DiracEMState) -> Array:
    """Sigma_k = C_k C_k^T, [K, D, D] (squared data units, dtype of ``covariance_tril``).

    Args:
      state: :class:`DiracEMState` (its responsibilities are not used).
    Returns:
      [K, D, D] component covariance matrices.
    Raises:
      TypeError: ``state`` is not a :class:`DiracEMState` (e.g. None or a plain tuple).
      ValueError: ``state.weights`` / ``loc`` / ``covariance_tril`` are not [K] / [K, D] /
        [K, D, D], or (concrete values) out of range as in :func:`step`.
    """
    _check_params(state)
    tril = state.covariance_tril
    return tril @ jnp.swapaxes(tril, -1, -2)


__all__ = ["DiracEMState", "DiracEMInfo", "flat_prior", "check_prior", "update_q_z",
           "update_theta", "UPDATE_FNS", "elbo", "init", "init_from_responsibilities", "step",
           "fit", "covariances"]
