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
    tree_vals = jax.jit(jax.vmap(lambda k: velbo.elbo(k, log_joint_tree, q_tree)))(keys)
    flat_vals = jax.jit(jax.vmap(lambda k: velbo.elbo(k, lambda z: lg.log_joint(model, x, z),
                                                      q)))(keys)
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
    with pytest.raises(ValueError, match=r"`q \(its loc/scale parameters\)` contains non-finite"):
        velbo.elbo(key, fn, distrax.MultivariateNormalDiag(bad_loc, scale))
    bad_scale = scale.at[1, 2].set(jnp.inf)
    with pytest.raises(ValueError, match=r"`q \(its loc/scale parameters\)` contains non-finite"):
        velbo.iwae_bound(key, fn, distrax.MultivariateNormalDiag(loc, bad_scale), num_samples=2)
    with pytest.raises(TypeError, match="estimator"):
        velbo.elbo(key, fn, q, estimator=velbo.DReG())
    with pytest.raises(TypeError, match="estimator"):
        velbo.elbo(key, fn, q, estimator="pathwise")
    with pytest.raises(ValueError, match="num_samples"):
        velbo.elbo(key, fn, q, num_samples=1, estimator=velbo.ScoreFunction(velbo.LeaveOneOut()))
    with pytest.raises(TypeError, match="`q` must be a distrax.Distribution"):
        velbo.elbo(key, fn, (loc, scale))
    with pytest.raises(ValueError, match="baseline"):
        velbo.elbo(key, fn, q, estimator=velbo.ScoreFunction(baseline=jnp.zeros(BATCH + 1)))


# ------------------------------------------------------------------ audit regressions


def test_saturated_tanh_q_has_finite_values_equal_to_the_forward_log_det():
    """float32 tanh(eps) is exactly +-1 for some draws (loc 4, scale 2), where log q through the
    bijector's inverse is atanh(1) = inf. Reference: the same draws' log weights by hand in
    float64, log q(z) = log N(eps; loc, scale) - sum_i log(1 - tanh(eps_i)^2)."""
    loc, scale, k = jnp.full((BATCH, 2), 4.0), jnp.full((BATCH, 2), 2.0), 64
    base = distrax.MultivariateNormalDiag(loc, scale)
    tanh = distrax.Block(distrax.Tanh(), 1)
    make_q = lambda l: distrax.Transformed(distrax.MultivariateNormalDiag(l, scale), tanh)
    log_joint_fn = lambda z: -0.5 * jnp.sum(z**2, -1)
    key = jax.random.key(0)
    keys = jax.random.split(key, k)  # sample s uses the s-th split key
    assert np.any(np.abs(np.asarray(jax.vmap(lambda kk: make_q(loc).sample(seed=kk))(keys))) == 1.0)
    eps = np.asarray(jax.vmap(lambda kk: base.sample(seed=kk))(keys), np.float64)  # [K, batch, 2]
    log_r = np.sum(-0.5 * ((eps - 4.0) / 2.0) ** 2 - np.log(2.0) - 0.5 * np.log(2 * np.pi), -1)
    log_det = np.sum(2.0 * (np.log(2.0) - eps - np.logaddexp(0.0, -2.0 * eps)), -1)
    log_w = -0.5 * np.sum(np.tanh(eps) ** 2, -1) - (log_r - log_det)
    expected = {
        "elbo": log_w.mean(0),
        "iwae": scipy.special.logsumexp(log_w, axis=0) - np.log(k),
        "renyi": (scipy.special.logsumexp(0.5 * log_w, axis=0) - np.log(k)) / 0.5,
    }
    pathwise = velbo.Pathwise()
    objectives = {
        "elbo": lambda l, e=pathwise: velbo.elbo(key, log_joint_fn, make_q(l), num_samples=k, estimator=e),
        "iwae": lambda l, e=pathwise: velbo.iwae_bound(key, log_joint_fn, make_q(l), num_samples=k, estimator=e),
        "renyi": lambda l: velbo.renyi_bound(key, log_joint_fn, make_q(l), alpha=0.5, num_samples=k),
    }
    for name, f in objectives.items():  # jitted: one compilation instead of op-by-op dispatch
        value = jax.jit(f)(loc)
        assert value.dtype == jnp.float32
        np.testing.assert_allclose(value, expected[name], atol=1e-4, rtol=0, err_msg=name)
        grad = jax.jit(jax.grad(lambda l: jnp.sum(f(l))))(loc)
        assert np.all(np.isfinite(np.asarray(grad))), name
    # the value does not depend on the estimator (their gradients use the inverse; documented)
    for name, estimators in (("elbo", (velbo.ScoreFunction(), velbo.StickingTheLanding())),
                             ("iwae", (velbo.ScoreFunction(velbo.LeaveOneOut()),
                                       velbo.StickingTheLanding(), velbo.DReG()))):
        f = objectives[name]
        values = jax.jit(lambda l: [f(l, est) for est in estimators])(loc)
        for est, value in zip(estimators, values):
            np.testing.assert_array_equal(value, jax.jit(f)(loc), err_msg=f"{name} {est}")


