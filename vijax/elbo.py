"""Variational objectives (in nats) and their gradient estimators.

Every objective here is a *lower bound* on log p(x) and is returned as the bound itself, not its
negative: minimise ``-elbo(...).mean()``. Outputs are per example, shape ``[batch]``.

Conventions
-----------
* ``rng_key`` comes first; nothing is jitted inside, the caller decides ``jax.jit``.
* ``q`` is a distrax distribution with batch shape ``[batch]`` and event shape ``[latent_dim]``
  (e.g. ``distrax.MultivariateNormalDiag(loc, scale_diag)`` with ``loc: [batch, latent_dim]``),
  or a pytree of such distributions read as independent factors. A ``q`` with event shape
  ``[]`` (e.g. ``distrax.Normal(loc, scale)``) is legitimate and means a 1-D latent per batch
  entry: its batch shape is then all of ``loc.shape``, and ``log_joint_fn`` must return that
  shape. For a vector latent use ``MultivariateNormalDiag`` or ``distrax.Independent``; a
  ``log_joint_fn`` output of the wrong shape is reported with ``q``'s event and batch shapes.
* Every distribution argument (``q``, and the ``prior`` of ``elbo_analytic_kl``) is checked
  alike: Gaussian locations and scales (``loc`` and ``scale_diag`` of
  ``MultivariateNormalDiag``, ``loc`` and ``scale`` of ``Normal``, also inside
  ``Independent``/``Transformed``) must have a floating dtype; concrete parameters must be
  finite, and concrete Gaussian scales at least the smallest normal number of their dtype
  (``jnp.finfo(dtype).tiny``, 1.2e-38 in float32): distrax would silently use |scale|, and a
  denormal scale is flushed to zero on CPU (``vijax.reparam`` applies the same rule).
* ``rng_key`` is one key: a typed key of shape ``()`` or a raw ``uint32`` key of shape
  ``(2,)``; a batch of keys is refused (``jax.vmap`` over it instead).
* ``log_joint_fn(z) -> [batch]`` returns log p(x, z) for ONE sample ``z`` shaped like a draw of
  ``q`` (``[batch, latent_dim]``); ``log_likelihood_fn(z) -> [batch]`` returns log p(x | z).
  The objectives write the single-sample computation and ``jax.vmap`` it over samples.
* z and log q(z) come from one forward pass (distrax ``sample_and_log_prob``), never from the
  bijector's inverse, so the value stays finite for a transformed ``q`` whose float32 sample
  saturates (``Tanh`` giving exactly +-1). Only ``ScoreFunction``, ``StickingTheLanding`` and
  ``DReG`` gradients evaluate log q at a fixed z through the inverse; see their notes.
* The gradient estimator is chosen by a small frozen dataclass (``Pathwise()``,
  ``ScoreFunction(baseline)``, ``StickingTheLanding()``, ``DReG()``; for a small discrete
  ``q`` in ``elbo``, ``Enumerate()`` (exact sum over the support); for Bernoulli or one-hot
  categorical latents in ``elbo``, ``REBAR(temperature, eta)`` (Tucker et al. 2017, §3: the
  score function with a Concrete-relaxation control variate, unbiased; ``tune_rebar`` tunes
  it by minimising ``rebar_gradient_variance``)). The *value* returned by a sampling
  estimator is the same whatever the estimator, bit for bit; only its gradient differs (it is
  built as a surrogate ``stop_gradient(value) + (s - stop_gradient(s))``, and is ``value``
  itself where ``s`` is not finite, e.g. with a -inf log weight).

Sources: lecture 3 ("Variational lower bound", "ELBO gradients", "Reparametrization trick");
CENG796 notes §3.3, §4.2; Burda, Grosse & Salakhutdinov 2016 (IWAE), eq. (8); Li & Turner 2016
(VR bound), eq. (5); Roeder, Wu & Duvenaud 2017 (sticking the landing), eq. (8); Tucker,
Lawson, Gu & Maddison 2019 (DReG), eq. (5); Mnih & Rezende 2016 (VIMCO), eq. (9); Tucker, Mnih,
Maddison, Lawson & Sohl-Dickstein 2017 (REBAR), §3 (the REBAR estimator, the tuning of eta and
lambda) and the appendix (conditional reparameterization, categorical variables); Maddison, Mnih
& Teh 2017 (Concrete), the Gumbel-max trick.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from vijax import _q
from vijax._checks import check_int, check_real
from vijax._elbo import (_check_rebar_variance_call, _constant_baseline, _draw,
                         _enumerated_elbo, _grad_z_log_q, _leave_one_out_mean, _log_mean_exp,
                         _log_q_fixed_parameters, _rebar_elbo, _rebar_variance,
                         _score_term, _surrogate, _weighted_path_term, _weighted_sum)

Array = jax.Array
PyTree = Any

__all__ = [
    "Pathwise",
    "ScoreFunction",
    "LeaveOneOut",
    "StickingTheLanding",
    "DReG",
    "Enumerate",
    "REBAR",
    "elbo",
    "rebar_gradient_variance",
    "tune_rebar",
    "elbo_analytic_kl",
    "iwae_bound",
    "renyi_bound",
]


# ------------------------------------------------------------------ gradient estimators


@dataclasses.dataclass(frozen=True)
class Pathwise:
    """Reparameterization (pathwise) gradient: differentiate through z = g(eps, phi).

    The default. Needs a reparameterizable ``q`` (Gaussian, or any distrax transformed
    distribution); a ``q`` with non-floating (discrete) samples raises ``TypeError``, as it does
    for ``StickingTheLanding`` and ``DReG``. Lecture 3, "Reparametrization trick"; CENG796
    notes §4.2.
    """


@dataclasses.dataclass(frozen=True)
class LeaveOneOut:
    """Baseline for ``ScoreFunction``: each sample's learning signal minus the mean of the
    other samples' finite ones (needs ``num_samples >= 2``). For ``iwae_bound`` this is VIMCO's
    per-sample baseline (Mnih & Rezende 2016, eq. 9, geometric-mean variant); a zero-weight
    (-inf) particle is left out of the others' mean, so the baseline stays finite."""


