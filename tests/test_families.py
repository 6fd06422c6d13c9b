"""vijax.families: each family's density against an independent formula (scipy, or the
change-of-variables density written out by hand), sample moments against the family's
covariance built here from the raw parameters, batch (local) families, pytrees of families in
``svi.fit`` against a closed-form posterior, and the constructors' named errors.

Every test runs under ``jax.numpy_rank_promotion("raise")``. Monte Carlo checks use a few
standard errors of the estimator as tolerance.
"""

from __future__ import annotations

import dataclasses
import functools

import distrax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.special
import scipy.stats

from vijax import families as F
from vijax import svi


@pytest.fixture(autouse=True, scope="module")
def _strict_rank_promotion():
    """Module-scoped (so module fixtures are built under it too)."""
    with jax.numpy_rank_promotion("raise"):
        yield


def _softplus(x):
    return np.logaddexp(0.0, np.asarray(x, np.float64))


def _full_rank_scale(off_diag, raw_diag):
    """FullRankNormal's documented L = diag(softplus(raw_diag)) (I + strict_lower(off_diag))."""
    off_diag = np.asarray(off_diag, np.float64)
    unit = np.tril(off_diag, -1) + np.eye(off_diag.shape[-1])
    return _softplus(raw_diag)[:, None] * unit


@functools.partial(jax.jit, static_argnums=(0, 3))
def _draw(family, params, key, num_samples):
    """``num_samples`` draws of ``svi.sample`` and their log q by ``log_prob`` (the inverse
    pass), compiled once per family (eager distrax calls would compile op by op). Also checks
    that the forward pass the objectives use (``sample_and_log_prob`` with the same keys)
    gives the same draws and the same log q."""
    z = svi.sample(key, family, params, num_samples)
    q = F.distribution(family, params)
    log_q = jax.vmap(q.log_prob)(z)
    with jax.numpy_rank_promotion("allow"):  # distrax's internal broadcasting only
        z_fwd, log_q_fwd = jax.vmap(lambda k: q.sample_and_log_prob(seed=k))(
            jax.random.split(key, num_samples))
    return z, log_q, z_fwd, log_q_fwd


def _draw_checked(family, params, key, num_samples, rtol=1e-9):
    z, log_q, z_fwd, log_q_fwd = _draw(family, params, key, num_samples)
    np.testing.assert_allclose(z_fwd, z, rtol=1e-12)
    np.testing.assert_allclose(log_q_fwd, log_q, rtol=rtol)
    return z, log_q


def _batch_shape(family, params):
    """q's batch shape, traced abstractly (no compile)."""
    return jax.eval_shape(lambda p: jnp.zeros(family.distribution(p).batch_shape), params).shape


def _mc_mean_and_se(samples):
    samples = np.asarray(samples, np.float64)
    return samples.mean(0), samples.std(0, ddof=1) / np.sqrt(samples.shape[0])


def _check_gaussian_moments(z, loc, cov, k=5.0):
    """Sample mean and covariance of ``z [n, d]`` within ``k`` standard errors of (loc, cov);
    for Gaussians var(sample cov_ij) = (cov_ij^2 + cov_ii cov_jj) / n."""
    z = np.asarray(z, np.float64)
    n = z.shape[0]
    se_mean = np.sqrt(np.diag(cov) / n)
    assert np.all(np.abs(z.mean(0) - loc) < k * se_mean), (z.mean(0), loc, se_mean)
    se_cov = np.sqrt((cov ** 2 + np.outer(np.diag(cov), np.diag(cov))) / n)
    emp = np.cov(z.T)
    assert np.all(np.abs(emp - cov) < k * se_cov), (emp, cov, se_cov)


# ------------------------------------------------------------------ Gaussian families


