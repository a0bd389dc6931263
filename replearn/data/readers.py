"""One reader per source kind (parquet, hf:, CIFAR-10 and Imagenet32 batches, JPEG trees, image folders,
idx files): each returns a RawSource, the items still encoded and the labels with their class names.
"""
from __future__ import annotations

import bisect
import contextlib
import json
import os
import pickle
import re
import socket
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from ..core.config import ConfigError
from .specs import DataError, IMAGE_SUFFIXES, Spec, _image_files


PARQUET_BATCH = 1024     # rows decoded per step: bounds memory, keeps the progress bar moving
FILE_BATCH = 512         # files handed to the worker pool per step
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
