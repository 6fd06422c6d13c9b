"""Tests of vijax.data: the IDX reader, MNIST loading and its sources, binarization, digits."""

from __future__ import annotations

import functools
import gzip
import pathlib
import sys
import types
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vijax import data

# Known MNIST class counts (LeCun et al.; also the README of ../shared/data).
TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def _write_idx(path: pathlib.Path, array: np.ndarray, *, type_code: int = 0x08, magic=None):
    """Hand-made IDX writer for the tests (independent of the reader under test)."""
    dtype = {0x08: ">u1", 0x0C: ">i4", 0x0D: ">f4"}[type_code]
    header = bytes([0, 0, type_code, array.ndim]) if magic is None else magic.to_bytes(4, "big")
    header += b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    payload = header + np.asarray(array, dtype=dtype).tobytes()
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as f:
        f.write(payload)


@functools.lru_cache(maxsize=1)
def _load_mnist_cached(folder: str) -> data.Dataset:
    return data.load_mnist(folder)


@pytest.fixture
def mnist(mnist_dir):
    """The real MNIST, read once per test session (skips/fails like ``mnist_dir``)."""
    return _load_mnist_cached(str(mnist_dir))


# ----------------------------------------------------------------------------------------------
# Real MNIST
# ----------------------------------------------------------------------------------------------


def test_idx_headers_of_real_files(mnist_dir):
    expected = {
        "train-images-idx3-ubyte.gz": (2051, (60000, 28, 28)),
        "train-labels-idx1-ubyte.gz": (2049, (60000,)),
        "t10k-images-idx3-ubyte.gz": (2051, (10000, 28, 28)),
        "t10k-labels-idx1-ubyte.gz": (2049, (10000,)),
    }
    for name, (magic, shape) in expected.items():
        with gzip.open(mnist_dir / name, "rb") as f:
            header = f.read(4 + 4 * len(shape))
        assert int.from_bytes(header[:4], "big") == magic
        sizes = [int.from_bytes(header[4 + 4 * i : 8 + 4 * i], "big") for i in range(len(shape))]
        assert tuple(sizes) == shape
    labels = data.read_idx(mnist_dir / "t10k-labels-idx1-ubyte.gz", expected_magic=2049)
    assert labels.dtype == np.uint8 and labels.shape == (10000,)
    # The first test labels of MNIST are 7 2 1 0 4 1 4 9 (well known; also the header dump).
    np.testing.assert_array_equal(labels[:8], [7, 2, 1, 0, 4, 1, 4, 9])


def test_load_mnist_sizes_labels_counts_and_intensity(mnist):
    assert mnist.train_images.shape == (60000, 784) and mnist.train_images.dtype == np.float32
    assert mnist.test_images.shape == (10000, 784) and mnist.test_images.dtype == np.float32
    assert mnist.train_labels.shape == (60000,) and mnist.train_labels.dtype == np.int32
    assert mnist.test_labels.shape == (10000,) and mnist.test_labels.dtype == np.int32
    for labels in (mnist.train_labels, mnist.test_labels):
        assert labels.min() == 0 and labels.max() == 9
    np.testing.assert_array_equal(np.bincount(mnist.train_labels, minlength=10), TRAIN_COUNTS)
    np.testing.assert_array_equal(np.bincount(mnist.test_labels, minlength=10), TEST_COUNTS)
    for images in (mnist.train_images, mnist.test_images):
        assert images.min() == 0.0 and images.max() == 1.0
        # pixels are k / 255 for integers k
        k = images[:500] * 255.0
        np.testing.assert_allclose(k, np.round(k), atol=1e-4)
    # The well-known MNIST training mean 0.1307 (e.g. torchvision's Normalize((0.1307,), ...)).
    assert abs(float(mnist.train_images.mean(dtype=np.float64)) - 0.1307) < 5e-4


