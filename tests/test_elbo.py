"""vijax.elbo against the linear-Gaussian model's closed forms (float64).

log p(x) and p(z | x) are exact there, so log p(x) - ELBO(q) = KL(q || p(z | x)) can be checked
for any Gaussian q, and the ELBO's gradient is the gradient of a closed form.
Monte Carlo checks use tolerances of a few standard errors of the estimator.
"""

from __future__ import annotations

import distrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special

from vijax import elbo as velbo
from vijax import linear_gaussian as lg

LATENT, DATA, BATCH = 3, 5, 4


@pytest.fixture
def problem(x64):
    model = lg.random_model(jax.random.key(0), LATENT, DATA, noise_scale=0.7, dtype=jnp.float64)
    x, _ = lg.sample(jax.random.key(1), model, BATCH)
    post_loc, post_cov = lg.posterior(model, x)
    return model, x, post_loc, post_cov


def _diag_q(post_loc, shift=0.4, scale=0.6):
    loc = post_loc + shift
    scale_diag = jnp.full_like(loc, scale)
    return distrax.MultivariateNormalDiag(loc, scale_diag), loc, scale_diag


def _exact_q(post_loc, post_cov):
    tril = jnp.broadcast_to(jnp.linalg.cholesky(post_cov), (BATCH, LATENT, LATENT))
    return distrax.MultivariateNormalTri(post_loc, tril)


def _mc_mean_and_se(samples):
    samples = np.asarray(samples)
    return samples.mean(0), samples.std(0, ddof=1) / np.sqrt(samples.shape[0])


def test_elbo_at_exact_posterior_equals_log_marginal(problem):
    model, x, post_loc, post_cov = problem
    q = _exact_q(post_loc, post_cov)
    value = jax.jit(lambda k: velbo.elbo(k, lambda z: lg.log_joint(model, x, z), q, num_samples=7))(
        jax.random.key(2)
    )
    assert value.shape == (BATCH,) and value.dtype == jnp.float64
    np.testing.assert_allclose(value, lg.log_marginal(model, x), atol=1e-6, rtol=0)


def test_log_marginal_minus_elbo_is_kl_to_posterior(problem):
    """lecture 3: log p(x) = ELBO + KL(q || p(z|x)); checked to Monte Carlo error."""
    model, x, post_loc, post_cov = problem
    q, loc, scale = _diag_q(post_loc)
    log_joint_fn = lambda z: lg.log_joint(model, x, z)
    keys = jax.random.split(jax.random.key(3), 4000)
    per_sample = jax.jit(jax.vmap(lambda k: velbo.elbo(k, log_joint_fn, q)))(keys)  # [S, batch]
    mean, se = _mc_mean_and_se(per_sample)
    kl = lg.gaussian_kl(loc, jax.vmap(jnp.diag)(scale**2), post_loc, post_cov)
    gap = np.asarray(lg.log_marginal(model, x)) - mean
    assert np.all(np.asarray(kl) > 0.1)  # q is genuinely off the posterior
    assert np.all(np.abs(gap - np.asarray(kl)) < 4 * se), (gap, kl, se)


def test_num_samples_averages_single_sample_estimates(problem):
    model, x, post_loc, _ = problem
    q, _, _ = _diag_q(post_loc)
    log_joint_fn = lambda z: lg.log_joint(model, x, z)
    key = jax.random.key(4)
    many = velbo.elbo(key, log_joint_fn, q, num_samples=5)
    # documented contract: sample s is drawn with the s-th key of split(key, S)
    draws = [q.sample(seed=k) for k in jax.random.split(key, 5)]
    singles = jnp.stack([log_joint_fn(z) - q.log_prob(z) for z in draws])
    np.testing.assert_allclose(many, singles.mean(0), rtol=1e-12)


