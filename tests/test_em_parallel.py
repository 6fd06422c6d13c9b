"""EM and the Bayesian GMM's CAVI step with ``mesh=`` (rows split over 4 forced host CPU
devices) equal their one-device versions.

The device count is fixed when JAX initialises, so the checks run in a fresh interpreter
with ``XLA_FLAGS=--xla_force_host_platform_device_count=4`` (``run_on_host_devices``). The
subprocess has a time limit: a deadlock of the host devices (what LAPACK calls inside the
sharded program caused, see ``vijax/_linalg.py``) fails the test instead of hanging CI.
"""

from __future__ import annotations

import textwrap

import jax
import numpy as np
import pytest

from vijax import em


SCRIPT = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh
    jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_numpy_rank_promotion", "raise")
    from vijax import em

    assert jax.device_count() == 4, jax.devices()
    rng = np.random.default_rng(0)
    auto_mesh = Mesh(np.asarray(jax.devices()), ("rows",))   # automatic axes
    explicit_mesh = jax.make_mesh((2, 2), ("a", "b"))         # explicit axes, 2-D

    def blobs(n, d, dtype):
        centres = rng.normal(size=(3, d)) * 4.0
        x = centres[rng.integers(0, 3, size=n)] + rng.normal(size=(n, d))
        return jnp.asarray(x, dtype)

    def assert_close(tree_a, tree_b, rtol, atol):
        for a, b in zip(jax.tree.leaves(tree_a), jax.tree.leaves(tree_b)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol)

    cases = [  # (dtype, covariance type, N, D, also on the 2-D mesh and fit): one-pass (float64
               # full, both layouts), two-pass (float32 full, diag, spherical); N = 1001 and 203
               # need padding. Every route runs on the 1-D mesh; the 2-D mesh and the whole fit
               # (compile-heavy) once per route, which keeps the subprocess to about a minute.
        ("float64", em.Full(), 1000, 3, False), ("float64", em.Full(), 1001, 3, True),
        ("float64", em.Full(), 203, 30, True), ("float64", em.Diag(), 1001, 5, False),
        ("float32", em.Full(), 1001, 4, True), ("float32", em.Spherical(), 1000, 3, False),
    ]
    for dtype, cov, n, d, thorough in cases:
        x = blobs(n, d, dtype)
        state = em.init(jax.random.key(0), x, 3, covariance_type=cov)
        tight = dtype == "float64"
        rtol, atol = (1e-10, 1e-10) if tight else (2e-4, 2e-4)
        one = jax.jit(em.step)(state, x)
        for mesh in (auto_mesh, explicit_mesh) if thorough else (auto_mesh,):
            step = jax.jit(lambda s, x: em.step(s, x, mesh=mesh))
            assert_close(step(state, x), one, rtol, atol)
            step(one[0], x)
            assert step._cache_size() == 1  # a second call does not recompile
        # the sharded program all-reduces and calls no LAPACK kernel (lowered StableHLO: the
        # custom calls and collectives are there before compilation)
        hlo = step.lower(state, x).as_text()
        assert "all_reduce" in hlo and "lapack" not in hlo.lower(), (dtype, cov)
        if not thorough:
            print("case ok", dtype, type(cov).__name__, n, d, flush=True)
            continue
        # a whole fit inside one shard_map: same iterations, trace and parameters (float32: a
        # fixed number of iterations, since summation order can move a relative-tolerance stop
        # near convergence, where the change is a few ulps, by one iteration)
        fit_args = dict(max_iter=30, tol=1e-6) if tight else dict(max_iter=15, tol=0.0)
        fit_1 = em.fit_from_state(state, x, **fit_args)
        fit_4 = jax.jit(lambda s, x: em.fit_from_state(s, x, mesh=auto_mesh, **fit_args))(
            state, x)
        assert int(fit_4[1].num_iterations) == int(fit_1[1].num_iterations)
        assert_close(fit_4, fit_1, 10 * rtol, 10 * atol)
        print("case ok", dtype, type(cov).__name__, n, d, int(fit_1[1].num_iterations),
              flush=True)

    # fit(...) from a key, un-jitted, with the mesh
    x = blobs(999, 2, "float64")
    assert_close(em.fit(jax.random.key(1), x, 3, mesh=auto_mesh),
                 em.fit(jax.random.key(1), x, 3), 1e-9, 1e-9)
    print("EM-MESH-OK", flush=True)

    # the Bayesian GMM's CAVI step on the same meshes: float64 one-pass sweep (packed layout),
    # float32 centred two-pass sweep, with padding rows (N = 1001). One mesh per case (both
    # kinds of axes are covered, and the EM cases above run every route on both): each sharded
    # sweep is slow to compile. The blocked layout of D > 28 is em.one_pass_sums', run on the
    # mesh by the EM case at D = 30 (the sweep's own D = 30 program took 20 s to compile).
    from vijax.meanfield import bayesian_gmm as bg
    for dtype, n, d, mesh, thorough in [("float64", 1001, 5, explicit_mesh, True),
                                        ("float32", 1001, 4, auto_mesh, True)]:
        x = blobs(n, d, dtype)
        tol = 1e-10 if dtype == "float64" else 2e-4
        prior = bg.default_prior(x, 4)
        state = bg.init(jax.random.key(2), x, 4, prior)
        one = jax.jit(bg.step)(state, x, prior)
        two = jax.jit(bg.step)(one[0], x, prior)
        assert one[1].elbo.dtype == x.dtype
        step = jax.jit(lambda s, x: bg.step(s, x, prior, mesh=mesh))
        first = step(state, x)
        assert first[0].responsibilities.shape == (n, 4)
        assert_close(first, one, tol, tol)
        second = step(first[0], x)  # from a state with row-split responsibilities
        assert_close(second, two, tol, tol)
        compiled = step._cache_size()  # 2: the input shardings differ from the first call
        step(second[0], x)
        assert step._cache_size() == compiled  # steady state: no recompilation
        hlo = step.lower(state, x).as_text()  # lowered as above
        assert "all_reduce" in hlo and "lapack" not in hlo.lower(), (n, d)
        if not thorough:
            print("bgmm case ok", dtype, n, d, flush=True)
            continue
        # the whole CAVI loop on the mesh: same iterations, ELBO trace and state as the
        # one-device fit (float32: a fixed number of sweeps, since summation order could move
        # a relative-tolerance stop by one sweep)
        fit_args = dict(tol=1e-8, max_iter=40) if dtype == "float64" else dict(tol=0.0,
                                                                             max_iter=12)
        fit_1 = bg.fit(state, x, prior, **fit_args)
        fit_4 = jax.jit(lambda s, x: bg.fit(s, x, prior, mesh=mesh, **fit_args))(
            state, x)
        assert int(fit_4[1].num_iter) == int(fit_1[1].num_iter)
        assert_close(fit_4, fit_1, 10 * tol, 10 * tol)
        print("bgmm case ok", dtype, n, d, float(two[1].elbo), int(fit_1[1].num_iter),
              flush=True)
    print("BGMM-MESH-OK")
    """
)


@pytest.mark.slow  # started first (tests/conftest.py)
def test_em_on_4_host_devices_equals_one_device(run_on_host_devices):
    out = run_on_host_devices(SCRIPT, num_devices=4)
    assert "EM-MESH-OK" in out and "BGMM-MESH-OK" in out


def test_mesh_must_be_a_mesh(x64):
    x = np.random.default_rng(0).normal(size=(20, 2))
    state = em.init(jax.random.key(0), x, 2)
    with pytest.raises(TypeError, match="`mesh`"):
        em.step(state, x, mesh="cpu")
    with pytest.raises(TypeError, match="`mesh`"):
        em.fit_from_state(state, x, mesh=jax.devices())


def test_bgmm_mesh_errors(x64):
    from vijax.meanfield import bayesian_gmm as bg

    x = np.random.default_rng(0).normal(size=(30, 2))
    prior = bg.default_prior(x, 3)
    state = bg.init(jax.random.key(0), x, 3, prior)
    with pytest.raises(TypeError, match="`mesh`"):
        bg.step(state, x, prior, mesh=jax.devices())
    with pytest.raises(TypeError, match="`mesh`"):
        bg.fit(state, x, prior, mesh="cpu")
