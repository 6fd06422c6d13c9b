"""Gradient estimators: unbiasedness against closed forms, and their variance properties.

Model: linear Gaussian (float64), q(z) = N(loc, diag(exp(log_scale))^2). The ELBO's exact
gradient is the gradient of log p(x) - KL(q || p(z|x)), both closed forms, with respect to the
variational parameters AND the model's weight W. Each estimator's mean over many seeds must sit
within 4.5 standard errors of it (per component). For the IWAE bound, the reference is the mean
of many pathwise gradients (an unbiased estimator of the same gradient).
"""

from __future__ import annotations

import itertools
from typing import NamedTuple

import distrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vijax import elbo as velbo
from vijax import linear_gaussian as lg

LATENT, DATA, BATCH = 2, 3, 2
Z_TOL = 4.5  # standard errors


class Params(NamedTuple):
    loc: jax.Array  # [batch, latent]
    log_scale: jax.Array  # [batch, latent]
    weight: jax.Array  # [data, latent]


@pytest.fixture
def setup(x64):
    model = lg.random_model(jax.random.key(0), LATENT, DATA, noise_scale=0.8, dtype=jnp.float64)
    x, _ = lg.sample(jax.random.key(1), model, BATCH)
    post_loc, post_cov = lg.posterior(model, x)
    params = Params(post_loc + 0.3, jnp.full((BATCH, LATENT), -0.4), model.weight)
    return model, x, params


def _q(params):
    return distrax.MultivariateNormalDiag(params.loc, jnp.exp(params.log_scale))


def _closed_form_elbo(params, model, x):
    m = model._replace(weight=params.weight)
    post_loc, post_cov = lg.posterior(m, x)
    cov_q = jax.vmap(jnp.diag)(jnp.exp(2 * params.log_scale))
    return jnp.sum(lg.log_marginal(m, x) - lg.gaussian_kl(params.loc, cov_q, post_loc, post_cov))


def _gradients(objective, estimator, params, model, x, num_seeds, seed, **kw):
    """Per-seed gradients of sum(objective), stacked: a Params of [num_seeds, ...] arrays."""

    def one(key):
        def f(p):
            m = model._replace(weight=p.weight)
            return jnp.sum(objective(key, lambda z: lg.log_joint(m, x, z), _q(p), estimator=estimator, **kw))

        return jax.grad(f)(params)

    keys = jax.random.split(jax.random.key(seed), num_seeds)
    return jax.jit(jax.vmap(one))(keys)


def _flat(tree):
    return np.concatenate([np.asarray(a).reshape(a.shape[0], -1) for a in tree], axis=1)


def _assert_unbiased(samples, reference, ref_se=None):
    s = _flat(samples)
    mean, se = s.mean(0), s.std(0, ddof=1) / np.sqrt(s.shape[0])
    ref = np.concatenate([np.ravel(a) for a in reference])
    total_se = se if ref_se is None else np.hypot(se, ref_se)
    z = np.abs(mean - ref) / total_se
    assert np.all(z < Z_TOL), f"max z-score {z.max():.2f}; mean {mean}, reference {ref}"
    return mean, se


@pytest.mark.parametrize(
    "estimator",
    [
        velbo.Pathwise(),
        velbo.StickingTheLanding(),
        velbo.ScoreFunction(),
        velbo.ScoreFunction(velbo.LeaveOneOut()),
        velbo.ScoreFunction(baseline=-6.0),
    ],
    ids=["pathwise", "stl", "score", "score_loo", "score_const"],
)
def test_elbo_gradient_is_unbiased(setup, estimator):
    model, x, params = setup
    reference = jax.grad(_closed_form_elbo)(params, model, x)
    num_samples = 2 if isinstance(estimator, velbo.ScoreFunction) else 1
    grads = _gradients(velbo.elbo, estimator, params, model, x, 6000, 10, num_samples=num_samples)
    _assert_unbiased(grads, reference)
    # the reference is not trivially small, so the check has power
    assert np.max(np.abs(np.concatenate([np.ravel(a) for a in reference]))) > 0.5


@pytest.mark.parametrize("estimator", [velbo.Pathwise(), velbo.ScoreFunction(velbo.LeaveOneOut())],
                         ids=["pathwise", "score_loo"])
def test_analytic_kl_elbo_gradient_is_unbiased(setup, estimator):
    model, x, params = setup
    reference = jax.grad(_closed_form_elbo)(params, model, x)
    prior = distrax.MultivariateNormalDiag(jnp.zeros(LATENT), jnp.ones(LATENT))

    def objective(key, _unused_log_joint, q, *, estimator, num_samples):
        raise AssertionError  # replaced below

    def one(key):
        def f(p):
            m = model._replace(weight=p.weight)
            return jnp.sum(velbo.elbo_analytic_kl(key, lambda z: lg.log_likelihood(m, x, z), _q(p), prior,
                                                  num_samples=2, estimator=estimator))

        return jax.grad(f)(params)

    grads = jax.jit(jax.vmap(one))(jax.random.split(jax.random.key(11), 6000))
    _assert_unbiased(grads, reference)


