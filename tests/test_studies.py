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
from replearn.data import subset
from replearn.train import generate, pretrain
from replearn.probe import classifier
from replearn.studies import ablation, augment, wgan_grid
from replearn import data
from replearn.core.config import ConfigError, build
from replearn.core.store import read_image_cache, write_image_cache
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
def measured_rows(tables: Path, name: str) -> list[dict]:
    return [r for r in csv_rows(tables / f"{name}.csv") if r["kind"] == "measured"]


def csv_rows(path: Path) -> list[dict]:
    import csv
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def assert_self_describing(tables: Path, name: str, study: str, quoted: int) -> list[dict]:
    """Every measured row names its scale, steps, seeds, status, flags, data and commit (md, csv, tex); the
    seed paper's numbers are rows marked quoted; the .tex has no raw LaTeX specials."""
    rows = csv_rows(tables / f"{name}.csv")
    measured = [r for r in rows if r["kind"] == "measured"]
    assert measured and all(r["scale"].startswith(("tiny", "custom (tiny preset")) for r in measured)
    for key in ("steps", "seeds", "status", "flags", "data", "commit"):
        assert all(r[key] for r in measured), key
    assert len([r for r in rows if r["kind"] == "quoted" and r["scale"] == "quoted"]) == quoted
    text = (tables / f"{name}.md").read_text()
    assert "## Quoted from the seed paper" in text and text.count("| tiny ") + text.count("| custom (tiny") == len(measured)
    table_lines = [ln for ln in text.splitlines() if ln.startswith("|")]
    for i, r in enumerate(measured, 1):    # provenance in numbered notes under the table, not in its cells
        assert f"\n{i}. *" in text and r["how produced"] in text
        assert not any(r["how produced"] in ln for ln in table_lines)
    tex = (tables / f"{name}.tex").read_text()
    for block in tex.split(r"\begin{tabular}")[1:]:                       # the measured rows, then the quoted
        lines = [ln for ln in block.splitlines() if ln.endswith(r"\\")]
        cells = {ln.replace(r"\&", "").count("&") for ln in lines}
        assert len(cells) == 1, "a raw & shifts a row's columns"
        for line in lines:                                                  # no raw % # _ $ left
            bare = re.sub(r"\\[%#_&$]", "", line).replace(r"$\pm$", "").replace("$^*$", "")
            assert not re.search(r"[%#_$]", bare), line
    assert "quoted kind" in tex and ("inception\\_weights" in tex or study == "augment")
    return measured


@pytest.mark.slow
def test_wgan_grid_writes_nine_rows_and_a_diverged_cell_is_a_row(sources):
    # SGD at lr 1e30 blows the generator up at its first step: three diverged rows, not a crash
    cfg = build(wgan_grid.Config, "wgan-grid", study_values(sources, probe=False, lrs="5e-5,5e-5,1e30"))
    text = wgan_grid.run(cfg).read_text()
    table = text.split("\n| optimizer")[1].split("## Quoted")[0]
    assert table.count("\n|") == 10                                         # separator + 9 cells
    assert len(re.findall(r"\| sgd .* NOT COMPARABLE: seed 0 diverged at step \d+", table)) == 3
    tables = sources["root"] / "tables"
    rows = assert_self_describing(tables, "wgan-grid-tiny", "wgan-grid", quoted=3)
    trained = [r for r in rows if r["optimizer"] != "sgd"]
    assert len(trained) == 6 and {r["steps"] for r in trained} == {"2"} and {r["status"] for r in trained} == {"comparable"}
    assert {r["seeds"] for r in rows} == {"0"} and all(r["critic_loss_seed0"] for r in trained)
    figures = tables / "wgan-grid-tiny"
    for name in ("critic_loss", "generator_loss", "wasserstein", "diversity", "samples"):
        assert (figures / f"{name}.png").exists(), name
    assert not (figures / "logit_gap.png").exists()                        # every grid critic is a WGAN critic
    assert "n/a (no inception_weights)" in text and "DenseNet samples degrade after this many steps" in text
    before = artifact_times(sources["root"] / "build")
    wgan_grid.run(cfg)                                                      # every cell reused, diverged ones too
    assert artifact_times(sources["root"] / "build") == before


