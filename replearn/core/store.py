"""The two on-disk layouts every stage shares.

Image cache (`prepare` writes it, everything else reads it), HDF5:
    images  N x H x W x 3 uint8 (HWC, RGB)
    labels  N int64 (-1 where the source has no labels)
    attrs   class_names, source, source_id, config, provenance, complete=True

Feature file (`features` and `kmeans` write it, `svm` reads it), HDF5:
    /<split>/features  N x D float32 or float16, chunked in row blocks
    /<split>/labels    N int64
    attrs   layer_names, layer_offsets (L+1 ints), feature_dim, kind, model, key,
            config, provenance, source_<split>, complete=True
Attributes are native HDF5 types (attrs_format=2): strings as strings, numbers as numbers, lists of
strings or numbers as arrays, None as an empty attribute. A value HDF5 has no type for (a dict such as
`config` or `provenance`, a mixed or empty list) is JSON text, and the native string array `json_attrs`
names those attributes. Files written before attrs_format=2 hold every attribute as JSON text; read_attrs
reads both.
Both are written under a temporary name and renamed when complete. A write that fails (a full
disk) is one line naming the file, and the temporary file is removed.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import h5py
import numpy as np

from .config import ConfigError
from .utils import atomic_path, disk_error, is_disk_error, provenance

ROW_CHUNK = 64   # rows per HDF5 chunk: row-block reads touch whole chunks only
# ITU-R 601-2 luma, as PIL's convert('L'): the weights sum to 1, so a grey image stored as RGB (the cache
# replicates grey sources) maps back to its own grey value when a stage asks for channels=1
LUMA = (0.299, 0.587, 0.114)


def with_channels(images: np.ndarray, channels: int) -> np.ndarray:
    """N x H x W x 3 uint8 -> N x H x W x channels uint8 (1: the rounded luminance; 3: unchanged)."""
    if channels == 3 or images.shape[-1] == channels:
        return images
    grey = images.astype(np.float32) @ np.asarray(LUMA, dtype=np.float32)        # N x H x W
    return np.clip(np.rint(grey), 0, 255).astype(np.uint8)[..., None]          # N x H x W x 1


ATTRS_FORMAT = 2      # 1 (no attrs_format attribute): every attribute JSON text
JSON_ATTRS = "json_attrs"


def _native(value: Any) -> Any:
    """The native HDF5 form of an attribute value, or None where HDF5 has no type for it."""
    if value is None:
        return h5py.Empty("f4")
    if isinstance(value, (bool, np.bool_)):
        return np.bool_(value)
    if isinstance(value, (str, int, float, np.integer, np.floating)):
        return value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)) and value:
        if all(isinstance(v, str) for v in value):
            return np.array(value, dtype=h5py.string_dtype())
        numbers = [v for v in value if isinstance(v, (int, float, np.integer, np.floating))
                   and not isinstance(v, (bool, np.bool_))]
        if len(numbers) == len(value):
            return np.asarray(value, dtype=np.int64 if all(isinstance(v, (int, np.integer)) for v in value)
                              else np.float64)
    return None


def write_attrs(obj: h5py.File | h5py.Group, attrs: dict[str, Any]) -> None:
    """Write attributes in native types; the rest as JSON text, named in `json_attrs`."""
    as_json = []
    for key, value in attrs.items():
        native = _native(value)
        if native is None:
            obj.attrs[key] = json.dumps(value, default=str)
            as_json.append(key)
        else:
            obj.attrs[key] = native
    obj.attrs[JSON_ATTRS] = np.array(as_json, dtype=h5py.string_dtype())
    obj.attrs["attrs_format"] = ATTRS_FORMAT


def _plain(value: Any) -> Any:
    """An attribute as read by h5py -> plain Python (lists, str, int, float, bool, None)."""
    if isinstance(value, h5py.Empty):
        return None
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _load_attr(value):
    """A format-1 attribute: JSON text (or, rarely, a bare number or string)."""
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return _plain(value)


def read_attrs(obj: h5py.File | h5py.Group) -> dict[str, Any]:
    """Every attribute as plain Python, from files of either format."""
    raw = dict(obj.attrs.items())
    if "attrs_format" not in raw:
        return {k: _load_attr(v) for k, v in raw.items()}
    raw.pop("attrs_format")
    as_json = set(_plain(raw.pop(JSON_ATTRS, np.array([]))))
    return {k: json.loads(_plain(v)) if k in as_json else _plain(v) for k, v in raw.items()}


def _open_complete(path: Path, what: str, remedy: str) -> h5py.File:
    if not path.exists():
        raise ConfigError(f"{what} not found: {path} ({remedy})")
    try:
        h5 = h5py.File(path, "r")
    except OSError as err:
        raise ConfigError(f"{what} {path} is not a readable HDF5 file ({err}); delete it and {remedy}") from None
    if not h5.attrs.get("complete", False):
        h5.close()
        raise ConfigError(f"{what} {path} is incomplete (an interrupted run?); delete it and {remedy}")
    return h5


# ============================================================================ image cache
@dataclass
class ImageSet:
    images: np.ndarray            # N x H x W x 3 uint8
    labels: np.ndarray            # N int64
    class_names: list[str]
    attrs: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.images)

    @property
    def skipped(self) -> int:
        """Unreadable images `prepare` left out of this set (0 where it was not recorded)."""
        return int(self.attrs.get("skipped", 0) or 0)


# Files are written without HDF5's chunk cache. With it, HDF5 2.0 keeps megabytes of chunks in memory,
# a full disk shows only when they are flushed as a dataset or the file closes, and closing a file
# whose flush failed crashes the process (segfault, exit 139, the temporary file left behind). Without
# it, the failing write call raises. Whole-chunk writes, all this project makes, lose nothing.
def _create_h5(path: Path, tmp: Path) -> h5py.File:
    try:
        return h5py.File(tmp, "w", rdcc_nbytes=0)
    except OSError as err:
        raise disk_error(path, err) from None


def _abandon(h5: h5py.File, tmp: Path) -> None:
    """Close a file whose writing failed. Emptying it first frees the space HDF5 needs to flush its
    metadata on close, so the close cannot fail into a crash; the file is deleted afterwards anyway."""
    with contextlib.suppress(OSError):
        os.truncate(tmp, 0)
    with contextlib.suppress(Exception):
        h5.close()


def write_image_cache(path: str | Path, images: np.ndarray, labels: np.ndarray, class_names: Sequence[str],
                      attrs: dict[str, Any]) -> Path:
    path = Path(path)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"image cache expects N x H x W x 3 uint8, got {images.shape} {images.dtype}")
    with atomic_path(path) as tmp:
        h5 = _create_h5(path, tmp)
        try:
            chunk = (min(len(images), 1024),) + images.shape[1:] if len(images) else None
            h5.create_dataset("images", data=images, chunks=chunk)
            h5.create_dataset("labels", data=np.asarray(labels, dtype=np.int64))
            write_attrs(h5, {**attrs, "class_names": list(class_names), "provenance": provenance()})
            h5.attrs["complete"] = True
            h5.close()
        except (OSError, RuntimeError) as err:
            _abandon(h5, tmp)
            if isinstance(err, OSError) or is_disk_error(err):
                raise disk_error(path, err) from None
            raise
    return path


def read_image_cache(path: str | Path, size: int | None = None) -> ImageSet:
    path = Path(path)
    with _open_complete(path, "image cache", "run `replearn prepare` to rebuild it") as h5:
        images = h5["images"][...]
        labels = h5["labels"][...]
        attrs = read_attrs(h5)
    if size is not None and images.shape[1:3] != (size, size):
        raise ConfigError(f"image cache {path} holds {images.shape[1]}x{images.shape[2]} images, expected "
                          f"{size}x{size}; rerun `replearn prepare` with size={size}")
    return ImageSet(images, labels, list(attrs.pop("class_names", [])), attrs)


# ============================================================================ feature files
class FeatureWriter:
    """Streams feature rows into a new HDF5 file; renamed into place only on success.

    A failed write (disk full) raises one line naming the file; after it the file is not touched again
    (later writes, e.g. from a background thread, raise the same line), and leaving the block closes
    and deletes the temporary file.
    """

    def __init__(self, path: str | Path, layers: Sequence[tuple[str, int]], attrs: dict[str, Any],
                 dtype: str = "float32"):
        if dtype not in ("float32", "float16"):
            raise ConfigError(f"unknown feature dtype {dtype!r}; choose from: float16, float32")
        self.path = Path(path)
        self.dtype = np.dtype(dtype)
        self.layer_names = [name for name, _ in layers]
        self.offsets = np.concatenate([[0], np.cumsum([dim for _, dim in layers])]).astype(int).tolist()
        self.attrs = attrs
        self._ctx = atomic_path(self.path)
        self.failed: ConfigError | None = None
        self._sets: dict[str, tuple[h5py.Dataset, h5py.Dataset]] = {}

    @property
    def dim(self) -> int:
        return self.offsets[-1]

    def __enter__(self) -> "FeatureWriter":
        self._tmp = self._ctx.__enter__()
        try:
            self.h5 = _create_h5(self.path, self._tmp)
        except BaseException as err:
            self._ctx.__exit__(type(err), err, err.__traceback__)
            raise
        return self

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        if self.failed is not None:
            raise ConfigError(str(self.failed))
        try:
            yield
        except (OSError, RuntimeError) as err:
            if not (isinstance(err, OSError) or is_disk_error(err)):
                raise
            self.failed = disk_error(self.path, err)
            raise ConfigError(str(self.failed)) from None

    def create_split(self, split: str, n: int, source: str = "") -> None:
        with self._writing():
            group = self.h5.create_group(split)
            features = group.create_dataset("features", shape=(n, self.dim), dtype=self.dtype,
                                            chunks=(max(1, min(n, ROW_CHUNK)), self.dim))
            labels = group.create_dataset("labels", shape=(n,), dtype=np.int64)
            group.attrs["source"] = source
            self._sets[split] = (features, labels)   # held open: a reopened dataset per write flushes on release

    def write(self, split: str, start: int, features: np.ndarray, labels: np.ndarray) -> None:
        stop = start + len(features)
        stored = features.astype(self.dtype, copy=False)
        if self.dtype == np.float16 and not np.isfinite(stored).all() and np.isfinite(features).all():
            raise ConfigError(f"{self.path}: feature values beyond float16's range (max |x| "
                              f"{float(np.abs(features).max()):.3g} > 65504); extract with dtype=float32")
        with self._writing():
            feature_set, label_set = self._sets[split]
            feature_set[start:stop] = stored
            label_set[start:stop] = labels

    def _finish(self) -> None:
        with self._writing():
            write_attrs(self.h5, {**self.attrs, "layer_names": self.layer_names, "layer_offsets": self.offsets,
                                  "feature_dim": int(self.dim), "provenance": provenance()})
            self.h5.attrs["complete"] = True
            self._sets.clear()
            self.h5.close()

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is None:
            try:
                self._finish()
            except BaseException as err:
                exc = err
            else:
                return bool(self._ctx.__exit__(None, None, None))
        _abandon(self.h5, self._tmp)
        self._sets.clear()
        raised = disk_error(self.path, exc) if is_disk_error(exc) else exc
        self._ctx.__exit__(type(raised), raised, raised.__traceback__)   # deletes the temporary file
        if raised is exc and exc_type is not None:
            return False   # the block's own exception goes on unchanged
        raise raised from None


def _convert_into(out: np.ndarray, values: np.ndarray) -> None:
    """out[...] = values (float16 or float32 rows into float32) by torch: threaded and, for float16, vectorised
    (the same bits as numpy's astype, 0.02-0.04 s a 4096 x 28672 block against 0.24-0.97 s)."""
    import torch      # here, as in utils: the store's other readers need no torch

    torch.from_numpy(out).copy_(torch.from_numpy(np.ascontiguousarray(values)))


class FeatureFile:
    """Read side of a feature file: row blocks as float32, optionally a subset of layers."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.h5 = _open_complete(self.path, "feature file", "run `replearn features` (or `kmeans`) again")
        self.attrs = read_attrs(self.h5)
        self.layer_names: list[str] = list(self.attrs["layer_names"])
        self.offsets: list[int] = list(self.attrs["layer_offsets"])

    def close(self) -> None:
        self.h5.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def splits(self) -> list[str]:
        return [k for k in self.h5.keys() if isinstance(self.h5[k], h5py.Group)]

    def require_split(self, split: str) -> h5py.Group:
        if split not in self.h5:
            raise ConfigError(f"feature file {self.path} has no split {split!r}; it has {self.splits}")
        return self.h5[split]

    def labels(self, split: str) -> np.ndarray:
        return self.require_split(split)["labels"][...]

    def num_rows(self, split: str) -> int:
        return self.require_split(split)["features"].shape[0]

    def columns(self, layers: Sequence[int] | None) -> np.ndarray | None:
        """Column indices of the chosen layers (None = all)."""
        if layers is None or len(layers) == 0:
            return None
        bad = [i for i in layers if not 0 <= i < len(self.layer_names)]
        if bad:
            raise ConfigError(f"layer index {bad} out of range; {self.path} has layers 0..{len(self.layer_names) - 1}"
                              f" ({', '.join(self.layer_names)})")
        return np.concatenate([np.arange(self.offsets[i], self.offsets[i + 1]) for i in layers])

    def iter_blocks(self, split: str, rows: np.ndarray | None = None, block: int = 4096,
                    layers: Sequence[int] | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield (row indices, float32 block) pairs; rows are read in sorted order for speed. Each block is a view
        of one buffer that the next block overwrites: copy what you keep."""
        data = self.require_split(split)["features"]
        rows = np.arange(data.shape[0]) if rows is None else np.sort(np.asarray(rows))
        cols = self.columns(layers)
        if len(rows) == 0:
            return
        # two buffers reused for every block: on the VMs measured, memory is slow to touch the first time (~1.5 GB/s:
        # 0.3 s a fresh 470 MB float32 block; benchmarks/results/notes.md, stop 59)
        n = min(block, len(rows))
        out = np.empty((n, data.shape[1] if cols is None else len(cols)), np.float32)
        stored = out if data.dtype == np.float32 else np.empty((n, data.shape[1]), data.dtype)
        for start in range(0, len(rows), block):
            idx = rows[start:start + block]
            contiguous = idx[-1] - idx[0] == len(idx) - 1
            direct = contiguous and cols is None
            if direct:
                values = stored[:len(idx)]
                data.read_direct(values, np.s_[idx[0]:idx[-1] + 1])
            else:
                values = data[idx[0]:idx[-1] + 1] if contiguous else data[idx]
                if cols is not None:
                    values = values[:, cols]
            if not (direct and stored is out):          # float32 rows read straight into `out` need no copy
                _convert_into(out[:len(idx)], values)
            yield idx, out[:len(idx)]

    def digest(self, block: int = 4096) -> str:
        """sha256 of what a fit can see: the layer layout, and every split's labels and stored feature bytes
        (not the attrs: two runs' identical critics give files that differ only in their provenance)."""
        h = hashlib.sha256(json.dumps([self.layer_names, self.offsets]).encode())
        for split in sorted(self.splits):
            group = self.require_split(split)
            data = group["features"]
            h.update(json.dumps([split, str(data.dtype), list(data.shape)]).encode())
            h.update(np.ascontiguousarray(group["labels"][...]).tobytes())
            for start in range(0, data.shape[0], block):
                h.update(np.ascontiguousarray(data[start:start + block]).data)
        return h.hexdigest()

    def read(self, split: str, rows: np.ndarray | None = None, layers: Sequence[int] | None = None,
             out_dtype=np.float32) -> np.ndarray:
        """Rows in sorted order as one array (the caller holds one working copy)."""
        n = self.num_rows(split) if rows is None else len(rows)
        cols = self.columns(layers)
        dim = self.offsets[-1] if cols is None else len(cols)
        out = np.empty((n, dim), dtype=out_dtype)
        pos = 0
        for idx, block in self.iter_blocks(split, rows, layers=layers):   # sorts the rows itself
            out[pos:pos + len(idx)] = block
            pos += len(idx)
        return out
