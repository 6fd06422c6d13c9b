"""Variational families: parameterised distributions q_phi(z) for stochastic VI.

A family is a small immutable object with two pure functions:

* ``init(rng_key) -> params``: the initial variational parameters phi, a pytree of arrays in
  *unconstrained* space (a scale is stored through the inverse softplus, so any real value is
  a valid parameter and plain gradient steps never leave the family);
* ``distribution(params) -> distrax.Distribution``: q_phi, whose batch shape is the family's
  ``batch_shape`` (``()`` for one global latent, ``(N,)`` for one local latent per data point)
  and whose samples are reparameterized (pathwise gradients flow through them).

A pytree (dict, tuple, list) of families is the product of independent factors
q(z) = prod_j q_j(z_j), as ``vijax.elbo`` reads a pytree of distributions: ``init_params``
and ``distribution`` below map over it.

Families here: ``MeanFieldNormal`` (diagonal Gaussian), ``FullRankNormal`` (Cholesky
factor), ``LowRankNormal`` (diagonal plus low rank), ``SplineFlow`` (rational-quadratic
spline coupling flow on a Gaussian base), ``Custom`` (any distrax distribution you
parameterise) and ``Constrained`` (a family pushed onto a constrained support by a bijector,
e.g. ``positive()`` or ``unit_interval()``; log q includes the log-det Jacobian, so a
``log_joint_fn`` always receives values in the model's support).

Sources: lecture 3 ("Variational lower bound", "Mean field approximation"); Blei, Kucukelbir &
McAuliffe 2017 ("Variational Inference: A Review for Statisticians", §4 mean-field
family); Kucukelbir et al. 2017 (ADVI: transforming constrained latents to the real line, §2.3);
Durkan, Bekasov, Murray & Papamakarios 2019 ("Neural Spline Flows", eqs. 4-6 and the coupling
transform of §3.1).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import distrax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vijax._checks import check_callable, check_int, check_real, check_rng_key

Array = jax.Array
PyTree = Any

__all__ = [
    "MeanFieldNormal",
    "FullRankNormal",
    "LowRankNormal",
    "SplineFlow",
    "Custom",
    "Constrained",
    "positive",
    "unit_interval",
    "is_family",
    "init_params",
    "distribution",
]


# ------------------------------------------------------------------ shared pieces


def _inverse_softplus(y: float) -> float:
    """x with softplus(x) = y for y > 0 (stable for large y)."""
    return float(y + np.log(-np.expm1(-y)))


def _scale(raw: Array) -> Array:
    """The positive scale softplus(raw) (nats-free; same dtype as ``raw``)."""
    return jax.nn.softplus(raw)


def _shape_tuple(value: Any, name: str) -> tuple[int, ...]:
    """``value`` (an int or a sequence of ints >= 1) as a tuple; TypeError/ValueError naming it."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        value = (value,)
    if not isinstance(value, (tuple, list)):
        raise TypeError(f"`{name}` must be a tuple of ints (or an int), got "
                        f"{type(value).__name__} {value!r}")
    return tuple(check_int(v, f"`{name}` entries", minimum=1) for v in value)


def _check_init_scale(init_scale: Any) -> float:
    return check_real(init_scale, "`init_scale`", exclusive_minimum=0.0)


def _float_dtype():
    return jnp.result_type(float)  # float32, or float64 under jax_enable_x64


def _init_loc(init_loc: Any, shape: tuple[int, ...], dtype) -> Array:
    loc = jnp.asarray(init_loc, dtype)
    try:
        return jnp.broadcast_to(loc, shape)
    except ValueError:
        raise ValueError(f"`init_loc` of shape {tuple(loc.shape)} does not broadcast to the "
                         f"family's parameter shape {shape}") from None


# ------------------------------------------------------------------ Gaussian families


