"""Argument checks shared across vijax: one implementation of each, so that every public
function refuses bad input in the same words.

Every check raises ``TypeError`` for a value of the wrong kind and ``ValueError`` for a value
out of range, and names the argument: ``name`` is used verbatim, so modules that quote argument
names in backticks pass them quoted (``"`num_samples`"``). Checks that read values skip JAX
tracers (only dtype and shape are read under ``jit``/``vmap``); the checks of static Python
arguments (:func:`check_int`, :func:`check_bool`, :func:`check_int_sequence`, and
:func:`check_real` without ``array``) refuse arrays and tracers outright.

This module imports no other vijax module.
"""

from __future__ import annotations

import collections.abc
import functools
import math
import numbers
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

# Largest seed of NumPy's legacy ``RandomState`` (and so of scikit-learn): 2**32 - 1.
MAX_NUMPY_SEED = 2**32 - 1


def is_concrete(value) -> bool:
    """Whether ``value`` can be inspected now (it is not a JAX tracer)."""
    return not isinstance(value, jax.core.Tracer)


def _describe(value) -> str:
    """``value`` for an error message: its repr and type, or an array's dtype and shape."""
    if isinstance(value, (np.ndarray, jax.Array, jax.core.Tracer)):
        return f"an array of dtype {value.dtype} and shape {tuple(value.shape)}"
    return f"{value!r} of type {type(value).__name__}"


def _item_name(name: str, index: int) -> str:
    """``name[index]``; for a name quoted in backticks the index goes inside the quotes."""
    if len(name) > 1 and name[0] == name[-1] == "`":
        return f"{name[:-1]}[{index}]`"
    return f"{name}[{index}]"


def check_int(value, name: str, *, minimum: int | None = None, maximum: int | None = None,
              optional: bool = False) -> int | None:
    """``value`` as a Python int: a Python or NumPy integer in ``[minimum, maximum]``.

    For static integers (sizes, counts, seeds) that fix shapes or loop lengths.

    Returns:
      ``int(value)``; ``None`` for ``None`` when ``optional``.
    Raises:
      TypeError naming ``name``: ``value`` is not an int (``bool``, ``2.0``, ``"2"``, arrays
        and tracers are refused), or ``None`` without ``optional``.
      ValueError naming ``name``: ``value < minimum`` or ``value > maximum``.
    """
    if optional and value is None:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int{' or None' if optional else ''}, "
                        f"got {_describe(value)}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return value


def _range_words(finite: bool, low: float | None, low_open: bool, high: float | None,
                 high_open: bool) -> str:
    """The range of :func:`check_real` in words: ``"finite and > 0"``, ``"in [0, 1)"``."""
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    words = ["finite"] if finite else []
    if low is not None:
        words.append(f"{'>' if low_open else '>='} {low:g}")
    if high is not None:
        words.append(f"{'<' if high_open else '<='} {high:g}")
    return " and ".join(words)


