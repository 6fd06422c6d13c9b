"""Tests for vijax.meanfield: the CAVI driver, Normal-Gamma q(mu)q(tau), the Bayesian GMM,
Blei et al.'s known-variance mixture and EM as the Dirac-delta special case.

References are closed forms (exact Normal-Gamma posterior and evidence, Student-t
predictives, exact enumeration of a small mixture), scikit-learn's BayesianGaussianMixture,
scipy densities for Monte Carlo ELBO estimates (tolerances from the estimator's standard
error), and vijax.em for the EM trajectories -- never the code's own output.
"""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special, stats

from vijax import em, meanfield
from vijax.meanfield import bayesian_gmm as bg
from vijax.meanfield import dirac_em
from vijax.meanfield import known_variance_gmm as kv
from vijax.meanfield import normal_gamma as ng


def _rank_strict():
    return jax.numpy_rank_promotion("raise")


# ============================================================================================
# The generic driver on a problem with a known answer: mean-field q(z1)q(z2) for a correlated
# bivariate Gaussian target (PRML §10.1.2, eqs 10.11-10.15). The block optimum is
# m_1 = mu_1 - Lambda_11^{-1} Lambda_12 (m_2 - mu_2) with fixed variances 1/Lambda_ii; the
# fixed point is m = mu and the converged ELBO is -KL(q || p) = (log|Lambda| - sum log Lambda_ii)/2.
# ============================================================================================

_PRECISION = np.array([[2.0, 1.2], [1.2, 1.5]])


def _gauss_update(i):
    j = 1 - i

    def update(m, mu):
        lam = jnp.asarray(_PRECISION, m.dtype)
        return m.at[i].set(mu[i] - lam[i, j] / lam[i, i] * (m[j] - mu[j]))

    return update


def _gauss_elbo(m, mu):
    lam = jnp.asarray(_PRECISION, m.dtype)
    d = m - mu
    diag = jnp.diagonal(lam)
    e_log_p = 0.5 * jnp.linalg.slogdet(lam)[1] - math.log(2 * math.pi) - 0.5 * d @ lam @ d - 1.0
    entropy = jnp.sum(0.5 * (1.0 + math.log(2 * math.pi) - jnp.log(diag)))
    return e_log_p + entropy


_GAUSS_UPDATES = (_gauss_update(0), _gauss_update(1))
_GAUSS_KL_MIN = -0.5 * (np.linalg.slogdet(_PRECISION)[1] - np.log(np.diag(_PRECISION)).sum())


def test_cavi_driver_converges_to_known_fixed_point(x64):
    mu = jnp.array([1.0, -2.0])
    run = jax.jit(lambda m0, mu: meanfield.cavi(_GAUSS_UPDATES, m0, mu, elbo_fn=_gauss_elbo,
                                                tol=1e-14, max_iter=200))
    with _rank_strict():
        m, info = run(jnp.array([5.0, 5.0]), mu)
    n = int(info.num_iter)
    assert info.elbo.shape == (200,) and info.elbo.dtype == jnp.float64
    assert bool(info.converged) and 2 < n < 200
    np.testing.assert_allclose(m, mu, atol=1e-6)
    np.testing.assert_allclose(info.elbo[n - 1], -_GAUSS_KL_MIN, rtol=1e-10)
    trace = np.concatenate([[float(info.initial_elbo)], np.asarray(info.elbo[:n])])
    assert np.all(np.diff(trace) >= -1e-12)
    assert np.all(np.isnan(np.asarray(info.elbo[n:])))
    # the convergence rate of this coordinate ascent is (Lambda_12^2 / Lambda_11 Lambda_22)
    # per sweep: the error contracts geometrically with exactly that factor
    rate = _PRECISION[0, 1] ** 2 / (_PRECISION[0, 0] * _PRECISION[1, 1])
    gaps = -_GAUSS_KL_MIN - np.asarray(info.elbo[:6])
    np.testing.assert_allclose(gaps[2:] / gaps[1:-1], rate ** 2, rtol=1e-6)
    # a second call with new values does not retrace
    with _rank_strict():
        run(jnp.array([0.0, 1.0]), jnp.array([3.0, 3.0]))
    assert run._cache_size() == 1


def test_cavi_driver_max_iter_and_vmap():
    m0 = jnp.zeros(2, jnp.float32)
    _, info = meanfield.cavi(_GAUSS_UPDATES, m0, jnp.array([4.0, 4.0]), elbo_fn=_gauss_elbo,
                             tol=0.0, max_iter=3)
    assert int(info.num_iter) == 3 and not bool(info.converged)
    assert info.elbo.dtype == jnp.float32 and not np.isnan(np.asarray(info.elbo)).any()
    # vmap over targets: each batch member converges to its own fixed point and stops on its own
    mus = jnp.array([[0.0, 0.0], [1.0, -1.0], [30.0, 20.0]], jnp.float32)
    single = jax.jit(lambda mu: meanfield.cavi(_GAUSS_UPDATES, m0, mu, elbo_fn=_gauss_elbo,
                                               tol=1e-6, max_iter=100))
    ms, infos = jax.jit(jax.vmap(single))(mus)
    np.testing.assert_allclose(ms, mus, atol=1e-2)
    assert infos.elbo.shape == (3, 100)
    assert int(infos.num_iter[0]) == 1  # already at the optimum
    assert int(infos.num_iter[2]) > int(infos.num_iter[1])
    for b in range(3):
        assert int(single(mus[b])[1].num_iter) == int(infos.num_iter[b])


def test_cavi_driver_rejects_bad_arguments():
    m0 = jnp.zeros(2)
    with pytest.raises(ValueError, match="update_fns"):
        meanfield.cavi((), m0, m0, elbo_fn=_gauss_elbo)
    with pytest.raises(TypeError, match="update_fns"):
        meanfield.cavi(_GAUSS_UPDATES[0], m0, m0, elbo_fn=_gauss_elbo)
    with pytest.raises(TypeError, match=r"update_fns\[1\]"):
        meanfield.cavi((_GAUSS_UPDATES[0], 3), m0, m0, elbo_fn=_gauss_elbo)
    with pytest.raises(TypeError, match="elbo_fn"):
        meanfield.cavi(_GAUSS_UPDATES, m0, m0, elbo_fn=None)
    with pytest.raises(ValueError, match="max_iter"):
        meanfield.cavi(_GAUSS_UPDATES, m0, m0, elbo_fn=_gauss_elbo, max_iter=0)
    with pytest.raises(ValueError, match="tol"):
        meanfield.cavi(_GAUSS_UPDATES, m0, m0, elbo_fn=_gauss_elbo, tol=-1.0)
    with pytest.raises(TypeError, match="tol must be a real number"):
        meanfield.cavi(_GAUSS_UPDATES, m0, m0, elbo_fn=_gauss_elbo, tol="small")
    with pytest.raises(ValueError, match="scalar"):
        meanfield.cavi(_GAUSS_UPDATES, m0, m0, elbo_fn=lambda s, d: s)


# ============================================================================================
# Perturbation helper: "each block update is the maximiser of the ELBO over its block".
# ============================================================================================

def _assert_block_is_maximiser(elbo_fn, state, perturb_fn, *, seed, num_directions=6,
                               sizes=(1e-2, 1e-3)):
    """After a block update, random small perturbations of that block must lower the ELBO."""
    best = float(elbo_fn(state))
    rng = np.random.default_rng(seed)
    for _ in range(num_directions):
        for eps in sizes:
            perturbed = perturb_fn(state, rng, eps)
            value = float(elbo_fn(perturbed))
            assert value < best, (value, best, eps)


def _tree_perturb(fields, transform=None):
    """Perturb the named NamedTuple fields by eps * standard normal noise (optionally through
    a transform (value, noise, eps) -> value that keeps the parameter valid)."""

    def perturb(state, rng, eps):
        changes = {}
        for name in fields:
            value = np.asarray(getattr(state, name))
            noise = rng.standard_normal(value.shape)
            fn = (transform or {}).get(name, lambda v, z, e: v + e * z)
            changes[name] = jnp.asarray(fn(value, noise, eps), value.dtype)
        return state._replace(**changes)

    return perturb


def _run_sweeps_checking_blocks(elbo_fn, state, data, update_fns, perturbs, *, num_directions,
                                check_sweeps=(0, 1, 2), after_block=None):
    """Three jitted CAVI sweeps under strict rank promotion. After every block update the ELBO
    must not decrease (relative 1e-10), and in ``check_sweeps`` the block must be a maximiser
    (:func:`_assert_block_is_maximiser`). ``after_block(state, elbo)`` adds per-block checks.
    Returns the final state."""
    updates = [jax.jit(fn) for fn in update_fns]
    previous = float(elbo_fn(state))
    for sweep in range(3):
        for b, update in enumerate(updates):
            with _rank_strict():
                state = update(state, data)
            current = float(elbo_fn(state))
            assert current >= previous - 1e-10 * abs(previous), (sweep, b, current, previous)
            previous = current
            if sweep in check_sweeps:
                _assert_block_is_maximiser(elbo_fn, state, perturbs[b], seed=10 * sweep + b,
                                           num_directions=num_directions)
            if after_block is not None:
                after_block(state, current)
    return state


_POSITIVE = lambda v, z, e: v * np.exp(e * z)  # noqa: E731


def _perturb_responsibilities(v, z, e):
    logits = np.log(v) + e * z
    return special.softmax(logits, axis=-1)


# ============================================================================================
# Normal-Gamma q(mu) q(tau) (PRML §10.1.3).
# ============================================================================================

_NG_PRIOR = ng.NormalGammaPrior(loc=0.5, precision_scale=0.5, concentration=2.0, rate=3.0)


def _ng_data(n=20, seed=1):
    return np.random.default_rng(seed).normal(1.0, 2.0, size=n)


def _student_t_log_evidence(x, prior):
    """log p(x) by the chain rule with Student-t predictives (PRML eq. 2.160 style)."""
    mu, lam, a, b = prior.loc, prior.precision_scale, prior.concentration, prior.rate
    total = 0.0
    for xn in x:
        scale = math.sqrt(b * (lam + 1.0) / (a * lam))
        total += stats.t.logpdf(xn, df=2 * a, loc=mu, scale=scale)
        mu, lam, a, b = ((lam * mu + xn) / (lam + 1.0), lam + 1.0, a + 0.5,
                         b + 0.5 * lam * (xn - mu) ** 2 / (lam + 1.0))
    return total


