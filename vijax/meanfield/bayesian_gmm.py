"""Bayesian Gaussian mixture by mean-field CAVI: q(Z) q(pi) prod_k q(mu_k, Lambda_k).

Source: Bishop, PRML §10.2 (eqs 10.37-10.40 model, 10.46-10.66 updates, 10.70-10.77 ELBO);
the block optimum ``log q_j = E_{i != j} log p(X, T) + const`` is lecture 3, "Mean field
approximation". Conventions match scikit-learn's ``BayesianGaussianMixture`` with
``weight_concentration_prior_type="dirichlet_distribution"``, ``covariance_type="full"`` and
``reg_covar=0`` (sklearn's ``covariance_prior`` is our ``prior.scale_inv`` = W_0^{-1}); the
tests reproduce its parameters and its (constant-free) lower bound.

Model::

    pi ~ Dir(alpha_0 1_K)
    Lambda_k ~ Wishart(W_0, nu_0),   mu_k | Lambda_k ~ N(m_0, (beta_0 Lambda_k)^{-1})
    z_n | pi ~ Cat(pi),               x_n | z_n = k ~ N(mu_k, Lambda_k^{-1})

Variational family (PRML 10.42, 10.55, 10.59): q(z_n) = Cat(r_n), q(pi) = Dir(alpha),
q(mu_k, Lambda_k) = N(mu_k | m_k, (beta_k Lambda_k)^{-1}) W(Lambda_k | W_k, nu_k).
W_k is stored through the lower Cholesky factor of its inverse, ``W_k^{-1} = L_k L_k^T``.

The per-iteration function for benchmarks is :func:`step` (also exported as
``vijax.meanfield.bgmm_step``): pure and jit-able, ``(state, x, prior) -> (state, info)``.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.special import digamma, gammaln

from vijax import _linalg, em
from vijax._checks import check_num_components, check_rng_key
from vijax.meanfield._cavi import CAVIInfo, cavi_loop, check_loop_args
from vijax.meanfield._common import (
    as_float_array,
    categorical_elbo_term,
    categorical_update,
    check_data,
    check_field_shapes,
    check_float_dtype,
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

Array = jax.Array

_LOG_2PI = math.log(2.0 * math.pi)
_LOG_2 = math.log(2.0)


class BGMMPrior(NamedTuple):
    """Dirichlet / Gaussian-Wishart prior (PRML eqs 10.39-10.40).

    sklearn names in brackets (``BayesianGaussianMixture``).
    """

    concentration: Array | float  # [] alpha_0 > 0, symmetric Dirichlet (weight_concentration_prior)
    mean_precision: Array | float  # [] beta_0 > 0 (mean_precision_prior)
    loc: Array  # [D] m_0 (mean_prior)
    dof: Array | float  # [] nu_0 > D - 1 (degrees_of_freedom_prior)
    scale_inv: Array  # [D, D] W_0^{-1}, symmetric positive definite (covariance_prior)


class BGMMState(NamedTuple):
    """Variational parameters of q(Z) q(pi) prod_k q(mu_k, Lambda_k)."""

    responsibilities: Array  # [N, K] r_nk = q(z_n = k), rows sum to 1
    concentration: Array  # [K] alpha_k of q(pi) = Dir(alpha)
    mean_precision: Array  # [K] beta_k
    loc: Array  # [K, D] m_k
    dof: Array  # [K] nu_k > D - 1
    scale_inv_tril: Array  # [K, D, D] lower Cholesky factor L_k of W_k^{-1} = L_k L_k^T


class BGMMInfo(NamedTuple):
    """Per-iteration information from :func:`step`."""

    elbo: Array  # [] ELBO in nats (PRML 10.70) after the sweep


# --- validation ---------------------------------------------------------------------------

def check_prior(prior: BGMMPrior, dim: int, dtype) -> BGMMPrior:
    """Validate a :class:`BGMMPrior` for ``dim``-dimensional data and cast it to ``dtype``.

    Returns:
      The prior with every field cast to ``dtype``.
    Raises:
      TypeError: ``prior`` is not a BGMMPrior, or a field is not real array-like.
      ValueError: a field has the wrong shape or is out of range (names the field): needs
        concentration > 0, mean_precision > 0, dof > D - 1, loc finite, scale_inv finite,
        symmetric and positive definite. Range checks run on concrete values only.
    """
    check_prior_dimension(prior, dim)
    return BGMMPrior(
        concentration=check_scalar(prior.concentration, "prior.concentration", dtype,
                                   exclusive_minimum=0.0),
        mean_precision=check_scalar(prior.mean_precision, "prior.mean_precision", dtype,
                                    exclusive_minimum=0.0),
        loc=check_vector(prior.loc, "prior.loc", dtype, size=dim),
        dof=check_scalar(prior.dof, "prior.dof", dtype, exclusive_minimum=dim - 1.0),
        scale_inv=check_psd_matrix(prior.scale_inv, "prior.scale_inv", dtype, size=dim),
    )


def check_prior_dimension(prior: BGMMPrior, dim: int, data_name: str = "x") -> None:
    """Raise unless ``prior`` is a BGMMPrior whose m_0 and W_0^{-1} match the data dimension.

    Raises:
      TypeError: ``prior`` is not a :class:`BGMMPrior`.
      ValueError: ``prior.loc`` is not [dim] or ``prior.scale_inv`` is not [dim, dim].
    """
    if not isinstance(prior, BGMMPrior):
        raise TypeError(f"prior must be a BGMMPrior, got {type(prior).__name__}")
    for field, shape in (("loc", (dim,)), ("scale_inv", (dim, dim))):
        got = jnp.shape(getattr(prior, field))
        if got != shape:
            raise ValueError(f"prior.{field} has shape {list(got)} but {data_name} has D={dim}"
                             f"{' columns' if data_name == 'x' else ''}; the prior must have "
                             f"shape {list(shape)}")


def _checked(x, prior):
    x = check_data(x, "x", ndim=2)
    return x, check_prior(prior, x.shape[1], x.dtype)


def _check_params(state: BGMMState, dim: int | None = None) -> BGMMState:
    """Type, shapes and (concrete) values of q(pi) q(mu, Lambda) in ``state``; the
    responsibilities are not looked at. Returns the state with array fields.

    Raises:
      TypeError: ``state`` is not a :class:`BGMMState`.
      ValueError: ``state.concentration`` is not [K] (K >= 1), ``state.loc`` not [K, D] (D =
        ``dim`` when given), ``mean_precision`` / ``dof`` not [K], ``scale_inv_tril`` not
        [K, D, D]; for concrete values: ``concentration``, ``mean_precision`` not finite and
        > 0, ``dof`` not finite and > D - 1, ``loc`` not finite, ``scale_inv_tril`` not
        finite with a positive diagonal (each message names the field).
    """
    check_state_type(state, BGMMState)
    k, d = mixture_dims(state, "concentration", dim)
    check_field_shapes(state, {"mean_precision": (k,), "loc": (k, d), "dof": (k,),
                               "scale_inv_tril": (k, d, d)})
    check_state_values(state, finite=("loc",), lower={"concentration": 0.0, "mean_precision": 0.0,
                                                      "dof": (d - 1.0, f"D - 1 = {d - 1}")},
                       cholesky=("scale_inv_tril",))
    return state


def _check_state(state: BGMMState, x: Array, *, responsibilities: bool = False) -> BGMMState:
    """:func:`_check_params` plus responsibilities of shape [N, K] matching ``x`` (and, with
    ``responsibilities``, row-stochastic when concrete); the state cast to ``x``'s dtype."""
    return check_mixture_state(state, x, BGMMState, "concentration", _check_params,
                               responsibilities=responsibilities)