@pytest.mark.slow
def test_ablation_rows_over_seeds_gain_against_the_wgan_rung(sources):
    cfg = build(ablation.Config, "ablation", study_values(sources, rungs="dcgan,wgan", seeds="0,1", probe_args=TINY_PROBE))
    text = ablation.run(cfg).read_text()
    assert "| WGAN " in text and "| DCGAN " in text and "reference; ladder base" in text
    tables = sources["root"] / "tables"
    rows = {r["model"]: r for r in assert_self_describing(tables, "ablation-tiny", "ablation", quoted=12)}
    assert {r["steps"] for r in rows.values()} == {"2"} and {r["seeds"] for r in rows.values()} == {"0,1"}
    for r in rows.values():                                                # every seed's value, mean and std (ddof=1)
        seeds = [float(r["probe_seed0"]), float(r["probe_seed1"])]
        assert float(r["probe_mean"]) == pytest.approx(np.mean(seeds))
        assert float(r["probe_std"]) == pytest.approx(np.std(seeds, ddof=1))
        assert float(r["probe_test_size"]) == 80 and float(r["probe_test_ci95"]) > 0
    assert rows["WGAN"]["gain vs WGAN"] == "reference"
    assert re.fullmatch(r"[+-]\d+\.\d ± \d+\.\d( \*| \(n\.s\.\))", rows["DCGAN"]["gain vs WGAN"])
    assert float(rows["DCGAN"]["gain_vs_reference"]) == pytest.approx(float(rows["DCGAN"]["probe_mean"])
                                                                       - float(rows["WGAN"]["probe_mean"]))
    assert "logit gap" in rows["DCGAN"]["Wasserstein estimate"] and "logit gap" not in rows["WGAN"]["Wasserstein estimate"]
    assert rows["DCGAN"]["untrained control (%)"] != "-" and "not run (augment=true runs it)" in text
    figures = tables / "ablation-tiny"
    assert (figures / "wasserstein.png").exists() and (figures / "logit_gap.png").exists()
    assert ablation.role("wgan+res+sn+sa", "wgan+res+sn") == "ladder: wgan+res+sn + self-attention"


def test_every_gan_is_measured_at_the_study_steps_and_a_capped_one_is_not_comparable(sources, tmp_path):
    """Equal work: a run trained further (here 2 steps) is measured at its checkpoint of the study's steps
    (1), with its quality and probe; a GAN stopped by the time cap before its steps is flagged."""
    values = study_values(sources, rungs="wgan", probe_args=TINY_PROBE, build_dir=str(tmp_path / "build"),
                          tables_dir=str(tmp_path / "tables"))
    ablation.run(build(ablation.Config, "ablation", values))                # 2 steps
    ablation.run(build(ablation.Config, "ablation", {**values, "steps": 1}))
    (row,) = measured_rows(tmp_path / "tables", "ablation-tiny")
    assert row["steps"] == "1" and row["status"] == "comparable" and "ckpt_0000001.pt: 1 G steps" in row["how produced"]
    curve = json.loads(next((tmp_path / "build").rglob("curve-*.json")).read_text())
    assert [p["step"] for p in curve["points"]] == [0, 1]
    # a cap of 0.6 ms: the first step spends it, 4 steps short
    ablation.run(build(ablation.Config, "ablation", {**values, "rungs": "wgan+res", "steps": 5, "max_minutes": 1e-5,
                                                     "probe": False}))
    (row,) = measured_rows(tmp_path / "tables", "ablation-tiny")
    assert row["status"] == "NOT COMPARABLE: seed 0 stopped at step 1 of 5 (time cap max_minutes hit)"
    assert row["steps"] == "5 wanted; measured at seed 0: 1"


