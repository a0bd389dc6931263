"""Coates's K-means baseline on the shared CIFAR-10 copy: accuracy, stage times, peak memory.

Trains on the first 40,000 train images and scores the last 10,000 (the protocol's validation
slice; the test split is not in ../shared/data), with one L2-SVM fit at Coates's C (100 in the
mean form, so LinearSVC C = 100 / N) on the standardised features. Every stage runs from scratch
(the run folder is removed first); the uint8 image caches are prepared before the clock starts.

    flock /tmp/replearn-heavy.lock .venv/bin/python benchmarks/kmeans.py                # K=1600 -> summary
    flock /tmp/replearn-heavy.lock .venv/bin/python benchmarks/kmeans.py --k 4000 --key k4000
    flock /tmp/replearn-heavy.lock .venv/bin/python benchmarks/kmeans.py --seed 1 --key seed1   # -> seed_spread

Results are merged into benchmarks/results/kmeans.json under --key.

Against the machine's own ceiling (benchmarks/ceiling.py, measured in the same run), under `ceiling`:
  lloyd     one assignment pass over the patches (FLOPs counted by FlopCounterMode on a 1-iteration call
            of `kmeans.kmeans` at the run's shapes), at the stage's seconds per iteration
  encoding  one encoder step (cfg.batch images; counted eagerly), at the steady-state rate of the run's
            encoder (compiled as configured, warmed up, then timed) and at the stage's end-to-end rate
            (compilation and HDF5 writes included)
The SVM fit is not counted here (benchmarks/svm.py covers the solver's units).
    flock /tmp/replearn-heavy.lock .venv/bin/python benchmarks/kmeans.py --quick    # ~1 min -> kmeans_quick.json
--quick: 1000 train / 500 held-out images, 50,000 patches, 10 iterations, small ceiling sizes (compiled as
usual: eagerly the encoder ran at ~20 images/s, 2 minutes for these 1500 images).
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
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from replearn.probe import kmeans, svm  # noqa: E402
from replearn import data  # noqa: E402
from replearn.core.config import build, to_dict  # noqa: E402
from replearn.core.store import FeatureFile  # noqa: E402
from replearn.core.utils import atomic_write_json, hardware, provenance  # noqa: E402

sys.path.insert(0, str(REPO / "benchmarks"))
import ceiling  # noqa: E402

SOURCE = "../shared/data/cifar10/train.parquet"
TRAIN, VALIDATION = SOURCE + "[:40000]", SOURCE + "[40000:]"
COATES_C = 100.0            # mean form: 0.5 ||w||^2 + C * mean(hinge^2)
RESULTS = ceiling.result_path(REPO / "benchmarks" / "results" / "kmeans.json")


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


def lloyd_work(cfg: kmeans.Config, precision: str) -> dict:
    """FLOPs and bytes of one Lloyd iteration over cfg.patches whitened patches (values do not matter)."""
    dims = cfg.patch_size ** 2 * cfg.channels
    x = torch.randn(cfg.patches, dims, generator=torch.Generator().manual_seed(0))
    return ceiling.count_work(lambda: kmeans.kmeans(x, cfg.k, 1, cfg.seed, cfg.kmeans_batch, precision, progress=False))


def encoder_for(path: Path, cfg: kmeans.Config, precision: str, compile_: bool) -> kmeans.Encoder:
    state = torch.load(path.with_name("centroids.pt"), map_location="cpu", weights_only=True)
    run_cfg = build(kmeans.Config, "kmeans", {**to_dict(cfg), "compile": compile_})
    return kmeans.Encoder(state["centroids"], state["mean"], state["whiten"], run_cfg, cfg.image_size, precision)


def encoding_steady(path: Path, cfg: kmeans.Config, precision: str, images: np.ndarray, steps: int = 32) -> dict:
    """The run's encoder at steady state: images per second over `steps` steps after as many warm-up steps,
    and one step's FLOPs and bytes per image (counted eagerly: FlopCounterMode does not see into compiled code)."""
    batch = torch.from_numpy(np.ascontiguousarray(images[:cfg.batch]))
    fast = encoder_for(path, cfg, precision, cfg.compile)
    with torch.inference_mode():
        seconds = ceiling.best_seconds(lambda: [fast.safe_step(batch) for _ in range(steps)], 1, warmup=1)
        work = ceiling.count_work(lambda: encoder_for(path, cfg, precision, False).step(batch))
    return {"images_per_second": steps * cfg.batch / seconds, "work_per_image": {k: v / cfg.batch for k, v in work.items()}}


