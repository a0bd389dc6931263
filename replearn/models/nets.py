"""Critics and generators: the building blocks and the DCGAN pair (the registry of architectures,
`ARCHS` and `build_models`, is in zoo.py, which imports this module and never the reverse).

Every critic exposes `features(x) -> list[(name, tensor)]`: the output of each conv layer after
its normalisation and activation, which the feature stage max-pools to 4x4. Every generator
maps z (N x z_dim, U(-1, 1)) to images in [-1, 1]. Images enter nets as float in [-1, 1];
`to_unit` turns the uint8 cache into that on the device, so no per-image Python work is done.

Channels and sizes: every builder takes `channels` (3, or 1 for grayscale: the critic reads one
channel and the generator writes one) and `image_size`. The cache always stores RGB (grey sources
replicated); `to_unit(..., channels=1)` takes the luminance, which for a grey image is its grey value.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize

from ..core.config import ConfigError
from .penalty import piecewise_linear
from ..core.store import LUMA

NORMS = ("batch", "layer", "none")


CHANNELS = (1, 3)


def to_unit(images_uint8: torch.Tensor, device, channels_last: bool = True, channels: int = 3) -> torch.Tensor:
    """N x H x W x 3 uint8 (the cache layout) -> N x C x H x W float in [-1, 1] on `device`.

    C = 1 takes the luminance (LUMA weights, as PIL's convert('L')): a grey image stored as RGB maps
    back to its grey value, a colour image to its grey version."""
    x = images_uint8.to(device, non_blocking=True).permute(0, 3, 1, 2).float()    # N x 3 x H x W, 0..255
    if channels == 1 and x.shape[1] == 3:
        x = torch.einsum("nchw,c->nhw", x, torch.tensor(LUMA, device=x.device))[:, None]   # N x 1 x H x W
    x = x.div_(127.5).sub_(1.0)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x.contiguous()


def check_channels(channels: int) -> None:
    if channels not in CHANNELS:
        raise ConfigError(f"channels={channels} is not supported; choose from: 1 (grayscale), 3 (RGB)")


def check_attention(attention_res: int, available: list[int], arch: str) -> None:
    """Fail loudly rather than silently drop an attention block the user asked for."""
    if attention_res and attention_res not in available:
        raise ConfigError(f"attention_res={attention_res} does not exist in arch {arch!r}; "
                          f"choose from: 0, {', '.join(map(str, sorted(set(available))))}")


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
    for m in list(module.modules()):          # a list: spectral norm is re-registered below
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            spectral = hasattr(m, "parametrizations")
            weight = m.parametrizations.weight.original if spectral else m.weight
            nn.init.normal_(weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
            if spectral:
                # spectral norm power-iterated its u, v on the weights it was registered on, not these:
                # in eval mode (feature extraction of the step-0 control) the stale u^T W v made the
                # weights W / sigma ~1e10 times too large. Registering it again iterates on these
                parametrize.remove_parametrizations(m, "weight", leave_parametrized=False)
                nn.utils.parametrizations.spectral_norm(m)
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
    in_channels: int = 3

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
            maps = self.features(torch.zeros(1, self.in_channels, image_size, image_size, device=param.device))
        self.train(was_training)
        return [(name, t.shape[1] * min(grid, t.shape[2]) * min(grid, t.shape[3])) for name, t in maps]


@piecewise_linear
class ConvCritic(Critic):
    """The DCGAN ImageNet critic of docs/protocol.md s.1: 3x3 convs, conv -> norm -> LeakyReLU(0.2)."""

    def __init__(self, channels=(128, 128, 256, 256, 512, 512), strides=(1, 2, 1, 2, 1, 2), norm: str = "batch",
                 spectral_norm: bool = False, attention_res: int = 0, image_size: int = 32, slope: float = 0.2,
                 in_channels: int = 3):
        super().__init__()
        self.in_channels = in_channels
        blocks, names, c_in, res = [], [], in_channels, image_size
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
    """z -> fc -> 512 x B x B -> 3x3 (de)convs with BN + ReLU -> tanh, mirroring the critic
    (B = image_size >> stride-2 stages: 4 at 32 and 64 px, 7 at 28 px)."""

    def __init__(self, z_dim: int = 256, channels=(512, 256, 256, 128, 128), image_size: int = 32,
                 attention_res: int = 0, norm: str = "batch", out_channels: int = 3):
        super().__init__()
        self.z_dim, base = z_dim, image_size >> dcgan_stages(image_size)
        self.fc = nn.Sequential(nn.Linear(z_dim, channels[0] * base * base, bias=False),
                                nn.Unflatten(1, (channels[0], base, base)), norm_layer(norm, channels[0]),
                                nn.ReLU(inplace=True))
        layers, c_in, res = [], channels[0], base
        for i, c_out in enumerate(channels[1:]):
            up = i % 2 == 0 and res < image_size   # upsample, refine, upsample, refine, ...
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
        layers += [nn.Conv2d(c_in, out_channels, 3, 1, 1), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(self.fc(z))                      # N x C x H x W in [-1, 1]


def sample_z(n: int, z_dim: int, device, generator: torch.Generator | None = None) -> torch.Tensor:
    """z ~ U(-1, 1), as the DCGAN code."""
    return torch.rand(n, z_dim, device=device, generator=generator).mul_(2).sub_(1)


# ============================================================================ registry
def scaled(channels, width: float) -> tuple[int, ...]:
    return tuple(max(4, int(round(c * width))) for c in channels)


def dcgan_stages(image_size: int) -> int:
    """Stride-2 stages of the DCGAN nets: as many halvings as leave a 4..7 px map, so 28 -> 2 (7 x 7),
    32 -> 3 (4 x 4, the paper's), 64 -> 4 (4 x 4). Sizes that do not halve down to 4..7 are refused."""
    stages = 0
    while image_size % (2 << stages) == 0 and image_size >> (stages + 1) >= 4:
        stages += 1
    if stages == 0 or image_size >> stages > 7:
        raise ConfigError(f"arch 'dcgan' takes image_size 28, 32 or 64 (any b x 2^k with b in 4..7, e.g. 16, 24, 48), "
                          f"not {image_size}")
    return stages


def dcgan_layout(image_size: int, width: float) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(channels, strides) of the critic: the paper's 6 convs at 32 px; fewer stride-2 stages below
    (28 px: the last conv keeps 7 x 7), and above one more stride-2 conv of half the first width per
    extra stage at the input (64 px: 64 x 32 x 32 first)."""
    channels, strides = list(scaled((128, 128, 256, 256, 512, 512), width)), [1, 2, 1, 2, 1, 2]
    stages = dcgan_stages(image_size)
    for i in range(3 - stages):          # lose stride-2 stages, from the deepest
        strides[len(strides) - 1 - 2 * i] = 1
    for i in range(stages - 3):          # gain stride-2 stages in front
        channels.insert(0, max(4, channels[0] // 2))
        strides.insert(0, 2)
    return tuple(channels), tuple(strides)


def critic_resolutions(image_size: int, strides) -> list[int]:
    res = [image_size]
    for stride in strides:
        res.append(res[-1] // stride)
    return res[1:]


def dcgan(norm: str = "batch", spectral_norm: bool = False, attention_res: int = 0, z_dim: int = 256,
          image_size: int = 32, width: float = 1.0, g_norm: str = "batch", channels: int = 3,
          **_) -> tuple[nn.Module, Critic]:
    """DCGAN ImageNet critic (6 convs 128..512, BN on layers 2-6) and its generator; see `dcgan_layout`
    for 28 and 64 px."""
    check_channels(channels)
    widths, strides = dcgan_layout(image_size, width)
    check_attention(attention_res, critic_resolutions(image_size, strides), "dcgan")
    gen = ConvGenerator(z_dim, scaled((512, 256, 256, 128, 128), width), image_size, attention_res, g_norm, channels)
    critic = ConvCritic(widths, strides, norm=norm, spectral_norm=spectral_norm, attention_res=attention_res,
                        image_size=image_size, in_channels=channels)
    return gen, critic


def options(cfg) -> dict:
    """The builder keywords of a (resolved) pretrain config."""
    return dict(norm=cfg.norm, spectral_norm=cfg.spectral_norm, attention_res=cfg.attention_res, z_dim=cfg.z_dim,
                image_size=cfg.image_size, width=cfg.width, g_norm=cfg.g_norm, channels=getattr(cfg, "channels", 3))


def pooled_features(critic: Critic, x: torch.Tensor, grid: int = 4) -> torch.Tensor:
    """Every feature layer max-pooled to grid x grid, flattened (C, H, W order), concatenated.

    N x C x 32 x 32 -> N x 28672 for the DCGAN critic (16 x (128+128+256+256+512+512)).
    """
    pooled = []
    for _, fmap in critic.features(x):
        size = (min(grid, fmap.shape[2]), min(grid, fmap.shape[3]))
        pooled.append(F.adaptive_max_pool2d(fmap, size).flatten(1).float())
    return torch.cat(pooled, dim=1)


# ============================================================================ BatchNorm statistics
@torch.no_grad()
def recompute_bn_stats(critic: nn.Module, images_uint8: np.ndarray, batch: int, device, channels_last: bool,
                       seed: int = 0) -> int:
    """Replace BN running stats by the plain average of per-batch statistics over `images_uint8`
    (momentum=None makes PyTorch keep a cumulative average). Returns the number of batches."""
    bns = [m for m in critic.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return 0
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    order = np.random.default_rng(seed).permutation(len(images_uint8))
    critic.train()
    n_batches = 0
    for start in range(0, len(order) - batch + 1, batch):
        idx = np.sort(order[start:start + batch])
        critic.features(to_unit(torch.from_numpy(images_uint8[idx]), device, channels_last,
                                     getattr(critic, "in_channels", 3)))
        n_batches += 1
    critic.eval()
    return n_batches
