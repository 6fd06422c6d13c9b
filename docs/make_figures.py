"""Regenerate the figures of the documentation site from the experiments' code.

    python docs/make_figures.py            # EM and CAVI figures (about a minute), VAE figures copied
    python docs/make_figures.py --help

Writes PNGs into docs/figures/<topic>/, where the pages link to them:

* docs/figures/gmm_em/ from ``experiments/gmm_em.py`` (EM on Old Faithful, the synthetic run);
* docs/figures/cavi/   from ``experiments/cavi.py`` (Normal-Gamma, Bayesian GMM on Old Faithful);
* docs/figures/vae/    from the 200-epoch MNIST run of ``experiments/vae.py``.

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
    parser.add_argument("--only", choices=("gmm_em", "cavi", "vae", "ais"), action="append",
                        help="regenerate only this topic (repeatable)")
    args = parser.parse_args(argv)
    topics = set(args.only or ("gmm_em", "cavi", "vae", "ais"))
    if "ais" in topics:
        ais_figures()

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
