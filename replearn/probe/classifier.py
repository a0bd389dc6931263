"""A supervised classifier on labelled images (the `classify` stage): seed 004's MobileNetV2 judge of
augmentation, on 32x32 inputs.

    python -m replearn classify train=real.h5,generated.parquet test=test.h5 arch=mobilenet_v2 epochs=30

`train` is one or more source specs (replearn.data), concatenated: real images, then e.g. generated ones
(generate.py); every source and the test split must carry the same class names (subset.py makes them
agree). Nets come from torchvision with weights=None (nothing is downloaded) and are adapted to 32x32
as the CIFAR ports do: MobileNetV2 with its first conv and its second stage at stride 1 (kuangliu's
pytorch-cifar; `stem_stride=2` keeps the ImageNet strides, ~4x cheaper), ResNet-18 with a 3x3 stride-1
stem and no max-pool. Images stay uint8 in memory and are scaled to [-1, 1] on the device;
`augment=traditional` adds random flips, 4-pixel reflect-padded crops and colour jitter (brightness,
contrast, saturation +-20%) per image. SGD with Nesterov momentum, cosine learning-rate decay to 0;
BatchNorm statistics are recomputed over the training images after training (precise BN).

Writes `<out_dir>/classify-<key>.json`: test accuracy, per-class accuracy, the per-epoch training
history, seconds, the resolved config, the sources' identities and provenance. The key is the config
(less where and how fast it runs) and the sources' identities: the same key is reused at once.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..models import nets
from ..train import runs
from ..core.config import ConfigError, register_check, register_preset, require, to_dict
from ..core.stage import Stage, artifact_key, record
from ..core.utils import (atomic_write_json, autocast, lookup, make_registry, pick_device,
                    resolve_precision)

CLASSIFIERS, register_classifier = make_registry("classifier")
AUGMENTS, register_augment = make_registry("augment")


@dataclass(frozen=True)
class Config:
    train: tuple[str, ...] = ("hf:uoft-cs/cifar10:train",)   # labelled sources, concatenated
    test: str = "hf:uoft-cs/cifar10:test"
    arch: str = "mobilenet_v2"     # | resnet18 (CLASSIFIERS)
    width_mult: float = 1.0        # MobileNetV2's channel multiplier
    stem_stride: int = 1           # 1: the CIFAR adaptation (first conv and second stage at stride 1); 2: ImageNet's
    augment: str = "none"          # none | traditional (AUGMENTS)
    epochs: int = 500              # seed 004: 500 epochs of MobileNetV2
    batch_size: int = 128
    lr: float = 0.05               # SGD, Nesterov momentum 0.9, cosine decay to 0: the usual CIFAR recipe
    momentum: float = 0.9
    weight_decay: float = 5e-4
    max_minutes: float = 0.0       # training-time budget (stops early, recorded); 0: none
    seed: int = 0                  # initialisation, batch order and augmentation draws
    precision: str = "auto"        # auto: bf16 autocast where the hardware has bf16 units
    device: str = "auto"
    cache_dir: str = "cache"
    out_dir: str = "runs"          # results: <out_dir>/classify-<key>.json
    preset: str = ""


@register_check(Config)
def check_config(cfg: Config) -> None:
    require(cfg, stage="classify", positive=("width_mult", "epochs", "batch_size", "lr"),
            non_negative=("momentum", "weight_decay", "max_minutes"),
            choices={"stem_stride": (1, 2), "precision": ("auto", "bf16", "fp32")})
    lookup(CLASSIFIERS, cfg.arch, "classifier")
    lookup(AUGMENTS, cfg.augment, "augment")
    if not cfg.train:
        raise ConfigError("classify: train is empty; pass one or more labelled source specs")
    if cfg.arch != "mobilenet_v2" and cfg.width_mult != 1.0:
        raise ConfigError(f"classify: width_mult applies to mobilenet_v2 only, not {cfg.arch}; leave it at 1.0")


register_preset("tiny", "classify", epochs=2, batch_size=32, width_mult=0.25, stem_stride=2, precision="fp32")
# smoke: minutes on 2 cores for a few thousand images (MobileNetV2 at half width, ImageNet strides)
register_preset("smoke", "classify", epochs=15, width_mult=0.5, stem_stride=2)
register_preset("paper", "classify")


# ============================================================================ nets
# MobileNetV2's (expansion, channels, blocks, stride) stages; the second stage's stride is the stem's
MOBILENET_STAGES = [[1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 3, 2], [6, 64, 4, 2], [6, 96, 3, 1], [6, 160, 3, 2],
                    [6, 320, 1, 1]]


@register_classifier("mobilenet_v2")
def mobilenet_v2(num_classes: int, width_mult: float, stem_stride: int) -> nn.Module:
    """torchvision's MobileNetV2 for 32x32: 32 -> 32 -> 32 -> 16 -> 8 -> 8 -> 4 with stem_stride 1."""
    from torchvision.models import mobilenet_v2 as build
    stages = [list(s) for s in MOBILENET_STAGES]
    stages[1][3] = stem_stride
    net = build(weights=None, num_classes=num_classes, width_mult=width_mult, inverted_residual_setting=stages)
    net.features[0][0].stride = (stem_stride, stem_stride)
    return net