@pytest.mark.parametrize("event_shape", [(), (3,), (2, 3)])
def test_mean_field_log_prob_matches_scipy(x64, event_shape):
    rng = np.random.default_rng(0)
    family = F.MeanFieldNormal(event_shape)
    params = {"loc": jnp.asarray(rng.normal(size=event_shape)),
              "raw_scale": jnp.asarray(rng.normal(size=event_shape))}
    assert _batch_shape(family, params) == ()
    z, log_q = _draw_checked(family, params, jax.random.key(1), 2000)
    assert z.shape == (2000, *event_shape) and z.dtype == jnp.float64
    loc, scale = np.asarray(params["loc"]), _softplus(params["raw_scale"])
    ref = scipy.stats.norm(loc, scale).logpdf(np.asarray(z))
    ref = ref.reshape(2000, -1).sum(1)
    np.testing.assert_allclose(log_q, ref, rtol=1e-10)
    flat = np.asarray(z).reshape(2000, -1)
    _check_gaussian_moments(flat, loc.ravel(), np.diag(scale.ravel() ** 2))


def test_full_rank_log_prob_and_moments_match_scipy(x64):
    rng = np.random.default_rng(1)
    d = 3
    family = F.FullRankNormal(d)
    params = {"loc": jnp.asarray(rng.normal(size=d)), "raw_diag": jnp.asarray(rng.normal(size=d)),
              "off_diag": jnp.asarray(rng.normal(size=(d, d)))}  # upper triangle must be ignored
    tril = _full_rank_scale(params["off_diag"], params["raw_diag"])
    cov = tril @ tril.T
    z, log_q = _draw_checked(family, params, jax.random.key(2), 4000)
    ref = scipy.stats.multivariate_normal(np.asarray(params["loc"]), cov).logpdf(np.asarray(z))
    np.testing.assert_allclose(log_q, ref, rtol=1e-10)
    _check_gaussian_moments(z, np.asarray(params["loc"]), cov)


def test_low_rank_log_prob_and_moments_match_scipy(x64):
    """Scale S = diag(softplus(raw_diag)) + U U^T, covariance S S^T (the documented form)."""
    rng = np.random.default_rng(2)
    d, r = 4, 2
    family = F.LowRankNormal(d, r)
    params = {"loc": jnp.asarray(rng.normal(size=d)), "raw_diag": jnp.asarray(rng.normal(size=d)),
              "u": jnp.asarray(0.7 * rng.normal(size=(d, r)))}
    u = np.asarray(params["u"])
    scale = np.diag(_softplus(params["raw_diag"])) + u @ u.T
    cov = scale @ scale.T
    z, log_q = _draw_checked(family, params, jax.random.key(3), 4000)
    ref = scipy.stats.multivariate_normal(np.asarray(params["loc"]), cov).logpdf(np.asarray(z))
    np.testing.assert_allclose(log_q, ref, rtol=1e-10)
    _check_gaussian_moments(z, np.asarray(params["loc"]), cov)


@pytest.mark.parametrize("family", [
    F.MeanFieldNormal((2,), init_scale=0.3, init_loc=1.5),
    F.FullRankNormal(2, init_scale=0.3, init_loc=1.5),
    F.LowRankNormal(2, 1, init_scale=0.3, init_loc=1.5),
], ids=["mean-field", "full-rank", "low-rank"])
@pytest.mark.parametrize("init_scale", [1e-3, 50.0])
def test_initial_distribution_has_init_loc_and_init_scale(family, init_scale):
    family = dataclasses.replace(family, init_scale=init_scale)
    params = F.init_params(jax.random.key(0), family)
    q = family.distribution(params)
    np.testing.assert_allclose(q.mean(), [1.5, 1.5], rtol=1e-6)
    expected = np.eye(2) * init_scale ** 2
    if isinstance(family, F.LowRankNormal):  # U starts at 0.1 * init_scale * N(0, 1/r)
        u = np.asarray(params["u"], np.float64)
        assert np.all(np.abs(u) < 0.1 * init_scale * 5) and np.any(u != 0)
        s = np.eye(2) * init_scale + u @ u.T
        expected = s @ s.T
    np.testing.assert_allclose(q.covariance(), expected, rtol=1e-5)


_N_LOCAL = 5


def _local(name):
    return {
        "mean-field-scalar": lambda: F.MeanFieldNormal((), batch_shape=_N_LOCAL),
        "mean-field-vector": lambda: F.MeanFieldNormal((2,), batch_shape=(_N_LOCAL,)),
        "full-rank": lambda: F.FullRankNormal(2, batch_shape=_N_LOCAL),
        "low-rank": lambda: F.LowRankNormal(3, 1, batch_shape=_N_LOCAL),
    }[name]()


