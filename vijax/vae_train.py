"""Train and evaluate a VAE on MNIST or the 8x8 digits: the logic behind ``experiments/vae.py``.

Flax-examples style: :class:`Config` says what to run, :func:`train_and_evaluate` runs it in a
work directory, and the command-line entry point only turns flags into a :class:`Config`.
Every option is a value or a small frozen dataclass (no option strings); the objectives and
gradient estimators are :mod:`vijax.vae`'s and :mod:`vijax.elbo`'s own classes.

What :func:`train_and_evaluate` writes into ``workdir``:

* ``config.json`` -- the configuration (checked again on ``resume``);
* ``metrics.jsonl`` and ``metrics.csv`` -- one row per epoch (row 0 = the initialisation):
  ``train_objective`` (mean over the epoch's minibatches of the training bound: the ELBO, or
  the IWAE-K bound for :class:`vijax.vae.IWAE`; nats, higher is better), ``test_elbo`` and
  ``test_kl`` (analytic-KL ELBO and KL(q(z|x) || p(z)) on the binarized test set, nats),
  ``learning_rate``, ``epoch_time_s`` (training wall time, including compilation in the first
  epoch), ``epoch_cpu_time_s`` (CPU seconds of this process over all its threads during the
  epoch: on a shared machine a better measure of the work than wall time) and ``eval_time_s``;
  with ``Config.max_consecutive_skips`` also ``skipped_steps`` (training steps skipped for a
  non-finite gradient; ``train_objective`` is then the mean over the other steps);
  strict JSON, a non-finite value (row 0's ``train_objective``) written as ``null``;
* ``checkpoints/<epoch>/`` -- an orbax checkpoint after every epoch (the last
  ``keep_checkpoints`` kept) holding the :class:`vijax.vae.TrainState` (parameters, Adam state,
  step) and the epoch count; the training key is stored too, as a check;
* ``final_metrics.json`` -- the final evaluation (below);
* ``samples.png``, ``reconstructions.png``, ``training_curves.png`` and, when
  ``latent_dim == 2``, ``latent_2d.png``.

Reproducibility and resume: with ``key = jax.random.key(config.seed)``,
``init_key, train_key, eval_key = jax.random.split(key, 3)``; epoch ``e`` (0-based) trains with
``jax.random.fold_in(train_key, e)`` (shuffling and dynamic binarization inside
:func:`vijax.vae.make_train_epoch`). Resuming therefore needs no random-stream state: restoring
the parameters, optimizer state and epoch count from the last checkpoint and running the
remaining epochs gives bit-for-bit the parameters of an uninterrupted run.

Final evaluation on the test set (binarized once with a fixed seed, the same set every epoch and
every run): the test ELBO (analytic KL), the IWAE-k bounds for ``eval_iwae_ks``, the
importance-sampling estimate of log p(x) with ``eval_num_samples`` (5000, as in Burda, Grosse and
Salakhutdinov 2016, "Importance Weighted Autoencoders", section 5) samples from q(z|x) -- the
IWAE-5000 bound, reported as the test NLL = -log p(x) in nats -- and the number of active units
(ibid. section 5.2: Cov_x(E_q[z_u | x]) > 0.01).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import os
import pathlib
import sys
import threading
import time
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vijax import data as vdata
from vijax import distributed as vdist
from vijax import nn as vnn
from vijax import vae
from vijax._checks import (MAX_NUMPY_SEED, check_bool, check_int, check_int_sequence,
                           check_path, check_real)

__all__ = [
    "Mnist",
    "Digits",
    "DynamicBinarization",
    "FixedBinarization",
    "ConstantLR",
    "IwaeLR",
    "CosineLR",
    "Config",
    "quick_config",
    "config_to_dict",
    "build_model",
    "build_optimizer",
    "prepare_data",
    "train_and_evaluate",
    "restore_checkpoint",
    "read_metrics",
    "image_grid",
    "plot_image_grid",
    "plot_reconstructions",
    "plot_training_curves",
    "plot_latent_scatter",
    "TEST_BINARIZATION_SEED",
]

logger = logging.getLogger(__name__)

#: Seed of the fixed binarization of the test set used for every evaluation.
TEST_BINARIZATION_SEED = 20_161_121

_CONFIG_FILE = "config.json"
_METRICS_JSONL = "metrics.jsonl"
_METRICS_CSV = "metrics.csv"
_FINAL_METRICS = "final_metrics.json"
_CHECKPOINT_DIR = "checkpoints"
_SKIPPED_DIR = "skipped_checkpoints"  # unusable checkpoints set aside on resume
_METRIC_COLUMNS = ("epoch", "step", "learning_rate", "train_objective", "test_elbo", "test_kl",
                   "epoch_time_s", "epoch_cpu_time_s", "eval_time_s", "skipped_steps")


def _set(obj, name: str, value) -> None:
    """Normalise a field of a frozen dataclass in ``__post_init__``."""
    object.__setattr__(obj, name, value)


# ----------------------------------------------------------------------------------------------
# Data sets and binarization
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Mnist:
    """MNIST via :func:`vijax.data.load_mnist` (28x28 = 784 pixels).

    Attributes:
      data_dir: folder with the four IDX files (a ``str`` or ``os.PathLike``, stored as a
        ``str``), or None (then ``$VIJAX_DATA_DIR``, the repository's ``../shared/data/mnist``,
        or TensorFlow Datasets; see ``load_mnist``).
      num_train: use only the first ``num_train`` training images (None: all 60000).
      num_test: use only the first ``num_test`` test images (None: all 10000).

    Raises:
      TypeError: ``data_dir`` neither None, a str nor a path; ``num_train``/``num_test``
        neither None nor an int.
      ValueError: ``num_train`` outside [1, 60000] or ``num_test`` outside [1, 10000].
        (Whether the folder exists and holds MNIST is checked when the data are loaded.)
    """

    data_dir: str | None = None
    num_train: int | None = None
    num_test: int | None = None

    def __post_init__(self):
        if self.data_dir is not None:
            if not isinstance(self.data_dir, (str, os.PathLike)):
                raise TypeError(f"data_dir must be None or a folder path (str or os.PathLike), "
                                f"got {self.data_dir!r}")
            _set(self, "data_dir", os.fspath(self.data_dir))
        for name, size in (("num_train", vdata.MNIST_SIZES["train"]),
                           ("num_test", vdata.MNIST_SIZES["test"])):
            _set(self, name, check_int(getattr(self, name), name, minimum=1, maximum=size,
                                       optional=True))

    def num_train_examples(self) -> int:
        """The number of training images :meth:`load` returns."""
        return vdata.MNIST_SIZES["train"] if self.num_train is None else int(self.num_train)

    def load(self) -> vdata.Dataset:
        """The data set (:class:`vijax.data.Dataset`, images [n, 784] float32 in [0, 1])."""
        dataset = vdata.load_mnist(self.data_dir)
        return _subset(dataset, self.num_train, self.num_test)


@dataclasses.dataclass(frozen=True)
class Digits:
    """scikit-learn's 8x8 digits via :func:`vijax.data.load_digits` (64 pixels, bundled offline).

    Attributes:
      num_test: test images, an int in [10, 1787] (the rest of the 1797 train).

    Raises:
      TypeError: ``num_test`` is not an int. ValueError: it is outside [10, 1787].
    """

    num_test: int = 297

    def __post_init__(self):
        vdata.check_digits_split(self.num_test)
        _set(self, "num_test", int(self.num_test))

    def num_train_examples(self) -> int:
        """The number of training images :meth:`load` returns."""
        return vdata.DIGITS_NUM_EXAMPLES - int(self.num_test)

    def load(self) -> vdata.Dataset:
        return vdata.load_digits(num_test=self.num_test)


def _subset(dataset: vdata.Dataset, num_train: int | None, num_test: int | None) -> vdata.Dataset:
    for name, limit, n in (("num_train", num_train, len(dataset.train_labels)),
                           ("num_test", num_test, len(dataset.test_labels))):
        if limit is not None and limit > n:
            raise ValueError(f"{name}={limit} exceeds the {n} examples available")
    return vdata.Dataset(dataset.train_images[:num_train], dataset.train_labels[:num_train],
                         dataset.test_images[:num_test], dataset.test_labels[:num_test])


@dataclasses.dataclass(frozen=True)
class DynamicBinarization:
    """Draw every training pixel afresh from Bernoulli(intensity) at every step (Burda et al.
    2016, section 5), inside the jitted epoch."""


@dataclasses.dataclass(frozen=True)
class FixedBinarization:
    """Binarize the training set once, with :func:`vijax.data.fixed_binarize` and ``seed``.

    Raises:
      TypeError: ``seed`` is not an int. ValueError: it is outside [0, 2**32 - 1].
    """

    seed: int = 0

    def __post_init__(self):
        _set(self, "seed", check_int(self.seed, "seed", minimum=0, maximum=MAX_NUMPY_SEED))


# ----------------------------------------------------------------------------------------------
# Learning-rate schedules
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ConstantLR:
    """A constant learning rate."""

    depends_on_epochs = False

    def build(self, learning_rate: float, steps_per_epoch: int, epochs: int) -> optax.Schedule:
        del steps_per_epoch, epochs
        return optax.constant_schedule(learning_rate)


@dataclasses.dataclass(frozen=True)
class IwaeLR:
    """Burda et al. (2016, section 5)'s schedule: for i = 0, ..., num_stages - 1, 3^i epochs at
    ``learning_rate * 10^(-i / (num_stages - 1))``; 3280 epochs in all for 8 stages. A run with
    fewer epochs follows the beginning of the schedule; after the last stage the rate stays at
    its final value. Use it with Adam(beta1=0.9, beta2=0.999, eps=1e-4) and learning_rate 1e-3.

    Raises:
      TypeError: ``num_stages`` is not an int. ValueError: ``num_stages < 2``.
    """

    num_stages: int = 8
    depends_on_epochs = False

    def __post_init__(self):
        _set(self, "num_stages", check_int(self.num_stages, "num_stages", minimum=2))

    def stage_ends(self) -> np.ndarray:
        """Epoch at which each stage ends: ``[1, 4, 13, 40, 121, 364, 1093, 3280]`` for 8."""
        return np.cumsum(3 ** np.arange(self.num_stages))

    def build(self, learning_rate: float, steps_per_epoch: int, epochs: int) -> optax.Schedule:
        del epochs
        boundaries = jnp.asarray(self.stage_ends()[:-1] * steps_per_epoch, dtype=jnp.int32)
        last = self.num_stages - 1

        def schedule(step):
            stage = jnp.sum(jnp.asarray(step, jnp.int32) >= boundaries)
            return learning_rate * 10.0 ** (-stage.astype(jnp.float32) / last)

        return schedule


@dataclasses.dataclass(frozen=True)
class CosineLR:
    """Cosine decay from ``learning_rate`` to ``final_fraction * learning_rate`` over all epochs
    (``optax.cosine_decay_schedule``); it depends on ``Config.epochs``, which therefore cannot
    change on resume.

    Raises:
      TypeError: ``final_fraction`` is not a real number (e.g. a string). ValueError: it is
        outside [0, 1] (or NaN).
    """

    final_fraction: float = 0.1
    depends_on_epochs = True

    def __post_init__(self):
        _set(self, "final_fraction",
             check_real(self.final_fraction, "final_fraction", minimum=0.0, maximum=1.0))

    def build(self, learning_rate: float, steps_per_epoch: int, epochs: int) -> optax.Schedule:
        return optax.cosine_decay_schedule(learning_rate, epochs * steps_per_epoch,
                                           alpha=self.final_fraction)


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Config:
    """Everything that determines a run.

    The defaults are the recorded CPU run of docs/vae.md: the IWAE paper's one-stochastic-layer
    MNIST VAE (784-200-200-50, tanh, dynamic binarization, Adam with eps 1e-4, batch 100) trained
    for 200 epochs with the analytic-KL ELBO and a cosine learning-rate decay from 1e-3 to 1e-4.

    Attributes:
      dataset: :class:`Mnist` or :class:`Digits`.
      binarization: :class:`DynamicBinarization` or :class:`FixedBinarization` of the training
        images (the test set is always binarized once with ``TEST_BINARIZATION_SEED``).
      latent_dim: L (50).
      hidden_sizes: encoder hidden widths; the decoder uses them reversed ((200, 200)); tanh.
      objective: ``vijax.vae.ELBOAnalyticKL``, ``ELBOMonteCarlo`` or ``IWAE`` instance (number of
        samples and gradient estimator inside).
      epochs: total number of epochs (passes over the training set, last partial batch dropped).
      batch_size: examples per step (100).
      learning_rate: Adam's (peak) learning rate (1e-3).
      schedule: :class:`ConstantLR`, :class:`IwaeLR` or :class:`CosineLR` (default, to 1/10).
      adam_b1, adam_b2, adam_eps: Adam's constants (0.9, 0.999, 1e-4 as in the IWAE paper).
      seed: master seed (initialisation, shuffling/binarization, evaluation).
      eval_num_samples: samples k of the final importance-sampling estimate of log p(x) (5000).
      eval_num_test: estimate log p(x) on the first ``eval_num_test`` test images only (None: all);
        the ELBO, IWAE-k bounds and active units always use the whole test set.
      eval_iwae_ks: the k of the extra IWAE-k bounds in the final evaluation.
      eval_chunk_size: samples per chunk in the importance sampling (memory ~ chunk x batch x D).
      eval_batch_size: test images per evaluation batch.
      keep_checkpoints: how many of the latest per-epoch checkpoints to keep.
      max_consecutive_skips: None (default) or an int >= 1. With an int, a training step whose
        gradient is not finite (NaN or inf) is skipped, leaving the parameters and Adam's
        state as they were (``optax.apply_if_finite``), and counted in its epoch's
        ``skipped_steps`` metric; the run stops with a ``FloatingPointError`` (before that
        epoch's checkpoint) at the end of an epoch whose last ``max_consecutive_skips`` or more
        steps were all skipped. With None nothing is skipped and a non-finite objective stops
        the run at the end of its epoch.

    Integer fields accept Python or NumPy ints and real fields Python or NumPy real scalars;
    they are stored as Python ``int`` / ``float`` (and the sequences as tuples).

    Raises:
      TypeError: a field of the wrong type: ``dataset``, ``binarization``, ``schedule`` not one
        of the classes above, ``objective`` not an objective *instance*; an integer field
        (``latent_dim``, ``epochs``, ``batch_size``, ``seed``, ``eval_*``,
        ``keep_checkpoints``, ``max_consecutive_skips``) not an int; ``hidden_sizes`` or ``eval_iwae_ks`` not a tuple/list
        of ints (e.g. ``200``); ``learning_rate``, ``adam_b1``, ``adam_b2``, ``adam_eps`` not a
        real number (e.g. ``"0.9"`` or None). The message names the field.
      ValueError: a value out of range: integer fields < 1 (``seed`` outside
        [0, 2**32 - 1]: ``jax.random.key`` keeps only its low 32 bits); a repeated k in
        ``eval_iwae_ks``; ``learning_rate``
        or ``adam_eps`` not positive and finite; ``adam_b1``/``adam_b2`` outside [0, 1);
        ``batch_size`` larger than the data set's training images (1797 - ``num_test`` for
        :class:`Digits`, ``num_train`` or 60000 for :class:`Mnist`).
    """

    dataset: Mnist | Digits = Mnist()
    binarization: DynamicBinarization | FixedBinarization = DynamicBinarization()
    latent_dim: int = 50
    hidden_sizes: tuple[int, ...] = (200, 200)
    objective: vae.Objective = vae.ELBOAnalyticKL()
    epochs: int = 200
    batch_size: int = 100
    learning_rate: float = 1e-3
    schedule: ConstantLR | IwaeLR | CosineLR = CosineLR()
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    adam_eps: float = 1e-4
    seed: int = 0
    eval_num_samples: int = 5000
    eval_num_test: int | None = None
    eval_iwae_ks: tuple[int, ...] = (1, 50)
    eval_chunk_size: int = 100
    eval_batch_size: int = 100
    keep_checkpoints: int = 2
    max_consecutive_skips: int | None = None

    def __post_init__(self):
        if not isinstance(self.dataset, (Mnist, Digits)):
            raise TypeError(f"dataset must be Mnist(...) or Digits(...), got {self.dataset!r}")
        if not isinstance(self.binarization, (DynamicBinarization, FixedBinarization)):
            raise TypeError("binarization must be DynamicBinarization() or FixedBinarization(...),"
                            f" got {self.binarization!r}")
        vae._check_objective_type(self.objective)
        if not isinstance(self.schedule, (ConstantLR, IwaeLR, CosineLR)):
            raise TypeError(
                f"schedule must be ConstantLR, IwaeLR or CosineLR, got {self.schedule!r}")
        _set(self, "hidden_sizes", check_int_sequence(self.hidden_sizes, "hidden_sizes"))
        _set(self, "eval_iwae_ks", check_int_sequence(self.eval_iwae_ks, "eval_iwae_ks"))
        if len(set(self.eval_iwae_ks)) != len(self.eval_iwae_ks):
            raise ValueError(f"eval_iwae_ks must not repeat a k, got {self.eval_iwae_ks}")
        for name in ("latent_dim", "epochs", "batch_size", "eval_num_samples", "eval_chunk_size",
                     "eval_batch_size", "keep_checkpoints"):
            _set(self, name, check_int(getattr(self, name), name, minimum=1))
        _set(self, "eval_num_test",
             check_int(self.eval_num_test, "eval_num_test", minimum=1, optional=True))
        _set(self, "max_consecutive_skips", check_int(
            self.max_consecutive_skips, "max_consecutive_skips", minimum=1, optional=True))
        _set(self, "seed", check_int(self.seed, "seed", minimum=0, maximum=MAX_NUMPY_SEED))
        for name in ("learning_rate", "adam_eps"):
            _set(self, name, check_real(getattr(self, name), name, exclusive_minimum=0.0))
        for name in ("adam_b1", "adam_b2"):
            _set(self, name, check_real(getattr(self, name), name, minimum=0.0,
                                        exclusive_maximum=1.0))
        num_train = self.dataset.num_train_examples()
        if self.batch_size > num_train:
            raise ValueError(f"batch_size {self.batch_size} exceeds the {num_train} training "
                             f"images of {self.dataset!r}")


def quick_config(dataset: Mnist | Digits | None = None) -> Config:
    """A demo configuration that finishes in a few minutes on a 2-core CPU.

    MNIST (default): the IWAE paper's 784-200-200-50 network, 10 epochs of Adam (cosine decay
    from 1e-3 to 1e-4) on all 60000 training images, and a reduced final evaluation (log p(x)
    with k = 1000 on the first 1000 test images). ``Digits()``: the bundled 8x8 digits, a
    64-100-100-2 network (so the 2-D latent scatter is drawn), 100 epochs of batch 50, log p(x)
    with k = 1000 on all 297 test images.
    """
    if isinstance(dataset, Digits):
        return Config(dataset=dataset, latent_dim=2, hidden_sizes=(100, 100), epochs=100,
                      batch_size=50, eval_num_samples=1000)
    return Config(dataset=dataset if dataset is not None else Mnist(), epochs=10,
                  eval_num_samples=1000, eval_num_test=1000)


def config_to_dict(config: Any) -> Any:
    """JSON-ready form of a :class:`Config` (dataclasses become dicts with a ``"type"`` key)."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        out = {"type": type(config).__name__}
        for field in dataclasses.fields(config):
            out[field.name] = config_to_dict(getattr(config, field.name))
        return out
    if isinstance(config, (tuple, list)):
        return [config_to_dict(v) for v in config]
    if isinstance(config, (bool, int, float, str)) or config is None:
        return config
    if isinstance(config, (np.ndarray, jax.Array, np.generic)):
        return np.asarray(config).tolist()
    return repr(config)