@register_classifier("resnet18")
def resnet18(num_classes: int, width_mult: float, stem_stride: int) -> nn.Module:
    """torchvision's ResNet-18 with a 3x3 stem (stride stem_stride) and no max-pool: 32 -> 32 -> 16 -> 8 -> 4."""
    from torchvision.models import resnet18 as build
    net = build(weights=None, num_classes=num_classes)
    net.conv1 = nn.Conv2d(3, 64, 3, stem_stride, 1, bias=False)
    net.maxpool = nn.Identity()
    return net


# ============================================================================ augmentation
@register_augment("none")
def no_augment(x: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
    return x


@register_augment("traditional")
def traditional(x: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
    """Per image: horizontal flip (p 0.5), 4-pixel reflect-padded random crop, brightness, contrast and
    saturation each scaled by a factor in [0.8, 1.2]. x: N x 3 x H x W in [-1, 1]."""
    n, _, h, w = x.shape
    flip = (torch.rand(n, generator=rng) < 0.5).to(x.device)
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    padded = F.pad(x, (4, 4, 4, 4), mode="reflect")                                   # N x 3 x H+8 x W+8
    dy, dx = torch.randint(0, 9, (2, n), generator=rng).tolist()
    x = torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])
    factors = (0.8 + 0.4 * torch.rand(3, n, 1, 1, 1, generator=rng)).to(x.device)     # brightness, contrast, saturation
    x = (x + 1) / 2 * factors[0]                                                     # [0, 1] scaled
    x = (x - x.mean(dim=(1, 2, 3), keepdim=True)) * factors[1] + x.mean(dim=(1, 2, 3), keepdim=True)
    grey = (0.299 * x[:, :1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:])                 # N x 1 x H x W
    x = (x - grey) * factors[2] + grey
    return x.clamp(0, 1) * 2 - 1


# ============================================================================ data
def load_labelled(spec: str, cache_dir: str):
    from .. import data
    images = data.cached(spec, size=32, cache_dir=cache_dir)
    if len(images) and images.labels.min() < 0:
        raise ConfigError(f"{spec} has unlabelled images (label -1): the classifier needs labelled sources")
    return images


def load_sets(cfg: Config):
    """(train images, train labels, test images, test labels, class names); every source's names agree."""
    parts = [load_labelled(s, cfg.cache_dir) for s in cfg.train]
    test = load_labelled(cfg.test, cfg.cache_dir)
    named = [(s, p.class_names) for s, p in zip((*cfg.train, cfg.test), (*parts, test)) if p.class_names]
    if any(names != named[0][1] for _, names in named):
        listing = "; ".join(f"{s}: {', '.join(n)}" for s, n in named)
        raise ConfigError(f"classify: the sources name their classes differently ({listing}); make them agree "
                          f"(e.g. `replearn subset` of each with the same classes)")
    names = named[0][1] if named else []
    k = max([len(names)] + [int(p.labels.max()) + 1 for p in (*parts, test) if len(p)])
    x = np.concatenate([p.images for p in parts])
    y = np.concatenate([p.labels for p in parts])
    return x, y, test.images, test.labels, names or [str(i) for i in range(k)]


def classify_key(cfg: Config) -> str:
    from .. import data
    return artifact_key("classify", to_dict(cfg), ignore=("device", "cache_dir", "out_dir", "preset", "train", "test"),
                             train=[data.source_id(s, 32) for s in cfg.train], test=data.source_id(cfg.test, 32))


# ============================================================================ training
def lr_at(cfg: Config, done: int, total: int) -> float:
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * done / max(total, 1)))


