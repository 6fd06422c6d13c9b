"""Tests for vijax.nnx and the engine's NNX entry (vijax.vae.from_nnx / to_nnx).

References: the linen modules of vijax.nn with the same weights. The NNX modules must have
their parameter layout, and every engine computation (one implementation, reached through
``NNXModel.apply``) must give the linen values to float32 rounding: the ELBO and IWAE bound
with the same key, the importance-sampled log p(x), one train step and one scanned epoch.
Tiny shapes (D = 16, hidden 8, L = 2); everything runs with jax_numpy_rank_promotion="raise".
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from vijax import nn as vnn
from vijax import nnx as vnnx
from vijax import vae

D, H, L = 16, 8, 2


def _jit(fn):
    """``jax.jit`` without LLVM's optimisations: NNX and linen values are compared between
    programs compiled alike, and a tiny program then compiles in well under half the time."""
    return jax.jit(fn, compiler_options={"xla_backend_optimization_level": 0})


@pytest.fixture(autouse=True)
def _raise_on_rank_promotion():
    with jax.numpy_rank_promotion("raise"):
        yield


def _random_params(model, seed):
    """Random weights in the layout ``model.init`` creates (``eval_shape``: no compilation)."""
    layout = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, D)))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(0.5 * rng.normal(size=s.shape), s.dtype), layout)


def _shapes(tree):
    return jax.tree.map(lambda a: (tuple(a.shape), a.dtype), tree)


@pytest.fixture(scope="module")
def linen_and_nnx():
    """A linen VAE with random weights, and the NNX VAE of the same fields given those weights
    (``to_nnx`` of an abstract module: no initialisation computed)."""
    linen_model = vnn.iwae_mnist_vae(hidden_sizes=(H,), latent_dim=L, data_dim=D)
    params = _random_params(linen_model, 0)
    abstract = nnx.eval_shape(lambda: vnnx.iwae_mnist_vae(hidden_sizes=(H,), latent_dim=L,
                                                          data_dim=D, rngs=nnx.Rngs(1)))
    nnx_model, abstract_params = vae.from_nnx(abstract)
    loaded = vae.to_nnx(nnx_model, params)
    x = jnp.asarray(np.random.default_rng(2).uniform(size=(8, D)) < 0.3, jnp.float32)
    return linen_model, params, nnx_model, abstract_params, loaded, x


def _assert_trees_close(a, b, **tolerance):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), **tolerance)


def test_nnx_modules_have_the_linen_parameter_layout_and_outputs(linen_and_nnx):
    linen_model, params, nnx_model, abstract_params, loaded, x = linen_and_nnx
    assert _shapes(abstract_params) == _shapes(params)
    assert isinstance(loaded, vnnx.VAE) and nnx_model.bernoulli
    assert (nnx_model.latent_dim, nnx_model.data_dim) == (L, D)
    # linen weights in and out unchanged (to_nnx, then from_nnx)
    _, round_trip = vae.from_nnx(loaded)
    _assert_trees_close(round_trip, params, rtol=0, atol=0)
    # a built module (under jit: one compile, not one per eager initialiser op): linen's
    # layout, the output bias as given
    bias = jnp.linspace(-2.0, 2.0, D)
    built_params = _jit(lambda: vae.from_nnx(vnnx.iwae_mnist_vae(
        bias, hidden_sizes=(H,), latent_dim=L, data_dim=D, rngs=nnx.Rngs(3)))[1])()
    assert _shapes(built_params) == _shapes(params)
    np.testing.assert_array_equal(built_params["params"]["decoder"]["logits"]["bias"], bias)
    # a Gaussian decoder and a linear encoder (no hidden layer): layout and outputs
    gaussian_linen = vnn.VAE(vnn.GaussianEncoder((), L, min_scale=0.1),
                             vnn.GaussianDecoder((H,), D))
    gaussian_params = _random_params(gaussian_linen, 4)
    gaussian_nnx, gaussian_abstract = vae.from_nnx(nnx.eval_shape(lambda: vnnx.VAE(
        vnnx.GaussianEncoder(D, (), L, min_scale=0.1, rngs=nnx.Rngs(5)),
        vnnx.GaussianDecoder(L, (H,), D, rngs=nnx.Rngs(6)))))
    assert _shapes(gaussian_abstract) == _shapes(gaussian_params)
    assert not gaussian_nnx.bernoulli
    z = jnp.asarray(np.random.default_rng(7).normal(size=(3, 5, L)), jnp.float32)

    key = jax.random.key(8)

    @_jit
    def outputs(p, p_gaussian):
        module, gaussian_module = vae.to_nnx(nnx_model, p), vae.to_nnx(gaussian_nnx, p_gaussian)
        q_linen = linen_model.apply(p, x, method=vnn.VAE.encode)
        q_nnx = module.encode(x)
        return ((q_linen.loc, q_linen.scale_diag, linen_model.apply(p, x),
                 gaussian_linen.apply(p_gaussian, z, method=vnn.VAE.decode),
                 vae.sample_images(key, p, linen_model, 3, draw=True)),
                (q_nnx.loc, q_nnx.scale_diag, module(x), gaussian_module.decode(z),
                 vae.sample_images(key, p, nnx_model, 3, draw=True)))

    linen_out, nnx_out = outputs(params, gaussian_params)
    _assert_trees_close(nnx_out, linen_out, rtol=1e-6, atol=1e-6)
    images = nnx_out[-1]  # ancestral draws of the Bernoulli decoder: 0/1 pixels
    assert images.shape == (3, D) and set(np.unique(np.asarray(images))) <= {0.0, 1.0}


def _without_locations(lowered) -> str:
    """The StableHLO text of a lowered program without its source locations."""
    return re.sub(r"loc\([^)]*\)|#loc\d*[^\n]*", "", lowered.as_text())


def test_engine_gives_the_linen_values_under_jit_vmap_and_scan(linen_and_nnx):
    """The ELBO (same key, vmapped over two parameter sets), the IS estimate of log p(x),
    evaluate_bounds and one train step: NNX equals linen, with no retrace on a second call.
    The programs, and the scanned epoch's, are linen's exactly (the adapter adds no
    computation), so the epoch is lowered, not run."""
    linen_model, params, nnx_model, _, _, x = linen_and_nnx
    optimizer = optax.adam(1e-2)
    objective = vae.ELBOAnalyticKL()
    rng = np.random.default_rng(8)
    perturbed = jax.tree.map(lambda a: a + 0.1 * rng.normal(size=a.shape).astype(a.dtype),
                             params)
    stacked = jax.tree.map(lambda a, b: jnp.stack([a, b]), params, perturbed)
    state = vae.TrainState(params, optimizer.init(params), jnp.zeros((), jnp.int32))
    results, programs = {}, {}
    for name, model in (("linen", linen_model), ("nnx", nnx_model)):
        traces = []
        step = vae.make_train_step(model, optimizer, objective)

        def run(state, stacked, key, model=model, step=step, traces=traces):
            traces.append(1)

            def elbo(p):
                return vae.objective_value(objective, key, p, model, x)

            return {"elbo": jax.vmap(elbo)(stacked),
                    "log_px": vae.log_likelihood_is(key, state.params, model, x,
                                                    num_samples=16, chunk_size=8,
                                                    batch_size=4),
                    "bounds": vae.evaluate_bounds(key, state.params, model, x,
                                                  num_samples=(), batch_size=4),
                    "step": step(state, x, key)}

        run = _jit(run)
        epoch = jax.jit(vae.make_train_epoch(model, optimizer, vae.IWAE(num_samples=2),
                                             batch_size=4, binarize=True))
        programs[name] = [_without_locations(run.lower(state, stacked, jax.random.key(9))),
                          _without_locations(epoch.lower(state, x, jax.random.key(9)))]
        results[name] = run(state, stacked, jax.random.key(9))  # the trace of lower
        run(state._replace(params=perturbed), stacked, jax.random.key(10))  # no retrace
        assert len(traces) == 1 and run._cache_size() == 1, name
    _assert_trees_close(results["nnx"], results["linen"], rtol=1e-5, atol=1e-6)
    assert programs["nnx"] == programs["linen"]
    assert "stablehlo.while" in programs["nnx"][1]  # the epoch's lax.scan
    nnx_results = results["nnx"]
    assert nnx_results["elbo"].shape == (2, x.shape[0])
    assert np.all(np.isfinite(nnx_results["log_px"]))
    assert float(nnx_results["step"][1]["objective"]) == pytest.approx(
        float(jnp.mean(nnx_results["elbo"][0])), rel=1e-5)


def test_nnx_model_is_hashable_and_init_copies_the_module_weights(linen_and_nnx):
    _, _, nnx_model, _, loaded, _ = linen_and_nnx
    again, loaded_params = vae.from_nnx(loaded)
    assert again == nnx_model and hash(again) == hash(nnx_model)
    copied = again.init(jax.random.key(0))
    _assert_trees_close(copied, loaded_params, rtol=0, atol=0)
    assert all(a is not b for a, b in zip(jax.tree.leaves(copied),
                                          jax.tree.leaves(loaded_params)))
    with pytest.raises(ValueError, match=r"no parameter values.*eval_shape"):
        nnx_model.init(jax.random.key(0))  # the fixture's module is abstract


class _WithBatchNorm(vnnx.VAE):
    def __init__(self, rngs):
        super().__init__(vnnx.GaussianEncoder(D, (H,), L, rngs=rngs),
                         vnnx.BernoulliDecoder(L, (H,), D, rngs=rngs))
        self.norm = nnx.BatchNorm(D, rngs=rngs)


class _NoMethods(nnx.Module):
    def __init__(self, rngs):
        self.dense = nnx.Linear(D, L, rngs=rngs)
        self.latent_dim, self.data_dim = L, D


def test_bad_inputs_raise_errors_naming_them(linen_and_nnx):
    linen_model, params, nnx_model, _, loaded, x = linen_and_nnx
    with pytest.raises(TypeError, match=r"^model must be a flax\.nnx\.Module.*linen"):
        vae.from_nnx(linen_model)
    with pytest.raises(TypeError, match=r"^model must be a flax\.nnx\.Module.*dict"):
        vae.from_nnx(params)
    with pytest.raises(TypeError, match=r"model must have the methods.*lacks encode"):
        vae.from_nnx(nnx.eval_shape(lambda: _NoMethods(nnx.Rngs(0))))
    with pytest.raises(ValueError, match=r"only nnx\.Param.*BatchStat"):
        vae.from_nnx(nnx.eval_shape(lambda: _WithBatchNorm(nnx.Rngs(0))))
    # the NNX module itself where the engine wants a model: a hint to from_nnx
    with pytest.raises(TypeError, match=r"^model must be a vijax\.nn\.VAE.*from_nnx\(module\)"):
        vae.objective_value(vae.ELBOAnalyticKL(), jax.random.key(0), params, loaded, x)
    with pytest.raises(TypeError, match=r"^model must be a vijax\.vae\.NNXModel"):
        vae.to_nnx(loaded, params)
    state = vae.TrainState(params, (), jnp.zeros((), jnp.int32))
    with pytest.raises(TypeError, match=r"^params .*TrainState: pass state\.params"):
        vae.to_nnx(nnx_model, state)
    wrong_keys = {"params": {"encoder": params["params"]["encoder"]}}
    with pytest.raises(ValueError, match=r"^params must have the keys.*missing "
                                         r"\[\"\['params'\]\['decoder'\]"):
        vae.to_nnx(nnx_model, wrong_keys)
    wrong_shapes = jax.tree.map(lambda a: np.zeros(a.shape[::-1] + (1,)), params)
    with pytest.raises(ValueError, match=r"^params must have the module's parameter shapes"):
        nnx_model.apply(wrong_shapes, x, method=vae.NNXModel.encode)
    with pytest.raises(TypeError, match=r"^rngs must be a flax\.nnx\.Rngs"):
        vnnx.GaussianEncoder(D, (H,), L, rngs=0)
    with pytest.raises(TypeError, match=r"^encoder must be a flax\.nnx\.Module"):
        vnnx.VAE(vnn.GaussianEncoder((H,), L), loaded.decoder)
    with pytest.raises(ValueError, match=r"encoder\.latent_dim 2 != decoder\.latent_dim 3"):
        nnx.eval_shape(lambda: vnnx.VAE(vnnx.GaussianEncoder(D, (H,), L, rngs=nnx.Rngs(0)),
                                        vnnx.BernoulliDecoder(L + 1, (H,), D,
                                                              rngs=nnx.Rngs(0))))
    with pytest.raises(ValueError, match=r"output_bias_init must have shape \(16,\)"):
        vnnx.BernoulliDecoder(L, (H,), D, output_bias_init=np.zeros(D + 1), rngs=nnx.Rngs(0))
