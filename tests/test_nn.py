"""Tests for vijax.nn: encoder/decoder modules and likelihood helpers.

References are independent: numpy re-implementations of the layers (float64), distrax's own
log-probabilities, and closed forms.
"""

from __future__ import annotations

import distrax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vijax import nn as vnn


def _np_dense(params, x):
    return x @ np.asarray(params["kernel"], np.float64) + np.asarray(params["bias"], np.float64)


def _np_mlp(params, x, num_layers, activation=np.tanh):
    for i in range(num_layers):
        x = activation(_np_dense(params[f"hidden_{i}"], x))
    return x


def test_encoder_matches_numpy_forward_and_returns_diag_gaussian():
    encoder = vnn.GaussianEncoder(hidden_sizes=(7, 5), latent_dim=3)
    x = jax.random.uniform(jax.random.key(0), (4, 11))
    params = encoder.init(jax.random.key(1), x)
    with jax.numpy_rank_promotion("raise"):
        q = encoder.apply(params, x)
    assert isinstance(q, distrax.MultivariateNormalDiag)
    assert q.batch_shape == (4,) and q.event_shape == (3,)
    p = params["params"]
    h = _np_mlp(p["mlp"], np.asarray(x, np.float64), 2)
    out = _np_dense(p["loc_and_raw_scale"], h)
    np.testing.assert_allclose(q.loc, out[:, :3], rtol=1e-5, atol=1e-6)
    # The IWAE parameterisation: scale = exp(linear output).
    np.testing.assert_allclose(q.scale_diag, np.exp(out[:, 3:]), rtol=1e-5)
    assert q.loc.dtype == jnp.float32


def _np_relu(x):
    return np.maximum(x, 0.0)


def _np_softplus(x):
    return np.logaddexp(0.0, x)


@pytest.mark.parametrize("activation, np_activation", [(nn.relu, _np_relu),
                                                       (nn.softplus, _np_softplus)],
                         ids=["relu", "softplus"])
