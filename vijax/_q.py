"""Private helpers shared by ``vijax.elbo`` and ``vijax.marginal``.

A variational family ``q`` is a distrax distribution, or a pytree (dict, tuple, list) whose
leaves are distrax distributions, read as a product of independent factors
q(z) = prod_j q_j(z_j). Every factor has the same batch shape ``[batch]``; one sample of ``q``
is then a pytree of arrays ``[batch, *event_shape_j]``.

This module also holds the checks of ``q`` and of estimators; the generic argument checks
(ints, reals, PRNG keys, callables) are in ``vijax._checks``.
"""

from __future__ import annotations

from typing import Any, Callable

import distrax
import jax
import jax.numpy as jnp
import numpy as np

from vijax._checks import check_callable, check_int, check_rng_key, is_concrete

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


def sample_keys(rng_key: Array, num_samples: int) -> Array:
    """The keys of ``num_samples`` independent draws, ``[num_samples]`` keys:
    ``jax.random.split(rng_key, num_samples)``, except for one sample, which uses ``rng_key``
    itself (``rng_key[None]``). Every Monte Carlo estimator of vijax draws sample k with the
    k-th of these keys; the one-sample case saves a hash per call (on the CPU a whole rolled
    threefry loop, about 5% of a small SVI step)."""
    if num_samples == 1:
        return rng_key[None]
    return jax.random.split(rng_key, num_samples)


def sample(rng_key: Array, q: PyTree) -> PyTree:
    """One reparameterized draw from ``q`` (a pytree shaped like ``q``)."""
    leaves, treedef, keys = _factor_keys(rng_key, q)
    # distrax samplers (e.g. Gamma's) broadcast [n, *batch] draws against [*batch] parameters
    # implicitly: allow that inside distrax only, as in sample_and_log_prob below.
    with jax.numpy_rank_promotion("allow"):
        draws = [d.sample(seed=k) for d, k in zip(leaves, keys)]
    return jax.tree_util.tree_unflatten(treedef, draws)


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


# --------------------------------------------------------------- score-function log density

_HALF_LOG_2PI = 0.5 * float(np.log(2.0 * np.pi))


@jax.custom_jvp
def _quotient(x: Array, y: Array) -> Array:
    """``x / y`` (same shapes) whose derivative in ``y`` stays finite for a tiny ``y``.

    JAX differentiates ``x / y`` in ``y`` as ``-x * y**-2``, and ``y**-2`` overflows to inf for
    ``|y| < 2**(minexp / 2)`` (1.1e-19 in float32) although the derivative ``-(x / y) / y`` is
    finite: that is the non-finite gradient of a Gaussian log density with respect to a scale
    of 1e-20. Inside a safe range of ``|y|`` the tangent is JAX's own expression (bit for bit
    the same gradient), outside it ``-(x / y) / y``."""
    return x / y


@_quotient.defjvp
def _quotient_jvp(primals, tangents):
    x, y = primals
    tx, ty = tangents
    out = x / y
    in_range = _scale_in_range(y)
    y_in = jnp.where(in_range, y, 1)  # keeps y**-2 finite where it is not selected
    t_y = jnp.where(in_range, (-ty * x) * jax.lax.integer_pow(y_in, -2), (-ty * out) / y)
    return out, tx / y + t_y