def default_prior(x, num_components: int | None = None) -> BGMMPrior:
    """scikit-learn's default prior: alpha_0 = 1/K, beta_0 = 1, m_0 = mean(x), nu_0 = D,
    W_0^{-1} = sample covariance of x (ddof=1). ``num_components`` is needed for alpha_0.

    Args:
      x: [N, D] data, N >= 2; num_components: K (Python int, 1 <= K <= N).
    Returns:
      :class:`BGMMPrior` in the dtype of ``x``: concentration [], mean_precision [], loc [D],
      dof [], scale_inv [D, D].
    Raises:
      TypeError: ``x`` is not a float32/float64 array; ``num_components`` is None or not a
        Python int.
      ValueError: ``x`` is not 2-D, has fewer than 2 rows or no columns, has N <= D rows
        (singular sample covariance), or has NaN/inf rows; ``num_components`` < 1 or > N.
    """
    x = check_data(x, "x", ndim=2, min_rows=2)
    if num_components is None:
        raise TypeError("default_prior needs num_components (alpha_0 = 1 / num_components)")
    k = check_num_components(num_components, x.shape[0])
    if x.shape[0] <= x.shape[1]:
        raise ValueError(f"default_prior needs more rows than columns in `x` (its scale_inv is "
                         f"the sample covariance, singular for N <= D); got N = {x.shape[0]}, "
                         f"D = {x.shape[1]}: build a BGMMPrior with a positive-definite "
                         f"scale_inv instead")
    centred = x - jnp.mean(x, axis=0, keepdims=True)
    cov = centred.T @ centred / (x.shape[0] - 1)
    return BGMMPrior(concentration=jnp.asarray(1.0 / k, x.dtype),
                     mean_precision=jnp.asarray(1.0, x.dtype), loc=jnp.mean(x, axis=0),
                     dof=jnp.asarray(float(x.shape[1]), x.dtype), scale_inv=cov)


# --- expectations under q -------------------------------------------------------------------

def _log_det_from_tril(tril: Array) -> Array:
    """log |L L^T| from a batch of lower Cholesky factors [..., D, D] -> [...]."""
    return 2.0 * jnp.sum(jnp.log(jnp.diagonal(tril, axis1=-2, axis2=-1)), axis=-1)


def _sum_lgamma_half(dof: Array, dim: int) -> Array:
    """sum_{i=1}^D lnG((nu + 1 - i) / 2) (the Wishart normaliser's gamma product)."""
    i = jnp.arange(dim, dtype=dof.dtype).reshape((1,) * dof.ndim + (dim,))
    return jnp.sum(gammaln(0.5 * (dof[..., None] - i)), axis=-1)


def _log_wishart_norm(log_det_scale: Array, dof: Array, dim: int) -> Array:
    """ln B(W, nu), PRML eq. B.79: -nu/2 ln|W| - nu D/2 ln 2 - D(D-1)/4 ln pi - sum lnG(.)."""
    return (-0.5 * dof * log_det_scale - 0.5 * dof * dim * _LOG_2
            - 0.25 * dim * (dim - 1) * math.log(math.pi) - _sum_lgamma_half(dof, dim))


def _log_dirichlet_norm(concentration: Array) -> Array:
    """ln C(alpha), PRML eq. B.23."""
    return gammaln(jnp.sum(concentration, axis=-1)) - jnp.sum(gammaln(concentration), axis=-1)


class _Expectations(NamedTuple):
    log_pi: Array  # [K] E ln pi_k (10.66)
    log_lambda: Array  # [K] E ln |Lambda_k| (10.65)
    log_det_scale: Array  # [K] ln |W_k|
    whitening: Array  # [K, D, D] L_k^{-1}, so W_k = L_k^{-T} L_k^{-1}


def _expectations(state: BGMMState, products_only: bool = False) -> _Expectations:
    """``products_only``: L_k^{-1} from matrix products (:mod:`vijax._linalg`), no LAPACK
    call; used on a mesh, where LAPACK kernels can deadlock host devices."""
    dim = state.loc.shape[-1]
    log_pi = digamma(state.concentration) - digamma(jnp.sum(state.concentration))
    log_det_scale = -_log_det_from_tril(state.scale_inv_tril)
    i = jnp.arange(dim, dtype=state.dof.dtype)
    log_lambda = (jnp.sum(digamma(0.5 * (state.dof[:, None] - i[None, :])), axis=-1) + dim * _LOG_2
                  + log_det_scale)
    inverse = _linalg.tril_inverse if products_only else tril_inverse
    return _Expectations(log_pi, log_lambda, log_det_scale, inverse(state.scale_inv_tril))


