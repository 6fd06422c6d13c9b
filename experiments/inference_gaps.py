"""Inference gaps of a trained MNIST VAE (Cremer, Li & Duvenaud 2018) and semi-amortized refinement.

For the VAE written by ``experiments/vae.py --workdir DIR`` (``--checkpoint DIR``; without it a
VAE is trained here first) and the first ``--num-test`` MNIST test images (binarized once, as
every vijax evaluation does), with :mod:`vijax.amortized`:

1. log p^(x): importance sampling with k = ``--is-samples`` (5000), with the encoder's q(z|x) as
   proposal (:func:`vijax.vae.log_likelihood_is`) and with q* as proposal; the table's log p^(x)
   takes, per image, the estimate whose proposal has the larger ELBO.
2. L[q*]: a diagonal Gaussian optimised per image with the decoder fixed (per-datapoint SVI,
   ``--local-steps`` Adam steps from the encoder's output), its ELBO from ``--elbo-samples``
   draws; its convergence: L[q*] every 10 % of the steps (change over the last 10 % < 0.05
   nats?), and the time of fit plus evaluation (the speed goal: <= 2 minutes for 1000 images).
3. L[q]: the encoder's ELBO (same draws: common random numbers).
4. Gaps: approximation = log p^(x) - L[q*], amortization = L[q*] - L[q]; printed next to
   Cremer et al.'s MNIST row for the fully factorised Gaussian (their Table 2).
5. Semi-amortized inference (Kim et al. 2018): the ELBO after 0, 5, 20 and 100 (every 5) gradient
   steps from the encoder's q, with Adam(1e-2) and with SGD(1e-3); plot of ELBO vs steps.
6. Optional (``--flow-images N``): q* in a spline-flow family for the first N images.

Usage (from the repository root)::

    python experiments/vae.py --workdir /tmp/vae_run            # the trained model, once
    python experiments/inference_gaps.py --checkpoint /tmp/vae_run --out outputs/inference_gaps
    python experiments/inference_gaps.py --quick --out /tmp/gaps_quick   # smoke test, < 60 s

Writes ``results.json`` (every number, date, CPU model, command), ``refinement.png``,
``qstar_convergence.png`` and ``gaps_per_image.png`` into ``--out``. Times include JIT
compilation (first calls).
"""

from __future__ import annotations

import pathlib
import time

import numpy as np

# experiments/ is sys.path[0] when run as a script; this puts the repository root there too
import _amortized_common as common

# jax and vijax are imported by _imports(), after the flags are checked
jax = jnp = optax = am = vfam = svi = None


def _imports():
    global jax, jnp, optax, am, vfam, svi
    jax, jnp, optax, am, vfam, svi = common.jax_modules()


DEFAULT_OUT = common.REPO_ROOT / "outputs" / "inference_gaps"
# Cremer, Li & Duvenaud 2018, Table 2, MNIST, fully factorised Gaussian (nats)
CREMER_MNIST_FFG = {"log_px": -89.80, "elbo_local": -91.23, "elbo_amortized": -92.57,
                    "approximation_gap": 1.43, "amortization_gap": 1.34}
REFINE_STEPS_REPORTED = (0, 5, 20, 100)
DIFFERENCES = [
    "Network: ours is the IWAE paper's one-stochastic-layer MNIST VAE (784-200-200-50, tanh, "
    "encoder scale exp of a linear layer, Bernoulli decoder, output bias at the logit of the "
    "pixel means). Cremer et al. also use a 50-dimensional latent space with a fully factorised "
    "Gaussian q for this row; we have not reproduced the rest of their recipe (network widths "
    "and activations, training length, any warm-up), so the rows compare setups, not code.",
    "Training: ours is 200 epochs of the analytic-KL ELBO on dynamically binarized MNIST "
    "(60000 images), Adam (eps 1e-4), batch 100, cosine decay from 1e-3 to 1e-4 "
    "(experiments/vae.py defaults).",
    "log p^(x): ours is importance sampling with k = 5000 (proposal q(z|x), and q*), no "
    "annealed importance sampling; the paper's estimate also uses AIS, which is tighter, so "
    "our log p^(x) and approximation gap err low.",
    "q*: ours is optimised per image by Adam from the encoder's output for a fixed number of "
    "steps (convergence recorded in results.json); its ELBO from a finite number of draws.",
    "Images: ours are the first 1000 MNIST test images, binarized once with vijax's fixed "
    "evaluation seed.",
]