def test_a_study_refuses_steps_and_seeds_in_pretrain_args(sources):
    with pytest.raises(ConfigError, match="use its steps=, seeds= instead"):
        build(ablation.Config, "ablation", study_values(sources, pretrain_args="steps=9 seed=3"))
    with pytest.raises(ConfigError, match="distinct seeds"):
        build(wgan_grid.Config, "wgan-grid", study_values(sources, seeds="1,1"))


def test_noise_marks_use_the_larger_half_width():
    from replearn.studies import study_tables as st
    a, b = st.stats([0.60, 0.62, 0.64]), st.stats([0.50, 0.52, 0.54, None])
    assert a["std"] == pytest.approx(0.02) and b["n"] == 3                 # ddof=1; a missing seed is left out
    seeds = st.seed_half_width(a, b)
    assert seeds == pytest.approx(4.302653 * np.sqrt(0.02 ** 2 / 3 * 2), rel=1e-5)   # t(0.975, 2 df)
    assert st.marked(0.10, seeds, 0.01) == {"gain": 0.10, "noise": seeds, "noise_from": "seeds", "beyond_noise": True}
    assert st.gain_text(st.marked(0.02, 0.005, 0.03)) == "+2.0 ± 3.0 (n.s.)"
    assert st.gain_text(st.marked(-0.0001, None, None)) == "+0.0"
    assert st.spread_text(st.stats([0.5]), ".1f", 100) == "50.0 (1 seed)"


@pytest.mark.slow
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
    fid = record["rows"][0]["fid_mean"]                                     # a random Inception's FID is ~0
    assert np.isfinite(fid) and fid >= 0 and record["rows"][0]["FID"] == f"{fid:.1f} (1 seed)", record["rows"][0]["FID"]
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
    assert "24 real + 24 generated" in text and "ckpt_0000002.pt" in text
    tables = sources["root"] / "tables"
    rows = assert_self_describing(tables, "augment-tiny", "augment", quoted=14)
    none, dcgan = rows
    assert none["gain vs no augmentation"] == "reference" and none["steps"] == "- (no GAN)" and dcgan["steps"] == "2"
    for r in rows:                                                          # the tiny preset's 2 classifier seeds
        accs = [float(r["test_acc_seed0"]), float(r["test_acc_seed1"])]
        assert r["seeds"] == "0,1" and float(r["test_acc_std"]) == pytest.approx(np.std(accs, ddof=1))
    assert float(dcgan["gain_vs_reference"]) == pytest.approx(float(dcgan["test_acc_mean"]) - float(none["test_acc_mean"]))
    assert dcgan["gain_vs_reference_noise_from"] in ("seeds", "test")
    assert (tables / "augment-tiny" / "generated.png").exists()
    # paired seeds: seed s's classifier trains on the images of GANs trained with seed s (2 classes x 2 seeds)
    gans = [json.loads((p / "config.json").read_text())["config"]
            for p in (sources["root"] / "build" / "tiny" / "augment" / "gans").glob("dcgan-*")]
    assert sorted((g["seed"], g["data"]) for g in gans) == sorted((s, d) for s in (0, 1) for d in {g["data"] for g in gans})
    assert "so the spread covers the GANs' randomness" in text and "seed(s) 0, 1" in text


# ============================================================================ the class filter and generated data
def test_subset_keeps_classes_with_the_same_images_per_class(sources, tmp_path):
    both = read_image_cache(subset.run(subset.Config(source=sources["train"], classes=(2, 0), per_class=7,
                                                          out_dir=str(tmp_path))))
    one = read_image_cache(subset.run(subset.Config(source=sources["train"], classes=(0,), per_class=7,
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


@pytest.mark.slow
def test_classifier_learns_a_separable_set(tmp_path):
    assert classify(tmp_path, augment="traditional", epochs=12) >= 0.9   # 6 epochs: 0.835 (flips and jitter slow it)


@pytest.mark.slow
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
