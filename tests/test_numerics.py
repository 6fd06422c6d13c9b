"""Float32 robustness of the gradient estimators of vijax.elbo at extreme scales.

Each case is a reproduction of a reported NaN: the float32 value and gradient are compared with
a float64 reference of the same computation (the same standard-normal draws eps, cast to
float64, and the estimator's surrogate written out), or with the documented behaviour (see the
"Numerical range" notes of ``iwae_bound``, ``DReG``, ``ScoreFunction`` and
``vijax.nn.GaussianEncoder``).
"""

from __future__ import annotations


import distrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vijax import _q
from vijax import elbo as velbo
from vijax import nn as vnn

F32 = jnp.float32


@pytest.fixture(autouse=True)
def _raise_on_rank_promotion():
    with jax.numpy_rank_promotion("raise"):
        yield


def _eps(key, shape, num_samples):
    """The standard-normal draws behind vijax's K draws of a MultivariateNormalDiag of batch and
    event ``shape``: sample k uses the k-th key of ``_q.sample_keys`` (float32)."""
    std = distrax.MultivariateNormalDiag(jnp.zeros(shape, F32), jnp.ones(shape, F32))
    return jax.vmap(lambda k: std.sample(seed=k))(_q.sample_keys(key, num_samples))


def _normal_log_prob(z, loc, scale):
    return jnp.sum(-0.5 * ((z - loc) / scale) ** 2 - jnp.log(scale)
                   - 0.5 * jnp.log(2 * jnp.pi), axis=-1)


def _log_mean_exp(a):
    return jax.nn.logsumexp(a, axis=0) - jnp.log(a.shape[0])


def _value_and_grad(bound, log_joint_fn, loc, log_scale, estimator, num_samples, key):
    def f(p):
        q = distrax.MultivariateNormalDiag(p[0], jnp.exp(p[1]))
        v = bound(key, log_joint_fn, q, num_samples=num_samples, estimator=estimator)
        return v.sum(), v
    (_, v), g = jax.jit(jax.value_and_grad(f, has_aux=True))((loc, log_scale))
    return v, g


# ------------------------------------------------- DReG with a prior of scale 1e-20


PRIOR_SCALE = 1e-20


def _tiny_prior_log_joint(z):
    return _normal_log_prob(z, jnp.zeros_like(z), jnp.full_like(z, PRIOR_SCALE))


def _dreg_reference(loc, log_scale, eps):
    """Float64 DReG surrogate sum_k w~_k^2 log w_k (q's parameters fixed in log q): its gradient
    is DReG's inference-network gradient, its value is not used."""
    def surrogate(p):
        z = p[0][None] + jnp.exp(p[1])[None] * eps
        fixed = jax.lax.stop_gradient(p)
        log_w = _tiny_prior_log_joint(z) - _normal_log_prob(z, fixed[0][None],
                                                            jnp.exp(fixed[1])[None])
        w = jax.lax.stop_gradient(jax.nn.softmax(log_w, axis=0))
        return jnp.sum(w**2 * log_w), _log_mean_exp(log_w)
    return jax.grad(surrogate, has_aux=True)((loc, log_scale))


def test_dreg_with_prior_scale_1e20_matches_float64():
    """q = N(0, 0.05^2): some particles have a finite log p but an overflowing d log p / dz =
    -z / 1e-40, and zero weight. They were multiplied by 0 in the path term: NaN gradient."""
    key, k, shape = jax.random.key(0), 4, (3, 2)
    loc = jnp.zeros(shape, F32)
    log_scale = jnp.full(shape, np.log(0.05), F32)
    v, (g_loc, g_ls) = _value_and_grad(velbo.iwae_bound, _tiny_prior_log_joint, loc, log_scale,
                                       velbo.DReG(), k, key)
    eps = _eps(key, shape, k)
    # the reproduction: particles with a finite log p and a non-finite d log p / dz
    z = loc[None] + jnp.exp(log_scale)[None] * eps
    log_p = _tiny_prior_log_joint(z)
    with np.errstate(over="ignore"):  # d log p / dz = -z * scale**-2, as JAX differentiates it
        grad_log_p = -np.asarray(z) * np.float32(PRIOR_SCALE) ** -2
    overflow = np.isfinite(log_p) & ~np.all(np.isfinite(grad_log_p), axis=-1)
    assert overflow.any() and np.all(np.isfinite(log_p))
    assert np.all(np.isfinite(v)) and np.all(np.isfinite(g_loc)) and np.all(np.isfinite(g_ls))
    with jax.enable_x64(True):
        (r_loc, r_ls), r_v = jax.jit(_dreg_reference)(jnp.asarray(loc, jnp.float64),
                                             jnp.asarray(log_scale, jnp.float64),
                                             jnp.asarray(eps, jnp.float64))
        assert np.all(np.isfinite(r_loc)) and np.all(np.abs(r_loc) < np.finfo(np.float32).max)
    np.testing.assert_allclose(v, r_v, rtol=1e-6)
    np.testing.assert_allclose(g_loc, r_loc, rtol=1e-5, atol=0)
    np.testing.assert_allclose(g_ls, r_ls, rtol=1e-5, atol=1e-5 * np.max(np.abs(r_ls)))


