"""Amortized, per-datapoint and semi-amortized inference, and the inference-gap decomposition.

Everything here is built on :mod:`vijax.svi` (the optimiser loop, the objectives, the
``Alternating`` schedule of variational EM, the model parameters theta) and on the VAE engine
of :mod:`vijax.vae` / :mod:`vijax.nn` / :mod:`vijax.vae_train`; there is no second ELBO formula
and no second optimiser loop. All values are in nats and are the bounds themselves (the ELBO,
not its negative), per example unless said otherwise.

The chapter, in the order of the course (lecture 3, "EM-algorithm", "Variational EM",
"Amortized variational inference"; CENG796 notes §4.1 and §4.3):

* **Variational EM** (:func:`variational_em`): per-datapoint variational parameters phi_i
  (a local family with ``batch_shape=(N,)``) and model parameters theta, alternating
  ``e_steps`` gradient steps on phi (E-step) and ``m_steps`` on theta (M-step) with
  :class:`vijax.svi.Alternating`; with ``exact_e_step`` the E-step is the exact posterior
  (EM itself, whose log-likelihood ascends monotonically). The amortized form is the VAE
  engine with :func:`alternating_optimizer`.
* **Per-datapoint SVI** (:func:`fit_local`, :func:`fit_local_vae`): a fixed model, local
  Gaussian parameters for a batch ``x [B, D]`` optimised to convergence by ``svi.run`` with the
  batch passed as ``data`` -- one batched optimisation of
  ``families.MeanFieldNormal(L, batch_shape=(B,))`` (the default, faster than ``jax.vmap`` of
  a single-example run in every measurement on a 2-core CPU; see docs/amortized.md), or a
  ``vmap`` over examples for a family without a batch shape (e.g. ``SplineFlow``).
  :func:`local_svi_update` / :func:`learn_by_local_svi` are the CENG796 notes' §4.1 algorithm:
  optimise phi_i for a minibatch to (near) convergence, then one gradient step on theta.
* **Amortized inference**: the encoder q(z | x) of a :class:`vijax.nn.VAE`
  (:func:`encoder_local_params` gives its output as the local family's parameters).
* **Semi-amortized inference** (Kim, Wiseman, Miller, Sontag & Rush 2018, "Semi-Amortized
  Variational Autoencoders", Algorithm 1): start at the encoder's q(z | x), take K gradient
  steps on the local parameters (:func:`refine`, differentiable), and train a VAE with it
  (:func:`make_semi_amortized_train_step`), with or without backpropagating through the
  refinement.
* **Inference gaps** (Cremer, Li & Duvenaud 2018, "Inference Suboptimality in Variational
  Autoencoders", Table 1): log p(x) - L[q] = (log p(x) - L[q*]) + (L[q*] - L[q]), the
  approximation gap plus the amortization gap (:func:`inference_gaps`).

Shapes: ``x`` is ``[B, D]``; latents ``[B, L]``; local Gaussian parameters
``{"loc": [B, L], "raw_scale": [B, L]}`` with scale = softplus(raw_scale) (the
``MeanFieldNormal`` parameterisation). A ``log_joint_fn`` follows :mod:`vijax.svi`:
``log_joint_fn(z [B, L], x [B, D]) -> [B]``, or ``log_joint_fn(z, model_params, x)`` when model
parameters are given.

Sources: lecture 3 ("EM-algorithm", "Variational EM", "Amortized variational inference",
"ELBO gradients"); CENG796 notes §4.1 (SVI with per-datapoint parameters, steps 1-5) and §4.3
(amortized inference); Kim et al. 2018 (semi-amortized VAE); Cremer et al. 2018 (inference
gaps); Tipping & Bishop 1999 (probabilistic PCA, the closed-form ML solution used in the
tests).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import pathlib
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vijax import families as vfam
from vijax import nn as vnn
from vijax import svi
from vijax import vae
from vijax._checks import (check_bool, check_callable, check_int, check_int_sequence,
                           check_optimizer, check_real, check_rng_key)
from vijax._amortized import (_check_vae_model, _check_vae_params, _check_vae_x,
                              _cached_objective, _cached_adam, _family_batch_shape, _data_size,
                              _merge_init, _initial_state, _commit, _run_local,
                              _check_local_log_joint, _variational_em, _elbo_estimate,
                              _local_log_marginal, _config_types, _config_from_dict)

Array = jax.Array
PyTree = Any

__all__ = [
    "VAELogJoint",
    "decoder_params",
    "with_decoder_params",
    "inverse_softplus",
    "encoder_local_params",
    "local_family",
    "default_objective",
    "default_local_optimizer",
    "LocalRecord",
    "LocalFit",
    "fit_local",
    "fit_local_vae",
    "local_svi_update",
    "learn_by_local_svi",
    "VariationalEMResult",
    "variational_em",
    "alternating_optimizer",
    "refine",
    "make_semi_amortized_train_step",
    "elbo_estimate",
    "InferenceGaps",
    "inference_gaps",
    "load_vae_checkpoint",
]

VECTORIZE = ("auto", "batched", "vmap")


# ------------------------------------------------------------------ the VAE as an svi model


class VAELogJoint:
    """``log_joint_fn(z [B, L], theta, x [B, D]) -> [B]`` = log p_theta(x | z) + log N(z; 0, I),
    in nats, for a :class:`vijax.nn.VAE` whose decoder parameters are ``theta``
    (:func:`decoder_params`): the svi signature with model parameters.

    Two instances wrapping the same model object compare and hash equal, so jitted svi runs
    that take the log joint as a static argument are compiled once per model.

    Raises:
      TypeError: ``model`` is not a :class:`vijax.nn.VAE`.
    """

    __slots__ = ("model",)

    def __init__(self, model):
        _check_vae_model(model)
        self.model = model

    def __call__(self, z: Array, theta: PyTree, x: Array) -> Array:
        model = self.model
        log_lik = model.apply({"params": {"decoder": theta}}, z, x,
                              method=type(model).log_likelihood)
        prior = vnn.standard_normal_prior(model.latent_dim, log_lik.dtype)
        with jax.numpy_rank_promotion("allow"):  # a batch-[] prior against [B, L] draws
            return log_lik + prior.log_prob(z)

    def __hash__(self):
        return hash((VAELogJoint, id(self.model)))

    def __eq__(self, other):
        return isinstance(other, VAELogJoint) and other.model is self.model

    def __repr__(self):
        return f"VAELogJoint({type(self.model).__name__}, latent_dim={self.model.latent_dim})"


def decoder_params(params: PyTree) -> PyTree:
    """theta: the decoder's part ``params["params"]["decoder"]`` of a VAE's parameters.

    Raises:
      TypeError: ``params`` is not a VAE parameter dict (e.g. a TrainState).
    """
    _check_vae_params(params)
    return params["params"]["decoder"]


def with_decoder_params(params: PyTree, theta: PyTree) -> PyTree:
    """A copy of the VAE's ``params`` with the decoder's part replaced by ``theta``.

    Raises:
      TypeError: ``params`` is not a VAE parameter dict.
    """
    _check_vae_params(params)
    inner = dict(params["params"])
    inner["decoder"] = theta
    return {**params, "params": inner}


def inverse_softplus(y: Array) -> Array:
    """x with softplus(x) = y, elementwise, for y > 0: ``y + log(-expm1(-y))`` (stable for large
    and for small y; differentiable). The families store a scale as softplus(raw_scale)."""
    y = jnp.asarray(y)
    return y + jnp.log(-jnp.expm1(-y))


def encoder_local_params(params: PyTree, model, x: Array) -> dict:
    """The encoder's q(z | x) as the local family's parameters (amortized inference):
    ``{"loc": [B, L], "raw_scale": [B, L]}`` with raw_scale = inverse_softplus(scale), so that
    ``local_family(L, B).distribution(...)`` is q(z | x). Differentiable in ``params``.

    Raises:
      TypeError / ValueError: ``params`` not VAE parameters, ``model`` not a VAE, bad ``x``
        (:func:`vijax.vae.check_images`, naming ``x``).
    """
    _check_vae_params(params)
    _check_vae_model(model)
    _check_vae_x(model, x)
    q = model.apply(params, x, method=type(model).encode)
    return {"loc": q.loc, "raw_scale": inverse_softplus(q.scale_diag)}


def local_family(latent_dim: int, batch_size: int, *, init_scale: float = 1.0
                 ) -> vfam.MeanFieldNormal:
    """``families.MeanFieldNormal(latent_dim, batch_shape=(batch_size,))``: one diagonal
    Gaussian per data point. Its initial value N(0, init_scale^2 I) is the VAE prior for
    ``init_scale = 1`` (the default).

    Raises:
      TypeError / ValueError: a size that is not an int >= 1, ``init_scale`` not > 0.
    """
    latent_dim = check_int(latent_dim, "`latent_dim`", minimum=1)
    batch_size = check_int(batch_size, "`batch_size`", minimum=1)
    return vfam.MeanFieldNormal(latent_dim, batch_shape=(batch_size,), init_scale=init_scale)


def default_objective(latent_dim: int, num_samples: int = 1) -> svi.ELBOAnalyticKL:
    """The local objective for a VAE: the ELBO with the closed-form KL to the prior N(0, I)
    (``svi.ELBOAnalyticKL``; its Monte Carlo term is log p(x | z) alone). The same object is
    returned for the same arguments, so jitted runs are not recompiled.

    Raises:
      TypeError / ValueError: a count that is not an int >= 1.
    """
    latent_dim = check_int(latent_dim, "`latent_dim`", minimum=1)
    num_samples = check_int(num_samples, "`num_samples`", minimum=1)
    return _cached_objective(latent_dim, num_samples, jnp.dtype(jnp.result_type(float)).name)


def default_local_optimizer(num_steps: int, learning_rate: float = 1e-2,
                            final_fraction: float = 0.05) -> optax.GradientTransformation:
    """Adam on the local parameters with a cosine decay from ``learning_rate`` to
    ``final_fraction * learning_rate`` over ``num_steps`` (the decay removes most of the
    stationary Monte Carlo jitter at the end of a fixed-length run). The same object is
    returned for the same arguments (jitted runs are then compiled once).

    Raises:
      TypeError / ValueError: ``num_steps`` not an int >= 1; a rate not > 0.
    """
    num_steps = check_int(num_steps, "`num_steps`", minimum=1)
    learning_rate = check_real(learning_rate, "`learning_rate`", exclusive_minimum=0.0)
    final_fraction = check_real(final_fraction, "`final_fraction`", exclusive_minimum=0.0,
                                maximum=1.0)
    return _cached_adam(num_steps, learning_rate, final_fraction)


# ------------------------------------------------------------------ per-datapoint SVI


class LocalRecord(NamedTuple):
    """A snapshot of a :func:`fit_local` run (``record_every``).

    Fields:
      step: steps done when recorded (counting from this call's start).
      params: the local parameters then (leaves ``[B, ...]``).
      elapsed_s: wall seconds since the call started (compilation included), after the
        chunk's results were ready.
    """

    step: int
    params: PyTree
    elapsed_s: float


class LocalFit(NamedTuple):
    """Result of :func:`fit_local`.

    Fields:
      params: the fitted local parameters (leaves ``[B, ...]``, e.g. ``{"loc": [B, L],
        "raw_scale": [B, L]}``).
      state: the final :class:`vijax.svi.SVIState` (pass it as ``init`` to continue, with its
        optimiser state and step count); in ``"vmap"`` mode every leaf has a leading ``[B]``.
      objective: ``[steps]`` the bound at each step from the step's own samples, averaged over
        the B examples (nats, the ELBO itself; a noisy training trace).
      num_steps: steps done by this call (fewer than asked iff ``tol`` stopped it).
      num_nonfinite: steps skipped because the objective or gradient was not finite.
      converged: whether ``tol`` stopped the fit (None without ``tol``).
      mode: ``"batched"`` or ``"vmap"``.
      history: the :class:`LocalRecord` snapshots taken every ``record_every`` steps (and at
        the end), oldest first; empty without ``record_every``.
    """

    params: PyTree
    state: svi.SVIState
    objective: np.ndarray
    num_steps: int
    num_nonfinite: int
    converged: bool | None
    mode: str
    history: tuple = ()


def fit_local(rng_key: Array, log_joint_fn: Callable, x: PyTree, family: Any, num_steps: int,
              *, model_params: PyTree = None, init: Any = None,
              optimizer: optax.GradientTransformation | None = None, objective: Any = None,
              tol: float | None = None, check_every: int | None = None,
              record_every: int | None = None) -> LocalFit:
    """Per-datapoint SVI on a fixed model: optimise local variational parameters phi_i for each
    row of ``x`` (CENG796 notes §4.1, step 3, for a whole batch at once).

    Two modes, chosen by ``family``'s batch shape:

    * ``batch_shape == (B,)`` (e.g. :func:`local_family`): one ``svi.run`` of the batched family
      with ``x`` passed as ``data``; the loss is minus the sum of the B bounds, whose gradient
      in phi_i is the gradient of example i's bound alone, so this is B independent
      optimisations (Adam acts per coordinate) in one program.
    * ``batch_shape == ()`` (e.g. ``MeanFieldNormal(L)`` or ``SplineFlow(L)``): ``jax.vmap``
      over the rows of ``x`` of a single-example ``svi.run`` (``log_joint_fn`` is called with
      ``z [1, L]`` and ``x [1, ...]``).

    On the 2-core CPU of docs/amortized.md the batched mode was faster than the vmap mode for
    the same Gaussian family in every measurement (1.2 to 3.7 times per step), so it is the one
    :func:`fit_local_vae` uses; the vmap mode is there for families without a batch shape.

    The steps run in jitted chunks of ``check_every`` steps; the steps and random numbers do
    not depend on the chunking (``svi.run`` keys step i by ``fold_in(rng_key, i)``).

    Args:
      rng_key: a JAX PRNG key.
      log_joint_fn: ``log_joint_fn(z [B, L], x [B, ...]) -> [B]`` (log p(x_i, z_i), nats), or
        ``log_joint_fn(z, model_params, x)`` when ``model_params`` is given. It is a static
        argument of the jitted chunks: pass the same (hashable) object to reuse compilations.
      x: the batch, an array ``[B, ...]`` (or a pytree of them).
      family: a variational family (:mod:`vijax.families`) with batch shape ``(B,)`` or ``()``.
      num_steps: the maximum number of steps, an int >= 1.
      model_params: theta, held fixed (the model's parameters), or None.
      init: None (the family's initial parameters), a parameter pytree of the family's
        structure (``[B, ...]`` leaves; a dict with some of its keys is merged into the
        family's initial parameters, e.g. ``{"loc", "raw_scale"}`` for a flow), or the
        :class:`vijax.svi.SVIState` of an earlier :class:`LocalFit` (continue that run).
      optimizer: optax transformation for phi (default :func:`default_local_optimizer`).
      objective: an svi objective (default ``svi.ELBO()``).
      tol: stop once the mean per-example objective of a chunk differs from the previous
        chunk's by at most ``tol`` nats (> 0), or None to run all ``num_steps``. The step
        objectives are noisy: use it as a cheap stopping rule, and check convergence with
        :func:`elbo_estimate` (as docs/amortized.md does).
      check_every: chunk length (default: ``record_every`` if given; else all steps at once
        without ``tol``, else ``max(1, num_steps // 20)``).
      record_every: keep a :class:`LocalRecord` of the parameters (and the wall time) after
        every chunk that ends on a multiple of ``record_every`` steps, and after the last one;
        None keeps none. For ELBO-against-steps or -time curves.

    Returns:
      :class:`LocalFit`.

    Raises:
      TypeError: bad ``rng_key``, ``family``, ``optimizer``, ``objective``; ``log_joint_fn``
        not callable.
      ValueError: ``num_steps`` (or ``check_every``) not >= 1, ``tol`` not > 0 (each naming
        the argument); ``x`` without a leading axis of the family's batch size B; ``init``
        of another structure or shape; ``log_joint_fn`` not returning one value per example.
    """
    check_rng_key(rng_key)
    check_callable(log_joint_fn, "`log_joint_fn`")
    vfam.check_family(family)
    num_steps = check_int(num_steps, "`num_steps`", minimum=1)
    if tol is not None:
        tol = check_real(tol, "`tol`", exclusive_minimum=0.0)
    record_every = check_int(record_every, "`record_every`", minimum=1, optional=True)
    if check_every is None:
        check_every = (record_every if record_every is not None
                       else num_steps if tol is None else max(1, num_steps // 20))
    check_every = check_int(check_every, "`check_every`", minimum=1)
    if optimizer is None:
        optimizer = default_local_optimizer(num_steps)
    check_optimizer(optimizer)
    if objective is None:
        objective = svi.ELBO()
    svi._check_objective(objective)
    size = _data_size(x)
    batch_shape = _family_batch_shape(family)
    if batch_shape == (size,):
        mode = "batched"
    elif batch_shape == ():
        mode = "vmap"
    else:
        raise ValueError(f"`x` has {size} rows but `family` has batch shape {batch_shape}: use a "
                         f"family with batch_shape=({size},) (one optimisation of the batch) or "
                         "() (vmap over the rows)")
    init_key, run_key = jax.random.split(rng_key)
    state = _initial_state(init_key, family, optimizer, init, mode, size)
    _check_local_log_joint(log_joint_fn, model_params, x, state, mode)
    # committed arrays, as every chunk returns them: otherwise the first and the later chunks
    # differ in the arguments' placement and the chunk program is compiled twice
    state = _commit(state)

    traces, history, done, previous, nonfinite = [], [], 0, None, 0
    converged = None if tol is None else False
    start = time.perf_counter()
    while done < num_steps:
        length = min(check_every, num_steps - done)
        state, trace, bad = _run_local(run_key, state, model_params, x,
                                       log_joint_fn=log_joint_fn, num_steps=length,
                                       objective=objective, mode=mode)
        trace = np.asarray(trace)  # waits for the chunk
        traces.append(trace)
        nonfinite += int(bad)
        done += length
        stop = False
        if tol is not None:
            finite = trace[np.isfinite(trace)]
            current = float(finite.mean()) if finite.size else math.nan
            stop = previous is not None and abs(current - previous) <= tol
            converged = converged or stop
            previous = current
        if record_every is not None and (done % record_every == 0 or done == num_steps
                                         or stop):
            jax.block_until_ready(state.params)
            history.append(LocalRecord(done, state.params, time.perf_counter() - start))
        if stop:
            break
    return LocalFit(params=state.params, state=state, objective=np.concatenate(traces),
                    num_steps=done, num_nonfinite=nonfinite, converged=converged, mode=mode,
                    history=tuple(history))


def fit_local_vae(rng_key: Array, params: PyTree, model, x: Array, num_steps: int, *,
                  init: Any = "encoder", family: Any = None,
                  optimizer: optax.GradientTransformation | None = None,
                  objective: Any = None, tol: float | None = None,
                  check_every: int | None = None, record_every: int | None = None) -> LocalFit:
    """:func:`fit_local` for a trained VAE: the optimal local q*(z) for each image of ``x`` with
    the decoder held fixed (Cremer et al. 2018's q*, per-datapoint SVI).

    Args:
      rng_key: a JAX PRNG key.
      params, model: the VAE (``params = state.params``); theta = :func:`decoder_params`.
      x: ``[B, D]`` images (binarized for a Bernoulli decoder).
      num_steps: the maximum number of steps, an int >= 1.
      init: ``"encoder"`` (default: start at the encoder's q(z | x), i.e. semi-amortized
        inference run to convergence), ``"prior"`` (the family's own initial value, N(0, I)
        for :func:`local_family`), a parameter pytree, or an ``SVIState`` to continue.
      family: default ``local_family(L, B)``; a family with batch shape () (e.g.
        ``families.SplineFlow(L)``) runs in vmap mode, and ``"encoder"`` then sets its
        ``loc``/``raw_scale`` (a flow starts as the encoder's Gaussian).
      optimizer: default :func:`default_local_optimizer` over ``num_steps``.
      objective: default :func:`default_objective` (analytic KL) for a Gaussian family,
        ``svi.ELBO()`` for another family.
      tol, check_every, record_every: as :func:`fit_local`.

    Returns:
      :class:`LocalFit`.

    Raises:
      TypeError / ValueError: as :func:`fit_local`; bad ``params``/``model``/``x``; ``init``
        a string other than ``"encoder"``/``"prior"`` (ValueError naming ``init``).
    """
    check_rng_key(rng_key)
    _check_vae_params(params)
    _check_vae_model(model)
    _check_vae_x(model, x)
    num_steps = check_int(num_steps, "`num_steps`", minimum=1)
    size, latent_dim = x.shape[0], model.latent_dim
    if family is None:
        family = local_family(latent_dim, size)
    if isinstance(init, str):
        if init == "encoder":
            init = encoder_local_params(params, model, x)
        elif init == "prior":
            init = None
        else:
            raise ValueError(f"`init` must be 'encoder', 'prior', parameters or an SVIState, got "
                             f"{init!r}")
    if objective is None:
        gaussian = isinstance(family, (vfam.MeanFieldNormal, vfam.FullRankNormal,
                                       vfam.LowRankNormal))
        objective = default_objective(latent_dim) if gaussian else svi.ELBO()
    return fit_local(rng_key, VAELogJoint(model), x, family, num_steps,
                     model_params=decoder_params(params), init=init, optimizer=optimizer,
                     objective=objective, tol=tol, check_every=check_every,
                     record_every=record_every)


# ------------------------------------------------------------------ CENG796 §4.1: learning theta


def local_svi_update(rng_key: Array, log_joint_fn: Callable, x: PyTree, family: Any,
                     model_params: PyTree, model_opt_state: PyTree, *, local_steps: int,
                     optimizer: optax.GradientTransformation,
                     model_optimizer: optax.GradientTransformation, objective: Any = svi.ELBO(),
                     init: PyTree = None) -> tuple[PyTree, PyTree, svi.SVIInfo]:
    """One outer step of SVI with per-datapoint parameters (CENG796 notes §4.1, steps 3-4) on
    the minibatch ``x``: ``local_steps`` gradient steps on fresh local parameters phi_i (step 3,
    "optimise L(x_i; theta, phi_i) w.r.t. phi_i"), then one gradient step on theta at the
    optimised phi_i* (step 4). Pure and jit-able.

    It is one ``svi.run`` of ``local_steps + 1`` steps with the schedule
    ``svi.Alternating(local_steps, 1)`` (the last step is the M-step), ``x`` passed as
    ``data``; the theta gradient is that of the batch's summed bound (an optimiser such as
    Adam is invariant to the N/B minibatch scale of lecture 3, "ELBO gradients").

    Args:
      rng_key: a JAX PRNG key.
      log_joint_fn: ``log_joint_fn(z [B, L], model_params, x [B, ...]) -> [B]`` (nats).
      x: the minibatch ``[B, ...]``.
      family: a local family with batch shape ``(B,)``.
      model_params: theta; model_opt_state: ``model_optimizer.init(theta)`` or the state
        returned by the previous call (None: a fresh one).
      local_steps: K >= 1 gradient steps on phi.
      optimizer: optax transformation for phi (fresh state every call: new data points get
        new local parameters); model_optimizer: for theta.
      objective: an svi objective (default ``svi.ELBO()``).
      init: local parameters to start from (e.g. :func:`encoder_local_params`), or None for
        the family's initial value.

    Returns:
      ``(model_params, model_opt_state, info)``: the updated theta, its optimiser state, and
      the :class:`vijax.svi.SVIInfo` trace ``[local_steps + 1]`` (``info.objective[-1]`` is the
      summed bound at phi*, before the theta update).

    Raises:
      TypeError / ValueError: as :func:`vijax.svi.init` and :func:`vijax.svi.run`;
        ``local_steps`` not an int >= 1 (naming it).
    """
    check_rng_key(rng_key)
    local_steps = check_int(local_steps, "`local_steps`", minimum=1)
    init_key, run_key = jax.random.split(rng_key)
    state = svi.init(init_key, family, optimizer, model_params=model_params,
                     model_optimizer=model_optimizer)
    if model_opt_state is not None:
        state = state.replace(model_opt_state=model_opt_state)
    if init is not None:
        params = _merge_init(init, state.params)
        state = state.replace(params=params, opt_state=optimizer.init(params))
    state, info = svi.run(run_key, state, log_joint_fn, local_steps + 1, objective=objective,
                          data=x, schedule=svi.Alternating(local_steps, 1))
    return state.model_params, state.model_opt_state, info


@functools.partial(jax.jit, static_argnames=(
    "log_joint_fn", "family", "num_iterations", "local_steps", "optimizer", "model_optimizer",
    "objective", "batch_size"))
def _learn_by_local_svi(rng_key, model_params, model_opt_state, data, *, log_joint_fn, family,
                        num_iterations, local_steps, optimizer, model_optimizer, objective,
                        batch_size):
    def body(carry, i):
        theta, opt_state = carry
        key = jax.random.fold_in(rng_key, i)
        batch_key, step_key = jax.random.split(key)
        batch = svi.draw_batch(batch_key, data, batch_size)
        theta, opt_state, info = local_svi_update(
            step_key, log_joint_fn, batch, family, theta, opt_state, local_steps=local_steps,
            optimizer=optimizer, model_optimizer=model_optimizer, objective=objective)
        return (theta, opt_state), info.objective[-1] / batch_size

    (theta, opt_state), trace = jax.lax.scan(body, (model_params, model_opt_state),
                                             jnp.arange(num_iterations))
    return theta, opt_state, trace


def learn_by_local_svi(rng_key: Array, log_joint_fn: Callable, data: PyTree, model_params: PyTree,
                       num_iterations: int, *, batch_size: int, local_steps: int,
                       latent_dim: int | None = None, family: Any = None,
                       optimizer: optax.GradientTransformation | None = None,
                       model_optimizer: optax.GradientTransformation | None = None,
                       objective: Any = svi.ELBO()) -> tuple[PyTree, PyTree, Array]:
    """Learn theta by SVI with per-datapoint variational parameters, CENG796 notes §4.1 steps
    1-5: initialise theta (``model_params``); repeat ``num_iterations`` times: draw a minibatch
    of ``batch_size`` rows (``svi.draw_batch``, step 2), optimise its local phi_i with
    ``local_steps`` gradient steps from the family's initial value (step 3), one gradient step
    on theta (step 4; :func:`local_svi_update`). One jitted ``lax.scan``.

    This is the costly loop amortized inference replaces (CENG796 notes §4.3): every theta
    step pays ``local_steps`` inner steps.

    Args:
      rng_key: a JAX PRNG key (iteration i uses ``fold_in(rng_key, i)``).
      log_joint_fn: ``log_joint_fn(z [B, L], model_params, x [B, ...]) -> [B]``; static, pass
        the same object to reuse the compilation.
      data: ``[N, ...]`` the data set.
      model_params: the initial theta.
      num_iterations: outer steps (theta updates), an int >= 1.
      batch_size: B, 1 <= B <= N.
      local_steps: K >= 1 inner steps per outer step.
      latent_dim: L, for the default family ``local_family(L, B, init_scale=1.0)``;
        family: or the local family itself (batch shape ``(B,)``).
      optimizer: for phi (default Adam 5e-2); model_optimizer: for theta (default Adam 1e-3).
      objective: an svi objective.

    Returns:
      ``(model_params, model_opt_state, trace)``: the learnt theta, its Adam state, and
      ``[num_iterations]`` the per-example bound at phi* of each minibatch (nats).

    Raises:
      TypeError / ValueError: counts not ints >= 1 (naming them), ``batch_size`` > N, neither
        ``latent_dim`` nor ``family`` given.
    """
    check_rng_key(rng_key)
    check_callable(log_joint_fn, "`log_joint_fn`")
    num_iterations = check_int(num_iterations, "`num_iterations`", minimum=1)
    local_steps = check_int(local_steps, "`local_steps`", minimum=1)
    batch_size = check_int(batch_size, "`batch_size`", minimum=1, maximum=_data_size(data, "data"))
    if family is None:
        if latent_dim is None:
            raise ValueError("give `latent_dim` (for the default local family) or `family`")
        family = local_family(latent_dim, batch_size)
    vfam.check_family(family)
    if _family_batch_shape(family) != (batch_size,):
        raise ValueError(f"`family` must have batch shape ({batch_size},) = (batch_size,), got "
                         f"{_family_batch_shape(family)}")
    optimizer = optax.adam(5e-2) if optimizer is None else optimizer
    model_optimizer = optax.adam(1e-3) if model_optimizer is None else model_optimizer
    check_optimizer(optimizer)
    check_optimizer(model_optimizer, "model_optimizer")
    model_params = svi._check_model_params(model_params)
    return _learn_by_local_svi(rng_key, model_params, model_optimizer.init(model_params), data,
                               log_joint_fn=log_joint_fn, family=family,
                               num_iterations=num_iterations, local_steps=local_steps,
                               optimizer=optimizer, model_optimizer=model_optimizer,
                               objective=objective, batch_size=batch_size)


# ------------------------------------------------------------------ variational EM


class VariationalEMResult(NamedTuple):
    """Result of :func:`variational_em`.

    Fields:
      state: the final :class:`vijax.svi.SVIState` (``params``: the local phi,
        ``model_params``: theta).
      objective: ``[num_iterations]`` the mean per-example bound over each iteration's M-steps
        (from their own samples; nats, the ELBO itself).
      monitor: ``[num_iterations + 1]`` ``monitor_fn(theta)`` before the first iteration and
        after each one, or None without ``monitor_fn``.
    """

    state: svi.SVIState
    objective: Array
    monitor: Array | None


def variational_em(rng_key: Array, log_joint_fn: Callable, x: PyTree, family: Any,
                   model_params: PyTree, num_iterations: int, *, e_steps: int = 1,
                   m_steps: int = 1, optimizer: optax.GradientTransformation | None = None,
                   model_optimizer: optax.GradientTransformation | None = None,
                   objective: Any = svi.ELBO(), init: PyTree = None,
                   exact_e_step: Callable | None = None,
                   monitor_fn: Callable | None = None) -> VariationalEMResult:
    """Variational EM in the form of lecture 3 ("Variational EM"): alternate an E-step, K =
    ``e_steps`` gradient steps phi_k = phi_{k-1} + eta grad_phi L(phi, theta), and an M-step,
    ``m_steps`` gradient steps on theta at the new phi, ``num_iterations`` times, on the whole
    data set ``x`` with per-datapoint variational parameters (a local family with batch shape
    ``(N,)``, kept from one iteration to the next).

    Each iteration is one ``svi.run`` of ``e_steps + m_steps`` steps with
    ``svi.Alternating(e_steps, m_steps)`` and ``x`` as ``data`` (all iterations in one jitted
    ``lax.scan``). With ``exact_e_step`` the E-step sets phi to the exact posterior
    p(z | x, theta) instead (lecture 3, "EM-algorithm": q = argmax_q L(q, theta) =
    p(z | x, theta)), and the M-steps are ``svi.step(..., update_variational=False)``: then
    L(q_t, theta_t) = log p(x | theta_t), and log p(x | theta) ascends as long as the M-steps
    do not lower L(q_t, .) (EM's monotonicity; PRML §9.4).

    For the amortized form (phi = an encoder's weights) use the VAE engine with
    :func:`alternating_optimizer`.

    Args:
      rng_key: a JAX PRNG key.
      log_joint_fn: ``log_joint_fn(z [N, L], model_params, x [N, ...]) -> [N]`` (nats);
        static, pass the same object to reuse the compilation.
      x: the data ``[N, ...]``.
      family: a local family with batch shape ``(N,)`` (e.g. ``local_family(L, N)``, or
        ``families.FullRankNormal(L, batch_shape=(N,))`` to hold the exact posterior of a
        linear-Gaussian model).
      model_params: the initial theta (a pytree of float arrays).
      num_iterations: E/M rounds, an int >= 1.
      e_steps, m_steps: gradient steps per E-step and per M-step, ints >= 1.
      optimizer: for phi (default Adam 1e-2); model_optimizer: for theta (default Adam 1e-2).
      objective: an svi objective (default ``svi.ELBO()``).
      init: initial local parameters (or a dict of some of them), or None.
      exact_e_step: ``exact_e_step(model_params, x) -> family parameters`` of the exact
        posterior, or None for gradient E-steps; static.
      monitor_fn: ``monitor_fn(model_params) -> []`` evaluated after every iteration (e.g.
        the exact log-likelihood), or None; static.

    Returns:
      :class:`VariationalEMResult`.

    Raises:
      TypeError / ValueError: as :func:`vijax.svi.init` and :func:`vijax.svi.run`; a count
        that is not an int >= 1 (naming it); ``family`` without batch shape ``(N,)``.
    """
    check_rng_key(rng_key)
    check_callable(log_joint_fn, "`log_joint_fn`")
    num_iterations = check_int(num_iterations, "`num_iterations`", minimum=1)
    e_steps = check_int(e_steps, "`e_steps`", minimum=1)
    m_steps = check_int(m_steps, "`m_steps`", minimum=1)
    if exact_e_step is not None:
        check_callable(exact_e_step, "`exact_e_step`")
    if monitor_fn is not None:
        check_callable(monitor_fn, "`monitor_fn`")
    svi._check_objective(objective)
    vfam.check_family(family)
    size = _data_size(x)
    if _family_batch_shape(family) != (size,):
        raise ValueError(f"`family` must have batch shape ({size},), one latent per row of `x`; "
                         f"got {_family_batch_shape(family)}")
    optimizer = optax.adam(1e-2) if optimizer is None else optimizer
    model_optimizer = optax.adam(1e-2) if model_optimizer is None else model_optimizer
    init_key, run_key = jax.random.split(rng_key)
    state = svi.init(init_key, family, optimizer, model_params=model_params,
                     model_optimizer=model_optimizer)
    if state.model_params is None:
        raise ValueError("`model_params` must hold theta (variational EM learns it)")
    if init is not None:
        params = _merge_init(init, state.params)
        state = state.replace(params=params, opt_state=optimizer.init(params))
    svi._check_log_joint_output(state, log_joint_fn, x, None)
    state, trace, monitored = _variational_em(
        run_key, state, x, log_joint_fn=log_joint_fn, num_iterations=num_iterations,
        e_steps=e_steps, m_steps=m_steps, objective=objective, exact_e_step=exact_e_step,
        monitor_fn=monitor_fn)
    return VariationalEMResult(state, trace, None if monitor_fn is None else monitored)


def alternating_optimizer(encoder_optimizer: optax.GradientTransformation,
                          decoder_optimizer: optax.GradientTransformation, *, e_steps: int = 1,
                          m_steps: int = 1) -> optax.GradientTransformation:
    """Amortized variational EM for the VAE engine: an optax transformation over a VAE's
    parameters that, at update i, applies ``encoder_optimizer`` to the encoder (phi) iff
    ``i mod (e_steps + m_steps) < e_steps`` (E-step) and ``decoder_optimizer`` to the decoder
    (theta) otherwise (M-step); the other part gets a zero update and its optimiser state is
    left as it was (``optax.conditionally_mask``). Pass it to :func:`vijax.vae.make_train_step`
    / :func:`vijax.vae.make_train_epoch` (lecture 3, "Variational EM", with phi the encoder's
    weights; ``e_steps = m_steps = 1`` alternates single steps, while the plain VAE update
    moves both at once).

    Raises:
      TypeError / ValueError: an optimizer without ``init``/``update``; a count not an int
        >= 1.
    """
    check_optimizer(encoder_optimizer, "encoder_optimizer")
    check_optimizer(decoder_optimizer, "decoder_optimizer")
    e_steps = check_int(e_steps, "`e_steps`", minimum=1)
    m_steps = check_int(m_steps, "`m_steps`", minimum=1)
    period = e_steps + m_steps

    def labels(params):
        def label(path, _):
            names = [getattr(k, "key", None) for k in path]
            if "encoder" in names:
                return "encoder"
            if "decoder" in names:
                return "decoder"
            raise ValueError(f"parameter {jax.tree_util.keystr(path)} belongs to neither the "
                             "encoder nor the decoder")
        return jax.tree_util.tree_map_with_path(label, params)

    return optax.multi_transform(
        {"encoder": optax.conditionally_mask(encoder_optimizer,
                                             lambda i: i % period < e_steps),
         "decoder": optax.conditionally_mask(decoder_optimizer,
                                             lambda i: i % period >= e_steps)},
        labels)


# ------------------------------------------------------------------ semi-amortized inference


_DEFAULT_REFINE_OPTIMIZER = optax.sgd(1e-3)


def refine(rng_key: Array, params: PyTree, model, x: Array, num_steps: int, *,
           optimizer: optax.GradientTransformation | None = None, objective: Any = None,
           init: PyTree = None) -> tuple[dict, svi.SVIInfo]:
    """Semi-amortized inference (Kim et al. 2018, Algorithm 1, lines 2-5): start at the
    encoder's q(z | x) (lambda_0 = :func:`encoder_local_params`) and take ``num_steps``
    gradient steps on the local parameters with the decoder fixed: ``svi.run`` of
    ``local_family(L, B)`` from a state whose parameters are the encoder's output.

    Pure, jit-able and differentiable: the gradient of a function of the result with respect to
    ``params`` flows through the encoder output and through every refinement step (second
    derivatives of the bound), as in Kim et al.'s end-to-end training; wrap the result in
    ``jax.lax.stop_gradient`` to cut it.

    Args:
      rng_key: a JAX PRNG key.
      params, model: the VAE.
      x: ``[B, D]`` images.
      num_steps: K >= 0 (0 returns lambda_0, the amortized q).
      optimizer: for the local parameters (default ``optax.sgd(1e-3)``, plain gradient ascent
        as in Kim et al., at a rate that is stable for the binarized-MNIST VAE, whose
        per-example gradients sum 784 pixels; 1e-2 diverges there; its state starts fresh).
        ``optax.adam(1e-2)`` refines faster on MNIST (docs/amortized.md).
      objective: an svi objective (default :func:`default_objective`).
      init: local parameters to start from instead of the encoder's (e.g. a differentiable
        function of ``params`` computed by the caller), or None.

    Returns:
      ``(local_params, info)``: ``{"loc": [B, L], "raw_scale": [B, L]}`` after K steps and the
      :class:`vijax.svi.SVIInfo` trace ``[K]`` (``info.objective``: the batch's summed bound
      before each step, nats).

    Raises:
      TypeError / ValueError: bad ``params``/``model``/``x`` (naming them); ``num_steps`` not
        an int >= 0 (ValueError naming ``num_steps``).
    """
    check_rng_key(rng_key)
    _check_vae_params(params)
    _check_vae_model(model)
    _check_vae_x(model, x)
    num_steps = check_int(num_steps, "`num_steps`", minimum=0)
    lam0 = encoder_local_params(params, model, x) if init is None else init
    if num_steps == 0:
        empty = jnp.zeros((0,), jnp.result_type(float))
        return lam0, svi.SVIInfo(empty, empty, jnp.zeros((0,), bool))
    optimizer = _DEFAULT_REFINE_OPTIMIZER if optimizer is None else optimizer
    objective = default_objective(model.latent_dim) if objective is None else objective
    family = local_family(model.latent_dim, x.shape[0])
    init_key, run_key = jax.random.split(rng_key)
    state = svi.init(init_key, family, optimizer)
    lam0 = _merge_init(lam0, state.params)
    state = state.replace(params=lam0, opt_state=optimizer.init(lam0))
    theta = decoder_params(params)
    log_joint = VAELogJoint(model)
    state, info = svi.run(run_key, state, lambda z, xb: log_joint(z, theta, xb), num_steps,
                          objective=objective, data=x)
    return state.params, info


def make_semi_amortized_train_step(model, optimizer: optax.GradientTransformation, *,
                                   num_refine_steps: int,
                                   refine_optimizer: optax.GradientTransformation | None = None,
                                   objective: Any = None,
                                   differentiate_through_refinement: bool = True) -> Callable:
    """A VAE train step with semi-amortized inference (Kim et al. 2018):
    ``train_step(state, batch, rng_key) -> (state, metrics)``, the contract of
    :func:`vijax.vae.make_train_step` (a :class:`vijax.vae.TrainState`; pure, jit it with
    ``donate_argnums=0``).

    lambda_0 = encoder(x); lambda_K = :func:`refine` (K = ``num_refine_steps`` gradient steps
    with the decoder held fixed, ``stop_gradient(theta)`` inside the refinement). The decoder
    theta is trained on the bound at lambda_K, L(x; theta, lambda_K). The encoder phi:

    * ``differentiate_through_refinement=True`` (SA-VAE): by the same loss, backpropagated
      through the K refinement steps to lambda_0 and the encoder, i.e.
      dL(lambda_K)/dphi = dL/dlambda_K * dlambda_K/dlambda_0 * dlambda_0/dphi (Kim et al.,
      Algorithm 1, lines 6-9; JAX differentiates ``svi.run`` itself, Hessian-vector products
      included);
    * ``False`` (the paper's "VAE + SVI" baseline): the refinement is a constant, and the
      encoder is trained by its own bound L(x; stop_gradient(theta), lambda_0); loss =
      -[L(x; theta, stop_gradient(lambda_K)) + L(x; stop_gradient(theta), lambda_0)].

    Args:
      model: a :class:`vijax.nn.VAE`.
      optimizer: optax transformation for all the VAE's parameters.
      num_refine_steps: K >= 1.
      refine_optimizer: for the local parameters (default ``optax.sgd(1e-3)``, as
        :func:`refine`).
      objective: the svi objective of the refinement and of the losses (default
        :func:`default_objective`).
      differentiate_through_refinement: see above (a bool).

    Returns:
      ``train_step``; ``metrics``: ``loss`` (minus the batch-mean bound at lambda_K, plus minus
      the encoder's bound when not differentiating), ``objective`` (the batch-mean bound at
      lambda_K, nats), ``objective_encoder`` (at lambda_0; their difference is what K steps of
      refinement gained on this batch).

    Raises:
      TypeError / ValueError (at construction): ``model`` not a VAE, ``optimizer`` without
        init/update, ``num_refine_steps`` not an int >= 1 (naming it), a non-bool flag.
      TypeError / ValueError (at call): ``state`` not a TrainState, bad ``batch``.
    """
    _check_vae_model(model)
    check_optimizer(optimizer)
    num_refine_steps = check_int(num_refine_steps, "`num_refine_steps`", minimum=1)
    check_bool(differentiate_through_refinement, "`differentiate_through_refinement`")
    refine_optimizer = (_DEFAULT_REFINE_OPTIMIZER if refine_optimizer is None
                        else refine_optimizer)
    check_optimizer(refine_optimizer, "refine_optimizer")
    objective = default_objective(model.latent_dim) if objective is None else objective
    svi._check_objective(objective)
    log_joint = VAELogJoint(model)
    differentiate = bool(differentiate_through_refinement)

    def bound(key, theta, lam, x):
        q = vfam.distribution(local_family(model.latent_dim, x.shape[0]), lam)
        return objective.value(key, lambda z: log_joint(z, theta, x), q)

    def loss_fn(params, x, rng_key):
        refine_key, key_k, key_0 = jax.random.split(rng_key, 3)
        theta = decoder_params(params)
        lam0 = encoder_local_params(params, model, x)
        frozen = with_decoder_params(params, jax.lax.stop_gradient(theta))
        start = lam0 if differentiate else jax.lax.stop_gradient(lam0)
        lam_k, _ = refine(refine_key, frozen, model, x, num_refine_steps,
                          optimizer=refine_optimizer, objective=objective, init=start)
        if not differentiate:
            lam_k = jax.lax.stop_gradient(lam_k)
        objective_k = jnp.mean(bound(key_k, theta, lam_k, x))
        objective_0 = jnp.mean(bound(key_0, jax.lax.stop_gradient(theta), lam0, x))
        loss = -objective_k if differentiate else -(objective_k + objective_0)
        return loss, (objective_k, objective_0)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def train_step(state: vae.TrainState, batch: Array, rng_key: Array):
        vae._check_state(state)
        check_rng_key(rng_key)
        _check_vae_x(model, batch, "batch")
        (loss, (objective_k, objective_0)), grads = grad_fn(state.params, batch, rng_key)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "objective": objective_k, "objective_encoder": objective_0}
        return vae.TrainState(params, opt_state, state.step + 1), metrics

    return train_step


# ------------------------------------------------------------------ many-sample ELBO estimates


def elbo_estimate(rng_key: Array, log_joint_fn: Callable, x: PyTree, family: Any, params: PyTree,
                  *, num_samples: int, model_params: PyTree = None, objective: Any = svi.ELBO(),
                  chunk_size: int = 10) -> tuple[Array, Array]:
    """The ELBO of a local q (per example) from ``num_samples`` draws, with its Monte Carlo
    standard error: the mean and the standard error of ``num_samples`` single-sample values of
    the svi ``objective`` (e.g. ``svi.ELBOAnalyticKL``: log p(x | z_s) - KL(q || p)), drawn
    ``chunk_size`` at a time (memory ~ ``chunk_size * B`` decoder rows). For the same key the
    draws are common random numbers across calls with the same family shape, which makes
    differences of two estimates (a gap) much less noisy than either.

    Args:
      rng_key: a JAX PRNG key.
      log_joint_fn, x, model_params: as :func:`fit_local`.
      family, params: the local family (batch shape ``(B,)`` or ``()`` with ``[B]``-stacked
        parameters, as in :class:`LocalFit`) and its parameters.
      num_samples: S >= 2 (rounded up to a multiple of ``chunk_size``).
      objective: an svi ``ELBO`` or ``ELBOAnalyticKL`` (its ``num_samples`` is ignored).
      chunk_size: draws per vectorised chunk, an int >= 1.

    Returns:
      ``(elbo [B], standard_error [B])`` in nats (the ELBO itself, not its negative).

    Raises:
      TypeError / ValueError: a count not an int (>= 2 for ``num_samples``, naming it);
        ``objective`` not an svi ``ELBO``/``ELBOAnalyticKL``; ``x`` and ``family`` of different
        batch sizes.
    """
    check_rng_key(rng_key)
    check_callable(log_joint_fn, "`log_joint_fn`")
    num_samples = check_int(num_samples, "`num_samples`", minimum=2)
    chunk_size = check_int(chunk_size, "`chunk_size`", minimum=1)
    if not isinstance(objective, (svi.ELBO, svi.ELBOAnalyticKL)):
        raise TypeError(f"`objective` must be vijax.svi.ELBO or ELBOAnalyticKL, got {objective!r}")
    size = _data_size(x)
    batch_shape = _family_batch_shape(family)
    if batch_shape not in ((size,), ()):
        raise ValueError(f"`x` has {size} rows but `family` has batch shape {batch_shape}")
    mode = "batched" if batch_shape == (size,) else "vmap"
    chunk_size = min(chunk_size, num_samples)
    num_chunks = -(-num_samples // chunk_size)
    return _elbo_estimate(rng_key, model_params, x, params, log_joint_fn=log_joint_fn,
                          family=family, objective=objective, mode=mode, num_chunks=num_chunks,
                          chunk_size=chunk_size)


# ------------------------------------------------------------------ inference gaps


class InferenceGaps(NamedTuple):
    """Per-example inference-gap decomposition (Cremer et al. 2018, Table 1), nats, ``[N]``.

    log p(x) - L[q] = (log p(x) - L[q*]) + (L[q*] - L[q]): the approximation gap (the family
    cannot match the posterior) plus the amortization gap (the encoder does not output the
    family's best member for this x).

    Fields:
      log_px: log p^(x), ``log_px_encoder`` or ``log_px_local`` per ``log_px_proposal`` of
        :func:`inference_gaps` (by default the one whose proposal has the larger ELBO).
      log_px_encoder: :func:`vijax.vae.log_likelihood_is` (proposal q(z | x)).
      log_px_local: importance sampling with q* as proposal (``svi.log_marginal_estimate``),
        or None when not computed.
      elbo_local, elbo_local_se: L[q*], the ELBO of the per-datapoint optimum q*, and its Monte
        Carlo standard error.
      elbo_amortized, elbo_amortized_se: L[q], the ELBO of the encoder's q(z | x) (the same
        draws of eps as L[q*]: common random numbers).
      approximation_gap: log_px - elbo_local; amortization_gap: elbo_local - elbo_amortized.
      local: the :class:`LocalFit` of q*.
    """

    log_px: Array
    log_px_encoder: Array
    log_px_local: Array | None
    elbo_local: Array
    elbo_local_se: Array
    elbo_amortized: Array
    elbo_amortized_se: Array
    approximation_gap: Array
    amortization_gap: Array
    local: LocalFit

    def summary(self) -> dict:
        """Means over the examples (nats) with their standard errors over examples
        (``*_se``), as Python floats."""
        out = {}
        for name in ("log_px", "log_px_encoder", "log_px_local", "elbo_local", "elbo_amortized",
                     "approximation_gap", "amortization_gap"):
            values = getattr(self, name)
            if values is None:
                continue
            values = np.asarray(values, np.float64)
            out[name] = float(values.mean())
            out[name + "_se"] = float(values.std(ddof=1) / math.sqrt(values.size)
                                      if values.size > 1 else math.nan)
        for name in ("elbo_local_se", "elbo_amortized_se"):
            se = np.asarray(getattr(self, name), np.float64)
            out[name.replace("_se", "_mc_se")] = float(np.sqrt(np.sum(se ** 2)) / se.size)
        out["num_examples"] = int(np.size(self.log_px))
        return out


def inference_gaps(rng_key: Array, params: PyTree, model, x: Array, *, local_steps: int = 2000,
                   num_is_samples: int = 5000, num_elbo_samples: int = 1000,
                   family: Any = None,
                   local_optimizer: optax.GradientTransformation | None = None,
                   local_objective: Any = None, local_init: Any = "encoder",
                   local_is: bool = True, log_px_proposal: str = "best",
                   local_fit: LocalFit | None = None,
                   is_batch_size: int = 100, is_chunk_size: int = 100,
                   elbo_chunk_size: int = 10) -> InferenceGaps:
    """The inference gaps of a trained VAE on the images ``x`` (Cremer, Li & Duvenaud 2018).

    1. log p^(x): :func:`vijax.vae.log_likelihood_is` with k = ``num_is_samples`` (q(z | x) as
       proposal; 5000 as in Burda et al. 2016), and, with ``local_is``, importance sampling
       with q* as proposal (``svi.log_marginal_estimate``). Both are stochastic lower bounds on
       log p(x); ``log_px_proposal`` says which one is ``log_px``.
    2. q*: :func:`fit_local_vae` for ``local_steps`` steps (from the encoder's q by default),
       the decoder fixed; L[q*] by :func:`elbo_estimate` with ``num_elbo_samples`` draws.
    3. L[q]: the encoder's q(z | x), by :func:`elbo_estimate` with the same draws.

    Args:
      rng_key: a JAX PRNG key.
      params, model: the trained VAE.
      x: ``[N, D]`` images (binarized once for a Bernoulli decoder; the same images for all
        three quantities).
      local_steps: steps of the per-datapoint optimisation, an int >= 1 (see docs/amortized.md
        for the count that converges on MNIST).
      num_is_samples: k >= 1; num_elbo_samples: S >= 2.
      family: the family of q* (default ``local_family(L, N)``, the fully factorised
        Gaussian of the encoder); a family with batch shape () (e.g.
        ``families.SplineFlow(L)``) runs per example under vmap.
      local_optimizer, local_objective, local_init: as :func:`fit_local_vae`.
      local_is: also importance-sample with q* as proposal.
      log_px_proposal: ``"best"`` (default): per example, the estimate whose proposal has the
        larger ELBO (almost always q*; a choice made from the ELBO estimates, not from the
        importance weights, so it does not pick the luckier of two noisy estimates, whose
        maximum would be biased upwards); ``"encoder"``: always
        :func:`vijax.vae.log_likelihood_is`; ``"local"``: always q* (needs ``local_is``).
      local_fit: a :class:`LocalFit` of q* computed before (its family must be
        ``family``); then ``local_steps`` and the optimiser are not used.
      is_batch_size, is_chunk_size: memory bounds of :func:`vijax.vae.log_likelihood_is`.
      elbo_chunk_size: draws per chunk of :func:`elbo_estimate`.

    Returns:
      :class:`InferenceGaps` (``.summary()`` for the table).

    Raises:
      TypeError / ValueError: bad ``params``/``model``/``x`` (naming them), a count that is not
        an int >= 1 (naming it), as :func:`fit_local_vae`.
    """
    check_rng_key(rng_key)
    _check_vae_params(params)
    _check_vae_model(model)
    _check_vae_x(model, x)
    local_steps = check_int(local_steps, "`local_steps`", minimum=1)
    num_is_samples = check_int(num_is_samples, "`num_is_samples`", minimum=1)
    num_elbo_samples = check_int(num_elbo_samples, "`num_elbo_samples`", minimum=2)
    check_bool(local_is, "`local_is`")
    if log_px_proposal not in ("best", "encoder", "local"):
        raise ValueError("`log_px_proposal` must be 'best', 'encoder' or 'local', got "
                         f"{log_px_proposal!r}")
    if log_px_proposal == "local" and not local_is:
        raise ValueError("`log_px_proposal` 'local' needs `local_is`=True")
    size, latent_dim = x.shape[0], model.latent_dim
    if family is None:
        family = local_family(latent_dim, size)
    is_key, fit_key, elbo_key, local_is_key = jax.random.split(rng_key, 4)
    log_px_encoder = vae.log_likelihood_is(is_key, params, model, x, num_samples=num_is_samples,
                                           chunk_size=is_chunk_size, batch_size=is_batch_size)
    if local_fit is None:
        local_fit = fit_local_vae(fit_key, params, model, x, local_steps, init=local_init,
                                  family=family, optimizer=local_optimizer,
                                  objective=local_objective)
    elif not isinstance(local_fit, LocalFit):
        raise TypeError(f"`local_fit` must be a LocalFit or None, got {type(local_fit).__name__}")
    gaussian = isinstance(family, (vfam.MeanFieldNormal, vfam.FullRankNormal,
                                   vfam.LowRankNormal))
    eval_objective = default_objective(latent_dim) if gaussian else svi.ELBO()
    log_joint, theta = VAELogJoint(model), decoder_params(params)
    elbo_local, elbo_local_se = elbo_estimate(
        elbo_key, log_joint, x, family, local_fit.params, num_samples=num_elbo_samples,
        model_params=theta, objective=eval_objective, chunk_size=elbo_chunk_size)
    amortized_family = local_family(latent_dim, size)
    elbo_amortized, elbo_amortized_se = elbo_estimate(
        elbo_key, log_joint, x, amortized_family, encoder_local_params(params, model, x),
        num_samples=num_elbo_samples, model_params=theta, objective=default_objective(latent_dim),
        chunk_size=elbo_chunk_size)
    log_px_local = None
    log_px = log_px_encoder
    if local_is:
        mode = "batched" if _family_batch_shape(family) == (size,) else "vmap"
        chunk = max(1, min(num_is_samples, (is_batch_size * is_chunk_size) // size))
        log_px_local = _local_log_marginal(local_is_key, theta, x, local_fit.params,
                                           log_joint_fn=log_joint, family=family, mode=mode,
                                           num_samples=num_is_samples, chunk_size=chunk)
        if log_px_proposal == "local":
            log_px = log_px_local
        elif log_px_proposal == "best":
            log_px = jnp.where(elbo_local >= elbo_amortized, log_px_local, log_px_encoder)
    return InferenceGaps(log_px=log_px, log_px_encoder=log_px_encoder, log_px_local=log_px_local,
                         elbo_local=elbo_local, elbo_local_se=elbo_local_se,
                         elbo_amortized=elbo_amortized, elbo_amortized_se=elbo_amortized_se,
                         approximation_gap=log_px - elbo_local,
                         amortization_gap=elbo_local - elbo_amortized, local=local_fit)


# ------------------------------------------------------------------ checkpoints


def load_vae_checkpoint(workdir: str | os.PathLike, *, latent_dim: int | None = 50,
                        hidden_sizes: tuple[int, ...] | None = (200, 200),
                        data_dim: int | None = 784, data_dir: str | os.PathLike | None = None,
                        epoch: int | None = None):
    """Load the VAE trained by ``experiments/vae.py --workdir DIR``
    (:func:`vijax.vae_train.restore_checkpoint` with the run's own ``config.json``), refusing
    a checkpoint of another architecture than the one asked for.

    Args:
      workdir: the run's work directory (holding ``config.json`` and ``checkpoints/``).
      latent_dim, hidden_sizes, data_dim: the expected architecture (encoder hidden widths;
        the decoder uses them reversed); None accepts any. The default is the IWAE paper's
        784-200-200-50 MNIST network (also Cremer et al.'s MNIST setting).
      data_dir: where the MNIST IDX files are, overriding the run's saved ``data_dir`` (needed
        for the model's shapes; the default search of :func:`vijax.data.load_mnist` otherwise).
      epoch: which kept checkpoint (None: the latest).

    Returns:
      ``(params, model, config, epoch)``: the parameters (``state.params``), the
      :class:`vijax.nn.VAE`, the run's :class:`vijax.vae_train.Config` and the number of epochs
      the checkpoint completed.

    Raises:
      FileNotFoundError: ``workdir`` has no ``config.json`` or no checkpoint.
      ValueError: a checkpoint of another architecture (the message names ``workdir`` and
        both architectures); a ``config.json`` that is not a vijax.vae_train configuration.
      TypeError / ValueError: a bad expected size (naming it).
    """
    from vijax import vae_train as vt  # noqa: PLC0415

    check_int(latent_dim, "`latent_dim`", minimum=1, optional=True)
    check_int(data_dim, "`data_dim`", minimum=1, optional=True)
    if hidden_sizes is not None:
        hidden_sizes = check_int_sequence(hidden_sizes, "`hidden_sizes`")
    workdir = pathlib.Path(workdir)
    config_path = workdir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"`workdir` {workdir} has no config.json: not a work directory "
                                "of experiments/vae.py")
    try:
        saved = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"`workdir` {workdir}: config.json is not JSON ({err})") from None
    config = _config_from_dict(saved, _config_types(), f"`workdir` {workdir} config.json")
    if not isinstance(config, vt.Config):
        raise ValueError(f"`workdir` {workdir}: config.json does not describe a "
                         "vijax.vae_train.Config")
    saved_data_dim = 784 if isinstance(config.dataset, vt.Mnist) else 64
    found = (config.latent_dim, tuple(config.hidden_sizes), saved_data_dim)
    wanted = (latent_dim, hidden_sizes, data_dim)
    if any(w is not None and w != f for w, f in zip(wanted, found)):
        def describe(values):
            l, h, d = values
            return (f"data_dim {d if d is not None else 'any'}, hidden_sizes "
                    f"{h if h is not None else 'any'}, latent_dim "
                    f"{l if l is not None else 'any'}")
        raise ValueError(f"`workdir` {workdir} holds a checkpoint of another architecture: "
                         f"{type(config.dataset).__name__} {describe(found)} (expected "
                         f"{describe(wanted)})")
    if data_dir is not None and isinstance(config.dataset, vt.Mnist):
        config = dataclasses.replace(config, dataset=dataclasses.replace(
            config.dataset, data_dir=os.fspath(data_dir)))
    state, epochs = vt.restore_checkpoint(workdir, config, epoch=epoch)
    train_images = config.dataset.load().train_images
    model = vt.build_model(config, train_images)
    return state.params, model, config, epochs
