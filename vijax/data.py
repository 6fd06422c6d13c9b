"""Data sets for vijax's experiments: MNIST (IDX files or TensorFlow Datasets) and the 8x8 digits.

Everything here runs on the host with NumPy, except :func:`dynamic_binarize`, which is pure
``jax.numpy`` so that a training step can draw the binarization inside ``jit``/``lax.scan``.

MNIST sources, in this order (see :func:`load_mnist`):

1. a local folder holding the four original IDX files (``train-images-idx3-ubyte.gz``,
   ``train-labels-idx1-ubyte.gz``, ``t10k-images-idx3-ubyte.gz``, ``t10k-labels-idx1-ubyte.gz``;
   gzip-compressed or not), named by the ``data_dir`` argument or else by the environment
   variable ``VIJAX_DATA_DIR``; when neither is given, the folder ``../shared/data/mnist`` beside
   the repository is used if it exists (a convenience for this repository's checkout);
2. TensorFlow Datasets (``tfds.load("mnist")``), which downloads the data when online.

The IDX layout (LeCun et al., "The MNIST database of handwritten digits"): a big-endian header
``0x00 0x00 <type code> <ndim>`` (so magic 2051 = ``0x00000803`` for the image files and
2049 = ``0x00000801`` for the label files), then ``ndim`` big-endian uint32 sizes, then the
values in row-major order; for MNIST the values are uint8 with 0 = background.

Binarization as in the VAE literature: *dynamic* binarization draws every pixel afresh from
Bernoulli(intensity) each epoch (Burda, Grosse & Salakhutdinov 2016, "Importance Weighted
Autoencoders", section 5); *fixed* binarization draws it once with a fixed seed.
"""

from __future__ import annotations

import gzip
import os
import pathlib
import zlib
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from vijax._checks import (MAX_NUMPY_SEED, check_bool, check_int, check_path, check_rng_key,
                           is_concrete)

__all__ = [
    "DATA_DIR_ENV",
    "MNIST_FILES",
    "MNIST_SIZES",
    "DIGITS_NUM_EXAMPLES",
    "Dataset",
    "read_idx",
    "load_mnist",
    "load_digits",
    "check_digits_split",
    "dynamic_binarize",
    "fixed_binarize",
    "validate_images",
    "load_old_faithful",
]

#: Environment variable naming a folder with the four MNIST IDX files.
DATA_DIR_ENV = "VIJAX_DATA_DIR"

#: The four MNIST files (their ``.gz`` names; the uncompressed names without ``.gz`` also work).
MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}

_IMAGES_MAGIC = 2051  # 0x00000803: uint8, 3 dimensions
_LABELS_MAGIC = 2049  # 0x00000801: uint8, 1 dimension

#: Examples per MNIST split, as the IDX headers must state them (checked by ``load_mnist``).
MNIST_SIZES = {"train": 60_000, "test": 10_000}
_MNIST_SIDE = 28

# IDX type codes (third byte of the magic number) -> big-endian NumPy dtypes.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

# ``../shared/data/mnist`` relative to the repository root (this file is vijax/data.py).
_REPO_SHARED_MNIST = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
_REPO_OLD_FAITHFUL = _REPO_SHARED_MNIST.parent / "old_faithful.csv"

#: Images in scikit-learn's 8x8 digits (``load_digits`` keeps >= 10 in each split).
DIGITS_NUM_EXAMPLES = 1797
_DIGITS_MIN_SPLIT = 10


def check_digits_split(num_test: Any, seed: Any = 0) -> None:
    """Checks the arguments of :func:`load_digits` without loading anything (also used by
    ``vae_train.Digits``).

    Raises:
      TypeError: ``num_test`` or ``seed`` is not an int.
      ValueError: ``num_test`` is outside [10, 1787] or ``seed`` outside [0, 2**32 - 1].
    """
    check_int(num_test, "num_test", minimum=_DIGITS_MIN_SPLIT,
              maximum=DIGITS_NUM_EXAMPLES - _DIGITS_MIN_SPLIT)
    check_int(seed, "seed", minimum=0, maximum=MAX_NUMPY_SEED)


class Dataset(NamedTuple):
    """A train/test split of flattened images with integer labels (host NumPy arrays).

    Images are float32 intensities in [0, 1] (not binarized); labels are int32 class indices.
    """

    train_images: np.ndarray  # [num_train, num_features] float32 in [0, 1]
    train_labels: np.ndarray  # [num_train] int32
    test_images: np.ndarray  # [num_test, num_features] float32 in [0, 1]
    test_labels: np.ndarray  # [num_test] int32


