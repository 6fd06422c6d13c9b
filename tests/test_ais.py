"""vijax.ais: AIS, BDMC and PSIS k-hat on the linear-Gaussian model, whose log p(x) is exact.

Monte Carlo tolerances are multiples of standard errors computed from the draws themselves.
Programs are jitted once per configuration (compilation dominates the run time), with few
temperatures wherever the property allows.
"""

from __future__ import annotations

import warnings

import distrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vijax import ais as vais
from vijax import families as F
from vijax import linear_gaussian as lg
from vijax import marginal
from vijax import nn as vnn
from vijax import svi
from vijax import vae

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)  # ArviZ's notice of its coming refactor
    import arviz

LATENT, DATA, BATCH = 2, 6, 6


@pytest.fixture(autouse=True)
def _raise_on_rank_promotion():
    with jax.numpy_rank_promotion("raise"):
        yield


def _problem(noise_scale=0.3, latent=LATENT, data=DATA, batch=BATCH, seed=0):
    model = lg.random_model(jax.random.key(seed), latent, data, noise_scale=noise_scale,
                            dtype=jnp.float64)
    x, z = lg.sample(jax.random.key(seed + 1), model, batch)
    return model, x, z


def _prior(batch, latent=LATENT):
    return distrax.MultivariateNormalDiag(jnp.zeros((batch, latent), jnp.float64),
                                          jnp.ones((batch, latent), jnp.float64))


# ----------------------------------------------------------------------------- AIS, BDMC


@pytest.fixture(scope="module")
def sandwich():
    """BDMC at T = 5 and T = 100 from the prior, 32 chains, on simulated data (z ~ p(z),
    x ~ p(x | z): z is an exact posterior sample for x). The T = 5 program runs twice, on other
    data and another key, to count its traces."""
    traces = []
    with jax.enable_x64(True), jax.numpy_rank_promotion("raise"):
        model, x, z = _problem()

        def run(key, x, z, num_temperatures):
            traces.append(num_temperatures)
            return vais.bdmc(key, lambda z: lg.log_joint(model, x, z), _prior(BATCH), z,
                             num_temperatures=num_temperatures, num_chains=32)

        run = jax.jit(run, static_argnums=3)
        # T = 100: one exact start per chain (here all equal), leaves [num_chains, *batch, L]
        results = {5: run(jax.random.key(5), x, z, 5),
                   100: run(jax.random.key(100), x, jnp.broadcast_to(z, (32,) + z.shape), 100)}
        x2, z2 = lg.sample(jax.random.key(7), model, BATCH)
        again = run(jax.random.key(8), x2, z2, 5)
        exact = {"x": np.asarray(lg.log_marginal(model, x)),
                 "x2": np.asarray(lg.log_marginal(model, x2))}
    return results, again, exact, traces


def _mean_and_se(values):
    values = np.asarray(values)
    return values.mean(), values.std(ddof=1) / np.sqrt(values.size)


def test_ais_converges_to_the_exact_log_marginal_as_temperatures_grow(sandwich):
    """From the prior to a posterior seven times narrower: at T = 100 the estimate is within a
    few standard errors of log p(x), and both its error and its standard error are well below
    those at T = 5. E[log w] (a lower bound, like the ELBO) rises toward log p(x)."""
    results, _, exact, _ = sandwich
    errors, ses, mean_log_w = {}, {}, {}
    for t, result in results.items():
        forward = result.forward
        assert forward.log_weights.shape == (32, BATCH)
        for field in ("log_marginal", "stderr", "acceptance_rate", "step_size"):
            assert getattr(forward, field).shape == (BATCH,)
        errors[t] = np.asarray(forward.log_marginal) - exact["x"]
        ses[t] = np.asarray(forward.stderr)
        assert np.all(np.isfinite(errors[t])) and np.all(ses[t] > 0)
        mean_log_w[t] = _mean_and_se(np.asarray(forward.log_weights) - exact["x"])
        assert mean_log_w[t][0] < 3 * mean_log_w[t][1], (t, mean_log_w)  # E log w <= log p(x)
    # the step size has adapted toward the target acceptance rate 0.65
    assert np.all(np.abs(np.asarray(results[100].forward.acceptance_rate) - 0.65) < 0.25)
    pooled = np.sqrt(np.sum(ses[100] ** 2)) / BATCH  # SE of the mean error
    assert abs(errors[100].mean()) < 4 * pooled + 1e-3, (errors, ses)
    assert np.all(np.abs(errors[100]) < 5 * ses[100] + 0.05), (errors, ses)
    assert np.mean(np.abs(errors[5])) > 1.5 * np.mean(np.abs(errors[100])), errors
    assert ses[5].mean() > 2 * ses[100].mean(), ses
    assert mean_log_w[5][0] < 5 * mean_log_w[100][0] < 0, mean_log_w


