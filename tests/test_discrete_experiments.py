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
