"""Gaussian mixture models fitted by expectation maximisation (EM).

Model (PRML §9.2): z ~ Cat(pi), x | z = k ~ N(mu_k, Sigma_k), for K components in D
dimensions. EM maximises the log-likelihood log p(X | theta) = sum_n log sum_k pi_k
N(x_n | mu_k, Sigma_k) by block-coordinate ascent on the ELBO

    L(q, theta) = sum_n sum_k q_nk [log pi_k + log N(x_n | mu_k, Sigma_k) - log q_nk],
    log p(X | theta) = L(q, theta) + sum_n KL(q_n || p(z_n | x_n, theta))

("LVM blog post", section "Expectation Maximization", Eq. 2; "lecture 3", "EM algorithm
(block-coordinate optimization)"; PRML eq. 9.70):

* E-step: q_nk = p(z_n = k | x_n, theta), the responsibilities, computed in log space with
  logsumexp. The KL term is then zero, so the ELBO equals the log-likelihood.
* M-step: theta = argmax_theta L(q, theta) in closed form (PRML eqs. 9.24-9.27):
  N_k = sum_n q_nk, pi_k = N_k / N, mu_k = sum_n q_nk x_n / N_k,
  Sigma_k = sum_n q_nk (x_n - mu_k)(x_n - mu_k)^T / N_k + reg_covar * I.

The conventions follow scikit-learn's ``GaussianMixture`` so that both produce the same
iterates from the same parameters: ``reg_covar`` is added to the covariance diagonal in every
M-step, N_k carries a ``10 * eps`` guard, the per-iteration value recorded is the mean
log-likelihood computed in the E-step (that is, of the parameters *entering* the iteration),
and ``fit`` stops after the first iteration whose change of that value is below ``tol`` in
absolute value.

Covariance structures are the classes :class:`Full`, :class:`Diag` and :class:`Spherical`;
initialisations are :class:`KMeansPlusPlus` and :class:`RandomResponsibilities`. All of these
are static pytree nodes (they hold no arrays), so a :class:`GMMState` carries its covariance
type through ``jax.jit``, ``jax.vmap`` and ``lax.while_loop``.

Speed: the E-step and the M-step stream over the data in row chunks (``chunk_size``), so that
the per-chunk intermediates stay in cache. A float64 full-covariance step reads ``x`` once
(:func:`one_pass_sums`: uncentred sufficient statistics about the data mean, packed
quadratic features for D <= 28), unless :func:`one_pass_risk` says those statistics would
lose accuracy (e.g. a component collapsed far from the data mean), in which case the step is
recomputed centred; other steps read it twice (E-step, then the centred scatter, as
scikit-learn does), both about the data mean. ``step``/``fit_from_state``/``fit`` take
``mesh=`` to split the rows over several devices (``jax.shard_map``, one ``psum`` of the
sums per pass); on a CPU with ``--xla_force_host_platform_device_count=<cores>`` that uses
every core. See the Results page of the docs (``docs/results.md``) for the benchmark against scikit-learn. No function here calls ``jax.jit``:
the caller decides.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from vijax._checks import (check_int, check_num_components, check_real, check_rng_key,
                           check_row_stochastic, is_concrete)
from vijax._linalg import cholesky_and_inverse
from vijax._softmax import normalize_log_weights

Array = jax.Array

__all__ = [
    "CovarianceType",
    "Full",
    "Diag",
    "Spherical",
    "InitMethod",
    "KMeansPlusPlus",
    "RandomResponsibilities",
    "GMMState",
    "EMInfo",
    "FitInfo",
    "init",
    "state_from_parameters",
    "step",
    "m_step",
    "fit",
    "fit_from_state",
    "log_joint",
    "predict_proba",
    "log_likelihood",
    "elbo",
    "sample",
    "dense_covariances",
    # Low-level kernels: unchecked building blocks shared with vijax.meanfield.bayesian_gmm
    # (docs/performance.md). No argument checks; use the functions above unless you are
    # writing a new mixture step on top of the same streamed passes.
    "OnePassSums",
    "one_pass_sums",
    "one_pass_risk",
    "e_step_sums",
    "scatter_sums",
]

_LOG_2PI = math.log(2.0 * math.pi)


# ============================================================================================
# Covariance structures
# ============================================================================================


class CovarianceType(abc.ABC):
    """Covariance structure of the mixture components (a static, array-free pytree node).

    Subclasses: :class:`Full` (``[K, D, D]``), :class:`Diag` (``[K, D]``) and
    :class:`Spherical` (``[K]``). The methods with a leading underscore are the per-structure
    pieces of the E-step, the M-step and sampling.
    """

    @abc.abstractmethod
    def covariance_shape(self, num_components: int, dim: int) -> tuple[int, ...]:
        """Shape of ``GMMState.covariances`` (and of ``precision_cholesky``)."""

    @abc.abstractmethod
    def _precision_cholesky(self, covariances: Array, products_only: bool = False) -> Array:
        """Factor U with Sigma^{-1} = U U^T (upper triangular), or 1/sqrt(variances)."""

    @abc.abstractmethod
    def _log_det_precision_cholesky(self, precision_cholesky: Array, dim: int) -> Array:
        """log det U_k per component, ``[K]`` (= -1/2 log det Sigma_k)."""

    @abc.abstractmethod
    def _mahalanobis_terms(self, means: Array, precision_cholesky: Array) -> Any:
        """Pytree of arrays precomputed once per step for :meth:`_sq_mahalanobis`."""

    @abc.abstractmethod
    def _sq_mahalanobis(self, x: Array, terms: Any) -> Array:
        """(x_n - mu_k)^T Sigma_k^{-1} (x_n - mu_k) for a chunk ``x`` ``[B, D]``: ``[B, K]``."""

    @abc.abstractmethod
    def _scatter(self, responsibilities: Array, x: Array, means: Array) -> Array:
        """Weighted scatter of a chunk ``x`` ``[B, D]`` about ``means`` ``[K, D]``:
        sum_n r_nk (x_n - mu_k)(x_n - mu_k)^T, or its diagonal (``[K, D]``)."""

    @abc.abstractmethod
    def _covariances(self, scatter: Array, counts: Array, reg_covar: Array) -> Array:
        """Covariances from the summed scatter and the counts N_k (PRML eq. 9.25)."""

    @abc.abstractmethod
    def _scale_noise(self, covariances: Array, z: Array, eps: Array) -> Array:
        """Sigma_{z_s}^{1/2} eps_s for standard-normal ``eps`` ``[S, D]``: ``[S, D]``."""

    @abc.abstractmethod
    def _dense(self, covariances: Array, dim: int) -> Array:
        """The covariance matrices ``[K, D, D]``."""

    def _check_covariances(self, covariances: np.ndarray) -> None:
        """Raise ``ValueError`` unless the concrete covariances are positive definite."""
        if not np.all(np.isfinite(covariances)) or not np.all(covariances > 0):
            raise ValueError(
                f"`covariances` must be finite and positive for {type(self).__name__}()"
            )


# Samples per batch when scaling the noise of full-covariance samples.
_SAMPLE_BATCH = 4096


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class Full(CovarianceType):
    """A general covariance matrix per component: covariances ``[K, D, D]``.

    ``precision_cholesky[k]`` is the upper-triangular U_k with Sigma_k^{-1} = U_k U_k^T (as in
    scikit-learn), so log N(x | mu_k, Sigma_k) = -D/2 log 2 pi + log det U_k
    - 1/2 ||(x - mu_k)^T U_k||^2, one triangular-factor product per point.
    """

    def covariance_shape(self, num_components, dim):
        return (num_components, dim, dim)

    def _precision_cholesky(self, covariances, products_only=False):
        if products_only:  # inside shard_map: no LAPACK calls (see vijax/_linalg.py)
            return jnp.swapaxes(cholesky_and_inverse(covariances)[1], -1, -2)
        chol = jnp.linalg.cholesky(covariances)
        eye = jnp.broadcast_to(jnp.eye(covariances.shape[-1], dtype=covariances.dtype),
                               covariances.shape)
        inv_chol = jax.scipy.linalg.solve_triangular(chol, eye, lower=True)
        return jnp.swapaxes(inv_chol, -1, -2)

    def _log_det_precision_cholesky(self, precision_cholesky, dim):
        return jnp.sum(jnp.log(jnp.diagonal(precision_cholesky, axis1=-2, axis2=-1)), axis=-1)

    def _mahalanobis_terms(self, means, precision_cholesky):
        # One [D, K * D] matrix so that a chunk's whitening is a single matmul:
        # (x - mu_k) U_k = x U_k - mu_k U_k for all k at once.
        k, d = means.shape
        weight = jnp.transpose(precision_cholesky, (1, 0, 2)).reshape(d, k * d)
        offset = jnp.einsum("kd,kde->ke", means, precision_cholesky).reshape(k * d)
        return weight, offset

    def _sq_mahalanobis(self, x, terms):
        weight, offset = terms
        num_components = offset.shape[0] // x.shape[-1]
        y = (x @ weight - offset[None, :]).reshape(x.shape[0], num_components, x.shape[-1])
        return jnp.sum(y * y, axis=-1)

    def _scatter(self, responsibilities, x, means):
        if x.shape[-1] < 4:
            diff = x[:, None, :] - means[None, :, :]  # [B, K, D]
            return jnp.einsum("bk,bkd,bke->kde", responsibilities, diff, diff)
        # Component-major layout: one [D, B] x [B, D] product per component with no
        # transposes (measured ~15-25% faster than the row-major form for D >= 8).
        diff = x[None, :, :] - means[:, None, :]  # [K, B, D]
        weighted = responsibilities.T[:, :, None] * diff
        return jnp.einsum("kbd,kbe->kde", weighted, diff)

    def _covariances(self, scatter, counts, reg_covar):
        eye = jnp.eye(scatter.shape[-1], dtype=scatter.dtype)
        return scatter / counts[:, None, None] + reg_covar * eye[None, :, :]

    def _scale_noise(self, covariances, z, eps):
        chol = jnp.linalg.cholesky(covariances)  # [K, D, D]
        # L_{z_s} eps_s in batches of samples: O(batch D^2) memory, not O(S K D).
        return lax.map(lambda ze: chol[ze[0]] @ ze[1], (z, eps),
                       batch_size=min(z.shape[0], _SAMPLE_BATCH))

    def _dense(self, covariances, dim):
        return covariances

    def _check_covariances(self, covariances):
        sym = np.allclose(covariances, np.swapaxes(covariances, -1, -2), rtol=1e-6, atol=0)
        if not np.all(np.isfinite(covariances)) or not sym:
            raise ValueError("`covariances` must be finite and symmetric for Full()")
        if not np.all(np.linalg.eigvalsh(covariances) > 0):
            raise ValueError("`covariances` must be positive definite for Full()")


class _Diagonal(CovarianceType):
    """Shared pieces of :class:`Diag` and :class:`Spherical` (axis-aligned covariances)."""

    def _precision_cholesky(self, covariances, products_only=False):
        return lax.rsqrt(covariances)

    def _log_det_precision_cholesky(self, precision_cholesky, dim):
        return jnp.sum(jnp.log(precision_cholesky), axis=-1)

    def _mahalanobis_terms(self, means, precision_cholesky):
        return means, precision_cholesky

    def _sq_mahalanobis(self, x, terms):
        means, prec_chol = terms
        y = (x[:, None, :] - means[None, :, :]) * _per_dim(prec_chol, x.shape[-1])[None, :, :]
        return jnp.sum(y * y, axis=-1)

    def _scatter(self, responsibilities, x, means):
        diff = x[:, None, :] - means[None, :, :]  # [B, K, D]
        return jnp.einsum("bk,bkd->kd", responsibilities, diff * diff)

    def _covariances(self, scatter, counts, reg_covar):
        return scatter / counts[:, None] + reg_covar

    def _scale_noise(self, covariances, z, eps):
        return jnp.sqrt(_per_dim(covariances, eps.shape[-1]))[z] * eps

    def _dense(self, covariances, dim):
        eye = jnp.eye(dim, dtype=covariances.dtype)
        return _per_dim(covariances, dim)[:, :, None] * eye[None, :, :]


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class Diag(_Diagonal):
    """A diagonal covariance per component: covariances ``[K, D]`` (the variances)."""

    def covariance_shape(self, num_components, dim):
        return (num_components, dim)


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class Spherical(_Diagonal):
    """One variance per component, Sigma_k = sigma_k^2 I: covariances ``[K]``.

    The M-step variance is the mean over dimensions of the diagonal one (as scikit-learn).
    """

    def covariance_shape(self, num_components, dim):
        return (num_components,)

    def _log_det_precision_cholesky(self, precision_cholesky, dim):
        return dim * jnp.log(precision_cholesky)

    def _covariances(self, scatter, counts, reg_covar):
        return jnp.mean(super()._covariances(scatter, counts, reg_covar), axis=-1)


def _per_dim(values: Array, dim: int) -> Array:
    """``[K]`` spherical values broadcast explicitly to ``[K, D]``; ``[K, D]`` unchanged."""
    if values.ndim == 1:
        return jnp.broadcast_to(values[:, None], (values.shape[0], dim))
    return values


# ============================================================================================
# Initialisations
# ============================================================================================


class InitMethod(abc.ABC):
    """How :func:`init` chooses the initial responsibilities (static, array-free)."""

    @abc.abstractmethod
    def _responsibilities(self, rng_key: Array, x: Array, num_components: int) -> Array:
        """Initial responsibilities ``[N, K]``, rows summing to one."""


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class KMeansPlusPlus(InitMethod):
    """k-means++ seeding (Arthur & Vassilvitskii 2007, "k-means++: the advantages of careful
    seeding", Algorithm k-means++), then every point is assigned to its nearest seed.

    The first seed is a uniformly drawn data point; each further seed is drawn with probability
    proportional to the squared distance to the nearest seed so far. The initial parameters
    are the M-step of the one-hot nearest-seed responsibilities (cluster proportions, means and
    covariances). scikit-learn's ``init_params="k-means++"`` differs: it puts responsibility
    one on the seeds only, so its initial covariances are ``reg_covar * I``.
    """

    def _responsibilities(self, rng_key, x, num_components):
        # Distances are translation invariant; centring keeps the expanded squared distances
        # below from cancelling when the data sit far from the origin (float32 offsets).
        x = x - jnp.mean(x, axis=0, keepdims=True)
        keys = jax.random.split(rng_key, num_components)
        n = x.shape[0]
        first = x[jax.random.randint(keys[0], (), 0, n)]
        seeds = jnp.zeros((num_components, x.shape[1]), x.dtype).at[0].set(first)
        d2 = jnp.sum((x - first[None, :]) ** 2, axis=-1)

        def add_seed(k, carry):
            seeds, d2 = carry
            # log 0 = -inf: points already chosen cannot be drawn again.
            seed = x[jax.random.categorical(keys[k], jnp.log(d2))]
            return seeds.at[k].set(seed), jnp.minimum(d2, jnp.sum((x - seed[None, :]) ** 2, -1))

        seeds, _ = lax.fori_loop(1, num_components, add_seed, (seeds, d2))
        dist = (jnp.sum(x * x, axis=-1)[:, None] - 2.0 * x @ seeds.T
                + jnp.sum(seeds * seeds, axis=-1)[None, :])
        return jax.nn.one_hot(jnp.argmin(dist, axis=-1), num_components, dtype=x.dtype)


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class RandomResponsibilities(InitMethod):
    """Responsibilities drawn uniformly on (0, 1) and normalised per row (scikit-learn's
    ``init_params="random"``); the initial parameters are their M-step."""

    def _responsibilities(self, rng_key, x, num_components):
        u = jax.random.uniform(rng_key, (x.shape[0], num_components), x.dtype)
        return u / jnp.sum(u, axis=-1, keepdims=True)


# ============================================================================================
# State and infos
# ============================================================================================


class GMMState(NamedTuple):
    """Parameters of a Gaussian mixture and the EM bookkeeping (a pytree).

    Floating fields share the dtype of the data passed to :func:`init`.
    """

    weights: Array  # [K] mixing proportions pi_k, summing to one
    means: Array  # [K, D] component means mu_k
    covariances: Array  # Full: [K, D, D]; Diag: [K, D] variances; Spherical: [K] variances
    precision_cholesky: Array  # same shape as covariances: Full: upper-triangular U_k with
    #   Sigma_k^{-1} = U_k U_k^T; Diag/Spherical: 1 / sqrt(variances)
    iteration: Array  # [] int32, number of EM steps taken since init
    last_log_likelihood: Array  # [] mean log-likelihood (nats per sample) computed in the
    #   E-step of the last step, i.e. of the parameters *before* that step; -inf before any
    reg_covar: Array  # [] added to every covariance diagonal in each M-step (> 0)
    covariance_type: CovarianceType  # static structure (no array leaves)


class EMInfo(NamedTuple):
    """What one :func:`step` reports."""

    log_likelihood: Array  # [] mean log p(x_n | theta) over the data, nats, at the parameters
    #   entering the step; equals the mean ELBO after the E-step (KL = 0)
    component_counts: Array  # [K] N_k = sum_n responsibilities_nk (E-step)


class FitInfo(NamedTuple):
    """What :func:`fit` / :func:`fit_from_state` report."""

    log_likelihood: Array  # [max_iter] mean log-likelihood (nats) at each iteration's E-step
    #   (scikit-learn's ``lower_bounds_``); NaN after the last iteration run
    num_iterations: Array  # [] int32, iterations run
    converged: Array  # [] bool, |change of log_likelihood| < tol was reached


# ============================================================================================
# Argument checks (before tracing; numpy checks only on concrete values)
# ============================================================================================


def _check_float_array(x, name: str) -> Array:
    x = jnp.asarray(x)
    if x.dtype not in (jnp.float32, jnp.float64):
        raise TypeError(f"`{name}` must be a float32 or float64 array; got dtype {x.dtype}"
                        + ("" if jnp.issubdtype(x.dtype, jnp.floating) else
                           f" (cast it first, e.g. {name}.astype(float))"))
    return x


def _check_responsibilities(q, state: GMMState, x: Array) -> Array:
    """``q`` as the state's dtype after checking it is ``[N, K]`` and, when concrete, a
    row-stochastic matrix (finite, >= 0, rows summing to 1)."""
    q = _check_float_array(q, "responsibilities")
    if q.shape != (x.shape[0], state.means.shape[0]):
        raise ValueError(
            f"`responsibilities` must have shape {(x.shape[0], state.means.shape[0])}; "
            f"got {q.shape}"
        )
    check_row_stochastic(q, "`responsibilities`")
    return q.astype(state.means.dtype)


def _check_values(x, name: str) -> None:
    """For a concrete ``x`` (tracers pass), one host copy read twice: rows with NaN/inf, then
    entries too large for the dtype (:func:`_check_magnitude`); both ValueErrors name ``name``."""
    if not is_concrete(x):
        return
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        _check_global_values(x, name)
        return
    host = np.asarray(x)
    _check_finite_rows(host, name)
    _check_magnitude(host, name)


def _check_global_values(x: Array, name: str) -> None:
    """:func:`_check_values` for an array split over several processes (no process can read
    it whole): the per-row finiteness and the largest |x| are reduced on the devices, to
    values every process holds, so that every process raises the same ValueError."""
    replicated = NamedSharding(x.sharding.mesh, PartitionSpec()) if isinstance(
        x.sharding, NamedSharding) else None
    finite_rows, biggest = jax.jit(
        lambda a: (jnp.all(jnp.isfinite(a), axis=-1), jnp.max(jnp.abs(a))),
        out_shardings=replicated)(x)
    _check_finite_rows(None, name, bad=~np.asarray(finite_rows.addressable_data(0)))
    if x.size:
        limit = _magnitude_limit(x.dtype, x.size // x.shape[-1], x.shape[-1])
        _check_biggest(float(biggest.addressable_data(0)), limit, x.size // x.shape[-1],
                       x.dtype, name)


def _check_finite_rows(x: np.ndarray | None, name: str, *,
                       bad: np.ndarray | None = None) -> None:
    if bad is None:
        bad = ~np.all(np.isfinite(x), axis=-1)
    if np.any(bad):
        if bad.ndim == 0:
            raise ValueError(f"`{name}` (a single point) has NaN or inf values")
        rows = [tuple(i) if len(i) > 1 else i[0] for i in np.argwhere(bad)[:5].tolist()]
        raise ValueError(
            f"`{name}` has {int(bad.sum())} row(s) with NaN or inf values (first at "
            f"index {rows}); remove or impute them before fitting"
        )


def _check_data(x, name: str = "x", dim: int | None = None, *, matrix: bool = True) -> Array:
    """``x`` as a floating array ``[N, D]`` (``matrix``) or ``[..., D]``, finite if concrete."""
    x = _check_float_array(x, name)
    if matrix and x.ndim != 2:
        raise ValueError(f"`{name}` must be 2-D [num_points, dim]; got shape {x.shape}")
    if not matrix and x.ndim < 1:
        raise ValueError(f"`{name}` must have a trailing dimension [..., dim]; got a scalar")
    if dim is not None and x.shape[-1] != dim:
        raise ValueError(
            f"`{name}` has dimensionality {x.shape[-1]} but the mixture has dim {dim} "
            f"(shape {x.shape})"
        )
    if x.shape[0] == 0 and matrix:
        raise ValueError(f"`{name}` has no rows")
    if x.shape[-1] == 0:
        raise ValueError(f"`{name}` has no columns (dim 0); got shape {x.shape}")
    _check_values(x, name)
    return x


def _magnitude_limit(dtype, num_rows: int, dim: int) -> float:
    """The largest |x| :func:`_check_data` accepts: sqrt(max / (4 N D)) for the dtype's
    largest number ``max``, so that a sum over the N rows of squared distances between points
    (each at most D (2 |x|)^2) stays finite."""
    return math.sqrt(float(jnp.finfo(dtype).max) / (4.0 * max(num_rows, 1) * max(dim, 1)))


def _check_magnitude(x: np.ndarray, name: str) -> None:
    """ValueError naming ``name`` if the host array ``x`` has entries so large that EM's
    squared distances, summed over the rows, overflow its dtype (the fit would return
    non-finite parameters)."""
    if x.size == 0:
        return
    dim = x.shape[-1]
    num_rows = x.size // dim
    limit = _magnitude_limit(x.dtype, num_rows, dim)
    _check_biggest(float(np.max(np.abs(x))), limit, num_rows, x.dtype, name)


def _check_biggest(biggest: float, limit: float, num_rows: int, dtype, name: str) -> None:
    if biggest > limit:
        raise ValueError(
            f"`{name}` has entries up to {biggest:.3g} in absolute value: EM's squared "
            f"distances, summed over its {num_rows} row(s), would overflow {dtype} (largest "
            f"{float(jnp.finfo(dtype).max):.3g}); this data needs |x| <= {limit:.3g}: "
            "rescale it (e.g. standardize each column) or use float64")


def _check_reg_covar(reg_covar, dtype) -> Array:
    value = check_real(reg_covar, "`reg_covar`", exclusive_minimum=0.0, array=True)
    info = jnp.finfo(dtype)
    if value is not None and not float(info.tiny) <= value <= float(info.max):
        raise ValueError(f"`reg_covar` = {value:g} under- or overflows {jnp.dtype(dtype)}; use "
                         f"a value between {float(info.tiny):g} and {float(info.max):g}")
    return jnp.asarray(reg_covar, dtype=dtype)


def _check_covariance_type(covariance_type) -> CovarianceType:
    if not isinstance(covariance_type, CovarianceType):
        raise TypeError(
            "`covariance_type` must be Full(), Diag() or Spherical() (instances of "
            f"vijax.em.CovarianceType); got {covariance_type!r}"
        )
    return covariance_type


def _check_state_fields(state) -> GMMState:
    """``state`` itself after checking its type and its fields' shapes against K and D of
    ``state.means`` (so a field of the wrong shape cannot broadcast silently)."""
    if not isinstance(state, GMMState):
        raise TypeError(f"`state` must be a GMMState; got {type(state).__name__}")
    _check_covariance_type(state.covariance_type)
    if jnp.ndim(state.means) != 2:
        raise ValueError(
            f"`state.means` must have shape [K, D]; got {list(jnp.shape(state.means))}")
    k, d = state.means.shape
    cov_shape = state.covariance_type.covariance_shape(k, d)
    expected = {"weights": (k,), "covariances": cov_shape, "precision_cholesky": cov_shape,
                "iteration": (), "last_log_likelihood": (), "reg_covar": ()}
    for field, shape in expected.items():
        got = tuple(jnp.shape(getattr(state, field)))
        if got != tuple(shape):
            raise ValueError(f"`state.{field}` must have shape {list(shape)} for K = {k}, "
                             f"D = {d} ({type(state.covariance_type).__name__}()); got "
                             f"{list(got)}")
    return state


def _check_state(state, x, name: str = "x", *, matrix: bool = True) -> Array:
    _check_state_fields(state)
    x = _check_data(x, name, dim=state.means.shape[-1], matrix=matrix)
    if x.dtype != state.means.dtype:
        raise TypeError(
            f"`{name}` has dtype {x.dtype} but the state has {state.means.dtype}; cast one"
        )
    return x


# ============================================================================================
# Chunked streaming over rows
# ============================================================================================

# Rows per chunk: about this many entries in the [chunk, K * D] whitened block.
_CHUNK_ENTRIES = 2**17


def _default_chunk_size(num_points: int, num_components: int, dim: int) -> int:
    rows = max(_CHUNK_ENTRIES // (num_components * dim), 64)
    return min(1 << (rows.bit_length() - 1), num_points)


class _Shards(NamedTuple):
    """Rows of ``x`` split over the devices of a mesh (inside :func:`_on_mesh`)."""

    axes: tuple  # mesh axis names the rows are split over; totals are psum-ed over them
    num_rows: int  # N, the rows of all devices together, padding excluded


def _total(tree, shards: _Shards | None):
    """Sum of per-device partial sums (identity when the rows are not split)."""
    return tree if shards is None else lax.psum(tree, shards.axes)


def _row_mean(values: Array, shards: _Shards | None) -> Array:
    """Mean over the rows (axis 0) of all devices; padding rows must hold zeros."""
    if shards is None:
        return jnp.mean(values, axis=0)
    return _total(jnp.sum(values, axis=0), shards) / shards.num_rows


def _masked(values: Array, weights: Array | None) -> Array:
    """``values [B, ...]`` with the rows whose weight is 0 (padding) set to zero."""
    if weights is None:
        return values
    return values * weights.reshape(weights.shape + (1,) * (values.ndim - 1))


def _with_weights(x: Array, weights: Array | None) -> tuple:
    return (x,) if weights is None else (x, weights)


def _on_mesh(body: Callable, mesh, state, x: Array, chunk_size: int | None, *,
             num_components: int | None = None, out_specs=PartitionSpec(),
             row_args: tuple = ()):
    """Run ``body(state, x_local, weights_local, shards, chunk_size, *row_args_local)`` on every
    device of ``mesh`` with the rows of ``x`` (and of each ``[N, ...]`` array in ``row_args``,
    padded with zeros like ``x``) split over all the mesh's axes (``jax.shard_map``).

    ``state`` is replicated. ``body``'s outputs are replicated (its row sums go through
    :func:`_total`) unless ``out_specs`` says otherwise: :func:`_row_spec` marks per-row outputs,
    which come back with ``N`` rows rounded up to a multiple of the device count. When N is
    not a multiple of the device count, ``x`` is padded with zero rows that carry weight 0.
    ``num_components`` (default ``state.means.shape[0]``) sizes the default chunk.
    """
    n, d = x.shape
    size = mesh.size
    local_rows = -(-n // size)
    pad = local_rows * size - n
    shards = _Shards(tuple(mesh.axis_names), n)
    if chunk_size is None:
        k = state.means.shape[0] if num_components is None else num_components
        chunk_size = _default_chunk_size(local_rows, k, d)
    rows = _row_spec(mesh)

    def padded(a):
        return jnp.concatenate([a, jnp.zeros((pad,) + a.shape[1:], a.dtype)], axis=0)

    if pad:
        x, row_args = padded(x), tuple(padded(a) for a in row_args)
    weights = (jnp.arange(n + pad) < n).astype(x.dtype) if pad else None
    args = (state, x, weights) + tuple(row_args)
    in_specs = (PartitionSpec(), rows, rows if pad else PartitionSpec()) + (rows,) * len(row_args)

    if all(t == AxisType.Explicit for t in mesh.axis_types):  # e.g. from jax.make_mesh
        # shard_map only reshards arguments itself on meshes with automatic axes.
        args = tuple(jax.reshard(a, NamedSharding(mesh, sp)) for a, sp in zip(args, in_specs))

    def local(state, x_local, weights_local, *row_locals):
        return body(state, x_local, weights_local, shards, chunk_size, *row_locals)

    # check_vma=False: the chunk loops start from unsharded zeros; row sums are psum-ed.
    return jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                         check_vma=False)(*args)


def _row_spec(mesh) -> PartitionSpec:
    """The ``PartitionSpec`` of a ``[N, ...]`` array whose rows are split over all the axes of
    ``mesh`` (the layout :func:`_on_mesh` gives ``x``)."""
    return PartitionSpec(tuple(mesh.axis_names))


def _check_mesh(mesh) -> None:
    if mesh is not None and not isinstance(mesh, Mesh):
        raise TypeError(f"`mesh` must be a jax.sharding.Mesh or None; got {type(mesh).__name__}")


def _over_chunks(fn: Callable, arrays: tuple, chunk_size: int):
    """Apply ``fn(*chunk)`` to consecutive row chunks of ``arrays`` (same leading size N).

    ``fn`` returns ``(rows, totals)``: ``rows`` a pytree of per-row arrays ``[B, ...]``
    (gathered to ``[N, ...]``), ``totals`` a pytree summed over chunks. Full chunks run in a
    ``lax.fori_loop``; a shorter last chunk is a separate static-shape call.
    """
    n = arrays[0].shape[0]
    size = min(chunk_size, n)
    num_full, rest = divmod(n, size)

    def take(start, length):
        return tuple(lax.dynamic_slice_in_dim(a, start, length, axis=0) for a in arrays)

    if num_full == 1 and rest == 0:
        return fn(*arrays)
    rows_spec, totals_spec = jax.eval_shape(fn, *take(0, size))
    rows = jax.tree.map(lambda s: jnp.zeros((n,) + s.shape[1:], s.dtype), rows_spec)
    totals = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), totals_spec)

    def accumulate(start, chunk_out, carry):
        chunk_rows, chunk_totals = chunk_out
        rows, totals = carry
        rows = jax.tree.map(
            lambda r, c: lax.dynamic_update_slice_in_dim(r, c, start, axis=0), rows, chunk_rows
        )
        return rows, jax.tree.map(jnp.add, totals, chunk_totals)

    def body(i, carry):
        start = i * size
        return accumulate(start, fn(*take(start, size)), carry)

    carry = lax.fori_loop(0, num_full, body, (rows, totals))
    if rest:
        start = num_full * size
        carry = accumulate(start, fn(*(a[start:] for a in arrays)), carry)
    return carry


# ============================================================================================
# E-step and M-step kernels
# ============================================================================================


def _log_joint_fn(state: GMMState) -> Callable[[Array], Array]:
    """Returns a function of a chunk ``[B, D]`` giving log pi_k + log N(x | mu_k, Sigma_k)."""
    ct = state.covariance_type
    dim = state.means.shape[-1]
    const = (jnp.log(state.weights)
             + ct._log_det_precision_cholesky(state.precision_cholesky, dim)
             - 0.5 * dim * _LOG_2PI)
    terms = ct._mahalanobis_terms(state.means, state.precision_cholesky)

    def log_joint_chunk(x):
        return const[None, :] - 0.5 * ct._sq_mahalanobis(x, terms)

    return log_joint_chunk


def _chunk(state: GMMState, num_points: int, chunk_size: int | None) -> int:
    if chunk_size is not None:
        return chunk_size
    k, d = state.means.shape
    return _default_chunk_size(num_points, k, d)


def _e_step(state: GMMState, x: Array, chunk_size: int, weights: Array | None = None,
            shards: _Shards | None = None):
    """Responsibilities ``[N, K]`` (zero on masked rows), log p(x_n) ``[N]``, N_k ``[K]``,
    sum_n r_nk (x_n - c) ``[K, D]`` and the centre c = mean(x) ``[D]``, in one streamed pass
    (sums over all shards). The pass works on x - c, with the means shifted alike."""
    centre = _row_mean(x, shards)
    shifted = state._replace(means=state.means - centre[None, :])
    resp, log_norm, counts, first_moment, _ = e_step_sums(
        _log_joint_fn(shifted), x, chunk_size, weights=weights, shards=shards, centre=centre)
    return resp, log_norm, counts, first_moment, centre


def _moments(x: Array, responsibilities: Array) -> tuple[Array, Array, Array]:
    """``(N_k [K], sum_n r_nk (x_n - c) [K, D], c [D])`` about c = mean(x), in one block."""
    centre = jnp.mean(x, axis=0)
    return (jnp.sum(responsibilities, axis=0), responsibilities.T @ (x - centre[None, :]),
            centre)


def e_step_sums(log_joint_chunk_fn: Callable[[Array], Array], x: Array, chunk_size: int, *,
                with_entropy: bool = False, weights: Array | None = None,
                shards: _Shards | None = None, centre: Array | None = None):
    """The streamed E-step of a mixture for any log-joint: one pass over row chunks of ``x``.

    Low-level kernel, **unchecked**: no argument is validated (wrong shapes give JAX's own
    errors, invalid values give NaN); the public :func:`step` and
    :func:`vijax.meanfield.bayesian_gmm.step` check their inputs and then call it.

    Args:
      log_joint_chunk_fn: ``x_chunk [B, D] -> [B, K]``, the log-joint l_nk in nats (for EM
        log pi_k + log N(x_n | mu_k, Sigma_k); for the Bayesian GMM ln rho_nk). With
        ``centre`` it is called on x - c, so its means must be shifted by -c.
      x: ``[N, D]`` float32/float64 data.
      chunk_size: rows per streamed chunk (Python int >= 1).
      with_entropy: also return sum_nk r_nk ln r_nk.
      weights: ``[N]`` 0/1 row mask (rows with 0 get zero responsibilities) or None.
      shards: set inside :func:`_on_mesh`; the sums are then totals over all devices.
      centre: ``[D]`` c or None (c = 0); the first moment is taken about c, which keeps
        float32 sums accurate for data far from the origin.

    Returns:
      ``(responsibilities [N, K], log_norm [N], counts [K], first_moment [K, D],
      neg_entropy [])``, all in the dtype of ``x``: r_nk = softmax_k l_nk; log_norm =
      logsumexp_k l_nk (nats; log p(x_n) for EM); N_k = sum_n r_nk; sum_n r_nk (x_n - c)
      (data units); sum_nk r_nk ln r_nk (nats, <= 0; 0 unless ``with_entropy``).
    Used by the two-pass EM step and the Bayesian GMM's two-pass CAVI step.
    """
    def chunk_fn(xb, wb=None):
        if centre is not None:
            xb = xb - centre[None, :]
        log_norm, log_resp, resp = normalize_log_weights(log_joint_chunk_fn(xb))
        resp = _masked(resp, wb)
        totals = (jnp.sum(resp, axis=0), resp.T @ xb)
        if with_entropy:
            totals += (jnp.sum(resp * log_resp),)
        return (resp, log_norm), totals

    (resp, log_norm), totals = _over_chunks(chunk_fn, _with_weights(x, weights), chunk_size)
    totals = _total(totals, shards)
    neg_entropy = totals[2] if with_entropy else jnp.zeros((), x.dtype)
    return resp, log_norm, totals[0], totals[1], neg_entropy


def scatter_sums(covariance_type, x: Array, responsibilities: Array, means: Array,
                 chunk_size: int, shards: _Shards | None = None,
                 centre: Array | None = None) -> Array:
    """Weighted scatter about given means in one streamed pass: the M-step's second pass,
    centred as in scikit-learn.

    Low-level kernel, **unchecked**: no argument is validated (wrong shapes give JAX's own
    errors, invalid values give NaN).

    Args:
      covariance_type: ``Full()``, ``Diag()`` or ``Spherical()`` (the output layout).
      x: ``[N, D]`` float32/float64 data.
      responsibilities: ``[N, K]`` r_nk in the dtype of ``x``.
      means: ``[K, D]`` m_k (about ``centre`` when it is given: m_k - c).
      chunk_size: rows per streamed chunk (Python int >= 1).
      shards: set inside :func:`_on_mesh`; the sums are then totals over all devices.
      centre: ``[D]`` c or None; the rows are shifted by -c like the means.

    Returns:
      sum_n r_nk (x_n - m_k)(x_n - m_k)^T in squared data units (times counts), dtype of
      ``x``: ``[K, D, D]`` for ``Full()``, its diagonal ``[K, D]`` for ``Diag()`` and for
      ``Spherical()`` (whose M-step averages it over the D dimensions afterwards).
    """
    def chunk_fn(xb, rb):
        if centre is not None:
            xb = xb - centre[None, :]
        return (), covariance_type._scatter(rb, xb, means)

    _, scatter = _over_chunks(chunk_fn, (x, responsibilities), chunk_size)
    return _total(scatter, shards)


def _m_step(covariance_type, x, resp, counts, first_moment, centre, reg_covar, chunk_size,
            shards: _Shards | None = None):
    """Closed-form M-step (PRML eqs. 9.24-9.27) from the E-step sums N_k and
    sum_n r_nk (x_n - c) about ``centre`` c; returns the parameters ``(weights, means,
    covariances, precision_cholesky)``. The covariances are centred at the new means (a second
    pass over ``x``), as in scikit-learn."""
    counts = counts + 10 * jnp.finfo(x.dtype).eps
    means_c = first_moment / counts[:, None]
    scatter = scatter_sums(covariance_type, x, resp, means_c, chunk_size, shards, centre)
    covariances = covariance_type._covariances(scatter, counts, reg_covar)
    weights = counts / jnp.sum(counts)
    return weights, means_c + centre[None, :], covariances, covariance_type._precision_cholesky(
        covariances, products_only=shards is not None)


def _with_parameters(state: GMMState, params) -> GMMState:
    weights, means, covariances, precision_cholesky = params
    return state._replace(weights=weights, means=means, covariances=covariances,
                          precision_cholesky=precision_cholesky)


# ============================================================================================
# One-pass full-covariance step (float64)
# ============================================================================================

# Up to this dimension the one-pass step uses packed quadratic features; above it, the
# whitened form with a two-block split of the triangular factors (see docs/performance.md).
_PACKED_MAX_DIM = 28


def _transposed(a: Array) -> Array:
    """``a.T`` stored transposed. XLA would otherwise fold the transpose into the product that
    reads it (``a.T @ b`` contracting a's leading axis), which XLA:CPU runs as an Eigen dot at
    about half the speed of the YNNPACK product it emits for a ``[M, B] x [B, N]`` operand in
    row-major order (measured on the one-pass step's chunk products: the step is 5-15 % faster;
    docs/performance.md)."""
    return lax.optimization_barrier(a.T)


def _packed_outer(x: Array) -> Array:
    """``[B, D] -> [B, D(D+1)/2]``: the products x_i x_j for i <= j, row-major (static slices,
    no gathers)."""
    d = x.shape[-1]
    return jnp.concatenate([x[:, i:i + 1] * x[:, i:] for i in range(d)], axis=1)


def _unpack_symmetric(packed: Array, dim: int) -> Array:
    """``[K, D(D+1)/2]`` upper triangles (row-major) -> symmetric ``[K, D, D]``."""
    rows, cols = np.triu_indices(dim)
    upper = jnp.zeros(packed.shape[:-1] + (dim, dim), packed.dtype).at[..., rows, cols].set(packed)
    return upper + jnp.swapaxes(upper, -1, -2) - upper * jnp.eye(dim, dtype=packed.dtype)[None]


class OnePassSums(NamedTuple):
    """Output of the low-level kernel :func:`one_pass_sums` (unchecked): all sums over the N
    rows (over all devices on a mesh), about the centre c; every array has the dtype of x.
    """

    log_norm: Array  # [N] logsumexp_k of the log-joint (log p(x_n) for EM), nats
    responsibilities: Array | None  # [N, K] r_nk when requested, else None
    neg_entropy: Array  # [] sum_nk r_nk log r_nk, nats, <= 0 (0 unless responsibilities
    #   were requested)
    centre: Array  # [D] c, the mean of x (data units)
    counts: Array  # [K] N_k = sum_n r_nk (effective numbers of points)
    first_moment: Array  # [K, D] sum_n r_nk (x_n - c) (data units)
    second_moment: Array  # [K, D, D] sum_n r_nk (x_n - c)(x_n - c)^T (squared data units)
    max_sq_radius: Array  # [] max_n ||x_n - c||^2, squared data units (for one_pass_risk)

    def scatter_about(self, locs_c: Array) -> Array:
        """``[K, D, D]`` sum_n r_nk (x_n - l_k)(x_n - l_k)^T (squared data units) for
        l_k = c + ``locs_c[k]`` (``locs_c`` ``[K, D]``), exactly expanded from the uncentred
        sums. Unchecked."""
        cross = self.first_moment[:, :, None] * locs_c[:, None, :]
        return (self.second_moment - cross - jnp.swapaxes(cross, -1, -2)
                + self.counts[:, None, None] * locs_c[:, :, None] * locs_c[:, None, :])


def one_pass_sums(x: Array, log_const: Array, locs: Array, precision_cholesky: Array,
                  chunk_size: int, *, keep_responsibilities: bool = False,
                  weights: Array | None = None, shards: _Shards | None = None) -> OnePassSums:
    """E-step of a full-covariance mixture and its sufficient statistics in one read of x.

    For log-joint values l_nk = log_const_k - 1/2 ||(x_n - locs_k)^T U_k||^2 (U_k =
    ``precision_cholesky[k]``, upper triangular) this computes r_nk = softmax_k l_nk and, per
    row chunk while it is in cache, the *uncentred* sums about c = mean(x): N_k,
    sum r (x - c) and S_k = sum r (x - c)(x - c)^T. Callers form centred scatters as
    S_k - N_k m m^T, which loses about ||m - c||^2 / lambda_min units of roundoff: harmless
    in float64 for ordinary data, which is why only float64 uses this pass, and bounded by
    :func:`one_pass_risk` (callers redo the step centred above ``_ONE_PASS_MAX_RISK``).
    Used by the EM step here and by the Bayesian GMM's CAVI step
    (:mod:`vijax.meanfield.bayesian_gmm`, where U_k = sqrt(nu_k) L_k^{-T} and log_const
    carries E ln pi_k, E ln |Lambda_k| / 2 and -D / (2 beta_k)).

    Layout: for D <= ``_PACKED_MAX_DIM`` both the squared distances and S_k come from the
    packed features f(x) = (x_i x_j)_{i<=j}: (x - m)^T Lambda (x - m) = f(x) . a(Lambda)
    - 2 x^T Lambda m + m^T Lambda m, one ``[B, D(D+1)/2] x [D(D+1)/2, K]`` product, and
    S_k = r^T f, one ``[K, B] x [B, D(D+1)/2]`` product. Above it, the whitened form with
    U_k's columns split in two blocks (the zero lower-left block of each U_k is skipped), and
    S_k from its upper blocks: 3/4 of the flops of the dense products.

    Low-level kernel, **unchecked**: no argument is validated (wrong shapes give JAX's own
    errors, invalid values give NaN); :func:`step` and
    :func:`vijax.meanfield.bayesian_gmm.step` check their inputs and then call it.

    Args:
      x: ``[N, D]`` float32/float64 data (meant for float64).
      log_const: ``[K]`` log_const_k in nats.
      locs: ``[K, D]`` component locations (data units).
      precision_cholesky: ``[K, D, D]`` upper-triangular U_k (precision U_k U_k^T, inverse
        squared data units).
      chunk_size: rows per streamed chunk (Python int >= 1).
      keep_responsibilities: also return r ``[N, K]`` and sum r ln r.
      weights: ``[N]`` 0/1 row mask (padding rows) or None.
      shards: set inside :func:`_on_mesh` (``x`` is then this device's rows and the sums
        are totals over all devices).

    Returns:
      :class:`OnePassSums` (shapes and units listed there), in the dtype of ``x``.
    """
    k, d = locs.shape
    centre = _row_mean(x, shards)
    chol = precision_cholesky
    locs_c = locs - centre[None, :]

    if d <= _PACKED_MAX_DIM:
        rows, cols = np.triu_indices(d)
        precision = jnp.einsum("kij,klj->kil", chol, chol)
        quad_weight = (precision[:, rows, cols] * np.where(rows == cols, 1.0, 2.0)[None, :]).T
        lam_m = jnp.einsum("kij,kj->ki", precision, locs_c)  # [K, D]
        lin_weight = -2.0 * lam_m.T  # [D, K]
        const = log_const - 0.5 * jnp.sum(locs_c * lam_m, axis=-1)

        def sq_mahalanobis_and_features(xc):
            feats = _packed_outer(xc)  # [B, P]
            return feats @ quad_weight + xc @ lin_weight, feats

        def scatter(resp, resp_t, xc, feats):
            return resp_t @ feats  # [K, P]

        def finish(sums):
            return _unpack_symmetric(sums, d)
    else:
        h = d // 2
        const = log_const
        chol_t = jnp.transpose(chol, (1, 0, 2))  # [D, K, D]
        w_left = chol_t[:h, :, :h].reshape(h, k * h)  # U_k[:h, :h] (U_k[h:, :h] = 0)
        w_right = chol_t[:, :, h:].reshape(d, k * (d - h))
        offset = jnp.einsum("kd,kde->ke", locs_c, chol)
        o_left, o_right = offset[:, :h].reshape(-1), offset[:, h:].reshape(-1)

        def sq_mahalanobis_and_features(xc):
            b = xc.shape[0]
            y_left = (xc[:, :h] @ w_left - o_left[None, :]).reshape(b, k, h)
            y_right = (xc @ w_right - o_right[None, :]).reshape(b, k, d - h)
            return jnp.sum(y_left * y_left, -1) + jnp.sum(y_right * y_right, -1), None

        def scatter(resp, resp_t, xc, feats):
            b = xc.shape[0]
            weighted = resp[:, :, None] * xc[:, None, :]  # [B, K, D]
            xc_t = _transposed(xc)  # [D, B]
            top = xc_t[:h] @ weighted.reshape(b, k * d)  # rows :h of every S_k
            bottom = xc_t[h:] @ weighted[:, :, h:].reshape(b, k * (d - h))
            return top, bottom

        def finish(sums):
            top, bottom = sums
            top = jnp.transpose(top.reshape(h, k, d), (1, 0, 2))  # [K, h, D]
            bottom = jnp.transpose(bottom.reshape(d - h, k, d - h), (1, 0, 2))
            lower = jnp.concatenate([jnp.swapaxes(top[:, :, h:], 1, 2), bottom], axis=2)
            return jnp.concatenate([top, lower], axis=1)

    def chunk_fn(xb, wb=None):
        xc = xb - centre[None, :]
        sq_maha, feats = sq_mahalanobis_and_features(xc)
        log_norm, log_resp, resp = normalize_log_weights(const[None, :] - 0.5 * sq_maha)
        resp = _masked(resp, wb)
        sq_radius = _masked(jnp.sum(xc * xc, axis=-1), wb)
        resp_t = _transposed(resp)  # [K, B]
        totals = (jnp.sum(resp, axis=0), resp_t @ xc, scatter(resp, resp_t, xc, feats))
        if keep_responsibilities:
            return (log_norm, resp, sq_radius), totals + (jnp.sum(resp * log_resp),)
        return (log_norm, sq_radius), totals

    rows, totals = _over_chunks(chunk_fn, _with_weights(x, weights), chunk_size)
    totals = _total(totals, shards)
    if keep_responsibilities:
        (log_norm, resp, sq_radius), (counts, first, sums, neg_entropy) = rows, totals
    else:
        ((log_norm, sq_radius), resp), (counts, first, sums) = (rows, None), totals
        neg_entropy = jnp.zeros((), x.dtype)
    max_sq_radius = jnp.max(sq_radius)
    if shards is not None:
        max_sq_radius = lax.pmax(max_sq_radius, shards.axes)
    return OnePassSums(log_norm, resp, neg_entropy, centre, counts, first, finish(sums),
                       max_sq_radius)


# The one-pass step's uncentred sums and quadratic forms lose about
# eps * max_n ||x_n - c||^2 * lambda_max(Lambda_k) of relative accuracy (Lambda_k the
# precisions entering or leaving the step). Above this, the step is recomputed by the centred
# two-pass route: at 1e-7 the one-pass log-likelihood still agrees with scikit-learn to a few
# 1e-9 relative and a collapsed component's covariance to ~2e-7 relative (docs/performance.md).
_ONE_PASS_MAX_RISK = 1e-7


def one_pass_risk(sums: OnePassSums, *precision_cholesky: Array) -> Array:
    """``[]`` eps * max_n ||x_n - c||^2 * max_k ||U_k||_F^2 over the given ``[K, D, D]``
    precision factors (||U_k||_F^2 = Tr Lambda_k >= lambda_max): a bound, up to a small
    factor, on the relative roundoff of :func:`one_pass_sums`' uncentred statistics.

    Low-level kernel, **unchecked**. Args: ``sums`` from :func:`one_pass_sums`; one or more
    ``[K, D, D]`` upper-triangular precision factors (e.g. those entering and leaving a
    step). Returns a dimensionless ``[]`` scalar in the dtype of ``sums.centre`` (eps is
    that dtype's machine epsilon); callers redo the step centred when it exceeds
    ``_ONE_PASS_MAX_RISK`` (1e-7) or is NaN."""
    trace = jnp.max(jnp.stack([jnp.max(jnp.sum(u * u, axis=(-2, -1)))
                               for u in precision_cholesky]))
    return jnp.finfo(sums.centre.dtype).eps * sums.max_sq_radius * trace


@jax.custom_batching.custom_vmap
def _any_over_batch(flag: Array) -> Array:
    """``flag`` itself; under ``vmap`` one unbatched ``any`` over the batch, so that a
    ``lax.cond`` on it stays a branch (taken for every member when any needs it) instead of
    becoming a select that computes both branches for all."""
    return flag


@_any_over_batch.def_vmap
def _any_over_batch_rule(axis_size, in_batched, flag):
    del axis_size
    return (jnp.any(flag) if in_batched[0] else flag), False


def _one_pass_full(state: GMMState, x: Array, chunk_size: int, weights: Array | None = None,
                   shards: _Shards | None = None):
    """One full-covariance EM step reading ``x`` once (float64; see :func:`one_pass_sums`):
    Sigma_k = S_k / N_k - (mu_k - c)(mu_k - c)^T + reg_covar I with the new means.
    Returns ``(log p(x_n) [N], N_k [K], (weights, means, covariances, precision_cholesky))``.
    """
    d = x.shape[-1]
    log_const = (jnp.log(state.weights)
                 + Full()._log_det_precision_cholesky(state.precision_cholesky, d)
                 - 0.5 * d * _LOG_2PI)
    sums = one_pass_sums(x, log_const, state.means, state.precision_cholesky, chunk_size,
                         weights=weights, shards=shards)
    counts = sums.counts + 10 * jnp.finfo(x.dtype).eps
    new_means_c = sums.first_moment / counts[:, None]
    covariances = Full()._covariances(sums.scatter_about(new_means_c), counts, state.reg_covar)
    weights = counts / jnp.sum(counts)
    params = (weights, new_means_c + sums.centre[None, :], covariances,
              Full()._precision_cholesky(covariances, products_only=shards is not None))
    risk = one_pass_risk(sums, state.precision_cholesky, params[3])
    return (sums.log_norm, sums.counts, params), risk


def _two_pass(state: GMMState, x: Array, chunk_size: int, weights: Array | None = None,
              shards: _Shards | None = None):
    """The centred two-pass E + M step: ``(log p(x_n) [N], N_k [K], parameters)``."""
    resp, log_norm, counts, first_moment, centre = _e_step(state, x, chunk_size, weights,
                                                           shards)
    params = _m_step(state.covariance_type, x, resp, counts, first_moment, centre,
                     state.reg_covar, chunk_size, shards)
    return log_norm, counts, params


def _step(state: GMMState, x: Array, chunk_size: int, weights: Array | None = None,
          shards: _Shards | None = None) -> tuple[GMMState, EMInfo]:
    if isinstance(state.covariance_type, Full) and x.dtype == jnp.float64:
        one_pass, risk = _one_pass_full(state, x, chunk_size, weights, shards)
        log_norm, counts, params = lax.cond(
            _any_over_batch(~(risk <= _ONE_PASS_MAX_RISK)),  # NaN risk: indefinite result
            lambda: _two_pass(state, x, chunk_size, weights, shards), lambda: one_pass)
    else:
        log_norm, counts, params = _two_pass(state, x, chunk_size, weights, shards)
    log_lik = _row_mean(_masked(log_norm, weights), shards)
    new_state = _with_parameters(state, params)._replace(
        iteration=state.iteration + 1, last_log_likelihood=log_lik)
    return new_state, EMInfo(log_likelihood=log_lik, component_counts=counts)


# ============================================================================================
# Public API
# ============================================================================================


def init(
    rng_key: Array,
    x: Array,
    num_components: int,
    *,
    covariance_type: CovarianceType = Full(),
    init_method: InitMethod = KMeansPlusPlus(),
    reg_covar: float = 1e-6,
    chunk_size: int | None = None,
) -> GMMState:
    """Initial :class:`GMMState`: the M-step of ``init_method``'s responsibilities.

    Args:
      rng_key: PRNG key for the initialisation (``jax.random.key(seed)``; an int seed is
        refused).
      x: data ``[N, D]``, float32 or float64 (the state takes this dtype); must be finite.
      num_components: K >= 1, with N >= K (static).
      covariance_type: ``Full()``, ``Diag()`` or ``Spherical()`` (static).
      init_method: ``KMeansPlusPlus()`` (default) or ``RandomResponsibilities()`` (static).
      reg_covar: > 0, added to each covariance diagonal in every M-step (stored in the state).
      chunk_size: rows per streamed chunk (static; default from K and D).

    Returns:
      A state with ``iteration = 0`` and ``last_log_likelihood = -inf``.

    Raises:
      TypeError: ``rng_key`` not a JAX PRNG key (e.g. an int seed), non-floating ``x``,
        non-int ``num_components``, unknown ``covariance_type`` or ``init_method``.
      ValueError: ``x`` not 2-D or with NaN/inf rows (checked when concrete), N < K,
        ``reg_covar`` <= 0 (when concrete).
    """
    check_rng_key(rng_key)
    x = _check_data(x)
    num_components = check_num_components(num_components, x.shape[0], name="`num_components`",
                                          name_x="`x`")
    covariance_type = _check_covariance_type(covariance_type)
    if not isinstance(init_method, InitMethod):
        raise TypeError(
            "`init_method` must be KMeansPlusPlus() or RandomResponsibilities(); "
            f"got {init_method!r}"
        )
    reg_covar = _check_reg_covar(reg_covar, x.dtype)
    chunk_size = check_int(chunk_size, "`chunk_size`", minimum=1, optional=True)
    if chunk_size is None:
        chunk_size = _default_chunk_size(x.shape[0], num_components, x.shape[1])
    resp = init_method._responsibilities(rng_key, x, num_components)
    params = _m_step(covariance_type, x, resp, *_moments(x, resp), reg_covar, chunk_size)
    return _new_state(params, reg_covar, covariance_type)


def _new_state(params, reg_covar, covariance_type) -> GMMState:
    dtype = params[1].dtype
    return GMMState(*params, iteration=jnp.zeros((), jnp.int32),
                    last_log_likelihood=jnp.full((), -jnp.inf, dtype),
                    reg_covar=jnp.asarray(reg_covar, dtype), covariance_type=covariance_type)


def state_from_parameters(
    weights: Array,
    means: Array,
    covariances: Array,
    *,
    covariance_type: CovarianceType = Full(),
    reg_covar: float = 1e-6,
) -> GMMState:
    """A :class:`GMMState` from given mixture parameters (e.g. to start EM from a known point).

    Args:
      weights: ``[K]``, non-negative, summing to one within 1e-6 (then renormalised).
      means: ``[K, D]``; its dtype is the state's dtype.
      covariances: shape per ``covariance_type`` (``[K, D, D]``, ``[K, D]`` or ``[K]``),
        positive definite.
      covariance_type: ``Full()``, ``Diag()`` or ``Spherical()``.
      reg_covar: > 0, used by later M-steps.

    Returns:
      A :class:`GMMState` in the dtype of ``means``: weights ``[K]`` (renormalised to sum to
      one), means ``[K, D]``, covariances as given (shape per ``covariance_type``, not
      regularised: ``reg_covar`` is only added by later M-steps), their precision Cholesky
      factors (same shape), ``iteration = 0``, ``last_log_likelihood = -inf`` and
      ``reg_covar`` as a ``[]`` array.

    Raises:
      TypeError / ValueError: naming the offending argument (shapes, dtypes, non-finite or
        non-positive-definite values when concrete, weights not summing to one).
    """
    covariance_type = _check_covariance_type(covariance_type)
    means = _check_float_array(means, "means")
    if means.ndim != 2:
        raise ValueError(f"`means` must be [num_components, dim]; got shape {means.shape}")
    k, d = means.shape
    weights = jnp.asarray(weights, means.dtype)
    covariances = jnp.asarray(covariances, means.dtype)
    if weights.shape != (k,):
        raise ValueError(f"`weights` must have shape ({k},); got {weights.shape}")
    expected = covariance_type.covariance_shape(k, d)
    if covariances.shape != expected:
        raise ValueError(
            f"`covariances` must have shape {expected} for {covariance_type!r}; "
            f"got {covariances.shape}"
        )
    if is_concrete(means) and not np.all(np.isfinite(np.asarray(means))):
        raise ValueError("`means` must be finite")
    if is_concrete(weights):
        w = np.asarray(weights)
        # Loose enough for weights normalised in float32 (K * 6e-8), then renormalised.
        if np.any(~(w >= 0)) or not abs(w.sum() - 1) <= 1e-6:
            raise ValueError("`weights` must be non-negative and sum to one (within 1e-6); "
                             f"got {w} (sum - 1 = {w.sum() - 1:+.3g})")
    weights = weights / jnp.sum(weights)
    if is_concrete(covariances):
        covariance_type._check_covariances(np.asarray(covariances))
    reg_covar = _check_reg_covar(reg_covar, means.dtype)
    params = (weights, means, covariances, covariance_type._precision_cholesky(covariances))
    return _new_state(params, reg_covar, covariance_type)


def step(state: GMMState, x: Array, *, chunk_size: int | None = None,
         mesh: Mesh | None = None) -> tuple[GMMState, EMInfo]:
    """One EM iteration: E-step at the current parameters, then the closed-form M-step.

    E-step: responsibilities r_nk = p(z_n = k | x_n, theta) = softmax_k(log pi_k +
    log N(x_n | mu_k, Sigma_k)) in log space (PRML eq. 9.23). M-step: PRML eqs. 9.24-9.27 with
    ``state.reg_covar`` added to each covariance diagonal. Both stream over row chunks.

    Args:
      state: current parameters.
      x: data ``[N, D]`` in the state's dtype.
      chunk_size: rows per streamed chunk (static; default from K and D). ``chunk_size=N``
        processes the data in one block.
      mesh: optional :class:`jax.sharding.Mesh`: the rows of ``x`` are split over all its
        devices (``jax.shard_map``), each device streams its rows and the sums are
        all-reduced (``psum``), so the result equals the one-device step up to summation
        order. Any N works (the last rows are zero-padded with weight 0). On a CPU, start
        Python with ``XLA_FLAGS=--xla_force_host_platform_device_count=<cores>`` and pass
        ``jax.make_mesh((jax.device_count(),), ("rows",))`` to use every core (measured in docs/results.md;
        the design in docs/performance.md). ``chunk_size`` is then per device.

    Returns:
      ``(new_state, info)``: ``info.log_likelihood`` is the mean log p(x_n | theta) (nats per
      sample) of the parameters *entering* the step, which is also the mean ELBO after the
      E-step. It never decreases along EM iterations (up to the ``reg_covar`` floor and
      rounding). Components whose covariance becomes singular give NaN parameters (no
      exception can be raised under tracing).

    Raises:
      TypeError / ValueError: naming ``x`` (dimensionality, dtype, NaN/inf rows if concrete);
        TypeError naming ``mesh``; ValueError naming the field of ``state`` whose shape does
        not match its K and D.
    """
    x = _check_state(state, x)
    chunk_size = check_int(chunk_size, "`chunk_size`", minimum=1, optional=True)
    _check_mesh(mesh)
    if mesh is not None:
        return _on_mesh(lambda s, xl, w, sh, c: _step(s, xl, c, w, sh),
                        mesh, state, x, chunk_size)
    return _step(state, x, _chunk(state, x.shape[0], chunk_size))


def m_step(state: GMMState, x: Array, responsibilities: Array, *,
           chunk_size: int | None = None) -> GMMState:
    """The closed-form M-step alone: argmax_theta of the ELBO L(q, theta) for
    q = ``responsibilities`` ``[N, K]`` (PRML eqs. 9.24-9.27; "lecture 3", "EM-algorithm
    (M-step)"). Returns ``state`` with new weights, means and covariances (the counters are
    unchanged; ``responsibilities`` are cast to the state's dtype). Raises ``ValueError`` naming
    ``x`` or ``responsibilities`` on shape errors or (concrete arrays) responsibilities that are
    negative, non-finite or whose rows do not sum to 1; ``TypeError`` for non-float32/64
    arrays."""
    x = _check_state(state, x)
    resp = _check_responsibilities(responsibilities, state, x)
    chunk_size = check_int(chunk_size, "`chunk_size`", minimum=1, optional=True)
    params = _m_step(state.covariance_type, x, resp, *_moments(x, resp), state.reg_covar,
                     _chunk(state, x.shape[0], chunk_size))
    return _with_parameters(state, params)


def fit_from_state(
    state: GMMState,
    x: Array,
    *,
    max_iter: int = 100,
    tol: float = 1e-3,
    chunk_size: int | None = None,
    mesh: Mesh | None = None,
) -> tuple[GMMState, FitInfo]:
    """Run EM from ``state`` in a ``lax.while_loop`` until the mean log-likelihood changes by
    less than ``tol`` (absolute, nats per sample) between iterations, or ``max_iter`` steps.

    Same stopping rule as scikit-learn's ``GaussianMixture`` (``tol`` there is also on the
    mean log-likelihood); ``tol=0`` runs exactly ``max_iter`` steps. Also stops when the
    log-likelihood is not finite (then ``converged`` is False). Vmappable (e.g. over states
    from several initialisations).

    Args:
      state: initial parameters.
      x: data ``[N, D]`` in the state's dtype.
      max_iter: an int in [1, 1,000,000] (static; ``MAX_ITER``): the trace
        ``info.log_likelihood`` has ``max_iter`` entries, allocated before the first iteration.
      tol: >= 0.
      chunk_size: rows per streamed chunk (static).
      mesh: optional :class:`jax.sharding.Mesh` to split the rows over, as in :func:`step`
        (the whole loop runs inside one ``shard_map``).

    Returns:
      ``(state, info)`` with ``info.log_likelihood`` ``[max_iter]`` the per-iteration trace
      (NaN-padded), ``info.num_iterations`` and ``info.converged``.

    Raises:
      TypeError / ValueError: naming ``x``, ``max_iter``, ``tol``, ``mesh`` or a field of
        ``state`` of the wrong shape.
    """
    x = _check_state(state, x)
    max_iter = _check_max_iter(max_iter)
    check_real(tol, "`tol`", minimum=0.0, finite=False, array=True)  # NaN is refused
    chunk_size = check_int(chunk_size, "`chunk_size`", minimum=1, optional=True)
    _check_mesh(mesh)
    tol = jnp.asarray(tol, x.dtype)

    def run(state, x, weights, shards, chunk_size):
        return _fit_loop(state, x, chunk_size, weights, shards, max_iter, tol)

    if mesh is not None:
        return _on_mesh(run, mesh, state, x, chunk_size)
    return run(state, x, None, None, _chunk(state, x.shape[0], chunk_size))


#: The largest ``max_iter`` of :func:`fit` / :func:`fit_from_state`: the log-likelihood trace of
#: ``max_iter`` entries is allocated before the first iteration.
MAX_ITER = 1_000_000


def _check_max_iter(max_iter) -> int:
    max_iter = check_int(max_iter, "`max_iter`", minimum=1)
    if max_iter > MAX_ITER:
        raise ValueError(
            f"`max_iter` must be <= {MAX_ITER:,}, got {max_iter:,}: the per-iteration "
            "log-likelihood trace (FitInfo.log_likelihood) has max_iter entries and is "
            "allocated before the first iteration (EM that has not converged after a million "
            "iterations needs another tol or initialisation, not more iterations)")
    return max_iter


def _fit_loop(state: GMMState, x: Array, chunk_size: int, weights: Array | None,
              shards: _Shards | None, max_iter: int, tol: Array) -> tuple[GMMState, FitInfo]:
    trace = jnp.full((max_iter,), jnp.nan, x.dtype)

    def cond(carry):
        _, _, i, done, _ = carry
        return (i < max_iter) & ~done

    def body(carry):
        state, trace, i, _, _ = carry
        prev = state.last_log_likelihood
        state, info = _step(state, x, chunk_size, weights, shards)
        ll = info.log_likelihood
        converged = jnp.abs(ll - prev) < tol
        done = converged | ~jnp.isfinite(ll)
        return state, trace.at[i].set(ll), i + 1, done, converged

    init_carry = (state, trace, jnp.zeros((), jnp.int32), jnp.zeros((), bool),
                  jnp.zeros((), bool))
    state, trace, num_iter, _, converged = lax.while_loop(cond, body, init_carry)
    return state, FitInfo(log_likelihood=trace, num_iterations=num_iter, converged=converged)


def fit(
    rng_key: Array,
    x: Array,
    num_components: int,
    *,
    covariance_type: CovarianceType = Full(),
    init_method: InitMethod = KMeansPlusPlus(),
    reg_covar: float = 1e-6,
    max_iter: int = 100,
    tol: float = 1e-3,
    chunk_size: int | None = None,
    mesh: Mesh | None = None,
) -> tuple[GMMState, FitInfo]:
    """:func:`init` then :func:`fit_from_state` (``mesh`` applies to the EM iterations).

    Vmappable over ``rng_key`` (restarts):
    ``jax.vmap(lambda k: fit(k, x, 3))(jax.random.split(key, 8))``; pick the restart with the
    largest final log-likelihood. Arguments, returns and errors as in those two functions
    (a TypeError naming ``rng_key`` for an int seed: pass ``jax.random.key(seed)``)."""
    state = init(rng_key, x, num_components, covariance_type=covariance_type,
                 init_method=init_method, reg_covar=reg_covar, chunk_size=chunk_size)
    return fit_from_state(state, x, max_iter=max_iter, tol=tol, chunk_size=chunk_size,
                          mesh=mesh)


def _rows_log_joint(state: GMMState, x: Array) -> Array:
    """log pi_k + log N(x | mu_k, Sigma_k) for x ``[..., D]``: ``[..., K]``, streamed.

    Computed about the mixture mean c = sum_k pi_k mu_k (x and the means shifted alike; c
    depends on the state only, so each row's value is independent of the other rows), which
    keeps the expanded quadratic forms accurate in float32 for data far from the origin."""
    batch_shape = x.shape[:-1]
    flat = x.reshape((-1, x.shape[-1]))
    if flat.shape[0] == 0:
        return jnp.zeros(batch_shape + (state.means.shape[0],), x.dtype)
    centre = state.weights @ state.means
    log_joint_chunk = _log_joint_fn(state._replace(means=state.means - centre[None, :]))
    out, _ = _over_chunks(lambda xb: (log_joint_chunk(xb - centre[None, :]), ()), (flat,),
                          _chunk(state, flat.shape[0], None))
    return out.reshape(batch_shape + (state.means.shape[0],))


def log_joint(state: GMMState, x: Array) -> Array:
    """log p(x, z = k | theta) = log pi_k + log N(x | mu_k, Sigma_k), nats.

    Args: ``x`` ``[..., D]`` in the state's dtype. Returns ``[..., K]``.
    Raises ``ValueError`` naming ``x`` on a dimensionality mismatch or NaN/inf (if concrete),
    or naming a field of ``state`` whose shape does not match its K and D.
    """
    return _rows_log_joint(state, _check_state(state, x, matrix=False))


def predict_proba(state: GMMState, x: Array) -> Array:
    """Responsibilities p(z = k | x, theta) (PRML eq. 9.23; the E-step's q), computed with
    logsumexp. ``x`` ``[..., D]`` -> ``[..., K]``, rows summing to one. Errors as
    :func:`log_joint`."""
    return jax.nn.softmax(log_joint(state, x), axis=-1)


def log_likelihood(state: GMMState, x: Array) -> Array:
    """Per-point log p(x | theta) = log sum_k pi_k N(x | mu_k, Sigma_k) (PRML eq. 9.28), nats.
    ``x`` ``[..., D]`` -> ``[...]`` (take the mean for scikit-learn's ``score``). Errors as
    :func:`log_joint`."""
    return jax.nn.logsumexp(log_joint(state, x), axis=-1)


def elbo(state: GMMState, x: Array, responsibilities: Array) -> Array:
    """Mean ELBO per point (nats), the lower bound itself (not its negative):

        L = 1/N sum_n sum_k q_nk [log pi_k + log N(x_n | mu_k, Sigma_k) - log q_nk]

    with q = ``responsibilities`` ``[N, K]`` (0 log 0 = 0). ``mean(log_likelihood) - elbo`` is
    the mean KL(q_n || p(z_n | x_n)) >= 0, zero at q = :func:`predict_proba` ("LVM blog
    post", "Expectation Maximization", Eq. 2; PRML eqs. 9.70-9.72).

    Raises ``ValueError`` naming ``x`` or ``responsibilities`` on shape errors or (concrete
    arrays) responsibilities that are not row-stochastic; ``TypeError`` for non-float32/64
    arrays. The result has the state's dtype.
    """
    x = _check_state(state, x)
    q = _check_responsibilities(responsibilities, state, x)
    # q log p with 0 log 0 = 0 also where log p = -inf (a component of weight zero).
    q_log_joint = jnp.where(q > 0, q * _rows_log_joint(state, x), 0.0)
    per_point = jnp.sum(q_log_joint - jax.scipy.special.xlogy(q, q), axis=-1)
    return jnp.mean(per_point)


def sample(rng_key: Array, state: GMMState, num_samples: int) -> tuple[Array, Array]:
    """Ancestral sampling: z_s ~ Cat(pi), then x_s ~ N(mu_{z_s}, Sigma_{z_s}).

    Args:
      rng_key: PRNG key (``jax.random.key(seed)``).
      state: mixture parameters (:class:`GMMState`).
      num_samples: S >= 1 (static).

    Returns:
      ``(x, z)``: ``x`` ``[S, D]`` in the state's dtype, ``z`` ``[S]`` int32 component labels.

    Raises:
      TypeError: ``rng_key`` is not a JAX PRNG key (e.g. an int seed); ``state`` is not a
        :class:`GMMState` (e.g. None or a plain tuple); ``num_samples`` is not an int.
      ValueError: ``num_samples`` < 1; a field of ``state`` does not match its K and D.
    """
    check_rng_key(rng_key)
    _check_state_fields(state)
    num_samples = check_int(num_samples, "`num_samples`", minimum=1)
    key_z, key_x = jax.random.split(rng_key)
    dtype = state.means.dtype
    # Inverse-CDF draw (O(S) memory; categorical's Gumbel trick would hold [S, K] noise).
    z = jax.random.choice(key_z, state.weights.shape[0], (num_samples,), p=state.weights)
    eps = jax.random.normal(key_x, (num_samples, state.means.shape[-1]), dtype)
    noise = state.covariance_type._scale_noise(state.covariances, z, eps)
    return state.means[z] + noise, z.astype(jnp.int32)


def dense_covariances(state: GMMState) -> Array:
    """The component covariance matrices Sigma_k as ``[K, D, D]`` for any covariance type
    (diagonal and spherical variances placed on the diagonal).

    Args:
      state: mixture parameters (:class:`GMMState`).

    Returns:
      ``[K, D, D]`` covariances in squared data units, in the state's dtype.

    Raises:
      TypeError: ``state`` is not a :class:`GMMState` (e.g. None or a plain tuple).
      ValueError: a field of ``state`` does not match its K and D.
    """
    _check_state_fields(state)
    return state.covariance_type._dense(state.covariances, state.means.shape[-1])
