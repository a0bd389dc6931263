"""Image sources -> the uint8 image cache (the `prepare` stage).

A *source spec* is one string, accepted wherever a stage takes data:

    path/to/file.parquet            HF-layout parquet: an Image column ({'bytes','path'} structs)
    path/to/folder[:split]          a folder of such parquet files (`:train` keeps files named train*)
    hf:<dataset id>[:split]         `datasets.load_dataset(id, split=split)`, split defaults to train
    path/to/cifar-10-batches-py     CIFAR-10 python batches: data_batch_1..5; `...:test` = test_batch
    path/to/imagenet32[:val]        Imagenet32 batches (Chrabaszcz et al.): train_data_batch_*; `:val`
    path/to/mnist[:test]            MNIST / Fashion-MNIST idx files (train-*-ubyte[.gz]; `:test` = t10k-*)
    path/to/root[:split]            a JPEG tree root/<class>/<file> (`:train` = root/train)
    path/to/folder[:split]          a folder of image files, flat or nested without class meaning: unlabelled
    path/to/cache.h5                an image cache written by `prepare`

Any spec may end in a python slice `[a:b]` over a fixed seed-0 shuffle of the rows, read in file order
(so `[:40000]` / `[40000:]` are a random, disjoint carve-out even of class-sorted files):
`train.parquet[:40000]` and `train.parquet[40000:]` carve a validation split out of train.

Geometry (docs/protocol.md s.1): min-side resize to `size`, then center crop `size` x `size`.
Both happen in one PIL bicubic resampling of the centred square (`resize(box=...)`), which is
the same as resize-then-crop in continuous coordinates without rounding the intermediate size;
PIL's bicubic widens its kernel when shrinking, so it is antialiased. Images already
`size` x `size` pass through untouched. JPEGs are first decoded at a reduced DCT scale
(Pillow draft mode) that still leaves the short side >= `size`, which makes full-size ImageNet
JPEGs several times cheaper (see benchmarks/prepare.py).
"""
from __future__ import annotations

import bisect
import contextlib
import hashlib
import io
import json
import math
import multiprocessing
import os
import pickle
import re
import socket
import sys
import time
import urllib.parse
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import h5py
import numpy as np
from PIL import Image
from tqdm import tqdm

from ..core.config import ConfigError, register_check, require, to_dict, validate
from ..core.lock import building
from ..core.store import ImageSet, _load_attr, read_image_cache, write_image_cache
from ..core.utils import check_writable


@dataclass(frozen=True)
class Config:
    source: str = "hf:uoft-cs/cifar10:train"   # the real CIFAR-10 on the Hub; pass a local path offline
    size: int = 32             # docs/protocol.md s.1: every image becomes 32 x 32
    cache_dir: str = "cache"   # caches are rebuilt from sources, so they live apart from results
    workers: int = 2           # decoding processes; this machine has 2 cores
    out: str = ""              # explicit output path; "" = cache_path(source, size, cache_dir)
    label_column: str = ""     # parquet / hf: the label column (e.g. fine_label); "" = the ClassLabel or 'label'


register_check(Config, lambda cfg: require(cfg, at_least={"size": 1}, non_negative=("workers",), stage="prepare"))

ACCEPTED = ("a parquet file or folder (HF layout), hf:<dataset id>[:split], a CIFAR-10 batches folder[:test], "
            "an Imagenet32 batches folder[:val], an MNIST-style idx folder[:test], a JPEG tree root/<class>/<file>, "
            "a folder of JPEG/PNG files (unlabelled), or an .h5 image cache; optionally followed by a row slice [a:b]")
CLASS_LAYOUT = "the class-folder layout root/<class>/<file> (one folder of images per class)"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}
PARQUET_BATCH = 1024     # rows decoded per step: bounds memory, keeps the progress bar moving
FILE_BATCH = 512         # files handed to the worker pool per step
DRAFT_MARGIN = 1         # JPEG draft keeps the short side >= DRAFT_MARGIN * size (1: fastest; see benchmark)
POOL_MIN_BYTES = 16_000  # mean encoded bytes per image above which decoding pays for the worker round trip
MAX_SKIP_EXAMPLES = 20   # how many unreadable items are named in the cache attrs


# ============================================================================ geometry
def fit_square(img: Image.Image, size: int) -> np.ndarray:
    """Min-side resize to `size` then center crop to `size` x `size`: HWC uint8 RGB."""
    extent = img.size
    if extent != (size, size):
        drafted = img.draft("RGB", (DRAFT_MARGIN * size, DRAFT_MARGIN * size))   # no-op unless JPEG
        if drafted is not None:
            extent = drafted[1][2:]   # the image area in drafted pixels (the size is rounded up)
    if img.mode != "RGB":
        img = img.convert("RGB")      # grayscale, CMYK, palette, RGBA (alpha dropped)
    if img.size == (size, size):
        return np.asarray(img, dtype=np.uint8)
    width, height = extent
    side = min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    out = img.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + side, top + side))
    return np.asarray(out, dtype=np.uint8)


def decode_image(item: bytes | str, size: int) -> np.ndarray | None:
    """Encoded bytes or a file path -> size x size x 3 uint8, or None if the image is unreadable."""
    try:
        with Image.open(io.BytesIO(item) if isinstance(item, bytes) else item) as img:
            return fit_square(img, size)
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError):
        return None   # counted and reported by the caller


def fit_array(images: np.ndarray, size: int) -> np.ndarray:
    """Decoded N x H x W x 3 uint8 images -> N x size x size x 3 (untouched when already that size)."""
    if images.shape[1:3] == (size, size):
        return images
    return np.stack([fit_square(Image.fromarray(img), size) for img in images])


