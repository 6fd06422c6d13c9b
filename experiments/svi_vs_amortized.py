"""Per-datapoint SVI vs amortized vs semi-amortized inference on one trained MNIST VAE.

The same model (``--checkpoint DIR`` of ``experiments/vae.py``, or a VAE trained here) and the
same ``--num-images`` new images (the first MNIST test images, binarized once as every vijax
evaluation does), three ways to get q(z | x) for every image (:mod:`vijax.amortized`):

* amortized: one pass of the encoder;
* semi-amortized: the encoder's q, then Adam(1e-2) gradient steps on the local parameters
  (``fit_local_vae(init="encoder")``, i.e. ``svi.run`` from encoder-initialised parameters);
* per-datapoint SVI: local parameters from the prior N(0, I), Adam(1e-2) steps
  (``fit_local_vae(init="prior")``).

Reported: the mean ELBO reached against wall time (each method timed after a warm-up call
that compiled it, so the curves show run time, not compilation; the warm-up times are in
results.json), the time to infer q for the images, and the batched-vs-vmap measurement: one
``svi.run`` of ``MeanFieldNormal(L, batch_shape=(B,))`` against ``jax.vmap`` of a single-image
``svi.run``, per step.

Usage (from the repository root)::

    python experiments/svi_vs_amortized.py --checkpoint /tmp/vae_run --out outputs/svi_vs_amortized
    python experiments/svi_vs_amortized.py --quick --out /tmp/sva_quick   # smoke test, < 60 s

Writes ``results.json`` (every number, date, CPU model, command) and ``elbo_vs_time.png`` into
``--out``.
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


DEFAULT_OUT = common.REPO_ROOT / "outputs" / "svi_vs_amortized"


def make_parser():
    p = common.Parser(prog="svi_vs_amortized.py", description=__doc__.split("\n\n")[0])
    common.add_model_flags(p)
    p.add_argument("--quick", action="store_true",
                   help="smoke test: a 1-epoch VAE on 1000 images (unless --checkpoint), 20 "
                        "images, few steps")
    p.add_argument("--num-images", type=int, default=None,
                   help="images to infer q for (default 1000; 20 with --quick)")
    p.add_argument("--svi-steps", type=int, default=None,
                   help="steps of per-datapoint SVI from the prior (default 3000; 100 with "
                        "--quick), a multiple of --record-every")
    p.add_argument("--semi-steps", type=int, default=None,
                   help="refinement steps of the semi-amortized run (default 300; 50 with "
                        "--quick), a multiple of 10")
    p.add_argument("--record-every", type=int, default=None,
                   help="SVI steps between ELBO evaluations (default 100; 10 with --quick)")
    p.add_argument("--elbo-samples", type=int, default=None,
                   help="draws per ELBO evaluation (default 200; 20 with --quick)")
    p.add_argument("--bench-steps", type=int, default=None,
                   help="steps of the batched-vs-vmap timing (default 100; 5 with --quick)")
    p.add_argument("--bench-repeats", type=int, default=None,
                   help="warm timings per mode, the fastest kept (default 5; 1 with --quick)")
    p.add_argument("--reference-steps", type=int, default=None,
                   help="steps of the reference L[q*] (Adam from the encoder's q, cosine-decayed "
                        "rate; default 2000, 0 with --quick; 0 skips it)")
    return p


def config_from_args(args, parser):
    common.check_common(args, parser, DEFAULT_OUT)
    q = args.quick
    defaults = {"num_images": (20, 1000), "svi_steps": (100, 3000), "semi_steps": (50, 300),
                "record_every": (10, 100), "elbo_samples": (20, 200), "bench_steps": (5, 100),
                "bench_repeats": (1, 5), "reference_steps": (0, 2000)}
    for name, (quick, full) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if q else full)
    for name, low in (("num_images", 1), ("svi_steps", 1), ("semi_steps", 10),
                      ("record_every", 1), ("elbo_samples", 2), ("bench_steps", 1),
                      ("bench_repeats", 1), ("reference_steps", 0)):
        v = getattr(args, name)
        if v < low:
            parser.error(f"--{name.replace('_', '-')} must be >= {low}, got {v}")
    if args.num_images > 10000:
        parser.error(f"--num-images must be <= 10000 (the test set), got {args.num_images}")
    if args.svi_steps % args.record_every:
        parser.error(f"--svi-steps ({args.svi_steps}) must be a multiple of --record-every "
                     f"({args.record_every})")
    if args.semi_steps % 10:
        parser.error(f"--semi-steps must be a multiple of 10, got {args.semi_steps}")


def _elbo(key, m, x, params, num_samples):
    elbo, se = am.elbo_estimate(key, am.VAELogJoint(m.model), x,
                                am.local_family(m.model.latent_dim, x.shape[0]), params,
                                num_samples=num_samples, model_params=am.decoder_params(m.params),
                                objective=am.default_objective(m.model.latent_dim))
    return float(np.mean(elbo)), float(np.sqrt(np.sum(np.asarray(se) ** 2)) / se.size)


def batched_vs_vmap(key, m, x, steps, repeats, log):
    """Per-step time of one batched svi.run against jax.vmap of single-image runs (same family,
    same start, same optimiser): a first call each (compilation), then ``repeats`` warm calls
    of each, alternating, and the fastest of each (the least disturbed by other processes)."""
    latent_dim, n = m.model.latent_dim, x.shape[0]
    optimizer = optax.adam(1e-2)
    init = am.encoder_local_params(m.params, m.model, x)
    modes = (("batched", am.local_family(latent_dim, n)),
             ("vmap", vfam.MeanFieldNormal(latent_dim, init_scale=1.0)))

    def call(family):
        t0 = time.perf_counter()
        fit = am.fit_local_vae(key, m.params, m.model, x, steps, init=init, family=family,
                               optimizer=optimizer)
        jax.block_until_ready(fit.params)
        return time.perf_counter() - t0, fit

    out = {mode: {"first_call_s": call(family)[0], "warm_s": []} for mode, family in modes}
    for _ in range(repeats):
        for mode, family in modes:
            wall, fit = call(family)
            assert fit.mode == mode
            out[mode]["warm_s"].append(wall)
            out[mode]["final_objective"] = float(np.mean(fit.objective[-max(1, steps // 10):]))
    for mode, _ in modes:
        out[mode]["ms_per_step"] = 1e3 * min(out[mode]["warm_s"]) / steps
    out["speedup_batched_over_vmap"] = out["vmap"]["ms_per_step"] / out["batched"]["ms_per_step"]
    out["faster"] = "batched" if out["speedup_batched_over_vmap"] > 1 else "vmap"
    out["steps"], out["num_images"], out["repeats"] = steps, n, repeats
    log(f"batched {out['batched']['ms_per_step']:.1f} ms/step, vmap "
        f"{out['vmap']['ms_per_step']:.1f} ms/step ({n} images): {out['faster']} is "
        f"{max(out['speedup_batched_over_vmap'], 1 / out['speedup_batched_over_vmap']):.2f}x "
        "faster")
    return out


def timed_fit(key, m, x, steps, record_every, init, optimizer):
    """fit_local_vae with snapshots, after a warm-up of one chunk (compilation)."""
    t0 = time.perf_counter()
    am.fit_local_vae(key, m.params, m.model, x, record_every, init=init, optimizer=optimizer,
                     record_every=record_every)
    warmup = time.perf_counter() - t0
    fit = am.fit_local_vae(key, m.params, m.model, x, steps, init=init, optimizer=optimizer,
                           record_every=record_every)
    return fit, warmup


def run(args, parser, log=print) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    t_start = time.perf_counter()
    meta = common.machine_info("svi_vs_amortized.py")
    m = common.load_model(args, parser, args.quick, log)
    x = jnp.asarray(common.test_images(m.config, args.num_images))
    n = x.shape[0]
    key = jax.random.key(args.seed)
    k_bench, k_semi, k_svi, k_eval = jax.random.split(key, 4)
    log(f"model: {m.source}, {m.epochs} epochs; {n} images")

    bench = batched_vs_vmap(k_bench, m, x, args.bench_steps, args.bench_repeats, log)

    # amortized: one encoder pass (jitted; compile, then the best of 5 warm calls)
    encode = jax.jit(lambda p, xb: am.encoder_local_params(p, m.model, xb))
    t0 = time.perf_counter()
    jax.block_until_ready(encode(m.params, x))
    encoder_first = time.perf_counter() - t0
    walls = []
    for _ in range(5):
        t0 = time.perf_counter()
        lam0 = jax.block_until_ready(encode(m.params, x))
        walls.append(time.perf_counter() - t0)
    encoder_s = min(walls)
    elbo_q, elbo_q_se = _elbo(k_eval, m, x, lam0, args.elbo_samples)
    log(f"amortized: encoder {1e3 * encoder_s:.1f} ms for {n} images, ELBO {elbo_q:.3f}")

    adam = optax.adam(1e-2)
    curves = {"amortized": [{"steps": 0, "wall_s": encoder_s, "elbo": elbo_q,
                             "elbo_mc_se": elbo_q_se}]}
    warmups = {"encoder_first_call_s": encoder_first}
    for name, init, steps, every, k in (("semi_amortized", "encoder", args.semi_steps,
                                         args.semi_steps // 10, k_semi),
                                        ("svi_from_prior", "prior", args.svi_steps,
                                         args.record_every, k_svi)):
        fit, warmups[name] = timed_fit(k, m, x, steps, every, init, adam)
        offset = encoder_s if init == "encoder" else 0.0
        curve = [] if init == "prior" else [dict(curves["amortized"][0])]
        if init == "prior":
            first = am.local_family(m.model.latent_dim, n).init(jax.random.key(0))
            e, se = _elbo(k_eval, m, x, first, args.elbo_samples)
            curve.append({"steps": 0, "wall_s": 0.0, "elbo": e, "elbo_mc_se": se})
        for record in fit.history:
            e, se = _elbo(k_eval, m, x, record.params, args.elbo_samples)
            curve.append({"steps": record.step, "wall_s": offset + record.elapsed_s,
                          "elbo": e, "elbo_mc_se": se})
        curves[name] = curve
        log(f"{name}: {steps} steps in {fit.history[-1].elapsed_s:.1f} s, ELBO "
            f"{curve[-1]['elbo']:.3f}")

    reference = None
    if args.reference_steps:
        t0 = time.perf_counter()
        fit = am.fit_local_vae(k_semi, m.params, m.model, x, args.reference_steps,
                               init="encoder")
        wall = time.perf_counter() - t0
        e, se = _elbo(k_eval, m, x, fit.params, args.elbo_samples)
        reference = {"steps": args.reference_steps, "elbo": e, "elbo_mc_se": se,
                     "wall_s_including_jit": wall,
                     "optimizer": "vijax.amortized.default_local_optimizer: Adam 1e-2, cosine "
                                  "decay to 5 %"}
        log(f"reference L[q*]: {e:.3f} ({args.reference_steps} steps, {wall:.1f} s)")
    best = max(c[-1]["elbo"] for c in curves.values())

    def time_to(curve, level):
        for c in curve:
            if c["elbo"] >= level:
                return c["wall_s"]
        return None

    infer = {
        "amortized_s": encoder_s,
        "semi_amortized_s_by_steps": {str(c["steps"]): c["wall_s"]
                                      for c in curves["semi_amortized"]},
        "svi_from_prior_s_to_reach_amortized_elbo": time_to(curves["svi_from_prior"], elbo_q),
        "svi_from_prior_s_to_within_0.5_of_best": time_to(curves["svi_from_prior"], best - 0.5),
        "semi_amortized_s_to_within_0.5_of_best": time_to(curves["semi_amortized"], best - 0.5),
        "best_elbo_any_method": best,
    }
    total = time.perf_counter() - t_start
    results = {
        "meta": {**meta, "total_wall_s": total,
                 "curve_times": "run time after a warm-up call that compiled the program"},
        "config": {k: (str(v) if isinstance(v, pathlib.Path) else v)
                   for k, v in vars(args).items()},
        "model": common.model_description(m),
        "num_images": n,
        "batched_vs_vmap": bench,
        "curves": curves,
        "time_to_infer_q": infer,
        "reference_qstar": reference,
        "warmup_s": warmups,
        "optimizer": "Adam(1e-2), constant, on loc and raw_scale = softplus^-1(scale)",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    plot(curves, n, args.out / "elbo_vs_time.png", reference)
    common.write_json(args.out / "results.json", results)
    log(f"time to infer q for {n} images: amortized {1e3 * encoder_s:.1f} ms; semi-amortized "
        f"{args.semi_steps} steps "
        f"{curves['semi_amortized'][-1]['wall_s']:.1f} s; SVI from the prior reaches the "
        f"encoder's ELBO after "
        + (f"{infer['svi_from_prior_s_to_reach_amortized_elbo']:.1f} s"
           if infer["svi_from_prior_s_to_reach_amortized_elbo"] is not None
           else f"more than {curves['svi_from_prior'][-1]['wall_s']:.1f} s"))
    log(f"wrote {args.out}/results.json and elbo_vs_time.png in {total:.1f} s")
    return results


def plot(curves, n, path, reference=None):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    a = curves["amortized"][0]
    ax.plot([a["wall_s"]], [a["elbo"]], "o", color="tab:green", label="amortized (encoder)")
    for name, colour, label in (("semi_amortized", "tab:orange",
                                 "semi-amortized (encoder + Adam steps)"),
                                ("svi_from_prior", "tab:blue",
                                 "per-datapoint SVI from the prior")):
        c = [p for p in curves[name] if p["wall_s"] > 0]
        ax.plot([p["wall_s"] for p in c], [p["elbo"] for p in c], marker=".", color=colour,
                label=label)
    if reference is not None:
        ax.axhline(reference["elbo"], color="k", ls="--", lw=1,
                   label=f"L[q*] ({reference['steps']} steps, decaying rate)")
    ax.set_xscale("log")
    lows = [p["elbo"] for c in curves.values() for p in c if p["wall_s"] > 0]
    ax.set_ylim(max(min(lows), a["elbo"] - 10.0) - 1.0, max(lows) + 0.5)
    ax.set_xlabel(f"wall time for {n} images (s, log scale)")
    ax.set_ylabel("mean ELBO (nats)")
    ax.set_title("Inference for new images: ELBO against time")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    return common.main(argv, make_parser, config_from_args, _imports, run)


if __name__ == "__main__":
    main()
