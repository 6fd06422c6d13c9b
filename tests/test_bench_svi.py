"""Smoke test of ``experiments/bench_svi.py`` (vijax SVI against NumPyro and Blackjax) on tiny
problems: the timings are not checked, only that the three libraries' rows are there and
that they fit the same q (final ELBOs equal within a few standard errors). Skipped unless
NumPyro and Blackjax are installed (``pip install -e '.[bench]'``); runs in a fresh
interpreter, as the other benchmark smoke tests do."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from conftest import REPO_ROOT

SCRIPT = REPO_ROOT / "experiments" / "bench_svi.py"
K_SE = 5.0  # agreement within K_SE combined standard errors


def _run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO_ROOT))
    return subprocess.run([sys.executable, str(SCRIPT), *args], env=env, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow  # started first (tests/conftest.py)
def test_bench_svi_quick_tiny_rows_and_elbos_agree(tmp_path):
    pytest.importorskip("numpyro")
    pytest.importorskip("blackjax")
    out = tmp_path / "bench_svi.json"
    # Tiny, converged fits (8 draws per step keep the last iterate's noise below the ELBO's
    # standard error); one compilation per library and problem (--no-fit).
    result = _run("--quick", "--no-fit", "--families", "meanfield", "--num-samples", "8",
                  "--steps-a", "1500", "--lr-a", "0.02", "--synth-n", "500", "--synth-d", "8",
                  "--batch-size", "100", "--steps-b", "1500", "--lr-b", "0.003",
                  "--repeats", "3", "--eval-samples", "4000", "--out", str(out))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    data = json.loads(out.read_text())
    env = data["environment"]
    for field in ("date", "cpu", "versions", "command"):
        assert env[field], field
    assert env["versions"]["numpyro"] and env["versions"]["blackjax"]
    rows = data["rows"]
    for problem in ("breast_cancer", "synthetic"):
        group = [r for r in rows if r["problem"] == problem]
        assert {r["library"] for r in group} == {"vijax", "numpyro", "blackjax"}, problem
        assert len({(r["steps"], r["num_samples"], r["lr"]) for r in group}) == 1  # like for like
        for r in group:
            assert r["ms_per_step_median"] > 0 and r["first_call_s"] > 0
            assert math.isfinite(r["elbo"]) and r["elbo_se"] > 0
        ref = next(r for r in group if r["library"] == "vijax")
        for r in group:
            gap = abs(r["elbo"] - ref["elbo"])
            assert gap <= K_SE * math.hypot(r["elbo_se"], ref["elbo_se"]), (problem, r, ref)
    assert {r["problem"] for r in data["ratios"]} == {"breast_cancer", "synthetic"}
    assert all(r["ratio_median"] > 0 for r in data["ratios"])


@pytest.mark.parametrize("args, message", [
    (["--steps-a", "0"], "--steps-a must be >= 1"),
    (["--problems", "mnist"], "--problems takes a comma-separated subset"),
    (["--batch-size", "2000", "--synth-n", "1000"], "--batch-size must be <= --synth-n"),
    (["--lr-b", "nan"], "--lr-b must be a finite number > 0"),
    (["--eval-samples", "1"], "--eval-samples must be >= 2"),
])
def test_bench_svi_rejects_bad_flags_before_any_work(tmp_path, args, message):
    """A bad value stops with a one-line usage error (exit 2) and writes nothing (no numpyro or
    blackjax needed: the flags are checked before anything is imported)."""
    out = tmp_path / "out" / "bench_svi.json"
    result = _run(*args, "--out", str(out), timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("bench_svi.py: error:")
    assert len([line for line in result.stderr.splitlines() if "error" in line]) == 1
    assert result.stdout == "" and not out.parent.exists()
