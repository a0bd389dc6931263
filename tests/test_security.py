"""No file the project reads runs code: checkpoints, Inception weights, the K-means centroid cache and
pickled CIFAR-10 / Imagenet32 batches are each crafted to touch a marker file when unpickled, and
each load must refuse them in one line naming the file (or, for the cache, recompute) with the
marker never created.
"""
from __future__ import annotations

import pathlib
import pickle
import struct

import numpy as np
import pytest
import torch

from replearn.core import store
from replearn.train import evaluate, metrics, runs
from replearn.probe import kmeans
from replearn import data
from replearn.core.config import ConfigError

from conftest import random_images


class Payload:
    """Unpickling this calls Path.touch(marker): code run by merely loading a file."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def crafted(path: pathlib.Path, marker: pathlib.Path, fmt: str, **extra) -> pathlib.Path:
    """A dict holding the payload, as a torch zip file ('torch') or a plain pickle ('pickle')."""
    obj = {**extra, "payload": Payload(marker)}
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "torch":
        torch.save(obj, path)
    else:
        with open(path, "wb") as fh:
            pickle.dump(obj, fh, protocol=2)
    return path


def refused(err: pytest.ExceptionInfo, path: pathlib.Path) -> str:
    text = str(err.value)
    assert "\n" not in text and str(path) in text, text
    return text


@pytest.fixture
def marker(tmp_path) -> pathlib.Path:
    out = tmp_path / "MARKER"
    yield out
    assert not out.exists(), "a crafted file ran code"


def test_the_payload_runs_code_when_loaded_unsafely(tmp_path):
    """The premise of every test here: loading these files with plain pickle would run the payload."""
    for fmt in ("torch", "pickle"):
        marker = tmp_path / f"ran-{fmt}"
        path = crafted(tmp_path / f"x.{fmt}", marker, fmt)
        if fmt == "torch":
            torch.load(path, weights_only=False)
        else:
            with open(path, "rb") as fh:
                pickle.load(fh)
        assert marker.exists()


# ----------------------------------------------------------------------------- (a) checkpoints
@pytest.mark.parametrize("fmt", ["torch", "pickle"])
def test_crafted_checkpoint_is_refused(tmp_path, marker, fmt):
    run_dir = tmp_path / "run"
    last = crafted(run_dir / runs.LAST, marker, fmt, step=1, config={})
    with pytest.raises(ConfigError) as err:
        runs.load_checkpoint(last)
    refused(err, last)
    with pytest.raises(ConfigError) as err:
        runs.load_run(run_dir)
    refused(err, last)
    with pytest.raises(ConfigError) as err:
        evaluate.checkpoint_names(run_dir, "all")   # reads last.pt's step
    refused(err, last)


# ----------------------------------------------------------------------------- (b) Inception weights
@pytest.mark.parametrize("fmt", ["torch", "pickle"])
def test_crafted_inception_weights_are_refused(tmp_path, marker, monkeypatch, fmt):
    import torch_fidelity.feature_extractor_inceptionv3 as fe
    monkeypatch.setattr(fe, "load_state_dict_from_url", lambda *a, **k: pytest.fail("tried to download"))
    weights = crafted(tmp_path / metrics.INCEPTION_FILE, marker, fmt, **{"conv.weight": torch.zeros(1)})
    with pytest.raises(ConfigError) as err:
        metrics.inception_extractor(weights, "cpu")
    assert "refused" in refused(err, weights) and metrics.INCEPTION_FILE in str(err.value)


# ----------------------------------------------------------------------------- (c) centroid cache
def test_crafted_centroid_cache_is_recomputed(tmp_path, marker, capsys):
    train = store.write_image_cache(tmp_path / "train.h5", random_images(30, seed=1), np.arange(30) % 3,
                                    ["a", "b", "c"], {})
    out = tmp_path / "km" / "features.h5"
    cache = crafted(out.with_name("centroids.pt"), marker, "torch")
    cfg = kmeans.Config(train=str(train), test="", k=4, patches=500, iterations=2, batch=4, compile=False,
                        out=str(out))
    kmeans.run(cfg)
    printed = capsys.readouterr().out
    assert f"not reusing {cache}" in printed and "recomputing" in printed
    saved = torch.load(cache, weights_only=True)   # replaced by a cache that loads safely
    assert saved["centroids"].shape == (4, 108) and isinstance(saved["empty_clusters"], int)
    kmeans.run(kmeans.Config(**{**cfg.__dict__, "dtype": "float16"}))
    assert "reusing centroids" in capsys.readouterr().out


# ----------------------------------------------------------------------------- (d, e) pickled batches
def planar(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 3072)).astype(np.uint8)


def test_crafted_cifar_batch_is_refused(tmp_path, marker):
    folder = tmp_path / "cifar-10-batches-py"
    batch = crafted(folder / "data_batch_1", marker, "pickle", data=planar(2), labels=[0, 1])
    with pytest.raises(ConfigError) as err:
        data.load_source(str(folder), progress=False)
    assert "refused to load the global __builtin__.getattr" in refused(err, batch)   # protocol 2 pickles Path.touch so


def test_crafted_cifar_meta_is_refused(tmp_path, marker):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    with open(folder / "data_batch_1", "wb") as fh:
        pickle.dump({b"data": planar(2), b"labels": [0, 1]}, fh)
    meta = crafted(folder / "batches.meta", marker, "pickle", label_names=[b"a", b"b"])
    with pytest.raises(ConfigError) as err:
        data.load_source(str(folder), progress=False)
    refused(err, meta)


def test_crafted_imagenet32_batch_is_refused(tmp_path, marker):
    folder = tmp_path / "Imagenet32_train"
    batch = crafted(folder / "train_data_batch_1", marker, "pickle", data=planar(2), labels=[1, 2])
    with pytest.raises(ConfigError) as err:
        data.load_source(str(folder), progress=False)
    assert "refused to load the global" in refused(err, batch)


def test_a_batch_that_is_not_a_pickle_is_one_line(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "data_batch_1").write_bytes(b"\x80\x02truncated")
    with pytest.raises(ConfigError) as err:
        data.load_source(str(folder), progress=False)
    refused(err, folder / "data_batch_1")


class Py2Pickler(pickle._Pickler):
    """Writes str and bytes as python 2's str (BINSTRING), as the original CIFAR-10 batches hold them."""
    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_str(self, obj):
        raw = obj if isinstance(obj, bytes) else obj.encode("latin1")
        if len(raw) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(raw)) + raw)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str
    dispatch[str] = save_py2_str


