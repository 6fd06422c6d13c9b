"""Gradient variance of each vijax.elbo gradient estimator on the linear-Gaussian model.

For K in {1, 5, 50}: the variance (trace of the covariance over seeds) of the gradient of the
K-sample ELBO and of the IWAE-K bound with respect to the variational parameters (loc and
log-scale of a diagonal Gaussian q) and to the model weight W, for the pathwise, score-function,
score-function + leave-one-out baseline (VIMCO for IWAE), sticking-the-landing and DReG
estimators, with the ratio to pathwise, the mean gradient's distance to the pathwise mean (in
standard errors; large = biased), and the time per jitted gradient (dispatch-dominated at this
size: it shows that no estimator is expensive, not a throughput figure). All in one run.

    python experiments/bench_estimators.py [--reps 2000] [--latent 5] [--data 10]
"""

from __future__ import annotations

import argparse
import time

import distrax
import jax
import jax.numpy as jnp
import numpy as np

import _cli  # noqa: E402  (experiments/_cli.py: sys.path[0] when run as a script)
from vijax import elbo as velbo
from vijax import linear_gaussian as lg


def make_problem(latent_dim: int, data_dim: int, seed: int = 0):
    model = lg.random_model(jax.random.key(seed), latent_dim, data_dim, noise_scale=0.5, dtype=jnp.float64)
    x, _ = lg.sample(jax.random.key(seed + 1), model, 1)
    post_loc, post_cov = lg.posterior(model, x)
    # q: off the posterior (shifted mean, mean-field marginal scales)
    params = {
        "loc": post_loc + 0.3,
        "log_scale": jnp.log(jnp.sqrt(jnp.diag(post_cov)))[None, :],
        "weight": model.weight,
    }
    return model, x, params


def gradient_samples(objective, estimator, num_samples, model, x, params, reps, seed):
    """[reps, num_params] per-seed gradients (variational block first, then W)."""

    def one(key):
        def f(p):
            m = model._replace(weight=p["weight"])
            q = distrax.MultivariateNormalDiag(p["loc"], jnp.exp(p["log_scale"]))
            return jnp.sum(objective(key, lambda z: lg.log_joint(m, x, z), q,
                                     num_samples=num_samples, estimator=estimator))

        g = jax.grad(f)(params)
        return jnp.concatenate([g["loc"].ravel(), g["log_scale"].ravel(), g["weight"].ravel()])

    single = jax.jit(one)
    batched = jax.jit(jax.vmap(one))
    keys = jax.random.split(jax.random.key(seed), reps)
    samples = np.asarray(batched(keys))
    n_time = 200
    timing_keys = list(keys[:n_time])  # split the key array before the clock starts
    single(timing_keys[0]).block_until_ready()  # compile
    t0 = time.perf_counter()
    for k in timing_keys:
        out = single(k)
    out.block_until_ready()
    return samples, (time.perf_counter() - t0) / n_time


def run(reps: int, latent_dim: int, data_dim: int) -> list[dict]:
    model, x, params = make_problem(latent_dim, data_dim)
    n_var = 2 * latent_dim
    rows = []
    for k in (1, 5, 50):
        cases = [("elbo", velbo.elbo, "pathwise", velbo.Pathwise()),
                 ("elbo", velbo.elbo, "score", velbo.ScoreFunction())]
        if k >= 2:
            cases.append(("elbo", velbo.elbo, "score+LOO", velbo.ScoreFunction(velbo.LeaveOneOut())))
        cases.append(("elbo", velbo.elbo, "STL", velbo.StickingTheLanding()))
        cases += [("iwae", velbo.iwae_bound, "pathwise", velbo.Pathwise()),
                  ("iwae", velbo.iwae_bound, "score", velbo.ScoreFunction())]
        if k >= 2:
            cases.append(("iwae", velbo.iwae_bound, "score+LOO (VIMCO)", velbo.ScoreFunction(velbo.LeaveOneOut())))
        cases += [("iwae", velbo.iwae_bound, "STL", velbo.StickingTheLanding()),
                  ("iwae", velbo.iwae_bound, "DReG", velbo.DReG())]
        reference = {}
        for name, objective, est_name, est in cases:
            g, seconds = gradient_samples(objective, est, k, model, x, params, reps, seed=100 + k)
            mean, var = g.mean(0), g.var(0, ddof=1)
            if est_name == "pathwise":
                reference[name] = (mean, var)
            ref_mean, ref_var = reference[name]
            z = np.abs(mean[:n_var] - ref_mean[:n_var]) / np.sqrt((var[:n_var] + ref_var[:n_var]) / reps + 1e-300)
            rows.append({
                "K": k, "objective": name, "estimator": est_name,
                "var_phi": var[:n_var].sum(), "ratio_phi": var[:n_var].sum() / ref_var[:n_var].sum(),
                "var_theta": var[n_var:].sum(), "ratio_theta": var[n_var:].sum() / ref_var[n_var:].sum(),
                "max_z_vs_pathwise": 0.0 if est_name == "pathwise" else z.max(),
                "us_per_grad": seconds * 1e6,
            })
    return rows


def format_table(rows: list[dict]) -> str:
    head = ("| K | objective | estimator | Var grad phi | ratio vs pathwise | Var grad W | ratio vs pathwise "
            "| max \\|mean - pathwise mean\\| / SE | us / gradient |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        lines.append(
            f"| {r['K']} | {r['objective']} | {r['estimator']} | {r['var_phi']:.3g} | {r['ratio_phi']:.3g} "
            f"| {r['var_theta']:.3g} | {r['ratio_theta']:.3g} | {r['max_z_vs_pathwise']:.1f} | {r['us_per_grad']:.0f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = _cli.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=2000, help="seeds per estimator")
    parser.add_argument("--latent", type=int, default=5)
    parser.add_argument("--data", type=int, default=10)
    args = parser.parse_args(argv)
    if args.reps < 2:
        parser.error(f"--reps must be >= 2 (a variance needs two samples); got {args.reps}")
    for flag in ("latent", "data"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be >= 1; got {getattr(args, flag)}")
    jax.config.update("jax_enable_x64", True)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; reps={args.reps}, "
          f"latent_dim={args.latent}, data_dim={args.data}, float64")
    print(format_table(run(args.reps, args.latent, args.data)))


if __name__ == "__main__":
    main()
