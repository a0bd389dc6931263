"""Bad input fails early and in one line: config values when the config is built, output folders
before any work, a full disk while writing HDF5 (no crash, no temporary file left), and temporary
files of killed runs are cleaned up by the next run.
"""
from __future__ import annotations

import errno
import os
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import h5py
import numpy as np
import pytest

from replearn.core import store, utils
from replearn.train import evaluate
from replearn.probe import kmeans
from replearn import cli, data
from replearn.data import cache as data_cache
from replearn.core.config import ConfigError, build, from_dict, register_check, require, validate

from conftest import random_images

NO_SPACE = OSError(errno.ENOSPC, "No space left on device")


def one_line(err: pytest.ExceptionInfo) -> str:
    assert "\n" not in str(err.value), str(err.value)
    return str(err.value)


# ----------------------------------------------------------------------------- config values
@pytest.mark.parametrize("cls, stage, words, shown", [
    (data.Config, "prepare", ["size=0"], "size=0 (needs >= 1)"),
    (data.Config, "prepare", ["workers=-1"], "workers=-1 (needs >= 0)"),
    (kmeans.Config, "kmeans", ["k=0", "std_eps=-1"], "k=0 (needs > 0), std_eps=-1.0 (needs >= 0)"),
    (kmeans.Config, "kmeans", ["precision=fp8"], "precision='fp8' (choose from: auto, bf16, fp32)"),
    (evaluate.Config, "evaluate", ["batch_size=0"], "batch_size=0 (needs > 0)"),
    (evaluate.Config, "evaluate", ["num_samples=1"], "num_samples=1: each needs at least 2 images"),
])
def test_out_of_range_values_fail_when_the_config_is_built(cls, stage, words, shown):
    with pytest.raises(ConfigError) as err:
        build(cls, stage, words)
    assert shown in one_line(err)
    with pytest.raises(ConfigError):
        from_dict(cls, dict(w.split("=") for w in words))


def test_cli_reports_a_bad_value_in_one_line_with_exit_2(capsys):
    assert cli.main(["prepare", "size=0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "prepare: value(s) out of range: size=0 (needs >= 1)" in err


def test_require_lists_every_bad_value_and_lets_unset_ones_pass():
    Cfg = namedtuple("Cfg", "steps lr clip grid mode batch")
    cfg = Cfg(steps=0, lr=None, clip=-1.0, grid=(4, 0), mode="x", batch=None)
    with pytest.raises(ConfigError) as err:
        require(cfg, positive=("steps", "lr", "grid"), non_negative=("clip",), at_least={"batch": 1},
                choices={"mode": ("a", "b")}, stage="pretrain")
    assert one_line(err) == ("pretrain: value(s) out of range: steps=0 (needs > 0), grid=(4, 0) (needs > 0), "
                             "clip=-1.0 (needs >= 0), mode='x' (choose from: a, b)")
    require(Cfg(1, 0.1, 0.0, (4,), "a", None), positive=("steps", "lr", "grid"), non_negative=("clip",))


def test_a_registered_check_runs_on_build_and_validate():
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class Config:
        n: int = 1

    register_check(Config, lambda cfg: require(cfg, positive=("n",), stage="demo"))
    assert build(Config, "demo", ["n=3"]).n == 3
    with pytest.raises(ConfigError, match=r"demo: value\(s\) out of range: n=0"):
        build(Config, "demo", ["n=0"])
    with pytest.raises(ConfigError):
        validate(Config(n=-1))


# ----------------------------------------------------------------------------- output locations
def test_check_writable_creates_the_folder_and_checks_space(tmp_path, monkeypatch):
    assert utils.check_writable(tmp_path / "a" / "b", 10) == tmp_path / "a" / "b"
    assert (tmp_path / "a" / "b").is_dir() and not list((tmp_path / "a" / "b").iterdir())   # probe removed
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError) as err:
        utils.check_writable(tmp_path / "file" / "sub")
    assert str(tmp_path / "file" / "sub") in one_line(err) and "cannot write" in str(err.value)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(utils.shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 5000, 5000))
    with pytest.raises(ConfigError) as err:
        utils.check_writable(tmp_path, 2_000_000)
    assert "not enough free space in" in one_line(err) and "2.0 MB needed, 5.0 KB free" in str(err.value)
    utils.check_writable(tmp_path)   # size unknown: only writability