# ----------------------------------------------------------------------------------------------
# IDX files
# ----------------------------------------------------------------------------------------------


def read_idx(path: str | os.PathLike, *, expected_magic: int | None = None) -> np.ndarray:
    """Read one IDX file (optionally gzip-compressed) into a NumPy array.

    Args:
      path: the file; a name ending in ``.gz`` is decompressed with gzip.
      expected_magic: if given, the 32-bit big-endian magic number the file must start with
        (2051 for MNIST image files, 2049 for label files).

    Returns:
      An array of the shape stored in the header and the native-endian version of the stored
      dtype (``uint8`` for MNIST).

    Raises:
      ValueError: the gzip stream is corrupt (bad gzip header, corrupt deflate data, CRC
        mismatch, truncated stream); the header is malformed (non-zero leading bytes, unknown
        type code, wrong magic number); or the payload size does not equal the product of the
        header's sizes (a truncated or padded file). The message names the file.
      OSError / FileNotFoundError: the file cannot be opened or read.
    """
    path = pathlib.Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (gzip.BadGzipFile, EOFError, zlib.error) as err:
        raise ValueError(f"IDX file {path}: corrupt gzip stream ({err})") from err
    if len(raw) < 4:
        raise ValueError(f"IDX file {path}: {len(raw)} bytes, too short for an IDX header")
    if raw[0] != 0 or raw[1] != 0:
        raise ValueError(
            f"IDX file {path}: the first two header bytes must be zero, got {raw[0]:#04x} "
            f"{raw[1]:#04x} (not an IDX file?)"
        )
    type_code, ndim = raw[2], raw[3]
    if type_code not in _IDX_DTYPES:
        raise ValueError(f"IDX file {path}: unknown IDX type code {type_code:#04x}")
    magic = int.from_bytes(raw[:4], "big")
    if expected_magic is not None and magic != expected_magic:
        raise ValueError(f"IDX file {path}: magic number {magic}, expected {expected_magic}")
    header_size = 4 + 4 * ndim
    if len(raw) < header_size:
        raise ValueError(
            f"IDX file {path}: truncated header ({len(raw)} bytes, need {header_size})")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = _IDX_DTYPES[type_code]
    expected_bytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    payload = len(raw) - header_size
    if payload != expected_bytes:
        raise ValueError(
            f"IDX file {path}: header says shape {shape} ({expected_bytes} bytes of data) but "
            f"the file holds {payload} bytes after the header (truncated or corrupt file)"
        )
    array = np.frombuffer(raw, dtype=dtype, offset=header_size).reshape(shape)
    return array.astype(dtype.newbyteorder("="))


def _find_file(folder: pathlib.Path, gz_name: str) -> pathlib.Path | None:
    for name in (gz_name, gz_name.removesuffix(".gz")):
        candidate = folder / name
        if candidate.is_file():
            return candidate
    return None


def _load_mnist_folder(folder: pathlib.Path) -> Dataset:
    """Read the four MNIST IDX files in ``folder`` and check them against MNIST's known sizes."""
    paths = {key: _find_file(folder, name) for key, name in MNIST_FILES.items()}
    missing = [MNIST_FILES[key] for key, p in paths.items() if p is None]
    if missing:
        raise FileNotFoundError(f"MNIST folder {folder} lacks {', '.join(missing)}")
    arrays = {}
    for split, size in MNIST_SIZES.items():
        images = read_idx(paths[f"{split}_images"], expected_magic=_IMAGES_MAGIC)
        labels = read_idx(paths[f"{split}_labels"], expected_magic=_LABELS_MAGIC)
        if images.shape != (size, _MNIST_SIDE, _MNIST_SIDE):
            raise ValueError(
                f"{paths[f'{split}_images']}: shape {images.shape}, expected "
                f"({size}, {_MNIST_SIDE}, {_MNIST_SIDE}) for the MNIST {split} split"
            )
        if labels.shape != (size,):
            raise ValueError(
                f"{paths[f'{split}_labels']}: shape {labels.shape}, expected ({size},) for the "
                f"MNIST {split} split"
            )
        if labels.max() > 9:
            raise ValueError(f"{paths[f'{split}_labels']}: label {labels.max()} outside 0..9")
        arrays[f"{split}_images"] = _to_unit_interval(images, 255.0)
        arrays[f"{split}_labels"] = labels.astype(np.int32)
    return Dataset(**arrays)


