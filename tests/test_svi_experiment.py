"""Smoke test of ``experiments/svi.py --quick`` (stochastic VI with vijax.svi and
vijax.families), through its importable ``main``, checked against closed forms where there
are some: a KL is non-negative, no Gaussian beats the best Gaussian's KL to the banana (known in
closed form), the flow beats it, and an ELBO is below the log-evidence.

Bad flags stop with exit code 2 and one line on stderr before anything is written.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO_ROOT

SCRIPT = REPO_ROOT / "experiments" / "svi.py"
FIGURES = ("logreg_elbo.png", "logreg_marginals.png", "toy_fits.png", "toy_elbo.png")


def _load_script():
    spec = importlib.util.spec_from_file_location("svi_experiment", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def experiment():
    return _load_script()


@pytest.mark.slow  # started first (tests/conftest.py)
def test_quick_run(experiment, tmp_path):
    """One test for the one --quick run (a module fixture would run once per pytest-xdist
    worker): files, then the logistic regression, then the banana."""
    out = tmp_path / "out"
    returned = experiment.main(["--quick", "--out", str(out)])
    results = json.loads((out / "results.json").read_text())
    assert json.loads(json.dumps(returned)) == results
    _check_files(out, results)
    _check_logistic_regression(results["logistic_regression"])
    _check_banana(results["banana"], experiment)


def _check_files(out, results):
    assert results["meta"]["config"]["quick"] is True
    for name in FIGURES:
        data = (out / name).read_bytes()
        assert len(data) > 10_000 and data[:8] == b"\x89PNG\r\n\x1a\n", name
    meta = results["meta"]
    for key in ("cpu_model", "date", "command", "versions", "total_wall_s", "config"):
        assert key in meta, key
    assert meta["versions"]["jax"] and meta["cpu_model"]
    assert meta["command"].startswith("python experiments/svi.py --quick --out ")
    assert set(results) == {"meta", "logistic_regression", "banana"}  # --quick: no funnel


def _check_logistic_regression(lr):
    assert lr["data"]["dim"] == 31 and lr["data"]["num_train"] + lr["data"]["num_test"] == 569
    assert lr["data"]["prior_scale"] == 1.0
    assert set(lr["families"]) == {"mean_field", "full_rank", "low_rank", "spline_flow"}
    for name, row in list(lr["families"].items()) + [("minibatch", lr["minibatch"])]:
        assert row["all_finite"] and row["nonfinite_steps"] == 0, name
        assert row["num_samples"] == 2000 and row["elbo_se"] > 0, name
        # the IS estimate (an IWAE-k bound) sits above the ELBO, both below log p(y)
        assert row["elbo"] - 4 * row["elbo_se"] <= row["log_evidence_is"] < 0, name
        assert 0.9 < row["test"]["accuracy"] <= 1 and 0.9 < row["train"]["accuracy"] <= 1, name
        assert row["fit_wall_s"] > 0 and len(row["q_mean"]) == len(row["q_sd"]) == 31, name
    assert lr["minibatch"]["batch_size"] == 64
    assert lr["minibatch"]["elbo_minus_full_batch"] == pytest.approx(
        lr["minibatch"]["elbo"] - lr["families"]["full_rank"]["elbo"])
    assert lr["reference"] == {"skipped": "--quick"}


def _check_banana(banana, experiment):
    s1, b, s2 = banana["params"]["s1"], banana["params"]["b"], banana["params"]["s2"]
    optimum = experiment.banana_gaussian_optimum_kl(s1, b, s2)
    assert banana["gaussian_optimum_kl"] == pytest.approx(optimum)
    assert optimum == pytest.approx(0.5606594, abs=1e-6)  # s1 = b = 1, s2 = 1/2, by hand
    fams = banana["families"]
    assert set(fams) == {"mean_field", "full_rank", "spline_flow"}
    for name, row in fams.items():
        assert row["kl"] >= -4 * row["kl_se"], name  # KL(q || p) >= 0
        assert row["kl"] == pytest.approx(-row["elbo"])  # log Z = 0
        assert abs(row["log_z_is"]) < 0.5, name
    for name in ("mean_field", "full_rank"):  # no Gaussian beats the best Gaussian; both reach it
        row = fams[name]
        assert optimum - 4 * row["kl_se"] <= row["kl"] <= optimum + 0.05 + 4 * row["kl_se"], name
    flow, mf = fams["spline_flow"], fams["mean_field"]
    assert flow["kl"] + 4 * math.hypot(flow["kl_se"], mf["kl_se"]) < mf["kl"]


def test_gaussian_optimum_formulas(experiment):
    # a Gaussian target (b = 0) is fitted exactly; the funnel's formula at scale 3
    assert experiment.banana_gaussian_optimum_kl(1.3, 0.0, 0.7) == pytest.approx(0.0, abs=1e-12)
    assert experiment.funnel_gaussian_optimum_kl(3.0) == pytest.approx(0.5 * math.log(5.5))
    # the banana's: against a direct numerical minimisation over all 2-D Gaussians
    # z1 = m1 + t1 e1, z2 = m2 + c e1 + d e2, with E_q log p (Gaussian moments) + H(q)
    from scipy.optimize import minimize

    s1, b, s2 = 1.5, 0.7, 0.4

    def kl(theta):
        m1, log_t1, m2, c, log_d = theta
        t1, d = np.exp(log_t1), np.exp(log_d)
        mean = m2 - b * (m1 ** 2 + t1 ** 2 - s1 ** 2)  # of z2 - b (z1^2 - s1^2)
        var = (c - 2 * b * m1 * t1) ** 2 + 2 * b ** 2 * t1 ** 4 + d ** 2
        e_log_p = (-0.5 * (m1 ** 2 + t1 ** 2) / s1 ** 2 - np.log(s1)
                   - 0.5 * (mean ** 2 + var) / s2 ** 2 - np.log(s2) - np.log(2 * np.pi))
        entropy = np.log(t1) + np.log(d) + 1 + np.log(2 * np.pi)
        return -(e_log_p + entropy)

    best = minimize(kl, [0.3, 0.0, 0.5, 0.2, 0.0], method="Nelder-Mead",
                    options={"xatol": 1e-10, "fatol": 1e-13, "maxiter": 20_000,
                             "maxfev": 20_000})
    assert best.success
    assert experiment.banana_gaussian_optimum_kl(s1, b, s2) == pytest.approx(best.fun, abs=1e-7)


@pytest.mark.parametrize("args, message", [
    (["--steps", "0"], "--steps must be >= 1"),
    (["--toy-steps", "-3"], "--toy-steps must be >= 1"),
    (["--prior-scale", "-1"], "--prior-scale must be a finite number > 0"),
    (["--prior-scale", "nan"], "--prior-scale must be a finite number > 0"),
    (["--batch-size", "1000"], "--batch-size must be in [1, 455]"),
    (["--eval-samples", "1"], "--eval-samples must be >= 2"),
    (["--steps", "many"], "argument --steps: invalid int value"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
])
def test_bad_flags_exit_2_with_one_line_and_write_nothing(experiment, tmp_path, capsys, args,
                                                          message):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        experiment.main([*args, "--out", str(out)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err, err
    assert not out.exists()


def test_bad_flag_in_a_fresh_interpreter(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO_ROOT))
    result = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--batch-size", "0",
                             "--out", str(out)], env=env, cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.count("\n") == 1 and "--batch-size must be in [1, 455]" in result.stderr
    assert result.stdout == "" and not out.exists()