@pytest.fixture
def iwae_reference(setup):
    """High-sample pathwise reference for grad E[IWAE_K], K = 8: mean and standard error."""
    model, x, params = setup
    grads = _flat(_gradients(velbo.iwae_bound, velbo.Pathwise(), params, model, x, 40000, 20, num_samples=8))
    return grads.mean(0), grads.std(0, ddof=1) / np.sqrt(grads.shape[0])


@pytest.mark.parametrize("estimator", [velbo.DReG(), velbo.ScoreFunction(velbo.LeaveOneOut())],
                         ids=["dreg", "vimco"])
def test_iwae_gradient_is_unbiased(setup, iwae_reference, estimator):
    model, x, params = setup
    ref_mean, ref_se = iwae_reference
    num = 8000 if isinstance(estimator, velbo.DReG) else 20000
    grads = _gradients(velbo.iwae_bound, estimator, params, model, x, num, 21, num_samples=8)
    _assert_unbiased(grads, [ref_mean], ref_se)


def test_stl_is_biased_for_iwae(setup, iwae_reference):
    """Tucker et al. 2019, §3: STL drops a score term that no longer has zero mean when K > 1."""
    model, x, params = setup
    ref_mean, ref_se = iwae_reference
    g = _flat(_gradients(velbo.iwae_bound, velbo.StickingTheLanding(), params, model, x, 8000, 22, num_samples=8))
    mean, se = g.mean(0), g.std(0, ddof=1) / np.sqrt(g.shape[0])
    z = np.abs(mean - ref_mean) / np.hypot(se, ref_se)
    assert z.max() > 10, f"expected a clear bias, max z-score {z.max():.2f}"
    # the model (W) gradient is untouched by STL: the bias is in the variational parameters only
    n_var = 2 * BATCH * LATENT
    assert np.all(z[n_var:] < Z_TOL)


def test_stl_and_dreg_have_zero_variance_at_the_exact_posterior(setup):
    """Roeder et al. 2017: with q = p(z|x), log p(x,z) - log q(z) is constant in z, so the STL
    (and DReG) gradient w.r.t. q's parameters is exactly zero for every sample."""
    model, x, _ = setup
    post_loc, post_cov = lg.posterior(model, x)
    tril = jnp.broadcast_to(jnp.linalg.cholesky(post_cov), (BATCH, LATENT, LATENT))
    fn = lambda z: lg.log_joint(model, x, z)

    def grads(objective, estimator, key, **kw):
        f = lambda loc, t: jnp.sum(objective(key, fn, distrax.MultivariateNormalTri(loc, t), estimator=estimator, **kw))
        return jnp.concatenate([g.ravel() for g in jax.grad(f, argnums=(0, 1))(post_loc, tril)])

    keys = jax.random.split(jax.random.key(30), 200)
    # one compiled program per estimator (op-by-op dispatch of the vmapped gradients was slow)
    stl = jax.jit(jax.vmap(lambda k: grads(velbo.elbo, velbo.StickingTheLanding(), k)))(keys)
    dreg = jax.jit(jax.vmap(lambda k: grads(velbo.iwae_bound, velbo.DReG(), k, num_samples=5)))(
        keys)
    path = jax.jit(jax.vmap(lambda k: grads(velbo.elbo, velbo.Pathwise(), k)))(keys)
    assert np.max(np.abs(stl)) < 1e-10
    assert np.max(np.abs(dreg)) < 1e-10
    assert np.var(np.asarray(path), 0).sum() > 1e-2  # the plain pathwise gradient is noisy there


def test_score_function_variance_far_exceeds_pathwise(setup):
    model, x, params = setup
    path = _flat(_gradients(velbo.elbo, velbo.Pathwise(), params, model, x, 2000, 40))
    score = _flat(_gradients(velbo.elbo, velbo.ScoreFunction(), params, model, x, 2000, 40))
    score_loo = _flat(_gradients(velbo.elbo, velbo.ScoreFunction(velbo.LeaveOneOut()), params, model, x, 2000, 40,
                                 num_samples=2))
    n_var = 2 * BATCH * LATENT  # compare the variational-parameter gradients
    v_path = path[:, :n_var].var(0).sum()
    v_score = score[:, :n_var].var(0).sum()
    assert v_score > 10 * v_path  # measured: about 18x here
    # the leave-one-out baseline (a control variate) cuts the score-function variance
    assert score_loo[:, :n_var].var(0).sum() < v_score


