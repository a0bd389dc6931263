"""What the seed papers' studies share (wgan_grid.py, ablation.py, augment.py).

A study trains a set of GANs (cells) through the keyed `pretrain` stage, measures each one, and
writes one table (`<tables_dir>/<name>-<preset>.md`, `.csv`, `.tex`) with a folder of figures beside
it. Every artifact is reused by key exactly as the chain reuses it (runs.py): a cell with the same
resolved pretrain config and data is the same run folder, whichever study (or the chain) asked first.

Measures of one cell, at the end of the run and as curves over training:
- critic loss, generator loss and the critic's Wasserstein estimate on the training batches
  (`log.jsonl`; the end value is the mean over the last tenth of the logged steps);
- at every interval checkpoint (`quality`): the Wasserstein estimate E[D(real)] - E[D(fake)] of that
  step's critic on held-out real images (the probe's test split), diversity, and FID when local
  Inception weights are given. Diversity is the mean per-dimension variance of generated images in
  a FIXED feature space -- a random-weight DCGAN critic (seed 0, width 0.5, every layer globally
  max-pooled: 896 dims), the same net for every cell and step -- divided by the same figure for the
  held-out real images (1.0: as varied as real images; near 0: collapse); with Inception weights
  also the same ratio in Inception pool3 space;
- the linear probe (`curve`): 400-per-class L2-SVM accuracy of the critic's 4x4-pooled features at
  chosen checkpoints, step 0 being the untrained control.

A cell whose pretraining diverges (non-finite loss or weights: `pretrain` raises and names the last
good checkpoint) is recorded in `<run>/diverged.json` and measured on the checkpoints it kept; its
table row says so with the step. A rerun does not train it again.
"""
from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import curve, metrics, nets, pretrain, runs, zoo
from .config import ConfigError, build, split_overrides, to_dict
from .lock import building
from .utils import (atomic_write_json, atomic_write_text, git_commit, lookup, make_registry, pick_device,
                    provenance, read_jsonl)

CIFAR_TRAIN = "hf:uoft-cs/cifar10:train"
CIFAR_TEST = "hf:uoft-cs/cifar10:test"
DIVERGED = "diverged.json"
FIXED_NET = dict(arch="dcgan", width=0.5, norm="none", seed=0)   # the diversity feature space (see above)


# ============================================================================ variants
# Named GAN settings the ablation ladder and the augmentation study share: (label, pretrain keys).
# WGAN-family variants take the study's `wgan_loss` (wgan, or wgan-no-warmup at CPU scale).
VARIANTS, register_variant = make_registry("variant")


def variant(name: str, label: str, **values) -> None:
    register_variant(name)(lambda: (label, dict(values)))


variant("dcgan", "DCGAN", model="dcgan")
variant("wgan", "WGAN", model="wgan")
# seed 004's ladder, cumulative: residual blocks in G and D, spectral norm on every critic layer,
# a self-attention block (at 16x16 in G and D)
variant("wgan+res", "WGAN + residual", model="wgan", arch="resnet")
variant("wgan+res+sn", "WGAN + residual + SN", model="wgan", arch="resnet", spectral_norm=True)
variant("wgan+res+sn+sa", "WGAN + residual + SN + self-attention", model="wgan", arch="resnet",
        spectral_norm=True, attention_res=16)


def variant_values(name: str, wgan_loss: str) -> tuple[str, dict]:
    label, values = lookup(VARIANTS, name, "variant")()
    if values.get("model") == "wgan":
        values["loss"] = wgan_loss
    return label, values


