"""Smoke tests of the discrete-latent experiments' ``--quick`` paths, on the real data.

``experiments/discrete_vae.py --quick`` (a categorical VAE on 2000 MNIST images, every
estimator for one epoch) and ``experiments/mixture_enumerated.py --quick`` (Old Faithful,
gradient ascent on the enumerated ELBO against EM). Each runs in a fresh interpreter; a test
is skipped when ``../shared/data`` lacks the data, except under CI (``CI=true``), where it
fails (tests/conftest.py). Bad flags exit with status 2 and one line, writing nothing.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from conftest import REPO_ROOT


def _run(script: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO_ROOT))
    return subprocess.run([sys.executable, str(REPO_ROOT / "experiments" / script), *args],
                          env=env, cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow  # started first (tests/conftest.py)
def test_discrete_vae_quick(tmp_path, mnist_dir):
    pytest.importorskip("flax")
    out = tmp_path / "out"
    result = _run("discrete_vae.py", "--quick", "--data-dir", str(mnist_dir), "--out", str(out))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((out / "results.json").read_text())
    for field in ("date", "cpu", "command", "jax_version"):
        assert summary[field]
    rows = summary["results"]
    assert set(rows) == {"score_loo", "gumbel_softmax", "gumbel_softmax_catkl",
                         "straight_through", "enumerate", "rebar"}
    (tuned,) = rows["rebar"]["rebar"]["tunings"]  # before training: tune_rebar's temperature
    assert tuned["after_epoch"] == 0  # and eta, and E||g||^2 at (0.5, 1) and at them
    assert tuned["temperature"] > 0 and math.isfinite(tuned["eta"])
    assert 0 < tuned["mean_squared_gradient_norm_tuned"] < math.inf
    for kind, row in rows.items():
        for field in ("test_elbo", "test_nll_is", "epoch_wall_s_mean"):
            assert math.isfinite(row[field]), (kind, field)
        # log p(x) >= ELBO on average; the IS estimate is a stochastic lower bound on log p(x)
        assert row["test_nll_is"] > 0 and row["test_elbo"] < 0
        grad = row["encoder_gradient"]["epoch_1"]
        assert grad["mean_grad_sq_norm"] > 0
        assert (grad["total_variance"] == 0) == (kind == "enumerate"), kind
    exact = rows["enumerate"]
    # one categorical of 10 classes: the exact log p(x) and the IS estimate on the same images
    assert exact["test_nll_exact_is_subset"] == pytest.approx(exact["test_nll_is"], abs=0.05)
    assert exact["test_elbo_exact"] == pytest.approx(exact["test_elbo"], abs=1.0)
    comparison = summary["gradient_vs_exact"]
    assert comparison["score_loo"]["cosine_mean_vs_exact"] > 0.5  # unbiased, few keys
    for name in ("samples.png", "training_curves.png"):
        assert (out / name).stat().st_size > 1000


@pytest.mark.slow  # started first (tests/conftest.py)
def test_mixture_enumerated_quick(tmp_path, old_faithful_csv):
    out = tmp_path / "out"
    result = _run("mixture_enumerated.py", "--quick", "--data", str(old_faithful_csv),
                  "--out", str(out))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((out / "results.json").read_text())
    rows = summary["results"]
    assert set(rows) == {"em", "adam", "lbfgs", "adam_learned_q"}
    assert rows["em"]["converged"] and rows["em"]["iterations_to_gap"] is not None
    for name, row in rows.items():
        trace = summary["traces"][name]
        assert all(math.isfinite(v) for v in trace), name
        assert trace[-1] > trace[0] + 1.0, name  # every method climbs from the common start
        assert row["final_mean_log_likelihood"] <= summary["best_mean_log_likelihood"] + 1e-12
    for name in ("mixture_convergence.png", "mixture_fits.png"):
        assert (out / name).stat().st_size > 1000


@pytest.mark.parametrize("script, args, message", [
    ("discrete_vae.py", ["--estimators", "vimco"], "--estimators takes distinct names"),
    ("discrete_vae.py", ["--data-dir", "/nonexistent/mnist"], "--data-dir"),
    ("discrete_vae.py", ["--rebar-online-lr", "-0.1"], "--rebar-online-lr must be a finite"),
    ("discrete_vae.py", ["--rebar-online-lr", "1e-3", "--rebar-retune-every", "5"],
     "are alternatives"),
    ("mixture_enumerated.py", ["--lr", "nan"], "--lr must be a finite number > 0"),
])
def test_discrete_experiments_reject_bad_flags_before_any_work(run_experiment_main, tmp_path,
                                                              script, args, message):
    """In-process calls of the scripts' ``main`` (the flags are checked before any work); the
    test below runs one case in a fresh interpreter."""
    out = tmp_path / "out"
    code, _, err = run_experiment_main(script, [*args, "--out", out], tmp_path)
    assert code == 2, err[-2000:]
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_bad_flag_in_a_fresh_interpreter(tmp_path):
    out = tmp_path / "out"
    result = _run("discrete_vae.py", "--estimators", "vimco", "--out", str(out), timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "--estimators takes distinct names" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not out.exists()


def test_discrete_vae_online_rebar_lowers_the_variance_at_a_frozen_model():
    """``make_train_epoch(..., rebar_optimizer=...)`` adapts REBAR's [log temperature, eta] at
    every step along the gradient of that step's squared encoder-gradient norm. With the model
    frozen (SGD at rate 0: the parameters must come back bit for bit), 200 steps from
    (2.0, 0.3) must lower E||g||^2, measured on a fixed batch with 400 fresh keys, paired (the
    difference beyond 4 standard errors)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from conftest import load_experiment
    from vijax import data as vdata
    from vijax import elbo as velbo

    dv = load_experiment("discrete_vae.py")
    images = jnp.asarray(np.random.default_rng(0).uniform(size=(200, 784)), jnp.float32)
    model = dv.make_model(2, 3, jnp.zeros(784, jnp.float32))
    params = model.init(jax.random.key(0), images[:1])
    frozen, hyper_optimizer = optax.sgd(0.0), optax.adam(0.05)
    start = velbo.REBAR(temperature=2.0, eta=0.3)
    hyper = jnp.array([np.log(start.temperature), start.eta], jnp.float32)
    epoch = jax.jit(dv.make_train_epoch("rebar", model, frozen, 20, 0.0, 0.5, 2, None,
                                        hyper_optimizer))
    carry = (params, frozen.init(params), jnp.zeros((), jnp.int32), hyper,
             hyper_optimizer.init(hyper))
    for e in range(20):  # 10 steps per epoch
        carry, losses = epoch(carry, images, jax.random.key(e))
    assert np.all(np.isfinite(np.asarray(losses)))
    for a, b in zip(jax.tree.leaves(carry[0]), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(carry[2]) == 200
    tuned = dv.rebar_online_estimator(carry[3])
    x = vdata.dynamic_binarize(jax.random.key(99), images[:20])
    log_joint, q_fn = dv._rebar_problem(model, params, x)

    @jax.jit
    def sq_norms(temperature, eta):
        return jax.vmap(lambda k: velbo.rebar_gradient_variance(
            k, log_joint, q_fn, params, temperature=temperature, eta=eta, num_samples=1))(
                jax.random.split(jax.random.key(7), 400))

    before = np.asarray(sq_norms(start.temperature, start.eta), np.float64)
    after = np.asarray(sq_norms(tuned.temperature, tuned.eta), np.float64)
    diff = before - after
    print(f"{start} -> {tuned}: E||g||^2 {before.mean():.4g} -> {after.mean():.4g}")
    assert diff.mean() > 4.0 * diff.std(ddof=1) / np.sqrt(len(diff))
