"""Source specs: the one string, accepted wherever a stage takes data, that names a set of images.

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
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from ..core.config import ConfigError


ACCEPTED = ("a parquet file or folder (HF layout), hf:<dataset id>[:split], a CIFAR-10 batches folder[:test], "
            "an Imagenet32 batches folder[:val], an MNIST-style idx folder[:test], a JPEG tree root/<class>/<file>, "
            "a folder of JPEG/PNG files (unlabelled), or an .h5 image cache; optionally followed by a row slice [a:b]")
CLASS_LAYOUT = "the class-folder layout root/<class>/<file> (one folder of images per class)"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}
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