def test_load_mnist_uses_env_var_then_shared_folder(monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr(data, "_load_mnist_folder", lambda folder: seen.append(folder) or "ok")
    full = tmp_path / "full"
    full.mkdir()
    for name in data.MNIST_FILES.values():
        (full / name).write_bytes(b"")
    monkeypatch.setenv(data.DATA_DIR_ENV, str(full))
    assert data.load_mnist() == "ok" and seen[-1] == full
    # An explicit data_dir wins over the environment variable.
    other = tmp_path / "other"
    other.mkdir()
    for name in data.MNIST_FILES.values():
        (other / name.removesuffix(".gz")).write_bytes(b"")  # uncompressed names also accepted
    assert data.load_mnist(other) == "ok" and seen[-1] == other
    # Neither given: the repository's ../shared/data/mnist when it exists.
    monkeypatch.delenv(data.DATA_DIR_ENV)
    monkeypatch.setattr(data, "_REPO_SHARED_MNIST", full)
    assert data.load_mnist() == "ok" and seen[-1] == full


# ----------------------------------------------------------------------------------------------
# IDX reader on hand-made files
# ----------------------------------------------------------------------------------------------


def test_read_idx_round_trips_hand_made_files(tmp_path):
    pixels = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "a.gz", pixels)
    out = data.read_idx(tmp_path / "a.gz", expected_magic=2051)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, pixels)
    ints = np.array([[1, -2, 70000], [3, 4, -5]], dtype=np.int32)
    _write_idx(tmp_path / "b", ints, type_code=0x0C)  # uncompressed, big-endian int32
    out = data.read_idx(tmp_path / "b")
    assert out.dtype == np.int32 and out.dtype.byteorder in "=|<"
    np.testing.assert_array_equal(out, ints)


@pytest.mark.parametrize(
    "corruption, match",
    [
        ("truncated", "truncated or corrupt"),
        ("padded", "truncated or corrupt"),
        ("wrong_magic", "magic number 2049, expected 2051"),
        ("not_idx", "first two header bytes"),
        ("bad_type", "unknown IDX type code"),
        ("bad_gzip", "corrupt gzip"),
        ("tiny", "too short"),
    ],
)
def test_read_idx_rejects_corrupt_files(tmp_path, corruption, match):
    path = tmp_path / "bad-idx3-ubyte.gz"
    images = np.zeros((3, 28, 28), dtype=np.uint8)
    if corruption in ("truncated", "padded"):
        _write_idx(path, images)
        raw = gzip.open(path).read()
        raw = raw[:-10] if corruption == "truncated" else raw + b"\x00"
        path.write_bytes(gzip.compress(raw))
    elif corruption == "wrong_magic":
        _write_idx(path, np.zeros(3, dtype=np.uint8))  # a labels file
    elif corruption == "not_idx":
        path.write_bytes(gzip.compress(b"\x1f\x8b\x08\x03" + b"\x00" * 20))
    elif corruption == "bad_type":
        path.write_bytes(gzip.compress(bytes([0, 0, 0x07, 1, 0, 0, 0, 1, 5])))
    elif corruption == "bad_gzip":
        path.write_bytes(b"definitely not gzip")
    elif corruption == "tiny":
        path.write_bytes(gzip.compress(b"\x00\x00"))
    with pytest.raises(ValueError, match=match) as info:
        data.read_idx(path, expected_magic=2051)
    assert str(path) in str(info.value)


def test_read_idx_turns_corrupt_deflate_data_into_a_value_error(tmp_path):
    # A valid gzip header with damaged compressed data: zlib (not gzip) reports it.
    pixels = (np.arange(3 * 28 * 28) % 7).astype(np.uint8).reshape(3, 28, 28)
    plain = tmp_path / "good-idx3-ubyte"
    _write_idx(plain, pixels)
    good = tmp_path / "good-idx3-ubyte.gz"
    good.write_bytes(gzip.compress(plain.read_bytes(), mtime=0))  # 10-byte header, no name
    np.testing.assert_array_equal(data.read_idx(good), pixels)
    damaged = bytearray(good.read_bytes())
    for i in range(10, 20):  # the first bytes of the deflate data
        damaged[i] ^= 0xFF
    path = tmp_path / "bad-idx3-ubyte.gz"
    path.write_bytes(bytes(damaged))
    with pytest.raises(ValueError, match="corrupt gzip stream") as info:
        data.read_idx(path, expected_magic=2051)
    assert str(path) in str(info.value)
    assert isinstance(info.value.__cause__, zlib.error)


