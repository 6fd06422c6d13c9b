"""vijax.marginal: log p(x) estimators on the linear-Gaussian model (exact log p(x) known)."""

from __future__ import annotations

import distrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vijax import elbo as velbo
from vijax import linear_gaussian as lg
from vijax import marginal

LATENT, DATA, BATCH = 2, 3, 3


@pytest.fixture
def problem(x64):
    model = lg.random_model(jax.random.key(0), LATENT, DATA, noise_scale=0.6, dtype=jnp.float64)
    x, _ = lg.sample(jax.random.key(1), model, BATCH)
    post_loc, _ = lg.posterior(model, x)
    q = distrax.MultivariateNormalDiag(post_loc + 0.2, jnp.full((BATCH, LATENT), 0.7))
    prior = distrax.MultivariateNormalDiag(jnp.zeros((BATCH, LATENT)), jnp.ones((BATCH, LATENT)))
    return model, x, q, prior


def test_importance_sampling_equals_iwae_bound_for_any_chunking(problem):
    model, x, q, _ = problem
    fn = lambda z: lg.log_joint(model, x, z)
    key = jax.random.key(2)
    iwae = velbo.iwae_bound(key, fn, q, num_samples=100)
    for chunk in (None, 100, 7, 1, 1000):
        est = marginal.importance_sampling(key, fn, q, num_samples=100, chunk_size=chunk)
        assert est.shape == (BATCH,)
        np.testing.assert_allclose(est, iwae, rtol=1e-12)


def test_estimators_are_unbiased_for_p_of_x_and_is_has_far_lower_variance(problem):
    """E[exp(log p^)] = p(x) for both (not E[log p^] = log p(x)); importance sampling with a
    q near the posterior has a far smaller variance than sampling the prior (CENG796 §3.2)."""
    model, x, _, prior = problem
    post_loc, post_cov = lg.posterior(model, x)
    # proposal: the posterior's marginals, widened by 20% (mean-field, not exact)
    q = distrax.MultivariateNormalDiag(post_loc, jnp.broadcast_to(1.2 * jnp.sqrt(jnp.diag(post_cov)), post_loc.shape))
    log_px = lg.log_marginal(model, x)
    k, reps = 10, 20000
    keys = jax.random.split(jax.random.key(3), reps)
    naive = jax.jit(jax.vmap(lambda key: marginal.naive_monte_carlo(
        key, lambda z: lg.log_likelihood(model, x, z), prior, num_samples=k)))(keys)
    is_ = jax.jit(jax.vmap(lambda key: marginal.importance_sampling(
        key, lambda z: lg.log_joint(model, x, z), q, num_samples=k)))(keys)
    for est in (naive, is_):
        ratio = np.exp(np.asarray(est - log_px[None]))  # p^(x) / p(x), unbiased for 1
        mean, se = ratio.mean(0), ratio.std(0, ddof=1) / np.sqrt(reps)
        assert np.all(np.abs(mean - 1) < 4 * se), (mean, se)
    var_naive = np.exp(np.asarray(naive - log_px[None])).var(0)
    var_is = np.exp(np.asarray(is_ - log_px[None])).var(0)
    assert np.all(var_is * 10 < var_naive), (var_is, var_naive)
    # and the log of an unbiased estimate is biased low (Jensen)
    assert np.all(np.asarray(is_.mean(0)) < np.asarray(log_px))


def test_shared_prior_sample_across_examples(problem):
    """A prior with batch shape [] shares each z_k across examples; still unbiased for p(x)."""
    model, x, _, _ = problem
    prior = distrax.MultivariateNormalDiag(jnp.zeros(LATENT), jnp.ones(LATENT))
    fn = lambda z: lg.log_likelihood(model, x, jnp.broadcast_to(z, (BATCH, LATENT)))
    keys = jax.random.split(jax.random.key(4), 20000)
    est = jax.jit(jax.vmap(lambda key: marginal.naive_monte_carlo(key, fn, prior, num_samples=10, chunk_size=3)))(keys)
    ratio = np.exp(np.asarray(est - lg.log_marginal(model, x)[None]))
    assert np.all(np.abs(ratio.mean(0) - 1) < 4 * ratio.std(0) / np.sqrt(len(keys)))


