"""Private machinery of :mod:`vijax.elbo`: the surrogate-loss pieces the estimators share
(values in the forward pass, chosen gradients in the backward pass), the log-mean-exp of the
importance-weighted bounds, the support of a small discrete q for ``Enumerate()``, and REBAR's
per-family draws, relaxations and single-sample assembly (Tucker et al. 2017, §3 and appendix).
Nothing here is public API."""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from vijax import _q
from vijax._checks import check_callable

Array = jax.Array
PyTree = Any


def _surrogate(value: Array, surrogate: Array) -> Array:
    """``value`` in the forward pass, the gradient of ``surrogate`` (only) in the backward pass.

    ``surrogate - stop_gradient(surrogate)`` is exactly zero where ``surrogate`` is finite, so the
    value is bit-identical; where it is not (inf - inf = NaN, e.g. from a -inf log weight) the
    entry is ``value`` itself and passes no gradient.
    """
    out = jax.lax.stop_gradient(value) + (surrogate - jax.lax.stop_gradient(surrogate))
    return jnp.where(jnp.isfinite(surrogate), out, jax.lax.stop_gradient(value))


def _constant_baseline(baseline: Any, shape: tuple[int, ...], dtype: Any) -> Array:
    """The baseline as ``dtype``, broadcast explicitly to the batch shape ``shape`` (0 if ``None``)."""
    if baseline is None:
        return jnp.zeros(shape, dtype)
    b = jnp.asarray(baseline, dtype)
    try:
        broadcastable = np.broadcast_shapes(b.shape, shape) == tuple(shape)
    except ValueError:
        broadcastable = False
    if not broadcastable:
        raise ValueError(
            f"`estimator.baseline` must be a scalar or broadcastable to the batch shape {shape}; "
            f"got shape {tuple(b.shape)}"
        )
    return jax.lax.stop_gradient(jnp.broadcast_to(b, shape))


def _score_term(signal: Array, log_q: Array) -> Array:
    """sum over samples of stop_gradient(signal_s) * (log q_s - stop_gradient(log q_s)):
    zero in value, gradient sum_s signal_s grad log q(z_s). Shapes ``[S, batch]`` -> ``[batch]``.

    A non-finite signal (from a -inf or NaN value, whose example ``_surrogate`` then gives no
    gradient) is replaced by 0: its zero cotangent times an infinite signal would be NaN."""
    signal = jax.lax.stop_gradient(signal)
    signal = jnp.where(jnp.isfinite(signal), signal, 0)
    return jnp.sum(signal * (log_q - jax.lax.stop_gradient(log_q)), axis=0)


def _leave_one_out_mean(values: Array) -> Array:
    """For ``values: [S, batch]``, the mean over the other samples' finite values, ``[S, batch]``
    (0 where no other value is finite). Skipping non-finite values (a -inf log weight) keeps the
    baseline finite; it still never depends on the sample it is subtracted from."""
    finite = jnp.isfinite(values)
    v = jnp.where(finite, values, 0)
    count = jnp.sum(finite, axis=0, keepdims=True) - finite
    mean = (jnp.sum(v, axis=0, keepdims=True) - v) / jnp.maximum(count, 1)
    return jnp.where(count > 0, mean, 0)


def _draw(rng_key: Array, q: PyTree, *, stop_sample: bool) -> tuple[PyTree, Array]:
    """z ~ q and log q(z) ``[*batch]`` from one forward pass (``_q.sample_and_log_prob``)."""
    z, log_q = _q.sample_and_log_prob(rng_key, q)
    return jax.lax.stop_gradient((z, log_q)) if stop_sample else (z, log_q)


def _weighted_sum(weights: Array, x: Array) -> Array:
    """sum_k weights_k * x_k over axis 0, with zero-weight terms dropped (0 * -inf is not NaN,
    in the value or in the gradient: x is replaced by 0 before the product where weight = 0)."""
    keep = weights != 0
    return jnp.sum(jnp.where(keep, weights * jnp.where(keep, x, 0), 0), axis=0)


def _log_q_fixed_parameters(q: PyTree, z: PyTree, log_q: Array, batch_ndim: int) -> Array:
    """log q(z) with q's parameters held fixed and z left differentiable (value ``log_q``).

    Built as the first-order surrogate sg(log q(z)) + <sg(grad_z log q(z)), z - sg(z)>, whose
    gradient is the path derivative d log q / dz dz/dphi only. (``tree_map(stop_gradient, q)``
    would not do: distrax keeps derived arrays outside its pytree leaves.) First-order only:
    do not take Hessians through it.
    """
    return jax.lax.stop_gradient(log_q) + _path_term(_grad_z_log_q(q, z), z, batch_ndim)


