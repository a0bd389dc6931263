"""Seed 004's ablation ladder: WGAN -> + residual blocks -> + spectral norm -> + self-attention,
cumulative, on the same data and budget, plus DCGAN and plain WGAN as the paper's comparison rows
(`make ablation`).

    python -m replearn ablation preset=smoke data=... train=... test=... [augment=true]

Each rung is a named variant (studies.VARIANTS), trained by the keyed `pretrain` stage and measured
by `studies.measure` (FID with local Inception weights, the Wasserstein estimate, diversity, the
linear probe with its untrained control). The plain-WGAN comparison row and the ladder's first rung
are the same run. With `augment=true` the augmentation study (augment.py) runs for the same variants
and its test accuracy fills the last column; otherwise that column says it was not run.
Writes `<tables_dir>/ablation-<preset>.md/.csv/.tex` and `<tables_dir>/ablation-<preset>/` (one
figure per measure, every rung on shared axes; the rungs' latest samples side by side).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from . import studies
from .config import ConfigError, build, register_check, register_preset
from .utils import lookup

LADDER = ("wgan", "wgan+res", "wgan+res+sn", "wgan+res+sn+sa")


@dataclass(frozen=True)
class Config(studies.Study):
    rungs: tuple[str, ...] = ("dcgan",) + LADDER   # variants, one row each (studies.VARIANTS)
    augment: bool = False          # also run the augmentation study for these variants (its own GANs per class)
    augment_args: str = ""         # extra key=value words for it (classes=, per_class=, seeds=, ...)
    name: str = "ablation"


@register_check(Config)
def check_config(cfg: Config) -> None:
    studies.check_study(cfg)
    if not cfg.rungs:
        raise ConfigError("ablation: rungs is empty; choose from: " + ", ".join(studies.VARIANTS))
    for rung in cfg.rungs:
        lookup(studies.VARIANTS, rung, "variant")


# the same scales as the grid, so a rung that equals a grid cell (plain WGAN with RMSprop) is the same run
register_preset("tiny", "ablation", wgan_loss="wgan-no-warmup", quality_samples=32,
                pretrain_args="steps=2 width=0.125 batch_size=16 precision=fp32 sample_every=1 ckpt_every=1",
                probe_args="per_class=10 val_size=40 select_draws=1 final_draws=2 train_rows=0 test_rows=0")
register_preset("smoke", "ablation", wgan_loss="wgan-no-warmup", quality_samples=500, probe_steps=(100,),
                pretrain_args="steps=1000 max_minutes=2.5 width=0.25 sample_every=50 ckpt_every=100 log_every=5",
                probe_args="train_rows=6000 test_rows=2000 val_size=1000 select_draws=2 final_draws=3")
register_preset("paper", "ablation", pretrain_args="steps=15600 ckpt_every=1000 sample_every=500")


ADDED = {"res": "+ residual blocks", "sn": "+ spectral norm", "sa": "+ self-attention"}


def role(rung: str, previous: str | None) -> str:
    if rung == "dcgan":
        return "comparison"
    if rung == "wgan":
        return "comparison; ladder base"
    step = ADDED.get(rung.split("+")[-1], rung)
    return f"ladder: {previous} {step}" if previous else f"ladder {step}"


def augmentation(cfg: Config) -> dict[str, dict]:
    """{method: summary} of the augmentation study run for these rungs ('none' as its baseline)."""
    if not cfg.augment:
        return {}
    from . import augment
    values = {"preset": cfg.preset, "train": cfg.train, "test": cfg.test, "build_dir": cfg.build_dir,
              "tables_dir": cfg.tables_dir, "cache_dir": cfg.cache_dir, "wgan_loss": cfg.wgan_loss,
              "device": cfg.device, "methods": ("none",) + tuple(cfg.rungs), **studies.words(cfg.augment_args)}
    aug_cfg = build(augment.Config, "augment", values)
    summaries = augment.study(aug_cfg)
    augment.write(aug_cfg, summaries)          # its own table too: tables/augment-<preset>.md
    return {s["method"]: s for s in summaries}


def row(cfg: Config, rung: str, previous: str | None, cell: studies.Cell, measured: dict, aug: dict) -> dict:
    end = measured["end"]
    aug_text = "not run (augment=true runs it)"
    if aug:
        got, base = aug.get(rung), aug.get("none")
        aug_text = f"{got['accuracy']} (no augmentation: {base['accuracy']})" if got and base else "-"
    return {"model": cell.label, "role": role(rung, previous), "status": studies.status(cell, end),
            "FID": studies.fmt(end.get("fid"), ".1f") if cfg.inception_weights else "n/a (no inception_weights)",
            "Wasserstein estimate": studies.fmt(end.get("wasserstein")), "diversity": studies.fmt(end.get("diversity")),
            "linear probe": studies.percent(end.get("probe")), "untrained control": studies.percent(end.get("control")),
            "gain (points)": studies.gain(end), "augmentation accuracy": aug_text,
            "how produced": studies.how_produced(cfg, cell, measured)}


def intro(cfg: Config, figures: str) -> str:
    scale_note = studies.scale_and_data_note(cfg, "rung")
    aug = (" Augmentation accuracy: MobileNetV2 test accuracy (mean +- std over seeds) when the real labelled subset "
           "is extended by images of that variant's GANs, one GAN per class trained on that subset "
           "(tables/augment-<preset>.md says how)." if cfg.augment else "")
    return (f"Seed 004's ablation: WGAN (loss `{cfg.wgan_loss}`) with residual blocks, spectral norm and "
            f"self-attention added one at a time, beside DCGAN.{scale_note} {studies.QUALITY_NOTE}{aug}\n\n"
            f"Figures (every rung on shared axes): {figures}")


def run(cfg: Config) -> Path:
    """Train and measure the ablation ladder -> tables/ablation-<preset>.md."""
    root, out_dir = studies.root_of(cfg), Path(cfg.tables_dir)
    name = f"{cfg.name}-{cfg.preset}"
    ctx = studies.quality_context(cfg)
    cells, measured = [], []
    for rung in cfg.rungs:
        label, values = studies.variant_values(rung, cfg.wgan_loss)
        cells.append(studies.pretrain_cell(label, studies.pretrain_values(cfg, values), root))
        measured.append(studies.measure(cfg, ctx, cells[-1]))
    aug = augmentation(cfg)
    ladder = [r for r in cfg.rungs if r in LADDER]
    rows = [row(cfg, rung, ladder[ladder.index(rung) - 1] if rung in ladder and ladder.index(rung) else None,
                cell, m, aug) for rung, cell, m in zip(cfg.rungs, cells, measured)]
    figures = studies.plot_all(cells, measured, {}, out_dir / name, f"ablation ({cfg.preset})")
    figures.append(studies.sample_mosaic([cells], out_dir / name / "samples.png", f"ablation ({cfg.preset}): samples",
                                         [""], [c.label for c in cells]))
    studies.study_record(cfg, out_dir, name, rows)
    return studies.write_table(rows, out_dir, name, "Ablation: WGAN + residual + spectral norm + self-attention "
                               "(seed 004)", intro(cfg, studies.figure_links(figures, out_dir)))


__all__ = ["Config", "run"]