def _log_rho(state: BGMMState, x: Array, ex: _Expectations) -> Array:
    """ln rho_nk = E ln pi_k + E ln|Lambda_k|/2 - D/2 ln 2pi - E[(x-mu)^T Lambda (x-mu)]/2.

    PRML eqs 10.46 and 10.64: E[...] = D / beta_k + nu_k (x_n - m_k)^T W_k (x_n - m_k).
    Returns [N, K].
    """
    dim = x.shape[-1]
    maha = sq_mahalanobis(x, state.loc, ex.whitening)  # [N, K]
    expected_quad = (dim / state.mean_precision)[None, :] + state.dof[None, :] * maha
    log_weight = ex.log_pi + 0.5 * ex.log_lambda - 0.5 * dim * _LOG_2PI  # [K]
    return log_weight[None, :] - 0.5 * expected_quad


class Statistics(NamedTuple):
    """Responsibility-weighted statistics (PRML eqs 10.51-10.53)."""

    counts: Array  # [K] N_k = sum_n r_nk
    weighted_sum: Array  # [K, D] sum_n r_nk x_n  (= N_k xbar_k)
    means: Array  # [K, D] xbar_k (0 where N_k = 0)
    scatter: Array  # [K, D, D] N_k S_k = sum_n r_nk (x_n - xbar_k)(x_n - xbar_k)^T


def statistics(responsibilities: Array, x: Array) -> Statistics:
    """Weighted counts, means and scatter matrices of ``x`` [N, D] under ``responsibilities``
    [N, K] (PRML 10.51-10.53). Like scikit-learn, divides by ``N_k + 10 eps`` so empty
    components give finite values.

    Args:
      responsibilities: [N, K] q(z_n = k), rows summing to 1 (values not checked).
      x: [N, D] data, float32 or float64 (values not checked).
    Returns:
      :class:`Statistics` (counts [K], weighted_sum [K, D], means [K, D], scatter
      [K, D, D]) in the dtype of ``x``.
    Raises:
      TypeError: ``x`` is not a float32/float64 array; ``responsibilities`` is not real
        array-like.
      ValueError: ``x`` is not 2-D; ``responsibilities`` is not 2-D with as many rows as
        ``x``. Only shapes and dtypes are checked (this is a per-iteration kernel).
    """
    x = jnp.asarray(x)
    check_float_dtype(x, "x")
    if x.ndim != 2:
        raise ValueError(f"x must have shape [num_points, dim], got {x.shape}")
    r = as_float_array(responsibilities, "responsibilities")
    if r.ndim != 2 or r.shape[0] != x.shape[0]:
        raise ValueError(f"responsibilities must have shape [N={x.shape[0]}, K] to match x, "
                         f"got {r.shape}")
    return _statistics(r.astype(x.dtype), x)


def _statistics(responsibilities: Array, x: Array) -> Statistics:
    """:func:`statistics` without the checks."""
    # sum r x about the data mean c (em's M-step moments), so float32 sums stay accurate far
    # from the origin.
    counts, first_moment, centre = em._moments(x, responsibilities)
    weighted_sum = first_moment + counts[:, None] * centre[None, :]
    eps = jnp.finfo(x.dtype).eps
    means = weighted_sum / (counts + 10.0 * eps)[:, None]

    def component_scatter(args):  # one [D, N] x [N, D] matmul per component, centred
        r_k, mean_k = args
        diff = x - mean_k[None, :]
        return (diff * r_k[:, None]).T @ diff

    # lax.map keeps the working set at [N, D] (a [K, N, D] einsum is ~5x slower on CPU)
    scatter = jax.lax.map(component_scatter, (responsibilities.T, means))
    return Statistics(counts, weighted_sum, means, scatter)


class ConjugateUpdate(NamedTuple):
    """Parameters of the optimal q(pi) q(mu, Lambda) for given responsibilities."""

    concentration: Array  # [K] alpha_k = alpha_0 + N_k (10.58)
    mean_precision: Array  # [K] beta_k = beta_0 + N_k (10.60)
    loc: Array  # [K, D] m_k (10.61)
    dof: Array  # [K] nu_k = nu_0 + N_k (10.63)
    scale_inv: Array  # [K, D, D] W_k^{-1} (10.62)


def conjugate_update(stats: Statistics, prior: BGMMPrior) -> ConjugateUpdate:
    """PRML eqs 10.58, 10.60-10.63 from the statistics of q(Z).

    ``W_k^{-1} = W_0^{-1} + N_k S_k + beta_0 N_k / (beta_0 + N_k) (xbar_k - m_0)(xbar_k - m_0)^T``.
    Also valid for the improper limit beta_0 = 0, W_0^{-1} = 0 used by
    :mod:`vijax.meanfield.dirac_em` (when every N_k > 0).

    Args:
      stats: :class:`Statistics` from :func:`statistics` (counts [K], weighted_sum [K, D],
        means [K, D], scatter [K, D, D]).
      prior: :class:`BGMMPrior` with loc [D] and scale_inv [D, D] (values not checked; see
        :func:`check_prior`).
    Returns:
      :class:`ConjugateUpdate`: concentration [K], mean_precision [K], loc [K, D], dof [K],
      scale_inv [K, D, D].
    Raises:
      TypeError: ``stats`` is not a :class:`Statistics` or ``prior`` not a
        :class:`BGMMPrior`.
      ValueError: the fields of ``stats`` are not [K], [K, D], [K, D], [K, D, D]; ``prior``'s
        dimension differs from the statistics' D. Only shapes are checked.
    """
    check_state_type(stats, Statistics, "stats")
    k_shape = jnp.shape(stats.counts)
    k = k_shape[0] if len(k_shape) == 1 else -1
    means_shape = jnp.shape(stats.means)
    d = means_shape[-1] if len(means_shape) == 2 else -1
    for field, shape in {"counts": (k,), "weighted_sum": (k, d), "means": (k, d),
                         "scatter": (k, d, d)}.items():
        if k < 0 or d < 0 or jnp.shape(getattr(stats, field)) != shape:
            raise ValueError(f"stats.{field} has shape {list(jnp.shape(getattr(stats, field)))};"
                             " expected counts [K], weighted_sum and means [K, D], scatter "
                             "[K, D, D]")
    check_prior_dimension(prior, d, "stats")
    return _conjugate_update(stats, prior)


