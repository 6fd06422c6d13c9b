"""Discrete latent variables: the Concrete / Gumbel-softmax distributions of ``vijax.discrete``
and the exact-enumeration estimator ``vijax.elbo.Enumerate``.

References are independent of the code under test: quadrature of the densities (they must
integrate to one and give P(argmax = k) = softmax(logits)_k), numpy float64 transcriptions of
Maddison, Mnih & Teh (2017) eq. 10 (Concrete) and eq. 21 (binary Concrete), closed-form
mixture posteriors and KL divergences, central finite differences. Monte Carlo comparisons
use fixed seeds and standard-error tolerances (``Z_TOL`` standard errors).

Every test runs under ``jax.numpy_rank_promotion("raise")`` (fixture below). The tests named
``test_regression_*`` pin bugs of the first version of ``vijax.discrete`` / ``Enumerate``
(each with its minimal reproduction): samplers and enumeration that needed implicit rank
promotion, an unchecked ``max_support`` for ``Bernoulli``, NaN log densities of underflowed
low-temperature draws, and straight-through values one rounding off one-hot.
"""

from __future__ import annotations

import math

import distrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special, stats

from vijax import discrete
from vijax import elbo as velbo

Z_TOL = 4.5  # standard errors


@pytest.fixture(autouse=True)
def _raise_on_rank_promotion():
    with jax.numpy_rank_promotion("raise"):
        yield


def _draw(dist, seed: int, n: int):
    return dist.sample(seed=jax.random.key(seed), sample_shape=(n,))


# ----------------------------------------------------------------- independent references


def concrete_log_density_np(x, logits, lam):
    """Maddison et al. (2017) eq. 10, written with products in float64 numpy:
    p(x) = (K-1)! lam^(K-1) prod_k [alpha_k x_k^(-lam-1) / sum_i alpha_i x_i^(-lam)]."""
    x, alpha = np.asarray(x, np.float64), np.exp(np.asarray(logits, np.float64))
    lam = np.asarray(lam, np.float64)[..., None]
    k = x.shape[-1]
    denom = np.sum(alpha * x ** (-lam), axis=-1, keepdims=True)
    terms = alpha * x ** (-lam - 1) / denom
    return np.log(math.factorial(k - 1) * lam[..., 0] ** (k - 1) * np.prod(terms, axis=-1))


def binary_concrete_log_density_np(x, logit, lam):
    """Maddison et al. (2017) eq. 21: p(x) = lam alpha x^(-lam-1) (1-x)^(-lam-1) /
    (alpha x^(-lam) + (1-x)^(-lam))^2, float64 numpy."""
    x, alpha, lam = (np.asarray(a, np.float64) for a in (x, np.exp(logit), lam))
    return np.log(lam * alpha * x ** (-lam - 1) * (1 - x) ** (-lam - 1)
                  / (alpha * x ** (-lam) + (1 - x) ** (-lam)) ** 2)


# ------------------------------------------------------------------------- densities


@pytest.mark.parametrize("lam, logit", [(0.5, 0.7), (1.0, -1.3), (2.5, 0.4)])
def test_relaxed_bernoulli_integrates_to_one_with_mass_sigmoid_above_half(x64, lam, logit):
    # in y = logit(x) the density p(x) x (1 - x) is smooth and decays like exp(-lam |y|):
    # trapezoid on [-36, 36] leaves < 1e-7 outside for lam >= 1/2
    y = np.linspace(-36.0, 36.0, 14401)
    x = special.expit(y)
    d = discrete.RelaxedBernoulli(lam, jnp.asarray(logit, jnp.float64))
    log_py = np.asarray(d.log_prob(jnp.asarray(x))) + np.log(x) + np.log1p(-x)
    density = np.exp(log_py)
    assert np.trapezoid(density, y) == pytest.approx(1.0, abs=1e-6)
    upper = y >= 0  # y = 0 is a grid node (a half-line trapezoid: O(h^2) at its end point)
    assert np.trapezoid(density[upper], y[upper]) == pytest.approx(special.expit(logit), abs=1e-5)


@pytest.mark.parametrize("lam", [0.5, 1.0, 3.0])
def test_relaxed_one_hot_k2_integrates_to_one_and_is_the_binary_concrete(x64, lam):
    logits = jnp.array([0.9, -0.4], jnp.float64)
    y = np.linspace(-36.0, 36.0, 14401)
    x1 = special.expit(y)
    x = jnp.asarray(np.stack([x1, special.expit(-y)], axis=-1))  # 1 - x1 without cancellation
    log_p = np.asarray(discrete.RelaxedOneHotCategorical(lam, logits).log_prob(x))
    density = np.exp(log_p + np.log(x1) + np.log(special.expit(-y)))
    assert np.trapezoid(density, y) == pytest.approx(1.0, abs=1e-6)
    upper = y >= 0  # (a half-line trapezoid: O(h^2) at its end point)
    assert np.trapezoid(density[upper], y[upper]) == pytest.approx(
        float(jax.nn.softmax(logits)[0]), abs=1e-5)
    # K = 2 Concrete = binary Concrete with logit l1 - l2 (Maddison et al. 2017, section 3.3)
    # (compared where 1 - x1, which the binary density reads from x1, is accurate)
    binary = discrete.RelaxedBernoulli(lam, logits[0] - logits[1])
    near = np.abs(y) <= 10
    np.testing.assert_allclose(log_p[near], np.asarray(binary.log_prob(x[near, 0])), rtol=1e-9,
                               atol=1e-9)


