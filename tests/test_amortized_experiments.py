"""Smoke tests of experiments/inference_gaps.py and experiments/svi_vs_amortized.py.

The --quick paths run end to end on the real MNIST files (skipped with a reason when
../shared/data is missing, failing under CI=true: the ``mnist_dir`` fixture): inference_gaps.py
trains its one-epoch VAE, and svi_vs_amortized.py loads that run's checkpoint (the same
784-200-200-50 architecture), so the module trains once. Bad flags exit with status 2, one
line on stderr, and write nothing.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
GAPS = ROOT / "experiments" / "inference_gaps.py"
SVA = ROOT / "experiments" / "svi_vs_amortized.py"


def _run(script, *args, timeout=600):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [str(ROOT), os.environ.get("PYTHONPATH", "")])), "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, str(script), *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize(("script", "flags", "message"), [
    (GAPS, ["--num-test", "0"], "--num-test"),
    (GAPS, ["--local-steps", "15"], "--local-steps"),
    (GAPS, ["--checkpoint", "no/such/run"], "--checkpoint"),
    (GAPS, ["--bogus"], "unrecognized arguments"),
    (SVA, ["--svi-steps", "30", "--record-every", "7"], "--svi-steps"),
    (SVA, ["--elbo-samples", "1"], "--elbo-samples"),
])
def test_bad_flags_exit_2_with_one_line_and_write_nothing(tmp_path, script, flags, message):
    out = tmp_path / "out"
    result = _run(script, *flags, "--out", out, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not out.exists()


@pytest.mark.slow  # started first (tests/conftest.py)
def test_quick_runs_write_results_and_figures(tmp_path, mnist_dir):
    gaps_out = tmp_path / "gaps"
    result = _run(GAPS, "--quick", "--data-dir", mnist_dir, "--out", gaps_out)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    results = json.loads((gaps_out / "results.json").read_text())
    for name in ("refinement.png", "qstar_convergence.png", "gaps_per_image.png"):
        assert (gaps_out / name).stat().st_size > 1000, name
    meta = results["meta"]
    assert meta["cpu_model"] and meta["date"] and "inference_gaps.py" in meta["command"]
    row = results["table"]["this_run"]
    assert row["approximation_gap"] == pytest.approx(row["log_px"] - row["elbo_local"])
    assert row["amortization_gap"] == pytest.approx(row["elbo_local"] - row["elbo_amortized"])
    assert results["table"]["cremer_et_al_2018_mnist_ffg"]["log_px"] == -89.80
    assert set(results["semi_amortized"]["elbo"]["adam_1e-2"]) == {"0", "5", "20", "100"}
    assert len(results["qstar"]["convergence"]) == 10
    assert "Cremer et al. 2018" in result.stdout

    sva_out = tmp_path / "sva"
    result = _run(SVA, "--quick", "--checkpoint", gaps_out / "vae_run", "--data-dir", mnist_dir,
                  "--out", sva_out)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    results = json.loads((sva_out / "results.json").read_text())
    assert (sva_out / "elbo_vs_time.png").stat().st_size > 1000
    bench = results["batched_vs_vmap"]
    assert bench["faster"] in ("batched", "vmap") and bench["batched"]["ms_per_step"] > 0
    assert set(results["curves"]) == {"amortized", "semi_amortized", "svi_from_prior"}
    assert results["time_to_infer_q"]["amortized_s"] > 0
    assert results["model"]["source"].startswith("checkpoint")
