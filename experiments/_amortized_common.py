"""Shared pieces of experiments/inference_gaps.py and experiments/svi_vs_amortized.py.

The trained model: ``--checkpoint DIR`` (the work directory of ``experiments/vae.py``, loaded by
:func:`vijax.amortized.load_vae_checkpoint`, which refuses another architecture), or, without
it, a VAE trained here by :func:`vijax.vae_train.train_and_evaluate` into ``OUT/vae_run`` (the
recorded configuration of docs/vae.md; with ``--quick`` the same 784-200-200-50 network for one
epoch on 1000 images). The test images are binarized once with the seed every vijax
evaluation uses (``vijax.vae_train.TEST_BINARIZATION_SEED``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import pathlib
from typing import Any, NamedTuple

import numpy as np

import _cli

# `python experiments/inference_gaps.py` imports this checkout's vijax without installing it
REPO_ROOT = _cli.put_repo_root_on_path()

# jax and vijax are imported inside the functions that need them, so that a bad flag is
# reported (exit 2) in a fraction of a second, before JAX starts.

ARCHITECTURE = {"latent_dim": 50, "hidden_sizes": (200, 200), "data_dim": 784}


# One-line usage errors (exit 2) and the output-folder and seed checks: experiments/_cli.py.
Parser = _cli.Parser


def add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", type=pathlib.Path, default=None,
                   help="work directory of experiments/vae.py (config.json + checkpoints/); "
                        "without it a VAE is trained into OUT/vae_run")
    p.add_argument("--data-dir", default=None,
                   help="folder with the four MNIST IDX files (else $VIJAX_DATA_DIR or "
                        "../shared/data/mnist)")
    p.add_argument("--epochs", type=int, default=None,
                   help="epochs of the VAE trained without --checkpoint (default 200; 1 with "
                        "--quick)")
    p.add_argument("--seed", type=int, default=0, help="default 0")
    p.add_argument("--out", type=pathlib.Path, required=False, default=None,
                   help="output folder for results.json and the PNGs")


def check_common(args, parser, default_out: pathlib.Path) -> None:
    """One-line errors (exit 2) for bad flags, before anything is written."""
    if args.out is None:
        args.out = default_out
    _cli.check_seed(parser, args.seed)
    if args.epochs is not None and args.epochs < 1:
        parser.error(f"--epochs must be >= 1, got {args.epochs}")
    if args.checkpoint is not None:
        if args.epochs is not None:
            parser.error("--epochs applies only without --checkpoint (training here)")
        if not (args.checkpoint / "config.json").is_file():
            parser.error(f"--checkpoint: {args.checkpoint} is not a work directory of "
                         "experiments/vae.py (no config.json)")
    if args.data_dir is not None and not pathlib.Path(args.data_dir).is_dir():
        parser.error(f"--data-dir: {args.data_dir} is not a folder")
    _cli.check_output_folder(parser, args.out, "--out")


class Model(NamedTuple):
    params: dict
    model: object
    config: Any  # vijax.vae_train.Config
    epochs: int
    source: str  # "checkpoint DIR" or "trained here"
    training: dict  # train_time_s etc. when trained here or read from the run


def training_config(args, quick: bool):
    from vijax import vae_train as vt

    dataset = vt.Mnist(data_dir=args.data_dir, num_train=1000 if quick else None,
                       num_test=200 if quick else None)
    if quick:
        return vt.Config(dataset=dataset, epochs=args.epochs or 1, eval_num_samples=20,
                         eval_num_test=20, eval_iwae_ks=(1,), eval_chunk_size=20)
    return vt.Config(dataset=dataset, epochs=args.epochs or 200, eval_num_test=1000)


def load_model(args, parser, quick: bool, log=print) -> Model:
    """The checkpoint of ``--checkpoint`` (a bad one: exit 2, one line), else train one."""
    from vijax import amortized as am
    from vijax import vae_train as vt

    if args.checkpoint is not None:
        try:
            params, model, config, epochs = am.load_vae_checkpoint(
                args.checkpoint, data_dir=args.data_dir, **ARCHITECTURE)
        except (ValueError, FileNotFoundError) as err:
            parser.error(f"--checkpoint: {err}")
        final = args.checkpoint / "final_metrics.json"
        training = json.loads(final.read_text()) if final.is_file() else {}
        training.pop("active_unit_variances", None)
        return Model(params, model, config, epochs, f"checkpoint {args.checkpoint}", training)
    config = training_config(args, quick)
    workdir = args.out / "vae_run"
    log(f"training a VAE into {workdir} ({config.epochs} epochs"
        f"{', quick: 1000 images' if quick else ''}) ...")
    logging.getLogger("absl").setLevel(logging.WARNING)
    try:
        final = vt.train_and_evaluate(config, workdir, resume=True, progress=False)
    except (FileNotFoundError, ValueError) as err:
        parser.error(str(err))
    params, model, config, epochs = am.load_vae_checkpoint(workdir, data_dir=args.data_dir,
                                                           **ARCHITECTURE)
    final = {k: v for k, v in final.items() if k != "active_unit_variances"}
    return Model(params, model, config, epochs, "trained here", final)


def test_images(config, num: int) -> np.ndarray:
    """The first ``num`` test images, binarized as every vijax evaluation does."""
    from vijax import data as vdata
    from vijax import vae_train as vt

    dataset = config.dataset.load()
    if num > dataset.test_images.shape[0]:
        raise ValueError(f"asked for {num} test images, the data set has "
                         f"{dataset.test_images.shape[0]}")
    return vdata.fixed_binarize(dataset.test_images[:num], seed=vt.TEST_BINARIZATION_SEED)


def model_description(m: Model) -> dict:
    from vijax import vae_train as vt

    c = m.config
    return {"source": m.source, "epochs": m.epochs, "latent_dim": c.latent_dim,
            "hidden_sizes": list(c.hidden_sizes), "objective": vt.config_to_dict(c.objective),
            "batch_size": c.batch_size, "learning_rate": c.learning_rate,
            "schedule": vt.config_to_dict(c.schedule),
            "binarization": type(c.binarization).__name__,
            "num_train": c.dataset.num_train_examples(),
            "training_metrics": m.training}


def main(argv, make_parser, config_from_args, imports, run) -> dict:
    """A script's entry point: its flags parsed and checked (``config_from_args(args, parser)``:
    a bad one exits 2 with one line, before JAX starts), then ``imports()`` (JAX and vijax) and
    ``run(args, parser)``, whose results it returns."""
    parser = make_parser()
    args = parser.parse_args(argv)
    config_from_args(args, parser)
    imports()
    return run(args, parser)


def jax_modules():
    """``(jax, jax.numpy, optax, vijax.amortized, vijax.families, vijax.svi)``, imported only
    when called: the scripts check their flags first (a bad flag exits at once, before JAX
    starts)."""
    import jax
    import jax.numpy as jnp
    import optax

    from vijax import amortized, families, svi

    return jax, jnp, optax, amortized, families, svi


def machine_info(script: str) -> dict:
    """:func:`_cli.environment` of ``experiments/<script>`` (its command, no machine paths),
    with the load average at the start and JAX's backend."""
    import jax

    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {**_cli.environment(script, packages=("jax", "optax", "distrax", "flax", "numpy")),
            "load_average_at_start": None if load is None else [round(v, 2) for v in load],
            "jax_backend": jax.default_backend()}


def finite_json(obj):
    """Replace non-finite floats by None (strict JSON)."""
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.ndarray):
        return finite_json(obj.tolist())
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        from vijax import vae_train as vt

        return vt.config_to_dict(obj)
    return obj


def write_json(path: pathlib.Path, obj) -> None:
    path.write_text(json.dumps(finite_json(obj), indent=2, allow_nan=False) + "\n")
