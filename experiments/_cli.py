"""Command-line checks and run metadata shared by the experiment scripts (experiments/vae.py,
gmm_em.py, cavi.py, svi.py, discrete_vae.py, mixture_enumerated.py, bench_svi.py, bench_em.py,
and through experiments/_amortized_common.py inference_gaps.py and svi_vs_amortized.py).

A bad flag ends the script with exit status 2 and one line on stderr
(``<prog>: error: <message>``), before any data are loaded or models built, and before
anything is written: :func:`check_output_folder` creates the folder only to try writing in it,
and removes what it created.

The run metadata (:func:`cpu_model`, :func:`versions`, :func:`command`, :func:`environment`)
names no machine paths: the command is written as ``python experiments/<script> <flags>``.

Imports nothing beyond the standard library, so that the checks run in a fraction of a second.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import pathlib
import platform
import shlex
import sys
import tempfile

# Largest seed NumPy's generators and scikit-learn accept (as vijax._checks.MAX_NUMPY_SEED).
MAX_SEED = 2**32 - 1
REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
# import name -> distribution name, where they differ
_DISTRIBUTIONS = {"sklearn": "scikit-learn"}


def put_repo_root_on_path() -> pathlib.Path:
    """Put the repository root on ``sys.path`` (so that ``python experiments/<script>.py``
    imports this checkout's vijax without installing it) and return it."""
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    return REPO_ROOT


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line on stderr and exit status 2 (argparse
    prints its multi-line usage block first)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def check_seed(parser: argparse.ArgumentParser, seed: int | None, flag: str = "--seed") -> None:
    """``parser.error`` unless ``seed`` (when given) is in [0, 2**32 - 1]."""
    if seed is not None and not 0 <= seed <= MAX_SEED:
        parser.error(f"{flag} must be in [0, 2^32 - 1], got {seed}")


def read_input(parser: argparse.ArgumentParser, path: pathlib.Path, load, what: str,
               flag: str = "--data"):
    """``load(path)``; ``parser.error`` (one line naming ``flag``) when ``path`` is not a file or
    ``load`` raises ``ValueError`` (``path`` "is not ``what``")."""
    if not path.is_file():
        parser.error(f"{flag}: no file {path}")
    try:
        return load(path)
    except ValueError as err:
        parser.error(f"{flag}: {path} is not {what} ({err})")


def check_output_folder(parser: argparse.ArgumentParser, path, flag: str) -> pathlib.Path:
    """``path`` as a ``pathlib.Path`` once it is known to be a folder this process can write.

    ``parser.error`` (one line naming ``flag``) for an empty path (it would mean the current
    folder), a path that exists and is not a folder, a path under a regular file, and a folder
    that cannot be created or written. The check creates the missing folders and a probe file,
    then removes them again: a refused flag, and an error raised later, before the script
    writes, leave the disk as it was.
    """
    if path is None or not str(path).strip():
        parser.error(f"{flag} must not be empty (an empty path would mean the current folder; "
                     "pass . for that)")
    path = pathlib.Path(path)
    if path.exists() and not path.is_dir():
        parser.error(f"{flag}: {path} exists and is not a folder")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                parser.error(f"{flag}: {path} is under {parent}, which is a file, not a folder")
            break
    created = []  # the folders made here, deepest last
    try:
        for folder in [*reversed(path.parents), path]:
            if not folder.exists():
                folder.mkdir()
                created.append(folder)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-probe-"):
            pass
    except OSError as err:
        parser.error(f"{flag}: cannot write in {path} ({err.strerror or err})")
    finally:
        for folder in reversed(created):
            try:
                folder.rmdir()
            except OSError:
                pass
    return path


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows, else "unknown"."""
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def versions(*packages: str) -> dict:
    """``{"python": ..., package: installed version or None}`` for the import names given."""
    out = {"python": platform.python_version()}
    for name in packages:
        try:
            out[name] = importlib.metadata.version(_DISTRIBUTIONS.get(name, name))
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def utc_date() -> str:
    """Now, in UTC, ISO 8601 to the second."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def command(script: str, argv=None) -> str:
    """``python experiments/<script> <flags>`` (``argv``, else the process's own flags): the
    command line without the machine's paths to the interpreter and the repository."""
    flags = sys.argv[1:] if argv is None else list(argv)
    return " ".join(shlex.quote(str(a)) for a in ["python", f"experiments/{script}", *flags])


def environment(script: str, argv=None, packages=()) -> dict:
    """Where and how a run ran: CPU model and count, :func:`versions` of ``packages``, the UTC
    date and the :func:`command`."""
    return {"cpu_model": cpu_model(), "cpu_count": os.cpu_count(),
            "versions": versions(*packages), "date": utc_date(),
            "command": command(script, argv)}


def write_json(path, obj, indent: int = 1) -> pathlib.Path:
    """``obj`` as JSON in ``path`` (its folder created if missing); returns the path."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=indent))
    return path


__all__ = ["MAX_SEED", "REPO_ROOT", "Parser", "check_output_folder", "check_seed", "command",
           "cpu_model", "environment", "put_repo_root_on_path", "read_input", "utc_date",
           "versions", "write_json"]