def train_epoch(net, opt, cfg: Config, x: torch.Tensor, y: torch.Tensor, rng: torch.Generator, device, precision: str,
                progress: tuple[int, int]) -> dict:
    net.train()
    augment = lookup(AUGMENTS, cfg.augment, "augment")
    order = torch.randperm(len(x), generator=rng)
    loss_sum, correct, seen = 0.0, 0, 0
    done, total = progress
    stop = len(order) - len(order) % cfg.batch_size if len(order) >= cfg.batch_size else len(order)
    for start in range(0, stop, cfg.batch_size):   # the ragged end is dropped (BatchNorm, equal steps)
        idx = order[start:start + cfg.batch_size]
        for group in opt.param_groups:
            group["lr"] = lr_at(cfg, done, total)
        images = augment(nets.to_unit(x[idx], device, True), rng)                    # n x 3 x 32 x 32
        labels = y[idx].to(device)
        with autocast(device, precision):
            logits = net(images.contiguous(memory_format=torch.channels_last))
        loss = F.cross_entropy(logits.float(), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_sum += loss.item() * len(idx)
        correct += int((logits.argmax(1) == labels).sum())
        seen += len(idx)
        done += 1
    return {"loss": loss_sum / max(seen, 1), "train_acc": correct / max(seen, 1), "batches": done}


@torch.no_grad()
def recompute_bn(net: nn.Module, x: torch.Tensor, batch: int, device) -> None:
    """BatchNorm statistics as the plain average over the (unaugmented) training images ("precise BN"):
    after a short training the momentum averages still hold the early batches' statistics."""
    bns = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None                      # cumulative average
    net.train()
    for start in range(0, len(x) - batch + 1 if len(x) >= batch else 1, batch):
        net(nets.to_unit(x[start:start + batch], device, True))
    net.eval()


@torch.no_grad()
def predict(net, x: torch.Tensor, device, precision: str, batch: int = 512) -> np.ndarray:
    net.eval()
    out = []
    for start in range(0, len(x), batch):
        with autocast(device, precision):
            out.append(net(nets.to_unit(x[start:start + batch], device, True)).float().argmax(1).cpu())
    return torch.cat(out).numpy()


def per_class_accuracy(pred: np.ndarray, labels: np.ndarray, names: list[str]) -> dict[str, float]:
    return {name: float(np.mean(pred[labels == i] == i)) for i, name in enumerate(names) if np.any(labels == i)}


def fit(cfg: Config, x: np.ndarray, y: np.ndarray, k: int, device, precision: str) -> tuple[nn.Module, list, dict]:
    torch.manual_seed(cfg.seed)
    net = lookup(CLASSIFIERS, cfg.arch, "classifier")(k, cfg.width_mult, cfg.stem_stride)
    net = net.to(device, memory_format=torch.channels_last)
    opt = torch.optim.SGD(net.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0,
                          weight_decay=cfg.weight_decay)
    rng = torch.Generator().manual_seed(cfg.seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    per_epoch = max(1, len(x) // cfg.batch_size)
    history, done, t0 = [], 0, time.time()
    for epoch in range(cfg.epochs):
        stats = train_epoch(net, opt, cfg, xt, yt, rng, device, precision, (done, cfg.epochs * per_epoch))
        done = stats.pop("batches")
        history.append({"epoch": epoch + 1, **stats, "seconds": time.time() - t0})
        print(f"classify {cfg.arch} epoch {epoch + 1:>4d}/{cfg.epochs}  loss {stats['loss']:.4f}  "
              f"train acc {100 * stats['train_acc']:5.1f}%  {time.time() - t0:7.1f} s")
        if cfg.max_minutes and time.time() - t0 >= 60 * cfg.max_minutes:
            break
    recompute_bn(net, xt, cfg.batch_size, device)
    return net, history, {"seconds": time.time() - t0, "stopped": "epochs" if len(history) == cfg.epochs
                          else "max_minutes", "epochs_run": len(history)}


def run(cfg: Config) -> Path:
    """Train a classifier on the labelled train sources, score it on the test split -> results JSON."""
    return STAGE.run(cfg)


def fit_and_score(cfg: Config, out: Path, key: str) -> Path:
    """Train, score the test split, write the results JSON (the caller holds its lock)."""
    from .. import data
    x, y, tx, ty, names = load_sets(cfg)
    device = pick_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    net, history, timing = fit(cfg, x, y, len(names), device, precision)
    pred = predict(net, torch.from_numpy(tx), device, precision)
    atomic_write_json(out, record(
        cfg, key, precision=precision, class_names=names,
        test_acc=float(np.mean(pred == ty)), per_class_acc=per_class_accuracy(pred, ty, names),
        train_counts=np.bincount(y, minlength=len(names)).tolist(), test_size=len(ty),
        sources={"train": [{"spec": s, "id": data.source_id(s, 32)} for s in cfg.train],
                 "test": {"spec": cfg.test, "id": data.source_id(cfg.test, 32)}},
        history=history, **timing))
    print(f"classify: test accuracy {100 * float(np.mean(pred == ty)):.2f}% on {len(ty)} images -> {out}")
    return out


__all__ = ["Config", "run", "CLASSIFIERS", "AUGMENTS"]


STAGE = Stage("classify", key=classify_key, out=lambda cfg, key: Path(cfg.out_dir) / f"classify-{key}.json",
              finished=lambda cfg, out, key: (runs.read_json(out) or {}).get("key") == key, build=fit_and_score)
