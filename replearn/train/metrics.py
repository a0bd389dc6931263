"""Generator quality: FID, the critic's Wasserstein estimate, diversity, nearest real neighbours.

FID uses torch-fidelity (its Inception-v3 port of the TF 2015-12-05 graph and its Frechet maths),
so numbers match the reference implementations. The Inception weights are never downloaded:
`inception_extractor` takes a local file and fails with one line saying where to put it.
Everything else works from any feature matrix, so the maths is testable without Inception.

Images travel as uint8: generated N x 3 x H x W in [-1, 1] become N x H x W x 3 uint8 (the cache
layout) through `to_uint8`, so generated and real images take exactly the same path afterwards.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..models import nets
from ..core.config import ConfigError
from ..core.lock import building
from ..core.utils import atomic_path, unpickling_reason

INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"   # the standard FID weights (pytorch-fid / torch-fidelity)
INCEPTION_LAYER = "2048"                                    # pool3 features: what FID is defined on
FEATURE_BATCH = 256                                         # images per forward pass (bounded memory)


# ============================================================================ Frechet distance
def frechet_statistics(features: torch.Tensor | np.ndarray) -> dict[str, np.ndarray]:
    """{'mu', 'sigma'} of an N x D feature matrix in float64 (torch-fidelity's own estimator)."""
    from torch_fidelity.metric_fid import fid_features_to_statistics
    feats = torch.as_tensor(features).detach().cpu().double()   # float64: covariances of 2048 dims lose digits in fp32
    if feats.dim() != 2 or len(feats) < 2:
        raise ValueError(f"Frechet statistics need an N x D matrix with N >= 2, got {tuple(feats.shape)}")
    return fid_features_to_statistics(feats)


def frechet_distance(stats_a: dict[str, np.ndarray], stats_b: dict[str, np.ndarray]) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^1/2), by torch-fidelity's `fid_statistics_to_metric`."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric
    a = {k: np.asarray(v, dtype=np.float64) for k, v in stats_a.items()}
    b = {k: np.asarray(v, dtype=np.float64) for k, v in stats_b.items()}
    return float(fid_statistics_to_metric(a, b, verbose=False)[KEY_METRIC_FID])


def fid_from_features(features_a, features_b) -> float:
    return frechet_distance(frechet_statistics(features_a), frechet_statistics(features_b))


# ============================================================================ Inception (local weights only)
def inception_notice(path: str | Path) -> str:
    """One line: what is missing and where to put it."""
    return (f"Inception weights not found at {path or '(inception_weights unset)'}: copy the standard "
            f"{INCEPTION_FILE} (or torch-fidelity's weights-inception-2015-12-05-6726825d.pth) "
            f"there or pass inception_weights=<path>; FID is skipped")


def inception_extractor(weights_path: str | Path, device) -> torch.nn.Module:
    """torch-fidelity's Inception-v3 (uint8 N x 3 x H x W in, pool3 2048-d out) from a local file.

    The path is checked first: torch-fidelity downloads from the internet when given None, which
    an offline machine would only report after a long timeout. The file is read here, tensors only:
    torch-fidelity's own loader would run any code pickled into it.
    """
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    path = Path(weights_path) if weights_path else None
    if path is None or not path.is_file():
        raise ConfigError(inception_notice(weights_path))
    state = read_weights(path)
    return _build_inception(FeatureExtractorInceptionV3, state, path).to(device).eval()


def read_weights(path: Path) -> dict:
    """The state dict in `path`, loaded with weights_only; anything else is one line of error."""
    import pickle
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ConfigError(f"{path}: refused to load ({unpickling_reason(err)}): not a state dict of Inception-v3 FID "
                          f"weights (only tensors, numbers, strings and plain containers are read); use the "
                          f"standard {INCEPTION_FILE}") from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise ConfigError(f"{path} is not a state dict of Inception-v3 FID weights ({unpickling_reason(err)}); "
                          f"use the standard {INCEPTION_FILE}") from None
    if not isinstance(state, dict):
        raise ConfigError(f"{path} holds a {type(state).__name__}, not a state dict of Inception-v3 FID weights; "
                          f"use the standard {INCEPTION_FILE}")
    return state


