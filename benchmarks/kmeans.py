"""Coates's K-means baseline on the shared CIFAR-10 copy: accuracy, stage times, peak memory.

Trains on the first 40,000 train images and scores the last 10,000 (the protocol's validation
slice; the test split is not in ../shared/data), with one L2-SVM fit at Coates's C (100 in the
mean form, so LinearSVC C = 100 / N) on the standardised features. Every stage runs from scratch
(the run folder is removed first); the uint8 image caches are prepared before the clock starts.

    flock /tmp/replearn-heavy.lock .venv/bin/python benchmarks/kmeans.py                # K=1600 -> summary
    flock /tmp/replearn-heavy.lock .venv/bin/python benchmarks/kmeans.py --k 4000 --key k4000

Results are merged into benchmarks/results/kmeans.json under --key.
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from replearn import data, kmeans, svm  # noqa: E402
from replearn.config import build, to_dict  # noqa: E402
from replearn.store import FeatureFile  # noqa: E402
from replearn.utils import atomic_write_json, hardware, provenance  # noqa: E402

SOURCE = "../shared/data/cifar10/train.parquet"
TRAIN, VALIDATION = SOURCE + "[:40000]", SOURCE + "[40000:]"
COATES_C = 100.0            # mean form: 0.5 ||w||^2 + C * mean(hinge^2)
RESULTS = REPO / "benchmarks" / "results" / "kmeans.json"


def peak_memory_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2   # ru_maxrss is KiB on Linux


def fit_and_score(path: Path) -> dict:
    """One fit at Coates's C on the train split, accuracy on the held-out split."""
    t = time.perf_counter()
    with FeatureFile(path) as ff:
        x_train, y_train = ff.read("train"), ff.labels("train")
        x_val, y_val = ff.read("test"), ff.labels("test")
    load = time.perf_counter() - t
    t = time.perf_counter()
    model = svm.fit(x_train, y_train, C=COATES_C / len(x_train))
    fit = time.perf_counter() - t
    return {"accuracy": 100.0 * svm.accuracy(model, x_val, y_val), "svm_seconds": fit,
            "feature_read_seconds": load, "svm_c_sum_form": COATES_C / len(x_train)}


def bench(k: int, precision: str, compile_: bool) -> dict:
    run_dir = REPO / "runs" / f"bench-kmeans-{k}-{precision}"
    shutil.rmtree(run_dir, ignore_errors=True)
    cfg = build(kmeans.Config, "kmeans", {"train": TRAIN, "test": VALIDATION, "k": k, "precision": precision,
                                          "compile": compile_, "out": str(run_dir / "features.h5")})
    started = time.perf_counter()
    path = kmeans.run(cfg)
    with FeatureFile(path) as ff:
        stages = dict(ff.attrs["seconds"])
        empty = int(ff.attrs["empty_clusters"])      # numpy ints from HDF5 attributes are not JSON
        resolved = ff.attrs["precision"]
    scored = fit_and_score(path)
    total = time.perf_counter() - started
    return {"accuracy": round(scored["accuracy"], 2), "total_seconds": round(total, 1),
            "peak_memory_gb": round(peak_memory_gb(), 2), "machine": hardware(),
            "k": k, "precision": resolved, "compile": compile_, "empty_clusters": empty,
            "stage_seconds": {**{s: round(v, 1) for s, v in stages.items()},
                              "svm_fit": round(scored["svm_seconds"], 1),
                              "feature_read": round(scored["feature_read_seconds"], 1)},
            "svm_c": {"mean_form": COATES_C, "sum_form": scored["svm_c_sum_form"]},
            "data": {"train": TRAIN, "evaluated_on": VALIDATION,
                     "note": "train on the first 40,000 CIFAR-10 train images, score the last 10,000 "
                             "(the validation slice); JPEG q75 copy, so ~74% is expected, not 77.9%"},
            "config": to_dict(cfg)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=1600)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "auto"])
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--key", default="summary", help="top-level key of the results JSON")
    args = parser.parse_args()
    data.cached(TRAIN), data.cached(VALIDATION)   # decode JPEGs once, outside the timed pipeline
    result = bench(args.k, args.precision, not args.no_compile)
    print(json.dumps(result, indent=2, default=str))
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results[args.key] = result
    results["provenance"] = provenance()
    atomic_write_json(RESULTS, results)


if __name__ == "__main__":
    main()
