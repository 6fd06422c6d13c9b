"""Marginal likelihoods you can check: annealed importance sampling (AIS), bidirectional Monte
Carlo (BDMC) and the Pareto k-hat diagnostic of importance weights (all values in nats).

* ``ais``: AIS (Neal 2001, "Annealed importance sampling", §2) along
  the geometric path from a proposal q(z) to the unnormalised posterior p(x, z),

      log f_t(z) = (1 - beta_t) log q(z) + beta_t log p(x, z),   0 = beta_0 < ... < beta_T = 1,

  with one HMC transition (or ``HMC.num_steps``) leaving each f_t, 0 < t < T, invariant. The
  log weight of a chain is sum_t (beta_t - beta_{t-1}) [log p(x, z_{t-1}) - log q(z_{t-1})];
  its exp is unbiased for p(x) (Neal 2001), so logmeanexp over chains is a stochastic lower
  bound on log p(x), like importance sampling (``num_temperatures=1`` *is* importance
  sampling with q). Transitions: Blackjax's HMC kernel (``blackjax.mcmc.hmc.build_kernel``,
  velocity Verlet, identity mass) with a per-example Metropolis test, and a per-example
  step size adapted toward an acceptance rate across temperatures (Wu, Burda, Salakhutdinov &
  Grosse 2017, "On the quantitative analysis of decoder-based generative models": 0.65,
  factors 1.02 / 0.98).
* ``bdmc``: bidirectional Monte Carlo (Grosse, Ghahramani & Adams 2015, "Sandwiching the
  marginal likelihood using bidirectional Monte Carlo"): the same chain run in reverse,
  beta from 1 to 0, started from an *exact* posterior sample. Its weights are unbiased for
  1 / p(x), so minus their logmeanexp is a stochastic *upper* bound: on simulated data
  (z ~ p(z), x ~ p(x | z) makes z an exact posterior sample for x) the two bound log p(x)
  from both sides, and the width of the sandwich bounds the error of the AIS estimate.
* ``log_likelihood_ais``: AIS for a trained ``vijax.nn.VAE``, over examples in batches
  (``lax.map``), with the prior or the encoder q(z | x) as proposal.
* ``bdmc_simulated``: BDMC for a trained VAE on data it simulates (z ~ p(z), x ~ p(x | z)),
  the protocol of Wu et al. (2017, §3.2) for checking how far AIS is from log p(x).
* ``psis`` / ``psis_khat``: Pareto-smoothed importance sampling by ArviZ (``arviz.psislw``;
  Vehtari, Simpson, Gelman, Yao & Gabry 2024, "Pareto smoothed importance sampling", JMLR 25).
  k-hat, the shape of a generalised Pareto fit to the largest weights, says how heavy the
  weights' tail is: below ``KHAT_GOOD`` = 0.5 the estimate is reliable, up to ``KHAT_OK`` = 0.7
  usable with more samples, above it the variance may be infinite and the estimate should not
  be trusted (Vehtari et al. 2024, §3). ``khat_category`` reads the thresholds.

Shapes: ``proposal`` has batch shape ``[]`` (one example or a global latent) or ``[batch]``;
``log_joint_fn(z) -> log p(x, z)`` maps one draw of ``proposal`` (a pytree of
``[*batch, *event]`` arrays) to ``[*batch]``, as in ``vijax.marginal.importance_sampling``.
The examples must be independent (``log_joint_fn`` separable over the batch axis), as they are
for x_n with their own z_n. Every function is pure: ``rng_key`` first, no ``jit`` inside; the
options are frozen dataclasses, static under the caller's ``jit``.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, Callable, NamedTuple

import blackjax.mcmc.hmc as bj_hmc
import blackjax.mcmc.integrators as bj_integrators
import blackjax.mcmc.trajectory as bj_trajectory
import distrax
import jax
import jax.numpy as jnp
import numpy as np

from vijax import _q
from vijax._checks import check_bool, check_int, check_real, check_rng_key, is_concrete

Array = jax.Array
PyTree = Any

__all__ = [
    "Linear",
    "Sigmoidal",
    "HMC",
    "Prior",
    "Encoder",
    "AISResult",
    "BDMCResult",
    "PSISResult",
    "SimulatedBDMC",
    "ais",
    "bdmc",
    "log_likelihood_ais",
    "bdmc_simulated",
    "psis",
    "psis_khat",
    "khat_category",
    "KHAT_GOOD",
    "KHAT_OK",
    "PSIS_MIN_SAMPLES",
]

KHAT_GOOD = 0.5
"""k-hat below this: the importance-sampling estimate is reliable (Vehtari et al. 2024, §3)."""
KHAT_OK = 0.7
"""k-hat up to this: usable, converging slowly; above it: do not trust the estimate."""
PSIS_MIN_SAMPLES = 21
"""Fewest log weights per example for k-hat: ArviZ fits the largest ceil(min(S/5, 3 sqrt(S)))
weights and needs more than 4 of them (it returns k-hat = inf otherwise)."""


# ----------------------------------------------------------------------------- options


@dataclasses.dataclass(frozen=True)
class Linear:
    """Linear schedule beta_t = t / T, t = 0..T."""

    def betas(self, num_temperatures: int) -> np.ndarray:
        """``[T + 1]`` float64 inverse temperatures from 0 to 1 (T = ``num_temperatures``).

        Raises:
          TypeError / ValueError: ``num_temperatures`` not an int >= 1.
        """
        t = check_int(num_temperatures, "`num_temperatures`", minimum=1)
        return np.linspace(0.0, 1.0, t + 1)


@dataclasses.dataclass(frozen=True)
class Sigmoidal:
    """Sigmoidal schedule (Grosse, Ghahramani & Adams 2015; Wu et al. 2017 use rad = 4):

        b_t = sigmoid(rad (2 t / T - 1)),  beta_t = (b_t - b_0) / (b_T - b_0),  t = 0..T,

    which spends more temperatures near beta = 0 and beta = 1, where log f_t changes fastest
    for a proposal far from the posterior.

    Raises:
      TypeError / ValueError: ``rad`` not a finite real > 0.
    """

    rad: float = 4.0

    def __post_init__(self):
        check_real(self.rad, "`rad`", exclusive_minimum=0.0)

    def betas(self, num_temperatures: int) -> np.ndarray:
        """``[T + 1]`` float64 inverse temperatures from 0 to 1 (T = ``num_temperatures``).

        Raises:
          TypeError / ValueError: ``num_temperatures`` not an int >= 1.
        """
        t = check_int(num_temperatures, "`num_temperatures`", minimum=1)
        s = 1.0 / (1.0 + np.exp(-np.linspace(-self.rad, self.rad, t + 1)))
        betas = (s - s[0]) / (s[-1] - s[0])
        betas[0], betas[-1] = 0.0, 1.0
        return betas


@dataclasses.dataclass(frozen=True)
class HMC:
    """Hamiltonian Monte Carlo transitions for ``ais`` and ``bdmc``.

    Each transition draws a momentum p ~ N(0, I), runs ``num_leapfrog_steps`` velocity-Verlet
    steps of size eps and accepts per example with probability min(1, exp(-dH)) (Neal 2011,
    "MCMC using Hamiltonian dynamics"). ``num_steps`` transitions are made at each
    intermediate temperature. With ``adapt``, after each transition the step size of an
    example is multiplied by ``1 + adapt_rate`` if its acceptance probability, averaged over
    the chains, exceeds ``target_accept``, else by ``1 - adapt_rate``, and clipped to
    ``[min_step_size, max_step_size]`` (Wu et al. 2017). The step size then depends on the
    chains' past, which makes the weights unbiased only approximately (the adapted kernel is
    not the same for every history); with ``adapt=False`` they are exactly unbiased.

    Raises:
      TypeError / ValueError: ``num_leapfrog_steps`` or ``num_steps`` not an int >= 1;
        ``initial_step_size``, ``min_step_size``, ``max_step_size`` not finite reals > 0 with
        ``min_step_size <= initial_step_size <= max_step_size``; ``target_accept`` not in
        (0, 1); ``adapt_rate`` not in [0, 1); ``adapt`` not a bool.
    """

    num_leapfrog_steps: int = 10
    initial_step_size: float = 0.05
    target_accept: float = 0.65
    adapt: bool = True
    adapt_rate: float = 0.02
    min_step_size: float = 1e-4
    max_step_size: float = 0.5
    num_steps: int = 1

    def __post_init__(self):
        check_int(self.num_leapfrog_steps, "`num_leapfrog_steps`", minimum=1)
        check_int(self.num_steps, "`num_steps`", minimum=1)
        check_bool(self.adapt, "`adapt`")
        for name in ("initial_step_size", "min_step_size", "max_step_size"):
            check_real(getattr(self, name), f"`{name}`", exclusive_minimum=0.0)
        if not self.min_step_size <= self.initial_step_size <= self.max_step_size:
            raise ValueError(
                "`initial_step_size` must lie in [`min_step_size`, `max_step_size`], got "
                f"{self.initial_step_size} not in [{self.min_step_size}, {self.max_step_size}]")
        check_real(self.target_accept, "`target_accept`", exclusive_minimum=0.0,
                   exclusive_maximum=1.0)
        check_real(self.adapt_rate, "`adapt_rate`", minimum=0.0, exclusive_maximum=1.0)


@dataclasses.dataclass(frozen=True)
class Prior:
    """``log_likelihood_ais`` proposal: the VAE's prior N(0, I) (the path prior -> posterior,
    Wu et al. 2017)."""


@dataclasses.dataclass(frozen=True)
class Encoder:
    """``log_likelihood_ais`` proposal: the encoder's q(z | x), usually closer to the posterior
    than the prior, so fewer temperatures reach the same accuracy."""


_SCHEDULES = (Linear, Sigmoidal)
_TRANSITIONS = (HMC,)
_PROPOSALS = (Prior, Encoder)


# ----------------------------------------------------------------------------- results


class AISResult(NamedTuple):
    """Output of :func:`ais` (and each direction of :func:`bdmc`).

    Fields:
      log_weights: ``[num_chains, *batch]`` log weight of each chain (nats). exp of it is
        unbiased for p(x) (forward) or for 1 / p(x) (the reverse chains of :func:`bdmc`).
      log_marginal: ``[*batch]`` the estimate of log p(x) (nats): logmeanexp of
        ``log_weights`` over chains for a forward run (a stochastic lower bound), minus it for
        a reverse run (a stochastic upper bound).
      stderr: ``[*batch]`` its standard error by the delta method, sd(w) / (mean(w) sqrt(K))
        over the K chains' weights w = exp(log_weights) (nats); NaN for K = 1. It measures the
        spread of the weights, not the bias of the log (which the BDMC gap bounds), and is
        itself noisy when the weights are heavy-tailed (check :func:`psis_khat` with many
        chains).
      acceptance_rate: ``[*batch]`` HMC acceptance probability averaged over chains and
        transitions; NaN when there is no transition (``num_temperatures=1``).
      step_size: ``[*batch]`` the final HMC step size of each example.
    """

    log_weights: Array
    log_marginal: Array
    stderr: Array
    acceptance_rate: Array
    step_size: Array


class BDMCResult(NamedTuple):
    """Output of :func:`bdmc`.

    Fields:
      lower: ``[*batch]`` forward AIS estimate of log p(x), a stochastic lower bound (nats).
      upper: ``[*batch]`` reverse AIS estimate, a stochastic upper bound (nats).
      gap: ``[*batch]`` ``upper - lower``, the width of the sandwich (nats): an estimate of
        how far the AIS lower bound can be from log p(x).
      forward: the :class:`AISResult` of the forward chains.
      reverse: the :class:`AISResult` of the reverse chains (``log_weights`` estimate
        log 1 / p(x); ``log_marginal`` is ``upper``).
    """

    lower: Array
    upper: Array
    gap: Array
    forward: AISResult
    reverse: AISResult


class PSISResult(NamedTuple):
    """Output of :func:`psis`.

    Fields:
      log_weights: the Pareto-smoothed log weights, normalised to logsumexp 0 along the sample
        axis (shape of the input).
      khat: the Pareto shape estimate per example (the input shape less the sample axis).
    """

    log_weights: Any
    khat: Any


# ----------------------------------------------------------------------------- checks


def _check_options(num_temperatures, num_chains, schedule, transition) -> tuple[int, int]:
    num_temperatures = check_int(num_temperatures, "`num_temperatures`", minimum=1)
    num_chains = check_int(num_chains, "`num_chains`", minimum=1)
    if not isinstance(schedule, _SCHEDULES):
        raise TypeError("`schedule` must be an instance of "
                        f"{', '.join(c.__name__ + '()' for c in _SCHEDULES)}, got {schedule!r}")
    if not isinstance(transition, _TRANSITIONS):
        raise TypeError(f"`transition` must be an HMC(...) instance, got {transition!r}")
    return num_temperatures, num_chains


def _check_call(rng_key, log_joint_fn, proposal, num_temperatures, num_chains, schedule,
                transition):
    """The argument checks of ``ais`` and ``bdmc``; returns (batch shape, T, K)."""
    _q.check_estimator_call(rng_key, log_joint_fn, "log_joint_fn")
    shape = _q.check_q(proposal, "proposal")
    num_temperatures, num_chains = _check_options(num_temperatures, num_chains, schedule,
                                                  transition)
    return shape, num_temperatures, num_chains


# ----------------------------------------------------------------------------- the sampler


class _StepInfo(NamedTuple):
    acceptance: Array  # [*batch] Metropolis acceptance probability
    logdensity: Array  # [*batch] tempered log density at the new position


def _mix(log_q: Array, log_p: Array, beta) -> Array:
    """log f_beta = (1 - beta) log q + beta log p, per example (0 < beta < 1 here)."""
    return (1 - beta) * log_q + beta * log_p


def _hmc_kernel(per_example_fn: Callable[[Array], Array], logdensity_start: Array):
    """Blackjax's HMC kernel with a Metropolis test per example (the ``build_proposal`` hook).

    The integrator sees the sum of the examples' log densities, whose gradient is every
    example's own gradient (the examples are independent); the acceptance test is taken for
    each example from its own energy change, since one test for the whole batch would accept
    less and less often as the batch grows. ``logdensity_start`` ``[*batch]`` is the tempered
    log density at the start (known from the weight update)."""

    def build_proposal(integrator, kinetic_energy, step_size, num_integration_steps,
                       divergence_threshold):
        del kinetic_energy, divergence_threshold
        integrate = bj_trajectory.static_integration(integrator)

        def generate(rng_key, state):
            end = integrate(state, step_size, num_integration_steps)
            logdensity_end = per_example_fn(end.position)
            kinetic_start = 0.5 * jnp.sum(state.momentum * state.momentum, axis=-1)
            kinetic_end = 0.5 * jnp.sum(end.momentum * end.momentum, axis=-1)
            log_ratio = (logdensity_end - kinetic_end) - (logdensity_start - kinetic_start)
            log_ratio = jnp.where(jnp.isnan(log_ratio), -jnp.inf, log_ratio)
            accept_prob = jnp.exp(jnp.minimum(log_ratio, 0.0))
            uniform = jax.random.uniform(rng_key, accept_prob.shape, accept_prob.dtype)
            accept = uniform < accept_prob
            position = jnp.where(accept[..., None], end.position, state.position)
            grad = jnp.where(accept[..., None], end.logdensity_grad, state.logdensity_grad)
            logdensity = jnp.where(accept, logdensity_end, logdensity_start)
            new = bj_integrators.IntegratorState(position, state.momentum, jnp.sum(logdensity),
                                                 grad)
            return new, _StepInfo(accept_prob, logdensity), None

        return generate

    return bj_hmc.build_kernel(bj_integrators.velocity_verlet, build_proposal=build_proposal)


def _path(betas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(targets [T - 1], increments [T])`` of a path b_0, ..., b_T: the inverse temperatures
    b_1..b_{T-1} of the transitions and b_t - b_{t-1} (differences taken in float64)."""
    return betas[1:-1], np.diff(betas)


