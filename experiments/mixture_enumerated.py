"""A Gaussian mixture on Old Faithful fitted by gradient ascent on the enumerated ELBO, against EM.

Model: z_n ~ Cat(pi), x_n | z_n = k ~ N(mu_k, Sigma_k), K = 2 full covariances, on the 272
standardised Old Faithful points (float64). The ELBO is computed by
``vijax.elbo.elbo(..., estimator=Enumerate())``: the exact sum over the K values of z_n.

* ``adam`` / ``lbfgs``: q = the exact posterior p(z_n | x_n, theta) (``Categorical`` with the
  joint's logits, held fixed inside each gradient step), so the enumerated ELBO equals
  log p(X | theta) and its gradient is the log-likelihood's (Fisher's identity); optimised
  over unconstrained parameters (weight logits, means, Cholesky factors with log diagonals)
  by ``optax.adam`` (constant learning rate, decayed a hundredfold over the last quarter) or
  ``optax.lbfgs``.
* ``adam_learned_q``: q(z_n) with its own free logits (one K-vector per point), optimised
  jointly with theta by Adam on the same enumerated ELBO (the variational-EM view without a
  closed-form E-step).
* ``em``: ``vijax.em.fit_from_state`` (closed-form E- and M-steps) from the same start.

All start from the PRML Fig. 9.8 initialisation of ``experiments/gmm_em.py`` (equal
weights, unit covariances, means (-1, 1) and (1.5, -1)). EM uses ``reg_covar`` = 1e-12 so
that its fixed point is the maximum-likelihood one that gradient ascent finds. Reported: the
final mean log-likelihood of each, the largest parameter difference to EM after matching the
labels, and the iterations and seconds each needs to come within ``--gap`` nats per point of
the best value found (times: the fastest of 5 runs of each compiled loop).

Usage::

    python experiments/mixture_enumerated.py --out outputs/mixture_enumerated
    python experiments/mixture_enumerated.py --quick --out /tmp/mixture_quick
"""

from __future__ import annotations

import datetime
import itertools
import math
import os
import pathlib
import platform
import time

import jax

jax.config.update("jax_enable_x64", True)

import distrax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import matplotlib  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import _cli  # noqa: E402  (experiments/_cli.py: sys.path[0] when run as a script)
from vijax import data as vdata  # noqa: E402
from vijax import elbo as velbo  # noqa: E402
from vijax import em  # noqa: E402

REPO_ROOT = _cli.REPO_ROOT
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "old_faithful.csv"
K = 2


# ------------------------------------------------------------------------------- model


def initial_parameters():
    """PRML Fig. 9.8's start (as experiments/gmm_em.py): weights, means, covariances."""
    return (np.array([0.5, 0.5]), np.array([[-1.0, 1.0], [1.5, -1.0]]),
            np.stack([np.eye(2)] * 2))


def to_unconstrained(weights, means, covs):
    chol = np.linalg.cholesky(covs)
    raw = np.tril(chol, -1) + np.stack([np.diag(np.log(np.diag(c))) for c in chol])
    return {"logits": jnp.log(jnp.asarray(weights)), "means": jnp.asarray(means),
            "chol": jnp.asarray(raw)}


def from_unconstrained(theta):
    raw = theta["chol"]
    diag = jnp.exp(jnp.diagonal(raw, axis1=-2, axis2=-1))
    chol = jnp.tril(raw, -1) + jax.vmap(jnp.diag)(diag)
    return jax.nn.softmax(theta["logits"]), theta["means"], chol


def log_joint_table(theta, x):
    """log pi_k + log N(x_n | mu_k, Sigma_k), ``[N, K]``."""
    _, means, chol = from_unconstrained(theta)
    comps = distrax.MultivariateNormalTri(means, chol)  # batch [K]
    log_w = jax.nn.log_softmax(theta["logits"])
    with jax.numpy_rank_promotion("allow"):
        return comps.log_prob(x[:, None, :]) + log_w