def _scale_in_range(scale: Array) -> Array:
    """Where ``scale`` is in the range in which JAX's own derivative of ``x / scale`` is finite
    (2**-59 < |scale| < 2**59 in float32), the range :func:`_quotient` leaves to JAX."""
    bound = 2.0 ** (jnp.finfo(scale.dtype).minexp // 2 + 4)
    return (jnp.abs(scale) > bound) & (jnp.abs(scale) < 1.0 / bound)


def _gaussian_pieces(dist: distrax.Distribution, z: Array):
    """For a Gaussian ``dist`` (``Normal``, ``MultivariateNormalDiag``, and these inside
    ``Independent``/``Transformed``): ``(stable, in_range, safe)``, with ``stable`` log dist(z)
    written with :func:`_quotient`, ``in_range`` whether every scale entered is in
    :func:`_scale_in_range` (both of ``dist``'s batch shape) and ``safe`` the same distribution
    with the out-of-range scales replaced by 1 (so distrax's gradient of it is finite
    everywhere, and is distrax's own where the scales are in range). ``None`` for any other
    family."""
    if isinstance(dist, distrax.MultivariateNormalDiag):  # before Transformed: it subclasses it
        loc, scale = dist.loc, dist.scale_diag
        ok = _scale_in_range(scale)
        u = _quotient(z - loc, scale)
        stable = (jnp.sum(-0.5 * jnp.square(u) - _HALF_LOG_2PI, axis=-1)
                  - jnp.sum(jnp.log(scale), axis=-1))
        return stable, jnp.all(ok, axis=-1), distrax.MultivariateNormalDiag(
            loc, jnp.where(ok, scale, 1))
    if isinstance(dist, distrax.Normal):
        loc, scale = dist.loc, dist.scale
        ok = _scale_in_range(scale)
        u = _quotient(z - loc, scale)
        stable = -0.5 * jnp.square(u) - (_HALF_LOG_2PI + jnp.log(scale))
        return stable, ok, distrax.Normal(loc, jnp.where(ok, scale, 1))
    if isinstance(dist, distrax.Independent):
        pieces = _gaussian_pieces(dist.distribution, z)
        n = dist.reinterpreted_batch_ndims
        if pieces is None:
            return None
        stable, ok, safe = pieces
        axes = tuple(range(-n, 0))
        return (jnp.sum(stable, axis=axes), jnp.all(ok, axis=axes),
                distrax.Independent(safe, reinterpreted_batch_ndims=n))
    if isinstance(dist, distrax.Transformed):
        x, ildj = dist.bijector.inverse_and_log_det(z)
        pieces = _gaussian_pieces(dist.distribution, x)
        if pieces is None:
            return None
        stable, ok, safe = pieces
        return stable + ildj, ok, distrax.Transformed(safe, dist.bijector)
    return None


def score_log_prob(q: PyTree, z: PyTree) -> Array:
    """log q(z) for the score-function term: z held fixed, differentiable in q's parameters.

    The value is distrax's ``log_prob`` (as :func:`log_prob`), and so is the gradient, except
    for a Gaussian factor (``Normal``, ``MultivariateNormalDiag``, also inside
    ``Independent``/``Transformed``) with a scale below 2**-59 (1.7e-18) in float32 (or above
    2**59): there JAX's derivative of distrax's ``(z - loc) / scale`` forms ``scale**-2``, which
    overflows, and the gradient is instead that of the same density written with
    :func:`_quotient`, d log q / d scale = (eps**2 - 1) / scale, finite down to the smallest
    scale accepted (``finfo.tiny``). Shape ``q``'s batch shape (nats)."""
    leaves, treedef = jax.tree_util.tree_flatten(q, is_leaf=_is_distribution)
    z_leaves = treedef.flatten_up_to(z)
    total = None
    for d, z_j in zip(leaves, z_leaves):
        with jax.numpy_rank_promotion("allow"):  # bijector log-dets broadcast as in distrax
            pieces = _gaussian_pieces(d, z_j)
            if pieces is None:
                term = d.log_prob(z_j)
            else:
                # the double-where trick: each branch is finite in value and gradient everywhere
                stable, in_range, safe = pieces
                stable = (jax.lax.stop_gradient(d.log_prob(z_j))
                          + (stable - jax.lax.stop_gradient(stable)))
                term = jnp.where(in_range, safe.log_prob(z_j), stable)
        total = term if total is None else total + term
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


def check_estimator_call(rng_key: Any, fn: Callable, fn_name: str,
                         num_samples: Any = None) -> int | None:
    """The checks every bound and estimator starts with: ``rng_key`` a PRNG key, ``fn`` (named
    ``fn_name``) callable, and ``num_samples`` (when not None) an int >= 1, returned as a
    Python int. TypeError / ValueError naming the argument."""
    check_rng_key(rng_key)
    check_callable(fn, fn_name)
    return None if num_samples is None else check_int(num_samples, "`num_samples`", minimum=1)


def check_finite(x: Any, name: str) -> None:
    """``ValueError`` naming ``name`` if a concrete array holds NaN or inf (tracers pass)."""
    if x is None or not is_concrete(x):
        return
    arr = np.asarray(x)
    # jnp.issubdtype: bfloat16 (an ml_dtypes type) is not a NumPy inexact type
    if jnp.issubdtype(arr.dtype, jnp.inexact) and not np.all(np.isfinite(arr)):
        raise ValueError(f"`{name}` contains non-finite values (NaN or inf)")


def _gaussian_parameters(dist: distrax.Distribution) -> tuple[list[tuple[str, Any]],
                                                              list[tuple[str, Any]]]:
    """``(locations, scales)`` of a Gaussian ``dist``, each a list of ``(attribute, array)``:
    ``loc`` and ``scale_diag`` of a ``MultivariateNormalDiag``, ``loc`` and ``scale`` of a
    ``Normal``, looked up through ``Independent`` and ``Transformed`` wrappers. The scales must
    be positive (distrax itself silently uses |scale|); ``MultivariateNormalTri``'s ``loc`` and
    ``scale_tri`` are returned as locations only (its sign conventions differ). Other families
    are not inspected."""
    if isinstance(dist, distrax.MultivariateNormalDiag):  # before Transformed: it subclasses it
        return [("loc", dist.loc)], [("scale_diag", dist.scale_diag)]
    if isinstance(dist, distrax.MultivariateNormalTri):
        return [("loc", dist.loc), ("scale_tri", dist.scale_tri)], []
    if isinstance(dist, distrax.Normal):
        return [("loc", dist.loc)], [("scale", dist.scale)]
    if isinstance(dist, (distrax.Independent, distrax.Transformed)):
        return _gaussian_parameters(dist.distribution)
    return [], []


def smallest_scale(dtype: Any) -> float:
    """The smallest scale accepted in ``dtype``: its smallest positive normal number
    (``jnp.finfo(dtype).tiny``: 1.2e-38 in float32, 2.2e-308 in float64). A smaller positive
    (denormal) scale is flushed to zero by XLA on CPU, so log q would be infinite."""
    return float(jnp.finfo(dtype).tiny)


def check_scale_values(scale: Any, message: str) -> None:
    """``ValueError`` unless every entry of a concrete floating ``scale`` is at least
    :func:`smallest_scale` of its dtype (so > 0 and not denormal); NaN entries are left to the
    finiteness checks, tracers pass. ``message`` starts the error (it names the argument); the
    rule and the offending minimum are appended."""
    if scale is None or not is_concrete(scale):
        return
    arr = np.asarray(scale)
    tiny = smallest_scale(arr.dtype)
    if np.any(arr < tiny):  # NaN compares False: left to the finiteness check
        raise ValueError(
            f"{message} has entries below {tiny:.4g}, the smallest normal "
            f"{jnp.dtype(arr.dtype).name} number (minimum {float(np.nanmin(arr))!r}): scales "
            "must be positive, and not denormal (XLA flushes those to zero on CPU)")


def _check_floating_parameter(value: Any, name: str, attr: str) -> None:
    dtype = getattr(value, "dtype", None)
    if dtype is not None and not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"`{name}` must have floating-point parameters: its `{attr}` has dtype "
                        f"{dtype} (build it from float arrays, e.g. x.astype(jnp.float32))")


