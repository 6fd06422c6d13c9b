"""Several JAX processes (``jax.distributed``) on this machine against one process.

Two processes on 127.0.0.1, one forced CPU device each, gloo collectives
(tests/_multihost_worker.py), against one process with two devices:

* the VAE driver (:func:`vijax.vae_train.train_and_evaluate`, tiny digits run, 2 epochs):
  the 2-process pair is killed (process 1, ``SIGKILL``) after its epoch-1 checkpoint; the
  survivor must stop with an error within seconds (heartbeat timeout 5 s), not hang; a new
  pair resumes from that checkpoint and finishes. Epoch 1 of the killed pair and epoch 2 of
  the resumed pair must equal the one-process run's (float32 summation tolerance), and the
  resumed run's final metrics too;
* ``vijax.em.fit`` on a mesh over both processes, each passing only its rows, against the
  one-process fit on all rows.

The reference process runs beside the first pair; the resumed pair starts as soon as the
first pair's process 1 is killed. Every subprocess is waited for with a timeout, and all are
killed when the fixture ends. About 45-50 s wall on the 2-core machine (roughly 60 CPU
seconds: five interpreters, each importing and compiling the driver). Also the launch-flag
checks of :mod:`vijax.distributed` and experiments/vae.py (in this process, no JAX work).
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from vijax import distributed

ROOT = pathlib.Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "_multihost_worker.py"
HEARTBEAT_S = 5
STARTUP_TIMEOUT_S = 150  # a cold start: imports and compilation of the whole driver
# float32, the same global batches: only the summation order may differ
RTOL, ATOL = 1e-5, 1e-6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(args, *, devices: int, log: pathlib.Path) -> subprocess.Popen:
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +  # keeps the suite's (tests/conftest.py)
                        f" --xla_force_host_platform_device_count={devices}").strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    with log.open("w") as out:
        return subprocess.Popen([sys.executable, str(WORKER), *map(str, args)], cwd=ROOT,
                                env=env, stdout=out, stderr=subprocess.STDOUT)


def _pair(port: int, args, root: pathlib.Path, name: str) -> list[subprocess.Popen]:
    return [_spawn(["--coordinator", f"127.0.0.1:{port}", "--num-processes", 2,
                    "--process-id", i, "--heartbeat-timeout", HEARTBEAT_S, *args],
                   devices=1, log=root / f"{name}-{i}.log") for i in range(2)]


def _tail(path: pathlib.Path, n: int = 4000) -> str:
    text = path.read_text(errors="replace")
    return "\n".join(line for line in text[-n:].splitlines()
                     if not line.startswith(("    @", "[Gloo]")))


def _reap(procs, logs, timeout: float) -> list[int]:
    """Wait for every process (``timeout`` in all); kill them all and fail on a timeout."""
    deadline = time.monotonic() + timeout
    try:
        return [p.wait(timeout=max(0.1, deadline - time.monotonic())) for p in procs]
    except subprocess.TimeoutExpired:
        pytest.fail("timed out; logs:\n" + "\n".join(_tail(log) for log in logs))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def _params(workdir: pathlib.Path, epoch: int) -> dict:
    """The parameters process 0 checkpointed after ``epoch`` (the worker's copy)."""
    with np.load(f"{workdir}.params-{epoch}.npz") as saved:
        return dict(saved)


def _restored_params(workdir: pathlib.Path, epoch: int) -> dict:
    """The parameters of ``workdir``'s checkpoint of ``epoch``, read in this process."""
    import jax  # noqa: PLC0415
    from _multihost_worker import tiny_config  # noqa: PLC0415

    from vijax import vae_train as vt  # noqa: PLC0415

    state, restored_epoch = vt.restore_checkpoint(workdir, tiny_config(), epoch=epoch)
    assert restored_epoch == epoch
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in
            jax.tree_util.tree_flatten_with_path(state.params)[0]}


def _assert_close(got: dict, want: dict, what: str) -> None:
    assert got.keys() == want.keys(), what
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=RTOL, atol=ATOL,
                                   err_msg=f"{what}: {name}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    sys.path.insert(0, str(ROOT / "tests"))
    root = tmp_path_factory.mktemp("multihost")
    spawned = []
    try:
        return _run_all(root, spawned)
    finally:  # nothing outlives the fixture, whatever failed
        for p in spawned:
            if p.poll() is None:
                p.kill()
            p.wait()


