"""vijax.reparam: z = g(eps) and log q(z) by change of variables, checked against distrax."""

from __future__ import annotations

import distrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vijax import elbo as velbo
from vijax import reparam


@pytest.fixture
def gaussian_params(x64):
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    loc = jax.random.normal(k1, (4, 3))
    scale = jnp.exp(0.5 * jax.random.normal(k2, (4, 3)))
    a = jax.random.normal(k3, (4, 3, 3))
    tril = jnp.tril(a) + 2.0 * jnp.eye(3)[None]  # diagonal kept away from zero (may be negative)
    return loc, scale, tril


def test_diag_gaussian_matches_distrax(gaussian_params):
    loc, scale, _ = gaussian_params
    with jax.numpy_rank_promotion("raise"):
        z, log_q = reparam.sample_diag_gaussian(jax.random.key(1), loc, scale, sample_shape=(5,))
    assert z.shape == (5, 4, 3) and log_q.shape == (5, 4) and z.dtype == jnp.float64
    ref = distrax.MultivariateNormalDiag(loc, scale)
    np.testing.assert_allclose(log_q, jax.vmap(ref.log_prob)(z), rtol=1e-12)


def test_full_gaussian_matches_distrax(gaussian_params):
    loc, _, tril = gaussian_params
    with jax.numpy_rank_promotion("raise"):
        z, log_q = reparam.sample_full_gaussian(jax.random.key(2), loc, tril, sample_shape=(2, 3))
    assert z.shape == (2, 3, 4, 3) and log_q.shape == (2, 3, 4)
    cov = tril @ jnp.swapaxes(tril, -1, -2)
    ref = distrax.MultivariateNormalFullCovariance(loc, cov)
    np.testing.assert_allclose(log_q, jax.vmap(jax.vmap(ref.log_prob))(z), rtol=1e-10)


def test_full_gaussian_moments(x64):
    """Samples have mean loc and covariance L L^T (tolerances from the sampling error)."""
    loc = jnp.array([1.0, -2.0])
    tril = jnp.array([[1.5, 0.0], [0.8, 0.5]])
    n = 200_000
    z, _ = reparam.sample_full_gaussian(jax.random.key(3), loc, tril, sample_shape=(n,))
    cov = tril @ tril.T
    se_mean = np.sqrt(np.diag(cov) / n)
    assert np.all(np.abs(np.asarray(z.mean(0) - loc)) < 4 * se_mean)
    emp = np.cov(np.asarray(z).T)
    # var of a sample covariance entry is (S_ij^2 + S_ii S_jj) / n for Gaussians
    se_cov = np.sqrt((np.asarray(cov) ** 2 + np.outer(np.diag(cov), np.diag(cov))) / n)
    assert np.all(np.abs(emp - np.asarray(cov)) < 4 * se_cov)


def test_transformed_matches_distrax(x64):
    base = distrax.MultivariateNormalDiag(jnp.zeros((4, 2)), jnp.full((4, 2), 0.7))
    bij = distrax.Block(distrax.Tanh(), 1)
    z, log_q = reparam.sample_transformed(jax.random.key(4), base, bij, sample_shape=(6,))
    assert z.shape == (6, 4, 2) and log_q.shape == (6, 4)
    assert np.all(np.abs(np.asarray(z)) < 1)
    ref = distrax.Transformed(base, bij)
    np.testing.assert_allclose(log_q, ref.log_prob(z), rtol=1e-9)
    # under jit and vmap over keys
    jitted = jax.jit(jax.vmap(lambda k: reparam.sample_transformed(k, base, bij)))
    zs, lqs = jitted(jax.random.split(jax.random.key(5), 3))
    assert zs.shape == (3, 4, 2) and lqs.shape == (3, 4)
    np.testing.assert_allclose(lqs, jax.vmap(ref.log_prob)(zs), rtol=1e-9)


