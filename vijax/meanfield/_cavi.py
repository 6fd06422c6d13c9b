"""The generic coordinate-ascent driver (CAVI).

Source: lecture 3, "Mean field approximation": with q(T) = prod_j q_j(T_j) the ELBO is
``L(q) = -KL(q_j || p_hat_j) + const(q_j)``, so the block optimum is
``log q_j = E_{i != j} log p(X, T) + const`` and cycling through the blocks never lowers
``L``. The driver below only sequences user-given block updates and watches the ELBO; the
model modules (``normal_gamma``, ``bayesian_gmm``, ``known_variance_gmm``, ``dirac_em``)
supply the updates.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from vijax._checks import check_callable, check_int, check_real

Array = jax.Array


class CAVIInfo(NamedTuple):
    """Trace of a :func:`cavi` run (all ELBO values in nats, not negated).

    Fields:
      elbo:          [max_iter] ELBO after each full sweep of block updates; NaN after the
                     run stopped (entries ``num_iter:`` are NaN). Dtype of ``elbo_fn``'s output
                     (a floating dtype: :func:`cavi` refuses integer ELBOs).
      initial_elbo:  [] ELBO of the starting state.
      num_iter:      [] int32, number of sweeps done (1 <= num_iter <= max_iter).
      converged:     [] bool, True when the last sweep changed the ELBO by at most
                     ``tol * max(1, |ELBO|)``.
    """

    elbo: Array  # [max_iter] ELBO (nats) after each sweep, NaN after the last one
    initial_elbo: Array  # [] ELBO (nats) of the starting state
    num_iter: Array  # [] int32 sweeps done
    converged: Array  # [] bool


def check_update_fns(update_fns) -> tuple[Callable, ...]:
    """``update_fns`` as a non-empty tuple of callables.

    Raises:
      TypeError: ``update_fns`` is a single callable, not iterable, or holds a non-callable
        (the message names ``update_fns[i]``).
      ValueError: ``update_fns`` is empty.
    """
    if callable(update_fns):
        raise TypeError("update_fns must be a sequence of callables (state, data) -> state, "
                        "not a single callable; wrap it as (update_fn,)")
    try:
        update_fns = tuple(update_fns)
    except TypeError:
        raise TypeError("update_fns must be a sequence of callables (state, data) -> state, "
                        f"got {type(update_fns).__name__}") from None
    if not update_fns:
        raise ValueError("update_fns must contain at least one block update")
    for i, fn in enumerate(update_fns):
        check_callable(fn, f"update_fns[{i}]")
    return update_fns


def _check_driver_args(update_fns, elbo_fn, tol, max_iter) -> tuple[Callable, ...]:
    update_fns = check_update_fns(update_fns)
    if not callable(elbo_fn):
        raise TypeError(f"elbo_fn must be callable (state, data) -> scalar ELBO, got {elbo_fn!r}")
    check_loop_args(tol, max_iter)
    return update_fns


def _check_updates_keep_state_type(update_fns: tuple[Callable, ...], state: Any,
                                   data: Any) -> None:
    """Trace the updates once, abstractly (``jax.eval_shape``: no FLOPs), and raise a
    TypeError naming ``update_fns[i]`` when one returns a state whose pytree structure,
    shapes or dtypes differ from the input state's (the ``lax.while_loop`` carry must keep
    its type). A weakly typed input leaf (a Python scalar) may change dtype, as in
    ``lax.while_loop``."""
    reference = jax.eval_shape(lambda s: s, state)
    expected = jax.tree.structure(reference)
    current = reference
    for i, fn in enumerate(update_fns):
        current = jax.eval_shape(lambda s, fn=fn: fn(s, data), current)
        structure = jax.tree.structure(current)
        if structure != expected:
            raise TypeError(f"update_fns[{i}] must return a state with the structure of the "
                            f"input state {expected}, got {structure}")
        for path_leaf, got in zip(jax.tree_util.tree_leaves_with_path(reference),
                                  jax.tree.leaves(current)):
            path, want = path_leaf
            same_dtype = got.dtype == want.dtype or getattr(want, "weak_type", False)
            if got.shape != want.shape or not same_dtype:
                raise TypeError(
                    f"update_fns[{i}] changes state{jax.tree_util.keystr(path)} from "
                    f"{want.dtype}{list(want.shape)} to {got.dtype}{list(got.shape)}; every "
                    "update must keep the shapes and dtypes of the state")


def check_loop_args(tol, max_iter) -> None:
    """``max_iter`` a Python int >= 1 (it fixes the trace length) and a concrete ``tol`` >= 0.

    Raises:
      TypeError: ``max_iter`` is not an int (e.g. ``10.0`` or a bool), or ``tol`` is not a
        real number.
      ValueError: ``max_iter`` < 1, or a concrete ``tol`` < 0 or NaN.
    """
    check_int(max_iter, "max_iter", minimum=1)
    check_real(tol, "tol", minimum=0.0, finite=False, array=True)  # NaN is refused


def sweep(update_fns: Sequence[Callable[[Any, Any], Any]], state: Any, data: Any) -> Any:
    """Apply the block updates once, in order: one CAVI iteration.

    Args:
      update_fns: non-empty sequence of block updates ``(state, data) -> state``; each
        should return the maximiser of the ELBO over its block with the other blocks held
        fixed (lecture 3).
      state: a pytree (usually a NamedTuple) of variational parameters.
      data: any pytree handed unchanged to every update.
    Returns:
      The state after all blocks were updated once.
    Raises:
      TypeError: ``update_fns`` is a single callable or not a sequence, or ``update_fns[i]``
        is not callable.
      ValueError: ``update_fns`` is empty.
    """
    for fn in check_update_fns(update_fns):
        state = fn(state, data)
    return state


def cavi(
    update_fns: Sequence[Callable[[Any, Any], Any]],
    state: Any,
    data: Any,
    *,
    elbo_fn: Callable[[Any, Any], Array],
    tol: float | Array = 1e-8,
    max_iter: int = 200,
) -> tuple[Any, CAVIInfo]:
    """Coordinate-ascent variational inference: sweep block updates until the ELBO settles.

    Each iteration applies ``update_fns`` in order (:func:`sweep`) and evaluates
    ``elbo_fn(state, data)``. The loop is a ``lax.while_loop``: it is pure, jit-compiles
    (``max_iter`` is static, ``tol`` may be traced) and vmaps (under ``vmap`` every batch
    member keeps its own stopping point: finished members are frozen by the loop's select).
    No ``jit`` is applied here; the caller decides.

    Stopping rule: after sweep t, stop when ``|L_t - L_{t-1}| <= tol * max(1, |L_t|)``
    (``L_0`` is the ELBO of the input state), when ``max_iter`` sweeps are done, or when the
    ELBO becomes NaN (then ``converged`` is False).

    Args:
      update_fns: non-empty sequence of block updates ``(state, data) -> state``.
      state: initial variational state (pytree; its structure, shapes and dtypes must be
        preserved by every update).
      data: pytree passed to every update and to ``elbo_fn`` (e.g. ``(x, prior)``).
      elbo_fn: ``(state, data) -> []`` ELBO in nats (not its negative).
      tol: relative tolerance on the ELBO change, >= 0. Use ~1e-5 or larger with float32.
      max_iter: Python int >= 1; the maximum number of sweeps and the trace length.

    Returns:
      ``(state, info)``: the final state and a :class:`CAVIInfo` whose ``elbo`` field is
      ``[max_iter]``.

    Raises:
      TypeError: ``update_fns`` is a single callable or holds a non-callable; ``elbo_fn`` is
        not callable; ``update_fns[i]`` returns a state whose pytree structure, shapes or
        dtypes differ from the input state's (checked before the loop with
        ``jax.eval_shape``, naming the update); ``elbo_fn`` returns a non-floating value
        (e.g. an int: the trace would be an integer array, NaN padding included, so it is
        refused rather than cast; return ``jnp.asarray(value, float)``); ``max_iter`` is not
        an int (e.g. ``10.0``); ``tol`` is not a real number.
      ValueError: ``update_fns`` is empty; ``elbo_fn`` returns a non-scalar (shape other
        than ``[]``); ``max_iter`` < 1; a concrete ``tol`` < 0 or NaN.
    """
    update_fns = _check_driver_args(update_fns, elbo_fn, tol, max_iter)

    initial_elbo = jnp.asarray(elbo_fn(state, data))
    if initial_elbo.shape != ():
        raise ValueError(f"elbo_fn must return a scalar, got shape {initial_elbo.shape}")
    if not jnp.issubdtype(initial_elbo.dtype, jnp.floating):
        raise TypeError(f"elbo_fn must return a floating-point scalar ELBO, got dtype "
                        f"{initial_elbo.dtype}; return e.g. jnp.asarray(value, float)")
    _check_updates_keep_state_type(update_fns, state, data)

    def sweep_and_elbo(current):
        new_state = current
        for fn in update_fns:  # checked above
            new_state = fn(new_state, data)
        return new_state, elbo_fn(new_state, data)

    return cavi_loop(sweep_and_elbo, state, initial_elbo, tol=tol, max_iter=max_iter)


def cavi_loop(sweep_and_elbo_fn: Callable[[Any], tuple[Any, Array]], state: Any,
              initial_elbo: Array, *, tol: float | Array, max_iter: int
              ) -> tuple[Any, CAVIInfo]:
    """The loop of :func:`cavi` for a sweep that returns its own ELBO.

    ``sweep_and_elbo_fn(state) -> (state, [] ELBO)`` is one whole CAVI iteration (for models
    whose fused sweep yields the ELBO as a by-product, e.g. the Bayesian GMM's one-pass step);
    ``initial_elbo`` is the ELBO of ``state``. Same stopping rule, trace and
    :class:`CAVIInfo` as :func:`cavi`; unchecked (internal).
    """
    initial_elbo = jnp.asarray(initial_elbo)
    dtype = initial_elbo.dtype
    tol = jnp.asarray(tol, dtype)
    trace = jnp.full((max_iter,), jnp.nan, dtype)

    def cond_fn(carry):
        _, it, _, _, stop, _ = carry
        return (it < max_iter) & jnp.logical_not(stop)

    def body_fn(carry):
        current, it, previous_elbo, trace, _, _ = carry
        new_state, new_elbo = sweep_and_elbo_fn(current)
        new_elbo = jnp.asarray(new_elbo, dtype)
        trace = trace.at[it].set(new_elbo)
        change = jnp.abs(new_elbo - previous_elbo)
        converged = change <= tol * jnp.maximum(1.0, jnp.abs(new_elbo))
        stop = converged | jnp.isnan(new_elbo)
        return new_state, it + 1, new_elbo, trace, stop, converged

    carry = (state, jnp.int32(0), initial_elbo, trace, jnp.bool_(False), jnp.bool_(False))
    state, num_iter, _, trace, _, converged = lax.while_loop(cond_fn, body_fn, carry)
    return state, CAVIInfo(elbo=trace, initial_elbo=initial_elbo, num_iter=num_iter,
                           converged=converged)
