"""Benchmark: vijax EM (and the Bayesian GMM CAVI step) against scikit-learn on the CPU.

For each dtype, dimension D and size N (K = 10 components, full covariances) this measures,
in one run and from the same initial parameters:

* per-iteration time of scikit-learn's ``GaussianMixture`` (one ``_e_step`` + ``_m_step``,
  exactly the body of its fit loop) and of ``jax.jit(vijax.em.step)``, with the default
  streamed chunks and, for reference, with the whole data as one block (``chunk_size=N``,
  the straightforward jitted formulation);
* per-iteration time of scikit-learn's ``BayesianGaussianMixture`` (``_e_step`` + ``_m_step``
  + ``_compute_lower_bound``) and of ``jax.jit(vijax.meanfield.bayesian_gmm.step)`` (one CAVI
  sweep plus its ELBO), both started from the same responsibilities and sklearn's default
  prior;
* time to convergence of ``GaussianMixture.fit`` and of ``jax.jit(vijax.em.fit_from_state)``
  with the same ``tol`` and ``max_iter`` (both iteration counts are printed: the comparison
  is only like for like where they agree, as in every recorded run);
* time to convergence of ``BayesianGaussianMixture.fit`` (started from the same
  responsibilities) and of ``jax.jit(vijax.meanfield.bayesian_gmm.fit)`` run for as many CAVI
  sweeps as scikit-learn took (its stopping rule, an absolute change of its bound below
  ``tol``, is checked on vijax's ELBO trace: column "same stop");
* XLA compile time, reported separately (never included in the timings above).

Timings are medians over ``--repeats`` runs after a warm-up, interleaving the libraries so
that both see the same background load; every JAX result is ``block_until_ready``-ed.
Threads: scikit-learn runs as the environment sets OpenBLAS up (printed at start); with
``--sklearn-threads`` it is also timed with its BLAS pool at that many threads
(``threadpoolctl``), so one run shows which setting is faster on this machine. When the
process has several JAX devices (on a CPU: ``XLA_FLAGS=--xla_force_host_platform_device_count=
<cores>``), ``vijax.em.step`` and ``fit_from_state`` are also timed with ``mesh=`` over all of
them (rows split over the devices, one per core; columns "mesh"), and so is the Bayesian
GMM's CAVI step (``bayesian_gmm.step(..., mesh=)``: the one-pass sweep in float64, the
centred two-pass sweep in float32; its own whole-CPU table, with scikit-learn's
``BayesianGaussianMixture`` at both thread settings).

Usage::

    python experiments/bench_em.py                       # the full grid (long)
    python experiments/bench_em.py --sizes 1e4,1e5 --dims 2,8 --dtypes float64 --repeats 3
    # whole-CPU comparison on 2 cores (docs/em.md, table C):
    OPENBLAS_NUM_THREADS=1 XLA_FLAGS="--xla_force_host_platform_device_count=2 \
        --xla_cpu_multi_thread_eigen=false" python experiments/bench_em.py --sklearn-threads 2
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import time
import warnings
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from threadpoolctl import threadpool_limits

jax.config.update("jax_enable_x64", True)  # float64 runs need it; float32 inputs stay float32

from sklearn.exceptions import ConvergenceWarning  # noqa: E402
from sklearn.mixture import BayesianGaussianMixture, GaussianMixture  # noqa: E402

import _cli  # noqa: E402  (experiments/_cli.py: sys.path[0] when run as a script)
from vijax import em  # noqa: E402

try:  # the Bayesian GMM column needs vijax.meanfield
    from vijax.meanfield import bayesian_gmm  # noqa: E402
except ImportError:  # pragma: no cover - column left out
    bayesian_gmm = None

NUM_COMPONENTS = 10
# The one-block reference materialises [N, K * D] (and [N, K, D]) arrays; skip it above this.
MAX_ONE_BLOCK_ENTRIES = 1.1e8


@dataclasses.dataclass
class Row:
    dtype: str
    n: int
    d: int
    sk_gmm_ms: float = float("nan")
    sk_gmm_threads_ms: float = float("nan")  # with --sklearn-threads BLAS threads
    vj_em_ms: float = float("nan")
    vj_em_mesh_ms: float = float("nan")  # mesh over all JAX devices
    vj_em_one_block_ms: float = float("nan")
    sk_bgmm_ms: float = float("nan")
    sk_bgmm_threads_ms: float = float("nan")  # with --sklearn-threads BLAS threads
    vj_bgmm_ms: float = float("nan")
    vj_bgmm_mesh_ms: float = float("nan")
    compile_step_s: float = float("nan")
    compile_fit_s: float = float("nan")
    sk_fit_s: float = float("nan")
    sk_fit_iters: int = -1
    vj_fit_s: float = float("nan")
    vj_fit_iters: int = -1
    vj_fit_mesh_s: float = float("nan")
    vj_fit_mesh_iters: int = -1  # the mesh fit's iterations (float32 summation order may move
    #   a tolerance stop by one; float64 matches vj_fit_iters)
    fit_loglik_rel_diff: float = float("nan")
    sk_bgmm_fit_s: float = float("nan")
    bgmm_fit_iters: int = -1  # scikit-learn's count; vijax runs as many sweeps
    vj_bgmm_fit_s: float = float("nan")
    vj_bgmm_fit_mesh_s: float = float("nan")
    bgmm_fit_same_stop: bool = False  # vijax's ELBO trace meets sklearn's rule at the same sweep
    bgmm_fit_means_max_diff: float = float("nan")  # max |vijax - sklearn| over the final means


def make_data(n: int, d: int, k: int, dtype, seed: int = 0) -> np.ndarray:
    """N points from a random K-component mixture in D dimensions (separated, anisotropic)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, d)) * 4.0
    scales = rng.normal(size=(k, d, d)) / np.sqrt(d) + np.eye(d)
    labels = rng.integers(0, k, size=n)
    x = centers[labels] + np.einsum("nd,nde->ne", rng.normal(size=(n, d)), scales[labels])
    return x.astype(dtype)


