"""Smoke tests of the benchmark scripts on tiny problems (their timings are not checked, only
that they run end to end and that the like-for-like conditions they report hold).

Each runs in a fresh interpreter: ``bench_em.py`` turns on ``jax_enable_x64`` at import.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO_ROOT


def _run(script: str, *args: str) -> None:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO_ROOT))
    result = subprocess.run([sys.executable, str(REPO_ROOT / "experiments" / script), *args],
                            env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.mark.slow  # started first (tests/conftest.py)
def test_bench_em_tiny_grid_compares_like_for_like(tmp_path):
    out = tmp_path / "bench_em.json"
    _run("bench_em.py", "--sizes", "400", "--dims", "3", "--dtypes", "float64", "--repeats", "1",
         "--out", str(out))
    (row,) = json.loads(out.read_text())["rows"]
    for field in ("sk_gmm_ms", "vj_em_ms", "vj_em_one_block_ms", "sk_bgmm_ms", "vj_bgmm_ms",
                  "sk_fit_s", "vj_fit_s", "sk_bgmm_fit_s", "vj_bgmm_fit_s"):
        assert row[field] > 0, field
    # EM to convergence: the same iterations and final log-likelihood as scikit-learn
    assert row["vj_fit_iters"] == row["sk_fit_iters"] >= 2
    assert row["fit_loglik_rel_diff"] < 1e-10
    # Bayesian GMM to convergence: sklearn's stopping rule holds on vijax's ELBO trace at the
    # same sweep, and the final means agree
    assert row["bgmm_fit_iters"] >= 2 and row["bgmm_fit_same_stop"]
    assert row["bgmm_fit_means_max_diff"] < 1e-8


@pytest.mark.slow  # started first (tests/conftest.py)
def test_bench_vae_smoke_and_flop_count(tmp_path):
    pytest.importorskip("flax")
    out = tmp_path / "bench_vae.json"
    _run("bench_vae.py", "--repeats", "1", "--scan-steps", "2", "--no-torch", "--no-devices",
         "--json", str(out))
    result = json.loads(out.read_text())
    # 784-200-200-50 at batch 100, by hand: forward multiply-adds per example
    # 784*200 + 200*200 + 200*100 + 50*200 + 200*200 + 200*784 = 423,600; the weight gradients
    # repeat them and the input gradients skip the first layer (266,800): 2 * 100 * (2 * 423,600
    # + 266,800) FLOPs.
    assert result["matmul_gflop_per_step"] == pytest.approx(2 * 100 * (2 * 423_600 + 266_800) / 1e9)
    names = [r["name"] for r in result["rows"]]
    assert names == ["vijax jit step (Python loop)", "vijax scanned epoch",
                     "vijax scanned epoch + dynamic binarization"]
    for r in result["rows"]:
        assert r["ms_median"] > 0
        assert r["examples_per_s"] == pytest.approx(100 / (r["ms_median"] / 1e3))


@pytest.mark.parametrize("script, args, message", [
    ("bench_em.py", ["--converge-repeats", "0"], "--converge-repeats must be >= 1"),
    ("bench_em.py", ["--sizes", "5"], "every N >= K = 10"),
    ("bench_em.py", ["--dtypes", "float16"], "--dtypes takes float32 and/or float64"),
    ("gmm_em.py", ["--restarts", "0"], "--restarts must be >= 1"),
    ("gmm_em.py", ["--data", "/nonexistent.csv"], "--data: no file"),
    ("cavi.py", ["--concentration", "-1"], "--concentration must be a finite number > 0"),
    ("cavi.py", ["--data", "/nonexistent.csv"], "--data: no file"),
    ("bench_em.py", ["--sizes", "inf"], "comma-separated finite numbers"),
    ("bench_em.py", ["--tol", "-1"], "--tol must be >= 0"),
    ("bench_em.py", ["--sklearn-threads", "-1"], "--sklearn-threads must be >= 1"),
    ("gmm_em.py", ["--data", str(REPO_ROOT / "README.md")], "is not the Old Faithful CSV"),
    ("cavi.py", ["--data", str(REPO_ROOT / "README.md")], "is not the Old Faithful CSV"),
    ("cavi.py", ["--num-components", "300"], "--num-components must be at most the 272 rows"),
])
def test_experiment_scripts_reject_bad_flags_before_any_work(run_experiment_main, tmp_path,
                                                            script, args, message):
    """Bad values stop with a one-line usage error (exit 2), before anything is written
    (before: tracebacks after partial output, or NaN results with exit 0). In-process calls of
    the scripts' ``main``; the fresh-interpreter test below runs one of them for real."""
    out = tmp_path / "out"
    code, _, err = run_experiment_main(script, [*args, "--out", out], tmp_path)
    assert code == 2, err[-2000:]
    assert message in err and "Traceback" not in err and err.count("\n") == 1, err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_bad_flag_in_a_fresh_interpreter(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO_ROOT))
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "experiments" / "bench_em.py"), "--sizes", "5",
         "--out", str(out)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "every N >= K = 10" in result.stderr and "Traceback" not in result.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, message", [
    (["--reps", "1"], "--reps must be >= 2"),
    (["--latent", "0"], "--latent must be >= 1"),
])
def test_bench_estimators_rejects_bad_flags(run_experiment_main, tmp_path, args, message):
    """Before: --reps 1 printed a table of NaN variances with exit 0, --reps 0 an IndexError."""
    code, out, err = run_experiment_main("bench_estimators.py", args, tmp_path)
    assert code == 2, err[-2000:]
    assert message in err and "Traceback" not in err and out == ""