# ============================================================================ the study config
@dataclass(frozen=True)
class Study:
    """Fields every study shares; each study's Config adds its own."""
    preset: str = "paper"
    data: str = CIFAR_TRAIN        # the GANs' training images (seed 001: CIFAR-10; labels unused)
    train: str = CIFAR_TRAIN       # the probe's labelled split (the SVMs fit it)
    test: str = CIFAR_TEST         # the probe's scored split; also the held-out real images of `quality`
    wgan_loss: str = "wgan"        # wgan (Arjovsky's schedule) | wgan-no-warmup (no 100-step warm-up)
    pretrain_args: str = ""        # extra key=value words for every cell's pretraining
    probe: bool = True             # the linear probe of each cell's critic
    probe_steps: tuple[int, ...] = ()   # checkpoints probed (0 and the last always); empty = every one
    probe_args: str = ""           # extra key=value words for the curve stage (train_rows=, per_class=, ...)
    quality_samples: int = 2000    # generated and held-out real images per checkpoint (W estimate, diversity)
    inception_weights: str = ""    # a local pt_inception-2015-12-05 file: FID (never downloaded); '' = no FID
    fid_samples: int = 5000        # docs/protocol.md s.6's lower end
    build_dir: str = "build"
    tables_dir: str = "tables"
    cache_dir: str = "cache"
    data_note: str = ""            # said in the table header about the data (e.g. its encoding)
    device: str = "auto"


def check_study(cfg: Study) -> None:
    from .losses import LOSSES
    lookup(LOSSES, cfg.wgan_loss, "loss")
    if cfg.quality_samples < 2 or cfg.fid_samples < 2:
        raise ConfigError(f"quality_samples={cfg.quality_samples}, fid_samples={cfg.fid_samples}: each needs >= 2")
    if cfg.inception_weights and not Path(cfg.inception_weights).is_file():
        raise ConfigError(metrics.inception_notice(cfg.inception_weights).replace("FID is skipped",
                                                                                  "or leave it empty for no FID"))


def words(text: str) -> dict[str, str]:
    return split_overrides(text.split())


def scale_and_data_note(cfg, unit: str) -> str:
    """The intro's sentences on scale (any preset but paper is minutes of CPU per `unit`) and on the data."""
    scale = "" if cfg.preset == "paper" else (f" **{cfg.preset} scale**: minutes of CPU pretraining per {unit}, "
                                              "numbers show that the study runs, not what the paper found.")
    return scale + (f" Data: {cfg.data_note}." if cfg.data_note else "")


def root_of(cfg: Study) -> Path:
    return Path(cfg.build_dir) / cfg.preset


# ============================================================================ cells
@dataclass
class Cell:
    label: str
    run_dir: Path
    key: str
    diverged: dict | None = None    # {"step", "message"} when pretraining diverged
    extra: dict = dataclasses.field(default_factory=dict)   # what the study wants in its row

    @property
    def last(self) -> dict:
        """The run's last good state (last.pt, memory-mapped: no weights read)."""
        return runs.load_checkpoint(Path(self.run_dir) / runs.LAST, mmap=True)


def pretrain_values(cfg: Study, values: dict, data: str | None = None) -> dict:
    return {"preset": cfg.preset, "data": data or cfg.data, "cache_dir": cfg.cache_dir, "device": cfg.device,
            **values, **words(cfg.pretrain_args)}


def pretrain_cell(label: str, values: dict, root: Path) -> Cell:
    """Train (or reuse) the run of `values` in root/<model>-<key>; divergence becomes a record."""
    planned, key = pretrain.plan(build(pretrain.Config, "pretrain", values))
    run_cfg = dataclasses.replace(planned, run_dir=str(root / f"{planned.model}-{key}"))
    run_dir = Path(run_cfg.run_dir)
    diverged = runs.read_json(run_dir / DIVERGED)
    if diverged and diverged.get("key") == key and diverged.get("steps") == run_cfg.steps \
            and diverged.get("max_minutes") == run_cfg.max_minutes:
        print(f"study: {run_dir} diverged at step {diverged['step']} before (recorded); not trained again")
        return Cell(label, run_dir, key, diverged)
    if pretrain.is_done(run_cfg):
        print(f"study: {run_dir} is up to date")
        return Cell(label, run_dir, key)
    try:
        pretrain.run(run_cfg)
    except ConfigError as err:
        found = re.search(r"diverged at step (\d+)", str(err))
        if not found:
            raise
        record = {"key": key, "step": int(found[1]), "message": str(err), "steps": run_cfg.steps,
                  "max_minutes": run_cfg.max_minutes, "provenance": provenance()}
        atomic_write_json(run_dir / DIVERGED, record)
        print(f"study: {label} diverged at step {record['step']}; measured on the checkpoints it kept")
        return Cell(label, run_dir, key, record)
    (run_dir / DIVERGED).unlink(missing_ok=True)
    return Cell(label, run_dir, key)


