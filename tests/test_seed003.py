"""Seed 003's schedule (issue #19): FID every N generator steps, sample grids every 200, the FID curve in
the run's report; without local Inception weights each evaluation says so in one line and skips FID only."""
from __future__ import annotations

import json

import numpy as np

from conftest import random_images
from replearn.train import pretrain
from replearn.core.config import build
from replearn.core.store import write_image_cache


def test_the_seed003_preset_is_the_seeds_schedule():
    cfg = build(pretrain.Config, "pretrain", {"preset": "seed003"})
    assert (cfg.steps, cfg.sample_every, cfg.ckpt_every, cfg.fid_every) == (30000, 200, 10000, 2500)


def test_fid_every_n_steps_without_weights_skips_fid_in_one_line_and_reports(tmp_path, capsys):
    cache = write_image_cache(tmp_path / "grey.h5", random_images(32, size=28), np.full(32, -1), [], {})
    cfg = build(pretrain.Config, "pretrain", {
        "preset": "tiny", "data": str(cache), "image_size": 28, "channels": 1, "steps": 2, "fid_every": 1,
        "width": 0.125, "batch_size": 8, "precision": "fp32", "run_dir": str(tmp_path / "run"),
        "cache_dir": str(tmp_path / "cache"), "inception_weights": str(tmp_path / "missing.pth")})
    run_dir = pretrain.run(cfg)
    records = json.loads((run_dir / "evaluate.json").read_text())["records"]
    assert [r["step"] for r in records] == [1, 2]                  # every fid_every steps, checkpointed there
    assert all(r["fid"] is None and "missing.pth" in r["fid_unavailable"] for r in records)
    notices = [line for line in capsys.readouterr().out.splitlines() if "Inception weights not found" in line]
    assert len(notices) == 2                                          # one line per evaluation
    report = (run_dir / "report.md").read_text()
    assert "FID unavailable" in report and "metrics_vs_step.png" in report
    assert (run_dir / "metrics_vs_step.png").exists()