def _anneal(rng_key: Array, flat0: Array, targets: Array, increments: Array,
            unflatten: Callable, log_joint_fn: Callable, proposal: PyTree,
            batch_shape: tuple[int, ...], hmc: HMC) -> AISResult:
    """The annealing loop along a path b_0, ..., b_T (increasing for AIS, decreasing for the
    reverse chains of BDMC; ``_path`` gives ``targets`` and ``increments``, arrays that may be
    traced) from ``flat0`` ``[K, *batch, n]``: log w += (b_t - b_{t-1}) [log p - log q](z_{t-1}),
    then HMC transitions leaving f_{b_t} invariant, for t = 1..T-1; a last weight update for
    t = T."""
    num_chains = flat0.shape[0]
    dtype = flat0.dtype
    num_temps = increments.shape[0]
    targets, increments = targets.astype(dtype), increments.astype(dtype)

    def components(flat):  # one chain: [*batch, n] -> (log q, log p), [*batch] each
        z = unflatten(flat)
        with jax.numpy_rank_promotion("allow"):  # inside distrax only (as vijax._q does)
            log_q = _q.log_prob(proposal, z)
        log_p = _q.call_log_density(log_joint_fn, z, batch_shape, "log_joint_fn", proposal,
                                    "proposal")
        return log_q.astype(dtype), log_p.astype(dtype)

    def value_and_grad(flat, beta):  # one chain: (log q, log p, grad of sum_n log f_beta)
        def total(f):
            log_q, log_p = components(f)
            return jnp.sum(_mix(log_q, log_p, beta)), (log_q, log_p)

        (_, (log_q, log_p)), grad = jax.value_and_grad(total, has_aux=True)(flat)
        return log_q, log_p, grad

    inverse_mass = jnp.ones(math.prod(flat0.shape[1:]), dtype)

    def hmc_transition(key, flat, grad, logdensity, beta, step_size):  # one chain
        per_example = lambda f: _mix(*components(f), beta)
        logdensity_fn = lambda f: jnp.sum(per_example(f))
        kernel = _hmc_kernel(per_example, logdensity)
        state = bj_hmc.HMCState(flat, jnp.sum(logdensity), grad)
        new, info = kernel(key, state, logdensity_fn, step_size[..., None], inverse_mass,
                           hmc.num_leapfrog_steps)
        return new.position, new.logdensity_grad, info.logdensity, info.acceptance

    step0 = jnp.full(batch_shape, hmc.initial_step_size, dtype)
    log_w0 = jnp.zeros((num_chains,) + batch_shape, dtype)
    acc0 = jnp.zeros(batch_shape, dtype)

    def temperature(carry, xs):
        flat, log_w, step_size, acc_sum = carry
        keys, beta, delta = xs  # keys [num_steps, num_chains]
        log_q, log_p, grad = jax.vmap(value_and_grad, (0, None))(flat, beta)
        log_w = log_w + delta * (log_p - log_q)
        logdensity = _mix(log_q, log_p, beta)

        def one_step(inner, chain_keys):
            flat, grad, logdensity, step_size, acc_sum = inner
            flat, grad, logdensity, acceptance = jax.vmap(
                hmc_transition, (0, 0, 0, 0, None, None))(chain_keys, flat, grad, logdensity,
                                                           beta, step_size)
            mean_acc = jnp.mean(acceptance, axis=0)
            if hmc.adapt:
                factor = jnp.where(mean_acc > hmc.target_accept, 1 + hmc.adapt_rate,
                                   1 - hmc.adapt_rate).astype(dtype)
                step_size = jnp.clip(step_size * factor, hmc.min_step_size, hmc.max_step_size)
            return (flat, grad, logdensity, step_size, acc_sum + mean_acc), None

        inner = (flat, grad, logdensity, step_size, acc_sum)
        if hmc.num_steps == 1:
            inner, _ = one_step(inner, keys[0])
        else:
            inner, _ = jax.lax.scan(one_step, inner, keys)
        flat, _, _, step_size, acc_sum = inner
        return (flat, log_w, step_size, acc_sum), None

    flat, log_w, step_size, acc_sum = flat0, log_w0, step0, acc0
    if num_temps > 1:
        # every transition's key at once: one split instead of one per temperature and step
        # (each random-bits call is a large program, slow to compile)
        keys = jax.random.split(rng_key, (num_temps - 1, hmc.num_steps, num_chains))
        xs = (keys, targets, increments[:-1])
        (flat, log_w, step_size, acc_sum), _ = jax.lax.scan(
            temperature, (flat, log_w, step_size, acc_sum), xs)
    log_q, log_p = jax.vmap(components)(flat)
    log_w = log_w + increments[-1] * (log_p - log_q)
    num_transitions = (num_temps - 1) * hmc.num_steps
    acceptance = (acc_sum / num_transitions if num_transitions
                  else jnp.full(batch_shape, jnp.nan, dtype))
    log_mean, stderr = _log_mean_and_stderr(log_w)
    return AISResult(log_w, log_mean, stderr, acceptance, step_size)


