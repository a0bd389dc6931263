"""Benchmark the L2-SVM stage: replearn's solver against scikit-learn's LinearSVC on real features.

Features: CIFAR-10 train images (../shared/data/cifar10/train.parquet, 50k) through an UNTRAINED
DCGAN critic (`zoo.build_models('dcgan')`, eval mode, 4x4 max-pooled layers -> 28672 dims),
cached as a float16 feature file under cache/ (gitignored) so reruns skip extraction.
The parquet's first 40k images form the feature file's `train` split, the last 10k its `test` split.

Measured, in one run on one machine:
  * 4000 x 28672 (a class-balanced draw), every C of dcgan_code's grid, each fitted cold by both:
    replearn vs LinearSVC -> time, test accuracy, objective (both evaluated by the same float64 code);
    the headline speedup is LinearSVC's time summed over the grid against replearn's warm-started
    path over the same grid (the work one selection draw of the protocol needs), cold fits beside it;
  * 40000 x 28672 at LARGE_C (--large-features: a trained critic's file, where CG dominates the fit):
    replearn, its Hessian products in bf16 where the CPU has bf16 units, against the same fit with
    float32 Hessian products;
  * the whole 400-per-class protocol (7 C x 10 selection draws + 100 final draws) via `svm.run`.
Writes benchmarks/results/svm.json; every part records the commit and machine it ran on ('measured'),
and --parts reruns some of them, keeping the others' records.
  * preconditioner (--large-features: a trained critic's file): one primal fit at a full-setting-sized C,
    once with the shared preconditioner and once with one per class: seconds and CG iterations of each.
  * ceiling: the solver's units of work against this machine's own ceiling (benchmarks/ceiling.py, measured
    in the same run): the Gram matrix of a 4000-row draw, one CG Hessian product in Gram space (4000 x 4000
    factor) and in the primal (40,000 x 28672, float32 and the bf16 copy), and one whole cold fit at BENCH_C on
    the draw; FLOPs counted by FlopCounterMode (it sees every product; the Cholesky factorisation and
    triangular solves are not in its registry, so a fit's count leaves them out), bytes of a CG product
    analytic (what a pass reads of the design, read twice: all of it, or the Gram factor's lower blocks), of the rest the unfused aten-op count.
Usage: python benchmarks/svm.py [--parts compare,large,protocol,preconditioner,ceiling] [--large-features PATH] [--skip-liblinear]
--quick: only the ceiling part, on 4000 real CIFAR-10 images through the untrained critic (the protocol's draw
size; the primal product on those rows tiled to 8000: its speed does not depend on the values), writes
svm_quick.json; about half a minute.

--full-setting --features PATH [--presearch ROWS] [--no-refine]: only the full setting, on all train rows of a
feature file (meant for a TRAINED critic's file: 50000 x 28672 at CIFAR scale). `full_setting_seconds`
is `svm.search.run_full` (bracketed C search on train-minus-val, then the refit on all of train); beside it
the exhaustive search over the same bracket: every C the search scored (on the subsample too, with
--presearch) fitted on all train-minus-val rows as one warm-started path and scored, then the refit;
its fits all stop at svm.solver.TOL, where the search's selection fits stop at --select-stop (default liblinear).
Records whether both choose the same C and each one's test accuracy, under `full_setting` in the
results JSON (other keys kept). Feature loading is timed apart. `machine_ceiling` is measured in the same
run (float32 GEMM rate, a textbook CG pass over X, one read of X), so that runs on different CPU kinds compare:
`full_setting_passes` = full_setting_seconds / pass_seconds. --reuse-exhaustive keeps an earlier
exhaustive record of the same feature file and grid (it took an hour on 2 cores) and says so.
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from replearn.core import store  # noqa: E402
from replearn.models import nets, zoo  # noqa: E402
from replearn.probe import svm  # noqa: E402
from replearn import data  # noqa: E402
from replearn.core.config import build  # noqa: E402
from replearn.core.utils import atomic_write_json, autocast, bf16_supported, hardware, provenance, resolve_precision  # noqa: E402

sys.path.insert(0, str(REPO / "benchmarks"))
import ceiling  # noqa: E402

PARQUET = REPO.parent / "shared" / "data" / "cifar10" / "train.parquet"
FEATURES = REPO / "cache" / "bench_svm_dcgan_untrained.h5"
RESULTS = ceiling.result_path(REPO / "benchmarks" / "results" / "svm.json")
N_TRAIN = 40000          # the rest (10k) is the test split
BENCH_C = 1e-4           # the single-C comparison of earlier runs (LinearSVC's fastest C of the grid)
# the 40k-row fit: at 1e-4 one warm-started fit on trained features took 1,519 CG iterations (15 min),
# 1e-5 a few hundred: large enough to exercise CG, small enough to time both Hessians in one run
LARGE_C = 1e-5
PARTS = ("compare", "large", "protocol", "preconditioner", "ceiling")


def load_images() -> tuple[np.ndarray, np.ndarray]:
    """N x 32 x 32 x 3 uint8 and labels, through replearn.data when it exists."""
    try:
        from replearn import data
        images = data.cached(f"{PARQUET}", size=32, cache_dir=str(REPO / "cache"))
        return images.images, np.asarray(images.labels)
    except (ImportError, AttributeError):
        pass
    import pyarrow.parquet as pq
    from PIL import Image
    table = pq.read_table(PARQUET).to_pydict()
    images = np.stack([np.asarray(Image.open(io.BytesIO(cell["bytes"])).convert("RGB")) for cell in table["img"]])
    return images, np.asarray(table["label"], dtype=np.int64)


@torch.no_grad()
def extract_features(path: Path = FEATURES, batch: int = 500) -> Path:
    if path.exists():
        return path
    images, labels = load_images()
    torch.manual_seed(0)
    _, critic = zoo.build_models("dcgan")
    critic.eval()
    device = torch.device("cpu")
    # bf16 only where the CPU has bf16 units: emulated (AVX2) it ran at ~20 images/s against 225-260 in float32
    precision = resolve_precision("auto", device)
    attrs = {"kind": "gan", "model": "dcgan (untrained, seed 0)", "precision": precision,
             "config": {"source": str(PARQUET)}}
    # the parquet is sorted by label: a seeded permutation makes both splits hold every class
    order = np.random.default_rng(0).permutation(len(images))
    with store.FeatureWriter(path, critic.feature_layers(), attrs, dtype="float16") as writer:
        for split, rows in (("train", order[:N_TRAIN]), ("test", order[N_TRAIN:])):
            writer.create_split(split, len(rows), source=f"{PARQUET} permuted (seed 0) [{split}]")
            for start in range(0, len(rows), batch):
                picked = rows[start:start + batch]
                x = nets.to_unit(torch.from_numpy(images[picked]), device)
                with autocast(device, precision):
                    feats = nets.pooled_features(critic, x)   # B x 28672
                writer.write(split, start, feats.float().numpy(), labels[picked])
                print(f"\rfeatures {split} {start + len(picked)}/{len(rows)}", end="", file=sys.stderr)
    print(file=sys.stderr)
    return path


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def compare_at_4000(ff: store.FeatureFile, X_test: np.ndarray, y_test: np.ndarray, skip_liblinear: bool,
                    old: dict) -> dict:
    """replearn vs LinearSVC on one class-balanced 4000 x 28672 draw: every C of the protocol's grid,
    each fitted cold by both (same C, same data), plus replearn's warm-started path over the grid."""
    labels = ff.labels("train")
    idx = svm.protocol.balanced_draw(labels, 400, np.random.default_rng(0))
    X, y = ff.read("train", idx), labels[idx]
    per_c = {}
    for C in svm.protocol.DEFAULT_C_GRID:
        ours, t_ours = timed(svm.fit, X, y, C)
        row = {"replearn_seconds": t_ours, "replearn_test_acc": svm.accuracy(ours, X_test, y_test),
               "replearn_objective": ours.objective(X, y, C)}
        if skip_liblinear:   # keep the reference numbers of an earlier run
            row.update({k: v for k, v in old.get("per_c", {}).get(repr(C), {}).items() if k.startswith("liblinear")})
        else:
            # LinearSVC's defaults (tol=1e-4, max_iter=1000, dual CD since N < D); whether it stopped
            # at max_iter is recorded (its time is then a lower bound, its objective above the optimum)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", ConvergenceWarning)
                ref, t_ref = timed(svm.fit_liblinear, X, y, C, tol=1e-4, max_iter=1000)
            row.update(liblinear_seconds=t_ref, liblinear_test_acc=svm.accuracy(ref, X_test, y_test),
                       liblinear_objective=ref.objective(X, y, C),
                       liblinear_converged=not any(issubclass(w.category, ConvergenceWarning) for w in caught))
        per_c[repr(C)] = row
        print(json.dumps({"C": C, **row}), file=sys.stderr)
    path, t_path = timed(svm.fit_path, X, y, svm.protocol.DEFAULT_C_GRID)
    return {"n": len(X), "d": X.shape[1], "per_c": per_c, "replearn_c_path_seconds": t_path,
            "replearn_c_path_test_acc": {repr(c): svm.accuracy(m, X_test, y_test)
                                         for c, m in zip(svm.protocol.DEFAULT_C_GRID, path)}}