def test_bdmc_brackets_the_exact_log_marginal_and_the_gap_shrinks(sandwich):
    """E[log w_forward] <= log p(x) <= -E[log w_reverse] (the stochastic bounds in expectation,
    checked within 3 standard errors of the means over chains and examples); the reported
    bounds (logmeanexp over chains) bracket log p(x) within their standard errors; both
    sandwiches narrow with more temperatures."""
    results, _, exact, _ = sandwich
    mean_gaps, gaps = {}, {}
    for t, result in results.items():
        fwd = _mean_and_se(np.asarray(result.forward.log_weights) - exact["x"])
        rev = _mean_and_se(-np.asarray(result.reverse.log_weights) - exact["x"])
        assert fwd[0] < 3 * fwd[1] and rev[0] > -3 * rev[1], (t, fwd, rev)
        lower, upper = np.asarray(result.lower), np.asarray(result.upper)
        se_lo = np.sqrt(np.sum(np.asarray(result.forward.stderr) ** 2)) / BATCH
        se_up = np.sqrt(np.sum(np.asarray(result.reverse.stderr) ** 2)) / BATCH
        assert np.mean(lower - exact["x"]) < 4 * se_lo + 1e-3, (t, lower - exact["x"], se_lo)
        assert np.mean(upper - exact["x"]) > -4 * se_up - 1e-3, (t, upper - exact["x"], se_up)
        np.testing.assert_allclose(result.gap, upper - lower)
        assert result.reverse.log_weights.shape == (32, BATCH)
        mean_gaps[t], gaps[t] = rev[0] - fwd[0], np.asarray(result.gap).mean()
    assert mean_gaps[100] < 0.2 * mean_gaps[5], mean_gaps
    assert gaps[100] < 0.5 * gaps[5], gaps


def test_ais_runs_under_the_callers_jit_without_retracing(sandwich):
    """One trace per static configuration: the second T = 5 call (new data, new key) reuses
    the compiled program."""
    results, again, exact, traces = sandwich
    assert sorted(traces) == [5, 100], traces
    assert np.all(np.isfinite(np.asarray(again.forward.log_weights)))
    assert np.all(np.asarray(again.lower) <= exact["x2"] + 4 * np.asarray(again.forward.stderr)
                  + 1e-3)
    assert not np.allclose(again.lower, results[5].lower)


def test_ais_weights_are_unbiased_for_p_of_x(x64):
    """E[w] = p(x) for every number of temperatures (Neal 2001): mean of exp(log w - log p(x))
    is 1 within 4 standard errors, on a tiny model with many chains (fixed step size, so the
    kernels do not depend on the chains' history). The proposal is a pytree of two factors
    (dict of 1-D Gaussians, one per latent coordinate), which HMC moves as one vector."""
    model, x, _ = _problem(noise_scale=0.5, latent=2, data=2, batch=2, seed=3)
    ones = jnp.ones((2, 1), jnp.float64)
    proposal = {"a": distrax.MultivariateNormalDiag(0.5 * ones, 1.5 * ones),
                "b": distrax.MultivariateNormalDiag(-0.5 * ones, ones)}
    fn = lambda z: lg.log_joint(model, x, jnp.concatenate([z["a"], z["b"]], axis=-1))
    result = jax.jit(lambda key: vais.ais(
        key, fn, proposal, num_temperatures=3, num_chains=20_000, schedule=vais.Linear(),
        transition=vais.HMC(num_leapfrog_steps=3, initial_step_size=0.3, adapt=False)))(
        jax.random.key(4))
    ratio = np.exp(np.asarray(result.log_weights) - np.asarray(lg.log_marginal(model, x)))
    mean, se = ratio.mean(0), ratio.std(0, ddof=1) / np.sqrt(ratio.shape[0])
    assert np.all(np.abs(mean - 1) < 4 * se), (mean, se)
    assert np.all(se < 0.05), se  # a test with power
    np.testing.assert_allclose(result.step_size, 0.3)  # not adapted
    assert np.all(np.asarray(result.acceptance_rate) > 0.5)