@pytest.mark.parametrize("name", [
    "mean-field-scalar", "mean-field-vector",
    "full-rank",  # (failed under "raise" until _lower_triangular stopped broadcasting eye)
    "low-rank",
])
def test_local_families_have_batch_shape_n_and_scipy_densities(x64, name):
    rng = np.random.default_rng(3)
    family = _local(name)
    params = F.init_params(jax.random.key(0), family)
    params = jax.tree_util.tree_map(
        lambda a: jnp.asarray(np.asarray(a) + 0.5 * rng.normal(size=a.shape)), params)
    assert _batch_shape(family, params) == (_N_LOCAL,)
    z, log_q = _draw_checked(family, params, jax.random.key(1), 3)
    assert log_q.shape == (3, _N_LOCAL)
    p = jax.tree_util.tree_map(np.asarray, params)
    for i in range(_N_LOCAL):
        if isinstance(family, F.MeanFieldNormal):
            ref = scipy.stats.norm(p["loc"][i], _softplus(p["raw_scale"][i])).logpdf(
                np.asarray(z[:, i])).reshape(3, -1).sum(1)
        else:
            if isinstance(family, F.FullRankNormal):
                scale = _full_rank_scale(p["off_diag"][i], p["raw_diag"][i])
            else:
                scale = np.diag(_softplus(p["raw_diag"][i])) + p["u"][i] @ p["u"][i].T
            ref = scipy.stats.multivariate_normal(p["loc"][i], scale @ scale.T).logpdf(
                np.asarray(z[:, i]))
        np.testing.assert_allclose(log_q[:, i], ref, rtol=1e-10)


# ------------------------------------------------------------------ constrained families


@pytest.mark.parametrize("event_shape", [(), (3,)])
def test_positive_is_log_normal(x64, event_shape):
    rng = np.random.default_rng(4)
    family = F.Constrained(F.MeanFieldNormal(event_shape), F.positive())
    params = {"loc": jnp.asarray(rng.normal(size=event_shape)),
              "raw_scale": jnp.asarray(rng.normal(size=event_shape))}
    z, log_q = _draw_checked(family, params, jax.random.key(5), 2000)
    assert np.all(np.asarray(z) > 0)
    mu, sigma = np.asarray(params["loc"]), _softplus(params["raw_scale"])
    ref = scipy.stats.lognorm(s=sigma, scale=np.exp(mu)).logpdf(np.asarray(z))
    ref = ref.reshape(2000, -1).sum(1)
    np.testing.assert_allclose(log_q, ref, rtol=1e-9)
    # and the samples are log-normal: log z has the base's mean (SE-bounded)
    mean, se = _mc_mean_and_se(np.log(np.asarray(z)).reshape(2000, -1))
    assert np.all(np.abs(mean - mu.ravel()) < 5 * se)


def test_unit_interval_is_logit_normal(x64):
    rng = np.random.default_rng(5)
    family = F.Constrained(F.MeanFieldNormal((4,)), F.unit_interval())
    params = {"loc": jnp.asarray(rng.normal(size=4)), "raw_scale": jnp.asarray(rng.normal(size=4))}
    z, log_q = _draw_checked(family, params, jax.random.key(7), 2000)
    z = np.asarray(z)
    assert np.all((z > 0) & (z < 1))
    mu, sigma = np.asarray(params["loc"]), _softplus(params["raw_scale"])
    # logit-normal: N(logit z; mu, sigma) / (z (1 - z))
    ref = (scipy.stats.norm(mu, sigma).logpdf(scipy.special.logit(z)) - np.log(z) - np.log1p(-z))
    np.testing.assert_allclose(log_q, ref.sum(1), rtol=1e-9)


