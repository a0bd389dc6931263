"""A newcomer's first hour (issue 41): `make` alone explains itself, nothing runs without a preset, every
mistake is one line (exit 2) that says what to type instead, and a folder of one's own photos pretrains.
Each test is one mistake and its message; all run in seconds."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from conftest import REPO, random_images
from replearn.train import pretrain
from replearn import chain, cli, data
from replearn.core.config import ConfigError, build, field_help

needs_make = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def run_cli(capsys, *words) -> tuple[int, str, str]:
    code = cli.main([str(w) for w in words])
    out, err = capsys.readouterr()
    return code, out, err


def mistake(capsys, *words) -> str:
    """The CLI's answer to a mistake: exit 2, one line on stderr, no traceback; returns that line."""
    code, _, err = run_cli(capsys, *words)
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def make(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "--no-print-directory", "-C", str(REPO), *args], capture_output=True, text=True,
                          timeout=60)


def photos(folder: Path, n: int = 8, nested: bool = False) -> Path:
    """n small PNG/JPEG files of different sizes, flat (or half of them one folder down): no classes."""
    folder.mkdir(parents=True)
    for i, img in enumerate(random_images(n, 40, seed=4)):
        where = folder / "2024" / "june" if nested and i % 2 else folder
        where.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img[:, : 32 + i]).save(where / f"photo{i}.{'png' if i % 3 else 'jpg'}")
    return folder


# ----------------------------------------------------------------------------- the Makefile
@needs_make
def test_make_help_is_the_default_goal():
    helped = make("help")
    assert helped.returncode == 0, helped.stderr
    text = helped.stdout
    for target in ("pretrain", "features", "svm", "curve", "svm-table", "kmeans", "wgan-grid", "ablation", "augment",
                   "test", "test-all", "bench", "setup", "clean-build"):
        assert f"\n  {target} " in text, target
    for preset, says in (("tiny", "~4 min on 2 CPU cores"), ("smoke", "under an hour"), ("cpu", "minutes on a GPU"),
                         ("paper", "Hugging Face Hub")):
        assert f"\n  {preset} " in text and says in text, preset
    for variable in ("PRESET", "PRETRAIN_DATA", "TRAIN_DATA", "TEST_DATA", "MODELS", "SVM_ARGS", "BUILD_DIR"):
        assert f" {variable} " in text, variable
    assert "make svm-table PRESET=tiny" in text
    bare = make()
    assert bare.returncode == 0 and bare.stdout == text   # `make` alone builds nothing: it prints the help
    assert make("-n").stdout.startswith(text)             # and so does a dry run


@needs_make
def test_make_without_preset_refuses_in_one_line():
    done = make("-n", "svm-table", "STAMP=")
    assert done.returncode == 2 and not done.stdout
    assert done.stderr.count("\n") == 1 and "PRESET is not set" in done.stderr
    assert "make svm-table PRESET=tiny" in done.stderr and "tiny, smoke, cpu, paper" in done.stderr
    assert "make kmeans PRESET=tiny" in make("-n", "kmeans", "STAMP=").stderr   # the target typed, spelled right


@needs_make
def test_make_refuses_a_lowercase_preset():
    done = make("-n", "svm-table", "preset=tiny", "STAMP=")
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert "write PRESET=tiny instead of preset=tiny" in done.stderr


@needs_make
def test_make_takes_train_data_and_test_data_and_the_old_cifar_names():
    new = make("-n", "svm-table", "PRESET=tiny", "STAMP=", "TRAIN_DATA=a/train", "TEST_DATA=a/test").stdout
    assert "replearn chain preset=tiny" in new and "train='a/train'" in new and "test='a/test'" in new
    old = make("-n", "svm-table", "PRESET=tiny", "STAMP=", "CIFAR_TRAIN=b/train", "CIFAR_TEST=b/test").stdout
    assert "train='b/train'" in old and "test='b/test'" in old
    study = make("-n", "wgan-grid", "PRESET=tiny", "STAMP=", "TRAIN_DATA=c/train").stdout
    assert "train='c/train'" in study and "data='c/train'" in study   # STUDY_DATA defaults to the train split