# ============================================================================ training-log measures
LOG_KEYS = {"critic_loss": "d_loss", "generator_loss": "g_loss", "wasserstein_train": "wasserstein"}


def log_series(run_dir: Path) -> dict[str, tuple[list[int], list[float]]]:
    """{measure: (steps, values)} of the training log, for the logged keys present."""
    records = read_jsonl(Path(run_dir) / "log.jsonl")
    out = {}
    for name, key in LOG_KEYS.items():
        pairs = [(r["step"], r[key]) for r in records if key in r]
        if pairs:
            out[name] = ([s for s, _ in pairs], [v for _, v in pairs])
    return out


def end_value(values: list[float]) -> float:
    """Mean over the last tenth of the logged steps (at least one): the end of a noisy curve."""
    tail = values[-max(1, len(values) // 10):]
    return float(np.mean(tail))


# ============================================================================ quality at checkpoints
@dataclass
class QualityContext:
    """What every cell's quality measures share: held-out real images, the fixed feature net, Inception."""
    cfg: Study
    device: torch.device
    real: torch.Tensor               # n x 32 x 32 x 3 uint8 held-out real images
    fixed_net: nets.Critic
    real_variance: float             # mean per-dim variance of `real` in the fixed net's features
    inception: torch.nn.Module | None = None
    fid_stats: dict | None = None
    real_inception_variance: float | None = None
    key: str = ""


def fixed_feature_net(device) -> nets.Critic:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(FIXED_NET["seed"])
        _, critic = zoo.build_models(FIXED_NET["arch"], norm=FIXED_NET["norm"], width=FIXED_NET["width"])
    return critic.to(device).eval()


def quality_context(cfg: Study) -> QualityContext:
    from . import data
    device = pick_device(cfg.device)
    held = data.cached(cfg.test, size=32, cache_dir=cfg.cache_dir).images
    real = torch.from_numpy(held[metrics.subset(len(held), cfg.quality_samples, 1)])
    net = fixed_feature_net(device)
    variance = metrics.diversity(metrics.critic_features(net, real, device))["mean_variance"]
    weights = metrics.weights_fingerprint(cfg.inception_weights) if cfg.inception_weights else ""
    key = runs.artifact_key("quality", {"samples": cfg.quality_samples, "fid_samples": cfg.fid_samples,
                                        "fixed_net": FIXED_NET, "weights": weights},
                            heldout=data.source_id(cfg.test, 32), fid_real=data.source_id(cfg.data, 32) if weights else "")
    ctx = QualityContext(cfg, device, real, net, variance, key=key)
    if cfg.inception_weights:
        attach_inception(ctx, weights)
    return ctx


def attach_inception(ctx: QualityContext, weights_key: str) -> None:
    """Inception and the cached real statistics of the GANs' own training images (FID's usual reference)."""
    from . import data
    cfg = ctx.cfg
    ctx.inception = metrics.inception_extractor(cfg.inception_weights, ctx.device)
    pool = data.cached(cfg.data, size=32, cache_dir=cfg.cache_dir).images
    rows = metrics.subset(len(pool), cfg.fid_samples, 3)
    path = metrics.real_stats_path(cfg.cache_dir, data.source_id(cfg.data, 32), weights_key, len(rows), 0)
    feats: list[torch.Tensor] = []

    def compute():
        feats.append(metrics.inception_features(ctx.inception, torch.from_numpy(pool[rows]), ctx.device))
        return metrics.frechet_statistics(feats[0])
    ctx.fid_stats = metrics.load_or_compute_stats(path, compute, {"source": cfg.data, "num_samples": len(rows),
                                                                  "weights_sha1": weights_key})
    sigma = ctx.fid_stats["sigma"]
    ctx.real_inception_variance = float(np.trace(sigma) / len(sigma))


@torch.no_grad()
def checkpoint_quality(ctx: QualityContext, run_dir: Path, name: str) -> dict[str, Any]:
    cfg, device = ctx.cfg, ctx.device
    run_cfg, gen, critic, ckpt = runs.load_run(run_dir, name, str(device))
    n = max(cfg.quality_samples, cfg.fid_samples if ctx.inception is not None else 0)
    fake = metrics.generate(gen, n, run_cfg.z_dim, 0, device)                        # n x 32 x 32 x 3 uint8
    some = fake[:cfg.quality_samples]
    w = metrics.wasserstein_estimate(metrics.critic_scores(critic, ctx.real, device),
                                     metrics.critic_scores(critic, some, device))
    variance = metrics.diversity(metrics.critic_features(ctx.fixed_net, some, device))["mean_variance"]
    record = {"step": int(ckpt["step"]), "checkpoint": name, "wasserstein": w["estimate"],
              "diversity": variance / ctx.real_variance, "fid": None}
    if ctx.inception is not None:
        feats = metrics.inception_features(ctx.inception, fake, device)               # n x 2048
        record["fid"] = metrics.frechet_distance(metrics.frechet_statistics(feats), ctx.fid_stats)
        record["diversity_inception"] = float(feats.double().var(0).mean()) / ctx.real_inception_variance
    return record


def quality(ctx: QualityContext, cell: Cell) -> list[dict]:
    """One record per interval checkpoint, kept in <run>/quality-<key>.json (only new steps computed)."""
    path = Path(cell.run_dir) / f"quality-{ctx.key}.json"
    with building(path, wait=True):   # another study measuring this run: wait, then reuse its records
        saved = runs.read_json(path) or {}
        done = {r["step"]: r for r in saved.get("records", [])} if saved.get("key") == ctx.key else {}
        for step, ckpt in runs.interval_checkpoints(cell.run_dir):
            if step not in done:
                done[step] = checkpoint_quality(ctx, Path(cell.run_dir), ckpt.name)
                atomic_write_json(path, {"key": ctx.key, "run_key": cell.key, "records": sorted(done.values(),
                                         key=lambda r: r["step"]), "provenance": provenance()})
    return sorted(done.values(), key=lambda r: r["step"])


# ============================================================================ the linear probe
def probe(cfg: Study, cell: Cell) -> dict | None:
    """The critic's 400-per-class probe at `probe_steps` (0 = the untrained control, and the last)."""
    if not cfg.probe:
        return None
    steps = tuple(sorted({0, *cfg.probe_steps})) if cfg.probe_steps else ()
    values = {"preset": cfg.preset, "run": str(cell.run_dir), "train": cfg.train, "test": cfg.test,
              "cache_dir": cfg.cache_dir, "device": cfg.device, "steps": steps, **words(cfg.probe_args)}
    return json.loads(curve.run(build(curve.Config, "curve", values)).read_text())


# ============================================================================ one cell, measured
def measure(cfg: Study, ctx: QualityContext, cell: Cell) -> dict[str, Any]:
    """Everything a row and the figures need: log series, quality records, probe curve, end values."""
    series = log_series(cell.run_dir)
    records = quality(ctx, cell)
    probed = probe(cfg, cell)
    points = (probed or {}).get("points") or []
    last = records[-1] if records else {}
    out = {"series": series, "quality": records, "probe": probed,
           "end": {name: end_value(values) for name, (_, values) in series.items()}}
    out["end"].update(wasserstein=last.get("wasserstein"), diversity=last.get("diversity"), fid=last.get("fid"),
                      diversity_inception=last.get("diversity_inception"), step=last.get("step"))
    control = next((p for p in points if p["step"] == 0), None)
    final = points[-1] if points and points[-1]["step"] != 0 else None
    out["end"].update(probe=final, control=control)
    return out


# ============================================================================ table cells
def fmt(value: float | None, spec: str = ".3g") -> str:
    return "n/a" if value is None else format(value, spec)


def percent(point: dict | None) -> str:
    return "-" if point is None else f"{100 * point['mean']:.1f}% (+-{100 * point['ci95']:.1f})"


def gain(end: dict) -> str:
    if end.get("probe") is None or end.get("control") is None:
        return "-"
    return f"{100 * (end['probe']['mean'] - end['control']['mean']):+.1f}"


def status(cell: Cell, end: dict) -> str:
    state = cell.last
    if cell.diverged:
        return (f"diverged at step {cell.diverged['step']} (non-finite loss or weights); measured at its last good "
                f"checkpoint, step {end.get('step')}")
    done = runs.finished_record(cell.run_dir) or {}
    why = {"steps": "all steps", "max_minutes": "time budget spent"}.get(done.get("reason"), "unfinished")
    return f"{state['step']} G steps ({why})"


def split_name(spec: str) -> str:
    from .tables import split_name as name
    return name(spec)


def how_produced(cfg: Study, cell: Cell, measured: dict) -> str:
    """Data, steps, optimizer, hardware, time and commits of the row, in one line."""
    from .tables import duration
    state = cell.last
    run_cfg, info, prov = state.get("config") or {}, state.get("data") or {}, state.get("provenance") or {}
    text = (f"{run_cfg.get('arch')} G/D, loss {run_cfg.get('loss')}, {run_cfg.get('optimizer')} lr "
            f"{run_cfg.get('lr_d')}/{run_cfg.get('lr_g')} (D/G), batch {run_cfg.get('batch_size')}, n_critic "
            f"{run_cfg.get('n_critic')}, width {run_cfg.get('width')}, seed {run_cfg.get('seed')}; trained on "
            f"{split_name(info.get('spec', '?'))} ({info.get('num_images', '?')} images, labels unused): "
            f"{state.get('step')} G steps, {state.get('batches')} critic batches, {state.get('precision')}, "
            f"{duration(state.get('seconds') or 0)} on {prov.get('hardware', '?')}, pretrain commit "
            f"{prov.get('git_commit', '?')}; run {Path(cell.run_dir).name}")
    text += (f"; quality: {cfg.quality_samples} generated vs held-out {split_name(cfg.test)}"
             + (f", FID on {cfg.fid_samples}" if cfg.inception_weights else ""))
    probed = measured.get("probe")
    if probed:
        pc = probed.get("config") or {}
        text += (f"; probe: {pc.get('per_class')} per class, {pc.get('final_draws')} draws, C bracketed on "
                 f"{pc.get('val_size')} held out, features of {pc.get('train_rows') or 'all'} rows of "
                 f"{split_name(cfg.train)}, scored on {pc.get('test_rows') or 'all'} rows of {split_name(cfg.test)}; "
                 f"probe commit {(probed.get('provenance') or {}).get('git_commit', '?')}")
    return text


QUALITY_NOTE = ("Wasserstein estimate: E[D(real)] - E[D(fake)] of the final critic on held-out real images (for a "
                "BCE critic, the logit gap). Diversity: mean per-dimension variance of generated images in the "
                "features of a fixed random-weight DCGAN critic (seed 0, width 0.5, every layer globally max-pooled, "
                "896 dims), divided by the same for held-out real images (1 = as varied as real images, ~0 = "
                "collapse). Critic and generator losses: mean over the last tenth of the logged training steps. "
                "Linear probe: 400-per-class L2-SVM accuracy of the critic's 4x4-pooled features, mean +- 1.96 std "
                "over the draws; the untrained control is the same critic at step 0.")


# ============================================================================ figures
def plot_measure(curves: dict[str, tuple[list, list]], styles: dict[str, dict], ylabel: str, title: str,
                 path: Path, dense: bool) -> Path:
    """Every cell's curve of one measure on shared axes (dense log series are smoothed)."""
    from .plots import _pyplot, save_figure, smooth
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for label, (steps, values) in curves.items():
        y = np.asarray([np.nan if v is None else v for v in values], dtype=float)
        if dense and len(y) > 3:
            y = smooth(np.nan_to_num(y))
        marker = None if dense and len(y) > 3 else "o"
        ax.plot(steps, y, label=label, marker=marker, ms=3, lw=1.4, **styles.get(label, {}))
    ax.set_xlabel("generator step")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=3)
    return save_figure(fig, path)


FIGURES = {  # measure -> (y label, dense log series?)
    "critic_loss": ("critic loss (training batches, smoothed)", True),
    "generator_loss": ("generator loss (training batches, smoothed)", True),
    "wasserstein_train": ("Wasserstein estimate (training batches, smoothed)", True),
    "wasserstein": ("Wasserstein estimate (held-out real images)", False),
    "diversity": ("diversity (fixed random features, generated / real)", False),
    "fid": ("FID (lower is better)", False),
    "probe": ("linear probe, 400 per class (%)", False),
}


def measure_curves(measured: dict, name: str) -> tuple[list, list] | None:
    if name in measured["series"]:
        return measured["series"][name]
    if name == "probe":
        points = (measured.get("probe") or {}).get("points") or []
        return ([p["step"] for p in points], [100 * p["mean"] for p in points]) if points else None
    records = [r for r in measured["quality"] if r.get(name) is not None]
    return ([r["step"] for r in records], [r[name] for r in records]) if records else None


def plot_all(cells: list[Cell], measured: list[dict], styles: dict, out_dir: Path, title: str) -> list[Path]:
    """One figure per measure with every cell on it; measures no cell has are skipped."""
    written = []
    for name, (ylabel, dense) in FIGURES.items():
        curves = {c.label: got for c, m in zip(cells, measured) if (got := measure_curves(m, name))}
        if curves:
            written.append(plot_measure(curves, styles, ylabel, f"{title}: {ylabel}", out_dir / f"{name}.png", dense))
    return written


def sample_mosaic(grid: list[list[Cell | None]], out_png: Path, title: str, row_names: list[str],
                  col_names: list[str]) -> Path:
    """Each cell's latest sample grid, rows x cols; a diverged cell's title says so."""
    from PIL import Image

    from .plots import _pyplot, save_figure
    from .report import latest_sample_grid
    plt = _pyplot()
    rows, cols = len(grid), len(grid[0])
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.4 * rows), squeeze=False)
    for r, row in enumerate(grid):
        for c, cell in enumerate(row):
            ax = axes[r][c]
            ax.axis("off")
            png = latest_sample_grid(Path(cell.run_dir)) if cell else None
            if png is not None:
                with Image.open(png) as img:
                    ax.imshow(np.asarray(img.convert("RGB")), interpolation="nearest")
            note = f" (diverged at {cell.diverged['step']})" if cell and cell.diverged else ""
            ax.set_title(" x ".join(n for n in (row_names[r], col_names[c]) if n) + note + (f"\nstep {png.stem[5:].lstrip('0') or 0}"
                                                                     if png else ""), fontsize=8)
    fig.suptitle(title)
    return save_figure(fig, out_png)