# ============================================================================ source specs
class DataError(ConfigError):
    """A source spec that cannot be read. `spec` is the spec as the user typed it, so the CLI can say which
    key (or make variable) to set; `hint` is that advice, put before the long list of accepted forms."""

    def __init__(self, message: str, spec: str = "", accepted: bool = False):
        super().__init__(message)
        self.message, self.spec, self.accepted, self.hint = message, spec, accepted, ""

    def __str__(self) -> str:
        hint = f"; {self.hint}" if self.hint else ""
        return f"{self.message}{hint}" + (f" (accepted: {ACCEPTED})" if self.accepted else "")


@dataclass(frozen=True)
class Spec:
    text: str                # the spec as given
    kind: str                # parquet | hf | cifar | imagenet32 | idx | jpeg-tree | images | cache
    location: str            # an absolute path, or the dataset id for hf
    split: str | None
    start: int | None        # the [a:b] slice, None where omitted
    stop: int | None
    typed: str = ""          # the path as typed: messages echo it (location has symlinks resolved)


SLICE = re.compile(r"^(?P<base>.*)\[(?P<start>[+-]?\d*):(?P<stop>[+-]?\d*)\]$")
SPLIT = re.compile(r"^(?P<path>.+):(?P<split>[\w.-]+)$")
SPLITS = {"cifar": ("train", "test"), "imagenet32": ("train", "val"), "idx": ("train", "test")}


def parse_spec(text: str) -> Spec:
    try:
        return _parse_spec(text.strip())
    except DataError:
        raise
    except ConfigError as err:   # e.g. a folder's bad split: the CLI still names the key that gave it
        raise DataError(str(err), text.strip()) from None


def _parse_spec(text: str) -> Spec:
    match = SLICE.match(text)
    if not match and re.search(r"\[[^\[\]]*\]$", text) and not Path(text).expanduser().exists():
        # `train.parquet[:abc]` would otherwise be reported as a missing file named with its slice
        bad = text[text.rindex("["):]
        raise DataError(f"bad slice {bad} in {text}: a row slice is [a:b] with whole numbers, either one may be "
                        f"left out (e.g. [:40000] or [40000:])", text)
    base = match["base"] if match else text
    start, stop = (_int_or_none(match["start"]), _int_or_none(match["stop"])) if match else (None, None)
    if base.startswith("hf:"):
        dataset_id, _, split = base[3:].partition(":")
        return Spec(text, "hf", dataset_id, split or "train", start, stop)
    path, split = Path(base).expanduser(), None
    split_match = SPLIT.match(base)
    if not path.exists() and split_match and Path(split_match["path"]).expanduser().exists():
        path, split = Path(split_match["path"]).expanduser(), split_match["split"]
    if not path.exists():
        raise DataError(f"data source not found: {base}", text, accepted=True)
    kind = detect_kind(path, split)
    if kind in SPLITS and split is not None and split not in SPLITS[kind]:
        raise ConfigError(f"{kind} folder {path} has no split {split!r}; choose from: {', '.join(SPLITS[kind])}")
    return Spec(text, kind, str(path.resolve()), split, start, stop, typed=str(path))


def absolute_spec(text: str) -> str:
    """The spec with its local path made absolute (`:split` and `[a:b]` kept as written, `hf:` ids
    untouched), so a run folder records data that still resolves from another working directory."""
    text = text.strip()
    match = SLICE.match(text)
    base = match["base"] if match else text
    if base.startswith("hf:") or not base:
        return text
    suffix = text[len(base):]
    split_match = SPLIT.match(base)
    if not Path(base).expanduser().exists() and split_match and Path(split_match["path"]).expanduser().exists():
        return f"{Path(split_match['path']).expanduser().resolve()}:{split_match['split']}{suffix}"
    return f"{Path(base).expanduser().resolve()}{suffix}"


def _int_or_none(text: str) -> int | None:
    return int(text) if text not in ("", "+", "-") else None


def detect_kind(path: Path, split: str | None = None) -> str:
    """Which reader a path needs, from its suffix or what the folder holds."""
    if path.is_file():
        kinds = {".parquet": "parquet", ".h5": "cache", ".hdf5": "cache"}
        if path.suffix.lower() in kinds:
            return kinds[path.suffix.lower()]
        raise DataError(f"unrecognised data file {path}", accepted=True)
    names = {p.name for p in path.iterdir()}
    if names & {"data_batch_1", "test_batch"} or "cifar-10-batches-py" in names:
        return "cifar"
    if "val_data" in names or any(n.startswith("train_data_batch_") for n in names):
        return "imagenet32"
    if any(n.startswith(("train-images-idx3-ubyte", "t10k-images-idx3-ubyte")) for n in names):
        return "idx"
    root = path / split if split and (path / split).is_dir() else path   # imagenet:train = imagenet/train
    if any(_has_images(sub) for sub in root.iterdir() if sub.is_dir()):
        # checked before parquet: walking a 1.28M-file tree for *.parquet takes long. Images beside the
        # folders mean the folders are no classes (a class tree keeps every image in a class folder)
        return "images" if _has_images(root) else "jpeg-tree"
    if next(path.rglob("*.parquet"), None) is not None:
        return "parquet"
    if next(_image_files(root), None) is not None:
        return "images"      # flat, or nested without a class per folder: unlabelled (`require_labelled`)
    raise DataError(f"unrecognised data folder {path}", accepted=True)


def _has_images(folder: Path) -> bool:
    return any(p.suffix.lower() in IMAGE_SUFFIXES for p in folder.iterdir())


def _image_files(root: Path) -> Iterator[str]:
    """Every image file under root, in sorted path order; hidden files and folders (.git, .cache) skipped."""
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES:
                yield os.path.join(folder, name)