def large_40000(path: Path, C: float) -> dict:
    """One cold fit on 40000 train rows of `path` (a seeded subset when it has more) at C, twice on the same data: as the solver
    runs (CG's Hessian products on a bfloat16 copy where the CPU has bf16 units) and with float32 Hessian
    products (the reference); the ratio is bf16_hessian_speedup. Both stop at the same float32 gradient
    rule. Meant for a TRAINED critic's file: untrained features at 1e-5 need a handful of CG steps, so
    the products barely count there (measured: 26 s either way)."""
    with store.FeatureFile(path) as ff:
        # a seeded subset, not the first rows: a features-stage file keeps the parquet's order (by label)
        n = ff.num_rows("train")
        rows = np.sort(np.random.default_rng(0).permutation(n)[:N_TRAIN]) if n > N_TRAIN else np.arange(n)
        X, y = ff.read("train", rows), ff.labels("train")[rows]     # 40000 x 28672 float32, 4.6 GB
        X_test, y_test = ff.read("test"), ff.labels("test")
        row = {"features": str(path), "model": ff.attrs.get("model"), "checkpoint_step": ff.attrs.get("checkpoint_step"),
               "n": len(X), "d": X.shape[1], "C": C}
    for name, min_elements in (("replearn", svm.design.BF16_HESSIAN_MIN_ELEMENTS), ("float32_hessian", 1 << 62)):
        default, svm.design.BF16_HESSIAN_MIN_ELEMENTS = svm.design.BF16_HESSIAN_MIN_ELEMENTS, min_elements
        try:
            model, seconds = timed(svm.fit, X, y, C)
        finally:
            svm.design.BF16_HESSIAN_MIN_ELEMENTS = default
        row.update({f"{name}_seconds": seconds, f"{name}_test_acc": svm.accuracy(model, X_test, y_test),
                    f"{name}_objective": model.objective(X, y, C), f"{name}_solver": model.info})
        print(json.dumps({name: row[f"{name}_seconds"], **model.info}), file=sys.stderr)
    row["bf16_hessian_speedup"] = row["float32_hessian_seconds"] / row["replearn_seconds"]
    return row


