"""The chain's disk budget: its peak use estimated before any work, and a refusal when it cannot fit.

Feature files dominate: rows x dims x bytes per value for every critic file the chain keeps at once
(each critic and its control; with keep_features=false only the one being scored, plus the curve's
point), K-means' standardised features, and the uint8 image caches. Checkpoints and results are
small beside them and are covered by a fixed margin. The estimate is printed at the start, so a
reader knows what a preset costs in disk before hours of pretraining.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from .core.config import ConfigError, build, words
from .core.utils import human_bytes

MARGIN = 1 << 30        # checkpoints, sample grids, results, temp files: well under 1 GB in every preset


def _rows(spec: str, size: int, cache_dir: str, limit: int) -> int:
    from . import data
    n = len(data.cached(spec, size=size, cache_dir=cache_dir).labels)
    return min(n, limit) if limit else n


def _critic_dims(cfg, model: str) -> int:
    """Sum of the pooled feature layers' widths of `model`'s critic, read off a freshly built net."""
    from .models import nets, zoo
    from .train import pretrain
    values = {"preset": cfg.preset, "model": model, "data": cfg.pretrain_data, "image_size": cfg.image_size,
              "channels": cfg.channels, **words(cfg.pretrain_args)}
    planned = pretrain.resolve(build(pretrain.Config, "pretrain", values))
    _, critic = zoo.build_models(planned.arch, **nets.options(planned))
    return sum(d for _, d in critic.feature_layers(planned.image_size, 4))


def estimate(cfg, root: Path) -> dict[str, int]:
    """Peak bytes by part (before anything is built): what `chain.run` will hold on disk at once."""
    from .probe import curve, features, kmeans
    feat = build(features.Config, "features", {"preset": cfg.preset, **words(cfg.features_args)})
    width = 0 if cfg.upto == "pretrain" or not cfg.models else max(_critic_dims(cfg, m) for m in cfg.models)
    item = 2 if feat.dtype == "float16" else 4
    size = cfg.image_size
    n_train = _rows(cfg.train, size, cfg.cache_dir, feat.train_rows)
    n_test = _rows(cfg.test, size, cfg.cache_dir, feat.test_rows)
    per_file = (n_train + n_test) * (width * item + 8)
    n_runs = len(cfg.models) + (len(cfg.seed_repeats) if cfg.models else 0)
    per_run = 1 + bool(cfg.controls)
    kept = n_runs * per_run if cfg.keep_features else 1
    critic_files = per_file * kept if width else 0
    curve_file = 0
    if cfg.curve and cfg.upto in ("curve", "table") and width:
        cur = build(curve.Config, "curve", {"preset": cfg.preset, **words(cfg.curve_args)})
        rows = (min(cur.train_rows, n_train) if cur.train_rows else n_train) \
            + (min(cur.test_rows, n_test) if cur.test_rows else n_test)
        points = 1 if not cur.keep_features else 13 * len(cfg.models)   # log-spaced checkpoints of a run
        curve_file = rows * (width * item + 8) * points
    km = 0
    if cfg.kmeans and cfg.upto in ("svm", "curve", "table"):
        k = build(kmeans.Config, "kmeans", {"preset": cfg.preset, **words(cfg.kmeans_args)}).k
        km = (n_train + n_test) * (4 * k * 4 + 8)
    caches = (n_train + n_test) * size * size * 3
    return {"critic features": critic_files, "curve features": curve_file, "K-means features": km,
            "image caches": caches, "checkpoints and results": MARGIN}


def check_disk(cfg, root: Path) -> int:
    """Print the estimated peak; refuse in one line, before any training, when the disk has less free."""
    parts = estimate(cfg, root)
    total = sum(parts.values())
    folder = root
    while not folder.exists():
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    detail = ", ".join(f"{k} {human_bytes(v)}" for k, v in parts.items() if v)
    print(f"chain: estimated peak disk use {human_bytes(total)} ({detail}); {human_bytes(free)} free at {folder}")
    # what is already built counts as used and is reused, so only refuse when even an empty build would not fit
    used = sum(p.stat().st_size for p in Path(root).rglob("*") if p.is_file()) if Path(root).exists() else 0
    if total > free + used:
        raise ConfigError(f"the chain needs about {human_bytes(total)} of disk at its peak ({detail}) but "
                          f"{folder} has {human_bytes(free)} free: free space, point build_dir (BUILD_DIR) "
                          f"elsewhere, or set keep_features=false")
    return total
