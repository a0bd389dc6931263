"""Seed 001's study: WGAN with RMSprop, Adam and SGD, each with plain (DCGAN-style), residual and
densely connected G and D -- a 3 x 3 grid on the same data, generator steps and seeds (`make wgan-grid`).

    python -m replearn wgan-grid preset=smoke data=... train=... test=...

Each cell trains one keyed `pretrain` run per seed (model=wgan with the cell's optimizer and arch, one
learning rate for every optimizer: Arjovsky's code passes one lrD/lrG to whichever optimizer is chosen,
Adam with his beta1 0.5), every run `steps` generator steps, measured by `study.measure` at that step:
critic and generator loss, the Wasserstein estimate, diversity, FID (with local Inception weights) and
the linear probe with its untrained control. The gain column compares each cell's probe with the trained
RMSprop x plain cell (seed 001's baseline), with a noise mark (study_tables.py).
Writes `<tables_dir>/wgan-grid-<preset>.md/.csv/.tex` (one row per cell: mean +- std over seeds, each row
saying its scale, steps, seeds, flags, data, commit and how it was produced; the csv keeps every seed; the
seed paper's quoted findings below) and `<tables_dir>/wgan-grid-<preset>/`: one figure per measure with
every cell's seeds on shared axes, and a 3 x 3 mosaic of the first seed's samples at the measured step
(rows optimizers, columns architectures). A cell that diverges is a row that says so, with the step.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from . import study, study_tables
from ..core.config import ConfigError, register_check, register_preset, require
from ..train.pretrain import OPTIMIZERS
from ..models.zoo import ARCHS
from ..core.utils import lookup

ARCH_NAMES = {"dcgan": "plain (DCGAN)", "resnet": "residual", "dense": "dense"}
ARCH_COLOURS = {"dcgan": "tab:blue", "resnet": "tab:orange", "dense": "tab:green"}
OPTIMIZER_LINES = {"rmsprop": "-", "adam": "--", "sgd": ":"}


@dataclass(frozen=True)
class Config(study.Study):
    optimizers: tuple[str, ...] = ("rmsprop", "adam", "sgd")
    archs: tuple[str, ...] = ("dcgan", "resnet", "dense")   # plain, residual, densely connected G and D
    lr: float = 5e-5              # WGAN's RMSprop rate (Arjovsky), the same for every optimizer: the controlled variable
    lrs: tuple[float, ...] = ()   # one per optimizer, overriding `lr` (empty: `lr` for all)
    beta1: float = 0.5            # Adam (Arjovsky's --adam); beta2 0.999
    momentum: float = 0.0         # RMSprop and SGD (plain SGD, as the seed)
    name: str = "wgan-grid"


@register_check(Config)
def check_config(cfg: Config) -> None:
    study.check_study(cfg)
    for opt in cfg.optimizers:
        lookup(OPTIMIZERS, opt, "optimizer")
    for arch in cfg.archs:
        lookup(ARCHS, arch, "architecture")
    if cfg.lrs and len(cfg.lrs) != len(cfg.optimizers):
        raise ConfigError(f"lrs={cfg.lrs} needs one learning rate per optimizer ({', '.join(cfg.optimizers)})")
    require(cfg, positive=("lr", "lrs"), non_negative=("momentum",), stage="wgan-grid")


# presets. Every cell trains the same generator steps (equal work), once per seed; max_minutes is only a cap.
# tiny: the test's whole grid in seconds, one seed (numbers mean nothing). smoke: 200 G steps a GAN at a
# quarter width, no 100-step warm-up (it alone is 2,500 critic steps), 3 seeds; 200 is about what the slowest
# cell (dense) trains in the old 2.5-minute budget plus half (~1.15 s a step on 2 cores: ~4 min), it is an
# interval checkpoint of runs trained further under that budget (reused, measured there), and the 10-minute
# cap is 2.5x the slowest cell's need; probes at 4 checkpoints on small splits: ~2 h on 2 cores. paper: 100
# epochs of CIFAR-10 at batch 64 and 5 critic batches per G step (15,600 G steps) per GAN, full width, GPU-sized.
register_preset("tiny", "wgan-grid", wgan_loss="wgan-no-warmup", quality_samples=32, probe_steps=(), steps=2,
                seeds=(0,), pretrain_args="width=0.125 batch_size=16 precision=fp32 sample_every=1 ckpt_every=1",
                probe_args="per_class=10 val_size=40 select_draws=1 final_draws=2 train_rows=0 test_rows=0")
register_preset("smoke", "wgan-grid", wgan_loss="wgan-no-warmup", quality_samples=500, probe_steps=(20, 100),
                steps=200, max_minutes=10.0, seeds=(0, 1, 2),
                pretrain_args="width=0.25 sample_every=50 ckpt_every=100 log_every=5",
                probe_args="train_rows=6000 test_rows=2000 val_size=1000 select_draws=2 final_draws=3")
register_preset("paper", "wgan-grid", steps=15600, seeds=(0, 1, 2), pretrain_args="ckpt_every=1000 sample_every=500")

# the gain column's reference: the trained RMSprop x plain cell, seed 001's baseline (WGAN as published)
REFERENCE = ("rmsprop", "dcgan")
REFERENCE_NAME = "RMSprop x plain"


def cell_values(cfg: Config, opt: str, arch: str) -> dict:
    lr = cfg.lrs[cfg.optimizers.index(opt)] if cfg.lrs else cfg.lr
    return {"model": "wgan", "loss": cfg.wgan_loss, "arch": arch, "optimizer": opt, "lr_g": lr, "lr_d": lr,
            "beta1": cfg.beta1, "beta2": 0.999, "momentum": cfg.momentum}


def row(cfg: Config, sc: study.StudyCell, ref: study.StudyCell | None, opt: str, arch: str) -> dict:
    """Display columns (COLUMNS) and the csv's numeric ones (per-seed values, gains, noise)."""
    numeric: dict = {}
    shown = {"optimizer": opt, "architecture": ARCH_NAMES.get(arch, arch)}
    for column, name, spec in (("critic loss", "critic_loss", ".3g"), ("generator loss", "generator_loss", ".3g"),
                               ("diversity", "diversity", ".3g"), ("FID", "fid", ".1f")):
        shown[column], got = study_tables.measure_column(sc, name, spec)
        numeric.update(got)
    shown["Wasserstein estimate"], got = study_tables.wasserstein_column(sc)
    numeric.update(got)
    if not cfg.inception_weights:
        shown["FID"] = "n/a (no inception_weights)"
    probe_shown, probe_numeric = study_tables.probe_columns(sc, ref, REFERENCE_NAME) if cfg.probe else ({}, {})
    return {**shown, **probe_shown, **study_tables.gan_columns(cfg, "wgan-grid", sc),
            "how produced": study_tables.how_produced(cfg, sc), **numeric, **probe_numeric}