def _build_inception(cls, state: dict, path: Path) -> torch.nn.Module:
    """torch-fidelity loads weights from a path only, so a private copy of the checked tensors is handed
    over: first as read, then without torchvision's AuxLogits and with BatchNorm's `num_batches_tracked`
    counters filled in (other exports of the same weights differ in that bookkeeping)."""
    import tempfile
    fixed = {k: v for k, v in state.items() if not str(k).startswith("AuxLogits.")}
    for key in [k for k in fixed if str(k).endswith(".running_var")]:
        fixed.setdefault(key.replace("running_var", "num_batches_tracked"), torch.tensor(0))
    first_error: Exception | None = None
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "inception.pth"
        for candidate in (state, fixed) if fixed.keys() != state.keys() else (state,):
            torch.save(candidate, copy)
            try:
                return cls("inception-v3-compat", [INCEPTION_LAYER], feature_extractor_weights_path=str(copy))
            except (RuntimeError, KeyError) as err:
                first_error = first_error or err
    raise ConfigError(f"{path} does not fit Inception-v3 ({str(first_error).splitlines()[0][:100]}); "
                      f"use the standard {INCEPTION_FILE}")


def weights_fingerprint(path: str | Path) -> str:
    """Short SHA-1 of the weights file: the key of every statistic computed with it."""
    digest = hashlib.sha1()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()[:10]