@pytest.mark.parametrize("estimator", [velbo.Pathwise(), velbo.DReG(),
                                       velbo.ScoreFunction(velbo.LeaveOneOut())],
                         ids=["pathwise", "dreg", "vimco"])
def test_all_log_weights_minus_inf_give_zero_gradient(estimator):
    """Documented limit: q = N(0.5, 1) under a prior of scale 1e-20 has log p ~ -1e39, below
    the float32 range, so every log weight is -inf: the value is -inf, the gradient 0 (was NaN
    from logsumexp's 0 / 0 and from softmax of all -inf)."""
    shape = (2, 2)
    v, g = _value_and_grad(velbo.iwae_bound, _tiny_prior_log_joint, jnp.full(shape, 0.5, F32),
                           jnp.zeros(shape, F32), estimator, 3, jax.random.key(1))
    assert np.all(v == -np.inf)
    for leaf in g:
        np.testing.assert_array_equal(leaf, 0.0)


# ------------------------------------------------- score function at q scales <= 1e-20


def _quadratic_log_joint(z):
    return -0.5 * jnp.sum((z - 0.3) ** 2, axis=-1)


def _score_reference(bound, loc, log_scale, eps, baseline):
    """Float64 score-function surrogate at the fixed draws z = loc + scale eps: gradient
    E[grad_z-fixed f] + E[(f - b) grad log q(z)], as in vijax.elbo (value not used)."""
    def surrogate(p):
        z = jax.lax.stop_gradient(p[0][None] + jnp.exp(p[1])[None] * eps)
        log_q = _normal_log_prob(z, p[0][None], jnp.exp(p[1])[None])
        log_w = _quadratic_log_joint(z) - log_q
        f = jax.lax.stop_gradient(log_w)
        k = f.shape[0]
        if bound == "elbo":
            if baseline == "loo":
                signal = f - (jnp.sum(f, 0, keepdims=True) - f) / (k - 1)
            else:
                signal = f - baseline
            return jnp.sum(jnp.mean(log_w, 0) + jnp.mean(signal * log_q, 0))
        value = _log_mean_exp(f)
        if baseline == "loo":  # VIMCO: log w_k replaced by the mean of the others
            others = (jnp.sum(f, 0, keepdims=True) - f) / (k - 1)
            swapped = jnp.where(jnp.eye(k, dtype=bool)[:, :, None], others[None], f[None])
            signal = value[None] - jax.vmap(_log_mean_exp)(swapped)
        else:
            signal = jnp.broadcast_to(value - baseline, f.shape)
        return jnp.sum(_log_mean_exp(log_w) + jnp.sum(signal * log_q, 0))
    return jax.grad(surrogate)((loc, log_scale))


@pytest.mark.parametrize("bound, baseline, scale", [("elbo", "loo", 1e-20), ("iwae", 0.0, 1e-30),
                                                    ("iwae", "loo", 1e-20)])
