"""The seed papers' studies on tiny generated data: the WGAN optimizer x architecture grid (with a
diverged cell as a row, not a crash), the ablation ladder, the augmentation study; the class filter,
generated images read back through the data stage, and a classifier that learns a separable set and
stays at chance on shuffled labels."""
from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, random_images, random_inception_weights
from replearn import ablation, augment, classifier, data, generate, pretrain, subset, wgan_grid
from replearn.config import ConfigError, build
from replearn.store import write_image_cache
from test_chain import artifact_times, labelled_images

TINY_PROBE = "per_class=10 val_size=40 select_draws=1 final_draws=2 train_rows=0 test_rows=0 svm_args=c_extend=1"


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("studies")
    train_x, train_y = labelled_images(240, seed=1)
    test_x, test_y = labelled_images(80, seed=2)
    return {"root": root,
            "data": str(write_image_cache(root / "pre.h5", random_images(96, seed=3), np.full(96, -1), [], {})),
            "train": str(write_image_cache(root / "train.h5", train_x, train_y, list("abcd"), {})),
            "test": str(write_image_cache(root / "test.h5", test_x, test_y, list("abcd"), {}))}


def study_values(sources: dict, **over) -> dict:
    root = sources["root"]
    return {"preset": "tiny", "data": sources["data"], "train": sources["train"], "test": sources["test"],
            "build_dir": str(root / "build"), "tables_dir": str(root / "tables"), "cache_dir": str(root / "cache"),
            "quality_samples": 16, **over}


# ============================================================================ the studies
def test_wgan_grid_writes_nine_rows_and_a_diverged_cell_is_a_row(sources):
    # SGD at lr 1e30 blows the generator up at its first step: three diverged rows, not a crash
    cfg = build(wgan_grid.Config, "wgan-grid", study_values(sources, probe=False, lrs="5e-5,5e-5,1e30"))
    text = wgan_grid.run(cfg).read_text()
    table = text.split("\n| optimizer")[1]
    assert table.count("\n|") == 10                                         # separator + 9 cells
    assert len(re.findall(r"\| sgd .* diverged at step \d+", table)) == 3
    assert text.count("2 G steps (all steps)") == 6
    figures = sources["root"] / "tables" / "wgan-grid-tiny"
    for name in ("critic_loss", "generator_loss", "wasserstein", "diversity", "samples"):
        assert (figures / f"{name}.png").exists(), name
    assert "pretrain commit" in text and "n/a (no inception_weights)" in text
    before = artifact_times(sources["root"] / "build")
    wgan_grid.run(cfg)                                                      # every cell reused, diverged ones too
    assert artifact_times(sources["root"] / "build") == before


def test_ablation_ladder_probes_each_rung_against_its_control(sources):
    cfg = build(ablation.Config, "ablation", study_values(sources, rungs="wgan,wgan+res+sn+sa", probe_args=TINY_PROBE))
    text = ablation.run(cfg).read_text()
    assert "| WGAN " in text and "WGAN + residual + SN + self-attention" in text
    assert "ladder: wgan + self-attention" in text and "comparison; ladder base" in text
    assert len([line for line in text.splitlines() if line.startswith("| WGAN") and "% (+-" in line]) == 2
    record = json.loads((sources["root"] / "tables" / "ablation-tiny" / "study.json").read_text())
    assert all(r["gain (points)"] != "-" for r in record["rows"])
    assert "not run (augment=true runs it)" in text


def test_a_study_with_local_inception_weights_reports_fid(sources, tmp_path, monkeypatch):
    """The FID path of the studies: a random Inception saved locally (never downloaded) gives a finite FID
    in the table (study.json) and the cell's quality records, against cached real statistics of the GANs'
    training images."""
    weights = random_inception_weights(tmp_path / "inception.pth", monkeypatch)
    values = study_values(sources, rungs="wgan", probe=False, inception_weights=str(weights), fid_samples=16,
                          tables_dir=str(tmp_path / "tables"), cache_dir=str(tmp_path / "cache"))
    text = ablation.run(build(ablation.Config, "ablation", values)).read_text()
    assert "n/a (no inception_weights)" not in text
    record = json.loads((tmp_path / "tables" / "ablation-tiny" / "study.json").read_text())
    fid = record["rows"][0]["FID"]                                         # formatted: a random Inception's FID is ~0
    assert np.isfinite(float(fid)) and float(fid) >= 0, fid
    measured = [r["fid"] for path in (sources["root"] / "build").rglob("quality-*.json")
                for r in json.loads(path.read_text())["records"] if r.get("fid") is not None]
    assert measured and all(np.isfinite(measured)), measured
    assert list((tmp_path / "cache").rglob("fid*")), "the real statistics were not cached"


def test_augment_study_rows_and_generated_images(sources):
    values = {k: v for k, v in study_values(sources).items()
              if k in ("preset", "train", "test", "build_dir", "tables_dir", "cache_dir")}
    text = augment.run(build(augment.Config, "augment", {**values, "methods": "none,dcgan"})).read_text()
    for label in ("no augmentation", "DCGAN images (one GAN per class)"):
        assert label in text, label
    assert "24 real + 24 generated" in text and "classify commit" in text
    assert (sources["root"] / "tables" / "augment-tiny" / "generated.png").exists()