def _conjugate_update(stats: Statistics, prior: BGMMPrior) -> ConjugateUpdate:
    """:func:`conjugate_update` without the checks."""
    counts = stats.counts
    concentration = prior.concentration + counts
    mean_precision = prior.mean_precision + counts
    loc = (prior.mean_precision * prior.loc[None, :] + stats.weighted_sum) / mean_precision[:, None]
    offset = stats.means - prior.loc[None, :]
    shrink = prior.mean_precision * counts / mean_precision
    scale_inv = (prior.scale_inv[None, :, :] + stats.scatter
                 + shrink[:, None, None] * offset[:, :, None] * offset[:, None, :])
    scale_inv = 0.5 * (scale_inv + jnp.swapaxes(scale_inv, -1, -2))
    return ConjugateUpdate(concentration, mean_precision, loc, prior.dof + counts, scale_inv)


# --- block updates --------------------------------------------------------------------------

def update_responsibilities(state: BGMMState, x: Array, prior: BGMMPrior) -> BGMMState:
    """q(Z) block, PRML eqs 10.46-10.49 with 10.64-10.66. Unchecked."""
    del prior  # q(Z) depends on the prior only through q(pi), q(mu, Lambda)
    log_rho = _log_rho(state, x, _expectations(state))
    return state._replace(responsibilities=categorical_update(log_rho))


def update_q_pi(state: BGMMState, x: Array, prior: BGMMPrior) -> BGMMState:
    """q(pi) block: alpha_k = alpha_0 + N_k, PRML eq. 10.58. Unchecked."""
    del x
    return state._replace(concentration=prior.concentration
                          + jnp.sum(state.responsibilities, axis=0))


def update_q_mu_lambda(state: BGMMState, x: Array, prior: BGMMPrior) -> BGMMState:
    """q(mu, Lambda) block, PRML eqs 10.60-10.63 (nu_k = nu_0 + N_k). Unchecked."""
    upd = _conjugate_update(_statistics(state.responsibilities, x), prior)
    return state._replace(mean_precision=upd.mean_precision, loc=upd.loc, dof=upd.dof,
                          scale_inv_tril=jnp.linalg.cholesky(upd.scale_inv))


UPDATE_FNS = (unpack_data(update_responsibilities), unpack_data(update_q_pi),
              unpack_data(update_q_mu_lambda))
"""The three blocks in driver form ``(state, (x, prior)) -> state``, in PRML's order."""


# --- ELBO -----------------------------------------------------------------------------------

def _elbo(state: BGMMState, x: Array, prior: BGMMPrior, shards=None) -> Array:
    """The full ELBO; inside :func:`vijax.em._on_mesh` (``shards`` given) ``x`` and the
    responsibilities are this device's rows (zero on padding rows, which then add nothing),
    the q(Z) terms are psum-ed and the small factorisations use matrix products only."""
    products_only = shards is not None
    ex = _expectations(state, products_only)
    # E ln p(X | Z, mu, Lambda) + E ln p(Z | pi) - E ln q(Z)        (10.71, 10.72, 10.75)
    term_z = em._total(categorical_elbo_term(_log_rho(state, x, ex), state.responsibilities),
                       shards)
    return _elbo_given_term_z(state, prior, ex, term_z, products_only)


def _elbo_given_term_z(state: BGMMState, prior: BGMMPrior, ex: _Expectations,
                       term_z: Array, products_only: bool = False) -> Array:
    """The ELBO from its q(Z)-dependent part ``term_z`` and the closed-form rest."""
    dim = state.loc.shape[-1]
    num_components = state.concentration.shape[0]
    # E ln p(pi) - E ln q(pi)                                          (10.73, 10.76)
    alpha0 = jnp.full((num_components,), prior.concentration)
    term_pi = (_log_dirichlet_norm(alpha0) - _log_dirichlet_norm(state.concentration)
               + jnp.sum((alpha0 - state.concentration) * ex.log_pi))
    # E ln p(mu, Lambda)                                               (10.74)
    if products_only:
        prior_tril = _linalg.cholesky_and_inverse(prior.scale_inv)[0]
    else:
        prior_tril = jnp.linalg.cholesky(prior.scale_inv)
    # Tr(W_0^{-1} W_k) = |L_k^{-1} C_0|_F^2 with W_0^{-1} = C_0 C_0^T
    trace_w0inv_wk = jnp.sum(jnp.square(ex.whitening @ prior_tril[None, :, :]), axis=(-2, -1))
    centre = sq_mahalanobis(prior.loc[None, :], state.loc, ex.whitening)[0]  # [K]
    log_det_prior_scale = -_log_det_from_tril(prior_tril)
    e_log_p = (0.5 * jnp.sum(dim * jnp.log(prior.mean_precision / (2.0 * math.pi)) + ex.log_lambda
                             - dim * prior.mean_precision / state.mean_precision
                             - prior.mean_precision * state.dof * centre)
               + num_components * _log_wishart_norm(log_det_prior_scale, prior.dof, dim)
               + 0.5 * (prior.dof - dim - 1.0) * jnp.sum(ex.log_lambda)
               - 0.5 * jnp.sum(state.dof * trace_w0inv_wk))
    # E ln q(mu, Lambda) with H[q(Lambda_k)] from PRML eq. B.82        (10.77)
    entropy_wishart = (-_log_wishart_norm(ex.log_det_scale, state.dof, dim)
                       - 0.5 * (state.dof - dim - 1.0) * ex.log_lambda + 0.5 * state.dof * dim)
    e_log_q = jnp.sum(0.5 * ex.log_lambda
                      + 0.5 * dim * jnp.log(state.mean_precision / (2.0 * math.pi))
                      - 0.5 * dim - entropy_wishart)
    return term_z + term_pi + e_log_p - e_log_q


