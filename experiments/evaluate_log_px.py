"""log p(x) of a trained VAE four ways: the IS estimate with its Pareto k-hat per image, AIS
with the number of temperatures doubled until the mean moves by less than a tolerance, and
BDMC bounds on data simulated from the decoder (all values in nats).

    python experiments/evaluate_log_px.py --workdir outputs/vae_iwae_3280 --out outputs/log_px
    python experiments/evaluate_log_px.py --workdir RUN --out OUT --quick   # a smoke test

Reads the run's ``config.json`` and its latest checkpoint (``--epoch`` for another kept one),
and the test images binarized as the training driver binarizes them. Writes
``results.json`` (every figure below, with the run's epoch, the machine and the command) and
two figures to ``--out``:

* importance sampling with q(z | x) as proposal and ``--is-samples`` draws (5000 as in Burda
  et al. 2016) on the first ``--num-is`` test images: the mean log p(x) with its standard
  error over images, and the Pareto k-hat of each image's weights (``vijax.ais``; below 0.5
  reliable, above 0.7 not), as a histogram (``khat_histogram.png``);
* AIS from q(z | x) (``vijax.ais.log_likelihood_ais``, HMC transitions, sigmoidal schedule) on
  the first ``--num-ais`` of those images, for ``--ais-temperatures`` and then doubling until
  two successive means differ by less than ``--ais-tol`` nats (or ``--ais-max-temperatures``
  is passed), next to IS on the same images (``ais_convergence.png``);
* BDMC (``vijax.ais.bdmc_simulated``) on ``--bdmc-examples`` images simulated from the decoder
  at the temperatures of the AIS runs (up to ``--bdmc-max-temperatures``): the mean lower and
  upper bounds and the width of the sandwich, which bounds how far AIS can be from log p(x)
  on data like the model's own.
"""

from __future__ import annotations

import argparse
import math
import pathlib
import sys
import time

import _cli

_cli.put_repo_root_on_path()


def make_parser() -> _cli.Parser:
    p = _cli.Parser(description=__doc__.split("\n\n")[0],
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=pathlib.Path, required=True,
                   help="the training run's work directory (config.json, checkpoints/)")
    p.add_argument("--out", type=pathlib.Path, required=True, help="folder for the results")
    p.add_argument("--epoch", type=int, default=None, help="a kept checkpoint (default latest)")
    p.add_argument("--num-is", type=int, default=10_000, help="test images for IS (default all)")
    p.add_argument("--is-samples", type=int, default=5000, help="IS draws per image (5000)")
    p.add_argument("--num-ais", type=int, default=200, help="test images for AIS (200)")
    p.add_argument("--ais-temperatures", type=int, default=250,
                   help="first number of AIS temperatures (250), doubled each round")
    p.add_argument("--ais-max-temperatures", type=int, default=4000,
                   help="stop doubling after this many temperatures (4000)")
    p.add_argument("--ais-tol", type=float, default=0.1,
                   help="stop when doubling moves the mean log p(x) by less (0.1 nats)")
    p.add_argument("--ais-chains", type=int, default=4, help="AIS chains per image (4)")
    p.add_argument("--leapfrog-steps", type=int, default=10, help="HMC leapfrog steps (10)")
    p.add_argument("--bdmc-examples", type=int, default=50, help="simulated images (50)")
    p.add_argument("--bdmc-max-temperatures", type=int, default=1000,
                   help="BDMC at the AIS temperatures up to this many (1000)")
    p.add_argument("--batch-size", type=int, default=100, help="images per batch (100)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 20 IS images x 200 draws, 4 AIS images at 2-8 temperatures, "
                        "4 simulated images")
    return p


