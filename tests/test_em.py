"""Tests for vijax.em (Gaussian mixtures by EM).

References: scikit-learn's GaussianMixture run from the same initial parameters, scipy's
multivariate normal densities, the ELBO/KL identity of the "LVM blog post" ("Expectation
Maximization"), the M-step's closed form as a maximiser (perturbations lower the ELBO), and
Monte Carlo moments with tolerances from their standard errors.
"""

from __future__ import annotations

import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture

from vijax import em

COV_TYPES = {"full": em.Full(), "diag": em.Diag(), "spherical": em.Spherical()}

# Most tests share one problem size so that each compiled program is reused across tests;
# CHUNK leaves a 44-row remainder, so the streamed path (loop + last chunk) is always exercised.
N, DIM, K, CHUNK, ITERS = 300, 3, 3, 128, 60

# Compiled once per static configuration (eager calls would compile every loop body again);
# eager calls are exercised by the input-checking tests.
_init_jit = jax.jit(em.init, static_argnames=("num_components", "covariance_type",
                                              "init_method", "chunk_size"))
_step = jax.jit(em.step, static_argnames=("chunk_size",))
_m_step = jax.jit(em.m_step, static_argnames=("chunk_size",))
_fit_from_state = jax.jit(em.fit_from_state, static_argnames=("max_iter", "chunk_size"))
_predict_proba = jax.jit(em.predict_proba)
_log_likelihood = jax.jit(em.log_likelihood)
_log_joint = jax.jit(em.log_joint)
_elbo = jax.jit(em.elbo)
_sample = jax.jit(em.sample, static_argnums=2)


def _strict():
    return jax.numpy_rank_promotion("raise")


def _init(rng_key, x, num_components=K, *, covariance_type=em.Full(),
          init_method=em.KMeansPlusPlus(), reg_covar=1e-6, chunk_size=CHUNK):
    """``em.init`` compiled, with every static argument passed the same way (one cache key
    per configuration)."""
    return _init_jit(rng_key, x, num_components, covariance_type=covariance_type,
                     init_method=init_method, reg_covar=reg_covar, chunk_size=chunk_size)


def _blobs(seed: int, n: int = N, dim: int = DIM, k: int = K) -> np.ndarray:
    """Anisotropic clusters of unequal sizes (float64)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, dim)) * 3.0
    labels = rng.choice(k, size=n, p=np.arange(1, k + 1) / (k * (k + 1) / 2))
    scales = rng.uniform(0.3, 1.2, size=(k, dim, dim))
    noise = np.einsum("nd,nde->ne", rng.normal(size=(n, dim)), scales[labels])
    return centers[labels] + noise


def _sklearn_from_state(state: em.GMMState, name: str, **kwargs) -> GaussianMixture:
    """A GaussianMixture whose initial parameters are those of ``state``."""
    u = np.asarray(state.precision_cholesky, np.float64)
    precisions = np.einsum("kij,klj->kil", u, u) if name == "full" else u**2
    weights = np.asarray(state.weights, np.float64)
    return GaussianMixture(
        n_components=state.means.shape[0], covariance_type=name,
        weights_init=weights / weights.sum(),  # float32 weights sum to 1 only to ~1e-7
        means_init=np.asarray(state.means, np.float64),
        precisions_init=precisions, **kwargs,
    )


def _fit_sklearn(gm: GaussianMixture, x: np.ndarray) -> GaussianMixture:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return gm.fit(x)


def _dense_covariances(state: em.GMMState) -> np.ndarray:
    """The state's covariances as ``[K, D, D]`` float64 matrices."""
    d = state.means.shape[-1]
    cov = np.asarray(state.covariances, np.float64)
    if cov.ndim == 1:
        return cov[:, None, None] * np.eye(d)
    if cov.ndim == 2:
        return np.stack([np.diag(c) for c in cov])
    return cov


def _scipy_log_joint(state: em.GMMState, x: np.ndarray) -> np.ndarray:
    """log pi_k + log N(x | mu_k, Sigma_k) with scipy, ``[N, K]`` float64."""
    k = state.means.shape[0]
    cov = _dense_covariances(state)
    return np.stack([
        np.log(float(state.weights[j]))
        + stats.multivariate_normal(np.asarray(state.means[j], np.float64), cov[j]).logpdf(x)
        for j in range(k)
    ], axis=-1)


# ------------------------------------------------------------------------------------------
# 1. Monotone log-likelihood; ELBO = log-likelihood after the E-step (KL = 0)
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(COV_TYPES))
def test_log_likelihood_never_decreases(x64, name):
    """EM is ascent on log p(X | theta) (PRML §9.4). The ``reg_covar`` floor makes each M-step
    maximise a slightly different, q-dependent objective, so the guarantee is for a negligible
    floor (1e-10): monotone to rounding (1e-12 nats). With the default 1e-6 the trace can dip
    by up to ~reg_covar near the fixed point; there it must equal scikit-learn's trace."""
    for seed in range(3):
        x = jnp.asarray(_blobs(seed))
        for init_method in (em.KMeansPlusPlus(), em.RandomResponsibilities()):
            for reg_covar in (1e-10, 1e-6):
                with _strict():
                    state0 = _init(jax.random.key(seed), x, K, covariance_type=COV_TYPES[name],
                                   init_method=init_method, reg_covar=reg_covar,
                                   chunk_size=CHUNK)
                    _, info = _fit_from_state(state0, x, max_iter=ITERS, tol=0.0,
                                              chunk_size=CHUNK)
                trace = np.asarray(info.log_likelihood)
                assert trace.shape == (ITERS,) and np.all(np.isfinite(trace))
                assert trace[-1] - trace[0] > 1e-3  # it did climb
                if reg_covar == 1e-10:
                    assert np.min(np.diff(trace)) >= -1e-12, (seed, init_method)
                else:
                    gm = _fit_sklearn(_sklearn_from_state(state0, name, max_iter=ITERS, tol=0.0),
                                      np.asarray(x))
                    np.testing.assert_allclose(trace, gm.lower_bounds_, rtol=1e-8)