def test_analytic_kl_and_monte_carlo_elbo_agree_in_expectation(problem):
    model, x, post_loc, post_cov = problem
    q, loc, scale = _diag_q(post_loc)
    prior = distrax.MultivariateNormalDiag(jnp.zeros(LATENT), jnp.ones(LATENT))
    keys = jax.random.split(jax.random.key(5), 4000)
    analytic = jax.jit(jax.vmap(
        lambda k: velbo.elbo_analytic_kl(k, lambda z: lg.log_likelihood(model, x, z), q, prior)
    ))(keys)
    monte_carlo = jax.jit(jax.vmap(lambda k: velbo.elbo(k, lambda z: lg.log_joint(model, x, z), q)))(keys)
    exact = lg.log_marginal(model, x) - lg.gaussian_kl(
        loc, jax.vmap(jnp.diag)(scale**2), post_loc, post_cov
    )
    for samples in (analytic, monte_carlo):
        mean, se = _mc_mean_and_se(samples)
        assert np.all(np.abs(mean - np.asarray(exact)) < 4 * se)


def test_iwae_increases_with_k_and_approaches_log_marginal(problem):
    model, x, post_loc, _ = problem
    q, _, _ = _diag_q(post_loc, shift=0.5, scale=0.5)
    log_joint_fn = lambda z: lg.log_joint(model, x, z)
    log_px = np.asarray(lg.log_marginal(model, x))
    means, ses = [], []
    for k in (1, 10, 100, 1000):
        keys = jax.random.split(jax.random.key(6 + k), 300)
        vals = jax.jit(jax.vmap(lambda key: velbo.iwae_bound(key, log_joint_fn, q, num_samples=k)))(keys)
        mean, se = _mc_mean_and_se(vals)
        means.append(mean)
        ses.append(se)
        # a lower bound in expectation
        assert np.all(mean < log_px + 4 * se)
    gaps = [log_px - m for m in means]
    for small, large, se_s, se_l in zip(gaps, gaps[1:], ses, ses[1:]):
        assert np.all(large < small + 4 * np.hypot(se_s, se_l))
    assert np.all(gaps[0] > 0.3)  # the K = 1 ELBO is far from log p(x) ...
    # ... and K = 1000 is close: the gap shrinks like O(1/K) (Burda et al. 2016, Theorem 1)
    assert np.all(gaps[-1] < 0.05) and np.all(gaps[-1] < gaps[0] / 20)


def test_iwae_with_one_sample_is_the_elbo(problem):
    model, x, post_loc, _ = problem
    q, _, _ = _diag_q(post_loc)
    log_joint_fn = lambda z: lg.log_joint(model, x, z)
    key = jax.random.key(9)
    np.testing.assert_allclose(
        velbo.iwae_bound(key, log_joint_fn, q, num_samples=1),
        velbo.elbo(key, log_joint_fn, q, num_samples=1),
        rtol=1e-12,
    )


def test_iwae_is_finite_in_float32_at_k_5000():
    """log weights around -2000 nats underflow exp() in float32; logsumexp must not."""
    model = lg.random_model(jax.random.key(0), 2, 50, noise_scale=0.3)
    x, _ = lg.sample(jax.random.key(1), model, 3)
    x = x + 3.0  # far from the model: log weights of about -2500 nats, exp() underflows
    q = distrax.MultivariateNormalDiag(jnp.zeros((3, 2)), jnp.ones((3, 2)))
    log_joint_fn = lambda z: lg.log_joint(model, x, z)
    value = jax.jit(lambda k: velbo.iwae_bound(k, log_joint_fn, q, num_samples=5000))(jax.random.key(2))
    assert value.dtype == jnp.float32
    assert np.all(np.isfinite(value)) and np.all(value < -1000)
    # reference: the same float32 log weights (sample k uses the k-th split key), reduced
    # with scipy's logsumexp in float64
    keys = jax.random.split(jax.random.key(2), 5000)
    z = jax.vmap(lambda k: q.sample(seed=k))(keys)
    log_w = np.asarray(jax.vmap(lambda z_: log_joint_fn(z_) - q.log_prob(z_))(z), np.float64)
    ref = scipy.special.logsumexp(log_w, axis=0) - np.log(5000)
    np.testing.assert_allclose(value, ref, rtol=2e-6)


