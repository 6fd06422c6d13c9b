"""Stochastic variational inference for any model: an optax driver around ``vijax.elbo``.

You bring ``log_joint_fn`` (log p(x, z), in nats) and a variational family
(``vijax.families``); the driver maximises a variational bound (``ELBO``,
``ELBOAnalyticKL``, ``IWAE``, ``Renyi``: each maps onto one function of ``vijax.elbo``, with
every gradient estimator that function supports) by stochastic gradient steps on the
family's unconstrained parameters phi, and optionally on model parameters theta.

Blackjax-style pure functions:

* ``init(rng_key, family, optimizer, *, model_params=None) -> SVIState``;
* ``step(rng_key, state, log_joint_fn, batch=None, *, objective) -> (SVIState, SVIInfo)``:
  one optax update of phi (and theta) on minus the bound; a step whose objective or gradient
  is not finite leaves the state's parameters unchanged and reports ``is_finite = False``;
* ``run(rng_key, state, log_joint_fn, num_steps, ...) -> (SVIState, SVIInfo[num_steps])``:
  ``num_steps`` steps in one ``lax.scan`` (jit-able, ``vmap``-able over seeds);
* ``fit(rng_key, family, optimizer, log_joint_fn, num_steps, ...)``: ``init`` then ``run`` in
  jitted chunks, with an optional progress bar, a relative-change stopping rule, and a clear
  error naming the step where the objective stops being finite.

The signature of ``log_joint_fn`` follows what the state carries: ``log_joint_fn(z)``;
``log_joint_fn(z, model_params)`` when the state has model parameters; ``batch`` is appended
when one is passed (``log_joint_fn(z, batch)`` or ``log_joint_fn(z, model_params, batch)``).
It returns one log density per element of q's batch shape (a scalar for a global latent).
``z`` has the shape of one draw of q (a pytree for a pytree of families).

Minibatches: ``minibatch_log_joint(log_prior_fn, log_likelihood_fn, num_data)`` scales the
likelihood of a batch of B points by N/B, the course's minibatch Monte Carlo identity
sum_i E_q f(x_i, z) = N E_{i ~ U{1..N}} E_q f(x_i, z) (lecture 3, "ELBO gradients"), so the
stochastic objective and its gradient are unbiased for the full-data ones; ``run``/``fit``
draw the batch indices from the key inside the scan (``draw_batch``).

Step keys: step number i (``state.step``) uses ``jax.random.fold_in(rng_key, i)``; with
minibatches that key is split into (batch key, objective key). A Python loop of ``step`` with
those keys reproduces ``run``.

Sources: lecture 3 ("ELBO gradients", "Variational EM"); CENG796 notes §4.1 (SVI); Hoffman,
Blei, Wang & Paisley 2013 ("Stochastic Variational Inference", §2.4 the minibatch noisy
gradient); Ranganath, Gerrish & Blei 2014 (black-box VI, eq. 3); Kucukelbir et al. 2017
(ADVI, Algorithm 1).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, ClassVar, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from vijax import _q
from vijax import elbo as velbo
from vijax import families as vfam
from vijax import marginal
from vijax._checks import (check_bool, check_callable, check_int, check_optimizer, check_real,
                           check_rng_key)

Array = jax.Array
PyTree = Any

__all__ = [
    "ELBO",
    "ELBOAnalyticKL",
    "IWAE",
    "Renyi",
    "Joint",
    "Alternating",
    "SVIState",
    "SVIInfo",
    "SVINonFiniteError",
    "init",
    "step",
    "run",
    "fit",
    "fit_from_state",
    "draw_batch",
    "minibatch_log_joint",
    "sample",
    "predictive",
    "log_marginal_estimate",
]


# ------------------------------------------------------------------ objectives


@dataclasses.dataclass(frozen=True)
class ELBO:
    """Monte Carlo ELBO E_q[log p(x, z) - log q(z)] (:func:`vijax.elbo.elbo`), in nats.

    ``value`` returns the ELBO itself (not its negative), per element of q's batch shape.
    ``estimator``: ``Pathwise()`` (default), ``ScoreFunction(baseline)``,
    ``StickingTheLanding()``, ``Enumerate()`` or, for a Bernoulli or one-hot categorical q,
    ``REBAR(temperature, eta)``.

    Raises:
      TypeError / ValueError: ``num_samples`` not an int >= 1; ``estimator`` not one of
        :attr:`estimators`; ``ScoreFunction(LeaveOneOut())`` with ``num_samples < 2``.
    """

    estimators: ClassVar[tuple[type, ...]] = velbo.ELBO_ESTIMATORS
    num_samples: int = 1
    estimator: Any = velbo.Pathwise()

    def __post_init__(self):
        velbo._check_objective_fields(self)

    def value(self, rng_key: Array, log_joint_fn: Callable, q: PyTree) -> Array:
        """The ELBO (nats, not negated), shape q's batch shape."""
        return velbo.elbo(rng_key, log_joint_fn, q, num_samples=self.num_samples,
                          estimator=self.estimator)