# ----------------------------------------------------------------------------- python -m replearn
def test_version_and_help_through_python_m():
    version = subprocess.run([sys.executable, "-m", "replearn", "--version"], capture_output=True, text=True,
                             cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert version.returncode == 0 and version.stdout.strip() == f"replearn {cli.version()}"
    assert cli.version().count(".") >= 1


@pytest.mark.parametrize("words, code", [(["--help"], 0), (["-h"], 0), ([], 2)])
def test_help_lists_every_stage_with_what_it_does(capsys, words, code):
    got, out, _ = run_cli(capsys, *words)
    assert got == code
    for stage in cli.STAGES:
        line = next(line for line in out.splitlines() if line.startswith(f"  {stage} "))
        assert len(line.split(maxsplit=1)[1]) > 10, line   # a description beside each stage
    assert "replearn <stage> --help" in out and "--version" in out


def test_stage_help_says_what_each_key_means_and_its_default(capsys):
    code, out, _ = run_cli(capsys, "pretrain", "--help")
    assert code == 0
    steps = next(line for line in out.splitlines() if line.strip().startswith("steps="))
    assert "steps=300000" in steps and "generator steps" in steps
    assert any(line.strip().startswith("model=dcgan") and "recipe" in line for line in out.splitlines())
    code, out, _ = run_cli(capsys, "chain", "-h")
    assert "preset=''" in out and "models=dcgan,wgan-gp" in out   # defaults as they would be typed


def test_field_help_takes_comments_beside_above_and_wrapped():
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class Config:
        # -- a section banner, not a meaning
        # the block above a field
        alpha: int = 1
        beta: str = ""     # beside it,
                           # wrapped onto the next line
        gamma: float = 0.5
        preset: str = ""

    assert field_help(Config) == {"alpha": "the block above a field", "beta": "beside it, wrapped onto the next line",
                                  "gamma": "", "preset": field_help(Config)["preset"]}
    assert "scale" in field_help(Config)["preset"]   # a common key without a comment still gets a meaning


# ----------------------------------------------------------------------------- presets
def test_chain_without_preset_refuses_and_lists_the_presets(capsys):
    err = mistake(capsys, "chain", "upto=pretrain")
    assert "no preset given: choose one of tiny, smoke, cpu, paper" in err and "PRESET=tiny" in err
    with pytest.raises(ConfigError, match="no preset given"):
        chain.run(chain.Config())


# ----------------------------------------------------------------------------- near misses
@pytest.mark.parametrize("words, says", [
    (["pretrain", "stpes=10"], "unknown key 'stpes' (did you mean 'steps'?)"),
    (["pretrain", "PRESET=tiny"], "(did you mean 'preset'?)"),
    (["pretrian"], "unknown stage 'pretrian' (did you mean 'pretrain'?)"),
    (["pretrain", "preset=tiyn"], "unknown preset 'tiyn' (did you mean 'tiny'?)"),
    (["pretrain", "model=dcgn", "data=hf:x"], "unknown model 'dcgn' (did you mean 'dcgan'?)"),
])
def test_near_misses_suggest_the_name_meant(capsys, words, says):
    assert says in mistake(capsys, *words)


def test_a_missing_run_folder_is_named_as_such(capsys, tmp_path):
    (tmp_path / "runs" / "dcgan-1a2b3c").mkdir(parents=True)
    err = mistake(capsys, "features", f"run={tmp_path}/runs/dcgan-1a2b3d")
    assert f"run folder not found: {tmp_path}/runs/dcgan-1a2b3d" in err and "checkpoint" not in err.split(";")[0]
    assert f"(did you mean '{tmp_path}/runs/dcgan-1a2b3c'?)" in err and "set run=" in err


@pytest.mark.parametrize("stage", ["features", "curve", "report", "evaluate", "svm"])
def test_an_input_left_at_its_empty_default_says_what_to_give(capsys, stage):
    """No default points at a file that does not exist: each stage's input names the chain's layout."""
    err = mistake(capsys, stage)
    key = "features" if stage == "svm" else "run"
    assert f"{key}= is required" in err and "build/<preset>/<model>-<key>" in err


# ----------------------------------------------------------------------------- data errors name their key
def test_a_missing_source_names_the_key_to_set(capsys, tmp_path):
    err = mistake(capsys, "pretrain", f"data={tmp_path}/nope.parquet")
    assert f"data source not found: {tmp_path}/nope.parquet; fix or change data=" in err


def test_a_chain_data_error_names_the_make_variable(capsys, tmp_path):
    flat = photos(tmp_path / "mine")
    err = mistake(capsys, "chain", "preset=tiny", f"pretrain_data={flat}",
                  f"train={tmp_path}/cifar/train.parquet", "test=hf:uoft-cs/cifar10:test")
    assert "data source not found" in err and "TRAIN_DATA= on the make line (train= for replearn chain)" in err
    err = mistake(capsys, "chain", "preset=tiny", f"pretrain_data={tmp_path}/gone")
    assert "PRETRAIN_DATA=" in err


def test_a_bad_slice_is_called_a_bad_slice(capsys, tmp_path):
    err = mistake(capsys, "prepare", f"source={tmp_path}/train.parquet[:abc]")
    assert "bad slice [:abc]" in err and "not found" not in err and "source=" in err
    with pytest.raises(ConfigError, match=r"bad slice \[::2\]"):
        data.parse_spec(f"{tmp_path}/train.parquet[::2]")


def test_paths_are_echoed_as_typed_not_resolved(capsys, tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    typed = f"{tmp_path}/link/missing.parquet"
    err = mistake(capsys, "pretrain", f"data={typed}")
    assert typed in err and "/real/" not in err
    with pytest.raises(ConfigError) as caught:   # the run folder's absolute spec is made after the check
        pretrain.plan(build(pretrain.Config, "pretrain", {"data": typed}))
    assert typed in str(caught.value) and "/real/" not in str(caught.value)


# ----------------------------------------------------------------------------- your own images
def test_a_flat_folder_is_unlabelled_data_and_nested_folders_too(tmp_path):
    flat = data.load_source(str(photos(tmp_path / "flat")), workers=0, progress=False)
    assert flat.images.shape == (8, 32, 32, 3) and (flat.labels == -1).all() and flat.class_names == []
    nested = photos(tmp_path / "nested", nested=True)
    assert data.parse_spec(str(nested)).kind == "images"
    assert len(data.load_source(str(nested), workers=0, progress=False)) == 8
    tree = tmp_path / "tree"
    for name in ("cat", "dog"):
        photos(tree / name, n=2)
    assert data.parse_spec(str(tree)).kind == "jpeg-tree"   # class folders keep their meaning


def test_a_flat_folder_as_labelled_data_asks_for_class_folders(capsys, tmp_path):
    flat = photos(tmp_path / "mine")
    err = mistake(capsys, "features", f"run={tmp_path}", f"train={flat}")
    assert "folder of images without classes" in err and "root/<class>/<file>" in err and "train=" in err
    err = mistake(capsys, "chain", "preset=tiny", f"pretrain_data={flat}", f"test={flat}")
    assert "root/<class>/<file>" in err and "TEST_DATA=" in err


def test_a_flat_folder_of_pngs_pretrains_with_the_tiny_preset(capsys, tmp_path):
    flat = photos(tmp_path / "mine")
    code, out, err = run_cli(capsys, "pretrain", "preset=tiny", f"data={flat}", "steps=2", "batch_size=8",
                             "precision=fp32", f"run_dir={tmp_path}/run", f"cache_dir={tmp_path}/cache")
    assert code == 0, err
    assert (tmp_path / "run" / "ckpt_0000002.pt").exists() and (tmp_path / "run" / "finished.json").exists()
    assert "8 images 32x32" in out


@pytest.mark.shared_data
def test_a_bad_slice_of_the_real_cifar_file_names_train_data(capsys, shared_data, tmp_path):
    """The README's command with a typo in the slice: refused before any pretraining, path as typed."""
    (tmp_path / "data").symlink_to(shared_data)
    typed = f"{tmp_path}/data/cifar10/train.parquet[:4O000]"   # the letter O for a zero
    err = mistake(capsys, "chain", "preset=tiny", f"pretrain_data={tmp_path}/data/tinyimagenet/train.parquet",
                  f"train={typed}", f"test={tmp_path}/data/cifar10/train.parquet[40000:]")
    assert f"bad slice [:4O000] in {typed}" in err and "TRAIN_DATA=" in err