def test_prepare_checks_the_output_before_decoding(tmp_path, monkeypatch):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    import pickle
    with open(folder / "data_batch_1", "wb") as fh:
        pickle.dump({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 0, 1]}, fh)
    (tmp_path / "blocker").write_text("a file where the cache folder should be")
    with pytest.raises(ConfigError, match="blocker"):
        data.run(data.Config(source=str(folder), cache_dir=str(tmp_path / "blocker")))
    seen = []
    real = utils.check_writable

    def spy(folder, expected_bytes=None):
        seen.append(expected_bytes)
        return real(folder, expected_bytes)
    monkeypatch.setattr(data_cache, "check_writable", spy)
    monkeypatch.setattr(data_cache, "fit_array", lambda *a: pytest.fail("decoded before the space check"))
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(utils.shutil, "disk_usage", lambda p: usage(10**9, 10**9, 100))
    with pytest.raises(ConfigError, match="not enough free space"):
        data.run(data.Config(source=str(folder), cache_dir=str(tmp_path / "cache")))
    assert seen == [None, 4 * (32 * 32 * 3 + 8)]


# ----------------------------------------------------------------------------- full disk
def no_temp_left(folder: Path) -> None:
    assert [p.name for p in folder.iterdir() if ".tmp-" in p.name] == []


def test_feature_writer_turns_a_full_disk_into_one_line(tmp_path, monkeypatch):
    out = tmp_path / "f.h5"

    def full(self, key, value):
        raise NO_SPACE
    with pytest.raises(ConfigError) as err:
        with store.FeatureWriter(out, [("a", 4)], {"kind": "test"}) as writer:
            writer.create_split("train", 8)
            monkeypatch.setattr(h5py.Dataset, "__setitem__", full)
            writer.write("train", 0, np.ones((4, 4), np.float32), np.zeros(4))
    assert one_line(err) == (f"disk full or not writable while writing {out}: No space left on device; "
                             f"free space and rerun")
    assert not out.exists()
    no_temp_left(tmp_path)


def test_a_background_writer_thread_reports_the_full_disk(tmp_path, monkeypatch):
    from replearn.probe.features import BackgroundWriter
    out = tmp_path / "f.h5"
    calls = []

    def full(self, key, value):
        calls.append(key)
        raise NO_SPACE
    with pytest.raises(ConfigError, match="disk full or not writable while writing"):
        with store.FeatureWriter(out, [("a", 4)], {}) as writer:
            writer.create_split("train", 64)
            monkeypatch.setattr(h5py.Dataset, "__setitem__", full)
            sink = BackgroundWriter(writer)
            for start in range(0, 64, 8):
                sink.put("train", start, np.ones((8, 4), np.float32), np.zeros(8))
            sink.close()
    assert len(calls) == 1   # after the first failure the file is not touched again
    no_temp_left(tmp_path)


def test_a_full_disk_at_close_and_in_the_image_cache_writer(tmp_path, monkeypatch):
    out = tmp_path / "f.h5"
    with pytest.raises(ConfigError, match="disk full"):
        with store.FeatureWriter(out, [("a", 4)], {}) as writer:
            writer.create_split("train", 4)
            writer.write("train", 0, np.ones((4, 4), np.float32), np.zeros(4))
            monkeypatch.setattr(h5py.File, "close", lambda self: (_ for _ in ()).throw(NO_SPACE))
    monkeypatch.undo()
    assert not out.exists()
    no_temp_left(tmp_path)
    monkeypatch.setattr(h5py.Group, "create_dataset", lambda *a, **k: (_ for _ in ()).throw(NO_SPACE))
    with pytest.raises(ConfigError) as err:
        store.write_image_cache(tmp_path / "c.h5", random_images(2), np.zeros(2), ["a"], {})
    assert f"while writing {tmp_path / 'c.h5'}: No space left on device" in one_line(err)
    no_temp_left(tmp_path)


