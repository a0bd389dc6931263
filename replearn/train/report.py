"""One markdown page per run: the plots and numbers a reader wants, gathered from the run folder.

    python -m replearn report run=build/<preset>/wgan-gp-<key>   # -> <run>/report.md

Reads what earlier stages left (config.json, finished.json, log.jsonl, losses.png, samples/,
evaluate.json and its PNGs, `*.svm.json` / `*.svm.png`) and says plainly what is missing and
which command makes it, so a report can be written at any point of a run. Image links are
relative, so the page renders wherever the run folder goes. `report_compare` puts several
runs' latest sample grids side by side (one PNG per table row).
"""
from __future__ import annotations

import os

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.config import ConfigError
from ..core.plots import plot_image_row
from ..core.utils import atomic_write_text, read_jsonl
from . import runs


@dataclass(frozen=True)
class Config:
    run: str = ""   # a pretrain run folder (build/<preset>/<model>-<key>)
    out: str = ""             # '' = <run>/report.md (beside the images it links)


def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def latest_sample_grid(run_dir: Path) -> Path | None:
    """samples/step_<step>.png with the highest step (the zero-padded names sort by step)."""
    grids = sorted((run_dir / "samples").glob("step_*.png"))
    return grids[-1] if grids else None


def grid_step(grid: Path) -> int:
    return int(grid.stem.split("_")[-1])


def fmt(value: Any, spec: str = ".4g") -> str:
    return "n/a" if value is None else format(value, spec)


def image(path: Path | str, run_dir: Path, alt: str) -> str:
    # links are relative to the report's folder: `path` may be relative to it already, absolute,
    # or relative to the working directory
    path = Path(path)
    if not path.is_absolute() and (Path(run_dir) / path).exists():
        rel = path
    else:
        rel = Path(os.path.relpath(path.resolve(), Path(run_dir).resolve()))
    return f"![{alt}]({rel.as_posix()})"


# ============================================================================ sections
def header(run_dir: Path) -> list[str]:
    info = read_json(run_dir / "config.json") or {}
    finished = read_json(run_dir / "finished.json")
    cfg, prov = info.get("config", {}), info.get("provenance", {})
    state = (f"finished at step {finished['step']} ({finished['train_seconds'] / 60:.1f} min of training)"
             if finished else "not finished (no finished.json): numbers below are from a run in progress")
    rows = [("model", cfg.get("model")), ("architecture / loss", f"{cfg.get('arch')} / {cfg.get('loss')}"),
            ("training data", f"`{cfg.get('data')}`"), ("steps (configured)", cfg.get("steps")),
            ("batch size / critic steps", f"{cfg.get('batch_size')} / {cfg.get('n_critic')}"),
            ("state", state), ("git commit", prov.get("git_commit")), ("hardware", prov.get("hardware"))]
    return [f"# Run report: {run_dir.name}", "", "| | |", "|---|---|",
            *[f"| {k} | {v} |" for k, v in rows], ""]


def training_section(run_dir: Path) -> list[str]:
    lines = ["## Training", ""]
    log = read_jsonl(run_dir / "log.jsonl")
    if (run_dir / "losses.png").exists():
        lines += [image("losses.png", run_dir, "losses"), ""]
    if log:
        last = log[-1]
        keys = [k for k in ("d_loss", "g_loss", "wasserstein", "gp") if k in last]
        lines += [f"Last logged step {last['step']}: " + ", ".join(f"{k} = {fmt(last[k])}" for k in keys), ""]
    else:
        lines += ["No `log.jsonl` yet.", ""]
    grid = latest_sample_grid(run_dir)
    lines += ["## Samples", ""]
    lines += ([f"Fixed noise at step {grid_step(grid)} (`{grid.relative_to(run_dir)}`):", "",
               image(grid, run_dir, "samples"), ""] if grid else ["No sample grids yet.", ""])
    return lines


def quality_table(records: list[dict]) -> list[str]:
    head = ["| step | FID | critic E[D(real)] - E[D(fake)] | diversity generated / real (critic features) "
            "| nearest training image, median L2 (pixels 0-255) |", "|---|---|---|---|---|"]
    rows = []
    for r in records:
        div = r["diversity"]["critic"]
        pixel = r["nearest"].get("pixel", {})
        rows.append(f"| {r['step']} | {fmt(r.get('fid'), '.2f')} | {fmt(r['wasserstein']['estimate'])} | "
                    f"{fmt(div['generated']['mean_pairwise_distance'])} / {fmt(div['real']['mean_pairwise_distance'])}"
                    f" | {fmt(pixel.get('nearest_l2_median'), '.1f')} |")
    return head + rows + [""]


