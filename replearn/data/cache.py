"""Image sources -> the uint8 image cache (the `prepare` stage): a source is opened by its reader
(readers.py), its rows chosen (specs.py), decoded in a worker pool (images.py) and written once per
(source, size) under a name that carries its identity (`source_id`).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import multiprocessing
import os
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Sequence

from tqdm import tqdm
import h5py
import numpy as np

from ..core.config import ConfigError, register_check, require, to_dict, validate
from ..core.lock import building
from ..core.store import ImageSet, read_attrs, read_image_cache, write_image_cache
from ..core.utils import check_writable
from .images import decode_image, fit_array
from .specs import DataError, SLICE_SEED, Spec, _image_files, _resolve_rows, parse_spec
from .readers import READERS, RawSource, _parquet_files


@dataclass(frozen=True)
class Config:
    source: str = "hf:uoft-cs/cifar10:train"   # the real CIFAR-10 on the Hub; pass a local path offline
    size: int = 32             # docs/protocol.md s.1: every image becomes 32 x 32
    cache_dir: str = "cache"   # caches are rebuilt from sources, so they live apart from results
    workers: int = 2           # decoding processes; this machine has 2 cores
    out: str = ""              # explicit output path; "" = cache_path(source, size, cache_dir)
    label_column: str = ""     # parquet / hf: the label column (e.g. fine_label); "" = the ClassLabel or 'label'


register_check(Config, lambda cfg: require(cfg, at_least={"size": 1}, non_negative=("workers",), stage="prepare"))

POOL_MIN_BYTES = 16_000  # mean encoded bytes per image above which decoding pays for the worker round trip
MAX_SKIP_EXAMPLES = 20   # how many unreadable items are named in the cache attrs
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
_DIGESTS: dict[tuple[str, int, int], str] = {}


def file_digest(path: Path) -> str:
    """blake2b of the file's bytes, once per process for each (path, size, mtime). Content, not mtime,
    names a file: a copy of the same data (a fresh machine, the shared folder copied in again, the GPU
    machine) keys the same artifacts, so a chain resumes there instead of starting over."""
    st = path.stat()
    memo = (str(path), st.st_size, st.st_mtime_ns)
    if memo not in _DIGESTS:
        with open(path, "rb") as f:
            _DIGESTS[memo] = hashlib.file_digest(f, "blake2b").hexdigest()[:20]
    return _DIGESTS[memo]


def _fingerprint(spec: Spec) -> list:
    """What identifies the source's content: a digest of each file the spec names (parquet, batch, h5,
    idx files), or, for folders of images, every file's relative path and size (reading every image's
    bytes of a large tree at each start would cost more than it guards against)."""
    if spec.kind == "hf":
        return []
    path = Path(spec.location)
    if spec.kind in ("images", "jpeg-tree"):
        root = path / spec.split if spec.split and (path / spec.split).is_dir() else path
        return [(os.path.relpath(f, root), os.stat(f).st_size) for f in _image_files(root)]
    entries = _parquet_files(path, spec.split) if spec.kind == "parquet" else \
        [path] + (sorted(path.iterdir()) if path.is_dir() else [])
    return [(p.name, p.stat().st_size, file_digest(p)) for p in entries if p.is_file()]


def source_id(spec: str, size: int) -> str:
    """Short hash of the resolved source (absolute path or id, split, slice, content) and size."""
    parsed = parse_spec(spec)
    key = [parsed.kind, parsed.location, parsed.split, parsed.start, parsed.stop, size, _fingerprint(parsed),
           f"shuffled-slice-{SLICE_SEED}",   # slices became shuffled carve-outs: older caches are stale
           "content"]                          # files named by content digest, not mtime (stop 44)
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
            attrs = read_attrs(h5)
            config = attrs.get("config") or {}
            return bool(attrs.get("complete", False)) and attrs.get("source_id", "") == sid \
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
