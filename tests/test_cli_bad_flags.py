"""Bad flags of the experiment scripts (experiments/vae.py, gmm_em.py, cavi.py, and, through
experiments/_amortized_common.py, inference_gaps.py): exit status 2, one line on stderr naming
the flag, and nothing written, neither the output folder nor anything in the working folder.

The checks (experiments/_cli.py) run before any data are loaded or models built. Most cases
call the script's ``main`` in this process (``run_experiment_main``: the same code without a
fresh interpreter's imports); those in ``FRESH`` run as real subprocesses, all started at once.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY_VAE = ["--quick", "--dataset", "digits", "--epochs", "1", "--eval-num-samples", "5",
            "--no-progress"]

# id -> (script, flags, text the one stderr line must contain); "{file}" is a regular file,
# "{tmp}" the case's empty folder (also the subprocess's working folder).
CASES = {
    "vae-empty-workdir": ("vae.py", TINY_VAE + ["--workdir", ""], "--workdir must not be empty"),
    "vae-workdir-is-a-file": ("vae.py", TINY_VAE + ["--workdir", "{file}"],
                              "--workdir: {file} exists and is not a folder"),
    "vae-workdir-under-a-file": ("vae.py", TINY_VAE + ["--workdir", "{file}/run"],
                                 "--workdir: {file}/run is under {file}, which is a file"),
    "vae-negative-seed": ("vae.py", TINY_VAE + ["--seed", "-1", "--workdir", "{tmp}/run"],
                          "--seed must be in [0, 2^32 - 1], got -1"),
    "gmm-negative-seed": ("gmm_em.py", ["--seed", "-1", "--out", "{tmp}/out"],
                          "--seed must be in [0, 2^32 - 1], got -1"),
    "gmm-out-under-a-file": ("gmm_em.py", ["--out", "{file}/out"],
                             "--out: {file}/out is under {file}, which is a file"),
    "gmm-out-unwritable": ("gmm_em.py", ["--out", "/proc/vijax-no-such-folder/out"],
                           "--out: cannot write in /proc/vijax-no-such-folder/out"),
    "cavi-negative-seed": ("cavi.py", ["--seed", "-1", "--out", "{tmp}/out"],
                           "--seed must be in [0, 2^32 - 1], got -1"),
    "cavi-out-under-a-file": ("cavi.py", ["--out", "{file}/out"],
                              "--out: {file}/out is under {file}, which is a file"),
    "gaps-out-under-a-file": ("inference_gaps.py", ["--quick", "--out", "{file}/out"],
                              "--out: {file}/out is under {file}, which is a file"),
}


# one case per script in a fresh interpreter (the real command line)
FRESH = ("vae-empty-workdir", "gmm-out-unwritable", "cavi-out-under-a-file",
         "gaps-out-under-a-file")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Run the ``FRESH`` cases at once; ``{id: (returncode, stderr, folder, file)}``."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": os.pathsep.join(
        filter(None, [str(ROOT), os.environ.get("PYTHONPATH", "")]))}
    running = {}
    for case in FRESH:
        script, flags, _ = CASES[case]
        folder = tmp_path_factory.mktemp(case)
        regular = folder / "a_file.txt"
        regular.write_text("not a folder\n")
        argv = [f.format(file=regular, tmp=folder) for f in flags]
        running[case] = (subprocess.Popen(
            [sys.executable, str(ROOT / "experiments" / script), *argv], cwd=folder, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), folder, regular)
    out = {}
    for case, (process, folder, regular) in running.items():
        _, stderr = process.communicate(timeout=300)
        out[case] = (process.returncode, stderr, folder, regular)
    return out


def _in_process(run_experiment_main, tmp_path, case):
    script, flags, _ = CASES[case]
    regular = tmp_path / "a_file.txt"
    regular.write_text("not a folder\n")
    argv = [f.format(file=regular, tmp=tmp_path) for f in flags]
    code, _, stderr = run_experiment_main(script, argv, tmp_path)
    return code, stderr, tmp_path, regular


@pytest.mark.parametrize("case", list(CASES))
def test_bad_flag_exits_2_with_one_line_naming_it_and_writes_nothing(request, tmp_path, case):
    if case in FRESH:
        returncode, stderr, folder, regular = request.getfixturevalue("results")[case]
    else:
        returncode, stderr, folder, regular = _in_process(
            request.getfixturevalue("run_experiment_main"), tmp_path, case)
    message = CASES[case][2].format(file=regular, tmp=folder)
    lines = stderr.strip().splitlines()
    assert returncode == 2, stderr[-3000:]
    assert len(lines) == 1 and message in lines[0], stderr[-3000:]
    written = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))
    assert written == ["a_file.txt"] and regular.read_text() == "not a folder\n"