def _grad_z_log_q(q: PyTree, z: PyTree) -> PyTree:
    """d log q(z) / dz at a fixed z (a pytree like ``z``)."""
    return jax.grad(lambda z_: jnp.sum(_q.log_prob(q, z_)))(jax.lax.stop_gradient(z))


def _path_term(grad_z: PyTree, z: PyTree, batch_ndim: int) -> Array:
    """<stop_gradient(grad_z), z - stop_gradient(z)> per example: zero in value, gradient
    grad_z . dz/dphi. Shape ``[*batch]``."""
    return _q.tree_vdot(
        jax.lax.stop_gradient(grad_z),
        jax.tree_util.tree_map(lambda a: a - jax.lax.stop_gradient(a), z),
        batch_ndim=batch_ndim,
    )


def _weighted_path_term(grad_z: PyTree, z: PyTree, weights: Array) -> Array:
    """``_path_term`` of K particles, ``[K, *batch]``, with ``grad_z`` set to 0 in the particles
    of zero weight (``weights: [K, *batch]``): those get a zero cotangent, and 0 times a
    non-finite d log p / dz (a log weight at or near -inf) would be NaN in the gradient."""
    keep = weights != 0

    def mask(g):
        return jnp.where(keep.reshape(keep.shape + (1,) * (g.ndim - keep.ndim)), g, 0)

    return _path_term(jax.tree_util.tree_map(mask, grad_z), z, keep.ndim)


def _log_mean_exp(log_w: Array) -> Array:
    """log (1/S) sum_s exp(log_w_s) over axis 0, stable; ``[S, batch] -> [batch]``.

    A column of -inf only gives -inf with a zero gradient (logsumexp's own gradient there is
    0 / 0 = NaN): it is evaluated at 0 instead, and -inf put back (the double-where trick)."""
    empty = jnp.all(log_w == -jnp.inf, axis=0)
    safe = jnp.where(empty[None], 0, log_w)
    out = jax.nn.logsumexp(safe, axis=0) - math.log(log_w.shape[0])
    return jnp.where(empty, -jnp.inf, out)


class _RebarFamily(NamedTuple):
    """The parts of REBAR that depend on q's family, Bernoulli bits or one-hot categoricals
    (``_rebar_sample`` assembles the estimator from them, the same for both). Shapes: ``theta``
    and the draws are ``[*batch, *cells]`` for bits, ``[*batch, *cells, K]`` for categoricals;
    a "cell" is one bit or one categorical variable."""

    params: Callable  # inner distribution -> {"logits": theta, ...}, the arrays the draw reads
    draw: Callable  # (key, params, b dtype) -> (hard, noise, b): b ~ q exactly, z = theta + noise
    conditional: Callable  # (key, theta, hard) -> z~ ~ p(z | b), differentiable in theta
    relax: Callable  # (z, lam) -> sigma_lam(z), the relaxed point
    log_mass: Callable  # (x, theta) -> q's log-mass formula at a real x, ``[*batch, *cells]``


def _bernoulli_params(dist: Any) -> dict:
    return {"logits": dist.logits, "probs": dist.probs}


def _bernoulli_draw(key, params, b_dtype):
    # distrax's own draw: b = 1 iff w < sigmoid(theta), w ~ U[0, 1) (so the value is
    # ScoreFunction's); u = 1 - w in the paper's notation, z = theta + log u - log(1 - u)
    probs = params["probs"]
    w = jax.random.uniform(key, (1,) + probs.shape, probs.dtype)[0]
    hard = jnp.less(w, probs)
    noise = jnp.log1p(-w) - jnp.log(jnp.maximum(w, jnp.finfo(probs.dtype).tiny))
    return hard, noise, hard.astype(b_dtype)


def _bernoulli_conditional(key, theta, hard):
    v = jax.random.uniform(key, theta.shape, theta.dtype)
    logit_v = jnp.log(jnp.maximum(v, jnp.finfo(theta.dtype).tiny)) - jnp.log1p(-v)
    return jnp.where(hard, jax.nn.softplus(logit_v + jax.nn.softplus(theta)),
                     -jax.nn.softplus(jax.nn.softplus(-theta) - logit_v))


def _bernoulli_relax(z, lam):
    return jax.nn.sigmoid(z / lam)