def test_pathwise_gradient_of_expectation(x64):
    """d/dloc E[z^2] = 2 loc and d/dscale E[z^2] = 2 scale, estimated through z = loc + scale eps."""
    def mean_square(loc, scale):
        z, _ = reparam.sample_diag_gaussian(jax.random.key(5), loc, scale, sample_shape=(100_000,))
        return jnp.mean(jnp.sum(z**2, -1))

    loc, scale = jnp.array([0.5, -1.0]), jnp.array([0.3, 2.0])
    g_loc, g_scale = jax.jit(jax.grad(mean_square, argnums=(0, 1)))(loc, scale)
    # per-sample gradient 2 z_i (resp. 2 z_i eps_i) has sd about 2 sqrt(loc^2 + scale^2)
    se = 2 * np.sqrt(np.asarray(loc) ** 2 + np.asarray(scale) ** 2) * np.sqrt(2) / np.sqrt(100_000)
    assert np.all(np.abs(np.asarray(g_loc) - 2 * np.asarray(loc)) < 4 * se)
    assert np.all(np.abs(np.asarray(g_scale) - 2 * np.asarray(scale)) < 4 * se)


def test_jit_vmap_float32(gaussian_params):
    loc, scale, tril = (a.astype(jnp.float32) for a in gaussian_params)
    traces = []

    def f(key, loc, scale, tril):
        traces.append(1)
        return (reparam.sample_diag_gaussian(key, loc, scale)[1]
                + reparam.sample_full_gaussian(key, loc, tril)[1])

    jf = jax.jit(f)
    out = jf(jax.random.key(0), loc, scale, tril)
    jf(jax.random.key(1), loc + 1, scale, tril)
    assert len(traces) == 1 and out.shape == (4,) and out.dtype == jnp.float32
    keys = jax.random.split(jax.random.key(2), 7)
    batched = jax.vmap(f, in_axes=(0, None, None, None))(keys, loc, scale, tril)
    assert batched.shape == (7, 4)
    np.testing.assert_allclose(batched[0], f(keys[0], loc, scale, tril), rtol=1e-5)


def test_bad_input():
    loc, scale = jnp.zeros((2, 3)), jnp.ones((2, 3))
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="loc"):
        reparam.sample_diag_gaussian(key, loc.at[0, 0].set(jnp.nan), scale)
    with pytest.raises(ValueError, match="scale"):
        reparam.sample_diag_gaussian(key, loc, scale.at[1, 1].set(jnp.inf))
    with pytest.raises(ValueError, match="scale"):
        reparam.sample_diag_gaussian(key, loc, -scale)
    with pytest.raises(ValueError, match="same shape"):
        reparam.sample_diag_gaussian(key, loc, jnp.ones((2, 4)))
    with pytest.raises(TypeError, match="loc"):
        reparam.sample_diag_gaussian(key, jnp.zeros((2, 3), jnp.int32), scale)
    with pytest.raises(ValueError, match="scale_tril"):
        reparam.sample_full_gaussian(key, loc, jnp.ones((2, 3, 2)))
    with pytest.raises(ValueError, match="scale_tril"):
        reparam.sample_full_gaussian(key, loc, jnp.zeros((2, 3, 3)))
    with pytest.raises(TypeError, match="bijector"):
        reparam.sample_transformed(key, distrax.Normal(0.0, 1.0), "tanh")


def test_transformed_rejects_an_elementwise_bijector_on_vector_events():
    """distrax.Tanh() acts on scalars: on a [2]-event base its log-det is per coordinate, so
    log q would silently come back [*batch, 2] and wrong; it must be wrapped in distrax.Block."""
    base = distrax.MultivariateNormalDiag(jnp.zeros((2, 2)), jnp.ones((2, 2)))
    message = r"`bijector` acts on events of 0 dimension.*distrax\.Block\(bijector, 1\)"
    with pytest.raises(ValueError, match=message):
        reparam.sample_transformed(jax.random.key(0), base, distrax.Tanh())
    # an element-wise bijector on a scalar-event base is fine
    scalar_base = distrax.Normal(jnp.zeros(3), jnp.ones(3))
    z, log_q = reparam.sample_transformed(jax.random.key(0), scalar_base, distrax.Tanh(), sample_shape=(2,))
    assert z.shape == (2, 3) and log_q.shape == (2, 3)
    np.testing.assert_allclose(log_q, distrax.Transformed(scalar_base, distrax.Tanh()).log_prob(z), rtol=1e-5)


