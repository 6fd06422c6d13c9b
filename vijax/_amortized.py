"""Private machinery of :mod:`vijax.amortized`: argument checks, cached objectives and
optimisers, the jitted kernels behind ``fit_local``, ``variational_em``, ``elbo_estimate`` and
``inference_gaps``, and the checkpoint-config readers. Nothing here is public API."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vijax import _q
from vijax import elbo as velbo
from vijax import families as vfam
from vijax import nn as vnn
from vijax import svi
from vijax import vae

Array = jax.Array
PyTree = Any

def _check_vae_model(model, name: str = "model") -> None:
    if not isinstance(model, vnn.VAE):
        raise TypeError(f"`{name}` must be a vijax.nn.VAE (e.g. vijax.nn.iwae_mnist_vae()), got "
                        f"{type(model).__name__}")


def _check_vae_params(params, name: str = "params") -> None:
    if isinstance(params, vae.TrainState):
        raise TypeError(f"`{name}` must be the VAE's parameters, got a TrainState: pass "
                        "state.params")
    try:
        params["params"]["encoder"], params["params"]["decoder"]
    except (KeyError, TypeError, IndexError):
        raise TypeError(f"`{name}` must be a VAE's parameter dict {{'params': {{'encoder': ..., "
                        f"'decoder': ...}}}} (model.init output), got {type(params).__name__}"
                        ) from None


def _check_vae_x(model, x, name: str = "x") -> None:
    vae.check_images(x, data_dim=model.decoder.data_dim, name=f"`{name}`",
                     unit_interval=isinstance(model.decoder, vnn.BernoulliDecoder))


@functools.lru_cache(maxsize=None)
def _cached_objective(latent_dim: int, num_samples: int, dtype_name: str):
    # concrete arrays even when first called inside a jit trace: the cached prior must not
    # hold tracers (a later call would leak them)
    with jax.ensure_compile_time_eval():
        prior = vnn.standard_normal_prior(latent_dim, jnp.dtype(dtype_name))
    return svi.ELBOAnalyticKL(prior=prior, num_samples=num_samples)


@functools.lru_cache(maxsize=64)
def _cached_adam(num_steps: int, learning_rate: float, final_fraction: float):
    return optax.adam(optax.cosine_decay_schedule(learning_rate, num_steps, alpha=final_fraction))


def _family_batch_shape(family) -> tuple[int, ...]:
    if hasattr(family, "batch_shape"):
        return tuple(family.batch_shape)
    return tuple(_q.batch_shape(vfam.distribution(family, family.init(jax.random.key(0)))))


def _data_size(x, name: str = "x") -> int:
    leaves = jax.tree_util.tree_leaves(x)
    if not leaves or any(np.ndim(a) < 1 for a in leaves):
        raise ValueError(f"`{name}` must be an array [B, ...] (or a pytree of them) with a "
                         "leading batch axis")
    sizes = {int(np.shape(a)[0]) for a in leaves}
    if len(sizes) != 1:
        raise ValueError(f"every array of `{name}` must have the same leading size B, got "
                         f"{sorted(sizes)}")
    return sizes.pop()


def _merge_init(init: dict | PyTree, base: PyTree, name: str = "init") -> PyTree:
    """``init`` (full parameters, or a dict holding some of ``base``'s keys) merged into
    ``base``; ValueError naming ``name`` on a key or shape mismatch."""
    if isinstance(init, dict) and isinstance(base, dict) and set(init) < set(base):
        merged = dict(base)
        for key, value in init.items():
            merged[key] = _merge_init(value, base[key], f"{name}[{key!r}]")
        return merged
    if jax.tree_util.tree_structure(init) != jax.tree_util.tree_structure(base):
        raise ValueError(f"`{name}` must have the structure of the family's parameters "
                         f"{jax.tree_util.tree_structure(base)}, got "
                         f"{jax.tree_util.tree_structure(init)}")
    out = []
    for a, b in zip(jax.tree_util.tree_leaves(init), jax.tree_util.tree_leaves(base)):
        if np.shape(a) != np.shape(b):
            raise ValueError(f"`{name}` has a leaf of shape {tuple(np.shape(a))} where the "
                             f"family's parameters have {tuple(np.shape(b))}")
        out.append(jnp.asarray(a, b.dtype))
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(base), out)


def _bound(log_joint_fn, model_params, has_model):
    if has_model:
        return lambda z, xb: log_joint_fn(z, model_params, xb)
    return lambda z, xb: log_joint_fn(z, xb)


def _single(fn):
    """A batch-of-one log joint for a family with batch shape (): z [L] -> [] from
    ``fn(z [1, L], x [1, ...]) -> [1]``."""

    def single(z, xb):
        return fn(jax.tree_util.tree_map(lambda a: a[None], z), xb)[0]

    return single


def _initial_state(rng_key, family, optimizer, init, mode, batch_size):
    if isinstance(init, svi.SVIState):
        if init.family != family:
            raise ValueError("`init` is an SVIState of another family than `family`")
        return init
    if mode == "batched":
        state = svi.init(rng_key, family, optimizer)
        if init is not None:
            params = _merge_init(init, state.params)
            state = state.replace(params=params, opt_state=optimizer.init(params))
        return state

    def one(key, p):
        state = svi.init(key, family, optimizer)
        if p is not None:
            params = _merge_init(p, state.params)
            state = state.replace(params=params, opt_state=optimizer.init(params))
        return state

    keys = jax.random.split(rng_key, batch_size)
    if init is None:
        return jax.vmap(lambda k: one(k, None))(keys)
    return jax.vmap(one)(keys, init)


_commit = jax.jit(lambda tree: tree)


@functools.partial(jax.jit, static_argnames=("log_joint_fn", "num_steps", "objective", "mode"))
def _run_local(rng_key, state, model_params, x, *, log_joint_fn, num_steps, objective, mode):
    """``num_steps`` svi steps of every example's local parameters: one batched ``svi.run`` or
    a ``vmap`` of single-example runs. Returns (state, per-example-mean objective [steps],
    number of non-finite steps)."""
    bound = _bound(log_joint_fn, model_params, model_params is not None)
    if mode == "batched":
        state, info = svi.run(rng_key, state, bound, num_steps, objective=objective, data=x)
        size = _data_size(x)
        return state, info.objective / size, jnp.sum(~info.is_finite)
    single = _single(bound)

    def one(key, st, xi):
        xi = jax.tree_util.tree_map(lambda a: a[None], xi)
        return svi.run(key, st, single, num_steps, objective=objective, data=xi)

    keys = jax.random.split(rng_key, _data_size(x))
    state, info = jax.vmap(one)(keys, state, x)
    return state, jnp.mean(info.objective, axis=0), jnp.sum(~info.is_finite)


def _check_local_log_joint(log_joint_fn, model_params, x, state, mode):
    """Trace the log joint once at a draw of q (no compile) and check its output shape."""

    def evaluate(params, model_params, x):
        bound = _bound(log_joint_fn, model_params, model_params is not None)
        if mode == "vmap":
            p0 = jax.tree_util.tree_map(lambda a: a[0], params)
            z = _q.sample(jax.random.key(0), vfam.distribution(state.family, p0))
            return _single(bound)(z, jax.tree_util.tree_map(lambda a: a[:1], x))
        z = _q.sample(jax.random.key(0), vfam.distribution(state.family, params))
        return bound(z, x)

    out = jax.eval_shape(evaluate, state.params, model_params, x)
    expected = () if mode == "vmap" else (_data_size(x),)
    if tuple(getattr(out, "shape", ())) != expected:
        raise ValueError(f"`log_joint_fn` must return one log density per example, shape "
                         f"{expected if expected else '[] for one example'}; got shape "
                         f"{tuple(getattr(out, 'shape', ()))}")


@functools.partial(jax.jit, static_argnames=(
    "log_joint_fn", "num_iterations", "e_steps", "m_steps", "objective", "exact_e_step",
    "monitor_fn"))
def _variational_em(rng_key, state, x, *, log_joint_fn, num_iterations, e_steps, m_steps,
                    objective, exact_e_step, monitor_fn):
    size = _data_size(x)
    schedule = svi.Alternating(e_steps, m_steps)

    def monitor(theta):
        return jnp.asarray(jnp.nan) if monitor_fn is None else jnp.asarray(monitor_fn(theta))

    def body(state, i):
        key = jax.random.fold_in(rng_key, i)
        if exact_e_step is None:
            state, info = svi.run(key, state, log_joint_fn, e_steps + m_steps,
                                  objective=objective, data=x, schedule=schedule)
            m_objective = info.objective[e_steps:]
        else:
            params = _merge_init(exact_e_step(state.model_params, x), state.params,
                                 "exact_e_step(model_params, x)")
            state = state.replace(params=params)

            def m_step(state, j):
                return svi.step(jax.random.fold_in(key, j), state, log_joint_fn, x,
                                objective=objective, update_variational=False)

            state, info = jax.lax.scan(m_step, state, jnp.arange(m_steps))
            m_objective = info.objective
        return state, (jnp.mean(m_objective) / size, monitor(state.model_params))

    start = monitor(state.model_params)
    state, (objective_trace, monitored) = jax.lax.scan(body, state, jnp.arange(num_iterations))
    return state, objective_trace, jnp.concatenate([start[None], monitored])


def _values_fn(objective, log_joint_fn, model_params, x, family, params, mode):
    """``key -> [B]``: one single-sample value of ``objective`` per example."""
    bound = _bound(log_joint_fn, model_params, model_params is not None)
    one_sample = dataclasses.replace(objective, num_samples=1)
    if mode == "batched":
        q = vfam.distribution(family, params)
        return lambda key: one_sample.value(key, lambda z: bound(z, x), q)
    single = _single(bound)

    def per_example(key, p, xi):
        xi = jax.tree_util.tree_map(lambda a: a[None], xi)
        return one_sample.value(key, lambda z: single(z, xi), vfam.distribution(family, p))

    def values(key):
        keys = jax.random.split(key, _data_size(x))
        return jax.vmap(per_example)(keys, params, x)

    return values


@functools.partial(jax.jit, static_argnames=("log_joint_fn", "family", "objective", "mode",
                                             "num_chunks", "chunk_size"))
def _elbo_estimate(rng_key, model_params, x, params, *, log_joint_fn, family, objective, mode,
                   num_chunks, chunk_size):
    values = _values_fn(objective, log_joint_fn, model_params, x, family, params, mode)
    keys = jax.random.split(rng_key, num_chunks * chunk_size).reshape(
        (num_chunks, chunk_size) + rng_key.shape)

    # one extra draw (a key outside the split above) centres the running sums
    shift = jax.lax.stop_gradient(values(jax.random.fold_in(rng_key, 2**31 - 1)))

    def body(carry, chunk_keys):
        total, total_sq = carry
        v = jax.vmap(values)(chunk_keys) - shift  # shifted sums: no float32 cancellation
        return (total + jnp.sum(v, 0), total_sq + jnp.sum(v * v, 0)), None

    zeros = jnp.zeros_like(shift)
    (total, total_sq), _ = jax.lax.scan(body, (zeros, zeros), keys)
    n = num_chunks * chunk_size
    mean = total / n
    var = jnp.maximum(total_sq / n - mean * mean, 0.0) * n / max(n - 1, 1)
    return shift + mean, jnp.sqrt(var / n)


@functools.partial(jax.jit, static_argnames=("log_joint_fn", "family", "mode", "num_samples",
                                             "chunk_size"))
def _local_log_marginal(rng_key, model_params, x, params, *, log_joint_fn, family, mode,
                        num_samples, chunk_size):
    if mode == "batched":
        return svi.log_marginal_estimate(rng_key, family, params, log_joint_fn,
                                         num_samples=num_samples, model_params=model_params,
                                         batch=x, chunk_size=chunk_size)
    bound = _single(_bound(log_joint_fn, model_params, model_params is not None))

    def one(key, p, xi):
        xi = jax.tree_util.tree_map(lambda a: a[None], xi)
        return svi.log_marginal_estimate(key, family, p, bound, num_samples=num_samples,
                                         batch=xi, chunk_size=chunk_size)

    return jax.vmap(one)(jax.random.split(rng_key, _data_size(x)), params, x)


def _config_types() -> dict:
    from vijax import vae_train as vt  # noqa: PLC0415 - heavy import, only when loading

    classes = [vt.Config, vt.Mnist, vt.Digits, vt.DynamicBinarization, vt.FixedBinarization,
               vt.ConstantLR, vt.IwaeLR, vt.CosineLR, vae.ELBOAnalyticKL, vae.ELBOMonteCarlo,
               vae.IWAE, velbo.Pathwise, velbo.ScoreFunction, velbo.LeaveOneOut,
               velbo.StickingTheLanding, velbo.DReG]
    return {cls.__name__: cls for cls in classes}


def _config_from_dict(obj: Any, types: dict, where: str) -> Any:
    """Invert :func:`vijax.vae_train.config_to_dict` (dicts with a ``"type"`` key become those
    dataclasses, lists tuples)."""
    if isinstance(obj, dict):
        name = obj.get("type")
        if name not in types:
            raise ValueError(f"{where}: unknown type {name!r} (not a vijax.vae_train "
                             "configuration)")
        cls = types[name]
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        kwargs = {k: _config_from_dict(v, types, where) for k, v in obj.items()
                  if k != "type" and k in names}
        return cls(**kwargs)
    if isinstance(obj, list):
        return tuple(_config_from_dict(v, types, where) for v in obj)
    return obj