def _truncated_log_joint(outside):
    """log p(x, z) = -|z - 0.3|^2 / 2 where z_0 <= 1.5, plus ``outside`` (-inf: zero weight) beyond."""
    def log_joint(z):
        lp = -0.5 * jnp.sum((z - 0.3) ** 2, -1)
        return jnp.where(z[:, 0] > 1.5, lp + outside, lp)
    return log_joint


def test_zero_weight_particle_keeps_values_and_gradients_finite(x64):
    """A particle with log p(x, z_k) = -inf adds nothing to the IWAE bound: every estimator
    returns log (1/K) sum over the finite particles, and its gradient equals the one for a
    weight of exp(-1e4) (exactly 0 after normalisation). The ELBO is then -inf."""
    loc = jnp.array([[1.0, 0.0], [0.8, -0.5], [1.2, 0.3], [1.0, 1.0]])
    scale = jnp.ones_like(loc)
    q = distrax.MultivariateNormalDiag(loc, scale)
    key, k = jax.random.key(3), 16
    fn_inf, fn_tiny = _truncated_log_joint(-jnp.inf), _truncated_log_joint(-1e4)
    z = jax.vmap(lambda kk: q.sample(seed=kk))(jax.random.split(key, k))  # [K, batch, 2]
    outside = np.asarray(z[..., 0] > 1.5)
    assert np.all(outside.any(0)) and np.all((~outside).any(0))  # both kinds in every example
    log_w = np.asarray(jax.vmap(lambda z_: fn_tiny(z_) - q.log_prob(z_))(z))
    expected = scipy.special.logsumexp(np.where(outside, -np.inf, log_w), axis=0) - np.log(k)
    ref = velbo.iwae_bound(key, fn_inf, q, num_samples=k)
    np.testing.assert_allclose(ref, expected, rtol=1e-12)

    estimators = (velbo.Pathwise(), velbo.ScoreFunction(), velbo.ScoreFunction(baseline=1.0),
                  velbo.ScoreFunction(velbo.LeaveOneOut()), velbo.StickingTheLanding(),
                  velbo.DReG())

    @jax.jit  # every estimator in one program: one compilation instead of op-by-op dispatch
    def values_and_grads(loc):
        out = []
        for est in estimators:
            def f(l, fn):
                return jnp.sum(velbo.iwae_bound(key, fn, distrax.MultivariateNormalDiag(l, scale),
                                                num_samples=k, estimator=est))
            out.append((velbo.iwae_bound(key, fn_inf, distrax.MultivariateNormalDiag(loc, scale),
                                         num_samples=k, estimator=est),
                        jax.grad(f)(loc, fn_inf), jax.grad(f)(loc, fn_tiny)))
        return out

    for est, (value, g, g_tiny) in zip(estimators, values_and_grads(loc)):
        np.testing.assert_array_equal(value, ref, err_msg=repr(est))
        assert np.all(np.isfinite(np.asarray(g))), est
        if not isinstance(getattr(est, "baseline", None), velbo.LeaveOneOut):  # its baseline differs
            np.testing.assert_allclose(g, g_tiny, rtol=1e-9, atol=1e-12, err_msg=repr(est))
    elbo_estimators = (velbo.Pathwise(), velbo.ScoreFunction(),
                       velbo.ScoreFunction(velbo.LeaveOneOut()), velbo.StickingTheLanding())
    values = jax.jit(lambda: [velbo.elbo(key, fn_inf, q, num_samples=k, estimator=est)
                              for est in elbo_estimators])()
    for est, value in zip(elbo_estimators, values):
        assert np.all(np.asarray(value) == -np.inf), (est, value)


