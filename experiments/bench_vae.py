"""Benchmark: VAE train-step throughput of vijax (JAX/XLA) against PyTorch on the CPU.

The network and loss are the same on both sides: the IWAE paper's one-stochastic-layer MNIST
VAE (784-200-200-50, tanh; encoder ``scale = exp(linear)``; Bernoulli decoder with logits),
the analytic-KL ELBO with one reparameterized sample, Adam (lr 1e-3), batch 100, float32, on a
fixed binary batch. Measured side by side in one run (the libraries interleaved, so both see
the same background load):

* vijax ``jax.jit(make_train_step(...), donate_argnums=0)`` called once per step from Python;
* vijax ``jax.jit(make_train_epoch(...), donate_argnums=0)``: ``--scan-steps`` steps per call
  inside one ``lax.scan`` (no host round-trip per step), on fixed binary images and, as an
  extra row, with dynamic binarization drawn inside the scan;
* PyTorch eager, ``torch.set_num_threads(cores)``, with ``torch.optim.Adam`` in its default
  (for-loop) and ``fused=True`` forms, and with one thread;
* vijax's data-parallel scanned epoch on 1, 2 and 4 forced host devices
  (``XLA_FLAGS=--xla_force_host_platform_device_count=N``, one subprocess each).

Reported: ms/step (median and best over ``--repeats`` timed calls), steps/s and examples/s
(from the median), the first-call time (compile + one step for JAX; one eager step for torch),
the ratio to the fastest PyTorch row's steps/s, and achieved matmul GFLOP/s against a measured
floor: the peak GFLOP/s of a large ``jnp.dot`` (2048^3, float32; the larger of the wall-clock
figure and the per-CPU-second figure times the core count) and the step's matmul FLOPs
(forward 6 matmuls, backward 6 weight and 5 input gradients: 0.223 GFLOP at batch 100;
"3x forward" would say 0.254).

Usage::

    python experiments/bench_vae.py                     # full table (about 2-3 minutes)
    python experiments/bench_vae.py --repeats 5 --no-devices --json out.json

If torch is not installed the PyTorch rows are skipped with a message.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vijax import nn as vnn
from vijax import vae

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
DATA_DIM, HIDDEN, LATENT = 784, (200, 200), 50


# ----------------------------------------------------------------------------- shared setup

def matmul_flops(batch_size: int) -> float:
    """FLOPs of the step's matrix products (forward, weight gradients, input gradients)."""
    layers = [(DATA_DIM, HIDDEN[0]), (HIDDEN[0], HIDDEN[1]), (HIDDEN[1], 2 * LATENT),
              (LATENT, HIDDEN[1]), (HIDDEN[1], HIDDEN[0]), (HIDDEN[0], DATA_DIM)]
    forward = sum(2 * batch_size * i * o for i, o in layers)
    input_grads = sum(2 * batch_size * i * o for i, o in layers[1:])  # no dx for the data
    return 2 * forward + input_grads


def synthetic_images(num: int, seed: int = 0) -> np.ndarray:
    """Grey-level images in [0, 1] with MNIST's mean intensity (0.13); no download needed."""
    rng = np.random.default_rng(seed)
    return np.clip(rng.beta(0.3, 2.0, size=(num, DATA_DIM)), 0.0, 1.0).astype(np.float32)


def binary(images: np.ndarray, seed: int = 1) -> np.ndarray:
    return (np.random.default_rng(seed).uniform(size=images.shape) < images).astype(np.float32)


def timed_calls(call, repeats: int, steps_per_call: int) -> list[float]:
    """Seconds per step for ``repeats`` calls of ``call()`` (which must block)."""
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        out.append((time.perf_counter() - start) / steps_per_call)
    return out


# ----------------------------------------------------------------------------- JAX side

class JaxRunner:
    """Holds a jitted vijax step or epoch and its (donated) state between timed calls."""

    def __init__(self, kind: str, images: np.ndarray, batch_size: int, scan_steps: int,
                 mesh=None):
        self.kind, self.batch_size, self.scan_steps = kind, batch_size, scan_steps
        optimizer = optax.adam(1e-3)
        model = vnn.iwae_mnist_vae(vnn.pixel_mean_logit(images))
        objective = vae.ELBOAnalyticKL()
        state = vae.init_train_state(jax.random.key(0), model, optimizer, DATA_DIM)
        if kind == "step":
            self.fn = jax.jit(vae.make_train_step(model, optimizer, objective),
                              donate_argnums=0)
            self.data = jnp.asarray(binary(images[:batch_size]))
            self.keys = list(jax.random.split(jax.random.key(1), 64))
            self.steps_per_call = 1
        else:
            binarize = kind == "epoch-binarize"
            self.fn = jax.jit(vae.make_train_epoch(model, optimizer, objective,
                                                   batch_size=batch_size, binarize=binarize,
                                                   mesh=mesh), donate_argnums=0)
            data = images if binarize else binary(images)
            self.data = jnp.asarray(data[: batch_size * scan_steps])
            self.keys = list(jax.random.split(jax.random.key(1), 64))
            self.steps_per_call = scan_steps
            if mesh is not None:
                state, self.data = vae.replicate(state, mesh), vae.replicate(self.data, mesh)
        self.state = state
        self.calls = 0
        start = time.perf_counter()
        self._call()
        self.first_call_s = time.perf_counter() - start

    def _call(self):
        key = self.keys[self.calls % len(self.keys)]
        self.calls += 1
        self.state, metrics = self.fn(self.state, self.data, key)
        jax.block_until_ready(self.state)
        return metrics

    def call(self):
        if self.kind == "step":  # per-step dispatch from Python, blocking only at the end
            for _ in range(self.scan_steps):
                key = self.keys[self.calls % len(self.keys)]
                self.calls += 1
                self.state, _ = self.fn(self.state, self.data, key)
            jax.block_until_ready(self.state)
        else:
            self._call()


