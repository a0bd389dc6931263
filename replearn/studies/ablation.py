"""Seed 004's ablation ladder: WGAN -> + residual blocks -> + spectral norm -> + self-attention,
cumulative, on the same data, generator steps and seeds, plus DCGAN as the paper's comparison row
(`make ablation`).

    python -m replearn ablation preset=smoke data=... train=... test=... [augment=true]

Each rung is a named variant (study.VARIANTS), trained once per seed by the keyed `pretrain` stage for
the study's `steps` and measured at that step by `study.measure` (FID with local Inception weights, the
Wasserstein estimate -- for DCGAN's BCE critic a logit gap, labelled so and plotted apart --, diversity,
the linear probe with its untrained control). The gain column compares each rung's probe with the plain
WGAN rung (the ladder's base), with a noise mark (study_tables.py). With `augment=true` the
augmentation study (augment.py) runs for the same variants and its test accuracy fills its column;
otherwise that column says it was not run. Writes `<tables_dir>/ablation-<preset>.md/.csv/.tex` (the
seed paper's quoted numbers below the rows) and `<tables_dir>/ablation-<preset>/` (one figure per
measure, every rung's seeds on shared axes; the first seed's samples side by side).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from . import study, study_tables
from ..core.config import ConfigError, build, register_check, register_preset
from ..core.utils import lookup

LADDER = ("wgan", "wgan+res", "wgan+res+sn", "wgan+res+sn+sa")


@dataclass(frozen=True)
class Config(study.Study):
    rungs: tuple[str, ...] = ("dcgan",) + LADDER   # variants, one row each (study.VARIANTS)
    augment: bool = False          # also run the augmentation study for these variants (its own GANs per class)
    augment_args: str = ""         # extra key=value words for it (classes=, per_class=, seeds=, ...)
    name: str = "ablation"


@register_check(Config)
def check_config(cfg: Config) -> None:
    study.check_study(cfg)
    if not cfg.rungs:
        raise ConfigError("ablation: rungs is empty; choose from: " + ", ".join(study.VARIANTS))
    for rung in cfg.rungs:
        lookup(study.VARIANTS, rung, "variant")


# the same scales as the grid (steps, seeds, widths), so a rung that equals a grid cell (plain WGAN with
# RMSprop) is the same run; the reasons for each step count are beside the grid's presets (wgan_grid.py)
register_preset("tiny", "ablation", wgan_loss="wgan-no-warmup", quality_samples=32, steps=2, seeds=(0,),
                pretrain_args="width=0.125 batch_size=16 precision=fp32 sample_every=1 ckpt_every=1",
                probe_args="per_class=10 val_size=40 select_draws=1 final_draws=2 train_rows=0 test_rows=0")
register_preset("smoke", "ablation", wgan_loss="wgan-no-warmup", quality_samples=500, probe_steps=(100,),
                steps=200, max_minutes=10.0, seeds=(0, 1, 2),
                pretrain_args="width=0.25 sample_every=50 ckpt_every=100 log_every=5",
                probe_args="train_rows=6000 test_rows=2000 val_size=1000 select_draws=2 final_draws=3")
register_preset("paper", "ablation", steps=15600, seeds=(0, 1, 2), pretrain_args="ckpt_every=1000 sample_every=500")

REFERENCE = "wgan"        # the gain column's reference: the trained plain-WGAN rung, the ladder's base
ADDED = {"res": "+ residual blocks", "sn": "+ spectral norm", "sa": "+ self-attention"}


def role(rung: str, previous: str | None) -> str:
    if rung == "dcgan":
        return "comparison (BCE loss, not a WGAN)"
    if rung == REFERENCE:
        return "reference; ladder base"
    step = ADDED.get(rung.split("+")[-1], rung)
    return f"ladder: {previous} {step}" if previous else f"ladder {step}"


def augmentation(cfg: Config) -> dict[str, dict]:
    """{method: summary} of the augmentation study run for these rungs ('none' as its baseline)."""
    if not cfg.augment:
        return {}
    from . import augment
    values = {"preset": cfg.preset, "train": cfg.train, "test": cfg.test, "build_dir": cfg.build_dir,
              "tables_dir": cfg.tables_dir, "cache_dir": cfg.cache_dir, "wgan_loss": cfg.wgan_loss,
              "data_note": cfg.data_note, "device": cfg.device, "methods": ("none",) + tuple(cfg.rungs),
              **study.words(cfg.augment_args)}
    aug_cfg = build(augment.Config, "augment", values)
    summaries = augment.run_study(aug_cfg)
    augment.write(aug_cfg, summaries)          # its own table too: tables/augment-<preset>.md
    return {s["method"]: s for s in summaries}


def row(cfg: Config, rung: str, previous: str | None, sc: study.StudyCell, ref: study.StudyCell | None,
        aug: dict) -> dict:
    """Display columns (columns()) and the csv's numeric ones (per-seed values, gains, noise)."""
    aug_text = "not run (augment=true runs it)"
    if aug:
        got = aug.get(rung)
        aug_text = f"{got['accuracy']}; gain vs no augmentation {got['gain_text']}" if got else "-"
    shown, numeric = {"model": sc.label, "role": role(rung, previous)}, {}
    shown["FID"], got_fid = study_tables.measure_column(sc, "fid", ".1f")
    if not cfg.inception_weights:
        shown["FID"] = "n/a (no inception_weights)"
    shown["Wasserstein estimate"], got_w = study_tables.wasserstein_column(sc)
    shown["diversity"], got_d = study_tables.measure_column(sc, "diversity")
    for got in (got_fid, got_w, got_d):
        numeric.update(got)
    probe_shown, probe_numeric = study_tables.probe_columns(sc, ref, "WGAN") if cfg.probe else ({}, {})
    return {**shown, **probe_shown, "augmentation accuracy": aug_text,
            **study_tables.gan_columns(cfg, "ablation", sc), "how produced": study_tables.how_produced(cfg, sc),
            **numeric, **probe_numeric}