# ============================================================================ images and features
def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """N x C x H x W in [-1, 1] -> N x H x W x 3 uint8 (the cache layout), rounding as save_image does.
    One channel (a grayscale generator) is replicated to three, as the cache stores grey images, so
    Inception (FID) and every later step see what they see for real grey images."""
    out = images.float().add(1).mul(127.5).add(0.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu()
    return out.expand(-1, -1, -1, 3).contiguous() if out.shape[-1] == 1 else out


@torch.no_grad()
def generate(gen: torch.nn.Module, n: int, z_dim: int, seed: int, device, batch: int = FEATURE_BATCH) -> torch.Tensor:
    """n generated images as N x H x W x 3 uint8, from z drawn by a private seeded generator
    (so evaluating inside `pretrain` never moves the training RNG)."""
    rng = torch.Generator().manual_seed(seed)
    z = nets.sample_z(n, z_dim, "cpu", rng)                                   # n x z_dim
    return torch.cat([to_uint8(gen(z[i:i + batch].to(device))) for i in range(0, n, batch)])


@torch.no_grad()
def batched(fn: Callable[[torch.Tensor], torch.Tensor], images_uint8, device, batch: int = FEATURE_BATCH,
            nchw_uint8: bool = False, channels: int = 3) -> torch.Tensor:
    """fn over N x H x W x 3 uint8 images in batches -> float32 rows on the CPU.

    `nchw_uint8`: hand fn uint8 N x 3 x H x W (torch-fidelity extractors); otherwise float [-1, 1]
    with `channels` channels, as the project's nets take it."""
    images = torch.as_tensor(images_uint8)
    out = []
    for i in range(0, len(images), batch):
        chunk = images[i:i + batch]
        x = chunk.permute(0, 3, 1, 2).contiguous().to(device) if nchw_uint8 else \
            nets.to_unit(chunk, device, False, channels)
        y = fn(x)
        out.append((y[0] if isinstance(y, tuple) else y).float().reshape(len(chunk), -1).cpu())
    return torch.cat(out)


def inception_features(model: torch.nn.Module, images_uint8, device, batch: int = 64) -> torch.Tensor:
    """N x 2048 pool3 features (torch-fidelity resizes to 299 inside, as the TF graph did)."""
    return batched(model, images_uint8, device, batch, nchw_uint8=True)


def critic_features(critic: nets.Critic, images_uint8, device, batch: int = FEATURE_BATCH) -> torch.Tensor:
    """Every critic layer globally max-pooled and concatenated (N x sum of channels): small enough to
    hold for thousands of images, and the critic's own view of the image."""
    return batched(lambda x: nets.pooled_features(critic, x, grid=1), images_uint8, device, batch,
                   channels=getattr(critic, "in_channels", 3))


# ============================================================================ cached real statistics
def real_stats_path(cache_dir: str | Path, source_key: str, weights_key: str, n: int, seed: int) -> Path:
    """The file name carries everything that produced the statistics (source, weights, count, draw)."""
    key = hashlib.sha1(json.dumps([source_key, weights_key, n, seed]).encode()).hexdigest()[:10]
    return Path(cache_dir) / f"fid-stats-{weights_key}-n{n}-{key}.npz"


def load_or_compute_stats(path: Path, compute: Callable[[], dict[str, np.ndarray]],
                          meta: dict) -> dict[str, np.ndarray]:
    """Read cached {'mu', 'sigma'} from `path`, or compute and save them atomically with `meta` inside.
    A shared cache: while another process computes them, this one waits and then reads them."""
    with building(path, wait=True):
        if path.exists():
            with np.load(path) as saved:
                return {"mu": saved["mu"], "sigma": saved["sigma"]}
        stats = compute()
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:   # a file handle: np.savez would add '.npz' to a name
            np.savez(fh, mu=stats["mu"], sigma=stats["sigma"], meta=json.dumps(meta, default=str))
    return stats


def subset(n_total: int, n: int, seed: int) -> np.ndarray:
    """Sorted seeded choice of min(n, n_total) rows: the same rows every time for a given seed."""
    if n >= n_total:
        return np.arange(n_total)
    return np.sort(np.random.default_rng(seed).choice(n_total, size=n, replace=False))


# ============================================================================ critic, diversity
@torch.no_grad()
def critic_scores(critic: torch.nn.Module, images_uint8, device, batch: int = FEATURE_BATCH) -> torch.Tensor:
    return batched(critic, images_uint8, device, batch, channels=getattr(critic, "in_channels", 3)).squeeze(1)


def wasserstein_estimate(real_scores: torch.Tensor, fake_scores: torch.Tensor) -> dict[str, float]:
    """E[D(real)] - E[D(fake)]: the critic's Wasserstein estimate (for a WGAN critic; for BCE critics
    it is the logit gap). Positive when the critic still tells real from generated."""
    real_mean, fake_mean = float(real_scores.double().mean()), float(fake_scores.double().mean())
    return {"estimate": real_mean - fake_mean, "real_mean": real_mean, "fake_mean": fake_mean,
            "num_real": len(real_scores), "num_fake": len(fake_scores)}


def diversity(features: torch.Tensor) -> dict[str, float]:
    """Spread of a sample in a feature space: mean pairwise L2 distance (over all pairs) and mean
    per-dimension variance. A collapsed generator scores near 0; compare with real images."""
    feats = torch.as_tensor(features).double()
    n = len(feats)
    if n < 2:
        raise ValueError("diversity needs at least 2 samples")
    distances = torch.cdist(feats, feats)                                      # N x N
    mean_pairwise = float(distances.sum() / (n * (n - 1)))                     # the diagonal is 0
    return {"mean_pairwise_distance": mean_pairwise, "mean_variance": float(feats.var(dim=0).mean()),
            "num_samples": n, "dim": feats.shape[1]}


# ============================================================================ nearest neighbours
def nearest_neighbours(queries: torch.Tensor, bank: torch.Tensor, k: int, block: int = 8192,
                       device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Exact k nearest rows of `bank` (M x D) for each query (Q x D) by squared L2 distance.

    ||q - b||^2 = ||q||^2 - 2 q.b + ||b||^2 by one matmul per bank block, in float64 so that uint8
    pixels give exact integers (an image in the bank is found at distance 0). A running top-k over
    blocks bounds memory at Q x (block + k). Returns (Q x k distances, Q x k bank indices), nearest first.
    """
    if bank.shape[1] != queries.shape[1]:
        raise ValueError(f"queries have {queries.shape[1]} dims, bank {bank.shape[1]}")
    k = min(k, len(bank))
    q = queries.reshape(len(queries), -1).to(device, torch.float64)
    q_norm = (q * q).sum(1, keepdim=True)                                      # Q x 1
    best_d = torch.full((len(q), 0), float("inf"), dtype=torch.float64, device=device)
    best_i = torch.empty((len(q), 0), dtype=torch.long, device=device)
    for start in range(0, len(bank), block):
        b = bank[start:start + block].reshape(-1, q.shape[1]).to(device, torch.float64)   # B x D
        d = (q_norm - 2 * q @ b.T + (b * b).sum(1)[None]).clamp_min_(0)        # Q x B
        idx = torch.arange(start, start + len(b), device=device).expand(len(q), -1)
        best_d, pos = torch.cat([best_d, d], 1).topk(k, dim=1, largest=False, sorted=True)
        best_i = torch.cat([best_i, idx], 1).gather(1, pos)
    return best_d.cpu(), best_i.cpu()