@dataclasses.dataclass(frozen=True)
class ScoreFunction:
    """Score-function (REINFORCE, likelihood-ratio) gradient with an optional baseline.

    grad = E_q[(f(z) - b) grad log q(z)] + E_q[grad f(z) | z fixed]; unbiased for any ``b``
    that does not depend on the sample it multiplies. Works for non-reparameterizable ``q``
    (samples are wrapped in ``stop_gradient``). Lecture 3, "ELBO gradients" (the log-derivative
    trick); CENG796 notes §4.1 "Gradient Computation".

    grad log q(z) at the fixed z goes through the bijector's inverse: for a transformed ``q``
    whose float32 sample saturates (``Tanh`` at exactly +-1) that gradient is not finite,
    though the value is. Use ``Pathwise()`` there.

    Numerical range: for a Gaussian ``q`` (``Normal``, ``MultivariateNormalDiag``, also inside
    ``Independent``/``Transformed``) grad log q = ((z - loc) / scale^2, (eps^2 - 1) / scale) is
    computed without forming scale^2, so it is finite down to the smallest accepted scale
    (``finfo.tiny``, 1.2e-38 in float32; distrax's own derivative is inf below 1.1e-19). The
    gradient itself grows like 1 / scale and is inf only where its true value exceeds the
    float32 range. eps is read off the fixed draw as (z - loc) / scale, so where scale * eps is
    below the rounding of loc (scale 1e-20 with loc 0.5: z == loc in float32) the score is that
    of the rounded draw (eps = 0). An example whose value is -inf (or NaN) passes a zero
    gradient.

    Attributes:
      baseline: ``None`` (no control variate), a real number or a real array broadcastable to
        ``[batch]`` (e.g. a running mean kept by the caller; a traced array is fine), or
        ``LeaveOneOut()``. A number or ``None`` keeps the estimator hashable (usable as a static
        ``jit`` argument); an array does not.

    Raises:
      TypeError: ``baseline`` of another type (a string, a bool, a list, the class
        ``LeaveOneOut`` rather than an instance ``LeaveOneOut()``, a complex or boolean array).
      ValueError: a concrete ``baseline`` with NaN or inf entries. (Its shape is checked against
        ``[batch]`` when an objective uses it.)
    """

    baseline: Any = None

    def __post_init__(self):
        baseline = self.baseline
        if baseline is None or isinstance(baseline, LeaveOneOut):
            return
        if isinstance(baseline, type) and issubclass(baseline, LeaveOneOut):
            raise TypeError("`baseline` must be an instance: write ScoreFunction(LeaveOneOut()), "
                            "not ScoreFunction(LeaveOneOut)")
        if not _q.is_real(baseline):
            raise TypeError(
                "`baseline` must be None, LeaveOneOut(), a real number or a real array "
                f"broadcastable to the batch shape; got {type(baseline).__name__} {baseline!r}"
            )
        _q.check_finite(baseline, "baseline")


@dataclasses.dataclass(frozen=True)
class StickingTheLanding:
    """Pathwise gradient with the score term of log q dropped (Roeder et al. 2017, eq. 8):
    log q(z) is evaluated with q's parameters under ``stop_gradient`` while z stays
    reparameterized. Unbiased for the ELBO, zero variance when q is the exact posterior; biased
    for the IWAE bound with K > 1 (Tucker et al. 2019, §3). d log q / dz goes through the
    bijector's inverse, so, as for ``ScoreFunction``, a saturated float32 ``Tanh`` sample gives a
    non-finite gradient (the value stays finite)."""


@dataclasses.dataclass(frozen=True)
class DReG:
    """Doubly-reparameterized gradient for the IWAE bound (Tucker et al. 2019, eq. 5):
    the inference-network gradient sum_k w~_k^2 d log w_k / d z_k dz_k/dphi, the model
    gradient the usual sum_k w~_k grad_theta log p(x, z_k). Unbiased; with K = 1 it is
    ``StickingTheLanding`` (so ``elbo`` takes that instead). Same bijector-inverse caveat as
    ``StickingTheLanding``.

    Numerical range: a particle of zero normalised weight contributes nothing, also where its
    d log p / dz is not finite (e.g. a prior of scale 1e-20 in float32, where -z / scale^2
    overflows while log p is still finite): it is left out rather than multiplied by 0, which
    was NaN. Where a particle of non-zero weight has a d log p / dz beyond the float32 range,
    the gradient is +-inf, as with ``Pathwise()``: its true value is out of range; see
    ``iwae_bound``."""


@dataclasses.dataclass(frozen=True)
class Enumerate:
    """Exact expectation over a discrete ``q`` with a small support:
    E_q f(z) = sum_z q(z) f(z), so the ELBO sum_z q(z) [log p(x, z) - log q(z)] is exact and its
    gradient is the exact gradient (no sampling; ``rng_key`` is unused and ``num_samples``
    must be 1). CENG796 notes §4.1, "Likelihood Function" ("L(x_i; theta, phi_i) =
    sum_z q log p(z, x_i) + H(q)").

    Supported ``q``: ``distrax.Categorical`` and ``distrax.OneHotCategorical`` (K classes),
    ``distrax.Bernoulli`` and ``distrax.Independent(distrax.Bernoulli(...), 1)`` (d bits, 2^d
    configurations); ``log_joint_fn`` is evaluated once per support point.

    Attributes:
      max_support: the largest support enumerated (default 1024); a larger one is refused.

    Raises:
      TypeError / ValueError: ``max_support`` not an int >= 1; (in ``elbo``) a ``q`` that is
        not one of the supported discrete distributions, a pytree ``q``, a support larger
        than ``max_support``, ``num_samples != 1``.
    """

    max_support: int = 1024

    def __post_init__(self):
        check_int(self.max_support, "`max_support`", minimum=1)