def _to_unit_interval(images: np.ndarray, max_value: float) -> np.ndarray:
    """[n, *image_shape] integers in [0, max_value] -> [n, prod(image_shape)] float32 in [0, 1]."""
    flat = images.reshape(images.shape[0], -1).astype(np.float32)
    return flat / np.float32(max_value)


def _load_mnist_tfds() -> Dataset:
    """MNIST through TensorFlow Datasets' ``tfds.data_source`` (imports TFDS lazily).

    Reading a prepared dataset this way needs no TensorFlow (TFDS decodes to NumPy); the first
    call downloads and prepares MNIST, which does (the ``tfds`` extra installs it).
    """
    import tensorflow_datasets as tfds  # noqa: PLC0415 - optional, heavy import

    arrays = {}
    for split, source in zip(("train", "test"), tfds.data_source("mnist", split=["train", "test"])):
        examples = [source[i] for i in range(len(source))]
        if not examples:
            raise ValueError(f"TFDS returned an empty MNIST {split} split")
        images = np.stack([np.asarray(ex["image"]) for ex in examples])
        labels = np.asarray([ex["label"] for ex in examples])
        if images.shape[1:] not in ((_MNIST_SIDE, _MNIST_SIDE), (_MNIST_SIDE, _MNIST_SIDE, 1)):
            raise ValueError(f"TFDS MNIST {split} images have shape {images.shape[1:]}, "
                             f"expected ({_MNIST_SIDE}, {_MNIST_SIDE}, 1)")
        if labels.min() < 0 or labels.max() > 9:
            raise ValueError(f"TFDS MNIST {split} labels outside 0..9")
        arrays[f"{split}_images"] = _to_unit_interval(images, 255.0)
        arrays[f"{split}_labels"] = labels.astype(np.int32)
    return Dataset(**arrays)


def _candidate_folder(data_dir: str | os.PathLike | None) -> tuple[pathlib.Path | None, str]:
    """The local folder to try and a description of where it came from."""
    if data_dir is not None:
        return pathlib.Path(data_dir).expanduser(), "data_dir argument"
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return pathlib.Path(env).expanduser(), f"${DATA_DIR_ENV}"
    if _REPO_SHARED_MNIST.is_dir():
        return _REPO_SHARED_MNIST, "the repository's ../shared/data/mnist"
    return None, "no local folder given"