def test_discrete_q_with_a_pathwise_estimator_is_refused():
    """A Bernoulli draw has no path derivative: Pathwise/STL/DReG would be silently wrong."""
    q = distrax.Independent(distrax.Bernoulli(logits=jnp.array([[0.2, -0.5, 1.0]])), 1)
    fn = lambda z: z.astype(jnp.float32) @ jnp.array([1.0, -2.0, 0.5]) - 1.0
    key = jax.random.key(0)
    calls = [
        lambda: velbo.elbo(key, fn, q),
        lambda: velbo.elbo(key, fn, q, estimator=velbo.StickingTheLanding()),
        lambda: velbo.iwae_bound(key, fn, q, num_samples=3),
        lambda: velbo.iwae_bound(key, fn, q, num_samples=3, estimator=velbo.DReG()),
        lambda: velbo.elbo_analytic_kl(key, fn, q, q),
    ]
    for call in calls:
        with pytest.raises(TypeError, match=r"`q` draws non-floating samples.*`estimator`.*ScoreFunction"):
            call()
    # renyi_bound has no `estimator` argument: its message must not name one
    with pytest.raises(TypeError, match=r"`q` draws non-floating.*pathwise only") as error:
        velbo.renyi_bound(key, fn, q, alpha=0.5, num_samples=3)
    assert "`estimator`" not in str(error.value)
    # the score function is accepted; its value is the average over the documented draws
    value = velbo.elbo(key, fn, q, num_samples=4, estimator=velbo.ScoreFunction())
    draws = [q.sample(seed=kk) for kk in jax.random.split(key, 4)]
    np.testing.assert_allclose(value, np.mean([fn(z) - q.log_prob(z) for z in draws], 0), rtol=1e-6)


def test_renyi_bound_near_alpha_one_is_accurate_in_float32():
    """logsumexp((1 - alpha) log_w) - log K cancels near alpha = 1 and / (1 - alpha) amplifies
    the rounding. Reference: the same float32 log weights reduced in float64."""
    model = lg.random_model(jax.random.key(0), LATENT, DATA)
    x, _ = lg.sample(jax.random.key(1), model, BATCH)
    post_loc, _ = lg.posterior(model, x)
    q = distrax.MultivariateNormalDiag(post_loc + 0.5, jnp.full_like(post_loc, 0.5))
    log_joint_fn = lambda z: lg.log_joint(model, x, z)
    key, k = jax.random.key(10), 50
    _, log_q = jax.vmap(lambda kk: q.sample_and_log_prob(seed=kk))(jax.random.split(key, k))
    z = jax.vmap(lambda kk: q.sample(seed=kk))(jax.random.split(key, k))
    log_w = np.asarray(jax.vmap(log_joint_fn)(z) - log_q, np.float64)
    alphas = (0.0, 0.5, 1 - 1e-6, 1.0, 1 + 1e-6, 2.0)
    values = {a: velbo.renyi_bound(key, log_joint_fn, q, alpha=a, num_samples=k) for a in alphas}
    for a in (1 - 1e-6, 1 + 1e-6):
        assert values[a].dtype == jnp.float32
        r = 1.0 - a
        ref = (scipy.special.logsumexp(r * log_w, axis=0) - np.log(k)) / r
        np.testing.assert_allclose(values[a], ref, atol=1e-3, rtol=0)
    # non-increasing in alpha for fixed samples, up to float32 rounding (a few ulps at ~10 nats)
    for a, b in zip(alphas, alphas[1:]):
        assert np.all(np.asarray(values[b]) <= np.asarray(values[a]) + 1e-5), (a, b)