def _run_all(root: pathlib.Path, spawned: list) -> dict:
    start = time.monotonic()
    ref_log = root / "reference.log"
    reference = _spawn(["--workdir", root / "reference", "--fits", root / "reference.npz"],
                       devices=2, log=ref_log)
    workdir = root / "pair"
    pair = _pair(_free_port(), ["--workdir", workdir, "--pause-after-epoch", 1,
                                "--pause-seconds", 60], root, "killed")
    spawned += [reference, *pair]
    logs = [root / "killed-0.log", root / "killed-1.log"]
    markers = [pathlib.Path(f"{workdir}.paused-{i}") for i in range(2)]
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while not all(m.exists() for m in markers):
        early = [p.returncode for p in pair if p.poll() is not None]
        if early or time.monotonic() > deadline:
            pytest.fail(f"the pair did not reach its epoch-1 checkpoint (exit codes "
                        f"{early}); logs:\n" + "\n".join(_tail(log) for log in logs))
        time.sleep(0.1)
    pair[1].kill()
    killed_at = time.monotonic()
    # the survivor only sleeps until it is stopped: the new pair may start meanwhile
    resumed = _pair(_free_port(), ["--workdir", workdir, "--resume", "--fits",
                                   root / "pair.npz"], root, "resumed")
    spawned += resumed
    try:
        survivor_rc = pair[0].wait(timeout=45)
    except subprocess.TimeoutExpired:
        pytest.fail("the survivor of the killed pair did not stop within 45 s:\n"
                    + _tail(logs[0]))
    survivor_s = time.monotonic() - killed_at
    resumed_logs = [root / "resumed-0.log", root / "resumed-1.log"]
    resumed_rcs = _reap(resumed, resumed_logs, timeout=STARTUP_TIMEOUT_S)
    ref_rc = _reap([reference], [ref_log], timeout=STARTUP_TIMEOUT_S)[0]
    assert ref_rc == 0, _tail(ref_log)
    assert resumed_rcs == [0, 0], "\n".join(_tail(log) for log in resumed_logs)
    return {"root": root, "workdir": workdir, "survivor_rc": survivor_rc,
            "survivor_s": survivor_s, "survivor_log": logs[0].read_text(errors="replace"),
            "resumed_logs": [log.read_text() for log in resumed_logs],
            "wall_s": time.monotonic() - start}


@pytest.mark.slow  # started first (tests/conftest.py)
def test_two_processes(runs):
    """The VAE driver and EM on two processes equal one process with two devices; a killed
    process stops the other within seconds and --resume finishes the run."""
    root, workdir = runs["root"], runs["workdir"]
    # (c) the survivor stops with the runtime's error, well before its 60 s pause ends
    assert runs["survivor_rc"] != 0, _tail(root / "killed-0.log")
    assert runs["survivor_s"] < 30, runs["survivor_s"]
    log = runs["survivor_log"]
    assert ("another task died" in log or "heartbeat timeout" in log
            or "Gloo" in log), log[-3000:]
    # (a) epoch 1 (the killed pair) and epoch 2 (the resumed pair) equal the reference's
    for epoch in (1, 2):
        _assert_close(_params(workdir, epoch), _params(root / "reference", epoch),
                      f"VAE parameters after epoch {epoch}, 2 processes vs 1 process")
    # the 2-process checkpoint reads back in one process (another topology)
    _assert_close(_restored_params(workdir, 2), _params(workdir, 2), "restored checkpoint")
    final = json.loads((workdir / "final_metrics.json").read_text())
    final_ref = json.loads((root / "reference" / "final_metrics.json").read_text())
    for key in ("test_elbo", "test_kl", "test_log_px", "test_iwae_2"):
        np.testing.assert_allclose(final[key], final_ref[key], rtol=1e-5, err_msg=key)
    rows = [json.loads(line)["epoch"] for line in
            (workdir / "metrics.jsonl").read_text().splitlines()]
    assert rows == [0, 1, 2]
    # both processes computed the same final evaluation
    elbos = [line for text in runs["resumed_logs"] for line in text.splitlines()
             if "test ELBO" in line]
    assert len(elbos) == 2 and elbos[0].split()[-1] == elbos[1].split()[-1], elbos
    # (b) EM on the rows of both processes equals the one-process fit on all rows
    got, want = np.load(root / "pair.npz"), np.load(root / "reference.npz")
    assert set(got.files) == set(want.files)
    for key in set(want.files) - {"nan_message"}:
        np.testing.assert_allclose(got[key], want[key], rtol=RTOL, atol=ATOL, err_msg=key)
    assert np.all(np.diff(want["em_log_likelihood"]) > -1e-5)  # EM really ran
    # the input check reads the global array: a NaN row of process 1 is reported by index
    assert "1 row(s) with NaN or inf values (first at index [511])" in str(got["nan_message"])
    assert str(got["nan_message"]) == str(want["nan_message"])
    cpu = [line.split()[-3] for log in sorted(root.glob("*.log"))
           for line in log.read_text(errors="replace").splitlines() if "CPU seconds" in line]
    print(f"multi-process runs: {runs['wall_s']:.1f} s wall, survivor stopped after "
          f"{runs['survivor_s']:.1f} s; CPU seconds of the finished workers: {cpu}")