def preconditioners(path: Path, c_norm: float, rows: int, hessian_rows: int) -> dict:
    """One cold fit, forced into the primal (products with the N x 28672 design, as every fit on 40-50k rows
    is), at the same C and on the same rows, with each preconditioner: 'shared' (one I + mu S for every
    class, the default) and 'class' (exact per class on the sketch's span). C = c_norm * NORM_REFERENCE /
    mean ||x||^2 (a value of the c_scale=norm grid) * hessian_rows / N: a file of fewer rows than the full
    setting's gets the sum-form C whose Hessian 2C sum_i x_i x_i^T has the scale of `hessian_rows` rows,
    so CG sees the conditioning of the large fit. The ratio is class_preconditioner_speedup."""
    with store.FeatureFile(path) as ff:
        n = ff.num_rows("train")
        idx = np.sort(np.random.default_rng(0).permutation(n)[:rows]) if 0 < rows < n else np.arange(n)
        X, y = ff.read("train", idx), ff.labels("train")[idx]
        X_test, y_test = ff.read("test"), ff.labels("test")
        row = {"features": str(path), "model": ff.attrs.get("model"), "checkpoint_step": ff.attrs.get("checkpoint_step"),
               "n": len(X), "d": X.shape[1]}
    mean_sq = float(np.mean(np.einsum("ij,ij->i", X, X, dtype=np.float64)))
    C = svm.search._round_c(c_norm * svm.protocol.NORM_REFERENCE / mean_sq * hessian_rows / len(X))
    row.update(mean_sq_norm=mean_sq, c_norm=c_norm, hessian_rows=hessian_rows, C=C)
    for name in ("shared", "class"):          # 'auto' is 'class' in the primal
        model, seconds = timed(svm.fit, X, y, C, method="primal", preconditioner=name)
        row[name] = {"seconds": seconds, "test_acc": svm.accuracy(model, X_test, y_test),
                     "objective": model.objective(X, y, C), "solver": model.info}
        print(json.dumps({name: seconds, **model.info}), file=sys.stderr)
    row["class_preconditioner_speedup"] = row["shared"]["seconds"] / row["class"]["seconds"]
    row["cg_iterations_ratio"] = row["shared"]["solver"]["cg_iterations"] / max(row["class"]["solver"]["cg_iterations"], 1)
    return row


def protocol_400(final_draws: int) -> dict:
    """The 400-per-class protocol through `svm.run` (7 C x 10 selection draws, then `final_draws`);
    with fewer than the protocol's 100 final draws the time of 100 is projected from the measured
    mean seconds per final draw (the selection part is measured in full)."""
    out = REPO / "cache" / "bench_svm_protocol.json"
    # the stage returns a finished result of the same key without fitting, and resumes a partial one:
    # start from nothing so the time is the whole protocol's
    out.unlink(missing_ok=True)
    svm.stage.progress_path(out).unlink(missing_ok=True)
    cfg = build(svm.Config, "svm", {"features": str(FEATURES), "out": str(out), "settings": ("400",),
                                    "final_draws": final_draws})
    _, seconds = timed(svm.run, cfg)
    record = json.loads(out.read_text())
    if record.get("reused_from"):   # a twin's results copied (svm.stage): nothing was fitted to time
        raise SystemExit(f"{out} copied {record['reused_from']['results']}: delete it and rerun")
    result = record["settings"]["400"]
    row = {"seconds": seconds, "c": result["c"], "val_curve": result["val_curve"], "mean": result["mean"],
           "ci95": result["ci95"], "final_draws": len(result["draws"]), "select_draws": cfg.select_draws,
           "c_grid": list(cfg.c_grid), "selection_seconds": result.get("selection_seconds"),
           "final_seconds": result.get("final_seconds")}
    if final_draws < 100 and row["final_seconds"] is not None:
        row["projected_seconds_100_draws"] = seconds + (100 - final_draws) * row["final_seconds"] / final_draws
    return row