def _bernoulli_log_mass(x, theta):
    # x log sigmoid(theta) + (1 - x) log sigmoid(-theta)
    return -x * jax.nn.softplus(-theta) - (1 - x) * jax.nn.softplus(theta)


def _categorical_params(dist: Any) -> dict:
    return {"logits": dist.logits}  # distrax normalises them: log-softmax, the log-probabilities


def _categorical_draw(key, params, b_dtype):
    # distrax's own draw (jax.random.categorical): the Gumbel-max trick with the Gumbel noise of
    # the key, argmax over the class axis of gumbel + theta
    logits = params["logits"]
    gumbel = jax.random.gumbel(key, (1,) + logits.shape, logits.dtype)[0]
    hard = jnp.argmax(gumbel + logits, axis=-1)  # [*batch, *cells], the class index
    return hard, gumbel, jax.nn.one_hot(hard, logits.shape[-1]).astype(b_dtype)


def _categorical_conditional(key, theta, hard):
    # with e = log(-log v): z~_b = -e_b, z~_i = -log(exp(e_i - theta_i) + exp(e_b)) (i != b)
    v = jax.random.uniform(key, theta.shape, theta.dtype, minval=jnp.finfo(theta.dtype).tiny,
                           maxval=1.0)
    e = jnp.log(-jnp.log(v))
    e_b = jnp.take_along_axis(e, hard[..., None], axis=-1)
    is_b = jax.nn.one_hot(hard, theta.shape[-1], dtype=bool)
    return jnp.where(is_b, -e_b, -jnp.logaddexp(e - theta, e_b))


def _categorical_relax(z, lam):
    return jax.nn.softmax(z / lam, axis=-1)


def _categorical_log_mass(x, theta):
    return jnp.sum(x * theta, axis=-1)  # sum_k x_k log q_k


_REBAR_BERNOULLI = _RebarFamily(_bernoulli_params, _bernoulli_draw, _bernoulli_conditional,
                                _bernoulli_relax, _bernoulli_log_mass)


_REBAR_CATEGORICAL = _RebarFamily(_categorical_params, _categorical_draw,
                                  _categorical_conditional, _categorical_relax,
                                  _categorical_log_mass)


def _rebar_family(q: Any, what: str) -> tuple[_RebarFamily, Any]:
    """REBAR's family for ``q`` and the ``distrax.Bernoulli`` or ``OneHotCategorical`` inside it;
    TypeError naming ``q`` and ``what`` (e.g. the estimator) for any other ``q``."""
    import distrax  # local, as in _support

    factors = _q.factors(q)
    if len(factors) == 1 and factors[0] is q:
        inner = q.distribution if isinstance(q, distrax.Independent) else q
        if isinstance(inner, distrax.Bernoulli):
            return _REBAR_BERNOULLI, inner
        if isinstance(inner, distrax.OneHotCategorical):
            return _REBAR_CATEGORICAL, inner
    raise TypeError(
        f"{what} needs `q` to be a single distrax.Bernoulli or distrax.OneHotCategorical, or "
        "distrax.Independent(...) of one of them (for index-valued categoricals use "
        f"OneHotCategorical); got `q` of type {type(q).__name__}")


