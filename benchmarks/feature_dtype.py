"""Does storing features as float16 change what the SVM scores? One critic's features written both ways,
the same SVM protocol on each; prints JSON, writes benchmarks/results/feature_dtype.json.

    python benchmarks/feature_dtype.py [--run RUN_DIR] [--steps 200]

Without --run, a full-width DCGAN is pretrained for --steps on the shared Tiny ImageNet subset (CPU
minutes), so that its features have a trained critic's scale. Both files come from one extraction
pass each at the features stage's precision rule; only `dtype` differs.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from replearn.train import pretrain
from replearn.probe import features, svm
from replearn.core.config import build
from replearn.core.store import FeatureFile
from replearn.core.utils import atomic_write_json, hardware, provenance

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default="")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--work", default="build/bench-dtype")
    ap.add_argument("--train", default=f"{SHARED}/cifar10/train.parquet[:40000]")
    ap.add_argument("--test", default=f"{SHARED}/cifar10/train.parquet[40000:]")
    ap.add_argument("--rows", type=int, default=12000, help="train rows (seeded subset); test rows = rows / 4")
    args = ap.parse_args()
    work = Path(args.work)
    run = args.run
    if not run:
        cfg = build(pretrain.Config, "pretrain", {"model": "dcgan", "data": f"{SHARED}/tinyimagenet/train.parquet",
                                                  "steps": args.steps, "run_dir": str(work / "dcgan"),
                                                  "ckpt_every": args.steps, "sample_every": args.steps})
        run = str(pretrain.run(cfg))
    out: dict = {"run": run, "hardware": hardware(), "provenance": provenance(), "results": {}}
    for dtype in ("float32", "float16"):
        feat_cfg = build(features.Config, "features", {
            "run": run, "checkpoint": pretrain_last(run), "train": args.train, "test": args.test,
            "train_rows": args.rows, "test_rows": args.rows // 4, "dtype": dtype,
            "out": str(work / f"features-{dtype}.h5")})
        t = time.time()
        path = features.run(feat_cfg)
        with FeatureFile(path) as ff:
            block = next(ff.iter_blocks("train"))[1]
        res_path = svm.run(build(svm.Config, "svm", {"features": str(path), "preset": "cpu", "settings": "full,400",
                                                     "val_size": args.rows // 4, "out": str(work / f"svm-{dtype}.json")}))
        res = json.loads(Path(res_path).read_text())["settings"]
        out["results"][dtype] = {"file_bytes": path.stat().st_size, "seconds": time.time() - t,
                                 "max_abs_feature": float(np.abs(block).max()),
                                 "full_test_acc": res["full"]["test_acc"], "full_c": res["full"]["c"],
                                 "k400_mean": res["400"]["mean"], "k400_ci95": res["400"]["ci95"],
                                 "k400_c": res["400"]["c"], "k400_draws": res["400"]["draws"]}
    a, b = out["results"]["float32"], out["results"]["float16"]
    out["summary"] = {
        "full_delta_points": 100 * (b["full_test_acc"] - a["full_test_acc"]),
        "k400_delta_points": 100 * (b["k400_mean"] - a["k400_mean"]),
        "k400_max_draw_delta_points": 100 * float(np.max(np.abs(np.subtract(b["k400_draws"], a["k400_draws"])))),
        "same_c": a["full_c"] == b["full_c"] and a["k400_c"] == b["k400_c"],
        "file_ratio": b["file_bytes"] / a["file_bytes"]}
    atomic_write_json(Path(__file__).parent / "results" / "feature_dtype.json", out)
    print(json.dumps(out["summary"], indent=1))


def pretrain_last(run: str) -> str:
    from replearn.train import runs
    return runs.interval_checkpoints(run)[-1][1].name


if __name__ == "__main__":
    main()