@dataclasses.dataclass(frozen=True)
class REBAR:
    """REBAR gradient for Bernoulli and one-hot categorical latents (Tucker, Mnih, Maddison,
    Lawson & Sohl-Dickstein 2017, "REBAR: Low-variance, unbiased gradient estimates for discrete
    latent variable models", §3, the REBAR estimator, with the conditional reparameterization
    of their appendix; categorical variables by the Gumbel-max trick, Maddison, Mnih & Teh
    2017): the score-function gradient with a Concrete-relaxation control variate whose
    expectation is added back with the reparameterization gradient. Unbiased for the ELBO;
    only in ``elbo``. ``tune_rebar`` picks ``temperature`` and ``eta`` by minimising the
    gradient variance (the paper's §3, tuning eta and lambda online).

    Supported ``q`` (a single distribution, theta = its logits):

    * bits: ``distrax.Bernoulli(logits=...)`` (or ``probs=``), batch shape ``[batch]``, or
      ``distrax.Independent(distrax.Bernoulli(...), k)`` (bits ``[*event]``, e.g. ``[batch, d]``
      with ``k = 1``);
    * one-hot categoricals: ``distrax.OneHotCategorical(logits=...)`` (logits ``[batch, K]``,
      draws ``[batch, K]``), or ``distrax.Independent(distrax.OneHotCategorical(logits), k)``
      (logits ``[batch, N, K]`` with ``k = 1``: N categoricals of K classes per example). theta
      is then the log-softmax of the logits (distrax normalises them), over the class axis.
      (An index-valued ``distrax.Categorical`` is not accepted: use ``OneHotCategorical``.)

    With u, v ~ U(0, 1) independent, per bit (bits) or per class (categoricals):

    * the hard draw b, an exact draw of q, and the same draw as distrax's own sampler with the
      same key (so the value is ``ScoreFunction()``'s): for bits z = theta + log u - log(1 - u),
      b = H(z), i.e. b = 1 iff 1 - u < sigmoid(theta) (distrax's comparison, with w = 1 - u its
      uniform draw); for categoricals z = theta + G with G the Gumbel noise
      ``jax.random.gumbel`` draws from the key (-log(-log u)), b = one_hot(argmax_k z_k)
      (``jax.random.categorical``'s Gumbel-max draw);
    * z~ ~ p(z | b): for bits z~ = softplus(logit v + softplus(theta)) if b = 1,
      z~ = -softplus(-logit v + softplus(-theta)) if b = 0; for categoricals, with b the class
      drawn, z~_b = -log(-log v_b) and z~_i = -log(-log(v_i) exp(-theta_i) - log v_b) for
      i != b (computed as -logaddexp(log(-log v_i) - theta_i, log(-log v_b))): the maximum of
      the Gumbels, then the others truncated below it;
    * the relaxed point sigma_lam(z): sigmoid(z / lam) for bits, softmax(z / lam) over the
      class axis for categoricals (a point of the simplex);
    * f(x) = log_joint_fn(x) - log q(x), with log q extended to a relaxed x as q's log-mass
      formula read for real x: sum_i [x_i log sigmoid(theta_i) + (1 - x_i) log sigmoid(-theta_i)]
      for bits, sum_{cells} sum_k x_k theta_k for categoricals;
    * gradient w.r.t. theta, per sample, with total derivatives (the z~ path through theta
      included), the same for both families:
      [f(b) - eta f(sigma_lam(z~))] grad log q(b)
      + eta grad f(sigma_lam(z)) - eta grad f(sigma_lam(z~)).

    Shapes: ``log_joint_fn`` maps one z shaped like a draw of ``q`` (``[batch, d]`` for
    ``Independent(Bernoulli(logits [batch, d]), 1)``, ``[batch, N, K]`` for
    ``Independent(OneHotCategorical(logits [batch, N, K]), 1)``) to ``[batch]``; ``elbo``
    returns ``[batch]`` ELBO estimates in nats (the ELBO itself, not its negative).

    The value is the ordinary Monte Carlo ELBO of the hard draws b (the same draws, hence the
    same value bit for bit, as ``ScoreFunction()`` at the same key). The zero-mean term
    -grad log q(b) (from f's own dependence on theta) is left out. Parameters of
    ``log_joint_fn`` (a decoder's) get grad log p(x, b) only: the relaxed terms reach
    ``log_joint_fn`` through its input x alone (first order in x, as ``StickingTheLanding``: do
    not take Hessians through it). With ``num_samples = S`` the S single-sample estimates are
    averaged. q's log-probabilities must be finite (no class or bit of probability 0).

    ``log_joint_fn`` must accept real-valued relaxed points (in [0, 1]^d for bits, on the
    simplex for categoricals; floating dtype) as well as the hard draws b (q's sample dtype,
    ``int`` by default), and be differentiable in z there.

    Online adaptation (the paper's §3: lambda and eta follow the gradient of the estimator's
    variance at every step): the fields may also be JAX scalars, traced ones included, so a
    jitted train step can build ``REBAR(jnp.exp(log_lam), eta)`` from values it carries and
    update them with the gradient of ``rebar_gradient_variance(key, ..., num_samples=1)`` at
    the step's own key (the squared norm of the very gradient the step applies). A concrete
    array is stored as a Python float (so the estimator stays hashable, e.g. inside a static
    ``vijax.svi`` objective); a tracer is stored as given. ``experiments/discrete_vae.py``
    (``--rebar-online-lr``) does this for a categorical VAE.

    Attributes:
      temperature: lam > 0, a finite real scalar (the paper's lambda; default 0.5): a Python
        or NumPy real, a 0-d array, or a traced JAX scalar.
      eta: the control-variate scale, a finite real scalar of the same kinds (the paper's eta;
        default 1.0; 0 gives the score function without baseline, less the zero-mean term
        above).

    Raises:
      TypeError / ValueError naming ``temperature`` or ``eta``: not a real scalar, or a
        concrete ``temperature`` <= 0 or not finite, a concrete ``eta`` not finite. (In
        ``elbo``) TypeError naming ``q`` and ``estimator``: a ``q`` other than a single
        ``Bernoulli``, ``OneHotCategorical`` or ``Independent`` of one of them.
    """

    temperature: float | Array = 0.5
    eta: float | Array = 1.0

    def __post_init__(self):
        for name in ("temperature", "eta"):
            value = getattr(self, name)
            number = check_real(value, f"`{name}`", array=True,
                                exclusive_minimum=0.0 if name == "temperature" else None)
            if number is not None and not isinstance(value, numbers.Real):
                object.__setattr__(self, name, number)  # a concrete array: a Python float


# ------------------------------------------------------------------ checks shared by the bounds

# The estimators each bound accepts (vijax.vae's objectives check against the same tuples).
ELBO_ESTIMATORS = (Pathwise, ScoreFunction, StickingTheLanding, Enumerate, REBAR)
ELBO_ANALYTIC_KL_ESTIMATORS = (Pathwise, ScoreFunction)
IWAE_ESTIMATORS = (Pathwise, ScoreFunction, StickingTheLanding, DReG)


def _check_loo(estimator: Any, num_samples: int) -> None:
    if isinstance(estimator, ScoreFunction) and isinstance(estimator.baseline, LeaveOneOut):
        if num_samples < 2:
            raise ValueError("`estimator` ScoreFunction(LeaveOneOut()) needs `num_samples` >= 2")