@dataclasses.dataclass(frozen=True)
class MeanFieldNormal:
    """Diagonal Gaussian q(z) = prod_i N(z_i | loc_i, scale_i^2), scale = softplus(raw_scale).

    The mean-field family (lecture 3, "Mean field approximation"; ADVI's mean-field Gaussian,
    Kucukelbir et al. 2017, eq. 8). Its optimum for a Gaussian target N(m, Lambda^{-1}) is
    N(m, diag(1 / Lambda_ii)) (PRML §10.1.2, eq. 10.13).

    Attributes:
      event_shape: the latent's shape, e.g. ``(latent_dim,)`` (an int is read as ``(int,)``;
        ``()`` is a scalar latent).
      batch_shape: ``()`` for a global latent, ``(N,)`` for one independent latent per data
        point (local parameters).
      init_scale: the initial scale (> 0), 0.1 by default as in NumPyro's ``AutoNormal``.
      init_loc: the initial mean, a number or an array broadcastable to
        ``batch_shape + event_shape``.

    Params: ``{"loc": [*batch, *event], "raw_scale": [*batch, *event]}``, float32 (float64
    under ``jax_enable_x64``). ``distribution`` gives ``distrax.MultivariateNormalDiag`` for a
    1-D event, ``distrax.Normal`` for a scalar event, ``distrax.Independent(Normal)`` otherwise.

    Raises:
      TypeError / ValueError: a shape that is not a tuple of positive ints; ``init_scale`` not
        a finite number > 0; ``init_loc`` that does not broadcast.
    """

    event_shape: Any
    batch_shape: Any = ()
    init_scale: float = 0.1
    init_loc: Any = 0.0

    def __post_init__(self):
        object.__setattr__(self, "event_shape", _shape_tuple(self.event_shape, "event_shape"))
        object.__setattr__(self, "batch_shape", _shape_tuple(self.batch_shape, "batch_shape"))
        object.__setattr__(self, "init_scale", _check_init_scale(self.init_scale))
        _init_loc(self.init_loc, self.batch_shape + self.event_shape, np.float32)

    def init(self, rng_key: Array) -> dict:
        check_rng_key(rng_key)
        shape, dtype = self.batch_shape + self.event_shape, _float_dtype()
        return {"loc": _init_loc(self.init_loc, shape, dtype),
                "raw_scale": jnp.full(shape, _inverse_softplus(self.init_scale), dtype)}

    def distribution(self, params: dict) -> distrax.Distribution:
        loc, scale = params["loc"], _scale(params["raw_scale"])
        if len(self.event_shape) == 1:
            return distrax.MultivariateNormalDiag(loc, scale)
        if not self.event_shape:
            return distrax.Normal(loc, scale)
        return distrax.Independent(distrax.Normal(loc, scale),
                                   reinterpreted_batch_ndims=len(self.event_shape))


def _lower_triangular(off_diagonal: Array, raw_diagonal: Array) -> Array:
    """L = diag(s) (I + strict_lower(off_diagonal)), s = softplus(raw_diagonal): a unit lower
    triangular factor with its rows scaled, ``[*batch, d, d]`` (NumPyro's
    ``scaled_unit_lower_cholesky``). An off-diagonal entry moves L_ij by s_i times its own step,
    so an optimiser's steps on the correlations shrink with the posterior scale."""
    d = raw_diagonal.shape[-1]
    eye = jnp.eye(d, dtype=raw_diagonal.dtype).reshape((1,) * (raw_diagonal.ndim - 1) + (d, d))
    return _scale(raw_diagonal)[..., :, None] * (jnp.tril(off_diagonal, k=-1) + eye)