def test_renyi_bound_limits_and_ordering(problem):
    model, x, post_loc, _ = problem
    q, _, _ = _diag_q(post_loc, shift=0.5, scale=0.5)
    log_joint_fn = lambda z: lg.log_joint(model, x, z)
    key = jax.random.key(10)
    k = 50
    iwae = velbo.iwae_bound(key, log_joint_fn, q, num_samples=k)
    np.testing.assert_allclose(velbo.renyi_bound(key, log_joint_fn, q, alpha=0.0, num_samples=k), iwae, rtol=1e-12)
    elbo_k = velbo.elbo(key, log_joint_fn, q, num_samples=k)
    np.testing.assert_allclose(velbo.renyi_bound(key, log_joint_fn, q, alpha=1.0, num_samples=k), elbo_k, rtol=1e-12)
    # alpha -> 1 is continuous: the limit of the formula is the ELBO
    near_one = velbo.renyi_bound(key, log_joint_fn, q, alpha=1.0 - 1e-7, num_samples=k)
    np.testing.assert_allclose(near_one, elbo_k, atol=1e-5)
    # for fixed samples the VR bound is non-increasing in alpha (power-mean inequality)
    values = [velbo.renyi_bound(key, log_joint_fn, q, alpha=a, num_samples=k) for a in (0.0, 0.3, 0.7, 1.0, 2.0)]
    for a, b in zip(values, values[1:]):
        assert np.all(np.asarray(b) <= np.asarray(a) + 1e-12)


def test_estimators_return_the_same_value(problem):
    model, x, post_loc, _ = problem
    q, _, _ = _diag_q(post_loc)
    log_joint_fn = lambda z: lg.log_joint(model, x, z)
    key = jax.random.key(11)
    ref = velbo.elbo(key, log_joint_fn, q, num_samples=4)
    for est in (velbo.ScoreFunction(), velbo.ScoreFunction(velbo.LeaveOneOut()),
                velbo.ScoreFunction(baseline=1.5), velbo.StickingTheLanding()):
        np.testing.assert_array_equal(velbo.elbo(key, log_joint_fn, q, num_samples=4, estimator=est), ref)
    ref = velbo.iwae_bound(key, log_joint_fn, q, num_samples=4)
    for est in (velbo.ScoreFunction(), velbo.ScoreFunction(velbo.LeaveOneOut()),
                velbo.StickingTheLanding(), velbo.DReG()):
        np.testing.assert_array_equal(velbo.iwae_bound(key, log_joint_fn, q, num_samples=4, estimator=est), ref)


def test_pytree_q_is_a_product_of_factors(problem):
    """A dict of two independent factors gives the same ELBO as the joint diagonal Gaussian."""
    model, x, post_loc, _ = problem
    q, loc, scale = _diag_q(post_loc)
    q_tree = {
        "a": distrax.MultivariateNormalDiag(loc[:, :1], scale[:, :1]),
        "b": distrax.MultivariateNormalDiag(loc[:, 1:], scale[:, 1:]),
    }
    log_joint_tree = lambda z: lg.log_joint(model, x, jnp.concatenate([z["a"], z["b"]], -1))
    keys = jax.random.split(jax.random.key(12), 3000)
    tree_vals = jax.vmap(lambda k: velbo.elbo(k, log_joint_tree, q_tree))(keys)
    flat_vals = jax.vmap(lambda k: velbo.elbo(k, lambda z: lg.log_joint(model, x, z), q))(keys)
    m1, se1 = _mc_mean_and_se(tree_vals)
    m2, se2 = _mc_mean_and_se(flat_vals)
    assert np.all(np.abs(m1 - m2) < 4 * np.hypot(se1, se2))
    # and the DReG path handles pytree samples
    val = velbo.iwae_bound(keys[0], log_joint_tree, q_tree, num_samples=3, estimator=velbo.DReG())
    assert val.shape == (BATCH,) and np.all(np.isfinite(val))