def _simplex_grid(half_width: float, h: float):
    """Cell centres of a uniform grid in y = (log x1 - log x3, log x2 - log x3), the points
    x = softmax(y1, y2, 0) and the log-Jacobian log |dx_{1:2} / dy| = sum_k log x_k."""
    centres = np.arange(-half_width + h / 2, half_width, h)
    y1, y2 = np.meshgrid(centres, centres, indexing="ij")
    y = np.stack([y1, y2, np.zeros_like(y1)], axis=-1)
    log_x = y - special.logsumexp(y, axis=-1, keepdims=True)
    return centres, np.exp(log_x), log_x.sum(-1)


@pytest.mark.parametrize("lam, logits", [(0.5, [0.6, -0.4, 0.1]), (1.0, [1.5, 0.0, -1.0])])
def test_relaxed_one_hot_k3_integrates_to_one_by_quadrature(x64, lam, logits):
    # midpoint rule in y-space (smooth, exponentially decaying integrand)
    half = 22.0 / lam
    centres, x, log_jac = _simplex_grid(half, 0.05 / lam)
    d = discrete.RelaxedOneHotCategorical(lam, jnp.asarray(logits, jnp.float64))
    mass = np.exp(np.asarray(d.log_prob(jnp.asarray(x))) + log_jac)
    h = centres[1] - centres[0]
    assert mass.sum() * h * h == pytest.approx(1.0, abs=1e-5)
    # the Gumbel-max regions carry the categorical probabilities (Proposition 1); cells whose
    # centre is a tie (on a region edge) are shared equally
    is_max = x == x.max(-1, keepdims=True)
    share = is_max / is_max.sum(-1, keepdims=True)
    for k in range(3):
        assert np.sum(mass * share[..., k]) * h * h == pytest.approx(
            float(special.softmax(logits)[k]), abs=1e-4)


def test_relaxed_one_hot_k3_integrates_to_one_by_importance_sampling(x64):
    # E_{u ~ Dirichlet(1,1,1)}[p(x) / u(x)] = 1 with u(x) = 2! on the simplex. At lam = 2 the
    # ratio is bounded (near a vertex p ~ eps^(lam - 2)), so the standard error is meaningful;
    # for lam <= 1 its variance is infinite.
    x = np.random.default_rng(0).dirichlet(np.ones(3), size=200_000)
    d = discrete.RelaxedOneHotCategorical(2.0, jnp.array([0.5, -1.0, 0.2], jnp.float64))
    ratio = np.exp(np.asarray(d.log_prob(jnp.asarray(x)))) / 2.0
    se = ratio.std(ddof=1) / np.sqrt(ratio.size)
    assert abs(ratio.mean() - 1.0) < Z_TOL * se
    assert se < 0.01  # the check has power


def _assert_counts_match(counts, probs):
    n = counts.sum()
    expected = n * probs
    z = (counts - expected) / np.sqrt(n * probs * (1 - probs))
    chi2 = float(np.sum((counts - expected) ** 2 / expected))
    assert np.all(np.abs(z) < Z_TOL), z
    assert stats.chi2.sf(chi2, len(counts) - 1) > 1e-3, chi2


def test_relaxed_bernoulli_histogram_matches_its_density(x64):
    lam, logit = 0.7, 0.4
    d = discrete.RelaxedBernoulli(lam, jnp.asarray(logit, jnp.float64))
    x = np.asarray(_draw(d, 1, 100_000))
    y = np.log(x) - np.log1p(-x)
    edges = np.array([-np.inf, -6, -3, -1.5, -0.5, 0, 0.5, 1, 1.5, 3, 6, np.inf])
    counts = np.histogram(y, edges)[0]
    # bin masses from the library's density by quadrature in y (edges on grid nodes)
    grid = np.linspace(-36, 36, 14401)
    xg = special.expit(grid)
    density = np.exp(np.asarray(d.log_prob(jnp.asarray(xg))) + np.log(xg) + np.log1p(-xg))
    cum = np.concatenate([[0.0], np.cumsum((density[1:] + density[:-1]) / 2 * np.diff(grid))])
    at = np.interp(np.clip(edges, -36, 36), grid, cum)
    probs = np.diff(at)
    assert probs.sum() == pytest.approx(1.0, abs=1e-6)
    _assert_counts_match(counts, probs)


def test_relaxed_one_hot_k3_histogram_matches_its_density(x64):
    lam, logits = 0.7, jnp.array([0.5, -0.3, 0.0], jnp.float64)
    d = discrete.RelaxedOneHotCategorical(lam, logits)
    log_x = np.log(np.asarray(_draw(d, 2, 100_000)))
    y = log_x[:, :2] - log_x[:, 2:]
    edges = np.array([-np.inf, -2.0, 0.0, 2.0, np.inf])
    counts = np.histogram2d(y[:, 0], y[:, 1], [edges, edges])[0].ravel()
    # bin masses: midpoint rule on cells whose edges include -2, 0, 2
    h, half = 0.05, 32.0
    centres, xg, log_jac = _simplex_grid(half, h)
    mass = np.exp(np.asarray(d.log_prob(jnp.asarray(xg))) + log_jac) * h * h
    idx = np.digitize(centres, edges[1:-1])
    probs = np.array([mass[np.ix_(idx == i, idx == j)].sum() for i in range(4) for j in range(4)])
    assert probs.sum() == pytest.approx(1.0, abs=1e-5)
    _assert_counts_match(counts, probs)