def _log_mean_and_stderr(log_w: Array) -> tuple[Array, Array]:
    """logmeanexp over axis 0 and its delta-method standard error sd(w) / (mean(w) sqrt(K))."""
    num = log_w.shape[0]
    log_mean = jax.nn.logsumexp(log_w, axis=0) - math.log(num)
    if num < 2:
        return log_mean, jnp.full(log_mean.shape, jnp.nan, log_w.dtype)
    w = jnp.exp(log_w - jnp.max(log_w, axis=0, keepdims=True))  # in (0, 1], max 1
    mean = jnp.mean(w, axis=0)
    sd = jnp.std(w, axis=0, ddof=1)
    return log_mean, sd / (mean * math.sqrt(num))


def _initial_draws(rng_key: Array, proposal: PyTree, num_chains: int) -> PyTree:
    z0 = jax.vmap(lambda k: _q.sample(k, proposal))(jax.random.split(rng_key, num_chains))
    for leaf in jax.tree_util.tree_leaves(z0):
        if not jnp.issubdtype(leaf.dtype, jnp.floating):
            raise TypeError(f"`proposal` must have continuous (floating) samples for HMC; got "
                            f"dtype {leaf.dtype}")
    return z0


def ais(
    rng_key: Array,
    log_joint_fn: Callable[[PyTree], Array],
    proposal: PyTree,
    *,
    num_temperatures: int,
    num_chains: int,
    schedule: Linear | Sigmoidal = Sigmoidal(),
    transition: HMC = HMC(),
) -> AISResult:
    """Annealed importance sampling estimate of log p(x) (Neal 2001), in nats.

    Runs ``num_chains`` independent chains per example along the geometric path
    log f_t = (1 - beta_t) log q(z) + beta_t log p(x, z) from the proposal (beta = 0) to the
    posterior (beta = 1), with ``num_temperatures`` = T steps of the schedule: T weight
    updates and T - 1 temperatures with HMC transitions (``transition.num_steps`` each). A
    chain's weight w = prod_t f_t(z_{t-1}) / f_{t-1}(z_{t-1}) has E[w] = p(x) (Neal 2001;
    exactly with ``HMC(adapt=False)``, see :class:`HMC`), so ``log_marginal`` = log of the
    mean weight is a stochastic lower bound that tightens as T grows. ``num_temperatures=1``
    is importance sampling with q.

    Chains are batched with ``vmap`` and temperatures scanned with ``lax.scan``: memory is that
    of ``num_chains`` evaluations of ``log_joint_fn`` and its gradient, whatever T. Cost:
    about T (``num_leapfrog_steps`` + 2) evaluations of ``log_joint_fn`` per chain, one of them
    with its gradient per leapfrog step. To bound memory over many examples, call it on batches
    of examples (``jax.lax.map``; :func:`log_likelihood_ais` does this for a VAE).

    Args:
      rng_key: a JAX PRNG key.
      log_joint_fn: ``z -> log p(x, z)`` (nats), one draw of ``proposal`` (``[*batch,
        latent_dim]``, or a pytree of ``[*batch, *event]``) to ``[*batch]``; separable over
        the examples and differentiable in z.
      proposal: q(z), a distrax distribution (or a pytree of them) of batch shape ``[]`` or
        ``[batch]`` with continuous samples: the prior p(z), or a per-example q(z | x). Its
        ``log_prob`` is evaluated at the chains' positions.
      num_temperatures: T >= 1, the number of steps from beta = 0 to beta = 1.
      num_chains: K >= 1 chains per example (K >= 2 for a standard error).
      schedule: :class:`Sigmoidal` (default, ``rad=4``) or :class:`Linear`.
      transition: an :class:`HMC` configuration.

    Returns:
      :class:`AISResult`: ``log_weights`` ``[num_chains, *batch]``, ``log_marginal``,
      ``stderr``, ``acceptance_rate`` and ``step_size`` ``[*batch]``.

    Raises:
      TypeError: ``rng_key`` not a JAX PRNG key; ``log_joint_fn`` not callable; ``proposal``
        not a distrax distribution (or pytree of them) or with non-floating samples;
        ``schedule`` or ``transition`` not one of the option classes; ``num_temperatures`` or
        ``num_chains`` not an int.
      ValueError: ``num_temperatures`` or ``num_chains`` < 1; factors of ``proposal`` of
        different batch shapes, or (concrete) non-finite or non-positive scales;
        ``log_joint_fn`` output not of shape ``[*batch]`` (checked at trace time).
    """
    shape, num_temperatures, num_chains = _check_call(
        rng_key, log_joint_fn, proposal, num_temperatures, num_chains, schedule, transition)
    targets, increments = _path(schedule.betas(num_temperatures))
    key_init, key_run = jax.random.split(rng_key)
    z0 = _initial_draws(key_init, proposal, num_chains)
    flatten, unflatten = _flattener_for(proposal)
    return _anneal(key_run, flatten(z0), jnp.asarray(targets), jnp.asarray(increments),
                   unflatten, log_joint_fn, proposal, shape, transition)


