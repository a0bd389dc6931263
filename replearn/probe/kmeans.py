"""The single-layer K-means baseline of Coates, Lee and Ng (2011), written to the feature layout.

Pipeline (docs/protocol.md s.5, following Coates's `kmeans_demo.m`, `run_kmeans.m`, `extract_features.m`):
  1. patches    `patches` random 6x6x3 patches from the training images (seeded; every image is
                visited in a shuffled order, as Coates cycles through his images). With `channels=1`
                (grayscale data such as MNIST) the patches are 6x6x1 of the luminance and everything
                below runs unchanged on 36 values instead of 108; `image_size` 28 gives 23 x 23 positions.
  2. normalise  each patch on 0..255 values: (x - mean) / sqrt(var + norm_eps), var unbiased as MATLAB's.
  3. whitening  ZCA: P = V diag(1 / sqrt(d + whiten_eps)) V^T from the patch covariance; w = (x - M) P.
  4. K-means    `iterations` Lloyd steps in torch, in batches; init randn * 0.1 as Coates; a cluster that
                ends an iteration empty is set to zero, as his code does ("zap empty centroids"), so the
                run is deterministic and matches the reference.
  5. encoding   at every stride-1 position (27 x 27 for 32 x 32 images): the patch unfold is the im2col of
                a convolution, normalisation and whitening are two cheap steps on 108 values, and the
                distance to every centroid is ||w||^2 - 2 w.c + ||c||^2, whose cross term is one matmul
                with the centroid bank (fp32, or bf16 where `precision` says so). Triangle activation
                f_k = max(0, mean_j z_j - z_k) on the Euclidean distances z, then sum-pooling over the four
                quadrants split at ceil(27 / 2) = 14 (MATLAB's round(27 / 2)) -> 4K features ordered
                top-left, bottom-left, top-right, bottom-right (Coates's q1..q4).
                The elementwise work on the positions x K distance map dominates; `torch.compile` fuses it
                into a few loops (compile=false runs the same maths eagerly, several times slower).
  6. standardise (x - mu) / sqrt(var + 0.01) with mu, var from the training split, applied in the file
                (so the svm stage treats these features like any other); mu and the divisor are kept
                as the root datasets `feature_mean` and `feature_std`.

Why the whitening is not folded into the centroid conv: ||w||^2 needs P x at every position anyway (a
108-channel conv), so folding saves no arithmetic, and with bf16 outputs the folded cross term on raw
0..255 pixels would lose everything to cancellation.

Centroids, whitening and their timings are saved (atomically) beside the feature file, so a rerun
with the same patch/K-means settings and training data skips straight to encoding; the cache is read
without running code from it (weights_only), and one that is refused or unreadable is recomputed. A
finished feature file with the same key (config less where/how fast, plus the identity of both data
sources) is returned as is.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from tqdm import tqdm

from ..core.config import ConfigError, register_check, register_preset, require, to_dict, validate
from ..core import store
from ..core.stage import Stage, artifact_key, default_root, keyed
from ..core.utils import (atomic_write_json, check_writable, provenance, resolve_precision, torch_atomic_save,
                    unpickling_reason)

QUADRANTS = ("top_left", "bottom_left", "top_right", "bottom_right")   # Coates's q1, q2, q3, q4


@dataclass(frozen=True)
class Config:
    train: str = "hf:uoft-cs/cifar10:train"   # labelled images: patches, K-means, standardisation stats
    test: str = "hf:uoft-cs/cifar10:test"     # encoded with the training statistics; "" skips it
    k: int = 1600                   # Coates's demo; 4000 is the paper's best
    patches: int = 400_000          # as in the paper
    patch_size: int = 6             # receptive field, 6x6x3
    iterations: int = 50            # Lloyd iterations, as run_kmeans.m is called
    whiten_eps: float = 0.1         # ZCA epsilon on the normalised patches
    norm_eps: float = 10.0          # added to the patch variance (0..255 pixel scale)
    std_eps: float = 0.01           # added to the feature variance when standardising
    standardize: bool = True        # apply Coates's feature standardisation in the file
    seed: int = 0                   # patch sampling and centroid init
    batch: int = 4                  # images per encoding step: 4 x 729 x 1600 distances (19 MB) stay cheap
    kmeans_batch: int = 4096        # patches per assignment step (a 4096 x K score buffer)
    write_rows: int = 512           # rows gathered before each HDF5 write
    compile: bool = True            # fuse the encoding's elementwise work with torch.compile
    precision: str = "fp32"         # 'fp32', 'bf16' (matmuls only) or 'auto' (bf16 where the CPU has it)
    out: str = ""                   # feature file; "" -> build/<preset>/kmeans-<key>/features.h5, as the chain
    cache_dir: str = "cache"        # uint8 image caches (replearn.data)
    dtype: str = "float32"          # feature storage: float32 or float16
    image_size: int = 32            # images are read at this size (28 for MNIST-style data: 23 x 23 positions)
    channels: int = 3               # 1: grayscale patches (6x6x1, luminance), for MNIST-style data
    preset: str | None = None       # smoke | paper


register_check(Config, lambda cfg: require(
    cfg, positive=("k", "patches", "patch_size", "iterations", "batch", "kmeans_batch", "write_rows"),
    non_negative=("whiten_eps", "norm_eps", "std_eps"),
    choices={"precision": ("auto", "bf16", "fp32"), "dtype": ("float16", "float32"), "channels": (1, 3)},
    at_least={"image_size": 8}))
# keys that say only where or how fast the features are computed: the same key means the same file
NOT_IN_KEY = ("out", "cache_dir", "preset", "batch", "kmeans_batch", "write_rows", "compile")
# keys added after features were made, at the value those had: left out of the key there
ADDED_KEYS = {"image_size": 32, "channels": 3}
# how the svm stage fits these features: Coates's own C, 0.5||w||^2 + 100 * mean_i hinge_i^2 (no C search)
SVM_SETTINGS = {"fixed_c": 100, "c_form": "mean"}


register_preset("smoke", "kmeans", k=400, patches=100_000)
register_preset("tiny", "kmeans", k=64, patches=20_000, iterations=10)
register_preset("cpu", "kmeans", k=1600)
register_preset("paper", "kmeans", k=1600)


def output_path(cfg: Config, key: str) -> Path:
    """build/<preset>/kmeans-<key>/features.h5: another config or data file is built beside, never reused."""
    return Path(cfg.out) if cfg.out else default_root(cfg.preset or "") / f"kmeans-{key}" / "features.h5"


def load_images(spec: str, cfg: Config) -> store.ImageSet:
    """Images through the shared uint8 cache (tests replace this with generated images), as
    N x H x W x channels (channels=1: the luminance, a grey source's own values)."""
    from .. import data
    images = data.cached(spec, size=cfg.image_size, cache_dir=cfg.cache_dir)
    return store.ImageSet(store.with_channels(images.images, cfg.channels), images.labels, images.class_names,
                          images.attrs)


# ============================================================================ patches and whitening
def patch_view(images: np.ndarray | torch.Tensor, size: int):
    """N x H x W x 3 -> N x R x R x size x size x 3 view of every stride-1 patch (no copy)."""
    n, h, w, ch = images.shape
    rows, cols = h - size + 1, w - size + 1
    if rows < 1 or cols < 1:
        raise ConfigError(f"patch_size {size} is larger than the {h}x{w} images")
    if isinstance(images, torch.Tensor):
        s = images.stride()
        return images.as_strided((n, rows, cols, size, size, ch), (s[0], s[1], s[2], s[1], s[2], s[3]))
    s = images.strides
    return np.lib.stride_tricks.as_strided(images, (n, rows, cols, size, size, ch),
                                           (s[0], s[1], s[2], s[1], s[2], s[3]), writeable=False)


def sample_patches(images: np.ndarray, count: int, size: int, seed: int) -> np.ndarray:
    """count x (size*size*3) uint8 random patches; images visited in shuffled rounds."""
    rng = np.random.default_rng(seed)
    n, h, w, _ = images.shape
    rounds = -(-count // n)
    which = np.concatenate([rng.permutation(n) for _ in range(rounds)])[:count]
    r = rng.integers(0, h - size + 1, size=count)
    c = rng.integers(0, w - size + 1, size=count)
    return patch_view(images, size)[which, r, c].reshape(count, -1)


def normalise(patches: torch.Tensor, eps: float) -> torch.Tensor:
    """Per-patch (x - mean) / sqrt(var + eps), unbiased var as MATLAB's var(); float32 out."""
    p = patches.float()
    return (p - p.mean(1, keepdim=True)) / torch.sqrt(p.var(1, keepdim=True) + eps)


def zca(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean M, whitening matrix P) with P = V diag(1/sqrt(d + eps)) V^T, from the covariance of x."""
    x64 = x.double()
    mean = x64.mean(0)
    centred = x64 - mean
    cov = centred.T @ centred / (len(x) - 1)   # D x D, unbiased as MATLAB's cov()
    d, v = torch.linalg.eigh(cov)
    whiten = v @ torch.diag(1.0 / torch.sqrt(d.clamp_min(0) + eps)) @ v.T
    return mean.float(), whiten.float()


# ============================================================================ K-means
def kmeans(x: torch.Tensor, k: int, iterations: int, seed: int, batch: int = 4096,
           precision: str = "fp32", progress: bool = True) -> tuple[torch.Tensor, int]:
    """Lloyd's algorithm as Coates's run_kmeans.m: (K x D centroids, clusters empty at the end).

    Assignment maximises c.x - ||c||^2 / 2 (same argmin as the distance); empty clusters are zeroed.
    """
    g = torch.Generator().manual_seed(seed)
    centroids = torch.randn(k, x.shape[1], generator=g) * 0.1
    low = torch.bfloat16 if precision == "bf16" else torch.float32
    # [x, 1] . [c; -||c||^2 / 2] gives the assignment score from one matmul, with no N x K temporaries
    x_aug = torch.cat([x, torch.ones(len(x), 1)], 1).to(low)                 # N x (D + 1)
    scores = torch.empty(min(batch, len(x)), k, dtype=low)   # reused: fresh big buffers page-fault
    empty = 0
    for _ in tqdm(range(iterations), desc=f"kmeans K={k}", disable=not progress, leave=False):
        sums = torch.zeros(k, x.shape[1], dtype=torch.float64)
        counts = torch.zeros(k, dtype=torch.float64)
        bank = torch.cat([centroids.T, -0.5 * (centroids * centroids).sum(1)[None]]).to(low)   # (D + 1) x K
        for start in range(0, len(x), batch):
            rows = x_aug[start:start + batch]
            labels = torch.mm(rows, bank, out=scores[:len(rows)]).argmax(1)
            sums.index_add_(0, labels, x[start:start + batch].double())
            counts += torch.bincount(labels, minlength=k).double()
        empty = int((counts == 0).sum())
        centroids = (sums / counts.clamp_min(1)[:, None]).float()   # empty rows stay zero
    return centroids, empty


# ============================================================================ encoding
def quadrant_sums(f: torch.Tensor, half: int) -> torch.Tensor:
    """B x R x R x K -> B x 4 x K sums over the quadrants split at `half` (q1..q4 of Coates)."""
    return torch.stack([f[:, :half, :half].sum((1, 2)), f[:, half:, :half].sum((1, 2)),
                        f[:, :half, half:].sum((1, 2)), f[:, half:, half:].sum((1, 2))], 1)


def triangle_pool(w: torch.Tensor, cross: torch.Tensor, c_norms: torch.Tensor, batch: int, rows: int,
                  half: int) -> torch.Tensor:
    """Whitened patches w (B*R*R x D) and w.c (B*R*R x K) -> pooled triangle features B x 4 x K."""
    w_norms = (w * w).sum(1, keepdim=True)
    z = torch.sqrt(torch.clamp(w_norms + c_norms - 2 * cross.float(), min=0))   # B*R*R x K distances
    f = torch.relu(z.mean(1, keepdim=True) - z)
    return quadrant_sums(f.view(batch, rows, rows, -1), half)


def whitened_patches(images: torch.Tensor, size: int, norm_eps: float, mean: torch.Tensor) -> torch.Tensor:
    """B x H x W x 3 uint8 -> every stride-1 patch normalised and centred, B*R*R x D (im2col)."""
    cols = patch_view(images, size)
    return normalise(cols.reshape(-1, cols[0, 0, 0].numel()), norm_eps) - mean


class Encoder:
    """Centroids + whitening -> a function from uint8 image batches to pooled triangle features."""

    def __init__(self, centroids: torch.Tensor, mean: torch.Tensor, whiten: torch.Tensor, cfg: Config,
                 image_size: int, precision: str):
        self.cfg, self.whiten, self.mean = cfg, whiten, mean
        self.rows = image_size - cfg.patch_size + 1
        self.half = (self.rows + 1) // 2          # MATLAB round(27 / 2) = 14
        self.low = torch.bfloat16 if precision == "bf16" else torch.float32
        self.bank = centroids.T.to(self.low).contiguous()          # D x K
        self.c_norms = (centroids * centroids).sum(1)               # K
        positions = cfg.batch * self.rows * self.rows
        # Reused output buffers: on this kind of machine page faults on fresh 20-40 MB tensors
        # cost more than the arithmetic done in them.
        self.w = torch.empty(positions, centroids.shape[1])
        self.cross = torch.empty(positions, centroids.shape[0], dtype=self.low)
        self.prepare, self.pool = whitened_patches, triangle_pool
        if cfg.compile:
            import logging
            # inductor's C++ toolchain lookup warns "No CUDA runtime is found, using CUDA_HOME=..." on every
            # CPU-only machine, in the middle of the progress bar: nothing is wrong, so it is not shown
            if not torch.cuda.is_available():
                logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
            self.prepare = torch.compile(whitened_patches, dynamic=False)
            self.pool = torch.compile(triangle_pool, dynamic=False)

    def step(self, images: torch.Tensor) -> torch.Tensor:
        """B x H x W x 3 uint8 (B = cfg.batch) -> B x 4K float32."""
        centred = self.prepare(images, self.cfg.patch_size, self.cfg.norm_eps, self.mean)
        torch.mm(centred, self.whiten, out=self.w)
        torch.mm(self.w.to(self.low), self.bank, out=self.cross)
        pooled = self.pool(self.w, self.cross, self.c_norms, len(images), self.rows, self.half)
        return pooled.reshape(len(images), -1)

    def fall_back_to_eager(self, err: Exception) -> None:
        print(f"kmeans: torch.compile failed ({type(err).__name__}: {str(err).splitlines()[0][:120]}); "
              f"encoding eagerly (slower)")
        self.prepare, self.pool = whitened_patches, triangle_pool

    def __call__(self, images: np.ndarray, desc: str = "encode") -> Iterator[tuple[int, np.ndarray]]:
        """Yield (start row, rows x 4K float32) blocks of `cfg.write_rows` images."""
        b = self.cfg.batch
        block = max(b, self.cfg.write_rows // b * b)
        with torch.inference_mode(), tqdm(total=len(images), desc=desc, unit="img", leave=False) as bar:
            for start in range(0, len(images), block):
                chunk = torch.from_numpy(np.ascontiguousarray(images[start:start + block]))
                yield start, self.encode_chunk(chunk)
                bar.update(len(chunk))

    def encode_chunk(self, chunk: torch.Tensor) -> np.ndarray:
        b = self.cfg.batch
        out = np.empty((len(chunk), 4 * self.bank.shape[1]), dtype=np.float32)
        for i in range(0, len(chunk), b):
            part = chunk[i:i + b]
            n = len(part)
            if n < b:   # pad the tail so the compiled kernels keep one static shape
                part = torch.cat([part, part.new_zeros((b - n,) + part.shape[1:])])
            out[i:i + n] = self.safe_step(part)[:n].numpy()
        return out

    def safe_step(self, images: torch.Tensor) -> torch.Tensor:
        try:
            return self.step(images)
        except Exception as err:   # a missing compiler or an inductor bug: same maths, eagerly
            if self.prepare is whitened_patches:
                raise
            self.fall_back_to_eager(err)
            return self.step(images)


# ============================================================================ the stage
def source_ids(cfg: Config) -> dict[str, str]:
    """The identity of the data (path, slice, size, content digest: `data.source_id`), so a changed file is
    never mistaken for the one an earlier result was computed from."""
    from .. import data
    size = cfg.image_size
    return {"train": data.source_id(cfg.train, size), "test": data.source_id(cfg.test, size) if cfg.test else ""}


def feature_key(cfg: Config, sources: dict[str, str]) -> str:
    return artifact_key("kmeans", keyed(to_dict(cfg), ADDED_KEYS), ignore=NOT_IN_KEY, **sources)


def centroid_key(cfg: Config, train_source: str) -> dict:
    """What the centroids depend on (the training data, not the test data): another key is recomputed."""
    keys = ("train", "k", "patches", "patch_size", "iterations", "whiten_eps", "norm_eps", "seed", "precision")
    grey = {"channels": cfg.channels} if cfg.channels != 3 else {}   # the size is in train_source
    return {**{key: getattr(cfg, key) for key in keys}, **grey, "train_source": train_source}


def learn_centroids(images: np.ndarray, cfg: Config, precision: str, train_source: str = "") -> dict:
    """Patches -> normalisation -> ZCA -> K-means, with the seconds each took."""
    seconds = {}
    t = time.perf_counter()
    raw = sample_patches(images, cfg.patches, cfg.patch_size, cfg.seed)
    patches = normalise(torch.from_numpy(raw), cfg.norm_eps)                 # patches x D
    seconds["patches"] = time.perf_counter() - t
    t = time.perf_counter()
    mean, whiten = zca(patches, cfg.whiten_eps)
    white = (patches - mean) @ whiten
    del patches
    seconds["whitening"] = time.perf_counter() - t
    t = time.perf_counter()
    centroids, empty = kmeans(white, cfg.k, cfg.iterations, cfg.seed, cfg.kmeans_batch, precision)
    seconds["kmeans"] = time.perf_counter() - t
    # tensors, numbers, strings and plain containers only: what a weights_only load accepts
    return {"centroids": centroids, "mean": mean, "whiten": whiten, "empty_clusters": int(empty),
            "seconds": {k: float(v) for k, v in seconds.items()}, "key": centroid_key(cfg, train_source)}


def read_centroid_cache(path: Path) -> dict | None:
    """The saved centroids, or None (with one line) where the file is refused or unreadable: it is
    only a shortcut, so it is recomputed rather than trusted or fixed by hand."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)   # never runs code from the file
    except Exception as err:   # noqa: BLE001 - refused (pickled code), truncated, not a torch file: all recompute
        print(f"kmeans: not reusing {path} ({unpickling_reason(err)}); recomputing the centroids")
        return None
    return saved if isinstance(saved, dict) else None


def load_or_learn_centroids(path: Path, images: np.ndarray, cfg: Config, precision: str,
                            train_source: str = "") -> dict:
    saved = read_centroid_cache(path) if path.exists() else None
    if saved is not None and saved.get("key") == centroid_key(cfg, train_source):
        print(f"kmeans: reusing centroids from {path}")
        return {**saved, "reused": True}
    state = learn_centroids(images, cfg, precision, train_source)
    torch_atomic_save(state, path)
    return {**state, "reused": False}


def encode_split(writer: store.FeatureWriter, split: str, data: store.ImageSet, encoder: Encoder,
                 source: str, on_block: Callable[[np.ndarray], None] | None = None) -> None:
    writer.create_split(split, len(data), source)
    for start, block in encoder(data.images, desc=f"encode {split}"):
        if on_block is not None:
            on_block(block)
        writer.write(split, start, block, data.labels[start:start + len(block)])


class RunningMoments:
    """Column sums in float64 for the training mean and unbiased variance."""

    def __init__(self):
        self.n, self.sum, self.sumsq = 0, 0.0, 0.0

    def __call__(self, block: np.ndarray) -> None:
        b = block.astype(np.float64)
        self.n += len(b)
        self.sum = self.sum + b.sum(0)
        self.sumsq = self.sumsq + (b * b).sum(0)

    def mean_std(self, eps: float) -> tuple[np.ndarray, np.ndarray]:
        mean = self.sum / self.n
        var = (self.sumsq - self.n * mean * mean) / max(self.n - 1, 1)
        return mean.astype(np.float32), np.sqrt(np.maximum(var, 0) + eps).astype(np.float32)


def standardise_in_place(h5, mean: np.ndarray, std: np.ndarray, rows: int = 2048) -> None:
    """(x - mean) / std over every split of an open feature file; stores mean and std at the root."""
    for split in [k for k in h5.keys() if k in ("train", "test")]:
        data = h5[split]["features"]
        for start in range(0, data.shape[0], rows):
            block = data[start:start + rows].astype(np.float32)
            data[start:start + rows] = ((block - mean) / std).astype(data.dtype)
    h5.create_dataset("feature_mean", data=mean)
    h5.create_dataset("feature_std", data=std)


def finished(cfg: Config, path: Path, key: str) -> bool:
    if not path.exists():
        return False
    try:
        with store.FeatureFile(path) as ff:
            return ff.attrs.get("key") == key
    except ConfigError:
        return False


def feature_attrs(cfg: Config, key: str, sources: dict[str, str], precision: str, state: dict,
                  train: store.ImageSet, test: store.ImageSet | None) -> dict:
    return {"kind": "kmeans", "model": f"kmeans-{cfg.k}", "config": to_dict(cfg), "key": key,
            "source_ids": sources, "precision": precision, "class_names": train.class_names,
            "standardized": cfg.standardize, "empty_clusters": state["empty_clusters"],
            "skipped_train": train.skipped, "skipped_test": test.skipped if test is not None else 0}


def run(cfg: Config) -> Path:
    """Coates's single-layer K-means features (patches, ZCA, K-means, triangle encoding) -> feature file."""
    return STAGE.run(cfg)


def encode(cfg: Config, out: Path, key: str) -> Path:
    """Centroids (reused when saved for this config), then the encoded splits (the caller holds the lock)."""
    sources = source_ids(cfg)
    check_writable(out.parent)   # before loading anything
    started = time.perf_counter()
    precision = resolve_precision(cfg.precision, torch.device("cpu"))
    t = time.perf_counter()
    train = load_images(cfg.train, cfg)
    test = load_images(cfg.test, cfg) if cfg.test else None
    seconds = {"load": time.perf_counter() - t}
    rows = len(train) + (len(test) if test is not None else 0)
    check_writable(out.parent, rows * (4 * cfg.k * np.dtype(cfg.dtype).itemsize + 8))   # before the K-means
    state = load_or_learn_centroids(out.with_name("centroids.pt"), train.images, cfg, precision, sources["train"])
    seconds.update({k: (0.0 if state["reused"] else v) for k, v in state["seconds"].items()})
    encoder = Encoder(state["centroids"], state["mean"], state["whiten"], cfg, train.images.shape[1], precision)
    attrs = feature_attrs(cfg, key, sources, precision, state, train, test)
    layers = [(name, cfg.k) for name in QUADRANTS]
    t = time.perf_counter()
    with store.FeatureWriter(out, layers, attrs, dtype=cfg.dtype) as writer:
        moments = RunningMoments()
        encode_split(writer, "train", train, encoder, cfg.train, moments)
        if test is not None:
            encode_split(writer, "test", test, encoder, cfg.test)
        seconds["encoding"] = time.perf_counter() - t
        t = time.perf_counter()
        if cfg.standardize:
            standardise_in_place(writer.h5, *moments.mean_std(cfg.std_eps))
        seconds["standardize"] = time.perf_counter() - t
        seconds["total"] = time.perf_counter() - started
        writer.attrs["seconds"] = seconds
    log = {"config": to_dict(cfg), "key": key, "source_ids": sources, "precision": precision, "seconds": seconds,
           "features": str(out), "empty_clusters": state["empty_clusters"], "centroids_reused": state["reused"],
           "skipped_train": attrs["skipped_train"], "skipped_test": attrs["skipped_test"], "provenance": provenance()}
    atomic_write_json(out.with_name("kmeans.json"), log)
    return out


__all__ = ["Config", "run", "Encoder", "kmeans", "zca", "normalise", "sample_patches", "patch_view",
           "triangle_pool", "quadrant_sums", "QUADRANTS"]


# the feature file, centroids.pt and kmeans.json beside it: one process at a time; validate: a Config built
# in code has not passed `build`
STAGE = Stage("kmeans", resolve=validate, key=lambda cfg: feature_key(cfg, source_ids(cfg)), out=output_path,
              finished=finished, build=encode)