@pytest.mark.parametrize("lam", [3.0, 1.0, 0.3, 0.05])
def test_argmax_frequencies_are_the_categorical_probabilities_at_every_temperature(lam):
    # Maddison et al. (2017), Proposition 1: P(argmax x = k) = softmax(logits)_k for all lam
    logits = jnp.array([1.0, -0.5, 0.3, 0.0])
    n = 40_000
    x = np.asarray(_draw(discrete.RelaxedOneHotCategorical(lam, logits), 3, n))
    freq = np.bincount(np.argmax(x, -1), minlength=4) / n
    p = np.asarray(jax.nn.softmax(logits), np.float64)
    assert np.all(np.abs(freq - p) < Z_TOL * np.sqrt(p * (1 - p) / n)), (freq, p)
    # binary: P(x > 1/2) = sigmoid(logit)
    xb = np.asarray(_draw(discrete.RelaxedBernoulli(lam, 0.8), 4, n))
    pb = float(special.expit(0.8))
    assert abs(np.mean(xb > 0.5) - pb) < Z_TOL * math.sqrt(pb * (1 - pb) / n)


def test_draws_approach_one_hot_as_the_temperature_goes_to_zero():
    logits = jnp.array([1.0, -0.5, 0.3, 0.0])
    n = 20_000
    gaps, ses = [], []
    for i, lam in enumerate([2.0, 1.0, 0.5, 0.1, 0.01]):
        x = np.asarray(_draw(discrete.RelaxedOneHotCategorical(lam, logits), 10 + i, n), np.float64)
        gap = 1.0 - x.max(-1)
        gaps.append(gap.mean())
        ses.append(gap.std(ddof=1) / math.sqrt(n))
        assert np.allclose(x.sum(-1), 1.0, atol=1e-5) and np.all(x >= 0)
    gaps, ses = np.array(gaps), np.array(ses)
    assert np.all(gaps[:-1] - gaps[1:] > Z_TOL * np.hypot(ses[:-1], ses[1:])), gaps
    assert gaps[-1] < 0.01  # mean 1 - max coordinate at lam = 0.01
    xb = np.asarray(_draw(discrete.RelaxedBernoulli(0.01, 0.8), 20, n), np.float64)
    assert np.mean(np.minimum(xb, 1 - xb)) < 0.01


# ---------------------------------------------------------------- log density vs eq. 10/21


def test_concrete_log_density_matches_maddison_eq10_in_float64(x64):
    rng = np.random.default_rng(5)
    logits = rng.normal(size=(3, 5)) * 2.0
    lam = np.array([0.3, 1.0, 2.7])  # one temperature per batch entry
    x = rng.dirichlet(np.ones(5), size=(7, 3))  # [7, 3, 5]: sample axis, batch, K
    d = discrete.RelaxedOneHotCategorical(jnp.asarray(lam), jnp.asarray(logits))
    assert d.batch_shape == (3,) and d.event_shape == (5,)
    got = np.asarray(d.log_prob(jnp.asarray(x)))
    np.testing.assert_allclose(got, concrete_log_density_np(x, logits, lam), rtol=1e-11,
                               atol=1e-11)
    # shifting the logits does not change the distribution
    shifted = discrete.RelaxedOneHotCategorical(jnp.asarray(lam), jnp.asarray(logits + 3.0))
    np.testing.assert_allclose(np.asarray(shifted.log_prob(jnp.asarray(x))), got, rtol=1e-11)


def test_concrete_log_density_in_float32_and_its_own_samples():
    rng = np.random.default_rng(6)
    logits = rng.normal(size=(4, 3)).astype(np.float32)
    d = discrete.RelaxedOneHotCategorical(0.6, jnp.asarray(logits))
    x, log_q = d.sample_and_log_prob(seed=jax.random.key(0), sample_shape=(50,))
    ref = concrete_log_density_np(np.asarray(x, np.float64), logits, np.full(4, 0.6))
    finite = np.all(np.asarray(x) > 1e-30, axis=-1)  # where x itself did not underflow
    assert finite.mean() > 0.9
    np.testing.assert_allclose(np.asarray(log_q)[finite], ref[finite], rtol=2e-4, atol=2e-3)
    np.testing.assert_allclose(np.asarray(d.log_prob(x))[finite], ref[finite], rtol=2e-4,
                               atol=2e-3)


def test_binary_concrete_log_density_matches_maddison_eq21_in_float64(x64):
    rng = np.random.default_rng(7)
    logit = rng.normal(size=(6,)) * 2.0
    lam = np.array([0.2, 0.5, 1.0, 1.0, 2.0, 4.0])
    x = rng.uniform(0.001, 0.999, size=(6,))
    d = discrete.RelaxedBernoulli(jnp.asarray(lam), jnp.asarray(logit))
    np.testing.assert_allclose(np.asarray(d.log_prob(jnp.asarray(x))),
                               binary_concrete_log_density_np(x, logit, lam), rtol=1e-11)
    xs, log_q = d.sample_and_log_prob(seed=jax.random.key(1), sample_shape=(20,))
    # (the reference reads 1 - x from the rounded x: compared where that is accurate)
    interior = (np.asarray(xs) > 1e-6) & (np.asarray(xs) < 1 - 1e-6)
    assert interior.mean() > 0.5
    np.testing.assert_allclose(np.asarray(log_q)[interior], binary_concrete_log_density_np(
        np.asarray(xs), logit, lam)[interior], rtol=1e-8, atol=1e-8)