# ============================================================================ the class filter and generated data
def test_subset_keeps_classes_with_the_same_images_per_class(sources, tmp_path):
    both = data.read_image_cache(subset.run(subset.Config(source=sources["train"], classes=(2, 0), per_class=7,
                                                          out_dir=str(tmp_path))))
    one = data.read_image_cache(subset.run(subset.Config(source=sources["train"], classes=(0,), per_class=7,
                                                         out_dir=str(tmp_path))))
    assert both.class_names == ["c", "a"] and np.bincount(both.labels).tolist() == [7, 7]
    assert np.array_equal(both.images[both.labels == 1], one.images)      # class 0 is label 1 of (2, 0)
    with pytest.raises(ConfigError, match="choose from: 0 a, 1 b, 2 c, 3 d"):
        subset.run(subset.Config(source=sources["train"], classes=(9,), out_dir=str(tmp_path)))


def test_generated_parquet_reads_back_through_the_data_stage(sources, tmp_path):
    values = {"preset": "tiny", "data": sources["data"], "steps": 1, "width": 0.125, "batch_size": 8,
              "precision": "fp32", "cache_dir": str(tmp_path / "cache")}
    run_dirs = [pretrain.run(build(pretrain.Config, "pretrain", {**values, "seed": s,
                                                                 "run_dir": str(tmp_path / f"r{s}")})) for s in (0, 1)]
    out = generate.run(generate.Config(runs=tuple(map(str, run_dirs)), class_names=("cat", "dog"), per_class=5))
    back = data.cached(str(out), size=32, cache_dir=str(tmp_path / "cache"))
    assert back.images.shape == (10, 32, 32, 3) and back.labels.tolist() == [0] * 5 + [1] * 5
    assert back.class_names == ["cat", "dog"]
    assert np.array_equal(back.images[:5], generate.draw(str(run_dirs[0]), "last.pt", 5, 0, "cpu"))   # PNG: lossless
    mtime = out.stat().st_mtime_ns
    assert generate.run(generate.Config(runs=tuple(map(str, run_dirs)), class_names=("cat", "dog"),
                                        per_class=5)) == out and out.stat().st_mtime_ns == mtime


# ============================================================================ the classifier
def colour_set(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two classes: reddish and bluish noisy images (trivially separable)."""
    g = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    images = g.integers(0, 120, size=(n, 32, 32, 3)).astype(np.uint8)
    images[labels == 0, :, :, 0] += 120
    images[labels == 1, :, :, 2] += 120
    return images, labels


def classify(tmp_path: Path, train_labels: np.ndarray | None = None, **over) -> float:
    x, y = colour_set(96, seed=0)
    tx, ty = colour_set(200, seed=1)
    train = write_image_cache(tmp_path / "train.h5", x, y if train_labels is None else train_labels, ["r", "b"], {})
    test = write_image_cache(tmp_path / "test.h5", tx, ty, ["r", "b"], {})
    values = {"preset": "tiny", "train": str(train), "test": str(test), "epochs": 6, "batch_size": 16, "lr": 0.05,
              "cache_dir": str(tmp_path / "cache"), "out_dir": str(tmp_path / "out"), **over}
    return json.loads(classifier.run(build(classifier.Config, "classify", values)).read_text())["test_acc"]


def test_classifier_learns_a_separable_set(tmp_path):
    assert classify(tmp_path, augment="traditional", epochs=12) >= 0.9   # 6 epochs: 0.835 (flips and jitter slow it)


def test_classifier_stays_at_chance_on_shuffled_labels(tmp_path):
    _, y = colour_set(96, seed=0)
    shuffled = y.copy()
    for cls in (0, 1):   # half of each true class gets each label: nothing about the class is left
        rows = np.flatnonzero(y == cls)
        shuffled[rows] = np.random.default_rng(cls).permutation(np.arange(len(rows)) % 2)
    assert 0.3 <= classify(tmp_path, train_labels=shuffled) <= 0.7


@pytest.mark.parametrize("arch", sorted(classifier.CLASSIFIERS))
def test_every_classifier_takes_32x32_and_every_augment_keeps_shape(arch):
    net = classifier.CLASSIFIERS[arch](3, 1.0 if arch != "mobilenet_v2" else 0.25, 1).eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert net(x).shape == (2, 3)
    for name, fn in classifier.AUGMENTS.items():
        y = fn(x, torch.Generator().manual_seed(0))
        assert y.shape == x.shape and float(y.min()) >= -1 and float(y.max()) <= 1, name


def test_classifier_refuses_sources_with_different_class_names(tmp_path):
    x, y = colour_set(8, seed=0)
    a = write_image_cache(tmp_path / "a.h5", x, y, ["r", "b"], {})
    b = write_image_cache(tmp_path / "b.h5", x, y, ["b", "r"], {})
    with pytest.raises(ConfigError, match="name their classes differently"):
        classifier.run(build(classifier.Config, "classify", {"train": f"{a},{b}", "test": str(a),
                                                             "cache_dir": str(tmp_path / "c")}))


def test_make_targets_pass_the_study_variables():
    out = subprocess.run(["make", "-n", "-C", str(REPO), "wgan-grid", "ablation", "augment", "STAMP=", "PRESET=smoke",
                          "STUDY_ARGS=seeds=0", "INCEPTION_WEIGHTS=w.pth"], capture_output=True, text=True).stdout
    assert "replearn wgan-grid preset=smoke" in out and "replearn ablation preset=smoke" in out
    assert "inception_weights='w.pth'" in out and "replearn augment preset=smoke" in out and "seeds=0" in out
