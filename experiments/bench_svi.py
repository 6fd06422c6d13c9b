"""Benchmark: vijax stochastic VI (``vijax.svi``) against NumPyro ``SVI`` and Blackjax VI on the CPU.

Side by side in one run, on the same model, data, optimizer (Adam, the same learning rate,
``b1 = 0.9, b2 = 0.999, eps = 1e-8`` everywhere), step count, number of Monte Carlo draws
per step (``--num-samples``), gradient estimator (plain reparameterization: NumPyro's
``Trace_ELBO``, vijax's ``Pathwise()``, Blackjax with ``stl_estimator=False``), initial q
(loc 0, scale 0.1 for every latent, no correlations) and float32:

* vijax: ``families.MeanFieldNormal`` / ``FullRankNormal`` fitted with ``jax.jit(svi.run)``
  (the whole ``lax.scan`` over steps in one compiled program; row "vijax svi.run (jit)") and
  with ``svi.fit`` (which jits ``run`` internally; row "vijax svi.fit");
* NumPyro: ``SVI(model, guide, numpyro.optim.Adam(lr), Trace_ELBO(num_particles))`` with
  ``AutoNormal`` (or ``AutoDiagonalNormal``, ``--numpyro-mf-guide``) for mean field and
  ``AutoMultivariateNormal`` for full rank, run by ``SVI.run(..., progress_bar=False)`` (a
  ``lax.scan`` over ``SVI.update``) under ``jax.jit``, from a state made by ``SVI.init``;
* Blackjax: ``blackjax.vi.meanfield_vi.step`` / ``fullrank_vi.step`` inside a
  ``jax.lax.scan`` (keys from ``jax.random.split``, the library's idiom).

Problems:

(a) Bayesian logistic regression on scikit-learn's breast-cancer data (standardised, plus an
    intercept column: 569 x 31), prior N(0, I), full batch, ``--steps-a`` steps;
(b) synthetic logistic regression, N = ``--synth-n`` rows, D = ``--synth-d`` (correlated
    features: an AR(1) chain with correlation 0.7; prior N(0, I)),
    minibatches of ``--batch-size`` rows with the likelihood scaled by N/B: vijax with
    ``svi.minibatch_log_joint`` and ``data``/``batch_size`` in ``svi.run`` (indices drawn with
    replacement inside the scan); NumPyro with ``numpyro.plate("data", N, subsample_size=B)``
    (its CPU subsampling is a partial Fisher-Yates shuffle, without replacement); Blackjax in
    a scan that draws ``jax.random.randint`` indices (with replacement, like vijax).

The model is the same everywhere: NumPyro's ``Bernoulli(logits=x @ w)`` and, for vijax and
Blackjax, a log density with NumPyro's arithmetic for log(1 + e^l) (``max(l, 0) +
log1p(exp(-|l|))``; ``--jax-softplus`` writes it with ``jax.nn.softplus`` instead, which costs
more per row than either library's own overhead on (a)).

Reported per (problem, family, library): ms/step after compilation (each timed call is one
full compiled run of all the steps, divided by the step count; median and minimum over
``--repeats`` calls, the libraries interleaved so that they share the background load; also
the process CPU time, less sensitive to other processes on a shared machine), the first-call
time (compile + one run; the libraries' ``init`` runs before it) and the final ELBO of the
fitted q. Every call is a separate fit with its own keys (``repeats + 1`` fits per library,
the first call's included), and each fitted q is evaluated the same way for every library: a
``distrax`` distribution built from its parameters, passed to ``vijax.elbo.elbo`` on the
*full* data with ``--eval-samples / (repeats + 1)`` independent draws. The ELBO reported is
the mean over the fits, its standard error the spread over fits / sqrt(fits) (at least the
evaluation's own Monte Carlo error of that mean), which holds the
optimisation noise of a constant-step-size last iterate as well as the evaluation's Monte
Carlo error; ``z`` is the difference to vijax's ELBO over the combined standard error. The
ratio table gives vijax's ms/step over the faster peer's (median, minimum and CPU-time
minimum); the goal tracked: a ratio <= 0.8 with the peers' ELBOs within 3 standard errors of
vijax's.

Usage::

    python experiments/bench_svi.py                    # full run (several minutes on 2 cores)
    python experiments/bench_svi.py --quick            # fewer steps, repeats and eval draws
    python experiments/bench_svi.py --problems breast_cancer --families meanfield --repeats 9
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import time
from typing import Callable

import _cli  # experiments/_cli.py: sys.path[0] when run as a script

PROBLEMS = ("breast_cancer", "synthetic")
FAMILIES = ("meanfield", "fullrank")
MF_GUIDES = ("AutoNormal", "AutoDiagonalNormal")
INIT_SCALE = 0.1  # NumPyro's autoguide default; vijax's families' default too
# Evaluation keys per (library, is svi.fit), independent of which rows a run has
EVAL_KEY_INDEX = {("vijax", False): 0, ("vijax", True): 1, ("numpyro", False): 2,
                  ("blackjax", False): 3}

# Defaults: full run / --quick
DEFAULTS = {"steps_a": (20_000, 2_000), "steps_b": (5_000, 500), "repeats": (5, 3),
            "eval_samples": (20_000, 5_000)}


# ----------------------------------------------------------------------------- arguments

def _csv_choice(parser, flag: str, value: str, allowed: tuple[str, ...]) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = sorted(set(items) - set(allowed))
    if not items or bad:
        parser.error(f"{flag} takes a comma-separated subset of {', '.join(allowed)}; got "
                     f"{value!r}")
    return list(dict.fromkeys(items))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problems", default=",".join(PROBLEMS),
                        help=f"comma-separated subset of {', '.join(PROBLEMS)}")
    parser.add_argument("--families", default=",".join(FAMILIES),
                        help=f"comma-separated subset of {', '.join(FAMILIES)}")
    parser.add_argument("--quick", action="store_true",
                        help="fewer steps, repeats and evaluation draws (defaults below)")
    parser.add_argument("--steps-a", type=int, default=None,
                        help="steps on breast_cancer (default 20000; --quick 2000)")
    parser.add_argument("--steps-b", type=int, default=None,
                        help="steps on synthetic (default 5000; --quick 500)")
    parser.add_argument("--lr-a", type=float, default=1e-3, help="Adam learning rate, (a)")
    parser.add_argument("--lr-b", type=float, default=1e-3, help="Adam learning rate, (b)")
    parser.add_argument("--num-samples", type=int, default=1,
                        help="Monte Carlo draws of z per step (every library)")
    parser.add_argument("--synth-n", type=int, default=100_000, help="rows of (b)")
    parser.add_argument("--synth-d", type=int, default=100, help="dimension of (b)")
    parser.add_argument("--batch-size", type=int, default=1000, help="minibatch rows of (b)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed calls per library (default 5; --quick 3)")
    parser.add_argument("--eval-samples", type=int, default=None,
                        help="draws for the final-ELBO evaluation, shared out over the "
                        "repeats + 1 fits of each library (default 20000; --quick 5000)")
    parser.add_argument("--jax-softplus", action="store_true",
                        help="write vijax's and Blackjax's log-likelihood with jax.nn.softplus "
                        "(default: NumPyro's Bernoulli-logits arithmetic)")
    parser.add_argument("--no-fit", action="store_true",
                        help="leave out the vijax svi.fit row (one compilation less per case)")
    parser.add_argument("--numpyro-mf-guide", default="AutoNormal", choices=MF_GUIDES)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="outputs/bench_svi/bench_svi.json")
    args = parser.parse_args(argv)

    args.problems = _csv_choice(parser, "--problems", args.problems, PROBLEMS)
    args.families = _csv_choice(parser, "--families", args.families, FAMILIES)
    for name, (full, quick) in DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    for flag in ("steps_a", "steps_b", "num_samples", "synth_n", "synth_d", "batch_size",
                 "repeats"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1; got {getattr(args, flag)}")
    if args.eval_samples < 2:
        parser.error(f"--eval-samples must be >= 2 (for a standard error); got "
                     f"{args.eval_samples}")
    if args.batch_size > args.synth_n:
        parser.error(f"--batch-size must be <= --synth-n ({args.synth_n}); got "
                     f"{args.batch_size}")
    for flag in ("lr_a", "lr_b"):
        value = getattr(args, flag)
        if not (math.isfinite(value) and value > 0):
            parser.error(f"--{flag.replace('_', '-')} must be a finite number > 0; got {value}")
    if not 0 <= args.seed < 2**32:
        parser.error(f"--seed must be in [0, 2**32); got {args.seed}")
    if os.path.isdir(args.out) or not args.out.endswith(".json"):
        parser.error(f"--out must be the path of a .json file; got {args.out!r}")
    return args


# ----------------------------------------------------------------------------- problems

@dataclasses.dataclass
class Problem:
    name: str
    x: object  # [N, D] float32 jax array
    y: object  # [N] float32 (0/1)
    batch_size: int | None  # None: full batch
    steps: int
    lr: float

    @property
    def num_data(self) -> int:
        return int(self.x.shape[0])

    @property
    def dim(self) -> int:
        return int(self.x.shape[1])


def breast_cancer(steps: int, lr: float) -> Problem:
    import jax.numpy as jnp
    import numpy as np
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    x = (data.data - data.data.mean(0)) / data.data.std(0)
    x = np.concatenate([x, np.ones((x.shape[0], 1))], axis=1).astype(np.float32)
    return Problem("breast_cancer", jnp.asarray(x), jnp.asarray(data.target, jnp.float32),
                   None, steps, lr)


SYNTH_RHO = 0.7  # correlation of neighbouring features in (b)


def synthetic(n: int, d: int, batch_size: int, steps: int, lr: float, seed: int) -> Problem:
    """Rows x ~ N(0, C) with C_ij = rho^|i - j| (rho = 0.7: an AR(1) chain of standard normal
    features, so that the posterior is correlated and mean field differs from full rank);
    y ~ Bernoulli(sigmoid(x . w*)), w* ~ N(0, 4 / D I)."""
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(seed)
    e = rng.standard_normal((n, d))
    x = np.empty((n, d))
    x[:, 0] = e[:, 0]
    for j in range(1, d):
        x[:, j] = SYNTH_RHO * x[:, j - 1] + math.sqrt(1 - SYNTH_RHO**2) * e[:, j]
    x = x.astype(np.float32)
    w = rng.standard_normal(d) * (2.0 / np.sqrt(d))
    y = (rng.uniform(size=n) < 1.0 / (1.0 + np.exp(-(x @ w)))).astype(np.float32)
    return Problem("synthetic", jnp.asarray(x), jnp.asarray(y), batch_size, steps, lr)


# The model's densities, shared by vijax and Blackjax (NumPyro writes the same model with its
# own distributions): prior N(0, I), Bernoulli likelihood with logits x . w.

def log_prior(w):
    import jax.numpy as jnp
    return -0.5 * jnp.sum(w * w) - 0.5 * w.shape[-1] * math.log(2 * math.pi)


JAX_SOFTPLUS = False  # --jax-softplus: log(1 + e^l) by jax.nn.softplus instead


def log_lik_rows(w, x, y):
    """log Bernoulli(y | sigmoid(x . w)) per row, y l - log(1 + e^l) with l = x . w. By
    default log(1 + e^l) = max(l, 0) + log1p(e^-|l|), the arithmetic of NumPyro's
    ``Bernoulli(logits=l).log_prob``, so the model costs the same in every library;
    ``jax.nn.softplus`` (a ``logaddexp`` with a custom JVP) costs more per row."""
    import jax
    import jax.numpy as jnp
    logits = x @ w
    if JAX_SOFTPLUS:
        return y * logits - jax.nn.softplus(logits)  # [rows]
    return y * logits - (jnp.maximum(logits, 0.0) + jnp.log1p(jnp.exp(-jnp.abs(logits))))


def full_log_joint(w, x, y):
    import jax.numpy as jnp
    return log_prior(w) + jnp.sum(log_lik_rows(w, x, y))


# ----------------------------------------------------------------------------- runners

@dataclasses.dataclass
class Runner:
    """One library's fit: ``program(*make_args(i))`` runs all the steps of fit number ``i``
    (its own keys, derived from the case's key and ``i``) and returns its output;
    ``make_args`` (the library's ``init``, untimed) runs before the timer starts.
    ``q(output)`` gives ``(kind, loc, scale)``: "diag" with a scale vector or "tri" with a
    lower-triangular scale matrix, the fitted q."""

    library: str
    variant: str
    program: Callable[..., object]
    make_args: Callable[[int], tuple]
    q: Callable[[object], tuple]
    first_call_s: float = float("nan")
    times: list = dataclasses.field(default_factory=list)
    cpu_times: list = dataclasses.field(default_factory=list)
    outputs: list = dataclasses.field(default_factory=list)  # one per fit, fit 0 first

    @property
    def name(self) -> str:
        return f"{self.library} {self.variant}"


def vijax_runners(problem: Problem, family_name: str, num_samples: int, key) -> list[Runner]:
    import jax
    import optax

    from vijax import families, svi

    d, n, b = problem.dim, problem.num_data, problem.batch_size
    family = (families.MeanFieldNormal((d,), init_scale=INIT_SCALE) if family_name == "meanfield"
              else families.FullRankNormal(d, init_scale=INIT_SCALE))
    optimizer = optax.adam(problem.lr)
    objective = svi.ELBO(num_samples=num_samples)
    if b is None:
        def log_joint_fn(w, batch):
            return full_log_joint(w, *batch)
    else:
        log_joint_fn = svi.minibatch_log_joint(
            lambda w: log_prior(w), lambda w, batch: log_lik_rows(w, *batch), n)
    data = (problem.x, problem.y)

    def run_args(i):  # svi.fit's key convention, so that both rows fit the same q
        init_key, run_key = jax.random.split(jax.random.fold_in(key, i))
        return run_key, svi.init(init_key, family, optimizer), data

    @jax.jit
    def run(run_key, state, data):
        state, info = svi.run(run_key, state, log_joint_fn, problem.steps, objective=objective,
                              data=data, batch_size=b)
        return state.params, info.objective

    def q(output):
        params = output[0]
        if family_name == "meanfield":
            return "diag", params["loc"], jax.nn.softplus(params["raw_scale"])
        dist = family.distribution(params)
        return "tri", params["loc"], dist.scale_tri

    def fit(fit_key):
        state, info = svi.fit(fit_key, family, optimizer, log_joint_fn, problem.steps,
                              objective=objective, data=data, batch_size=b)
        return state.params, info.objective

    return [Runner("vijax", "svi.run (jit)", run, run_args, q),
            Runner("vijax", "svi.fit", fit, lambda i: (jax.random.fold_in(key, i),), q)]


def numpyro_runner(problem: Problem, family_name: str, num_samples: int, key,
                   mf_guide: str) -> Runner:
    import jax
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as nd
    from numpyro.infer import SVI, Trace_ELBO, autoguide
    from numpyro.infer.initialization import init_to_value

    d, n, b = problem.dim, problem.num_data, problem.batch_size

    def model(x, y):
        w = numpyro.sample("w", nd.Normal(0.0, 1.0).expand([d]).to_event(1))
        with numpyro.plate("data", n, subsample_size=b):
            xb = numpyro.subsample(x, event_dim=1)
            yb = numpyro.subsample(y, event_dim=0)
            numpyro.sample("y", nd.Bernoulli(logits=xb @ w), obs=yb)

    init = init_to_value(values={"w": jnp.zeros(d)})
    guide_name = mf_guide if family_name == "meanfield" else "AutoMultivariateNormal"
    guide = getattr(autoguide, guide_name)(model, init_loc_fn=init, init_scale=INIT_SCALE)
    engine = SVI(model, guide, numpyro.optim.Adam(problem.lr),
                 Trace_ELBO(num_particles=num_samples))

    def run_args(i):
        init_key, run_key = jax.random.split(jax.random.fold_in(key, i))
        return run_key, engine.init(init_key, problem.x, problem.y), problem.x, problem.y

    @jax.jit
    def run(run_key, state, x, y):
        result = engine.run(run_key, problem.steps, x, y, progress_bar=False, init_state=state)
        return result.params, -result.losses

    def q(output):
        params = output[0]
        if guide_name == "AutoNormal":
            return "diag", params["w_auto_loc"], params["w_auto_scale"]
        if guide_name == "AutoDiagonalNormal":
            return "diag", params["auto_loc"], params["auto_scale"]
        return "tri", params["auto_loc"], params["auto_scale_tril"]

    return Runner("numpyro", f"SVI.run + {guide_name}", run, run_args, q)


def blackjax_runner(problem: Problem, family_name: str, num_samples: int, key) -> Runner:
    import blackjax
    import jax
    import jax.numpy as jnp
    import optax

    d, n, b = problem.dim, problem.num_data, problem.batch_size
    optimizer = optax.adam(problem.lr)
    position = jnp.zeros(d)
    if family_name == "meanfield":
        module = blackjax.vi.meanfield_vi
        state0 = module.init(position, optimizer)
        state0 = state0._replace(rho=jnp.full(d, math.log(INIT_SCALE)))  # sigma = exp(rho)
        state0 = state0._replace(opt_state=optimizer.init((state0.mu, state0.rho)))
    else:
        module = blackjax.vi.fullrank_vi
        state0 = module.init(position, optimizer)
        chol = state0.chol_params.at[:d].set(math.log(INIT_SCALE))  # log-diagonal first
        state0 = state0._replace(chol_params=chol,
                                 opt_state=optimizer.init((state0.mu, chol)))

    @jax.jit
    def run(key, state, x, y):
        def body(state, step_key):
            if b is None:
                xb, yb, scale = x, y, 1.0
            else:
                batch_key, step_key = jax.random.split(step_key)
                idx = jax.random.randint(batch_key, (b,), 0, n)
                xb, yb, scale = x[idx], y[idx], n / b

            def logdensity_fn(w):
                return log_prior(w) + scale * jnp.sum(log_lik_rows(w, xb, yb))

            state, info = module.step(step_key, state, logdensity_fn, optimizer,
                                      num_samples=num_samples, stl_estimator=False)
            return state, -info.elbo  # blackjax's "elbo" is the loss KL estimate

        state, elbos = jax.lax.scan(body, state, jax.random.split(key, problem.steps))
        return state, elbos

    def q(output):
        state = output[0]
        if family_name == "meanfield":
            return "diag", state.mu, jnp.exp(state.rho)
        return "tri", state.mu, blackjax.vi.fullrank_vi._unflatten_cholesky(state.chol_params, d)

    name = "meanfield_vi" if family_name == "meanfield" else "fullrank_vi"
    return Runner("blackjax", f"{name}.step in lax.scan", run,
                  lambda i: (jax.random.fold_in(key, i), state0, problem.x, problem.y), q)


# ----------------------------------------------------------------------------- evaluation

def make_elbo_evaluator(num_samples: int, chunk: int):
    """``evaluate(key, kind, loc, scale, x, y) -> (mean, standard error)`` of the full-data
    ELBO of q, from ``num_samples`` single-draw ``vijax.elbo.elbo`` estimates."""
    import distrax
    import jax
    import numpy as np

    from vijax import elbo as velbo

    @jax.jit
    def values_diag(keys, loc, scale, x, y):
        q = distrax.MultivariateNormalDiag(loc, scale)
        return jax.lax.map(lambda k: velbo.elbo(k, lambda w: full_log_joint(w, x, y), q),
                           keys, batch_size=chunk)

    @jax.jit
    def values_tri(keys, loc, scale, x, y):
        q = distrax.MultivariateNormalTri(loc, scale)
        return jax.lax.map(lambda k: velbo.elbo(k, lambda w: full_log_joint(w, x, y), q),
                           keys, batch_size=chunk)

    def evaluate(key, kind, loc, scale, x, y):
        fn = values_diag if kind == "diag" else values_tri
        v = np.asarray(fn(jax.random.split(key, num_samples), loc, scale, x, y), np.float64)
        return float(v.mean()), float(v.std(ddof=1) / math.sqrt(v.size))

    return evaluate


# ----------------------------------------------------------------------------- timing

def _block(out):
    import jax
    return jax.block_until_ready(out)


def time_runners(runners: list[Runner], repeats: int) -> None:
    """First call (compile + fit 0) of each, then ``repeats`` rounds (fits 1..repeats, each
    with its own keys), round-robin; wall-clock and process CPU time (all threads) of every
    call, the arguments made before the timer starts. Every fit's output is kept."""
    for r in runners:
        args = _block(r.make_args(0))
        start = time.perf_counter()
        r.outputs.append(_block(r.program(*args)))
        r.first_call_s = time.perf_counter() - start
    for i in range(1, repeats + 1):
        for r in runners:
            args = _block(r.make_args(i))
            cpu, start = time.process_time(), time.perf_counter()
            r.outputs.append(_block(r.program(*args)))
            r.times.append(time.perf_counter() - start)
            r.cpu_times.append(time.process_time() - cpu)


# ----------------------------------------------------------------------------- report

def _fmt(value: float, digits: int = 3) -> str:
    return "—" if value is None or value != value else f"{value:.{digits}f}"


def table(rows: list[dict]) -> str:
    lines = ["| problem | family | library | ms/step median | ms/step min | spread | "
             "CPU ms/step min | first call s | final ELBO ± SE | z vs vijax |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['problem']} | {r['family']} | {r['library']} {r['variant']} | "
            f"{_fmt(r['ms_per_step_median'], 4)} | {_fmt(r['ms_per_step_min'], 4)} | "
            f"{_fmt(100 * r['spread'], 0)}% | {_fmt(r['cpu_ms_per_step_min'], 4)} | "
            f"{_fmt(r['first_call_s'], 2)} | "
            f"{r['elbo']:.2f} ± {r['elbo_se']:.2f} | {_fmt(r['z_vs_vijax'], 1)} |")
    return "\n".join(lines)


def ratio_table(ratios: list[dict]) -> str:
    lines = ["| problem | family | vijax svi.run ms/step | faster peer (ms/step) | "
             "vijax / peer: median | min | CPU min | vijax svi.fit / peer | max abs z of "
             "the peers' ELBOs | goal: <= 0.8 and abs z <= 3 |",
             "|---|---|---:|---|---:|---:|---:|---:|---:|---|"]
    for r in ratios:
        met = r["ratio_median"] <= 0.8 and r["max_abs_z"] <= 3
        lines.append(
            f"| {r['problem']} | {r['family']} | {_fmt(r['vijax_ms'], 4)} | {r['peer']} "
            f"({_fmt(r['peer_ms'], 4)}) | {_fmt(r['ratio_median'], 2)} | "
            f"{_fmt(r['ratio_min'], 2)} | {_fmt(r['ratio_cpu_min'], 2)} | "
            f"{_fmt(r['fit_ratio_median'], 2)} | {_fmt(r['max_abs_z'], 1)} | "
            f"{'met' if met else 'not met'} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)  # exits 2 on a bad flag, before any work
    global JAX_SOFTPLUS
    JAX_SOFTPLUS = args.jax_softplus

    import jax
    import numpy as np

    missing = []
    for pkg in ("numpyro", "blackjax"):
        try:
            __import__(pkg)
        except ImportError:
            missing.append(pkg)
    if missing:
        print(f"not installed: {', '.join(missing)} (pip install -e '.[bench]'): their rows "
              "are skipped")

    env = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
           "cpu": _cli.cpu_model(), "cores": os.cpu_count(),
           "devices": [str(dv) for dv in jax.devices()],
           "versions": _cli.versions("vijax", "jax", "jaxlib", "numpyro", "blackjax", "optax",
                                     "distrax", "numpy"),
           "command": _cli.command("bench_svi.py", argv),
           "xla_flags": os.environ.get("XLA_FLAGS", ""), "loadavg_start": os.getloadavg()}
    print(json.dumps(env))

    problems = []
    if "breast_cancer" in args.problems:
        problems.append(breast_cancer(args.steps_a, args.lr_a))
    if "synthetic" in args.problems:
        problems.append(synthetic(args.synth_n, args.synth_d, args.batch_size, args.steps_b,
                                  args.lr_b, args.seed))
    num_fits = args.repeats + 1  # the first call's fit and one per timed call
    eval_per_fit = max(2, -(-args.eval_samples // num_fits))
    evaluate = make_elbo_evaluator(eval_per_fit, chunk=min(eval_per_fit, 500))
    rows, ratios = [], []
    key = jax.random.key(args.seed)
    eval_key = jax.random.fold_in(key, 1)
    for p_index, problem in enumerate(problems):
        for f_index, family in enumerate(args.families):
            fit_key = jax.random.fold_in(key, 100 + 10 * p_index + f_index)
            runners = vijax_runners(problem, family, args.num_samples, fit_key)
            if args.no_fit:
                runners = runners[:1]
            if "numpyro" not in missing:
                runners.append(numpyro_runner(problem, family, args.num_samples, fit_key,
                                              args.numpyro_mf_guide))
            if "blackjax" not in missing:
                runners.append(blackjax_runner(problem, family, args.num_samples, fit_key))
            print(f"\n{problem.name} (N={problem.num_data}, D={problem.dim}, "
                  f"batch={problem.batch_size or 'full'}, steps={problem.steps}, "
                  f"lr={problem.lr:g}, S={args.num_samples}), {family}", flush=True)
            time_runners(runners, args.repeats)
            group = []
            for r in runners:
                eval_index = 1000 * p_index + 100 * f_index + EVAL_KEY_INDEX[r.library, r.variant
                                                                            == "svi.fit"]
                per_fit = [evaluate(jax.random.fold_in(jax.random.fold_in(eval_key, eval_index), j),
                                    *r.q(output), problem.x, problem.y)
                           for j, output in enumerate(r.outputs)]
                fit_elbos = np.asarray([e for e, _ in per_fit])
                elbo = float(fit_elbos.mean())
                # the spread over fits holds both the optimisation noise and the evaluation's;
                # with few fits it is a rough estimate, so never below the evaluation's own
                # Monte Carlo error of the mean over fits
                eval_se = math.sqrt(sum(s * s for _, s in per_fit)) / fit_elbos.size
                se = (max(float(fit_elbos.std(ddof=1) / math.sqrt(fit_elbos.size)), eval_se)
                      if fit_elbos.size > 1 else eval_se)
                t = np.asarray(r.times) / problem.steps * 1e3
                c = np.asarray(r.cpu_times) / problem.steps * 1e3
                med = float(np.median(t))
                row = {"problem": problem.name, "family": family, "library": r.library,
                       "variant": r.variant, "num_data": problem.num_data, "dim": problem.dim,
                       "batch_size": problem.batch_size, "steps": problem.steps,
                       "lr": problem.lr, "num_samples": args.num_samples,
                       "ms_per_step_median": med, "ms_per_step_min": float(t.min()),
                       "ms_per_step_all": t.tolist(),
                       "cpu_ms_per_step_median": float(np.median(c)),
                       "cpu_ms_per_step_min": float(c.min()),
                       "spread": float((t.max() - t.min()) / med),
                       "first_call_s": r.first_call_s,
                       "final_objective_trace_mean_last10pct": float(np.mean(np.asarray(
                           r.outputs[0][1])[-max(1, problem.steps // 10):])),
                       "elbo": elbo, "elbo_se": se, "elbo_per_fit": fit_elbos.tolist(),
                       "elbo_sd_over_fits": (float(fit_elbos.std(ddof=1)) if fit_elbos.size > 1
                                             else float("nan")),
                       "elbo_eval_se_per_fit": [s for _, s in per_fit],
                       "z_vs_vijax": float("nan"),
                       "same_q_as_svi_run": None}
                group.append(row)
                print(f"  {r.name:45s} {med:8.4f} ms/step (min {t.min():.4f}), first call "
                      f"{r.first_call_s:6.2f} s, ELBO {elbo:10.3f} ± {se:.3f}", flush=True)
            ref = group[0]
            if not args.no_fit:  # svi.fit uses svi.run's keys: the same q, bit for bit
                group[1]["same_q_as_svi_run"] = all(
                    np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(
                        runners[0].outputs[0][0]),
                        jax.tree_util.tree_leaves(runners[1].outputs[0][0])))
            for row in group[1:]:
                row["z_vs_vijax"] = (row["elbo"] - ref["elbo"]) / math.hypot(ref["elbo_se"],
                                                                             row["elbo_se"])
            rows += group
            peers = [row for row in group if row["library"] != "vijax"]
            if peers:
                fast = min(peers, key=lambda row: row["ms_per_step_median"])
                fit_row = next((row for row in group if row["variant"] == "svi.fit"), None)
                ratios.append({
                    "problem": problem.name, "family": family,
                    "vijax_ms": ref["ms_per_step_median"],
                    "peer": f"{fast['library']} {fast['variant']}",
                    "peer_ms": fast["ms_per_step_median"],
                    "ratio_median": ref["ms_per_step_median"] / fast["ms_per_step_median"],
                    "ratio_min": ref["ms_per_step_min"]
                    / min(row["ms_per_step_min"] for row in peers),
                    "ratio_cpu_min": ref["cpu_ms_per_step_min"]
                    / min(row["cpu_ms_per_step_min"] for row in peers),
                    "fit_ratio_median": (fit_row["ms_per_step_median"]
                                         / fast["ms_per_step_median"]) if fit_row else math.nan,
                    "max_abs_z": max(abs(row["z_vs_vijax"]) for row in peers)})
    env["loadavg_end"] = os.getloadavg()
    print(f"\nCPU: {env['cpu']} ({env['cores']} cores); load average at start "
          f"{env['loadavg_start'][0]:.2f}, at end {env['loadavg_end'][0]:.2f}; spread = "
          "(max - min) / median of the timed calls")
    print(table(rows))
    if ratios:
        print("\nvijax's step against the faster of NumPyro and Blackjax (median ms/step):")
        print(ratio_table(ratios))
    result = {"environment": env, "args": vars(args), "rows": rows, "ratios": ratios}
    print(f"\nwrote {_cli.write_json(args.out, result)}")
    return result


if __name__ == "__main__":
    main()