def _config_types() -> dict[str, type]:
    """The dataclasses a :class:`Config` may hold, by the names ``config_to_dict`` records."""
    from vijax import elbo as velbo  # noqa: PLC0415 - vae imports it already; kept local

    classes = (Config, Mnist, Digits, DynamicBinarization, FixedBinarization, ConstantLR,
               IwaeLR, CosineLR, vae.ELBOAnalyticKL, vae.ELBOMonteCarlo, vae.IWAE,
               velbo.Pathwise, velbo.ScoreFunction, velbo.LeaveOneOut,
               velbo.StickingTheLanding, velbo.DReG)
    return {cls.__name__: cls for cls in classes}


def config_from_dict(saved: dict) -> Config:
    """The :class:`Config` that :func:`config_to_dict` recorded (a run's ``config.json``).

    Args:
      saved: the dict (``json.load`` of ``config.json``); lists become tuples.

    Returns:
      the :class:`Config`, checked as if built by hand (its ``__post_init__`` runs).

    Raises:
      TypeError: ``saved`` is not a dict with ``"type": "Config"``.
      ValueError: a nested ``"type"`` that is not one of the configuration classes, or a
        field the class does not have (a file from another version of vijax).
    """
    if not isinstance(saved, dict) or saved.get("type") != "Config":
        raise TypeError(f"saved must be the dict of a Config (config.json, with \"type\": "
                        f"\"Config\"), got {type(saved).__name__}")
    types = _config_types()

    def build(value, where):
        if isinstance(value, list):
            return tuple(build(v, f"{where}[{i}]") for i, v in enumerate(value))
        if not isinstance(value, dict):
            return value
        name = value.get("type")
        if name not in types:
            raise ValueError(f"{where}: unknown configuration type {name!r} (known: "
                             f"{', '.join(sorted(types))})")
        cls = types[name]
        fields = {f.name for f in dataclasses.fields(cls)}
        extra = sorted(set(value) - fields - {"type"})
        if extra:
            raise ValueError(f"{where}: {name} has no field(s) {', '.join(extra)}")
        return cls(**{k: build(v, f"{where}.{k}") for k, v in value.items() if k != "type"})

    return build(saved, "config")


