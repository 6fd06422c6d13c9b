"""Shared pytest fixtures for vijax.

* ``x64``: run a test with 64-bit floats enabled (``jax.enable_x64``), for float64 references.
* ``mnist_dir``: the real MNIST folder ``../shared/data/mnist``; a test that needs it is
  skipped with a reason when it is absent, except under CI (``CI=true``), where absence fails.
"""

from __future__ import annotations

import os
import pathlib

import jax
import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


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