def test_load_mnist_rejects_folder_with_wrong_sizes(tmp_path):
    for key, name in data.MNIST_FILES.items():
        if key.endswith("images"):
            _write_idx(tmp_path / name, np.zeros((5, 28, 28), dtype=np.uint8))
        else:
            _write_idx(tmp_path / name, np.zeros(5, dtype=np.uint8))
    with pytest.raises(ValueError, match=r"expected \(60000, 28, 28\)"):
        data.load_mnist(tmp_path)


def test_load_mnist_rejects_labels_out_of_range(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "MNIST_SIZES", {"train": 4, "test": 2})
    for split, n in (("train", 4), ("test", 2)):
        _write_idx(tmp_path / data.MNIST_FILES[f"{split}_images"], np.zeros((n, 28, 28), np.uint8))
        labels = np.array([1, 12, 3, 4][:n], np.uint8)
        _write_idx(tmp_path / data.MNIST_FILES[f"{split}_labels"], labels)
    with pytest.raises(ValueError, match="label 12 outside 0..9"):
        data.load_mnist(tmp_path)


def test_load_mnist_partial_folder_names_missing_files(tmp_path):
    _write_idx(tmp_path / data.MNIST_FILES["train_labels"], np.zeros(5, dtype=np.uint8))
    with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte.gz"):
        data.load_mnist(tmp_path)


# ----------------------------------------------------------------------------------------------
# TFDS fallback (no download: a stand-in tensorflow_datasets module, or TFDS's own mock data)
# ----------------------------------------------------------------------------------------------


def _fake_tfds(data_source_fn):
    module = types.ModuleType("tensorflow_datasets")
    module.data_source = data_source_fn
    return module


def test_missing_data_error_names_both_ways(tmp_path, monkeypatch):
    def offline_data_source(*args, **kwargs):
        raise ConnectionError("no route to host")

    monkeypatch.setitem(sys.modules, "tensorflow_datasets", _fake_tfds(offline_data_source))
    with pytest.raises(FileNotFoundError) as info:
        data.load_mnist(tmp_path)  # an empty folder
    message = str(info.value)
    for needle in (str(tmp_path), "data_dir", "VIJAX_DATA_DIR", "internet", "TensorFlow Datasets",
                   "no route to host"):
        assert needle in message, needle
    # No TFDS installed at all: the same clear error.
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # makes the import fail
    with pytest.raises(FileNotFoundError, match="VIJAX_DATA_DIR"):
        data.load_mnist(tmp_path)


def test_tfds_route_on_tfds_mock_data(tmp_path, monkeypatch):
    """The real TFDS code path (``tfds.data_source`` and its MNIST builder's features), with
    TFDS's ``mock_data`` standing in for the download: no network, no TensorFlow."""
    tfds = pytest.importorskip("tensorflow_datasets")
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
    with tfds.testing.mock_data(num_examples=5):
        out = data.load_mnist(tmp_path)  # an empty folder: falls back to TFDS
        raw = {split: [source[i] for i in range(len(source))] for split, source in
               zip(("train", "test"), tfds.data_source("mnist", split=["train", "test"]))}
    for split in ("train", "test"):
        images = np.stack([np.asarray(ex["image"]) for ex in raw[split]])
        assert images.shape == (5, 28, 28, 1) and images.dtype == np.uint8
        got = getattr(out, f"{split}_images")
        assert got.shape == (5, 784) and got.dtype == np.float32
        np.testing.assert_allclose(got, images.reshape(5, 784) / 255.0, rtol=1e-6)
        labels = getattr(out, f"{split}_labels")
        assert labels.dtype == np.int32
        np.testing.assert_array_equal(labels, [ex["label"] for ex in raw[split]])
    assert out.train_images.max() > 0.5  # random mock pixels, not an all-zero array
    assert not (tmp_path / "tfds").exists() or not any((tmp_path / "tfds").rglob("*.array_record*"))


def test_tfds_route_rejects_a_split_of_the_wrong_shape(tmp_path, monkeypatch):
    class Source(list):
        pass

    def wrong_shape(name, *, split):
        return [Source([{"image": np.zeros((8, 8, 1), np.uint8), "label": 1}]) for _ in split]

    monkeypatch.setitem(sys.modules, "tensorflow_datasets", _fake_tfds(wrong_shape))
    with pytest.raises(FileNotFoundError, match=r"images have shape \(8, 8, 1\)"):
        data.load_mnist(tmp_path)