@dataclasses.dataclass(frozen=True)
class ELBOAnalyticKL:
    """ELBO with a closed-form KL: E_q[log p(x, z) - log p~(z)] - KL(q || p~), in nats.

    ``log_joint_fn`` stays the full log p(x, z); the objective subtracts ``prior``'s log
    density p~(z) inside the expectation and adds back KL(q || p~) in closed form
    (:func:`vijax.elbo.elbo_analytic_kl`). Since KL(q || p~) = E_q[log q(z) - log p~(z)], the
    value is E_q[log p(x, z) - log q(z)], the ELBO, for *any* ``prior`` whose KL to q distrax
    knows; its variance is lowest when p~ is the model's prior, the Monte Carlo term then being
    log p(x | z) alone (Kingma & Welling 2014, eq. 10; lecture 3, "Variational lower bound",
    second form). Costs one extra log p~(z) per sample.

    Attributes:
      prior: a distrax distribution (or pytree of them, shaped like the family) of the same
        family as q, batch shape ``[]`` or q's, e.g. ``distrax.MultivariateNormalDiag(0, 1)``.
      num_samples: S >= 1.
      estimator: ``Pathwise()`` or ``ScoreFunction(baseline)`` for the Monte Carlo term.

    Raises:
      TypeError / ValueError: as :class:`ELBO`; ``prior`` not a distrax distribution (pytree).
    """

    estimators: ClassVar[tuple[type, ...]] = velbo.ELBO_ANALYTIC_KL_ESTIMATORS
    prior: Any
    num_samples: int = 1
    estimator: Any = velbo.Pathwise()

    def __post_init__(self):
        _q.check_q(self.prior, "prior")
        velbo._check_objective_fields(self)

    def value(self, rng_key: Array, log_joint_fn: Callable, q: PyTree) -> Array:
        """The ELBO (nats, not negated), shape q's batch shape."""
        prior = self.prior

        def log_likelihood_fn(z):
            with jax.numpy_rank_promotion("allow"):  # a batch-[] prior against [batch] draws
                return log_joint_fn(z) - _q.log_prob(prior, z)

        return velbo.elbo_analytic_kl(rng_key, log_likelihood_fn, q, prior,
                                      num_samples=self.num_samples, estimator=self.estimator)


@dataclasses.dataclass(frozen=True)
class IWAE:
    """Importance-weighted bound with K = ``num_samples`` particles
    (:func:`vijax.elbo.iwae_bound`; Burda et al. 2016, eq. 8), in nats, not negated.

    ``estimator``: ``Pathwise()`` (default), ``ScoreFunction(baseline)`` (``LeaveOneOut()`` is
    VIMCO), ``StickingTheLanding()`` or ``DReG()``.

    Raises:
      TypeError / ValueError: as :class:`ELBO`.
    """

    estimators: ClassVar[tuple[type, ...]] = velbo.IWAE_ESTIMATORS
    num_samples: int = 5
    estimator: Any = velbo.Pathwise()

    def __post_init__(self):
        velbo._check_objective_fields(self)

    def value(self, rng_key: Array, log_joint_fn: Callable, q: PyTree) -> Array:
        """The IWAE-K bound (nats, not negated), shape q's batch shape."""
        return velbo.iwae_bound(rng_key, log_joint_fn, q, num_samples=self.num_samples,
                                estimator=self.estimator)


@dataclasses.dataclass(frozen=True)
class Renyi:
    """Variational Renyi bound VR-alpha (:func:`vijax.elbo.renyi_bound`; Li & Turner 2016,
    eq. 5), in nats, not negated; pathwise gradient. alpha = 0 is IWAE, alpha -> 1 the ELBO.

    Raises:
      TypeError / ValueError: ``alpha`` not a finite real >= 0; ``num_samples`` not an
        int >= 1.
    """

    alpha: float
    num_samples: int = 5

    def __post_init__(self):
        object.__setattr__(self, "alpha", check_real(self.alpha, "`alpha`", minimum=0.0))
        check_int(self.num_samples, "num_samples", minimum=1)

    def value(self, rng_key: Array, log_joint_fn: Callable, q: PyTree) -> Array:
        """The VR-alpha bound (nats, not negated), shape q's batch shape."""
        return velbo.renyi_bound(rng_key, log_joint_fn, q, alpha=self.alpha,
                                 num_samples=self.num_samples)


OBJECTIVES = (ELBO, ELBOAnalyticKL, IWAE, Renyi)


def _check_objective(objective: Any) -> None:
    if isinstance(objective, OBJECTIVES):
        return
    hint = ""
    if isinstance(objective, type) and issubclass(objective, OBJECTIVES):
        hint = f" (a class: pass an instance, e.g. {objective.__name__}())"
    elif isinstance(objective, velbo.IWAE_ESTIMATORS):
        hint = " (a gradient estimator: pass it inside an objective, e.g. ELBO(estimator=...))"
    raise TypeError("`objective` must be an instance of vijax.svi.ELBO, ELBOAnalyticKL, IWAE "
                    f"or Renyi, got {objective!r}{hint}")


# ------------------------------------------------------------------ schedules


@dataclasses.dataclass(frozen=True)
class Joint:
    """Every step updates phi and theta together from one gradient of the bound (the VAE
    algorithm's update, lecture 3, "Variational autoencoder (VAE)": both at once)."""