def test_normal_gamma_matches_exact_posterior_mean_and_is_narrower(x64):
    x = _ng_data()
    state, info = jax.jit(ng.fit)(ng.init(x, _NG_PRIOR), x, _NG_PRIOR, tol=1e-15)
    post = ng.exact_posterior(x, _NG_PRIOR)
    assert bool(info.converged)
    # E_q[mu] is the exact posterior mean of mu (PRML 10.26 vs the conjugate update)
    xbar, n, lam0 = x.mean(), x.size, _NG_PRIOR.precision_scale
    np.testing.assert_allclose(state.loc, (lam0 * _NG_PRIOR.loc + n * xbar) / (lam0 + n),
                               rtol=1e-13)
    np.testing.assert_allclose(state.loc, post.loc, rtol=1e-13)
    # q(mu) is narrower than the exact marginal of mu, a Student-t (PRML §10.1.3, Fig. 10.4)
    t = ng.exact_mu_marginal(post)
    exact_var_mu = stats.t.var(df=float(t.df), scale=float(t.scale))
    assert 1.0 / float(state.precision) < exact_var_mu
    # ... by exactly the factor derived in docs/meanfield.md: at the fixed point
    # E_q[tau] = a_n / b_n (the exact posterior mean of tau), so
    # var_q(mu) = b_n / (lambda_n a_n) = exact var(mu) * (a_n - 1) / a_n, and
    # q(tau) = Gam(a_n + 1/2, b_n (1 + 1/(2 a_n))) is narrower than Gam(a_n, b_n) by the
    # factor a_n / (a_n + 1/2)
    a_n, b_n = float(post.concentration), float(post.rate)
    exact_var_tau = stats.gamma.var(a_n, scale=1.0 / b_n)
    np.testing.assert_allclose(state.concentration / state.rate, a_n / b_n, rtol=1e-7)
    np.testing.assert_allclose(1.0 / state.precision, exact_var_mu * (a_n - 1.0) / a_n, rtol=1e-7)
    np.testing.assert_allclose(state.concentration, a_n + 0.5, rtol=1e-14)
    np.testing.assert_allclose(state.concentration / state.rate ** 2,
                               exact_var_tau * a_n / (a_n + 0.5), rtol=1e-7)
    # ELBO <= log p(x); log p(x) itself checked against the Student-t predictive chain
    log_evidence = float(ng.log_marginal_likelihood(x, _NG_PRIOR))
    np.testing.assert_allclose(log_evidence, _student_t_log_evidence(x, _NG_PRIOR), rtol=1e-12)
    final = float(info.elbo[int(info.num_iter) - 1])
    assert float(info.initial_elbo) < final < log_evidence
    np.testing.assert_allclose(final, float(ng.elbo(state, x, _NG_PRIOR)), rtol=1e-14)
    # and the gap log p(x) - ELBO = KL(q || posterior), computed by quadrature on a grid
    mu_grid = np.linspace(float(post.loc) - 8 * math.sqrt(exact_var_mu),
                          float(post.loc) + 8 * math.sqrt(exact_var_mu), 801)
    tau_grid = np.linspace(1e-6, a_n / b_n + 12 * math.sqrt(exact_var_tau), 1601)
    mm, tt = np.meshgrid(mu_grid, tau_grid, indexing="ij")
    log_q = (stats.norm.logpdf(mm, float(state.loc), 1 / math.sqrt(float(state.precision)))
             + stats.gamma.logpdf(tt, float(state.concentration), scale=1 / float(state.rate)))
    log_p = (stats.norm.logpdf(mm, float(post.loc),
                               1 / np.sqrt(float(post.precision_scale) * tt))
             + stats.gamma.logpdf(tt, a_n, scale=1 / b_n))
    cell = (mu_grid[1] - mu_grid[0]) * (tau_grid[1] - tau_grid[0])
    kl = float(np.sum(np.exp(log_q) * (log_q - log_p)) * cell)
    np.testing.assert_allclose(log_evidence - final, kl, rtol=1e-4)


def test_normal_gamma_elbo_matches_monte_carlo(x64):
    x = _ng_data(n=12, seed=2)
    rng = np.random.default_rng(7)
    for state in (ng.NormalGammaState(loc=jnp.array(-0.3), precision=jnp.array(2.0),
                                      concentration=jnp.array(3.0), rate=jnp.array(5.0)),
                  ng.fit(ng.init(x, _NG_PRIOR), x, _NG_PRIOR)[0]):
        s = 200_000
        mu = rng.normal(float(state.loc), 1.0 / math.sqrt(float(state.precision)), size=s)
        tau = rng.gamma(float(state.concentration), 1.0 / float(state.rate), size=s)
        # log p(x, mu, tau) - log q(mu) - log q(tau) with scipy densities
        log_lik = stats.norm.logpdf(x[None, :], mu[:, None], 1.0 / np.sqrt(tau[:, None])).sum(1)
        log_prior = (stats.norm.logpdf(mu, _NG_PRIOR.loc,
                                       1.0 / np.sqrt(_NG_PRIOR.precision_scale * tau))
                     + stats.gamma.logpdf(tau, _NG_PRIOR.concentration,
                                          scale=1.0 / _NG_PRIOR.rate))
        log_q = (stats.norm.logpdf(mu, float(state.loc), 1.0 / math.sqrt(float(state.precision)))
                 + stats.gamma.logpdf(tau, float(state.concentration),
                                      scale=1.0 / float(state.rate)))
        w = log_lik + log_prior - log_q
        se = w.std(ddof=1) / math.sqrt(s)
        value = float(ng.elbo(state, x, _NG_PRIOR))
        assert abs(value - w.mean()) < 4.0 * se, (value, w.mean(), se)
        # ... and our log_joint agrees with scipy's joint density at the samples
        np.testing.assert_allclose(ng.log_joint(x, _NG_PRIOR, mu[:50], tau[:50]),
                                   (log_lik + log_prior)[:50], rtol=1e-12)


def test_normal_gamma_monotone_and_each_block_maximises_elbo(x64):
    x = _ng_data()
    state = ng.NormalGammaState(loc=jnp.array(-4.0), precision=jnp.array(0.1),
                                concentration=jnp.array(1.5), rate=jnp.array(30.0))
    elbo = lambda s: ng.elbo(s, x, _NG_PRIOR)  # noqa: E731
    blocks = [(ng.update_q_mu, _tree_perturb(("loc", "precision"), {"precision": _POSITIVE})),
              (ng.update_q_tau, _tree_perturb(("concentration", "rate"),
                                              {"concentration": _POSITIVE, "rate": _POSITIVE}))]
    previous = float(elbo(state))
    prior = ng._prior_as(_NG_PRIOR, jnp.float64)
    for sweep in range(3):
        for b, (update, perturb) in enumerate(blocks):
            state = update(state, jnp.asarray(x), prior)
            current = float(elbo(state))
            assert current >= previous - 1e-12 * abs(previous)
            previous = current
            _assert_block_is_maximiser(elbo, state, perturb, seed=10 * sweep + b)


def test_normal_gamma_float32_jit_vmap():
    xs = np.stack([_ng_data(n=25, seed=s) for s in range(4)]).astype(np.float32)
    fit = jax.jit(jax.vmap(lambda x: ng.fit(ng.init(x, _NG_PRIOR), x, _NG_PRIOR, tol=1e-6)))
    with _rank_strict():
        states, infos = fit(xs)
    assert states.loc.shape == (4,) and states.loc.dtype == jnp.float32
    assert infos.elbo.dtype == jnp.float32 and bool(jnp.all(infos.converged))
    for b in range(4):
        with jax.enable_x64(True):
            post = ng.exact_posterior(xs[b].astype(np.float64), _NG_PRIOR)
        np.testing.assert_allclose(states.loc[b], post.loc, rtol=1e-5)
    with _rank_strict():
        fit(xs + 1.0)
    assert fit._cache_size() == 1
    # step under jit: one sweep, the ELBO reported is the ELBO of the returned state
    s1, info = jax.jit(ng.step)(ng.init(xs[0], _NG_PRIOR), xs[0], _NG_PRIOR)
    np.testing.assert_allclose(info.elbo, ng.elbo(s1, xs[0], _NG_PRIOR), rtol=1e-6)

    # the closed-form utilities batch under jit(vmap) like their unbatched calls
    @jax.jit
    @jax.vmap
    def utilities(x, state):
        post = ng.exact_posterior(x, _NG_PRIOR)
        t = ng.exact_mu_marginal(post)
        return (ng.elbo(state, x, _NG_PRIOR), ng.log_marginal_likelihood(x, _NG_PRIOR), t.scale,
                ng.log_density_q(state, 0.3, 1.2), ng.log_density_exact(post, 0.3, 1.2),
                ng.log_joint(x, _NG_PRIOR, 0.3, 1.2))

    batched = utilities(xs, states)
    for b in range(4):
        state_b = jax.tree.map(lambda v: v[b], states)
        post = ng.exact_posterior(xs[b], _NG_PRIOR)
        single = (ng.elbo(state_b, xs[b], _NG_PRIOR), ng.log_marginal_likelihood(xs[b], _NG_PRIOR),
                  ng.exact_mu_marginal(post).scale, ng.log_density_q(state_b, 0.3, 1.2),
                  ng.log_density_exact(post, 0.3, 1.2), ng.log_joint(xs[b], _NG_PRIOR, 0.3, 1.2))
        for got, want in zip(batched, single):
            assert got.dtype == jnp.float32
            np.testing.assert_allclose(got[b], want, rtol=1e-5)


# ============================================================================================
# Bayesian GMM (PRML §10.2) against scikit-learn.
# ============================================================================================

def _mixture_data(n_per=(60, 50, 40), seed=0):
    rng = np.random.default_rng(seed)
    centres = np.array([[0.0, 0.0], [4.0, 1.0], [1.0, 5.0]])
    parts = [rng.normal(size=(n, 2)) * rng.uniform(0.5, 1.2, 2) + c
             for n, c in zip(n_per, centres)]
    return np.concatenate(parts)