def require_labelled(spec: str) -> None:
    """Refuse a folder of images without classes where labelled data is needed (the SVM's train and test)."""
    parsed = parse_spec(spec) if spec else None
    if parsed is not None and parsed.kind == "images":
        root = Path(parsed.location) / parsed.split if parsed.split else Path(parsed.location)
        folders = any(p.is_dir() for p in root.iterdir())
        loose = " (it holds image files outside any class folder)" if folders and _has_images(root) else ""
        raise DataError(f"{spec} is a folder of images without classes{loose}; labelled data needs {CLASS_LAYOUT}; "
                        f"as unlabelled pretraining data it is fine", spec)


SLICE_SEED = 0   # the fixed shuffle that slices index (see `_resolve_rows`)


def _resolve_rows(spec: Spec, num_rows: int) -> np.ndarray:
    """Sorted row indices picked by the spec's `[a:b]`.

    A slice indexes a fixed seeded shuffle of the rows, not the file order, and the picked rows
    are then read in file order. So `[:40000]` and `[40000:]` are disjoint, together cover the
    split, and are random carve-outs whatever order the file stores: the shared CIFAR-10 parquet,
    many ImageNet mirrors and every JPEG tree are sorted by class, where a file-order slice would
    hold out whole classes.
    """
    if spec.start is None and spec.stop is None:
        rows = np.arange(num_rows)
    else:
        order = np.random.default_rng(SLICE_SEED).permutation(num_rows)
        rows = np.sort(order[slice(spec.start, spec.stop)])
    if len(rows) == 0:
        where = f" (slice [{spec.start}:{spec.stop}] of {num_rows} rows)" if num_rows else ""
        raise DataError(f"data source {spec.text} holds no images{where}; check the path and slice", spec.text)
    return rows


# ============================================================================ readers
@dataclass
class RawSource:
    """What a reader hands over: a row count and batches of undecoded rows.

    `batches(start, stop)` yields (items, labels): items are either a list of encoded images
    (bytes or file paths, decoded in worker processes) or an N x H x W x 3 uint8 array.
    """
    num_rows: int
    class_names: list[str]
    batches: Callable[[int, int], Iterator[tuple[Sequence | np.ndarray, np.ndarray]]]
    item_names: Callable[[int], str] = str   # row index -> how a skipped or mislabelled row is named
    attrs: dict[str, Any] = field(default_factory=dict)
    label_offset: int = 0                    # subtracted from the stored labels (Imagenet32's are 1-based)


# ---------------------------------------------------------------------------- parquet / HF
def _hf_features(schema) -> dict[str, dict]:
    meta = (schema.metadata or {}).get(b"huggingface")
    if not meta:
        return {}
    info = json.loads(meta)
    return info.get("info", {}).get("features", {}) or {}


def _image_column(schema, features: dict[str, dict], where: str) -> str:
    import pyarrow as pa
    for name, feature in features.items():
        if isinstance(feature, dict) and feature.get("_type") == "Image":
            return name
    for f in schema:   # parquet written without HF metadata: a bytes/path struct still is an image
        if pa.types.is_struct(f.type) and f.type.get_field_index("bytes") >= 0:
            return f.name
    raise ConfigError(f"{where} has no image column (columns: {', '.join(schema.names)}); expected an HF Image "
                      f"column of {{bytes, path}} structs, as `datasets` writes it")


def _label_column(schema, features: dict[str, dict], wanted: str = "",
                  where: str = "") -> tuple[str | None, list[str]]:
    labels = {n: f for n, f in features.items() if isinstance(f, dict) and f.get("_type") == "ClassLabel"}
    if wanted:
        if wanted not in schema.names:
            raise ConfigError(f"{where} has no label column {wanted!r} (columns: {', '.join(schema.names)}); "
                              f"set label_column= to one of them, or '' to detect it")
        return wanted, list(labels[wanted].get("names") or []) if wanted in labels else []
    if labels:
        name = "label" if "label" in labels else next(iter(labels))
        return name, list(labels[name].get("names") or [])
    if "label" in schema.names:
        return "label", []
    return None, []   # unlabelled images: labels become -1


def _arrow_items(table, image_col: str, base_dir: Path | None) -> list[bytes | str]:
    """The encoded images of one arrow batch: bytes, or a file path where bytes are missing."""
    import pyarrow as pa
    column = table.column(image_col)
    if pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type):
        return column.to_pylist()
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    blobs, paths = column.field("bytes").to_pylist(), column.field("path").to_pylist()
    return [b if b is not None else _local(p, base_dir) for b, p in zip(blobs, paths)]


def _local(path: str | None, base_dir: Path | None) -> str:
    if path is None:
        return ""   # neither bytes nor path: decode_image fails and the row is counted as skipped
    return str(base_dir / path) if base_dir is not None and not os.path.isabs(path) else path


def _arrow_labels(table, label_col: str | None) -> np.ndarray:
    """The label column as stored (nulls become NaN or None); `LabelCheck` turns it into int64."""
    if label_col is None:
        return np.full(table.num_rows, -1, dtype=np.int64)
    return table.column(label_col).to_numpy(zero_copy_only=False)


def _parquet_files(path: Path, split: str | None) -> list[Path]:
    files = [path] if path.is_file() else sorted(path.rglob("*.parquet"))
    if split is not None:
        files = [f for f in files if f.name.startswith(split) or f.parent.name == split]
    if not files:
        raise ConfigError(f"no parquet files for split {split!r} under {path}; name the file or folder directly")
    return files