def test_positive_on_a_full_rank_base_is_the_correlated_log_normal(x64):
    """A scalar bijector on a vector-event base acts elementwise (Block):
    log q(z) = log N(log z; loc, L L^T) - sum_i log z_i."""
    rng = np.random.default_rng(6)
    family = F.Constrained(F.FullRankNormal(2), F.positive())
    params = {"loc": jnp.asarray(rng.normal(size=2)), "raw_diag": jnp.asarray(rng.normal(size=2)),
              "off_diag": jnp.asarray(rng.normal(size=(2, 2)))}
    tril = _full_rank_scale(params["off_diag"], params["raw_diag"])
    z, log_q = _draw_checked(family, params, jax.random.key(8), 500)
    z = np.asarray(z)
    assert np.all(z > 0)
    ref = (scipy.stats.multivariate_normal(np.asarray(params["loc"]), tril @ tril.T)
           .logpdf(np.log(z)) - np.log(z).sum(1))
    np.testing.assert_allclose(log_q, ref, rtol=1e-9)


# ------------------------------------------------------------------ spline flow


def test_spline_flow_density_is_normalised_and_its_samples_follow_it(x64):
    """At initialisation (last conditioner layers zero) the flow is N(init_loc, init_scale^2 I)
    (scipy). With random conditioner weights (non-identity splines, both coupling masks) the
    density still integrates to 1 on a grid (trapezoid rule; the tails beyond +-9 hold < 1e-6),
    and sample moments agree with the quadrature moments within 5 Monte Carlo SE (plus the
    quadrature error): samples (forward pass) and log_prob (inverse pass) describe one law."""
    family = F.SplineFlow(2, num_layers=2, hidden_sizes=(8,), num_bins=4, range_min=-3.0,
                          range_max=3.0, init_scale=0.8, init_loc=0.3)
    grid = np.linspace(-9.0, 9.0, 301)
    g1, g2 = np.meshgrid(grid, grid, indexing="ij")
    points = np.stack([g1.ravel(), g2.ravel()], 1)

    @jax.jit
    def densities(params):
        return jnp.exp(jax.vmap(family.distribution(params).log_prob)(jnp.asarray(points)))

    params = F.init_params(jax.random.key(0), family)
    np.testing.assert_allclose(
        densities(params),
        scipy.stats.multivariate_normal(np.full(2, 0.3), 0.64 * np.eye(2)).pdf(points),
        rtol=1e-9, atol=1e-300)

    leaves, treedef = jax.tree_util.tree_flatten(params["layers"])
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params["layers"] = jax.tree_util.tree_unflatten(
        treedef, [0.6 * jax.random.normal(k, a.shape, a.dtype) for k, a in zip(keys, leaves)])
    dens = np.asarray(densities(params)).reshape(g1.shape)
    integrate = lambda f: np.trapezoid(np.trapezoid(f * dens, grid, axis=1), grid)
    np.testing.assert_allclose(integrate(1.0), 1.0, atol=2e-3)
    m1, m2 = integrate(g1), integrate(g2)
    moments = [integrate(g1 * g1) - m1 ** 2, integrate(g2 * g2) - m2 ** 2,
               integrate(g1 * g2) - m1 * m2]
    assert np.max(np.abs(np.array(moments) - [0.64, 0.64, 0.0])) > 0.1, moments  # it moved

    n = 20_000
    z = np.asarray(jax.jit(lambda p: svi.sample(jax.random.key(2), family, p, n))(params))
    for f in (lambda a, b: a, lambda a, b: b, lambda a, b: a * a, lambda a, b: b * b,
              lambda a, b: a * b):
        mean, se = _mc_mean_and_se(f(z[:, 0], z[:, 1]))
        assert abs(mean - integrate(f(g1, g2))) < 5 * se + 2e-3, (mean, integrate(f(g1, g2)), se)


# ------------------------------------------------------------------ custom family, pytrees


def test_custom_family_wraps_any_distrax_distribution(x64):
    family = F.Custom(lambda key: {"raw_a": jnp.array(0.3), "raw_b": jnp.array(-0.2)},
                      lambda p: distrax.Gamma(jnp.exp(p["raw_a"]), jnp.exp(p["raw_b"])))
    params = F.init_params(jax.random.key(0), family)
    q = family.distribution(params)
    x = np.array([0.1, 1.0, 3.0])
    np.testing.assert_allclose(
        q.log_prob(jnp.asarray(x)),
        scipy.stats.gamma(a=np.exp(0.3), scale=1 / np.exp(-0.2)).logpdf(x), rtol=1e-10)