def test_float32_model_keeps_float32_under_x64(x64):
    model = lg.random_model(jax.random.key(0), LATENT, DATA, dtype=jnp.float32)
    x, _ = lg.sample(jax.random.key(1), model, BATCH)
    f32 = jnp.float32
    q = distrax.MultivariateNormalDiag(jnp.zeros((BATCH, LATENT), f32), jnp.ones((BATCH, LATENT), f32))
    prior = distrax.MultivariateNormalDiag(jnp.zeros(LATENT, jnp.float32), jnp.ones(LATENT, jnp.float32))
    fn = lambda z: lg.log_joint(model, x, z)
    key = jax.random.key(0)
    assert fn(q.sample(seed=key)).dtype == jnp.float32
    # dtypes by abstract evaluation (jax.eval_shape traces, compiles nothing); the values
    # themselves are checked elsewhere
    for est in (velbo.Pathwise(), velbo.StickingTheLanding(), velbo.ScoreFunction(), velbo.ScoreFunction(1.0),
                velbo.ScoreFunction(np.zeros(BATCH)), velbo.ScoreFunction(velbo.LeaveOneOut())):
        for bound in (velbo.elbo, velbo.iwae_bound):
            out = jax.eval_shape(lambda: bound(key, fn, q, num_samples=2, estimator=est))
            assert out.dtype == jnp.float32, (bound.__name__, est)
    out = jax.eval_shape(lambda: velbo.elbo_analytic_kl(
        key, lambda z: lg.log_likelihood(model, x, z), q, prior, estimator=velbo.ScoreFunction()))
    assert out.dtype == jnp.float32


def test_baseline_broadcastable_to_the_batch_is_accepted(problem):
    model, x, post_loc, _ = problem
    _, loc, scale = _diag_q(post_loc)
    fn = lambda z: lg.log_joint(model, x, z)

    def grad(baseline):
        f = lambda l: jnp.sum(velbo.elbo(jax.random.key(0), fn, distrax.MultivariateNormalDiag(l, scale),
                                         num_samples=2, estimator=velbo.ScoreFunction(baseline)))
        return jax.grad(f)(loc)

    ref = grad(1.5)
    for baseline in (jnp.full((1,), 1.5), jnp.full((BATCH,), 1.5)):
        np.testing.assert_allclose(grad(baseline), ref, rtol=1e-12)
    for shape in ((BATCH + 1,), (2, BATCH)):
        with pytest.raises(ValueError, match="`estimator.baseline` must be a scalar or broadcastable"):
            grad(jnp.zeros(shape))


def test_analytic_kl_prior_broadcast_and_unsupported_pair(problem):
    model, x, post_loc, _ = problem
    q, _, _ = _diag_q(post_loc)
    fn = lambda z: lg.log_likelihood(model, x, z)
    key = jax.random.key(1)
    shared = distrax.MultivariateNormalDiag(jnp.zeros(LATENT), jnp.ones(LATENT))  # batch []
    per_example = distrax.MultivariateNormalDiag(jnp.zeros((BATCH, LATENT)), jnp.ones((BATCH, LATENT)))
    with jax.numpy_rank_promotion("raise"):
        value = velbo.elbo_analytic_kl(key, fn, q, shared)
    np.testing.assert_allclose(value, velbo.elbo_analytic_kl(key, fn, q, per_example), rtol=1e-12)
    laplace = distrax.Independent(distrax.Laplace(jnp.zeros(LATENT), jnp.ones(LATENT)), 1)
    with pytest.raises(TypeError, match=r"no closed-form KL for `q` and `prior`"):
        velbo.elbo_analytic_kl(key, fn, q, laplace)


