"""The cpu chain's evaluation end to end: wall time, peak disk, peak memory and where the compute went.

    flock /tmp/replearn-heavy.lock benchmarks/isa.sh AVX2 .venv/bin/python benchmarks/cpu_eval.py --work /work/evalrun

runs the cpu preset's evaluation at full size on 20-step critics (issue 37's method: both critics and their
controls, K-means K=1600, 4 curve points each, no seed repeats; ~1 h on 2 cores) with `python -m replearn chain`,
samples the build folder's size every 30 s, and writes benchmarks/results/cpu_eval/<machine>.json (named by the
CPU kind, e.g. `amx-bf16`; `avx2-limited` under benchmarks/isa.sh AVX2; --out to choose) and the chain's table
beside it as <machine>-table.md, keeping the record it replaces as <machine>-<commit>.json. The record lists
every SVM result with its seconds, so that runs of two commits compare part by part. --assemble only reads a
finished run's folders (with the wall time, peak RSS and peak disk measured outside, e.g. by /usr/bin/time -v,
passed in).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from replearn.core.utils import atomic_write_json, cpu_vector_units  # noqa: E402

DATA = "../shared/data"
CHAIN_ARGS = [
    "preset=cpu", f"pretrain_data={DATA}/tinyimagenet/train.parquet",
    f"train={DATA}/cifar10/train.parquet[:40000]", f"test={DATA}/cifar10/train.parquet[40000:]",
    "data_note=shared CIFAR-10 copy, JPEG q75", "seed_repeats=", "carry=false",
    "pretrain_args=steps=20", "curve_args=steps=0,2,10",     # 4 curve points, as the preset's 0, 50, 500, 2000
]
WHAT = ("the cpu chain's evaluation (features, both SVM settings per row, curve, K-means; no seed repeats) at full "
        "size on 20-step critics: python -m replearn chain " + " ".join(CHAIN_ARGS))


def folder_bytes(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:             # written and removed between the walk and the stat
                pass
    return total


def run_chain(work: Path) -> dict:
    """The chain in a child process; its wall time, its peak RSS and the build folder's sampled peak."""
    command = [sys.executable, "-m", "replearn", "chain", *CHAIN_ARGS,
               f"build_dir={work / 'build'}", f"tables_dir={work / 'tables'}"]
    start, peak = time.monotonic(), 0
    child = subprocess.Popen(command, cwd=REPO)
    while True:
        peak = max(peak, folder_bytes(work / "build"))
        try:
            child.wait(timeout=30)       # returns as the chain ends: the wall time never counts a sampler's sleep
            break
        except subprocess.TimeoutExpired:
            pass
    if child.returncode:
        raise SystemExit(f"the chain failed (exit {child.returncode}); its folders stay in {work}")
    return {"command": shlex.join(command), "wall_seconds": round(time.monotonic() - start, 1),
            "max_rss_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
            "peak_build_bytes_sampled_30s": peak}


def svm_rows(build: Path) -> list[dict]:
    """One entry per SVM result of the run: its features' step, rows and seconds, each setting's seconds and
    accuracy, and whether it was copied from a twin feature file (`reused_from`) rather than fitted."""
    rows = []
    for path in sorted(build.rglob("*.svm-*.json")):
        result = json.loads(path.read_text())
        attrs, settings = result["features"]["attrs"], result.get("settings", {})
        seconds = attrs.get("seconds", 0.0)            # K-means files record theirs by stage, with a total
        twin = result.get("reused_from")
        row = {"results": str(path.relative_to(build)), "step": attrs.get("checkpoint_step"),
               "kind": attrs.get("kind"), "features_rows": result.get("train_rows"),
               "features_seconds": round(seconds["total"] if isinstance(seconds, dict) else seconds, 1),
               "reused_from": _under(twin["results"], build) if twin else False}
        for name, setting in sorted(settings.items()):
            row[f"svm_{name}_seconds"] = round(setting.get("seconds", 0.0), 1)
            row[f"svm_{name}_acc"] = setting.get("test_acc", setting.get("mean"))
        row["hardware"] = result["provenance"]["hardware"]
        row["commit"] = result["provenance"]["git_commit"]
        rows.append(row)
    return rows


def _under(path: str, build: Path) -> str:
    """A twin's results path as `results` names them (relative to the build folder), or as the chain recorded it
    where it lies elsewhere (a run whose build_dir was given relative to another working directory)."""
    try:
        return str(Path(path).relative_to(build.resolve()))
    except ValueError:
        return path


def table_file(tables: Path) -> Path:
    found = sorted(tables.glob("cifar10-*.md"))
    if len(found) != 1:
        raise SystemExit(f"expected one cifar10-*.md table in {tables}, found {[p.name for p in found]}")
    return found[0]


def cost_line(table: Path) -> str:
    return next((line for line in table.read_text().splitlines() if line.startswith("Compute recorded")), "")


def keep_replaced(out: Path) -> Path | None:
    """A rerun keeps the record it replaces (and its table) as <stem>-<commit>: the notes compare runs."""
    if not out.exists():
        return None
    commits = sorted({r["commit"][:7] for r in json.loads(out.read_text()).get("results", [])}) or ["unknown"]
    kept = out.with_name(f"{out.stem}-{'-'.join(commits)}{out.suffix}")
    n = 1
    while kept.exists():
        n += 1
        kept = out.with_name(f"{out.stem}-{'-'.join(commits)}_{n}{out.suffix}")
    out.rename(kept)
    table = out.with_name(f"{out.stem}-table.md")
    if table.exists():
        table.rename(kept.with_name(f"{kept.stem}-table.md"))
    return kept


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="folder for the run's build/ and tables/ (~4 GB)")
    ap.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/cpu_eval/<machine>.json")
    ap.add_argument("--assemble", action="store_true", help="read a finished run instead of running one")
    ap.add_argument("--command", default="", help="with --assemble: how the run was started")
    ap.add_argument("--wall-seconds", type=float, default=None, help="with --assemble")
    ap.add_argument("--max-rss-kb", type=int, default=None, help="with --assemble")
    ap.add_argument("--peak-build-bytes", type=int, default=None, help="with --assemble")
    args = ap.parse_args(argv)
    args.work = args.work.resolve()     # the chain runs in the repository's root, this script wherever it is called
    # named by the CPU kind (e.g. amx-bf16.json; avx2-limited.json under benchmarks/isa.sh AVX2): compare within one
    native, limit = cpu_vector_units(limit=""), os.environ.get("REPLEARN_CPU_ISA", "")
    machine = f"{limit.lower()}-limited" if limit and limit != native else (native or "cpu").lower()
    out = args.out or REPO / "benchmarks" / "results" / "cpu_eval" / f"{machine}.json"
    if args.assemble:
        measured = {"command": args.command, "wall_seconds": args.wall_seconds, "max_rss_kb": args.max_rss_kb,
                    "peak_build_bytes_sampled_30s": args.peak_build_bytes}
    else:
        if (args.work / "build").exists():
            raise SystemExit(f"{args.work / 'build'} exists: remove it (a run measures from nothing) or pass --assemble")
        measured = run_chain(args.work)
    table = table_file(args.work / "tables")
    record = {"what": WHAT, **measured, "cost_line": cost_line(table), "results": svm_rows(args.work / "build")}
    out.parent.mkdir(parents=True, exist_ok=True)
    keep_replaced(out)
    atomic_write_json(out, record)
    shutil.copyfile(table, out.with_name(f"{out.stem}-table.md"))
    print(json.dumps({k: v for k, v in record.items() if k != "results"}, indent=1))
    return out


if __name__ == "__main__":
    main()