def enumerated_elbo(theta, x, q_logits):
    """Mean over points of sum_z q(z) [log p(x, z) - log q(z)] (``Enumerate``), nats/point."""
    table = log_joint_table(theta, x)
    q = distrax.Categorical(logits=q_logits)

    def log_joint_fn(z):  # z [N] int: one support point per example
        return jnp.take_along_axis(table, z[:, None], axis=1)[:, 0]

    return jnp.mean(velbo.elbo(jax.random.key(0), log_joint_fn, q, estimator=velbo.Enumerate()))


def exact_posterior_objective(theta, x):
    """Enumerated ELBO at q = p(z | x, theta) held fixed: value log p(X)/N, gradient its own."""
    q_logits = jax.lax.stop_gradient(log_joint_table(theta, x))
    return enumerated_elbo(theta, x, q_logits)


def mean_log_likelihood(theta, x):
    return jnp.mean(jax.nn.logsumexp(log_joint_table(theta, x), axis=1))


# ---------------------------------------------------------------------------- optimisers


REPEATS = 5


def _best_of(compiled, arg):
    """``compiled(arg)``'s outputs and the fastest of ``REPEATS`` timed calls (s): the machine
    may be shared, and the minimum is the least disturbed."""
    times = []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        out = jax.block_until_ready(compiled(arg))
        times.append(time.perf_counter() - t0)
    return (*out, min(times))