@dataclasses.dataclass(frozen=True)
class Alternating:
    """Variational EM (lecture 3, "Variational EM"): ``variational_steps`` gradient steps on
    phi (E-step) then ``model_steps`` gradient steps on theta (M-step), repeated. Step i is an
    E-step iff ``i mod (variational_steps + model_steps) < variational_steps``.

    Raises:
      TypeError / ValueError: a count that is not an int >= 1.
    """

    variational_steps: int = 1
    model_steps: int = 1

    def __post_init__(self):
        check_int(self.variational_steps, "variational_steps", minimum=1)
        check_int(self.model_steps, "model_steps", minimum=1)


# ------------------------------------------------------------------ state


@flax.struct.dataclass
class SVIState:
    """Optimisation state of :func:`step` (a pytree; the family and optimizers are static).

    Fields:
      params: variational parameters phi (unconstrained), the family's ``init`` pytree.
      opt_state: ``optimizer``'s state for ``params``.
      model_params: model parameters theta (a pytree of float arrays), or None.
      model_opt_state: ``model_optimizer``'s state for ``model_params``, or None.
      step: ``[]`` int32, the number of steps taken (skipped non-finite ones included).
      family: the variational family (static).
      optimizer: the optax transformation for phi (static).
      model_optimizer: the optax transformation for theta, or None (static).
    """

    params: PyTree
    opt_state: PyTree
    model_params: PyTree
    model_opt_state: PyTree
    step: Array
    family: Any = flax.struct.field(pytree_node=False)
    optimizer: Any = flax.struct.field(pytree_node=False)
    model_optimizer: Any = flax.struct.field(pytree_node=False)

    def distribution(self):
        """q at the current parameters (a distrax distribution or pytree of them)."""
        return vfam.distribution(self.family, self.params)


class SVIInfo(NamedTuple):
    """What one step reports (``[]`` each; stacked ``[num_steps]`` by :func:`run`).

    Fields:
      objective: the bound (nats, *not* negated: the ELBO itself, summed over q's batch
        shape) at the parameters before the update, from the step's own samples.
      grad_norm: global L2 norm of the gradient of minus the bound (phi and theta).
      is_finite: bool, whether objective and gradient were finite (if not, the update was
        not applied).
    """

    objective: Array
    grad_norm: Array
    is_finite: Array


class SVINonFiniteError(FloatingPointError):
    """The objective or its gradient stopped being finite during :func:`fit`.

    Attributes:
      step: the index of the first non-finite step.
      state: the state after the last finite step (its parameters are the last finite ones).
      info: the ``SVIInfo`` trace of the steps before it.
    """

    def __init__(self, message: str, step: int, state: SVIState, info: SVIInfo):
        super().__init__(message)
        self.step, self.state, self.info = step, state, info


def _check_state(state: Any, name: str = "state") -> None:
    if not isinstance(state, SVIState):
        raise TypeError(f"`{name}` must be a vijax.svi.SVIState (from svi.init), got "
                        f"{type(state).__name__}")


def _check_model_params(model_params: Any) -> PyTree:
    if model_params is None:
        return None
    leaves = jax.tree_util.tree_leaves(model_params)
    if not leaves:
        raise ValueError("`model_params` must hold at least one array (or be None)")
    for leaf in leaves:
        dtype = getattr(leaf, "dtype", None) if not isinstance(leaf, (float, int)) else None
        if isinstance(leaf, bool) or (dtype is None and not isinstance(leaf, float)) or (
                dtype is not None and not jnp.issubdtype(dtype, jnp.floating)):
            raise TypeError("`model_params` leaves must be floating arrays (they are optimised "
                            f"by gradient steps), got {type(leaf).__name__}"
                            + (f" of dtype {dtype}" if dtype is not None else ""))
    model_params = jax.tree_util.tree_map(jnp.asarray, model_params)
    for leaf in jax.tree_util.tree_leaves(model_params):
        _q.check_finite(leaf, "model_params")
    return model_params


def init(rng_key: Array, family: PyTree, optimizer: optax.GradientTransformation, *,
         model_params: PyTree = None,
         model_optimizer: optax.GradientTransformation | None = None) -> SVIState:
    """The initial :class:`SVIState`: the family's initial parameters and optimizer states.

    Args:
      rng_key: a JAX PRNG key (for the family's ``init``).
      family: a family of :mod:`vijax.families` (or a pytree of them: independent factors).
      optimizer: an optax transformation *instance* for phi, e.g. ``optax.adam(1e-2)``.
      model_params: model parameters theta to learn with phi (a pytree of float arrays), or
        None.
      model_optimizer: optax transformation for theta; defaults to ``optimizer``.

    Raises:
      TypeError: ``rng_key`` not a key; ``family`` not a family (pytree); an optimizer without
        callable ``init``/``update``; non-floating ``model_params``.
      ValueError: ``model_params`` with no array or with non-finite values;
        ``model_optimizer`` without ``model_params``.
    """
    check_rng_key(rng_key)
    vfam.check_family(family)
    check_optimizer(optimizer)
    model_params = _check_model_params(model_params)
    if model_optimizer is not None:
        if model_params is None:
            raise ValueError("`model_optimizer` given without `model_params`")
        check_optimizer(model_optimizer, "model_optimizer")
    elif model_params is not None:
        model_optimizer = optimizer
    params = vfam.init_params(rng_key, family)
    model_opt_state = None if model_params is None else model_optimizer.init(model_params)
    return SVIState(params=params, opt_state=optimizer.init(params), model_params=model_params,
                    model_opt_state=model_opt_state, step=jnp.zeros((), jnp.int32),
                    family=family, optimizer=optimizer, model_optimizer=model_optimizer)


