"""Tests for vijax.vae: objectives, train steps, scanned epochs, evaluation, input errors.

References: a linear-Gaussian VAE whose marginal likelihood, posterior and ELBO are known in
closed form (float64 numpy), numpy forward passes, and hand-written formulas.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vijax import elbo as velbo
from vijax import nn as vnn
from vijax import vae

# ----------------------------------------------------------------------------- linear Gaussian
# p(z) = N(0, I_L), p(x | z) = N(x | z W + b, sigma^2 I_D) with orthogonal rows of W, so that
# p(x) = N(b, W^T W + sigma^2 I) and p(z | x) = N((x - b) W^T / (sigma^2 + a^2), sigma^2 /
# (sigma^2 + a^2)) are exact and the posterior is diagonal (a_i = |row i of W|).

L, D = 2, 3
SIGMA = 0.7
MIN_SCALE = 1e-3


def _linear_gaussian(rng):
    rows, _ = np.linalg.qr(rng.normal(size=(D, D)))
    a = np.array([1.5, 0.8])
    w = a[:, None] * rows[:L]  # [L, D]
    b = rng.normal(size=D)
    return w, b, a


def _linear_gaussian_params(w, b, a, loc_shift=0.0, scale_factor=1.0):
    """Exact-posterior encoder (shifted/scaled when asked) + linear Gaussian decoder params."""
    post_var = SIGMA**2 / (SIGMA**2 + a**2)
    enc_kernel = np.zeros((D, 2 * L))
    enc_kernel[:, :L] = w.T / (SIGMA**2 + a**2)
    enc_bias = np.concatenate([-b @ enc_kernel[:, :L] + loc_shift,
                               np.log(np.sqrt(post_var) * scale_factor)])
    dec_kernel = np.zeros((L, 2 * D))
    dec_kernel[:, :D] = w
    raw = SIGMA - MIN_SCALE
    dec_bias = np.concatenate([b, np.full(D, np.log(np.expm1(raw)))])  # softplus^-1
    return {"params": {
        "encoder": {"loc_and_raw_scale": {"kernel": jnp.asarray(enc_kernel),
                                          "bias": jnp.asarray(enc_bias)}},
        "decoder": {"loc_and_raw_scale": {"kernel": jnp.asarray(dec_kernel),
                                          "bias": jnp.asarray(dec_bias)}}}}


def _linear_gaussian_model():
    return vnn.VAE(vnn.GaussianEncoder(hidden_sizes=(), latent_dim=L),
                   vnn.GaussianDecoder(hidden_sizes=(), data_dim=D, min_scale=MIN_SCALE))


def _exact_log_marginal(x, w, b):
    cov = w.T @ w + SIGMA**2 * np.eye(D)
    diff = x - b
    _, logdet = np.linalg.slogdet(cov)
    maha = np.einsum("nd,de,ne->n", diff, np.linalg.inv(cov), diff)
    return -0.5 * (maha + logdet + D * np.log(2 * np.pi))


def _exact_elbo(x, w, b, a, loc_shift, scale_factor):
    """log p(x) - KL(q || p(z | x)) for the shifted/scaled posterior q, closed form."""
    post_var = SIGMA**2 / (SIGMA**2 + a**2)
    q_var = post_var * scale_factor**2
    kl = 0.5 * np.sum(q_var / post_var + loc_shift**2 / post_var - 1 - np.log(q_var / post_var))
    return _exact_log_marginal(x, w, b) - kl


def _data(rng, w, b, n):
    z = rng.normal(size=(n, L))
    return z @ w + b + SIGMA * rng.normal(size=(n, D))


def test_exact_posterior_gives_exact_log_marginal_everywhere(x64):
    rng = np.random.default_rng(0)
    w, b, a = _linear_gaussian(rng)
    model = _linear_gaussian_model()
    params = _linear_gaussian_params(w, b, a)
    x = jnp.asarray(_data(rng, w, b, 7))
    exact = _exact_log_marginal(np.asarray(x), w, b)
    # With q = p(z | x) every importance weight equals p(x): all bounds are exact.
    log_px = jax.jit(lambda k, p, x: vae.log_likelihood_is(
        k, p, model, x, num_samples=64, chunk_size=16, batch_size=3))(  # N = 7: padded batches
        jax.random.key(0), params, x)
    assert log_px.shape == (7,) and log_px.dtype == jnp.float64
    np.testing.assert_allclose(log_px, exact, rtol=1e-9)
    bounds = jax.jit(lambda k, p, x: vae.evaluate_bounds(k, p, model, x, num_samples=(1, 10),
                                                         batch_size=4))(
        jax.random.key(1), params, x)
    assert set(bounds) == {"elbo", "kl", "iwae_1", "iwae_10"}
    for key in ("iwae_1", "iwae_10"):
        assert bounds[key].shape == (7,)
        np.testing.assert_allclose(bounds[key], exact, rtol=1e-9)
    # (the analytic-KL ELBO is exact only in expectation: log p(x | z) still varies with z)
    for objective in (vae.ELBOMonteCarlo(num_samples=3), vae.IWAE(num_samples=4)):
        value = vae.objective_value(objective, jax.random.key(2), params, model, x)
        np.testing.assert_allclose(value, exact, rtol=1e-9)
    # KL(q || N(0, I)) against the closed form for the exact posterior
    post_var = SIGMA**2 / (SIGMA**2 + a**2)
    loc = (np.asarray(x) - b) @ w.T / (SIGMA**2 + a**2)
    kl = 0.5 * np.sum(loc**2 + post_var - 1 - np.log(post_var), -1)
    np.testing.assert_allclose(bounds["kl"], kl, rtol=1e-9)


def test_objectives_match_closed_form_elbo_within_standard_error(x64):
    rng = np.random.default_rng(1)
    w, b, a = _linear_gaussian(rng)
    shift, factor = np.array([0.4, -0.3]), 1.4
    model = _linear_gaussian_model()
    params = _linear_gaussian_params(w, b, a, shift, factor)
    x = jnp.asarray(_data(rng, w, b, 5))
    exact_elbo = _exact_elbo(np.asarray(x), w, b, a, shift, factor)
    exact_log_px = _exact_log_marginal(np.asarray(x), w, b)
    keys = jax.random.split(jax.random.key(3), 400)

    def values_of(objective, keys):
        return jax.jit(jax.vmap(lambda k: vae.objective_value(objective, k, params, model, x)))(
            keys)

    for objective in (vae.ELBOAnalyticKL(num_samples=5), vae.ELBOMonteCarlo(num_samples=5)):
        values = values_of(objective, keys)
        assert values.shape == (400, 5) and values.dtype == jnp.float64
        se = values.std(0) / math.sqrt(400)
        assert np.all(np.abs(values.mean(0) - exact_elbo) < 5 * se + 1e-9), objective
    # the IWAE bound increases with K towards log p(x)
    means = []
    for k in (1, 10, 200):
        values = values_of(vae.IWAE(num_samples=k), keys[:100])
        means.append(values.mean(0))
        assert np.all(values.mean(0) <= exact_log_px + 5 * values.std(0) / 10 + 1e-9)
    np.testing.assert_array_less(means[0], means[1])
    np.testing.assert_array_less(means[1], means[2])
    assert np.all(exact_log_px - means[2] < 0.1 * (exact_log_px - exact_elbo))


def test_importance_sampling_approaches_log_marginal_and_beats_elbo(x64):
    rng = np.random.default_rng(2)
    w, b, a = _linear_gaussian(rng)
    shift, factor = np.array([0.5, 0.2]), 1.3
    model = _linear_gaussian_model()
    params = _linear_gaussian_params(w, b, a, shift, factor)
    x = jnp.asarray(_data(rng, w, b, 6))
    exact = _exact_log_marginal(np.asarray(x), w, b)
    exact_elbo = _exact_elbo(np.asarray(x), w, b, a, shift, factor)
    log_px = vae.log_likelihood_is(jax.random.key(4), params, model, x, num_samples=5000,
                                   chunk_size=1000, batch_size=4)
    gap = exact - exact_elbo
    assert np.all(gap > 0.05)
    # log-mean-exp of 5000 weights: bias ~ Var(w / p) / (2 K), far below the ELBO gap
    assert np.all(np.abs(log_px - exact) < 0.05 * gap)
    bounds = vae.evaluate_bounds(jax.random.key(5), params, model, x, num_samples=(5000,),
                                 elbo_num_samples=2000, batch_size=6)
    assert np.all(np.abs(bounds["iwae_5000"] - exact) < 0.05 * gap)
    assert np.all(np.abs(bounds["elbo"] - exact_elbo) < 0.2 * gap)


# ----------------------------------------------------------------------------- Bernoulli nets

def _np_forward_encoder(p, x):
    h = np.tanh(x @ p["mlp"]["hidden_0"]["kernel"] + p["mlp"]["hidden_0"]["bias"])
    out = h @ p["loc_and_raw_scale"]["kernel"] + p["loc_and_raw_scale"]["bias"]
    return np.split(out, 2, -1)


def test_analytic_kl_elbo_equals_float64_hand_computation(x64):
    """Decoder with zero weights: log p(x | z) = const, so the bound is exact, no sampling."""
    model = vnn.VAE(vnn.GaussianEncoder((6,), 3), vnn.BernoulliDecoder((5,), 8))
    x = jnp.asarray((np.random.default_rng(3).uniform(size=(4, 8)) < 0.4), jnp.float64)
    params = model.init(jax.random.key(0), x)
    params = jax.tree.map(lambda v: v.astype(jnp.float64), params)
    dec = params["params"]["decoder"]
    dec["logits"]["kernel"] = jnp.zeros_like(dec["logits"]["kernel"])
    dec["logits"]["bias"] = jnp.linspace(-2.0, 2.0, 8)
    value = jax.jit(lambda p, x, k: vae.objective_value(vae.ELBOAnalyticKL(), k, p, model, x))(
        params, x, jax.random.key(1))
    assert value.shape == (4,) and value.dtype == jnp.float64
    p = jax.tree.map(np.asarray, params["params"])
    loc, log_scale = _np_forward_encoder(p["encoder"], np.asarray(x))
    kl = 0.5 * np.sum(loc**2 + np.exp(2 * log_scale) - 1 - 2 * log_scale, -1)
    prob = 1 / (1 + np.exp(-np.linspace(-2.0, 2.0, 8)))
    log_lik = np.sum(np.where(np.asarray(x) > 0.5, np.log(prob), np.log1p(-prob)), -1)
    np.testing.assert_allclose(value, log_lik - kl, rtol=1e-10)
    # the Monte Carlo ELBO has the same expectation: compare within its standard error
    mc = jax.jit(jax.vmap(lambda k: vae.objective_value(vae.ELBOMonteCarlo(), k, params, model,
                                                        x)))(jax.random.split(jax.random.key(2),
                                                                              2000))
    assert np.all(np.abs(mc.mean(0) - (log_lik - kl)) < 5 * mc.std(0) / math.sqrt(2000))


def _small_problem(seed=0, n=64, d=16):
    rng = np.random.default_rng(seed)
    prototypes = (rng.uniform(size=(2, d)) < 0.5).astype(np.float32)
    labels = rng.integers(0, 2, size=n)
    probs = np.clip(prototypes[labels] * 0.9 + 0.05, 0, 1)
    images = jnp.asarray(probs, jnp.float32)
    model = vnn.VAE(vnn.GaussianEncoder((32,), 4), vnn.BernoulliDecoder((32,), d))
    return model, images


def test_train_step_jit_no_recompile_and_loss_decreases():
    model, images = _small_problem()
    optimizer = optax.adam(1e-2)
    state = vae.init_train_state(jax.random.key(0), model, optimizer, images.shape[-1])
    assert int(state.step) == 0
    step_fn = vae.make_train_step(model, optimizer, vae.ELBOAnalyticKL(), with_grad_norm=True)
    traces = []

    def counted(state, batch, key):
        traces.append(1)
        return step_fn(state, batch, key)

    step = jax.jit(counted, donate_argnums=0)
    key = jax.random.key(1)
    evaluate = jax.jit(lambda p: jnp.mean(vae.objective_value(
        vae.ELBOAnalyticKL(num_samples=50), jax.random.key(9), p, model, images)))
    before = float(evaluate(state.params))
    for i in range(150):
        key, batch_key, step_key = jax.random.split(key, 3)
        batch = vae.binarize_images(batch_key, images[(i % 4) * 16:(i % 4 + 1) * 16])
        state, metrics = step(state, batch, step_key)
    assert len(traces) == 1 and step._cache_size() == 1
    assert set(metrics) == {"loss", "objective", "grad_norm"}
    assert metrics["loss"].shape == () and metrics["loss"].dtype == jnp.float32
    assert float(metrics["objective"]) == -float(metrics["loss"])
    assert int(state.step) == 150
    after = float(evaluate(state.params))
    # 16 pixels from two noisy prototypes: the ELBO must improve by several nats
    assert after > before + 2.0, (before, after)


def test_scanned_epoch_equals_steps_one_by_one():
    model, images = _small_problem(seed=1, n=50)
    optimizer = optax.adam(3e-3)
    objective = vae.IWAE(num_samples=3, estimator=velbo.DReG())
    state0 = vae.init_train_state(jax.random.key(0), model, optimizer, images)
    epoch = jax.jit(vae.make_train_epoch(model, optimizer, objective, batch_size=16,
                                         binarize=True))
    key = jax.random.key(7)
    state_scan, metrics = epoch(state0, images, key)
    assert metrics["loss"].shape == (3,)  # 50 // 16 full batches
    assert set(metrics) == {"loss", "objective"}
    assert epoch._cache_size() == 1
    epoch(state_scan, images, jax.random.key(8))
    assert epoch._cache_size() == 1

    indices, step_keys = vae.epoch_plan(key, 50, 16)
    assert indices.shape == (3, 16) and len(np.unique(np.asarray(indices))) == 48
    step = jax.jit(vae.make_train_step(model, optimizer, objective))
    state = state0
    losses = []
    assert step_keys.shape == (3, 2)
    for idx, (batch_key, step_key) in zip(indices, step_keys):
        batch = vae.binarize_images(batch_key, images[idx])
        state, m = step(state, batch, step_key)
        losses.append(m["loss"])
    np.testing.assert_allclose(metrics["loss"], losses, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(state_scan.params), jax.tree.leaves(state.params)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert int(state_scan.step) == 3


def test_binarize_images_is_bernoulli_of_intensity():
    images = jnp.full((2000, 3), jnp.asarray([0.0, 0.3, 1.0]))
    out = vae.binarize_images(jax.random.key(0), images)
    assert out.dtype == images.dtype and set(np.unique(np.asarray(out))) <= {0.0, 1.0}
    mean = np.asarray(out).mean(0)
    assert mean[0] == 0.0 and mean[2] == 1.0
    assert abs(mean[1] - 0.3) < 5 * math.sqrt(0.3 * 0.7 / 2000)


def test_active_units_constructed_case(x64):
    model = vnn.VAE(vnn.GaussianEncoder((), 4), vnn.BernoulliDecoder((), 5))
    x = jnp.asarray(np.random.default_rng(4).uniform(size=(300, 5)))
    params = jax.tree.map(lambda v: v.astype(jnp.float64), model.init(jax.random.key(0), x))
    kernel = np.zeros((5, 8))
    kernel[:, 0] = 1.0      # Var = sum of 5 uniform variances = 5/12: active
    kernel[0, 1] = 0.5      # 0.25/12 = 0.021: active
    kernel[0, 2] = 0.2      # 0.04/12 = 0.0033: inactive
    kernel[:, 4:] = 3.0     # the scale depends on x, not the mean: inactive dim 3
    params["params"]["encoder"]["loc_and_raw_scale"]["kernel"] = jnp.asarray(kernel)
    count, variances = vae.active_units(params, model, x, batch_size=128)
    expected = np.var(np.asarray(x) @ kernel[:, :4], axis=0)
    np.testing.assert_allclose(variances, expected, rtol=1e-9, atol=1e-15)
    assert int(count) == 2
    count_jit, _ = jax.jit(lambda p, x: vae.active_units(p, model, x, threshold=0.001))(params, x)
    assert int(count_jit) == 3
    assert int(vae.active_units(params, model, x, threshold=np.float32(0.001))[0]) == 3
    for bad, error in ((float("nan"), ValueError), (-0.1, ValueError), ("0.01", TypeError),
                       (True, TypeError)):
        with pytest.raises(error, match="threshold"):
            vae.active_units(params, model, x, threshold=bad)


def test_reconstruct_and_sample_images_shapes():
    model, images = _small_problem()
    params = model.init(jax.random.key(0), images)
    rec = vae.reconstruct(params, model, images[:5])
    samples = jax.jit(lambda k, p: vae.sample_images(k, p, model, 7))(jax.random.key(1), params)
    assert rec.shape == (5, 16) and samples.shape == (7, 16)
    assert bool(jnp.all((rec > 0) & (rec < 1))) and bool(jnp.all((samples > 0) & (samples < 1)))


def test_sample_images_draws_follow_the_decoder_given_z():
    """draw=True is ancestral sampling: z from the first half of the key's split, then
    x ~ p(x | z). Bernoulli: 0/1 pixels whose mean matches sigmoid(logits(z)) within 4 standard
    errors; Gaussian: (x - loc(z)) / scale(z) has mean 0 and variance 1 within 4 SE."""
    model, images = _small_problem()
    params = model.init(jax.random.key(0), images)
    key, n = jax.random.key(3), 3000
    draws = jax.jit(lambda k, p: vae.sample_images(k, p, model, n, draw=True))(key, params)
    z = jax.random.normal(jax.random.split(key)[0], (n, 4))
    probs = np.asarray(model.apply(params, z, method=type(model).decode_mean), np.float64)
    draws = np.asarray(draws, np.float64)
    assert draws.shape == (n, 16) and set(np.unique(draws)) <= {0.0, 1.0}
    se = math.sqrt(np.sum(probs * (1 - probs))) / draws.size
    assert abs(np.mean(draws - probs)) < 4 * se
    # per pixel too (each over n draws)
    se_pixel = np.sqrt(np.sum(probs * (1 - probs), 0)) / n
    assert np.all(np.abs(np.mean(draws - probs, 0)) < 5 * se_pixel)

    gmodel = vnn.VAE(vnn.GaussianEncoder((8,), 2), vnn.GaussianDecoder((8,), 5))
    gparams = gmodel.init(jax.random.key(1), jnp.zeros((1, 5)))
    x = np.asarray(vae.sample_images(key, gparams, gmodel, n, draw=True), np.float64)
    z = jax.random.normal(jax.random.split(key)[0], (n, 2))
    loc, scale = (np.asarray(a, np.float64) for a in gmodel.apply(gparams, z,
                                                                     method=type(gmodel).decode))
    u = (x - loc) / scale
    assert abs(u.mean()) < 4 / math.sqrt(u.size)
    assert abs(u.var() - 1) < 4 * math.sqrt(2 / u.size)
    means = vae.sample_images(key, gparams, gmodel, 4)  # the default: E[x | z], z from rng_key
    np.testing.assert_allclose(means, gmodel.apply(gparams, jax.random.normal(key, (4, 2)),
                                                   method=type(gmodel).decode_mean), rtol=1e-6)
    with pytest.raises(TypeError, match="draw"):
        vae.sample_images(key, params, model, 2, draw="yes")


def test_evaluation_functions_jit_vmap_match_per_batch_calls_and_do_not_retrace(x64):
    """``jit(vmap(.))`` of log_likelihood_is, evaluate_bounds and reconstruct over a leading
    axis of 3 image batches equals the same function called on each batch alone with the same
    key; the static arguments (num_samples, batch_size, chunk_size) are closed over, and a
    second call with new images and keys does not trace again."""
    num_batches, batch, d = 3, 4, 16
    model = vnn.iwae_mnist_vae(hidden_sizes=(8,), latent_dim=3, data_dim=d)
    rng = np.random.default_rng(5)
    images = jnp.asarray(rng.uniform(size=(num_batches, batch, d)) < 0.4, jnp.float64)
    new_images = jnp.asarray(rng.uniform(size=(num_batches, batch, d)) < 0.6, jnp.float64)
    # random float64 weights in the layout model.init creates (eval_shape: no compilation)
    layout = jax.eval_shape(model.init, jax.random.key(0), images[0])
    params = jax.tree.map(lambda s: jnp.asarray(rng.normal(scale=0.5, size=s.shape)), layout)

    # log_likelihood_is: batch_size=3 < 4 rows pads each member; chunk_size=3 < 6 samples scans
    def log_px(key, p, x):
        return vae.log_likelihood_is(key, p, model, x, num_samples=6, chunk_size=3,
                                     batch_size=3)

    def bounds(key, p, x):
        return vae.evaluate_bounds(key, p, model, x, num_samples=(3,), batch_size=4)

    def rec(p, x):
        return vae.reconstruct(p, model, x)

    traces = {"log_likelihood_is": 0, "evaluate_bounds": 0, "reconstruct": 0}

    def counted(name, fn):
        def traced(*args):
            traces[name] += 1  # Python side effect: runs only when jax traces the function
            return fn(*args)
        return traced

    # one key shared by the batches (log_likelihood_is), one key per batch (evaluate_bounds)
    key = jax.random.key(1)
    keys = jax.random.split(jax.random.key(2), num_batches)
    log_px_b = jax.jit(jax.vmap(counted("log_likelihood_is", log_px), (None, None, 0)))
    bounds_b = jax.jit(jax.vmap(counted("evaluate_bounds", bounds), (0, None, 0)))
    rec_b = jax.jit(jax.vmap(counted("reconstruct", rec), (None, 0)))
    out_log_px = log_px_b(key, params, images)
    out_bounds = bounds_b(keys, params, images)
    out_rec = rec_b(params, images)
    assert out_log_px.shape == (num_batches, batch) and out_log_px.dtype == jnp.float64
    assert set(out_bounds) == {"elbo", "kl", "iwae_3"}
    for value in out_bounds.values():
        assert value.shape == (num_batches, batch) and value.dtype == jnp.float64
    assert out_rec.shape == (num_batches, batch, d) and out_rec.dtype == jnp.float64
    # references: each batch on its own (jitted un-batched, so each program compiles once)
    log_px_1, bounds_1 = jax.jit(log_px), jax.jit(bounds)
    for b in range(num_batches):
        np.testing.assert_allclose(out_log_px[b], log_px_1(key, params, images[b]), rtol=1e-10)
        for name, value in bounds_1(keys[b], params, images[b]).items():
            np.testing.assert_allclose(out_bounds[name][b], value, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(out_rec[b], rec(params, images[b]), rtol=1e-10)
    # the members really differ (different images; for the bounds also different keys)
    assert not np.allclose(out_log_px[0], out_log_px[1])
    assert not np.allclose(out_bounds["iwae_3"][0], out_bounds["iwae_3"][1])
    # second calls with new values: no new trace and no new compilation
    out2 = log_px_b(jax.random.key(3), params, new_images)
    bounds_b(jax.random.split(jax.random.key(4), num_batches), params, new_images)
    rec_b(params, new_images)
    assert not np.allclose(out2, out_log_px)
    assert traces == {"log_likelihood_is": 1, "evaluate_bounds": 1, "reconstruct": 1}
    assert log_px_b._cache_size() == bounds_b._cache_size() == rec_b._cache_size() == 1

# ----------------------------------------------------------------------------- bad input

def test_bad_images_raise_clear_errors():
    model, images = _small_problem()
    optimizer = optax.sgd(0.1)
    state = vae.init_train_state(jax.random.key(0), model, optimizer, 16)
    step = jax.jit(vae.make_train_step(model, optimizer, vae.ELBOAnalyticKL()))
    key = jax.random.key(1)
    with pytest.raises(ValueError, match=r"batch.*shape \[batch, D\]"):
        step(state, images.reshape(4, 16, 16), key)
    with pytest.raises(ValueError, match="16 features on its last axis"):
        step(state, images[:, :15], key)
    with pytest.raises(TypeError, match="floating"):
        step(state, (images > 0.5).astype(jnp.uint8), key)
    with pytest.raises(ValueError, match="NaN"):
        vae.objective_value(vae.ELBOAnalyticKL(), key, state.params, model,
                            images.at[3, 2].set(jnp.nan))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        vae.check_images(images * 2.0, name="train_images")
    epoch = vae.make_train_epoch(model, optimizer, vae.ELBOAnalyticKL(), batch_size=16,
                                 binarize=True)
    with pytest.raises(ValueError, match="images contains NaN"):
        epoch(state, images.at[0, 0].set(jnp.nan), key)  # concrete: checked before tracing
    with pytest.raises(ValueError, match="batch_size"):
        epoch(state, images[:8], key)
    with pytest.raises(ValueError, match="batch_size"):
        vae.make_train_epoch(model, optimizer, vae.ELBOAnalyticKL(), batch_size=0,
                             binarize=False)
    with pytest.raises(ValueError, match="data_dim"):
        vae.init_train_state(key, model, optimizer, 15)
    with pytest.raises(ValueError, match="num_samples"):
        vae.IWAE(num_samples=0)
    with pytest.raises(TypeError, match="num_samples"):
        vae.evaluate_bounds(key, state.params, model, images, num_samples=(2.5,))


@pytest.mark.parametrize("binarize", [True, False])
def test_jitted_epoch_with_a_nan_pixel_gives_nan_losses_from_its_batch_on(binarize):
    # Under jit pixel values are not checked; a NaN pixel must reach the loss (also through the
    # dynamic binarization), not be trained on silently.
    model, images = _small_problem(seed=2, n=48)
    optimizer = optax.adam(1e-2)
    state = vae.init_train_state(jax.random.key(0), model, optimizer, 16)
    key = jax.random.key(5)
    indices, _ = vae.epoch_plan(key, 48, 12)
    bad_step = 2
    bad_row = int(indices[bad_step, 4])
    epoch = jax.jit(vae.make_train_epoch(model, optimizer, vae.ELBOAnalyticKL(), batch_size=12,
                                         binarize=binarize))
    _, metrics = epoch(state, images.at[bad_row, 7].set(jnp.nan), key)
    loss = np.asarray(metrics["loss"])
    assert loss.shape == (4,)
    assert np.all(np.isfinite(loss[:bad_step]))
    assert np.all(np.isnan(loss[bad_step:]))  # the parameters are NaN after the bad step


# The estimators each bound of vijax.elbo documents (elbo_analytic_kl, elbo, iwae_bound).
DOCUMENTED_ESTIMATORS = {
    vae.ELBOAnalyticKL: (velbo.Pathwise, velbo.ScoreFunction),
    vae.ELBOMonteCarlo: (velbo.Pathwise, velbo.ScoreFunction, velbo.StickingTheLanding),
    vae.IWAE: (velbo.Pathwise, velbo.ScoreFunction, velbo.StickingTheLanding, velbo.DReG),
}


@pytest.mark.parametrize("objective_cls", list(DOCUMENTED_ESTIMATORS))
def test_objectives_accept_exactly_the_estimators_vijax_elbo_accepts(objective_cls):
    model, images = _small_problem()
    params = jax.eval_shape(model.init, jax.random.key(0), images)
    loo = velbo.ScoreFunction(baseline=velbo.LeaveOneOut())
    estimators = [velbo.Pathwise(), velbo.ScoreFunction(), velbo.StickingTheLanding(),
                  velbo.DReG(), loo, "pathwise"]
    for estimator in estimators:
        for num_samples in (1, 3):
            documented = (isinstance(estimator, DOCUMENTED_ESTIMATORS[objective_cls])
                          and not (estimator == loo and num_samples < 2))
            # What vijax.elbo's bound does with the combination when traced (eval_shape):
            unchecked = objective_cls(num_samples=num_samples)
            object.__setattr__(unchecked, "estimator", estimator)  # bypass the construction check
            try:
                jax.eval_shape(lambda p: vae.objective_value(  # noqa: B023
                    unchecked, jax.random.key(1), p, model, images), params)
                traced = True
            except (TypeError, ValueError):
                traced = False
            assert traced == documented, (estimator, num_samples)
            if documented:
                assert objective_cls(num_samples, estimator).estimator == estimator
            else:  # refused at construction, before any tracing
                with pytest.raises((TypeError, ValueError), match="estimator"):
                    objective_cls(num_samples=num_samples, estimator=estimator)
    with pytest.raises(TypeError, match="`estimator` for ELBOAnalyticKL"):
        vae.ELBOAnalyticKL(estimator=velbo.DReG())
    with pytest.raises(ValueError, match=r"`estimator` ScoreFunction\(LeaveOneOut\(\)\).*>= 2"):
        vae.IWAE(num_samples=1, estimator=loo)
    with pytest.raises(ValueError, match="num_samples"):
        dataclasses.replace(vae.ELBOMonteCarlo(num_samples=2, estimator=loo), num_samples=1)


# ----------------------------------------------------------------------------- bad arguments

@pytest.fixture(scope="module")
def tiny():
    """A small model and the shapes of its state: the errors below are raised before any
    array is read or anything is compiled (so abstract parameters suffice)."""
    model = vnn.iwae_mnist_vae(hidden_sizes=(8,), latent_dim=2, data_dim=16)
    optimizer = optax.adam(1e-3)
    state = jax.eval_shape(lambda k: vae.init_train_state(k, model, optimizer, 16),
                           jax.random.key(0))
    return dataclasses.make_dataclass("Tiny", ["model", "opt", "state", "images", "key"])(
        model, optimizer, state, jnp.full((10, 16), 0.5, jnp.float32), jax.random.key(1))


_BAD_CALLS = {
    # int seeds as rng_key (the train step's check runs on tracers too: traced here)
    "sample-int-key": (lambda t: vae.sample_images(0, t.state.params, t.model, 2),
                       TypeError, "rng_key"),
    "step-int-key-traced": (lambda t: jax.eval_shape(vae.make_train_step(
        t.model, t.opt, vae.IWAE()), t.state, t.images, 0), TypeError, "rng_key"),
    "epoch_plan-int-key": (lambda t: vae.epoch_plan(0, 10, 2), TypeError, "rng_key"),
    # TrainState / params mixed up
    "value-state-as-params": (lambda t: vae.objective_value(
        vae.IWAE(), t.key, t.state, t.model, t.images), TypeError, "params.*state.params"),
    "step-params-as-state": (lambda t: vae.make_train_step(t.model, t.opt, vae.IWAE())(
        t.state.params, t.images, t.key), TypeError, "state must be a vijax.vae.TrainState"),
    # optimizer and objective checked at construction
    "init-optax.adam": (lambda t: vae.init_train_state(t.key, t.model, optax.adam, 16),
                        TypeError, "optimizer"),
    "init-lr-as-opt": (lambda t: vae.init_train_state(t.key, t.model, 1e-3, 16),
                       TypeError, "optimizer"),
    "step-str-opt": (lambda t: vae.make_train_step(t.model, "adam", vae.IWAE()),
                     TypeError, "optimizer"),
    "loss-str-objective": (lambda t: vae.make_loss_fn(t.model, "elbo"), TypeError, "objective"),
    "value-objective-class": (lambda t: vae.objective_value(
        vae.IWAE, t.key, t.state.params, t.model, t.images), TypeError, "objective.*instance"),
    "value-estimator": (lambda t: vae.objective_value(
        velbo.Pathwise(), t.key, t.state.params, t.model, t.images), TypeError, "objective"),
    # meshes
    "mesh-no-batch-axis": (lambda t: vae.make_train_step(
        t.model, t.opt, vae.IWAE(), mesh=jax.sharding.Mesh(np.asarray(jax.devices()[:1]),
                                                           ("rows",))),
        ValueError, "mesh must have an axis named 'batch'"),
    "mesh-str": (lambda t: vae.make_train_step(t.model, t.opt, vae.IWAE(), mesh="cpu"),
                 TypeError, "mesh"),
    "mesh-no-devices": (lambda t: vae.data_parallel_mesh([]), ValueError, "devices"),
    # other arguments
    "binarize-str": (lambda t: vae.make_train_epoch(t.model, t.opt, vae.IWAE(), batch_size=5,
                                                    binarize="no"), TypeError, "binarize"),
    "epoch_plan-float-batch": (lambda t: vae.epoch_plan(t.key, 10, 2.5), TypeError,
                               "batch_size"),
    "epoch_plan-float-n": (lambda t: vae.epoch_plan(t.key, 10.0, 2), TypeError, "num_examples"),
    "init-data_dim-float": (lambda t: vae.init_train_state(t.key, t.model, t.opt, 16.0),
                            TypeError, "data_dim must be an int"),
    "init-data_dim-str": (lambda t: vae.init_train_state(t.key, t.model, t.opt, "16"),
                          TypeError, "data_dim must be an int"),
    "bounds-repeated-k": (lambda t: vae.evaluate_bounds(
        t.key, t.state.params, t.model, t.images, num_samples=(5, 5)), ValueError,
        "num_samples must not repeat"),
}


@pytest.mark.parametrize("name", list(_BAD_CALLS))
def test_bad_arguments_raise_errors_naming_them(tiny, name):
    call, error, match = _BAD_CALLS[name]
    with pytest.raises(error, match=match):
        call(tiny)


def test_objectives_and_estimates_run_under_rank_promotion_raise():
    """Callers may set jax_numpy_rank_promotion="raise"; the distrax prior's implicit
    [L] -> [batch, L] broadcast inside the log-joint must not trip it, and the values equal
    those computed with promotion allowed."""
    model, images = _small_problem()
    state = vae.init_train_state(jax.random.key(0), model, optax.sgd(0.1), 16)
    key = jax.random.key(1)
    calls = {
        "iwae": lambda: vae.objective_value(vae.IWAE(num_samples=3), key, state.params, model,
                                            images),
        "elbo-mc": lambda: vae.objective_value(vae.ELBOMonteCarlo(), key, state.params, model,
                                               images),
        "log_px": lambda: vae.log_likelihood_is(key, state.params, model, images,
                                                num_samples=6, chunk_size=3),
    }
    for name, call in calls.items():
        allowed = call()
        with jax.numpy_rank_promotion("raise"):
            raised = call()
        np.testing.assert_array_equal(np.asarray(raised), np.asarray(allowed), err_msg=name)
