"""Feature extraction: replearn's `features` stage end to end (HDF5 included) against the textbook loop.

The textbook loop: float32, contiguous NCHW, a DataLoader over a TensorDataset of normalised
images, per-layer max-pools gathered in Python lists, concatenated and written at the end.
Same critic, same images, same run. Then a linear SVM (same C, 4000 training examples) on
replearn's default features and on its float32 features: `svm_acc_delta_points` is the
difference in accuracy. Against the machine's own ceiling (benchmarks/ceiling.py, measured in the
same run): the FLOPs and unfused aten-op bytes per image of one batch through the critic and the
max-pools, as each loop runs it (FlopCounterMode), times images per second (end to end, HDF5
included), over the matmul rate of the loop's precision. Prints JSON and writes
benchmarks/results/features.json (--quick: 1000 train + 500 test images, features_quick.json).

    python benchmarks/features.py [--images 6000] [--run runs/<trained run>] [--quick]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from replearn.train import pretrain, runs  # noqa: E402
from replearn.probe import features, svm  # noqa: E402
from replearn import data  # noqa: E402
from replearn.core.config import build  # noqa: E402
from replearn.core.store import FeatureFile  # noqa: E402
from replearn.core.utils import atomic_write_json, provenance  # noqa: E402

sys.path.insert(0, str(REPO / "benchmarks"))
import ceiling  # noqa: E402

CIFAR = REPO.parent / "shared" / "data" / "cifar10" / "train.parquet"


def untrained_run(root: Path) -> Path:
    """A run folder holding the paper DCGAN critic at its N(0, 0.02) initialisation (step 0)."""
    cfg = pretrain.resolve(pretrain.Config(model="dcgan", run_dir=str(root / "run"), steps=1))
    state = pretrain.build_state(cfg, torch.device("cpu"))
    info = {"spec": "none (untrained critic)", "num_images": 0, "source_id": "none", "key": "untrained"}
    pretrain.write_run_files(cfg, info, "fp32")
    pretrain.save_checkpoint(state, cfg, info, "fp32", False)
    return root / "run"


@torch.no_grad()
def textbook_features(critic, images_uint8: np.ndarray, batch: int, out: Path) -> float:
    """The usual way: fp32 NCHW, DataLoader, Python lists, one write at the end. Returns seconds."""
    t0 = time.time()
    x = torch.from_numpy(images_uint8).permute(0, 3, 1, 2).float() / 127.5 - 1   # N x 3 x 32 x 32, NCHW
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=batch, shuffle=False)
    critic = critic.to(memory_format=torch.contiguous_format).eval()
    rows = []
    for (xb,) in loader:
        layers = [F.adaptive_max_pool2d(fmap, 4).flatten(1) for _, fmap in critic.features(xb)]
        rows.append(torch.cat(layers, 1).numpy())
    feats = np.concatenate(rows)
    with h5py.File(out, "w") as h5:
        h5.create_dataset("features", data=feats)
    return time.time() - t0


def replearn_features(run_dir: Path, train: str, test: str, out: Path, cache: Path, **over) -> float:
    cfg = build(features.Config, "features", dict(run=str(run_dir), train=train, test=test, out=str(out),
                                                  bn_stats="running", cache_dir=str(cache), **over))
    t0 = time.time()
    features.run(cfg)
    return time.time() - t0


def work_per_image(critic, images_uint8: np.ndarray, precision: str, textbook: bool) -> dict:
    """FLOPs and bytes per image of one batch as each loop computes it: the textbook's fp32 NCHW batch of
    64, or replearn's (`features.extract_batches`: its batch, channels_last, autocast at `precision`)."""
    batch = 64 if textbook else features.Config.batch
    part = images_uint8[:batch]
    if textbook:
        x = torch.from_numpy(part).permute(0, 3, 1, 2).float() / 127.5 - 1                # N x 3 x 32 x 32
        net = critic.to(memory_format=torch.contiguous_format).eval()

        @torch.no_grad()
        def unit():
            return [F.adaptive_max_pool2d(fmap, 4).flatten(1) for _, fmap in net.features(x)]
    else:
        net = critic.to(memory_format=torch.channels_last).eval()

        def unit():
            return list(features.extract_batches(net, part, len(part), torch.device("cpu"), precision, True, 4))
    work = ceiling.count_work(unit)
    return {k: v / len(part) for k, v in work.items()}