def load_config(workdir: str | os.PathLike) -> Config:
    """The :class:`Config` a run in ``workdir`` was started with (its ``config.json``).

    Raises:
      FileNotFoundError: ``workdir`` has no ``config.json``.
      ValueError: the file is not valid JSON, or as :func:`config_from_dict`.
    """
    path = check_path(workdir, "workdir") / _CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {_CONFIG_FILE} in {path.parent} (not a run's work directory)")
    return config_from_dict(_read_json(path))


# Fields that do not change the training trajectory, free to differ when resuming.
_EVALUATION_FIELDS = frozenset({"eval_num_samples", "eval_num_test", "eval_iwae_ks",
                                "eval_chunk_size", "eval_batch_size", "keep_checkpoints"})


# Data-set fields that say only where the data are (the loader checks the IDX headers).
_DATASET_LOCATION_FIELDS = {"Mnist": ("data_dir",)}


def _config_differences(saved: dict, current: dict, *, allow_epochs: bool) -> list[str]:
    """Fields that differ between two ``config_to_dict`` outputs and matter for training
    (the MNIST folder may move between sessions)."""
    free = _EVALUATION_FIELDS | ({"epochs"} if allow_epochs else set())

    def without_location(config_dict):
        dataset = config_dict.get("dataset")
        if not isinstance(dataset, dict):
            return config_dict
        location = _DATASET_LOCATION_FIELDS.get(dataset.get("type"), ())
        return {**config_dict,
                "dataset": {k: v for k, v in dataset.items() if k not in location}}

    saved, current = without_location(saved), without_location(current)
    keys = sorted(set(saved) | set(current))
    return [k for k in keys if saved.get(k) != current.get(k) and k not in free]


# ----------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------


def build_model(config: Config, train_images: np.ndarray) -> vnn.VAE:
    """The Gaussian-encoder / Bernoulli-decoder VAE of ``config`` (tanh MLPs), with the
    decoder's output bias initialised at the logit of the training pixel means (IWAE paper,
    appendix C)."""
    return vnn.iwae_mnist_vae(
        np.asarray(vnn.pixel_mean_logit(train_images)),
        hidden_sizes=config.hidden_sizes,
        latent_dim=config.latent_dim,
        data_dim=train_images.shape[-1],
    )


def build_optimizer(config: Config, steps_per_epoch: int) -> tuple[optax.GradientTransformation,
                                                                    optax.Schedule]:
    """Adam with the configured constants and learning-rate schedule, wrapped in
    ``optax.apply_if_finite`` when ``config.max_consecutive_skips`` is set; returns (optimizer,
    schedule), the schedule mapping the update count to the learning rate."""
    schedule = config.schedule.build(config.learning_rate, steps_per_epoch, config.epochs)
    optimizer = optax.adam(schedule, b1=config.adam_b1, b2=config.adam_b2, eps=config.adam_eps)
    if config.max_consecutive_skips is not None:
        # skips (and counts) updates whose gradient is not finite; after more than
        # max_consecutive_skips in a row it would apply them: _run stops the run before
        optimizer = optax.apply_if_finite(optimizer, config.max_consecutive_skips)
    return optimizer, schedule


def prepare_data(config: Config) -> tuple[vdata.Dataset, np.ndarray, np.ndarray]:
    """Load the data set and binarize it as configured.

    Returns:
      ``(dataset, train_images, test_binary)``: the raw :class:`vijax.data.Dataset`; the
      training images to feed the epochs ([n, D] float32; intensities for dynamic
      binarization, 0/1 for fixed); the test images binarized once with
      ``TEST_BINARIZATION_SEED`` ([m, D] float32 0/1).

    Raises:
      ValueError: the training set is smaller than one batch, or the images are invalid.
    """
    dataset = config.dataset.load()
    vdata.validate_images(dataset.train_images, name="train_images")
    vdata.validate_images(dataset.test_images, name="test_images",
                          num_features=dataset.train_images.shape[1])
    if dataset.train_images.shape[0] < config.batch_size:
        raise ValueError(f"batch_size {config.batch_size} exceeds the "
                         f"{dataset.train_images.shape[0]} training images")
    if isinstance(config.binarization, FixedBinarization):
        train_images = vdata.fixed_binarize(dataset.train_images, seed=config.binarization.seed)
    else:
        train_images = dataset.train_images
    test_binary = vdata.fixed_binarize(dataset.test_images, seed=TEST_BINARIZATION_SEED)
    return dataset, train_images, test_binary


def _init_state(init_key: jax.Array, model, optimizer, data_dim: int,
                sharding=None) -> vae.TrainState:
    """:func:`vijax.vae.init_train_state` compiled as one program (eagerly, Flax's ``init``
    dispatches and compiles every operation separately); placed with ``sharding`` (e.g.
    replicated over a mesh of several processes) when given."""
    return jax.jit(lambda key: vae.init_train_state(key, model, optimizer, data_dim),
                   out_shardings=sharding)(init_key)


def _keys(seed: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    init_key, train_key, eval_key = jax.random.split(jax.random.key(seed), 3)
    return init_key, train_key, eval_key


# ----------------------------------------------------------------------------------------------
# Checkpoints and metrics files
# ----------------------------------------------------------------------------------------------


def _checkpoint_manager(workdir: pathlib.Path, keep: int, *, create: bool = True):
    import orbax.checkpoint as ocp  # noqa: PLC0415 - heavy import, only when training

    # Synchronous saves: the next epoch donates the state's buffers (donate_argnums=0), so the
    # checkpoint must be written before it starts (a few MB; cheap next to an epoch).
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create,
                                           enable_async_checkpointing=False)
    return ocp.CheckpointManager(workdir.resolve() / _CHECKPOINT_DIR, options=options)


def _existing_checkpoint_manager(workdir: pathlib.Path, keep: int):
    """A manager over ``workdir/checkpoints`` if that folder exists, else None; creates
    nothing (for reading: the latest epoch, a restore)."""
    if not (workdir / _CHECKPOINT_DIR).is_dir():
        return None
    return _checkpoint_manager(workdir, keep, create=False)


def _latest_checkpoint(workdir: pathlib.Path, keep: int) -> int | None:
    """The latest checkpointed epoch in ``workdir``, or None; creates nothing."""
    manager = _existing_checkpoint_manager(workdir, keep)
    if manager is None:
        return None
    try:
        return manager.latest_step()
    finally:
        manager.close()


def _checkpoint_item(state: vae.TrainState, epoch: int, train_key: jax.Array) -> dict:
    key_data = jax.random.key_data(train_key)
    if vdist.is_multi_process():  # a host value, not one process's single-device array
        key_data = np.asarray(key_data)
    return {"state": state, "epoch": int(epoch), "train_key_data": key_data}


def _restore(manager, template: dict, step: int | None = None) -> dict:
    import orbax.checkpoint as ocp  # noqa: PLC0415

    step = manager.latest_step() if step is None else step
    here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def abstract_leaf(leaf):
        if isinstance(leaf, np.ndarray):  # a host value (several processes): read as NumPy
            return leaf
        leaf = ocp.utils.to_shape_dtype_struct(leaf)
        if isinstance(leaf, jax.ShapeDtypeStruct) and leaf.sharding is None:
            # onto this process's first device, whatever devices the checkpoint was saved
            # from (orbax refuses a topology change without a target sharding)
            leaf = jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=here)
        return leaf

    abstract = jax.tree.map(abstract_leaf, template)
    return manager.restore(step, args=ocp.args.StandardRestore(abstract))