def _rebar_sample(key, log_joint_fn, q, q_fixed, shape, family, inner, inner_fixed, lam, eta):
    """One sample of REBAR (see ``REBAR``): ``(value, surrogate)``, each ``[batch]``.

    ``value`` is f(b) = log p(x, b) - log q(b) at the hard draw b; the gradient of ``surrogate``
    w.r.t. q's parameters is REBAR's single-sample estimate
    [f(b) - eta f(sigma_lam(z~))] grad log q(b) + eta grad f(sigma_lam(z)) - eta grad
    f(sigma_lam(z~)), and its gradient w.r.t. the parameters of ``log_joint_fn`` is
    grad log p(x, b).

    Everything held fixed in that gradient (the learning signal, the points at which
    ``log_joint_fn`` and its input gradient are evaluated, b) is computed from ``inner_fixed``
    (the parameters of ``q_fixed``). With ``q_fixed = None`` (``elbo``) these are q's own
    parameters under ``stop_gradient``; otherwise ``q_fixed`` is q at the same parameter values
    built separately (``rebar_gradient_variance``), and nothing is stopped, so the gradient
    estimate stays differentiable in ``lam`` and ``eta`` (traced scalars there): its derivative
    in ``lam`` reaches ``log_joint_fn``'s second derivatives in x.
    """
    stopped = q_fixed is None
    stop = jax.lax.stop_gradient if stopped else (lambda a: a)
    batch_ndim = len(shape)
    # the dtype of q's own draws (e.g. distrax.Bernoulli(dtype=...)), without drawing
    b_dtype = jax.eval_shape(lambda: _q.sample(jax.random.key(0), q)).dtype
    params = family.params(inner)
    params_fixed = (jax.tree_util.tree_map(jax.lax.stop_gradient, params) if stopped
                    else family.params(inner_fixed))
    theta, theta_fixed = params["logits"], params_fixed["logits"]

    def event_sum(a):  # [*batch, ...] -> [batch]
        return jnp.sum(a, axis=tuple(range(batch_ndim, a.ndim)))

    def relaxed_f(z, z_fixed):
        """(f(sigma_lam(z)) with its gradient reaching log_joint_fn through x only, the value
        of f at the fixed point sigma_lam(z_fixed)): log p is replaced by its first-order
        expansion about the fixed point (equal in value)."""
        x, x_fixed = family.relax(z, lam), family.relax(z_fixed, lam)
        log_p, pullback = jax.vjp(
            lambda x_: _q.call_log_density(log_joint_fn, x_, shape, "log_joint_fn", q), x_fixed)
        (grad_x,) = pullback(jnp.ones_like(log_p))
        log_p_path = stop(log_p) + event_sum(stop(grad_x) * (x - x_fixed))
        f_fixed = log_p - event_sum(family.log_mass(x_fixed, theta_fixed))
        return log_p_path - event_sum(family.log_mass(x, theta)), f_fixed

    hard, noise, b = family.draw(key, params_fixed, b_dtype)
    key_v = jax.random.fold_in(key, 1)
    z, z_fixed = theta + noise, theta_fixed + noise
    z_tilde = family.conditional(key_v, theta, hard)
    z_tilde_fixed = family.conditional(key_v, theta_fixed, hard)
    log_p = _q.call_log_density(log_joint_fn, b, shape, "log_joint_fn", q)
    log_q = q.log_prob(b)  # differentiable in theta at the fixed b
    log_q_fixed = stop(log_q) if stopped else q_fixed.log_prob(b)
    value = log_p - log_q_fixed
    f_z, _ = relaxed_f(z, z_fixed)
    f_z_tilde, f_z_tilde_fixed = relaxed_f(z_tilde, z_tilde_fixed)
    signal = stop(value - eta * f_z_tilde_fixed)
    # a non-finite signal (a -inf or NaN value, whose example _surrogate then gives no gradient)
    # is replaced by 0: its zero cotangent times an infinite signal would be NaN
    signal = jnp.where(jnp.isfinite(signal), signal, 0)
    path = log_p + eta * (f_z - f_z_tilde)  # log_p: the gradient of log_joint_fn's params
    return value, path + signal * (log_q - log_q_fixed)


def _rebar_variance(rng_key, log_joint_fn, q_fn, params, q_fixed, shape, family, inner_fixed,
                    temperature, eta, num_samples) -> Array:
    """``rebar_gradient_variance`` after its checks (``q_fixed = q_fn(params)``, already built)."""

    def squared_norm(key):
        def total(p):
            q = q_fn(p)
            inner = _rebar_family(q, "REBAR (with `q = q_fn(params)`)")[1]
            _, surrogate = _rebar_sample(key, log_joint_fn, q, q_fixed, shape, family, inner,
                                         inner_fixed, temperature, eta)
            return jnp.sum(surrogate)

        grad = jax.grad(total)(params)
        return sum(jnp.sum(jnp.square(g)) for g in jax.tree_util.tree_leaves(grad))

    return jnp.mean(jax.vmap(squared_norm)(_q.sample_keys(rng_key, num_samples)))


def _check_rebar_variance_call(rng_key, log_joint_fn, q_fn, params, num_samples):
    """The checks of ``rebar_gradient_variance`` and ``tune_rebar``; returns
    ``(num_samples, q_fn(params), its batch shape, REBAR's family, its inner distribution)``."""
    num_samples = _q.check_estimator_call(rng_key, log_joint_fn, "log_joint_fn", num_samples)
    check_callable(q_fn, "`q_fn`")
    leaves = jax.tree_util.tree_leaves(params)
    if not leaves or not all(
            isinstance(g, (float, np.floating, np.ndarray, jax.Array))
            and jnp.issubdtype(jnp.result_type(g), jnp.floating) for g in leaves):
        raise TypeError("`params` must be a pytree of floating-point arrays (the parameters of "
                        f"q = q_fn(params)); got {type(params).__name__}")
    q_fixed = q_fn(params)
    shape = _q.check_q(q_fixed, "q_fn(params)")
    family, inner_fixed = _rebar_family(q_fixed, "REBAR (with `q = q_fn(params)`)")
    return num_samples, q_fixed, shape, family, inner_fixed


