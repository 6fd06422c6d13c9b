"""Regenerate the figures of the documentation site from the experiments' code.

    python docs/make_figures.py            # EM and CAVI figures (about a minute), VAE figures copied
    python docs/make_figures.py --help

Writes PNGs into docs/figures/<topic>/, where the pages link to them:

* docs/figures/gmm_em/ from ``experiments/gmm_em.py`` (EM on Old Faithful, the synthetic run);
* docs/figures/cavi/   from ``experiments/cavi.py`` (Normal-Gamma, Bayesian GMM on Old Faithful);
* docs/figures/vae/    from the 200-epoch MNIST run of ``experiments/vae.py``;
* docs/figures/ais/, docs/figures/elbo/ from the linear-Gaussian examples defined here;
* docs/figures/estimators/ from the functions of ``experiments/bench_estimators.py``.

The experiments run in a temporary folder; only their PNGs are copied. See --help for the VAE
choices: the full MNIST run takes about 10 minutes on a 2-core CPU, so by default its figures
are copied from the kept run in outputs/vae_mnist_cpu/ instead of re-trained.
"""

from __future__ import annotations

import argparse
import pathlib
import shutil
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIGURES = ROOT / "docs" / "figures"
VAE_RUN = ROOT / "outputs" / "vae_mnist_cpu"
VAE_PNGS = ("training_curves.png", "reconstructions.png", "samples.png")
EM_PNGS = ("old_faithful_em.png", "old_faithful_log_likelihood.png", "synthetic_em.png")
CAVI_PNGS = ("normal_gamma.png", "bgmm_old_faithful.png", "bgmm_elbo.png")
TOPICS = ("gmm_em", "cavi", "vae", "ais", "elbo", "estimators")


def _run(args: list[str]) -> None:
    print("+", " ".join(args), flush=True)
    subprocess.run([sys.executable, *args], cwd=ROOT, check=True)


def _copy(src_dir: pathlib.Path, names: tuple[str, ...], topic: str) -> None:
    dest = FIGURES / topic
    dest.mkdir(parents=True, exist_ok=True)
    for name in names:
        src = src_dir / name
        if not src.is_file():
            raise SystemExit(f"expected figure {src.name} was not written by the experiment")
        shutil.copyfile(src, dest / name)
        print(f"wrote docs/figures/{topic}/{name}", flush=True)