def test_one_temperature_is_importance_sampling(x64):
    """T = 1: log w = log p(x, z) - log q(z) at z ~ q, no transition (acceptance NaN)."""
    model, x, _ = _problem()
    q = _prior(BATCH)
    result = jax.jit(lambda key: vais.ais(key, lambda z: lg.log_joint(model, x, z), q,
                                          num_temperatures=1, num_chains=50))(jax.random.key(0))
    assert np.all(np.isnan(result.acceptance_rate))

    @jax.jit
    def expected(key):
        key_init, _ = jax.random.split(key)
        with jax.numpy_rank_promotion("allow"):  # distrax broadcasts inside its sampler
            z = jax.vmap(lambda k: q.sample(seed=k))(jax.random.split(key_init, 50))
            return jax.vmap(lambda z: lg.log_joint(model, x, z) - q.log_prob(z))(z)

    np.testing.assert_allclose(result.log_weights, expected(jax.random.key(0)), rtol=1e-12)


# ----------------------------------------------------------------------------- PSIS


def test_psis_khat_is_arviz_psislw():
    lw = np.random.default_rng(0).standard_t(df=2, size=(3, 400))
    _, expected_k = arviz.psislw(lw.copy())
    np.testing.assert_allclose(vais.psis_khat(lw), expected_k, rtol=0, atol=1e-6)
    np.testing.assert_allclose(vais.psis_khat(lw.T, axis=0), expected_k, rtol=0, atol=1e-6)
    smoothed = vais.psis(lw.T, axis=0)
    np.testing.assert_allclose(smoothed.log_weights.T, arviz.psislw(lw.copy())[0], atol=1e-9)
    # under jit: the same values through a host callback (float32)
    traced = jax.jit(lambda lw: vais.psis_khat(lw, axis=0))(jnp.asarray(lw.T, jnp.float32))
    np.testing.assert_allclose(traced, arviz.psislw(lw.astype(np.float32).astype(np.float64))[1],
                               atol=1e-5)
    assert [vais.khat_category(k) for k in (0.3, 0.6, 0.9, np.nan)] == ["good", "ok", "bad",
                                                                        "bad"]
    assert list(vais.khat_category(np.array([0.2, 0.7, 0.71]))) == ["good", "ok", "bad"]


def test_khat_is_good_for_the_exact_posterior_and_bad_for_a_misplaced_q(x64):
    model, x, _ = _problem()
    loc, cov = lg.posterior(model, x)
    fn = lambda z: lg.log_joint(model, x, z)
    exact_q = distrax.MultivariateNormalFullCovariance(
        loc, jnp.broadcast_to(cov, (BATCH,) + cov.shape))
    sd = jnp.sqrt(jnp.diag(cov))
    misplaced = distrax.MultivariateNormalDiag(loc + 3 * sd[None], jnp.broadcast_to(0.5 * sd,
                                                                                  loc.shape))
    for q, check in ((exact_q, lambda k: np.all(k < vais.KHAT_GOOD)),
                     (misplaced, lambda k: np.all(k > vais.KHAT_OK))):
        log_w = jax.jit(lambda key: marginal.importance_log_weights(
            key, fn, q, num_samples=2000, chunk_size=500))(jax.random.key(0))
        assert log_w.shape == (2000, BATCH)
        khat = vais.psis_khat(log_w, axis=0)
        assert khat.shape == (BATCH,) and check(khat), khat


def test_return_khat_keeps_the_default_estimate(x64):
    """vae.log_likelihood_is and svi.log_marginal_estimate: the default return is unchanged;
    with return_khat=True the estimate equals it up to rounding and k-hat comes with it."""
    model = vnn.VAE(vnn.GaussianEncoder((), 2), vnn.BernoulliDecoder((), 5))
    x = (jax.random.uniform(jax.random.key(0), (7, 5)) < 0.5).astype(jnp.float64)
    params = jax.jit(model.init)(jax.random.key(1), x)
    key = jax.random.key(3)
    default = vae.log_likelihood_is(key, params, model, x, num_samples=200, chunk_size=64,
                                    batch_size=3)
    estimate, khat = jax.jit(lambda k: vae.log_likelihood_is(
        k, params, model, x, num_samples=200, chunk_size=64, batch_size=3,
        return_khat=True))(key)
    assert default.shape == estimate.shape == khat.shape == (7,)
    np.testing.assert_allclose(estimate, default, rtol=1e-10)
    assert np.all(np.isfinite(khat))

    lg_model, xs, _ = _problem()
    loc, cov = (np.asarray(a) for a in lg.posterior(lg_model, xs))
    family = F.MeanFieldNormal((LATENT,))  # a global latent: the posterior of example 0
    scale = 1.2 * np.sqrt(np.diag(cov))
    q_params = {"loc": jnp.asarray(loc[0]), "raw_scale": jnp.asarray(np.log(np.expm1(scale)))}
    log_joint = lambda z: lg.log_joint(lg_model, xs[:1], z[None])[0]
    base = jax.jit(lambda k: svi.log_marginal_estimate(k, family, q_params, log_joint,
                                                       num_samples=500))(key)
    # eager: k-hat is computed by ArviZ directly, a float64 NumPy scalar array
    value, khat = svi.log_marginal_estimate(key, family, q_params, log_joint, num_samples=500,
                                            chunk_size=100, return_khat=True)
    np.testing.assert_allclose(value, base, rtol=1e-10)
    assert np.shape(khat) == () and khat < vais.KHAT_GOOD
    with pytest.raises(ValueError, match="num_samples"):
        svi.log_marginal_estimate(key, family, q_params, log_joint, num_samples=10,
                                  return_khat=True)
    with pytest.raises(TypeError, match="return_khat"):
        vae.log_likelihood_is(key, params, model, x, return_khat=1)