def test_activation_option_is_used_in_every_hidden_layer(activation, np_activation):
    """iwae_mnist_vae(activation=...) passes the activation to both networks, and both apply
    it after every hidden layer: encoder loc/scale and decoder logits equal a float64 numpy
    forward pass with that activation; replacing it by tanh in any one layer does not."""
    model = vnn.iwae_mnist_vae(hidden_sizes=(7, 5), latent_dim=3, data_dim=11,
                               activation=activation)
    assert model.encoder.activation is activation and model.decoder.activation is activation
    x = jax.random.uniform(jax.random.key(0), (4, 11))
    z = jax.random.normal(jax.random.key(1), (4, 3))
    params = model.init(jax.random.key(2), x)
    with jax.numpy_rank_promotion("raise"):
        q = model.apply(params, x, method=vnn.VAE.encode)
        logits = model.apply(params, z, method=vnn.VAE.decode)
    assert q.loc.shape == q.scale_diag.shape == (4, 3) and logits.shape == (4, 11)
    p = jax.tree.map(lambda v: np.asarray(v, np.float64), params["params"])
    x64, z64 = np.asarray(x, np.float64), np.asarray(z, np.float64)

    def encoder_out(mlp_out):
        return _np_dense(p["encoder"]["loc_and_raw_scale"], mlp_out)

    def decoder_out(mlp_out):
        return _np_dense(p["decoder"]["logits"], mlp_out)

    out = encoder_out(_np_mlp(p["encoder"]["mlp"], x64, 2, np_activation))
    np.testing.assert_allclose(q.loc, out[:, :3], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(q.scale_diag, np.exp(out[:, 3:]), rtol=1e-5)
    np.testing.assert_allclose(logits, decoder_out(_np_mlp(p["decoder"]["mlp"], z64, 2,
                                                           np_activation)),
                               rtol=1e-5, atol=1e-6)
    # the check can tell layers apart: tanh in layer i alone moves the outputs far beyond the
    # tolerance above (so a network that ignored the option in any layer would fail)
    for name, net_in, net_out, got in (("encoder", x64, encoder_out, q.loc),
                                       ("decoder", z64, decoder_out, logits)):
        for layer in range(2):
            h = net_in
            for i in range(2):
                act = np.tanh if i == layer else np_activation
                h = act(_np_dense(p[name]["mlp"][f"hidden_{i}"], h))
            swapped = net_out(h)[:, :got.shape[-1]]
            assert np.max(np.abs(swapped - np.asarray(got, np.float64))) > 1e-3, (name, layer)


def test_encoder_scale_positive_for_extreme_inputs_and_softplus_link():
    encoder = vnn.GaussianEncoder(hidden_sizes=(), latent_dim=2, scale_fn=jax.nn.softplus,
                                  min_scale=1e-4)
    x = jnp.array([[1e4, -1e4], [-1e4, 1e4], [0.0, 0.0]])
    params = encoder.init(jax.random.key(0), x)
    loc, scale = encoder.apply(params, x, method=vnn.GaussianEncoder.loc_and_scale)
    assert loc.shape == scale.shape == (3, 2)
    assert bool(jnp.all(scale >= 1e-4)) and bool(jnp.all(jnp.isfinite(scale)))
    raw = _np_dense(params["params"]["loc_and_raw_scale"], np.asarray(x, np.float64))[:, 2:]
    np.testing.assert_allclose(scale[2], np.logaddexp(0.0, raw[2]) + 1e-4, rtol=1e-5)


def test_modules_under_jit_and_vmap_with_leading_axes():
    model = vnn.VAE(vnn.GaussianEncoder((6,), 2), vnn.BernoulliDecoder((6,), 5))
    x = jax.random.uniform(jax.random.key(0), (3, 5))
    params = model.init(jax.random.key(1), x)
    encode = jax.jit(lambda p, x: model.apply(p, x, method=vnn.VAE.encode).loc)
    np.testing.assert_allclose(jax.vmap(encode, (None, 0))(params, x[:, None])[:, 0],
                               encode(params, x), rtol=1e-6)
    z = jax.random.normal(jax.random.key(2), (4, 3, 2))  # [num_samples, batch, L]
    ll = model.apply(params, z, x, method=vnn.VAE.log_likelihood)
    assert ll.shape == (4, 3)
    logits = model.apply(params, z, method=vnn.VAE.decode)
    np.testing.assert_allclose(ll, vnn.bernoulli_log_likelihood(logits, x[None]), rtol=1e-6)
    probs = model.apply(params, z, method=vnn.VAE.decode_mean)
    np.testing.assert_allclose(probs, jax.nn.sigmoid(logits), rtol=1e-6)


@pytest.mark.parametrize("dtype, out_dtype", [(jnp.bfloat16, jnp.float32),
                                              (jnp.float32, jnp.float32),
                                              (jnp.float64, jnp.float64)])
def test_parameters_are_float32_and_outputs_promote_with_the_input(dtype, out_dtype, x64):
    model = vnn.iwae_mnist_vae(hidden_sizes=(8,), latent_dim=2, data_dim=16)
    x = jnp.full((1, 16), 0.5, dtype)
    params = model.init(jax.random.key(0), x)
    assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
    assert model.apply(params, x).dtype == out_dtype


def test_default_architecture_is_iwae_784_200_200_50():
    model = vnn.iwae_mnist_vae()
    params = model.init(jax.random.key(0), jnp.zeros((1, 784)))["params"]
    shapes = jax.tree.map(jnp.shape, params)
    assert shapes["encoder"]["mlp"]["hidden_0"]["kernel"] == (784, 200)
    assert shapes["encoder"]["mlp"]["hidden_1"]["kernel"] == (200, 200)
    assert shapes["encoder"]["loc_and_raw_scale"]["kernel"] == (200, 100)  # loc and log-scale
    assert shapes["decoder"]["mlp"]["hidden_0"]["kernel"] == (50, 200)
    assert shapes["decoder"]["mlp"]["hidden_1"]["kernel"] == (200, 200)
    assert shapes["decoder"]["logits"]["kernel"] == (200, 784)
    assert model.encoder.activation is nn.tanh and model.decoder.activation is nn.tanh


def test_pixel_mean_logit_and_decoder_bias_init_match_numpy():
    rng = np.random.default_rng(0)
    images = rng.uniform(size=(50, 6)).astype(np.float32)
    images[:, 0] = 0.0  # an always-black pixel: clipped to eps
    images[:, 1] = 1.0  # an always-white pixel: clipped to 1 - eps
    expected_mean = np.clip(images.astype(np.float64).mean(0), 1e-3, 1 - 1e-3)
    expected = np.log(expected_mean / (1 - expected_mean))
    logit = vnn.pixel_mean_logit(images)
    assert logit.shape == (6,) and logit.dtype == jnp.float32
    np.testing.assert_allclose(logit, expected, rtol=1e-5)
    decoder = vnn.BernoulliDecoder((4,), 6, output_bias_init=logit)
    params = decoder.init(jax.random.key(0), jnp.zeros((1, 3)))
    np.testing.assert_allclose(params["params"]["logits"]["bias"], expected, rtol=1e-5)
    # with zero weights the decoder's pixel probabilities are the clipped training means
    zero = jax.tree.map(jnp.zeros_like, params)
    zero["params"]["logits"]["bias"] = params["params"]["logits"]["bias"]
    probs = decoder.apply(zero, jnp.zeros((2, 3)), method=vnn.BernoulliDecoder.mean)
    np.testing.assert_allclose(probs[0], expected_mean, rtol=1e-5)


def test_pixel_mean_logit_float64_and_errors(x64):
    images = np.full((3, 2), 0.25)
    out = vnn.pixel_mean_logit(images)
    assert out.dtype == jnp.float64
    np.testing.assert_allclose(out, np.log(0.25 / 0.75), rtol=1e-12)
    with pytest.raises(TypeError, match="train_images"):
        vnn.pixel_mean_logit(np.zeros((3, 2), np.uint8))
    with pytest.raises(ValueError, match="train_images"):
        vnn.pixel_mean_logit(np.zeros((3,)))
    with pytest.raises(ValueError, match="eps"):
        vnn.pixel_mean_logit(images, eps=0.7)
    with pytest.raises(ValueError, match="train_images contains NaN"):
        vnn.pixel_mean_logit(np.where(np.eye(3, 2) > 0, np.nan, images))
    with pytest.raises(ValueError, match=r"train_images must be pixels in \[0, 1\]"):
        vnn.pixel_mean_logit(images * 255.0)
    # under jit values are not inspected; the result is the same logit
    np.testing.assert_allclose(jax.jit(vnn.pixel_mean_logit)(images), out, rtol=1e-12)
    with pytest.raises(ValueError, match="output_bias_init"):
        vnn.BernoulliDecoder((2,), 4, output_bias_init=np.zeros(5)).init(
            jax.random.key(0), jnp.zeros((1, 2)))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_bernoulli_log_likelihood_matches_distrax_and_is_stable(dtype, x64):
    rng = np.random.default_rng(1)
    logits = np.concatenate([rng.normal(size=(2, 3, 7)) * 3,
                             np.full((2, 3, 1), 60.0), np.full((2, 3, 1), -60.0)], -1)
    x = (rng.uniform(size=(3, 9)) < 0.5).astype(np.float64)
    x[:, -2:] = [1.0, 0.0]  # saturated logits agreeing with the data: log-lik ~ 0, finite
    logits, x = jnp.asarray(logits, dtype), jnp.asarray(x, dtype)
    with jax.numpy_rank_promotion("allow"):  # the [batch, D] data broadcast over samples
        out = jax.jit(vnn.bernoulli_log_likelihood)(logits, x)
        expected = distrax.Bernoulli(logits=logits.astype(jnp.float64)).log_prob(
            jnp.broadcast_to(x, logits.shape).astype(jnp.float64)).sum(-1)
    assert out.shape == (2, 3) and out.dtype == dtype
    np.testing.assert_allclose(out, expected, rtol=1e-5 if dtype == jnp.float32 else 1e-12)
    # the opposite saturated pixels cost exactly 60 nats each
    flipped = x.at[:, -2:].set(jnp.asarray([0.0, 1.0], dtype))
    diff = vnn.bernoulli_log_likelihood(logits[0], x) - vnn.bernoulli_log_likelihood(
        logits[0], flipped)
    np.testing.assert_allclose(diff, 120.0, rtol=1e-5)


def test_gaussian_decoder_log_likelihood_matches_distrax():
    decoder = vnn.GaussianDecoder((5,), 4)
    z = jax.random.normal(jax.random.key(0), (2, 3, 2))
    x = jax.random.normal(jax.random.key(1), (3, 4))
    params = decoder.init(jax.random.key(2), z)
    loc, scale = decoder.apply(params, z)
    assert loc.shape == scale.shape == (2, 3, 4) and bool(jnp.all(scale >= 1e-3))
    ll = decoder.apply(params, z, x, method=vnn.GaussianDecoder.log_likelihood)
    dist = decoder.apply(params, z, method=vnn.GaussianDecoder.distribution)
    with jax.numpy_rank_promotion("allow"):
        expected = dist.log_prob(jnp.broadcast_to(x, (2, 3, 4)))
    assert ll.shape == (2, 3)
    np.testing.assert_allclose(ll, expected, rtol=1e-5)
    manual = np.sum(-0.5 * ((np.asarray(x) - loc) / scale) ** 2 - np.log(scale)
                    - 0.5 * np.log(2 * np.pi), -1)
    np.testing.assert_allclose(ll, manual, rtol=1e-5)


def test_standard_normal_prior():
    prior = vnn.standard_normal_prior(3, jnp.float32)
    assert prior.batch_shape == () and prior.event_shape == (3,)
    np.testing.assert_allclose(prior.log_prob(jnp.zeros(3)), -1.5 * np.log(2 * np.pi), rtol=1e-6)


def test_bernoulli_log_likelihood_gradients_are_x_minus_sigmoid(x64):
    logits = jnp.asarray([-80.0, -3.0, -1e-3, 0.0, 2.5, 80.0])
    x = jnp.asarray([1.0, 0.0, 1.0, 0.5, 0.0, 1.0])
    grad = jax.jit(jax.grad(lambda l: vnn.bernoulli_log_likelihood(l, x)))(logits)
    sigmoid = 1.0 / (1.0 + np.exp(-np.asarray(logits)))
    np.testing.assert_allclose(grad, np.asarray(x) - sigmoid, rtol=1e-12, atol=1e-300)
    # second derivative: -sigmoid (1 - sigmoid), through the custom JVP rule
    hess_diag = jax.vmap(jax.grad(lambda l, i: jax.grad(
        lambda m: vnn.bernoulli_log_likelihood(m, x))(l)[i]), (None, 0))(logits, jnp.arange(6))
    sigmoid_neg = 1.0 / (1.0 + np.exp(np.asarray(logits)))  # 1 - sigmoid without cancellation
    np.testing.assert_allclose(jnp.diagonal(hess_diag), -sigmoid * sigmoid_neg, rtol=1e-10,
                               atol=1e-300)
    # derivative with respect to the data is the logit
    grad_x = jax.grad(lambda x: vnn.bernoulli_log_likelihood(logits, x))(x)
    np.testing.assert_allclose(grad_x, logits, rtol=1e-12)
    # float32 in, float32 out, batched under vmap
    out = jax.vmap(vnn.bernoulli_log_likelihood, (0, None))(
        jnp.ones((3, 2, 4), jnp.float32), jnp.zeros((2, 4), jnp.float32))
    assert out.shape == (3, 2) and out.dtype == jnp.float32
    np.testing.assert_allclose(out, -4 * np.log1p(np.e), rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# Bad arguments: TypeError for a wrong type, ValueError for a bad value, naming the argument
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("call, error, match", [
    (lambda: vnn.iwae_mnist_vae(hidden_sizes=200), TypeError, "hidden_sizes"),
    (lambda: vnn.GaussianEncoder(8, 2), TypeError, "hidden_sizes"),
    (lambda: vnn.MLP((8, 0)), ValueError, r"hidden_sizes\[1\]"),
    (lambda: vnn.GaussianEncoder((8,), 0), ValueError, "latent_dim"),
    (lambda: vnn.GaussianEncoder((8,), 2.0), TypeError, "latent_dim"),
    (lambda: vnn.GaussianEncoder((8,), 2, min_scale=-1.0), ValueError, "min_scale"),
    (lambda: vnn.GaussianDecoder((8,), 0), ValueError, "data_dim"),
    (lambda: vnn.BernoulliDecoder((8,), 16, output_bias_init=np.zeros(10)), ValueError,
     r"output_bias_init must have shape \(16,\)"),
    (lambda: vnn.standard_normal_prior(0), ValueError, "latent_dim"),
    (lambda: vnn.standard_normal_prior(2.0), TypeError, "latent_dim"),
    (lambda: vnn.bernoulli_log_likelihood(jnp.zeros((3, 16)), jnp.ones((3, 1))), ValueError,
     "x must share the last axis"),
    # static shapes: also under jit
    (lambda: jax.jit(vnn.bernoulli_log_likelihood)(jnp.zeros((3, 16)), jnp.ones((3, 1))),
     ValueError, "x must share the last axis"),
    (lambda: vnn.bernoulli_log_likelihood(jnp.zeros((3, 4)), jnp.full((3, 4), 255.0)),
     ValueError, r"x must hold pixels in \[0, 1\]"),
    (lambda: vnn.gaussian_log_likelihood(0.0, -jnp.ones(4), 0.0), ValueError, "scale must be > 0"),
    (lambda: vnn.gaussian_log_likelihood(jnp.zeros((3, 4)), jnp.ones((3, 4)), jnp.ones((3, 1))),
     ValueError, "x must share the last axis"),
], ids=["vae-hidden-int", "enc-hidden-int", "mlp-width-0", "latent-0", "latent-float",
        "min_scale-neg", "data_dim-0", "bias-shape", "prior-0", "prior-float", "bern-axis",
        "bern-axis-jit", "bern-x-255", "gauss-scale-neg", "gauss-axis"])
def test_bad_arguments_raise_errors_naming_them(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_likelihood_values_unchecked_under_jit_and_integer_logits(x64):
    # Documented: under jit the values are not inspected (a negative scale gives NaN silently).
    out = jax.jit(vnn.gaussian_log_likelihood)(0.0, -jnp.ones(4), 0.0)
    assert np.isnan(float(out))
    # Integer logits are converted to float before x is cast: x = 0.5 is kept, not truncated.
    # Hand value: sum_d [x_d l_d - softplus(l_d)] with l = (2, 0), x = (0.5, 0.5).
    out = vnn.bernoulli_log_likelihood(jnp.asarray([[2, 0]]), jnp.asarray([[0.5, 0.5]]))
    expected = 0.5 * 2 - np.log1p(np.exp(2.0)) - np.log(2.0)
    assert out.dtype == jnp.float64 and out.shape == (1,)
    np.testing.assert_allclose(out, [expected], rtol=1e-12)