def against_ceiling(path: Path, cfg: kmeans.Config, precision: str, stages: dict, n_images: int,
                    images: np.ndarray, limits: dict) -> dict:
    lloyd = lloyd_work(cfg, precision)
    per_iteration = stages["kmeans"] / cfg.iterations
    steady = encoding_steady(path, cfg, precision, images)
    work = steady["work_per_image"]
    end_to_end = n_images / stages["encoding"]
    return {"lloyd": {"work_per_iteration": lloyd, "seconds_per_iteration": per_iteration,
                      **ceiling.fraction(lloyd["flops"] / per_iteration, lloyd["bytes"] / per_iteration, precision, limits)},
            "encoding": {**steady, **ceiling.fraction(steady["images_per_second"] * work["flops"],
                                                      steady["images_per_second"] * work["bytes"], precision, limits),
                         "end_to_end_images_per_second": end_to_end,
                         "end_to_end": ceiling.fraction(end_to_end * work["flops"], end_to_end * work["bytes"],
                                                        precision, limits)}}


def bench(k: int, precision: str, compile_: bool, seed: int = 0, limits: dict | None = None, **over) -> dict:
    run_dir = REPO / "runs" / (f"bench-kmeans-{k}-{precision}" + ("" if seed == 0 else f"-seed{seed}")
                               + ("-quick" if over else ""))
    shutil.rmtree(run_dir, ignore_errors=True)
    cfg = build(kmeans.Config, "kmeans", {"train": TRAIN, "test": VALIDATION, "k": k, "precision": precision,
                                          "compile": compile_, "seed": seed, "out": str(run_dir / "features.h5"),
                                          **over})
    started = time.perf_counter()
    path = kmeans.run(cfg)
    with FeatureFile(path) as ff:
        stages = dict(ff.attrs["seconds"])
        empty = int(ff.attrs["empty_clusters"])      # numpy ints from HDF5 attributes are not JSON
        resolved = ff.attrs["precision"]
    scored = fit_and_score(path)
    total = time.perf_counter() - started
    extra = {}
    if limits is not None:
        n_images = sum(len(data.cached(s)) for s in (cfg.train, cfg.test))
        limit = against_ceiling(path, cfg, resolved, stages, n_images, data.cached(cfg.train).images, limits)
        extra = {"ceiling": limit, "fraction_of_ceiling": {k: limit[k]["fraction_of_ceiling"] for k in limit},
                 "verdict": {k: limit[k]["verdict"] for k in limit}}
    return {**extra, "accuracy": round(scored["accuracy"], 2), "total_seconds": round(total, 1),
            "peak_memory_gb": round(peak_memory_gb(), 2), "machine": hardware(),
            "k": k, "precision": resolved, "compile": compile_, "empty_clusters": empty,
            "stage_seconds": {**{s: round(v, 1) for s, v in stages.items()},
                              "svm_fit": round(scored["svm_seconds"], 1),
                              "feature_read": round(scored["feature_read_seconds"], 1)},
            "svm_c": {"mean_form": COATES_C, "sum_form": scored["svm_c_sum_form"]},
            "data": {"train": cfg.train, "evaluated_on": cfg.test,
                     "note": "train on the first 40,000 CIFAR-10 train images, score the last 10,000 "
                             "(the validation slice); JPEG q75 copy, so ~74% is expected, not 77.9%" if not over else
                             "--quick: a small slice, for the ceiling check only; its accuracy means nothing"},
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
    parser.add_argument("--quick", action="store_true", help="a small run (see the module docstring): kmeans_quick.json")
    args = parser.parse_args()
    over = dict(train=SOURCE + "[:1000]", test=SOURCE + "[40000:40500]", patches=50_000, iterations=10) if args.quick else {}
    results_path = ceiling.result_path(RESULTS.with_name("kmeans_quick.json")) if args.quick else RESULTS
    data.cached(over.get("train", TRAIN)), data.cached(over.get("test", VALIDATION))   # decode once, outside the timing
    recorded = json.loads(results_path.read_text()) if results_path.exists() else {}
    if args.reuse:
        result = recorded[args.key]
    else:
        limits = ceiling.measure(**(ceiling.QUICK if args.quick else {}))     # this machine's, in this run
        result = bench(args.k, args.precision, not args.no_compile, args.seed, limits, **over)
        result["ceiling_measured"] = limits
        result["measured"] = provenance()   # per key: the file-level provenance is only the last write's
    if args.learning_curve:
        result["learning_curve"] = {**learning_curve(Path(result["config"]["out"])), "40000": result["accuracy"]}
    print(json.dumps(result, indent=2, default=str))
    results = {**recorded, args.key: result}
    if not args.quick:
        results["seed_spread"] = seed_spread(results)
    results["provenance"] = provenance()
    atomic_write_json(results_path, results)


if __name__ == "__main__":
    main()
