"""One process of the multi-process tests (tests/test_multihost.py); not a test module.

Run as ``python tests/_multihost_worker.py [--coordinator HOST:PORT --num-processes N
--process-id I] --workdir W [--resume] [--pause-after-epoch E] [--fits OUT.npz]``, with
``XLA_FLAGS=--xla_force_host_platform_device_count=<devices per process>``. Without the three
launch flags it runs as one process over its local devices, which is the reference.

* With ``--workdir``: :func:`vijax.vae_train.train_and_evaluate` of :func:`tiny_config`
  (the test reads the parameters back from the checkpoint in ``W``).
* ``--pause-after-epoch E``: after the checkpoint of epoch ``E`` every process writes
  ``W.paused-<process id>`` and sleeps ``--pause-seconds`` before going on (the test kills one
  of them meanwhile).
* ``--fits OUT.npz``: ``vijax.em.fit`` (and with ``--bgmm`` also
  ``vijax.meanfield.bayesian_gmm.fit``) on :func:`em_data` over the mesh of all processes'
  devices, each process passing its own rows; process 0 writes the fitted parameters to
  ``OUT.npz``.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

EM_ROWS, EM_DIM, EM_COMPONENTS, EM_ITERS = 512, 2, 3, 15


def tiny_config():
    """The smallest VAE run that goes through the whole driver: 8x8 digits with 800 training
    images (16 steps of 50 per epoch), a 64-8-2 network, 2 epochs, a small final evaluation."""
    from vijax import vae_train as vt  # noqa: PLC0415

    return vt.Config(dataset=vt.Digits(num_test=997), latent_dim=2, hidden_sizes=(8,),
                     epochs=2, batch_size=50, schedule=vt.ConstantLR(), eval_num_samples=8,
                     eval_iwae_ks=(2,), eval_chunk_size=8, eval_batch_size=997,
                     keep_checkpoints=3)


def em_data():
    """``[512, 2]`` float32: three well-separated Gaussian blobs (fixed seed)."""
    import numpy as np  # noqa: PLC0415

    rng = np.random.default_rng(3)
    centres = np.array([[-4.0, 0.0], [0.0, 3.0], [4.0, -1.0]])
    labels = rng.integers(0, 3, EM_ROWS)
    return (centres[labels] + rng.normal(size=(EM_ROWS, EM_DIM))).astype(np.float32)


def run_fits(out: pathlib.Path, bgmm: bool) -> None:
    import jax  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    from vijax import distributed, em  # noqa: PLC0415
    from vijax.meanfield import bayesian_gmm as bg  # noqa: PLC0415

    mesh = distributed.global_mesh()
    x_all = em_data()
    rows = EM_ROWS // jax.process_count()
    mine = x_all[jax.process_index() * rows:(jax.process_index() + 1) * rows]
    x = distributed.global_rows(mine, mesh)
    key = jax.random.key(0)
    # eagerly: the input checks read the global array (finite rows, magnitude)
    em._check_data(x)
    state, info = jax.jit(lambda k, x: em.fit(k, x, EM_COMPONENTS, max_iter=EM_ITERS, tol=0.0,
                                              mesh=mesh))(key, x)

    host = distributed.host_copy
    results = {"em_means": host(state.means), "em_weights": host(state.weights),
               "em_covariances": host(state.covariances),
               "em_log_likelihood": host(info.log_likelihood)}
    # a NaN in the last global row (the last process's rows): every process refuses the data
    bad = mine.copy()
    if jax.process_index() == jax.process_count() - 1:
        bad[-1, 0] = np.nan
    try:
        em._check_data(distributed.global_rows(bad, mesh))
    except ValueError as err:
        results["nan_message"] = np.array(str(err))
    else:
        results["nan_message"] = np.array("no error")
    if bgmm:
        def bgmm_fit(k, x):
            prior = bg.default_prior(x, EM_COMPONENTS)
            return bg.fit(bg.init(k, x, EM_COMPONENTS, prior), x, prior, max_iter=EM_ITERS,
                          tol=0.0, mesh=mesh)

        bstate, binfo = jax.jit(bgmm_fit)(key, x)
        results.update(bgmm_loc=host(bstate.loc), bgmm_concentration=host(bstate.concentration),
                       bgmm_elbo=host(binfo.elbo))
    if distributed.is_main_process():
        np.savez(out, **results)


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--coordinator")
    p.add_argument("--num-processes", type=int)
    p.add_argument("--process-id", type=int)
    p.add_argument("--heartbeat-timeout", type=int, default=5)
    p.add_argument("--workdir")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--pause-after-epoch", type=int)
    p.add_argument("--pause-seconds", type=float, default=3.0)
    p.add_argument("--fits")
    p.add_argument("--bgmm", action="store_true")
    args = p.parse_args(argv)

    import jax  # noqa: PLC0415

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    from vijax import distributed  # noqa: PLC0415

    if args.coordinator is not None:
        distributed.initialize(args.coordinator, args.num_processes, args.process_id,
                               heartbeat_timeout_seconds=args.heartbeat_timeout,
                               shutdown_timeout_seconds=args.heartbeat_timeout,
                               initialization_timeout=60)
    print(f"process {jax.process_index()}/{jax.process_count()}: devices {jax.devices()}",
          flush=True)
    if args.workdir is not None:
        from vijax import vae_train as vt  # noqa: PLC0415

        make_manager = vt._checkpoint_manager

        def recording_manager(*a, **kw):
            """The driver's checkpoint manager; after each save process 0 also writes the
            saved parameters to ``W.params-<epoch>.npz`` (and pauses, with
            --pause-after-epoch)."""
            manager = make_manager(*a, **kw)
            save = manager.save

            def save_then_pause(step, *sa, **skw):
                out = save(step, *sa, **skw)
                params = skw["args"].item["state"].params
                flat = {jax.tree_util.keystr(path): distributed.host_copy(leaf) for path, leaf
                        in jax.tree_util.tree_flatten_with_path(params)[0]}
                if distributed.is_main_process():
                    import numpy as np  # noqa: PLC0415

                    np.savez(f"{args.workdir}.params-{step}.npz", **flat)
                if step == args.pause_after_epoch:
                    marker = f"{args.workdir}.paused-{jax.process_index()}"
                    pathlib.Path(marker).write_text("paused\n")
                    time.sleep(args.pause_seconds)
                return out

            manager.save = save_then_pause
            return manager

        vt._checkpoint_manager = recording_manager
        final = vt.train_and_evaluate(tiny_config(), args.workdir, resume=args.resume,
                                      progress=False)
        print(f"process {jax.process_index()}: test ELBO {final['test_elbo']:.6f}", flush=True)
    if args.fits is not None:
        run_fits(pathlib.Path(args.fits), args.bgmm)
    print(f"process {jax.process_index()}: done, {time.process_time():.1f} CPU seconds",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
