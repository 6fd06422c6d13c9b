"""EM for Gaussian mixtures: Old Faithful (PRML Fig. 9.8) and a larger synthetic run.

1. Old Faithful (``../shared/data/old_faithful.csv``, both columns standardised), K = 2, full
   covariances, started like PRML Fig. 9.8 (equal weights, unit covariances, means in the
   empty upper-left and lower-right corners, placed slightly asymmetrically: a start exactly
   symmetric about the data's main diagonal sits near a saddle and needs 50+ iterations).
   Figures: the fit after L = 0, 1, 2, 5, 20 iterations and at convergence (points coloured
   by their responsibilities, one-standard-deviation ellipses), and the mean log-likelihood
   per iteration.
2. Synthetic: N points from a known K-component mixture (``vijax.em.sample``), fitted by
   ``jax.vmap`` over k-means++ restarts of ``vijax.em.fit``; the best restart is compared with
   the truth (log-likelihood on held-out data, matched means).

Usage::

    python experiments/gmm_em.py                      # writes PNGs + summary.json to outputs/gmm_em
    python experiments/gmm_em.py --synthetic-n 200000 --restarts 8 --out outputs/gmm_em

Nothing is downloaded; the Old Faithful CSV must be present.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Ellipse  # noqa: E402
from scipy.optimize import linear_sum_assignment  # noqa: E402

from vijax import data as vdata  # noqa: E402
from vijax import em  # noqa: E402

_HERE = str(pathlib.Path(__file__).resolve().parent)
if _HERE not in sys.path:  # experiments/_cli.py, also when this file is loaded by path
    sys.path.insert(0, _HERE)

import _cli  # noqa: E402

REPO_ROOT = _cli.REPO_ROOT

DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "old_faithful.csv"
SNAPSHOTS = (0, 1, 2, 5, 20)


# ------------------------------------------------------------------------------------------
# Old Faithful
# ------------------------------------------------------------------------------------------


def load_old_faithful(path: pathlib.Path | str = DEFAULT_DATA) -> np.ndarray:
    """The 272 x 2 Old Faithful table (eruption minutes, waiting minutes), float64."""
    return vdata.load_old_faithful(path)


def standardise(x: np.ndarray) -> np.ndarray:
    """Columns shifted to mean 0 and scaled to standard deviation 1."""
    return (x - x.mean(axis=0)) / x.std(axis=0)


def prml_initial_state(dtype=jnp.float64) -> em.GMMState:
    """Two components with equal weights, unit covariances and means (-1, 1), (1.5, -1)."""
    return em.state_from_parameters(
        jnp.array([0.5, 0.5], dtype), jnp.array([[-1.0, 1.0], [1.5, -1.0]], dtype),
        jnp.stack([jnp.eye(2, dtype=dtype)] * 2))


@dataclasses.dataclass
class OldFaithfulRun:
    x: np.ndarray  # [272, 2] standardised data
    snapshots: dict  # iteration -> GMMState (parameters after that many EM steps)
    log_likelihood: np.ndarray  # [iterations] mean log-lik at each E-step (nats)
    num_iterations: int  # steps until |change| < tol


def run_old_faithful(x: np.ndarray, *, max_iter: int = 200, tol: float = 1e-8,
                     snapshots=SNAPSHOTS) -> OldFaithfulRun:
    """EM from :func:`prml_initial_state`, keeping the parameters after ``snapshots`` steps
    and after convergence (|change of mean log-likelihood| < ``tol``)."""
    xj = jnp.asarray(x)
    state = prml_initial_state(xj.dtype)
    step = jax.jit(em.step)
    kept, trace = {0: state}, []
    for it in range(1, max_iter + 1):
        state, info = step(state, xj)
        trace.append(float(info.log_likelihood))
        if it in snapshots:
            kept[it] = state
        if len(trace) > 1 and abs(trace[-1] - trace[-2]) < tol:
            break
    kept[it] = state
    return OldFaithfulRun(x=x, snapshots=kept, log_likelihood=np.array(trace), num_iterations=it)


def _ellipse(ax, mean, cov, **kwargs) -> None:
    """One-standard-deviation contour of N(mean, cov) in 2-D."""
    vals, vecs = np.linalg.eigh(cov)
    angle = np.degrees(np.arctan2(vecs[1, -1], vecs[0, -1]))
    ax.add_patch(Ellipse(mean, 2 * np.sqrt(vals[-1]), 2 * np.sqrt(vals[0]), angle=angle,
                         fill=False, **kwargs))


def plot_snapshots(run: OldFaithfulRun, path: pathlib.Path) -> None:
    """PRML Fig. 9.8-style panels: points coloured red/blue by responsibility."""
    iters = sorted(run.snapshots)
    fig, axes = plt.subplots(2, (len(iters) + 1) // 2, figsize=(3.2 * ((len(iters) + 1) // 2), 6.4))
    colours = np.array([[0.85, 0.1, 0.1], [0.1, 0.2, 0.85]])
    xj = jnp.asarray(run.x)
    for ax, it in zip(axes.ravel(), iters):
        state = run.snapshots[it]
        resp = np.asarray(em.predict_proba(state, xj))
        ax.scatter(run.x[:, 0], run.x[:, 1], s=9, c=np.clip(resp @ colours, 0, 1),
                   edgecolors="none")
        covs = np.asarray(em.dense_covariances(state))
        for k, (mean, cov) in enumerate(zip(np.asarray(state.means), covs)):
            _ellipse(ax, mean, cov, color=colours[k], lw=2)
        label = "converged" if it == run.num_iterations else ""
        ax.set_title(f"L = {it} {label}".strip())
        ax.set_xlim(-2.5, 2.5)
        ax.set_ylim(-2.5, 2.5)
        ax.set_aspect("equal")
        ax.set_xticks([-2, 0, 2])
        ax.set_yticks([-2, 0, 2])
    for ax in axes.ravel()[len(iters):]:
        ax.axis("off")
    fig.suptitle("EM on Old Faithful (standardised), K = 2, full covariances")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_log_likelihood(run: OldFaithfulRun, path: pathlib.Path) -> None:
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(9, 3.4))
    iters = np.arange(len(run.log_likelihood))
    ax.plot(iters, run.log_likelihood, "o-", ms=3)
    ax.set_xlabel("iteration L (parameters after L steps)")
    ax.set_ylabel("mean log-likelihood (nats / point)")
    ax.set_title("log p(X | θ_L) / N")
    gap = run.log_likelihood[-1] - run.log_likelihood[:-1]
    ax2.semilogy(iters[:-1], np.maximum(gap, 1e-16), "o-", ms=3)
    ax2.set_xlabel("iteration L")
    ax2.set_ylabel("final − current (nats / point)")
    ax2.set_title("distance to the converged value")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------
# Synthetic
# ------------------------------------------------------------------------------------------


def synthetic_truth(num_components: int = 5, dim: int = 2, seed: int = 0) -> em.GMMState:
    """A random full-covariance mixture with separated means (float64)."""
    rng = np.random.default_rng(seed)
    weights = rng.dirichlet(np.full(num_components, 3.0))
    means = rng.uniform(-8, 8, size=(num_components, dim))
    a = rng.normal(size=(num_components, dim, dim))
    covs = a @ np.swapaxes(a, -1, -2) / dim + 0.3 * np.eye(dim)
    return em.state_from_parameters(weights, means, covs)


def run_synthetic(n: int = 100_000, *, num_components: int = 5, dim: int = 2, seed: int = 0,
                  restarts: int = 8, max_iter: int = 300, tol: float = 1e-6) -> dict:
    """Fit ``restarts`` k-means++ restarts in one vmapped, jitted call; report the best one."""
    truth = synthetic_truth(num_components, dim, seed)
    key_train, key_test, key_fit = jax.random.split(jax.random.key(seed), 3)
    x, _ = em.sample(key_train, truth, n)
    x_test, _ = em.sample(key_test, truth, n)

    fit = jax.jit(jax.vmap(lambda k: em.fit(k, x, num_components, max_iter=max_iter, tol=tol)))
    keys = jax.random.split(key_fit, restarts)
    start = time.perf_counter()
    compiled = fit.lower(keys).compile()
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    states, infos = jax.block_until_ready(compiled(keys))
    fit_s = time.perf_counter() - start

    final = np.array([np.nanmax(t) for t in np.asarray(infos.log_likelihood)])
    best = int(np.argmax(final))
    state = jax.tree.map(lambda a: a[best], states)
    ll_test = float(jnp.mean(em.log_likelihood(state, x_test)))
    ll_test_truth = float(jnp.mean(em.log_likelihood(truth, x_test)))
    dist = np.linalg.norm(np.asarray(state.means)[:, None] - np.asarray(truth.means)[None], axis=-1)
    rows, cols = linear_sum_assignment(dist)
    return {
        "n": n, "num_components": num_components, "dim": dim, "restarts": restarts,
        "compile_s": compile_s, "fit_s_all_restarts": fit_s,
        "iterations": np.asarray(infos.num_iterations).tolist(),
        "converged": np.asarray(infos.converged).tolist(),
        "final_train_log_likelihood": final.tolist(), "best_restart": best,
        "test_log_likelihood_fit": ll_test, "test_log_likelihood_truth": ll_test_truth,
        "max_matched_mean_error": float(dist[rows, cols].max()),
        "weights_fit_matched": np.asarray(state.weights)[rows].tolist(),
        "weights_truth_matched": np.asarray(truth.weights)[cols].tolist(),
        "_state": state, "_truth": truth, "_x": np.asarray(x),
    }


def plot_synthetic(result: dict, path: pathlib.Path) -> None:
    x = result["_x"]
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.hexbin(x[:, 0], x[:, 1], gridsize=120, bins="log", cmap="Greys")
    styles = [(result["_truth"], dict(color="tab:green", lw=4, alpha=0.6), "truth"),
              (result["_state"], dict(color="tab:red", lw=1.5, ls="--"), "EM fit (best restart)")]
    for state, style, label in styles:
        covs = np.asarray(em.dense_covariances(state))
        for i, (mean, cov) in enumerate(zip(np.asarray(state.means), covs)):
            _ellipse(ax, mean, cov, label=label if i == 0 else None, **style)
    ax.legend(loc="upper right")
    ax.set_title(f"N = {result['n']:,}, K = {result['num_components']}, "
                 f"{result['restarts']} vmapped restarts")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    parser = _cli.Parser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=pathlib.Path, default=DEFAULT_DATA,
                        help="Old Faithful CSV (default ../shared/data/old_faithful.csv)")
    parser.add_argument("--out", type=pathlib.Path, default=REPO_ROOT / "outputs" / "gmm_em",
                        help="output folder (default outputs/gmm_em in the repository)")
    parser.add_argument("--synthetic-n", type=int, default=100_000,
                        help="points of the synthetic run (default 100000)")
    parser.add_argument("--synthetic-k", type=int, default=5,
                        help="components of the synthetic run (default 5)")
    parser.add_argument("--restarts", type=int, default=8,
                        help="vmapped EM restarts of the synthetic run (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic run")
    args = parser.parse_args(argv)
    for flag in ("synthetic_n", "synthetic_k", "restarts"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1; got {getattr(args, flag)}")
    if args.synthetic_n < args.synthetic_k:
        parser.error("--synthetic-n must be at least --synthetic-k")
    _cli.check_seed(parser, args.seed)
    _cli.check_output_folder(parser, args.out, "--out")  # every flag before the data are read
    old_faithful = _cli.read_input(parser, args.data, load_old_faithful, "the Old Faithful CSV")
    jax.config.update("jax_enable_x64", True)
    args.out.mkdir(parents=True, exist_ok=True)

    run = run_old_faithful(standardise(old_faithful))
    plot_snapshots(run, args.out / "old_faithful_em.png")
    plot_log_likelihood(run, args.out / "old_faithful_log_likelihood.png")
    final = run.snapshots[run.num_iterations]
    summary = {"old_faithful": {
        "iterations": run.num_iterations,
        "log_likelihood_trace": run.log_likelihood.tolist(),
        "weights": np.asarray(final.weights).tolist(),
        "means": np.asarray(final.means).tolist(),
        "covariances": np.asarray(final.covariances).tolist(),
    }}
    synth = run_synthetic(args.synthetic_n, num_components=args.synthetic_k, seed=args.seed,
                          restarts=args.restarts)
    plot_synthetic(synth, args.out / "synthetic_em.png")
    summary["synthetic"] = {k: v for k, v in synth.items() if not k.startswith("_")}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))
    for name in ("old_faithful_em.png", "old_faithful_log_likelihood.png", "synthetic_em.png",
                 "summary.json"):
        print("wrote", args.out / name)
    return summary


if __name__ == "__main__":
    main()
