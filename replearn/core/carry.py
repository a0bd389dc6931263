"""Results that outlive the machine: the small files of a finished part of the chain, kept in a folder that
git can carry, and put back under build/ on a fresh machine so the chain reuses them by key.

A long chain (the cpu preset: hours on 2 cores) may outlast a working session, and the next session may
start on a fresh machine where build/ is gone. What a finished run folder needs to be reused is small:
its record (config.json, finished.json, log.jsonl), its SVM and curve results (JSON, reused by key without
their feature files) and the pictures the table links (the latest sample grid, the curve and loss plots).
Checkpoints and feature files stay behind: they are large, and a run whose results are all here is
never trained or extracted again.

    export_folder(src, carry_root, build_root)   after a part of the chain has written every result
    restore(carry_root, build_root)              at the chain's start: copies back what build/ lacks
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

from .utils import atomic_path

# what a run or K-means folder keeps: records and results, and the plots the table links
SMALL = ("*.json", "*.jsonl", "curve-*.png", "losses.png")


def small_files(folder: Path) -> list[Path]:
    found = {p for pattern in SMALL for p in folder.glob(pattern) if p.is_file()}
    grids = sorted((folder / "samples").glob("step_*.png"))   # the latest grid is the one the table shows
    return sorted(found) + grids[-1:]


def _copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(dst) as tmp:                 # a kill mid-copy leaves no half file under the real name
        shutil.copyfile(src, tmp)


def export_folder(folder: Path, carry_root: Path, build_root: Path) -> int:
    """Copy `folder`'s small files to the same place under `carry_root`; returns how many changed."""
    changed = 0
    for src in small_files(folder):
        dst = carry_root / src.relative_to(build_root)
        if not dst.exists() or dst.read_bytes() != src.read_bytes():
            _copy(src, dst)
            changed += 1
    return changed


def restore(carry_root: Path, build_root: Path) -> int:
    """Put every carried file that build/ lacks back in place (an existing file is never overwritten)."""
    if not carry_root.is_dir():
        return 0
    restored = 0
    for src in sorted(p for p in carry_root.rglob("*") if p.is_file() and ".tmp-" not in p.name):
        dst = build_root / src.relative_to(carry_root)
        if not dst.exists():
            _copy(src, dst)
            restored += 1
    if restored:
        print(f"carry: {restored} result file(s) restored from {carry_root} into {build_root}", file=sys.stderr)
    return restored