def matmul_peak_gflops(size: int = 2048, repeats: int = 15) -> tuple[float, float]:
    """Peak float32 matmul GFLOP/s on this CPU: (wall-clock, all cores; per-core x cores).

    The second figure divides the FLOPs by the process CPU time (all threads) and multiplies by
    the core count: under background load it is the better estimate of what the cores can do.
    """
    a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    f(a).block_until_ready()
    walls, cpus = [], []
    for _ in range(repeats):
        c, t = time.process_time(), time.perf_counter()
        f(a).block_until_ready()
        walls.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
    flops = 2 * size**3
    return flops / min(walls) / 1e9, flops / min(cpus) / 1e9 * (os.cpu_count() or 1)


# ----------------------------------------------------------------------------- torch side

def torch_runner(images: np.ndarray, batch_size: int, threads: int, fused: bool):
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            t = torch.nn
            self.encoder = t.Sequential(t.Linear(DATA_DIM, HIDDEN[0]), t.Tanh(),
                                        t.Linear(HIDDEN[0], HIDDEN[1]), t.Tanh(),
                                        t.Linear(HIDDEN[1], 2 * LATENT))
            self.decoder = t.Sequential(t.Linear(LATENT, HIDDEN[1]), t.Tanh(),
                                        t.Linear(HIDDEN[1], HIDDEN[0]), t.Tanh(),
                                        t.Linear(HIDDEN[0], DATA_DIM))

        def forward(self, x):
            loc, log_scale = self.encoder(x).chunk(2, dim=-1)
            scale = log_scale.exp()
            z = loc + scale * torch.randn_like(loc)
            logits = self.decoder(z)
            log_lik = (x * logits - torch.nn.functional.softplus(logits)).sum(-1)
            kl = 0.5 * (loc.square() + scale.square() - 1.0).sum(-1) - log_scale.sum(-1)
            return -(log_lik - kl).mean()

    net = Net()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3, fused=fused or None)
    x = torch.from_numpy(binary(images[:batch_size]))

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = net(x)
        loss.backward()
        optimizer.step()
        return loss

    start = time.perf_counter()
    step()
    first = time.perf_counter() - start
    return step, first


# ----------------------------------------------------------------------------- forced devices

def devices_worker(args) -> None:
    """Runs in a subprocess whose XLA_FLAGS force ``args.worker_devices`` host devices."""
    images = synthetic_images(args.batch_size * args.scan_steps)
    mesh = vae.data_parallel_mesh()
    assert mesh.size == args.worker_devices, jax.devices()
    runner = JaxRunner("epoch", images, args.batch_size, args.scan_steps, mesh=mesh)
    for _ in range(2):
        runner.call()
    times = timed_calls(runner.call, args.repeats, runner.steps_per_call)
    print("WORKER-RESULT " + json.dumps({"devices": mesh.size, "times": times,
                                         "first_call_s": runner.first_call_s}))