def restore_checkpoint(workdir: str | os.PathLike, config: Config,
                       *, epoch: int | None = None) -> tuple[vae.TrainState, int]:
    """Load a run's checkpoint: ``(TrainState, number of epochs completed)``.

    The checkpoints are looked for first: a ``workdir`` without one raises before any data
    are loaded, and nothing is created in it. Then the data set is loaded (not binarized) for
    the model's shapes.

    Args:
      workdir: the run's work directory.
      config: the :class:`Config` the run used (it fixes the state's structure).
      epoch: which checkpoint, an int (None: the latest kept; only the last
        ``keep_checkpoints`` epochs are kept).

    Raises:
      TypeError: ``config`` is not a :class:`Config`; ``epoch`` neither None nor an int.
      ValueError: ``epoch`` < 0; ``config`` differs from the run's saved ``config.json`` in
        a field that shapes training (the message lists them; the evaluation settings,
        ``epochs`` and the MNIST ``data_dir`` may differ).
      FileNotFoundError: no checkpoint in ``workdir``, or none for ``epoch`` (the message
        lists the epochs kept); the data set cannot be found (see
        :func:`vijax.data.load_mnist`).
    """
    if not isinstance(config, Config):
        raise TypeError(f"config must be a vijax.vae_train.Config, got {type(config).__name__}")
    check_int(epoch, "epoch", minimum=0, optional=True)
    workdir = check_path(workdir, "workdir")
    manager = _existing_checkpoint_manager(workdir, config.keep_checkpoints)
    if manager is None:
        raise FileNotFoundError(f"no checkpoint in {workdir / _CHECKPOINT_DIR} (no such folder)")
    try:
        if manager.latest_step() is None:
            raise FileNotFoundError(f"no checkpoint in {workdir / _CHECKPOINT_DIR}")
        saved_path = workdir / _CONFIG_FILE
        if saved_path.exists():  # the run's own record of its configuration
            differences = _config_differences(_read_json(saved_path),
                                              config_to_dict(config), allow_epochs=True)
            if differences:
                raise ValueError(
                    f"config differs from the one {workdir} was trained with (its "
                    f"{_CONFIG_FILE}) in {', '.join(differences)}; pass the Config that run "
                    "used")
        kept = sorted(manager.all_steps())
        if epoch is not None and epoch not in kept:
            raise FileNotFoundError(f"no checkpoint for epoch {epoch!r} in "
                                    f"{workdir / _CHECKPOINT_DIR}; epochs kept: {kept}")
        train_images = config.dataset.load().train_images  # shapes only: no binarization
        model = build_model(config, train_images)
        optimizer, _ = build_optimizer(config, train_images.shape[0] // config.batch_size)
        init_key, train_key, _ = _keys(config.seed)
        # Shapes and dtypes suffice as the restore target: no initialisation is run or compiled.
        state_shapes = jax.eval_shape(
            lambda key: vae.init_train_state(key, model, optimizer, train_images.shape[1]),
            init_key)
        item = _restore(manager, _checkpoint_item(state_shapes, 0, train_key), epoch)
    finally:
        manager.close()
    return item["state"], int(item["epoch"])


def read_metrics(workdir: str | os.PathLike) -> list[dict]:
    """The per-epoch rows of ``workdir/metrics.jsonl`` (row with epoch 0 = initialisation);
    a ``null`` in the file (a value that is not a finite number, such as row 0's
    ``train_objective``) is read back as ``nan``.

    Raises:
      ValueError: a line that is not a JSON object with an ``epoch`` (a truncated or edited
        file); the message names the file and the line.
    """
    return _read_metrics(check_path(workdir, "workdir"), truncated_last_line_ok=False)


def _read_metrics(workdir: pathlib.Path, *, truncated_last_line_ok: bool) -> list[dict]:
    """The rows of ``workdir/metrics.jsonl`` ([] without the file). With
    ``truncated_last_line_ok`` an unreadable *last* line (a write cut short) is dropped with a
    warning; any other unreadable line is a ValueError naming the file and the line."""
    path = workdir / _METRICS_JSONL
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("epoch"), int):
                raise ValueError("not a JSON object with an integer 'epoch'")
        except ValueError as err:  # json.JSONDecodeError is a ValueError
            if truncated_last_line_ok and i == last:
                logger.warning("%s: line %d is unreadable (%s), probably cut short; it is "
                               "dropped", path, i + 1, err)
                break
            raise ValueError(f"{path}, line {i + 1}: unreadable metrics row ({err})") from None
        rows.append({k: float("nan") if v is None else v for k, v in row.items()})
    return rows


def _read_json(path: pathlib.Path) -> Any:
    """``path``'s JSON; ValueError naming the file if it is not valid JSON (truncated, empty)."""
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); the file is corrupt or "
                         "truncated") from None