def read_parquet(spec: Spec, label_column: str = "") -> RawSource:
    """HF-layout parquet files, read one record batch at a time with pyarrow."""
    import pyarrow.parquet as pq
    files = [(f, pq.ParquetFile(f)) for f in _parquet_files(Path(spec.location), spec.split)]
    schema = files[0][1].schema_arrow
    features = _hf_features(schema)
    image_col = _image_column(schema, features, str(files[0][0]))
    label_col, class_names = _label_column(schema, features, label_column, str(files[0][0]))
    for name, pf in files:
        missing = [c for c in (image_col, label_col) if c and c not in pf.schema_arrow.names]
        if missing:
            raise ConfigError(f"{name} has no column {missing[0]!r} (columns: {', '.join(pf.schema_arrow.names)}); "
                              f"all parquet files of one source need the same columns")
    groups = [(name, pf, g, pf.metadata.row_group(g).num_rows) for name, pf in files for g in range(pf.num_row_groups)]
    columns = [image_col] + ([label_col] if label_col else [])

    def batches(start: int, stop: int):
        offset = 0
        for name, pf, group, n in groups:
            pos = offset
            if max(start, offset) < min(stop, offset + n):   # row groups outside the slice are never read
                for batch in pf.iter_batches(PARQUET_BATCH, row_groups=[group], columns=columns):
                    lo, hi = max(start - pos, 0), min(stop - pos, batch.num_rows)
                    if lo < hi:
                        part = batch.slice(lo, hi - lo)
                        yield _arrow_items(part, image_col, name.parent), _arrow_labels(part, label_col)
                    pos += batch.num_rows
            offset += n

    return RawSource(sum(g[-1] for g in groups), class_names, batches, lambda i: f"row {i}",
                     {"image_column": image_col, "label_column": label_col})


@contextlib.contextmanager
def _offline_unless_hub_reachable(timeout: float = 3.0) -> Iterator[None]:
    """Without a route to the Hub, run `datasets` in offline mode: it then loads a locally cached
    copy at once, or fails at once, instead of retrying for half a minute."""
    import datasets.config
    import huggingface_hub.constants as hub
    if hub.HF_HUB_OFFLINE or _reachable(urllib.parse.urlparse(hub.ENDPOINT).hostname, timeout):
        yield
        return
    saved = hub.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE
    hub.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE = saved


def _reachable(host: str | None, timeout: float) -> bool:
    try:
        socket.create_connection((host or "huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def read_hf(spec: Spec, label_column: str = "") -> RawSource:
    """`hf:<id>[:split]` through datasets.load_dataset; rows stay in arrow until decoded."""
    import datasets
    try:
        with _offline_unless_hub_reachable():
            ds = datasets.load_dataset(spec.location, split=spec.split)
    except Exception as err:   # offline, unknown id, unknown split: all need the same advice
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise DataError(f"cannot load Hugging Face dataset {spec.location!r} split {spec.split!r} ({reason}); "
                        f"offline, pass a local path instead", spec.text, accepted=True) from None
    image_col = next((n for n, f in ds.features.items() if isinstance(f, datasets.Image)), None)
    if image_col is None:
        raise ConfigError(f"dataset {spec.location!r} has no Image column (features: {', '.join(ds.features)})")
    labels = {n: f for n, f in ds.features.items() if isinstance(f, datasets.ClassLabel)}
    label_col = label_column or ("label" if "label" in labels else next(iter(labels), None))
    if label_col and label_col not in ds.features:
        raise ConfigError(f"dataset {spec.location!r} has no label column {label_col!r} (features: "
                          f"{', '.join(ds.features)}); set label_column= to one of them, or '' to detect it")
    class_names = list(labels[label_col].names) if label_col in labels else []

    def batches(start: int, stop: int):
        for table in ds.select(range(start, stop)).with_format("arrow").iter(batch_size=PARQUET_BATCH):
            yield _arrow_items(table, image_col, None), _arrow_labels(table, label_col)

    return RawSource(len(ds), class_names, batches, lambda i: f"row {i}",
                     {"image_column": image_col, "label_column": label_col})


# ---------------------------------------------------------------------------- pickled batches
# The only globals an image batch needs: numpy arrays (python 2's protocol 2 via _reconstruct, newer
# protocols via _frombuffer), their dtypes and scalars, and the bytes codec of protocol 2 written by
# python 3. Builtin containers need none. Anything else would be code run by loading the file.
PICKLE_GLOBALS = {(module, name) for module in ("numpy.core.multiarray", "numpy._core.multiarray")
                  for name in ("_reconstruct", "scalar")} | {
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}


class _BatchUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"global {module}.{name}")
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict:
    """A pickled batch file, read without running code from it."""
    try:
        with open(path, "rb") as fh:
            batch = _BatchUnpickler(fh, encoding="bytes").load()   # python 2 str -> bytes, as the files need
    except pickle.UnpicklingError as err:
        if str(err).startswith("global "):
            raise ConfigError(f"{path}: refused to load the {err}: an image batch holds only numpy arrays, lists "
                              f"and dicts, and this file would run code; replace it with the original download") from None
        raise ConfigError(f"{path} is not a readable pickled batch ({err}); replace it with the original download") from None
    except (EOFError, ValueError, TypeError, AttributeError, ImportError, IndexError, KeyError) as err:
        raise ConfigError(f"{path} is not a readable pickled batch ({type(err).__name__}: {err}); replace it with "
                          f"the original download") from None
    if not isinstance(batch, dict):
        raise ConfigError(f"{path} holds a {type(batch).__name__}, not a batch dict; replace it with the original download")
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in batch.items()}