def test_straight_through_is_the_hard_argmax_with_the_relaxed_gradient():
    logits = jnp.array([[0.5, -1.0, 0.2, 1.1], [0.0, 0.0, 0.0, 0.0]])
    w = jnp.array([[1.0, -2.0, 0.5, 3.0], [2.0, 0.0, -1.0, 0.3]])
    key = jax.random.key(3)

    def weighted(cls, lg):
        x = cls(0.7, lg).sample(seed=key, sample_shape=(16,))
        return jnp.sum(x * w[None]), x

    (_, hard), g_st = jax.value_and_grad(lambda lg: weighted(
        discrete.StraightThroughOneHotCategorical, lg), has_aux=True)(logits)
    (_, soft), g_relaxed = jax.value_and_grad(lambda lg: weighted(
        discrete.RelaxedOneHotCategorical, lg), has_aux=True)(logits)
    hard, soft = np.asarray(hard), np.asarray(soft)
    np.testing.assert_array_equal(hard, np.eye(4)[np.argmax(soft, -1)])
    np.testing.assert_allclose(np.asarray(g_st), np.asarray(g_relaxed), rtol=1e-5, atol=1e-6)
    st = discrete.StraightThroughOneHotCategorical(0.7, logits)
    np.testing.assert_allclose(np.asarray(st.log_prob(jnp.asarray(hard))),
                               np.sum(hard * np.asarray(jax.nn.log_softmax(logits))[None], -1),
                               rtol=1e-6)


# ------------------------------------------------------------------------ stability


def test_low_temperature_and_extreme_logits_stay_finite_with_finite_gradients():
    logits = jnp.array([[100.0, -100.0, 0.0], [0.0, 0.0, 0.0], [-100.0, 50.0, 100.0]])
    c = jnp.array([1.0, -2.0, 0.5])
    key = jax.random.key(0)
    for lam in (0.01, 0.1):
        for cls in (discrete.RelaxedOneHotCategorical, discrete.StraightThroughOneHotCategorical):
            def f(lg, cls=cls, lam=lam):
                x, log_q = cls(lam, lg).sample_and_log_prob(seed=key, sample_shape=(64,))
                return jnp.sum(log_q) + jnp.sum(x @ c), (x, log_q)

            (value, (x, log_q)), g = jax.jit(jax.value_and_grad(f, has_aux=True))(logits)
            assert np.all(np.isfinite(np.asarray(x))) and np.all(np.isfinite(np.asarray(log_q)))
            assert np.isfinite(float(value)) and np.all(np.isfinite(np.asarray(g))), (cls, lam)

        def fb(lg, lam=lam):
            x, log_q = discrete.RelaxedBernoulli(lam, lg).sample_and_log_prob(
                seed=key, sample_shape=(64,))
            return jnp.sum(log_q) + jnp.sum(x * c[None]), (x, log_q)

        (value, (x, log_q)), g = jax.jit(jax.value_and_grad(fb, has_aux=True))(logits[:, 0])
        assert np.all(np.isfinite(np.asarray(log_q))) and np.all(np.isfinite(np.asarray(g)))
        assert np.all((np.asarray(x) >= 0) & (np.asarray(x) <= 1))

        # the ELBO of a relaxed q with a log joint that does not read log x: value and
        # pathwise gradient finite
        def elbo(lg, lam=lam):
            q = distrax.Independent(discrete.RelaxedOneHotCategorical(lam, lg[None]), 1)
            return jnp.sum(velbo.elbo(key, lambda z: jnp.sum(z @ c, -1), q, num_samples=8))

        value, g = jax.jit(jax.value_and_grad(elbo))(logits)
        assert np.isfinite(float(value)) and np.all(np.isfinite(np.asarray(g)))


# -------------------------------------------------------------------- exact enumeration


def _mixture(dtype=jnp.float64):
    """A 1-D Gaussian mixture, K = 3, and 5 observations: (theta, x)."""
    theta = {"a": jnp.array([0.3, -0.2, 0.1], dtype), "mu": jnp.array([-1.5, 0.2, 2.0], dtype),
             "log_sigma": jnp.array([-0.3, 0.1, -0.5], dtype)}
    x = jnp.array([-1.2, 0.0, 0.7, 2.4, -3.0], dtype)
    return theta, x


def _log_joint_table(theta, x):
    """log pi_k + log N(x_n | mu_k, sigma_k^2), ``[N, K]``."""
    sigma = jnp.exp(theta["log_sigma"])
    d = (x[:, None] - theta["mu"][None]) / sigma[None]
    return (jax.nn.log_softmax(theta["a"])[None] - 0.5 * d**2 - theta["log_sigma"][None]
            - 0.5 * math.log(2 * math.pi))


def _index_log_joint(table):
    return lambda z: jnp.take_along_axis(table, z[:, None].astype(jnp.int32), axis=1)[:, 0]


def _one_hot_log_joint(table):
    return lambda z: jnp.sum(z * table, axis=-1)