@pytest.mark.parametrize("name", list(COV_TYPES))
def test_elbo_equals_log_likelihood_after_e_step(x64, name):
    x_np = _blobs(1)
    x = jnp.asarray(x_np)
    state = _init(jax.random.key(0), x, K, covariance_type=COV_TYPES[name], chunk_size=CHUNK)
    state, _ = _step(state, x, chunk_size=CHUNK)  # some non-initial parameters
    with _strict():
        resp = _predict_proba(state, x)
        elbo_at_posterior = _elbo(state, x, resp)
        mean_ll = jnp.mean(_log_likelihood(state, x))
    assert resp.shape == (N, K) and elbo_at_posterior.shape == ()
    # log-likelihood from scipy densities (independent of vijax's Cholesky formulation)
    ll_ref = np.mean(np.logaddexp.reduce(_scipy_log_joint(state, x_np), axis=-1))
    np.testing.assert_allclose(float(mean_ll), ll_ref, rtol=1e-12)
    np.testing.assert_allclose(float(elbo_at_posterior), ll_ref, rtol=1e-12)  # KL = 0
    # Any other q: ELBO = log-likelihood - mean KL(q || posterior), KL computed with scipy.
    q = jax.random.dirichlet(jax.random.key(3), jnp.ones(K, jnp.float64), (N,))
    log_post = _scipy_log_joint(state, x_np)
    log_post -= np.logaddexp.reduce(log_post, axis=-1, keepdims=True)
    kl = np.mean(np.sum(np.asarray(q) * (np.log(np.asarray(q)) - log_post), axis=-1))
    assert kl > 1e-2
    np.testing.assert_allclose(float(_elbo(state, x, q)), ll_ref - kl, rtol=1e-12)


@pytest.mark.parametrize("name", list(COV_TYPES))
def test_m_step_maximises_elbo_for_fixed_q(x64, name):
    """The closed-form M-step is argmax_theta L(q, theta): perturbing it lowers the ELBO."""
    x = jnp.asarray(_blobs(2))
    state = _init(jax.random.key(0), x, K, covariance_type=COV_TYPES[name], reg_covar=1e-12,
                  chunk_size=CHUNK)
    q = jax.random.dirichlet(jax.random.key(1), jnp.ones(K, jnp.float64), (N,))
    with _strict():
        best = _m_step(state, x, q, chunk_size=CHUNK)
        best_elbo = float(_elbo(best, x, q))
    assert best_elbo > float(_elbo(state, x, q))
    assert int(best.iteration) == int(state.iteration)
    rng = np.random.default_rng(0)
    for trial in range(6):
        w = np.asarray(best.weights) * np.exp(0.05 * rng.normal(size=K))
        means = np.asarray(best.means) + 0.05 * rng.normal(size=best.means.shape)
        cov = np.asarray(best.covariances) * (np.exp(0.05 * rng.normal()) if trial % 2 else 1.0)
        perturbed = em.state_from_parameters(w / w.sum(), means, cov,
                                             covariance_type=COV_TYPES[name])
        assert float(_elbo(perturbed, x, q)) < best_elbo


# ------------------------------------------------------------------------------------------
# 2. Agreement with scikit-learn's GaussianMixture from the same initial parameters
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(COV_TYPES))
def test_agrees_with_sklearn_gaussian_mixture(x64, name):
    x_np = _blobs(4)
    x = jnp.asarray(x_np)
    state0 = _init(jax.random.key(5), x, K, covariance_type=COV_TYPES[name], chunk_size=CHUNK)
    with _strict():
        state, info = _fit_from_state(state0, x, max_iter=ITERS, tol=0.0, chunk_size=CHUNK)
    gm = _fit_sklearn(_sklearn_from_state(state0, name, max_iter=ITERS, tol=0.0), x_np)
    assert int(info.num_iterations) == gm.n_iter_ == ITERS and int(state.iteration) == ITERS
    np.testing.assert_allclose(np.asarray(info.log_likelihood), gm.lower_bounds_, rtol=1e-8)
    for ours, theirs in [(state.weights, gm.weights_), (state.means, gm.means_),
                         (state.covariances, gm.covariances_),
                         (state.precision_cholesky, gm.precisions_cholesky_)]:
        np.testing.assert_allclose(np.asarray(ours), theirs, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(_predict_proba(state, x)), gm.predict_proba(x_np),
                               atol=1e-8)
    np.testing.assert_allclose(np.asarray(_log_likelihood(state, x)), gm.score_samples(x_np),
                               rtol=1e-10)


def test_agrees_with_sklearn_in_higher_dimension(x64):
    """D >= 4 takes the component-major scatter layout of the full-covariance M-step."""
    x_np = _blobs(15, dim=6)
    x = jnp.asarray(x_np)
    state0 = _init(jax.random.key(0), x, K)
    with _strict():
        state, info = _fit_from_state(state0, x, max_iter=ITERS, tol=0.0, chunk_size=CHUNK)
    gm = _fit_sklearn(_sklearn_from_state(state0, "full", max_iter=ITERS, tol=0.0), x_np)
    np.testing.assert_allclose(np.asarray(info.log_likelihood), gm.lower_bounds_, rtol=1e-8)
    np.testing.assert_allclose(np.asarray(state.covariances), gm.covariances_, rtol=1e-6,
                               atol=1e-6)
    np.testing.assert_allclose(np.asarray(state.means), gm.means_, rtol=1e-6, atol=1e-6)


def test_stopping_rule_matches_sklearn(x64):
    x_np = _blobs(6)
    state0 = _init(jax.random.key(0), jnp.asarray(x_np), K, chunk_size=CHUNK)
    state, info = _fit_from_state(state0, jnp.asarray(x_np), max_iter=ITERS, tol=1e-4,
                                  chunk_size=CHUNK)
    gm = _fit_sklearn(_sklearn_from_state(state0, "full", max_iter=ITERS, tol=1e-4), x_np)
    n = int(info.num_iterations)
    assert bool(info.converged) and gm.converged_ and n == gm.n_iter_ and 2 < n < ITERS
    assert np.all(np.isnan(np.asarray(info.log_likelihood)[n:]))
    np.testing.assert_allclose(np.asarray(info.log_likelihood)[:n], gm.lower_bounds_, rtol=1e-8)
    np.testing.assert_allclose(float(state.last_log_likelihood), gm.lower_bound_, rtol=1e-8)
    np.testing.assert_allclose(np.asarray(state.means), gm.means_, atol=1e-6)


