"""MNIST / Fashion-MNIST idx files (issue: other datasets): header, magic numbers, gz and plain, both
splits, and one-line refusals of corrupt files; read with numpy alone."""
from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from replearn import data
from replearn.core.config import ConfigError


def write_idx(path: Path, array: np.ndarray, gz: bool) -> None:
    code = {np.uint8: 0x08, np.int32: 0x0C}[array.dtype.type]
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    (gzip.open if gz else open)(str(path) + (".gz" if gz else ""), "wb").write(payload)


@pytest.fixture(params=[False, True], ids=["plain", "gz"])
def mnist(tmp_path, request) -> Path:
    g = np.random.default_rng(0)
    for prefix, n in (("train", 30), ("t10k", 12)):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte", g.integers(0, 256, (n, 28, 28), dtype=np.uint8), request.param)
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte", (np.arange(n) % 10).astype(np.uint8), request.param)
    return tmp_path


def test_idx_header_and_payload_round_trip(tmp_path):
    array = np.arange(2 * 3 * 4, dtype=np.int32).reshape(2, 3, 4) - 5
    write_idx(tmp_path / "a-idx3-ubyte", array, gz=False)
    np.testing.assert_array_equal(data.read_idx_file(tmp_path / "a-idx3-ubyte"), array)


def test_both_splits_load_as_rgb_at_the_asked_size(mnist):
    train = data.load_source(str(mnist), size=32, progress=False)
    test = data.load_source(f"{mnist}:test", size=32, progress=False)
    assert train.images.shape == (30, 32, 32, 3) and test.images.shape == (12, 32, 32, 3)
    assert (train.images[..., 0] == train.images[..., 2]).all()            # grey replicated to 3 channels
    assert (train.labels == np.arange(30) % 10).all() and train.class_names == [str(i) for i in range(10)]
    raw = data.read_idx_file(next(mnist.glob("train-images-idx3-ubyte*")))
    same = data.load_source(str(mnist), size=28, progress=False)
    np.testing.assert_array_equal(same.images[..., 0], raw)                 # 28 px: untouched


def test_corrupt_idx_files_are_refused_in_one_line(tmp_path):
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"\x12\x34\x08\x03rest")
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(b"")
    with pytest.raises(ConfigError, match="not an idx file") as err:
        data.load_source(str(tmp_path), progress=False)
    assert "train-images-idx3-ubyte" in str(err.value) and "\n" not in str(err.value)
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((4, 28, 28), np.uint8), gz=False)
    truncated = (tmp_path / "train-images-idx3-ubyte").read_bytes()[:-10]
    (tmp_path / "train-images-idx3-ubyte").write_bytes(truncated)
    with pytest.raises(ConfigError, match="truncated or corrupt"):
        data.read_idx_file(tmp_path / "train-images-idx3-ubyte")