def ais_figures(out_dir: pathlib.Path = FIGURES / "ais") -> dict:
    """The worked example of docs/marginal_likelihood.md, on the linear-Gaussian model.

    Estimates log p(x) for 50 simulated examples (latent 10, data 40, noise 0.4, float64; the
    columns of W mixed so that the latents are correlated a posteriori) by naive Monte Carlo,
    importance sampling with two mean-field proposals (with their Pareto k-hat), AIS from the
    prior and BDMC at T = 10, 100, 1000, against the exact value; writes
    ``bdmc_sandwich.png`` and ``results.json`` into ``out_dir`` and returns the numbers.
    About a minute on a 2-core CPU. Run it from the repository root with

        python docs/make_figures.py --only ais
    """
    import json
    import platform
    import time

    import distrax
    import jax
    import jax.numpy as jnp
    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vijax import ais as vais
    from vijax import linear_gaussian as lg
    from vijax import marginal

    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    latent, data, num, noise = 10, 40, 50, 0.4
    with jax.enable_x64(True):
        base = lg.random_model(jax.random.key(0), latent, data, noise_scale=noise,
                               dtype=jnp.float64)
        # W L^T with L L^T = 0.3 I + 0.7 (all ones): correlated latents a posteriori
        mix = jnp.linalg.cholesky(0.3 * jnp.eye(latent) + 0.7 * jnp.ones((latent, latent)))
        model = lg.LinearGaussian(base.weight @ mix.T, base.bias, base.noise_scale)
        x, z = lg.sample(jax.random.key(1), model, num)
        exact = np.asarray(lg.log_marginal(model, x))
        loc, cov = lg.posterior(model, x)
        fn = lambda z: lg.log_joint(model, x, z)
        prior = distrax.MultivariateNormalDiag(jnp.zeros((num, latent)), jnp.ones((num, latent)))
        # the KL(q || p)-optimal mean-field Gaussian: precisions = diagonal of the posterior
        # precision (PRML §10.1.2), narrower than the posterior's marginals
        kl_sd = 1.0 / jnp.sqrt(jnp.diag(jnp.linalg.inv(cov)))
        marg_sd = jnp.sqrt(jnp.diag(cov))
        proposals = {"mean-field, KL(q||p)-optimal": kl_sd, "mean-field, posterior marginals":
                     marg_sd}
        rows, results = [], {"exact_mean": float(exact.mean())}

        def timed(f, *args):
            jax.block_until_ready(f(*args))  # compile
            start = time.perf_counter()
            out = jax.block_until_ready(f(*args))
            return out, time.perf_counter() - start

        k_is = 10_000
        naive, seconds = timed(jax.jit(lambda key: marginal.naive_monte_carlo(
            key, lambda z: lg.log_likelihood(model, x, z), prior, num_samples=k_is,
            chunk_size=1000)), jax.random.key(2))
        rows.append({"method": "naive Monte Carlo (prior)", "budget": f"K = {k_is}",
                     "error": float(np.mean(np.asarray(naive) - exact)), "seconds": seconds})
        for name, sd in proposals.items():
            q = distrax.MultivariateNormalDiag(loc, jnp.broadcast_to(sd, loc.shape))
            log_w, seconds = timed(jax.jit(lambda key: marginal.importance_log_weights(
                key, fn, q, num_samples=k_is, chunk_size=1000)), jax.random.key(3))
            est = np.asarray(jax.nn.logsumexp(log_w, axis=0) - np.log(k_is))
            khat = vais.psis_khat(log_w, axis=0)
            rows.append({"method": f"IS, q = {name}", "budget": f"K = {k_is}",
                         "error": float(np.mean(est - exact)),
                         "khat_median": float(np.median(khat)),
                         "khat_max": float(np.max(khat)), "seconds": seconds})
        sandwich = {}
        for t in (10, 100, 1000):
            run = jax.jit(lambda key: vais.bdmc(key, fn, prior, z, num_temperatures=t,
                                                num_chains=16))
            res, seconds = timed(run, jax.random.key(4 + t))
            lower, upper = np.asarray(res.lower), np.asarray(res.upper)
            sandwich[t] = (float(np.mean(lower - exact)), float(np.mean(upper - exact)))
            rows.append({"method": "AIS from the prior (BDMC lower)",
                         "budget": f"T = {t}, 16 chains",
                         "error": sandwich[t][0], "upper_error": sandwich[t][1],
                         "gap": float(np.mean(upper - lower)),
                         "stderr": float(np.mean(np.asarray(res.forward.stderr))),
                         "acceptance": float(np.mean(np.asarray(res.forward.acceptance_rate))),
                         "seconds": seconds})
        results["rows"] = rows
        results["machine"] = (f"{platform.machine()}, {jax.devices()[0].platform}, "
                              f"JAX {jax.__version__}")

    fig, ax = plt.subplots(figsize=(6, 3.6))
    ts = sorted(sandwich)
    ax.plot(ts, [sandwich[t][0] for t in ts], "o-", label="AIS (forward): lower bound")
    ax.plot(ts, [sandwich[t][1] for t in ts], "s-", label="reverse AIS: upper bound")
    ax.axhline(0.0, color="k", lw=0.8, label="exact log p(x)")
    for row, style in zip(rows[1:3], (":", "--")):
        ax.axhline(row["error"], color="gray", ls=style, lw=1,
                   label=f"{row['method']} (K = {k_is})")
    ax.set_xscale("log")
    ax.set_xlabel("temperatures T")
    ax.set_ylabel("mean error (nats per example)")
    ax.set_title("BDMC on a linear-Gaussian model (d = 10, D = 40)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "bdmc_sandwich.png", dpi=120)
    plt.close(fig)
    (out_dir / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results, indent=1), flush=True)
    return results