@dataclasses.dataclass(frozen=True)
class FullRankNormal:
    """Gaussian with a full covariance Sigma = L L^T, L lower triangular with positive diagonal.

    Attributes:
      dim: the latent dimension d (event shape ``(d,)``).
      batch_shape: ``()`` (global) or ``(N,)`` (one latent per data point).
      init_scale: initial L = init_scale * I (> 0).
      init_loc: the initial mean (number or array broadcastable to ``[*batch, d]``).

    Params: ``{"loc": [*batch, d], "raw_diag": [*batch, d], "off_diag": [*batch, d, d]}``
    with L = diag(s) (I + M), s = softplus(raw_diag) and M the strict lower triangle of
    ``off_diag`` (the upper triangle and diagonal of ``off_diag`` are ignored): L_ii = s_i and
    L_ij = s_i M_ij. Scaling the rows keeps Adam's fixed-size steps on M proportional to the
    posterior scale; with L's entries as free parameters the stationary jitter of the
    off-diagonal entries swamps a small posterior scale (on a 100-dimensional logistic
    regression with N = 100,000, 5,000 Adam steps at 1e-3 ended about 3,000 nats lower). To
    start from a given Cholesky factor C: ``raw_diag = inverse_softplus(diag(C))``,
    ``off_diag = C / diag(C)[:, None]``.
    ``distribution`` gives ``distrax.MultivariateNormalTri(loc, L)``.

    Raises:
      TypeError / ValueError: as ``MeanFieldNormal``.
    """

    dim: int
    batch_shape: Any = ()
    init_scale: float = 0.1
    init_loc: Any = 0.0

    def __post_init__(self):
        object.__setattr__(self, "dim", check_int(self.dim, "`dim`", minimum=1))
        object.__setattr__(self, "batch_shape", _shape_tuple(self.batch_shape, "batch_shape"))
        object.__setattr__(self, "init_scale", _check_init_scale(self.init_scale))
        _init_loc(self.init_loc, self.batch_shape + (self.dim,), np.float32)

    def init(self, rng_key: Array) -> dict:
        check_rng_key(rng_key)
        b, d, dtype = self.batch_shape, self.dim, _float_dtype()
        return {"loc": _init_loc(self.init_loc, b + (d,), dtype),
                "raw_diag": jnp.full(b + (d,), _inverse_softplus(self.init_scale), dtype),
                "off_diag": jnp.zeros(b + (d, d), dtype)}

    def distribution(self, params: dict) -> distrax.Distribution:
        return distrax.MultivariateNormalTri(
            params["loc"], _lower_triangular(params["off_diag"], params["raw_diag"]))


@dataclasses.dataclass(frozen=True)
class LowRankNormal:
    """Gaussian with scale S = diag(softplus(raw_diag)) + U U^T, covariance S S^T.

    ``rank`` columns of U capture the dominant correlations at O(d r) cost per sample (against
    O(d^2) for ``FullRankNormal``). S is symmetric positive definite, so q is never degenerate.
    U starts at small random values (U = 0 is a stationary point of U U^T).

    Attributes:
      dim: the latent dimension d.
      rank: r, 1 <= r <= d.
      batch_shape: ``()`` or ``(N,)``.
      init_scale: initial diagonal of S (> 0); U starts as ``0.1 * init_scale * N(0, 1/r)``.
      init_loc: the initial mean.

    Params: ``{"loc": [*batch, d], "raw_diag": [*batch, d], "u": [*batch, d, r]}``.
    ``distribution`` gives ``distrax.MultivariateNormalDiagPlusLowRank(loc, diag, u, u)``.

    Raises:
      TypeError / ValueError: as ``MeanFieldNormal``; ``rank`` not an int in [1, dim].
    """

    dim: int
    rank: int
    batch_shape: Any = ()
    init_scale: float = 0.1
    init_loc: Any = 0.0

    def __post_init__(self):
        object.__setattr__(self, "dim", check_int(self.dim, "`dim`", minimum=1))
        object.__setattr__(self, "rank", check_int(self.rank, "`rank`", minimum=1,
                                                   maximum=self.dim))
        object.__setattr__(self, "batch_shape", _shape_tuple(self.batch_shape, "batch_shape"))
        object.__setattr__(self, "init_scale", _check_init_scale(self.init_scale))
        _init_loc(self.init_loc, self.batch_shape + (self.dim,), np.float32)

    def init(self, rng_key: Array) -> dict:
        check_rng_key(rng_key)
        b, d, r, dtype = self.batch_shape, self.dim, self.rank, _float_dtype()
        u = jax.random.normal(rng_key, b + (d, r), dtype) * (0.1 * self.init_scale / np.sqrt(r))
        return {"loc": _init_loc(self.init_loc, b + (d,), dtype),
                "raw_diag": jnp.full(b + (d,), _inverse_softplus(self.init_scale), dtype),
                "u": u}

    def distribution(self, params: dict) -> distrax.Distribution:
        u = params["u"]
        return distrax.MultivariateNormalDiagPlusLowRank(
            params["loc"], _scale(params["raw_diag"]), u, u)


# ------------------------------------------------------------------ normalizing flow