# ----------------------------------------------------------------------------- the VAE


def _linear_gaussian_vae(rng, num_examples):
    """A VAE whose decoder is linear Gaussian, x = W^T z + b + sigma eps (exact log p(x));
    the encoder is left untrained (far from the posterior). Returns (model, params, x,
    exact_log_marginal_fn)."""
    w = rng.normal(size=(2, 3))
    b = rng.normal(size=3)
    sigma, min_scale = 0.5, 1e-3
    model = vnn.VAE(vnn.GaussianEncoder(hidden_sizes=(), latent_dim=2),
                    vnn.GaussianDecoder(hidden_sizes=(), data_dim=3, min_scale=min_scale))
    x = jnp.asarray(rng.normal(size=(num_examples, 2)) @ w + b
                    + sigma * rng.normal(size=(num_examples, 3)))
    params = jax.jit(model.init)(jax.random.key(0), x)
    dec_bias = np.concatenate([b, np.full(3, np.log(np.expm1(sigma - min_scale)))])
    dec_kernel = np.concatenate([w, np.zeros((2, 3))], axis=1)
    params["params"]["decoder"]["loc_and_raw_scale"] = {"kernel": jnp.asarray(dec_kernel),
                                                        "bias": jnp.asarray(dec_bias)}
    cov = w.T @ w + sigma**2 * np.eye(3)

    def exact_fn(x):
        diff = np.asarray(x) - b
        return -0.5 * (np.einsum("nd,de,ne->n", diff, np.linalg.inv(cov), diff)
                       + np.linalg.slogdet(cov)[1] + 3 * np.log(2 * np.pi))

    return model, params, x, exact_fn


def test_log_likelihood_ais_on_a_linear_gaussian_vae(x64):
    """A VAE with a linear Gaussian decoder has an exact log p(x); AIS from the encoder's q
    (untrained: far from the posterior) reaches it within its standard error."""
    model, params, x, exact_fn = _linear_gaussian_vae(np.random.default_rng(0), 5)
    exact = exact_fn(x)
    result = jax.jit(lambda k, p, x: vais.log_likelihood_ais(
        k, p, model, x, num_temperatures=30, num_chains=16, batch_size=3))(
        jax.random.key(2), params, x)  # the encoder's q; N = 5: a padded batch
    assert result.log_weights.shape == (16, 5) and result.log_marginal.shape == (5,)
    err = np.asarray(result.log_marginal) - exact
    assert np.all(np.abs(err) < 5 * np.asarray(result.stderr) + 2e-2), err
    # from the prior, one temperature: importance sampling with p(z), shapes only
    prior_is = vais.log_likelihood_ais(jax.random.key(3), params, model, x, num_temperatures=1,
                                       num_chains=4, proposal=vais.Prior(), batch_size=8)
    assert prior_is.log_weights.shape == (4, 5) and np.all(np.isnan(prior_is.acceptance_rate))
    assert np.all(np.isfinite(prior_is.log_marginal))
    with pytest.raises(TypeError, match="proposal"):
        vais.log_likelihood_ais(jax.random.key(3), params, model, x, num_temperatures=1,
                                proposal="prior")