# ------------------------------------------------------------------ named argument errors


def _q42(scale=1.0):
    return distrax.MultivariateNormalDiag(jnp.zeros((4, 2)), jnp.full((4, 2), scale))


def _lj(z):
    return -0.5 * jnp.sum(z * z, -1)


def _std_prior(loc_shape=(2,)):
    return distrax.MultivariateNormalDiag(jnp.zeros(loc_shape), jnp.ones(loc_shape))


_K = jax.random.key(0)


@pytest.mark.parametrize("call, error, match", [
    pytest.param(lambda: velbo.elbo(0, _lj, _q42()), TypeError, "rng_key", id="elbo-int-seed"),
    pytest.param(lambda: velbo.elbo_analytic_kl(0, _lj, _q42(), _std_prior()), TypeError, "rng_key",
                 id="analytic-kl-int-seed"),
    pytest.param(lambda: velbo.iwae_bound(np.zeros(2), _lj, _q42(), num_samples=2), TypeError,
                 "rng_key", id="iwae-float-key"),
    pytest.param(lambda: velbo.renyi_bound(0, _lj, _q42(), alpha=0.5, num_samples=2), TypeError,
                 "rng_key", id="renyi-int-seed"),
    pytest.param(lambda: velbo.elbo(_K, jnp.zeros(4), _q42()), TypeError, "log_joint_fn", id="elbo-fn"),
    pytest.param(lambda: velbo.elbo_analytic_kl(_K, None, _q42(), _std_prior()), TypeError,
                 "log_likelihood_fn", id="analytic-kl-fn"),
    pytest.param(lambda: velbo.iwae_bound(_K, None, _q42(), num_samples=2), TypeError, "log_joint_fn",
                 id="iwae-fn"),
    pytest.param(lambda: velbo.renyi_bound(_K, "f", _q42(), alpha=0.5, num_samples=2), TypeError,
                 "log_joint_fn", id="renyi-fn"),
    pytest.param(lambda: velbo.elbo(_K, _lj, distrax.Normal(jnp.zeros((4, 2)), 1.0)), ValueError,
                 r"`q` has event shape \(\) and batch shape \(4, 2\).*MultivariateNormalDiag",
                 id="scalar-event-q-hint"),
    pytest.param(lambda: velbo.elbo_analytic_kl(_K, _lj, _q42(), _std_prior((3, 2))), ValueError,
                 r"`prior` batch shape \(3,\) does not broadcast", id="prior-batch"),
    pytest.param(lambda: velbo.elbo_analytic_kl(_K, _lj, _q42(), _std_prior((3,))), ValueError,
                 r"`prior` must have q's event shape \(2,\)", id="prior-event"),
    pytest.param(lambda: velbo.elbo(_K, _lj, distrax.MultivariateNormalDiag(
        jnp.zeros((4, 2)), jnp.ones((4, 2)).at[0, 0].set(0.0))), ValueError,
                 "`q` must have a positive scale", id="zero-scale"),
    pytest.param(lambda: velbo.iwae_bound(_K, _lj, _q42(-1.0), num_samples=2), ValueError,
                 "`q` must have a positive scale", id="negative-scale-diag"),
    pytest.param(lambda: velbo.elbo(_K, _lj, distrax.Independent(
        distrax.Normal(jnp.zeros((4, 2)), -jnp.ones((4, 2))), 1)), ValueError,
                 "`q` must have a positive scale: its `scale`", id="negative-scale-independent"),
    pytest.param(lambda: velbo.renyi_bound(_K, _lj, _q42(), alpha="0.5", num_samples=2), TypeError,
                 "alpha", id="alpha-str"),
    pytest.param(lambda: velbo.renyi_bound(_K, _lj, _q42(), alpha=True, num_samples=2), TypeError,
                 "alpha", id="alpha-bool"),
])
def test_bad_arguments_raise_naming_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_scalar_event_q_is_a_one_dimensional_latent_per_entry():
    """Event shape () is accepted: batch = q.batch_shape. With q = N(0, 1) and log p(z) =
    -z^2/2, each single-sample estimate log p - log q is exactly log(2 pi)/2."""
    q = distrax.Normal(jnp.zeros((4, 2)), jnp.ones((4, 2)))
    value = velbo.elbo(_K, lambda z: -0.5 * z * z, q, num_samples=2)
    assert value.shape == (4, 2)
    np.testing.assert_allclose(value, 0.5 * np.log(2 * np.pi), rtol=1e-6)