def test_enumerated_elbo_is_log_evidence_at_the_exact_posterior(x64):
    theta, x = _mixture()
    table = _log_joint_table(theta, x)
    log_px = special.logsumexp(np.asarray(table), axis=1)
    for q, fn in ((distrax.Categorical(logits=table), _index_log_joint(table)),
                  (distrax.OneHotCategorical(logits=table), _one_hot_log_joint(table))):
        value = velbo.elbo(jax.random.key(0), fn, q, estimator=velbo.Enumerate())
        np.testing.assert_allclose(np.asarray(value), log_px, rtol=1e-13, atol=1e-13)


def test_enumerated_elbo_gap_is_the_kl_to_the_posterior(x64):
    theta, x = _mixture()
    table = _log_joint_table(theta, x)
    q_logits = jnp.asarray(np.random.default_rng(0).normal(size=(5, 3)) * 1.5)
    t = np.asarray(table)
    log_q = q_logits - special.logsumexp(np.asarray(q_logits), axis=1, keepdims=True)
    log_post = t - special.logsumexp(t, axis=1, keepdims=True)
    kl = np.sum(np.exp(log_q) * (np.asarray(log_q) - log_post), axis=1)
    log_px = special.logsumexp(t, axis=1)
    assert np.all(kl > 1e-3)
    for q, fn in ((distrax.Categorical(logits=q_logits), _index_log_joint(table)),
                  (distrax.OneHotCategorical(logits=q_logits), _one_hot_log_joint(table))):
        value = np.asarray(velbo.elbo(jax.random.key(0), fn, q, estimator=velbo.Enumerate()))
        np.testing.assert_allclose(log_px - value, kl, rtol=1e-12, atol=1e-13)


def _bits(d):
    return (np.arange(2**d)[:, None] >> np.arange(d)[None, :]) & 1


def test_enumerated_elbo_for_bernoulli_bits(x64):
    # an arbitrary joint over 3 bits per example: log p(x_b, z) = T[b, index(z)]
    rng = np.random.default_rng(1)
    table = rng.normal(size=(4, 8)) * 2.0
    q_logits = rng.normal(size=(4, 3))
    bits = _bits(3)
    weights = 2 ** np.arange(3)

    def log_joint(z):
        idx = jnp.sum(z.astype(jnp.int32) * jnp.asarray(weights)[None], axis=-1)
        return jnp.take_along_axis(jnp.asarray(table), idx[:, None], axis=1)[:, 0]

    q = distrax.Independent(distrax.Bernoulli(logits=jnp.asarray(q_logits)), 1)
    value = np.asarray(velbo.elbo(jax.random.key(0), log_joint, q,
                                  estimator=velbo.Enumerate(max_support=8)))
    log_q = (bits[None] * special.log_expit(q_logits)[:, None]
             + (1 - bits[None]) * special.log_expit(-q_logits)[:, None]).sum(-1)  # [4, 8]
    expected = np.sum(np.exp(log_q) * (table - log_q), axis=1)
    np.testing.assert_allclose(value, expected, rtol=1e-12)
    log_post = table - special.logsumexp(table, axis=1, keepdims=True)
    kl = np.sum(np.exp(log_q) * (log_q - log_post), axis=1)
    np.testing.assert_allclose(special.logsumexp(table, axis=1) - value, kl, rtol=1e-10)
    # one bit (event shape []): E_q f = q f(1) + (1 - q) f(0) - entropy
    q1 = distrax.Bernoulli(logits=jnp.asarray(q_logits[:, 0]))
    v1 = np.asarray(velbo.elbo(jax.random.key(0), lambda z: jnp.asarray(table[:, :2]).T[
        z.astype(jnp.int32), jnp.arange(4)], q1, estimator=velbo.Enumerate()))
    p1 = special.expit(q_logits[:, 0])
    np.testing.assert_allclose(v1, p1 * (table[:, 1] - np.log(p1))
                               + (1 - p1) * (table[:, 0] - np.log1p(-p1)), rtol=1e-12)


def _flat_params(theta, q_logits):
    return jnp.concatenate([theta["a"], theta["mu"], theta["log_sigma"], q_logits.ravel()])


def _unflat(v):
    return {"a": v[:3], "mu": v[3:6], "log_sigma": v[6:9]}, v[9:].reshape(5, 3)


def _sum_elbo(v, x, estimator, key=None, num_samples=1):
    theta, q_logits = _unflat(v)
    q = distrax.Categorical(logits=q_logits)
    key = jax.random.key(0) if key is None else key
    return jnp.sum(velbo.elbo(key, _index_log_joint(_log_joint_table(theta, x)), q,
                              num_samples=num_samples, estimator=estimator))


def test_enumerated_elbo_gradient_matches_central_differences(x64):
    theta, x = _mixture()
    v = _flat_params(theta, jnp.asarray(np.random.default_rng(2).normal(size=(5, 3))))
    f = jax.jit(lambda v: _sum_elbo(v, x, velbo.Enumerate()))
    grad = np.asarray(jax.grad(lambda v: _sum_elbo(v, x, velbo.Enumerate()))(v))
    h = 1e-5
    eye = np.eye(v.size)
    fd = np.array([(float(f(v + h * e)) - float(f(v - h * e))) / (2 * h) for e in eye])
    np.testing.assert_allclose(grad, fd, rtol=1e-7, atol=1e-8)
    assert np.max(np.abs(grad)) > 0.5


# ------------------------------------------------------------ estimators vs the exact one