# jitted once per (shape, dtype) and shared by the tests below (compilation dominates runtime)
_bg_step = jax.jit(bg.step)
_bg_elbo = jax.jit(bg.elbo)
_bg_init = jax.jit(bg.init, static_argnums=2)
_bg_init_resp = jax.jit(bg.init_from_responsibilities)
_K = 4

_SK_PRIOR = dict(concentration=0.1, mean_precision=0.5, loc=np.array([0.3, -0.2]), dof=3.0,
                 scale_inv=np.array([[1.0, 0.2], [0.2, 0.8]]))


def _sklearn_bgmm(prior: bg.BGMMPrior, num_components):
    from sklearn.mixture import BayesianGaussianMixture

    return BayesianGaussianMixture(
        n_components=num_components, covariance_type="full",
        weight_concentration_prior_type="dirichlet_distribution",
        weight_concentration_prior=float(prior.concentration),
        mean_precision_prior=float(prior.mean_precision), mean_prior=np.asarray(prior.loc),
        degrees_of_freedom_prior=float(prior.dof), covariance_prior=np.asarray(prior.scale_inv),
        reg_covar=0.0)


def _sklearn_offset(prior, n, dim, k):
    """Our full ELBO minus sklearn's lower bound (valid after its M-step; docs/meanfield.md):
    ln C(alpha_0) + K [D/2 ln beta_0 + ln B(W_0, nu_0) + D(D-1)/4 ln pi] - N D/2 ln 2 pi."""
    a0, nu0 = float(prior.concentration), float(prior.dof)
    log_c = special.gammaln(k * a0) - k * special.gammaln(a0)
    log_det_w0 = -np.linalg.slogdet(np.asarray(prior.scale_inv))[1]
    log_b_plus = (-0.5 * nu0 * log_det_w0 - 0.5 * nu0 * dim * math.log(2.0)
                  - sum(special.gammaln(0.5 * (nu0 - i)) for i in range(dim)))
    return (log_c + k * (0.5 * dim * math.log(float(prior.mean_precision)) + log_b_plus)
            - 0.5 * n * dim * math.log(2 * math.pi))


@pytest.mark.parametrize("prior_kind", ["custom", "sklearn_default"])
def test_bgmm_matches_sklearn(x64, prior_kind):
    """Same priors and the same initial responsibilities: sklearn's private ``_initialize(X,
    resp)`` followed by its own ``_e_step``/``_m_step``/``_compute_lower_bound`` loop (what
    ``fit`` runs per iteration) versus our ``init_from_responsibilities`` + ``step``. sklearn
    is built with ``reg_covar=0`` so that both run PRML's updates."""
    x = _mixture_data()
    n, dim = x.shape
    prior = (bg.BGMMPrior(**_SK_PRIOR) if prior_kind == "custom" else bg.default_prior(x, _K))
    r0 = np.random.default_rng(3).dirichlet(np.ones(_K), size=n)
    sk = _sklearn_bgmm(prior, _K)
    sk._check_parameters(x)
    if prior_kind == "sklearn_default":  # our default_prior is sklearn's
        np.testing.assert_allclose(prior.scale_inv, sk.covariance_prior_, rtol=1e-12)
        np.testing.assert_allclose(prior.loc, sk.mean_prior_, rtol=1e-12)
        np.testing.assert_allclose(
            [prior.concentration, prior.mean_precision, prior.dof],
            [sk.weight_concentration_prior_, sk.mean_precision_prior_,
             sk.degrees_of_freedom_prior_], rtol=1e-12)
    sk._initialize(x, r0)
    state = _bg_init_resp(x, r0, prior)
    offset = _sklearn_offset(prior, n, dim, _K)
    for _ in range(12):
        log_prob_norm, log_resp = sk._e_step(x)
        sk._m_step(x, log_resp)
        lower_bound = sk._compute_lower_bound(log_resp, log_prob_norm)
        state, info = _bg_step(state, x, prior)
        np.testing.assert_allclose(state.responsibilities, np.exp(log_resp), atol=1e-12)
        np.testing.assert_allclose(state.concentration, sk.weight_concentration_, rtol=1e-12)
        np.testing.assert_allclose(state.mean_precision, sk.mean_precision_, rtol=1e-12)
        np.testing.assert_allclose(state.loc, sk.means_, rtol=1e-11, atol=1e-12)
        np.testing.assert_allclose(state.dof, sk.degrees_of_freedom_, rtol=1e-12)
        np.testing.assert_allclose(bg.expected_covariances(state), sk.covariances_,
                                   rtol=1e-10, atol=1e-12)
        # our full PRML 10.70 ELBO = sklearn's constant-free bound + the derived offset
        np.testing.assert_allclose(float(info.elbo), lower_bound + offset, rtol=1e-12)


