"""Critic features -> HDF5: every conv layer after norm + LeakyReLU, max-pooled to 4x4, concatenated.

    python -m replearn features run=build/<preset>/dcgan-<key> train=... test=...

The critic runs in inference mode (BatchNorm with statistics averaged over pretraining images,
as the released DCGAN code did, or the running averages), `channels_last`, and bf16 autocast
where the hardware has bf16 units (`precision=fp32` forces float32). The uint8 cache is read in
blocks and a background thread writes HDF5 while the next block computes. Under `torchrun`
each process computes an interleaved share of the batches and rank 0 writes the one file.
"""
from __future__ import annotations

import math
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..models import nets
from ..train import runs
from ..core.config import ConfigError, register_check, register_preset, require, to_dict
from ..core.stage import Stage, artifact_key, check_key
from ..train.distributed import Dist, init_distributed
from ..core.store import FeatureFile, FeatureWriter
from ..core.utils import autocast, check_writable, pick_device, resolve_precision


@dataclass(frozen=True)
class Config:
    run: str = ""                 # a pretrain run folder (build/<preset>/<model>-<key>) (or a checkpoint file)
    checkpoint: str = "last.pt"             # or ckpt_0000000.pt: the untrained control (step 0)
    train: str = "hf:uoft-cs/cifar10:train"  # the labelled split the SVM trains on
    test: str = "hf:uoft-cs/cifar10:test"    # the split it is scored on
    out: str = ""                           # default <run>/features-<hash of inputs>.h5
    batch: int = 256                        # large enough to keep the CPU's matmul units busy
    grid: int = 4                           # docs/protocol.md s.2: each layer max-pooled to 4x4
    precision: str = "auto"                 # auto: bf16 where the hardware has bf16 units
    channels_last: bool = True
    # float16 halves the file (60k x 28672 x 2 B = 3.4 GB, against 6.9 GB) and loses nothing the SVM sees:
    # the critic's outputs are bf16 products already where autocast runs (benchmarks/results/notes.md)
    dtype: str = "float16"
    bn_stats: str = "recompute"             # recompute: average per-batch stats over pretraining images
    bn_images: int = 10000                  # images used to recompute BatchNorm statistics
    bn_batch: int = 128                     # batch for those statistics: the DCGAN training batch
    device: str = "auto"
    cache_dir: str = "cache"
    train_rows: int = 0                     # a seeded random subset of train of this size (0 = all): cheap
    test_rows: int = 0                      # curve points; likewise for test
    expect_run_key: str = ""                # refuse a run folder whose recorded key differs ('' = any)
    preset: str = ""


register_check(Config, lambda cfg: require(
    cfg, stage="features", positive=("batch", "grid", "bn_images", "bn_batch"),
    non_negative=("train_rows", "test_rows"),
    choices={"bn_stats": ("recompute", "running"), "precision": ("auto", "bf16", "fp32"),
             "dtype": ("float16", "float32")}))
register_preset("smoke", "features", bn_images=2048)
# tiny: a check that the chain runs, in minutes whatever the split sizes (the full setting on 40,000 rows
# alone took over an hour here): seeded subsets of 5,000 train and 2,000 test rows; smaller splits whole
register_preset("tiny", "features", bn_images=512, train_rows=5000, test_rows=2000)
register_preset("cpu", "features")
register_preset("paper", "features")


# keys that change how fast or where features are computed, not their values
VOLATILE_KEYS = ("run", "out", "batch", "device", "cache_dir", "preset", "channels_last", "expect_run_key")


def run_folder(cfg: Config) -> Path:
    return Path(cfg.run) if Path(cfg.run).is_dir() else Path(cfg.run).parent


def features_key(cfg: Config) -> str:
    """The config less VOLATILE_KEYS, the run's key and the two splits' data identities."""
    from .. import data
    record = runs.run_record(run_folder(cfg))
    recorded = record.get("key")
    check_key(run_folder(cfg), recorded, cfg.expect_run_key)
    # `last.pt` moves on when a run is extended: key on the step it holds
    step = runs.checkpoint_step(cfg.run, cfg.checkpoint)
    size = image_size_of(record)
    return artifact_key("features", to_dict(cfg), ignore=VOLATILE_KEYS, run=recorded, step=step,
                             train=data.source_id(cfg.train, size), test=data.source_id(cfg.test, size))


