"""Seed 004's augmentation study: generated images as extra training data for a classifier
(`replearn augment`, `make augment`).

    python -m replearn augment preset=smoke train=... test=... classes=0,1,2 per_class=400

1. `subset`: a small labelled set (`per_class` real images of each of `classes`) and the test split
   filtered to the same classes, labels 0..K-1;
2. for each GAN method (a variant of study.VARIANTS: dcgan, wgan, wgan+res+sn+sa, ...): one GAN per
   class, trained by the keyed `pretrain` stage on that class's real images only;
3. `generate`: `generated_per_class` images from each class's GAN -> one labelled parquet file;
4. `classify`: MobileNetV2 (classifier_args='arch=resnet18' for ResNet-18) trained on real images
   only (method `none`), real images with traditional augmentation (`traditional`: flips, crops, colour
   jitter), or real + generated images (each GAN method), once per seed, scored on the test split.
Writes `<tables_dir>/augment-<preset>.md/.csv/.tex`: one row per method, test accuracy as mean +- std
over the classifier seeds (GANs and generated images fixed), the per-class N, and how it was produced;
`<tables_dir>/augment-<preset>/generated.png` shows each method's generated images per class. Every
artifact is keyed and reused (a rerun is a no-op; a new seed trains only its classifiers).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..data import subset
from ..train import generate, runs
from ..probe import classifier
from . import study, study_tables
from ..core.config import ConfigError, build, register_check, register_preset, require
from ..core.utils import lookup

REFERENCE = "none"          # the gain column's reference: the classifier on real images only
BASELINES = {"none": "no augmentation (real images only)",
             "traditional": "traditional augmentation (flips, crops, colour jitter)"}


@dataclass(frozen=True)
class Config:
    preset: str = "paper"
    train: str = study.CIFAR_TRAIN   # labelled images: the real subset (and each class's GAN data) come from it
    test: str = study.CIFAR_TEST     # scored split, filtered to the same classes
    classes: tuple[int, ...] = ()      # labels kept (-> 0..K-1); empty = every class
    per_class: int = 1000              # real labelled images per class (seed 004: 1207 and 664 of its two classes)
    generated_per_class: int = 2000    # seed 004: each class expanded with 2000 generated images
    methods: tuple[str, ...] = ("none", "traditional", "dcgan", "wgan", "wgan+res+sn+sa")   # table rows
    seeds: tuple[int, ...] = (0, 1, 2)  # the spread of each row: seed s trains the classifier with seed s, and
                                       # (paired_seeds) each class's GAN with seed s, generating its images
    paired_seeds: bool = True          # false: every classifier seed uses the same GANs (pretrain_args seed, or 0)
    wgan_loss: str = "wgan"            # for the WGAN-family variants (wgan-no-warmup at CPU scale)
    # equal work: generator steps of every per-class GAN, which generates from its checkpoint of that step.
    # Seed 004's "10,000 epochs of iterations", read as generator steps
    gan_steps: int = 10000
    gan_max_minutes: float = 0.0       # safety cap on each GAN's training minutes (0: none); hitting it first
                                       # makes the row "not comparable"
    pretrain_args: str = ""            # extra key=value words for every per-class GAN (not steps/max_minutes)
    classifier_args: str = ""          # extra key=value words for every classifier
    build_dir: str = "build"
    tables_dir: str = "tables"
    cache_dir: str = "cache"
    data_note: str = ""
    device: str = "auto"
    name: str = "augment"


# the pretraining keys the study sets itself (the same work for every GAN)
GAN_KEYS = {"steps": "gan_steps=", "max_minutes": "gan_max_minutes="}


@register_check(Config)
def check_config(cfg: Config) -> None:
    require(cfg, stage="augment", positive=("generated_per_class", "gan_steps"),
            non_negative=("per_class", "classes", "gan_max_minutes"))
    for method in cfg.methods:
        if method not in BASELINES:
            lookup(study.VARIANTS, method, "augmentation method (none, traditional or a variant)")
    if not cfg.methods:
        raise ConfigError("augment: methods must not be empty; choose from: "
                          + ", ".join([*BASELINES, *study.VARIANTS]))
    study.check_seeds(cfg.seeds, "augment")
    study.check_pretrain_args(cfg.pretrain_args, "augment", {**GAN_KEYS, **({"seed": "seeds="} if cfg.paired_seeds else {})})



# tiny: the test's study in seconds, 2 classifier seeds (the spread is computed). smoke: 3 CIFAR-10 classes,
# 400 real images each, 100 G steps per GAN (the self-attention variant's per-class GANs reached 118-130 steps
# in the old 1.5-minute budget, and runs trained further under it have a checkpoint at 100 to reuse), a
# 5-minute cap, MobileNetV2 at half width for 15 epochs, 3 seeds: ~30 min on 2 cores. paper (GPU-sized): all
# classes, 1000 real + 2000 generated a class, seed 004's batch 32 and 10,000 G steps a GAN, 500 epochs.
register_preset("tiny", "augment", classes=(0, 1), per_class=24, generated_per_class=24, seeds=(0, 1),
                methods=("none", "traditional", "dcgan"), wgan_loss="wgan-no-warmup", gan_steps=2,
                pretrain_args="width=0.125 batch_size=8 precision=fp32 sample_every=1 ckpt_every=1")
register_preset("smoke", "augment", classes=(0, 1, 2), per_class=400, generated_per_class=400, seeds=(0, 1, 2),
                wgan_loss="wgan-no-warmup", gan_steps=100, gan_max_minutes=5.0,
                pretrain_args="width=0.25 sample_every=50 ckpt_every=100 log_every=5")
register_preset("paper", "augment", gan_steps=10000, seeds=(0, 1, 2),
                pretrain_args="batch_size=32 ckpt_every=1000 sample_every=500")


# ============================================================================ steps
def subset_step(cfg: Config, spec: str, classes: tuple[int, ...], per_class: int, root: Path) -> Path:
    return subset.run(subset.Config(source=spec, classes=classes, per_class=per_class, cache_dir=cfg.cache_dir,
                                    out_dir=str(root / "data")))


def class_ids(cfg: Config) -> tuple[int, ...]:
    """The classes kept: as given, or every labelled class of train."""
    if cfg.classes:
        return cfg.classes
    from .. import data
    labels = data.cached(cfg.train, size=32, cache_dir=cfg.cache_dir).labels
    return tuple(sorted(set(labels.tolist()) - {-1}))


def gan_seed(cfg: Config, seed: int) -> int:
    """The GANs' seed for classifier seed `seed`: the same (paired_seeds), else pretrain_args' seed or 0."""
    return seed if cfg.paired_seeds else int(study.words(cfg.pretrain_args).get("seed", 0))


def gan_images(cfg: Config, method: str, classes: tuple[int, ...], names: list[str], root: Path,
               seed: int) -> tuple[Path, list]:
    """One GAN per class (GAN seed `seed`) on that class's real subset, then their generated images as one
    parquet file."""
    label, values = study.variant_values(method, cfg.wgan_loss)
    cells = []
    for c, name in zip(classes, names):
        data_c = subset_step(cfg, cfg.train, (c,), cfg.per_class, root)
        pre = {"preset": cfg.preset, "data": str(data_c), "cache_dir": cfg.cache_dir, "device": cfg.device,
               **values, **study.words(cfg.pretrain_args), "seed": seed, "steps": cfg.gan_steps,
               "max_minutes": cfg.gan_max_minutes}
        cells.append(study.pretrain_cell(f"{label}, class {name}", pre, root / "gans"))
    ends = {c.end_name for c in cells}
    checkpoint = ends.pop() if len(ends) == 1 else runs.LAST    # else some GAN stopped early: flagged in status
    gen_cfg = build(generate.Config, "generate", {"runs": tuple(str(c.run_dir) for c in cells), "class_names": tuple(names),
                                                  "per_class": cfg.generated_per_class, "checkpoint": checkpoint,
                                                  "device": cfg.device})
    return generate.run(gen_cfg), cells


def classify_step(cfg: Config, train: tuple[str, ...], test: Path, augment: str, seed: int, root: Path) -> dict:
    import json
    values = {"preset": cfg.preset, "train": train, "test": str(test), "augment": augment, "seed": seed,
              "cache_dir": cfg.cache_dir, "device": cfg.device, "out_dir": str(root / "classify"),
              **study.words(cfg.classifier_args)}
    return json.loads(classifier.run(build(classifier.Config, "classify", values)).read_text())


# ============================================================================ the study
def run_study(cfg: Config) -> list[dict]:
    """One summary per method: {method, label, accuracy, mean, std, results, cells, generated}."""
    root = study.root_of(cfg) / "augment"
    classes = class_ids(cfg)
    real = subset_step(cfg, cfg.train, classes, cfg.per_class, root)
    test = subset_step(cfg, cfg.test, classes, 0, root)
    from ..core.store import read_image_cache
    names = read_image_cache(real).class_names
    out = []
    for method in cfg.methods:
        augment = "traditional" if method == "traditional" else "none"
        results, cells, generated = [], [], None
        for seed in cfg.seeds:
            made, made_cells = (None, []) if method in BASELINES else \
                gan_images(cfg, method, classes, names, root, gan_seed(cfg, seed))
            generated, cells = generated or made, cells + [c for c in made_cells if c.run_dir not in
                                                           {k.run_dir for k in cells}]
            train = (str(real),) + ((str(made),) if made else ())
            results.append(classify_step(cfg, train, test, augment, seed, root))
        st = study_tables.stats([r["test_acc"] for r in results])
        label = BASELINES.get(method) or f"{study.VARIANTS[method]()[0]} images (one GAN per class)"
        out.append({"method": method, "label": label, "stats": st, "mean": st["mean"], "std": st["std"],
                    "accuracy": study_tables.spread_text(st, ".1f", 100) + "%", "results": results,
                    "test_size": results[0].get("test_size"), "cells": cells, "generated": generated,
                    "real": real, "test": test})
    attach_gains(out)
    return out


def attach_gains(summaries: list[dict]) -> None:
    """Each method's gain over no augmentation ('none', the reference), marked against the noise."""
    ref = next((s for s in summaries if s["method"] == REFERENCE), None)
    for s in summaries:
        s["test_ci95"] = study_tables.test_ci95(s["mean"], s["test_size"])
        if ref is None or s is ref:
            s["gain"] = {}
            s["gain_text"] = "reference" if s is ref else "-"
            continue
        s["gain"] = study_tables.marked(s["mean"] - ref["mean"], study_tables.seed_half_width(s["stats"], ref["stats"]),
                                        s["test_ci95"])
        s["gain_text"] = study_tables.gain_text(s["gain"])


