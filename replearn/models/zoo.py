"""The registry of architectures (`ARCHS`, `build_models`): DCGAN (nets.py) and more GAN families, a
vanilla MLP, residual (ResNet) and densely connected nets. This module imports nets, never the reverse.

Every builder has the signature of `nets.dcgan` and returns (generator, critic). Each critic is a
`nets.Critic`: its `blocks` yield the feature layers that the feature stage max-pools to 4x4,
so `features`, `svm` and `tables` need no special cases. Pooled feature sizes at width 1
(the same for channels 1 and 3: only the first layer's input changes; tests/test_sizes.py checks them):

    arch    size  feature layers (C x H x W)                                          pooled dims
    dcgan   28    128x28x28 128x14x14 256x14x14 256x7x7 512x7x7 512x7x7 (2 stride-2)   28672 (16 x 1792)
    dcgan   32    128x32x32 128x16x16 256x16x16 256x8x8 512x8x8 512x4x4 (the paper's)  28672 (16 x 1792)
    dcgan   64    64x32x32 (extra stride-2 conv), then the 32 px layers               29696 (16 x 1856)
    mlp     any   3 hidden layers of 512, exposed as 512 x 1 x 1                      1536  (3 x 512)
    resnet  32    4 residual blocks, 128x16x16 128x8x8 128x8x8 128x8x8                8192  (4 x 16 x 128)
    resnet  64    the same blocks at 32, 16, 16, 16                                    8192
    dense   32    stem 64x32x32, dense blocks -> 128x16x16 256x8x8 512x4x4            15360 (16 x 960)
    dense   64    the same at 64, 32, 16, 8                                            15360

resnet and dense need image_size a multiple of 8 (their generators start at image_size / 8); 28 is
refused in one line. `FEATURE_DIMS` holds the table.

All honour `norm` (critic: batch | layer | none; the first critic layer is never normalised,
as in DCGAN), `g_norm` (generator), `spectral_norm` (every critic conv and linear),
`attention_res` (a SAGAN block after the layer at that resolution in G and D; a resolution the
net does not have is refused), `width` (channel multiplier), `z_dim`, `image_size` (32) and
`channels` (3, or 1 for grayscale).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.config import ConfigError
from .nets import (Critic, SelfAttention, check_attention, check_channels, dcgan, dcgan_stages, init_dcgan, maybe_sn,
                   norm_layer, scaled)
from .penalty import piecewise_linear
from ..core.utils import lookup, make_registry

ARCHS, register_arch = make_registry("architecture")
register_arch("dcgan")(dcgan)

# (arch, image_size) -> pooled feature dims at width 1, for channels 1 and 3 alike (the docstring's table)
FEATURE_DIMS = {("dcgan", 28): 28672, ("dcgan", 32): 28672, ("dcgan", 64): 29696,
                ("mlp", 28): 1536, ("mlp", 32): 1536, ("mlp", 64): 1536,
                ("resnet", 32): 8192, ("resnet", 64): 8192, ("dense", 32): 15360, ("dense", 64): 15360}


def check_size_multiple_of_8(image_size: int, arch: str) -> None:
    """The ResNet and dense generators start at image_size / 8 and double three times."""
    if image_size % 8 or image_size < 16:
        raise ConfigError(f"arch {arch!r} takes image_size 32 or 64 (a multiple of 8, at least 16), not {image_size}; "
                          f"use arch dcgan or mlp for 28 px")


def check_size(arch: str, image_size: int) -> None:
    """One line, when the config is resolved (before any data is read), if `arch` cannot take the size."""
    if arch == "dcgan":
        dcgan_stages(image_size)
    elif arch in ("resnet", "dense"):
        check_size_multiple_of_8(image_size, arch)


def with_attention(block: nn.Module, res: int, attention_res: int, channels: int, spectral: bool) -> nn.Module:
    if attention_res and res == attention_res:
        return nn.Sequential(block, SelfAttention(channels, spectral))
    return block


# ============================================================================ mlp
@piecewise_linear
class FullyConnected(nn.Module):
    """Linear on the flattened input, output kept as N x C x 1 x 1 so that the 2d norm layers
    (BatchNorm2d over N, GroupNorm(1, C) = LayerNorm over C) and the 4x4 feature pooling
    (which leaves a 1 x 1 map as it is) work unchanged."""

    def __init__(self, c_in: int, c_out: int, norm: str, act: nn.Module, spectral: bool = False, bias: bool = True):
        super().__init__()
        self.linear = maybe_sn(nn.Linear(c_in, c_out, bias=bias), spectral)
        self.post = nn.Sequential(norm_layer(norm, c_out), act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.post(self.linear(x.flatten(1))[:, :, None, None])   # N x C x 1 x 1


@piecewise_linear
class MlpCritic(Critic):
    """Flattened image -> 3 hidden FC layers (LeakyReLU 0.2) -> 1; each hidden layer is a feature."""

    def __init__(self, hidden: int, depth: int, norm: str, spectral_norm: bool, image_size: int, in_channels: int = 3):
        super().__init__()
        self.in_channels = in_channels
        c_in = in_channels * image_size * image_size
        blocks = []
        for i in range(depth):
            blocks.append(FullyConnected(c_in, hidden, "none" if i == 0 else norm, nn.LeakyReLU(0.2, inplace=True),
                                         spectral_norm))
            c_in = hidden
        self.blocks, self.names = nn.ModuleList(blocks), [f"fc{i + 1}" for i in range(depth)]
        self.head = maybe_sn(nn.Linear(hidden, 1), spectral_norm)


class MlpGenerator(nn.Module):
    """z -> 3 hidden FC layers (norm, ReLU) -> 3*H*W -> tanh (Arjovsky et al.'s mlp_G)."""

    def __init__(self, z_dim: int, hidden: int, depth: int, norm: str, image_size: int, out_channels: int = 3):
        super().__init__()
        self.z_dim, self.image_size, self.out_channels = z_dim, image_size, out_channels
        layers, c_in = [], z_dim
        for _ in range(depth):
            layers.append(FullyConnected(c_in, hidden, norm, nn.ReLU(inplace=True)))
            c_in = hidden
        self.hidden = nn.Sequential(*layers)
        self.out = nn.Linear(hidden, out_channels * image_size * image_size)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.out(self.hidden(z).flatten(1))                      # N x CHW
        return torch.tanh(x).view(-1, self.out_channels, self.image_size, self.image_size)   # N x C x H x W


@register_arch("mlp")
def mlp(norm: str = "none", spectral_norm: bool = False, attention_res: int = 0, z_dim: int = 256,
        image_size: int = 32, width: float = 1.0, g_norm: str = "batch", channels: int = 3, **_):
    """Vanilla MLP GAN: 3 hidden layers of 512 units in G and D, any image size. Features: 3 x 512 = 1536 dims."""
    check_channels(channels)
    check_attention(attention_res, [], "mlp")   # no spatial positions to attend over
    hidden, = scaled((512,), width)
    return (MlpGenerator(z_dim, hidden, 3, g_norm, image_size, channels),
            MlpCritic(hidden, 3, norm, spectral_norm, image_size, channels))


# ============================================================================ resnet
@piecewise_linear
class ResBlock(nn.Module):
    """Pre-activation residual block of gan_cifar_resnet.py: norm -> ReLU -> conv3x3 -> norm ->
    ReLU -> conv3x3, plus a shortcut (identity, or 1x1 conv when the shape changes).
    resample 'down': the second conv is followed by 2x2 mean pooling (ConvMeanPool), the shortcut
    is conv1x1 then pool; 'up': nearest 2x upsampling before the first conv and the shortcut."""

    def __init__(self, c_in: int, c_out: int, resample: str | None, norm: str, spectral: bool = False,
                 first_norm: bool = True):
        super().__init__()
        self.resample = resample
        self.norm1 = norm_layer(norm if first_norm else "none", c_in)
        self.conv1 = maybe_sn(nn.Conv2d(c_in, c_out, 3, 1, 1), spectral)
        self.norm2 = norm_layer(norm, c_out)
        self.conv2 = maybe_sn(nn.Conv2d(c_out, c_out, 3, 1, 1), spectral)
        self.shortcut = (nn.Identity() if c_in == c_out and resample is None
                         else maybe_sn(nn.Conv2d(c_in, c_out, 1), spectral))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.resample == "up":
            x = F.interpolate(x, scale_factor=2, mode="nearest")   # N x C x 2H x 2W
        h = self.conv1(F.relu(self.norm1(x)))
        h = self.conv2(F.relu(self.norm2(h)))
        skip = self.shortcut(x)
        if self.resample == "down":
            h, skip = F.avg_pool2d(h, 2), F.avg_pool2d(skip, 2)
        return h + skip


@piecewise_linear
class OptimizedDownBlock(nn.Module):
    """The critic's first block (OptimizedResBlockDisc1): conv3x3 -> ReLU -> conv3x3 -> pool, with
    a pool -> conv1x1 shortcut; no activation before the first conv, which sees raw pixels."""

    def __init__(self, c_out: int, spectral: bool, c_in: int = 3):
        super().__init__()
        self.conv1 = maybe_sn(nn.Conv2d(c_in, c_out, 3, 1, 1), spectral)
        self.conv2 = maybe_sn(nn.Conv2d(c_out, c_out, 3, 1, 1), spectral)
        self.shortcut = maybe_sn(nn.Conv2d(c_in, c_out, 1), spectral)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.avg_pool2d(self.conv2(F.relu(self.conv1(x))), 2)      # N x C x H/2 x W/2
        return h + self.shortcut(F.avg_pool2d(x, 2))


@piecewise_linear
class ResNetCritic(Critic):
    """gan_cifar_resnet.py / SNGAN 32x32 critic: optimised down block 32->16, residual down 16->8,
    two residual blocks at 8, ReLU, global mean pool, linear. Each block's output is a feature."""

    def __init__(self, channels: int, norm: str, spectral_norm: bool, attention_res: int, image_size: int,
                 in_channels: int = 3):
        super().__init__()
        self.in_channels = in_channels
        res = [image_size // 2, image_size // 4, image_size // 4, image_size // 4]
        check_attention(attention_res, res, "resnet")
        raw = [OptimizedDownBlock(channels, spectral_norm, in_channels),
               ResBlock(channels, channels, "down", norm, spectral_norm),
               ResBlock(channels, channels, None, norm, spectral_norm),
               ResBlock(channels, channels, None, norm, spectral_norm)]
        # attention after the *last* block at its resolution, as ConvCritic does
        last_at = {r: i for i, r in enumerate(res)}
        blocks = [with_attention(b, r, attention_res if last_at[r] == i else 0, channels, spectral_norm)
                  for i, (b, r) in enumerate(zip(raw, res))]
        self.blocks, self.names = nn.ModuleList(blocks), [f"res{i + 1}" for i in range(len(blocks))]
        self.head = maybe_sn(nn.Linear(channels, 1), spectral_norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(F.relu(x).mean(dim=(2, 3))).squeeze(1)    # N x C -> N scores


class ResNetGenerator(nn.Module):
    """z -> linear -> C x 4 x 4 -> three residual up blocks (8, 16, 32) -> norm, ReLU, conv3x3 -> tanh."""

    def __init__(self, z_dim: int, channels: int, norm: str, attention_res: int, image_size: int,
                 out_channels: int = 3):
        super().__init__()
        self.z_dim, self.base = z_dim, image_size // 8
        check_attention(attention_res, [self.base * 2, self.base * 4, self.base * 8], "resnet")
        self.fc = nn.Linear(z_dim, channels * self.base * self.base)
        self.body = nn.Sequential(*[with_attention(ResBlock(channels, channels, "up", norm), self.base * 2 ** (i + 1),
                                                   attention_res, channels, False) for i in range(3)])
        self.out = nn.Sequential(norm_layer(norm, channels), nn.ReLU(inplace=True),
                                 nn.Conv2d(channels, out_channels, 3, 1, 1), nn.Tanh())

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.fc(z).view(len(z), -1, self.base, self.base)        # N x C x 4 x 4
        return self.out(self.body(x))                                # N x 3 x 32 x 32 (or 1 channel)


@register_arch("resnet")
def resnet(norm: str = "none", spectral_norm: bool = False, attention_res: int = 0, z_dim: int = 256,
           image_size: int = 32, width: float = 1.0, g_norm: str = "batch", channels: int = 3, **_):
    """ResNet G and D of gan_cifar_resnet.py (128 channels). Features: 4 x 16 x 128 = 8192 dims."""
    check_channels(channels)
    check_size_multiple_of_8(image_size, "resnet")
    hidden, = scaled((128,), width)
    return (ResNetGenerator(z_dim, hidden, g_norm, attention_res, image_size, channels),
            ResNetCritic(hidden, norm, spectral_norm, attention_res, image_size, channels))


# ============================================================================ dense
@piecewise_linear
class DenseLayer(nn.Module):
    """conv3x3 -> norm -> activation producing `growth` new maps, concatenated to its input
    (DenseNet connectivity: every layer sees all earlier maps of its block)."""

    def __init__(self, c_in: int, growth: int, norm: str, act: nn.Module, spectral: bool):
        super().__init__()
        self.body = nn.Sequential(maybe_sn(nn.Conv2d(c_in, growth, 3, 1, 1, bias=False), spectral),
                                  norm_layer(norm, growth), act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.body(x)], dim=1)                   # N x (C + growth) x H x W


def dense_block(c_in: int, growth: int, n_layers: int, c_out: int, norm: str, act, spectral: bool) -> nn.Sequential:
    """n_layers dense layers, then a 1x1 transition conv (-> norm -> act) to c_out channels."""
    layers = [DenseLayer(c_in + i * growth, growth, norm, act(), spectral) for i in range(n_layers)]
    transition = [maybe_sn(nn.Conv2d(c_in + n_layers * growth, c_out, 1, bias=False), spectral),
                  norm_layer(norm, c_out), act()]
    return nn.Sequential(*layers, *transition)


@piecewise_linear
class DenseCritic(Critic):
    """stem conv3x3 at 32, then three dense blocks each ending in a 1x1 transition and 2x2 average
    pooling (32->16->8->4); LeakyReLU 0.2 throughout; linear head on the 4 x 4 map."""

    def __init__(self, stem: int, growth: int, outs, norm: str, spectral_norm: bool, attention_res: int,
                 image_size: int, n_layers: int = 4, in_channels: int = 3):
        super().__init__()
        self.in_channels = in_channels
        res = [image_size >> i for i in range(len(outs) + 1)]        # 32, 16, 8, 4
        check_attention(attention_res, res, "dense")
        act = lambda: nn.LeakyReLU(0.2, inplace=True)                # noqa: E731
        blocks = [nn.Sequential(maybe_sn(nn.Conv2d(in_channels, stem, 3, 1, 1, bias=False), spectral_norm), act())]
        c_in = stem
        for c_out in outs:
            blocks.append(nn.Sequential(dense_block(c_in, growth, n_layers, c_out, norm, act, spectral_norm),
                                        nn.AvgPool2d(2)))
            c_in = c_out
        blocks = [with_attention(b, r, attention_res, c, spectral_norm)
                  for b, r, c in zip(blocks, res, (stem, *outs))]
        self.blocks, self.names = nn.ModuleList(blocks), ["stem"] + [f"dense{i + 1}" for i in range(len(outs))]
        self.head = maybe_sn(nn.Linear(c_in * res[-1] * res[-1], 1), spectral_norm)


class DenseGenerator(nn.Module):
    """z -> fc -> C x 4 x 4, then per stage: nearest 2x upsampling and a dense block (ReLU) with a
    1x1 transition (8, 16, 32), then conv3x3 -> tanh."""

    def __init__(self, z_dim: int, base_channels: int, growth: int, outs, norm: str, attention_res: int,
                 image_size: int, n_layers: int = 3, out_channels: int = 3):
        super().__init__()
        self.z_dim, self.base = z_dim, image_size >> len(outs)
        res = [self.base << (i + 1) for i in range(len(outs))]       # 8, 16, 32
        check_attention(attention_res, res, "dense")
        self.fc = nn.Sequential(nn.Linear(z_dim, base_channels * self.base ** 2, bias=False),
                                nn.Unflatten(1, (base_channels, self.base, self.base)),
                                norm_layer(norm, base_channels), nn.ReLU(inplace=True))
        stages, c_in = [], base_channels
        for c_out, r in zip(outs, res):
            stage = nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                  dense_block(c_in, growth, n_layers, c_out, norm, lambda: nn.ReLU(inplace=True),
                                              False))
            stages.append(with_attention(stage, r, attention_res, c_out, False))
            c_in = c_out
        self.body = nn.Sequential(*stages, nn.Conv2d(c_in, out_channels, 3, 1, 1), nn.Tanh())

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.body(self.fc(z))                                 # N x 3 x 32 x 32


@register_arch("dense")
def dense(norm: str = "batch", spectral_norm: bool = False, attention_res: int = 0, z_dim: int = 256,
          image_size: int = 32, width: float = 1.0, g_norm: str = "batch", channels: int = 3, **_):
    """DenseNet-style G and D (growth 32). Features: 16 x (64 + 128 + 256 + 512) = 15360 dims."""
    check_channels(channels)
    check_size_multiple_of_8(image_size, "dense")
    stem, growth, *outs = scaled((64, 32, 128, 256, 512), width)
    g_base, g_growth, *g_outs = scaled((256, 32, 256, 128, 64), width)
    return (DenseGenerator(z_dim, g_base, g_growth, g_outs, g_norm, attention_res, image_size, out_channels=channels),
            DenseCritic(stem, growth, outs, norm, spectral_norm, attention_res, image_size, in_channels=channels))


def build_models(arch: str, **options) -> tuple[nn.Module, Critic]:
    """(generator, critic) of a registered architecture, DCGAN-initialised."""
    builder: Callable = lookup(ARCHS, arch, "architecture")
    gen, critic = builder(**options)
    init_dcgan(gen)
    init_dcgan(critic)
    return gen, critic