def check_parameters(q: PyTree, name: str = "q") -> None:
    """Check the parameters of a distribution (pytree) argument ``q`` named ``name``: the one
    check of every distribution argument (``q``, ``prior``, ``base``).

    ``TypeError`` naming ``name`` and the attribute if a Gaussian location or scale (see
    ``_gaussian_parameters``) has a non-floating dtype (bool, int); ``ValueError`` naming
    ``name`` unless every concrete Gaussian scale is at least the smallest normal number of
    its dtype (:func:`smallest_scale`, so positive and not denormal) and every concrete
    parameter leaf is finite. Tracers have only their dtype checked. The scale check comes
    before the finiteness check, since a zero scale also makes derived leaves infinite."""
    dists = factors(q, name)
    for dist in dists:
        locs, scales = _gaussian_parameters(dist)
        for attr, value in locs + scales:
            _check_floating_parameter(value, name, attr)
    for dist in dists:
        for attr, scale in _gaussian_parameters(dist)[1]:
            check_scale_values(scale, f"`{name}` must have a positive scale: its `{attr}`")
    for leaf in jax.tree_util.tree_leaves(q):
        check_finite(leaf, f"{name} (its loc/scale parameters)")


def check_q(q: PyTree, name: str = "q") -> tuple[int, ...]:
    """Validate a variational family; returns its batch shape."""
    shape = batch_shape(q, name)
    check_parameters(q, name)
    return shape