class _Conditioner(nn.Module):
    """MLP from the masked input ``[d]`` to spline parameters ``[d, 3 * num_bins + 1]``; the
    last layer starts at zero, so every spline starts as the identity."""

    dim: int
    num_bins: int
    hidden_sizes: tuple[int, ...]

    @nn.compact
    def __call__(self, x):
        h = x
        for width in self.hidden_sizes:
            h = nn.tanh(nn.Dense(width)(h))
        out = nn.Dense(self.dim * (3 * self.num_bins + 1), kernel_init=nn.initializers.zeros,
                       bias_init=nn.initializers.zeros)(h)
        return out.reshape(x.shape[:-1] + (self.dim, 3 * self.num_bins + 1))


@dataclasses.dataclass(frozen=True)
class SplineFlow:
    """Normalizing flow: z = loc + scale * f_K(... f_1(eps)), eps ~ N(0, I).

    Each f_k is a masked coupling layer (Dinh et al. 2017, RealNVP §3.3) whose transformed
    coordinates go through monotone rational-quadratic splines on ``[range_min, range_max]``
    (identity outside) with parameters from an MLP of the untouched coordinates (Durkan et al.
    2019, "Neural Spline Flows", eqs. 4-6, §3.1); masks alternate between odd and even
    coordinates. The last layer of each MLP starts at zero, so at initialisation q is the
    mean-field Gaussian N(init_loc, init_scale^2 I), and the flow can only improve on it.
    log q(z) is exact (change of variables through distrax's ``Transformed``).

    Attributes:
      dim: the latent dimension d >= 2 (a coupling layer needs two groups of coordinates).
      num_layers: coupling layers K >= 1 (default 4).
      hidden_sizes: widths of each conditioner MLP's hidden layers (tanh), default (32, 32).
      num_bins: spline bins (default 8).
      range_min, range_max: the interval (in the standardised coordinates eps) where the
        splines act, default [-5, 5].
      init_scale, init_loc: the Gaussian base's initial scale (> 0) and mean.

    Params: ``{"loc": [d], "raw_scale": [d], "layers": (conditioner params,) * K}``. Batch
    shape ``()`` (a global latent).

    Raises:
      TypeError / ValueError: a bad field (``dim < 2``, ``num_layers < 1``, empty
        ``hidden_sizes``, ``range_min >= range_max``...), naming it.
    """

    dim: int
    num_layers: int = 4
    hidden_sizes: Sequence[int] = (32, 32)
    num_bins: int = 8
    range_min: float = -5.0
    range_max: float = 5.0
    init_scale: float = 1.0
    init_loc: Any = 0.0

    def __post_init__(self):
        object.__setattr__(self, "dim", check_int(self.dim, "`dim`", minimum=2))
        object.__setattr__(self, "num_layers", check_int(self.num_layers, "`num_layers`",
                                                         minimum=1))
        object.__setattr__(self, "hidden_sizes", _shape_tuple(self.hidden_sizes, "hidden_sizes"))
        if not self.hidden_sizes:
            raise ValueError("`hidden_sizes` must name at least one hidden layer")
        object.__setattr__(self, "num_bins", check_int(self.num_bins, "`num_bins`", minimum=1))
        lo = check_real(self.range_min, "`range_min`")
        hi = check_real(self.range_max, "`range_max`")
        if not lo < hi:
            raise ValueError(f"`range_min` must be < `range_max`, got {lo} and {hi}")
        object.__setattr__(self, "range_min", lo)
        object.__setattr__(self, "range_max", hi)
        object.__setattr__(self, "init_scale", _check_init_scale(self.init_scale))
        _init_loc(self.init_loc, (self.dim,), np.float32)

    def _conditioner(self) -> _Conditioner:
        return _Conditioner(self.dim, self.num_bins, self.hidden_sizes)

    def init(self, rng_key: Array) -> dict:
        check_rng_key(rng_key)
        dtype = _float_dtype()
        keys = jax.random.split(rng_key, self.num_layers)
        dummy = jnp.zeros((self.dim,), dtype)
        layers = tuple(self._conditioner().init(k, dummy) for k in keys)
        return {"loc": _init_loc(self.init_loc, (self.dim,), dtype),
                "raw_scale": jnp.full((self.dim,), _inverse_softplus(self.init_scale), dtype),
                "layers": layers}

    def distribution(self, params: dict) -> distrax.Distribution:
        module = self._conditioner()
        loc, scale = params["loc"], _scale(params["raw_scale"])
        dtype = loc.dtype
        base = distrax.MultivariateNormalDiag(jnp.zeros((self.dim,), dtype),
                                              jnp.ones((self.dim,), dtype))

        def spline(spline_params):
            return distrax.RationalQuadraticSpline(spline_params, self.range_min,
                                                   self.range_max, boundary_slopes="identity")

        layers = []
        for k, layer_params in enumerate(params["layers"]):
            mask = (np.arange(self.dim) % 2) == (k % 2)  # True: passed through unchanged
            layers.append(distrax.MaskedCoupling(
                mask=mask, conditioner=lambda x, p=layer_params: module.apply(p, x),
                bijector=spline))
        affine = distrax.Block(distrax.ScalarAffine(shift=loc, scale=scale), ndims=1)
        # distrax.Chain applies its last bijector first: eps -> f_1 -> ... -> f_K -> affine
        return distrax.Transformed(base, distrax.Chain([affine, *reversed(layers)]))