def test_old_faithful_matches_sklearn(x64, old_faithful_csv):
    data = np.loadtxt(old_faithful_csv, delimiter=",", skiprows=1)
    assert data.shape == (272, 2)
    x_np = (data - data.mean(0)) / data.std(0)
    # the start of experiments/gmm_em.py (PRML Fig. 9.8 style): unit covariances, means in
    # the empty corners
    state0 = em.state_from_parameters(np.array([0.5, 0.5]), np.array([[-1.0, 1.0], [1.5, -1.0]]),
                                      np.stack([np.eye(2)] * 2))
    state, info = _fit_from_state(state0, jnp.asarray(x_np), max_iter=ITERS, tol=1e-8,
                                  chunk_size=CHUNK)
    gm = _fit_sklearn(_sklearn_from_state(state0, "full", max_iter=ITERS, tol=1e-8), x_np)
    assert bool(info.converged) and int(info.num_iterations) == gm.n_iter_
    np.testing.assert_allclose(np.asarray(state.means), gm.means_, atol=1e-6)
    np.testing.assert_allclose(float(state.last_log_likelihood), gm.lower_bound_, rtol=1e-10)
    # the two eruption regimes: short/short-wait and long/long-wait
    assert np.sign(np.asarray(state.means)).tolist() in ([[-1, -1], [1, 1]], [[1, 1], [-1, -1]])


# ------------------------------------------------------------------------------------------
# dtypes, jit, vmap, batches
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(COV_TYPES))
def test_float32_in_float32_out_and_close_to_float64(name):
    x_np = _blobs(7)
    x32 = jnp.asarray(x_np, jnp.float32)
    with _strict():
        state0 = _init(jax.random.key(0), x32, K, covariance_type=COV_TYPES[name],
                       chunk_size=CHUNK)
        state, info = _fit_from_state(state0, x32, max_iter=ITERS, tol=0.0, chunk_size=CHUNK)
    arrays = (*state[:4], state.last_log_likelihood, state.reg_covar, info.log_likelihood)
    if name == "full":
        with _strict():
            arrays += (_predict_proba(state, x32), _log_likelihood(state, x32),
                       _sample(jax.random.key(1), state, 7)[0])
    assert all(a.dtype == jnp.float32 for a in arrays)
    assert state.iteration.dtype == jnp.int32
    shape = COV_TYPES[name].covariance_shape(K, DIM)
    assert state.covariances.shape == state.precision_cholesky.shape == shape
    # float64 sklearn from the float32 run's start agrees to float32 accuracy
    gm = _fit_sklearn(_sklearn_from_state(state0, name, max_iter=ITERS, tol=0.0), x_np)
    np.testing.assert_allclose(np.asarray(info.log_likelihood), gm.lower_bounds_, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(state.means), gm.means_, atol=1e-3)


def test_jit_does_not_retrace(x64):
    x = jnp.asarray(_blobs(8))
    traces = []

    def counted_step(state, x):
        traces.append(1)
        return em.step(state, x, chunk_size=CHUNK)

    jitted = jax.jit(counted_step)
    state = _init(jax.random.key(0), x, K, chunk_size=CHUNK)
    s1, i1 = jitted(state, x)
    s2, i2 = jitted(s1, x + 0.1)  # new values, same shapes: no new trace
    assert len(traces) == 1 and jitted._cache_size() == 1
    assert int(s2.iteration) == 2 and np.isfinite(float(i2.log_likelihood))
    # the module-level compiled programs are not recompiled for new values either
    for fn, args in [(_fit_from_state, lambda s: (s, x * 2.0)), (_predict_proba, lambda s: (s, x)),
                     (_log_likelihood, lambda s: (s, x - 1.0))]:
        kwargs = {"max_iter": ITERS, "chunk_size": CHUNK} if fn is _fit_from_state else {}
        fn(*args(state), **kwargs)
        size = fn._cache_size()
        fn(*args(s2), **kwargs)
        assert fn._cache_size() == size
    # the whole fit, jitted as docs/em.md section 3 recommends: one compilation for new data
    fit = jax.jit(em.fit, static_argnames=("num_components", "covariance_type", "init_method",
                                           "max_iter", "chunk_size"))
    for key, data in ((jax.random.key(1), x), (jax.random.key(2), x * 1.5 - 0.3)):
        fitted, _ = fit(key, data, num_components=K, max_iter=ITERS, chunk_size=CHUNK)
        assert fitted.means.shape == (K, DIM)
    assert fit._cache_size() == 1


_BATCHED = {  # name: f(state, x, q, key) for a single member; run vmapped over 3 states
    "m_step": lambda s, x, q, key: em.m_step(s, x, q, chunk_size=CHUNK).means,
    "elbo": lambda s, x, q, key: em.elbo(s, x, q),
    "log_joint": lambda s, x, q, key: em.log_joint(s, x),
    "dense_covariances": lambda s, x, q, key: em.dense_covariances(s),
    "state_from_parameters": lambda s, x, q, key: em.state_from_parameters(
        s.weights, s.means, s.covariances).precision_cholesky,
    "sample": lambda s, x, q, key: em.sample(key, s, 5)[0],
    "init": lambda s, x, q, key: em.init(key, x + s.means[0, 0], K, chunk_size=CHUNK).means,
}


@pytest.mark.parametrize("name", sorted(_BATCHED))
def test_public_functions_jit_vmap_match_unbatched_and_do_not_retrace(x64, name):
    """Each public function under ``jit(vmap)`` over three states (and keys) equals the
    unbatched calls member by member; a second call with new values does not recompile."""
    fn = _BATCHED[name]
    x = jnp.asarray(_blobs(12))
    keys = jax.random.split(jax.random.key(3), 3)
    states = jax.vmap(lambda key: _init(key, x))(keys)
    qs = jax.vmap(lambda s: em.predict_proba(s, x))(states)
    batched = jax.jit(jax.vmap(fn, (0, None, 0, 0)))
    with _strict():
        out = batched(states, x, qs, keys)
    for b in range(3):
        member = jax.tree.map(lambda v: v[b], (states, qs, keys))
        single = fn(member[0], x, member[1], member[2])
        assert out[b].shape == single.shape and out[b].dtype == single.dtype
        np.testing.assert_allclose(out[b], single, rtol=1e-9, atol=1e-12)
    with _strict():
        batched(states, x + 0.5, qs, jax.random.split(jax.random.key(4), 3))
    assert batched._cache_size() == 1


def test_vmap_over_restarts_equals_loop(x64):
    x = jnp.asarray(_blobs(9))
    keys = jax.random.split(jax.random.key(0), 4)

    def fit(key):
        return em.fit(key, x, K, max_iter=ITERS, tol=1e-6, chunk_size=CHUNK)

    with _strict():
        states, infos = jax.jit(jax.vmap(fit))(keys)
    assert states.means.shape == (4, K, DIM) and infos.log_likelihood.shape == (4, ITERS)
    assert states.covariance_type == em.Full() and infos.converged.shape == (4,)
    for r in range(4):
        single = _init(keys[r], x, K, chunk_size=CHUNK)
        single, info = _fit_from_state(single, x, max_iter=ITERS, tol=1e-6, chunk_size=CHUNK)
        assert int(infos.num_iterations[r]) == int(info.num_iterations)
        np.testing.assert_allclose(np.asarray(states.means[r]), np.asarray(single.means),
                                   rtol=1e-9, atol=1e-12)
    # k-means++ seeds differ between restarts, so the starting log-likelihoods do too
    assert np.ptp(np.asarray(infos.log_likelihood[:, 0])) > 0


