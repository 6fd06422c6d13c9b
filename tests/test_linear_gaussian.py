"""Argument checks of vijax.linear_gaussian (its closed forms are exercised as ground truth by
test_elbo.py, test_marginal.py and test_estimators.py).

Shapes are checked always (also under ``jit``: they are static); values (noise scale,
positive-definite covariances) only on concrete arrays, never on tracers.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vijax import linear_gaussian as lg

KEY = jax.random.key(0)
MODEL = lg.random_model(KEY, 2, 3)  # latent_dim 2, data_dim 3
X, Z, EYE = jnp.ones((4, 3)), jnp.ones((4, 2)), jnp.eye(2)

_BAD = {  # name: (exception, message pattern naming the argument, call)
    "log_likelihood x width 1": (ValueError, r"x must have shape \[batch, data_dim=3\]",
                                 lambda: lg.log_likelihood(MODEL, jnp.ones((4, 1)), Z)),
    "log_likelihood x 1-D": (ValueError, r"x must have shape",
                             lambda: lg.log_likelihood(MODEL, jnp.ones(3), Z)),
    "log_likelihood z width 3": (ValueError, r"z must have shape \[batch, latent_dim=2\]",
                                 lambda: lg.log_likelihood(MODEL, X, jnp.ones((4, 3)))),
    "log_likelihood batch 4 vs 1": (ValueError, "x and z must have the same batch size",
                                    lambda: lg.log_likelihood(MODEL, X, jnp.ones((1, 2)))),
    "log_joint model tuple": (TypeError, "model must be a LinearGaussian",
                              lambda: lg.log_joint(tuple(MODEL), X, Z)),
    "log_marginal x width 4": (ValueError, r"x must have shape \[batch, data_dim=3\]",
                               lambda: lg.log_marginal(MODEL, jnp.ones((4, 4)))),
    "log_marginal noise_scale -0.5": (
        ValueError, "model.noise_scale must be finite and > 0",
        lambda: lg.log_marginal(MODEL._replace(noise_scale=jnp.asarray(-0.5)), X)),
    "posterior x width 1": (ValueError, "x must have shape",
                            lambda: lg.posterior(MODEL, jnp.ones((4, 1)))),
    "random_model noise_scale -0.5": (ValueError, "noise_scale must be finite and > 0",
                                      lambda: lg.random_model(KEY, 2, 3, noise_scale=-0.5)),
    "random_model noise_scale 0": (ValueError, "noise_scale must be finite and > 0",
                                   lambda: lg.random_model(KEY, 2, 3, noise_scale=0.0)),
    "random_model latent_dim 0": (ValueError, "latent_dim must be >= 1",
                                  lambda: lg.random_model(KEY, 0, 3)),
    "random_model data_dim 3.0": (TypeError, "data_dim must be an int",
                                  lambda: lg.random_model(KEY, 2, 3.0)),
    "random_model int seed": (TypeError, "rng_key", lambda: lg.random_model(0, 2, 3)),
    "random_model int dtype": (TypeError, "dtype must be a floating dtype",
                               lambda: lg.random_model(KEY, 2, 3, dtype=jnp.int32)),
    "sample num -1": (ValueError, "num must be >= 1", lambda: lg.sample(KEY, MODEL, -1)),
    "sample num 2.5": (TypeError, "num must be an int", lambda: lg.sample(KEY, MODEL, 2.5)),
    "sample int seed": (TypeError, "rng_key", lambda: lg.sample(0, MODEL, 2)),
    "gaussian_kl cov_p -I": (ValueError, "cov_p must be symmetric positive definite",
                             lambda: lg.gaussian_kl(Z, EYE, Z, -EYE)),
    "gaussian_kl cov_q not symmetric": (
        ValueError, "cov_q must be symmetric",
        lambda: lg.gaussian_kl(Z, jnp.array([[1.0, 0.5], [0.0, 1.0]]), Z, EYE)),
    "gaussian_kl loc_p d=3": (ValueError, r"loc_p must have shape \[d=2\]",
                              lambda: lg.gaussian_kl(Z, EYE, jnp.ones((4, 3)), jnp.eye(3))),
    "gaussian_kl loc_q 1-D": (ValueError, r"loc_q must have shape \[batch, d\]",
                              lambda: lg.gaussian_kl(jnp.zeros(2), EYE, jnp.zeros(2), EYE)),
    "gaussian_kl cov_q batch 3": (ValueError, "cov_q must have shape",
                                  lambda: lg.gaussian_kl(Z, jnp.stack([EYE] * 3), Z, EYE)),
}


@pytest.mark.parametrize("name", sorted(_BAD))
def test_bad_arguments_raise_naming_them(name):
    error, pattern, call = _BAD[name]
    with pytest.raises(error, match=pattern):
        call()


def test_values_of_tracers_are_not_inspected_but_shapes_are():
    """Under jit the covariances are tracers: a non-PD one gives NaN instead of an error (no
    host transfer), while a wrong shape still raises before any computation."""
    kl = jax.jit(lg.gaussian_kl)
    assert np.isnan(np.asarray(kl(Z, EYE, Z, -EYE))).all()
    with pytest.raises(ValueError, match="z must have shape"):
        jax.jit(lg.log_likelihood)(MODEL, X, jnp.ones((4, 3)))
    # valid arguments: KL(N(m, I) || N(0, 2 I)) with the shared [d] mean and [d, d]
    # covariances = (d/2 + |m|^2 / 2 - d + d log 2) / 2 (closed form, d = 2)
    m = jnp.array([[0.0, 0.0], [1.0, 2.0]])
    want = 0.5 * (1.0 + 0.5 * np.sum(np.asarray(m) ** 2, axis=1) - 2.0 + 2.0 * math.log(2.0))
    np.testing.assert_allclose(kl(m, EYE, jnp.zeros(2), 2.0 * EYE), want, rtol=1e-6)