# ------------------------------------------------------------------ user-defined and constrained


@dataclasses.dataclass(frozen=True)
class Custom:
    """Any distrax distribution you parameterise: ``Custom(init_fn, distribution_fn)``.

    ``init_fn(rng_key) -> params`` (a pytree of unconstrained arrays) and
    ``distribution_fn(params) -> distrax.Distribution``. Map unconstrained parameters to valid
    ones yourself, e.g. a Gamma q::

        Custom(lambda key: {"raw_a": jnp.zeros(()), "raw_b": jnp.zeros(())},
               lambda p: distrax.Gamma(jax.nn.softplus(p["raw_a"]), jax.nn.softplus(p["raw_b"])))

    Pathwise gradients need samples that are differentiable in the parameters (distrax's
    Gamma and Beta use implicit reparameterization through TFP); otherwise fit with
    ``vijax.elbo.ScoreFunction``.

    Raises:
      TypeError: ``init_fn`` or ``distribution_fn`` not callable; ``distribution_fn``
        returning something other than a ``distrax.Distribution`` (when called).
    """

    init_fn: Callable[[Array], PyTree]
    distribution_fn: Callable[[PyTree], distrax.Distribution]

    def __post_init__(self):
        check_callable(self.init_fn, "`init_fn`")
        check_callable(self.distribution_fn, "`distribution_fn`")

    def init(self, rng_key: Array) -> PyTree:
        check_rng_key(rng_key)
        return self.init_fn(rng_key)

    def distribution(self, params: PyTree) -> distrax.Distribution:
        q = self.distribution_fn(params)
        if not isinstance(q, distrax.Distribution):
            raise TypeError("`distribution_fn` must return a distrax.Distribution, got "
                            f"{type(q).__name__}")
        return q


def positive() -> distrax.Bijector:
    """The bijector exp: R -> (0, inf), log|det J| = x (a log-normal q for a Normal family)."""
    return distrax.Lambda(forward=jnp.exp, inverse=jnp.log,
                          forward_log_det_jacobian=lambda x: x,
                          inverse_log_det_jacobian=lambda y: -jnp.log(y),
                          event_ndims_in=0, is_constant_jacobian=False)


def unit_interval() -> distrax.Bijector:
    """The bijector sigmoid: R -> (0, 1) (a logit-normal q for a Normal family)."""
    return distrax.Sigmoid()