def image_size_of(record: dict) -> int:
    """The size the run trained at: its critic reads the evaluation images at that size too."""
    return int((record.get("config") or {}).get("image_size", 32))


def default_out(cfg: Config, key: str) -> Path:
    step = Path(cfg.checkpoint).stem.replace("ckpt_", "step")
    return run_folder(cfg) / f"features-{step}-{key}.h5"


def existing_with_key(cfg: Config, path: Path, key: str) -> bool:
    """A complete feature file at `path` that was made with exactly this key."""
    if not path.exists():
        return False
    try:
        with FeatureFile(path) as ff:
            return ff.attrs.get("key") == key
    except ConfigError:
        return False


# ============================================================================ extraction
class BackgroundWriter:
    """Writes blocks on a thread so HDF5 I/O overlaps the next block's compute."""

    def __init__(self, writer: FeatureWriter, depth: int = 2):
        self.writer, self.queue = writer, queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while (item := self.queue.get()) is not None:
            try:
                self.writer.write(*item)
            except BaseException as err:   # reported on close, in the main thread
                self.error = err

    def put(self, split: str, start: int, feats: np.ndarray, labels: np.ndarray) -> None:
        self.queue.put((split, start, feats, labels))

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()
        if self.error:
            raise self.error


@torch.no_grad()
def extract_batches(critic, images: np.ndarray, batch: int, device, precision: str, channels_last: bool,
                    grid: int, dist_info: Dist = Dist()):
    """Yield (start row, N x D float32 features) for this process's share of the batches."""
    for b, start in enumerate(range(0, len(images), batch)):
        if b % dist_info.world != dist_info.rank:
            continue
        x = nets.to_unit(torch.from_numpy(images[start:start + batch]), device, channels_last,
                         getattr(critic, "in_channels", 3))                                     # N x C x H x W
        with autocast(device, precision):
            feats = nets.pooled_features(critic, x, grid)                                       # N x 28672
        yield start, feats.float().cpu().numpy()


def gather_to_rank0(start: int, feats: np.ndarray, dist_info: Dist):
    """Under torchrun: every rank's block goes to rank 0, which yields them all in order."""
    import torch.distributed as dist
    blocks = [None] * dist_info.world
    dist.all_gather_object(blocks, (start, feats))
    return [b for b in blocks if b is not None and b[0] >= 0]


def rounds(n: int, batch: int, world: int) -> int:
    """Gather rounds: every rank takes part in each, idle ranks with an empty block."""
    return math.ceil(math.ceil(n / batch) / world)


def write_split(sink: BackgroundWriter | None, split: str, critic, images, labels, cfg: Config, device,
                precision: str, dist_info: Dist, bar) -> None:
    produced = extract_batches(critic, images, cfg.batch, device, precision, cfg.channels_last, cfg.grid, dist_info)
    for _ in range(rounds(len(images), cfg.batch, dist_info.world)):
        start, feats = next(produced, (-1, None))
        blocks = [(start, feats)] if dist_info.world == 1 else gather_to_rank0(start, feats, dist_info)
        for s, f in blocks:
            if sink is not None and f is not None:
                sink.put(split, s, f, labels[s:s + len(f)])
                bar.update(len(f))