def _times(fn: Callable[[], object], repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return times


def _interleaved(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds per call of each function; one warm-up call each, then round-robin."""
    for fn in fns.values():
        jax.block_until_ready(fn())
    samples = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            samples[name] += _times(fn, 1)
    return {name: float(np.median(ts)) for name, ts in samples.items()}


def _compile(fn, *args, **static) -> tuple[Callable, float]:
    start = time.perf_counter()
    compiled = jax.jit(fn, static_argnames=tuple(static)).lower(*args, **static).compile()
    return compiled, time.perf_counter() - start


def _sklearn_gmm(state: em.GMMState, **kwargs) -> GaussianMixture:
    """GaussianMixture started at ``state``'s parameters, in the state's dtype (float64
    initial parameters would make scikit-learn compute float32 data in float64)."""
    u = np.asarray(state.precision_cholesky)
    weights = np.asarray(state.weights)
    return GaussianMixture(
        NUM_COMPONENTS, covariance_type="full", weights_init=weights / weights.sum(),
        means_init=np.asarray(state.means), precisions_init=np.einsum("kij,klj->kil", u, u),
        **kwargs)


def sklearn_gmm_iteration(state: em.GMMState, x: np.ndarray) -> Callable[[], object]:
    """One scikit-learn EM iteration (the body of its fit loop); successive calls continue EM
    from ``state``'s parameters (the cost of an iteration does not depend on the values)."""
    gm = _sklearn_gmm(state, max_iter=1, tol=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        gm.fit(x)  # validation and attribute set-up

    def iteration():
        _, log_resp = gm._e_step(x)
        gm._m_step(x, log_resp)
        return gm.means_

    return iteration


def _with_blas_threads(fn: Callable[[], object], threads: int) -> Callable[[], object]:
    def call():
        with threadpool_limits(limits=threads, user_api="blas"):
            return fn()
    return call


def _sklearn_bgmm(x: np.ndarray, resp: np.ndarray, **kwargs) -> BayesianGaussianMixture:
    """BayesianGaussianMixture (its default prior, PRML's updates: ``reg_covar=0``) whose
    ``fit`` starts from the responsibilities ``resp`` instead of its own initialisation."""
    bgm = BayesianGaussianMixture(
        n_components=NUM_COMPONENTS, covariance_type="full",
        weight_concentration_prior_type="dirichlet_distribution", reg_covar=0.0, **kwargs)
    bgm._initialize_parameters = lambda x_, random_state, xp=None: bgm._initialize(x_, resp)
    return bgm


def sklearn_bgmm_iteration(x: np.ndarray, resp: np.ndarray) -> Callable[[], object]:
    """One scikit-learn variational iteration from ``resp`` (its default prior)."""
    bgm = _sklearn_bgmm(x, resp)
    bgm._check_parameters(x)
    bgm._initialize(x, resp)

    def iteration():
        log_prob_norm, log_resp = bgm._e_step(x)
        bgm._m_step(x, log_resp)
        return bgm._compute_lower_bound(log_resp, log_prob_norm)

    return iteration


def bench_one(dtype: str, n: int, d: int, args) -> Row:
    row = Row(dtype, n, d)
    x_np = make_data(n, d, NUM_COMPONENTS, dtype)
    x = jnp.asarray(x_np)
    init, _ = _compile(em.init, jax.random.key(0), x, num_components=NUM_COMPONENTS)
    state0 = init(jax.random.key(0), x)
    step, row.compile_step_s = _compile(em.step, state0, x)
    fns = {"sk_gmm": sklearn_gmm_iteration(state0, x_np), "vj_em": lambda: step(state0, x)}
    if args.sklearn_threads:
        # Timed on its own, not interleaved: OpenBLAS's threads keep spinning for a while
        # after a call and would take the cores from whatever runs next.
        threaded = _with_blas_threads(sklearn_gmm_iteration(state0, x_np), args.sklearn_threads)
        row.sk_gmm_threads_ms = 1e3 * _interleaved({"sk": threaded}, args.repeats)["sk"]
        time.sleep(1.0)
    mesh = jax.make_mesh((jax.device_count(),), ("rows",)) if jax.device_count() > 1 else None
    if mesh is not None:
        # Data split over the devices and the state on all of them, as a step leaves it.
        x_rows = jax.device_put(x, NamedSharding(mesh, PartitionSpec("rows")))
        state_all = jax.device_put(state0, NamedSharding(mesh, PartitionSpec()))
        mesh_step, _ = _compile(lambda s, x: em.step(s, x, mesh=mesh), state_all, x_rows)
        fns["vj_em_mesh"] = lambda: mesh_step(state_all, x_rows)
    if n * NUM_COMPONENTS * d <= MAX_ONE_BLOCK_ENTRIES:
        one_block, _ = _compile(em.step, state0, x, chunk_size=n)
        fns["vj_em_one_block"] = lambda: one_block(state0, x)
    if bayesian_gmm is not None and not args.skip_bgmm:
        resp = em.predict_proba(state0, x)
        prior = bayesian_gmm.default_prior(x, NUM_COMPONENTS)
        bg_state = bayesian_gmm.init_from_responsibilities(x, resp, prior)
        bg_step, _ = _compile(bayesian_gmm.step, bg_state, x, prior)
        fns["sk_bgmm"] = sklearn_bgmm_iteration(x_np, np.asarray(resp))
        fns["vj_bgmm"] = lambda: bg_step(bg_state, x, prior)
        if args.sklearn_threads:
            threaded = _with_blas_threads(sklearn_bgmm_iteration(x_np, np.asarray(resp)),
                                          args.sklearn_threads)
            row.sk_bgmm_threads_ms = 1e3 * _interleaved({"sk": threaded}, args.repeats)["sk"]
            time.sleep(1.0)
        if mesh is not None:
            # responsibilities split by rows, the rest replicated: as a mesh step leaves it
            bg_specs = bg_state._replace(
                responsibilities=PartitionSpec("rows"),
                **{f: PartitionSpec() for f in bg_state._fields if f != "responsibilities"})
            bg_all = jax.tree.map(lambda a, sp: jax.device_put(a, NamedSharding(mesh, sp)),
                                  bg_state, bg_specs)
            bg_mesh_step, _ = _compile(lambda s, x: bayesian_gmm.step(s, x, prior, mesh=mesh),
                                       bg_all, x_rows)
            fns["vj_bgmm_mesh"] = lambda: bg_mesh_step(bg_all, x_rows)
    for name, seconds in _interleaved(fns, args.repeats).items():
        setattr(row, f"{name}_ms", 1e3 * seconds)

    if n * d <= args.converge_max_nd:  # time to convergence, same tol / max_iter
        fit, row.compile_fit_s = _compile(em.fit_from_state, state0, x, max_iter=args.max_iter,
                                          tol=args.tol)  # tol baked in as a constant
        gm = _sklearn_gmm(state0, max_iter=args.max_iter, tol=args.tol)
        for _ in range(args.converge_repeats):
            start = time.perf_counter()
            state, info = jax.block_until_ready(fit(state0, x))
            vj = time.perf_counter() - start
            start = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                gm.fit(x_np)
            sk = time.perf_counter() - start
            row.vj_fit_s = min(vj, row.vj_fit_s) if row.vj_fit_s == row.vj_fit_s else vj
            row.sk_fit_s = min(sk, row.sk_fit_s) if row.sk_fit_s == row.sk_fit_s else sk
        row.vj_fit_iters, row.sk_fit_iters = int(info.num_iterations), int(gm.n_iter_)
        if mesh is not None:
            mesh_fit, _ = _compile(lambda s, x: em.fit_from_state(
                s, x, max_iter=args.max_iter, tol=args.tol, mesh=mesh), state_all, x_rows)
            start = time.perf_counter()
            mesh_state, mesh_info = jax.block_until_ready(mesh_fit(state_all, x_rows))
            row.vj_fit_mesh_s = time.perf_counter() - start
            row.vj_fit_mesh_iters = int(mesh_info.num_iterations)
        sk_ll = float(gm.lower_bound_)
        row.fit_loglik_rel_diff = abs(float(state.last_log_likelihood) - sk_ll) / abs(sk_ll)
    if (bayesian_gmm is not None and not args.skip_bgmm
            and n * d <= args.bgmm_converge_max_nd):
        bench_bgmm_fit(row, x_np, x, bg_state, prior, args,
                       (mesh, bg_all, x_rows) if "vj_bgmm_mesh" in fns else None)
    return row


def _first_stop(trace: np.ndarray, tol: float) -> int:
    """The sweep (1-based) at which scikit-learn's rule |L_t - L_{t-1}| < tol stops on the
    ELBO trace ``trace`` (its first change is against -inf, so never at t = 1); len+1 if never."""
    small = np.flatnonzero(np.abs(np.diff(trace)) < tol)
    return int(small[0]) + 2 if small.size else len(trace) + 1


def bench_bgmm_fit(row: Row, x_np, x, bg_state, prior, args, on_mesh) -> None:
    """Bayesian GMM to convergence: ``BayesianGaussianMixture.fit`` (its rule: the absolute
    change of its bound < ``tol``, up to ``max_iter``) against ``jax.jit(bayesian_gmm.fit)``
    from the same responsibilities, run for the same number of sweeps (vijax's own rule is
    relative, so it gets ``tol=0`` and ``max_iter`` = scikit-learn's count: the same work per
    sweep, ELBO and convergence test included). ``same_stop`` checks on vijax's ELBO trace,
    which differs from sklearn's bound by a constant, that sklearn's rule stops at that sweep."""
    resp = np.asarray(bg_state.responsibilities)
    for _ in range(args.converge_repeats):
        bgm = _sklearn_bgmm(x_np, resp, tol=args.tol, max_iter=args.max_iter)
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            bgm.fit(x_np)
        sk = time.perf_counter() - start
        row.sk_bgmm_fit_s = min(sk, row.sk_bgmm_fit_s) if row.sk_bgmm_fit_s == row.sk_bgmm_fit_s \
            else sk
    row.bgmm_fit_iters = iters = int(bgm.n_iter_)
    fit, _ = _compile(lambda s, x: bayesian_gmm.fit(s, x, prior, tol=0.0, max_iter=iters),
                      bg_state, x)
    jax.block_until_ready(fit(bg_state, x))  # warm-up
    row.vj_bgmm_fit_s = min(_times(lambda: fit(bg_state, x), args.converge_repeats))
    state, info = fit(bg_state, x)
    stop = _first_stop(np.asarray(info.elbo), args.tol)
    row.bgmm_fit_same_stop = stop == iters or (stop > iters == args.max_iter)
    row.bgmm_fit_means_max_diff = float(np.max(np.abs(np.asarray(state.loc) - bgm.means_)))
    if on_mesh is not None:
        mesh, bg_all, x_rows = on_mesh
        mesh_fit, _ = _compile(lambda s, x: bayesian_gmm.fit(
            s, x, prior, tol=0.0, max_iter=iters, mesh=mesh), bg_all, x_rows)
        jax.block_until_ready(mesh_fit(bg_all, x_rows))
        row.vj_bgmm_fit_mesh_s = min(_times(lambda: mesh_fit(bg_all, x_rows),
                                            args.converge_repeats))


def _fmt(value: float, digits: int = 1) -> str:
    return "—" if value != value else f"{value:.{digits}f}"


def _ratio(a: float, b: float) -> str:
    return "—" if a != a or b != b else f"{a / b:.1f}×"


def _best_vs_best_cells(r: Row, sk: str, vj: str) -> str:
    """``sk 1 / N threads | vj 1 device / mesh | best / best`` for the fields ``{sk}_ms``,
    ``{sk}_threads_ms``, ``{vj}_ms`` and ``{vj}_mesh_ms`` of ``r``."""
    sk_one, sk_threads = getattr(r, f"{sk}_ms"), getattr(r, f"{sk}_threads_ms")
    vj_one, vj_mesh = getattr(r, f"{vj}_ms"), getattr(r, f"{vj}_mesh_ms")
    return (f"{_fmt(sk_one)} / {_fmt(sk_threads)} | {_fmt(vj_one)} / {_fmt(vj_mesh)} | "
            f"{_ratio(min(sk_one, sk_threads), min(vj_one, vj_mesh))}")


def _mesh_iters(r: Row) -> str:
    """Iterations of the fits: one number when the mesh fit took as many as the others."""
    if r.vj_fit_mesh_iters in (-1, r.vj_fit_iters):
        return f"{r.vj_fit_iters}"
    return f"{r.vj_fit_iters}, mesh {r.vj_fit_mesh_iters}"


def _threads_label(threads: int) -> str:
    """Header of the scikit-learn column pair (the second is "—" without --sklearn-threads)."""
    second = f"{threads} BLAS threads" if threads else "(--sklearn-threads not given)"
    return f"environment's BLAS threads / {second}"


def mesh_table(rows: list[Row], threads: int, devices: int) -> str:
    """Whole-CPU comparison: each library at its faster thread setting (the first scikit-learn
    column runs with the environment's BLAS threads: 1 under ``OPENBLAS_NUM_THREADS=1``)."""
    lines = [
        f"| dtype | N | D | sklearn GMM ms/it, {_threads_label(threads)} | "
        f"vijax EM ms/it, "
        f"1 device / mesh of {devices} | speed-up, best vs best | fit s: sklearn / "
        f"vijax mesh (iters) | speed-up |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.dtype} | {r.n:.0e} | {r.d} | {_best_vs_best_cells(r, 'sk_gmm', 'vj_em')} | "
            f"{_fmt(r.sk_fit_s, 2)} / {_fmt(r.vj_fit_mesh_s, 2)} "
            f"({_mesh_iters(r)}) | {_ratio(r.sk_fit_s, r.vj_fit_mesh_s)} |")
    return "\n".join(lines)


def bgmm_mesh_table(rows: list[Row], threads: int, devices: int) -> str:
    """Bayesian GMM, whole CPU: as :func:`mesh_table`, per CAVI iteration (every dtype)."""
    lines = [
        f"| dtype | N | D | sklearn BGMM ms/it, {_threads_label(threads)} | "
        f"vijax BGMM ms/it, 1 device / mesh of {devices} | speed-up, best vs best |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    lines += [f"| {r.dtype} | {r.n:.0e} | {r.d} | {_best_vs_best_cells(r, 'sk_bgmm', 'vj_bgmm')} |"
              for r in rows if r.vj_bgmm_mesh_ms == r.vj_bgmm_mesh_ms]
    return "\n".join(lines)


def per_iteration_table(rows: list[Row]) -> str:
    lines = [
        "| dtype | N | D | sklearn GMM ms/it | vijax EM ms/it | speed-up | vijax one-block ms/it "
        "| speed-up | sklearn BGMM ms/it | vijax BGMM ms/it | speed-up | compile s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.dtype} | {r.n:.0e} | {r.d} | {_fmt(r.sk_gmm_ms)} | {_fmt(r.vj_em_ms)} | "
            f"{_ratio(r.sk_gmm_ms, r.vj_em_ms)} | {_fmt(r.vj_em_one_block_ms)} | "
            f"{_ratio(r.sk_gmm_ms, r.vj_em_one_block_ms)} | {_fmt(r.sk_bgmm_ms)} | "
            f"{_fmt(r.vj_bgmm_ms)} | {_ratio(r.sk_bgmm_ms, r.vj_bgmm_ms)} | "
            f"{_fmt(r.compile_step_s, 2)} |")
    return "\n".join(lines)


def convergence_table(rows: list[Row], tol: float, max_iter: int) -> str:
    lines = [
        f"| dtype | N | D | sklearn fit s (iters) | vijax fit s (iters) | speed-up | "
        f"rel. diff of final log-lik | compile s |  (tol={tol:g}, max_iter={max_iter})",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r.vj_fit_iters < 0:
            continue
        lines.append(
            f"| {r.dtype} | {r.n:.0e} | {r.d} | {_fmt(r.sk_fit_s, 2)} ({r.sk_fit_iters}) | "
            f"{_fmt(r.vj_fit_s, 2)} ({r.vj_fit_iters}) | {_ratio(r.sk_fit_s, r.vj_fit_s)} | "
            f"{r.fit_loglik_rel_diff:.1e} | {_fmt(r.compile_fit_s, 2)} |")
    return "\n".join(lines)


def bgmm_convergence_table(rows: list[Row], tol: float, max_iter: int, devices: int) -> str:
    lines = [
        f"| dtype | N | D | sklearn BGMM fit s (iters) | vijax fit s | speed-up | "
        f"vijax mesh of {devices} s | speed-up | same stop | max abs diff of means |  "
        f"(tol={tol:g}, max_iter={max_iter})",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    lines += [
        f"| {r.dtype} | {r.n:.0e} | {r.d} | {_fmt(r.sk_bgmm_fit_s, 2)} ({r.bgmm_fit_iters}) | "
        f"{_fmt(r.vj_bgmm_fit_s, 2)} | {_ratio(r.sk_bgmm_fit_s, r.vj_bgmm_fit_s)} | "
        f"{_fmt(r.vj_bgmm_fit_mesh_s, 2)} | {_ratio(r.sk_bgmm_fit_s, r.vj_bgmm_fit_mesh_s)} | "
        f"{'yes' if r.bgmm_fit_same_stop else 'NO'} | {r.bgmm_fit_means_max_diff:.1e} |"
        for r in rows if r.bgmm_fit_iters >= 0]
    return "\n".join(lines)


def environment() -> dict:
    try:
        from threadpoolctl import threadpool_info
        blas = [f"{i['internal_api']} {i['version']} threads={i['num_threads']}"
                for i in threadpool_info()]
    except Exception:  # pragma: no cover
        blas = ["unknown"]
    return {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "jax": jax.__version__, "devices": [str(dv) for dv in jax.devices()],
        "xla_flags": os.environ.get("XLA_FLAGS", ""), "blas": blas,
    }


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """One-line usage errors (``parser.error``) for values the runs below cannot use."""
    for flag in ("repeats", "converge_repeats", "max_iter"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1; got {getattr(args, flag)}")
    try:
        sizes = [int(float(v)) for v in args.sizes.split(",")]
        dims = [int(v) for v in args.dims.split(",")]
    except (ValueError, OverflowError):  # OverflowError: "inf"
        parser.error(f"--sizes and --dims take comma-separated finite numbers; got "
                     f"{args.sizes!r}, {args.dims!r}")
    if min(dims) < 1 or min(sizes) < NUM_COMPONENTS:
        parser.error(f"every D must be >= 1 and every N >= K = {NUM_COMPONENTS}")
    if not args.tol >= 0:  # also NaN
        parser.error(f"--tol must be >= 0; got {args.tol}")
    if args.sklearn_threads < 0:
        parser.error(f"--sklearn-threads must be >= 1 (0: not timed); got {args.sklearn_threads}")
    bad = sorted(set(args.dtypes.split(",")) - {"float32", "float64"})
    if bad:
        parser.error(f"--dtypes takes float32 and/or float64; got {', '.join(bad)}")


def main(argv=None) -> list[Row]:
    parser = _cli.Parser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1e4,1e5,1e6", help="comma-separated N")
    parser.add_argument("--dims", default="2,8,32", help="comma-separated D")
    parser.add_argument("--dtypes", default="float64,float32")
    parser.add_argument("--repeats", type=int, default=5, help="timed iterations per method")
    parser.add_argument("--tol", type=float, default=1e-3)
    parser.add_argument("--max-iter", type=int, default=100)
    parser.add_argument("--converge-max-nd", type=float, default=1e7,
                        help="time to convergence only where N * D <= this")
    parser.add_argument("--converge-repeats", type=int, default=1)
    parser.add_argument("--bgmm-converge-max-nd", type=float, default=4e6,
                        help="Bayesian GMM time to convergence only where N * D <= this")
    parser.add_argument("--skip-bgmm", action="store_true", help="leave out the BGMM columns")
    parser.add_argument("--sklearn-threads", type=int, default=0,
                        help="also time scikit-learn's EM with this many BLAS threads")
    parser.add_argument("--out", default="outputs/bench_em/results.json")
    args = parser.parse_args(argv)
    _check_args(parser, args)

    env = environment()
    print(json.dumps(env, indent=1))
    rows = []
    for dtype in args.dtypes.split(","):
        for d in (int(v) for v in args.dims.split(",")):
            for n in (int(float(v)) for v in args.sizes.split(",")):
                row = bench_one(dtype, n, d, args)
                rows.append(row)
                print(json.dumps(dataclasses.asdict(row)), flush=True)
    print("\nPer iteration (median):\n" + per_iteration_table(rows))
    print("\nTo convergence:\n" + convergence_table(rows, args.tol, args.max_iter))
    if any(r.bgmm_fit_iters >= 0 for r in rows):
        print("\nBayesian GMM to convergence (sklearn: one run):\n" + bgmm_convergence_table(
            rows, args.tol, args.max_iter, jax.device_count()))
    if jax.device_count() > 1 or args.sklearn_threads:
        print("\nWhole CPU (sklearn fit timed at the environment's threads):\n"
              + mesh_table(rows, args.sklearn_threads, jax.device_count()))
        if any(r.vj_bgmm_mesh_ms == r.vj_bgmm_mesh_ms for r in rows):
            print("\nBayesian GMM, whole CPU:\n"
                  + bgmm_mesh_table(rows, args.sklearn_threads, jax.device_count()))
    out = _cli.write_json(args.out, {"environment": env, "args": vars(args),
                                     "rows": [dataclasses.asdict(r) for r in rows]})
    print(f"\nwrote {out}")
    return rows


if __name__ == "__main__":
    main()