def per_class_n(cfg: Config, summary: dict) -> str:
    counts = summary["results"][0]["train_counts"]
    real = min(counts) if summary["generated"] is None else min(counts) - cfg.generated_per_class
    text = f"{real} real" + ("" if summary["generated"] is None else f" + {cfg.generated_per_class} generated")
    return text if len(set(counts)) == 1 else text + f" (smallest class; counts {counts})"


def gan_text(cells: list[study.Cell]) -> str:
    if not cells:
        return ""
    state = cells[0].end
    run_cfg, prov = state.get("config") or {}, state.get("provenance") or {}
    steps = ", ".join(f"{c.end_step} ({c.end_name})" for c in cells)
    seeds = ", ".join(str(x) for x in dict.fromkeys(c.seed for c in cells))
    return (f"GANs: {run_cfg.get('arch')} G/D, loss {run_cfg.get('loss')}, {run_cfg.get('optimizer')} lr "
            f"{run_cfg.get('lr_d')}, batch {run_cfg.get('batch_size')}, width {run_cfg.get('width')}, seed(s) "
            f"{seeds}, one per class and seed on its real images, {run_cfg.get('steps')} G steps wanted (cap "
            f"{run_cfg.get('max_minutes') or 'none'} min), measured and generated at step per class {steps}, on "
            f"{prov.get('hardware', '?')}; ")


