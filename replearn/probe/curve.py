"""The pretraining curve: linear-probe accuracy of a run's interval checkpoints against the step.

    python -m replearn curve run=build/<preset>/dcgan-<key> train=... test=...

Every `ckpt_<step>.pt` of the run (step 0, the untrained critic, included; pretraining keeps them at
log-spaced steps) goes through the same features stage and a cheap fixed SVM protocol: 400 per
class over a few draws, C bracketed (it never stops at a grid edge). The features may be taken on a
seeded subset of the splits (`train_rows`, `test_rows`) to keep the cost per point low. Writes
`<run>/curve-<key>.json` (one point per checkpoint) and `.png` (accuracy against step, with the
step-0 control as a line); points are reused by key, so a rerun after more pretraining only scores
the new checkpoints.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..train import runs
from . import features, svm
from ..core.config import ConfigError, build, register_preset, split_overrides, to_dict
from ..core.stage import Stage, artifact_key, record
from ..core.utils import atomic_path, atomic_write_json


@dataclass(frozen=True)
class Config:
    run: str = ""       # a pretrain run folder (build/<preset>/<model>-<key>)
    train: str = "hf:uoft-cs/cifar10:train"
    test: str = "hf:uoft-cs/cifar10:test"
    train_rows: int = 20000       # seeded subset of train for each point (0 = all): 10k validation + draws
    test_rows: int = 10000        # seeded subset of test (0 = all)
    per_class: int = 400          # the 400-per-class setting
    select_draws: int = 3         # draws scoring each C (the paper: 10); few, the curve wants its shape
    final_draws: int = 5          # draws for each point's mean +- 1.96 std (the paper: 100)
    val_size: int = 10000         # validation held out of train, as the protocol
    steps: tuple[int, ...] = ()   # checkpoints to score (and always the last); empty = every interval checkpoint
    through: int = 0              # only checkpoints up to this step (its last is then the "last"); 0 = all.
                                  # A study measuring every GAN at the same step uses it on runs trained further
    features_args: str = ""       # extra key=value words for the features stage (e.g. 'precision=fp32')
    svm_args: str = ""            # extra key=value words for the svm stage
    # false: a point's feature file is deleted once its SVM result is written (a point is reused by that
    # result's key): 12 points x 30k rows x 28672 dims would otherwise keep ~20 GB in float16
    keep_features: bool = False
    cache_dir: str = "cache"
    device: str = "auto"
    preset: str = ""


register_preset("paper", "curve")
# cpu: 4 of the run's 12 log-spaced checkpoints, a decade apart where the critic still learns: the shape
# (flat to ~50 steps, rising from 500) at 4 x ~4 min a point on 2 AVX2 cores. The 7-point curves of the
# table at 71c2efe (0, 10, 50, 200, 500, 1000, 2000) are in benchmarks/results/notes.md
register_preset("cpu", "curve", steps=(0, 50, 500, 2000))
register_preset("smoke", "curve", train_rows=15000, test_rows=5000, final_draws=3)
register_preset("tiny", "curve", train_rows=5000, test_rows=2000, per_class=50, val_size=500, select_draws=2, final_draws=3)


def stage_configs(cfg: Config, checkpoint: str) -> tuple[features.Config, dict]:
    feat = build(features.Config, "features", {
        "preset": cfg.preset or "", "run": cfg.run, "checkpoint": checkpoint, "train": cfg.train, "test": cfg.test,
        "train_rows": cfg.train_rows, "test_rows": cfg.test_rows, "cache_dir": cfg.cache_dir, "device": cfg.device,
        **split_overrides(cfg.features_args.split())})
    svm_values = {"preset": cfg.preset or "", "settings": "400", "per_class": cfg.per_class,
                  "select_draws": cfg.select_draws, "final_draws": cfg.final_draws, "val_size": cfg.val_size,
                  "device": cfg.device, **split_overrides(cfg.svm_args.split())}
    return feat, svm_values


def score_checkpoint(cfg: Config, step: int, checkpoint: str) -> dict[str, Any]:
    feat_cfg, svm_values = stage_configs(cfg, checkpoint)
    feat_path, feat_key = features.plan(feat_cfg)
    svm_cfg = build(svm.Config, "svm", {**svm_values, "features": str(feat_path)})
    reused = svm.finished_results([svm_cfg], feat_key)          # reused without extracting features
    if reused:
        result_path = reused[0]
    else:
        features.run(feat_cfg)
        result_path = svm.run(svm_cfg)
    if not cfg.keep_features:
        feat_path.unlink(missing_ok=True)
    res = json.loads(Path(result_path).read_text())
    k400 = res["settings"]["400"]
    feat_seconds = float((res.get("features") or {}).get("attrs", {}).get("seconds") or 0)
    return {"step": step, "checkpoint": checkpoint, "mean": k400["mean"], "ci95": k400["ci95"], "c": k400["c"],
            "c_at_edge": bool(k400.get("c_at_edge", False)), "draws": len(k400["draws"]),
            "per_class": res["config"]["per_class"], "seconds": feat_seconds + svm.stage.fitted_seconds(res, "400"),
            "features": str(feat_path), "results": str(result_path)}


def curve_key(cfg: Config) -> str:
    return artifact_key("curve", to_dict(cfg), ignore=("run", "device", "cache_dir", "steps", "through",
                                                                      "keep_features"),
                             run=runs.run_key(cfg.run))


def plot_curve(points: list[dict], title: str, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    steps = [p["step"] for p in points]
    means = [100 * p["mean"] for p in points]
    errs = [100 * p["ci95"] for p in points]
    ax.errorbar(steps, means, yerr=errs, marker="o", capsize=3, label="critic at step")
    control = [p for p in points if p["step"] == 0]
    if control:
        ax.axhline(100 * control[0]["mean"], color="grey", linestyle="--", label="untrained control (step 0)")
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlim(left=0)
    ax.set_xlabel("pretraining step (generator updates)")
    per_class = points[0].get("per_class", 400) if points else 400
    ax.set_ylabel(f"{per_class} per class: test accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def write_curve(cfg: Config, run_dir: Path, key: str, points: list[dict], out: Path) -> None:
    gain = 100 * (points[-1]["mean"] - points[0]["mean"]) if points[0]["step"] == 0 else None
    atomic_write_json(out, record(cfg, key, run=str(run_dir), run_key=runs.run_key(run_dir), points=points,
                                  gain_points=gain))


def run(cfg: Config) -> Path:
    """Score every interval checkpoint of a run with a cheap 400-per-class protocol -> curve JSON + PNG."""
    return STAGE.run(cfg)


def chosen_checkpoints(cfg: Config) -> list[tuple[int, Path]]:
    """(step, path) of each checkpoint to score; the run's last is always scored: the curve's end point is
    the table row's critic."""
    found = [(s, p) for s, p in runs.recorded_checkpoints(Path(cfg.run)) if not cfg.through or s <= cfg.through]
    if not found:
        raise ConfigError(f"no ckpt_*.pt in {cfg.run}: run `replearn pretrain` first (it keeps log-spaced ones)")
    return [(s, p) for s, p in found if not cfg.steps or s in cfg.steps or s == found[-1][0]]