def _gradient_samples(fn, v, num_keys, seed):
    keys = jax.random.split(jax.random.key(seed), num_keys)
    return np.asarray(jax.jit(jax.vmap(lambda k: jax.grad(fn)(v, k)))(keys))


def test_score_function_with_leave_one_out_is_unbiased_for_the_enumerated_gradient(x64):
    theta, x = _mixture()
    v = _flat_params(theta, jnp.asarray(np.random.default_rng(3).normal(size=(5, 3))))
    exact = np.asarray(jax.grad(lambda v: _sum_elbo(v, x, velbo.Enumerate()))(v))
    loo = velbo.ScoreFunction(velbo.LeaveOneOut())
    g = _gradient_samples(lambda v, k: _sum_elbo(v, x, loo, k, num_samples=3), v, 6000, 4)
    mean, se = g.mean(0), g.std(0, ddof=1) / math.sqrt(g.shape[0])
    z = np.abs(mean - exact) / se
    assert np.all(z < Z_TOL), (z.max(), mean, exact)
    # no baseline is unbiased too, with a larger variance in the q-logit coordinates
    none = _gradient_samples(lambda v, k: _sum_elbo(v, x, velbo.ScoreFunction(), k,
                                                    num_samples=3), v, 6000, 5)
    z = np.abs(none.mean(0) - exact) / (none.std(0, ddof=1) / math.sqrt(none.shape[0]))
    assert np.all(z < Z_TOL)
    assert g[:, 9:].var(0).sum() < 0.9 * none[:, 9:].var(0).sum()


def _f_on_simplex(z):
    """A smooth nonlinear objective of a (relaxed or hard) one-hot z ``[..., 3]``."""
    return (z @ jnp.array([1.0, -2.0, 0.5])) ** 2 + z @ jnp.array([0.3, 1.0, -1.0])


def test_straight_through_gradient_is_biased():
    logits = jnp.array([[0.4, -0.3, 0.1]])

    def exact_elbo(lg):
        q = distrax.OneHotCategorical(logits=lg)
        return jnp.sum(velbo.elbo(jax.random.key(0), _f_on_simplex, q,
                                  estimator=velbo.Enumerate()))

    exact = np.asarray(jax.grad(exact_elbo)(logits)).ravel()

    def st_elbo(lg, key):
        q = discrete.StraightThroughOneHotCategorical(1.0, lg)
        return jnp.sum(velbo.elbo(key, _f_on_simplex, q))

    # the value is the discrete ELBO's: the same single-sample values as a hard sample
    v_st = velbo.elbo(jax.random.key(1), _f_on_simplex,
                      discrete.StraightThroughOneHotCategorical(1.0, logits), num_samples=4000)
    assert float(v_st[0]) == pytest.approx(float(exact_elbo(logits)), abs=0.15)
    g = _gradient_samples(st_elbo, logits, 8000, 6).reshape(8000, -1)
    mean, se = g.mean(0), g.std(0, ddof=1) / math.sqrt(g.shape[0])
    z = np.abs(mean - exact) / se
    assert z.max() > 10 * Z_TOL, (z, mean, exact)


def test_gumbel_softmax_gradient_bias_falls_and_variance_grows_as_temperature_falls():
    """grad E_{y ~ Concrete(tau)} f(y) (pathwise) vs grad E_{z ~ Cat} f(z) (enumerated)."""
    logits = jnp.array([[0.4, -0.3, 0.1]])

    def exact_objective(lg):  # E_q f = ELBO - entropy, the ELBO by enumeration
        q = distrax.OneHotCategorical(logits=lg)
        p = jax.nn.softmax(lg)
        entropy = -jnp.sum(p * jax.nn.log_softmax(lg))
        return jnp.sum(velbo.elbo(jax.random.key(0), _f_on_simplex, q,
                                  estimator=velbo.Enumerate())) - entropy

    exact = np.asarray(jax.grad(exact_objective)(logits)).ravel()
    n = 20_000
    bias, bias_se, variance = [], [], []
    for i, tau in enumerate([1.0, 0.5, 0.1]):
        def relaxed(lg, key, tau=tau):
            y = discrete.RelaxedOneHotCategorical(tau, lg).sample(seed=key)
            return jnp.sum(_f_on_simplex(y))

        g = _gradient_samples(relaxed, logits, n, 7 + i).reshape(n, -1)
        mean = g.mean(0)
        cov_trace = g.var(0, ddof=1).sum()
        err = mean - exact
        bias.append(float(np.linalg.norm(err)))
        # standard error of ||mean - exact|| (delta method): sqrt(e' Cov e / n) / ||e||
        bias_se.append(float(np.sqrt(err @ np.cov(g.T) @ err / n) / np.linalg.norm(err)))
        variance.append(float(cov_trace))
    bias, bias_se, variance = map(np.array, (bias, bias_se, variance))
    print("tau 1, 0.5, 0.1: |bias|", bias, "+-", bias_se, "tr Cov", variance,
          "|exact|", np.linalg.norm(exact))
    assert np.all(bias[:-1] - bias[1:] > Z_TOL * np.hypot(bias_se[:-1], bias_se[1:])), bias
    assert bias[-1] < 0.2 * np.linalg.norm(exact)
    assert np.all(variance[1:] > 1.2 * variance[:-1]), variance


# ------------------------------------------------------------------------ bad inputs


@pytest.mark.parametrize("cls", [discrete.RelaxedOneHotCategorical, discrete.RelaxedBernoulli,
                                 discrete.StraightThroughOneHotCategorical])
