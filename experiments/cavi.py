"""CAVI experiments (vijax.meanfield).

1. Normal-Gamma (PRML §10.1.3, Fig. 10.4): contours of the factorised q(mu) q(tau) against
   the exact Normal-Gamma posterior -- initial state, after the q(mu) update, after the
   q(tau) update, and at convergence.
2. Bayesian Gaussian mixture on Old Faithful (PRML §10.2, Fig. 10.6): K = 6 components and
   alpha_0 = 1e-3 on the standardised data; the unneeded components are switched off
   (their expected weights fall to ~alpha_0 / N). Snapshots of the fit, the expected weights
   and the ELBO trace.

Usage (from the repository root)::

    python experiments/cavi.py --out outputs/cavi
    python experiments/cavi.py --data ../shared/data/old_faithful.csv --seed 0 --num-components 6

Writes ``normal_gamma.png``, ``bgmm_old_faithful.png``, ``bgmm_elbo.png`` and
``summary.json`` into ``--out``. Nothing is downloaded. Runs in well under a minute on CPU.
"""

from __future__ import annotations

import json
import pathlib
import sys
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

_HERE = str(pathlib.Path(__file__).resolve().parent)
if _HERE not in sys.path:  # experiments/_cli.py, also when this file is loaded by path
    sys.path.insert(0, _HERE)

import _cli  # noqa: E402

REPO_ROOT = _cli.put_repo_root_on_path()  # `python experiments/cavi.py` without installing

from vijax import data as vdata  # noqa: E402
from vijax.meanfield import bayesian_gmm as bg  # noqa: E402
from vijax.meanfield import normal_gamma as ng  # noqa: E402

DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "old_faithful.csv"


# --------------------------------------------------------------------------------------------
# 1. Normal-Gamma
# --------------------------------------------------------------------------------------------

class NormalGammaRun(NamedTuple):
    x: np.ndarray  # [N] data
    prior: ng.NormalGammaPrior
    posterior: ng.NormalGammaPosterior  # exact
    snapshots: list  # [(title, NormalGammaState)]
    block_elbo: np.ndarray  # [1 + 2 * sweeps] ELBO of the initial state, then after each block
    log_evidence: float  # exact log p(x)


def run_normal_gamma(seed: int = 0, num_points: int = 10, sweeps: int = 6) -> NormalGammaRun:
    """Data x_n ~ N(0, 1), weak prior, a deliberately poor starting q (as in PRML Fig. 10.4)."""
    x = np.random.default_rng(seed).normal(0.0, 1.0, size=num_points)
    prior = ng.NormalGammaPrior(loc=0.0, precision_scale=0.1, concentration=0.1, rate=0.1)
    state = ng.NormalGammaState(loc=jnp.asarray(-0.6), precision=jnp.asarray(40.0),
                                concentration=jnp.asarray(40.0), rate=jnp.asarray(25.0))
    blocks = [jax.jit(fn) for fn in ng.UPDATE_FNS]  # q(mu), then q(tau)
    elbo = jax.jit(ng.elbo)
    data = (jnp.asarray(x, jnp.float32),
            ng.NormalGammaPrior(*(jnp.asarray(v, jnp.float32) for v in prior)))
    snapshots = [("(a) initial q", state)]
    block_elbo = [float(elbo(state, x, prior))]
    for sweep in range(sweeps):
        for b, update in enumerate(blocks):
            state = update(state, data)
            block_elbo.append(float(elbo(state, x, prior)))
            if sweep == 0:
                snapshots.append((("(b) after q(mu) update", "(c) after q(tau) update")[b], state))
    snapshots.append((f"(d) after {sweeps} sweeps", state))
    return NormalGammaRun(x, prior, ng.exact_posterior(x, prior), snapshots,
                          np.asarray(block_elbo), float(ng.log_marginal_likelihood(x, prior)))