def how_produced(cfg: Config, summary: dict) -> str:
    from ..publish.formats import duration, split_name
    first = summary["results"][0]
    c, prov = first["config"], first.get("provenance") or {}
    seconds = sum(r.get("seconds", 0) for r in summary["results"])
    epochs = ", ".join(str(r.get("epochs_run")) for r in summary["results"])
    accs = ", ".join(f"seed {seed}: {100 * r['test_acc']:.1f}%" for seed, r in zip(cfg.seeds, summary["results"]))
    return (f"real: {split_name(cfg.train)} classes {list(class_ids(cfg))} ({', '.join(first['class_names'])}), "
            f"{cfg.per_class or 'all'} per class; " + gan_text(summary["cells"])
            + f"classifier: {c['arch']} (width {c['width_mult']}, stem stride {c['stem_stride']}), augment "
            f"{c['augment']}, {epochs} epochs (per seed) at batch {c['batch_size']}, SGD lr {c['lr']}, "
            f"{first['precision']}, {duration(seconds)} in all on {prov.get('hardware', '?')}; "
            f"scored on {first['test_size']} images of {split_name(cfg.test)} ({accs})")


def status(summary: dict) -> str:
    return study_tables.status_text(summary["cells"]) if summary["cells"] else "comparable"


def row(cfg: Config, s: dict) -> dict:
    """Display columns (COLUMNS) and the csv's numeric ones (per-seed accuracies, the gain and its noise)."""
    from ..publish.formats import split_name
    found = study_tables.commits(*s["results"], *(c.end for c in s["cells"]))
    data = (f"{split_name(cfg.train)} classes {list(class_ids(cfg))}, scored on {split_name(cfg.test)}"
            + (f"; {cfg.data_note}" if cfg.data_note else ""))
    ci = s["test_ci95"]
    steps = study_tables.steps_text(s["cells"]) if s["cells"] else "- (no GAN)"
    return {"method": s["label"], "scale": study_tables.scale_label(cfg, "augment"), "steps": steps,
            "seeds": ",".join(map(str, cfg.seeds)), "status": status(s), "test accuracy (%)": s["accuracy"],
            "test ±": f"± {100 * ci:.1f} (N={s['test_size']})" if ci is not None else "-",
            "gain vs no augmentation": s["gain_text"], "per-class N": per_class_n(cfg, s),
            "flags": "; ".join(study_tables.commit_flags(found)) or "none", "data": data,
            "commit": ", ".join(found) or "?", "how produced": how_produced(cfg, s),
            **study_tables.stat_columns("test_acc", s["stats"], list(cfg.seeds)), "test_size": s["test_size"],
            "test_ci95": ci, **study_tables.gain_columns("gain_vs_reference", s["gain"]),
            "is_reference": s["method"] == REFERENCE}


