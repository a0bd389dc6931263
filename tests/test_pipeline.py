"""One end-to-end smoke test on generated images, through the CLI: CIFAR-10 python batches ->
prepare -> pretrain -> features -> svm -> table, and the CLI's error messages."""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from conftest import random_images
from replearn.cli import main
from replearn.core.store import FeatureFile, write_image_cache


def write_cifar_batches(folder: Path, n_train: int, n_test: int) -> None:
    """The real layout: pickled dicts, b'data' N x 3072 uint8 channel-planar, b'labels'."""
    folder.mkdir(parents=True)
    for name, n, seed in (("data_batch_1", n_train, 5), ("test_batch", n_test, 6)):
        images = random_images(n, seed=seed)
        labels = np.arange(n) % 4
        images[labels == 1, :, :, 0] = 255   # make the classes learnable: a channel per class
        images[labels == 2, :, :, 1] = 255
        images[labels == 3, :, :, 2] = 255
        planar = images.transpose(0, 3, 1, 2).reshape(n, 3072)
        with open(folder / name, "wb") as fh:
            pickle.dump({b"data": planar, b"labels": labels.tolist()}, fh)
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump({b"label_names": [b"a", b"b", b"c", b"d"]}, fh)


def cli(*words) -> int:
    return main([str(w) for w in words])


@pytest.mark.slow
def test_whole_protocol_on_generated_images(tmp_path, capsys):
    cifar = tmp_path / "cifar-10-batches-py"
    write_cifar_batches(cifar, 160, 40)
    unlabelled = write_image_cache(tmp_path / "pre.h5", random_images(64, seed=9), np.full(64, -1), [], {})
    cache = tmp_path / "cache"
    assert cli("prepare", f"source={cifar}", f"cache_dir={cache}") == 0
    run_dir = tmp_path / "runs" / "wgan-gp"
    assert cli("pretrain", "model=wgan-gp", f"data={unlabelled}", f"run_dir={run_dir}", "width=0.125",
               "batch_size=8", "steps=2", "n_critic=1", "precision=fp32", f"cache_dir={cache}") == 0
    assert (run_dir / "finished.json").exists()
    feats = run_dir / "features.h5"
    assert cli("features", f"run={run_dir}", f"train={cifar}", f"test={cifar}:test", f"out={feats}",
               "bn_images=32", f"cache_dir={cache}") == 0
    with FeatureFile(feats) as f:
        assert f.num_rows("train") == 160 and f.num_rows("test") == 40
    results = run_dir / "features.svm.json"
    assert cli("svm", f"features={feats}", f"out={results}", "preset=smoke", "settings=full,400", "per_class=10", "val_size=40",
               "final_draws=3", "select_draws=2") == 0
    res = json.loads(results.read_text())
    assert res["settings"]["full"]["test_acc"] > 0.6          # chance is 0.25
    assert len(res["settings"]["400"]["draws"]) == 3
    assert cli("table", f"results={results}", f"out_dir={tmp_path / 'tables'}") == 0
    table = (tmp_path / "tables" / "cifar10.md").read_text()
    assert "WGAN-GP (reproduced" in table and "quoted" in table and "DCGAN (ImageNet-1k critic)" in table
    assert (tmp_path / "tables" / "cifar10.csv").exists() and (tmp_path / "tables" / "cifar10.tex").exists()
    assert "](samples/features-wgan-gp.png)" in table and (tmp_path / "tables" / "samples" / "features-wgan-gp.png").exists()
    assert (tmp_path / "tables" / "cifar10_samples.png").exists()


def test_cli_errors_are_one_line_and_list_choices(capsys):
    assert cli("pretrian") == 2
    assert "choose from: prepare, pretrain" in capsys.readouterr().err
    assert cli("pretrain", "stpes=3") == 2
    err = capsys.readouterr().err
    assert "valid keys" in err and "steps" in err and len(err.strip().splitlines()) == 1
    assert cli("features", "run=/nonexistent/run") == 2
    assert "/nonexistent/run" in capsys.readouterr().err
    assert cli("pretrain", "preset=huge") == 2
    assert "smoke" in capsys.readouterr().err


def test_stage_help_lists_keys(capsys):
    assert cli("svm", "--help") == 0
    out = capsys.readouterr().out
    assert "c_grid=" in out and "final_draws=" in out


def test_overrides_parse_lists_words_and_numbers():
    from replearn.probe import svm
    from replearn.core.config import build
    cfg = build(svm.Config, "svm", ["settings=full,400", "layers=3,4,5", "c_grid=1e-3,1e-2", "standardize=true"])
    assert cfg.settings == ("full", "400") and cfg.layers == (3, 4, 5) and cfg.c_grid == (1e-3, 1e-2)
    assert cfg.standardize is True
    assert build(svm.Config, "svm", ["settings=400"]).settings == ("400",)