def _check_objective_fields(objective: Any) -> None:
    """Construction-time checks of an objective dataclass (``vijax.svi``'s and ``vijax.vae``'s),
    with the rules of the bounds here: ``num_samples`` a positive int, ``estimator`` one of
    ``type(objective).estimators``, ``ScoreFunction(LeaveOneOut())`` only with
    ``num_samples >= 2``. TypeError / ValueError naming the field."""
    check_int(objective.num_samples, "num_samples", minimum=1)
    _q.check_estimator(objective.estimator, objective.estimators, type(objective).__name__)
    _check_loo(objective.estimator, objective.num_samples)


def _check_continuous_q(q: PyTree, estimator: Any, function: str) -> None:
    """``TypeError`` if ``q`` draws non-floating samples (e.g. Bernoulli) and the gradient is not
    the score function's: a discrete draw has no path derivative, so a pathwise, STL or DReG
    gradient would be silently wrong. Checked with ``jax.eval_shape`` (nothing is sampled)."""
    if isinstance(estimator, ScoreFunction):
        return
    draw = jax.eval_shape(lambda: _q.sample(jax.random.key(0), q))
    bad = sorted({str(x.dtype) for x in jax.tree_util.tree_leaves(draw)
                  if not jnp.issubdtype(x.dtype, jnp.floating)})
    if bad:
        if function == "renyi_bound":  # no estimator argument: always pathwise
            raise TypeError(
                f"`q` draws non-floating samples ({', '.join(bad)}), which have no pathwise "
                "gradient, and renyi_bound's gradient is pathwise only: use `elbo`/`iwae_bound` "
                "with `estimator=ScoreFunction(...)`")
        raise TypeError(
            f"`q` draws non-floating samples ({', '.join(bad)}), which have no pathwise gradient: "
            f"`estimator` {estimator!r} would give a wrong gradient in {function}; use "
            "`estimator=ScoreFunction(...)`"
        )


# ------------------------------------------------------------------ objectives


def elbo(
    rng_key: Array,
    log_joint_fn: Callable[[PyTree], Array],
    q: PyTree,
    *,
    num_samples: int = 1,
    estimator: Pathwise | ScoreFunction | StickingTheLanding | Enumerate | REBAR = Pathwise(),
) -> Array:
    """Monte Carlo ELBO, E_q[log p(x, z) - log q(z)], per example (in nats).

    Returns the ELBO itself (a lower bound on log p(x)), not its negative. With
    ``num_samples = S`` it is the average of S independent single-sample estimates.
    log p(x) = ELBO + KL(q(z) || p(z | x)) >= ELBO (lecture 3, "Variational lower bound";
    LVM blog post, "Derivation of Variational Lower Bound"; CENG796 notes §3.3 and §4.1,
    "Likelihood Function").

    Args:
      rng_key: a JAX PRNG key.
      log_joint_fn: ``z -> log p(x, z)``, ``[batch, latent_dim] -> [batch]`` for one sample.
      q: distrax distribution (batch ``[batch]``, event ``[latent_dim]``) or pytree of them.
      num_samples: S >= 1, a Python int.
      estimator: ``Pathwise()`` (default), ``ScoreFunction(baseline)``,
        ``StickingTheLanding()`` (these change the gradient only), or ``Enumerate()`` for a
        small discrete ``q``: the exact expectation, no sampling (``num_samples`` = 1), or
        ``REBAR(temperature, eta)`` for a Bernoulli or one-hot categorical ``q``
        (``distrax.Bernoulli``, ``distrax.OneHotCategorical``, or ``Independent`` of either):
        ``ScoreFunction()``'s value, REBAR's gradient (``log_joint_fn`` is then also called at
        relaxed points, floats in [0, 1]^d or on the simplex; see ``REBAR``).

    Returns:
      ``[batch]`` ELBO estimates (nats), dtype of ``log_joint_fn``'s output.

    Raises:
      TypeError: ``rng_key`` not a single JAX PRNG key (e.g. an int seed, or a batch of keys
        from ``jax.random.split``); ``log_joint_fn`` not callable; ``num_samples`` not an
        int, ``q`` not a distrax distribution (pytree), or a Gaussian ``q`` with a
        non-floating (bool, int) ``loc``/``scale``; unsupported ``estimator``; ``q`` with
        non-floating (discrete) samples and an ``estimator`` other than ``ScoreFunction``,
        ``Enumerate`` or ``REBAR``; ``REBAR()`` with a ``q`` that is not a single
        ``Bernoulli``, ``OneHotCategorical``, or ``Independent`` of one of them.
      ValueError: ``num_samples < 1``; ``log_joint_fn`` output not of shape ``[batch]`` (q's
        batch shape; the message gives q's event shape too); non-finite concrete parameters
        of ``q``, or a concrete Gaussian scale of ``q`` below ``jnp.finfo(dtype).tiny`` (not
        positive, or denormal); ``LeaveOneOut`` baseline with S < 2; a ``baseline`` array not
        broadcastable to ``[batch]``.
    """
    num_samples = _q.check_estimator_call(rng_key, log_joint_fn, "log_joint_fn", num_samples)
    _q.check_estimator(estimator, ELBO_ESTIMATORS, "elbo")
    shape = _q.check_q(q)
    if isinstance(estimator, Enumerate):
        return _enumerated_elbo(log_joint_fn, q, shape, num_samples, estimator)
    if isinstance(estimator, REBAR):
        return _rebar_elbo(rng_key, log_joint_fn, q, shape, num_samples, estimator)
    _check_loo(estimator, num_samples)
    _check_continuous_q(q, estimator, "elbo")
    is_score = isinstance(estimator, ScoreFunction)
    is_stl = isinstance(estimator, StickingTheLanding)

    def one_sample(key):
        z, log_q = _draw(key, q, stop_sample=is_score)
        log_p = _q.call_log_density(log_joint_fn, z, shape, "log_joint_fn", q)
        value = log_p - log_q
        if is_score:  # log q at the fixed z, differentiable in q's parameters (bijector inverse)
            log_q = _q.score_log_prob(q, z)
            surrogate = log_p - log_q
        elif is_stl:  # same value, but log q's parameters held fixed (score term dropped)
            surrogate = log_p - _log_q_fixed_parameters(q, z, log_q, len(shape))
        else:
            surrogate = value
        return value, surrogate, log_q

    keys = _q.sample_keys(rng_key, num_samples)
    values, surrogates, log_qs = jax.vmap(one_sample)(keys)  # each [S, batch]
    surrogate = jnp.mean(surrogates, axis=0)
    if is_score:
        if isinstance(estimator.baseline, LeaveOneOut):
            signal = values - _leave_one_out_mean(values)
        else:
            signal = values - _constant_baseline(estimator.baseline, shape, values.dtype)[None]
        surrogate = surrogate + _score_term(signal, log_qs) / num_samples
    return _surrogate(jnp.mean(values, axis=0), surrogate)