def load_mnist(data_dir: str | os.PathLike | None = None) -> Dataset:
    """Load MNIST (60000 train / 10000 test images of 28x28 digits) as floats in [0, 1].

    Sources, in order:

    1. A local folder with the four IDX files (names in :data:`MNIST_FILES`, ``.gz`` or not):
       ``data_dir`` if given; otherwise the environment variable ``VIJAX_DATA_DIR`` if set;
       otherwise, as a convenience for a checkout of this repository, ``../shared/data/mnist``
       beside the repository root if that folder exists. Only the first of these that is named
       is tried. The files are read with :func:`read_idx` (not TFDS: TFDS's checksum check
       rejects a train-images file rebuilt from another copy, such as the one in
       ``../shared/data``) and checked against MNIST's sizes (60000/10000 examples, 28x28,
       labels 0..9).
    2. TensorFlow Datasets, ``tfds.data_source("mnist")``, when the folder exists but holds
       none of the four files (or no folder was named). TFDS downloads and prepares the data on
       first use, which needs internet and TensorFlow (``pip install -e ".[tfds]"``); reading
       the prepared copy later needs neither. A named folder that
       does not exist is an error, not a reason to download.

    Args:
      data_dir: folder with the IDX files, or None.

    Returns:
      :class:`Dataset` with ``train_images`` [60000, 784] float32 in [0, 1] (pixel / 255, row-major
      28x28), ``train_labels`` [60000] int32 in 0..9, ``test_images`` [10000, 784],
      ``test_labels`` [10000].

    Raises:
      TypeError: ``data_dir`` neither None, a ``str`` nor an ``os.PathLike`` (e.g. an int).
      ValueError: ``data_dir`` is an empty string (pass ``"."`` for the current folder).
      FileNotFoundError: ``data_dir`` (or ``VIJAX_DATA_DIR``) names a folder that does not
        exist; the folder holds some but not all four files; or no local files and TFDS
        failed (offline, or TFDS/TensorFlow not installed). The message names both ways to get
        the data: a folder via ``data_dir``/``VIJAX_DATA_DIR``, or internet for TFDS.
      ValueError: a local file is corrupt or does not have MNIST's sizes (see :func:`read_idx`).
    """
    data_dir = check_path(data_dir, "data_dir", optional=True)
    folder, origin = _candidate_folder(data_dir)
    if folder is not None and not folder.is_dir() and origin != "no local folder given":
        # a named folder that does not exist is a typo, not a request to download
        problem = "is a file, not a folder" if folder.exists() else "does not exist"
        raise FileNotFoundError(
            f"MNIST folder {folder} ({origin}) {problem}. Pass the folder holding the "
            f"four IDX files ({', '.join(MNIST_FILES.values())}), or name no folder "
            f"(data_dir=None, {DATA_DIR_ENV} unset) to fall back to TensorFlow Datasets.")
    if folder is not None:
        present = [name for name in MNIST_FILES.values() if _find_file(folder, name) is not None]
        if len(present) == len(MNIST_FILES):
            return _load_mnist_folder(folder)
        if present:
            missing = sorted(set(MNIST_FILES.values()) - set(present))
            raise FileNotFoundError(
                f"MNIST folder {folder} ({origin}) holds only some of the four IDX files; "
                f"missing: {', '.join(missing)}"
            )
    try:
        return _load_mnist_tfds()
    except Exception as err:  # any TFDS failure: not installed, offline, no TensorFlow, ...
        tried = f"{folder} ({origin})" if folder is not None else origin
        raise FileNotFoundError(
            "MNIST not found. Local IDX files: none found in "
            f"{tried}. TensorFlow Datasets fallback failed: {type(err).__name__}: {err}. "
            "Get the data one of two ways: (1) put the four files "
            f"{', '.join(MNIST_FILES.values())} in a folder and pass it as data_dir "
            f"(--data-dir) or set the environment variable {DATA_DIR_ENV}; or (2) connect to "
            "the internet so that TensorFlow Datasets (pip install tensorflow-datasets "
            "tensorflow) can download MNIST."
        ) from err


# ----------------------------------------------------------------------------------------------
# 8x8 digits (bundled with scikit-learn, works offline)
# ----------------------------------------------------------------------------------------------


def load_digits(*, num_test: int = 297, seed: int = 0) -> Dataset:
    """scikit-learn's 8x8 handwritten digits (1797 images, bundled: no download) in [0, 1].

    A small offline stand-in for MNIST for quick demos. Pixels are counts 0..16 in the original
    (UCI "Optical Recognition of Handwritten Digits"), divided by 16 here. The split is
    stratified by label with a fixed seed, so it is the same on every call; the default
    ``num_test=297`` leaves 1500 training images (15 batches of 100).

    Args:
      num_test: number of test images, an int with 10 <= num_test <= 1787.
      seed: seed of the split, an int in [0, 2**32 - 1].

    Returns:
      :class:`Dataset` with images [n, 64] float32 in [0, 1] and labels [n] int32 in 0..9.

    Raises:
      TypeError: ``num_test`` or ``seed`` is not an int (e.g. ``10.5`` or ``"20"``).
      ValueError: ``num_test`` outside [10, 1787], or ``seed`` outside [0, 2**32 - 1].
    """
    from sklearn.datasets import load_digits as sklearn_load_digits  # noqa: PLC0415
    from sklearn.model_selection import train_test_split  # noqa: PLC0415

    check_digits_split(num_test, seed)
    bunch = sklearn_load_digits()
    if bunch.data.shape[0] != DIGITS_NUM_EXAMPLES:  # pragma: no cover - a changed sklearn
        raise RuntimeError(f"scikit-learn's digits have {bunch.data.shape[0]} images, "
                           f"expected {DIGITS_NUM_EXAMPLES}")
    images = (bunch.data / 16.0).astype(np.float32)
    labels = bunch.target.astype(np.int32)
    train_images, test_images, train_labels, test_labels = train_test_split(
        images, labels, test_size=int(num_test), random_state=int(seed), stratify=labels
    )
    return Dataset(train_images, train_labels, test_images, test_labels)


# ----------------------------------------------------------------------------------------------
# Validation and binarization
# ----------------------------------------------------------------------------------------------