# ============================================================================ against the machine's ceiling
@torch.no_grad()
def critic_features(images_uint8: np.ndarray, batch: int = 500) -> np.ndarray:
    """N x 28672 float32 features of the untrained critic, computed as `extract_features` does."""
    torch.manual_seed(0)
    _, critic = zoo.build_models("dcgan")
    critic.eval()
    device = torch.device("cpu")
    precision = resolve_precision("auto", device)
    out = []
    for start in range(0, len(images_uint8), batch):
        x = nets.to_unit(torch.from_numpy(images_uint8[start:start + batch]), device)
        with autocast(device, precision):
            out.append(nets.pooled_features(critic, x).float().numpy())
    return np.concatenate(out)


def one_unit(fn, seconds: float, precision: str, limits: dict, shape, analytic_bytes: int | None = None,
             analytic_flops: int | None = None) -> dict:
    """A unit's counted work, its time and its rates against the ceiling (analytic bytes where given)."""
    work = ceiling.count_work(fn)
    moved = work["bytes"] if analytic_bytes is None else analytic_bytes
    note = ceiling.OP_LEVEL if analytic_bytes is None else "the part of the design a pass reads, twice (analytic; it does not fit in cache)"
    row = {"shape": list(shape), "seconds": seconds, "flops": work["flops"], "bytes": moved,
           "bytes_op_level": work["bytes"], "precision": precision,
           "ceiling": ceiling.fraction(work["flops"] / seconds, moved / seconds, precision, limits, note,
                                       bytes_are_traffic=analytic_bytes is not None)}
    if analytic_flops is not None:
        row["flops_analytic"] = analytic_flops
    return row


def cg_product(design: svm.design._Design, limits: dict, repeats: int, precision: str) -> dict:
    """One CG Hessian product (I + 2C A^T D A) p on all K columns: a forward and a backward pass over A."""
    n, d = design.H.shape
    gen = torch.Generator().manual_seed(0)
    p = torch.randn(d + 1, 10, dtype=torch.float64, generator=gen)                     # (P+1) x K
    active = (torch.rand(n, 10, generator=gen) < 0.3).float()                           # N x K
    unit = lambda: design.hessian_product(p, active, 1e-5)                               # noqa: E731
    seconds = ceiling.best_seconds(unit, repeats)
    elements = design.pass_elements
    return one_unit(unit, seconds, precision, limits, (n, d, 10), analytic_bytes=2 * elements * design.H.element_size(),
                    analytic_flops=4 * elements * 10)


def solver_units(X_small: np.ndarray, y_small: np.ndarray, X_primal: torch.Tensor, limits: dict, repeats: int = 3) -> dict:
    """The solver's units of work at this machine's ceiling: the Gram matrix of X_small, a CG product with its
    Cholesky factor, a whole cold fit at BENCH_C on X_small (Gram space, N <= D), and a CG product with the
    primal design X_primal (float32, and its bf16 copy where the CPU has bf16 units)."""
    Xs = torch.from_numpy(X_small)
    gram_s = ceiling.best_seconds(lambda: svm.design._gram(Xs), repeats)
    out = {"gram_build": one_unit(lambda: svm.design._gram(Xs), gram_s, "fp32", limits, Xs.shape)}
    L, _ = svm.design._cholesky(svm.design._gram(Xs).add_(1.0))
    out["cg_product_gram"] = cg_product(svm.design._GramDesign(L), limits, repeats, "fp32")
    fit_s = ceiling.best_seconds(lambda: svm.fit(X_small, y_small, BENCH_C), 1, warmup=0)
    out["fit"] = {**one_unit(lambda: svm.fit(X_small, y_small, BENCH_C), fit_s, "fp32", limits, X_small.shape),
                  "C": BENCH_C, "flops_note": "Cholesky and triangular solves not counted (not in FlopCounterMode's registry)"}
    out["cg_product_primal"] = {"fp32": cg_product(svm.design._Design(X_primal, 1.0), limits, repeats, "fp32")}
    if bf16_supported(X_primal.device):
        out["cg_product_primal"]["bf16"] = cg_product(svm.design._Design(X_primal, 1.0, torch.bfloat16), limits, repeats, "bf16")
    return out