def rebar_gradient_variance(
    rng_key: Array,
    log_joint_fn: Callable[[Array], Array],
    q_fn: Callable[[PyTree], Any],
    params: PyTree,
    *,
    temperature: float | Array,
    eta: float | Array,
    num_samples: int = 64,
) -> Array:
    """E ||g||^2, the mean squared norm of REBAR's single-sample gradient w.r.t. ``params``
    (Tucker, Mnih, Maddison, Lawson & Sohl-Dickstein 2017, §3: eta and lambda tuned online).

    g is the gradient that ``elbo(key, log_joint_fn, q_fn(params), estimator=REBAR(temperature,
    eta))`` summed over the batch passes to ``params`` (one sample, see ``REBAR``), averaged
    over ``num_samples`` independent keys. Since E g (the ELBO's gradient) does not depend on
    lambda or eta, the gradient of E ||g||^2 w.r.t. them is the gradient of the estimator's
    total variance sum_j Var(g_j): ``tune_rebar`` minimises it (in log lambda by Adam, in eta
    in closed form, g being linear in eta). ``temperature`` and ``eta`` may be traced JAX scalars and the result is
    differentiable in both; the derivative in ``temperature`` uses second derivatives of
    ``log_joint_fn`` in its input x (so ``log_joint_fn`` must be twice differentiable on the
    relaxed points). Only the gradient w.r.t. ``params`` (q's) is measured: the one that
    parameters of ``log_joint_fn`` get, grad log p(x, b), does not depend on lambda or eta.
    Nothing is jitted inside; the function may be called under ``jit``, ``vmap`` and ``grad``.

    Args:
      rng_key: a JAX PRNG key; sample k uses the k-th key of ``elbo(..., num_samples=S)``
        (``jax.random.split(rng_key, S)[k]``, or ``rng_key`` itself for S = 1, so that
        ``num_samples=1`` gives ||g||^2 of ``elbo`` at ``rng_key``).
      log_joint_fn: ``z -> log p(x, z)``, ``[batch]``, as for ``elbo`` with ``REBAR``.
      q_fn: ``params -> q``, a Bernoulli or one-hot categorical ``q`` that ``REBAR`` accepts.
      params: a pytree of floating arrays, the parameters of ``q`` (logits, or an encoder's).
      temperature: lambda > 0, a real scalar (Python, NumPy or JAX, traced allowed).
      eta: the control-variate scale, a real scalar (traced allowed).
      num_samples: the number of single-sample gradients averaged, an int >= 1.

    Returns:
      A scalar: the Monte Carlo mean of ||g||^2 (in nats^2 per squared unit of ``params``),
      dtype of the gradient. An example with a non-finite ELBO makes it NaN.

    Raises:
      TypeError: ``rng_key`` not a single key, ``log_joint_fn`` or ``q_fn`` not callable,
        ``params`` not a pytree of floating arrays, ``temperature``/``eta`` not real scalars,
        ``num_samples`` not an int, or ``q_fn(params)`` not a ``q`` that ``REBAR`` accepts.
      ValueError: ``num_samples < 1``; a concrete ``temperature`` <= 0 or not finite, a
        concrete ``eta`` not finite; invalid parameters of ``q_fn(params)``.
    """
    check_real(temperature, "`temperature`", exclusive_minimum=0.0, array=True)
    check_real(eta, "`eta`", array=True)
    num_samples, q_fixed, shape, family, inner_fixed = _check_rebar_variance_call(
        rng_key, log_joint_fn, q_fn, params, num_samples)
    return _rebar_variance(rng_key, log_joint_fn, q_fn, params, q_fixed, shape, family,
                           inner_fixed, temperature, eta, num_samples)