@pytest.mark.slow  # ~30 CPU-seconds: three more interpreters compiling the CAVI fit
def test_bayesian_gmm_two_processes(tmp_path):
    """``vijax.meanfield.bayesian_gmm.fit`` (the same ``vijax.em._on_mesh`` machinery) with
    each of two processes passing its rows equals the one-process fit on all rows."""
    logs = [tmp_path / "reference.log", tmp_path / "pair-0.log", tmp_path / "pair-1.log"]
    procs = [_spawn(["--fits", tmp_path / "reference.npz", "--bgmm"], devices=2, log=logs[0])]
    procs += _pair(_free_port(), ["--fits", tmp_path / "pair.npz", "--bgmm"], tmp_path, "pair")
    rcs = _reap(procs, logs, timeout=STARTUP_TIMEOUT_S)
    assert rcs == [0, 0, 0], "\n".join(_tail(log) for log in logs)
    got, want = np.load(tmp_path / "pair.npz"), np.load(tmp_path / "reference.npz")
    for key in ("bgmm_loc", "bgmm_concentration", "bgmm_elbo", "em_means"):
        np.testing.assert_allclose(got[key], want[key], rtol=RTOL, atol=ATOL, err_msg=key)


# ----------------------------------------------------------------------------------------------
# launch flags (no JAX work)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("args, match", [
    (("127.0.0.1", 2, 0), "no port"),
    (("127.0.0.1:0", 2, 0), "port must be an integer in"),
    ((":1234", 2, 0), "no port|empty host"),
    (("127.0.0.1:1234", 0, 0), "num_processes"),
    (("127.0.0.1:1234", 2, 2), r"process_id must be in \[0, num_processes - 1\]"),
    (("127.0.0.1:1234", 2, -1), "process_id"),
    (("127.0.0.1:1234", None, 0), "missing num_processes"),
])
def test_check_process_args_refuses(args, match):
    with pytest.raises(ValueError, match=match):
        distributed.check_process_args(*args)


def test_check_process_args_accepts():
    assert distributed.check_process_args(None, None, None) is None
    assert distributed.check_process_args("node1:8476", 4, 3) == ("node1:8476", 4, 3)
    assert distributed.parse_coordinator("[::1]:9000") == ("::1", 9000)
    with pytest.raises(TypeError, match="num_processes"):
        distributed.check_process_args("h:1", 2.0, 0)


def _vae_cli():
    spec = importlib.util.spec_from_file_location("vae_cli_multihost",
                                                  ROOT / "experiments" / "vae.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("flags, message", [
    (["--coordinator", "127.0.0.1", "--num-processes", "2", "--process-id", "0"],
     "--coordinator must be HOST:PORT"),
    (["--coordinator", "h:1", "--num-processes", "0", "--process-id", "0"],
     "--num-processes must be"),
    (["--coordinator", "h:1", "--num-processes", "2", "--process-id", "2"],
     "--process-id must be in [0, --num-processes - 1] = [0, 1], got 2"),
    (["--num-processes", "2", "--process-id", "0"], "missing --coordinator"),
    (["--heartbeat-timeout", "5"], "--heartbeat-timeout applies to a multi-process run"),
])
def test_vae_cli_bad_launch_flags(flags, message, tmp_path, capsys):
    cli = _vae_cli()
    workdir = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--quick", "--dataset", "digits", "--workdir", str(workdir), *flags])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err, err
    assert not workdir.exists()