def units_summary(units: dict) -> dict:
    """fraction_of_ceiling and verdict per unit; the primal product at the precision the solver picks there."""
    rows = {"gram_build": units["gram_build"], "cg_product_gram": units["cg_product_gram"], "fit_4000": units["fit"]}
    primal = units["cg_product_primal"]
    rows["cg_product_primal"] = primal.get("bf16", primal["fp32"])
    return {"fraction_of_ceiling": {k: r["ceiling"]["fraction_of_ceiling"] for k, r in rows.items()},
            "verdict": {k: r["ceiling"]["verdict"] for k, r in rows.items()},
            "bound": {k: r["ceiling"]["bound"] for k, r in rows.items()},
            "units": {k: f"{' x '.join(map(str, r['shape']))} {r['precision']}" for k, r in rows.items()}}


def ceiling_full(limits: dict) -> dict:
    """The units on the benchmark's own feature file: the compare part's 4000-row draw, 40,000 primal rows."""
    with store.FeatureFile(FEATURES) as ff:
        labels = ff.labels("train")
        idx = svm.protocol.balanced_draw(labels, 400, np.random.default_rng(0))
        X, y = ff.read("train", idx), labels[idx]
        primal = torch.from_numpy(ff.read("train"))                                    # 40000 x 28672 float32
    return {**solver_units(X, y, primal, limits), "features": str(FEATURES)}


def quick(out: Path) -> None:
    """The ceiling part only, on 4000 real images (primal rows tiled to 8000); see the module docstring."""
    began = time.perf_counter()
    limits = ceiling.measure(**ceiling.QUICK)
    images = data.cached(f"{PARQUET}[:4000]", cache_dir=str(REPO / "cache"))
    X = critic_features(images.images)                                                 # 4000 x 28672
    units = solver_units(X, np.asarray(images.labels), torch.from_numpy(np.tile(X, (2, 1))), limits)
    units["features"] = f"{PARQUET}[:4000] through the untrained DCGAN critic (seed 0)"
    summary = {**units_summary(units), "machine": hardware(), "ceiling": ceiling.summary(limits)}
    atomic_write_json(out, {"summary": summary, "ceiling_units": units, "ceiling": limits,
                            "seconds": time.perf_counter() - began, "provenance": provenance()})
    print(json.dumps(summary, indent=2))


def machine_ceiling(X: np.ndarray, repeats: int = 3) -> dict:
    """What this machine does per second, measured beside the fit it calibrates (CPU kinds differ ~2.5x):
    float32 GEMM GFLOP/s (2048^3, compute-bound); `pass_seconds`, the two products of a CG step written
    as a textbook would ((X V)^T X, V: D x 10 row-major; MKL runs these skinny shapes far below both
    ceilings); `stream_seconds`, one read of X (X.sum(), the bandwidth floor of any pass).
    full_setting_passes = full_setting_seconds / pass_seconds compares kinds where the work is the same."""
    A = torch.randn(2048, 2048)
    best_gemm = min(timed(torch.mm, A, A)[1] for _ in range(repeats))
    Xt, V = torch.from_numpy(X), torch.randn(X.shape[1], 10)
    best_pass = min(timed(lambda: (Xt @ V).T @ Xt)[1] for _ in range(repeats))
    best_stream = min(timed(Xt.sum)[1] for _ in range(repeats))
    return {"gemm_gflops_fp32": 2 * 2048 ** 3 / best_gemm / 1e9, "pass_seconds": best_pass,
            "stream_seconds": best_stream, "pass_shape": list(X.shape)}


def full_setting(args, save: Callable[[dict], None]) -> dict:
    """The full setting as configured (bracketed, optionally with a presearch) against the exhaustive
    search over every C it scored; both refit on all of train and score on test. `save` gets the row
    once the timed part is done (the exhaustive reference can take far longer) and again at the end."""
    cfg = build(svm.Config, "svm", {"features": str(args.features), "settings": ("full",), "val_size": args.val_size,
                                    "c_presearch": args.presearch, "c_scale": args.c_scale, "device": args.device,
                                    "layer_scale": args.layer_scale, "c_refine": not args.no_refine,
                                    "select_stop": args.select_stop})
    device = svm.stage.pick_device(cfg.device)
    start = time.perf_counter()
    with store.FeatureFile(cfg.features) as ff:
        X, y, n_rest, stats, _ = svm.stage.load_checked(ff, cfg)                  # N x D float32, train-minus-val first
        test = svm.protocol.SplitScorer(ff, cfg, stats)
        attrs = {k: ff.attrs.get(k) for k in ("kind", "model", "key")}
        features_id = svm.stage.features_identity(ff)
    factor = svm.search.c_scale_factor(X, cfg)
    load_seconds = time.perf_counter() - start
    ceiling = machine_ceiling(X)
    # read before this run's first save replaces the record
    earlier = earlier_record(args) if args.reuse_exhaustive else {}
    bar = svm.search.PhaseBars("full setting")          # a long run shows its progress, phase by phase
    bracketed, seconds = timed(svm.search.run_full, X, y, n_rest, test, cfg, factor, device, bar)
    bar.close()
    row = {"machine": hardware(), "features": str(args.features), "feature_attrs": attrs, "n": len(X),
           "d": X.shape[1], "n_rest": n_rest, "presearch_rows": args.presearch, "c_refine": cfg.c_refine,
           "c_scale": cfg.c_scale, "layer_scale": cfg.layer_scale, "c_scale_factor": factor,
           # the bracketed search's selection fits stop here; the exhaustive reference's at svm.solver.TOL
           "select_stop": cfg.select_stop, "exhaustive_tol": svm.solver.TOL,
           "load_seconds": load_seconds, "full_setting_seconds": seconds, "machine_ceiling": ceiling,
           "full_setting_passes": seconds / ceiling["pass_seconds"],
           "bracketed": {k: v for k, v in bracketed.items() if k != "seconds"},
           "exhaustive": "running (a run killed before it finished leaves this)", "note": args.note,
           "provenance": provenance()}
    save(row)
    print(json.dumps({"bracketed_c": bracketed["c_select"], "seconds": seconds}), file=sys.stderr)
    exhaustive = earlier_exhaustive(earlier, features_id, bracketed) if args.reuse_exhaustive else None
    if exhaustive is None:
        exhaustive = {**exhaustive_full(X, y, n_rest, test, cfg, device, bracketed), "features_id": features_id,
                      "measured": provenance()}
    row.update({"exhaustive_seconds": exhaustive["seconds"], "exhaustive": exhaustive,
                "same_c": exhaustive["c_select"] == bracketed["c_select"],
                # held-out validation accuracy of each choice, both fitted on all train-minus-val rows (the
                # exhaustive curve): unlike test_acc it stays honest when the test split overlaps train
                "val_acc_of_choice": {"bracketed": exhaustive["val_curve"][repr(bracketed["c_select"])],
                                      "exhaustive": exhaustive["val_curve"][repr(exhaustive["c_select"])]}})
    save(row)
    return row