def make_parser():
    p = common.Parser(prog="inference_gaps.py", description=__doc__.split("\n\n")[0])
    common.add_model_flags(p)
    p.add_argument("--quick", action="store_true",
                   help="smoke test: a 1-epoch VAE on 1000 images (unless --checkpoint), 20 "
                        "test images, few steps and samples")
    p.add_argument("--num-test", type=int, default=None,
                   help="test images (default 1000; 20 with --quick)")
    p.add_argument("--is-samples", type=int, default=None,
                   help="k of the importance-sampling log p(x) (default 5000; 200 with --quick)")
    p.add_argument("--elbo-samples", type=int, default=None,
                   help="draws for each ELBO estimate (default 1000; 20 with --quick)")
    p.add_argument("--local-steps", type=int, default=None,
                   help="Adam steps of the per-image q* (default 2000; 100 with --quick), "
                        "a multiple of 10")
    p.add_argument("--local-lr", type=float, default=1e-2,
                   help="q*'s Adam rate, cosine-decayed to 5%% over the steps (default 1e-2)")
    p.add_argument("--refine-steps", type=int, default=100,
                   help="semi-amortized refinement steps, a multiple of 5 (default 100)")
    p.add_argument("--flow-images", type=int, default=0,
                   help="also fit a spline-flow q* on the first N images (default 0: skip)")
    p.add_argument("--flow-steps", type=int, default=1000, help="steps of the flow q*")
    return p


def config_from_args(args, parser):
    common.check_common(args, parser, DEFAULT_OUT)
    q = args.quick
    args.num_test = args.num_test if args.num_test is not None else (20 if q else 1000)
    args.is_samples = args.is_samples if args.is_samples is not None else (200 if q else 5000)
    args.elbo_samples = args.elbo_samples if args.elbo_samples is not None else (20 if q else
                                                                                  1000)
    args.local_steps = args.local_steps if args.local_steps is not None else (100 if q else
                                                                              2000)
    checks = [("num_test", 1, 10000), ("is_samples", 1, None), ("elbo_samples", 2, None),
              ("local_steps", 10, None), ("refine_steps", 5, None), ("flow_images", 0, None),
              ("flow_steps", 10, None)]
    for name, low, high in checks:
        v = getattr(args, name)
        flag = "--" + name.replace("_", "-")
        if v < low or (high is not None and v > high):
            parser.error(f"{flag} must be in [{low}, {high if high else 'inf'}], got {v}")
    if args.local_steps % 10:
        parser.error(f"--local-steps must be a multiple of 10 (convergence every 10 %), got "
                     f"{args.local_steps}")
    if args.refine_steps % 5:
        parser.error(f"--refine-steps must be a multiple of 5, got {args.refine_steps}")
    if args.refine_steps < max(REFINE_STEPS_REPORTED):
        parser.error(f"--refine-steps must be >= {max(REFINE_STEPS_REPORTED)}, got "
                     f"{args.refine_steps}")
    if args.flow_images > args.num_test:
        parser.error(f"--flow-images ({args.flow_images}) must be <= --num-test "
                     f"({args.num_test})")
    if not (args.local_lr > 0 and np.isfinite(args.local_lr)):
        parser.error(f"--local-lr must be a finite number > 0, got {args.local_lr}")


def _mean_elbo(key, m, x, family, params, num_samples):
    elbo, se = am.elbo_estimate(key, am.VAELogJoint(m.model), x, family, params,
                                num_samples=num_samples, model_params=am.decoder_params(m.params),
                                objective=am.default_objective(m.model.latent_dim))
    elbo, se = np.asarray(elbo, np.float64), np.asarray(se, np.float64)
    return elbo, se