def elbo(state: BGMMState, x, prior: BGMMPrior) -> Array:
    """The full ELBO of PRML eq. 10.70 (terms 10.71-10.77), in nats, for any valid state.

    Unlike scikit-learn's ``lower_bound_`` no constant is dropped and it does not assume
    q(pi) q(mu, Lambda) is at its optimum, so it can be compared with perturbed states and
    across priors. After a q(pi), q(mu, Lambda) update it equals sklearn's bound plus
    ``ln C(alpha_0) + K [D/2 ln beta_0 + ln B(W_0, nu_0) + D(D-1)/4 ln pi] - N D/2 ln 2pi``
    (derivation in docs/meanfield.md; checked in tests).

    Args:
      state: :class:`BGMMState`; x: [N, D]; prior: :class:`BGMMPrior`.
    Returns:
      [] the ELBO itself (not its negative), in nats, dtype of ``x``.
    Raises:
      TypeError: ``x`` is not a float32/float64 array; ``prior`` is not a :class:`BGMMPrior`
        (or a field is not real); ``state`` is not a :class:`BGMMState`.
      ValueError: ``x`` is not 2-D, is empty or has NaN/inf rows; ``prior`` has the wrong
        shapes or values out of range (:func:`check_prior`); ``state``'s fields do not have
        the shapes [N, K], [K], [K], [K, D], [K], [K, D, D]. For concrete (non-traced)
        values also: ``state.responsibilities`` negative, non-finite or with rows not
        summing to 1 (within 1e-4); ``state.concentration`` or ``state.mean_precision``
        not > 0; ``state.dof`` not > D - 1; ``state.loc`` not finite;
        ``state.scale_inv_tril`` not finite or without a positive diagonal. Each message
        names the argument or field.
    """
    x, prior = _checked(x, prior)
    return _elbo(_check_state(state, x, responsibilities=True), x, prior)


# --- init / step / fit ----------------------------------------------------------------------

def _params_from_responsibilities(responsibilities: Array, x: Array, prior: BGMMPrior) -> BGMMState:
    k = responsibilities.shape[1]
    d = x.shape[1]
    empty = BGMMState(responsibilities=responsibilities, concentration=jnp.zeros((k,), x.dtype),
                      mean_precision=jnp.ones((k,), x.dtype), loc=jnp.zeros((k, d), x.dtype),
                      dof=jnp.ones((k,), x.dtype), scale_inv_tril=jnp.zeros((k, d, d), x.dtype))
    return update_q_mu_lambda(update_q_pi(empty, x, prior), x, prior)


def init_from_responsibilities(x, responsibilities, prior: BGMMPrior) -> BGMMState:
    """State whose q(pi), q(mu, Lambda) are the optimal blocks for the given q(Z).

    This is scikit-learn's ``_initialize(X, resp)``; a following :func:`step` then matches one
    sklearn ``_e_step`` + ``_m_step``.

    Args:
      x: [N, D] data; responsibilities: [N, K] rows summing to 1; prior: :class:`BGMMPrior`.
    Returns:
      :class:`BGMMState` in the dtype of ``x`` (responsibilities [N, K], concentration [K],
      mean_precision [K], loc [K, D], dof [K], scale_inv_tril [K, D, D]).
    Raises:
      TypeError: ``x`` is not a float32/float64 array; ``prior`` is not a :class:`BGMMPrior`
        or one of its fields is not real array-like; ``responsibilities`` is not real
        array-like.
      ValueError: ``x`` is not 2-D, has no rows or no columns, or has NaN/inf rows;
        ``prior.loc`` / ``prior.scale_inv`` is not [D] / [D, D]; a prior field is out of
        range (see :func:`check_prior`); ``responsibilities`` is not [N, K] with
        1 <= K <= N, or has negative or non-finite entries or rows not summing to 1 (within
        1e-4; concrete values only). The message names the argument.
    """
    x, prior = _checked(x, prior)
    r = check_responsibilities(responsibilities, x.shape[0], x.dtype)
    return _params_from_responsibilities(r, x, prior)


def init(rng_key: Array, x, num_components: int, prior: BGMMPrior) -> BGMMState:
    """Random start: K distinct data points are drawn as centres, each point is assigned
    (one-hot) to its nearest centre, and q(pi), q(mu, Lambda) are updated from that q(Z).

    Args:
      rng_key: PRNG key (``jax.random.key(seed)``). x: [N, D] data. num_components: K
        (Python int, 1 <= K <= N). prior: :class:`BGMMPrior` (e.g. :func:`default_prior`).
    Returns:
      :class:`BGMMState` with responsibilities [N, K] (other shapes as in
      :func:`init_from_responsibilities`), dtype of ``x``.
    Raises:
      TypeError: ``rng_key`` is not a JAX PRNG key (e.g. an int seed);
        ``x`` is not a float32/float64 array; ``prior`` is not a :class:`BGMMPrior`
        or one of its fields is not real array-like; ``num_components`` is not a Python int.
      ValueError: ``x`` is not 2-D, has no rows or no columns, or has NaN/inf rows;
        ``prior.loc`` / ``prior.scale_inv`` is not [D] / [D, D]; a prior field is out of
        range (see :func:`check_prior`); ``num_components`` < 1 or > N.
    """
    check_rng_key(rng_key)
    x, prior = _checked(x, prior)
    k = check_num_components(num_components, x.shape[0])
    r = nearest_centre_responsibilities(rng_key, x, k)
    return _params_from_responsibilities(r, x, prior)


def _one_pass_step(state: BGMMState, x: Array, prior: BGMMPrior,
                   chunk_size: int | None = None, weights: Array | None = None,
                   shards=None) -> tuple[BGMMState, BGMMInfo]:
    """The same sweep and ELBO as the block functions, reading ``x`` once (float64).

    The q(Z) update and the statistics of PRML 10.51-10.53 come from one streamed pass
    (:func:`vijax.em.one_pass_sums`: E ln rho_nk is a Gaussian log-density with precision
    nu_k W_k = U_k U_k^T, U_k = sqrt(nu_k) L_k^{-T}, plus constants). The ELBO's
    q(Z)-dependent part is then PRML 10.71 + 10.72 - 10.75 from those statistics:
    sum_k N_k [E ln pi_k + E ln|Lambda_k| / 2 - D / (2 beta_k) - D/2 ln 2 pi]
    - 1/2 sum_k nu_k Tr(W_k Q_k) - sum_nk r_nk ln r_nk, with
    Q_k = sum_n r_nk (x_n - m_k)(x_n - m_k)^T at the *new* m_k, so no second pass is needed.

    Inside :func:`vijax.em._on_mesh` (``shards`` given) ``x`` is this device's rows, ``weights``
    masks padding rows, the sums are totals over all devices, the returned responsibilities
    are this device's rows, and the small factorisations use matrix products only.
    """
    products_only = shards is not None
    log_const, chol = _log_rho_as_gaussian(state, _expectations(state, products_only))
    sums = em.one_pass_sums(x, log_const, state.loc, chol, _chunk(state, x, chunk_size),
                            keep_responsibilities=True, weights=weights, shards=shards)
    counts, first = sums.counts, sums.first_moment  # first: sum r (x - c)
    eps = jnp.finfo(x.dtype).eps
    means_c = first / (counts + 10.0 * eps)[:, None]
    stats = Statistics(counts, first + counts[:, None] * sums.centre[None, :],
                       means_c + sums.centre[None, :], sums.scatter_about(means_c))

    def quad_about(loc):
        return sums.scatter_about(loc - sums.centre[None, :])

    one_pass = _update_and_elbo(sums.responsibilities, stats, quad_about, sums.neg_entropy,
                                prior, products_only)
    # Too little accuracy left in the uncentred sums (em.one_pass_risk)? Redo it centred.
    new_chol = _log_rho_as_gaussian(one_pass[0], _expectations(one_pass[0], products_only))[1]
    risk = em.one_pass_risk(sums, chol, new_chol)
    return jax.lax.cond(
        em._any_over_batch(~(risk <= em._ONE_PASS_MAX_RISK)),
        lambda: _two_pass_step(state, x, prior, chunk_size, weights, shards), lambda: one_pass)


