"""Critics and generators, and the registry of architectures.

Every critic exposes `features(x) -> list[(name, tensor)]`: the output of each conv layer after
its normalisation and activation, which the feature stage max-pools to 4x4. Every generator
maps z (N x z_dim, U(-1, 1)) to images in [-1, 1]. Images enter nets as float in [-1, 1];
`to_unit` turns the uint8 cache into that on the device, so no per-image Python work is done.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ConfigError
from .penalty import piecewise_linear
from .utils import lookup, make_registry

ARCHS, register_arch = make_registry("architecture")
NORMS = ("batch", "layer", "none")


def to_unit(images_uint8: torch.Tensor, device, channels_last: bool = True) -> torch.Tensor:
    """N x H x W x 3 uint8 (the cache layout) -> N x 3 x H x W float in [-1, 1] on `device`."""
    x = images_uint8.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x.contiguous()


def norm_layer(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "layer":
        # LayerNorm over (C, H, W) with a per-channel affine: the usual WGAN-GP substitute for BN.
        return nn.GroupNorm(1, channels)
    if kind == "none":
        return nn.Identity()
    raise ConfigError(f"unknown norm {kind!r}; choose from: {', '.join(NORMS)}")


def maybe_sn(module: nn.Module, spectral: bool) -> nn.Module:
    return nn.utils.parametrizations.spectral_norm(module) if spectral else module


def init_dcgan(module: nn.Module) -> None:
    """N(0, 0.02) weights and N(1, 0.02) norm gains, as the DCGAN reference code."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            weight = m.parametrizations.weight.original if hasattr(m, "parametrizations") else m.weight
            nn.init.normal_(weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d, nn.GroupNorm, nn.LayerNorm)) and m.weight is not None:
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