def refinement_curve(key, m, x, optimizer, steps, num_samples, eval_key):
    """The mean ELBO after 0, 5, 10, ... ``steps`` steps from the encoder's q (svi.run from
    encoder-initialised parameters, through vijax.amortized.fit_local_vae)."""
    family = am.local_family(m.model.latent_dim, x.shape[0])
    t0 = time.perf_counter()
    fit = am.fit_local_vae(key, m.params, m.model, x, steps, init="encoder",
                           optimizer=optimizer, record_every=5)
    wall = time.perf_counter() - t0
    points = [(0, am.encoder_local_params(m.params, m.model, x))]
    points += [(r.step, r.params) for r in fit.history]
    curve = []
    for k, params in points:
        elbo, se = _mean_elbo(eval_key, m, x, family, params, num_samples)
        curve.append({"steps": int(k), "elbo": float(elbo.mean()),
                      "elbo_mc_se": float(np.sqrt(np.sum(se**2)) / se.size),
                      "elbo_se_over_images": float(elbo.std(ddof=1) / np.sqrt(elbo.size))})
    return curve, wall


def run(args, parser, log=print) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    t_start = time.perf_counter()
    meta = common.machine_info("inference_gaps.py")
    m = common.load_model(args, parser, args.quick, log)
    x = jnp.asarray(common.test_images(m.config, args.num_test))
    n, latent_dim = x.shape[0], m.model.latent_dim
    key = jax.random.key(args.seed)
    k_fit, k_gaps, k_eval, k_ref, k_flow = jax.random.split(key, 5)
    family = am.local_family(latent_dim, n)
    log(f"model: {m.source}, {m.epochs} epochs; {n} test images")

    # --- q*: fit, then its ELBO (the timed part: the speed goal)
    steps = args.local_steps
    optimizer = am.default_local_optimizer(steps, args.local_lr)
    t0, c0 = time.perf_counter(), time.process_time()
    fit = am.fit_local_vae(k_fit, m.params, m.model, x, steps, init="encoder",
                           optimizer=optimizer, record_every=steps // 10)
    t_fit = time.perf_counter() - t0
    elbo_star, elbo_star_se = _mean_elbo(k_eval, m, x, family, fit.params, args.elbo_samples)
    t_qstar, c_qstar = time.perf_counter() - t0, time.process_time() - c0
    log(f"q*: {steps} steps in {t_fit:.1f} s; L[q*] = {elbo_star.mean():.3f} "
        f"(fit + {args.elbo_samples}-draw ELBO: {t_qstar:.1f} s, JIT included)")
    # convergence: L[q*] every 10 % of the steps, with the same draws (common random numbers)
    conv_samples = min(args.elbo_samples, 200)
    convergence = []
    for record in fit.history:
        e, _ = _mean_elbo(k_eval, m, x, family, record.params, conv_samples)
        convergence.append({"steps": record.step, "elbo": float(e.mean()),
                            "elapsed_s": record.elapsed_s})
    change_last_10pct = convergence[-1]["elbo"] - convergence[-2]["elbo"]
    log(f"L[q*] change over the last 10 % of the steps: {change_last_10pct:+.4f} nats "
        f"({conv_samples} draws, common random numbers)")

    # --- the gaps (log p^(x) both ways; L[q*] and L[q] with the same draws)
    t0 = time.perf_counter()
    gaps = am.inference_gaps(k_gaps, m.params, m.model, x, num_is_samples=args.is_samples,
                             num_elbo_samples=args.elbo_samples, local_fit=fit)
    t_gaps = time.perf_counter() - t0
    summary = gaps.summary()
    log_px_is_encoder = float(np.mean(gaps.log_px_encoder))
    log_px_is_local = float(np.mean(gaps.log_px_local))
    share_local = float(np.mean(np.asarray(gaps.log_px) == np.asarray(gaps.log_px_local)))

    # --- semi-amortized refinement curves
    ref_samples = min(args.elbo_samples, 200)
    curves, ref_walls = {}, {}
    optimizers = [("adam_1e-2", optax.adam(1e-2))]
    if not args.quick:
        optimizers.append(("sgd_1e-3", optax.sgd(1e-3)))
    for name, opt in optimizers:
        curves[name], ref_walls[name] = refinement_curve(k_ref, m, x, opt, args.refine_steps,
                                                         ref_samples, k_eval)
    reported = {name: {str(k): next(c["elbo"] for c in curve if c["steps"] == k)
                       for k in REFINE_STEPS_REPORTED} for name, curve in curves.items()}

    # --- optional: a flow family for q*
    flow = None
    if args.flow_images:
        flow = flow_qstar(k_flow, m, x[:args.flow_images], args, gaps, log)

    total = time.perf_counter() - t_start
    table = {"this_run": {"log_px": summary["log_px"], "elbo_local": summary["elbo_local"],
                          "elbo_amortized": summary["elbo_amortized"],
                          "approximation_gap": summary["approximation_gap"],
                          "amortization_gap": summary["amortization_gap"]},
             "cremer_et_al_2018_mnist_ffg": CREMER_MNIST_FFG}
    results = {
        "meta": {**meta, "total_wall_s": total, "times_include_jit_compilation": True},
        "config": {k: (str(v) if isinstance(v, pathlib.Path) else v)
                   for k, v in vars(args).items()},
        "model": common.model_description(m),
        "num_images": n,
        "table": table,
        "summary": summary,
        "log_px_estimates": {"is_encoder_proposal": log_px_is_encoder,
                             "is_qstar_proposal": log_px_is_local,
                             "share_of_images_using_qstar_proposal": share_local,
                             "num_is_samples": args.is_samples},
        "qstar": {"steps": steps, "learning_rate": args.local_lr,
                  "schedule": "Adam, cosine decay to 5 % over the steps, from the encoder's q",
                  "fit_wall_s": t_fit, "fit_plus_elbo_wall_s": t_qstar,
                  "fit_plus_elbo_cpu_s": c_qstar,
                  "elbo_samples": args.elbo_samples, "elbo": float(elbo_star.mean()),
                  "nonfinite_steps": fit.num_nonfinite,
                  "convergence": convergence,
                  "change_over_last_10pct_of_steps": change_last_10pct,
                  "converged_by_criterion_0.05": bool(abs(change_last_10pct) < 0.05),
                  "convergence_elbo_samples": conv_samples},
        "gaps_wall_s": t_gaps,
        "semi_amortized": {"reported_steps": list(REFINE_STEPS_REPORTED), "elbo": reported,
                           "curves": curves, "wall_s": ref_walls,
                           "elbo_samples": ref_samples},
        "flow": flow,
        "differences_from_the_paper": DIFFERENCES,
        "per_image": {"log_px": np.asarray(gaps.log_px), "elbo_local": np.asarray(gaps.elbo_local),
                      "elbo_amortized": np.asarray(gaps.elbo_amortized)},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    plot_refinement(curves, summary, args.out / "refinement.png")
    plot_convergence(convergence, args.out / "qstar_convergence.png")
    plot_gaps(gaps, args.out / "gaps_per_image.png")
    common.write_json(args.out / "results.json", results)
    print_table(results, log)
    return results


def flow_qstar(key, m, x, args, gaps, log):
    """q* in a spline-flow family (vmap over images), against the Gaussian q* on them."""
    n, latent_dim = x.shape[0], m.model.latent_dim
    family = vfam.SplineFlow(latent_dim, num_layers=2, hidden_sizes=(64,))
    t0 = time.perf_counter()
    fit = am.fit_local_vae(key, m.params, m.model, x, args.flow_steps, init="encoder",
                           family=family, objective=svi.ELBO(num_samples=4),
                           optimizer=am.default_local_optimizer(args.flow_steps, 1e-3))
    elbo, se = am.elbo_estimate(jax.random.fold_in(key, 1), am.VAELogJoint(m.model), x, family,
                                fit.params, num_samples=min(args.elbo_samples, 200),
                                model_params=am.decoder_params(m.params), objective=svi.ELBO())
    wall = time.perf_counter() - t0
    gauss = np.asarray(gaps.elbo_local)[:n]
    out = {"num_images": n, "family": "SplineFlow(50, num_layers=2, hidden_sizes=(64,))",
           "steps": args.flow_steps, "optimizer": "Adam 1e-3, cosine to 5 %, ELBO with 4 draws",
           "elbo_flow": float(np.mean(elbo)),
           "elbo_gaussian_same_images": float(gauss.mean()),
           "log_px_same_images": float(np.mean(np.asarray(gaps.log_px)[:n])),
           "wall_s": wall}
    log(f"flow q* on {n} images: L = {out['elbo_flow']:.3f} vs Gaussian q* "
        f"{out['elbo_gaussian_same_images']:.3f} ({wall:.0f} s)")
    return out


def print_table(results, log=print):
    t, s = results["table"], results["summary"]
    log("")
    log(f"inference gaps on the first {results['num_images']} MNIST test images (nats; "
        f"{results['meta']['date']}, {results['meta']['cpu_model']})")
    log(f"{'':34s}{'log p(x)':>10s}{'L[q*]':>10s}{'L[q]':>10s}{'approx.':>10s}{'amort.':>10s}")
    for label, row in (("this run (FFG)", t["this_run"]),
                       ("Cremer et al. 2018, MNIST FFG", t["cremer_et_al_2018_mnist_ffg"])):
        log(f"{label:34s}{row['log_px']:10.2f}{row['elbo_local']:10.2f}"
            f"{row['elbo_amortized']:10.2f}{row['approximation_gap']:10.2f}"
            f"{row['amortization_gap']:10.2f}")
    log(f"  (standard errors over images: log p {s['log_px_se']:.2f}, gaps "
        f"{s['approximation_gap_se']:.2f} / {s['amortization_gap_se']:.2f}; log p(x) IS with "
        f"q(z|x): {results['log_px_estimates']['is_encoder_proposal']:.2f}, with q*: "
        f"{results['log_px_estimates']['is_qstar_proposal']:.2f})")
    sa = results["semi_amortized"]["elbo"]
    for name, values in sa.items():
        log(f"semi-amortized ({name}): " + ", ".join(f"{k} steps {v:.2f}"
                                                    for k, v in values.items()))
    q = results["qstar"]
    log(f"q*: {q['steps']} steps, fit + ELBO {q['fit_plus_elbo_wall_s']:.1f} s; change over "
        f"the last 10 % {q['change_over_last_10pct_of_steps']:+.3f} nats")


def plot_refinement(curves, summary, path):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    for name, curve in curves.items():
        ax.plot([c["steps"] for c in curve], [c["elbo"] for c in curve], marker=".",
                label=f"semi-amortized, {name.replace('_', ' ')}")
    ax.axhline(summary["elbo_local"], color="k", ls="--", lw=1, label="L[q*] (per-image optimum)")
    ax.axhline(summary["elbo_amortized"], color="gray", ls=":", lw=1, label="L[q] (encoder)")
    ax.set_xlabel("refinement steps from the encoder's q")
    ax.set_ylabel("mean ELBO (nats)")
    ax.set_title("Semi-amortized inference on MNIST test images")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_convergence(convergence, path):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.0, 3.6))
    ax.plot([c["steps"] for c in convergence], [c["elbo"] for c in convergence], marker="o")
    ax.set_xlabel("Adam steps (per-image q*, all images at once)")
    ax.set_ylabel("mean L[q*] (nats)")
    ax.set_title("Convergence of the per-datapoint optimum")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_gaps(gaps, path):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8.0, 3.4))
    for ax, name, title in ((axes[0], "approximation_gap", "approximation gap"),
                            (axes[1], "amortization_gap", "amortization gap")):
        values = np.asarray(getattr(gaps, name))
        ax.hist(values, bins=40)
        ax.axvline(values.mean(), color="k", ls="--", lw=1)
        ax.set_title(f"{title}: mean {values.mean():.2f} nats")
        ax.set_xlabel("nats per image")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    return common.main(argv, make_parser, config_from_args, _imports, run)


if __name__ == "__main__":
    main()
