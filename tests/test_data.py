"""Every source format, the geometry, slices, the cache and the one-line errors of replearn.data.

All inputs are written into tmp_path by the tests themselves; only the `shared_data` test reads
../shared/data (skipped where it is absent).
"""
from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from replearn.core import store
from replearn import cli, data
from replearn.data import cache as data_cache, readers as data_readers
from replearn.core.config import ConfigError

from conftest import random_images


# ----------------------------------------------------------------------------- writers
def write_hf_parquet(path: Path, images: np.ndarray, labels, names, column: str = "img") -> Path:
    import datasets
    features = datasets.Features({column: datasets.Image(), "label": datasets.ClassLabel(names=names)})
    ds = datasets.Dataset.from_dict({column: list(images), "label": list(labels)}, features=features)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.to_parquet(str(path))
    return path


def write_pickle(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        pickle.dump(obj, fh)


def planar(n: int, side: int, seed: int) -> np.ndarray:
    """N x 3*side*side uint8 with distinct ranges per channel: R < 80 <= G < 160 <= B."""
    g = np.random.default_rng(seed)
    plane = side * side
    return np.concatenate([g.integers(0, 80, (n, plane)), g.integers(80, 160, (n, plane)),
                           g.integers(160, 256, (n, plane))], axis=1).astype(np.uint8)


def jpeg_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", **kw)
    return buf.getvalue()


def natural_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth colour gradients plus mild noise: compresses like a photo, not like white noise."""
    g = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width] / max(width, height)
    rgb = np.stack([128 + 100 * np.sin(6 * xx + c) * np.cos(4 * yy - c) for c in g.uniform(0, 3, 3)], -1)
    return Image.fromarray(np.clip(rgb + g.normal(0, 4, rgb.shape), 0, 255).astype(np.uint8))


def single_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


# ----------------------------------------------------------------------------- geometry
def test_landscape_keeps_the_centre_square():
    # 64 x 48: red 8-column strips left, blue right; the centre 48 x 48 is green above white
    img = np.zeros((48, 64, 3), np.uint8)
    img[:, :8] = (255, 0, 0)
    img[:, 56:] = (0, 0, 255)
    img[:24, 8:56] = (0, 255, 0)
    img[24:, 8:56] = (255, 255, 255)
    out = data.fit_square(Image.fromarray(img), 32)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    inner = out[:, 2:30]   # the outermost output columns may blend in a little of the strips
    assert np.abs(inner[:14].astype(int) - (0, 255, 0)).max() <= 2
    assert np.abs(inner[18:].astype(int) - (255, 255, 255)).max() <= 2
    top = out[:14].astype(int)   # red and blue strips cropped away: at most a faint edge blend
    assert top[..., 0].max() <= 40 and top[..., 2].max() <= 40


def test_portrait_keeps_the_centre_square():
    img = np.full((64, 48, 3), 255, np.uint8)
    img[:8] = 0
    img[56:] = 0
    img[8:56, :24] = (0, 0, 255)
    out = data.fit_square(Image.fromarray(img), 32)
    assert np.abs(out[2:30, :14].astype(int) - (0, 0, 255)).max() <= 2
    assert np.abs(out[2:30, 18:].astype(int) - 255).max() <= 2


def test_exact_size_passes_through_untouched():
    img = random_images(1, 32, seed=3)[0]
    assert np.array_equal(data.fit_square(Image.fromarray(img), 32), img)


def test_draft_decode_is_close_to_full_decode():
    encoded = jpeg_bytes(natural_image(500, 375), quality=90)
    fast = data.decode_image(encoded, 32)
    with Image.open(io.BytesIO(encoded)) as img:
        img.load()   # loading first disables draft mode: a plain full-size decode
        full = data.fit_square(img, 32)
    assert fast.shape == full.shape == (32, 32, 3)
    assert np.abs(fast.astype(int) - full.astype(int)).mean() < 3


# ----------------------------------------------------------------------------- parquet
def test_hf_parquet_file_is_read_exactly_with_class_names(tmp_path):
    images = random_images(10, 32)
    path = write_hf_parquet(tmp_path / "cifar" / "train.parquet", images, [i % 3 for i in range(10)],
                            ["cat", "dog", "emu"])
    out = data.load_source(str(path), progress=False)
    assert np.array_equal(out.images, images)   # PNG-encoded 32 x 32: bit-for-bit
    assert out.labels.tolist() == [i % 3 for i in range(10)] and out.labels.dtype == np.int64
    assert out.class_names == ["cat", "dog", "emu"]


def picked(n: int, start=None, stop=None) -> np.ndarray:
    """The documented slice rule: rows start..stop of a seed-0 shuffle, read in file order."""
    return np.sort(np.random.default_rng(0).permutation(n)[start:stop])


def test_slices_pick_from_a_fixed_shuffle_in_file_order(tmp_path):
    images = random_images(10, 32)
    spec = str(write_hf_parquet(tmp_path / "t.parquet", images, list(range(10)), [str(i) for i in range(10)]))
    assert data.load_source(spec + "[2:5]", progress=False).labels.tolist() == picked(10, 2, 5).tolist()
    assert data.load_source(spec + "[-2:]", progress=False).labels.tolist() == picked(10, -2).tolist()
    assert np.array_equal(data.load_source(spec + "[:3]", progress=False).images, images[picked(10, None, 3)])
    head = set(data.load_source(spec + "[:6]", progress=False).labels.tolist())
    tail = set(data.load_source(spec + "[6:]", progress=False).labels.tolist())
    assert head.isdisjoint(tail) and head | tail == set(range(10))   # a carve-out: disjoint, covering
    assert data.load_source(spec, progress=False).labels.tolist() == list(range(10))   # no slice: file order
    with pytest.raises(ConfigError, match=r"holds no images.*\[5:5\]"):
        data.load_source(spec + "[5:5]", progress=False)


def test_parquet_folder_of_shards_and_split_filter(tmp_path):
    folder = tmp_path / "hub" / "data"
    images = random_images(9, 64, seed=1)
    names = ["a", "b"]
    write_hf_parquet(folder / "train-00000-of-00002.parquet", images[:4], [0, 1, 0, 1], names, "image")
    write_hf_parquet(folder / "train-00001-of-00002.parquet", images[4:7], [1, 1, 1], names, "image")
    write_hf_parquet(folder / "test-00000-of-00001.parquet", images[7:], [0, 0], names, "image")
    train = data.load_source(f"{tmp_path / 'hub'}:train", progress=False)
    assert train.labels.tolist() == [0, 1, 0, 1, 1, 1, 1] and train.images.shape == (7, 32, 32, 3)
    expected = np.stack([data.fit_square(Image.fromarray(img), 32) for img in images[:7]])
    assert np.array_equal(train.images, expected)   # 64 x 64 -> 32 x 32 by the shared geometry
    assert len(data.load_source(f"{tmp_path / 'hub'}:test[1:]", progress=False)) == 1
    assert len(data.load_source(str(tmp_path / "hub"), progress=False)) == 9


def test_parquet_without_an_image_column_fails_in_one_line(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"pixels": [[1, 2], [3, 4]], "label": [0, 1]}), path)
    with pytest.raises(ConfigError) as err:
        data.load_source(str(path), progress=False)
    assert "no image column" in single_line(err) and str(path) in str(err.value) and "pixels" in str(err.value)


def test_hub_dataset_offline_says_to_pass_a_local_path(tmp_path, monkeypatch):
    import datasets
    import huggingface_hub.constants
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf" / "datasets", raising=False)
    with pytest.raises(ConfigError) as err:
        data.load_source("hf:replearn-test/no-such-dataset:train", progress=False)
    assert "replearn-test/no-such-dataset" in single_line(err) and "local path" in str(err.value)


def test_hub_dataset_rows_are_decoded_like_parquet(monkeypatch):
    import datasets
    images = random_images(5, 32)
    features = datasets.Features({"image": datasets.Image(), "fine": datasets.ClassLabel(names=["p", "q"])})
    ds = datasets.Dataset.from_dict({"image": list(images), "fine": [0, 1, 1, 0, 1]}, features=features)
    asked = []
    monkeypatch.setattr(data_readers, "_reachable", lambda host, timeout: True)
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split: asked.append((name, split)) or ds)
    out = data.load_source("hf:someone/tiny:validation[1:4]", progress=False)
    assert asked == [("someone/tiny", "validation")]
    rows = picked(5, 1, 4)
    assert np.array_equal(out.images, images[rows]) and out.labels.tolist() == np.array([0, 1, 1, 0, 1])[rows].tolist()
    assert out.class_names == ["p", "q"]


# ----------------------------------------------------------------------------- pickled batches
def test_cifar_batches_are_channel_planar_row_major(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    batches = [planar(4, 32, seed) for seed in range(6)]
    for i in range(5):
        write_pickle(folder / f"data_batch_{i + 1}", {b"data": batches[i], b"labels": [i] * 4})
    write_pickle(folder / "test_batch", {b"data": batches[5], b"labels": [9, 8, 7, 6]})
    write_pickle(folder / "batches.meta", {b"label_names": [f"c{i}".encode() for i in range(10)]})
    train = data.load_source(str(folder), progress=False)
    assert train.images.shape == (20, 32, 32, 3) and train.class_names[:2] == ["c0", "c1"]
    assert train.labels.tolist() == [i for i in range(5) for _ in range(4)]
    first = batches[0][0]
    for c in range(3):   # channel c of pixel (y, x) is byte c*1024 + y*32 + x
        assert np.array_equal(train.images[0, :, :, c], first[c * 1024:(c + 1) * 1024].reshape(32, 32))
    test = data.load_source(f"{tmp_path}/cifar-10-batches-py:test[1:3]", progress=False)
    assert test.labels.tolist() == np.array([9, 8, 7, 6])[picked(4, 1, 3)].tolist()
    assert len(data.load_source(str(tmp_path), progress=False)) == 20   # the folder above works too
    with pytest.raises(ConfigError, match="no split 'val'.*train, test"):
        data.load_source(f"{folder}:val", progress=False)


def test_imagenet32_labels_become_zero_based_and_batches_sort_numerically(tmp_path):
    folder = tmp_path / "Imagenet32_train"
    for number, label in ((1, 1), (2, 2), (10, 1000)):
        write_pickle(folder / f"train_data_batch_{number}",
                     {"data": planar(3, 32, number), "labels": [label] * 3, "mean": np.zeros(3072)})
    write_pickle(folder / "val_data", {"data": planar(2, 32, 99), "labels": [5, 6]})
    train = data.load_source(str(folder), progress=False)
    assert train.labels.tolist() == [0] * 3 + [1] * 3 + [999] * 3
    assert len(train.class_names) == 1000
    assert np.array_equal(train.images[0, :, :, 1], planar(3, 32, 1)[0, 1024:2048].reshape(32, 32))
    assert data.load_source(f"{folder}:val", progress=False).labels.tolist() == [4, 5]


# ----------------------------------------------------------------------------- JPEG tree
def make_jpeg_tree(root: Path) -> Path:
    (root / "n01").mkdir(parents=True)
    (root / "n02").mkdir()
    natural_image(500, 375, 1).save(root / "n01" / "large.JPEG", quality=90)
    natural_image(40, 60, 2).convert("L").save(root / "n01" / "gray.jpg")
    natural_image(50, 50, 3).convert("CMYK").save(root / "n01" / "cmyk.jpg")
    (root / "n01" / "notes.txt").write_text("not an image, ignored")
    (root / "n02" / "broken.jpg").write_bytes(jpeg_bytes(natural_image(64, 64))[:200])   # truncated
    natural_image(32, 32, 4).convert("P").save(root / "n02" / "palette.png")
    natural_image(70, 40, 5).convert("RGBA").save(root / "n02" / "rgba.png")
    return root


def test_jpeg_tree_with_workers_converts_modes_and_counts_skips(tmp_path, capsys):
    root = make_jpeg_tree(tmp_path / "imagenet" / "train")
    out = data.load_source(str(tmp_path / "imagenet") + ":train", workers=2, progress=False)
    assert out.class_names == ["n01", "n02"]
    assert out.images.shape == (5, 32, 32, 3) and out.labels.tolist() == [0, 0, 0, 1, 1]
    assert out.attrs["skipped"] == 1 and out.attrs["skipped_examples"] == [os.path.join("n02", "broken.jpg")]
    assert "skipped 1 unreadable" in capsys.readouterr().err
    gray = out.images[1]   # n01 sorted: cmyk.jpg, gray.jpg, large.JPEG
    assert np.array_equal(gray[..., 0], gray[..., 1]) and np.array_equal(gray[..., 1], gray[..., 2])
    serial = data.load_source(str(root), workers=0, progress=False)
    assert np.array_equal(serial.images, out.images)   # workers change the speed, not the pixels


def test_tree_of_only_unreadable_images_fails(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ConfigError, match="no readable images"):
        data.load_source(str(tmp_path), workers=0, progress=False)


# ----------------------------------------------------------------------------- cache
def test_cache_round_trip_reuse_and_provenance(tmp_path, monkeypatch, capsys):
    images = random_images(12, 32)
    spec = str(write_hf_parquet(tmp_path / "cifar10" / "train.parquet", images, [1] * 12, ["a", "b"])) + "[:8]"
    cache_dir = tmp_path / "cache"
    first = data.cached(spec, cache_dir=str(cache_dir), workers=0)
    path = data.cache_path(spec, 32, cache_dir)
    assert path.exists() and path.name.startswith("cifar10-train-0-8-s32-")
    assert np.array_equal(first.images, images[picked(12, None, 8)]) and first.class_names == ["a", "b"]
    assert first.attrs["config"]["source"] == spec and first.attrs["skipped"] == 0
    assert "git_commit" in first.attrs["provenance"]

    def no_decoding(*args, **kw):
        raise AssertionError("the cache should have been reused")
    monkeypatch.setattr(data_cache, "load_source", no_decoding)
    again = data.cached(spec, cache_dir=str(cache_dir))
    assert np.array_equal(again.images, first.images)
    assert data.run(data.Config(source=spec, cache_dir=str(cache_dir))) == path
    assert "up to date" in capsys.readouterr().out
    monkeypatch.undo()
    assert data.cached(str(path) + "[2:4]").labels.tolist() == [1, 1]   # a cache is a source too
    assert data.cache_path(spec.replace("[:8]", "[8:]"), 32, cache_dir) != path
    assert data.cache_path(spec, 64, cache_dir) != path


def test_cli_prepare_writes_to_out_and_reports(tmp_path, capsys):
    spec = str(write_hf_parquet(tmp_path / "d.parquet", random_images(3, 48), [0, 1, 1], ["x", "y"]))
    out = tmp_path / "prepared.h5"
    assert cli.main(["prepare", f"source={spec}", f"out={out}", "workers=0"]) == 0
    printed = capsys.readouterr().out
    assert "3 images 32x32, 2 classes, 0 skipped" in printed and str(out) in printed
    assert store.read_image_cache(out, size=32).images.shape == (3, 32, 32, 3)
    assert cli.main(["prepare", f"source={tmp_path / 'nope.parquet'}"]) == 2
    assert "data source not found" in capsys.readouterr().err


# ----------------------------------------------------------------------------- errors
def test_missing_and_unrecognised_sources_fail_in_one_line(tmp_path):
    with pytest.raises(ConfigError) as err:
        data.load_source(str(tmp_path / "missing.parquet[:10]"))
    assert str(tmp_path / "missing.parquet") in single_line(err) and "JPEG tree" in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="unrecognised data folder .*empty"):
        data.load_source(str(tmp_path / "empty"))
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ConfigError, match="unrecognised data file .*x.csv"):
        data.load_source(str(tmp_path / "x.csv"))


def test_bad_caches_fail_in_one_line(tmp_path):
    garbage = tmp_path / "garbage.h5"
    garbage.write_bytes(b"this is not HDF5")
    with pytest.raises(ConfigError) as err:
        data.cached(str(garbage))
    assert str(garbage) in single_line(err)
    path = tmp_path / "c.h5"
    store.write_image_cache(path, random_images(2, 32), np.zeros(2), ["a"], {})
    with pytest.raises(ConfigError) as err:
        data.cached(str(path), size=64)
    assert "32x32" in single_line(err) and "64x64" in str(err.value)
    with h5py.File(tmp_path / "partial.h5", "w") as h5:
        h5["images"] = np.zeros((1, 32, 32, 3), np.uint8)
    with pytest.raises(ConfigError, match="incomplete"):
        data.cached(str(tmp_path / "partial.h5"))


# ----------------------------------------------------------------------------- real images
@pytest.mark.shared_data
def test_shared_parquet_files(shared_data):
    import pyarrow.parquet as pq
    cifar = data.load_source(f"{shared_data}/cifar10/train.parquet[:100]", progress=False)
    assert cifar.images.shape == (100, 32, 32, 3) and cifar.class_names[0] == "airplane"
    assert len(set(cifar.labels.tolist())) == 10   # the file is sorted by class; a slice is not
    assert len(cifar.class_names) == 10
    tiny = data.load_source(f"{shared_data}/tinyimagenet/train.parquet[:20]", progress=False)
    assert tiny.images.shape == (20, 32, 32, 3) and len(tiny.class_names) == 202
    row = int(picked(len(pq.ParquetFile(shared_data / "tinyimagenet" / "train.parquet").read(columns=["label"])),
                     None, 20)[0])
    table = pq.ParquetFile(shared_data / "tinyimagenet" / "train.parquet").read(columns=["image"])
    with Image.open(io.BytesIO(table.column("image")[row]["bytes"].as_py())) as img:
        assert img.size == (64, 64)
        assert np.array_equal(tiny.images[0], data.fit_square(img, 32))


# ----------------------------------------------------------------------------- labels
def write_plain_parquet(path: Path, images: np.ndarray, **columns) -> Path:
    """Parquet without HF metadata: an image struct column plus the given label columns as stored."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    encoded = [{"bytes": jpeg_bytes(Image.fromarray(img)), "path": None} for img in images]
    pq.write_table(pa.table({"image": encoded, **columns}), path)
    return path


def with_labels(path: Path, labels: list) -> Path:
    """Rewrite an HF parquet's label column as given, keeping its metadata (ClassLabel names)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    table = pq.read_table(path)
    table = table.set_column(table.schema.get_field_index("label"), "label", pa.array(labels, pa.int64()))
    pq.write_table(table, path)
    return path


@pytest.mark.parametrize("labels, row, shown", [
    ([0, None, 1], 1, "nan"),           # a null in an int column
    ([0, 1, 2.5], 2, "2.5"),            # not an integer
    (["cat", "dog", "cat"], 0, "'cat'"),
    ([0, -3, 1], 1, "-3"),              # negative, and not the 'no label' -1
])
def test_bad_labels_fail_naming_source_row_and_value(tmp_path, labels, row, shown):
    spec = str(write_plain_parquet(tmp_path / "d.parquet", random_images(3), label=labels))
    with pytest.raises(ConfigError) as err:
        data.load_source(spec, progress=False)
    text = single_line(err)
    assert text.startswith(spec) and f"row {row} has label {shown}" in text and "label_column=" in text


def test_labels_beyond_the_class_names_and_stray_minus_one_are_refused(tmp_path):
    path = write_hf_parquet(tmp_path / "t.parquet", random_images(4), [0, 1, 0, 1], ["a", "b"])
    with pytest.raises(ConfigError, match=r"row 2 has label 7, outside 0\.\.1 \(the 2 class names\)"):
        data.load_source(str(with_labels(path, [0, 1, 7, 1])), progress=False)
    with pytest.raises(ConfigError, match=r"row 1 has label -1, .*among labelled rows"):
        data.load_source(str(with_labels(path, [0, -1, 1, 1])), progress=False)
    unlabelled = data.load_source(str(with_labels(path, [-1] * 4)), progress=False)   # HF's unlabelled test split
    assert unlabelled.labels.tolist() == [-1] * 4 and unlabelled.class_names == ["a", "b"]
    only_images = data.load_source(str(write_plain_parquet(tmp_path / "u.parquet", random_images(2))), progress=False)
    assert only_images.labels.tolist() == [-1, -1]


def test_pickled_batch_labels_are_checked_per_file(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_pickle(folder / "data_batch_1", {b"data": planar(2, 32, 0), b"labels": [0, 1]})
    write_pickle(folder / "data_batch_2", {b"data": planar(2, 32, 1), b"labels": [2, 10]})
    write_pickle(folder / "batches.meta", {b"label_names": [f"c{i}".encode() for i in range(10)]})
    with pytest.raises(ConfigError, match=r"data_batch_2 row 1 has label 10, outside 0\.\.9") as err:
        data.load_source(str(folder), progress=False)
    assert "fix or replace the file" in single_line(err)
    imagenet = tmp_path / "Imagenet32_train"
    write_pickle(imagenet / "train_data_batch_1", {"data": planar(2, 32, 0), "labels": [1, 0]})   # 1-based: 0 is bad
    with pytest.raises(ConfigError, match=r"train_data_batch_1 row 1 has label 0, .*among labelled rows"):
        data.load_source(str(imagenet), progress=False)


def test_label_column_picks_another_column(tmp_path, monkeypatch):
    import datasets
    images = random_images(4)
    features = datasets.Features({"img": datasets.Image(), "coarse_label": datasets.ClassLabel(names=["x", "y"]),
                                  "fine_label": datasets.ClassLabel(names=["p", "q", "r"])})
    ds = datasets.Dataset.from_dict({"img": list(images), "coarse_label": [0, 1, 0, 1], "fine_label": [2, 0, 1, 2]},
                                    features=features)
    path = tmp_path / "c100" / "train.parquet"
    path.parent.mkdir()
    ds.to_parquet(str(path))
    assert data.load_source(str(path), progress=False).class_names == ["x", "y"]   # auto: the first ClassLabel
    fine = data.load_source(str(path), progress=False, label_column="fine_label")
    assert fine.labels.tolist() == [2, 0, 1, 2] and fine.class_names == ["p", "q", "r"]
    with pytest.raises(ConfigError) as err:
        data.load_source(str(path), progress=False, label_column="label")
    assert "no label column 'label'" in single_line(err) and "fine_label" in str(err.value)
    monkeypatch.setattr(data_readers, "_reachable", lambda host, timeout: True)
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split: ds)
    assert data.load_source("hf:someone/c100", progress=False, label_column="fine_label").class_names == ["p", "q", "r"]
    # prepare keeps one cache per label column
    cfg = data.Config(source=str(path), cache_dir=str(tmp_path / "cache"), workers=0)
    coarse_cache, fine_cache = data.run(cfg), data.run(data.Config(**{**cfg.__dict__, "label_column": "fine_label"}))
    assert coarse_cache != fine_cache and "fine_label" in fine_cache.name
    assert store.read_image_cache(fine_cache).labels.tolist() == [2, 0, 1, 2]
    assert data.cached(str(path), cache_dir=str(tmp_path / "cache"), label_column="fine_label").class_names[0] == "p"


def test_label_column_on_a_source_without_columns_is_refused(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_pickle(folder / "data_batch_1", {b"data": planar(2, 32, 0), b"labels": [0, 1]})
    with pytest.raises(ConfigError, match="applies to parquet and hf: sources only") as err:
        data.load_source(str(folder), progress=False, label_column="fine_label")
    assert str(folder) in single_line(err)


# ----------------------------------------------------------------------------- absolute specs
def test_absolute_spec_keeps_split_slice_and_hub_ids(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d").mkdir()
    write_hf_parquet(tmp_path / "d" / "train.parquet", random_images(2), [0, 1], ["a", "b"])
    assert data.absolute_spec("d/train.parquet[:40000]") == f"{tmp_path}/d/train.parquet[:40000]"
    assert data.absolute_spec("d:train[-5:]") == f"{tmp_path}/d:train[-5:]"
    assert data.absolute_spec(" hf:uoft-cs/cifar10:test[1:3] ") == "hf:uoft-cs/cifar10:test[1:3]"
    assert data.absolute_spec("not/there.h5") == f"{tmp_path}/not/there.h5"
    assert data.absolute_spec(str(tmp_path / "d")) == str(tmp_path / "d")
    assert data.absolute_spec("~/x.parquet") == f"{Path.home().resolve()}/x.parquet"
    moved = data.absolute_spec("d:train[:1]")
    monkeypatch.chdir("/")
    assert data.parse_spec(moved).location == str(tmp_path / "d") and data.parse_spec(moved).split == "train"