def test_k5000_over_10000_examples_in_chunks():
    """K = 5000 over 10,000 examples in float32 with chunks of 250 samples."""
    model = lg.random_model(jax.random.key(0), 2, 4, noise_scale=0.5)
    x, _ = lg.sample(jax.random.key(1), model, 10_000)
    post_loc, post_cov = lg.posterior(model, x)
    q = distrax.MultivariateNormalDiag(post_loc, jnp.broadcast_to(jnp.sqrt(jnp.diag(post_cov)) * 1.2, post_loc.shape))
    fn = lambda z: lg.log_joint(model, x, z)
    est = jax.jit(lambda key: marginal.importance_sampling(key, fn, q, num_samples=5000, chunk_size=250))(
        jax.random.key(2))
    exact = lg.log_marginal(model, x)
    assert est.shape == (10_000,) and est.dtype == jnp.float32
    # a good proposal with K = 5000: within a few hundredths of a nat of the exact value
    assert float(jnp.max(jnp.abs(est - exact))) < 0.05
    assert abs(float(jnp.mean(est - exact))) < 5e-3


def test_jit_no_recompile_and_bad_input(problem):
    model, x, q, prior = problem
    traces = []

    def f(key, x):
        traces.append(1)
        return marginal.importance_sampling(key, lambda z: lg.log_joint(model, x, z), q, num_samples=9, chunk_size=4)

    jf = jax.jit(f)
    jf(jax.random.key(0), x)
    jf(jax.random.key(1), x + 0.5)
    assert len(traces) == 1
    fn = lambda z: lg.log_joint(model, x, z)
    with pytest.raises(ValueError, match="num_samples"):
        marginal.importance_sampling(jax.random.key(0), fn, q, num_samples=0)
    with pytest.raises(ValueError, match="chunk_size"):
        marginal.importance_sampling(jax.random.key(0), fn, q, num_samples=5, chunk_size=0)
    with pytest.raises(ValueError, match="log_joint_fn"):
        marginal.importance_sampling(jax.random.key(0), lambda z: fn(z)[None], q, num_samples=5)
    with pytest.raises(TypeError, match="prior"):
        marginal.naive_monte_carlo(jax.random.key(0), fn, "normal", num_samples=5)


def test_importance_sampling_with_a_saturated_tanh_proposal_is_finite():
    """float32 tanh(eps) is exactly +-1 for some draws; log q must come from the forward log-det
    (the bijector's inverse gives atanh(1) = inf). Equal to iwae_bound, finite, any chunking."""
    scale = jnp.full((BATCH, 2), 2.0)
    base = distrax.MultivariateNormalDiag(jnp.full((BATCH, 2), 4.0), scale)
    q = distrax.Transformed(base, distrax.Block(distrax.Tanh(), 1))
    fn = lambda z: -0.5 * jnp.sum(z**2, -1)
    key = jax.random.key(0)
    keys = jax.random.split(key, 64)
    assert np.any(np.abs(np.asarray(jax.vmap(lambda k: q.sample(seed=k))(keys))) == 1.0)
    for chunk in (None, 5):
        est = marginal.importance_sampling(key, fn, q, num_samples=64, chunk_size=chunk)
        assert np.all(np.isfinite(np.asarray(est))), chunk
        np.testing.assert_allclose(est, velbo.iwae_bound(key, fn, q, num_samples=64), rtol=1e-6)


def _q4(shape=(4, 2)):
    return distrax.MultivariateNormalDiag(jnp.zeros(shape), jnp.ones(shape))


def _lj(z):
    return -0.5 * jnp.sum(z * z, -1)


@pytest.mark.parametrize("call, error, match", [
    pytest.param(lambda: marginal.importance_sampling(0, _lj, _q4(), num_samples=4), TypeError,
                 "rng_key", id="is-int-seed"),
    pytest.param(lambda: marginal.naive_monte_carlo(0, _lj, _q4(), num_samples=4), TypeError,
                 "rng_key", id="naive-int-seed"),
    pytest.param(lambda: marginal.log_mean_exp_chunked(0, lambda k: jnp.zeros(4), num_samples=4),
                 TypeError, "rng_key", id="lme-int-seed"),
    pytest.param(lambda: marginal.importance_sampling(jax.random.key(0), None, _q4(), num_samples=4),
                 TypeError, "log_joint_fn", id="is-fn"),
    pytest.param(lambda: marginal.naive_monte_carlo(jax.random.key(0), None, _q4(), num_samples=4),
                 TypeError, "log_likelihood_fn", id="naive-fn"),
    pytest.param(lambda: marginal.log_mean_exp_chunked(jax.random.key(0), None, num_samples=4),
                 TypeError, "log_weight_fn", id="lme-fn"),
    pytest.param(lambda: marginal.naive_monte_carlo(jax.random.key(0), lambda z: _lj(z)[:, None], _q4(),
                                                    num_samples=4),
                 ValueError, r"`log_likelihood_fn` must return.*\(4,\) \(prior's batch shape\)",
                 id="naive-output-shape"),
])
def test_bad_arguments_raise_naming_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()