def against_ceiling(images_per_second: float, work: dict, precision: str, limits: dict) -> dict:
    return ceiling.fraction(images_per_second * work["flops"], images_per_second * work["bytes"], precision, limits)


def svm_accuracy(path: Path, c: float) -> float:
    with FeatureFile(path) as f:
        model = svm.fit(f.read("train"), f.labels("train"), c)
        return svm.accuracy(model, f.read("test"), f.labels("test"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=6000, help="first N CIFAR-10 train images (4000 train + rest test)")
    ap.add_argument("--run", default="", help="a trained run folder (default: the untrained paper critic)")
    ap.add_argument("--c", type=float, default=1e-3, help="SVM C (LinearSVC sum form)")
    ap.add_argument("--train", type=int, default=4000, help="the first N of --images are the SVM's train split")
    ap.add_argument("--quick", action="store_true", help="--train 1000 --images 1500, small ceiling sizes, "
                                                         "writes features_quick.json")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    if args.quick:
        args.train, args.images = 1000, 1500
    args.out = args.out or str(ceiling.result_path(REPO / "benchmarks" / "results" /
                                                   ("features_quick.json" if args.quick else "features.json")))
    torch.manual_seed(0)
    limits = ceiling.measure(**(ceiling.QUICK if args.quick else {}))      # this machine's, in this run
    cache = REPO / "cache"
    train, test = f"{CIFAR}[:{args.train}]", f"{CIFAR}[{args.train}:{args.images}]"
    sets = [data.cached(spec, cache_dir=str(cache)) for spec in (train, test)]   # decode once, outside timing
    n = sum(len(s) for s in sets)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        run_dir = Path(args.run) if args.run else untrained_run(tmp)
        _, _, critic, _ = runs.load_run(run_dir)
        ref_s = textbook_features(critic, np.concatenate([s.images for s in sets]), 64, tmp / "ref.h5")
        fp32_s = replearn_features(run_dir, train, test, tmp / "fp32.h5", cache, precision="fp32")
        fast_s = replearn_features(run_dir, train, test, tmp / "fast.h5", cache)
        acc_fast, acc_fp32 = svm_accuracy(tmp / "fast.h5", args.c), svm_accuracy(tmp / "fp32.h5", args.c)
        with FeatureFile(tmp / "fast.h5") as f:
            precision = f.attrs["precision"]
        some = sets[0].images
        work = {"textbook": work_per_image(critic, some, "fp32", True),
                "replearn_fp32": work_per_image(critic, some, "fp32", False),
                "replearn_default": work_per_image(critic, some, precision, False)}
    rates = {"textbook": n / ref_s, "replearn_fp32": n / fp32_s, "replearn_default": n / fast_s}
    precisions = {"textbook": "fp32", "replearn_fp32": "fp32", "replearn_default": precision}
    against = {k: against_ceiling(rates[k], work[k], precisions[k], limits) for k in rates}
    result = {
        "summary": {"images_per_second": n / fast_s, "speedup_vs_reference": ref_s / fast_s,
                    "svm_acc_delta_points": 100 * (acc_fast - acc_fp32), "machine": provenance()["hardware"],
                    "fraction_of_ceiling": against["replearn_default"]["fraction_of_ceiling"],
                    "verdict": against["replearn_default"]["verdict"],
                    "fraction_of_ceiling_per_loop": {k: v["fraction_of_ceiling"] for k, v in against.items()},
                    "gflop_per_image": work["replearn_default"]["flops"] / 1e9,
                    "ceiling": ceiling.summary(limits)},
        "work_per_image": work, "against_ceiling": against, "ceiling": limits, "quick": args.quick,
        "default_precision": precision, "images": n, "seconds": {"textbook": ref_s, "replearn_fp32": fp32_s,
                                                                  "replearn_default": fast_s},
        "images_per_second": {"textbook": n / ref_s, "replearn_fp32": n / fp32_s, "replearn_default": n / fast_s},
        "speedup_fp32_vs_reference": ref_s / fp32_s,
        "svm": {"C": args.c, "train": args.train, "test": len(sets[1]), "acc_default": acc_fast, "acc_fp32": acc_fp32},
        "critic": args.run or "untrained paper DCGAN critic (N(0, 0.02) init)",
        "provenance": provenance(),
    }
    atomic_write_json(args.out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