def test_named_folder_that_does_not_exist_is_an_error_not_a_download(tmp_path, monkeypatch):
    def no_download():
        raise AssertionError("TFDS must not be tried for a mistyped folder")

    monkeypatch.setattr(data, "_load_mnist_tfds", no_download)
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    with pytest.raises(FileNotFoundError, match=r"does not exist.*data_dir"):
        data.load_mnist(tmp_path / "typo")
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"")  # a file named as the folder
    with pytest.raises(FileNotFoundError, match=r"is a file, not a folder"):
        data.load_mnist(tmp_path / "train-images-idx3-ubyte.gz")
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path / "typo"))
    with pytest.raises(FileNotFoundError, match=r"\$VIJAX_DATA_DIR\) does not exist"):
        data.load_mnist()


# ----------------------------------------------------------------------------------------------
# Binarization
# ----------------------------------------------------------------------------------------------


def _intensities(shape, seed=0, dtype=np.float32):
    return np.random.default_rng(seed).uniform(size=shape).astype(dtype)


def test_dynamic_binarize_statistics_and_freshness():
    images = _intensities((400, 784))
    with jax.numpy_rank_promotion("raise"):
        a = data.dynamic_binarize(jax.random.key(0), images)
        b = data.dynamic_binarize(jax.random.key(1), images)
        a_again = data.dynamic_binarize(jax.random.key(0), images)
    assert a.shape == images.shape and a.dtype == jnp.float32
    a = np.asarray(a)
    assert set(np.unique(a)) <= {0.0, 1.0}
    # Sum of independent Bernoulli(p_i): mean sum p_i, variance sum p_i (1 - p_i). 5 SE.
    p = images.astype(np.float64)
    se = np.sqrt(np.sum(p * (1 - p)))
    assert abs(a.sum() - p.sum()) < 5 * se
    # Pixels with intensity 0 / 1 stay 0 / 1; a low-intensity pixel rarely fires.
    edge = np.array([[0.0, 1.0, 0.0, 1.0]], dtype=np.float32)
    np.testing.assert_array_equal(data.dynamic_binarize(jax.random.key(3), edge), edge)
    # Fresh per key, reproducible per key.
    np.testing.assert_array_equal(a, np.asarray(a_again))
    assert np.mean(a != np.asarray(b)) > 0.3  # expected 2 E[p(1-p)] = 1/3 for uniform p
    # Per-pixel frequency across keys matches the intensity (vmap over keys, under jit).
    column = _intensities((1, 16), seed=1)
    keys = jax.random.split(jax.random.key(2), 4000)
    draws = jax.jit(jax.vmap(data.dynamic_binarize, in_axes=(0, None)))(keys, column)
    assert draws.shape == (4000, 1, 16)
    freq = np.asarray(draws).mean(axis=0)
    se = np.sqrt(column * (1 - column) / 4000)
    assert np.all(np.abs(freq - column) < 5 * se + 1e-6)


def test_dynamic_binarize_keeps_float64(x64):
    out = data.dynamic_binarize(jax.random.key(0), _intensities((3, 5), dtype=np.float64))
    assert out.dtype == jnp.float64


def test_dynamic_binarize_under_jit_keeps_nan_and_clips_out_of_range_values():
    # Under jit the values cannot be checked: a NaN pixel must stay NaN (not become 0), and
    # values outside [0, 1] behave as probabilities clipped to [0, 1].
    images = jnp.array([[jnp.nan, 0.0, 1.0, 7.0, -3.0, jnp.inf, -jnp.inf, jnp.nan]] * 50)
    out = np.asarray(jax.jit(data.dynamic_binarize)(jax.random.key(0), images))
    assert out.shape == images.shape and out.dtype == np.float32
    assert np.all(np.isnan(out[:, [0, 7]]))
    np.testing.assert_array_equal(out[:, 1:7], np.tile([0.0, 1.0, 1.0, 0.0, 1.0, 0.0], (50, 1)))


