"""A class filter on any data source: the images of chosen classes, at most N of each, as an image cache.

    python -m replearn subset source=../shared/data/cifar10/train.parquet classes=0,1,2 per_class=400

Reads any source spec (replearn.data), keeps the rows whose label is in `classes` -- at most `per_class` of
each, a seeded random choice -- and writes them as an image cache (store.py layout) that every stage
accepts as a source spec. Labels become 0..K-1 in the order of `classes`, with those classes' names,
so a per-class GAN, its generated images and a classifier all speak the same labels. The choice of
class c's rows depends only on (seed, c), so the one-class subset of class c holds exactly the class-c
images of any multi-class subset with the same seed and per_class (one GAN per class trains on the
real images the classifier sees). The file is named by its key (source identity, classes, per_class,
seed) and reused when it exists, so stages keyed on it are not rebuilt.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..core.config import ConfigError, register_check, require, to_dict
from ..core.stage import Stage, artifact_key
from ..core.store import read_image_cache, write_image_cache
from ..core.utils import provenance


@dataclass(frozen=True)
class Config:
    source: str = "hf:uoft-cs/cifar10:train"   # any source spec with labels
    classes: tuple[int, ...] = ()    # labels to keep, in this order (-> 0..K-1); empty = every class
    per_class: int = 0               # at most this many images of each class, a seeded random choice; 0 = all
    seed: int = 0
    out_dir: str = ""                # where the subset goes ('' = cache_dir), as subset-<source stem>-...-<key>.h5
    cache_dir: str = "cache"         # the source's own image cache


register_check(Config, lambda cfg: require(cfg, non_negative=("per_class", "classes"), stage="subset"))


def subset_key(cfg: Config) -> str:
    from .. import data
    return artifact_key("subset", to_dict(cfg), ignore=("out_dir", "cache_dir", "source"),
                             source=data.source_id(cfg.source, 32))


def default_out(cfg: Config, key: str) -> Path:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(cfg.source.split("[")[0]).stem or "source")
    classes = "-".join(map(str, cfg.classes)) if cfg.classes else "all"
    return Path(cfg.out_dir or cfg.cache_dir) / f"subset-{stem}-c{classes}-n{cfg.per_class or 'all'}-{key}.h5"


def pick_rows(labels: np.ndarray, classes: tuple[int, ...], per_class: int, seed: int) -> np.ndarray:
    """Sorted rows: for each class c, a permutation seeded by (seed, c) cut to per_class."""
    rows = []
    for c in classes:
        mine = np.flatnonzero(labels == c)
        if per_class:
            mine = np.sort(np.random.default_rng([seed, c]).permutation(mine)[:per_class])
        rows.append(mine)
    return np.sort(np.concatenate(rows))


def chosen_classes(cfg: Config, labels: np.ndarray, names: list[str]) -> tuple[int, ...]:
    present = sorted(set(labels.tolist()) - {-1})
    if not present:
        raise ConfigError(f"{cfg.source} has no labels: a class filter needs a labelled source")
    classes = cfg.classes or tuple(present)
    missing = [c for c in classes if c not in present]
    if missing:
        known = ", ".join(f"{c} {names[c]}" if c < len(names) else str(c) for c in present)
        raise ConfigError(f"class(es) {missing} not in {cfg.source}; choose from: {known}")
    short = [c for c in classes if cfg.per_class and np.sum(labels == c) < cfg.per_class]
    if short:
        print(f"subset: class(es) {short} have fewer than per_class={cfg.per_class} images; all of them are kept")
    return classes


def run(cfg: Config) -> Path:
    """Keep the images of `classes` (at most per_class each) of a source -> an image cache, labels 0..K-1."""
    return STAGE.run(cfg)


def write_subset(cfg: Config, out: Path, key: str) -> Path:
    """The chosen rows of the source -> the subset's image cache (the caller holds its lock)."""
    from .. import data
    source = data.cached(cfg.source, size=32, cache_dir=cfg.cache_dir)
    classes = chosen_classes(cfg, source.labels, source.class_names)
    rows = pick_rows(source.labels, classes, cfg.per_class, cfg.seed)
    remap = {c: i for i, c in enumerate(classes)}
    labels = np.array([remap[int(v)] for v in source.labels[rows]], dtype=np.int64)
    names = [source.class_names[c] if c < len(source.class_names) else f"class{c}" for c in classes]
    counts = np.bincount(labels, minlength=len(classes)).tolist()
    write_image_cache(out, source.images[rows], labels, names,
                      {"key": key, "config": to_dict(cfg), "source": cfg.source, "source_id": data.source_id(cfg.source, 32),
                       "class_ids": list(classes), "per_class_counts": counts, "provenance": provenance()})
    print(f"subset: {len(rows)} images of {len(classes)} class(es) {dict(zip(names, counts))} -> {out}")
    return out


__all__ = ["Config", "run"]


STAGE = Stage("subset", key=subset_key, out=default_out, build=write_subset,
              finished=lambda cfg, out, key: out.exists() and read_image_cache(out).attrs.get("key") == key)