def run_devices(num_devices: int, args) -> dict | None:
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                        f" --xla_force_host_platform_device_count={num_devices}").strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    cmd = [sys.executable, __file__, "--worker-devices", str(num_devices), "--batch-size",
           str(args.batch_size), "--scan-steps", str(args.scan_steps), "--repeats",
           str(args.repeats)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    for line in result.stdout.splitlines():
        if line.startswith("WORKER-RESULT "):
            return json.loads(line[len("WORKER-RESULT "):])
    print(f"  [devices={num_devices}] failed:\n{result.stderr[-2000:]}")
    return None


# ----------------------------------------------------------------------------- main

def summarize(name: str, times: list[float], first_call_s: float | None, batch_size: int,
              flops: float) -> dict:
    t = np.asarray(times)
    median = float(np.median(t))
    return {"name": name, "ms_median": 1e3 * median, "ms_best": 1e3 * float(t.min()),
            "steps_per_s": 1.0 / median, "examples_per_s": batch_size / median,
            "first_call_s": first_call_s, "gflops": flops / median / 1e9}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--scan-steps", type=int, default=50,
                        help="steps per timed call (scanned epoch; Python loop for the step)")
    parser.add_argument("--repeats", type=int, default=15, help="timed calls per variant")
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--no-devices", action="store_true",
                        help="skip the 1/2/4 forced-host-device subprocesses")
    parser.add_argument("--json", type=pathlib.Path, default=None)
    parser.add_argument("--worker-devices", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker_devices:
        devices_worker(args)
        return {}

    cores = os.cpu_count() or 1
    flops = matmul_flops(args.batch_size)
    print(f"# VAE train-step benchmark, {datetime.date.today()}")
    print(f"machine: {platform.processor() or platform.machine()}, {cores} cores; "
          f"jax {jax.__version__}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    print(f"batch {args.batch_size}, matmul FLOPs/step {flops / 1e9:.3f} GFLOP, "
          f"{args.repeats} timed calls x {args.scan_steps} steps per variant")

    images = synthetic_images(args.batch_size * args.scan_steps)
    runners = {
        "vijax jit step (Python loop)": JaxRunner("step", images, args.batch_size,
                                                  args.scan_steps),
        "vijax scanned epoch": JaxRunner("epoch", images, args.batch_size, args.scan_steps),
        "vijax scanned epoch + dynamic binarization": JaxRunner(
            "epoch-binarize", images, args.batch_size, args.scan_steps),
    }
    calls = {name: (r.call, r.steps_per_call if r.kind != "step" else args.scan_steps,
                    r.first_call_s) for name, r in runners.items()}
    torch_names = []
    if not args.no_torch:
        try:
            import torch  # noqa: F401
        except ImportError:
            print("torch is not installed: PyTorch rows skipped "
                  "(pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu)")
        else:
            for threads, fused in ((cores, False), (cores, True), (1, False)):
                name = (f"PyTorch {torch.__version__} eager, {threads} thread"
                        f"{'s' if threads > 1 else ''}, Adam{' fused' if fused else ''}")
                step, first = torch_runner(images, args.batch_size, threads, fused)
                for _ in range(20):
                    step()

                def block_call(step=step, n=args.scan_steps):
                    for _ in range(n):
                        step()

                calls[name] = (block_call, args.scan_steps, first)
                torch_names.append(name)
            import torch
            torch.set_num_threads(cores)

    for call, _, _ in calls.values():  # warm-up
        call()
    times = {name: [] for name in calls}
    for _ in range(args.repeats):  # interleaved: every variant sees the same load
        for name, (call, steps, _) in calls.items():
            if name in torch_names:
                import torch
                torch.set_num_threads(1 if ", 1 thread," in name else cores)
            times[name] += timed_calls(call, 1, steps)
    rows = [summarize(name, times[name], calls[name][2], args.batch_size, flops)
            for name in calls]

    if not args.no_devices:
        for n in (1, 2, 4):
            res = run_devices(n, args)
            if res is not None:
                rows.append(summarize(f"vijax data-parallel scanned epoch, {n} forced host "
                                      f"device{'s' if n > 1 else ''}", res["times"],
                                      res["first_call_s"], args.batch_size, flops))

    peak_wall, peak_cpu = matmul_peak_gflops()
    peak = max(peak_wall, peak_cpu)  # the larger peak gives the smaller (stricter) floor
    floor_ms = flops / (peak * 1e9) * 1e3
    reference = None
    torch_rows = [r for r in rows if r["name"].startswith("PyTorch")]
    if torch_rows:
        reference = max(torch_rows, key=lambda r: r["steps_per_s"])
    print(f"\nmatmul peak (jnp.dot 2048^3 float32): {peak_wall:.1f} GFLOP/s wall-clock, "
          f"{peak_cpu:.1f} GFLOP/s per CPU-second x {cores} cores; FLOP floor "
          f"{flops / 1e9:.3f} GFLOP / {peak:.1f} GFLOP/s = {floor_ms:.3f} ms/step")
    if reference:
        print(f"x PyTorch: steps/s relative to the fastest PyTorch row ({reference['name']})")
    header = ("| variant | ms/step (median) | ms/step (best) | steps/s | examples/s | "
              "first call (s) | x PyTorch | GFLOP/s | x FLOP floor |")
    print("\n" + header + "\n|" + "---|" * 9)
    for r in rows:
        ratio = r["steps_per_s"] / reference["steps_per_s"] if reference else float("nan")
        r["x_torch"], r["x_floor"] = ratio, r["ms_median"] / floor_ms
        first = "-" if r["first_call_s"] is None else f"{r['first_call_s']:.2f}"
        print(f"| {r['name']} | {r['ms_median']:.3f} | {r['ms_best']:.3f} | "
              f"{r['steps_per_s']:.0f} | {r['examples_per_s']:.0f} | {first} | {ratio:.2f} | "
              f"{r['gflops']:.1f} | {r['x_floor']:.2f} |")
    result = {"date": str(datetime.date.today()), "cores": cores, "jax": jax.__version__,
              "batch_size": args.batch_size, "matmul_gflop_per_step": flops / 1e9,
              "matmul_peak_gflops_wall": peak_wall, "matmul_peak_gflops_cpu": peak_cpu,
              "floor_ms": floor_ms, "rows": rows}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