# ============================================================================ the table
def write_table(rows: list[dict], out_dir: Path, name: str, title: str, intro: str) -> Path:
    """<out_dir>/<name>.md (with `intro`), .csv and .tex (without the long 'how produced')."""
    import pandas as pd
    table = pd.DataFrame(rows)
    head = f"# {title}\n\n{intro}\n\nTable written by `replearn` at commit {git_commit()}.\n\n"
    atomic_write_text(out_dir / f"{name}.md", head + table.to_markdown(index=False) + "\n")
    atomic_write_text(out_dir / f"{name}.csv", table.to_csv(index=False))
    short = table.drop(columns=[c for c in ("how produced",) if c in table])
    atomic_write_text(out_dir / f"{name}.tex", short.to_latex(index=False))
    print(short.to_markdown(index=False))
    return out_dir / f"{name}.md"


def figure_links(paths: list[Path], out_dir: Path) -> str:
    return " ".join(f"[{p.stem}]({p.relative_to(out_dir).as_posix()})" for p in paths)


def study_record(cfg, out_dir: Path, name: str, rows: list[dict]) -> None:
    """<out_dir>/<name>/study.json: the resolved config and the rows, for other tools."""
    atomic_write_json(out_dir / name / "study.json", {"config": to_dict(cfg), "rows": rows, "provenance": provenance()})