# ------------------------------------------------------------------ one step


def _bound_log_joint(log_joint_fn: Callable, model_params: PyTree, batch: PyTree,
                     has_model: bool) -> Callable:
    extra = ((model_params,) if has_model else ()) + (() if batch is None else (batch,))
    return lambda z: log_joint_fn(z, *extra)


def _tree_select(pred: Array, on_true: PyTree, on_false: PyTree) -> PyTree:
    return jax.tree_util.tree_map(
        lambda a, b: jnp.where(jnp.broadcast_to(pred, jnp.shape(a)), a, b), on_true, on_false)


def _all_finite(tree: PyTree) -> Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)]
    return jnp.stack(leaves).all() if leaves else jnp.array(True)


def step(rng_key: Array, state: SVIState, log_joint_fn: Callable, batch: PyTree = None, *,
         objective: Any = ELBO(), update_variational: bool = True,
         update_model: bool = True) -> tuple[SVIState, SVIInfo]:
    """One stochastic gradient step on minus the bound (pure; jit it yourself).

    The loss is ``-sum(objective.value(rng_key, log_joint_fn(., [model_params,] [batch]), q))``
    (q's batch shape summed: one global latent, or the total over local latents). If the
    loss or any gradient entry is not finite, the returned state keeps the old parameters and
    optimizer states (only ``step`` advances) and ``info.is_finite`` is False.

    Args:
      rng_key: a JAX PRNG key for the objective's samples.
      state: from :func:`init`.
      log_joint_fn: log p(x, z) in nats; see the module docstring for its arguments. Must
        return q's batch shape (``[]`` for a global latent).
      batch: data passed to ``log_joint_fn`` as its last argument, or None.
      objective: :class:`ELBO` (default), :class:`ELBOAnalyticKL`, :class:`IWAE` or
        :class:`Renyi`.
      update_variational: update phi (False for an M-step of variational EM).
      update_model: update theta (when the state has it; False for an E-step).

    Returns:
      ``(new_state, SVIInfo)``; ``info.objective`` is the bound itself (not negated).

    Raises:
      TypeError: bad ``rng_key``/``state``/``objective``; ``log_joint_fn`` not callable.
      ValueError: nothing to update (``update_variational=False`` with no model parameters or
        ``update_model=False``); ``log_joint_fn`` returning the wrong shape (at trace time,
        naming q's batch and event shapes).
    """
    check_rng_key(rng_key)
    _check_state(state)
    check_callable(log_joint_fn, "`log_joint_fn`")
    _check_objective(objective)
    check_bool(update_variational, "`update_variational`")
    check_bool(update_model, "`update_model`")
    has_model = state.model_params is not None
    update_model = update_model and has_model
    if not (update_variational or update_model):
        raise ValueError("nothing to update: `update_variational` is False and the state has no "
                         "model parameters to update (or `update_model` is False)")

    def loss_fn(params, model_params):
        q = vfam.distribution(state.family, params)
        fn = _bound_log_joint(log_joint_fn, model_params, batch, has_model)
        return -jnp.sum(objective.value(rng_key, fn, q))

    argnums = tuple(i for i, on in ((0, update_variational), (1, update_model)) if on)
    loss, grads = jax.value_and_grad(loss_fn, argnums=argnums)(state.params, state.model_params)
    grads = dict(zip(argnums, grads))
    new = {}
    if update_variational:
        updates, new["opt_state"] = state.optimizer.update(grads[0], state.opt_state,
                                                           state.params)
        new["params"] = optax.apply_updates(state.params, updates)
    if update_model:
        updates, new["model_opt_state"] = state.model_optimizer.update(
            grads[1], state.model_opt_state, state.model_params)
        new["model_params"] = optax.apply_updates(state.model_params, updates)
    finite = jnp.isfinite(loss) & _all_finite(grads)
    old = {name: getattr(state, name) for name in new}
    new = _tree_select(finite, new, old)
    info = SVIInfo(objective=-loss, grad_norm=optax.tree.norm(grads), is_finite=finite)
    return state.replace(step=state.step + 1, **new), info


# ------------------------------------------------------------------ minibatches


def _num_data(data: PyTree, name: str = "data") -> int:
    leaves = jax.tree_util.tree_leaves(data)
    if not leaves:
        raise ValueError(f"`{name}` must hold at least one array")
    sizes = {int(np.shape(x)[0]) if np.ndim(x) else None for x in leaves}
    if None in sizes:
        raise ValueError(f"every array of `{name}` needs a leading data axis [num_data, ...]")
    if len(sizes) != 1:
        raise ValueError(f"every array of `{name}` must have the same leading size (num_data); "
                         f"got {sorted(sizes)}")
    return sizes.pop()