class SelfAttention(nn.Module):
    """SAGAN block: 1x1 query/key/value convs, softmax over positions, gamma * o + x (gamma = 0 at start)."""

    def __init__(self, channels: int, spectral: bool = False):
        super().__init__()
        inner = max(1, channels // 8)
        self.query = maybe_sn(nn.Conv2d(channels, inner, 1, bias=False), spectral)
        self.key = maybe_sn(nn.Conv2d(channels, inner, 1, bias=False), spectral)
        self.value = maybe_sn(nn.Conv2d(channels, channels, 1, bias=False), spectral)
        self.gamma = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        q = self.query(x).flatten(2).transpose(1, 2)     # N x HW x C/8
        k = self.key(x).flatten(2)                       # N x C/8 x HW
        v = self.value(x).flatten(2)                     # N x C x HW
        attn = torch.softmax(q @ k, dim=-1)              # N x HW x HW, softmax over key positions
        o = (v @ attn.transpose(1, 2)).view(n, c, h, w)  # N x C x H x W
        return self.gamma * o + x


class Critic(nn.Module):
    """Base: subclasses build `self.blocks` (each yields one feature map) and `self.head`."""

    blocks: nn.ModuleList
    names: list[str]

    def features(self, x: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        out = []
        for name, block in zip(self.names, self.blocks):
            x = block(x)
            out.append((name, x))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x.flatten(1)).squeeze(1)        # N critic scores (logits for BCE)

    def feature_layers(self, image_size: int = 32, grid: int = 4) -> list[tuple[str, int]]:
        """(name, pooled dim) per feature layer, read off a dummy forward pass."""
        was_training = self.training
        self.eval()
        with torch.no_grad():
            param = next(self.parameters())
            maps = self.features(torch.zeros(1, 3, image_size, image_size, device=param.device))
        self.train(was_training)
        return [(name, t.shape[1] * min(grid, t.shape[2]) * min(grid, t.shape[3])) for name, t in maps]


@piecewise_linear
class ConvCritic(Critic):
    """The DCGAN ImageNet critic of PROTOCOL s.1: 3x3 convs, conv -> norm -> LeakyReLU(0.2)."""

    def __init__(self, channels=(128, 128, 256, 256, 512, 512), strides=(1, 2, 1, 2, 1, 2), norm: str = "batch",
                 spectral_norm: bool = False, attention_res: int = 0, image_size: int = 32, slope: float = 0.2):
        super().__init__()
        blocks, names, c_in, res = [], [], 3, image_size
        for i, (c_out, stride) in enumerate(zip(channels, strides)):
            res //= stride
            layers = [maybe_sn(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), spectral_norm),
                      norm_layer("none" if i == 0 else norm, c_out), nn.LeakyReLU(slope, inplace=True)]
            if attention_res and res == attention_res and (i + 1 == len(channels) or
                                                           res // strides[i + 1] != res):
                layers.append(SelfAttention(c_out, spectral_norm))
            blocks.append(nn.Sequential(*layers))
            names.append(f"conv{i + 1}")
            c_in = c_out
        self.blocks, self.names = nn.ModuleList(blocks), names
        self.head = maybe_sn(nn.Linear(c_in * res * res, 1), spectral_norm)


class ConvGenerator(nn.Module):
    """z -> fc -> 512 x 4 x 4 -> 3x3 (de)convs with BN + ReLU -> tanh, mirroring the critic."""

    def __init__(self, z_dim: int = 256, channels=(512, 256, 256, 128, 128), image_size: int = 32,
                 attention_res: int = 0, norm: str = "batch"):
        super().__init__()
        self.z_dim, base = z_dim, image_size // 8
        self.fc = nn.Sequential(nn.Linear(z_dim, channels[0] * base * base, bias=False),
                                nn.Unflatten(1, (channels[0], base, base)), norm_layer(norm, channels[0]),
                                nn.ReLU(inplace=True))
        layers, c_in, res = [], channels[0], base
        for i, c_out in enumerate(channels[1:]):
            up = i % 2 == 0   # upsample, refine, upsample, refine, ...
            conv = (nn.ConvTranspose2d(c_in, c_out, 3, 2, 1, output_padding=1, bias=False) if up
                    else nn.Conv2d(c_in, c_out, 3, 1, 1, bias=False))
            res *= 2 if up else 1
            layers += [conv, norm_layer(norm, c_out), nn.ReLU(inplace=True)]
            if attention_res and res == attention_res and not up:
                layers.append(SelfAttention(c_out))
            c_in = c_out
        while res < image_size:   # remaining doublings
            layers += [nn.ConvTranspose2d(c_in, c_in, 3, 2, 1, output_padding=1, bias=False),
                       norm_layer(norm, c_in), nn.ReLU(inplace=True)]
            res *= 2
        layers += [nn.Conv2d(c_in, 3, 3, 1, 1), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(self.fc(z))                      # N x 3 x 32 x 32 in [-1, 1]


def sample_z(n: int, z_dim: int, device, generator: torch.Generator | None = None) -> torch.Tensor:
    """z ~ U(-1, 1), as the DCGAN code."""
    return torch.rand(n, z_dim, device=device, generator=generator).mul_(2).sub_(1)


# ============================================================================ registry
def scaled(channels, width: float) -> tuple[int, ...]:
    return tuple(max(4, int(round(c * width))) for c in channels)


@register_arch("dcgan")
def dcgan(norm: str = "batch", spectral_norm: bool = False, attention_res: int = 0, z_dim: int = 256,
          image_size: int = 32, width: float = 1.0, g_norm: str = "batch", **_) -> tuple[nn.Module, Critic]:
    """DCGAN ImageNet critic (6 convs 128..512, BN on layers 2-6) and its generator."""
    gen = ConvGenerator(z_dim, scaled((512, 256, 256, 128, 128), width), image_size, attention_res, g_norm)
    critic = ConvCritic(scaled((128, 128, 256, 256, 512, 512), width), norm=norm, spectral_norm=spectral_norm,
                        attention_res=attention_res, image_size=image_size)
    return gen, critic


def build_models(arch: str, **options) -> tuple[nn.Module, Critic]:
    builder: Callable = lookup(ARCHS, arch, "architecture")
    gen, critic = builder(**options)
    init_dcgan(gen)
    init_dcgan(critic)
    return gen, critic


def pooled_features(critic: Critic, x: torch.Tensor, grid: int = 4) -> torch.Tensor:
    """Every feature layer max-pooled to grid x grid, flattened (C, H, W order), concatenated.

    N x 3 x 32 x 32 -> N x 28672 for the DCGAN critic (16 x (128+128+256+256+512+512)).
    """
    pooled = []
    for _, fmap in critic.features(x):
        size = (min(grid, fmap.shape[2]), min(grid, fmap.shape[3]))
        pooled.append(F.adaptive_max_pool2d(fmap, size).flatten(1).float())
    return torch.cat(pooled, dim=1)





# the rest of the zoo registers itself into ARCHS
from . import zoo  # noqa: E402,F401
