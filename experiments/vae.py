"""Train a VAE on MNIST (or the bundled 8x8 digits) and evaluate it as the literature does.

A thin command line over :func:`vijax.vae_train.train_and_evaluate`: the flags become a
:class:`vijax.vae_train.Config` (option strings are mapped to vijax's objective, estimator,
schedule and data-set classes here, and nowhere else). See docs/vae.md for the recorded runs.

Examples (from the repository root, after ``pip install -e .``)::

    # a few minutes on a 2-core CPU: 10 epochs on MNIST, reduced final evaluation
    python experiments/vae.py --quick --workdir outputs/vae_quick

    # the recorded CPU run of docs/vae.md: 784-200-200-50, 200 epochs, cosine decay from 1e-3
    # (these are the defaults), then log p(x) with k = 5000 on the 10000 test images
    python experiments/vae.py --workdir outputs/vae_mnist

    # continue an interrupted run: the same flags plus --resume
    python experiments/vae.py --workdir outputs/vae_mnist --resume

    # the IWAE paper's recipe: 3280 epochs, 3^i schedule; here with the IWAE objective, k = 5
    python experiments/vae.py --lr-schedule iwae --objective iwae --num-samples 5

    # offline demo without MNIST: 8x8 digits, 2-D latent space
    python experiments/vae.py --quick --dataset digits --workdir outputs/vae_digits

    # two processes (one per host; here both on this machine, one CPU device each): every
    # batch is split over all processes' devices; run the same command with --process-id 1
    JAX_PLATFORMS=cpu python experiments/vae.py --quick --dataset digits \
        --workdir outputs/vae_2proc --coordinator 127.0.0.1:12345 --num-processes 2 \
        --process-id 0

See docs/vae.md ("Several processes (multi-host)") for the multi-process launch, SLURM too.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import pathlib
import sys
from typing import Sequence

_HERE = str(pathlib.Path(__file__).resolve().parent)
if _HERE not in sys.path:  # experiments/_cli.py, also when this file is loaded by path
    sys.path.insert(0, _HERE)

import _cli  # noqa: E402

from vijax import distributed as vdist  # noqa: E402
from vijax import elbo as velbo  # noqa: E402
from vijax import vae  # noqa: E402
from vijax import vae_train as vt  # noqa: E402

ESTIMATORS = {
    "pathwise": velbo.Pathwise,
    "score": velbo.ScoreFunction,
    # score function with the leave-one-out baseline (VIMCO for iwae; needs --num-samples >= 2)
    "score-loo": lambda: velbo.ScoreFunction(baseline=velbo.LeaveOneOut()),
    "stl": velbo.StickingTheLanding,
    "dreg": velbo.DReG,
}
OBJECTIVES = {"elbo": vae.ELBOAnalyticKL, "elbo-mc": vae.ELBOMonteCarlo, "iwae": vae.IWAE}


def estimator_names(objective_cls) -> tuple[str, ...]:
    """The --estimator names an objective class accepts (from its ``estimators`` attribute)."""
    return tuple(name for name, make in ESTIMATORS.items()
                 if isinstance(make(), objective_cls.estimators))


SCHEDULES = {"constant": vt.ConstantLR, "iwae": vt.IwaeLR, "cosine": vt.CosineLR}
IWAE_PAPER_EPOCHS = int(vt.IwaeLR().stage_ends()[-1])  # 3280


def make_parser() -> argparse.ArgumentParser:
    p = _cli.Parser(description=__doc__.split("\n\n")[0])
    # Numeric flags default to None: only the flags given override the base configuration
    # (Config() or, with --quick, quick_config()); the effective values go to config.json.
    p.add_argument("--quick", action="store_true",
                   help="small demo configuration (minutes on 2 CPU cores)")
    p.add_argument("--dataset", choices=("mnist", "digits"), default="mnist",
                   help="mnist (default) or scikit-learn's 8x8 digits (offline demo)")
    p.add_argument("--data-dir", default=None,
                   help="folder with the four MNIST IDX files (else $VIJAX_DATA_DIR, "
                        "../shared/data/mnist, or TensorFlow Datasets)")
    p.add_argument("--num-train", type=int, default=None,
                   help="use only the first N MNIST training images")
    p.add_argument("--latent-dim", type=int, default=None,
                   help="L (default 50; 2 with --quick --dataset digits)")
    p.add_argument("--hidden-sizes", type=int, nargs="+", default=None,
                   help="encoder hidden widths, decoder reversed (default 200 200; 100 100 with "
                        "--quick --dataset digits)")
    p.add_argument("--objective", choices=tuple(OBJECTIVES), default="elbo",
                   help="elbo (default): analytic-KL ELBO; elbo-mc: Monte Carlo ELBO; iwae: "
                        "IWAE bound")
    p.add_argument("--num-samples", type=int, default=None,
                   help="K samples per example in the objective (default 1; 5 for iwae)")
    p.add_argument("--estimator", choices=tuple(ESTIMATORS), default="pathwise",
                   help="gradient estimator (default pathwise); "
                        + "; ".join(f"{name} accepts {', '.join(estimator_names(cls))}"
                                    for name, cls in OBJECTIVES.items())
                        + ". score-loo: score function with the leave-one-out baseline (VIMCO "
                          "for iwae), needs --num-samples >= 2")
    p.add_argument("--binarization", choices=("dynamic", "fixed"), default="dynamic",
                   help="dynamic (default): a fresh Bernoulli draw per epoch; fixed: one draw")
    p.add_argument("--epochs", type=int, default=None,
                   help=f"epochs (default 200, or {IWAE_PAPER_EPOCHS} with --lr-schedule iwae; "
                        "with --quick 10 for mnist, 100 for digits, whatever the schedule)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="default 100 (50 with --quick --dataset digits)")
    p.add_argument("--learning-rate", type=float, default=None,
                   help="Adam's (peak) learning rate (default 1e-3)")
    p.add_argument("--lr-schedule", choices=tuple(SCHEDULES), default=None,
                   help="cosine (default): decay to lr/10 over the run; constant; iwae: Burda "
                        "et al.'s 3^i epochs at lr*10^(-i/7), i = 0..7 (3280 epochs); a shorter "
                        "run (--epochs, or --quick) follows its first stages (e.g. 10 epochs: "
                        "1 at lr, 3 at lr*10^(-1/7), 6 at lr*10^(-2/7))")
    p.add_argument("--seed", type=int, default=None, help="default 0")
    p.add_argument("--max-consecutive-skips", type=int, default=None,
                   help="skip (and count) training steps whose gradient is NaN/inf, stopping "
                        "after this many in a row (default: no skipping)")
    p.add_argument("--eval-num-samples", type=int, default=None,
                   help="k of the final importance-sampling log p(x) (default 5000)")
    p.add_argument("--eval-num-test", type=int, default=None,
                   help="estimate log p(x) on the first N test images only (default all)")
    p.add_argument("--workdir", "--output-dir", dest="workdir", default="outputs/vae",
                   help="output folder (metrics, checkpoints, PNGs; default outputs/vae)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the last checkpoint in --workdir")
    p.add_argument("--coordinator", metavar="HOST:PORT", default=None,
                   help="multi-process run: address of process 0's coordination service "
                        "(jax.distributed.initialize; give --num-processes and --process-id "
                        "too, and the same flags otherwise on every process). Without it the "
                        "run is one process and JAX's cluster auto-detection is not used")
    p.add_argument("--num-processes", type=int, default=None,
                   help="multi-process run: the number N >= 1 of processes")
    p.add_argument("--process-id", type=int, default=None,
                   help="multi-process run: this process, in [0, N - 1]; process 0 writes "
                        "the metrics, logs and figures, all processes the checkpoints")
    p.add_argument("--heartbeat-timeout", type=int, default=None,
                   help="multi-process run: seconds without heartbeats after which a process "
                        f"counts as dead and the others stop (default "
                        f"{vdist.HEARTBEAT_TIMEOUT_S}, JAX's)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bars over epochs and over each epoch's steps (default: when "
                        "stderr is a terminal)")
    return p


def config_from_args(args: argparse.Namespace) -> vt.Config:
    """Map parsed flags to a :class:`vijax.vae_train.Config` (raises ValueError on bad ones)."""
    if args.dataset == "digits":
        if args.data_dir is not None or args.num_train is not None:
            raise ValueError("--data-dir and --num-train apply to MNIST only")
        dataset = vt.Digits()
    else:
        dataset = vt.Mnist(data_dir=args.data_dir, num_train=args.num_train)
    base = vt.quick_config(dataset) if args.quick else vt.Config(dataset=dataset)

    objective_cls = OBJECTIVES[args.objective]
    allowed = estimator_names(objective_cls)
    if args.estimator not in allowed:
        raise ValueError(f"--estimator {args.estimator} does not apply to --objective "
                         f"{args.objective}; choose one of {', '.join(allowed)}")
    objective_kwargs = {"estimator": ESTIMATORS[args.estimator]()}
    if args.num_samples is not None:
        objective_kwargs["num_samples"] = args.num_samples
    try:
        objective = objective_cls(**objective_kwargs)
    except (TypeError, ValueError) as err:  # e.g. score-loo with K = 1
        raise ValueError(f"--objective {args.objective} --estimator {args.estimator}: {err} "
                         "(num_samples is --num-samples)") from err
    overrides = {
        "objective": objective,
        "binarization": (vt.DynamicBinarization() if args.binarization == "dynamic"
                         else vt.FixedBinarization()),
    }
    if args.lr_schedule is not None:
        overrides["schedule"] = SCHEDULES[args.lr_schedule]()
        if args.lr_schedule == "iwae" and args.epochs is None and not args.quick:
            overrides["epochs"] = IWAE_PAPER_EPOCHS  # --quick keeps its epochs (a truncated run)
    for flag, field in (("latent_dim", "latent_dim"), ("epochs", "epochs"),
                        ("batch_size", "batch_size"), ("learning_rate", "learning_rate"),
                        ("seed", "seed"), ("eval_num_samples", "eval_num_samples"),
                        ("max_consecutive_skips", "max_consecutive_skips"),
                        ("eval_num_test", "eval_num_test")):
        value = getattr(args, flag)
        if value is not None:
            overrides[field] = value
    if args.hidden_sizes is not None:
        overrides["hidden_sizes"] = tuple(args.hidden_sizes)
    return dataclasses.replace(base, **overrides)


def launch_from_args(args: argparse.Namespace) -> tuple[str, int, int] | None:
    """``(coordinator, num_processes, process_id)`` of a multi-process launch, or None.

    Raises:
      ValueError: only some of --coordinator/--num-processes/--process-id given, a coordinator
        without a port, --num-processes < 1, --process-id outside [0, N - 1], or
        --heartbeat-timeout < 1 or without a launch (the message names the flag).
    """
    try:
        launch = vdist.check_process_args(args.coordinator, args.num_processes,
                                          args.process_id)
    except (TypeError, ValueError) as err:
        message = str(err)
        for name in ("coordinator", "num_processes", "process_id"):
            message = message.replace(name, "--" + name.replace("_", "-"))
        raise ValueError(message) from None
    if args.heartbeat_timeout is not None:
        if launch is None:
            raise ValueError("--heartbeat-timeout applies to a multi-process run only "
                             "(--coordinator, --num-processes, --process-id)")
        if args.heartbeat_timeout < 1:
            raise ValueError(f"--heartbeat-timeout must be >= 1 second, got "
                             f"{args.heartbeat_timeout}")
    return launch


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    _cli.check_seed(parser, args.seed)
    try:
        launch = launch_from_args(args)
        config = config_from_args(args)
    except (ValueError, TypeError) as err:
        parser.error(str(err))
    main_process = launch is None or launch[2] == 0
    # before any data are loaded: an empty path (the current folder), a file, an unwritable
    # place; checked by process 0 only (the probe of several processes at once would race)
    if main_process:
        _cli.check_output_folder(parser, args.workdir, "--workdir")
    if launch is not None:  # before any other JAX work
        vdist.initialize(*launch, heartbeat_timeout_seconds=(
            args.heartbeat_timeout or vdist.HEARTBEAT_TIMEOUT_S))
    logging.basicConfig(level=logging.INFO if main_process else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)
    try:
        final = vt.train_and_evaluate(config, args.workdir, resume=args.resume,
                                      progress=args.progress)
    except (FileExistsError, FileNotFoundError, ValueError, FloatingPointError) as err:
        # input problems (an existing run without --resume, a resume with another
        # configuration, missing data, --num-train too large) and a diverged run (its message
        # says which epoch and to lower the learning rate): one line, not a traceback
        logging.debug("train_and_evaluate failed", exc_info=True)
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    summary = {k: final[k] for k in ("test_elbo", "test_nll", "test_nll_se", "eval_num_samples",
                                     "eval_num_test", "active_units", "epochs", "train_time_s",
                                     "train_cpu_time_s",
                                     "final_eval_time_s")}
    if main_process:
        print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
