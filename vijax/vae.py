"""Amortized variational inference: VAE objectives, train steps and evaluation.

The VAE (lecture 3, "Variational autoencoder (VAE)"; CENG796 notes, sections 2.2 and 4.3)
maximises, over encoder parameters phi and decoder parameters theta, a lower bound on
``log p_theta(x)`` averaged over the data. Every bound here is computed by :mod:`vijax.elbo`
(there is no second ELBO formula in this module):

* :class:`ELBOAnalyticKL` -- ``E_q[log p(x | z)] - KL(q(z | x) || p(z))`` with the KL in closed form
  (Kingma and Welling 2014, eq. 10), :func:`vijax.elbo.elbo_analytic_kl`.
* :class:`ELBOMonteCarlo` -- ``E_q[log p(x, z) - log q(z | x)]`` by Monte Carlo,
  :func:`vijax.elbo.elbo`.
* :class:`IWAE` -- ``E[log (1/K) sum_k p(x, z_k) / q(z_k | x)]`` (Burda et al. 2016, eq. 8),
  :func:`vijax.elbo.iwae_bound`.

Shapes: images ``x`` are ``[batch, D]`` floating pixels in [0, 1] (binarized or grey levels for
the Bernoulli decoder); latents are ``[batch, L]``. All values are in nats per example.

Everything here is pure and un-jitted: the caller wraps steps with ``jax.jit`` (donating the
state, ``donate_argnums=0``). Typical use::

    model = vijax.nn.iwae_mnist_vae(vijax.nn.pixel_mean_logit(train_images))
    optimizer = optax.adam(1e-3)
    objective = vae.ELBOAnalyticKL()
    state = vae.init_train_state(key0, model, optimizer, train_images.shape[-1])
    vae.check_images(train_images, name="train_images")      # once, on the concrete data
    train_epoch = jax.jit(vae.make_train_epoch(model, optimizer, objective,
                                               batch_size=100, binarize=True),
                          donate_argnums=0)
    for epoch in range(num_epochs):
        state, metrics = train_epoch(state, train_images, jax.random.fold_in(key1, epoch))
    log_px = vae.log_likelihood_is(key2, state.params, model, test_images, num_samples=5000)

The model is a linen :class:`vijax.nn.VAE` (the engine's native form: ``model.init`` gives the
parameter pytree, ``model.apply`` evaluates it). A Flax NNX VAE (:mod:`vijax.nnx`) enters as
``model, params = from_nnx(module)``, its functional form :class:`NNXModel`, which every
function here takes in place of the linen model; :func:`to_nnx` gives the NNX module back
with trained parameters. Those three are written in :mod:`vijax.nnx` and imported from it on
first use, so ``import vijax.vae`` does not import ``flax.nnx``.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import sys
from typing import TYPE_CHECKING, Any, Callable, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from vijax import data as vdata
from vijax._checks import (check_bool, check_callable, check_int, check_optimizer, check_real,
                           check_rng_key)
from vijax import elbo as velbo
from vijax import marginal
from vijax import nn as vnn

__all__ = [
    "ELBOAnalyticKL",
    "ELBOMonteCarlo",
    "IWAE",
    "objective_value",
    "TrainState",
    "init_train_state",
    "make_loss_fn",
    "make_train_step",
    "make_train_epoch",
    "epoch_plan",
    "binarize_images",
    "make_data_parallel_train_step",
    "data_parallel_mesh",
    "shard_batch",
    "replicate",
    "check_images",
    "log_likelihood_is",
    "evaluate_bounds",
    "active_units",
    "encoder_means",
    "reconstruct",
    "sample_images",
    "NNXModel",
    "from_nnx",
    "to_nnx",
]

Params = Any
BATCH_AXIS = "batch"


# ----------------------------------------------------------------------------------------------
# Objectives
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ELBOAnalyticKL:
    """ELBO with closed-form Gaussian KL: ``mean_s log p(x | z_s) - KL(q(z | x) || N(0, I))``.

    Value per example = :func:`vijax.elbo.elbo_analytic_kl` (nats, the ELBO itself, not its
    negative). ``estimator``: ``vijax.elbo.Pathwise()`` (default) or ``ScoreFunction(baseline)``
    (``LeaveOneOut()`` needs ``num_samples >= 2``).

    Raises:
      TypeError: ``num_samples`` not an int, or ``estimator`` not one of :attr:`estimators`.
      ValueError: ``num_samples < 1``, or a ``LeaveOneOut`` baseline with ``num_samples < 2``.
    """

    estimators: ClassVar[tuple[type, ...]] = velbo.ELBO_ANALYTIC_KL_ESTIMATORS
    num_samples: int = 1
    estimator: Any = velbo.Pathwise()

    def __post_init__(self):
        velbo._check_objective_fields(self)

    def value(self, rng_key, log_likelihood_fn, q, prior) -> jax.Array:
        """``[batch]`` ELBO (nats, not negated) from ``log_likelihood_fn(z [batch, L]) ->
        [batch]``, ``q`` (batch shape [batch]) and the prior ``p(z)``."""
        check_rng_key(rng_key)
        return velbo.elbo_analytic_kl(rng_key, log_likelihood_fn, q, prior,
                                      num_samples=self.num_samples, estimator=self.estimator)


@dataclasses.dataclass(frozen=True)
class ELBOMonteCarlo:
    """Monte Carlo ELBO ``mean_s [log p(x, z_s) - log q(z_s | x)]``, :func:`vijax.elbo.elbo`.

    Value per example: ``[batch]``, in nats, the ELBO itself (not its negative).
    ``estimator``: ``Pathwise()`` (default), ``ScoreFunction(baseline)`` (``LeaveOneOut()``
    needs ``num_samples >= 2``) or ``StickingTheLanding()``.

    Raises:
      TypeError / ValueError: as :class:`ELBOAnalyticKL`.
    """

    estimators: ClassVar[tuple[type, ...]] = velbo.ELBO_ESTIMATORS
    num_samples: int = 1
    estimator: Any = velbo.Pathwise()

    def __post_init__(self):
        velbo._check_objective_fields(self)

    def value(self, rng_key, log_likelihood_fn, q, prior) -> jax.Array:
        """``[batch]`` ELBO (nats, not negated) from ``log_likelihood_fn(z [batch, L]) ->
        [batch]``, ``q`` (batch shape [batch]) and the prior ``p(z)``."""
        check_rng_key(rng_key)
        return velbo.elbo(rng_key, _log_joint_fn(log_likelihood_fn, prior), q,
                          num_samples=self.num_samples, estimator=self.estimator)


@dataclasses.dataclass(frozen=True)
class IWAE:
    """Importance-weighted bound with ``num_samples`` = K particles, :func:`vijax.elbo.iwae_bound`.

    Value per example: ``[batch]``, in nats, the bound itself (not its negative; Burda et al.
    2016). ``estimator``: ``Pathwise()`` (default), ``ScoreFunction(baseline)``
    (``LeaveOneOut()``, i.e. VIMCO, needs K >= 2), ``StickingTheLanding()`` or ``DReG()``.
    With K = 1 it equals the single-sample Monte Carlo ELBO.

    Raises:
      TypeError / ValueError: as :class:`ELBOAnalyticKL`.
    """

    estimators: ClassVar[tuple[type, ...]] = velbo.IWAE_ESTIMATORS
    num_samples: int = 5
    estimator: Any = velbo.Pathwise()

    def __post_init__(self):
        velbo._check_objective_fields(self)

    def value(self, rng_key, log_likelihood_fn, q, prior) -> jax.Array:
        """``[batch]`` IWAE-K bound (nats, not negated); arguments as in
        :meth:`ELBOMonteCarlo.value`."""
        check_rng_key(rng_key)
        return velbo.iwae_bound(rng_key, _log_joint_fn(log_likelihood_fn, prior), q,
                                num_samples=self.num_samples, estimator=self.estimator)


Objective = ELBOAnalyticKL | ELBOMonteCarlo | IWAE
OBJECTIVES = (ELBOAnalyticKL, ELBOMonteCarlo, IWAE)


def _check_objective_type(objective, name: str = "objective") -> None:
    """TypeError naming ``name`` unless ``objective`` is an instance of one of
    :data:`OBJECTIVES` (a class, a string or an estimator such as ``Pathwise()`` is refused)."""
    if isinstance(objective, OBJECTIVES):
        return
    hint = ""
    if isinstance(objective, type) and issubclass(objective, OBJECTIVES):
        hint = f" (a class: pass an instance, e.g. {objective.__name__}())"
    elif isinstance(objective, velbo.IWAE_ESTIMATORS):  # the widest set of estimators
        hint = (" (a gradient estimator: pass it inside an objective, e.g. "
                "IWAE(estimator=...))")
    raise TypeError(f"{name} must be an instance of vijax.vae.ELBOAnalyticKL, ELBOMonteCarlo "
                    f"or IWAE, got {objective!r}{hint}")


def _check_params(params, name: str = "params") -> None:
    """TypeError naming ``name`` unless ``params`` is a parameter mapping (``model.init``
    output, e.g. ``state.params``); a :class:`TrainState` is refused with a hint."""
    if isinstance(params, TrainState):
        raise TypeError(f"{name} must be the model's parameters (model.init output), got a "
                        "TrainState: pass state.params")
    if not isinstance(params, collections.abc.Mapping):
        raise TypeError(f"{name} must be the model's parameter dict (model.init output, e.g. "
                        f"state.params), got {type(params).__name__}")


def _log_joint_fn(log_likelihood_fn, prior):
    def log_joint_fn(z):
        # distrax's batch-[] prior broadcasts its [L] parameters against z [batch, L]
        # implicitly; allow that here, so callers may keep jax_numpy_rank_promotion="raise"
        with jax.numpy_rank_promotion("allow"):
            log_prior = prior.log_prob(z)
        return log_likelihood_fn(z) + log_prior
    return log_joint_fn


def _posterior_and_log_likelihood_fn(params, model, x):
    """``q(z | x)`` (batch [batch], event [L]) and ``z [batch, L] -> log p(x | z) [batch]``."""
    q = model.apply(params, x, method=type(model).encode)

    def log_likelihood_fn(z):
        return model.apply(params, z, x, method=type(model).log_likelihood)

    return q, log_likelihood_fn


def _prior(model, dtype):
    return vnn.standard_normal_prior(model.encoder.latent_dim, dtype)


def objective_value(objective: Objective, rng_key: jax.Array, params: Params, model,
                    x: jax.Array) -> jax.Array:
    """Per-example value of ``objective`` (a lower bound on ``log p(x)``), ``[batch]`` nats.

    Args:
      objective: an :class:`ELBOAnalyticKL`, :class:`ELBOMonteCarlo` or :class:`IWAE` instance.
      rng_key: PRNG key (``jax.random.key(seed)``).
      params: the :class:`vijax.nn.VAE` parameters (``model.init`` output, ``state.params``).
      model: a :class:`vijax.nn.VAE`.
      x: ``[batch, D]`` floating images.

    Returns:
      ``[batch]`` bound values in nats (the ELBO / IWAE bound itself, not its negative), dtype
      of the computation. Its gradient is the one of the objective's estimator (the value is
      the same for all).

    Raises:
      TypeError: ``objective`` is not an instance of one of the three classes (e.g. the class
        ``IWAE`` or an estimator ``Pathwise()``); ``rng_key`` is not a PRNG key (an int seed);
        ``params`` is a :class:`TrainState` or not a mapping; ``model`` is not a
        :class:`vijax.nn.VAE`. These are checked on tracers too.
      TypeError / ValueError: bad ``x``, see :func:`check_images` (static checks; value checks
        only for concrete ``x``).
    """
    _check_objective_type(objective)
    check_rng_key(rng_key)
    _check_params(params)
    _check_model(model)
    check_images(x, data_dim=model.decoder.data_dim, name="x",
                 unit_interval=_is_bernoulli(model))
    q, log_likelihood_fn = _posterior_and_log_likelihood_fn(params, model, x)
    return objective.value(rng_key, log_likelihood_fn, q, _prior(model, q.loc.dtype))


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------

class TrainState(NamedTuple):
    """Optimisation state.

    Fields:
      params: Flax parameter pytree of the VAE (float32 leaves of the layers' shapes).
      opt_state: optax state for ``params``.
      step: ``[]`` int32, number of updates done.
    """

    params: Params
    opt_state: optax.OptState
    step: jax.Array


def init_train_state(rng_key: jax.Array, model, optimizer: optax.GradientTransformation,
                     data_dim) -> TrainState:
    """Initialise parameters (``model.init``) and the optimizer state.

    Args:
      rng_key: PRNG key for the parameter initialisation.
      model: a :class:`vijax.nn.VAE`, or the :class:`NNXModel` of :func:`from_nnx`: then the
        parameters are a copy of the NNX module's own (made when it was built, from its
        ``nnx.Rngs``), and ``rng_key`` is checked but not used.
      optimizer: an ``optax.GradientTransformation`` *instance*, e.g. ``optax.adam(1e-3)``
        (not the function ``optax.adam`` nor a learning rate).
      data_dim: ``D`` as an int, or an example batch ``[batch, D]`` (only its shape/dtype is used).

    Returns:
      ``TrainState(params, optimizer.init(params), step=0)``.

    Raises:
      TypeError: ``rng_key`` is not a PRNG key; ``model`` is not a :class:`vijax.nn.VAE`;
        ``optimizer`` lacks callable ``init`` and ``update``; ``data_dim`` is neither an int
        nor an array (e.g. ``16.0`` or ``"16"``).
      ValueError: ``data_dim`` is an array not of rank 2, or differs from
        ``model.decoder.data_dim``.
    """
    check_rng_key(rng_key)
    _check_model(model)
    check_optimizer(optimizer)
    if isinstance(data_dim, (int, np.integer)) and not isinstance(data_dim, bool):
        example = jnp.zeros((1, int(data_dim)), jnp.float32)
    else:
        if isinstance(data_dim, bool) or not (hasattr(data_dim, "shape")
                                              or isinstance(data_dim, (list, tuple))):
            raise TypeError("data_dim must be an int or an example batch [batch, D] (an "
                            f"array), got {type(data_dim).__name__} {data_dim!r}")
        shape = np.shape(data_dim)
        if len(shape) != 2:
            raise ValueError(
                f"data_dim must be an int or an example batch [batch, D], got shape {shape}")
        example = jnp.zeros((1, shape[-1]), getattr(data_dim, "dtype", jnp.float32))
    if example.shape[-1] != model.decoder.data_dim:
        raise ValueError(f"data_dim {example.shape[-1]} != model.decoder.data_dim "
                         f"{model.decoder.data_dim}")
    params = model.init(rng_key, example)
    return TrainState(params, optimizer.init(params), jnp.zeros((), jnp.int32))


def make_loss_fn(model, objective: Objective) -> Callable:
    """``loss_fn(params, x [batch, D], rng_key) -> []``: minus the batch-mean bound (nats), i.e.
    the negative ELBO / IWAE bound, to minimise.

    No device mesh here: sharding is :func:`make_train_step`'s (its ``mesh`` needs a
    ``"batch"`` axis).

    Raises:
      TypeError (at construction): ``model`` is not a :class:`vijax.nn.VAE`, or ``objective``
        is not an :class:`ELBOAnalyticKL`, :class:`ELBOMonteCarlo` or :class:`IWAE` instance.
      TypeError / ValueError (at call/trace time): as :func:`objective_value` (``params`` a
        :class:`TrainState`, ``rng_key`` not a key, bad ``x``: static checks always, value
        checks only for concrete ``x``).
    """
    _check_model(model)
    _check_objective_type(objective)

    def loss_fn(params, x, rng_key):
        return -jnp.mean(objective_value(objective, rng_key, params, model, x))
    return loss_fn


def make_train_step(model, optimizer: optax.GradientTransformation, objective: Objective,
                    *, mesh: Mesh | None = None, with_grad_norm: bool = False) -> Callable:
    """Build ``train_step(state, batch, rng_key) -> (state, metrics)``; pure, not jitted.

    One optimizer update on ``loss = -mean_batch bound``. Jit it yourself:
    ``jax.jit(train_step, donate_argnums=0)``; it traces once per batch shape/dtype.

    Args:
      model: :class:`vijax.nn.VAE`.
      optimizer: an ``optax.GradientTransformation`` instance (e.g. ``optax.adam(1e-3)``).
      objective: an :class:`ELBOAnalyticKL`, :class:`ELBOMonteCarlo` or :class:`IWAE` instance.
      mesh: optional :class:`jax.sharding.Mesh` with an axis named ``"batch"`` (normally the
        1-D mesh of :func:`data_parallel_mesh`): the batch is split along that axis, parameters
        replicated. ``None`` for one device.
      with_grad_norm: also report the gradient's global L2 norm (an extra pass over all
        gradients; off by default).

    Returns:
      ``train_step``; ``metrics`` is a dict of ``[]`` float scalars:
      ``loss`` (the negative bound, batch mean, nats), ``objective`` (= -loss, the ELBO / IWAE
      bound itself), and ``grad_norm`` (global L2 norm of the gradient) when ``with_grad_norm``.

    Raises:
      TypeError (at construction): ``model`` not a :class:`vijax.nn.VAE`; ``optimizer``
        without callable ``init``/``update`` (e.g. ``"adam"`` or ``optax.adam`` uncalled);
        ``objective`` not an instance of the three classes; ``mesh`` neither None nor a
        ``jax.sharding.Mesh``; ``with_grad_norm`` not a bool.
      ValueError (at construction): ``mesh`` has no axis named ``"batch"``.
      TypeError (at call/trace time): ``state`` is not a :class:`TrainState` (e.g.
        ``state.params`` passed instead), ``rng_key`` is not a PRNG key.
      TypeError / ValueError (at call/trace time): a bad ``batch`` (:func:`check_images`);
        ValueError when ``mesh`` is given and the batch size is not divisible by the size of
        its ``"batch"`` axis.
    """
    check_optimizer(optimizer)
    _check_mesh(mesh)
    check_bool(with_grad_norm, "with_grad_norm")
    loss_fn = make_loss_fn(model, objective)
    grad_fn = jax.value_and_grad(loss_fn)

    def train_step(state: TrainState, batch: jax.Array, rng_key: jax.Array):
        _check_state(state)
        check_rng_key(rng_key)
        check_images(batch, data_dim=model.decoder.data_dim, name="batch",
                     unit_interval=_is_bernoulli(model))
        if mesh is not None:
            _check_divisible(batch, mesh)
            batch = jax.lax.with_sharding_constraint(batch, _batch_sharding(mesh, batch.ndim))
        loss, grads = grad_fn(state.params, batch, rng_key)
        if mesh is not None:
            grads = jax.lax.with_sharding_constraint(grads, NamedSharding(mesh, PartitionSpec()))
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "objective": -loss}
        if with_grad_norm:
            metrics["grad_norm"] = optax.tree.norm(grads)
        return TrainState(params, opt_state, state.step + 1), metrics

    return train_step


def epoch_plan(rng_key: jax.Array, num_examples: int, batch_size: int):
    """The shuffling and keys one :func:`make_train_epoch` epoch uses.

    ``perm_key, loop_key = split(rng_key)``; ``indices = permutation(perm_key, num_examples)``
    truncated to full batches; ``step_keys = split(loop_key, (num_batches, 2))`` (all keys of the
    epoch drawn at once). Step ``i`` trains on ``images[indices[i]]`` (binarized with
    ``step_keys[i, 0]`` when binarizing) with the objective's key ``step_keys[i, 1]``.

    Returns:
      ``(indices [num_batches, batch_size] int32, step_keys [num_batches, 2] keys)``.

    Raises:
      TypeError: ``rng_key`` is not a PRNG key; ``num_examples`` or ``batch_size`` is not an
        int (e.g. ``2.5`` or ``10.0``).
      ValueError: ``batch_size < 1`` or ``num_examples < batch_size``.
    """
    check_rng_key(rng_key)
    check_int(num_examples, "num_examples")
    check_int(batch_size, "batch_size")
    if batch_size < 1 or num_examples < batch_size:
        raise ValueError(f"batch_size must be in [1, num_examples={num_examples}], "
                         f"got {batch_size}")
    num_batches = num_examples // batch_size
    perm_key, loop_key = jax.random.split(rng_key)
    indices = jax.random.permutation(perm_key, num_examples)[: num_batches * batch_size]
    return (indices.reshape(num_batches, batch_size),
            jax.random.split(loop_key, (num_batches, 2)))


# Dynamic binarization (Burda et al. 2016, section 5) is the data module's function.
binarize_images = vdata.dynamic_binarize


def _epoch_step(train_step: Callable, binarize: bool) -> Callable:
    """``step(state, batch [B, D], keys [2]) -> (state, metrics)``: one step of an epoch's scan
    with the keys of :func:`epoch_plan` (``keys = step_keys[i]``): ``batch`` binarized with
    ``keys[0]`` when ``binarize``, then ``train_step(state, batch, keys[1])``. The one scan
    body of :func:`make_train_epoch` and :func:`vijax.distributed.make_train_epoch_from_batches`
    (same keys, same steps); ``binarize`` is checked by the caller."""
    def step(state, batch, keys):
        if binarize:
            batch = binarize_images(keys[0], batch)
        return train_step(state, batch, keys[1])
    return step


def make_train_epoch(model, optimizer: optax.GradientTransformation, objective: Objective,
                     *, batch_size: int, binarize: bool, mesh: Mesh | None = None,
                     with_grad_norm: bool = False,
                     progress_fn: Callable[[Any], None] | None = None,
                     progress_every: int | None = None) -> Callable:
    """Build ``train_epoch(state, images, rng_key) -> (state, metrics)``: one pass in one scan.

    Shuffles ``images`` (:func:`epoch_plan`), drops the last partial batch, and runs all
    ``N // batch_size`` train steps inside a single ``lax.scan`` so that a jitted epoch makes no
    host round-trip per step. With ``binarize=True`` each batch is drawn as
    ``Bernoulli(pixel intensity)`` afresh inside the computation (dynamic binarization).
    Jit with ``jax.jit(train_epoch, donate_argnums=0)``; keep ``images`` on device (one
    ``jax.device_put`` before the first epoch).

    Args:
      model, optimizer, objective, mesh, with_grad_norm: as :func:`make_train_step`.
      batch_size: examples per step (divisible by the size of ``mesh``'s ``"batch"`` axis when
        ``mesh`` is given).
      binarize: a bool: draw binary images per step (True for dynamically binarized MNIST).
      progress_fn: optional host function ``progress_fn(step)`` called from inside the scan
        (``jax.debug.callback``) every ``progress_every`` steps and after the epoch's last
        step, with ``step`` the ``[]`` int32 :attr:`TrainState.step` after that update (the
        global step count, not the step within the epoch). For a progress bar: it costs one
        host callback per call, and runs on a runtime thread, possibly more than once per
        step on a mesh and not necessarily in order, so make it idempotent (e.g. move the bar
        to ``max(bar.n, step - first_step)``). ``None`` (default): no callback is compiled.
      progress_every: steps between calls (default: about 20 calls per epoch; each costs
        about 0.65 ms of host round trip on this project's 2-core CPU, docs/vae.md).

    Returns:
      ``train_epoch(state, images [N, D] floating in [0, 1], rng_key)``; ``metrics`` is the
      :func:`make_train_step` dict with each value stacked to ``[N // batch_size]`` (per step).
      The updates do not depend on ``progress_fn``.

    Raises:
      TypeError (at construction): as :func:`make_train_step`; ``batch_size`` or
        ``progress_every`` not an int, ``binarize`` not a bool (e.g. the string ``"no"``),
        ``progress_fn`` neither None nor callable.
      ValueError (at construction): as :func:`make_train_step`; ``batch_size`` or
        ``progress_every`` < 1, ``batch_size`` not divisible by the size of ``mesh``'s
        ``"batch"`` axis.
      TypeError / ValueError (at call/trace time): ``state`` not a :class:`TrainState`,
        ``rng_key`` not a PRNG key, bad ``images`` (:func:`check_images`), ``N < batch_size``.
    """
    check_int(batch_size, "batch_size", minimum=1)
    check_bool(binarize, "binarize")
    train_step = make_train_step(model, optimizer, objective, mesh=mesh,
                                 with_grad_norm=with_grad_norm)
    if mesh is not None and batch_size % _num_batch_shards(mesh):
        raise ValueError(f"batch_size {batch_size} is not divisible by the number of devices "
                         f"{_num_batch_shards(mesh)}")
    if progress_fn is not None:
        check_callable(progress_fn, "progress_fn")
    if progress_every is not None:
        check_int(progress_every, "progress_every", minimum=1)
    do_binarize = bool(binarize)
    epoch_step = _epoch_step(train_step, do_binarize)

    def train_epoch(state: TrainState, images: jax.Array, rng_key: jax.Array):
        _check_state(state)
        check_rng_key(rng_key)
        check_images(images, data_dim=model.decoder.data_dim, name="images",
                     unit_interval=_is_bernoulli(model) or do_binarize)
        indices, step_keys = epoch_plan(rng_key, images.shape[0], batch_size)
        num_batches = indices.shape[0]
        every = progress_every or max(1, num_batches // 20)

        def report(step):
            jax.debug.callback(progress_fn, step)

        def body(state, inputs):
            i, idx, keys = inputs
            state, metrics = epoch_step(state, jnp.take(images, idx, axis=0), keys)
            if progress_fn is not None:
                done = i + 1
                jax.lax.cond((done % every == 0) | (done == num_batches), report,
                             lambda step: None, state.step)
            return state, metrics

        steps = jnp.arange(num_batches, dtype=jnp.int32)
        return jax.lax.scan(body, state, (steps, indices, step_keys))

    return train_epoch



# ----------------------------------------------------------------------------------------------
# Data parallelism (jit + sharding over a 1-D device mesh)
# ----------------------------------------------------------------------------------------------

def data_parallel_mesh(devices=None) -> Mesh:
    """A 1-D mesh with axis ``"batch"`` over ``devices`` (default: ``jax.local_devices()``).

    Raises:
      TypeError: ``devices`` is neither None nor an iterable of JAX devices.
      ValueError: ``devices`` is empty.
    """
    if devices is None:
        devices = jax.local_devices()
    else:
        try:
            devices = list(devices)
        except TypeError:
            raise TypeError(f"devices must be None or a sequence of JAX devices, got "
                            f"{type(devices).__name__}") from None
        if not devices:
            raise ValueError("devices must hold at least one device, got an empty sequence")
        bad = [d for d in devices if not isinstance(d, jax.Device)]
        if bad:
            raise TypeError(f"devices must be JAX devices (jax.devices()), got {bad[0]!r}")
    return Mesh(np.asarray(devices), (BATCH_AXIS,))


def _check_mesh(mesh, name: str = "mesh", *, batch_axis: bool = True) -> None:
    """None, or a ``jax.sharding.Mesh`` (with an axis named ``"batch"`` when ``batch_axis``)."""
    if mesh is None:
        return
    if not isinstance(mesh, Mesh):
        raise TypeError(f"{name} must be None or a jax.sharding.Mesh (e.g. "
                        f"vijax.vae.data_parallel_mesh()), got {mesh!r}")
    if batch_axis and BATCH_AXIS not in mesh.axis_names:
        raise ValueError(f"{name} must have an axis named {BATCH_AXIS!r} (the axis the batch is "
                         f"split along; see vijax.vae.data_parallel_mesh), got axis names "
                         f"{tuple(mesh.axis_names)}")


def _num_batch_shards(mesh: Mesh) -> int:
    """The number of pieces the batch is split into: the size of the ``"batch"`` axis."""
    return mesh.shape[BATCH_AXIS]


def _batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(BATCH_AXIS, *([None] * (ndim - 1))))


def _check_divisible(batch, mesh: Mesh) -> None:
    shards = _num_batch_shards(mesh)
    if np.ndim(batch) < 1 or np.shape(batch)[0] % shards:
        raise ValueError(f"batch size {np.shape(batch)[0] if np.ndim(batch) else None} is not "
                         f"divisible by the number of devices {shards}")


def shard_batch(batch: jax.Array, mesh: Mesh) -> jax.Array:
    """Place ``batch [B, ...]`` on ``mesh`` split along its first axis (B divisible by devices).

    Raises:
      TypeError: ``mesh`` is not a ``jax.sharding.Mesh``.
      ValueError: ``mesh`` has no ``"batch"`` axis; ``B`` not divisible by the size of that
        axis (the number of devices of a :func:`data_parallel_mesh`).
    """
    if mesh is None:
        raise TypeError("mesh must be a jax.sharding.Mesh, got None")
    _check_mesh(mesh)
    _check_divisible(batch, mesh)
    return jax.device_put(batch, _batch_sharding(mesh, np.ndim(batch)))


def replicate(tree, mesh: Mesh):
    """Place every leaf of ``tree`` (e.g. a :class:`TrainState`) on all devices of ``mesh``.

    The result may share device buffers with ``tree``: after passing it to a step jitted with
    ``donate_argnums=0``, do not reuse ``tree``.

    Raises:
      TypeError: ``mesh`` is not a ``jax.sharding.Mesh`` (any axis names are fine).
    """
    if mesh is None:
        raise TypeError("mesh must be a jax.sharding.Mesh, got None")
    _check_mesh(mesh, batch_axis=False)
    return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))


def make_data_parallel_train_step(model, optimizer: optax.GradientTransformation,
                                  objective: Objective, *, devices=None):
    """Data-parallel ``train_step(state, batch, rng_key) -> (state, metrics)`` over ``devices``.

    The global batch ``[B, D]`` is split along B over a 1-D mesh of ``devices`` (default all local
    devices); parameters and optimizer state are replicated. Under ``jax.jit`` XLA's SPMD
    partitioner runs each device on its ``B / num_devices`` rows and all-reduces the gradient
    (the mean over the global batch). Because JAX's random numbers do not depend on sharding
    (``jax_threefry_partitionable``, the default), the update equals the one-device update on the
    same global batch and key, up to float summation order.

    Use::

        mesh = vae.data_parallel_mesh()
        step = jax.jit(vae.make_data_parallel_train_step(model, opt, objective),
                       donate_argnums=0)
        state = vae.replicate(state, mesh)
        state, metrics = step(state, vae.shard_batch(batch, mesh), key)

    Returns:
      the un-jitted step (same contract as :func:`make_train_step`). ``make_train_step(...,
      mesh=mesh)`` and ``make_train_epoch(..., mesh=mesh)`` give the same with your own mesh.

    Raises:
      TypeError / ValueError (at construction): as :func:`make_train_step`, and
        :func:`data_parallel_mesh` for ``devices``.
      ValueError (at call/trace time): batch size not divisible by the number of devices.
    """
    return make_train_step(model, optimizer, objective, mesh=data_parallel_mesh(devices))


# ----------------------------------------------------------------------------------------------
# Input validation
# ----------------------------------------------------------------------------------------------

def _loaded_attribute(module_name: str, name: str):
    """``module_name.name`` when that module has been imported, else None: a model cannot be an
    instance of a class whose module was never imported, so the checks below need not import
    ``vijax.nnx`` or ``flax.nnx`` to refuse or recognise one."""
    return getattr(sys.modules.get(module_name), name, None)


def _is_nnx_model(model) -> bool:
    nnx_model = _loaded_attribute("vijax.nnx", "NNXModel")
    return nnx_model is not None and isinstance(model, nnx_model)


def _is_bernoulli(model) -> bool:
    if _is_nnx_model(model):
        return model.bernoulli
    return isinstance(getattr(model, "decoder", None), vnn.BernoulliDecoder)


def _check_model(model, name: str = "model") -> None:
    if not (isinstance(model, vnn.VAE) or _is_nnx_model(model)):
        nnx_module = _loaded_attribute("flax.nnx", "Module")
        hint = (" (a flax.nnx module: pass the model of vijax.vae.from_nnx(module), with its "
                "params)" if nnx_module is not None and isinstance(model, nnx_module) else "")
        raise TypeError(f"{name} must be a vijax.nn.VAE (e.g. vijax.nn.iwae_mnist_vae()) or a "
                        f"vijax.vae.NNXModel (vijax.vae.from_nnx), got "
                        f"{type(model).__name__}{hint}")


def _check_state(state, name: str = "state") -> None:
    if not isinstance(state, TrainState):
        hint = (" (it looks like parameters: pass the TrainState of init_train_state)"
                if isinstance(state, collections.abc.Mapping) else "")
        raise TypeError(f"{name} must be a vijax.vae.TrainState, got "
                        f"{type(state).__name__}{hint}")


def check_images(x, *, data_dim: int | None = None, name: str = "x",
                 unit_interval: bool = True) -> None:
    """Validate an image batch ``[batch, D]`` before it is traced.

    Delegates to :func:`vijax.data.validate_images` (one set of checks and messages): static
    checks always (array, floating dtype, rank 2, non-empty, ``D == data_dim`` when given);
    value checks only for concrete arrays, skipped under ``jit`` (call this once on your data
    set): no NaN/inf pixels, and pixels in [0, 1] when ``unit_interval``.

    Raises:
      TypeError: ``x`` is not an array or has a non-floating dtype (e.g. uint8 MNIST: divide by
        255 first).
      ValueError: wrong rank, empty batch, wrong last dimension, NaN/inf, or values outside
        [0, 1]. Messages name the argument ``name``.
    """
    vdata.validate_images(x, name=name, ndim=2, num_features=data_dim, unit_interval=unit_interval)


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------

def _map_batches(fn, x, batch_size, *extra):
    """``fn(x_batch [batch_size, D], *extra_i) -> pytree of [batch_size, ...]`` over ``x`` rows.

    Pads ``x`` to a multiple of ``batch_size`` by repeating its first row, maps with
    ``lax.map`` (bounded memory) and drops the padding. ``extra`` are per-batch arguments with a
    leading axis of length ``num_batches``.
    """
    n = x.shape[0]
    num_batches = -(-n // batch_size)
    pad = num_batches * batch_size - n
    if pad:
        x = jnp.concatenate([x, jnp.broadcast_to(x[:1], (pad,) + x.shape[1:])], axis=0)
    xb = x.reshape((num_batches, batch_size) + x.shape[1:])
    out = jax.lax.map(lambda args: fn(*args), (xb,) + extra)
    return jax.tree.map(lambda a: a.reshape((num_batches * batch_size,) + a.shape[2:])[:n], out)


def _check_eval_args(params, model, x, batch_size=1, chunk_size=None):
    """The checks shared by the evaluation functions (``rng_key`` is checked by the caller)."""
    _check_params(params)
    _check_model(model)
    check_images(x, data_dim=model.decoder.data_dim, name="x",
                 unit_interval=_is_bernoulli(model))
    check_int(batch_size, "batch_size", minimum=1)
    check_int(chunk_size, "chunk_size", minimum=1, optional=True)


def log_likelihood_is(rng_key: jax.Array, params: Params, model, x: jax.Array, *,
                      num_samples: int = 5000, chunk_size: int | None = 100,
                      batch_size: int = 100, return_khat: bool = False):
    """Importance-sampling estimate of ``log p(x)`` per example, with ``q(z | x)`` as proposal.

    ``log (1/S) sum_s p(x, z_s) / q(z_s | x)``, ``z_s ~ q(z | x)``, ``S = num_samples``
    (CENG796 notes, "importance sampling"; Burda et al. 2016, section 5 use S = 5000). It is a
    stochastic lower bound on ``log p(x)`` in expectation (it equals the IWAE-S bound value) and
    converges to ``log p(x)`` as S grows. Computed by
    :func:`vijax.marginal.importance_sampling`, over examples in batches of ``batch_size``
    (``lax.map``) and over samples in chunks of ``chunk_size`` (``lax.scan``): peak memory is
    about ``batch_size * chunk_size * D`` floats, so 10,000 MNIST test images with S = 5000 fit
    in a few tens of MB. On a CPU keep ``batch_size * chunk_size`` near 10^4 rows (the default):
    the decoder's ``[rows, D]`` activations then stay in cache (200 MNIST test images x 5000
    samples: 3.4 s with 10^4 rows, 10.4 s with 5 x 10^4; 2026-11-21, AMD EPYC Zen 4, 2 cores).
    An accelerator wants larger chunks.

    Args:
      rng_key: PRNG key.
      params, model: the trained :class:`vijax.nn.VAE` (``params`` = ``state.params``).
      x: ``[N, D]`` floating images (binarized for a Bernoulli decoder, fixed across calls).
      num_samples: S, an int >= 1.
      chunk_size: samples per chunk, an int >= 1 (``None``: all at once).
      batch_size: examples per chunk, an int >= 1 (larger than N is fine).
      return_khat: also return the Pareto k-hat of each example's S importance weights
        (:func:`vijax.ais.psis_khat`, by ArviZ on the host; below 0.5 the estimate is
        reliable, above 0.7 it should not be trusted). The k-hat needs every weight: each
        batch then keeps its ``S x batch_size`` log weights (5000 x 100 float32: 2 MB) instead
        of a running logsumexp, and the estimate is their logmeanexp, equal to the default's
        up to float rounding. Needs S >= ``vijax.ais.PSIS_MIN_SAMPLES`` (21).

    Returns:
      ``[N]`` estimates of ``log p(x_n)`` in nats (the log-likelihood, not its negative: the
      test NLL is ``-mean``); with ``return_khat``, the pair ``(estimates, khat)``, both
      ``[N]`` (``khat`` float32, from a host callback).

    Raises:
      TypeError: ``rng_key`` not a PRNG key; ``params`` a :class:`TrainState` or not a mapping;
        ``model`` not a :class:`vijax.nn.VAE`; ``num_samples``, ``chunk_size`` or ``batch_size``
        not an int (``chunk_size`` may be None); ``return_khat`` not a bool.
      ValueError: ``num_samples``, ``chunk_size`` or ``batch_size`` < 1; ``num_samples`` < 21
        with ``return_khat``.
      TypeError / ValueError: bad ``x`` (:func:`check_images`).
    """
    check_rng_key(rng_key)
    _check_eval_args(params, model, x, batch_size, chunk_size)
    check_int(num_samples, "num_samples", minimum=1)
    check_bool(return_khat, "return_khat")
    if return_khat:
        from vijax import ais as vais  # imports Blackjax; ArviZ is imported on first k-hat

        if num_samples < vais.PSIS_MIN_SAMPLES:
            raise ValueError(f"num_samples must be >= {vais.PSIS_MIN_SAMPLES} with "
                             f"return_khat=True (a Pareto fit of the tail), got {num_samples}")
    num_batches = -(-x.shape[0] // batch_size)
    keys = jax.random.split(rng_key, num_batches)

    def one_batch(xb, key):
        q, log_likelihood_fn = _posterior_and_log_likelihood_fn(params, model, xb)
        log_joint_fn = _log_joint_fn(log_likelihood_fn, _prior(model, q.loc.dtype))
        if not return_khat:
            return marginal.importance_sampling(key, log_joint_fn, q, num_samples=num_samples,
                                                chunk_size=chunk_size)
        log_w = marginal.importance_log_weights(key, log_joint_fn, q, num_samples=num_samples,
                                                chunk_size=chunk_size)  # [S, batch_size]
        estimate = jax.nn.logsumexp(log_w, axis=0) - float(np.log(num_samples))
        return estimate, jnp.asarray(vais.psis_khat(log_w, axis=0))

    return _map_batches(one_batch, x, batch_size, keys)


def evaluate_bounds(rng_key: jax.Array, params: Params, model, x: jax.Array, *,
                    num_samples=(1, 50), elbo_num_samples: int = 1,
                    batch_size: int = 100, chunk_size: int | None = 100) -> dict:
    """Per-example ELBO, KL and IWAE-k bounds on ``log p(x)`` for an evaluation set.

    Args:
      rng_key: PRNG key.
      params, model: the trained :class:`vijax.nn.VAE` (``params`` = ``state.params``).
      x: ``[N, D]`` floating images.
      num_samples: the IWAE sample sizes k: an int or a sequence of distinct ints >= 1 (may be
        empty: then only the ELBO and KL are computed).
      elbo_num_samples: samples for the analytic-KL ELBO's expected log-likelihood (int >= 1).
      batch_size, chunk_size: memory bounds as in :func:`log_likelihood_is`.

    Returns:
      dict of ``[N]`` arrays, in nats (take ``.mean()`` for the test-set figures):
      ``"elbo"``: analytic-KL ELBO (:func:`vijax.elbo.elbo_analytic_kl`; the ELBO itself, not
      its negative);
      ``"kl"``: ``KL(q(z | x) || N(0, I))`` (>= 0);
      ``"iwae_<k>"`` for each ``k`` in ``num_samples``: the IWAE-k bound value (the bound, not
      its negative; = the importance-sampling estimate with k samples, computed chunked by
      :func:`vijax.marginal.importance_sampling`).

    Raises:
      TypeError: ``rng_key`` not a PRNG key; ``params`` a :class:`TrainState` or not a
        mapping; ``model`` not a :class:`vijax.nn.VAE`; an element of ``num_samples``,
        ``elbo_num_samples``, ``batch_size`` or ``chunk_size`` not an int.
      ValueError: any of them < 1; a ``k`` repeated in ``num_samples`` (the result has one
        key per k).
      TypeError / ValueError: bad ``x`` (:func:`check_images`).
    """
    check_rng_key(rng_key)
    _check_eval_args(params, model, x, batch_size, chunk_size)
    ks = tuple(num_samples) if np.ndim(num_samples) else (num_samples,)
    for k in ks:
        check_int(k, "num_samples", minimum=1)
    repeated = sorted({int(k) for k in ks if ks.count(k) > 1})
    if repeated:
        raise ValueError(f"num_samples must not repeat a k (one result per k), got {ks} "
                         f"with {repeated} repeated")
    check_int(elbo_num_samples, "elbo_num_samples", minimum=1)
    objective = ELBOAnalyticKL(num_samples=elbo_num_samples)
    num_batches = -(-x.shape[0] // batch_size)
    keys = jax.random.split(rng_key, (num_batches, len(ks) + 1))

    def one_batch(xb, key):
        q, log_likelihood_fn = _posterior_and_log_likelihood_fn(params, model, xb)
        prior = _prior(model, q.loc.dtype)
        with jax.numpy_rank_promotion("allow"):  # the batch-[] prior's [L] against [batch, L]
            kl = q.kl_divergence(prior)
        out = {"elbo": objective.value(key[0], log_likelihood_fn, q, prior), "kl": kl}
        log_joint_fn = _log_joint_fn(log_likelihood_fn, prior)
        for i, k in enumerate(ks):
            out[f"iwae_{k}"] = marginal.importance_sampling(
                key[i + 1], log_joint_fn, q, num_samples=k,
                chunk_size=None if chunk_size is None else min(chunk_size, k))
        return out

    return _map_batches(one_batch, x, batch_size, keys)


def encoder_means(params: Params, model, x: jax.Array, *, batch_size: int = 1000) -> jax.Array:
    """``E_q[z | x]`` (the encoder's ``loc``) for each example: ``[N, L]``.

    Raises: TypeError / ValueError for bad ``x`` (:func:`check_images`), a
    ``batch_size`` that is not a positive int, ``params`` that are a :class:`TrainState`
    (pass ``state.params``) or a ``model`` that is not a :class:`vijax.nn.VAE`."""
    _check_eval_args(params, model, x, batch_size)
    return _map_batches(lambda xb: model.apply(params, xb, method=type(model).encode).loc,
                        x, batch_size)


def active_units(params: Params, model, x: jax.Array, *, threshold: float = 0.01,
                 batch_size: int = 1000):
    """Active units (Burda et al. 2016, section 5.2): ``A_u = Cov_x(E_q[u | x]) > threshold``.

    Args:
      params, model: the trained :class:`vijax.nn.VAE`.
      x: ``[N, D]`` images (the test set in the paper).
      threshold: activity threshold (``1e-2`` in the paper).
      batch_size: examples per encoder call.

    Returns:
      ``(count [] int32, variances [L])``: the number of dimensions whose posterior mean has
      variance over ``x`` (population variance, divisor N) above ``threshold``, and those
      variances.

    Raises:
      TypeError: ``threshold`` not a real number (e.g. the string ``"0.01"``); non-floating
        ``x``; ``params``/``model``/``batch_size`` as in :func:`encoder_means`.
      ValueError: ``threshold`` not a finite number >= 0; bad ``x`` or ``batch_size`` (as in
        :func:`encoder_means`).
    """
    check_real(threshold, "threshold", minimum=0.0)
    means = encoder_means(params, model, x, batch_size=batch_size)
    variances = jnp.var(means, axis=0)
    return jnp.sum(variances > threshold).astype(jnp.int32), variances


def reconstruct(params: Params, model, x: jax.Array) -> jax.Array:
    """``E[x | z = E_q[z | x]]``: ``[N, D]`` reconstructions (pixel probabilities, Bernoulli).

    Raises: TypeError / ValueError for bad ``x`` (:func:`check_images`), ``params`` that are
    a :class:`TrainState` or a ``model`` that is not a :class:`vijax.nn.VAE`."""
    _check_eval_args(params, model, x)
    q = model.apply(params, x, method=type(model).encode)
    return model.apply(params, q.loc, method=type(model).decode_mean)


def sample_images(rng_key: jax.Array, params: Params, model, num_samples: int, *,
                  draw: bool = False) -> jax.Array:
    """Images from the generative model, ``[num_samples, D]``: ``z ~ N(0, I)``, then
    ``E[x | z]`` (``draw=False``, the default: pixel probabilities for a Bernoulli decoder, the
    mean for a Gaussian one) or a draw ``x ~ p(x | z)`` (``draw=True``: ancestral sampling of
    the joint p(z) p(x | z), so the rows are samples of p(x); 0/1 pixels, as float, for a
    Bernoulli decoder). Source: CENG796 notes §2 (the generative process of a latent-variable
    model); lecture 3 ("Variational autoencoder").

    With ``draw=True`` the key is split into the key of z and the key of x; the means path uses
    ``rng_key`` for z as it is.

    Raises: TypeError when ``rng_key`` is not a PRNG key (e.g. an int seed), ``params`` is a
    :class:`TrainState`, ``model`` is not a :class:`vijax.nn.VAE` or ``draw`` is not a bool;
    TypeError / ValueError when ``num_samples`` is not a positive int."""
    check_rng_key(rng_key)
    _check_params(params)
    _check_model(model)
    check_int(num_samples, "num_samples", minimum=1)
    check_bool(draw, "draw")
    z_key, x_key = jax.random.split(rng_key) if draw else (rng_key, None)
    z = jax.random.normal(z_key, (num_samples, model.encoder.latent_dim))
    if not draw:
        return model.apply(params, z, method=type(model).decode_mean)
    out = model.apply(params, z, method=type(model).decode)
    if _is_bernoulli(model):
        return jax.random.bernoulli(x_key, jax.nn.sigmoid(out)).astype(out.dtype)
    loc, scale = out
    return loc + scale * jax.random.normal(x_key, loc.shape, loc.dtype)


# ----------------------------------------------------------------------------------------------
# Flax NNX models
# ----------------------------------------------------------------------------------------------
# NNXModel, from_nnx and to_nnx are written in vijax.nnx (which imports flax.nnx) and bound
# here on first use, so that ``import vijax.vae`` does not import flax.nnx. The static import
# lets the docs (griffe) and type checkers see them, at this place in the page's order.

if TYPE_CHECKING:
    from vijax.nnx import NNXModel, from_nnx, to_nnx

_NNX_NAMES = ("NNXModel", "from_nnx", "to_nnx")


def __getattr__(name):
    if name in _NNX_NAMES:
        from vijax import nnx as vnnx  # noqa: PLC0415

        value = getattr(vnnx, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'vijax.vae' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_NNX_NAMES))