def exhaustive_grid(bracketed: dict) -> list[float]:
    return sorted(set(bracketed["grid"]) | set((bracketed.get("presearch") or {}).get("grid", [])))


def results_key(args) -> str:
    return "full_setting" if args.layer_scale == "none" else f"full_setting_layers_{args.layer_scale}"


def earlier_record(args) -> dict:
    return json.loads(args.results.read_text()).get(results_key(args), {}) if args.results.exists() else {}


def earlier_exhaustive(record: dict, features_id: str, bracketed: dict) -> dict | None:
    """--reuse-exhaustive: the results JSON's earlier exhaustive record when it searched the same feature
    file (same identity) over the same grid; it keeps its own `measured` commit and machine. The reference
    depends on the data and the grid, not on how fast the bracketed search got there (an hour on 2 cores)."""
    earlier = record.get("exhaustive")
    if not isinstance(earlier, dict) or earlier.get("features_id") != features_id \
            or earlier.get("grid") != exhaustive_grid(bracketed):
        print("no earlier exhaustive record for this file and grid: running it", file=sys.stderr)
        return None
    return {**earlier, "reused": True}


def exhaustive_full(X, y, n_rest: int, test, cfg, device, bracketed: dict) -> dict:
    """Every C the bracketed search scored (the presearch's too), fitted on all of train-minus-val as one
    warm-started path, scored on val; the best refit on all of train (same refit C rule)."""
    start = time.perf_counter()
    grid = exhaustive_grid(bracketed)
    models = svm.search._Fitter(X[:n_rest], y[:n_rest], cfg, device).path(grid)
    curve = {c: svm.accuracy(m, X[n_rest:], y[n_rest:]) for c, m in zip(grid, models)}
    chosen = svm.search._pick(curve)
    refit_c = chosen * n_rest / len(X) if cfg.c_form == "mean" else chosen
    model = svm.search._Fitter(X, y, cfg, device).path([refit_c], warm=models[grid.index(chosen)])[0]
    fits = [[c, "select", m.info] for c, m in zip(grid, models)] + [[refit_c, "refit", model.info]]
    return {"grid": grid, "val_curve": {repr(c): a for c, a in curve.items()}, "c_select": chosen, "c": refit_c,
            "test_acc": test.score([model])[0], "solver": svm.search.solver_summary(fits),
            "seconds": time.perf_counter() - start}


def merge_results(path: Path, key: str, value: dict) -> None:
    """Add or replace one top-level key of the results JSON, keeping every other key as it is (and the
    record it replaces, `keep_replaced`)."""
    record = json.loads(path.read_text()) if path.exists() else {}
    put(record, key, svm.stage._json_keys(value))
    atomic_write_json(path, record)


def _made(row: dict) -> dict:
    return row.get("measured") or row.get("provenance") or {}


def keep_replaced(record: dict, key: str, new: dict) -> str | None:
    """Before a part's record is replaced by a rerun: keep the old one as <key>_<commit>, or
    <key>_<machine>_<commit> where it ran on another machine (e.g. protocol_400_amd-avx2_f2f1cf7), with _2, _3 ...
    for reruns of one commit; not where it is this run's own earlier save (the same provenance). Notes and the
    README cite these records; a rerun must not drop one. Returns the name it was kept under."""
    old = record.get(key)
    made = _made(old) if isinstance(old, dict) else None
    if made is None or (made and made == _made(new)):
        return None
    machine = made.get("hardware")
    tag = f"_{machine_tag(machine)}" if machine and machine != hardware() else ""
    base = name = f"{key}{tag}_{(made.get('git_commit') or 'unknown')[:7]}"
    n = 1
    while name in record and record[name] != old:
        n += 1
        name = f"{base}_{n}"
    record[name] = old
    return name