def test_pytree_of_families_gives_independent_keys_and_factors():
    family = {"a": F.LowRankNormal(3, 1), "b": F.LowRankNormal(3, 1),
              "c": (F.MeanFieldNormal(()), F.Constrained(F.MeanFieldNormal(()), F.positive()))}
    params = F.init_params(jax.random.key(0), family)
    assert set(params) == {"a", "b", "c"} and isinstance(params["c"], tuple)
    # one key per factor: the two identical low-rank families start from different U
    assert not np.allclose(params["a"]["u"], params["b"]["u"])
    q = F.distribution(family, params)
    assert isinstance(q["a"], distrax.MultivariateNormalDiagPlusLowRank)
    assert isinstance(q["c"][0], distrax.Normal) and isinstance(q["c"][1], distrax.Transformed)
    with pytest.raises(ValueError, match="params"):
        F.distribution(family, {"a": params["a"], "b": params["b"]})


def test_local_and_pytree_families_fit_the_closed_form_local_posteriors():
    """A local (batch (N,)) pytree family in svi.fit. Model, per data point i:
    z_i ~ N(0, 1), x_i | z_i ~ N(z_i, s^2) and log w_i ~ N(0, 1), y_i | w_i ~ N(log w_i, s^2),
    so p(z_i | x_i) = N(x_i / (1 + s^2), s^2 / (1 + s^2)) and w_i | y_i is log-normal with the
    same form in y_i; both are in the family, so the fit must reach them. log_joint_fn
    returns [N], and the ELBO at the optimum is sum_i log N(x_i; 0, 1 + s^2) + same for y.

    Tolerance: with S = 8 samples and Adam's learning rate decaying from 0.05 to 5e-5 over
    3000 steps the fit is (like a Monte Carlo average of ~S x 500 effective draws) within about
    sd / sqrt(4000) ~ 0.016 posterior sd of the optimum (seeds 0-5: locations <= 0.033 sd,
    scales <= 1.6%); we allow 0.15 sd for the locations and 5% for the scales."""
    n, s = 6, 0.5
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.normal(size=n) * np.sqrt(1 + s ** 2), jnp.float32)
    y = jnp.asarray(rng.normal(size=n) * np.sqrt(1 + s ** 2), jnp.float32)

    def normal_lp(v, m, sd):
        return -0.5 * ((v - m) / sd) ** 2 - jnp.log(sd) - 0.5 * np.log(2 * np.pi)

    def log_joint_fn(z):  # [N]
        log_w = jnp.log(z["w"])
        return (normal_lp(z["z"], 0.0, 1.0) + normal_lp(x, z["z"], s)
                + normal_lp(log_w, 0.0, 1.0) - log_w + normal_lp(y, log_w, s))

    family = {"z": F.MeanFieldNormal((), batch_shape=n),
              "w": F.Constrained(F.MeanFieldNormal((), batch_shape=(n,)), F.positive())}
    num_steps = 3000
    opt = optax.adam(optax.exponential_decay(0.05, num_steps, 1e-3))
    state, info = svi.fit(jax.random.key(0), family, opt, log_joint_fn, num_steps,
                          objective=svi.ELBO(num_samples=8))
    assert info.objective.shape == (num_steps,) and bool(info.is_finite.all())
    post_var = s ** 2 / (1 + s ** 2)
    for name, data in (("z", x), ("w", y)):
        p = state.params[name]
        assert p["loc"].shape == (n,)
        np.testing.assert_allclose(p["loc"], np.asarray(data) / (1 + s ** 2),
                                   atol=0.15 * np.sqrt(post_var))
        np.testing.assert_allclose(_softplus(p["raw_scale"]), np.sqrt(post_var), rtol=0.05)
    log_evidence = (scipy.stats.norm(0, np.sqrt(1 + s ** 2)).logpdf(np.asarray(x)).sum()
                    + scipy.stats.norm(0, np.sqrt(1 + s ** 2)).logpdf(np.asarray(y)).sum())
    # info.objective is the summed ELBO estimate, E = log p(x) - KL(q || p): below log p(x)
    # (up to its noise), and above it by no more than the closed-form KL of the final q
    # (Gaussian KL, in log space for w) plus 0.01 nats for the drift over the last 500 steps.
    kl = 0.0
    for name, data in (("z", x), ("w", y)):
        m, sd = np.asarray(data) / (1 + s ** 2), np.sqrt(post_var)
        loc, scale = np.asarray(state.params[name]["loc"]), _softplus(
            state.params[name]["raw_scale"])
        kl += np.sum(np.log(sd / scale) + (scale ** 2 + (loc - m) ** 2) / (2 * sd ** 2) - 0.5)
    tail_mean, tail_se = _mc_mean_and_se(info.objective[-500:])
    assert tail_mean < log_evidence + 5 * tail_se, (tail_mean, log_evidence, tail_se)
    assert tail_mean > log_evidence - kl - 0.01 - 5 * tail_se, (tail_mean, log_evidence, kl)