def _flattener_for(proposal: PyTree):
    """``(flatten, unflatten)`` between a draw of ``proposal`` (leaves ``[*lead, *event_j]``,
    any leading axes) and one ``[*lead, n]`` vector per example, from the factors' event
    shapes: HMC then runs on ``[*batch, n]``, against which a per-example step size
    ``[*batch, 1]`` broadcasts."""
    leaves, treedef = jax.tree_util.tree_flatten(proposal, is_leaf=_q._is_distribution)
    events = [tuple(d.event_shape) for d in leaves]
    sizes = [math.prod(e) for e in events]

    def flatten(tree):
        parts = treedef.flatten_up_to(tree)
        dtype = jnp.result_type(*[p.dtype for p in parts])
        return jnp.concatenate(
            [p.reshape(p.shape[: p.ndim - len(e)] + (-1,)).astype(dtype)
             for p, e in zip(parts, events)], axis=-1)

    def unflatten(flat):
        lead = flat.shape[:-1]
        splits = np.cumsum(sizes)[:-1].tolist()
        parts = jnp.split(flat, splits, axis=-1) if splits else [flat]
        return jax.tree_util.tree_unflatten(treedef, [p.reshape(lead + e)
                                                      for p, e in zip(parts, events)])

    return flatten, unflatten