def draw_batch(rng_key: Array, data: PyTree, batch_size: int) -> PyTree:
    """A minibatch of ``batch_size`` rows drawn uniformly *with replacement* from ``data``
    (the lecture's "pick i ~ U[1, n]", B times), so N/B times its sum is unbiased for the
    full-data sum. Works inside ``lax.scan``/``jit``.

    Args:
      rng_key: a JAX PRNG key.
      data: an array or pytree of arrays sharing a leading axis ``[num_data, ...]``.
      batch_size: B, 1 <= B <= num_data (a Python int).

    Returns:
      ``data``'s pytree with leaves ``[B, ...]``.

    Raises:
      TypeError: ``rng_key`` not a key, ``batch_size`` not an int.
      ValueError: ``batch_size`` outside [1, num_data]; leaves without a common leading axis.
    """
    check_rng_key(rng_key)
    num_data = _num_data(data)
    batch_size = check_int(batch_size, "`batch_size`", minimum=1, maximum=num_data)
    idx = jax.random.randint(rng_key, (batch_size,), 0, num_data)
    return jax.tree_util.tree_map(lambda a: jnp.take(a, idx, axis=0), data)


def minibatch_log_joint(log_prior_fn: Callable, log_likelihood_fn: Callable,
                        num_data: int) -> Callable:
    """``log_joint_fn(z, [model_params,] batch) = log p(z) + (N / B) sum_b log p(x_b | z)``.

    The minibatch Monte Carlo estimate of log p(X, z) = log p(z) + sum_{i=1}^N log p(x_i | z)
    (lecture 3, "ELBO gradients": n times the average over a random subset), unbiased for it
    when the B rows are drawn uniformly (:func:`draw_batch`); with the full data as the batch
    (B = N) it is exact.

    Args:
      log_prior_fn: ``log_prior_fn(z, [model_params]) -> []``, log p(z) in nats.
      log_likelihood_fn: ``log_likelihood_fn(z, [model_params,] batch) -> [B]``, one
        log p(x_b | z) per row of the batch (nats).
      num_data: N, the full data size (a Python int >= 1).

    Returns:
      a ``log_joint_fn`` for :func:`step`/:func:`run`/:func:`fit`.

    Raises:
      TypeError: a function not callable; ``num_data`` not an int.
      ValueError: ``num_data < 1``; (when called) ``log_likelihood_fn`` not returning ``[B]``.
    """
    check_callable(log_prior_fn, "`log_prior_fn`")
    check_callable(log_likelihood_fn, "`log_likelihood_fn`")
    num_data = check_int(num_data, "`num_data`", minimum=1)

    def log_joint_fn(z, *args):
        if not args:
            raise ValueError("a minibatch log_joint_fn needs a batch: pass `data` to run/fit "
                             "or `batch` to step")
        *head, batch = args
        size = _num_data(batch, "batch")
        log_lik = log_likelihood_fn(z, *head, batch)
        if tuple(jnp.shape(log_lik))[:1] != (size,):
            raise ValueError("`log_likelihood_fn` must return one log density per row of the "
                             f"batch, shape ({size}, ...); got shape {tuple(jnp.shape(log_lik))}")
        return log_prior_fn(z, *head) + (num_data / size) * jnp.sum(log_lik, axis=0)

    return log_joint_fn


# ------------------------------------------------------------------ many steps


def _make_step_fn(log_joint_fn, objective, schedule):
    """``state, key, batch -> (state, info)`` for step number ``state.step`` of ``schedule``."""
    if isinstance(schedule, Joint):
        return lambda state, key, batch: step(key, state, log_joint_fn, batch,
                                              objective=objective)
    period = schedule.variational_steps + schedule.model_steps

    def step_fn(state, key, batch):
        def e_step(s):
            return step(key, s, log_joint_fn, batch, objective=objective, update_model=False)

        def m_step(s):
            return step(key, s, log_joint_fn, batch, objective=objective,
                        update_variational=False)

        return jax.lax.cond(state.step % period < schedule.variational_steps, e_step, m_step,
                            state)

    return step_fn


def _check_run_args(state, log_joint_fn, num_steps, objective, data, batch_size, schedule):
    _check_state(state)
    check_callable(log_joint_fn, "`log_joint_fn`")
    num_steps = check_int(num_steps, "`num_steps`", minimum=1)
    _check_objective(objective)
    if not isinstance(schedule, (Joint, Alternating)):
        raise TypeError("`schedule` must be vijax.svi.Joint() or Alternating(...), got "
                        f"{schedule!r}")
    if isinstance(schedule, Alternating) and state.model_params is None:
        raise ValueError("`schedule` Alternating(...) needs model parameters: pass "
                         "`model_params` to init/fit")
    if batch_size is not None:
        if data is None:
            raise ValueError("`batch_size` given without `data`")
        num_data = _num_data(data)
        batch_size = check_int(batch_size, "`batch_size`", minimum=1)
        if batch_size > num_data:
            raise ValueError(f"`batch_size` {batch_size} is larger than the data "
                             f"({num_data} rows)")
    elif data is not None:
        _num_data(data)
    return num_steps, batch_size