def test_score_function_at_tiny_q_scale_matches_float64(bound, baseline, scale):
    """distrax's d log q / d scale forms scale**-2 (inf below 1.1e-19 in float32); the true
    (eps^2 - 1) / scale is finite. loc = 0 keeps z = scale eps exact in float32."""
    key, k, shape = jax.random.key(2), 3, (2, 2)
    loc = jnp.zeros(shape, F32)
    log_scale = jnp.full(shape, np.log(scale), F32)
    estimator = velbo.ScoreFunction(velbo.LeaveOneOut() if baseline == "loo" else baseline)
    fn = velbo.elbo if bound == "elbo" else velbo.iwae_bound
    v, (g_loc, g_ls) = _value_and_grad(fn, _quadratic_log_joint, loc, log_scale, estimator, k,
                                       key)
    assert np.all(np.isfinite(v))
    assert np.all(np.isfinite(g_loc)) and np.all(np.isfinite(g_ls))
    eps = _eps(key, shape, k)
    with jax.enable_x64(True):
        r_loc, r_ls = jax.jit(_score_reference, static_argnums=(0, 4))(
            bound, jnp.asarray(loc, jnp.float64), jnp.asarray(log_scale, jnp.float64),
            jnp.asarray(eps, jnp.float64), baseline)
    # the signal f ~ 100 nats cancels against its baseline: a few float32 roundings of f
    np.testing.assert_allclose(g_loc, r_loc, rtol=1e-4, atol=1e-5 * np.max(np.abs(r_loc)))
    np.testing.assert_allclose(g_ls, r_ls, rtol=1e-4, atol=1e-5 * np.max(np.abs(r_ls)))


def test_score_log_prob_gradient_at_tiny_scale():
    """The piece itself: d log q / d (loc, scale) at a fixed z, Normal and MultivariateNormalDiag,
    against the closed forms eps / scale and (eps^2 - 1) / scale."""
    eps = jnp.array([[0.7, -1.3]], F32)
    for scale in [1e-20, 2e-38]:
        s = jnp.full((1, 2), scale, F32)
        z = s * eps
        for make, total in [(lambda l, s_: distrax.MultivariateNormalDiag(l, s_), True),
                            (lambda l, s_: distrax.Normal(l, s_), False)]:
            def f(loc, sc):
                lp = _q.score_log_prob(make(loc, sc), z)
                return jnp.sum(lp)
            g_loc, g_s = jax.jit(jax.grad(f, argnums=(0, 1)))(jnp.zeros((1, 2), F32), s)
            np.testing.assert_allclose(g_loc, eps / scale, rtol=1e-6)
            np.testing.assert_allclose(g_s, (eps**2 - 1) / scale, rtol=1e-6)


# ------------------------------------------------- encoder with log-scale bias -100


def test_encoder_log_scale_minus_100_gives_finite_iwae():
    """GaussianEncoder's exp(-100) is a float32 denormal: NaN gradients (an inf times the
    denormal flushed to 0), and log q = +inf, IWAE -inf where the denormal is flushed. Now the
    scale is floored at finfo.tiny (documented): finite value equal to the float64 bound of
    q = N(loc, tiny^2) on the same draws, zero gradient for the log-scale bias, finite loc
    gradients equal to the float64 reference."""
    enc = vnn.GaussianEncoder(hidden_sizes=(), latent_dim=2)
    x = jnp.array([[0.2, -0.4, 1.0], [0.5, 0.3, -0.2]], F32)
    params = enc.init(jax.random.key(0), x)
    bias = params["params"]["loc_and_raw_scale"]["bias"]
    params["params"]["loc_and_raw_scale"]["bias"] = bias.at[2:].set(-100.0)  # log-scale bias
    key, k = jax.random.key(3), 4

    def log_joint_fn(z):
        return -0.5 * jnp.sum(z**2, -1) - 0.5 * jnp.sum((z - 1.0) ** 2, -1)

    def value_and_grads(p):
        out = {}
        for name, est in [("pathwise", velbo.Pathwise()), ("dreg", velbo.DReG())]:
            def f(p_, est=est):
                v = velbo.iwae_bound(key, log_joint_fn, enc.apply(p_, x), num_samples=k,
                                     estimator=est)
                return v.sum(), v
            out[name] = jax.value_and_grad(f, has_aux=True)(p)
        return out

    results = {}
    for name, ((_, v), g) in jax.jit(value_and_grads)(params).items():
        assert np.all(np.isfinite(v))
        assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree_util.tree_leaves(g))
        g_bias = g["params"]["loc_and_raw_scale"]["bias"]
        np.testing.assert_array_equal(g_bias[2:], 0.0)  # below the floor: no gradient
        results[name] = v, g_bias[:2]
    loc, scale = enc.apply(params, x, method=enc.loc_and_scale)
    assert np.all(np.asarray(scale) == np.finfo(np.float32).tiny)
    eps = _eps(key, loc.shape, k)
    with jax.enable_x64(True):
        loc64, eps64 = jnp.asarray(loc, jnp.float64), jnp.asarray(eps, jnp.float64)
        tiny = jnp.float64(np.finfo(np.float32).tiny)

        def ref(l):  # z = loc + tiny eps = loc in float64 too
            log_w = log_joint_fn(l[None] + tiny * eps64) - (
                jnp.sum(-0.5 * eps64**2 - 0.5 * jnp.log(2 * jnp.pi), -1) - 2 * jnp.log(tiny))
            return jnp.sum(_log_mean_exp(log_w)), _log_mean_exp(log_w)
        (r_g, r_v) = jax.jit(jax.grad(ref, has_aux=True))(loc64)
    for v, _ in results.values():
        np.testing.assert_allclose(v, r_v, rtol=1e-6)
    # the pathwise loc-bias gradient: the sum over the batch of d bound / d loc. (DReG's differs:
    # its d log q / dz = -(z - loc) / tiny^2 is 0 here, z - loc = tiny eps being lost to rounding,
    # where the exact value, about eps * 8.5e37, is itself at the edge of the float32 range.)
    np.testing.assert_allclose(results["pathwise"][1], np.sum(r_g, 0), rtol=1e-5)