def _to_json(obj: Any, **kwargs) -> str:
    """Strict JSON: floats that are not finite (NaN, inf) become ``null``, which every JSON
    reader accepts (Python's ``json`` would write the non-standard ``NaN``)."""
    def finite(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: finite(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [finite(v) for v in value]
        return value
    return json.dumps(finite(obj), allow_nan=False, **kwargs)


def _write_metrics(workdir: pathlib.Path, rows: list[dict]) -> None:
    """Rewrite metrics.jsonl and metrics.csv from ``rows`` (atomically, via a temporary file)."""
    jsonl = workdir / _METRICS_JSONL
    tmp = jsonl.with_suffix(".jsonl.tmp")
    with tmp.open("w") as f:
        for row in rows:
            f.write(_to_json(row) + "\n")
    tmp.replace(jsonl)
    tmp = workdir / (_METRICS_CSV + ".tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=_METRIC_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(workdir / _METRICS_CSV)


def _write_json(path: pathlib.Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(_to_json(obj, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


# ----------------------------------------------------------------------------------------------
# Training and evaluation
# ----------------------------------------------------------------------------------------------


def _progress_enabled(progress: bool | None) -> bool:
    if progress is not None:
        return bool(progress)
    return sys.stderr.isatty()


class _StepsBar:
    """The per-epoch tqdm bar over train steps, moved from inside the jitted epoch.

    :meth:`report` is the epoch's ``progress_fn`` (:func:`vijax.vae.make_train_epoch`): it
    runs on an XLA runtime thread with the global step count, possibly repeated or out of
    order, so it only ever moves the current bar forward, and ignores steps outside the
    current epoch (a late call from the previous one).
    """

    def __init__(self, steps_per_epoch: int, epochs: int):
        self.steps_per_epoch, self.epochs = steps_per_epoch, epochs
        self.bar, self.first_step = None, 0
        self.lock = threading.Lock()

    def start(self, epoch: int, first_step: int) -> None:
        from tqdm.auto import tqdm  # noqa: PLC0415

        with self.lock:
            self.first_step = first_step
            self.bar = tqdm(total=self.steps_per_epoch, desc=f"epoch {epoch + 1}/{self.epochs}",
                            unit="step", leave=False, dynamic_ncols=True)

    def report(self, step, refresh: bool = False) -> None:
        with self.lock:
            done = int(step) - self.first_step
            if self.bar is not None and self.bar.n < done <= self.steps_per_epoch:
                self.bar.update(done - self.bar.n)
            if refresh and self.bar is not None:
                self.bar.refresh()

    def finish(self) -> None:
        with self.lock:
            if self.bar is not None:
                self.bar.close()
            self.bar = None


def train_and_evaluate(config: Config, workdir: str | os.PathLike, *, resume: bool = False,
                       progress: bool | None = None, data_parallel: bool | None = None) -> dict:
    """Train the VAE of ``config`` with per-epoch checkpoints, then evaluate it on the test set.

    Order of work, so that bad input leaves ``workdir`` as it was: (1) the checks on
    ``workdir``'s existing checkpoints and ``config.json`` (read only); (2) loading and
    checking the data, building the model, optimizer and device mesh; only then (3) creating
    ``workdir`` and ``workdir/checkpoints/`` and writing ``config.json``, the initial
    ``metrics.jsonl``/``metrics.csv`` row (epoch 0; on resume, the rows up to the checkpoint),
    then after every epoch its metrics row and its checkpoint, and at the end
    ``final_metrics.json`` and the PNG figures (see the module docstring). An error raised in
    (1) or (2) writes nothing; a run stopped during (3) leaves the checkpoints of the finished
    epochs, from which ``resume=True`` continues.

    Args:
      config: the run (:class:`Config`).
      workdir: output folder (created). See the module docstring for its contents.
      resume: continue from the latest checkpoint in ``workdir`` (which must have been written
        with the same configuration, except that the ``eval_*`` fields,
        ``keep_checkpoints`` and an MNIST ``data_dir`` may differ, and ``epochs`` too when the
        schedule does not depend on it); without a checkpoint, start from scratch. With ``resume=False`` a
        ``workdir`` that already holds checkpoints is refused rather than overwritten. A
        checkpoint that cannot be restored, or whose epochs lack metrics rows, is skipped with
        a warning: the run resumes from the newest usable one, truncates the metrics to its
        epoch and moves the skipped ones to ``workdir/skipped_checkpoints/``. An unreadable
        last line of ``metrics.jsonl`` (cut short) is dropped with a warning.
      progress: show tqdm bars, one over epochs and one over each epoch's steps (None:
        only when stderr is a terminal).
      data_parallel: split every batch over all local devices (parameters replicated; see
        :func:`vijax.vae.make_data_parallel_train_step`). None: when there is more than one local
        device and ``batch_size`` is divisible by their number. The result equals the
        one-device run up to float summation order. With several JAX processes
        (``jax.distributed.initialize``, :func:`vijax.distributed.initialize`) every batch is
        always split over the devices of all processes (each process places only its share,
        :func:`vijax.distributed.epoch_batches`); every process must call this function with
        the same arguments; process 0 alone writes the files other than the checkpoints
        (orbax writes those once, all processes taking part), and every process computes the
        evaluations on the replicated test set (docs/vae.md, "Several processes").

    Returns:
      The final metrics (also written to ``final_metrics.json``), all in nats where they are
      log-probabilities: ``test_elbo`` (analytic-KL ELBO, mean over the test set; the
      ELBO itself, not its negative, like the IWAE bounds and ``test_log_px``),
      ``test_kl``, ``test_iwae_<k>`` for ``eval_iwae_ks``, ``test_log_px`` (importance-sampling
      log p(x), k = ``eval_num_samples``, mean over ``eval_num_test`` images), ``test_nll`` =
      ``-test_log_px`` and its standard error over images ``test_nll_se``, ``active_units``,
      ``epochs``, ``steps``, ``train_time_s`` and ``train_cpu_time_s`` (sums of the epochs'
      wall and CPU times across resumed sessions),
      ``final_eval_time_s``, ``num_params``.

    Raises:
      TypeError: ``config`` is not a :class:`Config` (e.g. a dict); ``workdir`` not a ``str``
        or ``os.PathLike`` (e.g. None); ``resume`` not a bool; ``progress`` or
        ``data_parallel`` neither None nor a bool.
      FileExistsError: ``workdir`` has checkpoints and ``resume`` is False.
      ValueError: ``workdir`` an empty string (it would mean the current folder; pass
        ``"."``); on resume, no usable checkpoint (the message says why each was skipped), an
        unreadable ``config.json`` or ``metrics.jsonl`` line before the last (naming the file);
        ``resume`` with a configuration that differs from the saved one (the message
        lists the fields), or a checkpoint past ``config.epochs``; invalid images or a
        training set smaller than ``batch_size`` (:func:`prepare_data`); ``data_parallel=True``
        with ``batch_size`` not divisible by the number of local devices; with several
        processes, ``data_parallel=False`` or a ``batch_size`` not divisible by the total
        device count.
      FileNotFoundError: the data set cannot be found (see :func:`vijax.data.load_mnist`).
      FloatingPointError: the training or test objective became NaN/inf (diverged); the
        checkpoints of the epochs before stay.
    """
    if not isinstance(config, Config):
        raise TypeError(f"config must be a vijax.vae_train.Config, got {type(config).__name__}")
    check_bool(resume, "resume")
    check_bool(progress, "progress", optional=True)
    check_bool(data_parallel, "data_parallel", optional=True)
    workdir = check_path(workdir, "workdir")
    config_dict = config_to_dict(config)
    # (1) read-only checks of an existing run
    latest = _latest_checkpoint(workdir, config.keep_checkpoints)
    if latest is not None and not resume:
        raise FileExistsError(
            f"{workdir} already holds checkpoints (latest: epoch {latest}); pass resume=True "
            "(--resume) to continue that run, or choose another work directory")
    if latest is not None:
        saved = _read_json(workdir / _CONFIG_FILE)
        differences = _config_differences(
            saved, config_dict, allow_epochs=not config.schedule.depends_on_epochs)
        if differences:
            raise ValueError(
                f"cannot resume {workdir}: the configuration differs from the saved one in "
                f"{', '.join(differences)} (only 'epochs', except with CosineLR, and the "
                "evaluation settings and the MNIST data_dir may change)")
        if latest > config.epochs:
            raise ValueError(f"the checkpoint in {workdir} is at epoch {latest}, past "
                             f"config.epochs = {config.epochs}")
    # (2) data, model, optimizer, mesh: the remaining input errors, before any write; on resume
    # the newest intact checkpoint and its metrics rows (read only)
    setup = _setup(config, data_parallel)
    resume_point = None if latest is None else _resume_point(config, workdir, setup)
    # (3) the run writes (files by process 0 only, once every process has read what it needs)
    vdist.sync("vijax.vae_train: read-only checks done")
    main = vdist.is_main_process()
    if main:
        workdir.mkdir(parents=True, exist_ok=True)
        if resume_point is not None:
            _set_aside(workdir, resume_point.skipped)
    vdist.sync("vijax.vae_train: workdir ready")
    manager = _checkpoint_manager(workdir, config.keep_checkpoints)
    try:
        if main:
            _write_json(workdir / _CONFIG_FILE, config_dict)
        return _run(config, workdir, manager, setup, resume_point=resume_point,
                    progress=progress)
    finally:
        manager.close()


class _ResumePoint(NamedTuple):
    item: dict  # the restored checkpoint: {"state", "epoch", "train_key_data"}
    rows: list[dict]  # metrics rows of epochs 0..item["epoch"]
    skipped: list[int]  # newer checkpointed epochs that could not be used


def _resume_point(config: Config, workdir: pathlib.Path, setup: "_Setup") -> _ResumePoint:
    """The newest checkpoint of ``workdir`` that can be restored and has metrics rows for every
    epoch up to its own; newer ones are skipped with a warning saying why. Reads only.

    Raises:
      ValueError: no checkpoint is usable (the message lists why each was skipped), or a
        metrics line other than the last is unreadable (naming the file and line).
    """
    rows = _read_metrics(workdir, truncated_last_line_ok=True)
    model, optimizer = setup.model, setup.optimizer
    init_key, train_key, _ = _keys(config.seed)
    data_dim = setup.train_images.shape[1]
    state_shapes = jax.eval_shape(
        lambda key: vae.init_train_state(key, model, optimizer, data_dim), init_key)
    if vdist.is_multi_process():  # restore straight onto every process's devices
        sharding = vdist.replicated(setup.mesh)
        state_shapes = jax.tree.map(
            lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), state_shapes)
    template = _checkpoint_item(state_shapes, 0, train_key)
    epochs_with_rows = [row["epoch"] for row in rows]
    manager = _existing_checkpoint_manager(workdir, config.keep_checkpoints)
    reasons = []
    try:
        for step in sorted(manager.all_steps(), reverse=True):
            where = workdir / _CHECKPOINT_DIR / str(step)
            if epochs_with_rows[:step + 1] != list(range(step + 1)):
                reason = (f"checkpoint {where} skipped: {workdir / _METRICS_JSONL} lacks the "
                          f"rows of epochs 0..{step} (it has {epochs_with_rows})")
            else:
                try:
                    item = _restore(manager, template, step)
                except Exception as err:  # noqa: BLE001 - orbax/TensorStore raise many kinds
                    first_line = (str(err).strip().splitlines() or [""])[0][:300]
                    reason = (f"checkpoint {where} skipped: it cannot be read "
                              f"({type(err).__name__}: {first_line})")
                else:
                    if reasons:
                        logger.warning("resuming %s from epoch %d; its metrics are truncated to "
                                       "that epoch and the newer checkpoints are set aside in "
                                       "%s", workdir, step, workdir / _SKIPPED_DIR)
                    return _ResumePoint(item, rows[:step + 1], [s for s, _ in reasons])
            logger.warning("%s", reason)
            reasons.append((step, reason))
    finally:
        manager.close()
    raise ValueError(f"cannot resume {workdir}: no usable checkpoint ("
                     + "; ".join(r for _, r in reasons) + "); start afresh in another work "
                     "directory")


def _set_aside(workdir: pathlib.Path, epochs: Sequence[int]) -> None:
    """Move the unusable checkpoints ``workdir/checkpoints/<epoch>`` to
    ``workdir/skipped_checkpoints/<epoch>[-n]``, so that the resumed run can write those epochs
    again (and the files stay for inspection)."""
    for epoch in epochs:
        source = workdir / _CHECKPOINT_DIR / str(epoch)
        if not source.exists():
            continue
        target = workdir / _SKIPPED_DIR / str(epoch)
        n = 1
        while target.exists():
            target, n = workdir / _SKIPPED_DIR / f"{epoch}-{n}", n + 1
        target.parent.mkdir(exist_ok=True)
        source.rename(target)


def _data_parallel_mesh(config: Config, data_parallel: bool | None):
    """A 1-D device mesh for data parallelism, or None for one device (see train_and_evaluate);
    with several JAX processes, always the mesh over all their devices."""
    if vdist.is_multi_process():
        num_devices = jax.device_count()
        if data_parallel is False:
            raise ValueError(f"data_parallel=False with {jax.process_count()} JAX processes: a "
                             "multi-process run splits every batch over all their devices")
        if config.batch_size % num_devices:
            raise ValueError(f"batch_size ({config.batch_size}) must be divisible by the "
                             f"{num_devices} devices of the {jax.process_count()} processes")
        return vdist.global_mesh()
    num_devices = jax.local_device_count()
    if data_parallel is None:
        data_parallel = num_devices > 1 and config.batch_size % num_devices == 0
        if num_devices > 1 and not data_parallel:
            logger.warning("batch_size %d is not divisible by the %d local devices: training "
                           "on one device", config.batch_size, num_devices)
    if not data_parallel:
        return None
    if config.batch_size % num_devices:
        raise ValueError(f"data_parallel needs batch_size ({config.batch_size}) divisible by "
                         f"the {num_devices} local devices")
    return vae.data_parallel_mesh()


class _Setup(NamedTuple):
    """What a run needs besides its work directory, built before anything is written."""

    dataset: vdata.Dataset  # raw splits (test labels for the latent plot)
    train_images: np.ndarray  # [num_train, D] float32: intensities, or 0/1 for fixed
    test_binary: np.ndarray  # [num_test, D] float32 0/1
    model: vnn.VAE
    optimizer: optax.GradientTransformation
    schedule: optax.Schedule
    mesh: Any  # jax.sharding.Mesh or None


def _setup(config: Config, data_parallel: bool | None) -> _Setup:
    """Load and check the data, build the model, optimizer and mesh (may raise; writes
    nothing)."""
    dataset, train_images, test_binary = prepare_data(config)
    steps_per_epoch = train_images.shape[0] // config.batch_size
    model = build_model(config, dataset.train_images)
    optimizer, schedule = build_optimizer(config, steps_per_epoch)
    mesh = _data_parallel_mesh(config, data_parallel)
    return _Setup(dataset, train_images, test_binary, model, optimizer, schedule, mesh)


def _run(config: Config, workdir: pathlib.Path, manager, setup: _Setup, *,
         resume_point: _ResumePoint | None, progress: bool | None) -> dict:
    import orbax.checkpoint as ocp  # noqa: PLC0415
    from tqdm.auto import tqdm  # noqa: PLC0415

    dataset, train_images, test_binary, model, optimizer, schedule, mesh = setup
    num_train, data_dim = train_images.shape
    steps_per_epoch = num_train // config.batch_size
    init_key, train_key, eval_key = _keys(config.seed)
    place = jax.device_put if mesh is None else (lambda tree: vae.replicate(tree, mesh))
    multi_process, main = vdist.is_multi_process(), vdist.is_main_process()
    binarize = isinstance(config.binarization, DynamicBinarization)

    show_progress = _progress_enabled(progress) and main
    # several processes: no per-step callback (every process must run the same program)
    steps_bar = (_StepsBar(steps_per_epoch, config.epochs)
                 if show_progress and not multi_process else None)
    if multi_process:
        # each process holds its share of every batch of the epoch (vdist.epoch_batches)
        batched_epoch = jax.jit(
            vdist.make_train_epoch_from_batches(model, optimizer, config.objective,
                                                binarize=binarize, mesh=mesh),
            donate_argnums=0, static_argnums=3)

        def train_epoch(state, images, rng_key):
            batches = vdist.epoch_batches(images, rng_key, batch_size=config.batch_size,
                                          mesh=mesh)
            return batched_epoch(state, batches, rng_key, num_train)
    else:
        train_epoch = jax.jit(
            vae.make_train_epoch(model, optimizer, config.objective,
                                 batch_size=config.batch_size, binarize=binarize,
                                 mesh=mesh, progress_fn=steps_bar and steps_bar.report),
            donate_argnums=0)
    eval_batch = min(config.eval_batch_size, test_binary.shape[0])

    @jax.jit
    def test_elbo_fn(params, rng_key, x):
        out = vae.evaluate_bounds(rng_key, params, model, x, num_samples=(),
                                  batch_size=eval_batch)
        return jnp.mean(out["elbo"]), jnp.mean(out["kl"])

    # several processes: the training images stay on the host (epoch_batches reads them)
    train_device = train_images if multi_process else place(train_images)
    test_device = place(test_binary)

    def evaluate_epoch(params) -> dict:
        start = time.perf_counter()
        elbo, kl = jax.device_get(test_elbo_fn(params, eval_key, test_device))
        return {"test_elbo": float(elbo), "test_kl": float(kl),
                "eval_time_s": time.perf_counter() - start}

    if resume_point is not None:
        item = resume_point.item
        if not np.array_equal(np.asarray(item["train_key_data"]),
                              np.asarray(jax.random.key_data(train_key))):
            raise ValueError("the checkpoint's training key does not match config.seed")
        state, start_epoch = place(item["state"]), int(item["epoch"])
        rows = resume_point.rows
        logger.info("resumed %s at epoch %d (step %d)", workdir, start_epoch, int(state.step))
    else:
        state = _init_state(init_key, model, optimizer, data_dim,
                            sharding=vdist.replicated(mesh) if multi_process else None)
        state = state if multi_process else place(state)
        start_epoch = 0
        row = {"epoch": 0, "step": 0, "learning_rate": float(schedule(0)),
               "train_objective": float("nan"), "epoch_time_s": 0.0, "epoch_cpu_time_s": 0.0}
        row.update(evaluate_epoch(state.params))
        rows = [row]
    if main:
        _write_metrics(workdir, rows)

    bar = tqdm(total=config.epochs, initial=start_epoch, desc="epochs", unit="epoch",
               disable=not show_progress, dynamic_ncols=True)
    try:
        for epoch in range(start_epoch, config.epochs):
            if steps_bar is not None:
                steps_bar.start(epoch, epoch * steps_per_epoch)
            skipped_before = _skipped_steps(state)
            start, start_cpu = time.perf_counter(), time.process_time()
            state, metrics = train_epoch(state, train_device, jax.random.fold_in(train_key, epoch))
            objectives = vdist.host_copy(metrics["objective"])  # waits for the epoch
            epoch_time = time.perf_counter() - start
            if skipped_before is not None:  # skipped steps (non-finite objective) left out
                skipped = _skipped_steps(state) - skipped_before
                _check_consecutive_skips(state, config, epoch, skipped)
                objectives = objectives[np.isfinite(objectives)]
            train_objective = float(np.mean(objectives)) if objectives.size else float("nan")
            step = int(state.step)
            if steps_bar is not None:
                steps_bar.report(step, refresh=True)  # the epoch is done
                steps_bar.finish()
            row = {"epoch": epoch + 1, "step": step,
                   "learning_rate": float(schedule(step - 1)),
                   "train_objective": train_objective, "epoch_time_s": epoch_time,
                   "epoch_cpu_time_s": time.process_time() - start_cpu}
            if skipped_before is not None:
                row["skipped_steps"] = skipped
            row.update(evaluate_epoch(state.params))
            if not (math.isfinite(train_objective) and math.isfinite(row["test_elbo"])):
                raise FloatingPointError(
                    f"epoch {epoch + 1}: non-finite objective (train {train_objective}, test ELBO "
                    f"{row['test_elbo']}); lower the learning rate")
            rows.append(row)
            if main:
                _write_metrics(workdir, rows)
            manager.save(epoch + 1, args=ocp.args.StandardSave(
                _checkpoint_item(state, epoch + 1, train_key)))
            bar.set_postfix(train=f"{train_objective:.2f}", test_elbo=f"{row['test_elbo']:.2f}",
                            sec=f"{epoch_time:.1f}")
            bar.update(1)
            if not bar.disable:
                continue
            logger.info("epoch %d/%d: train objective %.3f, test ELBO %.3f nats, %.1f s",
                        epoch + 1, config.epochs, train_objective, row["test_elbo"], epoch_time)
        manager.wait_until_finished()
    finally:
        if steps_bar is not None:
            steps_bar.finish()
        bar.close()

    final = _final_evaluation(config, model, state, test_device, eval_key)
    final.update({
        "epochs": config.epochs,
        "steps": int(state.step),
        "train_time_s": float(sum(r["epoch_time_s"] for r in rows)),
        "train_cpu_time_s": float(sum(r.get("epoch_cpu_time_s", 0.0) for r in rows)),
        "num_params": int(sum(np.size(p) for p in jax.tree.leaves(state.params))),
        "final_train_objective": rows[-1]["train_objective"],
    })
    if main:
        _write_json(workdir / _FINAL_METRICS, final)
        # the figures from host copies, on this process's devices only
        if multi_process:
            params, test_images = jax.tree.map(vdist.host_copy, state.params), test_binary
        else:
            params, test_images = state.params, test_device
        _make_plots(config, model, params, dataset, test_images, rows, eval_key, workdir)
        logger.info("final: %s", final_summary(final))
    vdist.sync("vijax.vae_train: final files written")
    return final


def final_summary(final: dict) -> str:
    """One readable line for a run's final metrics (the full record is ``final_metrics.json``).

    Args:
      final: the dict :func:`train_and_evaluate` returns (``test_elbo``, ``test_nll``,
        ``test_nll_se``, ``eval_num_samples``, ``eval_num_test``, ``test_kl``,
        ``active_units``, ``active_unit_variances`` ``[latent_dim]``, ``test_iwae_<k>``,
        ``epochs``, ``train_time_s``, ``final_eval_time_s``).

    Returns:
      e.g. ``"test ELBO -93.11 nats, -log p(x) 88.52 ± 0.06 nats (IS, k = 5000, 10000
      images), IWAE-50 -89.90, KL 25.12 nats, 19/50 active units; 3280 epochs, train 1.2 h,
      final evaluation 3.1 min (all values in final_metrics.json)"``. The ELBO and the
      IWAE bounds are bounds on log p(x) (higher is better); the NLL is -log p(x).
    """
    def duration(seconds: float) -> str:
        if seconds < 120:
            return f"{seconds:.0f} s"
        return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"

    parts = [f"test ELBO {final['test_elbo']:.2f} nats",
             f"-log p(x) {final['test_nll']:.2f} ± {final['test_nll_se']:.2f} nats (IS, k = "
             f"{final['eval_num_samples']}, {final['eval_num_test']} images)"]
    parts += [f"IWAE-{key[len('test_iwae_'):]} {value:.2f}" for key, value in
              sorted(final.items(), key=lambda kv: (len(kv[0]), kv[0]))
              if key.startswith("test_iwae_")]
    parts.append(f"KL {final['test_kl']:.2f} nats")
    parts.append(f"{final['active_units']}/{len(final['active_unit_variances'])} active units")
    timing = [f"{final['epochs']} epochs"]
    if "train_time_s" in final:
        timing.append(f"train {duration(final['train_time_s'])}")
    timing.append(f"final evaluation {duration(final['final_eval_time_s'])}")
    return ", ".join(parts) + "; " + ", ".join(timing) + f" (all values in {_FINAL_METRICS})"


def _skipped_steps(state: vae.TrainState) -> int | None:
    """Steps skipped so far by ``optax.apply_if_finite`` (None without it)."""
    opt_state = state.opt_state
    if not isinstance(opt_state, optax.ApplyIfFiniteState):
        return None
    return int(opt_state.total_notfinite)


def _check_consecutive_skips(state: vae.TrainState, config: Config, epoch: int,
                             skipped: int) -> None:
    """FloatingPointError once ``config.max_consecutive_skips`` steps in a row were skipped."""
    consecutive = int(state.opt_state.notfinite_count)
    if consecutive >= config.max_consecutive_skips:
        raise FloatingPointError(
            f"epoch {epoch + 1}: the last {consecutive} training steps had a non-finite "
            f"gradient ({skipped} such steps in this epoch; max_consecutive_skips = "
            f"{config.max_consecutive_skips}): the run stops; lower the learning rate or check "
            "the data")


def _final_evaluation(config: Config, model, state: vae.TrainState, x: jax.Array,
                      eval_key: jax.Array) -> dict:
    """Test ELBO, IWAE-k bounds, importance-sampling log p(x) and active units on ``x``."""
    start = time.perf_counter()
    bounds_key, is_key = jax.random.split(jax.random.fold_in(eval_key, 1))
    batch = min(config.eval_batch_size, x.shape[0])
    bounds = jax.jit(lambda p, k, x: vae.evaluate_bounds(
        k, p, model, x, num_samples=config.eval_iwae_ks, batch_size=batch,
        chunk_size=config.eval_chunk_size))(state.params, bounds_key, x)
    num_is = x.shape[0] if config.eval_num_test is None else min(config.eval_num_test, x.shape[0])
    x_is = x[:num_is]
    log_px = jax.jit(lambda p, k, x: vae.log_likelihood_is(
        k, p, model, x, num_samples=config.eval_num_samples,
        chunk_size=min(config.eval_chunk_size, config.eval_num_samples),
        batch_size=min(batch, num_is)))(state.params, is_key, x_is)
    count, variances = jax.jit(lambda p, x: vae.active_units(
        p, model, x, batch_size=min(1000, x.shape[0])))(state.params, x)
    log_px = np.asarray(log_px, dtype=np.float64)
    out = {
        "test_elbo": float(np.mean(bounds["elbo"])),
        "test_kl": float(np.mean(bounds["kl"])),
        "test_log_px": float(log_px.mean()),
        "test_nll": float(-log_px.mean()),
        "test_nll_se": float(log_px.std(ddof=1) / math.sqrt(num_is)) if num_is > 1 else 0.0,
        "eval_num_samples": config.eval_num_samples,
        "eval_num_test": int(num_is),
        "active_units": int(count),
        "active_unit_variances": np.asarray(variances).round(6).tolist(),
    }
    for k in config.eval_iwae_ks:
        out[f"test_iwae_{k}"] = float(np.mean(bounds[f"iwae_{k}"]))
    if not all(math.isfinite(v) for v in (out["test_elbo"], out["test_nll"])):
        raise FloatingPointError(f"non-finite final evaluation: {out}")
    out["final_eval_time_s"] = time.perf_counter() - start
    return out


# ----------------------------------------------------------------------------------------------
# Plots (matplotlib's object API with the Agg canvas: no pyplot, no global backend switch)
# ----------------------------------------------------------------------------------------------


def _image_side(num_features: int) -> int:
    side = math.isqrt(num_features)
    if side * side != num_features:
        raise ValueError(f"images of {num_features} pixels are not square")
    return side


def image_grid(images: np.ndarray, *, num_rows: int, num_cols: int, pad: int = 1,
               pad_value: float = 0.5) -> np.ndarray:
    """Tile ``images [num_rows * num_cols, side * side]`` (row-major square images) into one
    ``[num_rows * (side + pad) + pad, num_cols * (side + pad) + pad]`` float32 array, the gaps
    filled with ``pad_value``.

    Raises:
      TypeError: ``num_rows``, ``num_cols`` or ``pad`` not an int; ``pad_value`` not a real.
      ValueError: ``num_rows`` or ``num_cols`` < 1, ``pad`` < 0; ``images`` not of shape
        ``[num_rows * num_cols, side * side]`` (the message gives the expected shape), or its
        pixel count not a perfect square.
    """
    check_int(num_rows, "num_rows", minimum=1)
    check_int(num_cols, "num_cols", minimum=1)
    check_int(pad, "pad", minimum=0)
    check_real(pad_value, "pad_value", finite=False)
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 2 or images.shape[0] != num_rows * num_cols:
        raise ValueError(f"images must have shape [{num_rows * num_cols}, side*side], "
                         f"got {images.shape}")
    side = _image_side(images.shape[1])
    cell = side + pad
    grid = np.full((num_rows * cell + pad, num_cols * cell + pad), pad_value, np.float32)
    for i, image in enumerate(images.reshape(-1, side, side)):
        r, c = divmod(i, num_cols)
        grid[pad + r * cell: pad + r * cell + side, pad + c * cell: pad + c * cell + side] = image
    return grid


def _new_figure(width: float, height: float):
    from matplotlib.figure import Figure  # noqa: PLC0415

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def plot_image_grid(images: np.ndarray, path: str | os.PathLike, *, title: str,
                    num_cols: int = 10) -> None:
    """Save a grid of ``images [n, side*side]`` (values in [0, 1]) as a PNG at ``path``.

    Raises:
      ValueError: ``images`` not of shape ``[n, pixels]`` with ``n >= 1`` and a square pixel
        count; ``num_cols`` < 1. TypeError: ``num_cols`` not an int.
    """
    check_int(num_cols, "num_cols", minimum=1)
    images = np.asarray(images)
    if images.ndim != 2 or images.shape[0] == 0:
        raise ValueError(f"images must have shape [n, pixels] with n >= 1 (one flattened "
                         f"square image per row), got shape {images.shape}")
    num_rows = -(-images.shape[0] // num_cols)
    missing = num_rows * num_cols - images.shape[0]
    if missing:
        images = np.concatenate([images, np.zeros((missing, images.shape[1]), images.dtype)])
    fig = _new_figure(num_cols * 0.6 + 0.4, num_rows * 0.6 + 0.6)
    ax = fig.add_subplot()
    ax.imshow(image_grid(images, num_rows=num_rows, num_cols=num_cols),
              cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_title(title, fontsize=9)
    ax.set_axis_off()
    fig.savefig(path)


def plot_reconstructions(originals: np.ndarray, reconstructions: np.ndarray,
                         path: str | os.PathLike, *, num_cols: int = 10) -> None:
    """Save pairs of rows (test image above, its reconstruction below) as a PNG.

    ``originals`` and ``reconstructions`` are ``[n, side*side]``; the first
    ``n - n % num_cols`` pairs are drawn, ``num_cols`` per row (all ``n`` in one row when
    ``n < num_cols``)."""
    originals, reconstructions = np.asarray(originals), np.asarray(reconstructions)
    num_cols = min(num_cols, originals.shape[0])
    n = originals.shape[0] - originals.shape[0] % num_cols
    rows = []
    for start in range(0, n, num_cols):
        rows.append(originals[start:start + num_cols])
        rows.append(reconstructions[start:start + num_cols])
    plot_image_grid(np.concatenate(rows), path, num_cols=num_cols,
                    title="test images (odd rows) and reconstructions E[x | z = E_q[z | x]]")


def plot_training_curves(rows: Sequence[dict], path: str | os.PathLike) -> None:
    """Save train objective and test ELBO (nats) against epochs as a PNG."""
    epochs = np.array([r["epoch"] for r in rows])
    fig = _new_figure(6.4, 4.0)
    ax = fig.add_subplot()
    train = np.array([r["train_objective"] for r in rows], dtype=float)
    test = np.array([r["test_elbo"] for r in rows], dtype=float)
    # Markers, so that a 1-epoch run (a single train point) still shows its train objective.
    ax.plot(epochs[1:], train[1:], marker="o", markersize=3,
            label="train objective (minibatch mean during the epoch)")
    ax.plot(epochs, test, marker="o", markersize=3, label="test ELBO")
    finite = np.concatenate([train[np.isfinite(train)], test[np.isfinite(test)]])
    if finite.size:
        # Zoom on the informative range: from the 5th-percentile value up to the best.
        ax.set_ylim(np.percentile(finite, 5) - 1.0, finite.max() + 1.0)
    ax.set_xlabel("epoch")
    ax.set_ylabel("nats per image (higher is better)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path)


def plot_latent_scatter(latents: np.ndarray, labels: np.ndarray, path: str | os.PathLike) -> None:
    """Save a scatter of 2-D posterior means ``latents [n, 2]`` coloured by ``labels [n]``."""
    latents, labels = np.asarray(latents), np.asarray(labels)
    if latents.ndim != 2 or latents.shape[1] != 2 or labels.shape != latents.shape[:1]:
        raise ValueError(f"latents must be [n, 2] and labels [n], got {latents.shape} and "
                         f"{labels.shape}")
    fig = _new_figure(6.0, 5.2)
    ax = fig.add_subplot()
    points = ax.scatter(latents[:, 0], latents[:, 1], c=labels, cmap="tab10", s=3, vmin=-0.5,
                        vmax=9.5)
    fig.colorbar(points, ax=ax, ticks=range(10), label="digit")
    ax.set_xlabel("E_q[z_1 | x]")
    ax.set_ylabel("E_q[z_2 | x]")
    ax.set_title("test set in the 2-D latent space", fontsize=9)
    fig.savefig(path)


def _make_plots(config: Config, model, params, dataset: vdata.Dataset, test_binary: jax.Array,
                rows: list[dict], eval_key: jax.Array, workdir: pathlib.Path) -> None:
    originals = test_binary[:30]

    @jax.jit
    def pictures(params, rng_key, originals):
        return (vae.sample_images(rng_key, params, model, 100),
                vae.reconstruct(params, model, originals))

    samples, reconstructions = jax.device_get(
        pictures(params, jax.random.fold_in(eval_key, 2), originals))
    originals = np.asarray(originals)
    plot_image_grid(samples, workdir / "samples.png",
                    title="E[x | z] for z ~ N(0, I) (pixel probabilities)")
    plot_reconstructions(originals, reconstructions, workdir / "reconstructions.png")
    plot_training_curves(rows, workdir / "training_curves.png")
    if config.latent_dim == 2:
        encode = jax.jit(lambda p, x: vae.encoder_means(p, model, x,
                                                        batch_size=min(1000, x.shape[0])))
        means = encode(params, test_binary)
        plot_latent_scatter(np.asarray(means), dataset.test_labels, workdir / "latent_2d.png")