# ------------------------------------------------------------------ named errors


@pytest.mark.parametrize("make, error, match", [
    (lambda: F.MeanFieldNormal("3"), TypeError, "event_shape"),
    (lambda: F.MeanFieldNormal((0,)), ValueError, "event_shape"),
    (lambda: F.MeanFieldNormal((2.0,)), TypeError, "event_shape"),
    (lambda: F.MeanFieldNormal((2,), batch_shape=(-1,)), ValueError, "batch_shape"),
    (lambda: F.MeanFieldNormal((2,), init_scale=0.0), ValueError, "init_scale"),
    (lambda: F.MeanFieldNormal((2,), init_scale=float("nan")), ValueError, "init_scale"),
    (lambda: F.MeanFieldNormal((2,), init_scale="big"), TypeError, "init_scale"),
    (lambda: F.MeanFieldNormal((2,), init_loc=np.zeros(3)), ValueError, "init_loc"),
    (lambda: F.FullRankNormal(0), ValueError, "dim"),
    (lambda: F.FullRankNormal(2.0), TypeError, "dim"),
    (lambda: F.FullRankNormal(2, init_scale=-1.0), ValueError, "init_scale"),
    (lambda: F.LowRankNormal(3, 4), ValueError, "rank"),
    (lambda: F.LowRankNormal(3, 0), ValueError, "rank"),
    (lambda: F.SplineFlow(1), ValueError, "dim"),
    (lambda: F.SplineFlow(2, num_layers=0), ValueError, "num_layers"),
    (lambda: F.SplineFlow(2, hidden_sizes=()), ValueError, "hidden_sizes"),
    (lambda: F.SplineFlow(2, num_bins=0), ValueError, "num_bins"),
    (lambda: F.SplineFlow(2, range_min=1.0, range_max=1.0), ValueError, "range_min"),
    (lambda: F.Custom(None, lambda p: None), TypeError, "init_fn"),
    (lambda: F.Custom(lambda k: 0.0, "normal"), TypeError, "distribution_fn"),
    (lambda: F.Constrained(F.MeanFieldNormal, F.positive()), TypeError, "family"),
    (lambda: F.Constrained(distrax.Normal(0.0, 1.0), F.positive()), TypeError, "family"),
    (lambda: F.Constrained(F.MeanFieldNormal(()), jnp.exp), TypeError, "bijector"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_bad_constructor_arguments_raise_named_errors(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_bad_use_raises_named_errors():
    with pytest.raises(TypeError, match="distribution_fn"):
        F.Custom(lambda k: 0.0, lambda p: p).distribution(0.0)
    too_wide = F.Constrained(F.MeanFieldNormal(()), distrax.Block(distrax.Sigmoid(), 1))
    with pytest.raises(ValueError, match="bijector"):
        too_wide.distribution(too_wide.init(jax.random.key(0)))
    with pytest.raises(TypeError, match="rng_key"):
        F.init_params(0, F.MeanFieldNormal(()))
    for bad in (F.MeanFieldNormal, distrax.Normal(0.0, 1.0), {"a": F.MeanFieldNormal(()), "b": 3},
                {}):
        with pytest.raises(TypeError, match="family"):
            F.init_params(jax.random.key(0), bad)
    assert F.is_family(F.MeanFieldNormal(())) and not F.is_family(F.MeanFieldNormal)
