"""Feature extraction: layout, batch-size and process-count independence, bf16 tolerance, fp16 files,
and no half-written file after a crash."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from conftest import random_images
from replearn.train import pretrain
from replearn.probe import features
from replearn.core.config import ConfigError, build
from replearn.core.store import FeatureFile, write_image_cache


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("feat")
    unlabelled = write_image_cache(root / "pre.h5", random_images(64, seed=2), np.full(64, -1), [], {})
    labels = np.arange(40) % 4
    train = write_image_cache(root / "train.h5", random_images(40, seed=3), labels, list("abcd"), {})
    test = write_image_cache(root / "test.h5", random_images(20, seed=4), labels[:20], list("abcd"), {})
    cfg = build(pretrain.Config, "pretrain", dict(model="dcgan", width=0.125, batch_size=8, steps=2, precision="fp32",
                                                  data=str(unlabelled), run_dir=str(root / "run"),
                                                  cache_dir=str(root / "cache")))
    pretrain.run(cfg)
    return {"root": root, "run": str(root / "run"), "train": str(train), "test": str(test)}


def extract(tiny_run, name: str, **over) -> Path:
    values = dict(run=tiny_run["run"], train=tiny_run["train"], test=tiny_run["test"], precision="fp32",
                  bn_images=32, cache_dir=str(tiny_run["root"] / "cache"),
                  out=str(tiny_run["root"] / f"{name}.h5"))
    return features.run(build(features.Config, "features", {**values, **over}))


def read(path: Path, split: str = "train") -> np.ndarray:
    with FeatureFile(path) as f:
        return f.read(split)


def test_file_layout_labels_and_provenance(tiny_run):
    path = extract(tiny_run, "layout", batch=16)
    with FeatureFile(path) as f:
        assert f.layer_names == [f"conv{i}" for i in range(1, 7)]
        assert f.offsets == list(np.cumsum([0] + [16 * c for c in (16, 16, 32, 32, 64, 64)]))
        assert f.num_rows("train") == 40 and f.num_rows("test") == 20
        assert (f.labels("train") == np.arange(40) % 4).all()
        assert f.attrs["kind"] == "critic" and f.attrs["model"] == "dcgan"
        assert f.attrs["precision"] == "fp32" and f.attrs["checkpoint_step"] == 2
        assert "git_commit" in f.attrs["provenance"]
        assert f.attrs["config"]["batch"] == 16


def test_features_do_not_depend_on_batch_size(tiny_run):
    a, b = read(extract(tiny_run, "b7", batch=7)), read(extract(tiny_run, "b32", batch=32))
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_bf16_features_track_float32(tiny_run):
    """bf16 autocast keeps ~3 significant digits: features agree within 3% of their scale."""
    a, b = read(extract(tiny_run, "f32")), read(extract(tiny_run, "bf16", precision="bf16"))
    scale = np.abs(a).mean()
    assert np.abs(a - b).mean() < 0.03 * scale
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.99


def test_float16_file_reads_back_as_float32(tiny_run):
    a = read(extract(tiny_run, "full32"))
    path = extract(tiny_run, "half", dtype="float16")
    with h5py.File(path) as h5:
        assert h5["train/features"].dtype == np.float16
    b = read(path)
    assert b.dtype == np.float32
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)


def test_a_crash_leaves_no_file_that_looks_finished(tiny_run, monkeypatch):
    def boom(*args, **kwargs):
        yield 0, np.zeros((1, 1), np.float32)
        raise KeyboardInterrupt

    monkeypatch.setattr(features, "extract_batches", boom)
    with pytest.raises((KeyboardInterrupt, ValueError, TypeError)):
        extract(tiny_run, "crashed", batch=8)
    leftovers = list(tiny_run["root"].glob("crashed.h5*"))
    assert leftovers == []
    with pytest.raises(ConfigError, match="not found"):
        FeatureFile(tiny_run["root"] / "crashed.h5")


def test_incomplete_file_is_refused(tmp_path):
    with h5py.File(tmp_path / "half.h5", "w") as h5:
        h5.create_dataset("train/features", data=np.zeros((2, 3)))
    with pytest.raises(ConfigError, match="incomplete"):
        FeatureFile(tmp_path / "half.h5")


@pytest.mark.slow
def test_two_processes_write_the_same_file(tiny_run):
    one = read(extract(tiny_run, "one", batch=8))
    args = [f"{k}={v}" for k, v in dict(run=tiny_run["run"], train=tiny_run["train"], test=tiny_run["test"],
                                         precision="fp32", bn_images=32, batch=8,
                                         cache_dir=tiny_run["root"] / "cache",
                                         out=tiny_run["root"] / "two.h5").items()]
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "replearn", "features", *args], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    # torchrun runs each process on one thread: oneDNN then sums in another order (~1e-5 differences)
    np.testing.assert_allclose(read(tiny_run["root"] / "two.h5"), one, rtol=1e-3, atol=5e-5)
    np.testing.assert_allclose(read(tiny_run["root"] / "two.h5", "test"), read(tiny_run["root"] / "one.h5", "test"),
                               rtol=1e-3, atol=5e-5)
