"""The supervised reference row: the critic architecture trained with labels, scored on the test split.

    python -m replearn supervised model=dcgan train=... test=... image_size=28 channels=1 preset=tiny

How far are the unsupervised features from what labels buy with the same network? This stage builds
the critic of `model` (the recipe's architecture and normalisation, at `width`, `image_size`,
`channels`: the chain passes the pretrained run's own values), puts **a linear softmax head on its
pooled features** -- every critic layer max-pooled to `grid` x `grid` and concatenated, exactly the
vector the SVM rows see (28672 dims for the DCGAN critic) -- and trains critic and head end to end
with cross-entropy on all of the evaluation train split (Adam, linear learning-rate decay, no
augmentation, no early stopping: the test split is read once, at the end). The critic's own
real/fake head is not used. BatchNorm statistics are then recomputed with the final weights over
(up to `bn_images`) training images, as the feature stage does for the SVM rows.

Writes `<out>/supervised.json` in the layout of an svm results file (so `replearn table` reads it):
its `full` setting holds the test accuracy, `features.attrs` says what was trained on what, and both
carry the resolved config, key, git commit and library versions. `<out>/last.pt` (tensors only,
loaded with weights_only) is saved every `ckpt_every` steps, so a killed run resumes where it
stopped; a finished result with the same key is returned as is. The key covers the config less
where/how fast, and the identity of both data files.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..models import nets, zoo
from ..train import runs
from ..core.config import ConfigError, register_check, register_preset, require, to_dict, validate
from ..core.stage import Stage, artifact_key, default_root, record
from ..core.utils import (atomic_write_json, autocast, check_writable, pick_device, provenance, resolve_precision,
                    torch_atomic_save)

RESULT = "supervised.json"


@dataclass(frozen=True)
class Config:
    model: str = "dcgan"          # a recipe: its critic architecture and options (replearn.models.recipes)
    train: str = "hf:uoft-cs/cifar10:train"   # the evaluation train split (all of it, with labels)
    test: str = "hf:uoft-cs/cifar10:test"     # scored once, at the end
    image_size: int = 32
    channels: int = 3
    width: float = 1.0            # the chain passes the pretrained critic's width
    norm: str | None = None       # None: the recipe's (then the loss's) choice, as pretrain resolves it
    spectral_norm: bool | None = None
    attention_res: int | None = None
    grid: int = 4                 # the head sees every layer max-pooled to grid x grid: the SVM rows' features
    bn_images: int = 10000        # training images for the final BatchNorm statistics (the features stage's)
    steps: int = 20000            # ~51 epochs of CIFAR-10's 50k at batch 128: GPU-sized
    batch_size: int = 128
    lr: float = 1e-3              # Adam (0.9, 0.999), decayed linearly to 0
    weight_decay: float = 5e-4
    seed: int = 0
    ckpt_every: int = 1000        # resume point
    log_every: int = 100
    out: str = ""                 # folder; '' = build/<preset>/supervised-<model>-<key>, as the chain
    device: str = "auto"
    precision: str = "auto"       # bf16 autocast where the hardware has bf16 units
    cache_dir: str = "cache"
    preset: str = ""


register_check(Config, lambda cfg: require(
    cfg, stage="supervised", positive=("steps", "batch_size", "lr", "grid", "ckpt_every", "log_every", "width",
                                         "bn_images"),
    non_negative=("weight_decay",), choices={"channels": (1, 3), "precision": ("auto", "bf16", "fp32")},
    at_least={"image_size": 8}))
register_preset("tiny", "supervised", steps=40, batch_size=32, ckpt_every=20, log_every=10)   # seconds on a CPU
register_preset("smoke", "supervised", steps=500, batch_size=64)
register_preset("cpu", "supervised", steps=3000, batch_size=64)
register_preset("paper", "supervised")

# keys that say where or how fast, or how often to save and print, not what is trained
VOLATILE_KEYS = ("out", "device", "cache_dir", "preset", "ckpt_every", "log_every")


# ============================================================================ the network
class Classifier(nn.Module):
    """critic blocks -> every layer max-pooled to grid x grid, concatenated -> linear -> class logits."""

    def __init__(self, critic: nets.Critic, image_size: int, num_classes: int, grid: int):
        super().__init__()
        self.critic, self.grid = critic, grid
        self.critic.head = nn.Identity()             # the real/fake head is not part of the reference
        dim = sum(d for _, d in critic.feature_layers(image_size, grid))
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(nets.pooled_features(self.critic, x, self.grid))   # N x C x H x W -> N x classes


def resolved_critic(cfg: Config) -> dict:
    """arch, norm, spectral_norm, attention_res as pretraining resolves them for this recipe."""
    from ..train import pretrain
    over = {k: getattr(cfg, k) for k in ("norm", "spectral_norm", "attention_res") if getattr(cfg, k) is not None}
    pre = pretrain.resolve(pretrain.Config(model=cfg.model, image_size=cfg.image_size, channels=cfg.channels,
                                           width=cfg.width, **over))
    return {"arch": pre.arch, **nets.options(pre)}


def build_classifier(cfg: Config, num_classes: int) -> tuple[Classifier, dict]:
    torch.manual_seed(cfg.seed)
    spec = resolved_critic(cfg)
    _, critic = zoo.build_models(spec["arch"], **{k: v for k, v in spec.items() if k != "arch"})
    return Classifier(critic, cfg.image_size, num_classes, cfg.grid), spec


# ============================================================================ data and key
def load(spec: str, cfg: Config):
    from .. import data
    return data.cached(spec, size=cfg.image_size, cache_dir=cfg.cache_dir)


def supervised_key(cfg: Config) -> str:
    from .. import data
    return artifact_key("supervised", to_dict(cfg), ignore=VOLATILE_KEYS,
                             train=data.source_id(cfg.train, cfg.image_size),
                             test=data.source_id(cfg.test, cfg.image_size))


def output_dir(cfg: Config, key: str) -> Path:
    return Path(cfg.out) if cfg.out else default_root(cfg.preset) / f"supervised-{cfg.model}-{key}"


def checked_labels(images, spec: str) -> np.ndarray:
    labels = images.labels
    if len(labels) == 0 or (labels < 0).any():
        raise ConfigError(f"{spec} has unlabelled images (label -1); the supervised reference needs a labelled split")
    return labels


# ============================================================================ training
def lr_at(cfg: Config, step: int) -> float:
    return cfg.lr * max(0.0, 1.0 - step / cfg.steps)


def train_step(model: Classifier, opt, images: torch.Tensor, labels: torch.Tensor, device, precision: str,
               channels: int) -> float:
    x = nets.to_unit(images, device, True, channels)                          # n x C x H x W
    with autocast(device, precision):
        logits = model(x)                                                     # n x classes
    loss = F.cross_entropy(logits.float(), labels.to(device))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach())


@torch.no_grad()
def accuracy(model: Classifier, images: np.ndarray, labels: np.ndarray, device, precision: str, channels: int,
             batch: int = 256) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(images), batch):
        x = nets.to_unit(torch.from_numpy(images[start:start + batch]), device, True, channels)
        with autocast(device, precision):
            pred = model(x).argmax(1).cpu().numpy()
        correct += int((pred == labels[start:start + batch]).sum())
    model.train()
    return correct / len(images)


def restore(model: Classifier, opt, path: Path, key: str, device) -> tuple[int, float]:
    """(step, seconds) of a saved resume point for this key, else (0, 0.0)."""
    if not path.exists():
        return 0, 0.0
    saved = runs.load_checkpoint(path, str(device))
    if saved.get("key") != key:
        return 0, 0.0   # another config's resume point: start afresh (it is overwritten)
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    return int(saved["step"]), float(saved["seconds"])


def save(model: Classifier, opt, path: Path, key: str, cfg: Config, step: int, seconds: float) -> None:
    torch_atomic_save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "seconds": seconds,
                       "key": key, "config": to_dict(cfg)}, path)


def train(cfg: Config, model: Classifier, images: torch.Tensor, labels: torch.Tensor, out: Path, key: str,
          device, precision: str) -> tuple[int, float]:
    """The training loop (resumes from out/last.pt); returns (steps done, training seconds)."""
    from ..train.distributed import BatchStream, Dist
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    step, seconds = restore(model, opt, out / runs.LAST, key, device)
    stream = BatchStream(len(images), min(cfg.batch_size, len(images)), cfg.seed, Dist(), consumed=step)
    model.train()
    while step < cfg.steps:
        t0 = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = lr_at(cfg, step)
        idx = stream.next()
        loss = train_step(model, opt, images[idx], labels[idx], device, precision, cfg.channels)
        step, seconds = step + 1, seconds + time.perf_counter() - t0
        if step % cfg.log_every == 0 or step == cfg.steps:
            print(f"supervised: step {step:>7d}/{cfg.steps}  loss {loss:.4f}  {seconds:.0f} s")
        if step % cfg.ckpt_every == 0 or step == cfg.steps:
            save(model, opt, out / runs.LAST, key, cfg, step, seconds)
    return step, seconds


# ============================================================================ the stage
def finished(cfg: Config, out: Path, key: str) -> bool:
    return (runs.read_json(out / RESULT) or {}).get("key") == key


def result_record(cfg: Config, key: str, spec: dict, model: Classifier, train_set, test_set, test_acc: float,
                  train_acc: float, steps: int, seconds: float, precision: str, out: Path) -> dict:
    layers = model.critic.feature_layers(cfg.image_size, cfg.grid)
    attrs = {"kind": "supervised", "model": cfg.model, "arch": spec["arch"], "critic": spec, "config": to_dict(cfg),
             "precision": precision, "feature_dim": sum(d for _, d in layers),
             "max_units": max(d // (cfg.grid * cfg.grid) for _, d in layers), "class_names": train_set.class_names,
             "source_train": cfg.train, "source_test": cfg.test, "skipped_train": train_set.skipped,
             "skipped_test": test_set.skipped, "steps": steps, "seconds": seconds, "provenance": provenance()}
    return record(cfg, key, complete=True, features={"path": str(out), "attrs": attrs}, train_rows=len(train_set),
                  test_rows=len(test_set),
                  settings={"full": {"test_acc": test_acc, "train_acc": train_acc, "steps": steps, "seconds": seconds}})


def run(cfg: Config) -> Path:
    """Train the critic architecture with labels (linear head on its pooled features) -> supervised.json."""
    return STAGE.run(cfg)


def train_and_score(cfg: Config, out: Path, key: str) -> Path:
    """Train (resuming from out/last.pt), score, write supervised.json (the caller holds the folder's lock)."""
    check_writable(out)
    train_set, test_set = load(cfg.train, cfg), load(cfg.test, cfg)
    labels = checked_labels(train_set, cfg.train)
    test_labels = checked_labels(test_set, cfg.test)
    num_classes = int(max(labels.max(), test_labels.max())) + 1
    device = pick_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    model, spec = build_classifier(cfg, num_classes)
    model = model.to(device, memory_format=torch.channels_last)
    steps, seconds = train(cfg, model, torch.from_numpy(train_set.images), torch.from_numpy(labels), out, key,
                           device, precision)
    pick = np.sort(np.random.default_rng(0).permutation(len(labels))[:cfg.bn_images])
    nets.recompute_bn_stats(model.critic, train_set.images[pick], min(cfg.batch_size, len(pick)), device, True)
    test_acc = accuracy(model, test_set.images, test_labels, device, precision, cfg.channels)
    pick = pick[:10000]   # train accuracy on <= 10k images
    train_acc = accuracy(model, train_set.images[pick], labels[pick], device, precision, cfg.channels)
    print(f"supervised: {cfg.model} critic + linear head: test accuracy {100 * test_acc:.2f}% "
          f"(train {100 * train_acc:.2f}%) after {steps} steps")
    record = result_record(cfg, key, spec, model, train_set, test_set, test_acc, train_acc, steps, seconds,
                           precision, out)
    atomic_write_json(out / RESULT, record)
    return out / RESULT


__all__ = ["Config", "run", "Classifier"]


# the folder (last.pt, supervised.json): one process at a time; validate: a Config built in code has not
# passed `build`
STAGE = Stage("supervised", resolve=validate, key=supervised_key, out=output_dir, finished=finished,
              build=train_and_score, result=lambda out: out / RESULT)