def test_vmap_over_datasets_and_batched_inputs(x64):
    xs = jnp.stack([jnp.asarray(_blobs(s)) for s in (10, 11)])
    states = jax.jit(jax.vmap(lambda x: em.init(jax.random.key(0), x, K, chunk_size=CHUNK)))(xs)
    new_states, infos = jax.jit(jax.vmap(lambda s, x: em.step(s, x, chunk_size=CHUNK)))(states, xs)
    assert new_states.means.shape == (2, K, DIM) and infos.component_counts.shape == (2, K)
    np.testing.assert_allclose(np.asarray(infos.component_counts.sum(-1)), [N, N], rtol=1e-12)
    for b in range(2):  # each batch member is the unbatched step on its own data set
        single, _ = _step(jax.tree.map(lambda a: a[b], states), xs[b], chunk_size=CHUNK)
        np.testing.assert_allclose(np.asarray(new_states.covariances[b]),
                                   np.asarray(single.covariances), rtol=1e-10)
    # predict_proba / log_likelihood / log_joint accept any leading batch shape [..., D]
    state = jax.tree.map(lambda a: a[0], new_states)
    grid = jnp.asarray(np.random.default_rng(0).normal(size=(4, 5, DIM)))
    with _strict():
        lj, pp, ll = (_log_joint(state, grid), _predict_proba(state, grid),
                      _log_likelihood(state, grid))
    assert lj.shape == pp.shape == (4, 5, K) and ll.shape == (4, 5)
    ref = _scipy_log_joint(state, np.asarray(grid).reshape(-1, DIM))
    np.testing.assert_allclose(np.asarray(lj).reshape(-1, K), ref, rtol=1e-12)
    np.testing.assert_allclose(np.asarray(ll).ravel(), np.logaddexp.reduce(ref, -1), rtol=1e-12)
    np.testing.assert_allclose(np.asarray(pp.sum(-1)), 1.0, rtol=1e-12)


def test_chunking_does_not_change_the_step(x64):
    x = jnp.asarray(_blobs(12))
    state = _init(jax.random.key(0), x, K, chunk_size=CHUNK)
    ref, ref_info = _step(state, x, chunk_size=N)  # one block
    for chunk in (1, CHUNK):
        out, info = _step(state, x, chunk_size=chunk)
        np.testing.assert_allclose(np.asarray(out.covariances), np.asarray(ref.covariances),
                                   rtol=1e-11)
        np.testing.assert_allclose(float(info.log_likelihood), float(ref_info.log_likelihood),
                                   rtol=1e-13)


@pytest.mark.parametrize("dim", [8, 32])  # packed-feature layout, blocked whitened layout
def test_one_pass_chunk_products_contract_the_last_axis_of_their_left_operand(x64, dim):
    """The one-pass chunk loop stores r^T and (x - c)^T (em._transposed) so that every
    product in it contracts the left operand's last axis: XLA:CPU runs a product contracting
    the leading axis as an Eigen dot at about half the speed of a YNNPACK product
    (docs/em.md, section 4). Checked on the compiled program: a structural check, no timing."""
    x = jnp.asarray(np.random.default_rng(0).normal(size=(1000, dim)))
    state = _init(jax.random.key(0), x, K)
    step = jax.jit(lambda state, x: em.step(state, x, chunk_size=50))  # a 20-chunk loop
    text = step.lower(state, x).compile().as_text()
    loop_dots = [line for line in text.splitlines()
                 if " dot(" in line and "/while/body/" in line and "/cond/" not in line]
    assert len(loop_dots) >= 3, loop_dots  # E-step product(s), first moment, scatter(s)
    leading = [line for line in loop_dots if re.search(r"lhs_contracting_dims=\{0\}", line)]
    assert not leading, leading


# (dim, distance of the cluster centres, whether the one-pass step's accuracy bound admits it)
@pytest.mark.parametrize("dim, distance, one_pass", [
    (3, 10.0, True), (32, 5.0, True),  # packed-feature layout, and the blocked whitened one
    (3, 30.0, False), (32, 30.0, False),  # beyond em._ONE_PASS_MAX_RISK: the centred route
])
def test_float64_step_is_accurate_for_tight_far_clusters(x64, dim, distance, one_pass):
    """The float64 full-covariance step reads x once and forms Sigma_k from uncentred sums
    (S_k / N_k - mu mu^T about the data mean), which costs ~||mu_k - c||^2 / lambda_min
    units of roundoff, and the packed quadratic form of the E-step (D <= 28) loses
    ~||x - c||^2_Lambda units in the squared distances. Where em.one_pass_risk bounds this
    below em._ONE_PASS_MAX_RISK (clusters of scale 0.05 at distance ~10 or ~5: ratios up to
    ~4e4) the one-pass result is kept; beyond it (distance ~30) the step is recomputed by the
    centred two passes. Either way it matches a centred scipy/numpy E+M step to 1e-8
    relative in log-likelihood (the sklearn-agreement tolerance) and 1e-9 in covariances."""
    rng = np.random.default_rng(3)
    k, n = 4, 2000
    centers = rng.normal(size=(k, dim)) * distance
    labels = rng.integers(0, k, size=n)
    x_np = centers[labels] + 0.05 * rng.normal(size=(n, dim)) @ rng.uniform(0.5, 1.5, (dim, dim))
    x = jnp.asarray(x_np)
    state = _init(jax.random.key(0), x, k, chunk_size=CHUNK)
    state, _ = _step(state, x, chunk_size=CHUNK)  # non-initial parameters
    _, risk = em._one_pass_full(state, x, CHUNK)
    assert (float(risk) <= em._ONE_PASS_MAX_RISK) == one_pass, float(risk)
    # reference: the textbook E-step with scipy densities and the centred M-step in numpy
    log_joint = _scipy_log_joint(state, x_np)
    log_norm = np.logaddexp.reduce(log_joint, axis=-1)
    resp = np.exp(log_joint - log_norm[:, None])
    counts = resp.sum(0) + 10 * np.finfo(np.float64).eps
    means = resp.T @ x_np / counts[:, None]
    covs = np.stack([(resp[:, j, None] * (x_np - means[j])).T @ (x_np - means[j]) / counts[j]
                     + 1e-6 * np.eye(dim) for j in range(k)])
    with _strict():
        out, info = _step(state, x, chunk_size=CHUNK)
    np.testing.assert_allclose(float(info.log_likelihood), log_norm.mean(), rtol=1e-8)
    np.testing.assert_allclose(np.asarray(out.weights), counts / counts.sum(), rtol=1e-9)
    np.testing.assert_allclose(np.asarray(out.means), means, rtol=1e-11, atol=1e-11)
    scale = np.abs(covs).max(axis=(1, 2), keepdims=True)
    assert np.max(np.abs(np.asarray(out.covariances) - covs) / scale) < 1e-9