def _mean_grad_and_se(objective, estimator, params, num_seeds, seed):
    """Per-seed gradients of sum(objective(key, params, estimator)), flattened: mean, SE, all."""
    one = lambda key: jax.grad(lambda p: jnp.sum(objective(key, p, estimator)))(params)
    grads = _flat(jax.tree_util.tree_leaves(jax.jit(jax.vmap(one))(jax.random.split(jax.random.key(seed), num_seeds))))
    return grads.mean(0), grads.std(0, ddof=1) / np.sqrt(num_seeds), grads


def test_discrete_q_score_function_is_unbiased_and_pathwise_is_refused(x64):
    """Independent Bernoulli q: the exact ELBO gradient by enumerating the 2^3 states. The score
    function (with and without a leave-one-out baseline) matches it; Pathwise, which would
    silently return a wrong gradient (no path derivative through a discrete draw), raises."""
    w, c = jnp.array([1.0, -2.0, 0.5]), 0.3
    log_joint = lambda z: z.astype(jnp.float64) @ w + c * z[:, 0] * z[:, 1] - 1.0
    q_of = lambda logits: distrax.Independent(distrax.Bernoulli(logits=logits), 1)
    logits = jnp.array([[0.2, -0.5, 1.0]])

    def exact_elbo(logits):
        q = q_of(logits)
        states = jnp.array(list(itertools.product([0, 1], repeat=3)))[:, None]  # [8, 1, 3]
        log_q = jax.vmap(q.log_prob)(states)
        return jnp.sum(jnp.exp(log_q) * (jax.vmap(log_joint)(states) - log_q))

    reference = np.ravel(jax.grad(exact_elbo)(logits))
    objective = lambda k, l, est: velbo.elbo(k, log_joint, q_of(l), num_samples=2, estimator=est)
    for est in (velbo.ScoreFunction(), velbo.ScoreFunction(velbo.LeaveOneOut())):
        mean, se, _ = _mean_grad_and_se(objective, est, logits, 20000, 50)
        assert np.all(np.abs(mean - reference) < Z_TOL * se), (est, mean, reference, se)
    assert np.max(np.abs(reference)) > 0.2  # the check has power
    with pytest.raises(TypeError, match=r"`q` draws non-floating samples.*`estimator`"):
        objective(jax.random.key(0), logits, velbo.Pathwise())


def test_vimco_is_unbiased_with_zero_weight_particles(x64):
    """log p(x, z) = -inf beyond z > 1.5 (a truncated model): some of the K = 16 particles have
    zero weight. The leave-one-out (VIMCO) baseline skips them and stays unbiased: its mean
    gradient matches the plain score function's (unbiased, independent seeds). Pathwise-type
    estimators are not unbiased here (the integrand jumps at z = 1.5), so they are not used."""
    params = (jnp.array([[1.2], [0.9]]), jnp.array([[-0.3], [0.0]]))  # loc, log_scale: [2, 1]

    def log_joint(z):
        lp = -0.5 * jnp.sum((z - 0.3) ** 2, -1)
        return jnp.where(z[:, 0] > 1.5, -jnp.inf, lp)

    def objective(key, p, est):
        q = distrax.MultivariateNormalDiag(p[0], jnp.exp(p[1]))
        return velbo.iwae_bound(key, log_joint, q, num_samples=16, estimator=est)

    ref_mean, ref_se, _ = _mean_grad_and_se(objective, velbo.ScoreFunction(), params, 80000, 60)
    vimco = velbo.ScoreFunction(velbo.LeaveOneOut())
    mean, se, grads = _mean_grad_and_se(objective, vimco, params, 20000, 61)
    assert np.all(np.isfinite(grads))
    z = np.abs(mean - ref_mean) / np.hypot(se, ref_se)
    assert np.all(z < Z_TOL), (z, mean, ref_mean)
    assert np.max(np.abs(ref_mean)) > 10 * np.max(ref_se)  # the reference is well resolved


@pytest.mark.parametrize("baseline, error", [
    ("foo", TypeError), (velbo.LeaveOneOut, TypeError), (True, TypeError), ([1.0, 2.0], TypeError),
    (np.zeros(2, bool), TypeError), (1j, TypeError), (float("nan"), ValueError),
], ids=["str", "class-not-instance", "bool", "list", "bool-array", "complex", "nan"])
def test_score_function_rejects_a_bad_baseline_when_built(baseline, error):
    with pytest.raises(error, match="baseline"):
        velbo.ScoreFunction(baseline)


def test_valid_baselines_stay_hashable_static_arguments():
    for baseline in (None, 1.5, np.float32(-2.0), 3, velbo.LeaveOneOut()):
        est = velbo.ScoreFunction(baseline)
        assert est == velbo.ScoreFunction(baseline) and hash(est) == hash(velbo.ScoreFunction(baseline))
    # arrays, traced ones included, are accepted (not hashable, as before)
    doubled = jax.jit(lambda b: 2 * velbo.ScoreFunction(b).baseline)(jnp.ones(BATCH))
    np.testing.assert_array_equal(doubled, np.full(BATCH, 2.0))