def run(rng_key: Array, state: SVIState, log_joint_fn: Callable, num_steps: int, *,
        objective: Any = ELBO(), data: PyTree = None, batch_size: int | None = None,
        schedule: Joint | Alternating = Joint()) -> tuple[SVIState, SVIInfo]:
    """``num_steps`` steps of :func:`step` in one ``lax.scan`` (pure; jit/vmap it yourself).

    Step number i (``state.step``, so a run continues where the state left off) uses
    ``key_i = jax.random.fold_in(rng_key, i)``. Without ``batch_size`` every step passes
    ``data`` (or nothing, if None) as the batch; with it, ``key_i`` is split into a batch key
    for :func:`draw_batch` and the objective's key. Non-finite steps are skipped (see
    :func:`step`) and flagged in the trace.

    Args:
      rng_key: a JAX PRNG key.
      state: from :func:`init` (or an earlier run).
      log_joint_fn: as in :func:`step`.
      num_steps: a Python int >= 1.
      objective: as in :func:`step`.
      data: a pytree of arrays ``[num_data, ...]``, or None.
      batch_size: minibatch size B (<= num_data), or None for the full ``data`` every step.
      schedule: :class:`Joint` (default) or :class:`Alternating` (variational EM).

    Returns:
      ``(state, info)``; ``info`` is :class:`SVIInfo` with leaves ``[num_steps]``.

    Raises:
      TypeError / ValueError: as :func:`step`; ``num_steps`` not an int >= 1; ``batch_size``
        without ``data`` or larger than it; ``Alternating`` without model parameters.
    """
    check_rng_key(rng_key)
    num_steps, batch_size = _check_run_args(state, log_joint_fn, num_steps, objective, data,
                                            batch_size, schedule)
    step_fn = _make_step_fn(log_joint_fn, objective, schedule)

    # Every step's keys, derived before the loop in one vectorised pass (the same keys as
    # fold_in(rng_key, state.step) inside it, bit for bit, with no hash left in the loop body).
    keys = jax.vmap(lambda i: jax.random.fold_in(rng_key, i))(
        state.step + jnp.arange(num_steps, dtype=jnp.asarray(state.step).dtype))
    if batch_size is not None:
        keys = jax.vmap(jax.random.split)(keys)  # [num_steps, 2]: batch key, objective key

    def body(state, key):
        if batch_size is None:
            batch = data
        else:
            batch_key, key = key[0], key[1]
            batch = draw_batch(batch_key, data, batch_size)
        return step_fn(state, key, batch)

    return jax.lax.scan(body, state, keys)


_run_jit = jax.jit(run, static_argnames=("log_joint_fn", "num_steps", "objective",
                                         "batch_size", "schedule"))


def _check_log_joint_output(state, log_joint_fn, data, batch_size):
    """Trace ``log_joint_fn`` once at a draw of q (no compile, no compute) and check its shape
    against q's batch shape, before any jitted work."""
    q = state.distribution()
    shape = _q.batch_shape(q)
    batch = data
    if batch_size is not None:
        batch = jax.tree_util.tree_map(lambda a: a[:batch_size], data)

    def evaluate(params, model_params):
        z = _q.sample(jax.random.key(0), vfam.distribution(state.family, params))
        return _bound_log_joint(log_joint_fn, model_params, batch,
                                state.model_params is not None)(z)

    out = jax.eval_shape(evaluate, state.params, state.model_params)
    if tuple(getattr(out, "shape", ())) != shape:
        raise ValueError(f"`log_joint_fn` must return one log density per element of q's batch "
                         f"shape {shape} (a scalar for a global latent); got shape "
                         f"{tuple(getattr(out, 'shape', ()))}")