def _duplicates_far_out(seed: int = 1) -> np.ndarray:
    """300 points of scale 1e4 plus 30 copies of (1e5, 1e5): a component collapses onto the
    copies (covariance reg_covar I) at ~1e5 from the data mean, a ratio ~1e16 that no
    uncentred float64 sum survives."""
    rng = np.random.default_rng(seed)
    return np.vstack([rng.normal(size=(300, 2)) * 1e4, np.tile([[1e5, 1e5]], (30, 1))])


def test_collapsed_component_far_from_the_mean_takes_the_centred_step(x64):
    """Regression: the one-pass sums alone give this data an indefinite covariance (NaN
    parameters after one step); the step detects it (em.one_pass_risk) and recomputes the
    iteration centred, so EM matches scikit-learn from the same parameters."""
    x_np = _duplicates_far_out()
    x = jnp.asarray(x_np)
    state = _init(jax.random.key(0), x, 2, chunk_size=CHUNK)
    (_, _, params), risk = em._one_pass_full(state, x, CHUNK)
    assert float(risk) > em._ONE_PASS_MAX_RISK or np.isnan(float(risk))
    one_pass_cov = np.asarray(params[2])
    assert np.min(np.linalg.eigvalsh(one_pass_cov)) < 0.5e-6  # the floor is reg_covar = 1e-6

    gm = _fit_sklearn(_sklearn_from_state(state, "full", max_iter=5, tol=0.0), x_np)
    with _strict():
        out, info = _fit_from_state(state, x, max_iter=5, tol=0.0, chunk_size=CHUNK)
    np.testing.assert_allclose(float(info.log_likelihood[-1]), gm.score(x_np), rtol=1e-8)
    order, sk_order = np.argsort(np.asarray(out.means)[:, 0]), np.argsort(gm.means_[:, 0])
    np.testing.assert_allclose(np.asarray(out.means)[order], gm.means_[sk_order], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(out.covariances)[order], gm.covariances_[sk_order],
                               rtol=1e-6, atol=1e-12)
    assert np.all(np.linalg.eigvalsh(np.asarray(out.covariances)) >= 1e-6 * (1 - 1e-9))