def test_other_errors_in_the_writer_block_pass_unchanged_and_clean_up(tmp_path):
    with pytest.raises(KeyError):
        with store.FeatureWriter(tmp_path / "f.h5", [("a", 4)], {}) as writer:
            writer.create_split("train", 4)
            raise KeyError("not a disk problem")
    no_temp_left(tmp_path)


def test_atomic_writes_report_a_full_disk_in_one_line(tmp_path):
    with pytest.raises(ConfigError) as err:
        with utils.atomic_path(tmp_path / "x.json") as tmp:
            tmp.write_text("{}")
            raise NO_SPACE
    assert str(tmp_path / "x.json") in one_line(err)
    no_temp_left(tmp_path)


# ----------------------------------------------------------------------------- killed runs
def test_temp_files_of_dead_processes_are_removed_by_the_next_write(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    dead_pid = int(dead.stdout)
    assert not utils.pid_running(dead_pid)
    stale = tmp_path / f"f.h5.tmp-{dead_pid}"
    alive = tmp_path / f"f.h5.tmp-{os.getppid()}"   # a live process's write in progress
    other = tmp_path / f"g.h5.tmp-{dead_pid}"       # another file's: left to its own next write
    for path in (stale, alive, other):
        path.write_bytes(b"partial")
    utils.atomic_write_text(tmp_path / "f.h5", "done")
    assert not stale.exists() and alive.exists() and other.exists()
    assert (tmp_path / "f.h5").read_text() == "done"


# ----------------------------------------------------------------------------- skipped images
def test_skipped_images_travel_with_the_cache(tmp_path):
    root = tmp_path / "tree"
    (root / "a").mkdir(parents=True)
    from PIL import Image
    Image.fromarray(random_images(1)[0]).save(root / "a" / "ok.png")
    (root / "a" / "broken.jpg").write_bytes(b"not a jpeg")
    images = data.cached(str(root), cache_dir=str(tmp_path / "cache"), workers=0)
    assert images.skipped == 1 and images.attrs["skipped_examples"] == [os.path.join("a", "broken.jpg")]
    assert data.cached(str(root), cache_dir=str(tmp_path / "cache")).skipped == 1   # read back from the cache
    assert store.ImageSet(images.images, images.labels, []).skipped == 0


def test_hardware_names_the_cpu_vector_units():
    # the same model name has come with and without bf16 units: timings must say which
    from replearn.core.utils import cpu_vector_units
    assert cpu_vector_units("flags : fpu sse2 avx avx2 fma") == "AVX2"
    assert cpu_vector_units("flags : avx2 avx512f avx512bw avx512_bf16") == "AVX512-BF16"
    assert cpu_vector_units("flags : avx2 avx512f avx512_bf16 amx_bf16 amx_tile") == "AMX-BF16"
    assert cpu_vector_units("flags : fpu sse2") == ""
    assert cpu_vector_units("flags : avx512_bf16x") == ""        # whole words only


def test_an_isa_limit_turns_the_bf16_paths_off_and_the_label_says_so(monkeypatch, request):
    # benchmarks/isa.sh runs the AVX2-only kind's code paths on a Zen 4: its records must not pass for either kind
    from replearn.core.config import ConfigError
    from replearn.core.utils import cpu_vector_units, hardware
    zen4 = "flags : avx2 avx512f avx512_bf16"
    assert cpu_vector_units(zen4, limit="AVX2") == "AVX2"
    assert cpu_vector_units("flags : avx2", limit="AVX512-BF16") == "AVX2"      # a limit never adds units
    monkeypatch.setenv("REPLEARN_CPU_ISA", "AVX2")
    utils.cpu_has_bf16.cache_clear()                  # read once a process: the variable is set before it starts
    request.addfinalizer(utils.cpu_has_bf16.cache_clear)
    assert cpu_vector_units(zen4) == "AVX2"
    found = cpu_vector_units(limit="")
    if found and found != "AVX2":
        assert f"{found} limited to AVX2" in hardware()
        assert not utils.bf16_supported(__import__("torch").device("cpu"))
    monkeypatch.setenv("REPLEARN_CPU_ISA", "SSE2")
    with pytest.raises(ConfigError, match="REPLEARN_CPU_ISA='SSE2'"):
        cpu_vector_units(zen4)
