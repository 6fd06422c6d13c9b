"""Shared pytest fixtures for vijax.

* ``x64``: run a test with 64-bit floats enabled (``jax.enable_x64``), for float64 references.
* ``run_on_host_devices``: run a script in a fresh interpreter with N forced host CPU devices
  (the device count is fixed when JAX initialises) and return its stdout.
* ``mnist_dir``: the real MNIST folder ``../shared/data/mnist``; a test that needs it is
  skipped with a reason when it is absent, except under CI (``CI=true``), where absence fails.

Compilation dominates the suite's time, so one session shares one JAX persistent compilation
cache (a temporary folder, removed at the end; ``JAX_COMPILATION_CACHE_DIR`` set beforehand
names another): the pytest-xdist workers and the fresh interpreters of the subprocess tests
(which inherit the environment) load a program another process or test already compiled
instead of compiling it again. A cached executable is the one XLA compiled, so results are
the same. Tests compile with LLVM's optimisation passes off (``pytest_configure``).
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

import jax
import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


def pytest_configure(config):
    # The first process of the session (the xdist controller, or the only process without
    # xdist) makes the cache folder; the workers and subprocesses find it in the environment.
    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        cache_dir = tempfile.mkdtemp(prefix="vijax-test-xla-cache-")
        os.environ["JAX_COMPILATION_CACHE_DIR"] = cache_dir
        # cache every program: most of the suite's programs compile in well under a second
        os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

        def cleanup():
            os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)
            shutil.rmtree(cache_dir, ignore_errors=True)

        config.add_cleanup(cleanup)
    # The suite's programs are small: compiling them costs far more than running them, and
    # LLVM's optimisation passes are most of XLA's CPU compile time (they halve the suite's CPU
    # time when off). Results keep IEEE semantics (XLA's fast-math stays off). Every process
    # reads XLA_FLAGS when its backend starts, after this point: the workers and subprocess
    # tests inherit it. An XLA_FLAGS that already sets the level (e.g. to time a benchmark
    # with full optimisation) is kept.
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_backend_optimization_level" not in flags:
        os.environ["XLA_FLAGS"] = (flags + " --xla_backend_optimization_level=0").strip()
    # jax read its environment when conftest imported it, before the lines above
    jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs",
                      float(os.environ.get("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")))


def pytest_collection_modifyitems(config, items):
    # The longest tests (marked slow) first: pytest-xdist hands tests to its workers in this
    # order, so no minute-long test starts last and keeps one core busy while the other idles.
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable sort


@pytest.fixture
def run_on_host_devices():
    """``run(script, num_devices=4, timeout=600) -> stdout``; fails the test on a non-zero
    exit or a timeout (so a deadlock of the devices fails instead of hanging)."""

    def run(script: str, num_devices: int = 4, timeout: float = 600) -> str:
        env = dict(os.environ)
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                            f" --xla_force_host_platform_device_count={num_devices}").strip()
        env["JAX_PLATFORMS"] = "cpu"
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT),
                                                          env.get("PYTHONPATH", "")]))
        result = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO_ROOT,
                                capture_output=True, text=True, timeout=timeout)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
        return result.stdout

    return run


_EXPERIMENTS: dict[str, object] = {}


def load_experiment(script: str):
    """The module of ``experiments/<script>``, imported once per process (``experiments/`` on
    ``sys.path``, as when the script runs: it imports ``_cli``). A script that turns on
    ``jax_enable_x64`` when imported has the flag restored."""
    if script not in _EXPERIMENTS:
        import importlib.util

        folder = str(REPO_ROOT / "experiments")
        if folder not in sys.path:  # last: its svi.py, vae.py, ... shadow nothing installed
            sys.path.append(folder)
        name = "experiment_" + script.removesuffix(".py")
        spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "experiments" / script)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up there
        x64 = jax.config.jax_enable_x64
        try:
            spec.loader.exec_module(module)
        finally:
            jax.config.update("jax_enable_x64", x64)
        _EXPERIMENTS[script] = module
    return _EXPERIMENTS[script]


@pytest.fixture
def run_experiment_main(capsys, monkeypatch):
    """``run(script, argv, cwd) -> (exit status, stdout, stderr)``: ``main(argv)`` of
    ``experiments/<script>`` in this process, in the folder ``cwd``. For the bad-flag tests:
    the scripts check their flags before any work, so in-process calls test the same code
    without a fresh interpreter's imports (seconds each); a few cases per script also run as
    real subprocesses. ``jax_enable_x64`` and ``XLA_FLAGS`` are restored afterwards."""

    def run(script: str, argv, cwd):
        module = load_experiment(script)
        monkeypatch.chdir(cwd)
        monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))
        capsys.readouterr()
        x64 = jax.config.jax_enable_x64
        try:
            module.main([str(a) for a in argv])
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        finally:
            jax.config.update("jax_enable_x64", x64)
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def _shared_path(*parts: str) -> pathlib.Path:
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        message = f"real data not found at {path} (expected ../shared/data beside the repository)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message + "; CI must have it")
        pytest.skip(message)
    return path


@pytest.fixture
def mnist_dir() -> pathlib.Path:
    return _shared_path("mnist")


@pytest.fixture
def old_faithful_csv() -> pathlib.Path:
    return _shared_path("old_faithful.csv")