COLUMNS = ["method", "scale", "steps", "seeds", "status", "test accuracy (%)", "test ±", "gain vs no augmentation",
           "per-class N", "flags", "data", "commit", "how produced"]


def generated_figure(summaries: list[dict], out_png: Path, cache_dir: str, per_row: int = 8) -> Path | None:
    """Per GAN method, `per_row` generated images of each class (rows: method x class)."""
    from .. import data
    from ..core.plots import gap_mosaic, pyplot, save_figure
    rows, labels = [], []
    for s in (s for s in summaries if s["generated"] is not None):
        images = data.cached(str(s["generated"]), size=32, cache_dir=cache_dir)
        for k, name in enumerate(images.class_names):
            rows.append(list(images.images[images.labels == k][:per_row]))
            labels.append(f"{s['method']}: {name}")
    if not rows:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * per_row, 0.4 + 0.6 * len(rows)))
    ax.imshow(gap_mosaic(rows, split_after=per_row), interpolation="nearest")
    ax.set_yticks([16 + 34 * i for i in range(len(rows))], labels, fontsize=7)
    ax.set_xticks([])
    ax.set_title("generated images per method and class", fontsize=9)
    return save_figure(fig, out_png)


def run(cfg: Config) -> Path:
    """Classifier accuracy with no, traditional and each GAN's augmentation -> tables/augment-<preset>.md."""
    return write(cfg, run_study(cfg))


def write(cfg: Config, summaries: list[dict]) -> Path:
    """The table, its record and the generated-images figure of the study's summaries."""
    out_dir, name = Path(cfg.tables_dir), f"{cfg.name}-{cfg.preset}"
    figure = generated_figure(summaries, out_dir / name / "generated.png", cfg.cache_dir)
    gan_seeds = tuple(dict.fromkeys(gan_seed(cfg, seed) for seed in cfg.seeds))
    scale = study.scale_and_data_note(cfg, "GAN method", steps=cfg.gan_steps, seeds=gan_seeds)
    spread = ("seed s trains each class's GAN with seed s, generates from it and trains the classifier with seed s, "
              "so the spread covers the GANs' randomness as well as the classifier's" if cfg.paired_seeds else
              f"the GANs, seed {gan_seeds[0]}, and their images are fixed: the spread is the classifier's only")
    reference = ("no augmentation: the classifier on the real subset alone" if REFERENCE in cfg.methods
                 else "not run: no gains")
    intro = (f"Seed 004's comparison: a classifier trained on a small labelled subset, without augmentation, with "
             f"traditional augmentation, and with each GAN's generated images added (one GAN per class, trained on "
             f"that class's real images only, generating from its checkpoint of the study's step count: column \"steps\")."
             f"{scale} "
             f"Test accuracy: mean ± std (ddof=1) over the seeds in \"seeds\" ({spread}); the csv has each seed's "
             f"accuracy. "
             + study_tables.noise_note(reference, "gain vs no augmentation", own_control=False)
             + (f"\n\nGenerated images: [generated]({figure.relative_to(out_dir).as_posix()})" if figure else ""))
    return study_tables.write(cfg, out_dir, name, "Generated images as augmentation (seed 004)", intro,
                              [row(cfg, s) for s in summaries], COLUMNS, study_tables.quoted_rows("augment"))


__all__ = ["Config", "run", "run_study", "write"]