def validate_images(
    images: Any,
    *,
    name: str = "images",
    ndim: int | None = 2,
    num_features: int | None = None,
    binary: bool = False,
    unit_interval: bool = True,
) -> None:
    """Check an image batch and raise a clear error naming ``name`` if it is unusable.

    Static properties (type, dtype, rank, width) are always checked; the values (finite, within
    [0, 1], and 0/1 when ``binary``) are checked only for concrete arrays, not for JAX tracers
    inside ``jit``.

    Args:
      images: the batch, [batch, num_features] when ``ndim == 2``.
      name: the argument name used in error messages.
      ndim: required rank, or None for any rank >= 1.
      num_features: required size of the last axis, or None.
      binary: also require every value to be exactly 0 or 1.
      unit_interval: require values in [0, 1] (pixel intensities); False for real-valued data
        (e.g. a Gaussian decoder's targets).

    Raises:
      TypeError: not an array, or not a floating dtype (e.g. uint8 pixels that were not scaled).
      ValueError: wrong rank or width, empty, NaN/inf values, values outside [0, 1], or
        non-binary values when ``binary``.
    """
    if not hasattr(images, "shape") or not hasattr(images, "dtype"):
        raise TypeError(f"{name} must be a NumPy or JAX array, got {type(images).__name__}")
    if not jnp.issubdtype(images.dtype, jnp.floating):
        raise TypeError(
            f"{name} must have a floating dtype with values in [0, 1], got {images.dtype} "
            "(scale uint8 pixels by 1/255 first)"
        )
    if ndim is not None and images.ndim != ndim:
        layout = " (shape [batch, D])" if ndim == 2 else ""
        raise ValueError(f"{name} must have rank {ndim}{layout}, got shape {tuple(images.shape)}")
    if images.ndim < 1 or images.size == 0:
        raise ValueError(f"{name} must be non-empty, got shape {tuple(images.shape)}")
    if num_features is not None and images.shape[-1] != num_features:
        raise ValueError(
            f"{name} must have {num_features} features on its last axis, got shape "
            f"{tuple(images.shape)}"
        )
    if not is_concrete(images):
        return
    values = np.asarray(images)
    if not np.all(np.isfinite(values)):
        raise ValueError(f"{name} contains NaN or infinite values")
    low, high = float(values.min()), float(values.max())
    if unit_interval and (low < 0.0 or high > 1.0):
        raise ValueError(f"{name} must lie in [0, 1], got values in [{low}, {high}]")
    if binary and not np.all((values == 0.0) | (values == 1.0)):
        raise ValueError(f"{name} must be binary (0/1), got other values in [0, 1]")


def dynamic_binarize(rng_key: jax.Array, images: jax.Array) -> jax.Array:
    """Draw binary images with P(pixel = 1) = intensity (dynamic binarization).

    Call it with a fresh key every epoch (Burda et al. 2016, "Importance Weighted Autoencoders",
    section 5: "samples ... binarized stochastically" each time they are used). Pure
    ``jax.numpy``: usable inside ``jit``, ``vmap`` and ``lax.scan``.

    Args:
      rng_key: a JAX PRNG key.
      images: intensities in [0, 1], any shape, floating dtype.

    Returns:
      An array of ``images``' shape and dtype holding 0.0 / 1.0, and NaN where ``images`` is
      NaN (so that a NaN pixel reaching a jitted step gives a NaN loss rather than a silent 0).

    Raises:
      TypeError: ``rng_key`` is not a JAX PRNG key (e.g. an int seed: pass
        ``jax.random.key(seed)``); checked on tracers too.
      TypeError / ValueError: bad ``images``, see :func:`validate_images`. Values are checked
        only for concrete arrays; under ``jit`` (tracers) they are not checked: NaN stays NaN,
        and other values outside [0, 1] act as if clipped to [0, 1] (above 1 always gives 1,
        below 0 always 0).
    """
    check_rng_key(rng_key)
    validate_images(images, ndim=None)
    images = jnp.asarray(images)
    draw = jax.random.bernoulli(rng_key, images).astype(images.dtype)
    return jnp.where(jnp.isnan(images), images, draw)