def feature_attrs(cfg: Config, run_cfg, ckpt: dict, precision: str, layers, splits: dict) -> dict:
    return {"kind": "critic", "model": run_cfg.model, "arch": run_cfg.arch, "loss": run_cfg.loss,
            "config": to_dict(cfg), "precision": precision, "checkpoint_step": ckpt.get("step"),
            "pretrain": {"config": to_dict(run_cfg), "data": ckpt.get("data"), "seconds": ckpt.get("seconds"),
                         "key": ckpt.get("key"), "finished": runs.finished_record(run_folder(cfg)),
                         "critic_batches": ckpt.get("batches"), "precision": ckpt.get("precision"),
                         "provenance": ckpt.get("provenance")},
            "max_units": max(dim // (cfg.grid * cfg.grid) for _, dim in layers),
            **{f"source_{k}": v for k, v in splits.items()}}


def load_split(spec: str, cache_dir: str, rows: int = 0, size: int = 32):
    """The split's uint8 images at `size`; with `rows`, a seeded random subset of that size, in file order."""
    from .. import data
    from ..core.store import ImageSet
    images = data.cached(spec, size=size, cache_dir=cache_dir)
    if not rows or rows >= len(images):
        return images
    pick = np.sort(np.random.default_rng(0).permutation(len(images))[:rows])
    return ImageSet(images.images[pick], images.labels[pick], images.class_names, images.attrs)


def checked(cfg: Config) -> Config:
    if cfg.bn_stats not in ("recompute", "running"):
        raise ConfigError(f"unknown bn_stats {cfg.bn_stats!r}; choose from: recompute, running")
    if runs.carried_step(cfg.run, cfg.checkpoint) is None:   # a carried run's results are reused without it
        runs.checkpoint_path(cfg.run, cfg.checkpoint)      # one line if the run or checkpoint is missing
    return cfg


def run(cfg: Config) -> Path:
    """Extract 4x4-max-pooled critic features of the train and test splits into one HDF5 file."""
    return STAGE.run(cfg)


def extract(cfg: Config, out: Path, key: str) -> Path:
    """The extraction itself (the caller holds the file's lock and found no current file)."""
    from tqdm import tqdm
    check_writable(out.parent)
    dist_info = init_distributed()
    device = pick_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    run_cfg, _, critic, ckpt = runs.load_run(cfg.run, cfg.checkpoint, device=str(device))
    if cfg.channels_last:
        critic = critic.to(memory_format=torch.channels_last)
    if cfg.bn_stats == "recompute":
        pre = load_split(run_cfg.data, cfg.cache_dir, size=run_cfg.image_size).images
        pick = np.random.default_rng(0).permutation(len(pre))[:cfg.bn_images]
        nets.recompute_bn_stats(critic, pre[np.sort(pick)], min(cfg.bn_batch, len(pick)), device, cfg.channels_last)
    splits = {"train": cfg.train, "test": cfg.test}
    sets = {"train": load_split(cfg.train, cfg.cache_dir, cfg.train_rows, run_cfg.image_size),
            "test": load_split(cfg.test, cfg.cache_dir, cfg.test_rows, run_cfg.image_size)}
    layers = critic.feature_layers(run_cfg.image_size, cfg.grid)
    t0, total = time.time(), sum(len(s) for s in sets.values())
    check_writable(out.parent, total * (sum(d for _, d in layers) * np.dtype(cfg.dtype).itemsize + 8))
    attrs = feature_attrs(cfg, run_cfg, ckpt, precision, layers, splits)
    attrs.update(class_names=sets["train"].class_names, key=key, untrained=int(ckpt.get("step") == 0),
                 **{f"skipped_{name}": s.skipped for name, s in sets.items()})
    bar = tqdm(total=total, desc=f"features {run_cfg.model}", unit="img", disable=not dist_info.main)
    if dist_info.main:
        with FeatureWriter(out, layers, attrs, cfg.dtype) as writer:
            for name, images in sets.items():
                writer.create_split(name, len(images), splits[name])
            sink = BackgroundWriter(writer)
            try:
                for name, images in sets.items():
                    write_split(sink, name, critic, images.images, images.labels, cfg, device, precision,
                                dist_info, bar)
            finally:
                sink.close()
            writer.attrs["seconds"] = time.time() - t0
            writer.attrs["images_per_second"] = total / max(time.time() - t0, 1e-9)
    else:
        for name, images in sets.items():
            write_split(None, name, critic, images.images, images.labels, cfg, device, precision, dist_info, bar)
    bar.close()
    if dist_info.world > 1:
        import torch.distributed as dist
        dist.barrier()
    return out


# one process per feature file: a second one refuses, naming the first
STAGE = Stage("features", resolve=checked, key=features_key, out=lambda cfg, key: Path(cfg.out) if cfg.out else
              default_out(cfg, key), finished=existing_with_key, build=extract)
plan = STAGE.plan   # (the file `run` writes, its key), without extracting anything: later stages key on it
