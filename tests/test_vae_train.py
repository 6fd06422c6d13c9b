"""Tests of the VAE training driver (vijax.vae_train) and its command line (experiments/vae.py)."""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import logging
import math
import pathlib
import re
import shutil

import jax
import numpy as np
import pytest

from vijax import data
from vijax import elbo as velbo
from vijax import vae
from vijax import vae_train as vt

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load_cli():
    spec = importlib.util.spec_from_file_location("vae_cli", REPO_ROOT / "experiments" / "vae.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cli = _load_cli()


def _count_epoch_traces(mp: pytest.MonkeyPatch) -> dict:
    """Make ``vae.make_train_epoch`` count how often its epoch function is traced (a Python side
    effect runs only at trace time); returns the live counter."""
    counter = {"traces": 0}
    original = vae.make_train_epoch

    def counting_make_train_epoch(*args, **kwargs):
        train_epoch = original(*args, **kwargs)

        def wrapped(*call_args):
            counter["traces"] += 1
            return train_epoch(*call_args)

        return wrapped

    mp.setattr(vt.vae, "make_train_epoch", counting_make_train_epoch)
    return counter


@pytest.fixture
def count_epoch_traces(monkeypatch):
    return _count_epoch_traces(monkeypatch)


# ----------------------------------------------------------------------------------------------
# Real MNIST: one short epoch
# ----------------------------------------------------------------------------------------------


@pytest.mark.slow  # started first (tests/conftest.py)
def test_one_epoch_on_real_mnist_improves_test_elbo(mnist_dir, tmp_path, count_epoch_traces):
    config = vt.Config(dataset=vt.Mnist(data_dir=str(mnist_dir)), epochs=1,
                       eval_num_samples=100, eval_num_test=500, eval_iwae_ks=(1,))
    final = vt.train_and_evaluate(config, tmp_path, progress=False)
    rows = vt.read_metrics(tmp_path)
    assert [r["epoch"] for r in rows] == [0, 1]
    assert rows[1]["step"] == 600 and final["steps"] == 600
    init_elbo, epoch1_elbo = rows[0]["test_elbo"], rows[1]["test_elbo"]
    assert math.isfinite(init_elbo) and math.isfinite(epoch1_elbo)
    assert math.isfinite(rows[1]["train_objective"])
    assert epoch1_elbo > init_elbo + 20.0

    # Independent reference: the exact test log-likelihood of independent Bernoulli pixels with
    # the training means (the decoder's output bias at initialisation), computed in NumPy on the
    # same fixed binarization of the test set. One epoch of a VAE must beat it clearly
    # (about -206 nats against about -126 after one epoch).
    mnist = data.load_mnist(mnist_dir)
    p = np.clip(mnist.train_images.astype(np.float64).mean(axis=0), 1e-3, 1 - 1e-3)
    x = data.fixed_binarize(mnist.test_images, seed=vt.TEST_BINARIZATION_SEED).astype(np.float64)
    independent = float(np.mean(x @ np.log(p) + (1 - x) @ np.log1p(-p)))
    assert -215.0 < independent < -195.0
    assert epoch1_elbo > independent + 40.0
    assert final["test_elbo"] == pytest.approx(epoch1_elbo, abs=1.0)  # other key, same model

    # log p(x) by importance sampling is at least the ELBO in expectation (IWAE-k >= ELBO).
    assert -final["test_nll"] > final["test_elbo"] - 3 * final["test_nll_se"]
    assert 1 <= final["active_units"] <= 50
    assert count_epoch_traces["traces"] == 1


# ----------------------------------------------------------------------------------------------
# Tiny runs through the command line: straight vs interrupted + resumed
# ----------------------------------------------------------------------------------------------

TINY = ["--dataset", "digits", "--latent-dim", "2", "--hidden-sizes", "16", "--batch-size", "100",
        "--lr-schedule", "iwae", "--learning-rate", "3e-3", "--eval-num-samples", "20",
        "--no-progress"]


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    straight, resumed = root / "straight", root / "resumed"
    traces = []
    with pytest.MonkeyPatch.context() as mp:
        counter = _count_epoch_traces(mp)
        for argv in (TINY + ["--epochs", "2", "--workdir", str(straight)],
                     TINY + ["--epochs", "1", "--workdir", str(resumed)],
                     TINY + ["--epochs", "2", "--workdir", str(resumed), "--resume"]):
            counter["traces"] = 0
            assert cli.main(argv) == 0
            traces.append(counter["traces"])
    config = cli.config_from_args(cli.make_parser().parse_args(TINY + ["--epochs", "2"]))
    return {"straight": straight, "resumed": resumed, "config": config, "traces": traces}


def test_resume_ends_with_the_same_parameters(tiny_runs):
    config = tiny_runs["config"]
    state_a, epoch_a = vt.restore_checkpoint(tiny_runs["straight"], config)
    state_b, epoch_b = vt.restore_checkpoint(tiny_runs["resumed"], config)
    assert epoch_a == epoch_b == 2
    assert int(state_a.step) == int(state_b.step) == 2 * (1500 // 100)
    leaves_a, tree_a = jax.tree.flatten(state_a)
    leaves_b, tree_b = jax.tree.flatten(state_b)
    assert tree_a == tree_b
    for a, b in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # The mid-run checkpoint of the straight run (epoch 1, written while training went on) equals
    # the final checkpoint of the 1-epoch run; and epoch 2 really changed the parameters.
    state_a1, _ = vt.restore_checkpoint(tiny_runs["straight"], config, epoch=1)
    state_b1, _ = vt.restore_checkpoint(tiny_runs["resumed"], config, epoch=1)
    for a, b in zip(jax.tree.leaves(state_a1), jax.tree.leaves(state_b1)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    kernel = lambda s: np.asarray(s.params["params"]["decoder"]["logits"]["kernel"])  # noqa: E731
    assert not np.array_equal(kernel(state_a1), kernel(state_a))
    # Same metrics rows and final evaluation; the resumed run did not redo epoch 1.
    rows_a, rows_b = vt.read_metrics(tiny_runs["straight"]), vt.read_metrics(tiny_runs["resumed"])
    assert [r["epoch"] for r in rows_b] == [0, 1, 2]
    for ra, rb in zip(rows_a, rows_b):
        for key in ("step", "learning_rate", "test_elbo", "test_kl"):
            assert ra[key] == rb[key], key
    final_a = json.loads((tiny_runs["straight"] / "final_metrics.json").read_text())
    final_b = json.loads((tiny_runs["resumed"] / "final_metrics.json").read_text())
    for key in ("test_elbo", "test_nll", "test_iwae_50", "active_units"):
        assert final_a[key] == final_b[key], key
    # One trace of the epoch function per process run, whatever the number of epochs.
    assert tiny_runs["traces"] == [1, 1, 1]


def test_tiny_run_outputs(tiny_runs):
    from matplotlib.image import imread  # noqa: PLC0415

    workdir = tiny_runs["straight"]
    for name in ("config.json", "metrics.jsonl", "metrics.csv", "final_metrics.json",
                 "samples.png", "reconstructions.png", "training_curves.png", "latent_2d.png"):
        assert (workdir / name).is_file(), name
    lines = (workdir / "metrics.csv").read_text().strip().splitlines()
    assert lines[0].split(",") == list(vt._METRIC_COLUMNS) and len(lines) == 4
    for name in ("samples.png", "reconstructions.png", "latent_2d.png"):
        image = imread(workdir / name)
        assert image.ndim == 3 and image.shape[0] > 100 and image[..., :3].std() > 0.05, name
    rows = vt.read_metrics(workdir)
    # IWAE schedule with 15 steps per epoch: epoch 1 at lr, epoch 2 at lr * 10^(-1/7).
    assert rows[1]["learning_rate"] == pytest.approx(3e-3, rel=1e-6)
    assert rows[2]["learning_rate"] == pytest.approx(3e-3 * 10 ** (-1 / 7), rel=1e-6)
    final = json.loads((workdir / "final_metrics.json").read_text())
    assert final["eval_num_samples"] == 20 and final["eval_num_test"] == 297
    assert len(final["active_unit_variances"]) == 2
    # Bounds are ordered in expectation: ELBO ~ IWAE-1 <= IWAE-20 (= log p(x) estimate) and
    # IWAE-50; tolerances are a few nats on 64-pixel digits.
    assert final["test_iwae_1"] == pytest.approx(final["test_elbo"], abs=1.0)
    assert -final["test_nll"] >= final["test_iwae_1"] - 0.5
    assert final["test_iwae_50"] >= final["test_iwae_1"] - 0.5
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["objective"]["type"] == "ELBOAnalyticKL" and saved["schedule"]["type"] == "IwaeLR"


def test_final_log_line_is_a_readable_summary(tiny_runs):
    final = json.loads((tiny_runs["straight"] / "final_metrics.json").read_text())
    line = vt.final_summary(final)
    assert "\n" not in line and len(line) < 300  # the per-unit variances are not dumped
    assert "[" not in line and "active_unit_variances" not in line
    assert f"test ELBO {final['test_elbo']:.2f} nats" in line
    assert f"-log p(x) {final['test_nll']:.2f} ± {final['test_nll_se']:.2f} nats" in line
    assert f"k = 20, {final['eval_num_test']} images" in line
    assert f"{final['active_units']}/2 active units" in line
    # IWAE bounds in increasing k, then the KL
    assert line.index("IWAE-1 ") < line.index("IWAE-50 ") < line.index("KL ")
    assert line.endswith("(all values in final_metrics.json)")


def test_resume_config_checks(tiny_runs, tmp_path):
    config = tiny_runs["config"]
    # Evaluation settings may change on resume: a finished run is only re-evaluated.
    copy = tmp_path / "copy"
    shutil.copytree(tiny_runs["straight"], copy)
    final = vt.train_and_evaluate(dataclasses.replace(config, eval_num_samples=7), copy,
                                  resume=True, progress=False)
    assert final["eval_num_samples"] == 7 and final["steps"] == 30
    assert [r["epoch"] for r in vt.read_metrics(copy)] == [0, 1, 2]
    with pytest.raises(FileExistsError, match="resume"):
        vt.train_and_evaluate(config, tiny_runs["straight"], progress=False)
    with pytest.raises(ValueError, match="latent_dim"):
        vt.train_and_evaluate(dataclasses.replace(config, latent_dim=3), tiny_runs["straight"],
                              resume=True, progress=False)
    with pytest.raises(ValueError, match="past config.epochs"):
        vt.train_and_evaluate(dataclasses.replace(config, epochs=1), tiny_runs["straight"],
                              resume=True, progress=False)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        vt.restore_checkpoint(tmp_path, config)
    # restoring with another architecture names the field, not orbax's shape mismatch
    with pytest.raises(ValueError, match="config differs.*hidden_sizes"):
        vt.restore_checkpoint(tiny_runs["straight"],
                              dataclasses.replace(config, hidden_sizes=(8,)))
    state, epochs = vt.restore_checkpoint(tiny_runs["straight"],
                                          dataclasses.replace(config, eval_num_samples=7))
    assert epochs == 2 and int(state.step) == 30


def test_metrics_file_is_strict_json(tiny_runs):
    """Row 0 has no training objective: it is written as null (Python's json would write
    the non-standard NaN, which other JSON readers refuse) and read back as nan."""
    lines = (tiny_runs["straight"] / "metrics.jsonl").read_text().splitlines()
    strict = [json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} in {line}"))
              for line in lines]
    assert strict[0]["train_objective"] is None and np.isfinite(strict[1]["train_objective"])
    assert np.isnan(vt.read_metrics(tiny_runs["straight"])[0]["train_objective"])
    json.loads((tiny_runs["straight"] / "final_metrics.json").read_text(),
               parse_constant=lambda name: pytest.fail(f"{name} in final_metrics.json"))


def test_resume_allows_a_moved_mnist_folder_but_not_another_split():
    """The MNIST folder may move between sessions (the loader checks the IDX headers); the
    subsets used, and the digits split, may not."""
    def differences(saved, current):
        return vt._config_differences(vt.config_to_dict(saved), vt.config_to_dict(current),
                                      allow_epochs=False)

    base = vt.Config(dataset=vt.Mnist(data_dir="/old/mnist", num_train=2000))
    assert differences(base, dataclasses.replace(base, dataset=vt.Mnist(num_train=2000))) == []
    for dataset in (vt.Mnist(data_dir="/old/mnist", num_train=1000),
                    vt.Mnist(data_dir="/new", num_train=2000, num_test=500)):
        assert differences(base, dataclasses.replace(base, dataset=dataset)) == ["dataset"]
    digits = vt.Config(dataset=vt.Digits(num_test=297))
    assert differences(digits, dataclasses.replace(digits, dataset=vt.Digits(num_test=300))) == [
        "dataset"]
    assert differences(base, dataclasses.replace(base, latent_dim=3, eval_num_samples=7)) == [
        "latent_dim"]


def test_restore_checkpoint_of_an_epoch_not_kept_lists_the_kept_ones(tiny_runs):
    # keep_checkpoints = 2 and 2 epochs: epochs 1 and 2 are kept, no other.
    for epoch in (0, 3):
        with pytest.raises(FileNotFoundError,
                           match=rf"no checkpoint for epoch {epoch} .*epochs kept: \[1, 2\]"):
            vt.restore_checkpoint(tiny_runs["straight"], tiny_runs["config"], epoch=epoch)


def test_cli_reports_input_problems_in_one_line(tiny_runs, capsys):
    """Re-running a finished command without --resume, or resuming with another architecture:
    exit status 2 and a one-line message naming the fix, no traceback."""
    argv = TINY + ["--epochs", "2", "--workdir", str(tiny_runs["straight"])]
    for extra, needle in (([], "--resume"), (["--resume", "--latent-dim", "3"], "latent_dim")):
        with pytest.raises(SystemExit) as info:
            cli.main(argv + extra)
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert "error:" in err and needle in err and "Traceback" not in err


# ----------------------------------------------------------------------------------------------
# Progress within an epoch; fixed binarization end to end
# ----------------------------------------------------------------------------------------------


def _digits_setup(config):
    dataset = config.dataset.load()
    model = vt.build_model(config, dataset.train_images)
    optimizer, _ = vt.build_optimizer(config, dataset.train_images.shape[0] // config.batch_size)
    return dataset, model, optimizer


def test_train_epoch_progress_fn_reports_steps_and_leaves_the_updates_unchanged():
    config = vt.Config(dataset=vt.Digits(), latent_dim=2, hidden_sizes=(16,), batch_size=100,
                       epochs=2)
    dataset, model, optimizer = _digits_setup(config)
    images = jax.numpy.asarray(dataset.train_images)  # 1500 images: 15 steps per epoch
    state0 = vae.init_train_state(jax.random.key(0), model, optimizer, images)
    make = functools.partial(vae.make_train_epoch, model, optimizer, config.objective,
                             batch_size=100, binarize=True)
    seen = []
    plain = jax.jit(make())
    reporting = jax.jit(make(progress_fn=lambda step: seen.append(int(step)), progress_every=4))
    every_step = jax.jit(make(progress_fn=lambda step: seen.append(-int(step))))
    key = jax.random.key(3)
    state_plain, metrics_plain = plain(state0, images, key)
    state_rep, metrics_rep = reporting(state0, images, key)
    jax.effects_barrier()
    # Every 4th step and the epoch's last one, as global step counts (the state's step).
    assert sorted(seen) == [4, 8, 12, 15]
    for a, b in zip(jax.tree.leaves((state_plain, metrics_plain)),
                    jax.tree.leaves((state_rep, metrics_rep))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    seen.clear()
    reporting(state_rep, images, jax.random.key(4))  # second epoch: steps 16..30
    every_step(state0, images, key)  # default: ~20 reports per epoch, here every step
    jax.effects_barrier()
    assert sorted(s for s in seen if s > 0) == [19, 23, 27, 30]
    assert sorted(-s for s in seen if s < 0) == list(range(1, 16))
    with pytest.raises(TypeError, match="progress_fn"):
        make(progress_fn=3)
    with pytest.raises(ValueError, match="progress_every"):
        make(progress_fn=print, progress_every=0)


def test_fixed_binarization_run_trains_on_the_fixed_images_with_step_bars(tmp_path, capsys):
    config = vt.Config(dataset=vt.Digits(), latent_dim=2, hidden_sizes=(16,), batch_size=100,
                       epochs=2, learning_rate=3e-3, eval_num_samples=20, eval_iwae_ks=(1,),
                       binarization=vt.FixedBinarization(seed=5))
    reported = []
    report = vt._StepsBar.report

    def recording_report(self, step, refresh=False):
        reported.append(int(step))
        report(self, step, refresh)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(vt._StepsBar, "report", recording_report)
        vt.train_and_evaluate(config, tmp_path, progress=True)
    err = capsys.readouterr().err
    # The bar over epochs, and for each epoch one over its 15 steps that was moved from inside
    # the jitted epoch after every step (15 // 20 -> every step) and ended full.
    assert re.search(r"epochs: 100%.*2/2", err), err[-2000:]
    for epoch in (1, 2):
        assert re.search(rf"epoch {epoch}/2: 100%.*15/15", err), err[-2000:]
    assert sorted(set(reported)) == list(range(1, 31))
    state, epochs_done = vt.restore_checkpoint(tmp_path, config)
    assert epochs_done == 2 and int(state.step) == 30

    # Independent replay with the library alone: binarize the training set once with the
    # configured seed, train two epochs on those binary images without re-drawing them.
    dataset, model, optimizer = _digits_setup(config)
    fixed = data.fixed_binarize(dataset.train_images, seed=5)
    assert set(np.unique(fixed)) == {0.0, 1.0}
    init_key, train_key, _ = jax.random.split(jax.random.key(config.seed), 3)
    replay = vae.init_train_state(init_key, model, optimizer, fixed)
    epoch_fn = jax.jit(vae.make_train_epoch(model, optimizer, config.objective, batch_size=100,
                                            binarize=False))
    for epoch in range(2):
        replay, _ = epoch_fn(replay, jax.numpy.asarray(fixed), jax.random.fold_in(train_key, epoch))
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(replay.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    # Dynamic binarization from the same keys trains on other images: different parameters.
    dynamic = vae.init_train_state(init_key, model, optimizer, fixed)
    dyn_fn = jax.jit(vae.make_train_epoch(model, optimizer, config.objective, batch_size=100,
                                          binarize=True))
    for epoch in range(2):
        dynamic, _ = dyn_fn(dynamic, jax.numpy.asarray(dataset.train_images),
                            jax.random.fold_in(train_key, epoch))
    kernel = lambda p: np.asarray(p["params"]["decoder"]["logits"]["kernel"])  # noqa: E731
    assert np.max(np.abs(kernel(dynamic.params) - kernel(replay.params))) > 1e-3


# ----------------------------------------------------------------------------------------------
# Schedules, configuration, command line
# ----------------------------------------------------------------------------------------------


def test_iwae_schedule_matches_the_paper():
    # Burda et al. 2016, section 5: 3^i epochs at 1e-3 * 10^(-i/7), i = 0..7 (3280 epochs).
    steps_per_epoch = 7
    schedule = vt.IwaeLR().build(1e-3, steps_per_epoch, epochs=5)
    epoch = 0
    for i in range(8):
        for e in (epoch, epoch + 3 ** i - 1):  # first and last epoch of stage i
            for step in (e * steps_per_epoch, (e + 1) * steps_per_epoch - 1):
                assert float(schedule(step)) == pytest.approx(1e-3 * 10 ** (-i / 7), rel=1e-6)
        epoch += 3 ** i
    assert epoch == 3280 == cli.IWAE_PAPER_EPOCHS
    assert float(schedule(10 ** 6)) == pytest.approx(1e-4, rel=1e-6)
    assert float(jax.jit(schedule)(4 * steps_per_epoch)) == pytest.approx(1e-3 * 10 ** (-2 / 7))
    cosine = vt.CosineLR(final_fraction=0.1).build(2e-3, 10, epochs=3)
    assert float(cosine(0)) == pytest.approx(2e-3) and float(cosine(30)) == pytest.approx(2e-4)
    assert float(cosine(15)) == pytest.approx(1.1e-3)  # halfway: (1 + 0.1) / 2
    assert float(vt.ConstantLR().build(5e-4, 10, 3)(123)) == pytest.approx(5e-4)


def test_config_validation_messages():
    with pytest.raises(ValueError, match="epochs"):
        vt.Config(epochs=0)
    with pytest.raises(ValueError, match=r"hidden_sizes\[1\]"):
        vt.Config(hidden_sizes=(10, -1))
    with pytest.raises(TypeError, match="objective"):
        vt.Config(objective="elbo")
    with pytest.raises(TypeError, match="dataset"):
        vt.Config(dataset="mnist")
    with pytest.raises(ValueError, match="learning_rate"):
        vt.Config(learning_rate=float("nan"))
    with pytest.raises(ValueError, match="num_train"):
        vt.Mnist(num_train=0)
    with pytest.raises(ValueError, match="final_fraction"):
        vt.CosineLR(final_fraction=2.0)
    with pytest.raises(TypeError, match="Config"):
        vt.train_and_evaluate({"epochs": 1}, "/nonexistent")


def test_cli_maps_flags_to_config():
    parse = cli.make_parser().parse_args
    config = cli.config_from_args(parse(["--objective", "iwae", "--num-samples", "5",
                                         "--estimator", "dreg", "--lr-schedule", "iwae"]))
    assert config.objective == vae.IWAE(num_samples=5, estimator=velbo.DReG())
    assert config.schedule == vt.IwaeLR() and config.epochs == 3280
    assert config.dataset == vt.Mnist() and config.binarization == vt.DynamicBinarization()
    quick = cli.config_from_args(parse(["--quick", "--epochs", "3", "--binarization", "fixed"]))
    assert quick == dataclasses.replace(vt.quick_config(), epochs=3,
                                        binarization=vt.FixedBinarization())
    digits = cli.config_from_args(parse(["--quick", "--dataset", "digits"]))
    assert digits.dataset == vt.Digits() and digits.latent_dim == 2
    with pytest.raises(ValueError, match="dreg"):
        cli.config_from_args(parse(["--objective", "elbo", "--estimator", "dreg"]))
    vimco = cli.config_from_args(parse(["--objective", "iwae", "--estimator", "score-loo"]))
    assert vimco.objective.estimator == velbo.ScoreFunction(baseline=velbo.LeaveOneOut())
    with pytest.raises(SystemExit):
        cli.main(["--epochs", "0", "--workdir", "/nonexistent"])  # Config's ValueError -> usage


def test_cli_quick_with_the_iwae_schedule_keeps_the_quick_epochs():
    parse = cli.make_parser().parse_args
    for dataset, quick_epochs in ((vt.Mnist(), 10), (vt.Digits(), 100)):
        argv = ["--quick", "--lr-schedule", "iwae", "--dataset", type(dataset).__name__.lower()]
        config = cli.config_from_args(parse(argv))
        assert config.epochs == quick_epochs
        assert config == dataclasses.replace(vt.quick_config(dataset), schedule=vt.IwaeLR())
        assert cli.config_from_args(parse(argv + ["--epochs", "7"])).epochs == 7
    assert cli.config_from_args(parse(["--lr-schedule", "iwae"])).epochs == 3280


def test_cli_rejects_an_estimator_the_objective_cannot_use_before_writing_anything(tmp_path,
                                                                                  capsys):
    # vijax.elbo's documented estimators: elbo_analytic_kl takes Pathwise and ScoreFunction,
    # elbo adds StickingTheLanding, iwae_bound adds DReG; LeaveOneOut needs K >= 2.
    assert cli.estimator_names(vae.ELBOAnalyticKL) == ("pathwise", "score", "score-loo")
    assert cli.estimator_names(vae.ELBOMonteCarlo) == ("pathwise", "score", "score-loo", "stl")
    assert cli.estimator_names(vae.IWAE) == ("pathwise", "score", "score-loo", "stl", "dreg")
    for argv in (["--estimator", "score-loo"],  # elbo with K = 1
                 ["--objective", "iwae", "--num-samples", "1", "--estimator", "score-loo"],
                 ["--objective", "elbo", "--estimator", "stl"]):
        workdir = tmp_path / "run"
        with pytest.raises(SystemExit) as info:
            cli.main(["--dataset", "digits", "--no-progress", "--workdir", str(workdir)] + argv)
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert "error:" in err and "estimator" in err and "Traceback" not in err
        assert not workdir.exists()


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("corruption, error, match", [
    ("uint8", TypeError, "floating"),
    ("nan", ValueError, "NaN"),
    ("shape", ValueError, "rank 2"),
    ("range", ValueError, r"\[0, 1\]"),
])
def test_bad_training_images_are_rejected(monkeypatch, tmp_path, corruption, error, match):
    digits = data.load_digits()
    images = digits.train_images.copy()
    if corruption == "uint8":
        images = (images * 16).astype(np.uint8)
    elif corruption == "nan":
        images[3, 5] = np.nan
    elif corruption == "shape":
        images = images.reshape(-1, 8, 8)
    elif corruption == "range":
        images = images * 16
    monkeypatch.setattr(vt.Digits, "load", lambda self: digits._replace(train_images=images))
    with pytest.raises(error, match=match):
        vt.train_and_evaluate(vt.Config(dataset=vt.Digits(), epochs=1), tmp_path, progress=False)
    assert not any(tmp_path.iterdir())  # the data are checked before anything is written


def test_plot_helpers_reject_bad_shapes(tmp_path):
    grid = vt.image_grid(np.zeros((6, 16)), num_rows=2, num_cols=3)
    assert grid.shape == (2 * 5 + 1, 3 * 5 + 1)
    assert grid[0, 0] == 0.5 and grid[1, 1] == 0.0
    with pytest.raises(ValueError, match="square"):
        vt.image_grid(np.zeros((6, 15)), num_rows=2, num_cols=3)
    with pytest.raises(ValueError, match=r"\[6, side\*side\]"):
        vt.image_grid(np.zeros((5, 16)), num_rows=2, num_cols=3)
    with pytest.raises(ValueError, match=r"\[n, 2\]"):
        vt.plot_latent_scatter(np.zeros((5, 3)), np.zeros(5), tmp_path / "x.png")


def test_nan_training_pixels_that_bypass_validation_stop_the_run(monkeypatch, tmp_path):
    # prepare_data validates the splits once; should a NaN pixel get past it, the jitted epoch
    # (dynamic binarization inside) must not train on it silently: the driver's finiteness
    # check stops after the first epoch.
    original = vt.prepare_data

    def prepare_with_a_nan(config):
        dataset, train_images, test_binary = original(config)
        train_images = train_images.copy()
        train_images[:, 10] = np.nan
        return dataset, train_images, test_binary

    monkeypatch.setattr(vt, "prepare_data", prepare_with_a_nan)
    config = vt.Config(dataset=vt.Digits(), latent_dim=2, hidden_sizes=(8,), epochs=3,
                       eval_num_samples=5)
    assert isinstance(config.binarization, vt.DynamicBinarization)
    with pytest.raises(FloatingPointError, match="epoch 1: non-finite objective"):
        vt.train_and_evaluate(config, tmp_path, progress=False)
    assert not (tmp_path / "checkpoints" / "1").exists()


def test_plot_reconstructions_with_fewer_test_images_than_columns(tmp_path):
    from matplotlib.image import imread  # noqa: PLC0415

    originals = np.random.default_rng(0).uniform(size=(8, 16)).astype(np.float32)
    vt.plot_reconstructions(originals, 1.0 - originals, tmp_path / "r.png")
    image = imread(tmp_path / "r.png")
    assert image.ndim == 3 and image[..., :3].std() > 0.05


def test_training_curves_show_a_single_epoch_train_point(tmp_path):
    from matplotlib.image import imread  # noqa: PLC0415

    # Two figures with the same axes (y range from -100, -95, -90): the train objective of a
    # 1-epoch run is a single point, so it must add pixels of its colour (C0) to the figure.
    def c0_pixels(train_objective):
        rows = [{"epoch": 0, "train_objective": float("nan"), "test_elbo": -100.0},
                {"epoch": 1, "train_objective": train_objective, "test_elbo": -90.0}]
        vt.plot_training_curves(rows, tmp_path / "c.png")
        rgb = imread(tmp_path / "c.png")[..., :3]
        return int(np.sum(np.all(np.abs(rgb - np.array([0.122, 0.467, 0.706])) < 0.05, axis=-1)))

    assert c0_pixels(-95.0) > c0_pixels(float("nan")) + 5


def test_one_device_fallback_for_an_indivisible_batch_is_logged(monkeypatch, caplog):
    monkeypatch.setattr(jax, "local_device_count", lambda: 4)
    config = vt.Config(dataset=vt.Digits(), batch_size=50)
    with caplog.at_level("WARNING", logger="vijax.vae_train"):
        assert vt._data_parallel_mesh(config, None) is None
    assert "batch_size 50 is not divisible by the 4 local devices" in caplog.text
    with pytest.raises(ValueError, match="divisible"):
        vt._data_parallel_mesh(config, True)


@pytest.mark.parametrize("make, error, match", [
    (lambda: vt.Config(hidden_sizes=200), TypeError, "hidden_sizes"),
    (lambda: vt.Config(eval_iwae_ks=50), TypeError, "eval_iwae_ks"),
    (lambda: vt.Config(adam_b1="0.9"), TypeError, "adam_b1"),
    (lambda: vt.Config(adam_eps=None), TypeError, "adam_eps"),
    (lambda: vt.Config(latent_dim=2.0), TypeError, "latent_dim"),
    (lambda: vt.Config(seed=1.0), TypeError, "seed"),
    (lambda: vt.Config(seed=2**32), ValueError, "seed"),
    (lambda: vt.Config(eval_iwae_ks=(5, 5)), ValueError, "eval_iwae_ks.*repeat"),
    (lambda: vt.Config(dataset=vt.Digits(), batch_size=5000), ValueError, "batch_size"),
    (lambda: vt.Config(dataset=vt.Mnist(num_train=50)), ValueError, "batch_size"),
    (lambda: vt.CosineLR(final_fraction="a"), TypeError, "final_fraction"),
    (lambda: vt.Digits(num_test=5), ValueError, "num_test"),
    (lambda: vt.Digits(num_test=5.5), TypeError, "num_test"),
    (lambda: vt.FixedBinarization(seed=-1), ValueError, "seed"),
    (lambda: vt.FixedBinarization(seed="a"), TypeError, "seed"),
    (lambda: vt.Mnist(data_dir=3), TypeError, "data_dir"),
    (lambda: vt.Mnist(num_test=10_001), ValueError, "num_test"),
    (lambda: vt.image_grid(np.zeros((0, 16)), num_rows=0, num_cols=2), ValueError, "num_rows"),
], ids=["hidden-int", "ks-int", "b1-str", "eps-none", "latent-float", "seed-float",
        "seed-2**32", "ks-repeated",
        "batch-digits", "batch-mnist", "cosine-str", "digits-5", "digits-float", "fixed-neg",
        "fixed-str", "data_dir-int", "mnist-test-big", "grid-rows-0"])
def test_config_pieces_reject_bad_fields_naming_them(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_numpy_scalars_are_accepted_and_stored_as_python_numbers():
    config = vt.Config(learning_rate=np.float32(1e-3), latent_dim=np.int64(3),
                       hidden_sizes=[np.int32(4)], dataset=vt.Mnist(data_dir=pathlib.Path("m")))
    assert type(config.learning_rate) is float and config.learning_rate == float(np.float32(1e-3))
    assert type(config.latent_dim) is int and config.hidden_sizes == (4,)
    assert type(config.hidden_sizes[0]) is int and config.dataset.data_dir == "m"
    json.dumps(vt.config_to_dict(config))  # JSON-ready


def test_input_errors_write_nothing_to_the_workdir(monkeypatch, tmp_path):
    config = vt.Config(dataset=vt.Digits(), latent_dim=2, hidden_sizes=(8,), epochs=1)
    # a data set smaller than one batch: found when the data are loaded, before any write
    digits = data.load_digits()
    monkeypatch.setattr(vt.Digits, "load",
                        lambda self: digits._replace(train_images=digits.train_images[:10]))
    with pytest.raises(ValueError, match="batch_size 100 exceeds the 10 training images"):
        vt.train_and_evaluate(config, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
    # missing MNIST folder
    missing = vt.Config(dataset=vt.Mnist(data_dir=str(tmp_path / "no_mnist")), epochs=1)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        vt.train_and_evaluate(missing, tmp_path / "run2", progress=False)
    assert not (tmp_path / "run2").exists()
    with pytest.raises(TypeError, match="progress"):
        vt.train_and_evaluate(config, tmp_path / "run3", progress="no")
    # restore_checkpoint looks for the checkpoint before loading any data, and creates nothing
    monkeypatch.setattr(vt.Digits, "load", lambda self: pytest.fail("data loaded"))
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        vt.restore_checkpoint(tmp_path / "empty", config)
    assert not (tmp_path / "empty").exists() and not (tmp_path / "run3").exists()
    with pytest.raises(TypeError, match="epoch"):
        vt.restore_checkpoint(tmp_path / "empty", config, epoch="1")
    with pytest.raises(ValueError, match=r"images must have shape \[n, pixels\]"):
        vt.plot_image_grid(np.zeros(16), tmp_path / "g.png", title="t")


def test_cli_reports_a_diverged_run_in_one_line(monkeypatch, tmp_path, capsys):
    """train_and_evaluate raises FloatingPointError when the objective becomes NaN/inf (its
    message names the epoch and the fix); the CLI prints it as one line with exit status 2."""
    def diverge(*args, **kwargs):
        raise FloatingPointError("epoch 1: non-finite objective (train nan); lower the "
                                 "learning rate")

    monkeypatch.setattr(vt, "train_and_evaluate", diverge)
    with pytest.raises(SystemExit) as info:
        cli.main(TINY + ["--epochs", "1", "--workdir", str(tmp_path / "run")])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "error: epoch 1: non-finite objective" in err and "Traceback" not in err


def test_workdir_must_be_a_non_empty_path(tmp_path, monkeypatch):
    """Before: pathlib's "expected str, bytes or os.PathLike object" for None, and an empty
    string trained into the current folder."""
    config = vt.Config(dataset=vt.Digits(), latent_dim=2, hidden_sizes=(8,), epochs=1,
                       eval_num_samples=5)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(TypeError, match=r"workdir must be a path \(str or os.PathLike\), got "
                                        "None"):
        vt.train_and_evaluate(config, None, progress=False)
    with pytest.raises(ValueError, match="workdir must not be empty"):
        vt.train_and_evaluate(config, "", progress=False)
    assert list(tmp_path.iterdir()) == []


def _files(folder: pathlib.Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def _checkpoint_data_files(step_dir: pathlib.Path) -> list[pathlib.Path]:
    """The array data files of one orbax checkpoint (not its JSON metadata)."""
    return [p for p in step_dir.rglob("*") if p.is_file() and "ocdbt.process" in p.as_posix()
            and "/d/" in p.as_posix()]


# orbax reads a checkpoint's arrays concurrently: when one read fails on the corrupted file, the
# others are abandoned, and Python reports them when it collects them
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_resume_skips_a_damaged_checkpoint_and_a_cut_metrics_line(tiny_runs, tmp_path, caplog):
    """Before: a cut last line of metrics.jsonl gave json's "Expecting ',' delimiter", an
    emptied _METADATA "Expecting value: line 1 column 1", a corrupted data file a TensorStore
    traceback. Now the newest usable checkpoint is resumed, with warnings naming what was
    skipped and why, or, with none usable, one error listing them and nothing is changed."""
    config, straight = tiny_runs["config"], tiny_runs["straight"]
    # (a) nothing usable: the last metrics row (epoch 2) cut short, so checkpoint 2 has no
    # metrics row, and checkpoint 1's metadata emptied
    broken = tmp_path / "broken"
    shutil.copytree(straight, broken)
    metrics = broken / "metrics.jsonl"
    metrics.write_text(metrics.read_text()[:-25])
    (broken / "checkpoints" / "1" / "default" / "_METADATA").write_text("")
    before = _files(broken)
    with caplog.at_level(logging.WARNING, logger="vijax.vae_train"):
        with pytest.raises(ValueError, match=(
                r"cannot resume .*broken: no usable checkpoint \(checkpoint \S*checkpoints/2 "
                r"skipped: \S*metrics.jsonl lacks the rows of epochs 0\.\.2.*; checkpoint "
                r"\S*checkpoints/1 skipped: it cannot be read")):
            vt.train_and_evaluate(config, broken, resume=True, progress=False)
    assert re.search(r"metrics\.jsonl: line 3 is unreadable .* dropped", caplog.text)
    assert _files(broken) == before
    # (b) checkpoint 2's array data corrupted: resumed from epoch 1 with a warning, epoch 2
    # retrained, ending with the straight run's parameters (training is deterministic)
    damaged = tmp_path / "damaged"
    shutil.copytree(straight, damaged)
    data_files = _checkpoint_data_files(damaged / "checkpoints" / "2")
    assert data_files
    for path in data_files:
        path.write_bytes(b"\x00garbage" * 64)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vijax.vae_train"):
        vt.train_and_evaluate(config, damaged, resume=True, progress=False)
    assert re.search(r"checkpoint \S*checkpoints/2 skipped: it cannot be read", caplog.text)
    assert re.search(r"resuming \S*damaged from epoch 1; its metrics are truncated",
                     caplog.text)
    assert (damaged / "skipped_checkpoints" / "2").is_dir()
    rows_a, rows_b = vt.read_metrics(straight), vt.read_metrics(damaged)
    assert [r["epoch"] for r in rows_b] == [0, 1, 2]
    assert rows_b[1] == rows_a[1] and rows_b[2]["test_elbo"] == rows_a[2]["test_elbo"]
    state_a, _ = vt.restore_checkpoint(straight, config)
    state_b, epoch_b = vt.restore_checkpoint(damaged, config)
    assert epoch_b == 2
    for a, b in zip(jax.tree.leaves(state_a), jax.tree.leaves(state_b)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_unreadable_metrics_or_config_files_are_named(tiny_runs, tmp_path):
    """Before: json's bare "Unterminated string ..." / "Expecting value: line 1 column 1"."""
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 0, "step": 0}\n{"epoch": 1, "st\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl, line 2: unreadable metrics row"):
        vt.read_metrics(tmp_path)
    copy = tmp_path / "copy"
    shutil.copytree(tiny_runs["straight"], copy)
    (copy / "config.json").write_text("")
    for call in (lambda: vt.restore_checkpoint(copy, tiny_runs["config"]),
                 lambda: vt.train_and_evaluate(tiny_runs["config"], copy, resume=True,
                                               progress=False)):
        with pytest.raises(ValueError, match=r"copy/config\.json is not valid JSON"):
            call()


def test_steps_with_a_non_finite_gradient_are_skipped_counted_and_stop_the_run(monkeypatch,
                                                                               tmp_path):
    """With max_consecutive_skips, a step whose gradient is NaN leaves the parameters as they
    were and is counted; before, one such step made them NaN for good."""
    original = vt.prepare_data

    def with_nan_images(rows):
        def prepare(config):
            dataset, train_images, test_binary = original(config)
            train_images = train_images.copy()
            train_images[rows, 10] = np.nan
            return dataset, train_images, test_binary
        return prepare

    config = vt.Config(dataset=vt.Digits(), latent_dim=2, hidden_sizes=(8,), epochs=1,
                       eval_num_samples=5, eval_iwae_ks=(1,), max_consecutive_skips=3)
    # one bad image: the one step whose batch holds it is skipped, the other 14 train
    monkeypatch.setattr(vt, "prepare_data", with_nan_images([0]))
    final = vt.train_and_evaluate(config, tmp_path / "one", progress=False)
    rows = vt.read_metrics(tmp_path / "one")
    assert rows[1]["skipped_steps"] == 1 and math.isfinite(rows[1]["train_objective"])
    assert rows[1]["test_elbo"] > rows[0]["test_elbo"]  # the finite steps did train
    assert math.isfinite(final["test_elbo"]) and final["steps"] == 15
    # every image bad: the run stops after the first epoch, before its checkpoint
    monkeypatch.setattr(vt, "prepare_data", with_nan_images(slice(None)))
    with pytest.raises(FloatingPointError, match=r"epoch 1: the last 15 training steps had a "
                                                 r"non-finite gradient .*max_consecutive_skips "
                                                 r"= 3\): the run stops"):
        vt.train_and_evaluate(config, tmp_path / "all", progress=False)
    assert not (tmp_path / "all" / "checkpoints" / "1").exists()
    with pytest.raises(ValueError, match="max_consecutive_skips must be >= 1"):
        vt.Config(max_consecutive_skips=0)


# ----------------------------------------------------------------------------------------------
# experiments/evaluate_log_px.py and the reproduction run's checkpoint
# ----------------------------------------------------------------------------------------------


def _load_script(name):
    spec = importlib.util.spec_from_file_location(
        name, REPO_ROOT / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_config_round_trips_through_config_json(tiny_runs):
    assert vt.load_config(tiny_runs["straight"]) == tiny_runs["config"]
    saved = vt.config_to_dict(tiny_runs["config"])
    with pytest.raises(ValueError, match="unknown configuration type 'Adam'"):
        vt.config_from_dict({**saved, "schedule": {"type": "Adam"}})
    with pytest.raises(ValueError, match="no field"):
        vt.config_from_dict({**saved, "momentum": 0.9})
    with pytest.raises(TypeError, match="saved"):
        vt.config_from_dict([saved])


def test_evaluate_log_px_quick_on_a_tiny_run(tiny_runs, tmp_path):
    evaluate = _load_script("evaluate_log_px")
    out = tmp_path / "eval"
    results = evaluate.main(["--workdir", str(tiny_runs["straight"]), "--out", str(out),
                             "--quick"])
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(results))
    for name in ("khat_histogram.png", "ais_convergence.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    is_ = results["importance_sampling"]
    assert is_["num_images"] == 20 and len(is_["khat"]) == 20
    assert sum(is_["khat_categories"].values()) == 20
    # IS with q is an IWAE bound: above the run's recorded test ELBO up to noise (the
    # tiny model's per-image ELBOs spread by a few nats; 20 images)
    final = json.loads((tiny_runs["straight"] / "final_metrics.json").read_text())
    assert is_["log_px"] > final["test_elbo"] - 3 * is_["log_px_se"]
    rounds = results["ais"]["rounds"]
    assert [r["num_temperatures"] for r in rounds] == [2, 4, 8]
    assert all(0 < r["acceptance_rate"] <= 1 for r in rounds)
    for r in results["bdmc_simulated"]["rounds"]:  # the sandwich: lower <= upper on average
        assert r["lower"] <= r["upper"] and r["gap"] >= 0
    assert results["meta"]["run_epoch"] == 2


def test_evaluate_log_px_rejects_bad_flags_before_any_work(tmp_path, capsys):
    evaluate = _load_script("evaluate_log_px")
    for argv, message in (
            (["--workdir", str(tmp_path), "--out", str(tmp_path / "o")], "no config.json"),
            (["--workdir", str(tmp_path), "--out", str(tmp_path / "o"), "--num-ais", "0"],
             "--num-ais must be >= 1"),
            (["--workdir", str(tmp_path), "--out", str(tmp_path / "o"), "--ais-tol", "nan"],
             "--ais-tol")):
        with pytest.raises(SystemExit) as info:
            evaluate.main(argv)
        assert info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err, err
    assert not (tmp_path / "o").exists()


def test_reproduction_checkpoint_reevaluates_to_its_recorded_test_elbo(mnist_dir):
    """The long IWAE-schedule run (experiments/vae.py --lr-schedule iwae) is kept outside the
    repository (its checkpoints are large): ``$VIJAX_IWAE_RUN`` or outputs/vae_iwae_3280."""
    import os  # noqa: PLC0415

    workdir = pathlib.Path(os.environ.get("VIJAX_IWAE_RUN",
                                          REPO_ROOT / "outputs" / "vae_iwae_3280"))
    if not (workdir / "checkpoints").is_dir():
        pytest.skip(f"no reproduction run at {workdir} (set VIJAX_IWAE_RUN to its work "
                    "directory)")
    config = vt.load_config(workdir)
    state, epoch = vt.restore_checkpoint(workdir, config)
    recorded = {row["epoch"]: row["test_elbo"] for row in vt.read_metrics(workdir)}
    assert epoch in recorded, (epoch, sorted(recorded)[-3:])
    dataset, _, test_binary = vt.prepare_data(config)
    model = vt.build_model(config, dataset.train_images)
    elbo = np.asarray(jax.jit(lambda p, k, x: vae.evaluate_bounds(
        k, p, model, x, num_samples=(), batch_size=500)["elbo"])(
        state.params, jax.random.key(123), jax.numpy.asarray(test_binary)), np.float64)
    se = elbo.std(ddof=1) / math.sqrt(elbo.size)  # another key: Monte Carlo and image noise
    assert abs(elbo.mean() - recorded[epoch]) < 4 * se + 0.05, (elbo.mean(), recorded[epoch], se)