# ------------------------------------------------------------------ one check of every distribution


def test_prior_is_checked_like_q():
    """Before, a NaN prior loc gave an all-NaN ELBO and a negative prior scale was used as
    |scale|, with no error, while `q` (and naive_monte_carlo's prior) refused both."""
    bad_priors = {
        "nan-loc": (distrax.MultivariateNormalDiag(jnp.full((2,), jnp.nan), jnp.ones(2)),
                    r"`prior \(its loc/scale parameters\)` contains non-finite"),
        "negative-scale": (distrax.MultivariateNormalDiag(jnp.zeros(2), -jnp.ones(2)),
                           "`prior` must have a positive scale: its `scale_diag`"),
        "independent-normal": (distrax.Independent(distrax.Normal(jnp.zeros((4, 2)),
                                                                  -jnp.ones((4, 2))), 1),
                               "`prior` must have a positive scale: its `scale`"),
    }
    for prior, match in bad_priors.values():
        with pytest.raises(ValueError, match=match):
            velbo.elbo_analytic_kl(_K, _lj, _q42(), prior)
    # a valid prior gives a finite ELBO
    assert np.isfinite(velbo.elbo_analytic_kl(_K, _lj, _q42(), _std_prior())).all()


def test_a_batch_of_keys_is_refused_naming_rng_key():
    """Before, split(key, 2) passed the key check and failed inside JAX without naming
    rng_key (or, for a raw batch, silently used a [2, 2] key)."""
    typed, raw = jax.random.split(_K, 2), jax.random.split(jax.random.PRNGKey(0), 2)
    for keys in (typed, raw, jax.random.split(_K, (2, 3))):
        with pytest.raises(TypeError, match=r"rng_key must be a single .*batch of keys"):
            velbo.elbo(keys, _lj, _q42())
        with pytest.raises(TypeError, match=r"rng_key must be a single"):
            velbo.iwae_bound(keys, _lj, _q42(), num_samples=2)
    # a single key of either kind, and a key batch under vmap, are fine
    for key in (typed[0], raw[0]):
        assert velbo.elbo(key, _lj, _q42()).shape == (4,)
    assert jax.vmap(lambda k: velbo.elbo(k, _lj, _q42()))(typed).shape == (2, 4)


def test_non_floating_q_parameters_are_refused_naming_them():
    """A q whose leaves were cast by jax.tree.map (distrax's constructor is bypassed) used to
    fail inside distrax with its dtype message."""
    q = _q42()
    for cast, dtype in ((lambda a: a > 0, "bool"), (lambda a: a.astype(jnp.int32), "int32")):
        bad = jax.tree.map(cast, q)
        with pytest.raises(TypeError, match=rf"`q` must have floating-point parameters: its "
                                            rf"`loc` has dtype {dtype}"):
            velbo.elbo(_K, _lj, bad)
        with pytest.raises(TypeError, match="`prior` must have floating-point parameters"):
            velbo.elbo_analytic_kl(_K, _lj, q, jax.tree.map(cast, _std_prior()))
    normal = distrax.Independent(distrax.Normal(jnp.zeros((4, 2)), jnp.ones((4, 2))), 1)
    with pytest.raises(TypeError, match="its `loc` has dtype bool"):
        velbo.iwae_bound(_K, _lj, jax.tree.map(lambda a: a > 0, normal), num_samples=2)