def _check_args(parser, args) -> None:
    for flag in ("num_is", "is_samples", "num_ais", "ais_temperatures", "ais_max_temperatures",
                 "ais_chains", "leapfrog_steps", "bdmc_examples", "bdmc_max_temperatures",
                 "batch_size"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.ais_max_temperatures < args.ais_temperatures:
        parser.error("--ais-max-temperatures must be >= --ais-temperatures")
    if not (math.isfinite(args.ais_tol) and args.ais_tol > 0):
        parser.error(f"--ais-tol must be a finite number > 0, got {args.ais_tol}")
    if args.is_samples < 21:
        parser.error("--is-samples must be >= 21 (k-hat needs that many weights per image)")
    if args.epoch is not None and args.epoch < 0:
        parser.error(f"--epoch must be >= 0, got {args.epoch}")
    _cli.check_seed(parser, args.seed)
    if not (args.workdir / "config.json").is_file():
        parser.error(f"--workdir: no config.json in {args.workdir} (not a training run)")


def _quick(args) -> None:
    args.num_is, args.is_samples, args.num_ais = 20, 200, 4
    args.ais_temperatures, args.ais_max_temperatures, args.ais_chains = 2, 8, 2
    args.leapfrog_steps, args.bdmc_examples, args.bdmc_max_temperatures = 2, 4, 4
    args.ais_tol = 1e-9  # always run every doubling


def _mean_se(values) -> tuple[float, float]:
    import numpy as np  # noqa: PLC0415

    values = np.asarray(values, np.float64)
    se = float(values.std(ddof=1) / math.sqrt(values.size)) if values.size > 1 else float("nan")
    return float(values.mean()), se


def run(args) -> dict:
    import jax  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    from vijax import ais as vais  # noqa: PLC0415
    from vijax import vae  # noqa: PLC0415
    from vijax import vae_train as vt  # noqa: PLC0415

    config = vt.load_config(args.workdir)
    state, epoch = vt.restore_checkpoint(args.workdir, config, epoch=args.epoch)
    dataset, _, test_binary = vt.prepare_data(config)
    model = vt.build_model(config, dataset.train_images)
    params = state.params
    is_key, ais_key, bdmc_key = jax.random.split(jax.random.key(args.seed), 3)
    transition = vais.HMC(num_leapfrog_steps=args.leapfrog_steps)
    out = {"meta": {**_cli.environment("evaluate_log_px.py", packages=("jax", "blackjax",
                                                                        "arviz")),
                    "run_epoch": epoch, "run_config": vt.config_to_dict(config)}}

    # importance sampling with k-hat
    x_is = jax.numpy.asarray(test_binary[:args.num_is])
    t0 = time.perf_counter()
    log_px, khat = jax.jit(lambda k, p, x: vae.log_likelihood_is(
        k, p, model, x, num_samples=args.is_samples, chunk_size=min(100, args.is_samples),
        batch_size=min(args.batch_size, x.shape[0]), return_khat=True))(is_key, params, x_is)
    log_px, khat = np.asarray(log_px, np.float64), np.asarray(khat, np.float64)
    mean, se = _mean_se(log_px)
    categories = {name: int(np.sum(vais.khat_category(khat) == name))
                  for name in ("good", "ok", "bad")}
    out["importance_sampling"] = {
        "num_images": int(x_is.shape[0]), "num_samples": args.is_samples,
        "log_px": mean, "log_px_se": se, "nll": -mean, "wall_s": time.perf_counter() - t0,
        "khat": khat.tolist(), "khat_median": float(np.median(khat)),
        "khat_max": float(khat.max()), "khat_categories": categories}
    print(f"IS (k = {args.is_samples}, {x_is.shape[0]} images): log p(x) = {mean:.3f} ± "
          f"{se:.3f} nats; k-hat median {np.median(khat):.2f}, {categories}", flush=True)

    # AIS, doubling the temperatures
    x_ais = x_is[:args.num_ais]
    is_same = _mean_se(log_px[:args.num_ais])
    rounds, previous, temperatures = [], None, args.ais_temperatures
    while temperatures <= args.ais_max_temperatures:
        t0 = time.perf_counter()
        result = jax.jit(lambda k, p, x, t=temperatures: vais.log_likelihood_ais(
            k, p, model, x, num_temperatures=t, num_chains=args.ais_chains,
            transition=transition, batch_size=min(args.batch_size, x.shape[0])))(
            jax.random.fold_in(ais_key, temperatures), params, x_ais)
        a_mean, a_se = _mean_se(np.asarray(result.log_marginal))
        row = {"num_temperatures": temperatures, "log_px": a_mean, "log_px_se": a_se,
               "change": None if previous is None else a_mean - previous,
               "acceptance_rate": float(np.mean(result.acceptance_rate)),
               "ais_minus_is": float(np.mean(np.asarray(result.log_marginal)
                                             - log_px[:args.num_ais])),
               "wall_s": time.perf_counter() - t0}
        rounds.append(row)
        print(f"AIS T = {temperatures}: log p(x) = {a_mean:.3f} ± {a_se:.3f} (AIS - IS "
              f"{row['ais_minus_is']:+.3f}), acceptance {row['acceptance_rate']:.2f}, "
              f"{row['wall_s']:.0f} s", flush=True)
        if previous is not None and abs(a_mean - previous) < args.ais_tol:
            break
        previous, temperatures = a_mean, 2 * temperatures
    converged = len(rounds) > 1 and abs(rounds[-1]["change"]) < args.ais_tol
    out["ais"] = {"num_images": int(x_ais.shape[0]), "num_chains": args.ais_chains,
                  "num_leapfrog_steps": args.leapfrog_steps, "tol": args.ais_tol,
                  "converged": bool(converged), "rounds": rounds,
                  "is_same_images": {"log_px": is_same[0], "log_px_se": is_same[1]}}

    # BDMC on simulated data
    bdmc_rows = []
    for row in rounds:
        t = row["num_temperatures"]
        if t > args.bdmc_max_temperatures:
            break
        t0 = time.perf_counter()
        sim = jax.jit(lambda k, p, t=t: vais.bdmc_simulated(
            k, p, model, args.bdmc_examples, num_temperatures=t, num_chains=args.ais_chains,
            transition=transition, batch_size=min(args.batch_size, args.bdmc_examples)))(
            bdmc_key, params)
        lower, upper = (np.asarray(v, np.float64) for v in (sim.bdmc.lower, sim.bdmc.upper))
        bdmc_rows.append({"num_temperatures": t, "lower": float(lower.mean()),
                          "upper": float(upper.mean()), "gap": float((upper - lower).mean()),
                          "gap_max": float((upper - lower).max()),
                          "wall_s": time.perf_counter() - t0})
        print(f"BDMC T = {t}: lower {lower.mean():.3f}, upper {upper.mean():.3f}, gap "
              f"{(upper - lower).mean():.3f} nats", flush=True)
    out["bdmc_simulated"] = {"num_examples": args.bdmc_examples, "num_chains": args.ais_chains,
                             "rounds": bdmc_rows}
    return out


def make_figures(results: dict, out: pathlib.Path) -> None:
    import numpy as np  # noqa: PLC0415
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415
    from matplotlib.figure import Figure  # noqa: PLC0415

    is_ = results["importance_sampling"]
    fig = Figure(figsize=(5.5, 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    khat = np.asarray(is_["khat"])
    ax.hist(khat, bins=min(40, max(5, khat.size // 10)), color="tab:blue", alpha=0.8)
    for value, label in ((0.5, "0.5: reliable below"), (0.7, "0.7: unreliable above")):
        ax.axvline(value, color="black", ls=":" if value == 0.5 else "--", lw=1, label=label)
    ax.set_xlabel(r"Pareto $\hat k$ of an image's importance weights")
    ax.set_ylabel("test images")
    ax.set_title(f"IS with q(z|x), k = {is_['num_samples']}, {is_['num_images']} images")
    ax.legend(fontsize=8)
    fig.savefig(out / "khat_histogram.png", dpi=120)

    ais = results["ais"]
    fig = Figure(figsize=(6, 3.8), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    t = [r["num_temperatures"] for r in ais["rounds"]]
    ax.errorbar(t, [r["log_px"] for r in ais["rounds"]],
                yerr=[2 * r["log_px_se"] for r in ais["rounds"]], marker="o", capsize=3,
                label=f"AIS, {ais['num_chains']} chains (±2 SE over images)")
    ax.axhline(ais["is_same_images"]["log_px"], color="tab:orange", ls="--",
               label=f"IS, k = {is_['num_samples']}, same images")
    bdmc = results["bdmc_simulated"]["rounds"]
    if bdmc:
        ax2 = ax.twinx()
        ax2.plot([r["num_temperatures"] for r in bdmc], [r["gap"] for r in bdmc], "s:",
                 color="tab:green", label="BDMC gap on simulated images")
        ax2.set_ylabel("BDMC upper - lower (nats)", color="tab:green")
        ax2.set_ylim(bottom=0)
    ax.set_xscale("log")
    ax.set_xlabel("AIS temperatures T")
    ax.set_ylabel(r"mean $\log p(x)$ (nats)")
    ax.set_title(f"{ais['num_images']} test images")
    ax.legend(fontsize=8, loc="lower right")
    fig.savefig(out / "ais_convergence.png", dpi=120)


def main(argv=None) -> dict:
    parser = make_parser()
    args = parser.parse_args(argv)
    if args.quick:
        _quick(args)
    _check_args(parser, args)
    out = _cli.check_output_folder(parser, args.out, "--out")
    start = time.perf_counter()
    try:
        results = run(args)
    except (FileNotFoundError, ValueError) as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    results["meta"]["total_wall_s"] = time.perf_counter() - start
    out.mkdir(parents=True, exist_ok=True)
    make_figures(results, out)
    _cli.write_json(out / "results.json", results)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
    sys.exit(0)