def is_real(x: Any) -> bool:
    """Whether ``x`` is a real number (Python/NumPy int or float, not bool) or an array (NumPy,
    JAX, tracer) of integer or floating dtype."""
    if isinstance(x, (bool, np.bool_)):
        return False
    if isinstance(x, (int, float, np.integer, np.floating)):
        return True
    if not isinstance(x, (np.ndarray, jax.Array)):
        return False
    dtype_ok = (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)
                or jnp.issubdtype(x.dtype, jnp.floating))  # bfloat16 is not a NumPy float
    return dtype_ok


def _event_shape_hint(q: PyTree, name: str, out_shape: tuple[int, ...]) -> str:
    """A sentence on ``q``'s event and batch shapes, for a log density of the wrong shape."""
    dists = factors(q, name)
    events = [tuple(d.event_shape) for d in dists]
    batch = tuple(dists[0].batch_shape)
    what = f"event shape {events[0]}" if len(events) == 1 else f"factor event shapes {events}"
    hint = f" `{name}` has {what} and batch shape {batch}"
    if any(e == () for e in events) and len(out_shape) < len(batch):
        hint += (f": a scalar-event `{name}` is a 1-D latent per batch entry; for a "
                 f"{batch[-1]}-D latent use distrax.MultivariateNormalDiag or "
                 "distrax.Independent(..., reinterpreted_batch_ndims=1)")
    return hint + "."


def call_log_density(
    fn: Callable,
    z: PyTree,
    expected_shape: tuple[int, ...] | None,
    name: str,
    q: PyTree | None = None,
    q_name: str = "q",
) -> Array:
    """``fn(z)``, checked to have shape ``expected_shape`` (a static check at trace time).

    ``expected_shape`` is ``q_name``'s batch shape; ``None`` skips the check. ``q``, when
    given, adds its event and batch shapes to the message.
    """
    out = fn(z)
    shape = tuple(getattr(out, "shape", ()))
    if expected_shape is not None and shape != tuple(expected_shape):
        hint = "" if q is None else _event_shape_hint(q, q_name, shape)
        raise ValueError(
            f"`{name}` must return one log density per example, shape {tuple(expected_shape)} "
            f"({q_name}'s batch shape); got shape {shape}.{hint}"
        )
    return out


def check_estimator(estimator: Any, allowed: tuple[type, ...], function: str) -> None:
    if not isinstance(estimator, allowed):
        names = ", ".join(cls.__name__ + "()" for cls in allowed)
        raise TypeError(f"`estimator` for {function} must be one of {names}; got {estimator!r}")