def fixed_binarize(images: np.ndarray, *, seed: int = 0) -> np.ndarray:
    """Binarize once with a fixed seed (fixed binarization): the same output on every call.

    Pixel i is 1 when u_i < intensity_i for u_i ~ Uniform[0, 1) drawn by
    ``numpy.random.default_rng(seed)``, i.e. Bernoulli(intensity), reproducible across platforms.

    Args:
      images: intensities in [0, 1], any shape, floating dtype (NumPy or concrete JAX array).
      seed: the seed, an int in [0, 2**32 - 1].

    Returns:
      A NumPy array of ``images``' shape and dtype holding 0.0 / 1.0.

    Raises:
      TypeError: a JAX tracer (this is a host-side, once-per-data-set function; use
        :func:`dynamic_binarize` under ``jit``); ``seed`` not an int.
      ValueError: ``seed`` outside [0, 2**32 - 1].
      TypeError / ValueError: bad ``images``, see :func:`validate_images`.
    """
    if not is_concrete(images):
        raise TypeError(
            "fixed_binarize is host-side NumPy; it cannot be traced (use dynamic_binarize)")
    check_int(seed, "seed", minimum=0, maximum=MAX_NUMPY_SEED)
    validate_images(images, ndim=None)
    values = np.asarray(images)
    uniforms = np.random.default_rng(seed).random(values.shape)
    return (uniforms < values).astype(values.dtype)


def load_old_faithful(path: str | os.PathLike | None = None, *, standardize: bool = False) -> np.ndarray:
    """The Old Faithful geyser data, ``[272, 2]`` float64: (eruption minutes, waiting minutes).

    R's ``faithful`` data set (Haerdle 1991; Azzalini & Bowman 1990), the two-cluster example of
    Bishop PRML Figs. 9.8 and 10.6. Read from ``path``, else ``$VIJAX_DATA_DIR/old_faithful.csv``,
    else the repository's ``../shared/data/old_faithful.csv``.

    Args:
      path: a CSV with a header line and the two columns ``eruptions_min,waiting_min``.
      standardize: shift and scale each column to mean 0, standard deviation 1 (as PRML plots);
        a column with zero variance (a constant column, or a file of one row) is refused.

    Raises:
      TypeError: ``path`` neither None, a ``str`` nor an ``os.PathLike``; ``standardize`` not a
        bool.
      FileNotFoundError: no file at any of the places above (the message lists them).
      ValueError: ``path`` is an empty string; the file does not hold two finite numeric
        columns (the message names the file, and the line and column of a value that is not
        a number); with ``standardize``, a column of zero variance (named in the message).
    """
    path = check_path(path, "path", optional=True)
    check_bool(standardize, "standardize")
    candidates = [path] if path is not None else []
    if path is None and os.environ.get("VIJAX_DATA_DIR"):
        candidates.append(pathlib.Path(os.environ["VIJAX_DATA_DIR"]) / "old_faithful.csv")
    if path is None:
        candidates.append(_REPO_OLD_FAITHFUL)
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        tried = ", ".join(str(c) for c in candidates)
        raise FileNotFoundError(f"Old Faithful CSV not found (tried: {tried}); pass `path`")
    table, columns = _read_numeric_csv(found)
    if table.shape[0] < 1 or table.shape[1] != 2 or not np.all(np.isfinite(table)):
        raise ValueError(f"{found} must hold two finite numeric columns; got shape {table.shape}")
    if standardize:
        std = table.std(axis=0)
        constant = [columns[j] for j in range(table.shape[1]) if not std[j] > 0]
        if constant:
            raise ValueError(
                f"{found}: cannot standardize column(s) {', '.join(map(repr, constant))}: zero "
                f"variance over {table.shape[0]} row(s) (a constant column, or too few rows)")
        table = (table - table.mean(axis=0)) / std
    return table


def _read_numeric_csv(path: pathlib.Path) -> tuple[np.ndarray, list[str]]:
    """A comma-separated file with one header line: ``(values [rows, columns] float64, column
    names)``. ValueError naming the file, line and column of a value that is not a number, or
    of a line with another number of fields than the header."""
    try:
        lines = path.read_text().splitlines()
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not a text CSV file ({err})") from err
    if not lines:
        raise ValueError(f"{path} is empty; expected a header line and rows of numbers")
    columns = [name.strip() for name in lines[0].split(",")]
    rows = []
    for lineno, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = line.split(",")
        if len(fields) != len(columns):
            raise ValueError(f"{path}, line {lineno}: {len(fields)} field(s), but the header "
                             f"names {len(columns)} column(s) ({', '.join(columns)})")
        row = []
        for name, field in zip(columns, fields):
            try:
                row.append(float(field))
            except ValueError:
                raise ValueError(f"{path}, line {lineno}, column {name!r}: {field.strip()!r} "
                                 "is not a number") from None
        rows.append(row)
    table = np.asarray(rows, dtype=np.float64).reshape(len(rows), len(columns))
    return table, columns