def tune_rebar(
    rng_key: Array,
    log_joint_fn: Callable[[Array], Array],
    q_fn: Callable[[PyTree], Any],
    params: PyTree,
    estimator: REBAR = REBAR(),
    *,
    num_steps: int = 200,
    learning_rate: float = 0.05,
    num_samples: int = 16,
) -> REBAR:
    """REBAR with lambda and eta tuned to minimise its gradient variance at fixed ``params``
    (Tucker, Mnih, Maddison, Lawson & Sohl-Dickstein 2017, §3: eta and lambda tuned online).

    The single-sample gradient is linear in eta, g = a + eta c, so at fixed keys its mean
    squared norm V(lambda, eta) is a quadratic in eta whose minimiser
    eta*(lambda) = -E[a . c] / E[||c||^2] is read off three evaluations, V at eta = -1, 0, 1
    (common keys). Each of ``num_steps`` steps draws ``num_samples`` fresh keys (step t uses
    ``jax.random.split(rng_key, num_steps + 1)[t]``) and takes one Adam step
    (``optax.adam(learning_rate)``) on log lambda for min_eta V(lambda, eta), starting from
    ``estimator``'s temperature; the returned eta is eta*(lambda) at the final lambda, read
    from ``4 * num_samples`` more keys. (The paper descends both by the variance gradient; the
    minimum in eta is so sharp, a curvature of E||c||^2 that is of the order of the
    score-function estimator's own E||g||^2, that gradient steps on eta land far from it.)

    The loop is one ``jax.lax.scan``, traced and compiled anew at each call (seconds on a CPU,
    second derivatives of ``log_joint_fn`` included); the function returns Python floats, so
    call it outside ``jit`` (e.g. every few hundred training steps, with the current params).

    Args:
      rng_key: a JAX PRNG key.
      log_joint_fn, q_fn, params: as for ``rebar_gradient_variance``.
      estimator: the starting point, a ``REBAR`` (default ``REBAR()``: lambda 0.5; its eta is
        not used).
      num_steps: Adam steps on log lambda, an int >= 1.
      learning_rate: Adam's step size, a finite real > 0 (in units of log lambda).
      num_samples: single-sample gradients per variance estimate, an int >= 1.

    Returns:
      ``REBAR(temperature, eta)`` with the tuned values as Python floats.

    Raises:
      TypeError / ValueError naming the argument: those of ``rebar_gradient_variance``;
        ``estimator`` not a ``REBAR``; ``num_steps`` not an int >= 1; ``learning_rate`` not a
        finite real > 0. ValueError if the iterates stop being finite (lower
        ``learning_rate``).
    """
    import optax  # local: only the tuning needs it

    if not isinstance(estimator, REBAR):
        raise TypeError(f"`estimator` must be a REBAR, got {estimator!r}")
    if not isinstance(estimator.temperature, numbers.Real):
        raise TypeError("`estimator` must hold a concrete temperature (tune_rebar runs outside "
                        f"jit), got {estimator.temperature!r}")
    num_steps = check_int(num_steps, "`num_steps`", minimum=1)
    learning_rate = check_real(learning_rate, "`learning_rate`", exclusive_minimum=0.0)
    num_samples, q_fixed, shape, family, inner_fixed = _check_rebar_variance_call(
        rng_key, log_joint_fn, q_fn, params, num_samples)
    dtype = family.params(inner_fixed)["logits"].dtype
    optimizer = optax.adam(learning_rate)

    def best_eta(log_lam, key, n):
        """(eta*(lambda), min_eta V): V is quadratic in eta, V(eta) = v0 + 2 eta b + eta^2 c2."""
        v = jax.vmap(lambda eta: _rebar_variance(
            key, log_joint_fn, q_fn, params, q_fixed, shape, family, inner_fixed,
            jnp.exp(log_lam), eta, n))(jnp.array([-1.0, 0.0, 1.0], dtype))
        b = (v[2] - v[0]) / 4  # E[a . c]
        c2 = (v[2] + v[0] - 2 * v[1]) / 2  # E||c||^2 >= 0
        safe = c2 > jnp.finfo(dtype).tiny
        eta = jnp.where(safe, -b / jnp.where(safe, c2, 1), 0.0)
        return eta, v[1] + b * eta  # the minimum v0 - b^2 / c2

    def step(carry, key):
        log_lam, state = carry
        grad = jax.grad(lambda u: best_eta(u, key, num_samples)[1])(log_lam)
        updates, state = optimizer.update(grad, state, log_lam)
        return (optax.apply_updates(log_lam, updates), state), None

    keys = jax.random.split(rng_key, num_steps + 1)
    u0 = jnp.asarray(math.log(float(estimator.temperature)), dtype)
    (u, _), _ = jax.lax.scan(step, (u0, optimizer.init(u0)), keys[:-1])
    eta_final = best_eta(u, keys[-1], 4 * num_samples)[0]
    log_lam, eta = float(u), float(eta_final)
    temperature = math.exp(log_lam) if math.isfinite(log_lam) else math.nan
    if not (math.isfinite(eta) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(
            f"tune_rebar's iterates are not finite or the temperature underflowed (log lambda "
            f"{log_lam}, eta {eta}): lower `learning_rate` (got {learning_rate})")
    return REBAR(temperature=temperature, eta=eta)


def elbo_analytic_kl(
    rng_key: Array,
    log_likelihood_fn: Callable[[PyTree], Array],
    q: PyTree,
    prior: PyTree,
    *,
    num_samples: int = 1,
    estimator: Pathwise | ScoreFunction = Pathwise(),
) -> Array:
    """ELBO as E_q[log p(x | z)] - KL(q(z) || p(z)) with the KL in closed form (in nats).

    Same expectation as ``elbo`` with log p(x, z) = log p(x | z) + log p(z), lower variance
    because the KL term is exact (lecture 3, "Variational lower bound" second form; CENG796
    notes §5.1; Kingma & Welling 2014, eq. 10). Returns the ELBO, not its negative.

    Args:
      rng_key: a JAX PRNG key.
      log_likelihood_fn: ``z -> log p(x | z)``, ``[batch, latent_dim] -> [batch]``.
      q: distrax distribution (batch ``[batch]``) or pytree of them.
      prior: p(z), a distrax distribution of the same family whose KL to ``q`` distrax knows
        (``q.kl_divergence(prior)``); batch shape ``[]`` or ``[batch]``. A pytree ``q``
        needs a ``prior`` pytree of the same structure.
      num_samples: S >= 1 samples for the likelihood term.
      estimator: ``Pathwise()`` or ``ScoreFunction(baseline)`` for the likelihood term; the
        KL term is always differentiated exactly.

    Returns:
      ``[batch]`` ELBO estimates (nats), not the negative ELBO; dtype of
      ``log_likelihood_fn``'s output promoted with that of the KL (q's and prior's dtype).

    Raises:
      TypeError: as ``elbo`` (with ``log_likelihood_fn`` for ``log_joint_fn``); ``prior`` not
        a distrax distribution or pytree of them, or with a non-floating Gaussian
        ``loc``/``scale``; distrax has no closed-form KL for a (``q``, ``prior``) factor pair.
      ValueError: as ``elbo``; raised before any computation when ``prior`` has a different
        number of factors from ``q``, a factor whose event shape differs from q's factor's,
        or a batch shape that does not broadcast to q's batch shape (``[]`` and ``[batch]``
        do), or, checked as ``q`` is, non-finite concrete parameters or a concrete Gaussian
        scale below ``jnp.finfo(dtype).tiny``; a KL whose shape is not ``[batch]`` (a
        safeguard for unusual distributions).
    """
    num_samples = _q.check_estimator_call(rng_key, log_likelihood_fn, "log_likelihood_fn", num_samples)
    _q.check_estimator(estimator, ELBO_ANALYTIC_KL_ESTIMATORS, "elbo_analytic_kl")
    shape = _q.check_q(q)
    q_factors, prior_factors = _q.factors(q), _q.factors(prior, "prior")
    _check_prior(q_factors, prior_factors)
    _q.check_parameters(prior, "prior")
    _check_loo(estimator, num_samples)
    _check_continuous_q(q, estimator, "elbo_analytic_kl")
    is_score = isinstance(estimator, ScoreFunction)

    try:
        # distrax broadcasts a batch-[] prior against q's batch inside its own arithmetic, and a
        # distrax distribution cannot be broadcast from outside: allow that here only (the
        # caller's functions keep their numpy_rank_promotion setting); the shape is checked below.
        with jax.numpy_rank_promotion("allow"):
            kl = sum(qf.kl_divergence(pf) for qf, pf in zip(q_factors, prior_factors))
    except NotImplementedError:
        pairs = ", ".join(f"{type(qf).__name__} || {type(pf).__name__}"
                          for qf, pf in zip(q_factors, prior_factors))
        raise TypeError(
            f"distrax has no closed-form KL for `q` and `prior` ({pairs}); use a `prior` of the "
            "same family as `q`, or `elbo` with log p(x, z) = log p(x | z) + log p(z)"
        ) from None
    if tuple(kl.shape) != shape:
        raise ValueError(
            f"KL(q || prior) has shape {tuple(kl.shape)} but q's batch shape is {shape}: "
            "`prior` must have batch shape [] or q's batch shape, and the same event shape"
        )

    def one_sample(key):
        z = _q.sample(key, q)  # log q is needed only for the score term, at this z
        z = jax.lax.stop_gradient(z) if is_score else z
        log_lik = _q.call_log_density(log_likelihood_fn, z, shape, "log_likelihood_fn", q)
        log_q = _q.score_log_prob(q, z) if is_score else jnp.zeros_like(log_lik)
        return log_lik, log_q

    keys = _q.sample_keys(rng_key, num_samples)
    log_liks, log_qs = jax.vmap(one_sample)(keys)
    expected_log_lik = jnp.mean(log_liks, axis=0)
    value = expected_log_lik - kl
    if not is_score:
        return value
    if isinstance(estimator.baseline, LeaveOneOut):
        signal = log_liks - _leave_one_out_mean(log_liks)
    else:
        signal = log_liks - _constant_baseline(estimator.baseline, shape, log_liks.dtype)[None]
    return _surrogate(value, value + _score_term(signal, log_qs) / num_samples)


def _check_prior(q_factors: list, prior_factors: list) -> None:
    """``ValueError`` naming ``prior`` unless it has one factor per factor of ``q``, each with
    that factor's event shape and a batch shape broadcasting to ``q``'s. Static shapes only."""
    if len(prior_factors) != len(q_factors):
        raise ValueError(f"`prior` must have one factor per factor of `q` ({len(q_factors)}); "
                         f"got {len(prior_factors)}")
    for j, (qf, pf) in enumerate(zip(q_factors, prior_factors)):
        where = f" (factor {j})" if len(q_factors) > 1 else ""
        q_event, p_event = tuple(qf.event_shape), tuple(pf.event_shape)
        if p_event != q_event:
            raise ValueError(f"`prior`{where} must have q's event shape {q_event}; got event "
                             f"shape {p_event}")
        q_batch, p_batch = tuple(qf.batch_shape), tuple(pf.batch_shape)
        try:
            ok = np.broadcast_shapes(p_batch, q_batch) == q_batch
        except ValueError:
            ok = False
        if not ok:
            raise ValueError(f"`prior`{where} batch shape {p_batch} does not broadcast to q's "
                             f"batch shape {q_batch}: use batch shape () or {q_batch}")


def _iwae_particles(rng_key, log_joint_fn, q, shape, num_samples, estimator):
    """Per-sample pieces for ``iwae_bound``: log weights (value) and what the estimator needs."""
    is_score = isinstance(estimator, ScoreFunction)
    is_dreg = isinstance(estimator, DReG)
    fixed_q = isinstance(estimator, (StickingTheLanding, DReG))

    def one_sample(key):
        z, log_q = _draw(key, q, stop_sample=is_score)
        if is_dreg:
            # one forward pass, plus a backward pass for d log p / dz (held constant below)
            log_p, pullback = jax.vjp(
                lambda z_: _q.call_log_density(log_joint_fn, z_, shape, "log_joint_fn", q), z
            )
            (grad_log_p,) = pullback(jnp.ones_like(log_p))
        else:
            log_p = _q.call_log_density(log_joint_fn, z, shape, "log_joint_fn", q)
        out = {"log_w": log_p - log_q}
        if is_score:  # log q at the fixed z, differentiable in q's parameters (bijector inverse)
            out["log_q"] = _q.score_log_prob(q, z)
            out["log_w_fixed_z"] = log_p - out["log_q"]
        if fixed_q:  # the path terms are formed in iwae_bound, once the weights are known
            out.update(z=z, log_p=log_p, log_q=log_q, grad_log_q=_grad_z_log_q(q, z))
        if is_dreg:  # d log w / dz, held constant
            out["grad_log_w"] = jax.tree_util.tree_map(jnp.subtract, grad_log_p, out["grad_log_q"])
        return out

    return jax.vmap(one_sample)(_q.sample_keys(rng_key, num_samples))


def iwae_bound(
    rng_key: Array,
    log_joint_fn: Callable[[PyTree], Array],
    q: PyTree,
    *,
    num_samples: int,
    estimator: Pathwise | ScoreFunction | StickingTheLanding | DReG = Pathwise(),
) -> Array:
    """Importance-weighted bound log (1/K) sum_k p(x, z_k) / q(z_k), z_k ~ q (in nats).

    Computed with logsumexp, so it stays finite in float32 at K = 5000 and beyond. K = 1 gives
    the single-sample ELBO; the bound increases with K and tends to log p(x) (Burda et al. 2016,
    eq. 8 and Theorem 1). Returns the bound, not its negative.

    Args:
      rng_key: a JAX PRNG key.
      log_joint_fn: ``z -> log p(x, z)``, ``[batch, latent_dim] -> [batch]`` for one sample.
      q: proposal / variational distribution (batch ``[batch]``), or pytree of them.
      num_samples: K >= 1 (required; a Python int).
      estimator: ``Pathwise()`` (default), ``ScoreFunction(baseline)`` (``LeaveOneOut()`` gives
        VIMCO), ``StickingTheLanding()`` (biased for K > 1) or ``DReG()``.

    Returns:
      ``[batch]`` bound estimates (nats), not their negative; dtype of ``log_joint_fn``'s
      output (as ``elbo``).

    Raises:
      TypeError / ValueError: as ``elbo`` (``rng_key``, ``log_joint_fn``, ``num_samples``,
        ``q``, ``estimator``, its ``baseline``).

    Numerical range (float32): an example whose K log weights are all -inf (e.g. log p(x, z)
    below -3.4e38, as for a prior of scale 1e-20 and q of scale 1, where the true bound is about
    -5e39) has value -inf and a zero gradient, whatever the estimator (never NaN). A particle
    of normalised weight 0 (a -inf log weight, or one negligible against the others') passes
    no gradient, even where its d log p / dz overflows. Where the gradient of a particle of non-zero weight exceeds the float32 range
    (d log p / dz = -z / 1e-40 for |z| > 0.034 under that prior) it is +-inf, whatever the
    estimator: the true value is out of range. Gaussian scales of ``q`` must be at least
    ``finfo.tiny``: a traced scale is not checked, and a scale flushed to 0 (``exp`` of -100)
    gives log q = +inf, a -inf value and NaN gradients; ``vijax.nn.GaussianEncoder`` floors
    its scale at ``finfo.tiny`` for that reason.
    """
    num_samples = _q.check_estimator_call(rng_key, log_joint_fn, "log_joint_fn", num_samples)
    _q.check_estimator(estimator, IWAE_ESTIMATORS, "iwae_bound")
    shape = _q.check_q(q)
    _check_loo(estimator, num_samples)
    _check_continuous_q(q, estimator, "iwae_bound")
    p = _iwae_particles(rng_key, log_joint_fn, q, shape, num_samples, estimator)
    log_w = p["log_w"]  # [K, batch]
    value = _log_mean_exp(log_w)
    if isinstance(estimator, Pathwise):
        return value
    # normalised weights w~_k; all 0 for an example whose log weights are all -inf (softmax
    # would give NaN there), so such an example passes no gradient
    empty = jnp.all(log_w == -jnp.inf, axis=0)
    w_norm = jax.nn.softmax(jnp.where(empty[None], 0, log_w), axis=0)
    w_norm = jax.lax.stop_gradient(jnp.where(empty[None], 0, w_norm))
    if isinstance(estimator, (StickingTheLanding, DReG)):
        # log w_k with q's parameters fixed; particles of zero weight get no path term (their
        # d log q / dz is masked, see _weighted_path_term)
        log_w_fixed_q = p["log_p"] - (jax.lax.stop_gradient(p["log_q"])
                                      + _weighted_path_term(p["grad_log_q"], p["z"], w_norm))
        surrogate = _weighted_sum(w_norm, log_w_fixed_q)
        if isinstance(estimator, DReG):
            # sum_k w~_k grad log w_k gives the model gradient; the z-path term turns the
            # inference-network weights from w~_k into w~_k^2 (Tucker et al. 2019, eq. 5).
            w_path = w_norm**2 - w_norm
            surrogate = surrogate + _weighted_sum(
                w_path, _weighted_path_term(p["grad_log_w"], p["z"], w_path))
    else:  # ScoreFunction: value's own gradient (z fixed) plus the score term.
        if isinstance(estimator.baseline, LeaveOneOut):
            # VIMCO: replace log w_k by the mean of the others' log weights.
            k = num_samples
            others = _leave_one_out_mean(log_w)
            eye = jnp.eye(k, dtype=bool).reshape((k, k) + (1,) * len(shape))
            swapped = jnp.where(eye, others[None], log_w[None])  # [k replaced, K, *batch]
            signal = value[None] - jax.vmap(_log_mean_exp)(swapped)
        else:
            signal = jnp.broadcast_to(
                value - _constant_baseline(estimator.baseline, shape, value.dtype), log_w.shape
            )
        surrogate = _log_mean_exp(p["log_w_fixed_z"]) + _score_term(signal, p["log_q"])
    return _surrogate(value, surrogate)


def renyi_bound(
    rng_key: Array,
    log_joint_fn: Callable[[PyTree], Array],
    q: PyTree,
    *,
    alpha: float,
    num_samples: int,
) -> Array:
    """Variational Renyi bound (VR-alpha), Monte Carlo estimate, per example (in nats).

    L_alpha = 1/(1 - alpha) log (1/K) sum_k (p(x, z_k) / q(z_k))^(1 - alpha), z_k ~ q
    (Li & Turner 2016, eqs. 5 and 12). ``alpha = 0`` is the IWAE bound, ``alpha -> 1`` the
    ELBO (``alpha = 1`` returns the K-sample average ELBO exactly). For alpha >= 0 the
    estimator's expectation is a lower bound on log p(x), non-increasing in alpha (and so is
    the estimate for fixed samples). Near alpha = 1 it is computed centred at the mean log
    weight with ``log1p``/``expm1``, so float32 stays accurate there. Returns the bound, not its
    negative; pathwise gradient.

    Args:
      rng_key: a JAX PRNG key.
      log_joint_fn: ``z -> log p(x, z)``, ``[batch, latent_dim] -> [batch]`` for one sample.
      q: distrax distribution (batch ``[batch]``), or pytree of them.
      alpha: a concrete finite real number >= 0 (Python or NumPy int/float, or a 0-d array;
        not a bool).
      num_samples: K >= 1.

    Returns:
      ``[batch]`` bound estimates (nats), the bound itself, not its negative; dtype of
      ``log_joint_fn``'s output (as ``elbo``).

    Raises:
      TypeError: ``alpha`` not a concrete real number (a traced value, a string, a bool);
        ``q`` with non-floating (discrete) samples (the gradient is pathwise); others as
        ``elbo`` (``rng_key``, ``log_joint_fn``, ``num_samples``, ``q``).
      ValueError: ``alpha`` negative or not finite; others as ``elbo``.
    """
    num_samples = _q.check_estimator_call(rng_key, log_joint_fn, "log_joint_fn", num_samples)
    if isinstance(alpha, jax.core.Tracer):
        raise TypeError("`alpha` must be a concrete number (it selects the bound), not a traced value")
    alpha = check_real(alpha, "`alpha`", minimum=0.0, array=True)
    shape = _q.check_q(q)
    _check_continuous_q(q, Pathwise(), "renyi_bound")
    log_w = _iwae_particles(rng_key, log_joint_fn, q, shape, num_samples, Pathwise())["log_w"]
    mu = jnp.mean(log_w, axis=0)  # the alpha = 1 value
    if alpha == 1.0:
        return mu
    r = 1.0 - alpha
    # Near alpha = 1, logsumexp(r log_w) - log K cancels and / r amplifies the rounding. Centred
    # at mu, L = mu + log(mean(exp(r d))) / r = mu + log1p(mean(expm1(r d))) / r, d = log_w - mu,
    # is accurate while |r d| <= 1 (a NaN, from a -inf log weight, selects the plain formula).
    d = log_w - mu[None]
    near = jnp.max(jnp.abs(r * d), axis=0) <= 1.0
    d_near = jnp.where(near[None], d, 0)  # keeps the unused branch finite (and its gradient)
    near_one = mu + jnp.log1p(jnp.mean(jnp.expm1(r * d_near), axis=0)) / r
    return jnp.where(near, near_one, _log_mean_exp(r * log_w) / r)