def _chunk(state: BGMMState, x: Array, chunk_size: int | None) -> int:
    n, dim = x.shape
    return em._default_chunk_size(n, state.loc.shape[0], dim) if chunk_size is None else chunk_size


def _log_rho_as_gaussian(state: BGMMState, ex: _Expectations) -> tuple[Array, Array]:
    """ln rho_nk (PRML 10.46, 10.64-10.66) as a Gaussian form for :mod:`vijax.em`'s kernels:
    ``log_const_k - 1/2 ||(x_n - m_k)^T U_k||^2`` with U_k = sqrt(nu_k) L_k^{-T} (upper
    triangular, U_k U_k^T = nu_k W_k). Returns ``(log_const [K], U [K, D, D])``."""
    dim = state.loc.shape[-1]
    chol = jnp.sqrt(state.dof)[:, None, None] * jnp.swapaxes(ex.whitening, -1, -2)
    log_const = (ex.log_pi + 0.5 * ex.log_lambda - 0.5 * dim * _LOG_2PI
                 - 0.5 * dim / state.mean_precision)
    return log_const, chol


def _update_and_elbo(responsibilities: Array, stats: Statistics, quad_about: Callable,
                     neg_entropy: Array, prior: BGMMPrior, products_only: bool
                     ) -> tuple[BGMMState, BGMMInfo]:
    """q(pi) and q(mu, Lambda) from the statistics of the new q(Z) (one conjugate update), and
    the ELBO after the sweep without another pass over x: its q(Z) part (PRML 10.71 + 10.72 -
    10.75) is sum_k N_k [E ln pi_k + E ln|Lambda_k| / 2 - D / (2 beta_k) - D/2 ln 2 pi]
    - 1/2 sum_k nu_k Tr(W_k Q_k) - sum_nk r_nk ln r_nk, with ``quad_about(m) [K, D, D]`` =
    Q_k = sum_n r_nk (x_n - m_k)(x_n - m_k)^T at the new m_k and ``neg_entropy`` =
    sum r ln r (totals over all devices on a mesh)."""
    dim = stats.means.shape[-1]
    upd = _conjugate_update(stats, prior)
    if products_only:
        scale_inv_tril = _linalg.cholesky_and_inverse(upd.scale_inv)[0]
    else:
        scale_inv_tril = jnp.linalg.cholesky(upd.scale_inv)
    new = BGMMState(responsibilities=responsibilities, concentration=upd.concentration,
                    mean_precision=upd.mean_precision, loc=upd.loc, dof=upd.dof,
                    scale_inv_tril=scale_inv_tril)
    new_ex = _expectations(new, products_only)
    quad = quad_about(new.loc)
    trace_wq = jnp.sum((new_ex.whitening @ quad) * new_ex.whitening, axis=(-2, -1))
    term_z = (jnp.sum(stats.counts * (new_ex.log_pi + 0.5 * new_ex.log_lambda
                                      - 0.5 * dim / new.mean_precision - 0.5 * dim * _LOG_2PI))
              - 0.5 * jnp.sum(new.dof * trace_wq) - neg_entropy)
    return new, BGMMInfo(elbo=_elbo_given_term_z(new, prior, new_ex, term_z, products_only))


def _two_pass_step(state: BGMMState, x: Array, prior: BGMMPrior,
                   chunk_size: int | None = None, weights: Array | None = None,
                   shards=None) -> tuple[BGMMState, BGMMInfo]:
    """One sweep of the three block updates and the ELBO after it in two streamed passes over
    ``x``, centred at the data mean c (float32, and float64 where the one-pass sums would
    lose accuracy).

    Equal to ``sweep(UPDATE_FNS, ...)`` then :func:`elbo`: q(pi) and q(mu, Lambda) depend on
    q(Z) only, so both come from one :func:`conjugate_update` of the new responsibilities'
    statistics. Pass 1 (:func:`vijax.em.e_step_sums`, the EM E-step's kernel with ln rho as
    its log-joint, on x - c): responsibilities, N_k, sum r (x - c) and sum r ln r; pass 2
    (:func:`vijax.em.scatter_sums`): the scatter about the new means xbar_k, as scikit-learn
    computes it. The ELBO follows from these (:func:`_update_and_elbo`, with Q_k = N_k S_k +
    N_k (xbar_k - m_k)(xbar_k - m_k)^T, no cancellation). Inside :func:`vijax.em._on_mesh`
    (``shards`` given) ``x`` is this device's rows, ``weights`` zeroes the padding rows'
    responsibilities, the sums are psum-ed and the factorisations use matrix products only.
    """
    products_only = shards is not None
    log_const, chol = _log_rho_as_gaussian(state, _expectations(state, products_only))
    full = em.Full()
    centre = em._row_mean(x, shards)  # both passes work on x - c
    terms = full._mahalanobis_terms(state.loc - centre[None, :], chol)

    def log_rho_chunk(xb):
        return log_const[None, :] - 0.5 * full._sq_mahalanobis(xb, terms)

    chunk = _chunk(state, x, chunk_size)
    resp, _, counts, first_moment, neg_entropy = em.e_step_sums(
        log_rho_chunk, x, chunk, with_entropy=True, weights=weights, shards=shards,
        centre=centre)
    means_c = first_moment / (counts + 10.0 * jnp.finfo(x.dtype).eps)[:, None]
    scatter = em.scatter_sums(full, x, resp, means_c, chunk, shards, centre)
    means = means_c + centre[None, :]
    weighted_sum = first_moment + counts[:, None] * centre[None, :]

    def quad_about(loc):
        offset = means - loc
        return scatter + counts[:, None, None] * offset[:, :, None] * offset[:, None, :]

    return _update_and_elbo(resp, Statistics(counts, weighted_sum, means, scatter), quad_about,
                            neg_entropy, prior, products_only)


