"""The chain a newcomer runs: every artifact keyed and reused, a second run a no-op, a changed SVM
setting reruns only the SVM stage, a kill -9 in the SVM stage loses nothing finished, the paper
preset's keys and layout stay valid, and (with ../shared/data) the README's make command on a fresh
`git clone` of this tree writes a table with every row it promises."""
from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import REPO, load_benchmark, random_images
from replearn import chain
from replearn.core import stage
from replearn.core.config import ConfigError, build
from replearn.core.store import write_image_cache


def labelled_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Four classes, each with one saturated colour channel (or none): learnable by any features."""
    images, labels = random_images(n, seed=seed), np.arange(n) % 4
    for cls, channel in ((1, 0), (2, 1), (3, 2)):
        images[labels == cls, :, :, channel] = 255
    return images, labels


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("chain")
    train_x, train_y = labelled_images(240, seed=1)
    test_x, test_y = labelled_images(80, seed=2)
    return {"root": root,
            "pretrain_data": str(write_image_cache(root / "pre.h5", random_images(96, seed=3), np.full(96, -1), [], {})),
            "train": str(write_image_cache(root / "train.h5", train_x, train_y, list("abcd"), {})),
            "test": str(write_image_cache(root / "test.h5", test_x, test_y, list("abcd"), {}))}


TINY_ARGS = dict(pretrain_args="steps=3 width=0.125 batch_size=16 precision=fp32 sample_every=1",
                 features_args="bn_images=64 precision=fp32",
                 svm_args="per_class=10 val_size=40 select_draws=2 final_draws=3",
                 kmeans_args="k=16 patches=2000 iterations=3",
                 curve_args="per_class=10 val_size=40 select_draws=1 final_draws=2 train_rows=0 test_rows=0 steps=0")


def chain_config(sources: dict, **over) -> chain.Config:
    values = {"preset": "tiny", "models": "dcgan,wgan-gp", "pretrain_data": sources["pretrain_data"],
              "train": sources["train"], "test": sources["test"], "build_dir": str(sources["root"] / "build"),
              "tables_dir": str(sources["root"] / "tables"), "cache_dir": str(sources["root"] / "cache"),
              **TINY_ARGS, **over}
    return build(chain.Config, "chain", values)


def artifact_times(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*")
            if p.is_file() and p.suffix in (".pt", ".h5", ".json")}


def test_chain_builds_every_row_then_reuses_everything(sources, capsys, monkeypatch):
    table = chain.run(chain_config(sources))
    first = capsys.readouterr()
    assert "up to date" not in first.out + first.err   # the curve reuses what the chain just built: not "up to date"
    text = table.read_text()
    assert table.name == "cifar10-tiny.md"
    for name in ("DCGAN (BCE) (reproduced", "DCGAN (BCE) untrained control (step 0", "WGAN-GP (reproduced",
                 "WGAN-GP untrained control (step 0", "1 Layer K-means (reproduced, K=16)"):
        assert name in text, name
    for name in ("DCGAN (BCE) (reproduced)", "DCGAN (BCE) untrained control (step 0)"):   # the same features,
        assert re.search(re.escape(name) + r"[^|]*\[SVM input: layers equalised\]", text), name  # layers equalised
    # each trained row's gain over its own control in both settings, with its noise: unscaled and layers
    # equalised, per model
    gain = r"[+-]\d+\.\d ± \d+\.\d(?: \*| \(n\.s\.\))?"
    assert len(re.findall(rf"\| {gain} +\| {gain} +\|", text)) == 4
    # the scale says what ran: the tiny preset with 3 steps is not "tiny"
    assert "**How each row was produced**" in text and "custom (tiny preset, steps=3" in text
    assert "[curve](curves/" in text and "1.96 std" in text
    assert re.search(r"\| figures +\|", text) and re.search(r"1\. \*DCGAN[^\n]*, seed 0, ", text)   # every note names its seed
    with open(table.with_suffix(".csv"), newline="") as fh:                 # counts read as counts, not 40.0
        critics = [r for r in csv.DictReader(fh) if r["pretrain_steps"]]
    assert len(critics) == 8 and all(r["seed"] == "0" and r["pretrain_steps"] in ("0", "3") for r in critics)
    build_dir = sources["root"] / "build"
    before = artifact_times(build_dir)
    monkeypatch.setattr(stage, "_BUILT", set())                 # as a second process finds them
    chain.run(chain_config(sources))                            # same keys: nothing is rebuilt
    assert artifact_times(build_dir) == before
    said = capsys.readouterr().err
    assert re.search(r"pretrain: \S+ is up to date \(key \w+\)", said) and "curve: " in said, said
    # benchmarks/cpu_eval.py reads a finished chain's folders into one record: every SVM result, fitted once
    cpu_eval = load_benchmark("cpu_eval")
    out = cpu_eval.main(["--work", str(sources["root"]), "--assemble", "--wall-seconds", "1",
                         "--out", str(sources["root"] / "eval" / "tiny.json")])
    record = json.loads(out.read_text())
    assert record["cost_line"].startswith("Compute recorded in the artifacts: ")
    assert (out.parent / "tiny-table.md").read_text() == text
    fitted = [r for r in record["results"] if not r["reused_from"]]
    assert len(record["results"]) == len(list(build_dir.rglob("*.svm-*.json"))) and fitted
    assert all(0 < r["svm_full_acc"] <= 1 and r["svm_full_seconds"] > 0 for r in fitted if "svm_full_acc" in r)


def test_carried_results_give_the_same_table_on_a_machine_without_build(sources, monkeypatch):
    """What a session on a fresh machine finds after `git clone`: the committed small results of a finished
    chain (no checkpoint, no feature file) are put back and reused by key; nothing trains or extracts."""
    over = dict(carry=True, build_dir=str(sources["root"] / "carry-build"),
                tables_dir=str(sources["root"] / "carry-tables"))
    first = chain.run(chain_config(sources, **over)).read_text()
    carried = [p for p in (sources["root"] / "carry-tables" / "cifar10-tiny-results").rglob("*") if p.is_file()]
    assert {p.suffix for p in carried} <= {".json", ".jsonl", ".png"}
    assert any(p.name == "finished.json" for p in carried) and any(p.name.startswith("curve-") for p in carried)
    assert any(p.parent.name.startswith("kmeans-") for p in carried)
    shutil.rmtree(sources["root"] / "carry-build")
    monkeypatch.setattr(stage, "_BUILT", set())
    again = chain.run(chain_config(sources, **over)).read_text()
    build_dir = sources["root"] / "carry-build"
    assert not list(build_dir.rglob("*.pt")) and not list(build_dir.rglob("*.h5"))   # nothing trained or extracted
    assert again == first
    # a result that was not carried needs the checkpoint: one line says it is not here and what to do
    with pytest.raises(ConfigError, match="not on this machine.*delete"):
        chain.run(chain_config(sources, **over, svm_args=TINY_ARGS["svm_args"] + " seed=1"))


def test_a_changed_svm_setting_reruns_only_the_svm_stage(sources):
    chain.run(chain_config(sources))
    build_dir = sources["root"] / "build"
    before = artifact_times(build_dir)
    over = dict(TINY_ARGS, svm_args=TINY_ARGS["svm_args"] + " seed=1")
    chain.run(chain_config(sources, **over))
    after = artifact_times(build_dir)
    changed = {k for k in after if before.get(k) != after[k]}
    assert changed and all(".svm-" in k or "/curve-" in k for k in changed), changed
    assert not any(k.endswith((".pt", ".h5")) for k in changed)          # no pretraining, no features
    assert all(k in after and after[k] == before[k] for k in before)      # built beside, old kept


def test_a_stage_refuses_an_input_with_another_key(sources):
    from replearn.probe import features
    from replearn.core.config import ConfigError
    run_dir = next((sources["root"] / "build" / "tiny").glob("dcgan-*"))
    with pytest.raises(ConfigError, match="not the expected"):
        features.run(build(features.Config, "features", {"run": str(run_dir), "train": sources["train"],
                                                         "test": sources["test"], "expect_run_key": "ffffffffff"}))


def write_features(path: Path, n_train: int, n_test: int, dim: int, seed: int = 0) -> Path:
    g = np.random.default_rng(seed)
    centres = g.normal(0, 1, size=(10, dim))
    with h5py.File(path, "w") as h5:
        for split, n in (("train", n_train), ("test", n_test)):
            labels = np.arange(n) % 10
            h5.create_dataset(f"{split}/features", data=(centres[labels] + g.normal(0, 3, size=(n, dim))).astype("f4"))
            h5.create_dataset(f"{split}/labels", data=labels)
        h5.attrs.update(layer_names=json.dumps(["x"]), layer_offsets=json.dumps([0, dim]), feature_dim=dim,
                        kind="critic", complete=True)
    return path


def test_kill_minus_9_in_the_400_setting_keeps_the_full_result(tmp_path):
    feats = write_features(tmp_path / "f.h5", 3000, 500, 256)
    out = tmp_path / "f.svm.json"
    args = [sys.executable, "-m", "replearn", "svm", f"features={feats}", f"out={out}", "settings=full,400",
            "per_class=100", "val_size=1000", "select_draws=2", "final_draws=400", "c_grid=1e-4,1e-3"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    partial = out.with_suffix(".partial.json")
    deadline = time.time() + 240
    while time.time() < deadline:
        try:
            state = json.loads(partial.read_text())
            if "full" in state.get("settings", {}) and len(state.get("partial", {}).get("400", {}).get("draws", [])) > 2:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("no progress file with the full setting and some 400-per-class draws appeared")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    full_before = json.loads(partial.read_text())["settings"]["full"]
    done = subprocess.run(args, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["settings"]["full"]["test_acc"] == full_before["test_acc"]
    assert res["resumed_from"] and len(res["settings"]["400"]["draws"]) == 400


@pytest.mark.slow
def test_the_paper_preset_chain_runs_on_local_files(sources):
    """Only what size demands is overridden: net width, steps, batch; per_class and val_size for 240 images."""
    cfg = chain_config(sources, preset="paper", models="dcgan,wgan-gp", curve=False, kmeans=False,
                       build_dir=str(sources["root"] / "paper-build"),
                       pretrain_args="steps=2 width=0.125 batch_size=16",
                       features_args="bn_images=64",
                       svm_args="per_class=10 val_size=40")
    text = chain.run(cfg).read_text()
    assert "DCGAN (BCE) (reproduced" in text and "WGAN-GP untrained control" in text
    res = [json.loads(p.read_text()) for p in (sources["root"] / "paper-build" / "paper").rglob("*.svm-*.json")]
    assert res and all(len(r["settings"]["400"]["draws"]) == 100 for r in res)     # the paper's 100 draws
    assert all(r["config"]["select_draws"] == 10 for r in res)


def runs_seed(run_dir: Path) -> int:
    return json.loads((run_dir / "config.json").read_text())["config"]["seed"]


def test_results_outlive_their_features_and_seed_repeats_give_a_spread(sources, capsys):
    """keep_features=false: every critic's file is gone once its SVM results are written, and a rerun
    reuses the results by key without extracting again; seed_repeats add a seed-spread section, and run
    after K-means (a chain cut short has the table's own rows first)."""
    root = sources["root"] / "lean-build"
    cfg = chain_config(sources, models="dcgan", curve=False, kmeans=True, layer_rows=False, keep_features=False,
                       seed_repeats="1", build_dir=str(root))
    text = chain.run(cfg).read_text()
    # benchmarks/gpu_chain.sh starts the GANs side by side from planned_runs: the very folders the chain built
    assert {(m, s, p.name) for m, s, p in chain.planned_runs(cfg)} == {
        ("dcgan", seed, p.name) for seed, p in zip((None, 1), sorted((root / "tiny").glob("dcgan-*"),
                                                               key=lambda p: runs_seed(p)))}
    assert not list(root.rglob("features-*.h5"))
    assert len(list(root.rglob("dcgan-*/*.svm-full+10pc-*.json"))) == 4    # seeds 0 and 1, each with its control
    seed1 = next(p for p in (root / "tiny").glob("dcgan-*") if runs_seed(p) == 1)
    km_done = min(p.stat().st_mtime_ns for p in root.rglob("kmeans-*/*.svm-*.json"))
    assert km_done < min(p.stat().st_mtime_ns for p in seed1.rglob("*") if p.is_file())
    assert "Spread over pretraining seeds: DCGAN (BCE) (reproduced)" in text and "mean ± std over 2 seeds" in text
    capsys.readouterr()
    chain.run(cfg)
    assert "svm result(s) of" in capsys.readouterr().out and not list(root.rglob("features-*.h5"))


@pytest.mark.shared_data
def test_readme_command_on_a_fresh_clone(tmp_path, shared_data):
    """The regression net for the README: `make svm-table PRESET=tiny ...` from a fresh clone (in
    `make test`: a newcomer's first command is checked by the default suite)."""
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    readme = (clone / "README.md").read_text()
    assert "make svm-table PRESET=tiny" in readme and "TRAIN_DATA='../shared/data/cifar10/train.parquet[:2500]'" in readme
    data = shared_data.resolve()
    make = ["make", "-C", str(clone), "svm-table", "PRESET=tiny", f"PY={sys.executable}", "STAMP=",
            f"PRETRAIN_DATA={data}/tinyimagenet/train.parquet[:3000]",
            f"TRAIN_DATA={data}/cifar10/train.parquet[:2500]",
            f"TEST_DATA={data}/cifar10/train.parquet[2500:3500]"]
    done = subprocess.run(make, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    table = (clone / "tables" / "cifar10-tiny.md").read_text()
    for name in ("DCGAN (BCE) (reproduced", "WGAN-GP (reproduced", "untrained control (step 0",
                 "1 Layer K-means (reproduced"):
        assert name in table, name
    head = subprocess.run(["git", "-C", str(clone), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    assert f"commit {head}" in table and "-dirty" not in table and "| tiny " in table
    built = {p: p.stat().st_mtime_ns for p in (clone / "build").rglob("*") if p.suffix in (".pt", ".h5", ".json")}
    again = subprocess.run(make, capture_output=True, text=True, timeout=600)   # a no-op: every key matches
    assert again.returncode == 0 and "is up to date" in again.stdout + again.stderr
    assert {p: p.stat().st_mtime_ns for p in built} == built
    shutil.rmtree(clone / "build")