def test_fixed_binarize_is_deterministic_and_unbiased():
    images = _intensities((300, 784), seed=4)
    a = data.fixed_binarize(images, seed=7)
    b = data.fixed_binarize(images, seed=7)
    c = data.fixed_binarize(images, seed=8)
    assert isinstance(a, np.ndarray) and a.dtype == np.float32 and a.shape == images.shape
    np.testing.assert_array_equal(a, b)
    assert np.mean(a != c) > 0.3
    p = images.astype(np.float64)
    assert abs(a.sum() - p.sum()) < 5 * np.sqrt(np.sum(p * (1 - p)))
    assert data.fixed_binarize(images.astype(np.float64)).dtype == np.float64


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("binarize", ["dynamic", "fixed"])
def test_binarize_rejects_bad_images(binarize):
    def call(x):
        if binarize == "dynamic":
            return data.dynamic_binarize(jax.random.key(0), x)
        return data.fixed_binarize(x)

    with pytest.raises(TypeError, match="floating dtype"):
        call(np.zeros((2, 784), dtype=np.uint8))
    with pytest.raises(ValueError, match="NaN"):
        call(np.array([[0.5, np.nan]], dtype=np.float32))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        call(np.array([[0.5, 255.0]], dtype=np.float32))
    with pytest.raises(TypeError, match="array"):
        call([[0.5, 0.5]])


def test_fixed_binarize_rejects_tracers():
    with pytest.raises(TypeError, match="dynamic_binarize"):
        jax.jit(data.fixed_binarize)(jnp.zeros((2, 3)))


def test_validate_images_messages():
    good = np.full((4, 784), 0.5, dtype=np.float32)
    data.validate_images(good, num_features=784)
    with pytest.raises(ValueError, match=r"x must have rank 2 \(shape \[batch, D\]\), got shape \(4, 28, 28\)"):
        data.validate_images(good.reshape(4, 28, 28), name="x")
    with pytest.raises(ValueError, match="784 features"):
        data.validate_images(good[:, :100], num_features=784)
    with pytest.raises(ValueError, match="non-empty"):
        data.validate_images(good[:0])
    with pytest.raises(ValueError, match="binary"):
        data.validate_images(good, binary=True)
    data.validate_images(np.ones((2, 3), np.float32), binary=True)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        data.validate_images(good * 3.0)
    data.validate_images(good * 3.0 - 5.0, unit_interval=False)  # real-valued data allowed
    # Tracers: static checks only (no error for values that cannot be inspected).
    jax.jit(lambda x: data.validate_images(x) or x)(good)
    with pytest.raises(TypeError, match="floating"):
        jax.jit(lambda x: data.validate_images(x) or x)(good.astype(np.int32))


# ----------------------------------------------------------------------------------------------
# 8x8 digits
# ----------------------------------------------------------------------------------------------


def test_load_digits_split_and_scaling():
    from sklearn.datasets import load_digits as sk_digits  # noqa: PLC0415

    d = data.load_digits()
    assert d.train_images.shape == (1500, 64) and d.test_images.shape == (297, 64)
    assert d.train_images.dtype == np.float32 and d.train_labels.dtype == np.int32
    assert d.train_images.min() == 0.0 and d.train_images.max() == 1.0
    # Same multiset of (image, label) rows as scikit-learn's data / 16.
    bunch = sk_digits()
    ours = np.concatenate([np.c_[d.train_images * 16, d.train_labels],
                           np.c_[d.test_images * 16, d.test_labels]])
    theirs = np.c_[bunch.data, bunch.target]
    np.testing.assert_allclose(ours[np.lexsort(ours.T)], theirs[np.lexsort(theirs.T)], atol=1e-5)
    # Stratified: every class has 29 or 30 test images (297 / 10).
    assert set(np.bincount(d.test_labels, minlength=10)) <= {29, 30}
    # Deterministic.
    np.testing.assert_array_equal(data.load_digits().test_images, d.test_images)
    with pytest.raises(ValueError, match="num_test"):
        data.load_digits(num_test=0)