def columns(cfg: Config) -> list[str]:
    probe = (["linear probe (%)", "test ±", f"gain vs {REFERENCE_NAME}", "untrained control (%)",
              "gain over own control"] if cfg.probe else [])
    return (["optimizer", "architecture", "scale", "steps", "seeds", "status", "critic loss", "generator loss",
             "Wasserstein estimate", "diversity", "FID"] + probe + ["flags", "data", "commit", "how produced"])


def intro(cfg: Config, figures: str) -> str:
    scale_note = study.scale_and_data_note(cfg, "cell")
    reference = (f"{REFERENCE_NAME} (the trained RMSprop x plain-DCGAN cell, seed 001's WGAN baseline)"
                 if REFERENCE[0] in cfg.optimizers and REFERENCE[1] in cfg.archs else "not run: no gains")
    probe = (" " + study_tables.noise_note(reference, f"gain vs {REFERENCE_NAME}") if cfg.probe
             else " The linear probe was not run (probe=false).")
    return (f"Seed 001's study: WGAN (weight clipping, loss `{cfg.wgan_loss}`) with each optimizer and each "
            f"G/D architecture, on the same data, steps and seeds.{scale_note} {study_tables.QUALITY_NOTE}{probe}\n\n"
            f"Figures (every cell on shared axes, one line per seed): {figures}")


def run(cfg: Config) -> Path:
    """Train and measure the optimizer x architecture grid of WGANs -> tables/wgan-grid-<preset>.md."""
    root, out_dir = study.root_of(cfg), Path(cfg.tables_dir)
    name = f"{cfg.name}-{cfg.preset}"
    ctx = study.quality_context(cfg)
    pairs = [(opt, arch) for opt in cfg.optimizers for arch in cfg.archs]
    cells = [study.measure_cell(cfg, ctx, f"{opt} x {arch}", cell_values(cfg, opt, arch), root)
             for opt, arch in pairs]
    ref = dict(zip(pairs, cells)).get(REFERENCE)
    rows = [row(cfg, sc, ref, opt, arch) for sc, (opt, arch) in zip(cells, pairs)]
    styles = {sc.label: {"color": ARCH_COLOURS.get(arch), "linestyle": OPTIMIZER_LINES.get(opt)}
              for sc, (opt, arch) in zip(cells, pairs)}
    figures = study.plot_all(cells, styles, out_dir / name, f"WGAN grid ({cfg.preset})")
    grid = [[sc.first for sc in cells[i * len(cfg.archs):(i + 1) * len(cfg.archs)]] for i in range(len(cfg.optimizers))]
    figures.append(study.sample_mosaic(grid, out_dir / name / "samples.png",
                                         f"WGAN grid ({cfg.preset}): samples of seed {cfg.seeds[0]}",
                                         list(cfg.optimizers), [ARCH_NAMES.get(a, a) for a in cfg.archs]))
    return study_tables.write(cfg, out_dir, name, "WGAN: optimizer x architecture (seed 001)",
                              intro(cfg, study.figure_links(figures, out_dir)), rows, columns(cfg),
                              study_tables.quoted_rows("wgan-grid"))


__all__ = ["Config", "run"]
