"""HDF5 attributes in native types (attrs_format=2), and files written before it still read."""
import json

import h5py
import numpy as np
import pytest

from replearn.core.store import FeatureFile, FeatureWriter, read_attrs, read_image_cache, write_attrs, write_image_cache


ATTRS = {"model": "dcgan", "checkpoint_step": 2000, "seconds": 1.5, "bn_stats": True, "note": None,
         "layers": ["conv1", "conv2"], "offsets": [0, 4, 10], "scales": [0.5, 2.0],
         "config": {"steps": 10, "width": 0.25, "models": ["a"]}, "empty": [], "mixed": [1, "a"],
         "numeric_text": "1234567890", "json_text": '{"a": 1}'}


def test_attributes_are_native_and_round_trip(tmp_path):
    with h5py.File(tmp_path / "a.h5", "w") as h5:
        write_attrs(h5, ATTRS)
    with h5py.File(tmp_path / "a.h5", "r") as h5:
        raw = h5.attrs
        assert raw["model"] == "dcgan"                       # a string, not '"dcgan"'
        assert raw["numeric_text"] == "1234567890"
        assert raw["checkpoint_step"] == 2000
        assert isinstance(raw["offsets"], np.ndarray) and raw["offsets"].dtype == np.int64
        assert list(raw["layers"]) == ["conv1", "conv2"]
        assert isinstance(raw["note"], h5py.Empty)
        assert sorted(raw["json_attrs"]) == ["config", "empty", "mixed"]   # no native type for these
        assert json.loads(raw["config"]) == ATTRS["config"]
        back = read_attrs(h5)
    assert back == ATTRS
    assert all(type(back[k]) is type(v) for k, v in ATTRS.items())


def test_files_written_before_native_attributes_still_read(tmp_path):
    """Format 1: every attribute JSON text (the layout written up to stop 35)."""
    path = tmp_path / "old.h5"
    with h5py.File(path, "w") as h5:
        for split in ("train", "test"):
            h5.create_dataset(f"{split}/features", data=np.ones((4, 3), np.float32))
            h5.create_dataset(f"{split}/labels", data=np.arange(4))
        h5.attrs.update(layer_names=json.dumps(["x", "y"]), layer_offsets=json.dumps([0, 1, 3]), feature_dim=3,
                        model=json.dumps("dcgan"), key=json.dumps("0123abcdef"), config=json.dumps({"steps": 5}),
                        complete=True)
    with FeatureFile(path) as ff:
        assert ff.layer_names == ["x", "y"] and ff.offsets == [0, 1, 3]
        assert ff.attrs["model"] == "dcgan" and ff.attrs["key"] == "0123abcdef"
        assert ff.attrs["config"] == {"steps": 5}


def test_feature_file_attributes_as_a_user_reads_them(tmp_path):
    path = tmp_path / "f.h5"
    with FeatureWriter(path, [("conv1", 2), ("conv2", 3)], {"model": "dcgan", "kind": "critic",
                                                              "config": {"steps": 3}}) as w:
        w.create_split("train", 2, source="a.parquet")
        w.write("train", 0, np.zeros((2, 5), np.float32), np.array([0, 1]))
    with h5py.File(path, "r") as h5:
        assert h5.attrs["model"] == "dcgan"
        assert list(h5.attrs["layer_names"]) == ["conv1", "conv2"]
        offsets = h5.attrs["layer_offsets"]
        assert offsets.tolist() == [0, 2, 5]
        assert h5["train/features"][:, offsets[1]:offsets[2]].shape == (2, 3)   # conv2's columns
        assert h5["train"].attrs["source"] == "a.parquet"
    with FeatureFile(path) as ff:
        assert ff.attrs["config"] == {"steps": 3} and ff.attrs["feature_dim"] == 5


def test_image_cache_attributes(tmp_path):
    path = write_image_cache(tmp_path / "c.h5", np.zeros((2, 4, 4, 3), np.uint8), np.array([0, 1]), ["a", "b"],
                             {"source": "x.parquet", "source_id": "1e10", "skipped": 0})
    with h5py.File(path, "r") as h5:
        assert h5.attrs["source_id"] == "1e10" and list(h5.attrs["class_names"]) == ["a", "b"]
    cache = read_image_cache(path)
    assert cache.class_names == ["a", "b"] and cache.attrs["source_id"] == "1e10"
    assert isinstance(cache.attrs["provenance"], dict)


@pytest.mark.parametrize("value", [float("nan"), 1e300])
def test_odd_numbers_stay_numbers(tmp_path, value):
    with h5py.File(tmp_path / "n.h5", "w") as h5:
        write_attrs(h5, {"v": value})
    with h5py.File(tmp_path / "n.h5", "r") as h5:
        back = read_attrs(h5)["v"]
    assert back == value or (np.isnan(back) and np.isnan(value))


def test_commit_is_dirty_for_code_changes_only(tmp_path):
    """A fresh clone's commit reads clean with a rewritten measurement under benchmarks/results/ or a
    rewritten table output under tables/, and -dirty once a tracked code file differs from it."""
    import os
    import subprocess
    import sys
    from conftest import REPO
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    read = [sys.executable, "-c", "import sys; sys.path.insert(0, '.'); from replearn.core.utils import git_commit; "
            "print(git_commit())"]
    env = {k: v for k, v in os.environ.items() if k != "REPLEARN_SOURCE_COMMIT"}
    (clone / "benchmarks" / "results" / "svm.json").write_text("{}\n")
    with open(clone / "tables" / "cifar10-cpu.csv", "a") as f:
        f.write("rewritten by a chain\n")
    assert not subprocess.run(read, cwd=clone, env=env, capture_output=True, text=True, check=True).stdout.strip().endswith("-dirty")
    with open(clone / "replearn" / "budget.py", "a") as f:
        f.write("# changed\n")
    assert subprocess.run(read, cwd=clone, env=env, capture_output=True, text=True, check=True).stdout.strip().endswith("-dirty")


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_blocks_read_the_stored_values_whatever_the_rows_and_layers(tmp_path, dtype):
    """iter_blocks / read: contiguous rows (read into a reused buffer), scattered rows and a layer subset give
    exactly h5py's values as float32, in sorted row order, also across several blocks of one buffer."""
    path, rng = tmp_path / f"{dtype}.h5", np.random.default_rng(0)
    values = (rng.standard_normal((37, 7)) * 100).astype(dtype)
    with FeatureWriter(path, [("conv1", 3), ("conv2", 4)], {"model": "dcgan"}, dtype=dtype) as w:
        w.create_split("train", 37)
        w.write("train", 0, values.astype(np.float32), np.arange(37) % 3)
    expected = values.astype(np.float32)
    scattered = np.array([30, 2, 5, 6, 7, 19])
    with FeatureFile(path) as ff:
        assert np.array_equal(ff.read("train"), expected)
        assert np.array_equal(ff.read("train", scattered), expected[np.sort(scattered)])
        assert np.array_equal(ff.read("train", scattered, layers=[1]), expected[np.sort(scattered)][:, 3:])
        blocks = [(idx.copy(), block.copy()) for idx, block in ff.iter_blocks("train", block=8)]
        assert np.array_equal(np.concatenate([i for i, _ in blocks]), np.arange(37))
        assert np.array_equal(np.concatenate([b for _, b in blocks]), expected)
        assert all(b.dtype == np.float32 for _, b in blocks)
        assert list(ff.iter_blocks("train", np.array([], int))) == []