def run_gradient(name, theta0, x, num_iter, lr):
    """``num_iter`` steps in one ``lax.scan``; returns (final theta, trace [num_iter + 1] of the
    mean log-likelihood at the iterates, compile s, run s)."""
    learned_q = name == "adam_learned_q"
    params0 = {"theta": theta0}
    if learned_q:
        params0["q_logits"] = jnp.zeros((x.shape[0], K), x.dtype)

    def objective(params):
        if learned_q:
            return enumerated_elbo(params["theta"], x, params["q_logits"])
        return exact_posterior_objective(params["theta"], x)

    def loss(params):
        return -objective(params)

    if name == "lbfgs":
        opt = optax.lbfgs()
        value_and_grad = optax.value_and_grad_from_state(loss)

        def step(carry, _):
            params, state = carry
            value, grad = value_and_grad(params, state=state)
            updates, state = opt.update(grad, state, params, value=value, grad=grad,
                                        value_fn=loss)
            params = optax.apply_updates(params, updates)
            return (params, state), mean_log_likelihood(params["theta"], x)
    else:
        # constant, then decayed a hundredfold over the last quarter (the iterates settle)
        opt = optax.adam(optax.exponential_decay(lr, max(1, num_iter // 4), 0.01,
                                                 transition_begin=3 * num_iter // 4))

        def step(carry, _):
            params, state = carry
            grad = jax.grad(loss)(params)
            updates, state = opt.update(grad, state, params)
            params = optax.apply_updates(params, updates)
            return (params, state), mean_log_likelihood(params["theta"], x)

    def run(params):
        (params, _), trace = jax.lax.scan(step, (params, opt.init(params)), None, length=num_iter)
        return params, trace

    t0 = time.perf_counter()
    compiled = jax.jit(run).lower(params0).compile()
    compile_s = time.perf_counter() - t0
    params, trace, run_s = _best_of(compiled, params0)
    trace = np.concatenate([[float(mean_log_likelihood(theta0, x))], np.asarray(trace)])
    return params["theta"], trace, compile_s, run_s


def run_em(x, max_iter, tol):
    w, m, c = initial_parameters()
    state = em.state_from_parameters(jnp.asarray(w), jnp.asarray(m), jnp.asarray(c),
                                     reg_covar=1e-12)
    fit = jax.jit(lambda s: em.fit_from_state(s, x, max_iter=max_iter, tol=tol))
    t0 = time.perf_counter()
    compiled = fit.lower(state).compile()
    compile_s = time.perf_counter() - t0
    final, info, run_s = _best_of(compiled, state)
    n = int(info.num_iterations)
    # trace[i] = log-likelihood of the parameters after i steps (EM records the E-step value of
    # the parameters entering each step); the last entry is the final state's
    trace = np.concatenate([np.asarray(info.log_likelihood)[:n],
                            [float(jnp.mean(em.log_likelihood(final, x)))]])
    return final, trace, compile_s, run_s, n, bool(info.converged)


def _match(a_means, b_means):
    """The label permutation of ``a`` closest to ``b`` (K! candidates)."""
    best = min(itertools.permutations(range(K)),
               key=lambda p: float(np.sum((a_means[list(p)] - b_means) ** 2)))
    return list(best)


def _first_within(trace, target, gap):
    hits = np.nonzero(trace >= target - gap)[0]
    return int(hits[0]) if hits.size else None


# ------------------------------------------------------------------------------ figures


def plot_convergence(traces: dict, best: float, path: pathlib.Path) -> None:
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for name, trace in traces.items():
        gap = np.maximum(best - trace, 1e-16)
        ax.semilogy(np.arange(len(trace)), gap, label=name)
    ax.set_xscale("symlog", linthresh=10)
    ax.set_xlabel("iteration")
    ax.set_ylabel("best − mean log-likelihood (nats / point)")
    ax.set_title("Old Faithful, K = 2: EM vs gradient ascent on the enumerated ELBO", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_fits(x, fits: dict, path: pathlib.Path) -> None:
    fig, ax = plt.subplots(figsize=(4.8, 4.6))
    ax.scatter(x[:, 0], x[:, 1], s=8, c="0.6", edgecolors="none")
    styles = {"em": dict(color="tab:green", lw=4, alpha=0.5),
              "adam": dict(color="tab:red", lw=1.5, ls="--"),
              "lbfgs": dict(color="tab:blue", lw=1.0, ls=":")}
    t = np.linspace(0, 2 * np.pi, 200)
    circle = np.stack([np.cos(t), np.sin(t)])
    for name, (means, covs) in fits.items():
        if name not in styles:
            continue
        for i, (m, c) in enumerate(zip(means, covs)):
            curve = m[:, None] + np.linalg.cholesky(c) @ circle
            ax.plot(curve[0], curve[1], label=name if i == 0 else None, **styles[name])
    ax.set_aspect("equal")
    ax.legend(fontsize=8)
    ax.set_title("fitted components (one standard deviation)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------- main


def main(argv=None) -> dict:
    p = _cli.Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=pathlib.Path, default=DEFAULT_DATA,
                   help="Old Faithful CSV (default ../shared/data/old_faithful.csv)")
    p.add_argument("--out", type=pathlib.Path,
                   default=REPO_ROOT / "outputs" / "mixture_enumerated", help="output folder")
    p.add_argument("--quick", action="store_true", help="fewer iterations (a smoke run)")
    p.add_argument("--adam-iters", type=int, default=None, help="Adam steps (default 4000)")
    p.add_argument("--lbfgs-iters", type=int, default=None, help="L-BFGS steps (default 100)")
    p.add_argument("--lr", type=float, default=0.03, help="Adam's learning rate (0.03)")
    p.add_argument("--gap", type=float, default=1e-6,
                   help="convergence: within this many nats/point of the best (1e-6)")
    args = p.parse_args(argv)
    if args.adam_iters is None:
        args.adam_iters = 300 if args.quick else 4000
    if args.lbfgs_iters is None:
        args.lbfgs_iters = 30 if args.quick else 100
    for name in ("adam_iters", "lbfgs_iters"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1; got {getattr(args, name)}")
    for name in ("lr", "gap"):
        value = getattr(args, name)
        if not (math.isfinite(value) and value > 0):
            p.error(f"--{name} must be a finite number > 0; got {value}")
    x_np = _cli.read_input(  # read before anything is written
        p, args.data, lambda path: vdata.load_old_faithful(path, standardize=True),
        "the Old Faithful CSV")
    if args.out.exists() and not args.out.is_dir():
        p.error(f"--out {args.out} is a file")
    started = time.perf_counter()
    x = jnp.asarray(x_np)
    theta0 = to_unconstrained(*initial_parameters())

    em_state, em_trace, em_compile, em_run, em_iters, em_converged = run_em(
        x, max_iter=1000, tol=1e-12)
    runs = {"em": dict(trace=em_trace, compile_s=em_compile, run_s=em_run,
                       iterations_run=em_iters, converged=em_converged,
                       weights=np.asarray(em_state.weights), means=np.asarray(em_state.means),
                       covariances=np.asarray(em_state.covariances))}
    for name, iters in (("adam", args.adam_iters), ("lbfgs", args.lbfgs_iters),
                        ("adam_learned_q", args.adam_iters)):
        theta, trace, compile_s, run_s = run_gradient(name, theta0, x, iters, args.lr)
        w, m, chol = (np.asarray(a) for a in from_unconstrained(theta))
        runs[name] = dict(trace=trace, compile_s=compile_s, run_s=run_s, iterations_run=iters,
                          weights=w, means=m, covariances=chol @ np.swapaxes(chol, -1, -2))
    best = max(float(np.max(r["trace"])) for r in runs.values())

    table = {}
    for name, r in runs.items():
        perm = _match(r["means"], runs["em"]["means"])
        hit = _first_within(r["trace"], best, args.gap)
        per_iter = r["run_s"] / max(1, r["iterations_run"])
        table[name] = {
            "final_mean_log_likelihood": float(r["trace"][-1]),
            "gap_to_best": best - float(r["trace"][-1]),
            "iterations_to_gap": hit,
            "seconds_to_gap": None if hit is None else hit * per_iter,
            "seconds_per_iteration": per_iter,
            "iterations_run": r["iterations_run"], "run_s": r["run_s"],
            "compile_s": r["compile_s"],
            "max_abs_diff_to_em": {
                "weights": float(np.max(np.abs(r["weights"][perm] - runs["em"]["weights"]))),
                "means": float(np.max(np.abs(r["means"][perm] - runs["em"]["means"]))),
                "covariances": float(np.max(np.abs(r["covariances"][perm]
                                                   - runs["em"]["covariances"])))},
            "weights": r["weights"][perm].tolist(), "means": r["means"][perm].tolist(),
            "covariances": r["covariances"][perm].tolist(),
        }
        if name == "em":
            table[name]["converged"] = r["converged"]
        print(f"{name:>15}: mean log-lik {r['trace'][-1]:.10f}, {hit} iterations "
              f"to within {args.gap:g} of the best, {per_iter * 1e6:.1f} us/iteration, "
              f"max |mean - EM's| {table[name]['max_abs_diff_to_em']['means']:.2e}", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    plot_convergence({k: r["trace"] for k, r in runs.items()}, best,
                     args.out / "mixture_convergence.png")
    plot_fits(x_np, {k: (r["means"], r["covariances"]) for k, r in runs.items()},
              args.out / "mixture_fits.png")
    summary = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": _cli.cpu_model(), "cpu_count": os.cpu_count(),
        "load_average_at_start": os.getloadavg()[0],
        "command": _cli.command("mixture_enumerated.py", argv),
        "jax_version": jax.__version__, "python": platform.python_version(),
        "config": {"adam_iters": args.adam_iters, "lbfgs_iters": args.lbfgs_iters,
                   "lr": args.lr, "gap": args.gap, "quick": args.quick,
                   "em_reg_covar": 1e-12, "em_tol": 1e-12},
        "best_mean_log_likelihood": best, "results": table,
        "traces": {k: r["trace"].tolist() for k, r in runs.items()},
        "total_wall_s": time.perf_counter() - started,
    }
    _cli.write_json(args.out / "results.json", summary)
    for name in ("results.json", "mixture_convergence.png", "mixture_fits.png"):
        print("wrote", args.out / name)
    return summary


if __name__ == "__main__":
    main()