def test_vmapped_restarts_keep_the_accuracy_guard_a_branch(x64):
    """Under vmap the guard's flag is reduced over the batch (one `cond`, not a select that
    would run both routes for every restart); restarts equal their unbatched fits whether
    or not the centred route is taken."""
    x = jnp.asarray(_duplicates_far_out())
    keys = jax.random.split(jax.random.key(4), 3)

    def fit(key):
        return em.fit(key, x, 2, max_iter=8, chunk_size=CHUNK)

    jaxpr = str(jax.make_jaxpr(jax.vmap(lambda s: em.step(s, x, chunk_size=CHUNK)))(
        jax.vmap(lambda k: em.init(k, x, 2, chunk_size=CHUNK))(keys)))
    assert " cond[" in jaxpr
    batched, batched_info = jax.jit(jax.vmap(fit))(keys)
    for i, key in enumerate(keys):
        single, single_info = jax.jit(fit)(key)
        np.testing.assert_allclose(np.asarray(batched.covariances[i]),
                                   np.asarray(single.covariances), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(np.asarray(batched_info.log_likelihood[i]),
                                   np.asarray(single_info.log_likelihood), rtol=1e-12)
    assert np.all(np.isfinite(np.asarray(batched.covariances)))


@pytest.mark.parametrize("name", list(COV_TYPES))
def test_float32_step_is_accurate_for_data_far_from_the_origin(name):
    """Regression: float32 data at an offset of 1e6 (resolution 0.0625) with two unit
    clusters 20 apart. The E-step's first moments are summed about the data mean, so a
    jitted step from the true parameters keeps the means at the data's resolution and the
    log-likelihood from falling (before: one mean moved by 4.4 and the mean log-likelihood
    fell from -3.53 to -5.03). Reference: the same step in float64."""
    rng = np.random.default_rng(0)
    base = np.vstack([rng.normal(size=(500, 2)), rng.normal(size=(500, 2)) + 20.0])
    x32 = (base + 1e6).astype(np.float32)
    x64_np = x32.astype(np.float64)
    cov = {"full": np.stack([np.eye(2)] * 2), "diag": np.ones((2, 2)),
           "spherical": np.ones(2)}[name]

    def run(x, dtype):
        means = (np.array([[0.0, 0.0], [20.0, 20.0]]) + 1e6).astype(dtype)
        state = em.state_from_parameters(np.array([0.5, 0.5], dtype), means, cov.astype(dtype),
                                         covariance_type=COV_TYPES[name])
        return jax.jit(lambda s: em.fit_from_state(s, x, max_iter=4, tol=0.0))(state)

    out32, info32 = run(jnp.asarray(x32), np.float32)
    with jax.enable_x64(True):
        out64, info64 = run(jnp.asarray(x64_np), np.float64)
        means64, trace64 = np.asarray(out64.means), np.asarray(info64.log_likelihood)
    np.testing.assert_allclose(np.asarray(out32.means), means64, atol=0.07)  # ~1 ulp at 1e6
    np.testing.assert_allclose(np.asarray(info32.log_likelihood), trace64, atol=0.02)
    assert np.all(np.diff(np.asarray(info32.log_likelihood)) > -0.01)


# ------------------------------------------------------------------------------------------
# initialisation and sampling
# ------------------------------------------------------------------------------------------


def test_kmeans_plus_plus_finds_separated_clusters(x64):
    rng = np.random.default_rng(0)
    centers = np.array([[0.0, 0.0, 0.0], [30.0, 0.0, 0.0], [0.0, 30.0, 0.0]])
    labels = np.repeat([0, 1, 2], [50, 100, 150])
    x = jnp.asarray(centers[labels] + rng.normal(size=(N, DIM)))
    for seed in range(3):
        state = _init(jax.random.key(seed), x, K, chunk_size=CHUNK)
        order = np.argsort(np.asarray(state.means) @ np.array([1.0, 10.0, 0.0]))
        np.testing.assert_allclose(np.asarray(state.weights)[order], [1 / 6, 1 / 3, 1 / 2],
                                   atol=1e-12)
        np.testing.assert_allclose(np.asarray(state.means)[order], centers, atol=0.5)
        assert int(state.iteration) == 0 and float(state.last_log_likelihood) == -np.inf


def test_random_responsibilities_start_near_the_data_mean(x64):
    x_np = _blobs(13)
    state = _init(jax.random.key(0), jnp.asarray(x_np), K,
                  init_method=em.RandomResponsibilities(), chunk_size=CHUNK)
    np.testing.assert_allclose(np.asarray(state.weights), 1 / K, atol=0.05)
    # each mean is a randomly weighted average of the rows: within a few SE of the data mean
    se = x_np.std(0) / np.sqrt(N)
    assert np.all(np.abs(np.asarray(state.means) - x_np.mean(0)) < 4 * se)


@pytest.mark.parametrize("name", list(COV_TYPES))
def test_sample_moments_match_parameters(x64, name):
    weights = np.array([0.2, 0.5, 0.3])
    means = np.array([[0.0, 0.0], [4.0, 1.0], [-3.0, 2.0]])
    cov = {
        "full": np.array([[[1.0, 0.6], [0.6, 0.8]], [[0.5, -0.2], [-0.2, 0.3]],
                          [[2.0, 0.0], [0.0, 1.0]]]),
        "diag": np.array([[1.0, 0.8], [0.5, 0.3], [2.0, 1.0]]),
        "spherical": np.array([1.0, 0.5, 2.0]),
    }[name]
    state = em.state_from_parameters(weights, means, cov, covariance_type=COV_TYPES[name])
    n = 40_000
    with _strict():
        xs, zs = _sample(jax.random.key(0), state, n)
    assert xs.shape == (n, 2) and zs.shape == (n,) and zs.dtype == jnp.int32
    xs, zs = np.asarray(xs), np.asarray(zs)
    freq = np.bincount(zs, minlength=3) / n
    assert np.all(np.abs(freq - weights) < 5 * np.sqrt(weights * (1 - weights) / n))
    sigma = _dense_covariances(state)
    np.testing.assert_array_equal(np.asarray(jax.jit(em.dense_covariances)(state)), sigma)
    for k in range(3):
        xk = xs[zs == k]
        nk = len(xk)
        assert np.all(np.abs(xk.mean(0) - means[k]) < 5 * np.sqrt(np.diag(sigma[k]) / nk))
        # SE of a sample covariance entry: sqrt((S_ii S_jj + S_ij^2) / n)
        se_cov = np.sqrt((np.outer(np.diag(sigma[k]), np.diag(sigma[k])) + sigma[k] ** 2) / nk)
        assert np.all(np.abs(np.cov(xk.T) - sigma[k]) < 5 * se_cov)
    if name == "full":  # batched over keys
        xb, zb = jax.jit(jax.vmap(lambda k: em.sample(k, state, 5)))(
            jax.random.split(jax.random.key(1), 3))
        assert xb.shape == (3, 5, 2) and zb.shape == (3, 5)


# ------------------------------------------------------------------------------------------
# 4. Bad input
# ------------------------------------------------------------------------------------------


def test_bad_input_raises_naming_the_argument():
    x = np.random.default_rng(0).normal(size=(20, 2)).astype(np.float32)
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="`x`.*NaN or inf"):
        em.init(key, np.concatenate([x, [[np.nan, 0.0]]]).astype(np.float32), 2)
    with pytest.raises(ValueError, match="`x`.*NaN or inf"):
        em.fit(key, np.concatenate([x, [[0.0, np.inf]]]).astype(np.float32), 2)
    with pytest.raises(ValueError, match="`num_components`"):
        em.init(key, x[:3], 4)
    with pytest.raises(ValueError, match="`num_components`"):
        em.init(key, x, 0)
    with pytest.raises(TypeError, match="`num_components`"):
        em.init(key, x, 2.0)
    for bad in (0.0, -1e-3, float("nan")):
        with pytest.raises(ValueError, match="`reg_covar`"):
            em.fit(key, x, 2, reg_covar=bad)
    with pytest.raises(ValueError, match="`x`.*2-D"):
        em.init(key, x[:, 0], 2)
    with pytest.raises(ValueError, match="`x`.*2-D"):
        em.init(key, x[None], 2)
    for dtype in (np.int32, np.bool_, np.float16, jnp.bfloat16):
        with pytest.raises(TypeError, match="`x`.*float32 or float64"):
            em.init(key, np.ones((5, 2), dtype), 2)
    with pytest.raises(ValueError, match="`x`.*no columns"):
        em.fit(key, np.ones((20, 0), np.float32), 2)
    with pytest.raises(TypeError, match="`covariance_type`"):
        em.init(key, x, 2, covariance_type="full")
    with pytest.raises(TypeError, match="`init_method`"):
        em.init(key, x, 2, init_method="kmeans")
    state = em.state_from_parameters(np.ones(2, np.float32) / 2, x[:2], np.stack([np.eye(2)] * 2))
    for fn in (em.predict_proba, em.log_likelihood, em.log_joint):
        with pytest.raises(ValueError, match="`x`.*dimensionality 3"):
            fn(state, np.ones((4, 3), np.float32))
    with pytest.raises(ValueError, match="`x`.*dimensionality 3"):
        em.step(state, np.ones((4, 3), np.float32))
    with pytest.raises(ValueError, match="`x`.*NaN or inf"):
        em.step(state, np.concatenate([x, [[np.nan, 0.0]]]).astype(np.float32))
    with pytest.raises(ValueError, match="`max_iter`"):
        em.fit_from_state(state, x, max_iter=0)
    with pytest.raises(ValueError, match="`tol`"):
        em.fit_from_state(state, x, tol=-1.0)
    with pytest.raises(ValueError, match="`responsibilities`"):
        em.elbo(state, x, np.ones((20, 3), np.float32) / 3)
    for bad, match in ((np.full((20, 2), 0.3), "sum to 1"), (np.tile([1.5, -0.5], (20, 1)),
                                                             "non-negative")):
        for fn in (em.m_step, em.elbo):
            with pytest.raises(ValueError, match=f"`responsibilities`.*{match}"):
                fn(state, x, bad.astype(np.float32))
    # float64 responsibilities with a float32 state: results stay float32 (no dtype mixing)
    q64 = np.asarray(em.predict_proba(state, x), np.float64)
    assert em.m_step(state, x, q64).means.dtype == jnp.float32
    assert em.elbo(state, x, q64).dtype == jnp.float32
    with pytest.raises(ValueError, match="`num_samples`"):
        em.sample(key, state, 0)
    with pytest.raises(ValueError, match="`covariances`"):
        em.state_from_parameters(np.ones(2) / 2, np.zeros((2, 2)), np.ones((2, 3)),
                                 covariance_type=em.Diag())
    with pytest.raises(ValueError, match="`covariances`.*positive definite"):
        em.state_from_parameters(np.ones(2) / 2, np.zeros((2, 2)),
                                 np.stack([np.eye(2), -np.eye(2)]))
    with pytest.raises(ValueError, match="`weights`"):
        em.state_from_parameters(np.array([0.7, 0.7]), np.zeros((2, 2)), np.ones(2),
                                 covariance_type=em.Spherical())
    with pytest.raises(ValueError, match="`weights`"):
        em.state_from_parameters(np.ones(3) / 3, np.zeros((2, 2)), np.ones(2),
                                 covariance_type=em.Spherical())
    # arguments of the wrong kind: errors naming them, not numpy's or float()'s
    for bad in ("small", None, 1j):
        with pytest.raises(TypeError, match="`tol` must be a real number"):
            em.fit_from_state(state, x, tol=bad)
        with pytest.raises(TypeError, match="`reg_covar` must be a real number"):
            em.init(key, x, 2, reg_covar=bad)
    with pytest.raises(ValueError, match="`tol` must be a scalar"):
        em.fit_from_state(state, x, tol=[1e-3])
    with pytest.raises(ValueError, match=r"`x` \(a single point\) has NaN"):
        em.predict_proba(state, np.array([np.nan, 0.0], np.float32))
    with pytest.raises(ValueError, match=r"first at index \[\(0, 1\)\]"):
        em.log_likelihood(state, np.array([[[0.0, 0.0], [np.inf, 0.0]]], np.float32))