def _planar_to_hwc(data: np.ndarray) -> np.ndarray:
    """N x 3*S*S channel-planar rows (all R, then G, then B; row-major) -> N x S x S x 3."""
    side = int(round((data.shape[1] // 3) ** 0.5))
    return np.ascontiguousarray(np.asarray(data, dtype=np.uint8).reshape(-1, 3, side, side).transpose(0, 2, 3, 1))


def _numbered(folder: Path, prefix: str) -> list[Path]:
    files = [p for p in folder.iterdir() if re.fullmatch(re.escape(prefix) + r"\d+(\.pkl|\.pickle)?", p.name)]
    return sorted(files, key=lambda p: int(re.findall(r"\d+", p.name[len(prefix):])[0]))


def _batch_files(folder: Path, train_prefix: str, other: str, split: str) -> list[Path]:
    files = _numbered(folder, train_prefix) if split == "train" else [f for f in [folder / other] if f.exists()]
    if not files:
        wanted = f"{train_prefix}1.." if split == "train" else other
        raise ConfigError(f"no {wanted} files in {folder} for split {split!r}; point at the folder that holds them")
    return files


def _pickled_source(files: list[Path], label_offset: int, class_names: Callable[[int], list[str]]) -> RawSource:
    """Every batch file decoded to HWC up front; batches() hands each chunk over once and drops it.
    Labels stay as stored (load_source checks them, then subtracts `label_offset`)."""
    chunks, labels = [], []
    for f in files:
        batch = _unpickle(f)
        if "data" not in batch or "labels" not in batch:
            raise ConfigError(f"{f} is not an image batch (keys: {sorted(batch)}); expected 'data' and 'labels'")
        chunks.append(_planar_to_hwc(batch["data"]))
        labels.append(np.asarray(batch["labels"]))
    num_classes = max(_largest_label(lab) for lab in labels) - label_offset + 1
    starts = np.cumsum([0] + [len(c) for c in chunks]).tolist()

    def item_name(i: int) -> str:
        k = bisect.bisect_right(starts, i) - 1
        return f"{files[k].name} row {i - starts[k]}"

    def batches(start: int, stop: int):
        offset = 0
        for i, (chunk, lab) in enumerate(zip(chunks, labels)):
            lo, hi = max(start - offset, 0), min(stop - offset, len(chunk))
            if lo < hi:
                yield chunk[lo:hi], lab[lo:hi]
            offset += len(chunk)
            chunks[i] = None   # release each file's pixels once copied into the output

    return RawSource(starts[-1], class_names(num_classes), batches, item_name, label_offset=label_offset)


def _largest_label(labels: np.ndarray) -> int:
    """The largest integer label (bad values are reported by load_source with their row)."""
    if labels.dtype.kind in "iu":
        return int(labels.max(initial=-1))
    return max((int(v) for v in labels.ravel() if isinstance(v, (int, np.integer))), default=-1)


def read_cifar(spec: Spec) -> RawSource:
    """CIFAR-10 python batches: `folder` = data_batch_1..5, `folder:test` = test_batch."""
    folder = Path(spec.location)
    if (folder / "cifar-10-batches-py").is_dir():
        folder = folder / "cifar-10-batches-py"
    files = _batch_files(folder, "data_batch_", "test_batch", spec.split or "train")
    meta = folder / "batches.meta"
    names = [n.decode() if isinstance(n, bytes) else n for n in _unpickle(meta)["label_names"]] if meta.exists() else []
    return _pickled_source(files, 0, lambda k: names or [str(i) for i in range(k)])


def read_imagenet32(spec: Spec) -> RawSource:
    """Imagenet32/64 batches (Chrabaszcz et al. 2017): labels there are 1-based, here 0-based."""
    folder = Path(spec.location)
    files = _batch_files(folder, "train_data_batch_", "val_data", spec.split or "train")
    mapping = folder / "map_clsloc.txt"   # 'n02119789 1 kit_fox' lines, shipped beside the batches
    wnids = {}
    if mapping.exists():
        for line in mapping.read_text().split("\n"):
            if line.strip():
                wnid, index, *_ = line.split()
                wnids[int(index) - 1] = wnid
    return _pickled_source(files, 1, lambda k: [wnids.get(i, str(i)) for i in range(max(k, len(wnids)))])


# ---------------------------------------------------------------------------- JPEG tree
def read_jpeg_tree(spec: Spec) -> RawSource:
    """root/<class>/<file>: class names are the sorted folder names, files sorted within each."""
    root = Path(spec.location) / spec.split if spec.split else Path(spec.location)
    if not root.is_dir():
        raise ConfigError(f"JPEG tree {spec.location} has no folder {spec.split!r}")
    classes = sorted(d.name for d in os.scandir(root) if d.is_dir())
    files, labels = [], []
    for label, name in enumerate(classes):
        found = sorted(e.path for e in os.scandir(root / name)
                       if e.is_file() and os.path.splitext(e.name)[1].lower() in IMAGE_SUFFIXES)
        files += found
        labels += [label] * len(found)
    labels = np.asarray(labels, dtype=np.int64)

    def batches(start: int, stop: int):
        for lo in range(start, stop, FILE_BATCH):
            hi = min(lo + FILE_BATCH, stop)
            yield files[lo:hi], labels[lo:hi]

    return RawSource(len(files), classes, batches, lambda i: os.path.relpath(files[i], root))


def read_image_folder(spec: Spec) -> RawSource:
    """A folder of image files, flat or nested (folders carry no class): every file, in sorted path order,
    unlabelled (-1). A user's own photos for pretraining; labelled data needs the class-folder tree."""
    root = Path(spec.location) / spec.split if spec.split else Path(spec.location)
    if not root.is_dir():
        raise ConfigError(f"image folder {spec.typed or spec.location} has no folder {spec.split!r}")
    files = list(_image_files(root))
    labels = np.full(len(files), -1, dtype=np.int64)

    def batches(start: int, stop: int):
        for lo in range(start, stop, FILE_BATCH):
            hi = min(lo + FILE_BATCH, stop)
            yield files[lo:hi], labels[lo:hi]

    return RawSource(len(files), [], batches, lambda i: os.path.relpath(files[i], root))


# ---------------------------------------------------------------------------- idx (MNIST, Fashion-MNIST)
IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx_file(path: Path) -> np.ndarray:
    """An idx array (LeCun's format: 0, 0, type code, rank, big-endian uint32 dims, data), plain or .gz;
    read with numpy alone (no pickle)."""
    import gzip
    raw = (gzip.open if path.suffix == ".gz" else open)(path, "rb").read()
    if len(raw) < 4 or raw[0] or raw[1] or raw[2] not in IDX_TYPES:
        raise ConfigError(f"{path} is not an idx file (magic bytes {raw[:4].hex()}); expected MNIST's "
                          f"*-idx3-ubyte / *-idx1-ubyte files, plain or .gz")
    rank = raw[3]
    dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=rank, offset=4))
    dtype = np.dtype(IDX_TYPES[raw[2]])
    expected = 4 + 4 * rank + int(np.prod(dims)) * dtype.itemsize
    if len(raw) != expected:
        raise ConfigError(f"{path} holds {len(raw)} bytes, its header promises {expected} (dims {dims}): "
                          f"truncated or corrupt; download it again")
    return np.frombuffer(raw, dtype, offset=4 + 4 * rank).reshape(dims)


def _idx_pair(folder: Path, prefix: str) -> tuple[Path, Path]:
    found = []
    for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
        hits = [folder / f"{prefix}-{kind}{gz}" for gz in ("", ".gz") if (folder / f"{prefix}-{kind}{gz}").exists()]
        if not hits:
            raise ConfigError(f"no {prefix}-{kind}[.gz] in {folder}; point at the folder holding MNIST's idx files")
        found.append(hits[0])
    return found[0], found[1]


def read_idx(spec: Spec) -> RawSource:
    """MNIST / Fashion-MNIST idx files: `folder` = train-*, `folder:test` = t10k-*. Grayscale rows are
    replicated to 3 channels in the cache, whose layout is RGB; stages given `channels=1` read them back
    as one channel (the luminance of a grey image is its grey value). The digits resize to `size` like
    any image."""
    images_path, labels_path = _idx_pair(Path(spec.location), "t10k" if spec.split == "test" else "train")
    images, labels = read_idx_file(images_path), read_idx_file(labels_path)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ConfigError(f"{images_path} ({images.shape}) and {labels_path} ({labels.shape}) do not pair up: "
                          f"expected N x H x W images and N labels")
    rgb = np.repeat(images.astype(np.uint8)[..., None], 3, axis=3)           # N x H x W x 3
    names = [str(i) for i in range(int(labels.max()) + 1)] if len(labels) else []

    def batches(start: int, stop: int):
        yield rgb[start:stop], labels[start:stop].astype(np.int64)
    return RawSource(len(rgb), names, batches, lambda i: f"{images_path.name} row {i}",
                     attrs={"channels_stored": 1})


READERS: dict[str, Callable[[Spec], RawSource]] = {
    "parquet": read_parquet, "hf": read_hf, "cifar": read_cifar,
    "imagenet32": read_imagenet32, "jpeg-tree": read_jpeg_tree, "idx": read_idx, "images": read_image_folder,
}


# ============================================================================ loading
class DecoderPool:
    """Worker processes for decoding, started on first use (small sources never pay for them)."""

    def __init__(self, workers: int):
        self.workers = workers
        self.executor: ProcessPoolExecutor | None = None

    def map(self, fn: Callable, items: Sequence) -> list:
        if self.executor is None:
            # fork starts workers in milliseconds (forkserver/spawn re-import numpy, PIL, h5py: ~0.5 s);
            # the workers only run PIL, like torch DataLoader workers, which fork too
            method = "fork" if "fork" in multiprocessing.get_all_start_methods() else None
            self.executor = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context(method))
        return list(self.executor.map(fn, items, chunksize=max(1, len(items) // (4 * self.workers))))

    def close(self) -> None:
        if self.executor is not None:
            self.executor.shutdown(cancel_futures=True)


def _worth_a_pool(items: Sequence) -> bool:
    """Files and large encoded images go to workers; small ones (CIFAR, Tiny ImageNet) decode faster
    in-process than the round trip of bytes and pixels through a pipe."""
    blobs = [len(b) for b in items if isinstance(b, bytes)]
    return len(blobs) < len(items) or sum(blobs) > POOL_MIN_BYTES * len(blobs)


def _decode_batch(items: Sequence | np.ndarray, size: int,
                  pool: DecoderPool) -> list[np.ndarray | None] | np.ndarray:
    if isinstance(items, np.ndarray):
        return fit_array(items, size)
    decode = partial(decode_image, size=size)
    if pool.workers <= 1 or not _worth_a_pool(items):
        return [decode(item) for item in items]
    return pool.map(decode, items)


class LabelCheck:
    """Each batch's stored labels -> int64, or one line naming the source, the row and the value:
    null, not an integer, negative, or >= the number of class names where the source names them.
    -1 means 'no label' only for a whole source: one without a label column (its reader fills in -1),
    or a column that is -1 throughout, as Hugging Face stores unlabelled test splits; a -1 among real
    labels is refused."""

    def __init__(self, spec: str, raw: RawSource):
        self.spec, self.raw, self.num_classes = spec, raw, len(raw.class_names)
        self.first_unlabelled: tuple[int, Any] | None = None
        self.any_labelled = False

    def __call__(self, stored: np.ndarray, rows: np.ndarray) -> np.ndarray:
        labels, bad = _integer_labels(stored)
        if bad.any():
            i = int(np.argmax(bad))
            self.refuse(rows[i], stored[i], "which is not an integer")
        labels -= self.raw.label_offset
        high = labels >= self.num_classes if self.num_classes else np.zeros(len(labels), dtype=bool)
        if ((labels < -1) | high).any():
            i = int(np.argmax((labels < -1) | high))
            self.refuse(rows[i], stored[i], f"outside 0..{self.num_classes - 1} (the {self.num_classes} class "
                                            f"names)" if high[i] else "which is negative")
        unlabelled = labels == -1
        if unlabelled.any() and self.first_unlabelled is None:
            i = int(np.argmax(unlabelled))
            self.first_unlabelled = (int(rows[i]), stored[i])
        self.any_labelled |= bool((~unlabelled).any())
        return labels

    def finish(self) -> None:
        if self.any_labelled and self.first_unlabelled is not None:
            self.refuse(*self.first_unlabelled, "which is negative (-1 = 'no label') among labelled rows")

    def refuse(self, row: int, value, why: str) -> None:
        value = value.item() if isinstance(value, np.generic) else value
        hint = "fix the data, or pick the label column with label_column=<name>" if "label_column" in self.raw.attrs \
            else "fix or replace the file"
        raise ConfigError(f"{self.spec}: {self.raw.item_names(int(row))} has label {value!r}, {why}; {hint}")


def _integer_labels(stored: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(int64 labels, mask of null or non-integer entries), vectorised for the usual int columns."""
    if stored.dtype.kind in "iu":
        return stored.astype(np.int64), np.zeros(len(stored), dtype=bool)
    if stored.dtype.kind == "f":   # an int column with nulls arrives as float with NaN
        bad = ~np.isfinite(stored) | (stored != np.round(stored))
        return np.where(bad, 0, stored).astype(np.int64), bad
    bad = np.array([not _is_integer(v) for v in stored], dtype=bool)
    return np.array([0 if b else int(v) for v, b in zip(stored, bad)], dtype=np.int64), bad


def _is_integer(value) -> bool:
    if isinstance(value, (bool, np.bool_)):
        return False
    if isinstance(value, (int, np.integer)):
        return True
    return isinstance(value, (float, np.floating)) and math.isfinite(value) and float(value).is_integer()


def open_raw(parsed: Spec, label_column: str = "") -> RawSource:
    if label_column and parsed.kind not in ("parquet", "hf"):
        raise ConfigError(f"label_column={label_column!r} applies to parquet and hf: sources only; {parsed.text} is "
                          f"a {parsed.kind} source: leave label_column empty")
    try:
        if parsed.kind in ("parquet", "hf"):
            return READERS[parsed.kind](parsed, label_column)
        return READERS[parsed.kind](parsed)
    except DataError:
        raise
    except ConfigError as err:
        # readers name the resolved location; the user knows the path as typed (symlinks and all)
        text = str(err).replace(parsed.location, parsed.typed) if parsed.typed else str(err)
        raise DataError(text, parsed.text) from None


def load_source(spec: str, size: int = 32, workers: int = 2, progress: bool = True, label_column: str = "",
                before_decoding: Callable[[int], None] | None = None) -> ImageSet:
    """Read any source spec into memory as size x size uint8 images (see the module docstring).

    `before_decoding(n)` is called once the number of rows is known, before any decoding (prepare
    checks the output's free space there)."""
    parsed = parse_spec(spec)
    if parsed.kind == "cache":
        if label_column:
            open_raw(parsed, label_column)   # refuses: a cache's labels are already chosen
        cache = read_image_cache(parsed.location, size=size)
        keep = _resolve_rows(parsed, len(cache))
        if before_decoding is not None:
            before_decoding(len(keep))
        return ImageSet(cache.images[keep], cache.labels[keep], cache.class_names, cache.attrs)
    raw = open_raw(parsed, label_column)
    rows = _resolve_rows(parsed, raw.num_rows)
    if before_decoding is not None:
        before_decoding(len(rows))
    bar = tqdm(total=len(rows), desc=f"prepare {Path(parsed.location).name}", unit="img", file=sys.stderr,
               disable=not progress, mininterval=1.0)
    with contextlib.closing(bar):
        images, labels, skipped = _decode_rows(spec, raw, rows, size, workers, bar)
    if len(images) == 0:
        raise DataError(f"no readable images in {spec} ({len(skipped)} unreadable, e.g. {skipped[0]})", spec)
    if skipped:
        print(f"prepare: skipped {len(skipped)} unreadable image(s) in {spec}, e.g. "
              f"{', '.join(skipped[:3])}", file=sys.stderr)
    attrs = {"kind": parsed.kind, "skipped": len(skipped), "skipped_examples": skipped[:MAX_SKIP_EXAMPLES],
             **raw.attrs}
    return ImageSet(images, labels, raw.class_names, attrs)


def _decode_rows(spec: str, raw: RawSource, rows: np.ndarray, size: int, workers: int,
                 bar: tqdm) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(images, checked labels, names of unreadable rows) of the chosen rows, in file order."""
    images = np.empty((len(rows), size, size, 3), dtype=np.uint8)   # pages are committed as filled
    labels = np.empty(len(rows), dtype=np.int64)
    kept, skipped = 0, []
    check = LabelCheck(spec, raw)
    wanted = np.zeros(raw.num_rows, dtype=bool)
    wanted[rows] = True
    pool = DecoderPool(workers)
    try:
        row = int(rows[0])
        for items, batch_labels in raw.batches(int(rows[0]), int(rows[-1]) + 1):
            picked = np.flatnonzero(wanted[row:row + len(items)])     # undecoded items are cheap to skip
            picked_labels = check(np.asarray(batch_labels)[picked], row + picked)   # before decoding: fails fast
            chosen = items[picked] if isinstance(items, np.ndarray) else [items[j] for j in picked]
            for j, label, img in zip(picked, picked_labels, _decode_batch(chosen, size, pool)):
                if img is None:
                    skipped.append(raw.item_names(row + j))
                    continue
                images[kept], labels[kept] = img, label
                kept += 1
            row += len(items)
            bar.update(len(picked))
    finally:
        pool.close()
    check.finish()
    return images[:kept], labels[:kept], skipped


# ============================================================================ cache naming
def _fingerprint(spec: Spec) -> list:
    """What identifies the source's content cheaply: size and mtime of the path and its entries."""
    if spec.kind == "hf":
        return []
    path = Path(spec.location)
    if spec.kind == "images":   # every file: a nested folder's mtime misses files that come or go deeper down
        root = path / spec.split if spec.split else path
        stats = [(f, os.stat(f)) for f in _image_files(root)]
        return [(os.path.relpath(f, root), st.st_size, st.st_mtime_ns) for f, st in stats]
    if spec.kind == "parquet":
        entries = _parquet_files(path, spec.split)
    else:   # batch files, or a tree's class folders (whose mtime changes when files come or go)
        entries = [path] + (sorted(path.iterdir()) if path.is_dir() else [])
    return [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in entries]


def source_id(spec: str, size: int) -> str:
    """Short hash of the resolved source (absolute path or id, split, slice, stat) and size."""
    parsed = parse_spec(spec)
    key = [parsed.kind, parsed.location, parsed.split, parsed.start, parsed.stop, size, _fingerprint(parsed),
           f"shuffled-slice-{SLICE_SEED}"]   # slices became shuffled carve-outs: older caches are stale
    return hashlib.sha1(json.dumps(key).encode()).hexdigest()[:10]


def _readable_stem(parsed: Spec) -> str:
    path = Path(parsed.location)
    if parsed.kind == "hf":
        parts = [parsed.location.replace("/", "-"), parsed.split]
    elif path.is_file():
        parts = [path.parent.name, path.stem]
    else:
        parts = [path.name, parsed.split]
    if parsed.start is not None or parsed.stop is not None:
        parts += [str(parsed.start or 0), "end" if parsed.stop is None else str(parsed.stop)]
    stem = "-".join(p.replace("-", "m") if p.lstrip("-").isdigit() else p for p in parts if p)   # [-5:] -> m5
    return re.sub(r"[^A-Za-z0-9._-]+", "_", stem)


def cache_path(spec: str, size: int = 32, cache_dir: str | Path = "cache", label_column: str = "") -> Path:
    """E.g. cache/cifar10-train-0-40000-s32-<hash>.h5: readable source + slice + size + content hash
    (an explicit label column adds its name to both, so it gets a cache of its own)."""
    sid = source_id(spec, size)
    stem = _readable_stem(parse_spec(spec))
    if label_column:
        sid = hashlib.sha1(f"{sid}|{label_column}".encode()).hexdigest()[:10]
        stem += "-" + re.sub(r"[^A-Za-z0-9._-]+", "_", label_column)
    return Path(cache_dir) / f"{stem}-s{size}-{sid}.h5"


def _is_current(path: Path, sid: str, size: int, label_column: str = "") -> bool:
    """A complete cache built from this exact source, size and label column (else it is rebuilt)."""
    try:
        with h5py.File(path, "r") as h5:
            config = _load_attr(h5.attrs.get("config", "{}"))
            return bool(h5.attrs.get("complete", False)) and _load_attr(h5.attrs.get("source_id", "")) == sid \
                and h5["images"].shape[1:3] == (size, size) \
                and (config.get("label_column", "") if isinstance(config, dict) else "") == label_column
    except (OSError, KeyError):
        return False


# ============================================================================ the stage
def output_path(cfg: Config) -> Path:
    return Path(cfg.out) if cfg.out else cache_path(cfg.source, cfg.size, cfg.cache_dir, cfg.label_column)


def prepare(cfg: Config) -> tuple[Path, bool]:
    """Write the cache for cfg unless a current one exists; returns (path, whether it was written)."""
    path = output_path(cfg)
    sid = source_id(cfg.source, cfg.size)
    if _is_current(path, sid, cfg.size, cfg.label_column):
        return path, False
    # a cache any stage builds on its way: while another process builds it, wait, then use it
    with building(path, wait=True):
        if _is_current(path, sid, cfg.size, cfg.label_column):
            return path, False
        return decode_into(cfg, path, sid), True


def decode_into(cfg: Config, path: Path, sid: str) -> Path:
    """Decode the source and write its cache at `path` (the caller holds the cache's lock)."""
    check_writable(path.parent)   # before reading the source: a bad output location fails at once
    row_bytes = cfg.size * cfg.size * 3 + 8   # pixels + int64 label, uncompressed

    def check_space(rows: int) -> None:
        check_writable(path.parent, rows * row_bytes)

    started = time.perf_counter()
    loaded = load_source(cfg.source, cfg.size, cfg.workers, label_column=cfg.label_column, before_decoding=check_space)
    seconds = time.perf_counter() - started
    write_image_cache(path, loaded.images, loaded.labels, loaded.class_names,
                      {**loaded.attrs, "source": cfg.source, "source_id": sid, "config": to_dict(cfg),
                       "seconds": round(seconds, 2)})
    print(f"prepare: {len(loaded)} images {cfg.size}x{cfg.size}, {len(loaded.class_names)} classes, "
          f"{loaded.attrs['skipped']} skipped, {seconds:.1f} s -> {path}")
    return path


def run(cfg: Config) -> Path:
    """Decode any image source into the uint8 image cache (min-side resize + center crop)."""
    validate(cfg)   # a Config built in code has not passed `build`
    parsed = parse_spec(cfg.source)
    if parsed.kind == "cache" and parsed.start is None and parsed.stop is None and not cfg.out and not cfg.label_column:
        read_image_cache(parsed.location, size=cfg.size)   # validates; nothing to rewrite
        return Path(parsed.location)
    path, written = prepare(cfg)
    if not written:
        print(f"prepare: {path} is up to date")
    return path


def cached(spec: str, size: int = 32, cache_dir: str = "cache", workers: int = 2, label_column: str = "") -> ImageSet:
    """The uint8 images of `spec`, from its cache (prepared first if absent). Stages call this."""
    if parse_spec(spec).kind == "cache":
        return load_source(spec, size, workers, progress=False, label_column=label_column)
    path, _ = prepare(Config(source=spec, size=size, cache_dir=cache_dir, workers=workers, label_column=label_column))
    return read_image_cache(path, size=size)