def test_python2_protocol2_batches_still_load(tmp_path):
    """The real files: protocol 2 from python 2 and numpy 1 (`numpy.core.multiarray._reconstruct`)."""
    import io
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    pixels = planar(3, seed=4)
    buf = io.BytesIO()
    Py2Pickler(buf, protocol=2).dump({"data": pixels, "labels": [3, 1, 2], "batch_label": "training batch 1 of 5"})
    raw = buf.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
    assert b"cnumpy.core.multiarray\n_reconstruct" in raw
    (folder / "data_batch_1").write_bytes(raw)
    buf = io.BytesIO()
    Py2Pickler(buf, protocol=2).dump({"label_names": ["airplane", "automobile", "bird", "cat"]})
    (folder / "batches.meta").write_bytes(buf.getvalue())
    out = data.load_source(str(folder), progress=False)
    assert out.labels.tolist() == [3, 1, 2] and out.class_names[:2] == ["airplane", "automobile"]
    assert np.array_equal(out.images[0, :, :, 0], pixels[0, :1024].reshape(32, 32))
    # python 3's protocol 2 (bytes through _codecs.encode) loads too
    with open(folder / "data_batch_1", "wb") as fh:
        pickle.dump({b"data": pixels, b"labels": [0, 1, 2]}, fh, protocol=2)
    assert data.load_source(str(folder), progress=False).labels.tolist() == [0, 1, 2]