def _step_fn(dtype) -> Callable:
    """float64: the one-pass sweep (x read once); float32: the centred two-pass sweep, whose
    scatter does not lose the digits the uncentred sums would."""
    return _one_pass_step if dtype == jnp.float64 else _two_pass_step


def _sweep_fn(x: Array, prior: BGMMPrior, *args):
    """``state -> (state, [] ELBO)``: the step for ``x``'s dtype in the form of
    :func:`vijax.meanfield._cavi.cavi_loop`'s sweep (``args`` as in :func:`_one_pass_step`)."""
    step_fn = _step_fn(x.dtype)

    def sweep_and_elbo(state):
        new, info = step_fn(state, x, prior, *args)
        return new, info.elbo
    return sweep_and_elbo


def step(state: BGMMState, x, prior: BGMMPrior, *, mesh=None
         ) -> tuple[BGMMState, BGMMInfo]:
    """One CAVI iteration: q(Z), then q(pi), then q(mu, Lambda); returns the ELBO after it.

    Pure and jit-able (``jax.jit(step)``, or ``jax.jit(step, static_argnames="mesh")``); the
    per-iteration unit used by benchmarks and the equivalent of one scikit-learn ``_e_step`` +
    ``_m_step``. float64 data take the one-pass sweep (x read once; the centred two-pass
    sweep instead when :func:`vijax.em.one_pass_risk` says its uncentred sums would lose
    accuracy), float32 the centred two-pass sweep (the E-step, then the scatter about the new
    means, as scikit-learn); both
    stream x in row chunks and take the ELBO from the sweep's statistics.

    Args:
      state: :class:`BGMMState`; x: [N, D]; prior: :class:`BGMMPrior`.
      mesh: optional ``jax.sharding.Mesh``: the rows of x are split over all its devices
        with ``jax.shard_map`` (as in :func:`vijax.em.step`, docs/performance.md); each
        device streams its rows and the statistics and the ELBO's q(Z) terms are summed with
        ``psum`` (float64: one per sweep; float32: two, one per pass). The returned
        responsibilities stay split over the devices by rows (when N is a multiple of the
        device count; otherwise they are gathered), the rest of the state is replicated. Any
        N works (padding rows carry weight 0). The result equals the one-device step up to
        summation order.
    Returns:
      ``(state, BGMMInfo(elbo=[]))``; the ELBO is in nats (PRML 10.70), not negated.
    Raises:
      TypeError: ``x`` not float32/float64, ``prior`` not a :class:`BGMMPrior` (or a field not
        real), ``state`` not a :class:`BGMMState`, ``mesh`` not a Mesh.
      ValueError: ``x`` not 2-D or empty, N < K, the shapes of ``prior`` or of ``state``'s
        fields not matching ``x`` (all checked at trace time); NaN/inf rows of ``x``, prior
        values out of range (see :func:`check_prior`) and the state's parameters out of
        range (``concentration``, ``mean_precision`` not > 0, ``dof`` not > D - 1, ``loc``
        not finite, ``scale_inv_tril`` not finite with a positive diagonal), checked on
        concrete arrays only, so not inside ``jax.jit``. ``state.responsibilities`` are not
        value-checked: the step recomputes them before using them.
    """
    x, prior = _checked(x, prior)
    state = _check_state(state, x)
    em._check_mesh(mesh)
    if mesh is not None:
        return _step_on_mesh(state, x, prior, mesh)
    return _step_fn(x.dtype)(state, x, prior)