def test_bgmm_fit_matches_sklearn_fit(x64):
    """``fit`` against ``BayesianGaussianMixture.fit`` from the same responsibilities and
    priors: sklearn stops at its own rule (|change of its bound| < tol); run for that many
    sweeps, our final state equals sklearn's fitted parameters, our ELBO trace equals its
    ``lower_bounds_`` plus the constant offset, so the trace's changes give its stopping
    point."""
    x = _mixture_data()
    n, dim = x.shape
    prior = bg.BGMMPrior(**_SK_PRIOR)
    r0 = np.random.default_rng(7).dirichlet(np.ones(_K), size=n)
    sk = _sklearn_bgmm(prior, _K).set_params(tol=1e-6, max_iter=500)
    sk._initialize_parameters = lambda x_, random_state, xp=None: sk._initialize(x_, r0)
    sk.fit(x)
    assert sk.converged_ and 10 < sk.n_iter_ < 500
    state, info = jax.jit(bg.fit, static_argnames="max_iter")(
        _bg_init_resp(x, r0, prior), x, prior, tol=0.0, max_iter=sk.n_iter_)
    assert int(info.num_iter) == sk.n_iter_ and not bool(info.converged)
    trace = np.asarray(info.elbo)
    np.testing.assert_allclose(trace, np.asarray(sk.lower_bounds_)
                               + _sklearn_offset(prior, n, dim, _K), rtol=1e-12)
    assert np.abs(np.diff(trace))[-1] < 1e-6 <= np.abs(np.diff(trace))[:-1].min()
    np.testing.assert_allclose(state.concentration, sk.weight_concentration_, rtol=1e-10)
    np.testing.assert_allclose(state.loc, sk.means_, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(state.dof, sk.degrees_of_freedom_, rtol=1e-10)
    np.testing.assert_allclose(bg.expected_covariances(state), sk.covariances_,
                               rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("dim", [2, 32])
def test_bgmm_fit_float64_one_pass_equals_block_cavi(x64, dim):
    """float64 ``fit`` loops the one-pass sweep; it must take the same sweeps, states and ELBO
    trace as :func:`vijax.meanfield.cavi` over the three block updates and the full ELBO."""
    rng = np.random.default_rng(9)
    k, n = 4, 500
    x = jnp.asarray(rng.normal(size=(k, dim))[rng.integers(0, k, n)] * 3.0
                    + rng.normal(size=(n, dim)))
    prior = bg.check_prior(bg.default_prior(x, k), dim, jnp.float64)
    state = _bg_init(jax.random.key(1), x, k, prior)
    got, got_info = jax.jit(bg.fit)(state, x, prior, tol=1e-9)
    want, want_info = jax.jit(lambda s: meanfield.cavi(
        bg.UPDATE_FNS, s, (x, prior), elbo_fn=lambda s_, d: bg.elbo(s_, *d), tol=1e-9,
        max_iter=500))(state)
    assert bool(got_info.converged) and int(got_info.num_iter) == int(want_info.num_iter) > 3
    np.testing.assert_allclose(got_info.elbo, want_info.elbo, rtol=1e-12)  # NaN tails equal
    for a, b in zip(got, want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-9, atol=1e-11)


def test_bgmm_float32_step_and_fit_equal_the_block_sweep():
    """float32 ``step``/``fit`` run the centred two-pass sweep (one conjugate update of the new
    responsibilities' statistics); it must equal the three block updates and the full ELBO."""
    rng = np.random.default_rng(4)
    k, n, dim = 4, 400, 3
    x = jnp.asarray(rng.normal(size=(k, dim))[rng.integers(0, k, n)] * 3.0
                    + rng.normal(size=(n, dim)), jnp.float32)
    prior = bg.default_prior(x, k)
    state = bg.init(jax.random.key(1), x, k, prior)
    new, info = jax.jit(bg.step)(state, x, prior)
    swept = meanfield.sweep(bg.UPDATE_FNS, state, (x, prior))
    assert info.elbo.dtype == jnp.float32 and new.loc.dtype == jnp.float32
    for a, b in zip(new, swept):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(info.elbo, bg.elbo(swept, x, prior), rtol=1e-6)
    got, got_info = jax.jit(bg.fit, static_argnames="max_iter")(state, x, prior, tol=0.0,
                                                                max_iter=8)
    want, want_info = meanfield.cavi(bg.UPDATE_FNS, state, (x, prior),
                                     elbo_fn=lambda s_, d: bg.elbo(s_, *d), tol=0.0, max_iter=8)
    assert int(got_info.num_iter) == int(want_info.num_iter) == 8
    np.testing.assert_allclose(got_info.elbo, want_info.elbo, rtol=1e-5)
    for a, b in zip(got, want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_bgmm_float64_collapsed_component_far_out_takes_the_centred_sweep(x64):
    """Regression for the one-pass float64 sweep: 30 copies of (1e5, 1e5) beside 300 points
    of scale 1e4, with a weak prior (W_0^{-1} = 1e-6 I). Its uncentred sums give the copies'
    scatter an O(1e-4) indefinite error where the exact one is 0; em.one_pass_risk flags it,
    the sweep is recomputed centred, and 6 sweeps match scikit-learn from the same
    responsibilities."""
    rng = np.random.default_rng(1)
    x = np.vstack([rng.normal(size=(300, 2)) * 1e4, np.tile([[1e5, 1e5]], (30, 1))])
    r0 = np.repeat(np.eye(2), [300, 30], axis=0)
    prior = bg.BGMMPrior(concentration=1.0, mean_precision=1e-3, loc=x.mean(0), dof=2.0,
                         scale_inv=1e-6 * np.eye(2))
    state = _bg_init_resp(x, r0, prior)
    log_const, chol = bg._log_rho_as_gaussian(state, bg._expectations(state, False))
    sums = em.one_pass_sums(jnp.asarray(x), log_const, state.loc, chol, 128)
    assert float(em.one_pass_risk(sums, chol)) > em._ONE_PASS_MAX_RISK
    uncentred = np.asarray(sums.scatter_about(sums.first_moment / sums.counts[:, None]))[1]
    assert np.linalg.eigvalsh(uncentred).min() < -1e-6  # exact: the zero matrix

    sk = _sklearn_bgmm(prior, 2)
    sk._check_parameters(x)
    sk._initialize(x, r0)
    for _ in range(6):
        _, log_resp = sk._e_step(x)
        sk._m_step(x, log_resp)
        state, info = _bg_step(state, x, prior)
        np.testing.assert_allclose(state.responsibilities, np.exp(log_resp), atol=1e-12)
        np.testing.assert_allclose(state.loc, sk.means_, rtol=1e-11)
        np.testing.assert_allclose(bg.expected_covariances(state), sk.covariances_,
                                   rtol=1e-9, atol=1e-12)
        assert np.isfinite(float(info.elbo))


def test_bgmm_float32_far_from_the_origin_matches_float64():
    """Regression: float32 data at an offset of 1e6 (resolution 0.0625), two unit clusters 20
    apart. The sums behind the means are taken about the data mean (two-pass sweep and the
    initial statistics), so 8 float32 sweeps give the float64 fit's means to the data's
    resolution and its covariances to a few percent (before: a mean 4.2 off and a covariance
    of 20 against 1.4)."""
    rng = np.random.default_rng(0)
    x32 = (np.vstack([rng.normal(size=(500, 2)), rng.normal(size=(500, 2)) + 20.0])
           + 1e6).astype(np.float32)
    r0 = np.repeat(np.eye(2), 500, axis=0)

    def run(x):
        prior = bg.default_prior(x, 2)
        state = bg.init_from_responsibilities(x, r0.astype(x.dtype), prior)
        out, info = jax.jit(bg.fit, static_argnames="max_iter")(state, x, prior, tol=0.0,
                                                                max_iter=8)
        return np.asarray(out.loc), np.asarray(bg.expected_covariances(out)), info

    loc32, cov32, info32 = run(jnp.asarray(x32))
    with jax.enable_x64(True):
        loc64, cov64, _ = run(jnp.asarray(x32.astype(np.float64)))
    np.testing.assert_allclose(loc32, loc64, atol=0.07)  # ~1 ulp at 1e6
    np.testing.assert_allclose(cov32, cov64, rtol=0.05, atol=0.05)
    trace = np.asarray(info32.elbo)[:int(info32.num_iter)]
    assert np.all(np.isfinite(trace)) and np.all(np.diff(trace) > -1e-5 * np.abs(trace[1:]))


def _bgmm_state_off_optimum(x, prior, seed=0):
    """A valid state that is not a fixed point: a few sweeps, then random perturbations."""
    state = _bg_init(jax.random.key(seed), x, _K, prior)
    for _ in range(3):
        state, _ = _bg_step(state, x, prior)
    rng = np.random.default_rng(seed)
    tril = np.asarray(state.scale_inv_tril)
    return state._replace(
        responsibilities=jnp.asarray(special.softmax(
            np.log(np.asarray(state.responsibilities) + 1e-3) + rng.normal(size=(x.shape[0], _K)),
            axis=1)),
        concentration=state.concentration * 1.7, mean_precision=state.mean_precision * 0.6,
        loc=state.loc + rng.normal(scale=0.3, size=state.loc.shape),
        dof=state.dof + 2.5, scale_inv_tril=jnp.asarray(tril * 1.3 + np.tril(
            rng.normal(scale=0.1, size=tril.shape), -1)))


def _gauss_logpdf_precision(points, mean, precision):
    """log N(points | mean, precision^{-1}) for batches: points [..., M, D], mean [..., D],
    precision [..., D, D] (plain numpy; an independent reference)."""
    dim = points.shape[-1]
    _, logdet = np.linalg.slogdet(precision)
    diff = points - mean[..., None, :]
    quad = np.einsum("...md,...de,...me->...m", diff, precision, diff)
    return 0.5 * (logdet[..., None] - dim * math.log(2 * math.pi) - quad)


def test_bgmm_elbo_matches_monte_carlo_off_optimum(x64):
    """PRML 10.70-10.77 evaluated at a non-optimal state vs a Monte Carlo estimate over
    theta ~ q(pi) q(mu, Lambda) (scipy samplers and densities), with the expectation over
    q(Z) done exactly (Rao-Blackwellised)."""
    x = _mixture_data()
    prior = bg.BGMMPrior(**_SK_PRIOR)
    state = _bgmm_state_off_optimum(x, prior)
    r = np.asarray(state.responsibilities)
    k, dim = state.loc.shape
    alpha, beta = np.asarray(state.concentration), np.asarray(state.mean_precision)
    m, nu = np.asarray(state.loc), np.asarray(state.dof)
    tril = np.asarray(state.scale_inv_tril)
    w = np.linalg.inv(tril @ np.swapaxes(tril, -1, -2))  # W_k
    w0 = np.linalg.inv(_SK_PRIOR["scale_inv"])
    s = 2000
    rng = np.random.default_rng(11)
    pi = stats.dirichlet.rvs(alpha, size=s, random_state=rng)  # [S, K]
    lam = np.stack([stats.wishart.rvs(nu[j], w[j], size=s, random_state=rng)
                    for j in range(k)], axis=1)  # [S, K, D, D]
    cov_mu = np.linalg.inv(beta[None, :, None, None] * lam)
    mu = m[None] + np.einsum("skde,ske->skd", np.linalg.cholesky(cov_mu),
                             rng.standard_normal((s, k, dim)))
    log_p = stats.dirichlet.logpdf(pi.T, np.full(k, _SK_PRIOR["concentration"]))
    log_q = stats.dirichlet.logpdf(pi.T, alpha)
    for j in range(k):
        lam_j = np.moveaxis(lam[:, j], 0, -1)
        log_p = log_p + stats.wishart.logpdf(lam_j, _SK_PRIOR["dof"], w0)
        log_q = log_q + stats.wishart.logpdf(lam_j, nu[j], w[j])
        log_p = log_p + _gauss_logpdf_precision(mu[:, j, None], _SK_PRIOR["loc"][None],
                                                _SK_PRIOR["mean_precision"] * lam[:, j])[:, 0]
        log_q = log_q + _gauss_logpdf_precision(mu[:, j, None], m[j][None],
                                                beta[j] * lam[:, j])[:, 0]
    log_lik = _gauss_logpdf_precision(np.broadcast_to(x, (s, k) + x.shape), mu, lam)  # [S,K,N]
    e_z = np.einsum("nk,skn->s", r, log_lik + np.log(pi)[:, :, None])
    integrand = e_z - np.sum(special.xlogy(r, r)) + log_p - log_q
    se = integrand.std(ddof=1) / math.sqrt(s)
    value = float(_bg_elbo(state, x, prior))
    assert abs(value - integrand.mean()) < 4.0 * se, (value, integrand.mean(), se)
    assert se < 1.0  # the check has teeth: the ELBO terms are O(100) nats


@pytest.mark.parametrize("dim", [2, 32])  # both layouts of vijax.em.one_pass_sums
def test_bgmm_one_pass_step_equals_block_sweep_and_full_elbo(x64, dim):
    """The float64 ``step`` reads x once and gets its ELBO from sufficient statistics; it must
    equal the three block updates followed by the full ELBO (PRML 10.70-10.77, itself checked
    against Monte Carlo above)."""
    rng = np.random.default_rng(5)
    k, n = 4, 600
    x = jnp.asarray(rng.normal(size=(k, dim))[rng.integers(0, k, n)] * 3.0
                    + rng.normal(size=(n, dim)))
    prior = bg.default_prior(x, k)
    state = bg.init(jax.random.key(2), x, k, prior)
    state, _ = _bg_step(state, x, prior)
    out, info = _bg_step(state, x, prior)
    ref = meanfield.sweep(bg.UPDATE_FNS, state, (x, bg.check_prior(prior, dim, jnp.float64)))
    for got, want in zip(out, ref):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(float(info.elbo), float(_bg_elbo(ref, x, prior)), rtol=1e-12)


def test_bgmm_monotone_and_each_block_maximises_elbo(x64):
    x = _mixture_data()
    prior = bg.BGMMPrior(**_SK_PRIOR)
    data = (jnp.asarray(x), bg.check_prior(prior, 2, jnp.float64))
    state = _bgmm_state_off_optimum(x, prior, seed=1)
    elbo = lambda s: _bg_elbo(s, x, prior)  # noqa: E731
    perturbs = [
        _tree_perturb(("responsibilities",), {"responsibilities": _perturb_responsibilities}),
        _tree_perturb(("concentration",), {"concentration": _POSITIVE}),
        _tree_perturb(("mean_precision", "loc", "dof", "scale_inv_tril"),
                      {"mean_precision": _POSITIVE, "dof": _POSITIVE,
                       "scale_inv_tril": lambda v, z, e: v + e * np.tril(z)}),
    ]
    _run_sweeps_checking_blocks(elbo, state, data, bg.UPDATE_FNS, perturbs, num_directions=4,
                                check_sweeps=(0, 2))


def test_bgmm_old_faithful_switches_off_components(x64, old_faithful_csv):
    """PRML Fig. 10.6: K = 6, alpha_0 = 1e-3 on standardised Old Faithful; three random starts
    (vmapped) all keep two components, the other expected weights collapse to
    ~alpha_0 / (N + K alpha_0), and the ELBO trace never decreases."""
    raw = np.loadtxt(old_faithful_csv, delimiter=",", skiprows=1)
    x = (raw - raw.mean(0)) / raw.std(0)
    n, dim = x.shape
    prior = bg.BGMMPrior(concentration=1e-3, mean_precision=1.0, loc=np.zeros(dim), dof=dim,
                         scale_inv=np.eye(dim))
    keys = jax.random.split(jax.random.key(0), 3)

    @jax.jit
    def run(keys):
        states = jax.vmap(lambda key: bg.init(key, x, 6, prior))(keys)
        return jax.vmap(lambda s: bg.fit(s, x, prior, tol=1e-10, max_iter=400))(states)

    states, infos = run(keys)
    weights = np.asarray(jax.vmap(bg.expected_weights)(states))
    for b in range(len(keys)):
        trace = np.asarray(infos.elbo[b, : int(infos.num_iter[b])])
        assert bool(infos.converged[b])
        assert np.all(np.diff(trace) >= -1e-9 * np.abs(trace[1:]))
        active = weights[b] > 0.01
        assert active.sum() == 2, weights[b]
        assert np.all(weights[b][~active] < 10 * 1e-3 / n)
        # the two clusters hold ~ 35% / 65% of the eruptions (short / long)
        np.testing.assert_allclose(np.sort(weights[b][active]), [0.356, 0.644], atol=0.02)


def test_bgmm_float32_jit_vmap_matches_single_run():
    x = _mixture_data().astype(np.float32)
    prior = bg.default_prior(x, 3)
    assert prior.scale_inv.dtype == jnp.float32

    def fit_from_key(key):
        return bg.fit(bg.init(key, x, 3, prior), x, prior, tol=1e-6, max_iter=200)

    @jax.jit  # one program (one compilation): batched fits, an unbatched fit, a batched step
    def run(keys):
        states, infos = jax.vmap(fit_from_key)(keys)
        single = fit_from_key(keys[1])
        stepped = jax.vmap(lambda s: (bg.step(s, x, prior), bg.predict_responsibilities(s, x)))(
            states)
        return states, infos, single, stepped

    keys = jax.random.split(jax.random.key(4), 3)
    with _rank_strict():
        states, infos, (single, info), ((stepped, step_info), predicted) = run(keys)
    assert states.scale_inv_tril.shape == (3, 3, 2, 2) and infos.elbo.shape == (3, 200)
    assert states.loc.dtype == jnp.float32 and infos.elbo.dtype == jnp.float32
    assert bool(jnp.all(infos.converged))
    # batch member 1 equals the unbatched run from the same key (fit is pure; vmap keeps each
    # member's own stopping point)
    assert int(info.num_iter) == int(infos.num_iter[1])
    np.testing.assert_allclose(states.loc[1], single.loc, rtol=1e-4, atol=1e-4)
    # the vmapped step (the benchmark unit) at converged states changes the ELBO by ~nothing,
    # and predict_responsibilities reproduces that step's q(Z) block (its first block)
    assert step_info.elbo.shape == (3,) and predicted.shape == (3, x.shape[0], 3)
    final_elbo = infos.elbo[jnp.arange(3), infos.num_iter - 1]
    np.testing.assert_allclose(step_info.elbo, final_elbo, rtol=1e-5)
    np.testing.assert_allclose(predicted, stepped.responsibilities, atol=1e-6)
    with _rank_strict():
        run(jax.random.split(jax.random.key(5), 3))
    assert run._cache_size() == 1


# ============================================================================================
# Known-variance mixture (Blei, Kucukelbir & McAuliffe 2017, Algorithm 2).
# ============================================================================================

_kv_init = jax.jit(kv.init, static_argnums=2)
_kv_elbo = jax.jit(kv.elbo)


def _kv_exact_log_evidence(x, prior, k):
    """log p(x) by enumerating all K^N assignments; given c the points of component j are
    jointly N(0, s_x^2 I + sigma^2 1 1^T) in each coordinate."""
    n = x.shape[0]
    s2, sigma2 = float(prior.noise_variance), float(prior.prior_variance)
    terms = []
    for c in itertools.product(range(k), repeat=n):
        c = np.asarray(c)
        total = -n * math.log(k)
        for j in range(k):
            pts = x[c == j]
            if len(pts):
                cov = s2 * np.eye(len(pts)) + sigma2
                total += sum(stats.multivariate_normal.logpdf(pts[:, d], cov=cov)
                             for d in range(x.shape[1]))
        terms.append(total)
    return special.logsumexp(terms)


def test_known_variance_gmm_elbo_vs_exact_evidence_and_monte_carlo(x64):
    rng = np.random.default_rng(5)
    x = np.concatenate([rng.normal(-2.0, 1.0, (4, 1)), rng.normal(2.5, 1.0, (5, 1))])
    prior = kv.KnownVarianceGMMPrior(prior_variance=4.0, noise_variance=0.8)
    state, info = jax.jit(lambda s: kv.fit(s, x, prior, tol=1e-13))(
        _kv_init(jax.random.key(0), x, 2, prior))
    elbo = float(info.elbo[int(info.num_iter) - 1])
    log_evidence = _kv_exact_log_evidence(x, prior, 2)
    # ELBO <= log p(x); the posterior has K! = 2 symmetric modes and q covers one of them,
    # so the gap is ~ log 2 (for separated clusters, slightly more)
    assert elbo < log_evidence
    assert elbo < log_evidence - math.log(2.0) + 0.05
    assert elbo > log_evidence - math.log(2.0) - 0.25
    # Monte Carlo over mu ~ q(mu), exact over q(c): Blei et al. eq. 21 at a non-optimal state
    state = state._replace(loc=state.loc + 0.4, variance=state.variance * 2.0,
                           responsibilities=jnp.asarray(special.softmax(
                               rng.normal(size=(x.shape[0], 2)), axis=1)))
    s = 100_000
    m, v = np.asarray(state.loc), np.asarray(state.variance)
    mu = m[None] + np.sqrt(v)[None, :, None] * rng.standard_normal((s, 2, 1))  # [S, K, 1]
    r = np.asarray(state.responsibilities)
    log_lik = stats.norm.logpdf(x[None, None, :, 0], mu, math.sqrt(0.8))  # [S, K, N]
    integrand = (np.einsum("nk,skn->s", r, log_lik - math.log(2.0)) - np.sum(special.xlogy(r, r))
                 + stats.norm.logpdf(mu, 0.0, 2.0).sum((1, 2))
                 - stats.norm.logpdf(mu, m[None], np.sqrt(v)[None, :, None]).sum((1, 2)))
    se = integrand.std(ddof=1) / math.sqrt(s)
    value = float(_kv_elbo(state, x, prior))
    assert abs(value - integrand.mean()) < 4.0 * se, (value, integrand.mean(), se)


def test_known_variance_gmm_monotone_and_blockwise_optimal(x64):
    rng = np.random.default_rng(8)
    x = np.concatenate([rng.normal([-3.0, 0.0], 1.0, (20, 2)),
                        rng.normal([3.0, 1.0], 1.0, (20, 2)),
                        rng.normal([0.0, 4.0], 1.0, (20, 2))])
    prior = kv.KnownVarianceGMMPrior(prior_variance=10.0)  # unit noise: the paper's model
    data = (jnp.asarray(x), kv._prior_as(prior, jnp.float64))
    state = _kv_init(jax.random.key(1), x, 3, prior)
    elbo = lambda s: _kv_elbo(s, x, prior)  # noqa: E731
    perturbs = [_tree_perturb(("responsibilities",),
                              {"responsibilities": _perturb_responsibilities}),
                _tree_perturb(("loc", "variance"), {"variance": _POSITIVE})]
    state = _run_sweeps_checking_blocks(elbo, state, data, kv.UPDATE_FNS, perturbs,
                                        num_directions=3)
    # Blei et al. eqs 19-20 with unit noise: m_k = sum_i phi_ik x_i / (1/sigma^2 + sum_i phi_ik)
    phi = np.asarray(state.responsibilities)
    from_phi = jax.jit(kv.init_from_responsibilities)(x, phi, prior)
    np.testing.assert_allclose(from_phi.loc, (phi.T @ x) / (0.1 + phi.sum(0))[:, None],
                               rtol=1e-12)
    np.testing.assert_allclose(state.loc, (phi.T @ x) / (0.1 + phi.sum(0))[:, None], rtol=1e-12)
    np.testing.assert_allclose(state.variance, 1.0 / (0.1 + phi.sum(0)), rtol=1e-12)


def test_known_variance_gmm_float32_step_jit_vmap():
    x = np.random.default_rng(0).normal(size=(30, 2)).astype(np.float32)
    prior = kv.KnownVarianceGMMPrior(prior_variance=5.0)
    step = jax.jit(kv.step)
    state = _kv_init(jax.random.key(0), x, 3, prior)
    with _rank_strict():
        new, info = step(state, x, prior)
        step(new, x + 1.0, prior)
    assert new.loc.dtype == jnp.float32 and info.elbo.dtype == jnp.float32
    assert new.responsibilities.shape == (30, 3)
    assert step._cache_size() == 1
    np.testing.assert_allclose(info.elbo, _kv_elbo(new, x, prior), rtol=1e-6)

    @jax.jit
    def run(keys):
        states = jax.vmap(lambda key: kv.init(key, x, 3, prior))(keys)
        return jax.vmap(lambda s: kv.fit(s, x, prior, tol=1e-6, max_iter=100))(states)

    batched, infos = run(jax.random.split(jax.random.key(1), 4))
    assert batched.loc.shape == (4, 3, 2) and infos.elbo.shape == (4, 100)
    assert batched.loc.dtype == jnp.float32 and bool(jnp.all(infos.converged))


# ============================================================================================
# EM as the special case q(theta) = delta(theta - theta_0) (lecture 3).
# ============================================================================================

_de_step = jax.jit(dirac_em.step)
_de_elbo = jax.jit(dirac_em.elbo)
_de_update_q_z = jax.jit(dirac_em.update_q_z)


def test_dirac_delta_cavi_reproduces_em_trajectory(x64):
    """Our Dirac-delta mean-field updates (the mode of the Bayesian GMM's conjugate q(theta)
    under the flat prior) against vijax.em's independent EM implementation, started from the
    same parameters: weights, means and covariances after every iteration, and the restricted
    ELBO after the E-step against EM's log-likelihood. vijax.em requires reg_covar > 0; 1e-12
    perturbs each covariance by 1e-12, far below the tolerances used."""
    x = _mixture_data()
    n = x.shape[0]
    prior = dirac_em.flat_prior(2, jnp.float64)
    r0 = np.random.default_rng(2).dirichlet(np.ones(3), size=(2, n))  # two starts
    starts = jax.jit(jax.vmap(dirac_em.init_from_responsibilities, (None, 0, None)))(x, r0, prior)
    state = jax.tree.map(lambda v: v[0], starts)
    em_state = em.state_from_parameters(state.weights, state.loc, dirac_em.covariances(state),
                                        covariance_type=em.Full(), reg_covar=1e-12)
    em_step = jax.jit(em.step)
    lls = []
    for _ in range(15):
        # the restricted ELBO after the E-step is log p(X | theta_0) (flat prior: no prior term)
        after_e_step = float(_de_elbo(_de_update_q_z(state, x, prior), x, prior))
        em_state, em_info = em_step(em_state, x)
        state, info = _de_step(state, x, prior)
        np.testing.assert_allclose(after_e_step, n * float(em_info.log_likelihood), rtol=1e-10)
        np.testing.assert_allclose(state.weights, em_state.weights, rtol=1e-9)
        np.testing.assert_allclose(state.loc, em_state.means, rtol=1e-9, atol=1e-10)
        np.testing.assert_allclose(dirac_em.covariances(state), em_state.covariances,
                                   rtol=1e-8, atol=1e-10)
        lls.append(after_e_step)
    assert np.all(np.diff(lls) > 0)  # EM is monotone (and still moving over these iterations)
    # the same 15 iterations through the generic driver, jitted and vmapped over two starts
    fitted, info = jax.jit(jax.vmap(lambda s: dirac_em.fit(s, x, prior, tol=0.0, max_iter=15)))(
        starts)
    assert infos_ok(info, 15)
    np.testing.assert_allclose(fitted.loc[0], em_state.means, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(dirac_em.covariances(jax.tree.map(lambda v: v[0], fitted)),
                               em_state.covariances, rtol=1e-8, atol=1e-10)


def _map_em_reference_step(x, weights, means, covs, prior):
    """One MAP-EM iteration in numpy from the stationarity conditions of
    log p(X | theta) + log p(theta) (Dirichlet x Gaussian-Wishart prior), written directly
    rather than as the mode of a conjugate posterior:
    pi_k ∝ N_k + alpha_0 - 1, mu_k = (beta_0 m_0 + sum_n r_nk x_n) / (beta_0 + N_k),
    Sigma_k = [W_0^-1 + beta_0 (mu_k - m_0)(mu_k - m_0)^T + sum_n r_nk (x_n - mu_k)(...)^T]
              / (nu_0 - D + N_k)."""
    n, dim = x.shape
    k = len(weights)
    log_rho = np.stack([np.log(weights[j]) + stats.multivariate_normal.logpdf(x, means[j], covs[j])
                        for j in range(k)], axis=1)
    log_lik = special.logsumexp(log_rho, axis=1).sum()
    r = np.exp(log_rho - special.logsumexp(log_rho, axis=1, keepdims=True))
    a0, b0, m0 = float(prior.concentration), float(prior.mean_precision), np.asarray(prior.loc)
    nu0, w0_inv = float(prior.dof), np.asarray(prior.scale_inv)
    counts = r.sum(0)
    new_weights = (counts + a0 - 1.0) / (n + k * (a0 - 1.0))
    new_means = (b0 * m0 + r.T @ x) / (b0 + counts)[:, None]
    new_covs = np.empty((k, dim, dim))
    for j in range(k):
        diff = x - new_means[j]
        dm = new_means[j] - m0
        new_covs[j] = ((w0_inv + b0 * np.outer(dm, dm) + (r[:, j, None] * diff).T @ diff)
                       / (nu0 - dim + counts[j]))
    return new_weights, new_means, new_covs, log_lik


def test_dirac_delta_cavi_reproduces_map_em_trajectory_with_a_proper_prior(x64):
    """With a proper Dirichlet / Gaussian-Wishart prior the Dirac-delta CAVI sweep is the MAP-EM
    step (lecture 3, "EM algorithm (special case)"): 12 iterations against the numpy MAP-EM
    above, and the restricted ELBO after the E-step equals log p(X | theta_0) + log p~(theta_0),
    the MAP objective, which never decreases."""
    x = _mixture_data()
    prior = bg.BGMMPrior(concentration=3.0, mean_precision=0.5, loc=np.array([1.0, 1.0]),
                         dof=4.0, scale_inv=np.array([[2.0, 0.3], [0.3, 1.5]]))
    r0 = np.random.default_rng(4).dirichlet(np.ones(3), size=x.shape[0])
    state = jax.jit(dirac_em.init_from_responsibilities)(x, r0, prior)
    weights, means = np.asarray(state.weights), np.asarray(state.loc)
    covs = np.asarray(dirac_em.covariances(state))
    objective = []
    for _ in range(12):
        after_e_step = float(_de_elbo(_de_update_q_z(state, x, prior), x, prior))
        log_prior = (2.0 * np.sum(np.log(weights))  # (alpha_0 - 1) sum log pi
                     + sum(0.5 * (4.0 - 2) * -np.linalg.slogdet(c)[1]
                           - 0.25 * (means[j] - 1.0) @ np.linalg.solve(c, means[j] - 1.0)
                           - 0.5 * np.trace(np.asarray(prior.scale_inv) @ np.linalg.inv(c))
                           for j, c in enumerate(covs)))
        weights, means, covs, log_lik = _map_em_reference_step(x, weights, means, covs, prior)
        state, _ = _de_step(state, x, prior)
        np.testing.assert_allclose(after_e_step, log_lik + log_prior, rtol=1e-11)
        np.testing.assert_allclose(state.weights, weights, rtol=1e-10)
        np.testing.assert_allclose(state.loc, means, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(dirac_em.covariances(state), covs, rtol=1e-9, atol=1e-12)
        objective.append(after_e_step)
    assert np.all(np.diff(objective) > -1e-9 * np.abs(objective[1:]))
    assert objective[-1] - objective[0] > 1.0  # it moved: the comparison is not at a fixed point


def infos_ok(info, num_iter):
    """Both batch members ran exactly num_iter sweeps with a non-decreasing ELBO trace."""
    trace = np.asarray(info.elbo)
    return (np.all(np.asarray(info.num_iter) == num_iter)
            and np.all(np.diff(trace, axis=1) >= -1e-10 * np.abs(trace[:, 1:])))


def test_dirac_map_em_blocks_maximise_the_restricted_elbo(x64):
    """With a proper Dirichlet x Gaussian-Wishart prior (MAP-EM): the restricted ELBO equals
    sum r (log p(x, z | theta) - log r) + log p(theta) - ln Z_prior, with log p(x, z | theta)
    from vijax.em.log_joint and log p(theta) from scipy, and each block is its maximiser."""
    x = _mixture_data()
    prior = bg.BGMMPrior(concentration=2.0, mean_precision=0.5, loc=np.array([0.3, -0.2]),
                         dof=4.0, scale_inv=np.array([[1.0, 0.2], [0.2, 0.8]]))
    k, dim = 3, 2
    a0, b0, nu0 = 2.0, 0.5, 4.0
    w0 = np.linalg.inv(np.asarray(prior.scale_inv))
    log_norm = (special.gammaln(k * a0) - k * special.gammaln(a0)
                + k * (-0.5 * nu0 * np.linalg.slogdet(w0)[1] - 0.5 * nu0 * dim * math.log(2)
                       - special.multigammaln(0.5 * nu0, dim)
                       + 0.5 * dim * math.log(b0 / (2 * math.pi))))
    state = jax.jit(dirac_em.init, static_argnums=2)(jax.random.key(3), x, k, prior)
    data = (jnp.asarray(x), dirac_em.check_prior(prior, dim, jnp.float64))
    elbo = lambda s: _de_elbo(s, x, prior)  # noqa: E731
    perturbs = [
        _tree_perturb(("responsibilities",), {"responsibilities": _perturb_responsibilities}),
        _tree_perturb(("weights", "loc", "covariance_tril"),
                      {"weights": _perturb_responsibilities,
                       "covariance_tril": lambda v, z, e: v + e * np.tril(z)}),
    ]
    def matches_independent_objective(state, current):
        # independent evaluation of the same objective
        covs = np.asarray(dirac_em.covariances(state))
        em_state = em.state_from_parameters(state.weights, state.loc, covs)
        r = np.asarray(state.responsibilities)
        log_joint = np.asarray(em.log_joint(em_state, x))
        log_prior = stats.dirichlet.logpdf(np.asarray(state.weights), np.full(k, a0))
        for j in range(k):
            lam = np.linalg.inv(covs[j])
            log_prior += stats.wishart.logpdf(lam, nu0, w0)
            log_prior += stats.multivariate_normal.logpdf(
                np.asarray(state.loc[j]), np.asarray(prior.loc), covs[j] / b0)
        reference = np.sum(r * log_joint - special.xlogy(r, r)) + log_prior - log_norm
        np.testing.assert_allclose(current, reference, rtol=1e-11)

    _run_sweeps_checking_blocks(elbo, state, data, dirac_em.UPDATE_FNS, perturbs,
                                num_directions=3, after_block=matches_independent_objective)


# ============================================================================================
# Bad input.
# ============================================================================================

_X_OK = np.random.default_rng(0).normal(size=(10, 2))


def _with_row(value):
    x = _X_OK.copy()
    x[3, 1] = value
    return x


_BG_PRIOR = bg.BGMMPrior(concentration=1.0, mean_precision=1.0, loc=np.zeros(2), dof=2.0,
                         scale_inv=np.eye(2))
_KV_PRIOR = kv.KnownVarianceGMMPrior(prior_variance=1.0)
_INITS = {
    "bgmm": lambda x, k: bg.init(jax.random.key(0), x, k, _BG_PRIOR),
    "kv": lambda x, k: kv.init(jax.random.key(0), x, k, _KV_PRIOR),
    "bgmm_resp": lambda x, k: bg.init_from_responsibilities(
        x, np.full((np.shape(x)[0], k), 1.0 / k), _BG_PRIOR),
    "dirac": lambda x, k: dirac_em.init(jax.random.key(0), x, k, dirac_em.flat_prior(2)),
}


@pytest.mark.parametrize("model", sorted(_INITS))
@pytest.mark.parametrize("bad, k, pattern", [
    (_with_row(np.nan), 2, r"x has non-finite.*rows \[3\]"),
    (_with_row(np.inf), 2, r"x has non-finite.*rows \[3\]"),
    (_X_OK[:3], 4, r"num_components \(K=4\).*x \(N=3\)"),
    (_X_OK[:, 0], 2, r"x must have shape \[num_points, dim\]"),
    (_X_OK[None], 2, r"x must have shape"),
])
def test_mixtures_reject_bad_data(model, bad, k, pattern):
    with pytest.raises(ValueError, match=pattern):
        _INITS[model](bad, k)


_FITTERS = {  # (module, prior, init) for the step / fit bad-input checks
    "bgmm": (bg, _BG_PRIOR, lambda x: bg.init(jax.random.key(0), x, 2, _BG_PRIOR)),
    "kv": (kv, _KV_PRIOR, lambda x: kv.init(jax.random.key(0), x, 2, _KV_PRIOR)),
    "dirac": (dirac_em, dirac_em.flat_prior(2),
              lambda x: dirac_em.init(jax.random.key(0), x, 2, dirac_em.flat_prior(2))),
}


@pytest.mark.parametrize("model", sorted(_FITTERS))
@pytest.mark.parametrize("call", ["step", "fit"])
def test_step_and_fit_reject_bad_data(model, call):
    module, prior, init = _FITTERS[model]
    state = init(_X_OK)
    fn = getattr(module, call)
    for bad, error, pattern in (
        (_with_row(np.nan), ValueError, r"x has non-finite.*rows \[3\]"),
        (_with_row(-np.inf), ValueError, r"x has non-finite.*rows \[3\]"),
        (_X_OK[:, 0], ValueError, r"x must have shape \[num_points, dim\]"),
        (np.zeros((10, 3)), ValueError, r"D=3|dim|shape"),
        (_X_OK.astype(np.float16), TypeError, "x must be a float32 or float64 array"),
        (_X_OK.astype(np.int32), TypeError, "x must be a float32 or float64 array"),
        (_X_OK > 0, TypeError, "x must be a float32 or float64 array"),
    ):
        with pytest.raises(error, match=pattern):
            fn(state, bad, prior)
    if call == "fit":
        for kwargs, pattern in (({"max_iter": 0}, "max_iter"), ({"tol": -1.0}, "tol"),
                                ({"tol": float("nan")}, "tol")):
            with pytest.raises(ValueError, match=pattern):
                fn(state, _X_OK, prior, **kwargs)


_MF_BATCHED = {  # name: (model in _FITTERS, f(state, x) for one member)
    "bgmm.step": ("bgmm", lambda s, x: bg.step(s, x, _BG_PRIOR)),
    "bgmm.elbo": ("bgmm", lambda s, x: bg.elbo(s, x, _BG_PRIOR)),
    "bgmm.init_from_responsibilities": (
        "bgmm", lambda s, x: bg.init_from_responsibilities(x, s.responsibilities, _BG_PRIOR)),
    "bgmm.expected_covariances": ("bgmm", lambda s, x: bg.expected_covariances(s)),
    "bgmm.predict_responsibilities": ("bgmm", lambda s, x: bg.predict_responsibilities(s, x)),
    "kv.step": ("kv", lambda s, x: kv.step(s, x, _KV_PRIOR)),
    "kv.elbo": ("kv", lambda s, x: kv.elbo(s, x, _KV_PRIOR)),
    "dirac_em.step": ("dirac", lambda s, x: dirac_em.step(s, x, dirac_em.flat_prior(2))),
    "dirac_em.elbo": ("dirac", lambda s, x: dirac_em.elbo(s, x, dirac_em.flat_prior(2))),
}


@pytest.mark.parametrize("name", sorted(_MF_BATCHED))
def test_mixture_functions_jit_vmap_match_unbatched_and_do_not_retrace(x64, name):
    """``jit(vmap)`` over three states equals the unbatched calls; new values, no recompile."""
    model, fn = _MF_BATCHED[name]
    module, prior, init = _FITTERS[model]
    x = jnp.asarray(_mixture_data())
    states = [init(x)]
    for _ in range(2):  # three different states: the initial one, after one and two sweeps
        states.append(module.step(states[-1], x, prior)[0])
    stacked = jax.tree.map(lambda *v: jnp.stack(v), *states)
    batched = jax.jit(jax.vmap(fn, (0, None)))
    with _rank_strict():
        out = batched(stacked, x)
    for b, state in enumerate(states):
        single = fn(state, x)
        got = jax.tree.map(lambda v: v[b], out)
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(single)):
            assert g.shape == w.shape and g.dtype == w.dtype
            np.testing.assert_allclose(g, w, rtol=1e-9, atol=1e-12)
    with _rank_strict():
        batched(stacked, x + 0.25)
    assert batched._cache_size() == 1


def test_bad_priors_states_and_dimensions():
    with pytest.raises(ValueError, match=r"prior.loc has shape \[2\] but x has D=3 columns"):
        bg.init(jax.random.key(0), np.zeros((5, 3)), 2, _BG_PRIOR)  # D = 3 vs prior D = 2
    with pytest.raises(ValueError, match=r"x has D=3 columns"):
        dirac_em.init(jax.random.key(0), np.zeros((5, 3)), 2, dirac_em.flat_prior(2))
    with pytest.raises(ValueError, match="prior.dof"):
        bg.init(jax.random.key(0), _X_OK, 2, _BG_PRIOR._replace(dof=0.5))
    with pytest.raises(ValueError, match="prior.scale_inv.*positive definite"):
        bg.init(jax.random.key(0), _X_OK, 2, _BG_PRIOR._replace(scale_inv=-np.eye(2)))
    with pytest.raises(ValueError, match="prior.concentration"):
        bg.init(jax.random.key(0), _X_OK, 2, _BG_PRIOR._replace(concentration=0.0))
    with pytest.raises(ValueError, match="responsibilities rows must sum to 1"):
        bg.init_from_responsibilities(_X_OK, np.full((10, 2), 0.3), _BG_PRIOR)
    with pytest.raises(ValueError, match="prior.noise_variance"):
        kv.init(jax.random.key(0), _X_OK, 2, _KV_PRIOR._replace(noise_variance=-1.0))
    with pytest.raises(TypeError, match="prior must be a BGMMPrior"):
        bg.init(jax.random.key(0), _X_OK, 2, _KV_PRIOR)
    with pytest.raises(ValueError, match="prior.concentration"):  # Dirichlet mode needs >= 1
        dirac_em.init(jax.random.key(0), _X_OK, 2, _BG_PRIOR._replace(concentration=0.5))
    with pytest.raises(ValueError, match="prior.mean_precision"):  # the flat limit is allowed
        bg.init(jax.random.key(0), _X_OK, 2, dirac_em.flat_prior(2))
    with pytest.raises(TypeError, match="num_components"):
        bg.init(jax.random.key(0), _X_OK, 2.0, _BG_PRIOR)
    state = bg.BGMMState(jnp.full((10, 2), 0.5), jnp.ones(2), jnp.ones(2), jnp.zeros((2, 2)),
                         jnp.full((2,), 3.0), jnp.broadcast_to(jnp.eye(2), (2, 2, 2)))
    with pytest.raises(ValueError, match="state.responsibilities"):
        bg.step(state, _X_OK[:8], _BG_PRIOR)  # state belongs to other data
    # Normal-Gamma: 1-D data, positive prior parameters
    with pytest.raises(ValueError, match=r"x must have shape \[num_points\]"):
        ng.init(_X_OK, _NG_PRIOR)
    with pytest.raises(ValueError, match=r"x has non-finite.*rows \[2\]"):
        ng.init(np.array([0.0, 1.0, np.nan]), _NG_PRIOR)
    with pytest.raises(ValueError, match="prior.rate"):
        ng.init(np.zeros(3), _NG_PRIOR._replace(rate=0.0))
    with pytest.raises(ValueError, match="state.precision"):
        ng.elbo(ng.NormalGammaState(0.0, -1.0, 1.0, 1.0), np.zeros(3), _NG_PRIOR)
    with pytest.raises(ValueError, match="state.loc"):
        bg.elbo(state._replace(loc=jnp.zeros((3, 2))), _X_OK, _BG_PRIOR)


# Audit of bad input (rng keys, state types and values, driver arguments): every case used to
# pass silently, give NaN, or fail with a raw JAX / AttributeError message.

# valid states for _X_OK (N = 10, D = 2, K = 2), built by hand: nothing is compiled
_EYES = np.stack([np.eye(2)] * 2)
_KV_STATE = lambda: kv.KnownVarianceGMMState(np.full((10, 2), 0.5), np.zeros((2, 2)),  # noqa: E731
                                             np.ones(2))
_BG_STATE = lambda: bg.BGMMState(np.full((10, 2), 0.5), np.ones(2), np.ones(2),  # noqa: E731
                                 np.zeros((2, 2)), np.full(2, 3.0), _EYES)
_DE_STATE = lambda: dirac_em.DiracEMState(np.full((10, 2), 0.5), np.full(2, 0.5),  # noqa: E731
                                          np.zeros((2, 2)), _EYES)
_NOT_STOCHASTIC = np.full((10, 2), 3.0)
_S0 = {"a": jnp.zeros(())}
_UPD = lambda s, d: {"a": 0.5 * s["a"] + d}  # noqa: E731
_EL = lambda s, d: -(s["a"] - 2.0 * d) ** 2  # noqa: E731

_MF_BAD = {  # name: (exception, pattern naming the argument, call)
    "bg.init int seed": (TypeError, "rng_key", lambda: bg.init(0, _X_OK, 2, _BG_PRIOR)),
    "kv.init int seed": (TypeError, "rng_key", lambda: kv.init(0, _X_OK, 2, _KV_PRIOR)),
    "dirac.init int seed": (TypeError, "rng_key", lambda: dirac_em.init(
        0, _X_OK, 2, dirac_em.flat_prior(2))),
    "bg.elbo resp": (ValueError, "state.responsibilities", lambda: bg.elbo(
        _BG_STATE()._replace(responsibilities=_NOT_STOCHASTIC), _X_OK, _BG_PRIOR)),
    "kv.elbo resp": (ValueError, "state.responsibilities", lambda: kv.elbo(
        _KV_STATE()._replace(responsibilities=_NOT_STOCHASTIC), _X_OK, _KV_PRIOR)),
    "dirac.elbo resp": (ValueError, "state.responsibilities", lambda: dirac_em.elbo(
        _DE_STATE()._replace(responsibilities=_NOT_STOCHASTIC), _X_OK, dirac_em.flat_prior(2))),
    "dirac.elbo weights": (ValueError, "state.weights", lambda: dirac_em.elbo(
        _DE_STATE()._replace(weights=np.array([0.9, 0.9])), _X_OK, dirac_em.flat_prior(2))),
    "bg.step dof": (ValueError, r"state.dof must be > D - 1", lambda: bg.step(
        _BG_STATE()._replace(dof=-np.ones(2)), _X_OK, _BG_PRIOR)),
    "bg.step scale_inv_tril": (ValueError, "state.scale_inv_tril", lambda: bg.step(
        _BG_STATE()._replace(scale_inv_tril=np.zeros((2, 2, 2))), _X_OK, _BG_PRIOR)),
    "dirac.step weights": (ValueError, "state.weights", lambda: dirac_em.step(
        (lambda s: s._replace(weights=-s.weights))(_DE_STATE()), _X_OK, dirac_em.flat_prior(2))),
    "kv.step variance": (ValueError, "state.variance", lambda: kv.step(
        _KV_STATE()._replace(variance=-np.ones(2)), _X_OK, _KV_PRIOR)),
    "bg.predict tuple": (TypeError, "state must be a BGMMState", lambda: bg.predict_responsibilities(
        tuple(_BG_STATE()), _X_OK)),
    "bg.expected_weights None": (TypeError, "state must be a BGMMState",
                                 lambda: bg.expected_weights(None)),
    "bg.expected_covariances None": (TypeError, "state must be a BGMMState",
                                     lambda: bg.expected_covariances(None)),
    "dirac.covariances None": (TypeError, "state must be a DiracEMState",
                               lambda: dirac_em.covariances(None)),
    "ng.exact_mu_marginal prior": (TypeError, "posterior must be a NormalGammaPosterior",
                                   lambda: ng.exact_mu_marginal(_NG_PRIOR)),
    "bg.statistics rows": (ValueError, "responsibilities must have shape", lambda: bg.statistics(
        np.full((5, 2), 0.5), _X_OK)),
    "bg.conjugate_update dim": (ValueError, "prior.loc", lambda: bg.conjugate_update(
        bg.Statistics(np.ones(2), np.zeros((2, 2)), np.zeros((2, 2)), _EYES),
        dirac_em.flat_prior(3))),
    "dirac.flat_prior dim float": (TypeError, "dim", lambda: dirac_em.flat_prior(2.0)),
    "dirac.flat_prior int dtype": (TypeError, "dtype", lambda: dirac_em.flat_prior(2, int)),
    "cavi max_iter float": (TypeError, "max_iter", lambda: meanfield.cavi(
        [_UPD], _S0, 1.0, elbo_fn=_EL, max_iter=10.0)),
    "bg.fit max_iter float": (TypeError, "max_iter", lambda: bg.fit(
        _BG_STATE(), _X_OK, _BG_PRIOR, max_iter=10.0)),
    "kv.fit max_iter float": (TypeError, "max_iter", lambda: kv.fit(
        _KV_STATE(), _X_OK, _KV_PRIOR, max_iter=10.0)),
    "cavi update shape": (TypeError, r"update_fns\[0\] changes state\['a'\]", lambda: meanfield.cavi(
        [lambda s, d: {"a": jnp.zeros(2)}], _S0, 1.0, elbo_fn=_EL)),
    "cavi update dtype": (TypeError, r"update_fns\[0\] changes", lambda: meanfield.cavi(
        [_UPD], {"a": jnp.zeros((), jnp.int32)}, 1.0, elbo_fn=_EL)),
    "cavi second update structure": (TypeError, r"update_fns\[1\] must return", lambda:
                                     meanfield.cavi([_UPD, lambda s, d: None], _S0, 1.0,
                                                    elbo_fn=_EL)),
    "cavi int elbo": (TypeError, "elbo_fn must return a floating", lambda: meanfield.cavi(
        [lambda s, d: 0.5 * s], jnp.ones(()), None, elbo_fn=lambda s, d: 1, max_iter=4)),
    "sweep callable": (TypeError, "update_fns must be a sequence", lambda: meanfield.sweep(
        _UPD, _S0, 1.0)),
    "sweep None": (TypeError, r"update_fns\[0\] must be a callable", lambda: meanfield.sweep(
        [None], _S0, 1.0)),
}


@pytest.mark.parametrize("name", sorted(_MF_BAD))
def test_bad_state_and_driver_arguments_raise_naming_them(name):
    error, pattern, call = _MF_BAD[name]
    with pytest.raises(error, match=pattern):
        call()


def test_known_variance_responsibilities_in_float32_with_a_huge_prior_variance(x64):
    """init sets every s_k^2 to the prior variance (1e8 here): D s_k^2 / 2 then dominated
    log rho in float32 and its rounding (ulp 4-8) swamped the x . m_k differences, and
    exp(l - logsumexp(l)) gave rows summing to 2. The update now uses eq. 17's
    k-dependent part only; float32 matches float64."""
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.normal(size=(60, 2)) - 0.5, rng.normal(size=(60, 2)) + 0.5])
    resp = {}
    for dtype in (np.float32, np.float64):
        prior = kv.KnownVarianceGMMPrior(prior_variance=jnp.asarray(1e8, dtype),
                                         noise_variance=jnp.asarray(1.0, dtype))
        state = kv.init(jax.random.key(3), jnp.asarray(x, dtype), 2, prior)
        state = kv.update_responsibilities(state, jnp.asarray(x, dtype), prior)
        resp[dtype] = np.asarray(state.responsibilities, np.float64)
    np.testing.assert_allclose(resp[np.float32].sum(axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(resp[np.float32], resp[np.float64], atol=1e-4)


def test_dirac_em_elbo_with_a_zero_weight_is_the_log_likelihood_of_the_rest(x64):
    """A weight of 0 is a valid theta_0; 0 * log 0 terms (r log rho where rho = 0, and
    (alpha_0 - 1) log pi_k under the flat prior) count as 0. With q(Z) on component 0 and
    pi = (1, 0) the ELBO is sum_n log N(x_n | mu_0, Sigma_0) (the flat prior adds 0)."""
    x = np.random.default_rng(0).normal(size=(20, 2))
    prior = dirac_em.flat_prior(2, jnp.float64)
    state = dirac_em.init(jax.random.key(0), jnp.asarray(x), 2, prior)
    state = state._replace(weights=jnp.array([1.0, 0.0]),
                           responsibilities=jnp.tile(jnp.array([1.0, 0.0]), (20, 1)))
    cov = np.asarray(state.covariance_tril[0] @ state.covariance_tril[0].T)
    expected = stats.multivariate_normal(np.asarray(state.loc[0]), cov).logpdf(x).sum()
    np.testing.assert_allclose(float(dirac_em.elbo(state, jnp.asarray(x), prior)), expected,
                               rtol=1e-12)


def test_dirac_em_init_refuses_a_start_with_non_finite_parameters(x64):
    """Five copies of one point and one other point, K = 2: whenever two copies are drawn as
    centres, one component is left one distinct point and the flat-prior M-step gives NaN
    parameters; init says so instead of returning them."""
    x = jnp.asarray([[0.0, 0.0]] * 5 + [[1.0, 2.0]])
    prior = dirac_em.flat_prior(2, jnp.float64)
    refused = 0
    for seed in range(8):
        try:
            state = dirac_em.init(jax.random.key(seed), x, 2, prior)
        except ValueError as err:
            assert "non-finite parameters" in str(err) and "num_components" in str(err)
            refused += 1
        else:
            assert all(np.all(np.isfinite(np.asarray(v))) for v in state)
    assert refused > 0  # C(5, 2) / C(6, 2) = 2/3 of the draws pick two copies


def test_bool_prior_fields_and_default_prior_with_n_at_most_d_raise():
    with pytest.raises(TypeError, match="rate.*bool"):
        ng.init(jnp.ones(3), ng.NormalGammaPrior(0.0, 1.0, 1.0, True))
    with pytest.raises(ValueError, match="more rows than columns.*N = 3, D = 3"):
        bg.default_prior(np.random.default_rng(0).normal(size=(3, 3)), 2)


@pytest.mark.parametrize("offset", [1e3, 1e5])
def test_bgmm_float32_elbo_is_accurate_far_from_the_origin(x64, offset):
    """The Bayesian GMM's ELBO of a float32 state and data equals the float64 evaluation of
    the same numbers to 5e-7 relative: the Mahalanobis terms are taken about the mean of the
    component locations (about the origin: 1.2e-6 at offset 1e3, 2.4e-4 at 1e5)."""
    rng = np.random.default_rng(0)
    x = jnp.asarray((np.concatenate([rng.normal(size=(200, 2)) * 0.5 - 2,
                                     rng.normal(size=(200, 2)) * 0.5 + 2]) + offset
                     ).astype(np.float32))
    prior = bg.default_prior(x, 2)
    state = bg.fit(bg.init(jax.random.key(0), x, 2, prior), x, prior, max_iter=20)[0]
    as64 = lambda tree: jax.tree.map(lambda a: a.astype(jnp.float64), tree)  # noqa: E731
    e32 = float(bg.elbo(state, x, prior))
    e64 = float(bg.elbo(as64(state), x.astype(jnp.float64), as64(prior)))
    assert abs(e32 - e64) <= 5e-7 * abs(e64), (e32, e64)