def _check_exact_sample(sample: PyTree, proposal: PyTree, shape: tuple[int, ...],
                        num_chains: int) -> list[Array]:
    """The leaves of ``sample`` (in ``proposal``'s factor order), each ``[*batch, *event]``
    (shared by the chains) or ``[K, *batch, *event]`` (one per chain), floating and (when
    concrete) finite; ValueError / TypeError naming ``exact_posterior_sample`` otherwise."""
    leaves, treedef = jax.tree_util.tree_flatten(proposal, is_leaf=_q._is_distribution)
    try:
        parts = treedef.flatten_up_to(sample)
    except (TypeError, ValueError):
        raise ValueError("`exact_posterior_sample` must have the structure of one draw of "
                         f"`proposal` ({treedef})") from None
    out = []
    for part, dist in zip(parts, leaves):
        event = tuple(dist.event_shape)
        part_shape = tuple(jnp.shape(part))
        one, per_chain = shape + event, (num_chains,) + shape + event
        if part_shape not in (one, per_chain):
            raise ValueError(f"`exact_posterior_sample` must have shape {list(one)} ([*batch, "
                             f"*event] of `proposal`) or {list(per_chain)} (one per chain); "
                             f"got {list(part_shape)}")
        part = jnp.asarray(part)
        if not jnp.issubdtype(part.dtype, jnp.floating):
            raise TypeError(f"`exact_posterior_sample` must be floating, got dtype {part.dtype}")
        _q.check_finite(part, "exact_posterior_sample")
        out.append(part)
    return out


def bdmc(
    rng_key: Array,
    log_joint_fn: Callable[[PyTree], Array],
    proposal: PyTree,
    exact_posterior_sample: PyTree,
    *,
    num_temperatures: int,
    num_chains: int,
    schedule: Linear | Sigmoidal = Sigmoidal(),
    transition: HMC = HMC(),
) -> BDMCResult:
    """Bidirectional Monte Carlo: a stochastic lower and upper bound on log p(x) (nats).

    The lower bound is forward AIS (as :func:`ais`, beta from 0 to 1). The upper bound runs the
    same schedule and transitions in reverse (beta from 1 to 0) from an exact posterior sample
    z_T ~ p(z | x): the reverse weight prod_t f_{t-1}(z_t) / f_t(z_t) is unbiased for
    Z_0 / Z_T = 1 / p(x), so minus the log of its mean over chains is, by Jensen's inequality,
    an upper bound on log p(x) in expectation (Grosse, Ghahramani & Adams 2015). Exact
    posterior samples exist for simulated data: draw z ~ p(z), then x ~ p(x | z); z is an
    exact posterior sample for that x. ``gap = upper - lower`` shrinks to 0 as T grows; the
    true log p(x) lies between the bounds (up to their Monte Carlo error). The two directions
    run side by side in one ``vmap`` (one program to compile, twice the work of :func:`ais`).

    Args:
      rng_key: a JAX PRNG key.
      log_joint_fn, proposal, num_temperatures, num_chains, schedule, transition: as
        :func:`ais` (the reverse chains use the same ones).
      exact_posterior_sample: an exact draw from p(z | x), structured like one draw of
        ``proposal``: leaves ``[*batch, *event]`` (every reverse chain starts there) or
        ``[num_chains, *batch, *event]`` (one start per chain).

    Returns:
      :class:`BDMCResult` with ``lower``, ``upper``, ``gap`` ``[*batch]`` and the two
      :class:`AISResult`.

    Raises:
      TypeError / ValueError: as :func:`ais`; ``exact_posterior_sample`` not structured and
        shaped as above, not floating, or (concrete) not finite.
    """
    shape, num_temperatures, num_chains = _check_call(
        rng_key, log_joint_fn, proposal, num_temperatures, num_chains, schedule, transition)
    starts = _check_exact_sample(exact_posterior_sample, proposal, shape, num_chains)
    betas = schedule.betas(num_temperatures)
    key_init, key_forward, key_reverse = jax.random.split(rng_key, 3)
    flatten, unflatten = _flattener_for(proposal)
    flat_forward = flatten(_initial_draws(key_init, proposal, num_chains))
    dtype = flat_forward.dtype
    treedef = jax.tree_util.tree_structure(proposal, is_leaf=_q._is_distribution)
    per_chain = [jnp.broadcast_to(part.astype(dtype), (num_chains,) + shape
                                  + part.shape[part.ndim - len(d.event_shape):])
                 for part, d in zip(starts, _q.factors(proposal, "proposal"))]
    flat_reverse = flatten(jax.tree_util.tree_unflatten(treedef, per_chain))
    # both directions in one vmap: one program to compile, the path given as data
    paths = [_path(betas), _path(betas[::-1].copy())]
    targets = jnp.asarray(np.stack([p[0] for p in paths]))
    increments = jnp.asarray(np.stack([p[1] for p in paths]))
    both = jax.vmap(lambda key, flat0, t, i: _anneal(key, flat0, t, i, unflatten, log_joint_fn,
                                                      proposal, shape, transition))(
        jnp.stack([key_forward, key_reverse]), jnp.stack([flat_forward, flat_reverse]),
        targets, increments)
    forward = jax.tree.map(lambda a: a[0], both)
    reverse = jax.tree.map(lambda a: a[1], both)
    upper = -reverse.log_marginal
    reverse = reverse._replace(log_marginal=upper)
    return BDMCResult(forward.log_marginal, upper, upper - forward.log_marginal, forward,
                      reverse)