def is_current(cfg: Config, out: Path, key: str) -> bool:
    """A curve of this key with a point for every chosen checkpoint."""
    done = runs.read_json(out) or {}
    return done.get("key") == key and [p["step"] for p in done.get("points", [])] == \
        [s for s, _ in chosen_checkpoints(cfg)] and all("per_class" in p for p in done["points"])


def score_run(cfg: Config, out: Path, key: str) -> Path:
    """Score each chosen checkpoint, rewriting the curve after each (the caller holds its lock)."""
    run_dir = Path(cfg.run)
    model = runs.run_record(run_dir).get("config", {}).get("model", run_dir.name)
    points: list[dict] = []
    for step, path in chosen_checkpoints(cfg):   # each point's features and SVM results are reused by key
        points.append(score_checkpoint(cfg, step, path.name))
        write_curve(cfg, run_dir, key, points, out)   # a killed curve keeps the points it has
        plot_curve(points, f"{model}: linear probe vs pretraining ({cfg.per_class}/class, {cfg.final_draws} draws)",
                   out.with_suffix(".png"))
    print(f"curve: {len(points)} checkpoints -> {out}")
    return out


__all__ = ["Config", "run"]


# one process per curve; its features and SVM results lock their own files
STAGE = Stage("curve", key=curve_key, out=lambda cfg, key: Path(cfg.run) / f"curve-{key}.json", finished=is_current,
              build=score_run)