# ------------------------------------------------------------------ jit / vmap / recompilation


def test_jit_vmap_and_no_recompilation():
    model = lg.random_model(jax.random.key(0), LATENT, DATA)
    traces = []

    def objective(key, x, loc, scale):
        traces.append(1)
        q = distrax.MultivariateNormalDiag(loc, scale)
        fn = lambda z: lg.log_joint(model, x, z)
        return (
            velbo.elbo(key, fn, q, num_samples=3),
            velbo.iwae_bound(key, fn, q, num_samples=3, estimator=velbo.DReG()),
            velbo.renyi_bound(key, fn, q, alpha=0.5, num_samples=3),
        )

    jitted = jax.jit(objective)
    x, _ = lg.sample(jax.random.key(1), model, BATCH)
    loc, scale = jnp.zeros((BATCH, LATENT)), jnp.ones((BATCH, LATENT))
    with jax.numpy_rank_promotion("raise"):
        eager = objective(jax.random.key(2), x, loc, scale)
        out1 = jitted(jax.random.key(2), x, loc, scale)
        out2 = jitted(jax.random.key(3), x + 1.0, loc + 0.1, scale)
    assert len(traces) == 2  # one eager call, one trace for both jitted calls
    for a, b in zip(eager, out1):
        assert a.shape == (BATCH,)
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert not np.allclose(out1[0], out2[0])
    # vmap over a leading axis of data sets
    xs = jnp.stack([x, x + 1.0])
    batched = jax.vmap(objective, in_axes=(None, 0, None, None))(jax.random.key(2), xs, loc, scale)
    assert batched[0].shape == (2, BATCH)
    np.testing.assert_allclose(batched[0][0], eager[0], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ bad input


def test_bad_input_errors(problem):
    model, x, post_loc, _ = problem
    q, loc, scale = _diag_q(post_loc)
    fn = lambda z: lg.log_joint(model, x, z)
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="num_samples"):
        velbo.elbo(key, fn, q, num_samples=0)
    with pytest.raises(TypeError, match="num_samples"):
        velbo.iwae_bound(key, fn, q, num_samples=2.5)
    with pytest.raises(ValueError, match="alpha"):
        velbo.renyi_bound(key, fn, q, alpha=-0.5, num_samples=3)
    with pytest.raises(ValueError, match="alpha"):
        velbo.renyi_bound(key, fn, q, alpha=float("nan"), num_samples=3)
    with pytest.raises(ValueError, match="log_joint_fn"):
        velbo.elbo(key, lambda z: jnp.sum(fn(z)), q)
    with pytest.raises(ValueError, match="log_likelihood_fn"):
        velbo.elbo_analytic_kl(key, lambda z: fn(z)[:2], q, distrax.MultivariateNormalDiag(jnp.zeros(LATENT), jnp.ones(LATENT)))
    bad_loc = loc.at[0, 0].set(jnp.nan)
    with pytest.raises(ValueError, match="q"):
        velbo.elbo(key, fn, distrax.MultivariateNormalDiag(bad_loc, scale))
    bad_scale = scale.at[1, 2].set(jnp.inf)
    with pytest.raises(ValueError, match="q"):
        velbo.iwae_bound(key, fn, distrax.MultivariateNormalDiag(loc, bad_scale), num_samples=2)
    with pytest.raises(TypeError, match="estimator"):
        velbo.elbo(key, fn, q, estimator=velbo.DReG())
    with pytest.raises(TypeError, match="estimator"):
        velbo.elbo(key, fn, q, estimator="pathwise")
    with pytest.raises(ValueError, match="num_samples"):
        velbo.elbo(key, fn, q, num_samples=1, estimator=velbo.ScoreFunction(velbo.LeaveOneOut()))
    with pytest.raises(TypeError, match="q"):
        velbo.elbo(key, fn, (loc, scale))
    with pytest.raises(ValueError, match="baseline"):
        velbo.elbo(key, fn, q, estimator=velbo.ScoreFunction(baseline=jnp.zeros(BATCH + 1)))
