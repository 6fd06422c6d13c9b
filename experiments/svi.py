"""Stochastic VI with vijax.svi and vijax.families: logistic regression and 2-D test targets.

1. Bayesian logistic regression on scikit-learn's breast-cancer data (569 rows, bundled with
   scikit-learn: nothing is downloaded). A stratified 80/20 train/test split (455/114 rows),
   the 30 features standardised with the training mean and sd, an intercept column (D = 31);
   prior w ~ N(0, prior_scale^2 I) (prior_scale = 1 by default), likelihood
   y_n ~ Bernoulli(sigmoid(x_n . w)) on the training rows. Fitted with ``svi.fit``
   (optax.adam with a cosine-decayed learning rate, full batch): MeanFieldNormal(31),
   FullRankNormal(31), LowRankNormal(31, rank 5) and a small SplineFlow(31); plus one
   minibatch run (``svi.minibatch_log_joint``, batch 64) of the full-rank family. Per family:
   the final ELBO from many draws (with its standard error), the importance-sampling
   log-evidence ``svi.log_marginal_estimate`` (k draws), the posterior-predictive accuracy on
   the training and test rows (``svi.predictive``) and the wall time. Reference: NUTS
   (blackjax, window adaptation) on the same posterior, when blackjax is importable (an
   optional dependency; otherwise that part is skipped with a note); each family's mean and sd
   errors against it, in units of the reference sd.
2. 2-D targets with known normaliser (log Z = 0): a "banana"
   z1 ~ N(0, s1^2), z2 | z1 ~ N(b (z1^2 - s1^2), s2^2), and Neal's funnel
   v ~ N(0, 3^2), x | v ~ N(0, e^v). MeanFieldNormal(2), FullRankNormal(2) and SplineFlow(2);
   KL(q || p) = log Z - ELBO from many draws (with its standard error), against the best
   Gaussian's KL, known in closed form for both targets (a full covariance does not help on
   either: see ``banana_gaussian_optimum_kl`` and ``funnel_gaussian_optimum_kl``).

Usage (from the repository root)::

    python experiments/svi.py                       # full run: ~105 s of CPU (2 cores)
    python experiments/svi.py --quick --out /tmp/svi_quick      # smoke test: ~50 s of CPU

Writes ``results.json`` (every number, plus CPU model, date, command line and versions),
``logreg_elbo.png`` (ELBO traces), ``logreg_marginals.png`` (coefficient marginals and sds
against NUTS), ``toy_fits.png`` (each q's draws on the targets' contours) and ``toy_elbo.png``
into ``--out`` (default ``outputs/svi``), all written at the end, after every fit. Wall and
CPU times include JIT compilation, which dominates ``--quick``. ``--quick``: 400/800 steps,
2,000/20,000 evaluation draws, the banana only, no NUTS reference.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import pathlib
import sys
import time
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

_HERE = str(pathlib.Path(__file__).resolve().parent)
if _HERE not in sys.path:  # experiments/_cli.py, also when this file is loaded by path
    sys.path.insert(0, _HERE)

import _cli  # noqa: E402

REPO_ROOT = _cli.put_repo_root_on_path()  # `python experiments/svi.py` without installing

from vijax import families as vfam  # noqa: E402
from vijax import svi  # noqa: E402

Array = jax.Array
DEFAULT_OUT = REPO_ROOT / "outputs" / "svi"
LOGREG_FAMILIES = ("mean_field", "full_rank", "low_rank", "spline_flow")
TOY_FAMILIES = ("mean_field", "full_rank", "spline_flow")
LABELS = {"mean_field": "MeanFieldNormal", "full_rank": "FullRankNormal",
          "low_rank": "LowRankNormal (rank 5)", "spline_flow": "SplineFlow",
          "minibatch": "FullRankNormal, minibatch 64", "nuts": "NUTS (reference)"}
COLOURS = {"mean_field": "tab:blue", "full_rank": "tab:orange", "low_rank": "tab:green",
           "spline_flow": "tab:red", "minibatch": "tab:purple", "nuts": "black"}


# --------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Config:
    """Every setting of a run (``quick_config()`` is the smoke-test version)."""

    seed: int = 0
    prior_scale: float = 1.0  # w ~ N(0, prior_scale^2 I)
    test_fraction: float = 0.2
    steps: int = 4000  # logistic regression, per family
    learning_rate: float = 1e-2  # Adam's peak rate; cosine decay to 1% over the run
    flow_learning_rate: float = 3e-3
    train_samples: int = 8  # draws per step in the ELBO's Monte Carlo estimate
    batch_size: int = 64  # the minibatch run
    flow_layers: int = 2  # SplineFlow(31)
    flow_hidden: int = 32
    eval_samples: int = 10_000  # final ELBO (with its SE)
    is_samples: int = 10_000  # svi.log_marginal_estimate
    predictive_samples: int = 10_000
    reference: bool = True  # NUTS via blackjax, if importable
    nuts_warmup: int = 1_000
    nuts_draws: int = 2_000  # per chain
    nuts_chains: int = 2
    toy_steps: int = 5000
    toy_learning_rate: float = 1e-2
    toy_train_samples: int = 16
    toy_flow_layers: int = 4
    toy_eval_samples: int = 100_000
    toy_is_samples: int = 100_000
    toy_targets: tuple = ("banana", "funnel")
    banana: tuple = (1.0, 1.0, 0.5)  # (s1, b, s2)
    funnel_scale: float = 3.0
    running_mean: int = 100  # window of the plotted ELBO traces
    quick: bool = False


def quick_config(**overrides) -> Config:
    # the run time of --quick is mostly JIT compilation (about 5 s of CPU per SplineFlow
    # program): one 2-D target, no NUTS reference, equal sample counts (shared kernels)
    base = dict(steps=400, train_samples=4, eval_samples=2000, is_samples=2000,
                predictive_samples=2000, reference=False, toy_steps=800, toy_flow_layers=2,
                toy_eval_samples=20_000, toy_is_samples=20_000, toy_targets=("banana",),
                running_mean=20, quick=True)
    base.update(overrides)
    return Config(**base)


def _adam(learning_rate: float, steps: int) -> optax.GradientTransformation:
    return optax.adam(optax.cosine_decay_schedule(learning_rate, steps, alpha=0.01))


# --------------------------------------------------------------------------------------------
# shared evaluation
# --------------------------------------------------------------------------------------------

class FitResult(NamedTuple):
    family: object
    params: object
    trace: np.ndarray  # [steps] the training objective (ELBO estimate) per step, nats
    wall_s: float  # svi.fit, JIT compilation included
    cpu_s: float  # process CPU time of the same (all threads)
    nonfinite_steps: int


def fit_family(key, family, log_joint_fn, steps, learning_rate, train_samples, *, data=None,
               batch_size=None) -> FitResult:
    t0, c0 = time.perf_counter(), time.process_time()
    state, info = svi.fit(key, family, _adam(learning_rate, steps), log_joint_fn, steps,
                          objective=svi.ELBO(num_samples=train_samples), data=data,
                          batch_size=batch_size)
    jax.block_until_ready(state.params)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    finite = np.asarray(info.is_finite)
    return FitResult(family, state.params, np.asarray(info.objective), wall, cpu,
                     int((~finite).sum()))


def draws_and_log_weights(key, family, params, log_joint_fn, num_samples):
    """z_s ~ q (``[S, ...]``) and log w_s = log p(x, z_s) - log q(z_s) (``[S]``, nats)."""
    q = vfam.distribution(family, params)

    def one(k):
        with jax.numpy_rank_promotion("allow"):
            z, log_q = q.sample_and_log_prob(seed=k)
        return z, log_joint_fn(z) - log_q

    return jax.vmap(one)(jax.random.split(key, num_samples))


def evaluate_family(key, family, params, log_joint_fn, *, num_samples, is_samples,
                    is_log_joint_fn=None, is_batch=None, predictive_fns=None,
                    predictive_samples=1):
    """Everything measured on a fitted q: ``num_samples`` draws and their log weights;
    ``svi.log_marginal_estimate`` with ``is_samples`` draws (of ``is_log_joint_fn`` and
    ``is_batch`` when given, else of ``log_joint_fn``); ``svi.predictive`` of each of
    ``predictive_fns``. Returns (a dict of NumPy arrays, wall s, CPU s), compilation included.

    Run eagerly, not under ``jax.jit``: the eager kernels are cached across families and
    calls of the same shapes, and --quick (compilation-bound) is faster that way."""
    predictive_fns = predictive_fns or {}

    def run(params, key):
        draw_key, is_key, pred_key = jax.random.split(key, 3)
        z, log_w = draws_and_log_weights(draw_key, family, params, log_joint_fn, num_samples)
        if is_log_joint_fn is None:
            log_z = svi.log_marginal_estimate(is_key, family, params, log_joint_fn,
                                              num_samples=is_samples)
        else:
            log_z = svi.log_marginal_estimate(is_key, family, params, is_log_joint_fn,
                                              num_samples=is_samples, batch=is_batch)
        preds = {name: svi.predictive(pred_key, family, params, fn, predictive_samples)
                 for name, fn in predictive_fns.items()}
        return {"z": z, "log_w": log_w, "log_z_is": log_z, "predictive": preds}

    t0, c0 = time.perf_counter(), time.process_time()
    out = jax.tree_util.tree_map(np.asarray, run(params, key))
    return out, time.perf_counter() - t0, time.process_time() - c0


def summarize_log_weights(log_w: np.ndarray) -> dict:
    """ELBO = mean log w with its standard error; the importance weights' effective sample
    size (sum w)^2 / sum w^2 from the same draws."""
    log_w = np.asarray(log_w, np.float64)
    n = log_w.size
    w = np.exp(log_w - log_w.max())
    return {"elbo": float(log_w.mean()), "elbo_se": float(log_w.std(ddof=1) / math.sqrt(n)),
            "num_samples": int(n), "is_ess": float(w.sum() ** 2 / (w ** 2).sum()),
            "all_finite": bool(np.isfinite(log_w).all())}


def _log_steps(ax) -> None:
    """A log-scaled step axis without the crowded minor tick labels."""
    from matplotlib.ticker import NullFormatter

    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())


def running_mean(x: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray]:
    """(step index of each window's last step, mean of the window)."""
    window = max(1, min(window, x.size))
    c = np.cumsum(np.concatenate([[0.0], np.asarray(x, np.float64)]))
    return np.arange(window - 1, x.size), (c[window:] - c[:-window]) / window


# --------------------------------------------------------------------------------------------
# 1. Bayesian logistic regression on breast cancer
# --------------------------------------------------------------------------------------------

class LogRegData(NamedTuple):
    x_train: np.ndarray  # [N, 31] standardised features then the intercept column (last)
    y_train: np.ndarray  # [N] 0/1 (1 = benign, scikit-learn's coding)
    x_test: np.ndarray
    y_test: np.ndarray
    names: tuple  # 31 coefficient names


def load_breast_cancer_split(seed: int = 0, test_fraction: float = 0.2) -> LogRegData:
    from sklearn.datasets import load_breast_cancer
    from sklearn.model_selection import train_test_split

    bunch = load_breast_cancer()
    x, y = bunch.data.astype(np.float64), bunch.target.astype(np.float64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_fraction, random_state=seed,
                                              stratify=y)
    mean, sd = x_tr.mean(0), x_tr.std(0)

    def design(a):
        return np.concatenate([(a - mean) / sd, np.ones((a.shape[0], 1))], 1).astype(np.float32)

    names = tuple(str(n) for n in bunch.feature_names) + ("intercept",)
    return LogRegData(design(x_tr), y_tr.astype(np.float32), design(x_te),
                      y_te.astype(np.float32), names)


def logreg_log_prior(prior_scale: float) -> Callable:
    def log_prior_fn(w):  # N(0, s^2 I), nats
        d = w.shape[-1]
        return (-0.5 * jnp.sum(w ** 2, -1) / prior_scale ** 2
                - d * (math.log(prior_scale) + 0.5 * math.log(2 * math.pi)))

    return log_prior_fn


def logreg_log_likelihood(w, batch):
    """log p(y_b | x_b, w) = y log sigmoid(x w) + (1 - y) log sigmoid(-x w), ``[B]`` nats."""
    x, y = batch
    return -optax.sigmoid_binary_cross_entropy(x @ w, y)


def logreg_log_joint(data: LogRegData, prior_scale: float) -> Callable:
    """The full-data log p(y, w) (nats) of the training rows, ``w [31] -> []``."""
    x, y = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
    log_prior = logreg_log_prior(prior_scale)
    return lambda w: log_prior(w) + jnp.sum(logreg_log_likelihood(w, (x, y)))


def logreg_families(dim: int, cfg: Config) -> dict:
    return {"mean_field": vfam.MeanFieldNormal(dim),
            "full_rank": vfam.FullRankNormal(dim),
            "low_rank": vfam.LowRankNormal(dim, 5),
            "spline_flow": vfam.SplineFlow(dim, num_layers=cfg.flow_layers,
                                           hidden_sizes=(cfg.flow_hidden,), init_scale=0.1)}


def predictive_accuracy(probs: np.ndarray, y: np.ndarray) -> dict:
    """From ``probs [S, N]`` = sigmoid(x_n . w_s), w_s ~ q (``svi.predictive``): the
    posterior-predictive p(y_n = 1 | x_n) = E_q sigmoid(x_n . w) (their mean over s); the
    accuracy of thresholding it at 1/2 and the mean log predictive density (nats per row)."""
    p = np.clip(np.asarray(probs, np.float64).mean(0), 1e-12, 1 - 1e-12)
    y = np.asarray(y) > 0.5
    return {"accuracy": float(np.mean((p > 0.5) == y)),
            "log_predictive": float(np.mean(np.where(y, np.log(p), np.log1p(-p))))}


def run_nuts(key, log_density_fn, dim, cfg: Config) -> dict:
    """NUTS with blackjax's window adaptation (diagonal mass matrix): ``nuts_chains`` chains of
    ``nuts_warmup`` adaptation steps then ``nuts_draws`` draws. None without blackjax."""
    try:
        import blackjax
    except ImportError as err:
        print(f"note: blackjax is not importable ({err}); skipping the NUTS reference "
              "(install the optional bench dependency `blackjax` for it)")
        return None

    def one_chain(k):
        warm_key, init_key, sample_key = jax.random.split(k, 3)
        init = 0.1 * jax.random.normal(init_key, (dim,))
        adapt = blackjax.window_adaptation(blackjax.nuts, log_density_fn)
        (state, parameters), _ = adapt.run(warm_key, init, num_steps=cfg.nuts_warmup)
        kernel = blackjax.nuts(log_density_fn, **parameters).step

        def body(s, kk):
            s, info = kernel(kk, s)
            return s, (s.position, info.num_integration_steps, info.is_divergent,
                       info.acceptance_rate)

        _, out = jax.lax.scan(body, state, jax.random.split(sample_key, cfg.nuts_draws))
        return out + (parameters["step_size"],)

    t0 = time.perf_counter()
    positions, n_steps, divergent, accept, step_size = jax.block_until_ready(
        jax.jit(jax.vmap(one_chain))(jax.random.split(key, cfg.nuts_chains)))
    wall = time.perf_counter() - t0
    positions = np.asarray(positions, np.float64)  # [chains, draws, dim]
    ess = np.asarray(blackjax.diagnostics.effective_sample_size(positions))
    out = {"draws": positions.reshape(-1, dim), "wall_s": wall,
           "num_chains": cfg.nuts_chains, "num_warmup": cfg.nuts_warmup,
           "num_draws_per_chain": cfg.nuts_draws,
           "ess_min": float(ess.min()), "ess_median": float(np.median(ess)),
           "divergences": int(np.asarray(divergent).sum()),
           "mean_acceptance": float(np.asarray(accept).mean()),
           "mean_leapfrog_steps": float(np.asarray(n_steps).mean()),
           "step_size": np.asarray(step_size).tolist()}
    # Monte Carlo standard error of the reference means, in posterior sds: 1 / sqrt(ESS)
    out["mean_mc_se_in_sd"] = {"max": float(1 / np.sqrt(ess.min())),
                               "median": float(1 / np.sqrt(np.median(ess)))}
    if cfg.nuts_chains >= 2:
        rhat = np.asarray(blackjax.diagnostics.potential_scale_reduction(positions))
        out["rhat_max"] = float(rhat.max())
    return out


def moment_errors(draws: np.ndarray, ref_mean: np.ndarray, ref_sd: np.ndarray) -> dict:
    """q's mean and sd (from its draws) against the reference, per coordinate, in reference
    sds: |mean_q - mean_ref| / sd_ref, and sd_q / sd_ref."""
    z = np.abs(draws.mean(0) - ref_mean) / ref_sd
    ratio = draws.std(0, ddof=1) / ref_sd
    return {"mean_err_max_sd": float(z.max()), "mean_err_rms_sd": float(np.sqrt(np.mean(z ** 2))),
            "sd_ratio_min": float(ratio.min()), "sd_ratio_median": float(np.median(ratio)),
            "sd_ratio_max": float(ratio.max())}


def run_logistic_regression(cfg: Config, log=print) -> tuple[dict, dict]:
    """Fit every family and the minibatch run; returns (results for JSON, arrays to plot)."""
    data = load_breast_cancer_split(cfg.seed, cfg.test_fraction)
    n, dim = data.x_train.shape
    log_joint = logreg_log_joint(data, cfg.prior_scale)
    keys = jax.random.split(jax.random.key(cfg.seed), 8)
    results = {
        "data": {"dataset": "sklearn.datasets.load_breast_cancer", "num_train": int(n),
                 "num_test": int(data.x_test.shape[0]), "dim": int(dim),
                 "split": f"stratified, test_fraction={cfg.test_fraction}, "
                          f"random_state={cfg.seed}",
                 "features": "standardised with the training mean and sd, plus an intercept "
                             "column (last)",
                 "prior": f"w ~ N(0, {cfg.prior_scale}^2 I)", "prior_scale": cfg.prior_scale,
                 "train_positive_fraction": float(data.y_train.mean())},
        "settings": {"steps": cfg.steps, "optimizer": "optax.adam, cosine decay to 1% of the "
                     "peak rate", "learning_rate": cfg.learning_rate,
                     "flow_learning_rate": cfg.flow_learning_rate,
                     "objective": f"svi.ELBO(num_samples={cfg.train_samples}), pathwise",
                     "flow": f"SplineFlow(31, num_layers={cfg.flow_layers}, "
                             f"hidden_sizes=({cfg.flow_hidden},), num_bins=8, init_scale=0.1)",
                     "eval_samples": cfg.eval_samples, "is_samples": cfg.is_samples,
                     "predictive_samples": cfg.predictive_samples,
                     "minibatch_batch_size": cfg.batch_size},
        "families": {},
    }
    fits, draws = {}, {}
    runs = [(name, fam) for name, fam in logreg_families(dim, cfg).items()]
    runs.append(("minibatch", vfam.FullRankNormal(dim)))
    minibatch_joint = svi.minibatch_log_joint(logreg_log_prior(cfg.prior_scale),
                                              logreg_log_likelihood, n)
    full_batch = (jnp.asarray(data.x_train), jnp.asarray(data.y_train))
    x_train, x_test = jnp.asarray(data.x_train), jnp.asarray(data.x_test)
    predictive_fns = {"train": lambda _k, w: jax.nn.sigmoid(x_train @ w),
                      "test": lambda _k, w: jax.nn.sigmoid(x_test @ w)}
    for i, (name, family) in enumerate(runs):
        fit_key, eval_key = jax.random.split(keys[i])
        lr = cfg.flow_learning_rate if name == "spline_flow" else cfg.learning_rate
        evaluate = dict(num_samples=cfg.eval_samples, is_samples=cfg.is_samples,
                        predictive_fns=predictive_fns,
                        predictive_samples=cfg.predictive_samples)
        if name == "minibatch":
            fit = fit_family(fit_key, family, minibatch_joint, cfg.steps, lr, cfg.train_samples,
                             data=full_batch, batch_size=cfg.batch_size)
            # evaluated with the full data as the batch: N/B = 1, the exact log joint
            ev, eval_wall, eval_cpu = evaluate_family(
                eval_key, family, fit.params, lambda w: minibatch_joint(w, full_batch),
                is_log_joint_fn=minibatch_joint, is_batch=full_batch, **evaluate)
        else:
            fit = fit_family(fit_key, family, log_joint, cfg.steps, lr, cfg.train_samples)
            ev, eval_wall, eval_cpu = evaluate_family(eval_key, family, fit.params, log_joint,
                                                      **evaluate)
        log_z = float(ev["log_z_is"])
        row = summarize_log_weights(ev["log_w"])
        row.update(log_evidence_is=log_z, log_evidence_is_samples=cfg.is_samples,
                   fit_wall_s=fit.wall_s, fit_cpu_s=fit.cpu_s, eval_wall_s=eval_wall,
                   eval_cpu_s=eval_cpu, nonfinite_steps=fit.nonfinite_steps,
                   num_params=int(sum(np.size(a) for a in jax.tree_util.tree_leaves(fit.params))),
                   learning_rate=lr,
                   final_trace_mean=float(fit.trace[-max(1, cfg.steps // 10):].mean()))
        row["train"] = predictive_accuracy(ev["predictive"]["train"], data.y_train)
        row["test"] = predictive_accuracy(ev["predictive"]["test"], data.y_test)
        z = ev["z"]
        if name == "minibatch":
            row["batch_size"] = cfg.batch_size
            results["minibatch"] = row
        else:
            results["families"][name] = row
        fits[name], draws[name] = fit, np.asarray(z, np.float64)
        log(f"[logreg] {name:12s} ELBO {row['elbo']:9.3f} +- {row['elbo_se']:.3f}  "
            f"log p(y) IS {log_z:9.3f}  test acc {row['test']['accuracy']:.3f}  "
            f"fit {fit.wall_s:5.1f} s ({fit.cpu_s:.1f} s CPU; total CPU "
            f"{time.process_time():.0f} s)")
    results["minibatch"]["elbo_minus_full_batch"] = (results["minibatch"]["elbo"]
                                                     - results["families"]["full_rank"]["elbo"])

    reference = None
    if cfg.reference:
        reference = run_nuts(keys[6], log_joint, dim, cfg)
    if reference is None:
        results["reference"] = {"skipped": "blackjax not importable" if cfg.reference
                                else "--quick" if cfg.quick else "--no-reference"}
    else:
        ref_draws = reference.pop("draws")
        ref_mean, ref_sd = ref_draws.mean(0), ref_draws.std(0, ddof=1)
        reference.update(method="blackjax NUTS, window adaptation (diagonal mass matrix)",
                         mean=ref_mean.tolist(), sd=ref_sd.tolist())
        results["reference"] = reference
        for name in list(results["families"]) + ["minibatch"]:
            row = results["minibatch"] if name == "minibatch" else results["families"][name]
            row["vs_nuts"] = moment_errors(draws[name], ref_mean, ref_sd)
        draws["nuts"] = ref_draws
        log(f"[logreg] NUTS reference: {reference['wall_s']:.1f} s, min ESS "
            f"{reference['ess_min']:.0f}, {reference['divergences']} divergences")
    for name, row in list(results["families"].items()) + [("minibatch", results["minibatch"])]:
        row["q_mean"] = draws[name].mean(0).tolist()
        row["q_sd"] = draws[name].std(0, ddof=1).tolist()
    results["coefficient_names"] = list(data.names)
    return results, {"fits": fits, "draws": draws, "names": data.names}


def plot_logreg_elbo(arrays: dict, results: dict, cfg: Config, path: pathlib.Path) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    best = max(r["elbo"] for r in results["families"].values())
    for name, fit in arrays["fits"].items():
        steps, mean = running_mean(fit.trace, cfg.running_mean)
        for ax in axes:
            ax.plot(steps + 1, mean, color=COLOURS[name], lw=1.2, label=LABELS[name],
                    ls="--" if name == "minibatch" else "-")
    _log_steps(axes[0])
    axes[0].set_title("training objective (running mean of the per-step ELBO estimate)",
                      fontsize=9)
    axes[1].set_ylim(best - 25, best + 5)
    axes[1].set_title("zoom; dotted: each q's final ELBO from "
                      f"{cfg.eval_samples} draws", fontsize=9)
    for name in arrays["fits"]:
        row = results["minibatch"] if name == "minibatch" else results["families"][name]
        axes[1].axhline(row["elbo"], color=COLOURS[name], ls=":", lw=1)
    for ax in axes:
        ax.set_xlabel("step")
        ax.set_ylabel("ELBO (nats)")
    axes[0].legend(fontsize=8, loc="lower right")
    fig.suptitle("Bayesian logistic regression, breast cancer (N = "
                 f"{results['data']['num_train']}, D = {results['data']['dim']}, prior "
                 f"N(0, {cfg.prior_scale:g}^2 I))", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_logreg_marginals(arrays: dict, results: dict, path: pathlib.Path,
                          num_coefficients: int = 8) -> None:
    """Left: means +- 2 sd of the intercept and the coefficients with the largest |mean|
    (of the reference, or of the full-rank q). Right: each q's sd against the reference's
    (or the full-rank q's) for all 31 coefficients."""
    import matplotlib.pyplot as plt

    draws, names = arrays["draws"], arrays["names"]
    ref_name = "nuts" if "nuts" in draws else "full_rank"
    ref_mean, ref_sd = draws[ref_name].mean(0), draws[ref_name].std(0, ddof=1)
    order = [i for i in np.argsort(-np.abs(ref_mean)) if i != len(names) - 1]
    chosen = [len(names) - 1] + order[: num_coefficients - 1]
    shown = [k for k in ("nuts",) + LOGREG_FAMILIES + ("minibatch",) if k in draws]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.6), gridspec_kw={"width_ratios": [2.2, 1]})
    ax = axes[0]
    width = 0.8 / len(shown)
    for j, name in enumerate(shown):
        m, s = draws[name].mean(0)[chosen], draws[name].std(0, ddof=1)[chosen]
        pos = np.arange(len(chosen)) + (j - (len(shown) - 1) / 2) * width
        ax.errorbar(pos, m, yerr=2 * s, fmt="o", ms=3, capsize=2, color=COLOURS[name],
                    label=LABELS[name])
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xticks(np.arange(len(chosen)))
    ax.set_xticklabels([names[i] for i in chosen], rotation=25, ha="right", fontsize=8)
    ax.set_ylabel("coefficient: mean +- 2 sd")
    ax.set_title(f"posterior marginals (intercept and the {num_coefficients - 1} largest "
                 f"|mean| under {LABELS[ref_name]})", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    ax = axes[1]
    for name in shown:
        if name == ref_name:
            continue
        ax.scatter(ref_sd, draws[name].std(0, ddof=1), s=10, color=COLOURS[name],
                   label=LABELS[name])
    lim = [0, 1.05 * max(float(ref_sd.max()),
                         max(float(draws[k].std(0).max()) for k in shown))]
    ax.plot(lim, lim, color="grey", lw=0.8)
    ax.set_xlim(lim)
    ax.set_ylim(lim)
    ax.set_xlabel(f"sd under {LABELS[ref_name]}")
    ax.set_ylabel("sd under q")
    ax.set_title("marginal sds, all 31 coefficients", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# 2. 2-D targets with log Z = 0
# --------------------------------------------------------------------------------------------

def _log_normal(x, loc, scale):
    return -0.5 * ((x - loc) / scale) ** 2 - jnp.log(scale) - 0.5 * math.log(2 * math.pi)


def banana_log_density(s1: float = 1.0, b: float = 1.0, s2: float = 0.5) -> Callable:
    """z1 ~ N(0, s1^2), z2 | z1 ~ N(b (z1^2 - s1^2), s2^2): normalised, log Z = 0."""
    def log_p(z):
        return _log_normal(z[..., 0], 0.0, s1) + _log_normal(z[..., 1], b * (z[..., 0] ** 2
                                                                             - s1 ** 2), s2)

    return log_p


def banana_sample(key, num_samples: int, s1: float = 1.0, b: float = 1.0,
                  s2: float = 0.5) -> Array:
    """Exact draws ``[n, 2]`` of the banana (ancestral: z1, then z2 | z1)."""
    e = jax.random.normal(key, (num_samples, 2))
    z1 = s1 * e[:, 0]
    return jnp.stack([z1, b * (z1 ** 2 - s1 ** 2) + s2 * e[:, 1]], -1)


def funnel_sample(key, num_samples: int, scale: float = 3.0) -> Array:
    """Exact draws ``[n, 2]`` of Neal's funnel (v, then x | v)."""
    e = jax.random.normal(key, (num_samples, 2))
    v = scale * e[:, 0]
    return jnp.stack([v, jnp.exp(v / 2) * e[:, 1]], -1)


def funnel_log_density(scale: float = 3.0) -> Callable:
    """Neal's funnel, v = z[0] ~ N(0, scale^2), x = z[1] | v ~ N(0, exp(v/2)^2): log Z = 0."""
    def log_p(z):
        return _log_normal(z[..., 0], 0.0, scale) + _log_normal(z[..., 1], 0.0,
                                                                jnp.exp(z[..., 0] / 2))

    return log_p


def banana_gaussian_optimum_kl(s1: float, b: float, s2: float) -> float:
    """min over Gaussians q of KL(q || banana), in closed form (nats).

    For z1 = m1 + t1 e1, z2 = m2 + c e1 + d e2 (e ~ N(0, I)), z2 - b (z1^2 - s1^2) has mean
    m2 - b (m1^2 + t1^2 - s1^2) and variance (c - 2 b m1 t1)^2 + 2 b^2 t1^4 + d^2, so the
    optimum has m2 at that mean, c = 2 b m1 t1, d = s2 and m1 = 0: the full-rank optimum is
    the mean-field one, with u = t1^2 the root of 1 - u / s1^2 - 4 b^2 u^2 / s2^2 = 0 and
    ELBO* = 1/2 - u / (2 s1^2) - b^2 u^2 / s2^2 + log(sqrt(u) / s1).
    """
    a = 4 * b ** 2 / s2 ** 2
    u = (-1 / s1 ** 2 + math.sqrt(1 / s1 ** 4 + 4 * a)) / (2 * a) if b else s1 ** 2
    return -(0.5 - u / (2 * s1 ** 2) - b ** 2 * u ** 2 / s2 ** 2 + 0.5 * math.log(u / s1 ** 2))


def funnel_gaussian_optimum_kl(scale: float) -> float:
    """min over Gaussians q of KL(q || funnel) = log(1 + scale^2 / 2) / 2 (nats).

    E_q[x^2 e^{-v}] = e^{-m_v + t_v^2 / 2} (Var x + (m_x - Cov(x, v))^2), so a correlation
    does not help (m_x absorbs it); then m_v = 0, Var x = e^{-t_v^2 / 2} and
    t_v^2 = 1 / (1 / scale^2 + 1 / 2).
    """
    return 0.5 * math.log1p(scale ** 2 / 2)


MASS_FRACTIONS = (0.99, 0.9, 0.5)  # the contours of the targets' plots


def toy_targets(cfg: Config) -> dict:
    s1, b, s2 = cfg.banana
    return {"banana": {"log_density": banana_log_density(s1, b, s2),
                       "sample": lambda key, n: banana_sample(key, n, s1, b, s2),
                       "gaussian_optimum_kl": banana_gaussian_optimum_kl(s1, b, s2),
                       "description": f"z1 ~ N(0, {s1}^2), z2 | z1 ~ N({b} (z1^2 - {s1}^2), "
                                      f"{s2}^2)", "params": {"s1": s1, "b": b, "s2": s2},
                       "box": (-3.5 * s1, 3.5 * s1, -b * s1 ** 2 - 3 * s2,
                               b * (9 * s1 ** 2 - s1 ** 2) + 2 * s2)},
            "funnel": {"log_density": funnel_log_density(cfg.funnel_scale),
                       "sample": lambda key, n: funnel_sample(key, n, cfg.funnel_scale),
                       "gaussian_optimum_kl": funnel_gaussian_optimum_kl(cfg.funnel_scale),
                       "description": f"v ~ N(0, {cfg.funnel_scale}^2), x | v ~ N(0, e^v)",
                       "params": {"scale": cfg.funnel_scale},
                       "box": (-2.5 * cfg.funnel_scale, 2.5 * cfg.funnel_scale, -12.0, 12.0)}}


def toy_families(cfg: Config) -> dict:
    return {"mean_field": vfam.MeanFieldNormal(2, init_scale=1.0),
            "full_rank": vfam.FullRankNormal(2, init_scale=1.0),
            "spline_flow": vfam.SplineFlow(2, num_layers=cfg.toy_flow_layers,
                                           hidden_sizes=(32, 32), init_scale=1.0)}


def run_toys(cfg: Config, log=print) -> tuple[dict, dict]:
    results, arrays = {}, {}
    specs = toy_targets(cfg)
    for t, target in enumerate(cfg.toy_targets):
        spec = specs[target]
        log_p = spec["log_density"]
        res = {"target": spec["description"], "params": spec["params"], "log_z": 0.0,
               "gaussian_optimum_kl": spec["gaussian_optimum_kl"],
               "settings": {"steps": cfg.toy_steps, "learning_rate": cfg.toy_learning_rate,
                            "objective": f"svi.ELBO(num_samples={cfg.toy_train_samples})",
                            "flow": f"SplineFlow(2, num_layers={cfg.toy_flow_layers}, "
                                    "hidden_sizes=(32, 32), num_bins=8)",
                            "eval_samples": cfg.toy_eval_samples,
                            "is_samples": cfg.toy_is_samples},
               "families": {}}
        keys = jax.random.split(jax.random.fold_in(jax.random.key(cfg.seed), 100 + t), 4)
        # highest-density regions: the level of log p above which a fraction f of p's mass
        # lies is the (1 - f) quantile of log p(z), z ~ p (exact draws)
        log_p_draws = np.asarray(log_p(spec["sample"](keys[3], 200_000)), np.float64)
        levels = [float(np.quantile(log_p_draws, 1 - f)) for f in MASS_FRACTIONS]
        res["hdr_levels"] = dict(zip((f"{f:.0%}" for f in MASS_FRACTIONS), levels))
        arrays[target] = {"log_density": log_p, "box": spec["box"], "levels": levels,
                          "fits": {}, "draws": {}}
        for i, (name, family) in enumerate(toy_families(cfg).items()):
            fit_key, eval_key = jax.random.split(keys[i])
            fit = fit_family(fit_key, family, log_p, cfg.toy_steps, cfg.toy_learning_rate,
                             cfg.toy_train_samples)
            ev, eval_wall, eval_cpu = evaluate_family(eval_key, family, fit.params, log_p,
                                                      num_samples=cfg.toy_eval_samples,
                                                      is_samples=cfg.toy_is_samples)
            z = ev["z"]
            row = summarize_log_weights(ev["log_w"])
            # log Z = 0, so KL(q || p) = log Z - ELBO = -ELBO, with the ELBO's standard error
            row["kl"], row["kl_se"] = 0.0 - row["elbo"], row["elbo_se"]
            row["kl_minus_gaussian_optimum"] = row["kl"] - spec["gaussian_optimum_kl"]
            row["log_z_is"] = float(ev["log_z_is"])
            row.update(fit_wall_s=fit.wall_s, fit_cpu_s=fit.cpu_s, eval_wall_s=eval_wall,
                       eval_cpu_s=eval_cpu, nonfinite_steps=fit.nonfinite_steps)
            res["families"][name] = row
            arrays[target]["fits"][name] = fit
            arrays[target]["draws"][name] = np.asarray(z, np.float64)
            log(f"[{target}] {name:12s} KL(q||p) {row['kl']:.4f} +- {row['kl_se']:.4f}  "
                f"log Z IS {row['log_z_is']:+.4f}  fit {fit.wall_s:5.1f} s ({fit.cpu_s:.1f} s CPU; "
                f"total CPU {time.process_time():.0f} s)")
        results[target] = res
    return results, arrays


def plot_toy_fits(arrays: dict, results: dict, path: pathlib.Path, num_points: int = 1500):
    import matplotlib.pyplot as plt

    targets = list(arrays)
    fig, axes = plt.subplots(len(targets), len(TOY_FAMILIES),
                             figsize=(3.9 * len(TOY_FAMILIES), 3.6 * len(targets)), squeeze=False)
    for r, target in enumerate(targets):
        a = arrays[target]
        x0, x1, y0, y1 = a["box"]
        gx, gy = np.meshgrid(np.linspace(x0, x1, 400), np.linspace(y0, y1, 400))
        log_p = np.asarray(a["log_density"](jnp.stack([gx, gy], -1).astype(jnp.float32)),
                           np.float64)
        levels = a["levels"]  # increasing: 99%, 90%, 50% regions
        for c, name in enumerate(TOY_FAMILIES):
            ax = axes[r, c]
            ax.contour(gx, gy, log_p, levels=levels, colors="k", linewidths=0.8,
                       linestyles=("dotted", "dashed", "solid"))
            z = a["draws"][name][:num_points]
            ax.scatter(z[:, 0], z[:, 1], s=2, alpha=0.35, color=COLOURS[name])
            row = results[target]["families"][name]
            ax.set_title(f"{target}: {LABELS[name]}\nKL(q||p) = {row['kl']:.3f} "
                         f"+- {row['kl_se']:.3f} nats", fontsize=9)
            ax.set_xlim(x0, x1)
            ax.set_ylim(y0, y1)
            ax.set_xlabel("z1" if target == "banana" else "v")
            ax.set_ylabel("z2" if target == "banana" else "x")
    optima = ", ".join(f"{t} {results[t]['gaussian_optimum_kl']:.4f}" for t in targets)
    fig.suptitle("black: the target's highest-density regions holding "
                 f"{', '.join(f'{m:.0%}' for m in reversed(MASS_FRACTIONS))} of its mass "
                 "(solid, dashed, dotted); dots: draws from the fitted q.\n"
                 f"Best Gaussian's KL (closed form): {optima} nats", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_toy_elbo(arrays: dict, results: dict, cfg: Config, path: pathlib.Path) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(arrays), figsize=(5.5 * len(arrays), 3.8), squeeze=False)
    for ax, (target, a) in zip(axes[0], arrays.items()):
        for name, fit in a["fits"].items():
            steps, mean = running_mean(fit.trace, cfg.running_mean)
            ax.plot(steps + 1, mean, color=COLOURS[name], label=LABELS[name], lw=1.2)
        ax.axhline(0.0, color="k", ls="--", lw=0.8, label="log Z = 0")
        ax.axhline(-results[target]["gaussian_optimum_kl"], color="grey", ls=":", lw=1,
                   label="best Gaussian (closed form)")
        _log_steps(ax)
        ax.set_ylim(-1.5, 0.2)
        ax.set_xlabel("step")
        ax.set_ylabel("ELBO (nats), running mean")
        ax.set_title(f"{target}: the gap to 0 is KL(q || p)", fontsize=9)
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------

def machine_info(argv=None) -> dict:
    return {**_cli.environment("svi.py", argv, ("jax", "optax", "distrax", "flax", "numpy",
                                                "sklearn", "blackjax", "matplotlib")),
            "jax_backend": jax.default_backend(),
            "jax_devices": [str(d) for d in jax.devices()]}


def run_all(cfg: Config, out: pathlib.Path, log=print, argv=None) -> dict:
    """Both experiments, their figures and ``results.json`` in ``out``; returns the results."""
    import matplotlib

    matplotlib.use("Agg")
    t0 = time.perf_counter()
    logreg, logreg_arrays = run_logistic_regression(cfg, log)
    toys, toy_arrays = run_toys(cfg, log)
    total = time.perf_counter() - t0
    out.mkdir(parents=True, exist_ok=True)
    plot_logreg_elbo(logreg_arrays, logreg, cfg, out / "logreg_elbo.png")
    plot_logreg_marginals(logreg_arrays, logreg, out / "logreg_marginals.png")
    plot_toy_fits(toy_arrays, toys, out / "toy_fits.png")
    plot_toy_elbo(toy_arrays, toys, cfg, out / "toy_elbo.png")
    results = {"meta": {**machine_info(argv), "config": dataclasses.asdict(cfg),
                        "total_wall_s": total, "wall_times_include_jit_compilation": True},
               "logistic_regression": logreg, **toys}
    _cli.write_json(out / "results.json", results, indent=2)
    return results


def make_parser() -> argparse.ArgumentParser:
    p = _cli.Parser(prog="svi.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT,
                   help="output folder (default outputs/svi)")
    p.add_argument("--quick", action="store_true", help="smoke test: fewer steps and draws")
    p.add_argument("--seed", type=int, default=None, help="default 0")
    p.add_argument("--steps", type=int, default=None,
                   help="logistic-regression steps per family (default 4000; 400 with --quick)")
    p.add_argument("--toy-steps", type=int, default=None,
                   help="steps per family on the 2-D targets (default 5000; 800 with --quick)")
    p.add_argument("--prior-scale", type=float, default=None,
                   help="sd of the N(0, s^2 I) prior on the 31 coefficients (default 1)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="minibatch size of the minibatch run (default 64; at most 455)")
    p.add_argument("--flow-layers", type=int, default=None,
                   help="coupling layers of SplineFlow(31) (default 2)")
    p.add_argument("--eval-samples", type=int, default=None,
                   help="draws for the final ELBO (default 10000; 2000 with --quick)")
    p.add_argument("--is-samples", type=int, default=None,
                   help="k of the importance-sampling log-evidence (default 10000)")
    p.add_argument("--no-reference", action="store_true", help="skip the NUTS reference")
    return p


def config_from_args(args: argparse.Namespace) -> Config:
    """The run's Config; ValueError (one line) for a bad flag."""
    for flag in ("seed",):
        v = getattr(args, flag)
        if v is not None and not 0 <= v < 2 ** 32:
            raise ValueError(f"--{flag} must be in [0, 2^32); got {v}")
    for flag in ("steps", "toy_steps", "flow_layers", "eval_samples", "is_samples"):
        v = getattr(args, flag)
        if v is not None and v < (2 if flag == "eval_samples" else 1):
            raise ValueError(f"--{flag.replace('_', '-')} must be >= "
                             f"{2 if flag == 'eval_samples' else 1}; got {v}")
    if args.prior_scale is not None and not (math.isfinite(args.prior_scale)
                                             and args.prior_scale > 0):
        raise ValueError(f"--prior-scale must be a finite number > 0; got {args.prior_scale}")
    overrides = {k: v for k, v in dict(seed=args.seed, steps=args.steps,
                                       toy_steps=args.toy_steps, prior_scale=args.prior_scale,
                                       batch_size=args.batch_size, flow_layers=args.flow_layers,
                                       eval_samples=args.eval_samples,
                                       is_samples=args.is_samples).items() if v is not None}
    if args.no_reference:
        overrides["reference"] = False
    cfg = quick_config(**overrides) if args.quick else Config(**overrides)
    num_train = int(round(569 * (1 - cfg.test_fraction)))  # 455 rows in the split
    if not 1 <= cfg.batch_size <= num_train:
        raise ValueError(f"--batch-size must be in [1, {num_train}] (the training rows); got "
                         f"{cfg.batch_size}")
    return cfg


def main(argv=None) -> dict:
    parser = make_parser()
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ValueError as err:
        parser.error(str(err))
    _cli.check_output_folder(parser, args.out, "--out")
    results = run_all(cfg, args.out, argv=argv)
    lr = results["logistic_regression"]
    print(f"wrote {args.out}/results.json and 4 PNGs in {results['meta']['total_wall_s']:.1f} s "
          f"(minibatch ELBO - full-batch ELBO: {lr['minibatch']['elbo_minus_full_batch']:+.3f})")
    return results


if __name__ == "__main__":
    main()