def test_load_old_faithful_matches_the_published_table(old_faithful_csv, tmp_path):
    """272 rows; column means 3.4878 and 70.8971 (../shared/data/README.md)."""
    table = data.load_old_faithful(old_faithful_csv)
    assert table.shape == (272, 2) and table.dtype == np.float64
    np.testing.assert_allclose(table.mean(0), [3.4878, 70.8971], atol=5e-5)
    z = data.load_old_faithful(old_faithful_csv, standardize=True)
    np.testing.assert_allclose(z.mean(0), 0.0, atol=1e-12)
    np.testing.assert_allclose(z.std(0), 1.0, rtol=1e-12)
    with pytest.raises(FileNotFoundError, match="Old Faithful"):
        data.load_old_faithful(tmp_path / "missing.csv")
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b,c\n1,2,3\n")
    with pytest.raises(ValueError, match="two finite numeric columns"):
        data.load_old_faithful(bad)


def test_missing_real_data_fails_under_ci_and_skips_elsewhere(monkeypatch):
    """The rule of conftest's data fixtures: absent ../shared data skips a test with a reason,
    except under CI=true, where it fails."""
    import conftest

    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI must have it"):
        conftest._shared_path("no-such-folder")
    monkeypatch.setenv("CI", "false")
    with pytest.raises(pytest.skip.Exception, match="real data not found"):
        conftest._shared_path("no-such-folder")


# ----------------------------------------------------------------------------------------------
# Bad arguments: TypeError for a wrong type, ValueError for a bad value, naming the argument
# ----------------------------------------------------------------------------------------------

_HALF = np.full((2, 3), 0.5, np.float32)


@pytest.mark.parametrize("call, error, match", [
    (lambda: data.dynamic_binarize(0, _HALF), TypeError, "rng_key"),
    # checked on tracers too: under jit the int seed is a traced int32 scalar
    (lambda: jax.jit(data.dynamic_binarize)(0, _HALF), TypeError, "rng_key"),
    (lambda: data.fixed_binarize(_HALF, seed=-1), ValueError, "seed"),
    (lambda: data.fixed_binarize(_HALF, seed="a"), TypeError, "seed"),
    (lambda: data.load_digits(num_test=10.5), TypeError, "num_test"),
    (lambda: data.load_digits(num_test="20"), TypeError, "num_test"),
    (lambda: data.load_digits(seed=-1), ValueError, "seed"),
], ids=["int-key", "int-key-jit", "seed-neg", "seed-str", "num_test-float", "num_test-str",
        "digits-seed-neg"])
def test_bad_arguments_raise_errors_naming_them(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_load_old_faithful_names_the_file_and_refuses_zero_variance(tmp_path):
    """Before: standardize=True on one row or a constant column returned NaN; text in a column
    gave NumPy's "could not convert string" without the file name."""
    one_row = tmp_path / "one_row.csv"
    one_row.write_text("eruptions_min,waiting_min\n3.6,79\n")
    with pytest.raises(ValueError, match=r"one_row\.csv: cannot standardize column\(s\) "
                                         r"'eruptions_min', 'waiting_min': zero variance"):
        data.load_old_faithful(one_row, standardize=True)
    assert data.load_old_faithful(one_row).shape == (1, 2)  # fine unstandardized
    constant = tmp_path / "constant.csv"
    constant.write_text("eruptions_min,waiting_min\n3.6,79\n1.8,79\n2.3,79\n")
    with pytest.raises(ValueError, match=r"column\(s\) 'waiting_min': zero variance over 3"):
        data.load_old_faithful(constant, standardize=True)
    text = tmp_path / "text.csv"
    text.write_text("eruptions_min,waiting_min\n3.6,79\n1.8,fifty\n")
    with pytest.raises(ValueError, match=r"text\.csv, line 3, column 'waiting_min': 'fifty' is "
                                         "not a number"):
        data.load_old_faithful(text)


def test_a_path_argument_of_the_wrong_type_or_empty_is_refused_naming_it(tmp_path, monkeypatch):
    """Before: pathlib's "expected str, bytes or os.PathLike object, not int"; an empty string
    silently meant the current folder."""
    with pytest.raises(TypeError, match=r"data_dir must be a path \(str or os.PathLike, or "
                                        r"None\), got 123 of type int"):
        data.load_mnist(123)
    with pytest.raises(TypeError, match="path must be a path"):
        data.load_old_faithful(123)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="data_dir must not be empty"):
        data.load_mnist("")
