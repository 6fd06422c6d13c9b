"""Private helpers shared by ``vijax.elbo`` and ``vijax.marginal``.

A variational family ``q`` is a distrax distribution, or a pytree (dict, tuple, list) whose
leaves are distrax distributions, read as a product of independent factors
q(z) = prod_j q_j(z_j). Every factor has the same batch shape ``[batch]``; one sample of ``q``
is then a pytree of arrays ``[batch, *event_shape_j]``.

This module also holds the argument checks, so each public function validates in the same
words.
"""

from __future__ import annotations

import numbers
from typing import Any, Callable

import distrax
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
PyTree = Any


def _is_distribution(x: Any) -> bool:
    return isinstance(x, distrax.Distribution)


def factors(q: PyTree, name: str = "q") -> list[distrax.Distribution]:
    """The distrax factors of ``q`` in pytree order; ``TypeError`` naming ``name`` if none."""
    leaves = jax.tree_util.tree_leaves(q, is_leaf=_is_distribution)
    if not leaves or not all(_is_distribution(leaf) for leaf in leaves):
        raise TypeError(
            f"`{name}` must be a distrax.Distribution or a pytree whose leaves are distrax "
            f"distributions; got {type(q).__name__}"
        )
    return leaves


def batch_shape(q: PyTree, name: str = "q") -> tuple[int, ...]:
    """The common batch shape of the factors of ``q``; ``ValueError`` if they differ."""
    shapes = {tuple(d.batch_shape) for d in factors(q, name)}
    if len(shapes) != 1:
        raise ValueError(f"all factors of `{name}` must share one batch shape; got {sorted(shapes)}")
    return shapes.pop()


def _factor_keys(rng_key: Array, q: PyTree):
    """The factors of ``q``, its treedef and one key per factor (one key: used as is)."""
    leaves, treedef = jax.tree_util.tree_flatten(q, is_leaf=_is_distribution)
    keys = jax.random.split(rng_key, len(leaves)) if len(leaves) > 1 else [rng_key]
    return leaves, treedef, keys


def sample(rng_key: Array, q: PyTree) -> PyTree:
    """One reparameterized draw from ``q`` (a pytree shaped like ``q``)."""
    leaves, treedef, keys = _factor_keys(rng_key, q)
    return jax.tree_util.tree_unflatten(treedef, [d.sample(seed=k) for d, k in zip(leaves, keys)])


def sample_and_log_prob(rng_key: Array, q: PyTree) -> tuple[PyTree, Array]:
    """The draw of ``sample(rng_key, q)`` and log q(z), ``[*batch]`` (nats), from one forward
    pass: for a transformed q, log q = log r(eps) - log|det J| at the base draw eps, so no
    bijector inverse is evaluated (a saturated float32 ``Tanh`` sample, exactly +-1, keeps a
    finite log q)."""
    leaves, treedef, keys = _factor_keys(rng_key, q)
    # distrax's sample_and_log_prob broadcasts [n, *batch] draws against [*batch] parameters
    # implicitly (its sample does not); allow that inside distrax only, so callers may run
    # under jax.numpy_rank_promotion("raise").
    with jax.numpy_rank_promotion("allow"):
        draws, log_qs = zip(*(d.sample_and_log_prob(seed=k) for d, k in zip(leaves, keys)))
    return jax.tree_util.tree_unflatten(treedef, list(draws)), sum(log_qs[1:], log_qs[0])


def log_prob(q: PyTree, z: PyTree) -> Array:
    """log q(z) summed over the factors, shape ``q``'s batch shape (nats)."""
    leaves, treedef = jax.tree_util.tree_flatten(q, is_leaf=_is_distribution)
    z_leaves = treedef.flatten_up_to(z)
    total = leaves[0].log_prob(z_leaves[0])
    for d, z_j in zip(leaves[1:], z_leaves[1:]):
        total = total + d.log_prob(z_j)
    return total


def tree_vdot(a: PyTree, b: PyTree, *, batch_ndim: int) -> Array:
    """Sum over every leaf and every event axis of ``a * b``; shape ``[*batch]``.

    Leaves are ``[*batch, *event]``; used to form <g, z - stop_gradient(z)> per example.
    """
    terms = [
        jnp.sum(x * y, axis=tuple(range(batch_ndim, x.ndim)))
        for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b))
    ]
    return sum(terms[1:], terms[0])


# ----------------------------------------------------------------------------- checks


def check_num_samples(num_samples: Any, name: str = "num_samples") -> int:
    """A positive Python int (static), else ``TypeError``/``ValueError`` naming ``name``."""
    if isinstance(num_samples, bool) or not isinstance(num_samples, numbers.Integral):
        raise TypeError(f"`{name}` must be a Python int (it fixes array shapes); got {num_samples!r}")
    if num_samples < 1:
        raise ValueError(f"`{name}` must be >= 1; got {num_samples}")
    return int(num_samples)


def is_concrete(x: Any) -> bool:
    return not isinstance(x, jax.core.Tracer)


def check_finite(x: Any, name: str) -> None:
    """``ValueError`` naming ``name`` if a concrete array holds NaN or inf (tracers pass)."""
    if x is None or not is_concrete(x):
        return
    arr = np.asarray(x)
    if np.issubdtype(arr.dtype, np.inexact) and not np.all(np.isfinite(arr)):
        raise ValueError(f"`{name}` contains non-finite values (NaN or inf)")


def check_finite_parameters(q: PyTree, name: str = "q") -> None:
    """Finite parameters (e.g. ``loc``, ``scale``) for every concrete leaf of ``q``."""
    for leaf in jax.tree_util.tree_leaves(q):
        check_finite(leaf, f"{name} (its loc/scale parameters)")


def check_q(q: PyTree, name: str = "q") -> tuple[int, ...]:
    """Validate a variational family; returns its batch shape."""
    shape = batch_shape(q, name)
    check_finite_parameters(q, name)
    return shape


def call_log_density(fn: Callable, z: PyTree, expected_shape: tuple[int, ...], name: str) -> Array:
    """``fn(z)``, checked to have shape ``expected_shape`` (a static check at trace time)."""
    out = fn(z)
    shape = tuple(getattr(out, "shape", ()))
    if shape != tuple(expected_shape):
        raise ValueError(
            f"`{name}` must return one log density per example, shape {tuple(expected_shape)} "
            f"(q's batch shape); got shape {shape}"
        )
    return out


def check_estimator(estimator: Any, allowed: tuple[type, ...], function: str) -> None:
    if not isinstance(estimator, allowed):
        names = ", ".join(cls.__name__ + "()" for cls in allowed)
        raise TypeError(f"`estimator` for {function} must be one of {names}; got {estimator!r}")