def _support(q: Any, max_support: int) -> Array:
    """The support of a small discrete ``q`` as an array ``[M, *batch, *event]`` (every point
    broadcast to the batch shape). TypeError for an unsupported ``q``, ValueError if M is
    larger than ``max_support``."""
    import distrax  # local: only the enumerating path needs the classes

    batch = tuple(q.batch_shape)
    if isinstance(q, (distrax.Categorical, distrax.OneHotCategorical)):
        k = int(q.num_categories)
        if k > max_support:
            raise ValueError(f"`q` has {k} categories, more than `estimator.max_support` = "
                             f"{max_support}")
        if isinstance(q, distrax.OneHotCategorical):
            points = jnp.eye(k, dtype=q.dtype)
            return jnp.broadcast_to(points.reshape((k,) + (1,) * len(batch) + (k,)),
                                    (k,) + batch + (k,))
        points = jnp.arange(k, dtype=q.dtype)
        return jnp.broadcast_to(points.reshape((k,) + (1,) * len(batch)), (k,) + batch)
    if isinstance(q, distrax.Bernoulli):
        if max_support < 2:
            raise ValueError(f"`q` has 2 outcomes, more than `estimator.max_support` = "
                             f"{max_support}")
        return jnp.broadcast_to(jnp.array([0, 1], q.dtype).reshape((2,) + (1,) * len(batch)),
                                (2,) + batch)
    if (isinstance(q, distrax.Independent) and isinstance(q.distribution, distrax.Bernoulli)
            and len(q.event_shape) == 1):
        d = int(q.event_shape[0])
        if d > 60 or 2**d > max_support:
            raise ValueError(f"`q` has 2^{d} configurations, more than `estimator.max_support` "
                             f"= {max_support}")
        bits = (np.arange(2**d)[:, None] >> np.arange(d)[None, :]) & 1  # [2^d, d]
        points = jnp.asarray(bits, q.dtype)
        return jnp.broadcast_to(points.reshape((2**d,) + (1,) * len(batch) + (d,)),
                                (2**d,) + batch + (d,))
    raise TypeError(
        "`estimator` Enumerate() needs a discrete `q`: distrax.Categorical, OneHotCategorical, "
        f"Bernoulli or Independent(Bernoulli, 1); got {type(q).__name__}")


def _enumerated_elbo(log_joint_fn, q, shape, num_samples, estimator) -> Array:
    """sum_z q(z) [log p(x, z) - log q(z)] over the support of ``q``, ``[batch]`` (nats)."""
    if num_samples != 1:
        raise ValueError("`estimator` Enumerate() computes the expectation exactly: use "
                         f"`num_samples` = 1, got {num_samples}")
    factors = _q.factors(q)
    if len(factors) != 1 or factors[0] is not q:
        raise TypeError("`estimator` Enumerate() takes a single discrete distribution as `q`, "
                        "not a pytree of factors")
    with jax.numpy_rank_promotion("allow"):  # distrax's dtype property traces a sample
        points = _support(q, estimator.max_support)

    def term(z):
        log_p = _q.call_log_density(log_joint_fn, z, shape, "log_joint_fn", q)
        return log_p, q.log_prob(z)

    log_p, log_q = jax.vmap(term)(points)  # [M, batch]
    return _weighted_sum(jnp.exp(log_q), log_p - log_q)


def _rebar_elbo(rng_key, log_joint_fn, q, shape, num_samples, estimator) -> Array:
    """The ELBO of hard draws with REBAR's gradient (see ``REBAR``), ``[batch]``."""
    family, inner = _rebar_family(q, f"`estimator` {estimator!r}")
    lam, eta = estimator.temperature, estimator.eta  # Python floats or JAX scalars

    def one_sample(key):
        return _rebar_sample(key, log_joint_fn, q, None, shape, family, inner, None, lam, eta)

    keys = _q.sample_keys(rng_key, num_samples)
    values, surrogates = jax.vmap(one_sample)(keys)  # each [S, batch]
    return _surrogate(jnp.mean(values, axis=0), jnp.mean(surrogates, axis=0))