@pytest.mark.parametrize("temperature, error", [
    (0.0, ValueError), (-1.0, ValueError), (float("nan"), ValueError), (float("inf"), ValueError),
    (True, TypeError), (np.bool_(True), TypeError), (jnp.array(True), TypeError),
    (jnp.array([1.0, 0.0, 1.0]), ValueError), (np.array([1.0, np.nan, 1.0]), ValueError),
    ("1.0", TypeError), (None, TypeError)])
def test_bad_temperature_raises(cls, temperature, error):
    with pytest.raises(error, match="temperature"):
        cls(temperature, jnp.zeros((3, 4)))


@pytest.mark.parametrize("cls", [discrete.RelaxedOneHotCategorical, discrete.RelaxedBernoulli,
                                 discrete.StraightThroughOneHotCategorical])
@pytest.mark.parametrize("logits, error", [
    (jnp.array([0.0, jnp.nan]), ValueError), (jnp.array([0.0, jnp.inf]), ValueError),
    (np.array([-np.inf, 0.0]), ValueError), (jnp.array([True, False]), TypeError)])
def test_bad_logits_raise(cls, logits, error):
    with pytest.raises(error, match="logits"):
        cls(1.0, logits)


@pytest.mark.parametrize("cls", [discrete.RelaxedOneHotCategorical,
                                 discrete.StraightThroughOneHotCategorical])
@pytest.mark.parametrize("logits", [jnp.zeros((1,)), jnp.zeros((4, 1)), jnp.zeros(())])
def test_fewer_than_two_classes_raise(cls, logits):
    with pytest.raises(ValueError, match="K >= 2"):
        cls(1.0, logits)


def _zeros(shape):
    return lambda z: jnp.zeros(shape)


def test_enumerate_refuses_a_support_larger_than_max_support():
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="max_support"):
        velbo.elbo(key, _zeros(2), distrax.Categorical(logits=jnp.zeros((2, 5))),
                   estimator=velbo.Enumerate(max_support=4))
    with pytest.raises(ValueError, match="max_support"):
        velbo.elbo(key, _zeros(2), distrax.OneHotCategorical(logits=jnp.zeros((2, 5))),
                   estimator=velbo.Enumerate(max_support=4))
    with pytest.raises(ValueError, match="max_support"):  # 2^11 = 2048 > 1024 (default)
        velbo.elbo(key, _zeros(2), distrax.Independent(
            distrax.Bernoulli(logits=jnp.zeros((2, 11))), 1), estimator=velbo.Enumerate())
    with pytest.raises(ValueError, match="max_support"):
        velbo.elbo(key, _zeros(2), distrax.Independent(
            distrax.Bernoulli(logits=jnp.zeros((2, 4))), 1), estimator=velbo.Enumerate(15))
    with pytest.raises(ValueError, match="max_support"):  # far too many bits: no 2^d array
        velbo.elbo(key, _zeros(2), distrax.Independent(
            distrax.Bernoulli(logits=jnp.zeros((2, 70))), 1),
            estimator=velbo.Enumerate(max_support=2**62))
    # exactly max_support configurations are enumerated
    q = distrax.Categorical(logits=jnp.zeros((2, 4)))
    value = velbo.elbo(key, _zeros(2), q, estimator=velbo.Enumerate(max_support=4))
    np.testing.assert_allclose(np.asarray(value), math.log(4), rtol=1e-6)


@pytest.mark.parametrize("max_support, error", [(0, ValueError), (-3, ValueError),
                                                (2.0, TypeError), (True, TypeError),
                                                ("8", TypeError), (None, TypeError)])
def test_enumerate_max_support_must_be_a_positive_int(max_support, error):
    with pytest.raises(error, match="max_support"):
        velbo.Enumerate(max_support=max_support)


def test_enumerate_needs_one_sample():
    q = distrax.Categorical(logits=jnp.zeros((2, 3)))
    for num_samples in (2, 10):
        with pytest.raises(ValueError, match="num_samples"):
            velbo.elbo(jax.random.key(0), _zeros(2), q, num_samples=num_samples,
                       estimator=velbo.Enumerate())


@pytest.mark.parametrize("q", [
    distrax.MultivariateNormalDiag(jnp.zeros((2, 3)), jnp.ones((2, 3))),
    distrax.Normal(jnp.zeros(2), jnp.ones(2)),
    discrete.RelaxedOneHotCategorical(0.5, jnp.zeros((2, 3))),
    discrete.StraightThroughOneHotCategorical(0.5, jnp.zeros((2, 3))),
    distrax.Independent(distrax.OneHotCategorical(logits=jnp.zeros((2, 4, 3))), 1),
], ids=["mvn-diag", "normal", "relaxed", "straight-through", "independent-one-hot"])
def test_enumerate_refuses_a_q_it_cannot_enumerate(q):
    with pytest.raises(TypeError, match="Enumerate"):
        velbo.elbo(jax.random.key(0), _zeros(2), q, estimator=velbo.Enumerate())


@pytest.mark.parametrize("wrap", [lambda q: {"z": q}, lambda q: (q,), lambda q: [q, q]],
                         ids=["dict", "tuple", "list"])
def test_enumerate_refuses_a_pytree_q(wrap):
    q = distrax.Categorical(logits=jnp.zeros((2, 3)))
    with pytest.raises(TypeError, match="pytree"):
        velbo.elbo(jax.random.key(0), _zeros(2), wrap(q), estimator=velbo.Enumerate())