@dataclasses.dataclass(frozen=True)
class Constrained:
    """A family pushed onto a constrained support: q(z) = base pushed through ``bijector``.

    z = T(u), u ~ base; log q(z) = log q_base(u) - log|det dT/du| (Kucukelbir et al. 2017,
    ADVI, eq. 4). Samples and log q come from one forward pass (distrax
    ``sample_and_log_prob``), so ``log_joint_fn`` receives z in the support and needs no
    Jacobian of its own. A scalar bijector (``event_ndims_in == 0``, e.g. ``positive()``,
    ``unit_interval()``) acts elementwise on a base with a vector event (it is wrapped in
    ``distrax.Block``). distrax offers no simplex bijector; for a simplex latent use
    ``Custom`` with a Dirichlet and ``vijax.elbo.ScoreFunction``, or map a Gaussian through a
    softmax in ``log_joint_fn`` (with its Jacobian).

    Attributes:
      family: the base family (any family of this module with a real-valued event).
      bijector: a ``distrax.Bijector``, e.g. ``positive()``.

    Params: the base family's.

    Raises:
      TypeError: ``family`` not a family, ``bijector`` not a ``distrax.Bijector``.
      ValueError: a bijector acting on more event dimensions than the base has.
    """

    family: Any
    bijector: distrax.Bijector

    def __post_init__(self):
        if not is_family(self.family):
            raise TypeError(f"`family` must be a variational family, got {self.family!r}")
        if not isinstance(self.bijector, distrax.Bijector):
            raise TypeError("`bijector` must be a distrax.Bijector (e.g. vijax.families."
                            f"positive()), got {type(self.bijector).__name__}")

    def init(self, rng_key: Array) -> PyTree:
        return self.family.init(rng_key)

    def distribution(self, params: PyTree) -> distrax.Distribution:
        base = self.family.distribution(params)
        event_ndims = len(base.event_shape)
        bijector = self.bijector
        if bijector.event_ndims_in == 0 and event_ndims > 0:
            bijector = distrax.Block(bijector, ndims=event_ndims)
        elif bijector.event_ndims_in != event_ndims:
            raise ValueError(f"`bijector` acts on {bijector.event_ndims_in} event dimensions but "
                             f"the base family's event shape is {tuple(base.event_shape)}")
        return distrax.Transformed(base, bijector)


# ------------------------------------------------------------------ pytrees of families

FAMILY_TYPES = (MeanFieldNormal, FullRankNormal, LowRankNormal, SplineFlow, Custom, Constrained)


def is_family(x: Any) -> bool:
    """Whether ``x`` is one family: an object with callable ``init`` and ``distribution``
    (the classes of this module, or your own with that interface), not a class."""
    return (not isinstance(x, type) and callable(getattr(x, "init", None))
            and callable(getattr(x, "distribution", None)))


def check_family(family: PyTree, name: str = "family") -> None:
    """TypeError naming ``name`` unless ``family`` is a family or a non-empty pytree of them."""
    leaves = jax.tree_util.tree_leaves(family, is_leaf=is_family)
    if not leaves or not all(is_family(leaf) for leaf in leaves):
        hint = ""
        if isinstance(family, type):
            hint = " (a class: pass an instance, e.g. MeanFieldNormal((latent_dim,)))"
        elif isinstance(family, distrax.Distribution):
            hint = " (a distribution: wrap its parameterisation in families.Custom)"
        raise TypeError(f"`{name}` must be a variational family (e.g. vijax.families."
                        f"MeanFieldNormal) or a pytree of them, got {type(family).__name__}{hint}")


def init_params(rng_key: Array, family: PyTree) -> PyTree:
    """Initial parameters of a family or pytree of families (one key per factor).

    Returns:
      a pytree shaped like ``family`` whose leaves are each factor's parameter pytree.
    Raises:
      TypeError: ``rng_key`` not a PRNG key; ``family`` not a family (pytree).
    """
    check_rng_key(rng_key)
    check_family(family)
    leaves, treedef = jax.tree_util.tree_flatten(family, is_leaf=is_family)
    keys = jax.random.split(rng_key, len(leaves)) if len(leaves) > 1 else [rng_key]
    return jax.tree_util.tree_unflatten(treedef, [f.init(k) for f, k in zip(leaves, keys)])


def distribution(family: PyTree, params: PyTree) -> PyTree:
    """q at ``params``: a distrax distribution, or a pytree of them shaped like ``family``.

    Raises:
      TypeError: ``family`` not a family (pytree).
      ValueError: ``params`` whose structure does not match ``family``'s.
    """
    check_family(family)
    leaves, treedef = jax.tree_util.tree_flatten(family, is_leaf=is_family)
    if treedef.num_leaves == 1 and jax.tree_util.treedef_is_leaf(treedef):
        return leaves[0].distribution(params)
    try:
        param_leaves = treedef.flatten_up_to(params)
    except (ValueError, TypeError) as err:
        raise ValueError(f"`params` must have the structure of `family` ({treedef}): {err}") from None
    return jax.tree_util.tree_unflatten(
        treedef, [f.distribution(p) for f, p in zip(leaves, param_leaves)])