def check_real(value, name: str, *, minimum: float | None = None,
               exclusive_minimum: float | None = None, maximum: float | None = None,
               exclusive_maximum: float | None = None, finite: bool = True,
               array: bool = False) -> float | None:
    """``value`` as a Python float: a real number, finite (unless ``finite=False``) and within
    the bounds given (``minimum <= value``, ``exclusive_minimum < value``, ``value <= maximum``,
    ``value < exclusive_maximum``; NaN fails every bound).

    Without ``array`` only Python and NumPy real scalars are accepted (for static options:
    thresholds, learning rates, the Renyi ``alpha``). With ``array`` a real 0-d array-like is
    accepted too (NumPy or JAX arrays, or a traced scalar under ``jit``): a tracer has only its
    dtype and shape checked, and ``None`` is returned for it.

    Raises:
      TypeError naming ``name``: not a real number (``bool``, strings, ``None``, complex; with
        ``array``, an array of a non-real dtype; without it, any array).
      ValueError naming ``name``: with ``array``, an array of rank > 0; a concrete value
        outside the range.
    """
    if (minimum is not None and exclusive_minimum is not None) or (
            maximum is not None and exclusive_maximum is not None):
        raise ValueError("give at most one lower and one upper bound")
    if array and not isinstance(value, numbers.Number):
        converted = value
        if is_concrete(value) and not isinstance(value, (str, bytes)) and value is not None:
            try:
                converted = np.asarray(value)
            except Exception:  # noqa: BLE001 - anything NumPy cannot convert is not a number
                pass
        dtype = getattr(converted, "dtype", None)
        if dtype is None or not (jnp.issubdtype(dtype, jnp.integer)  # bool is neither
                                 or jnp.issubdtype(dtype, jnp.floating)):  # bfloat16 too
            raise TypeError(f"{name} must be a real number, got {_describe(value)}")
        if converted.shape != ():
            raise ValueError(f"{name} must be a scalar, got shape {tuple(converted.shape)}")
        if not is_concrete(value):
            return None
        value = converted
    elif isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {_describe(value)}")
    number = float(value)
    low, low_open = (minimum, False) if exclusive_minimum is None else (exclusive_minimum, True)
    high, high_open = (maximum, False) if exclusive_maximum is None else (exclusive_maximum, True)
    ok = ((not finite or math.isfinite(number))
          and (low is None or (number > low if low_open else number >= low))
          and (high is None or (number < high if high_open else number <= high)))
    if not ok:
        raise ValueError(f"{name} must be {_range_words(finite, low, low_open, high, high_open)}"
                         f", got {number!r}")
    return number


def check_bool(value, name: str, *, optional: bool = False) -> bool | None:
    """``value`` as a Python bool (a Python or NumPy bool; ``None`` too when ``optional``).

    Raises:
      TypeError naming ``name`` for anything else (``0``, ``"no"``, arrays).
    """
    if optional and value is None:
        return None
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool{' or None' if optional else ''}, "
                        f"got {_describe(value)}")
    return bool(value)


def check_int_sequence(value, name: str, *, minimum: int | None = 1) -> tuple[int, ...]:
    """``value`` as a tuple of Python ints: a tuple, list or range of ints >= ``minimum``
    (layer widths ``(200, 200)``, sample shapes ``(5, 2)``).

    Raises:
      TypeError naming ``name``: not a sequence (e.g. a bare ``200``: write ``(200,)``; strings
        are refused); naming ``name[i]``: an element that is not an int.
      ValueError naming ``name[i]``: an element below ``minimum``.
    """
    if isinstance(value, (str, bytes)) or not isinstance(value, collections.abc.Sequence):
        hint = f" (for one value write ({value},))" if isinstance(value, (int, np.integer)) else ""
        raise TypeError(f"{name} must be a tuple or list of ints, got {_describe(value)}{hint}")
    return tuple(check_int(item, _item_name(name, i), minimum=minimum)
                 for i, item in enumerate(value))


def check_num_components(num_components, num_points: int, *, name: str = "num_components",
                         name_x: str = "x") -> int:
    """The number of mixture components K: an int with 1 <= K <= N = ``num_points`` (the rows
    of the data ``name_x``).

    Raises:
      TypeError naming ``name``: K is not an int. ValueError naming ``name``: K < 1 or K > N.
    """
    k = check_int(num_components, name, minimum=1)
    if num_points < k:
        raise ValueError(f"{name} (K={k}) exceeds the number of rows of {name_x} "
                         f"(N={num_points}); need N >= K")
    return k


def check_row_stochastic(matrix, name: str, *, atol: float = 1e-4) -> None:
    """Raise ValueError naming ``name`` unless the concrete ``[N, K]`` ``matrix`` is finite,
    non-negative and has rows summing to 1 (within ``atol``); tracers are not inspected."""
    if not is_concrete(matrix):
        return
    value = np.asarray(matrix, dtype=np.float64)
    if not np.isfinite(value).all() or (value < 0).any():
        raise ValueError(f"{name} must be finite and non-negative")
    deviation = float(np.max(np.abs(value.sum(axis=1) - 1.0))) if value.size else 0.0
    if deviation > atol:
        raise ValueError(f"{name} rows must sum to 1 (max deviation {deviation:.3g})")


def _raw_key_size() -> int:
    """The last axis of a raw ``jax.random.PRNGKey`` under the configured default PRNG
    implementation (2 for threefry, 4 for rbg)."""
    return _raw_key_size_for(jax.config.jax_default_prng_impl)