def fid_notice(records: list[dict]) -> list[str]:
    missing = [r for r in records if r.get("fid") is None]
    if not missing:
        return []
    reason = missing[-1].get("fid_unavailable") or "not computed"
    return [f"**FID unavailable** for {len(missing)} of {len(records)} evaluated checkpoints: {reason}. "
            f"The other numbers do not need Inception.", ""]


def quality_section(run_dir: Path) -> list[str]:
    lines = ["## Generator quality", ""]
    evaluation = read_json(run_dir / "evaluate.json")
    if not evaluation or not evaluation.get("records"):
        return lines + [f"Not evaluated yet (no FID, Wasserstein estimate or nearest neighbours): run "
                        f"`python -m replearn evaluate run={run_dir}`.", ""]
    records = evaluation["records"]
    last = records[-1]
    lines += fid_notice(records) + quality_table(records)
    if last["wasserstein"].get("real_is_training_data"):
        lines += ["The critic gap uses training images (no `heldout` split given), so it may overstate the gap.", ""]
    if (run_dir / "metrics_vs_step.png").exists():
        lines += [image("metrics_vs_step.png", run_dir, "metrics against step"), ""]
    for space, info in last["nearest"].items():
        lines += [f"### Nearest training images at step {last['step']} ({space} space)", "",
                  f"Searched {info['bank_size']} training images exactly; smallest nearest distance "
                  f"{fmt(info['nearest_l2_min'], '.1f')} (0 would be a copy).", "",
                  image(info["png"], run_dir, f"nearest neighbours, {space}"), ""]
    return lines


def svm_section(run_dir: Path) -> list[str]:
    results = sorted(run_dir.glob("*.svm.json"))
    lines = ["## Linear probe (L2-SVM)", ""]
    if not results:
        return lines + ["No SVM results in this folder yet (`features` then `svm`).", ""]
    for path in results:
        settings = (read_json(path) or {}).get("settings", {})
        lines += [f"### {path.name}", ""]
        if "full" in settings:
            lines.append(f"- full training set: test accuracy {100 * settings['full']['test_acc']:.2f}% "
                         f"(C = {fmt(settings['full'].get('c'))})")
        if "400" in settings:
            s = settings["400"]
            lines.append(f"- 400 per class: {100 * s['mean']:.2f}% +- {100 * s['ci95']:.2f} (95% interval, "
                         f"{len(s.get('draws', []))} draws; C = {fmt(s.get('c'))})")
        png = path.with_suffix(".png")
        lines += ["", image(png, run_dir, "accuracy against C"), ""] if png.exists() else [""]
    return lines


# ============================================================================ the stage
def render(run_dir: Path) -> str:
    return "\n".join(header(run_dir) + training_section(run_dir) + quality_section(run_dir) + svm_section(run_dir))


def run(cfg: Config) -> Path:
    """Gather a run's plots and numbers into one markdown page (report.md in the run folder)."""
    runs.require_run(cfg.run)
    run_dir = Path(cfg.run)
    if not (run_dir / "config.json").exists():
        raise ConfigError(f"{run_dir} is not a pretrain run folder (no config.json); pass run=<run folder>")
    out = Path(cfg.out) if cfg.out else run_dir / "report.md"
    if out.parent.resolve() != run_dir.resolve():
        raise ConfigError(f"out={out} must be in the run folder {run_dir}: the page links its images relatively")
    atomic_write_text(out, render(run_dir))
    return out


def report_compare(run_dirs: list[str | Path], out_png: str | Path, title: str = "") -> Path:
    """The latest sample grid of each run side by side, labelled with model and step (one table row)."""
    panels = []
    for run_dir in map(Path, run_dirs):
        grid = latest_sample_grid(run_dir)
        if grid is None:
            raise ConfigError(f"no sample grids in {run_dir / 'samples'}; run `replearn pretrain` for it first")
        model = ((read_json(run_dir / "config.json") or {}).get("config") or {}).get("model", run_dir.name)
        panels.append((f"{model} ({run_dir.name}), step {grid_step(grid)}", grid))
    return plot_image_row(panels, out_png, title or "samples from fixed noise")