def columns(cfg: Config) -> list[str]:
    probe = (["linear probe (%)", "test ±", "gain vs WGAN", "untrained control (%)", "gain over own control"]
             if cfg.probe else [])
    return (["model", "role", "scale", "steps", "seeds", "status", "FID", "Wasserstein estimate", "diversity"] + probe
            + ["augmentation accuracy", "flags", "data", "commit", "how produced"])


def intro(cfg: Config, figures: str) -> str:
    scale_note = study.scale_and_data_note(cfg, "rung")
    aug = (" Augmentation accuracy: MobileNetV2 test accuracy (mean ± std over classifier seeds) when the real "
           "labelled subset is extended by images of that variant's GANs, one GAN per class trained on that subset "
           "(tables/augment-<preset>.md says how), and its gain over no augmentation." if cfg.augment else "")
    reference = ("WGAN: the trained plain-WGAN rung" if REFERENCE in cfg.rungs else "not run: no gains")
    probe = (" " + study_tables.noise_note(reference, "gain vs WGAN") if cfg.probe
             else " The linear probe was not run (probe=false).")
    return (f"Seed 004's ablation: WGAN (loss `{cfg.wgan_loss}`) with residual blocks, spectral norm and "
            f"self-attention added one at a time (cumulative), beside DCGAN, on the same data, steps and seeds."
            f"{scale_note} {study_tables.QUALITY_NOTE}{probe}{aug}\n\n"
            f"Figures (every rung on shared axes, one line per seed; the Wasserstein figures hold the WGAN critics "
            f"only, DCGAN's logit gap has figures of its own): {figures}")


def run(cfg: Config) -> Path:
    """Train and measure the ablation ladder -> tables/ablation-<preset>.md."""
    root, out_dir = study.root_of(cfg), Path(cfg.tables_dir)
    name = f"{cfg.name}-{cfg.preset}"
    ctx = study.quality_context(cfg)
    cells = []
    for rung in cfg.rungs:
        label, values = study.variant_values(rung, cfg.wgan_loss)
        cells.append(study.measure_cell(cfg, ctx, label, values, root))
    ref = dict(zip(cfg.rungs, cells)).get(REFERENCE)
    aug = augmentation(cfg)
    ladder = [r for r in cfg.rungs if r in LADDER]
    rows = [row(cfg, rung, ladder[ladder.index(rung) - 1] if rung in ladder and ladder.index(rung) else None,
                sc, ref, aug) for rung, sc in zip(cfg.rungs, cells)]
    figures = study.plot_all(cells, {}, out_dir / name, f"ablation ({cfg.preset})")
    figures.append(study.sample_mosaic([[sc.first for sc in cells]], out_dir / name / "samples.png",
                                         f"ablation ({cfg.preset}): samples of seed {cfg.seeds[0]}", [""],
                                         [sc.label for sc in cells]))
    return study_tables.write(cfg, out_dir, name, "Ablation: WGAN + residual + spectral norm + self-attention "
                              "(seed 004)", intro(cfg, study.figure_links(figures, out_dir)), rows, columns(cfg),
                              study_tables.quoted_rows("ablation"))


__all__ = ["Config", "run"]
