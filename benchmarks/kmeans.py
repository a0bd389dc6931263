"""Coates's K-means baseline on the shared CIFAR-10 copy: accuracy, stage times, peak memory.

Trains on the first 40,000 train images and scores the last 10,000 (the protocol's validation
slice; the test split is not in ../shared/data), with one L2-SVM fit at Coates's C (100 in the
mean form, so LinearSVC C = 100 / N) on the standardised features. Every stage runs from scratch
(the run folder is removed first); the uint8 image caches are prepared before the clock starts.

    flock /tmp/replearn-heavy.lock .venv/bin/python benchmarks/kmeans.py                # K=1600 -> summary
    flock /tmp/replearn-heavy.lock .venv/bin/python benchmarks/kmeans.py --k 4000 --key k4000
    flock /tmp/replearn-heavy.lock .venv/bin/python benchmarks/kmeans.py --seed 1 --key seed1   # -> seed_spread

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


def learning_curve(path: Path, sizes=(10_000, 20_000, 30_000)) -> dict:
    """Accuracy on the validation slice when the SVM sees only n random training images (patches,
    centroids and standardisation still from all 40,000): how much one more 10,000 labels is worth.
    Random, not the first n: the cached split's rows are in the parquet's class-sorted order."""
    with FeatureFile(path) as ff:
        x_train, y_train = ff.read("train"), ff.labels("train")
        x_val, y_val = ff.read("test"), ff.labels("test")
    out, order = {}, np.random.default_rng(0).permutation(len(y_train))
    for n in sizes:
        rows = np.sort(order[:n])
        model = svm.fit(x_train[rows], y_train[rows], C=COATES_C / n)
        out[str(n)] = round(100.0 * svm.accuracy(model, x_val, y_val), 2)
    return out


def seed_spread(results: dict) -> dict:
    """Accuracy of every recorded K=1600 fp32 run by its K-means seed (patch sampling and centroid init)."""
    runs = {str(r["config"]["seed"]): r["accuracy"] for r in results.values()
            if isinstance(r, dict) and r.get("k") == 1600 and r.get("precision") == "fp32" and "config" in r}
    acc = np.array(list(runs.values()))
    return {"accuracy_by_seed": runs, "mean": round(float(acc.mean()), 2),
            "std": round(float(acc.std(ddof=1)), 2) if len(acc) > 1 else None}


def bench(k: int, precision: str, compile_: bool, seed: int = 0) -> dict:
    run_dir = REPO / "runs" / (f"bench-kmeans-{k}-{precision}" + ("" if seed == 0 else f"-seed{seed}"))
    shutil.rmtree(run_dir, ignore_errors=True)
    cfg = build(kmeans.Config, "kmeans", {"train": TRAIN, "test": VALIDATION, "k": k, "precision": precision,
                                          "compile": compile_, "seed": seed, "out": str(run_dir / "features.h5")})
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
    parser.add_argument("--seed", type=int, default=0, help="K-means seed (patch sampling, centroid init)")
    parser.add_argument("--learning-curve", action="store_true", help="also fit on 10k, 20k, 30k training images")
    parser.add_argument("--key", default="summary", help="top-level key of the results JSON")
    parser.add_argument("--reuse", action="store_true", help="keep the recorded run under --key; only add "
                                                                 "what --learning-curve asks for")
    args = parser.parse_args()
    data.cached(TRAIN), data.cached(VALIDATION)   # decode JPEGs once, outside the timed pipeline
    recorded = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    if args.reuse:
        result = recorded[args.key]
    else:
        result = bench(args.k, args.precision, not args.no_compile, args.seed)
        result["measured"] = provenance()   # per key: the file-level provenance is only the last write's
    if args.learning_curve:
        result["learning_curve"] = {**learning_curve(Path(result["config"]["out"])), "40000": result["accuracy"]}
    print(json.dumps(result, indent=2, default=str))
    results = {**recorded, args.key: result}
    results["seed_spread"] = seed_spread(results)
    results["provenance"] = provenance()
    atomic_write_json(RESULTS, results)


if __name__ == "__main__":
    main()