def test_weights_normalised_in_float32_are_accepted_in_float64(x64):
    """Weights normalised in float32 and passed with float64 means (sum off by ~1e-8 for
    K = 3000) are accepted and renormalised; a real error is refused with its size."""
    w = (np.ones(3000, np.float32) / 3000).astype(np.float64)
    assert abs(w.sum() - 1) > 1e-8  # the old tolerance (1e-10) refused this
    means, covs = np.zeros((3000, 2)), np.ones(3000)
    state = em.state_from_parameters(w, means, covs, covariance_type=em.Spherical())
    np.testing.assert_allclose(np.asarray(state.weights), np.full(3000, 1 / 3000), rtol=1e-14)
    with pytest.raises(ValueError, match=r"`weights`.*sum - 1 = \+(1e-05|9.99e-06)"):
        em.state_from_parameters(w * (1 + 1e-5), means, covs, covariance_type=em.Spherical())


def test_elbo_with_a_zero_weight_component_is_the_log_likelihood(x64):
    """Regression: with pi_k = 0 the log-joint of component k is -inf and q_nk = 0; the ELBO
    takes 0 log 0 = 0 there (it was NaN) and still equals the log-likelihood at q = p(z|x)."""
    x = jnp.asarray(_blobs(2)[:, :2])
    state = em.state_from_parameters(np.array([1.0, 0.0]), np.array([[0.0, 0.0], [1.0, 1.0]]),
                                     np.stack([np.eye(2)] * 2))
    q = em.predict_proba(state, x)
    np.testing.assert_array_equal(np.asarray(q[:, 1]), 0.0)
    reference = np.mean(stats.multivariate_normal(np.zeros(2), np.eye(2)).logpdf(np.asarray(x)))
    np.testing.assert_allclose(float(em.elbo(state, x, q)), reference, rtol=1e-12)
    np.testing.assert_allclose(float(jnp.mean(em.log_likelihood(state, x))), reference,
                               rtol=1e-12)


def test_kmeans_plus_plus_in_float32_far_from_the_origin():
    """Regression: the nearest-seed assignment used |x|^2 - 2 x.s + |s|^2, which cancels
    in float32 at an offset of 1e6 (two clusters of 500 got weights 0.81 / 0.19). Distances
    are translation invariant, so the partition must be the one found at offset 0."""
    rng = np.random.default_rng(0)
    base = np.vstack([rng.normal(size=(500, 2)), rng.normal(size=(500, 2)) + 20.0])
    for offset in (0.0, 1e6):
        x = jnp.asarray((base + offset).astype(np.float32))
        state = em.init(jax.random.key(1), x, 2)
        np.testing.assert_array_equal(np.sort(np.asarray(state.weights)), [0.5, 0.5])
        variances = np.diagonal(np.asarray(state.covariances), axis1=1, axis2=2)
        assert np.all(variances < 1.5), variances


def test_full_covariance_sampling_memory_is_linear_in_the_samples(x64):
    """Regression: the noise L_z eps was formed for every component ([S, K, D]) and the
    labels by the Gumbel trick ([S, K]); compiled temporaries for S = 1e6, K = 100, D = 10
    were 8 GB for an 80 MB output. Now O(S D): compile-time memory analysis, nothing run."""
    k, d, s = 100, 10, 1_000_000
    state = em.state_from_parameters(np.ones(k) / k, np.zeros((k, d)), np.stack([np.eye(d)] * k))
    compiled = _sample.lower(jax.random.key(0), state, s).compile()
    analysis = compiled.memory_analysis()
    if analysis is None:
        pytest.skip("this backend gives no memory analysis")
    assert analysis.temp_size_in_bytes < 8 * s * d * 8


def test_nan_check_is_skipped_under_tracing_but_shapes_are_not():
    x = jnp.asarray(_blobs(14), jnp.float32)
    state = em.state_from_parameters(np.ones(K, np.float32) / K, x[:K],
                                     np.stack([np.eye(DIM, dtype=np.float32)] * K))
    # under jit x is a tracer: its values are not inspected (no host transfer), NaN propagates
    out, info = _step(state, x.at[0, 0].set(jnp.nan), chunk_size=CHUNK)
    assert np.isnan(float(info.log_likelihood)) and not np.all(np.isfinite(np.asarray(out.means)))
    with pytest.raises(ValueError, match="`x`"):  # shapes are static: still checked
        _step(state, jnp.ones((N, DIM + 1), jnp.float32), chunk_size=CHUNK)