def machine_tag(hw: str) -> str:
    """'CPU AMD EPYC (2 cores, AVX2)' -> 'amd-avx2'; 'CPU Intel(R) Xeon(R) ... (2 cores, AMX-BF16 limited to AVX2)'
    -> 'intel-amx-bf16-limited-to-avx2'."""
    gpu = "gpu" if " with CPU " in hw else ""
    vendor = next((v for v in ("AMD", "Intel") if v in hw), "")
    units = hw.rsplit("(", 1)[-1].rstrip(")").split(", ", 1)[-1] if "(" in hw else ""
    return "-".join(w for w in f"{gpu} {vendor} {units}".lower().split() if w) or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--extract-only", action="store_true")
    parser.add_argument("--skip-liblinear", action="store_true")
    parser.add_argument("--parts", default=",".join(PARTS),
                        help=f"comma-separated, of {PARTS}; parts not run keep their earlier record")
    parser.add_argument("--large-features", type=Path, default=FEATURES,
                        help="large: the feature file (a trained critic's: cache/bench_svm_wgan-gp-ttur_2000.h5)")
    parser.add_argument("--large-c", type=float, default=LARGE_C, help="large: the C of both fits")
    parser.add_argument("--final-draws", type=int, default=100, help="fewer: time of 100 projected")
    parser.add_argument("--precond-c", type=float, default=1e-2,
                        help="preconditioner: C as a value of the c_scale=norm grid (the full setting chose 1e-2)")
    parser.add_argument("--precond-rows", type=int, default=0, help="preconditioner: train rows (0: all)")
    parser.add_argument("--precond-hessian-rows", type=int, default=50000,
                        help="preconditioner: C scaled so that the Hessian has the scale of this many rows")
    parser.add_argument("--full-setting", action="store_true", help="only the full setting: bracketed vs exhaustive")
    parser.add_argument("--features", type=Path, help="--full-setting: the feature file (a trained critic's)")
    parser.add_argument("--presearch", type=int, default=10000,
                        help="--full-setting: c_presearch rows (0: every C of the bracket on all rows)")
    parser.add_argument("--no-refine", action="store_true",
                        help="--full-setting: c_refine=false (the subsample's C is the choice; one fit on all rows)")
    parser.add_argument("--select-stop", default="liblinear", choices=svm.protocol.SELECT_STOPS,
                        help="--full-setting: where the bracketed search's selection fits stop (the exhaustive "
                             "reference always stops at svm.solver.TOL)")
    parser.add_argument("--val-size", type=int, default=10000, help="--full-setting: validation rows")
    parser.add_argument("--c-scale", default="none", choices=svm.protocol.C_SCALES, help="--full-setting: c_scale")
    parser.add_argument("--reuse-exhaustive", action="store_true",
                        help="--full-setting: keep the results JSON's exhaustive record if it has the same file and grid")
    parser.add_argument("--note", default="", help="--full-setting: recorded as is (e.g. how the test split was drawn)")
    parser.add_argument("--layer-scale", default="none", choices=svm.protocol.LAYER_SCALES,
                        help="--full-setting: layer_scale; 'equal' is recorded under full_setting_layers_equal")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--results", type=Path, default=RESULTS, help="--full-setting: the results JSON to merge into")
    parser.add_argument("--quick", action="store_true", help="only the ceiling part, on 2000 images: svm_quick.json")
    args = parser.parse_args()
    if args.quick:
        torch.set_num_threads(2)
        quick(ceiling.result_path(RESULTS.with_name("svm_quick.json")))
        return
    if args.full_setting:
        if args.features is None:
            parser.error("--full-setting needs --features PATH (a trained critic's feature file)")
        row = full_setting(args, lambda value: merge_results(args.results, results_key(args), value))
        print(json.dumps({k: row[k] for k in ("full_setting_seconds", "exhaustive_seconds", "same_c")}, indent=2))
        return
    parts = [p for p in args.parts.split(",") if p]
    if unknown := set(parts) - set(PARTS):
        parser.error(f"unknown parts {sorted(unknown)}; choose from {PARTS}")
    if args.extract_only or {"compare", "protocol"} & set(parts) or ({"large", "preconditioner"} & set(parts) and args.large_features == FEATURES):
        extract_features()       # the untrained file; a --parts large run on another file needs none of it
    if args.extract_only:
        return
    torch.set_num_threads(2)
    record = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    if "compare" in parts:
        with store.FeatureFile(FEATURES) as ff:
            X_test, y_test = ff.read("test"), ff.labels("test")             # 10000 x 28672 float32
            put(record, "compare_4000", measured(compare_at_4000(ff, X_test, y_test, args.skip_liblinear,
                                                                 record.get("compare_4000", {}))))
            del X_test
        write(record)
    if "large" in parts:
        put(record, "large_40000", measured(large_40000(args.large_features, args.large_c)))
        write(record)
    if "preconditioner" in parts:
        put(record, "preconditioner", measured(preconditioners(args.large_features, args.precond_c, args.precond_rows,
                                                               args.precond_hessian_rows)))
        write(record)
    if "protocol" in parts:
        put(record, "protocol_400", measured(protocol_400(args.final_draws)))
    if "ceiling" in parts:
        limits = ceiling.measure()
        put(record, "ceiling_units", measured({**ceiling_full(limits), "ceiling": limits}))
    write(record)
    print(json.dumps(record["summary"], indent=2))