# ------------------------------------------------- ordinary scales are unchanged

# float32 values and gradients (value [2], d/dloc [2, 2], d/dlog-scale [2, 2], flattened) of the
# jitted case below, recorded with vijax before these changes (jax 0.10.2, AMD EPYC CPU, the
# suite's LLVM optimisation level 0). The compile settings and the CPU's vector width move
# float32 results by a few ulp (the optimisation level alone by up to 9 ulp on the old code),
# so the check allows 1e-5 of the largest entry (about 80 ulp): far below any change of the
# computation, far above reordering. Measured here: values bit-identical, gradients within
# 0.5 ulp of their largest entry.
_BEFORE = {
    "dreg": [['-0x1.13e3300000000p-1', '0x1.7d90600000000p-3'],
             ['-0x1.9c4e3e0000000p-1', '0x1.fb79f80000000p-1', '-0x1.d85e340000000p-3',
              '-0x1.929f660000000p-1'],
             ['0x1.fefb200000000p-1', '-0x1.a43a580000000p-6', '0x1.b274bc0000000p-6',
              '0x1.01b7ba0000000p-2']],
    "vimco": [['-0x1.13e3300000000p-1', '0x1.7d90600000000p-3'],
              ['0x1.11380a0000000p+0', '0x1.91359a0000000p+1', '-0x1.25bea00000000p-1',
               '-0x1.52382c0000000p-1'],
              ['-0x1.29ba7c0000000p-1', '-0x1.2962c00000000p+1', '-0x1.9d59780000000p-6',
               '0x1.0728060000000p-1']],
    "elbo_score": [['-0x1.c9d1380000000p-1', '0x1.1b6e2c0000000p-7'],
                   ['0x1.5a73680000000p+2', '0x1.45b3b80000000p+3', '-0x1.252cd00000000p+0',
                    '-0x1.24b5860000000p+0'],
                   ['-0x1.db85220000000p+1', '-0x1.c134f20000000p+2', '-0x1.9f29980000000p-4',
                    '0x1.f2e2760000000p-1']],
}


@pytest.mark.parametrize("name", sorted(_BEFORE))
def test_ordinary_scales_unchanged(name):
    loc = jnp.array([[0.3, -1.2], [0.7, 0.1]], F32)
    log_scale = jnp.array([[-0.5, -0.9], [-0.2, -1.4]], F32)

    def log_joint_fn(z):
        return -0.5 * jnp.sum((z - 0.4) ** 2, -1) - 0.1 * jnp.sum(z**4, -1)

    bound, est = {"dreg": (velbo.iwae_bound, velbo.DReG()),
                  "vimco": (velbo.iwae_bound, velbo.ScoreFunction(velbo.LeaveOneOut())),
                  "elbo_score": (velbo.elbo, velbo.ScoreFunction(0.5))}[name]
    v, (g_loc, g_ls) = _value_and_grad(bound, log_joint_fn, loc, log_scale, est, 3,
                                       jax.random.key(3))
    before = [np.array([float.fromhex(t) for t in row], np.float32) for row in _BEFORE[name]]
    np.testing.assert_allclose(np.asarray(v), before[0], rtol=1e-5)
    for got, ref in zip([g_loc, g_ls], before[1:]):
        got = np.asarray(got).ravel()
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * np.max(np.abs(ref)))