# ----------------------------------------------------------------------------- VAE


def log_likelihood_ais(rng_key: Array, params, model, x: Array, *, num_temperatures: int,
                       num_chains: int = 16, proposal: Prior | Encoder = Encoder(),
                       schedule: Linear | Sigmoidal = Sigmoidal(), transition: HMC = HMC(),
                       batch_size: int = 100) -> AISResult:
    """AIS estimate of ``log p(x)`` per example for a trained :class:`vijax.nn.VAE` (nats).

    :func:`ais` with log p(x, z) = log p(x | z) + log N(z; 0, I) from the decoder, started
    from the prior (``Prior()``, the path of Wu et al. 2017) or from the encoder's q(z | x)
    (``Encoder()``, default). Examples are processed ``batch_size`` at a time (``lax.map``, as
    :func:`vijax.vae.log_likelihood_is`): peak memory is about ``batch_size * num_chains``
    rows of the decoder's activations and gradients, whatever ``num_temperatures``: for the
    784-200-200-50 MNIST VAE with 16 chains and batches of 100 images, XLA reserves 40 MB of
    temporaries, so 1,000 test images (or 10,000) fit easily. The cost is about
    ``num_temperatures * (num_leapfrog_steps + 2)`` decoder passes per row: 0.33 s per
    temperature per 200 images with the default 10 leapfrog steps (2026-12-03, 2-core AMD
    EPYC CPU, shared), so T = 1,000 on 1,000 images takes about half an hour there; an
    accelerator wants larger ``batch_size``.

    Args:
      rng_key: PRNG key.
      params, model: the trained :class:`vijax.nn.VAE` (``params`` = ``state.params``).
      x: ``[N, D]`` floating images (binarized for a Bernoulli decoder).
      num_temperatures, num_chains, schedule, transition: as :func:`ais`.
      proposal: :class:`Encoder` (default) or :class:`Prior`.
      batch_size: examples per batch, an int >= 1 (larger than N is fine).

    Returns:
      :class:`AISResult` with ``log_weights`` ``[num_chains, N]`` and ``[N]`` fields (the
      log-likelihood, not its negative: the test NLL is ``-log_marginal.mean()``).

    Raises:
      TypeError / ValueError: as :func:`vijax.vae.log_likelihood_is` for ``rng_key``,
        ``params``, ``model``, ``x`` and ``batch_size``; as :func:`ais` for the options;
        TypeError for a ``proposal`` that is not ``Prior()`` or ``Encoder()``.
    """
    from vijax import vae as vvae  # vijax.vae imports flax and optax: only when asked

    check_rng_key(rng_key)
    vvae._check_eval_args(params, model, x, batch_size)
    _check_options(num_temperatures, num_chains, schedule, transition)
    if not isinstance(proposal, _PROPOSALS):
        raise TypeError(f"`proposal` must be Prior() or Encoder(), got {proposal!r}")
    num_batches = -(-x.shape[0] // batch_size)
    keys = jax.random.split(rng_key, num_batches)

    def one_batch(xb, key):
        q, log_likelihood_fn = vvae._posterior_and_log_likelihood_fn(params, model, xb)
        log_joint_fn = vvae._log_joint_fn(log_likelihood_fn, vvae._prior(model, q.loc.dtype))
        start = q if isinstance(proposal, Encoder) else distrax.MultivariateNormalDiag(
            jnp.zeros_like(q.loc), jnp.ones_like(q.loc))
        result = ais(key, log_joint_fn, start, num_temperatures=num_temperatures,
                     num_chains=num_chains, schedule=schedule, transition=transition)
        return result._replace(log_weights=result.log_weights.T)  # examples first

    out = vvae._map_batches(one_batch, x, batch_size, keys)
    return out._replace(log_weights=out.log_weights.T)


class SimulatedBDMC(NamedTuple):
    """Output of :func:`bdmc_simulated`.

    Fields:
      x: ``[num_examples, D]`` the simulated images, x ~ p(x | z) (0/1 for a Bernoulli
        decoder).
      z: ``[num_examples, latent_dim]`` their latents z ~ N(0, I): an exact posterior sample
        for each x.
      bdmc: the :class:`BDMCResult` for x (``lower``, ``upper``, ``gap`` ``[num_examples]``,
        nats).
    """

    x: Array
    z: Array
    bdmc: BDMCResult


def bdmc_simulated(rng_key: Array, params, model, num_examples: int, *, num_temperatures: int,
                   num_chains: int = 16, proposal: Prior | Encoder = Encoder(),
                   schedule: Linear | Sigmoidal = Sigmoidal(), transition: HMC = HMC(),
                   batch_size: int = 100) -> SimulatedBDMC:
    """BDMC bounds on log p(x) for data simulated from a trained VAE's decoder (nats).

    Draws z_n ~ N(0, I) and x_n ~ p(x | z_n) from the model (so z_n is an exact sample of
    p(z | x_n)), then runs :func:`bdmc` on each x_n with the reverse chains started at z_n:
    ``lower`` (forward AIS, the estimator :func:`log_likelihood_ais` uses on real data) and
    ``upper`` sandwich log p(x_n); their ``gap`` says how far AIS with this
    ``num_temperatures`` can be from the truth on data like the model's own (Wu, Burda,
    Salakhutdinov & Grosse 2017, §3.2; Grosse, Ghahramani & Adams 2015). Examples are
    processed ``batch_size`` at a time, as in :func:`log_likelihood_ais`.

    Args:
      rng_key: PRNG key.
      params, model: the trained :class:`vijax.nn.VAE` (or :class:`vijax.vae.NNXModel`).
      num_examples: how many x to simulate, an int >= 1.
      num_temperatures, num_chains, schedule, transition: as :func:`ais`.
      proposal: :class:`Encoder` (default: q(z | x) of the encoder) or :class:`Prior`.
      batch_size: examples per batch, an int >= 1.

    Returns:
      :class:`SimulatedBDMC` (``x``, ``z`` and the ``[num_examples]`` bounds).

    Raises:
      TypeError / ValueError: as :func:`log_likelihood_ais`; ``num_examples`` not an int >= 1.
    """
    from vijax import vae as vvae  # vijax.vae imports flax and optax: only when asked

    check_rng_key(rng_key)
    num_examples = check_int(num_examples, "num_examples", minimum=1)
    batch_size = check_int(batch_size, "batch_size", minimum=1)
    vvae._check_params(params)
    vvae._check_model(model)
    _check_options(num_temperatures, num_chains, schedule, transition)
    if not isinstance(proposal, _PROPOSALS):
        raise TypeError(f"`proposal` must be Prior() or Encoder(), got {proposal!r}")
    z_key, x_key, run_key = jax.random.split(rng_key, 3)
    latent_dim = model.encoder.latent_dim
    z = jax.random.normal(z_key, (num_examples, latent_dim), jnp.float32)
    out = model.apply(params, z, method=type(model).decode)
    if vvae._is_bernoulli(model):
        x = jax.random.bernoulli(x_key, jax.nn.sigmoid(out)).astype(out.dtype)
    else:
        loc, scale = out
        x = loc + scale * jax.random.normal(x_key, loc.shape, loc.dtype)
    num_batches = -(-num_examples // batch_size)
    keys = jax.random.split(run_key, num_batches)

    def one_batch(xb, zb, key):
        q, log_likelihood_fn = vvae._posterior_and_log_likelihood_fn(params, model, xb)
        log_joint_fn = vvae._log_joint_fn(log_likelihood_fn, vvae._prior(model, q.loc.dtype))
        start = q if isinstance(proposal, Encoder) else distrax.MultivariateNormalDiag(
            jnp.zeros_like(q.loc), jnp.ones_like(q.loc))
        result = bdmc(key, log_joint_fn, start, zb, num_temperatures=num_temperatures,
                      num_chains=num_chains, schedule=schedule, transition=transition)
        chains_last = lambda r: r._replace(log_weights=r.log_weights.T)  # noqa: E731
        return result._replace(forward=chains_last(result.forward),
                               reverse=chains_last(result.reverse))

    data_dim = x.shape[1]
    rows = jnp.concatenate([x, z.astype(x.dtype)], axis=1)  # one row per example for lax.map
    result = vvae._map_batches(lambda xz, key: one_batch(xz[:, :data_dim], xz[:, data_dim:], key),
                               rows, batch_size, keys)
    chains_first = lambda r: r._replace(log_weights=r.log_weights.T)  # noqa: E731
    result = result._replace(forward=chains_first(result.forward),
                             reverse=chains_first(result.reverse))
    return SimulatedBDMC(x, z, result)


# ----------------------------------------------------------------------------- PSIS


def _sample_axis(log_weights, axis) -> int:
    ndim = np.ndim(log_weights)
    if ndim < 1:
        raise ValueError("`log_weights` must have a sample axis, got a scalar")
    axis = check_int(axis, "`axis`")
    if not -ndim <= axis < ndim:
        raise ValueError(f"`axis` {axis} is out of range for `log_weights` of rank {ndim}")
    return axis % ndim


def _check_log_weights(log_weights, axis) -> tuple[Any, int]:
    """``log_weights`` (any real array, or a tracer) and the normalised sample axis."""
    dtype = getattr(log_weights, "dtype", None)
    if dtype is None:
        log_weights = np.asarray(log_weights)
        dtype = log_weights.dtype
    if not (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)):
        raise TypeError(f"`log_weights` must be a real array, got dtype {dtype}")
    axis = _sample_axis(log_weights, axis)
    num = log_weights.shape[axis]
    if num < PSIS_MIN_SAMPLES:
        raise ValueError(f"`log_weights` needs at least {PSIS_MIN_SAMPLES} samples along axis "
                         f"{axis} for a Pareto fit of the tail, got {num}")
    if is_concrete(log_weights):
        arr = np.asarray(log_weights, dtype=np.float64)
        if np.isnan(arr).any() or np.isposinf(arr).any():
            raise ValueError("`log_weights` contains NaN or +inf (a weight of -inf, zero, is "
                             "allowed)")
        if np.isneginf(arr).all(axis=axis).any():
            raise ValueError("`log_weights` has an example whose weights are all zero "
                             "(every log weight -inf)")
    return log_weights, axis


def _psis_host(log_weights_last: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ArviZ's PSIS on ``[..., S]`` float64 log weights: (smoothed, normalised log weights;
    k-hat ``[...]``). Rows with NaN, +inf or no finite weight get NaN (under tracing)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # ArviZ's notice of its 1.0 refactor
        import arviz  # heavy (xarray): imported on first use

    lw = np.asarray(log_weights_last, dtype=np.float64)
    lead, num = lw.shape[:-1], lw.shape[-1]
    rows = lw.reshape(-1, num)
    ok = ~(np.isnan(rows).any(-1) | np.isposinf(rows).any(-1) | np.isneginf(rows).all(-1))
    smoothed = np.full(rows.shape, np.nan)
    khat = np.full(rows.shape[0], np.nan)
    # equal weights (q the exact posterior): zero variance, but no tail for ArviZ to fit (it
    # returns inf); they are reported as k-hat = -inf and left unsmoothed
    finite_max = np.max(np.where(np.isfinite(rows), rows, -np.inf), axis=-1, initial=-np.inf)
    finite_min = np.min(np.where(np.isfinite(rows), rows, np.inf), axis=-1, initial=np.inf)
    equal = ok & (finite_max == finite_min)
    if equal.any():
        eq = rows[equal]
        count = np.sum(np.isfinite(eq), axis=-1, keepdims=True)
        smoothed[equal] = np.where(np.isfinite(eq), -np.log(count), -np.inf)
        khat[equal] = -np.inf
    fit = ok & ~equal
    if fit.any():
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            lw_fit, k_fit = arviz.psislw(rows[fit])
        smoothed[fit] = np.asarray(lw_fit)
        khat[fit] = np.asarray(k_fit)
    return smoothed.reshape(lw.shape), khat.reshape(lead)


def psis(log_weights, axis: int = -1) -> PSISResult:
    """Pareto-smoothed importance sampling of log weights, by ArviZ (``arviz.psislw``).

    The largest ceil(min(S/5, 3 sqrt(S))) of the S weights of each example are replaced by the
    quantiles of a generalised Pareto distribution fitted to them, and the weights are
    normalised (Vehtari et al. 2024, §3, Algorithm 1). The fitted shape k-hat is the
    diagnostic: :func:`khat_category`.

    Args:
      log_weights: real array of log importance weights, log p(x, z_s) - log q(z_s), S of
        them along ``axis`` (e.g. ``[num_samples, batch]`` with ``axis=0``). -inf (a zero
        weight) is allowed.
      axis: the sample axis.

    Returns:
      :class:`PSISResult`: smoothed log weights normalised to logsumexp 0 along ``axis``
      (input shape) and k-hat (input shape less ``axis``), float64 NumPy arrays. Inside
      ``jit``/``vmap`` (traced ``log_weights``) they are float32 JAX arrays, computed on the
      host by ``jax.pure_callback``, and an example with NaN or +inf weights gets NaN instead
      of an error. Equal weights (q the exact posterior) have no tail to fit: their k-hat is
      -inf and they are returned unsmoothed.

    Raises:
      TypeError: ``log_weights`` not a real array; ``axis`` not an int.
      ValueError: ``log_weights`` a scalar, ``axis`` out of range, fewer than
        ``PSIS_MIN_SAMPLES`` = 21 samples (checked on tracers too); for concrete input, NaN or
        +inf in ``log_weights``, or an example whose log weights are all -inf.
    """
    log_weights, axis = _check_log_weights(log_weights, axis)
    if is_concrete(log_weights):
        smoothed, khat = _psis_host(np.moveaxis(np.asarray(log_weights), axis, -1))
        return PSISResult(np.moveaxis(smoothed, -1, axis), khat)
    moved = jnp.moveaxis(log_weights, axis, -1)
    # float32 whatever the input: JAX checks a callback's outputs against the x64 setting of
    # the callback's thread, which a `with jax.enable_x64(True)` block does not reach
    dtype = np.float32

    def host(lw):
        smoothed, khat = _psis_host(np.asarray(lw))
        return smoothed.astype(dtype), khat.astype(dtype)

    shapes = (jax.ShapeDtypeStruct(moved.shape, dtype),
              jax.ShapeDtypeStruct(moved.shape[:-1], dtype))
    smoothed, khat = jax.pure_callback(host, shapes, moved, vmap_method="broadcast_all")
    return PSISResult(jnp.moveaxis(smoothed, -1, axis), khat)


def psis_khat(log_weights, axis: int = -1):
    """Pareto k-hat of importance weights per example (``arviz.psislw``'s shape estimate).

    k-hat < ``KHAT_GOOD`` = 0.5: the importance-sampling (or AIS) estimate is reliable;
    up to ``KHAT_OK`` = 0.7: usable but slow to converge; above: the weights' variance is
    likely infinite and the estimate (and its standard error) should not be trusted
    (Vehtari et al. 2024, §3). A good k-hat does not show that q covers the whole
    posterior: weights never drawn cannot be diagnosed.

    Args:
      log_weights, axis: as :func:`psis`.

    Returns:
      k-hat, the input shape less ``axis``: a float64 NumPy array, or, for traced input, a
      float32 JAX array (see :func:`psis`).

    Raises:
      TypeError / ValueError: as :func:`psis`.
    """
    return psis(log_weights, axis).khat


def khat_category(khat):
    """Read k-hat against the thresholds: ``"good"`` (k-hat < ``KHAT_GOOD`` = 0.5), ``"ok"``
    (0.5 <= k-hat <= ``KHAT_OK`` = 0.7) or ``"bad"`` (k-hat > 0.7, +inf or NaN).

    Args:
      khat: a real number or array (concrete), e.g. the output of :func:`psis_khat`.

    Returns:
      a ``str`` for a scalar, else a NumPy array of strings of ``khat``'s shape.

    Raises:
      TypeError: ``khat`` a JAX tracer (read it outside ``jit``) or not real.
    """
    if not is_concrete(khat):
        raise TypeError("`khat` must be concrete (call khat_category outside jit)")
    k = np.asarray(khat)
    if not (np.issubdtype(k.dtype, np.floating) or np.issubdtype(k.dtype, np.integer)):
        raise TypeError(f"`khat` must be real, got dtype {k.dtype}")
    k = k.astype(np.float64)
    out = np.where(k < KHAT_GOOD, "good", np.where(k <= KHAT_OK, "ok", "bad"))
    return str(out) if out.ndim == 0 else out
