"""Seed 001's study: WGAN with RMSprop, Adam and SGD, each with plain (DCGAN-style), residual and
densely connected G and D -- a 3 x 3 grid on the same data, budget and seed (`make wgan-grid`).

    python -m replearn wgan-grid preset=smoke data=... train=... test=...

Each cell is a keyed `pretrain` run (model=wgan with the cell's optimizer and arch, one learning rate
for every optimizer: Arjovsky's code passes one lrD/lrG to whichever optimizer is chosen, Adam with
his beta1 0.5), measured by `studies.measure`: critic and generator loss, the Wasserstein estimate,
diversity, FID (with local Inception weights) and the linear probe with its untrained control.
Writes `<tables_dir>/wgan-grid-<preset>.md/.csv/.tex` (one row per cell, each saying how it was
produced) and `<tables_dir>/wgan-grid-<preset>/`: one figure per measure with the nine curves on
shared axes, and a 3 x 3 mosaic of the cells' latest samples (rows optimizers, columns architectures).
A cell that diverges is a row that says so, with the step.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from . import studies
from .config import ConfigError, register_check, register_preset, require
from .pretrain import OPTIMIZERS
from .zoo import ARCHS
from .utils import lookup

ARCH_NAMES = {"dcgan": "plain (DCGAN)", "resnet": "residual", "dense": "dense"}
ARCH_COLOURS = {"dcgan": "tab:blue", "resnet": "tab:orange", "dense": "tab:green"}
OPTIMIZER_LINES = {"rmsprop": "-", "adam": "--", "sgd": ":"}


@dataclass(frozen=True)
class Config(studies.Study):
    optimizers: tuple[str, ...] = ("rmsprop", "adam", "sgd")
    archs: tuple[str, ...] = ("dcgan", "resnet", "dense")   # plain, residual, densely connected G and D
    lr: float = 5e-5              # WGAN's RMSprop rate (Arjovsky), the same for every optimizer: the controlled variable
    lrs: tuple[float, ...] = ()   # one per optimizer, overriding `lr` (empty: `lr` for all)
    beta1: float = 0.5            # Adam (Arjovsky's --adam); beta2 0.999
    momentum: float = 0.0         # RMSprop and SGD (plain SGD, as the seed)
    name: str = "wgan-grid"


@register_check(Config)
def check_config(cfg: Config) -> None:
    studies.check_study(cfg)
    for opt in cfg.optimizers:
        lookup(OPTIMIZERS, opt, "optimizer")
    for arch in cfg.archs:
        lookup(ARCHS, arch, "architecture")
    if cfg.lrs and len(cfg.lrs) != len(cfg.optimizers):
        raise ConfigError(f"lrs={cfg.lrs} needs one learning rate per optimizer ({', '.join(cfg.optimizers)})")
    require(cfg, positive=("lr", "lrs"), non_negative=("momentum",), stage="wgan-grid")


# presets. tiny: the test's whole grid in seconds (numbers mean nothing). smoke: ~2.5 CPU minutes of
# pretraining per cell at a quarter width, no 100-step warm-up (it alone is 2,500 critic steps), probes at
# 4 checkpoints on small splits -- about 40 min on 2 cores. paper: 100 epochs of CIFAR-10 at batch 64 and
# 5 critic batches per G step (~15,600 G steps) per cell, at full width, GPU-sized.
register_preset("tiny", "wgan-grid", wgan_loss="wgan-no-warmup", quality_samples=32, probe_steps=(),
                pretrain_args="steps=2 width=0.125 batch_size=16 precision=fp32 sample_every=1 ckpt_every=1",
                probe_args="per_class=10 val_size=40 select_draws=1 final_draws=2 train_rows=0 test_rows=0")
register_preset("smoke", "wgan-grid", wgan_loss="wgan-no-warmup", quality_samples=500, probe_steps=(20, 100),
                pretrain_args="steps=1000 max_minutes=2.5 width=0.25 sample_every=50 ckpt_every=100 log_every=5",
                probe_args="train_rows=6000 test_rows=2000 val_size=1000 select_draws=2 final_draws=3")
register_preset("paper", "wgan-grid", pretrain_args="steps=15600 ckpt_every=1000 sample_every=500")


def cell_values(cfg: Config, opt: str, arch: str) -> dict:
    lr = cfg.lrs[cfg.optimizers.index(opt)] if cfg.lrs else cfg.lr
    return studies.pretrain_values(cfg, {"model": "wgan", "loss": cfg.wgan_loss, "arch": arch, "optimizer": opt,
                                         "lr_g": lr, "lr_d": lr, "beta1": cfg.beta1, "beta2": 0.999,
                                         "momentum": cfg.momentum})


def row(cfg: Config, cell: studies.Cell, measured: dict, opt: str, arch: str) -> dict:
    end = measured["end"]
    return {"optimizer": opt, "architecture": ARCH_NAMES.get(arch, arch), "status": studies.status(cell, end),
            "critic loss": studies.fmt(end.get("critic_loss")), "generator loss": studies.fmt(end.get("generator_loss")),
            "Wasserstein estimate": studies.fmt(end.get("wasserstein")), "diversity": studies.fmt(end.get("diversity")),
            "FID": studies.fmt(end.get("fid"), ".1f") if cfg.inception_weights else "n/a (no inception_weights)",
            "linear probe": studies.percent(end.get("probe")), "untrained control": studies.percent(end.get("control")),
            "gain (points)": studies.gain(end), "how produced": studies.how_produced(cfg, cell, measured)}


def intro(cfg: Config, figures: str) -> str:
    scale_note = studies.scale_and_data_note(cfg, "cell")
    return (f"Seed 001's study: WGAN (weight clipping, loss `{cfg.wgan_loss}`) with each optimizer and each "
            f"G/D architecture, the same data, budget and seed.{scale_note} {studies.QUALITY_NOTE}\n\n"
            f"Figures (nine curves on shared axes each): {figures}")


def run(cfg: Config) -> Path:
    """Train and measure the optimizer x architecture grid of WGANs -> tables/wgan-grid-<preset>.md."""
    root, out_dir = studies.root_of(cfg), Path(cfg.tables_dir)
    name = f"{cfg.name}-{cfg.preset}"
    ctx = studies.quality_context(cfg)
    cells, measured, rows = [], [], []
    for opt in cfg.optimizers:
        for arch in cfg.archs:
            cell = studies.pretrain_cell(f"{opt} x {arch}", cell_values(cfg, opt, arch), root)
            cells.append(cell)
            measured.append(studies.measure(cfg, ctx, cell))
            rows.append(row(cfg, cell, measured[-1], opt, arch))
    styles = {c.label: {"color": ARCH_COLOURS.get(arch), "linestyle": OPTIMIZER_LINES.get(opt)}
              for c, (opt, arch) in zip(cells, [(o, a) for o in cfg.optimizers for a in cfg.archs])}
    figures = studies.plot_all(cells, measured, styles, out_dir / name, f"WGAN grid ({cfg.preset})")
    grid = [cells[i * len(cfg.archs):(i + 1) * len(cfg.archs)] for i in range(len(cfg.optimizers))]
    figures.append(studies.sample_mosaic(grid, out_dir / name / "samples.png", f"WGAN grid ({cfg.preset}): samples",
                                         list(cfg.optimizers), [ARCH_NAMES.get(a, a) for a in cfg.archs]))
    studies.study_record(cfg, out_dir, name, rows)
    return studies.write_table(rows, out_dir, name, "WGAN: optimizer x architecture (seed 001)",
                               intro(cfg, studies.figure_links(figures, out_dir)))


__all__ = ["Config", "run"]
