"""Artifact keys stay what they were: a finished run, feature file or SVM result built before a refactor is
reused after it. Each stage's key for a tiny config, with the data identity pinned (`source_id` would
otherwise read file paths and mtimes), against the key strings computed at commit 7c2de25 (before the
package was split into subpackages and the stages moved onto one Stage)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from replearn.data import subset
from replearn.train import generate, pretrain
from replearn.probe import classifier, curve, features, kmeans, supervised, svm
from replearn import data as data_module
from replearn.core.config import build

# the keys at 7c2de25, for the configs below; never edit these to make a test pass
EXPECTED = {
    "pretrain": "12e1389601",
    "pretrain-sn": "021c76eba6",
    "features": "ab5febfd29",
    "features-step0": "2050576471",
    "svm": "a037e7604e",
    "kmeans": "dca03bcb09",
    "curve": "923cacea1b",
    "supervised": "16bf6a58d3",
    "classify": "a959068f87",
    "subset": "430a11c338",
    "generate": "bb9ca39c01",
}


@pytest.fixture
def run_folder(tmp_path, monkeypatch) -> Path:
    """A pretrain run folder as the readers see it: config.json with its key, last.pt and ckpt_0 with a step."""
    monkeypatch.setattr(data_module, "source_id", lambda spec, size=32, **kw: f"id:{spec}:{size}")
    run = tmp_path / "dcgan-abc"
    run.mkdir()
    (run / "config.json").write_text('{"key": "0123456789", "config": {"image_size": 32}}')
    torch.save({"step": 7}, run / "last.pt")
    torch.save({"step": 0}, run / "ckpt_0000000.pt")
    return run


def stage_keys(run: Path) -> dict[str, str]:
    """Each stage's key, through the key its Stage declares (svm's and pretrain's take their input identity)."""
    p = build(pretrain.Config, "pretrain", {"preset": "tiny", "model": "dcgan", "data": "pre.h5", "steps": 3})
    p_sn = build(pretrain.Config, "pretrain", {"model": "wgan-gp", "data": "pre.h5", "spectral_norm": True})
    f = build(features.Config, "features", {"preset": "tiny", "run": str(run), "train": "tr.h5", "test": "te.h5"})
    f0 = build(features.Config, "features", {"run": str(run), "checkpoint": "ckpt_0000000.pt",
                                            "train": "tr.h5", "test": "te.h5", "bn_images": 64})
    s = build(svm.Config, "svm", {"preset": "tiny", "features": "f.h5", "per_class": 10, "final_draws": 3})
    k = build(kmeans.Config, "kmeans", {"preset": "tiny", "train": "tr.h5", "test": "te.h5", "k": 16})
    c = build(curve.Config, "curve", {"preset": "tiny", "run": str(run), "train": "tr.h5", "test": "te.h5"})
    sup = build(supervised.Config, "supervised", {"preset": "tiny", "train": "tr.h5", "test": "te.h5"})
    cls = build(classifier.Config, "classify", {"train": ("a.h5", "b.h5"), "test": "te.h5", "epochs": 2})
    sub = build(subset.Config, "subset", {"source": "tr.h5", "classes": (3, 5), "per_class": 10})
    gen = build(generate.Config, "generate", {"runs": (str(run),), "per_class": 5})
    return {
        "pretrain": pretrain.run_key(p, pretrain.data_identity(p)),
        "pretrain-sn": pretrain.run_key(p_sn, pretrain.data_identity(p_sn)),
        "features": features.STAGE.key(f),
        "features-step0": features.STAGE.key(f0),
        "svm": svm.results_key(s, "features-identity"),
        "kmeans": kmeans.STAGE.key(k),
        "curve": curve.STAGE.key(c),
        "supervised": supervised.STAGE.key(sup),
        "classify": classifier.STAGE.key(cls),
        "subset": subset.STAGE.key(sub),
        "generate": generate.STAGE.key(gen),
    }


def test_every_stage_key_is_the_one_recorded_before_the_refactor(run_folder):
    assert stage_keys(run_folder) == EXPECTED


def stage_outputs(run: Path, keys: dict[str, str]) -> dict[str, str]:
    """Where each stage puts the artifact of that key (the name a later run looks for), relative to `run`."""
    f = build(features.Config, "features", {"run": str(run), "train": "tr.h5", "test": "te.h5"})
    s = build(svm.Config, "svm", {"features": str(run / "features-last-k.h5"), "per_class": 10})
    s_eq = build(svm.Config, "svm", {"features": str(run / "features-last-k.h5"), "layer_scale": "equal",
                                     "settings": ("400",)})
    k = build(kmeans.Config, "kmeans", {"train": "tr.h5", "test": "te.h5", "k": 16})
    sup = build(supervised.Config, "supervised", {"train": "tr.h5", "test": "te.h5"})
    sub = build(subset.Config, "subset", {"source": "x/tr.h5", "classes": (3, 5), "per_class": 10, "out_dir": str(run)})
    gen = build(generate.Config, "generate", {"runs": (str(run / "a"),)})
    p = build(pretrain.Config, "pretrain", {"model": "dcgan"})
    paths = {"features": features.STAGE.out(f, keys["features"]), "svm": svm.stage.STAGE.out(s, keys["svm"]),
             "svm-equal": svm.stage.STAGE.out(s_eq, keys["svm"]), "kmeans": kmeans.STAGE.out(k, kmeans.STAGE.key(k)),
             "supervised": supervised.STAGE.out(sup, keys["supervised"]),
             "subset": subset.STAGE.out(sub, keys["subset"]), "generate": generate.STAGE.out(gen, keys["generate"]),
             "pretrain": Path(pretrain.default_run_dir(p, keys["pretrain"]))}
    return {name: str(path).replace(str(run), "<run>") for name, path in paths.items()}


def test_every_stage_writes_where_it_wrote_before(run_folder):
    assert stage_outputs(run_folder, EXPECTED) == EXPECTED_OUTPUTS


# the paths at 7c2de25 for those keys, but for the three stages that build a folder of their own: since
# stop 44 a stage run alone builds where the chain does, build/<preset>/ (build/default/ without a preset;
# before: runs/, and kmeans-16-<key>)
EXPECTED_OUTPUTS = {
    'features': '<run>/features-last-ab5febfd29.h5',
    'generate': '<run>/generated-bb9ca39c01.parquet',
    'kmeans': 'build/default/kmeans-7167ad7ee9/features.h5',
    'pretrain': 'build/default/dcgan-12e1389601',
    'subset': '<run>/subset-tr-c3-5-n10-430a11c338.h5',
    'supervised': 'build/default/supervised-dcgan-16bf6a58d3',
    'svm': '<run>/features-last-k.svm-full+10pc-a037e7604e.json',
    'svm-equal': '<run>/features-last-k.svm-400pc-layers-equal-a037e7604e.json',
}
