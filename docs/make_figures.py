"""Regenerate the figures of the documentation site from the experiments' code.

    python docs/make_figures.py            # EM and CAVI figures (about a minute), VAE figures copied
    python docs/make_figures.py --help

Writes PNGs into docs/figures/<topic>/, where the pages link to them:

* docs/figures/gmm_em/ from ``experiments/gmm_em.py`` (EM on Old Faithful, the synthetic run);
* docs/figures/cavi/   from ``experiments/cavi.py`` (Normal-Gamma, Bayesian GMM on Old Faithful);
* docs/figures/vae/    from the 200-epoch MNIST run of ``experiments/vae.py``.

The experiments run in a temporary folder; only their PNGs are copied. See --help for the VAE
choices: the full MNIST run takes about 10 minutes on a 2-core CPU, so by default its figures
are copied from the kept run in outputs/vae_mnist_cpu/ instead of re-trained.
"""

from __future__ import annotations

import argparse
import pathlib
import shutil
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIGURES = ROOT / "docs" / "figures"
VAE_RUN = ROOT / "outputs" / "vae_mnist_cpu"
VAE_PNGS = ("training_curves.png", "reconstructions.png", "samples.png")
EM_PNGS = ("old_faithful_em.png", "old_faithful_log_likelihood.png", "synthetic_em.png")
CAVI_PNGS = ("normal_gamma.png", "bgmm_old_faithful.png", "bgmm_elbo.png")


def _run(args: list[str]) -> None:
    print("+", " ".join(args), flush=True)
    subprocess.run([sys.executable, *args], cwd=ROOT, check=True)


def _copy(src_dir: pathlib.Path, names: tuple[str, ...], topic: str) -> None:
    dest = FIGURES / topic
    dest.mkdir(parents=True, exist_ok=True)
    for name in names:
        src = src_dir / name
        if not src.is_file():
            raise SystemExit(f"expected figure {src.name} was not written by the experiment")
        shutil.copyfile(src, dest / name)
        print(f"wrote docs/figures/{topic}/{name}", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="""Settings and run times (2-core CPU):
  EM      experiments/gmm_em.py with its defaults (100,000 synthetic points, 8 restarts):
          about 40 s. With --quick: --synthetic-n 20000, a few seconds faster to fit; the
          synthetic figure then shows a smaller sample than the page describes.
  CAVI    experiments/cavi.py with its defaults: about 20 s (--quick changes nothing).
  VAE     --vae copy (default): copy the figures of the kept 200-epoch run in
          outputs/vae_mnist_cpu/ (no training).
          --vae quick: QUICK SETTINGS, experiments/vae.py --quick (10 epochs, log p(x)
          with k = 1000 on 1000 test images; 1.5-3 min): the figures show a 10-epoch model,
          not the 200-epoch run the pages describe.
          --vae full: the pages' run, experiments/vae.py with its defaults (200 epochs,
          about 10 min), in a temporary folder; only its PNGs are copied.
          --vae skip: leave docs/figures/vae/ as it is.
  MNIST and Old Faithful are read from ../shared/data/ beside the repository (see the
  experiments' --help); nothing is downloaded.""")
    parser.add_argument("--quick", action="store_true",
                        help="quick settings for the EM synthetic run (see below)")
    parser.add_argument("--vae", choices=("copy", "quick", "full", "skip"), default="copy",
                        help="how to produce the VAE figures (default: copy)")
    parser.add_argument("--only", choices=("gmm_em", "cavi", "vae"), action="append",
                        help="regenerate only this topic (repeatable)")
    args = parser.parse_args(argv)
    topics = set(args.only or ("gmm_em", "cavi", "vae"))

    with tempfile.TemporaryDirectory(prefix="vijax_figures_") as tmp:
        tmp = pathlib.Path(tmp)
        if "gmm_em" in topics:
            out = tmp / "gmm_em"
            extra = ["--synthetic-n", "20000"] if args.quick else []
            _run(["experiments/gmm_em.py", "--out", str(out), *extra])
            _copy(out, EM_PNGS, "gmm_em")
        if "cavi" in topics:
            out = tmp / "cavi"
            _run(["experiments/cavi.py", "--out", str(out)])
            _copy(out, CAVI_PNGS, "cavi")
        if "vae" in topics and args.vae != "skip":
            if args.vae == "copy":
                if not all((VAE_RUN / name).is_file() for name in VAE_PNGS):
                    raise SystemExit(f"no kept run in {VAE_RUN.relative_to(ROOT)}: use --vae full")
                _copy(VAE_RUN, VAE_PNGS, "vae")
            elif args.vae == "quick":
                out = tmp / "vae_quick"
                _run(["experiments/vae.py", "--quick", "--no-progress", "--workdir", str(out)])
                _copy(out, VAE_PNGS, "vae")
            else:
                out = tmp / "vae_full"
                _run(["experiments/vae.py", "--no-progress", "--workdir", str(out)])
                _copy(out, VAE_PNGS, "vae")


if __name__ == "__main__":
    main()