def fit_from_state(rng_key: Array, state: SVIState, log_joint_fn: Callable, num_steps: int, *,
                   objective: Any = ELBO(), data: PyTree = None, batch_size: int | None = None,
                   schedule: Joint | Alternating = Joint(), tol: float | None = None,
                   check_every: int | None = None, progress: bool = False,
                   skip_nonfinite: bool = False) -> tuple[SVIState, SVIInfo]:
    """:func:`run` from ``state`` in jitted chunks of ``check_every`` steps, with checks between.

    The steps, keys and results are those of ``run(rng_key, state, ...)`` (chunking does not
    change them). Between chunks: a progress bar (tqdm) when ``progress``; with ``tol``, stop
    once the mean objective of a chunk differs from the previous chunk's by at most ``tol``
    times its magnitude; a non-finite step stops the fit (unless ``skip_nonfinite``).

    Args:
      rng_key: a JAX PRNG key (as :func:`run`).
      state: the state to continue from (as :func:`run`).
      log_joint_fn: as :func:`step`.
      num_steps: a Python int >= 1, the most steps to take.
      objective: as :func:`step`.
      data: as :func:`run`.
      batch_size: as :func:`run`.
      schedule: as :func:`run`.
      tol: relative-change tolerance (> 0), or None to run all ``num_steps``.
      check_every: chunk length (default: all steps in one chunk when neither ``tol`` nor
        ``progress`` is set, else ``max(1, min(1000, num_steps // 20))``).
      progress: show a tqdm progress bar.
      skip_nonfinite: skip non-finite steps and go on (they stay flagged in the trace)
        instead of stopping.

    Returns:
      ``(state, info)``: the final state and the :class:`SVIInfo` trace ``[steps done]``
      (fewer than ``num_steps`` iff ``tol`` stopped the fit).

    Raises:
      TypeError / ValueError: as :func:`run`; ``log_joint_fn`` returning a shape other than
        q's batch shape (checked before compiling); ``tol`` not > 0; ``check_every`` not an
        int >= 1; a ``log_joint_fn`` whose objective is not finite at the initial parameters
        (ValueError naming ``log_joint_fn``).
      SVINonFiniteError: the objective or gradient stopped being finite at some step; the
        error carries that step, the last finite state and the trace so far.
    """
    check_rng_key(rng_key)
    num_steps, batch_size = _check_run_args(state, log_joint_fn, num_steps, objective, data,
                                            batch_size, schedule)
    if tol is not None:
        tol = check_real(tol, "`tol`", exclusive_minimum=0.0)
    check_bool(progress, "`progress`")
    check_bool(skip_nonfinite, "`skip_nonfinite`")
    if check_every is None:
        check_every = (num_steps if tol is None and not progress
                       else max(1, min(1000, num_steps // 20)))
    check_every = check_int(check_every, "`check_every`", minimum=1)
    _check_log_joint_output(state, log_joint_fn, data, batch_size)
    kwargs = dict(log_joint_fn=log_joint_fn, objective=objective, data=data,
                  batch_size=batch_size, schedule=schedule)

    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=num_steps, desc="svi", unit="step")
    infos, done, previous = [], 0, None
    try:
        while done < num_steps:
            length = min(check_every, num_steps - done)
            start = state
            state, info = _run_jit(rng_key, state, num_steps=length, **kwargs)
            finite = np.asarray(info.is_finite)
            if not skip_nonfinite and not finite.all():
                first = int(np.argmin(finite))
                if done + first == 0 and int(start.step) == 0:
                    raise ValueError(
                        "`log_joint_fn` gives a non-finite objective or gradient at the initial "
                        "parameters (step 0): check the model's support and the family's "
                        "initialisation (init_loc, init_scale)")
                if first:  # the state after the last finite step
                    state, _ = _run_jit(rng_key, start, num_steps=first, **kwargs)
                else:
                    state = start
                infos.append(jax.tree_util.tree_map(lambda a: a[:first], info))
                trace = _concatenate(infos)
                raise SVINonFiniteError(
                    f"the objective or its gradient is not finite at step {int(start.step) + first} "
                    f"(objective {float(info.objective[first])}); the error's `state` holds the "
                    "parameters after the last finite step (pass skip_nonfinite=True to skip "
                    "such steps instead)", int(start.step) + first, state, trace)
            infos.append(info)
            done += length
            if bar is not None:
                bar.update(length)
                bar.set_postfix(objective=f"{float(info.objective[-1]):.4g}")
            if tol is not None:
                values = np.asarray(info.objective)[finite]
                current = float(values.mean()) if values.size else math.nan
                if previous is not None and abs(current - previous) <= tol * abs(previous):
                    break
                previous = current
    finally:
        if bar is not None:
            bar.close()
    return state, _concatenate(infos)


def _concatenate(infos: list[SVIInfo]) -> SVIInfo:
    if len(infos) == 1:
        return infos[0]
    return jax.tree_util.tree_map(lambda *a: jnp.concatenate(a), *infos)


def fit(rng_key: Array, family: PyTree, optimizer: optax.GradientTransformation,
        log_joint_fn: Callable, num_steps: int, *, objective: Any = ELBO(),
        model_params: PyTree = None, model_optimizer: optax.GradientTransformation | None = None,
        data: PyTree = None, batch_size: int | None = None,
        schedule: Joint | Alternating = Joint(), tol: float | None = None,
        check_every: int | None = None, progress: bool = False,
        skip_nonfinite: bool = False) -> tuple[SVIState, SVIInfo]:
    """Fit a variational family: :func:`init` with the first half of ``rng_key``'s split, then
    :func:`fit_from_state` with the second.

    Example (a global latent, full data)::

        def log_joint_fn(w):                      # w [D] -> [] (nats)
            logits = x @ w
            return (prior.log_prob(w) - jnp.sum(optax.sigmoid_binary_cross_entropy(logits, y)))
        state, info = svi.fit(jax.random.key(0), families.FullRankNormal(D),
                              optax.adam(1e-2), log_joint_fn, 5000)
        q = state.distribution()                  # info.objective: the ELBO trace (nats)

    Args and Raises: as :func:`init` and :func:`fit_from_state`.

    Returns:
      ``(state, info)``: ``state.params`` are the fitted variational parameters
      (``state.distribution()`` is q), ``state.model_params`` the fitted theta, and ``info``
      the :class:`SVIInfo` trace (``info.objective``: the bound, in nats, per step).
    """
    check_rng_key(rng_key)
    init_key, run_key = jax.random.split(rng_key)
    state = init(init_key, family, optimizer, model_params=model_params,
                 model_optimizer=model_optimizer)
    return fit_from_state(run_key, state, log_joint_fn, num_steps, objective=objective,
                          data=data, batch_size=batch_size, schedule=schedule, tol=tol,
                          check_every=check_every, progress=progress,
                          skip_nonfinite=skip_nonfinite)


# ------------------------------------------------------------------ using the fitted q


def sample(rng_key: Array, family: PyTree, params: PyTree, num_samples: int) -> PyTree:
    """``num_samples`` independent draws z ~ q_params: leaves ``[num_samples, *batch, *event]``.

    Raises:
      TypeError / ValueError: bad ``rng_key``, ``family`` or ``num_samples`` (an int >= 1).
    """
    check_rng_key(rng_key)
    num_samples = check_int(num_samples, "`num_samples`", minimum=1)
    q = vfam.distribution(family, params)
    return jax.vmap(lambda k: _q.sample(k, q))(jax.random.split(rng_key, num_samples))


def predictive(rng_key: Array, family: PyTree, params: PyTree, fn: Callable,
               num_samples: int) -> PyTree:
    """Push posterior draws through ``fn``: ``[fn(key_s, z_s) for z_s ~ q]``, stacked.

    ``fn(rng_key, z) -> pytree`` may use its key to draw from the likelihood (posterior
    predictive samples y ~ p(y | z)) or ignore it (e.g. a predicted probability, whose mean
    over draws is the posterior-predictive probability E_q p(y | x, z)).

    Returns:
      ``fn``'s output pytree with a leading axis ``[num_samples]``.

    Raises:
      TypeError / ValueError: bad ``rng_key``/``family``/``num_samples``; ``fn`` not callable.
    """
    check_rng_key(rng_key)
    check_callable(fn, "`fn`")
    num_samples = check_int(num_samples, "`num_samples`", minimum=1)
    q = vfam.distribution(family, params)

    def one(key):
        z_key, fn_key = jax.random.split(key)
        return fn(fn_key, _q.sample(z_key, q))

    return jax.vmap(one)(jax.random.split(rng_key, num_samples))


def log_marginal_estimate(rng_key: Array, family: PyTree, params: PyTree,
                          log_joint_fn: Callable, *, num_samples: int,
                          model_params: PyTree = None, batch: PyTree = None,
                          chunk_size: int | None = None, return_khat: bool = False):
    """log p(x) by importance sampling with the fitted q as proposal (nats):
    :func:`vijax.marginal.importance_sampling`, i.e. log (1/K) sum_k p(x, z_k) / q(z_k).

    A stochastic lower bound on log p(x) whose exp is unbiased for p(x); tight when q is close
    to the posterior (CENG796 notes §3.2). With a minibatch ``log_joint_fn`` pass the full
    data as ``batch`` (N/B = 1).

    Args:
      rng_key: a JAX PRNG key.
      family: the fitted family (``state.family``).
      params: its parameters (``state.params``).
      log_joint_fn: as in :func:`step` (called with ``model_params`` and ``batch`` when given).
      num_samples: K >= 1.
      model_params: theta, if ``log_joint_fn`` takes it.
      batch: the data argument of ``log_joint_fn``, if it takes one.
      chunk_size: samples drawn at once (memory), None for all K.
      return_khat: also return the Pareto k-hat of the K importance weights
        (:func:`vijax.ais.psis_khat`, by ArviZ on the host): below 0.5 the estimate is
        reliable, above 0.7 q is too far from the posterior for it to be trusted. All K log
        weights are then kept (:func:`vijax.marginal.importance_log_weights`: memory
        ``K x batch`` floats instead of a running logsumexp) and the estimate is their
        logmeanexp, equal to the default's up to float rounding. Needs K >= 21.

    Returns:
      log p(x) estimate, shape q's batch shape (``[]`` for a global latent); with
      ``return_khat``, the pair ``(estimate, khat)`` of that shape (khat a NumPy array, or a
      JAX array under ``jit``).

    Raises:
      TypeError / ValueError: as :func:`vijax.marginal.importance_sampling`; ``return_khat``
        not a bool; ``num_samples`` < 21 with ``return_khat``.
    """
    check_callable(log_joint_fn, "`log_joint_fn`")
    check_bool(return_khat, "`return_khat`")
    q = vfam.distribution(family, params)
    fn = _bound_log_joint(log_joint_fn, model_params, batch, model_params is not None)
    if not return_khat:
        return marginal.importance_sampling(rng_key, fn, q, num_samples=num_samples,
                                            chunk_size=chunk_size)
    from vijax import ais as vais  # imports Blackjax; ArviZ is imported on first k-hat

    num_samples = check_int(num_samples, "`num_samples`", minimum=1)
    if num_samples < vais.PSIS_MIN_SAMPLES:
        raise ValueError(f"`num_samples` must be >= {vais.PSIS_MIN_SAMPLES} with "
                         f"return_khat=True (a Pareto fit of the tail), got {num_samples}")
    log_w = marginal.importance_log_weights(rng_key, fn, q, num_samples=num_samples,
                                            chunk_size=chunk_size)
    estimate = jax.nn.logsumexp(log_w, axis=0) - math.log(num_samples)
    return estimate, vais.psis_khat(log_w, axis=0)
