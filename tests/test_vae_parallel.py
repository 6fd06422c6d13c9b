"""Data-parallel VAE training on 4 forced host CPU devices equals the one-device update.

The device count is fixed when JAX initialises, so the check runs in a fresh interpreter
with ``XLA_FLAGS=--xla_force_host_platform_device_count=4`` (the ``run_on_host_devices``
fixture of ``conftest.py``).
"""

from __future__ import annotations

import textwrap

import pytest


SCRIPT = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np, optax
    from vijax import nn as vnn, vae

    assert jax.device_count() == 4, jax.devices()
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.uniform(size=(40, 12)), jnp.float32)
    model = vnn.VAE(vnn.GaussianEncoder((16,), 3), vnn.BernoulliDecoder((16,), 12))
    optimizer = optax.adam(1e-2)
    objective = vae.IWAE(num_samples=3)
    state = vae.init_train_state(jax.random.key(0), model, optimizer, 12)
    batch = vae.binarize_images(jax.random.key(1), images[:8])
    key = jax.random.key(2)

    def close(a, b):
        for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=2e-5, atol=1e-6)

    # --- one step: 4 devices vs 1 device, same global batch and key
    single = jax.jit(vae.make_train_step(model, optimizer, objective))
    state_1, metrics_1 = single(state, batch, key)
    mesh = vae.data_parallel_mesh()
    assert mesh.size == 4
    step = jax.jit(vae.make_data_parallel_train_step(model, optimizer, objective))
    sharded = vae.shard_batch(batch, mesh)
    assert len(sharded.addressable_shards) == 4
    assert sharded.addressable_shards[0].data.shape == (2, 12)
    state_4, metrics_4 = step(vae.replicate(state, mesh), sharded, key)
    close(state_4.params, state_1.params)
    close(metrics_4, metrics_1)
    assert state_4.params["params"]["decoder"]["logits"]["bias"].sharding.is_fully_replicated
    hlo = step.lower(vae.replicate(state, mesh), sharded, key).compile().as_text()
    assert "all-reduce" in hlo  # gradients are summed across devices, not gathered
    # second call does not recompile
    state_4b, _ = step(state_4, sharded, key)
    assert step._cache_size() == 1

    # --- a scanned epoch with the mesh equals the one-device epoch
    kwargs = dict(batch_size=8, binarize=True)
    epoch_1 = jax.jit(vae.make_train_epoch(model, optimizer, objective, **kwargs))
    epoch_4 = jax.jit(vae.make_train_epoch(model, optimizer, objective, mesh=mesh, **kwargs))
    s1, m1 = epoch_1(state, images, jax.random.key(3))
    s4, m4 = epoch_4(vae.replicate(state, mesh), vae.replicate(images, mesh),
                     jax.random.key(3))
    close(s4.params, s1.params)
    close(m4, m1)
    # with a progress callback: the same update, and each reported step seen (40 // 8 = 5
    # steps, a report every 2 and after the last)
    seen = []
    epoch_4p = jax.jit(vae.make_train_epoch(model, optimizer, objective, mesh=mesh, **kwargs,
                                            progress_fn=lambda s: seen.append(int(s)),
                                            progress_every=2))
    s4p, m4p = epoch_4p(vae.replicate(state, mesh), vae.replicate(images, mesh),
                        jax.random.key(3))
    jax.effects_barrier()
    assert sorted(set(seen)) == [2, 4, 5], seen
    close(s4p.params, s4.params)
    close(m4p, m4)

    # --- batch size not divisible by the device count
    for bad in (lambda: step(state_4b, batch[:6], key),
                lambda: vae.shard_batch(batch[:6], mesh),
                lambda: vae.make_train_epoch(model, optimizer, objective, mesh=mesh,
                                             batch_size=6, binarize=True)):
        try:
            bad()
        except ValueError as err:
            assert "not divisible by the number of devices 4" in str(err), err
        else:
            raise AssertionError("no error for a batch of 6 on 4 devices")
    # --- a mesh without a "batch" axis is refused when the step is built, not when it runs
    try:
        vae.make_train_step(model, optimizer, objective, mesh=jax.make_mesh((4,), ("rows",)))
    except ValueError as err:
        assert "mesh must have an axis named 'batch'" in str(err), err
    else:
        raise AssertionError("no error for a mesh without a 'batch' axis")
    print("DATA-PARALLEL-OK")
    """
)


@pytest.mark.slow  # started first (tests/conftest.py)
def test_data_parallel_equals_single_device_on_4_host_devices(run_on_host_devices):
    assert "DATA-PARALLEL-OK" in run_on_host_devices(SCRIPT, num_devices=4)


DRIVER_SCRIPT = textwrap.dedent(
    """
    import dataclasses, tempfile, pathlib
    import jax, numpy as np
    from vijax import vae_train as vt

    assert jax.device_count() == 4, jax.devices()
    config = vt.Config(dataset=vt.Digits(), latent_dim=2, hidden_sizes=(16,), epochs=2,
                       batch_size=100, learning_rate=3e-3, eval_num_samples=20)
    root = pathlib.Path(tempfile.mkdtemp())
    finals = {}
    for parallel in (False, True):
        finals[parallel] = vt.train_and_evaluate(config, root / str(parallel), progress=False,
                                                 data_parallel=parallel)
    one, _ = vt.restore_checkpoint(root / "False", config)
    four, _ = vt.restore_checkpoint(root / "True", config)
    for u, v in zip(jax.tree.leaves(one.params), jax.tree.leaves(four.params)):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(finals[True]["test_elbo"], finals[False]["test_elbo"], rtol=1e-4)
    assert int(four.step) == int(one.step) == 2 * (1500 // 100), (int(four.step), int(one.step))
    try:  # a batch of 50 cannot be split over 4 devices
        vt.train_and_evaluate(dataclasses.replace(config, batch_size=50), root / "bad",
                              progress=False, data_parallel=True)
    except ValueError as err:
        assert "divisible" in str(err), err
    else:
        raise AssertionError("no error for batch 50 on 4 devices")
    print("DRIVER-PARALLEL-OK")
    """
)


@pytest.mark.slow  # started first (tests/conftest.py)
def test_train_and_evaluate_data_parallel_equals_one_device(run_on_host_devices):
    """The experiment's driver (``train_and_evaluate(data_parallel=True)``, batches split over
    4 host devices) ends two epochs on the digits with the parameters and test ELBO of the
    one-device run, and rejects a batch size the devices do not divide."""
    assert "DRIVER-PARALLEL-OK" in run_on_host_devices(DRIVER_SCRIPT, num_devices=4)
