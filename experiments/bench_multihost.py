"""Benchmark: the cost of JAX's multi-process runtime for the data-parallel VAE step, on one
machine.

The same program, the scanned VAE epoch over batches made beforehand
(``vijax.distributed.make_train_epoch_from_batches``: the IWAE paper's 784-200-200-50 tanh
VAE, analytic-KL ELBO, Adam, dynamic binarization, float32, batches split over a 1-D mesh of
two CPU devices), run two ways, each in fresh interpreters:

* one process with two forced host devices
  (``XLA_FLAGS=--xla_force_host_platform_device_count=2``): the all-reduce is in-process;
* two processes with one device each, connected by ``jax.distributed.initialize`` on
  127.0.0.1 with gloo collectives: the all-reduce crosses process boundaries over TCP.

Each way compiles once, runs one warm-up call, then ``--repeats`` timed calls of
``--steps`` steps each (``block_until_ready``); reported: median and best ms/step, steps/s
from the median, and the ratio of the two-process to the one-process steps/s (below 1: the
distributed runtime's overhead). The data are random pixel intensities (no data set
needed).

Usage::

    python experiments/bench_multihost.py                  # about a minute on 2 cores
    python experiments/bench_multihost.py --steps 20 --repeats 3 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import socket
import statistics
import subprocess
import sys
import time

_HERE = str(pathlib.Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

import _cli  # noqa: E402

_cli.put_repo_root_on_path()

DATA_DIM, HIDDEN, LATENT = 784, (200, 200), 50


def make_parser():
    p = _cli.Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=50, help="steps per timed call (default 50)")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per way (default 5)")
    p.add_argument("--batch-size", type=int, default=100, help="global batch (default 100)")
    p.add_argument("--timeout", type=float, default=600.0,
                   help="seconds each way may take before it is stopped (default 600)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    # internal: one process of a way
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--coordinator", default=None, help=argparse.SUPPRESS)
    p.add_argument("--process-id", type=int, default=None, help=argparse.SUPPRESS)
    return p


def check_args(parser, args) -> None:
    for flag, value in (("--steps", args.steps), ("--repeats", args.repeats),
                        ("--batch-size", args.batch_size)):
        if value < 1:
            parser.error(f"{flag} must be >= 1, got {value}")
    if args.batch_size % 2:
        parser.error(f"--batch-size must be even (split over 2 devices), got {args.batch_size}")
    if not args.timeout > 0:
        parser.error(f"--timeout must be > 0, got {args.timeout}")


def worker(args) -> None:
    """One process: time the scanned epoch; process 0 prints ``RESULT <json>``."""
    import jax  # noqa: PLC0415

    from vijax import distributed as vdist  # noqa: PLC0415

    if args.coordinator is not None:
        vdist.initialize(args.coordinator, 2, args.process_id, heartbeat_timeout_seconds=30)
    import numpy as np  # noqa: PLC0415
    import optax  # noqa: PLC0415

    from vijax import nn as vnn  # noqa: PLC0415
    from vijax import vae  # noqa: PLC0415

    mesh = vdist.global_mesh()
    images = np.random.default_rng(0).uniform(
        size=(args.steps * args.batch_size, DATA_DIM)).astype(np.float32)
    model = vnn.iwae_mnist_vae(np.zeros(DATA_DIM, np.float32), hidden_sizes=HIDDEN,
                               latent_dim=LATENT, data_dim=DATA_DIM)
    optimizer = optax.adam(1e-3, eps=1e-4)
    state = jax.jit(lambda k: vae.init_train_state(k, model, optimizer, DATA_DIM),
                    out_shardings=vdist.replicated(mesh))(jax.random.key(0))
    epoch = jax.jit(vdist.make_train_epoch_from_batches(model, optimizer, vae.ELBOAnalyticKL(),
                                                        binarize=True, mesh=mesh),
                    donate_argnums=0, static_argnums=3)
    key = jax.random.key(1)
    batches = vdist.epoch_batches(images, key, batch_size=args.batch_size, mesh=mesh)
    start = time.perf_counter()
    state, _ = epoch(state, batches, key, images.shape[0])
    jax.block_until_ready(state)
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        state, metrics = epoch(state, batches, key, images.shape[0])
        jax.block_until_ready((state, metrics))
        times.append((time.perf_counter() - start) / args.steps)
    if vdist.is_main_process():
        print("RESULT " + json.dumps({
            "processes": jax.process_count(), "devices": jax.device_count(),
            "first_call_s": compile_s, "ms_per_step_median": 1e3 * statistics.median(times),
            "ms_per_step_best": 1e3 * min(times),
            "steps_per_s": 1.0 / statistics.median(times)}), flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_way(args, num_processes: int) -> dict:
    """Start the processes of one way, wait (``--timeout``), return process 0's RESULT."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={2 // num_processes}")
    base = [sys.executable, __file__, "--worker", "--steps", str(args.steps), "--repeats",
            str(args.repeats), "--batch-size", str(args.batch_size)]
    if num_processes == 1:
        commands = [base]
    else:
        port = _free_port()
        commands = [base + ["--coordinator", f"127.0.0.1:{port}", "--process-id", str(i)]
                    for i in range(num_processes)]
    procs = [subprocess.Popen(c, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for c in commands]
    try:
        outs = [p.communicate(timeout=args.timeout) for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        raise SystemExit(f"bench_multihost: {num_processes}-process run timed out "
                         f"after {args.timeout} s")
    for p, (_, err) in zip(procs, outs):
        if p.returncode:
            raise SystemExit(f"bench_multihost: a worker failed ({p.returncode}):\n"
                             + err[-3000:])
    line = next(ln for ln in outs[0][0].splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def main(argv=None) -> dict | None:
    parser = make_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    if args.worker:
        worker(args)
        return None
    if args.json is not None:
        _cli.check_output_folder(parser, pathlib.Path(args.json).parent or ".", "--json")
    env = _cli.environment("bench_multihost.py", argv, packages=("jax", "jaxlib"))
    print(f"{env['cpu_model']}, {env['cpu_count']} CPUs; jax {env['versions']['jax']}; "
          f"batch {args.batch_size}, {args.steps} steps per call, {args.repeats} calls")
    rows = {"1 process x 2 devices": run_way(args, 1),
            "2 processes x 1 device": run_way(args, 2)}
    print(f"{'':26s} {'ms/step (median)':>17s} {'best':>8s} {'steps/s':>9s} "
          f"{'first call s':>13s}")
    for name, r in rows.items():
        print(f"{name:26s} {r['ms_per_step_median']:17.2f} {r['ms_per_step_best']:8.2f} "
              f"{r['steps_per_s']:9.1f} {r['first_call_s']:13.1f}")
    ratio = rows["2 processes x 1 device"]["steps_per_s"] / rows["1 process x 2 devices"][
        "steps_per_s"]
    print(f"ratio steps/s, 2 processes / 1 process: {ratio:.3f}")
    result = {"environment": env, "rows": rows, "ratio_2proc_over_1proc": ratio}
    if args.json is not None:
        _cli.write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