def elbo_figures(out_dir: pathlib.Path = FIGURES / "elbo") -> dict:
    """The figure of docs/elbo.md: log p(x) = ELBO + KL(q || p(z|x)) and the IWAE bounds.

    One observation x of a linear-Gaussian model (latent 5, data 20, noise 0.5, float64) and
    q = N(mu + delta s, Sigma): the exact posterior N(mu, Sigma) with its mean shifted by delta
    posterior standard deviations s along every axis. Left: the exact log p(x), the Monte
    Carlo ELBO (``vijax.elbo.elbo``, 2000 samples, +-2 standard errors) and the closed-form
    gap KL(q || p(z|x)) for delta in [-2, 2]. Right: the IWAE-K bound
    (``vijax.elbo.iwae_bound``) at delta = 1 for K = 1 ... 1000, over 1000 replications.
    Writes ``elbo_gap_iwae.png`` and ``results.json`` into ``out_dir`` and returns the numbers.
    Under a minute on a 2-core CPU. Run it from the repository root with

        python docs/make_figures.py --only elbo
    """
    import json

    import distrax
    import jax
    import jax.numpy as jnp
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from vijax import elbo as velbo
    from vijax import linear_gaussian as lg

    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    latent, data, noise = 5, 20, 0.5
    num_elbo, reps, delta_iwae = 2000, 1000, 1.0
    deltas = np.linspace(-2.0, 2.0, 33)
    ks = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
    with jax.enable_x64(True):
        model = lg.random_model(jax.random.key(0), latent, data, noise_scale=noise,
                                dtype=jnp.float64)
        x, _ = lg.sample(jax.random.key(1), model, 1)
        loc, cov = lg.posterior(model, x)  # [1, latent], [latent, latent]
        sd, chol = jnp.sqrt(jnp.diag(cov)), jnp.linalg.cholesky(cov)
        exact = float(lg.log_marginal(model, x)[0])

        def q_at(delta, batch):
            return distrax.MultivariateNormalTri(
                jnp.broadcast_to(loc + delta * sd, (batch, latent)),
                jnp.broadcast_to(chol, (batch, latent, latent)))

        @jax.jit
        def elbo_samples(key, delta):
            # num_elbo single-sample ELBOs: their mean is the ELBO estimate, their sd its noise
            keys = jax.random.split(key, num_elbo)
            fn = lambda z: lg.log_joint(model, x, z)
            return jax.vmap(lambda k: velbo.elbo(k, fn, q_at(delta, 1))[0])(keys)

        def kl_at(delta):
            return float(lg.gaussian_kl(loc + delta * sd, cov, loc, cov)[0])

        kl = np.array([kl_at(d) for d in deltas])
        values = [np.asarray(elbo_samples(jax.random.key(10 + i), d))
                  for i, d in enumerate(deltas)]
        elbo_mean = np.array([v.mean() for v in values])
        elbo_se = np.array([v.std(ddof=1) / np.sqrt(num_elbo) for v in values])

        # IWAE-K: `reps` independent estimates at once, as a batch of copies of x
        x_reps = jnp.broadcast_to(x, (reps, data))
        q_iwae = q_at(delta_iwae, reps)
        fn_reps = lambda z: lg.log_joint(model, x_reps, z)
        iwae = {k: np.asarray(velbo.iwae_bound(jax.random.key(100 + k), fn_reps, q_iwae,
                                               num_samples=k)) for k in ks}
        kl_iwae = kl_at(delta_iwae)

    results = {
        "model": {"latent_dim": latent, "data_dim": data, "noise_scale": noise},
        "log_marginal": exact,
        "elbo": {"num_samples": num_elbo, "delta": deltas.tolist(), "kl": kl.tolist(),
                 "mean": elbo_mean.tolist(), "stderr": elbo_se.tolist(),
                 # at delta = 0 every sample is log p(x) itself (SE 0): the error there is rounding
                 "error_at_delta_0": float(elbo_mean[deltas == 0][0] - exact),
                 "max_abs_error_in_se_delta_not_0": float(np.max(
                     np.abs(elbo_mean - (exact - kl))[deltas != 0] / elbo_se[deltas != 0]))},
        "iwae": {"delta": delta_iwae, "kl": kl_iwae, "replications": reps,
                 "rows": [{"K": k, "gap_mean": float(exact - iwae[k].mean()),
                           "stderr": float(iwae[k].std(ddof=1) / np.sqrt(reps)),
                           "sd": float(iwae[k].std(ddof=1))} for k in ks]},
    }

    fig = Figure(figsize=(9, 4.6))
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)
    left.fill_between(deltas, exact - kl, exact, color="C1", alpha=0.25, lw=0,
                      label=r"gap = KL$(q \,\|\, p(z \mid x))$, closed form")
    left.axhline(exact, color="k", lw=1, label=r"$\log p(x)$, exact")
    left.plot(deltas, exact - kl, color="C1", lw=1, ls="--", label=r"$\log p(x) - $KL")
    left.fill_between(deltas, elbo_mean - 2 * elbo_se, elbo_mean + 2 * elbo_se, color="C0",
                      alpha=0.4, lw=0)
    left.plot(deltas, elbo_mean, "o", color="C0", ms=3,
              label=f"ELBO, Monte Carlo ({num_elbo} samples, ±2 SE)")
    left.axvline(delta_iwae, color="gray", lw=0.8, ls=":")
    left.set_xlabel(r"shift $\delta$ of q's mean (posterior sds)")
    left.set_ylabel("nats")
    left.set_title(r"$\log p(x) = \mathrm{ELBO} + \mathrm{KL} \geq \mathrm{ELBO}$", fontsize=10)
    left.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.17), ncol=2)

    mean = np.array([iwae[k].mean() for k in ks])
    se = np.array([iwae[k].std(ddof=1) / np.sqrt(reps) for k in ks])
    sd_one = np.array([iwae[k].std(ddof=1) for k in ks])
    right.fill_between(ks, mean - sd_one, mean + sd_one, color="C0", alpha=0.15, lw=0,
                       label="±1 sd of one estimate")
    right.errorbar(ks, mean, yerr=2 * se, fmt="o-", color="C0", ms=3, capsize=2,
                   label=f"IWAE-K bound, mean of {reps} (±2 SE)")
    right.axhline(exact, color="k", lw=1, label=r"$\log p(x)$, exact")
    right.axhline(exact - kl_iwae, color="C1", lw=1, ls="--",
                  label=r"ELBO $= \log p(x) - $KL")
    right.set_xscale("log")
    right.set_xlabel("importance samples K")
    right.set_ylabel("nats")
    right.set_title(rf"IWAE bound at $\delta$ = {delta_iwae:g} (KL = {kl_iwae:.2f} nats)",
                    fontsize=10)
    right.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.17), ncol=2)
    fig.suptitle(f"linear-Gaussian model (d = {latent}, D = {data}, σ = {noise}), one x",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(out_dir / "elbo_gap_iwae.png", dpi=110)
    (out_dir / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {(out_dir / 'elbo_gap_iwae.png').relative_to(ROOT)}", flush=True)
    print(json.dumps({k: v for k, v in results.items() if k != "elbo"}, indent=1), flush=True)
    return results


def estimator_figures(out_dir: pathlib.Path = FIGURES / "estimators", reps: int = 500) -> list:
    """The gradient-variance figure of docs/results.md, from ``experiments/bench_estimators.py``.

    Runs the benchmark's ``run`` (its defaults: latent 5, data 10, one observation, float64, q
    shifted 0.3 from the posterior mean with the posterior's marginal scales) with ``reps``
    seeds per estimator, and plots the variance of the gradient with respect to q's loc and
    log-scale relative to pathwise, against K in {1, 5, 50}, for the K-sample ELBO and the
    IWAE-K bound. The biased estimator, STL for IWAE at K > 1 (Tucker et al. 2019, §3; the
    measured distance to the pathwise mean, in standard errors, is ``max_z_vs_pathwise``), is
    drawn hollow. Writes ``gradient_variance.png`` and ``results.json`` into ``out_dir`` and
    returns the benchmark's rows. About 1.5 minutes of CPU time on a 2-core CPU at 500 seeds.
    Run it from the repository root with

        python docs/make_figures.py --only estimators
    """
    import importlib.util
    import json

    import jax

    spec = importlib.util.spec_from_file_location(
        "bench_estimators", ROOT / "experiments" / "bench_estimators.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)

    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    latent, data = 5, 10
    with jax.enable_x64(True):
        rows = bench.run(reps, latent, data)
    rows = [{key: (value if isinstance(value, (str, int)) else float(value))
             for key, value in row.items() if key != "us_per_grad"} for row in rows]
    for row in rows:  # Tucker et al. 2019, §3; the measured bias is in max_z_vs_pathwise
        row["biased"] = row["objective"] == "iwae" and row["estimator"] == "STL" and row["K"] > 1
    results = {"reps": reps, "latent_dim": latent, "data_dim": data, "rows": rows}
    (out_dir / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    _plot_estimator_variances(results, out_dir / "gradient_variance.png")
    print(bench.format_table([{**r, "us_per_grad": float("nan")} for r in rows]), flush=True)
    return rows


def _plot_estimator_variances(results: dict, path: pathlib.Path) -> None:
    """Variance of the variational-parameter gradient relative to pathwise against K, one
    panel per objective; biased estimators hollow. ``results`` as written by
    :func:`estimator_figures`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    # colour, marker and a small horizontal offset (so that equal ratios stay visible)
    styles = {"pathwise": ("k", "o", 1.0), "score": ("C3", "s", 1.0),
              "score+LOO": ("C1", "D", 0.94), "STL": ("C2", "^", 1.06),
              "DReG": ("C0", "v", 0.94)}
    labels = {"score+LOO": "score + leave-one-out (VIMCO for IWAE)",
              "STL": "sticking the landing (STL)"}
    rows = results["rows"]
    fig = Figure(figsize=(9, 4.4))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2, sharey=True)
    for ax, objective, title in zip(axes, ("elbo", "iwae"),
                                    ("K-sample ELBO (elbo)", "IWAE-K bound (iwae_bound)")):
        for name, (color, marker, shift) in styles.items():
            these = [r for r in rows if r["objective"] == objective
                     and r["estimator"].split(" ")[0] == name]
            if not these:
                continue
            ks = [r["K"] * shift for r in these]
            ax.plot(ks, [r["ratio_phi"] for r in these], "-", color=color, lw=1, alpha=0.6)
            for k, r in zip(ks, these):
                ax.plot(k, r["ratio_phi"], marker, color=color, ms=6,
                        mfc="white" if r["biased"] else color)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks([1, 5, 50], ["1", "5", "50"])
        ax.set_xlim(0.7, 75)
        ax.set_xlabel("samples K")
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="major", color="0.9", lw=0.6)
    axes[0].set_ylabel(r"Var($\nabla_\phi$) / Var($\nabla_\phi$ pathwise)")
    handles = [Line2D([], [], color=c, marker=m, label=labels.get(n, n))
               for n, (c, m, _) in styles.items()]
    handles.append(Line2D([], [], ls="", marker="^", color="C2", mfc="white",
                          label="hollow: biased (STL for IWAE, K > 1)"))
    fig.legend(handles=handles, fontsize=7.5, loc="lower center", ncol=3, frameon=False)
    fig.suptitle(f"gradient variance for q's loc and log-scale, linear-Gaussian model "
                 f"(d = {results['latent_dim']}, D = {results['data_dim']}), "
                 f"{results['reps']} seeds per estimator", fontsize=10)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(path, dpi=110)
    print(f"wrote {path.relative_to(ROOT)}", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="""Settings and run times (2-core CPU):
  EM      experiments/gmm_em.py with its defaults (100,000 synthetic points, 8 restarts):
          about 40 s. With --quick: --synthetic-n 20000, a few seconds faster to fit; the
          synthetic figure then shows a smaller sample than the page describes.
  CAVI    experiments/cavi.py with its defaults: about 20 s (--quick changes nothing).
  AIS     the linear-Gaussian worked example of the log p(x) page (float64): about a minute.
  ELBO    log p(x) = ELBO + KL and the IWAE bounds on a linear-Gaussian model (float64):
          under a minute.
  ESTIMATORS  experiments/bench_estimators.py's run() with --estimator-reps seeds per
          estimator (default 500; the Results table uses 2000): about 1.5 min of CPU.
  VAE     --vae copy (default): copy the figures of the kept 200-epoch run in
          outputs/vae_mnist_cpu/ (no training).
          --vae quick: QUICK SETTINGS, experiments/vae.py --quick (10 epochs, log p(x)
          with k = 1000 on 1000 test images; 1.5-3 min): the figures show a 10-epoch model,
          not the 200-epoch run the pages describe.
          --vae full: the pages' run, experiments/vae.py with its defaults (200 epochs,
          about 10 min), in a temporary folder; only its PNGs are copied.
          --vae skip: leave docs/figures/vae/ as it is.
  MNIST and Old Faithful are read from ../shared/data/ beside the repository (see the
  experiments' --help); nothing is downloaded.""")
    parser.add_argument("--quick", action="store_true",
                        help="quick settings for the EM synthetic run (see below)")
    parser.add_argument("--vae", choices=("copy", "quick", "full", "skip"), default="copy",
                        help="how to produce the VAE figures (default: copy)")
    parser.add_argument("--only", choices=TOPICS, action="append",
                        help="regenerate only this topic (repeatable)")
    parser.add_argument("--estimator-reps", type=int, default=500, metavar="N",
                        help="seeds per estimator for the estimators figure (default: 500)")
    args = parser.parse_args(argv)
    if args.estimator_reps < 2:
        parser.error(f"--estimator-reps must be >= 2 (a variance needs two samples); "
                     f"got {args.estimator_reps}")
    topics = set(args.only or TOPICS)
    if "ais" in topics:
        ais_figures()
    if "elbo" in topics:
        elbo_figures()
    if "estimators" in topics:
        estimator_figures(reps=args.estimator_reps)

    with tempfile.TemporaryDirectory(prefix="vijax_figures_") as tmp:
        tmp = pathlib.Path(tmp)
        if "gmm_em" in topics:
            out = tmp / "gmm_em"
            extra = ["--synthetic-n", "20000"] if args.quick else []
            _run(["experiments/gmm_em.py", "--out", str(out), *extra])
            _copy(out, EM_PNGS, "gmm_em")
        if "cavi" in topics:
            out = tmp / "cavi"
            _run(["experiments/cavi.py", "--out", str(out)])
            _copy(out, CAVI_PNGS, "cavi")
        if "vae" in topics and args.vae != "skip":
            if args.vae == "copy":
                if not all((VAE_RUN / name).is_file() for name in VAE_PNGS):
                    raise SystemExit(f"no kept run in {VAE_RUN.relative_to(ROOT)}: use --vae full")
                _copy(VAE_RUN, VAE_PNGS, "vae")
            elif args.vae == "quick":
                out = tmp / "vae_quick"
                _run(["experiments/vae.py", "--quick", "--no-progress", "--workdir", str(out)])
                _copy(out, VAE_PNGS, "vae")
            else:
                out = tmp / "vae_full"
                _run(["experiments/vae.py", "--no-progress", "--workdir", str(out)])
                _copy(out, VAE_PNGS, "vae")


if __name__ == "__main__":
    main()