@functools.cache
def _raw_key_size_for(impl: str) -> int:
    del impl  # the cache key: eval_shape below uses the configured implementation
    return jax.eval_shape(lambda: jax.random.PRNGKey(0)).shape[-1]


def check_rng_key(rng_key, name: str = "rng_key") -> None:
    """Raise TypeError naming ``name`` unless ``rng_key`` is a single JAX PRNG key.

    Accepted: a typed key (``jax.random.key(seed)``) of shape ``()``, or a raw ``uint32`` key
    (``jax.random.PRNGKey(seed)``) of shape ``(2,)`` (the implementation's key size: 2 for the
    default threefry, 4 for rbg). A batch of keys (``jax.random.split(key, 2)``, shape ``(2,)``
    typed or ``(2, 2)`` raw) is refused: pass one of them, or ``jax.vmap`` over the batch.
    Works on tracers too (only dtype and shape are read), so it is safe inside
    ``jit``/``vmap`` (under ``vmap`` the key seen is one entry of the batch). A Python ``int``
    seed, a float array or a NumPy integer array is refused: pass ``jax.random.key(seed)``.
    """
    dtype = getattr(rng_key, "dtype", None)
    shape = getattr(rng_key, "shape", None)
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        if tuple(shape) == ():
            return
        raise TypeError(
            f"{name} must be a single JAX PRNG key (shape ()), got a batch of keys of shape "
            f"{tuple(shape)}: pass one key (e.g. keys[0]) or jax.vmap over the batch")
    size = _raw_key_size()
    if dtype == np.uint32 and isinstance(rng_key, (jax.Array, np.ndarray, jax.core.Tracer)):
        if tuple(shape) == (size,):
            return
        if shape and shape[-1] == size:
            raise TypeError(
                f"{name} must be a single raw JAX PRNG key of shape ({size},), got a batch of "
                f"keys of shape {tuple(shape)}: pass one key (e.g. keys[0]) or jax.vmap over "
                "the batch")
    raise TypeError(
        f"{name} must be a JAX PRNG key (jax.random.key(seed)), got "
        f"{type(rng_key).__name__}" + (f" of dtype {dtype} and shape {shape}" if dtype is not None
                                       else ""))


def check_path(value, name: str, *, optional: bool = False) -> pathlib.Path | None:
    """``value`` as a ``pathlib.Path``: a non-empty ``str`` or an ``os.PathLike``
    (``pathlib.Path``); ``None`` too when ``optional`` (returned as ``None``).

    Raises:
      TypeError naming ``name``: anything else (an int, bytes, ``None`` without ``optional``).
      ValueError naming ``name``: an empty string, which would silently mean the current
        folder (pass ``"."`` for that).
    """
    if optional and value is None:
        return None
    if isinstance(value, (bytes, bytearray)) or not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{name} must be a path (str or os.PathLike"
                        f"{', or None' if optional else ''}), got {_describe(value)}")
    if isinstance(value, str) and not value.strip():
        raise ValueError(f"{name} must not be empty (an empty path would mean the current "
                         "folder; pass '.' for that)")
    return pathlib.Path(value)


def check_callable(fn, name: str) -> None:
    """Raise TypeError naming ``name`` unless ``fn`` is callable."""
    if not callable(fn):
        raise TypeError(f"{name} must be a callable, got {type(fn).__name__}")


def check_optimizer(optimizer, name: str = "optimizer") -> None:
    """TypeError naming ``name`` unless ``optimizer`` has callable ``init`` and ``update``
    (an ``optax.GradientTransformation`` instance such as ``optax.adam(1e-3)``)."""
    if isinstance(optimizer, type) or not (callable(getattr(optimizer, "init", None))
                                           and callable(getattr(optimizer, "update", None))):
        hint = (" (a function: call it, e.g. optax.adam(1e-3))" if callable(optimizer)
                and not isinstance(optimizer, type) else "")
        raise TypeError(f"{name} must be an optax.GradientTransformation instance with init "
                        f"and update, e.g. optax.adam(1e-3), got {optimizer!r}{hint}")