def test_sample_transformed_runs_under_strict_rank_promotion():
    """Callers may run with jax_numpy_rank_promotion="raise"; distrax's own implicit
    broadcasting inside sample_and_log_prob must not trip it. Reference: distrax.Transformed."""
    base = distrax.MultivariateNormalDiag(jnp.zeros((3, 2)), jnp.ones((3, 2)))
    bijector = distrax.Block(distrax.Tanh(), 1)
    with jax.numpy_rank_promotion("raise"):
        z, log_q = reparam.sample_transformed(jax.random.key(0), base, bijector,
                                              sample_shape=(4,))
    assert z.shape == (4, 3, 2) and log_q.shape == (4, 3)
    np.testing.assert_allclose(log_q, distrax.Transformed(base, bijector).log_prob(z),
                               rtol=1e-5, atol=1e-5)


_LOC, _SCALE = np.zeros((2, 3), np.float32), np.ones((2, 3), np.float32)
_TRIL = np.broadcast_to(np.eye(3, dtype=np.float32), (2, 3, 3))
_SAMPLERS = {
    "diag": lambda key, **kw: reparam.sample_diag_gaussian(key, _LOC, _SCALE, **kw),
    "full": lambda key, **kw: reparam.sample_full_gaussian(key, _LOC, _TRIL, **kw),
    "transformed": lambda key, **kw: reparam.sample_transformed(
        key, distrax.MultivariateNormalDiag(_LOC, _SCALE), distrax.Block(distrax.Tanh(), 1), **kw),
}


@pytest.mark.parametrize("sampler", list(_SAMPLERS))
@pytest.mark.parametrize("key, sample_shape, match", [
    (0, (), "rng_key"),
    (np.zeros(2, np.float32), (), "rng_key"),
    (jax.random.key(0), (2.5,), "sample_shape"),
    (jax.random.key(0), (True,), "sample_shape"),
], ids=["int-seed", "float-key", "float-entry", "bool-entry"])
def test_bad_key_or_sample_shape_is_a_named_type_error(sampler, key, sample_shape, match):
    with pytest.raises(TypeError, match=match):
        _SAMPLERS[sampler](key, sample_shape=sample_shape)


def test_sample_shape_accepts_numpy_ints_and_raw_keys():
    z, log_q = _SAMPLERS["diag"](jax.random.PRNGKey(0), sample_shape=(np.int64(2), 1))
    assert z.shape == (2, 1, 2, 3) and log_q.shape == (2, 1, 2)


def test_denormal_scales_are_refused_alike_by_q_and_reparam():
    """float32 scales below finfo.tiny (1.2e-38) are denormal and flushed to zero on CPU, so
    log q is infinite. Before, the check of q (NumPy sees them > 0) let them through while
    sample_diag_gaussian refused them; now one rule (scale >= finfo.tiny) holds for both."""
    key = jax.random.key(0)
    loc = jnp.zeros((2, 3), jnp.float32)
    for value in (1e-39, 1e-45):
        scale = jnp.ones((2, 3), jnp.float32).at[0, 1].set(value)
        with pytest.raises(ValueError, match=r"`scale` has entries below 1\.175e-38, the "
                                             r"smallest normal float32"):
            reparam.sample_diag_gaussian(key, loc, scale)
        q = distrax.MultivariateNormalDiag(loc, scale)
        with pytest.raises(ValueError, match="`q` must have a positive scale: its `scale_diag` "
                                             "has entries below"):
            velbo.elbo(key, lambda z: -0.5 * jnp.sum(z * z, -1), q)
        with pytest.raises(ValueError, match="`base` must have a positive scale"):
            reparam.sample_transformed(key, q, distrax.Block(distrax.Tanh(), 1))
    tril = jnp.broadcast_to(jnp.eye(3, dtype=jnp.float32), (2, 3, 3)).at[1, 2, 2].set(-1e-40)
    with pytest.raises(ValueError, match="`scale_tril` must have a non-zero diagonal"):
        reparam.sample_full_gaussian(key, loc, tril)
    # the smallest normal number itself is accepted, with a finite log q
    tiny = jnp.full((2, 3), jnp.finfo(jnp.float32).tiny, jnp.float32)
    _, log_q = reparam.sample_diag_gaussian(key, loc, tiny)
    assert np.isfinite(np.asarray(log_q)).all()
