"""Generated images as a labelled dataset: one GAN per class -> a parquet file the data stage reads.

    python -m replearn generate runs=build/smoke/augment/wgan-aaa,build/smoke/augment/wgan-bbb \
        class_names=airplane,automobile per_class=2000

Each run folder's generator (its `checkpoint`, default the last good state) draws `per_class` images
from a seeded z; run i's images get label i. The file has the Hugging Face parquet layout that
`datasets` writes and the data stage reads (an Image column of {bytes, path} structs holding PNGs,
lossless, and an integer `label` with ClassLabel names in the schema metadata), so it is a source spec
like any other, e.g. the classifier's `train=real.h5,generated.parquet`. A sidecar `<out>.json` holds
the key (the runs' keys and steps, the count, the seed), the config and provenance; a file with the
same key is reused as it is.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import metrics, runs
from ..core.config import ConfigError, register_check, require, to_dict
from ..core.stage import Stage, artifact_key, record
from ..core.utils import atomic_path, atomic_write_json, pick_device


@dataclass(frozen=True)
class Config:
    runs: tuple[str, ...] = ()          # pretrain run folders, one per class, in label order
    class_names: tuple[str, ...] = ()   # the classes' names ('' = class0, class1, ...)
    per_class: int = 2000               # seed 004: each class expanded with 2000 generated images
    checkpoint: str = "last.pt"         # the last good state (also of a run that diverged later)
    seed: int = 0                       # z draws (class i uses seed + i)
    out: str = ""                       # '' = <first run's folder's parent>/generated-<key>.parquet
    device: str = "auto"


@register_check(Config)
def check_config(cfg: Config) -> None:
    require(cfg, positive=("per_class",), stage="generate")
    if not cfg.runs:
        raise ConfigError("generate: runs is empty; pass one pretrain run folder per class (runs=a,b,...)")
    if cfg.class_names and len(cfg.class_names) != len(cfg.runs):
        raise ConfigError(f"generate: {len(cfg.class_names)} class_names for {len(cfg.runs)} runs; give one per run")


def run_identity(run: str, checkpoint: str) -> list:
    saved = runs.load_checkpoint(runs.checkpoint_path(run, checkpoint), mmap=True)
    return [runs.run_key(run), int(saved["step"])]


def generate_key(cfg: Config) -> str:
    return artifact_key("generate", to_dict(cfg), ignore=("runs", "out", "device"),
                             runs=[run_identity(r, cfg.checkpoint) for r in cfg.runs])


def default_out(cfg: Config, key: str) -> Path:
    return Path(cfg.runs[0]).parent / f"generated-{key}.parquet"


def png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "PNG")
    return buf.getvalue()


def hf_metadata(names: list[str]) -> dict[bytes, bytes]:
    """The schema metadata `datasets` writes: an Image column and a ClassLabel `label`."""
    features = {"image": {"_type": "Image"}, "label": {"names": names, "_type": "ClassLabel"}}
    return {b"huggingface": json.dumps({"info": {"features": features}}).encode()}


def write_parquet(path: Path, images: np.ndarray, labels: np.ndarray, names: list[str]) -> Path:
    """N x H x W x 3 uint8 images and their labels -> an HF-layout parquet file (atomic)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    column = pa.array([{"bytes": png_bytes(img), "path": None} for img in images],
                      pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    table = pa.table({"image": column, "label": pa.array(labels, pa.int64())}).replace_schema_metadata(hf_metadata(names))
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return path


@torch.no_grad()
def draw(run: str, checkpoint: str, n: int, seed: int, device) -> np.ndarray:
    run_cfg, gen, _, _ = runs.load_run(run, checkpoint, str(device))
    return metrics.generate(gen, n, run_cfg.z_dim, seed, device).numpy()          # n x 32 x 32 x 3 uint8


def run(cfg: Config) -> Path:
    """Draw per_class images from each class's generator -> a labelled HF-layout parquet file."""
    return STAGE.run(cfg)


def draw_all(cfg: Config, out: Path, key: str) -> Path:
    """Every class's images -> the parquet file, then its sidecar (the caller holds the lock)."""
    sidecar = out.with_suffix(".json")
    device = pick_device(cfg.device)
    names = list(cfg.class_names) or [f"class{i}" for i in range(len(cfg.runs))]
    images = np.concatenate([draw(r, cfg.checkpoint, cfg.per_class, cfg.seed + i, device) for i, r in enumerate(cfg.runs)])
    labels = np.repeat(np.arange(len(cfg.runs)), cfg.per_class)
    write_parquet(out, images, labels, names)
    atomic_write_json(sidecar, record(cfg, key, class_names=names,
                                      runs=[{"run": r, "key": k, "step": s} for r, (k, s) in
                                            zip(cfg.runs, (run_identity(r, cfg.checkpoint) for r in cfg.runs))]))
    print(f"generate: {len(images)} images, {cfg.per_class} per class of {', '.join(names)} -> {out}")
    return out


__all__ = ["Config", "run", "write_parquet"]


# the parquet file and its .json sidecar: one process at a time
STAGE = Stage("generate", key=generate_key, out=lambda cfg, key: Path(cfg.out) if cfg.out else default_out(cfg, key),
              finished=lambda cfg, out, key: out.exists() and (runs.read_json(out.with_suffix(".json")) or {}).get(
                  "key") == key, build=draw_all)