def put(record: dict, key: str, value: dict) -> None:
    keep_replaced(record, key, value)
    record[key] = value


def measured(row: dict) -> dict:
    """Each part keeps the machine and commit it ran on: parts are rerun one at a time."""
    return {**row, "measured": provenance()}


CURRENT_PARTS = ("compare_4000", "large_40000", "preconditioner", "protocol_400", "ceiling_units", "full_setting")


def part_machines(record: dict) -> dict:
    """The machine each current part ran on (the records kept beside them name their own)."""
    return {key: _made(record[key]).get("hardware") or record[key].get("machine")
            for key in CURRENT_PARTS if isinstance(record.get(key), dict)}


def write(record: dict) -> None:
    """Summary from whatever parts have run so far; written after every part."""
    small, protocol = record.get("compare_4000", {}), record.get("protocol_400")
    # parts are rerun one at a time, often on different machines: each summarised part names its own
    summary = {"machines": part_machines(record),
               "features": "CIFAR-10 (40k train / 10k test, permuted) through an UNTRAINED "
                           "DCGAN critic, 28672 dims, float16 file"}
    rows = [r for r in small.get("per_c", {}).values() if "liblinear_seconds" in r]
    if rows:
        at_bench = small["per_c"][repr(BENCH_C)]
        ours, ref = sum(r["replearn_seconds"] for r in rows), sum(r["liblinear_seconds"] for r in rows)
        summary.update(
            # headline: the work of one selection draw of the protocol (every C of the grid on one
            # 4000-example draw); replearn shares one factorisation along the warm-started path,
            # LinearSVC (no warm start) fits each C from scratch
            speedup_vs_liblinear=ref / small["replearn_c_path_seconds"],
            speedup_definition="sum of LinearSVC fit times over dcgan_code's 7 C values / replearn's fit_path over "
            "the same 7 C (one factorisation, warm starts), 4000 x 28672, same data; cold single fits: "
            "speedup_cold_grid (summed over the grid) and speedup_cold_at_c_1e4",
            speedup_cold_grid=ref / ours,
            speedup_cold_at_c_1e4=at_bench["liblinear_seconds"] / at_bench["replearn_seconds"],
            acc_delta_points=100 * (at_bench["replearn_test_acc"] - at_bench["liblinear_test_acc"]),
            acc_delta_points_worst=max((100 * (r["replearn_test_acc"] - r["liblinear_test_acc"]) for r in rows), key=abs),
            liblinear_converged_at_every_c=all(r.get("liblinear_converged", True) for r in rows),
            objective_rel_diff_worst=max(((r["replearn_objective"] - r["liblinear_objective"]) / r["liblinear_objective"]
                                          for r in rows), key=abs))
    if protocol:
        summary["protocol_400_seconds"] = protocol.get("projected_seconds_100_draws", protocol["seconds"])
        summary["protocol_400_measured"] = (f"{protocol['final_draws']} final draws measured, 100 projected"
                                            if "projected_seconds_100_draws" in protocol else "measured in full")
    if "preconditioner" in record:
        pre = record["preconditioner"]
        summary.update(class_preconditioner_speedup=pre["class_preconditioner_speedup"],
                       class_preconditioner_cg_ratio=pre["cg_iterations_ratio"],
                       class_preconditioner_fit=f"{pre['n']} x {pre['d']} primal at C={pre['C']} "
                                                f"({pre.get('model')} step {pre.get('checkpoint_step')})")
    if "ceiling_units" in record:
        summary.update(units_summary(record["ceiling_units"]), ceiling=ceiling.summary(record["ceiling_units"]["ceiling"]))
    if "large_40000" in record:
        large = record["large_40000"]
        summary.update(large_40000_seconds=large["replearn_seconds"], large_40000_c=large["C"],
                       large_40000_features=f"{large.get('model')} step {large.get('checkpoint_step')}",
                       large_40000_float32_hessian_seconds=large["float32_hessian_seconds"],
                       bf16_hessian_speedup=large["bf16_hessian_speedup"])
    record.update(summary=summary, provenance=provenance())
    atomic_write_json(RESULTS, record)


if __name__ == "__main__":
    main()