@pytest.mark.parametrize("call", ["init", "fit", "sample"])
def test_int_seed_is_refused_naming_rng_key(call):
    """An int seed used to reach JAX's 'invalid PRNG key data' error."""
    x = np.random.default_rng(0).normal(size=(20, 2)).astype(np.float32)
    state = em.state_from_parameters(np.ones(2, np.float32) / 2, x[:2], np.stack([np.eye(2)] * 2))
    fn = {"init": lambda: em.init(0, x, 2), "fit": lambda: em.fit(0, x, 2, max_iter=1),
          "sample": lambda: em.sample(0, state, 3)}[call]
    with pytest.raises(TypeError, match="rng_key must be a JAX PRNG key"):
        fn()
    assert {"OnePassSums", "one_pass_sums", "one_pass_risk", "e_step_sums",
            "scatter_sums"} <= set(em.__all__)  # the documented low-level kernels


def test_bad_state_fields_and_reg_covar_out_of_the_dtypes_range_raise():
    """A state field of the wrong shape would broadcast silently (weights [1] with K = 3);
    a reg_covar that under- or overflows the data's dtype would store 0 or inf."""
    x = np.random.default_rng(0).normal(size=(30, 2)).astype(np.float32)
    state = em.init(jax.random.key(0), x, 3)
    for field, bad in (("weights", np.ones(1, np.float32)),
                       ("covariances", np.ones((3, 2), np.float32)),
                       ("precision_cholesky", np.ones((3, 2, 3), np.float32)),
                       ("reg_covar", np.ones(3, np.float32))):
        broken = state._replace(**{field: bad})
        for call in (lambda s: em.predict_proba(s, x), lambda s: em.log_likelihood(s, x),
                     lambda s: em.step(s, x), lambda s: em.fit_from_state(s, x, max_iter=2),
                     lambda s: em.sample(jax.random.key(1), s, 4),
                     lambda s: em.dense_covariances(s)):
            with pytest.raises(ValueError, match=f"`state.{field}` must have shape"):
                call(broken)
    for bad in (1e-50, 1e39):  # 0 and inf in float32
        with pytest.raises(ValueError, match="`reg_covar`.*float32"):
            em.init(jax.random.key(0), x, 2, reg_covar=bad)


def test_float32_responsibilities_sum_to_one_beside_a_far_outlier(x64):
    """One outlier 1000 standard deviations away has log-joints of about -4.5e6 nats: there
    float32 rounds logsumexp by more than log 2, and exp(l - logsumexp(l)) gave that row
    responsibilities [1, 1] (the counts summed to 101.2 for N = 101 and the means moved by
    6). Normalised by the sum of the shifted exponentials, the float32 step matches the
    float64 one to float32 accuracy."""
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(size=(100, 2)) + np.repeat([[-3.0, 0.0], [3.0, 0.0]], 50, 0),
                        [[0.0, 3e3]]])
    results = {}
    for dtype in (np.float32, np.float64):
        state = em.state_from_parameters(np.array([0.5, 0.5], dtype),
                                         np.array([[-3.0, 0.0], [3.0, 0.0]], dtype),
                                         np.stack([np.eye(2, dtype=dtype)] * 2))
        new, info = jax.jit(em.step)(state, jnp.asarray(x, dtype))
        results[dtype] = (np.asarray(info.component_counts, np.float64),
                          np.asarray(new.means, np.float64))
    counts32, means32 = results[np.float32]
    counts64, means64 = results[np.float64]
    assert abs(counts64.sum() - 101) < 1e-9
    assert abs(counts32.sum() - 101) < 101 * 1e-5  # float32 rounding of 101 ones
    np.testing.assert_allclose(means32, means64, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("offset", [1e3, 1e5])
def test_float32_log_likelihood_is_accurate_far_from_the_origin(x64, offset):
    """log p(x_n) of float32 parameters and data, evaluated in float32, equals the float64
    evaluation of the same (float32-valued) numbers to 1e-5 nats: the expanded quadratic
    form is taken about the mixture mean, not the origin (about the origin it lost 5.6e-4
    nats at offset 1e3 and 4.3e-2 at 1e5)."""
    rng = np.random.default_rng(0)
    x = (np.concatenate([rng.normal(size=(200, 2)) * 0.5 - 2, rng.normal(size=(200, 2)) * 0.5 + 2])
         + offset).astype(np.float32)
    s32 = em.fit(jax.random.key(0), jnp.asarray(x), 2, max_iter=20)[0]
    s64 = jax.tree.map(lambda a: a.astype(jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating)
                       else a, s32)
    ll32 = np.asarray(em.log_likelihood(s32, jnp.asarray(x)), np.float64)
    ll64 = np.asarray(em.log_likelihood(s64, jnp.asarray(x, np.float64)))
    np.testing.assert_allclose(ll32, ll64, rtol=0, atol=1e-5)


def test_max_iter_is_bounded_because_the_trace_is_allocated_up_front():
    """Before, max_iter=10**9 allocated a 10^9-entry trace before the first iteration."""
    x = np.random.default_rng(0).normal(size=(20, 2)).astype(np.float32)
    with pytest.raises(ValueError, match=r"`max_iter` must be <= 1,000,000, got 2,000,000: the "
                                         r"per-iteration log-likelihood trace"):
        em.fit(jax.random.key(0), x, 2, max_iter=2_000_000)
    state = em.init(jax.random.key(0), x, 2)
    with pytest.raises(ValueError, match="`max_iter` must be <= 1,000,000"):
        em.fit_from_state(state, x, max_iter=em.MAX_ITER + 1)


def test_data_whose_squared_distances_overflow_is_refused():
    """Before, |x| ~ 1e19 in float32 returned non-finite parameters, converged=False and no
    error. The limit sqrt(max / (4 N D)) is the documented one; data just below it fit."""
    x = np.random.default_rng(0).normal(size=(40, 2)).astype(np.float32)
    with pytest.raises(ValueError, match=r"`x` has entries up to [0-9.]+e\+19 in absolute value: "
                                         r"EM's squared distances.*overflow float32"):
        em.fit(jax.random.key(0), x * np.float32(1e19), 2)
    limit = np.sqrt(float(np.finfo(np.float32).max) / (4 * 40 * 2))
    below = (x / np.abs(x).max() * np.float32(0.99 * limit)).astype(np.float32)
    state, info = em.fit(jax.random.key(0), below, 2)
    for leaf in (state.weights, state.means, state.covariances, info.log_likelihood[0]):
        assert np.isfinite(np.asarray(leaf)).all()