def _unpadded_responsibilities(state: BGMMState, n: int, mesh) -> BGMMState:
    """Drop the padding rows :func:`vijax.em._on_mesh` added (the result is then no longer
    split evenly: gathered on every device)."""
    resp = state.responsibilities
    if resp.shape[0] == n:
        return state
    if all(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types):
        resp = jax.reshard(resp, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    return state._replace(responsibilities=resp[:n])


def _run_on_mesh(body, mesh, state: BGMMState, x: Array, args, info_spec, row_args=()):
    """:func:`vijax.em._on_mesh` for the CAVI step and fit: ``body((params, *args), x_local,
    weights, shards, chunk_size, *row_locals) -> (state, info)`` with ``params`` the state
    without its responsibilities; returns the state with row-split responsibilities (padding
    dropped) and the replicated ``info``."""
    replicated = jax.sharding.PartitionSpec()
    out_specs = (BGMMState(em._row_spec(mesh), *([replicated] * 5)), info_spec)
    params = state._replace(responsibilities=None)
    new, info = em._on_mesh(body, mesh, (params,) + tuple(args), x, None,
                            num_components=state.loc.shape[0], out_specs=out_specs,
                            row_args=row_args)
    return _unpadded_responsibilities(new, x.shape[0], mesh), info


def _step_on_mesh(state: BGMMState, x: Array, prior: BGMMPrior, mesh
                  ) -> tuple[BGMMState, BGMMInfo]:
    def body(args, x_local, weights, shards, chunk_size):
        params, prior = args  # responsibilities are recomputed from the parameters
        return _step_fn(x_local.dtype)(params, x_local, prior, chunk_size, weights, shards)

    return _run_on_mesh(body, mesh, state, x, (prior,), BGMMInfo(jax.sharding.PartitionSpec()))


def fit(state: BGMMState, x, prior: BGMMPrior, *, tol: float = 1e-8, max_iter: int = 500,
        mesh=None) -> tuple[BGMMState, CAVIInfo]:
    """CAVI to convergence with :func:`vijax.meanfield.cavi` (relative ELBO tolerance ``tol``).

    Each iteration is :func:`step`: float64 data take the one-pass sweep (x read once per
    iteration, the ELBO from its sufficient statistics; the centred two-pass sweep instead
    where the uncentred sums would lose accuracy), float32 the centred two-pass sweep (equal
    to the three block updates and the full ELBO); both run the loop and stopping rule of
    :func:`vijax.meanfield.cavi`.

    Args:
      state, x, prior: as in :func:`step`.
      tol: relative ELBO tolerance (the stopping rule of :func:`vijax.meanfield.cavi`).
      max_iter: Python int, the maximum number of sweeps and the trace length.
      mesh: optional ``jax.sharding.Mesh``: the whole loop of sweeps (:func:`step` with
        ``mesh=``) runs inside one ``jax.shard_map`` with the rows of x and of the
        responsibilities split over the devices; same stopping rule and trace.
    Returns:
      ``(state, info)``; ``info.elbo`` is [max_iter] ELBO values in nats (NaN after
      convergence).
    Raises:
      TypeError / ValueError: as :func:`step`, and also (concrete values only) ValueError
      for ``state.responsibilities`` that are not row-stochastic (they give the initial
      ELBO); ValueError for a concrete ``tol < 0`` (or NaN) and ``max_iter`` < 1; TypeError
      for ``max_iter`` not an int (e.g. ``10.0``) or a ``tol`` that is not a number.
    """
    x, prior = _checked(x, prior)
    state = _check_state(state, x, responsibilities=True)
    check_loop_args(tol, max_iter)
    em._check_mesh(mesh)
    if mesh is not None:
        return _fit_on_mesh(state, x, prior, mesh, tol, max_iter)
    return cavi_loop(_sweep_fn(x, prior), state, _elbo(state, x, prior), tol=tol,
                     max_iter=max_iter)


def _fit_on_mesh(state: BGMMState, x: Array, prior: BGMMPrior, mesh, tol, max_iter: int
                 ) -> tuple[BGMMState, CAVIInfo]:
    def body(args, x_local, weights, shards, chunk_size, resp_local):
        params, prior, tol = args
        local_state = params._replace(responsibilities=resp_local)

        initial_elbo = _elbo(local_state, x_local, prior, shards)
        return cavi_loop(_sweep_fn(x_local, prior, chunk_size, weights, shards),
                         local_state, initial_elbo, tol=tol, max_iter=max_iter)

    tol = jnp.asarray(tol, x.dtype)
    return _run_on_mesh(body, mesh, state, x, (prior, tol),
                        CAVIInfo(*([jax.sharding.PartitionSpec()] * 4)),
                        row_args=(state.responsibilities,))


# --- summaries ------------------------------------------------------------------------------

def expected_weights(state: BGMMState) -> Array:
    """E_q[pi_k] = alpha_k / sum_j alpha_j, [K] (PRML eq. B.17 for q(pi) = Dir(alpha)).
    Components the data do not need fall to ~alpha_0 / (K alpha_0 + N) (PRML Fig. 10.6).

    Args:
      state: :class:`BGMMState` (its responsibilities are not used).
    Returns:
      [K] expected mixing weights, summing to 1, dtype of ``state.concentration``.
    Raises:
      TypeError: ``state`` is not a :class:`BGMMState` (e.g. a plain tuple or None).
      ValueError: ``state``'s q(pi) q(mu, Lambda) fields are not [K], [K], [K, D], [K],
        [K, D, D]; for concrete values, ``concentration`` or ``mean_precision`` not > 0,
        ``dof`` not > D - 1, ``loc`` not finite, ``scale_inv_tril`` not finite with a
        positive diagonal (the message names the field).
    """
    state = _check_params(state)
    return state.concentration / jnp.sum(state.concentration)


def expected_covariances(state: BGMMState) -> Array:
    """E_q[Lambda_k]^{-1} = W_k^{-1} / nu_k, [K, D, D] (scikit-learn's ``covariances_``;
    E[Lambda_k] = nu_k W_k, PRML eq. B.80).

    Args:
      state: :class:`BGMMState` (its responsibilities are not used).
    Returns:
      [K, D, D] covariance matrices in squared data units, dtype of
      ``state.scale_inv_tril``.
    Raises:
      As :func:`expected_weights`.
    """
    state = _check_params(state)
    tril = state.scale_inv_tril
    return tril @ jnp.swapaxes(tril, -1, -2) / state.dof[:, None, None]


def predict_responsibilities(state: BGMMState, x) -> Array:
    """q(z) for (new) points ``x`` [M, D] under the current q(pi) q(mu, Lambda): [M, K].

    The q(Z) update of PRML eqs 10.46-10.49 (with 10.64-10.66) applied to ``x``; the
    responsibilities stored in ``state`` are not used.

    Args:
      state: :class:`BGMMState` (e.g. from :func:`fit`); its parameters are cast to the dtype
        of ``x``.
      x: [M, D] points, float32 or float64.
    Returns:
      [M, K] responsibilities r_mk = q(z_m = k), rows summing to 1, dtype of ``x``.
    Raises:
      TypeError: ``x`` is not a float32/float64 array; ``state`` is not a
        :class:`BGMMState` (e.g. a plain tuple).
      ValueError: ``x`` is not 2-D, has no rows or no columns, or has NaN/inf rows (the
        NaN/inf check only for concrete ``x``, not under ``jit``); ``x`` has a number of
        columns other than the state's D; ``state``'s q(pi) q(mu, Lambda) fields have
        inconsistent shapes or (concrete values) are out of range, as for
        :func:`expected_weights`. The stored responsibilities are not checked.
    """
    x = check_data(x, "x", ndim=2)
    state = _check_params(state)
    if x.shape[1] != state.loc.shape[-1]:
        raise ValueError(f"x has {x.shape[1]} columns, state has dimension {state.loc.shape[-1]}")
    state = state._replace(**{f: jnp.asarray(getattr(state, f), x.dtype)
                              for f in ("concentration", "mean_precision", "loc", "dof",
                                        "scale_inv_tril")})
    return categorical_update(_log_rho(state, x, _expectations(state)))


__all__ = [
    "BGMMPrior", "BGMMState", "BGMMInfo", "Statistics", "ConjugateUpdate", "check_prior",
    "check_prior_dimension",
    "default_prior", "statistics", "conjugate_update", "update_responsibilities", "update_q_pi",
    "update_q_mu_lambda", "UPDATE_FNS", "elbo", "init", "init_from_responsibilities", "step",
    "fit", "expected_weights", "expected_covariances", "predict_responsibilities",
]