def plot_normal_gamma(run: NormalGammaRun, path: pathlib.Path) -> None:
    import matplotlib.pyplot as plt

    mu = np.linspace(-1.0, 1.0, 241)
    tau = np.linspace(0.01, 3.2, 241)
    mm, tt = np.meshgrid(mu, tau)
    exact = np.asarray(ng.log_density_exact(run.posterior, mm, tt))
    levels = np.exp(-0.5 * np.array([3.0, 2.0, 1.0]) ** 2)  # 3/2/1 "sigma" of a Gaussian
    fig, axes = plt.subplots(1, len(run.snapshots), figsize=(4.0 * len(run.snapshots), 3.8),
                             sharey=True)
    for ax, (title, state) in zip(axes, run.snapshots):
        q = np.asarray(ng.log_density_q(state, mm, tt))
        ax.contour(mm, tt, np.exp(exact - exact.max()), levels=levels, colors="tab:green")
        ax.contour(mm, tt, np.exp(q - q.max()), levels=levels, colors="tab:red")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(r"$\mu$")
    axes[0].set_ylabel(r"$\tau$")
    axes[-1].plot([], [], color="tab:green", label=r"exact $p(\mu,\tau\,|\,x)$")
    axes[-1].plot([], [], color="tab:red", label=r"$q(\mu)\,q(\tau)$")
    axes[-1].legend(loc="upper right", fontsize=8)
    fig.suptitle(f"Normal-Gamma model, N = {run.x.size}: mean-field CAVI vs the exact "
                 "posterior (PRML Fig. 10.4)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# 2. Bayesian GMM on Old Faithful
# --------------------------------------------------------------------------------------------

class BGMMRun(NamedTuple):
    x: np.ndarray  # [N, 2] standardised data
    snapshots: list  # [(iteration, BGMMState)]
    final: bg.BGMMState
    elbo: np.ndarray  # [num_iter + 1] ELBO of the initial state, then after each sweep
    converged: bool


def load_old_faithful(path: pathlib.Path) -> np.ndarray:
    """[272, 2] (eruption minutes, waiting minutes), standardised per column."""
    return vdata.load_old_faithful(path, standardize=True)


def run_bgmm_old_faithful(x: np.ndarray, *, num_components: int = 6, seed: int = 0,
                          concentration: float = 1e-3, max_iter: int = 500) -> BGMMRun:
    """PRML Fig. 10.6's setting: alpha_0 = 1e-3, beta_0 = 1, m_0 = 0, nu_0 = D, W_0 = I.

    The fit runs in :func:`bayesian_gmm.fit` (one ``lax.while_loop``); the snapshots at 0, 1/8,
    1/3 and 2/3 of its iterations are recomputed with :func:`bayesian_gmm.step`.
    """
    dim = x.shape[1]
    prior = bg.BGMMPrior(concentration=concentration, mean_precision=1.0, loc=np.zeros(dim),
                         dof=float(dim), scale_inv=np.eye(dim))
    state = jax.jit(bg.init, static_argnums=2)(jax.random.key(seed), x, num_components, prior)
    final, info = jax.jit(lambda s: bg.fit(s, x, prior, tol=1e-9, max_iter=max_iter))(state)
    n = int(info.num_iter)
    elbo = np.concatenate([[float(info.initial_elbo)], np.asarray(info.elbo[:n])])
    snapshot_at = sorted({0, n // 8, n // 3, (2 * n) // 3})
    step = jax.jit(bg.step)
    snapshots, current = [], state
    for it in range(snapshot_at[-1] + 1):
        if it in snapshot_at:
            snapshots.append((it, current))
        current, _ = step(current, x, prior)
    return BGMMRun(x, snapshots, final, elbo, bool(info.converged))


def _ellipse(ax, mean, cov, **kwargs):
    from matplotlib.patches import Ellipse

    vals, vecs = np.linalg.eigh(cov)
    angle = np.degrees(np.arctan2(vecs[1, 1], vecs[0, 1]))
    width, height = 2 * 2.0 * np.sqrt(vals[::-1])  # 2 standard deviations
    ax.add_patch(Ellipse(mean, width, height, angle=angle, fill=False, **kwargs))


def plot_bgmm(run: BGMMRun, path: pathlib.Path) -> None:
    import matplotlib.pyplot as plt

    panels = list(run.snapshots) + [(len(run.elbo) - 1, run.final)]
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(3.6 * (len(panels) + 1), 3.7))
    num_components = np.asarray(run.final.loc).shape[0]
    colours = plt.cm.tab10(np.arange(num_components) % 10)  # cycles beyond 10 components
    for ax, (it, state) in zip(axes, panels):
        weights = np.asarray(bg.expected_weights(state))
        covs = np.asarray(bg.expected_covariances(state))
        labels = np.argmax(np.asarray(state.responsibilities), axis=1)
        ax.scatter(run.x[:, 0], run.x[:, 1], s=6, c=colours[labels], alpha=0.6)
        for k in np.flatnonzero(weights > 0.01):
            _ellipse(ax, np.asarray(state.loc[k]), covs[k], color=colours[k],
                     lw=0.8 + 3.0 * weights[k])
        ax.set_title(f"iteration {it}: {int(np.sum(weights > 0.01))} components\n"
                     f"with E[pi_k] > 0.01", fontsize=9)
        ax.set_xlim(-2.6, 2.6)
        ax.set_ylim(-2.6, 2.6)
        ax.set_aspect("equal")
    ax = axes[-1]
    weights = np.asarray(bg.expected_weights(run.final))
    ax.bar(np.arange(weights.size), weights, color=colours[: weights.size])
    ax.set_yscale("log")
    ax.set_ylim(1e-7, 1.0)
    ax.set_xlabel("component k")
    ax.set_title("final E[pi_k] (log scale)", fontsize=9)
    fig.suptitle(f"Bayesian GMM on Old Faithful (standardised), K = {weights.size}, "
                 "alpha_0 = 1e-3 (PRML Fig. 10.6)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_elbo(bgmm: BGMMRun, normal_gamma: NormalGammaRun, path: pathlib.Path) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    axes[0].plot(np.arange(bgmm.elbo.size), bgmm.elbo, marker=".", ms=3)
    axes[0].set_xlabel("CAVI iteration (0 = initial state)")
    axes[0].set_ylabel("ELBO (nats)")
    axes[0].set_title("Bayesian GMM on Old Faithful", fontsize=10)
    gap = normal_gamma.log_evidence - normal_gamma.block_elbo
    axes[1].semilogy(np.arange(gap.size), gap, marker="o")
    axes[1].set_xlabel("block update (odd: q(mu), even: q(tau))")
    axes[1].set_ylabel("log p(x) - ELBO = KL(q || p) (nats)")
    axes[1].set_title("Normal-Gamma: the gap to the exact evidence", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    parser = _cli.Parser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=pathlib.Path, default=REPO_ROOT / "outputs" / "cavi")
    parser.add_argument("--data", type=pathlib.Path, default=DEFAULT_DATA,
                        help="Old Faithful CSV (default ../shared/data/old_faithful.csv)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-components", type=int, default=6, help="K >= 1 (default 6)")
    parser.add_argument("--concentration", type=float, default=1e-3,
                        help="alpha_0 > 0, the Dirichlet prior's concentration (default 1e-3)")
    args = parser.parse_args(argv)
    if args.num_components < 1:
        parser.error(f"--num-components must be >= 1; got {args.num_components}")
    if not (np.isfinite(args.concentration) and args.concentration > 0):
        parser.error(f"--concentration must be a finite number > 0; got {args.concentration}")
    _cli.check_seed(parser, args.seed)
    _cli.check_output_folder(parser, args.out, "--out")  # every flag before the data are read
    x = _cli.read_input(parser, args.data, load_old_faithful, "the Old Faithful CSV")
    if args.num_components > x.shape[0]:
        parser.error(f"--num-components must be at most the {x.shape[0]} rows of --data; got "
                     f"{args.num_components}")

    import matplotlib

    matplotlib.use("Agg")
    args.out.mkdir(parents=True, exist_ok=True)

    ng_run = run_normal_gamma(seed=args.seed)
    plot_normal_gamma(ng_run, args.out / "normal_gamma.png")

    bgmm_run = run_bgmm_old_faithful(x, num_components=args.num_components, seed=args.seed,
                                     concentration=args.concentration)
    plot_bgmm(bgmm_run, args.out / "bgmm_old_faithful.png")
    plot_elbo(bgmm_run, ng_run, args.out / "bgmm_elbo.png")

    final_q = ng_run.snapshots[-1][1]
    t = ng.exact_mu_marginal(ng_run.posterior)
    weights = np.asarray(bg.expected_weights(bgmm_run.final))
    summary = {
        "normal_gamma": {
            "q_mu_mean": float(final_q.loc), "exact_mu_mean": float(ng_run.posterior.loc),
            "q_mu_var": float(1.0 / final_q.precision),
            "exact_mu_var": float(t.scale ** 2 * t.df / (t.df - 2.0)),
            "elbo": float(ng_run.block_elbo[-1]), "log_evidence": ng_run.log_evidence,
        },
        "bgmm_old_faithful": {
            "expected_weights": weights.tolist(),
            "active_components": int(np.sum(weights > 0.01)),
            "iterations": int(bgmm_run.elbo.size - 1), "converged": bgmm_run.converged,
            "final_elbo": float(bgmm_run.elbo[-1]),
            "elbo_never_decreases": bool(np.all(np.diff(bgmm_run.elbo)
                                                >= -1e-6 * np.abs(bgmm_run.elbo[1:]))),
        },
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