# -------------------------------------------------------- regressions (first-version bugs)


@pytest.mark.parametrize("make", [
    lambda: discrete.RelaxedOneHotCategorical(0.5, jnp.zeros(4)),
    lambda: discrete.RelaxedOneHotCategorical(jnp.array([0.5, 1.0]), jnp.zeros((2, 4))),
    lambda: discrete.RelaxedBernoulli(0.5, jnp.zeros(3)),
    lambda: discrete.StraightThroughOneHotCategorical(0.5, jnp.zeros((2, 4)))],
    ids=["relaxed", "relaxed-batch", "binary", "straight-through"])
def test_regression_sampling_under_rank_promotion_raise(make):
    # was: ValueError "Operands could not be broadcast together for add on shapes (4,) (1, 4)"
    # (logits [*batch, K] + noise [n, *batch, K] by implicit rank promotion)
    d = make()
    x = d.sample(seed=jax.random.key(0), sample_shape=(5,))
    x2, log_q = d.sample_and_log_prob(seed=jax.random.key(0), sample_shape=(5,))
    assert x.shape == (5,) + d.batch_shape + d.event_shape
    np.testing.assert_array_equal(np.asarray(x), np.asarray(x2))
    assert log_q.shape == (5,) + d.batch_shape and np.all(np.isfinite(np.asarray(log_q)))
    # elbo's check of q's sample dtype samples too
    q = distrax.Independent(d, 1) if d.batch_shape else d
    value = velbo.elbo(jax.random.key(1), lambda z: jnp.zeros(q.batch_shape), q)
    assert value.shape == q.batch_shape


def test_regression_relaxed_bernoulli_log_prob_of_sample_axes_under_rank_promotion_raise():
    # was: ValueError "... for multiply on shapes (3,) (5, 3)"
    d = discrete.RelaxedBernoulli(0.5, jnp.array([0.0, 1.0, -1.0]))
    values = jnp.full((5, 3), 0.3)
    np.testing.assert_allclose(np.asarray(d.log_prob(values)),
                               np.broadcast_to(np.asarray(d.log_prob(values[0])), (5, 3)),
                               rtol=1e-6)


def test_regression_enumerate_bernoulli_under_rank_promotion_raise():
    # was: ValueError "... for less on shapes (1, 3) (3,)" (distrax's Bernoulli.dtype samples)
    q = distrax.Independent(distrax.Bernoulli(logits=jnp.zeros((2, 3))), 1)
    value = velbo.elbo(jax.random.key(0), _zeros(2), q, estimator=velbo.Enumerate())
    np.testing.assert_allclose(np.asarray(value), 3 * math.log(2), rtol=1e-6)


def test_regression_enumerate_max_support_is_checked_for_bernoulli():
    # was: Enumerate(max_support=1) enumerated the 2 outcomes of a Bernoulli
    q = distrax.Bernoulli(logits=jnp.zeros(2))
    with pytest.raises(ValueError, match="max_support"):
        velbo.elbo(jax.random.key(0), _zeros(2), q, estimator=velbo.Enumerate(max_support=1))
    value = velbo.elbo(jax.random.key(0), _zeros(2), q, estimator=velbo.Enumerate(max_support=2))
    np.testing.assert_allclose(np.asarray(value), math.log(2), rtol=1e-6)


def test_regression_straight_through_value_is_exactly_one_hot():
    # was: hard + y - stop_gradient(y), whose hot entry rounds to 1 - 2^-24 in float32
    st = discrete.StraightThroughOneHotCategorical(0.7, jnp.array([[0.5, -1.0, 0.2, 1.1]]))
    x = np.asarray(st.sample(seed=jax.random.key(3), sample_shape=(256,)))
    np.testing.assert_array_equal(x, np.eye(4)[np.argmax(x, -1)])


def test_regression_log_prob_of_own_low_temperature_sample_is_finite():
    # was: NaN: at temperature 0.01 sample() rounds exp(log x) to exact zeros, log_prob read
    # log 0, and the relaxed ELBO with a relaxed prior (Maddison et al.'s objective) was NaN
    key = jax.random.key(0)
    q = discrete.RelaxedOneHotCategorical(0.01, jnp.zeros((2, 3)))
    prior = discrete.RelaxedOneHotCategorical(0.01, jnp.zeros(3))
    x = q.sample(seed=key, sample_shape=(64,))
    assert np.any(np.asarray(x) == 0)  # the draws do underflow
    assert np.all(np.isfinite(np.asarray(q.log_prob(x))))
    value = velbo.elbo(key, prior.log_prob, q, num_samples=4)
    assert np.all(np.isfinite(np.asarray(value)))
    g = jax.jit(jax.grad(lambda lg: jnp.sum(velbo.elbo(
        key, prior.log_prob, discrete.RelaxedOneHotCategorical(0.01, lg), num_samples=4))))(
        jnp.zeros((2, 3)))
    assert np.all(np.isfinite(np.asarray(g)))
    b = discrete.RelaxedBernoulli(0.01, jnp.array([0.0, 100.0, -100.0]))
    xb = b.sample(seed=key, sample_shape=(64,))
    assert np.any((np.asarray(xb) == 0) | (np.asarray(xb) == 1))
    assert np.all(np.isfinite(np.asarray(b.log_prob(xb))))