def test_bdmc_on_simulated_data_sandwiches_the_exact_log_marginal(x64):
    """bdmc_simulated draws (z, x) from the model and bounds log p(x) from both sides: on the
    linear-Gaussian VAE the exact value lies between the bounds (within 4 SE of each, 16
    chains), and the sandwich narrows from 3 to 60 temperatures."""
    model, params, _, exact_fn = _linear_gaussian_vae(np.random.default_rng(1), 1)
    run = jax.jit(lambda k, t: vais.bdmc_simulated(k, params, model, 6, num_temperatures=t,
                                                   num_chains=16, batch_size=4),
                  static_argnums=1)  # 6 examples in batches of 4: a padded batch
    short, long = run(jax.random.key(5), 3), run(jax.random.key(5), 60)
    np.testing.assert_array_equal(np.asarray(short.x), np.asarray(long.x))  # same data
    assert long.x.shape == (6, 3) and long.z.shape == (6, 2)
    exact = exact_fn(long.x)
    for out in (short, long):
        lower, upper = np.asarray(out.bdmc.lower), np.asarray(out.bdmc.upper)
        se_lower = np.asarray(out.bdmc.forward.stderr)
        se_upper = np.asarray(out.bdmc.reverse.stderr)
        assert np.all(lower <= exact + 4 * se_lower + 1e-6), (lower, exact)
        assert np.all(upper >= exact - 4 * se_upper - 1e-6), (upper, exact)
    assert np.mean(long.bdmc.gap) < 0.5 * np.mean(short.bdmc.gap), (
        np.mean(short.bdmc.gap), np.mean(long.bdmc.gap))
    # the simulated x follow the decoder given z: residuals / sigma are standard normal
    loc = np.asarray(long.z) @ np.asarray(
        params["params"]["decoder"]["loc_and_raw_scale"]["kernel"])[:, :3] + np.asarray(
        params["params"]["decoder"]["loc_and_raw_scale"]["bias"])[:3]
    residual = (np.asarray(long.x) - loc) / 0.5
    assert abs(residual.mean()) < 4 / np.sqrt(18) and abs(residual.var() - 1) < 1.5
    with pytest.raises(ValueError, match="num_examples"):
        vais.bdmc_simulated(jax.random.key(0), params, model, 0, num_temperatures=2)


# ----------------------------------------------------------------------------- errors, jit


def test_bad_input_is_refused_naming_the_argument(x64):
    model, x, z = _problem()
    fn = lambda z: lg.log_joint(model, x, z)
    q = _prior(BATCH)
    key = jax.random.key(0)
    call = lambda **kw: vais.ais(kw.pop("key", key), kw.pop("fn", fn), kw.pop("q", q),
                                 **{"num_temperatures": 2, "num_chains": 2, **kw})
    with pytest.raises(ValueError, match="num_temperatures"):
        call(num_temperatures=0)
    with pytest.raises(TypeError, match="num_temperatures"):
        call(num_temperatures=2.0)
    with pytest.raises(ValueError, match="num_chains"):
        call(num_chains=0)
    with pytest.raises(TypeError, match="rng_key"):
        call(key=0)
    with pytest.raises(TypeError, match="log_joint_fn"):
        call(fn="not a function")
    with pytest.raises(TypeError, match="proposal"):
        call(q=object())
    with pytest.raises(ValueError, match="log_joint_fn"):
        call(fn=lambda z: fn(z)[:1])  # one value, not one per example
    with pytest.raises(TypeError, match="schedule"):
        call(schedule="sigmoidal")
    with pytest.raises(TypeError, match="transition"):
        call(transition="hmc")
    with pytest.raises(ValueError, match="rad"):
        vais.Sigmoidal(rad=-1.0)
    with pytest.raises(ValueError, match="target_accept"):
        vais.HMC(target_accept=1.5)
    with pytest.raises(TypeError, match="num_leapfrog_steps"):
        vais.HMC(num_leapfrog_steps=2.5)
    with pytest.raises(ValueError, match="initial_step_size"):
        vais.HMC(initial_step_size=2.0, max_step_size=1.0)
    with pytest.raises(ValueError, match="exact_posterior_sample"):
        vais.bdmc(key, fn, q, z[:1], num_temperatures=2, num_chains=2)
    with pytest.raises(ValueError, match="exact_posterior_sample"):
        vais.bdmc(key, fn, q, z.at[0, 0].set(jnp.nan), num_temperatures=2, num_chains=2)
    good = np.zeros((2, 30))
    nan_lw = good.copy()
    nan_lw[1, 3] = np.nan
    with pytest.raises(ValueError, match="log_weights"):
        vais.psis_khat(nan_lw)
    pos_inf = good.copy()
    pos_inf[0, 0] = np.inf
    with pytest.raises(ValueError, match="log_weights"):
        vais.psis_khat(pos_inf)
    with pytest.raises(ValueError, match="log_weights"):
        vais.psis_khat(np.zeros((2, 10)))  # too few samples for a tail fit
    with pytest.raises(ValueError, match="log_weights"):
        vais.psis_khat(np.full((30,), -np.inf))
    with pytest.raises(ValueError, match="axis"):
        vais.psis_khat(good, axis=2)
    with pytest.raises(TypeError, match="log_weights"):
        vais.psis_khat(np.array(["a"] * 30))
