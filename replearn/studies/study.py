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

Equal work: every GAN of a study trains `steps` generator steps and is measured at its checkpoint of
that step (a run trained further before, e.g. under an older time budget, is measured at that
checkpoint too). `max_minutes` is only a safety cap: a GAN that hits it before `steps` is measured
where it stopped and its row says it is not comparable. Each study cell trains one GAN per seed in
`seeds`; the table (study_tables.py) reports the mean and spread over them.

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

from ..models import nets, zoo
from ..train import metrics, pretrain, runs
from ..probe import curve
from ..core.config import ConfigError, build, words
from ..core.stage import artifact_key
from ..core.lock import building
from ..core.utils import atomic_write_json, lookup, make_registry, pick_device, provenance, read_jsonl

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
    # equal work: generator steps of every GAN, measured at that step's checkpoint. 15,600 = 100 epochs of
    # CIFAR-10's 50,000 images at batch 64 with 5 critic batches per G step (seed 001's "100epoch")
    steps: int = 15600
    max_minutes: float = 0.0       # safety cap on each GAN's training minutes (0: none); hitting it before
                                   # `steps` makes the row "not comparable"
    seeds: tuple[int, ...] = (0, 1, 2)   # one GAN per seed and cell: each row's mean and spread over seeds
    pretrain_args: str = ""        # extra key=value words for every cell's pretraining (not steps/max_minutes/seed)
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


# pretraining keys a study sets itself, so that every cell gets the same work and its own seeds
STUDY_KEYS = {"steps": "steps=", "max_minutes": "max_minutes=", "seed": "seeds="}


def check_pretrain_args(text: str, stage: str, names: dict[str, str] = STUDY_KEYS) -> None:
    clash = [k for k in words(text) if k in names]
    if clash:
        raise ConfigError(f"{stage}: pretrain_args sets {', '.join(clash)}; the study sets "
                          f"{', '.join(clash)} of every GAN itself: use its {', '.join(names[k] for k in clash)} instead")


def check_seeds(seeds: tuple[int, ...], stage: str) -> None:
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"{stage}: seeds={seeds!r} needs one or more distinct seeds (e.g. seeds=0,1,2)")


def check_study(cfg: Study) -> None:
    from ..models.losses import LOSSES
    from ..core.config import require
    lookup(LOSSES, cfg.wgan_loss, "loss")
    require(cfg, positive=("steps",), non_negative=("max_minutes",), stage=type(cfg).__module__.rsplit(".", 1)[-1])
    check_seeds(cfg.seeds, "study")
    check_pretrain_args(cfg.pretrain_args, "study")
    if cfg.quality_samples < 2 or cfg.fid_samples < 2:
        raise ConfigError(f"quality_samples={cfg.quality_samples}, fid_samples={cfg.fid_samples}: each needs >= 2")
    if cfg.inception_weights and not Path(cfg.inception_weights).is_file():
        raise ConfigError(metrics.inception_notice(cfg.inception_weights).replace("FID is skipped",
                                                                                  "or leave it empty for no FID"))


def scale_and_data_note(cfg, unit: str, steps: int | None = None, seeds: tuple[int, ...] | None = None) -> str:
    """The intro's sentences on the work per `unit` and scale (any preset but paper is CPU-sized) and the data."""
    steps, seeds = steps or cfg.steps, seeds or cfg.seeds
    cap = getattr(cfg, "max_minutes", 0) or getattr(cfg, "gan_max_minutes", 0)
    work = (f" Every {unit} trains {steps} generator steps per GAN ({len(seeds)} seed(s): "
            f"{', '.join(map(str, seeds))})" + (f", with a safety cap of {cap:g} training minutes per GAN; a GAN that "
                                                 "hits it first is marked not comparable" if cap else "") + ".")
    scale = "" if cfg.preset == "paper" else (f" **{cfg.preset} scale**: CPU-sized, numbers show that the study "
                                              "runs, not what the paper found.")
    return work + scale + (f" Data: {cfg.data_note}." if cfg.data_note else "")


def root_of(cfg: Study) -> Path:
    return Path(cfg.build_dir) / cfg.preset


# ============================================================================ cells
@dataclass
class Cell:
    """One GAN of a study cell (one seed), measured at `end_name`: its checkpoint of step `target` when it
    has one, else the last state it reached (then `problems` says why the row is not comparable)."""
    label: str
    run_dir: Path
    key: str
    seed: int = 0
    target: int = 0                 # the study's steps
    diverged: dict | None = None    # {"step", "message"} when pretraining diverged
    end_name: str = runs.LAST
    end_step: int = 0
    extra: dict = dataclasses.field(default_factory=dict)   # what the study wants in its row

    @property
    def end(self) -> dict:
        """The measured checkpoint (memory-mapped: no weights read): step, batches, seconds, config, provenance."""
        return runs.load_checkpoint(Path(self.run_dir) / self.end_name, mmap=True)

    @property
    def comparable(self) -> bool:
        return not self.problems()

    def problems(self) -> list[str]:
        """Why this GAN did not do the study's work (empty: it trained exactly `target` steps)."""
        if self.diverged:
            return [f"seed {self.seed} diverged at step {self.diverged['step']}, measured at step {self.end_step}"]
        out = []
        if self.end_step != self.target:
            done = runs.finished_record(self.run_dir) or {}
            why = ("time cap max_minutes hit" if done.get("reason") == "max_minutes" and done.get("step", 0) < self.target
                   else "no checkpoint at that step")
            out.append(f"seed {self.seed} stopped at step {self.end_step} of {self.target} ({why})")
        cfg = self.end.get("config") or {}
        if cfg.get("lr_decay") == "linear" and cfg.get("steps") != self.target:
            out.append(f"seed {self.seed}'s learning rate decayed over {cfg.get('steps')} steps, not {self.target}")
        return out


def end_checkpoint(run_dir: Path, target: int) -> tuple[str, int]:
    """(name, step) of the state to measure: the interval checkpoint at `target`, else the latest one
    before it (a run stopped early, or one trained further with no checkpoint at `target`)."""
    kept = [(step, path.name) for step, path in runs.interval_checkpoints(run_dir) if step <= target]
    last = Path(run_dir) / runs.LAST
    last_step = int(runs.load_checkpoint(last, mmap=True)["step"]) if last.exists() else -1
    if kept and kept[-1][0] == target:
        return kept[-1][1], target
    if 0 <= last_step <= target and (not kept or last_step > kept[-1][0]):
        return runs.LAST, last_step
    if kept:
        return kept[-1][1], kept[-1][0]
    raise ConfigError(f"{run_dir}: no checkpoint at or before step {target} to measure")


def pretrain_values(cfg: Study, values: dict, data: str | None = None, seed: int = 0) -> dict:
    """One GAN's pretrain keys: the study's data and preset, the cell's values, and the study's steps,
    time cap and this seed (pretrain_args cannot set those three)."""
    return {"preset": cfg.preset, "data": data or cfg.data, "cache_dir": cfg.cache_dir, "device": cfg.device,
            **values, **words(cfg.pretrain_args), "steps": cfg.steps, "max_minutes": cfg.max_minutes, "seed": seed}


def pretrain_cell(label: str, values: dict, root: Path) -> Cell:
    """Train (or reuse) the run of `values` in root/<model>-<key>; divergence becomes a record. The run's
    key leaves out steps and max_minutes, so a run trained further before is reused and measured at
    `values["steps"]`."""
    planned, key = pretrain.plan(build(pretrain.Config, "pretrain", values))
    run_cfg = dataclasses.replace(planned, run_dir=str(root / f"{planned.model}-{key}"))
    run_dir = Path(run_cfg.run_dir)
    cell = Cell(label, run_dir, key, seed=run_cfg.seed, target=run_cfg.steps)
    diverged = runs.read_json(run_dir / DIVERGED)
    if diverged and diverged.get("key") == key and diverged.get("steps") == run_cfg.steps \
            and diverged.get("max_minutes") == run_cfg.max_minutes:
        print(f"study: {run_dir} diverged at step {diverged['step']} before (recorded); not trained again")
        cell.diverged = diverged
    else:   # a finished run is reused by the pretrain stage
        cell.diverged = train_or_record(run_cfg, key, label)
    cell.end_name, cell.end_step = end_checkpoint(run_dir, run_cfg.steps)
    return cell


def train_or_record(run_cfg: pretrain.Config, key: str, label: str) -> dict | None:
    """Pretrain; a divergence is written to <run>/diverged.json and returned (None: trained)."""
    run_dir = Path(run_cfg.run_dir)
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
        return record
    (run_dir / DIVERGED).unlink(missing_ok=True)
    return None


def seed_cells(cfg: Study, label: str, values: dict, root: Path) -> list[Cell]:
    """One GAN per seed of `cfg.seeds` for one study cell."""
    return [pretrain_cell(label, pretrain_values(cfg, values, seed=seed), root) for seed in cfg.seeds]


# ============================================================================ training-log measures
LOG_KEYS = {"critic_loss": "d_loss", "generator_loss": "g_loss", "wasserstein_train": "wasserstein"}


def log_series(run_dir: Path, through: int | None = None) -> dict[str, tuple[list[int], list[float]]]:
    """{measure: (steps, values)} of the training log up to step `through`, for the logged keys present."""
    records = [r for r in read_jsonl(Path(run_dir) / "log.jsonl") if through is None or r.get("step", 0) <= through]
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
    from .. import data
    device = pick_device(cfg.device)
    held = data.cached(cfg.test, size=32, cache_dir=cfg.cache_dir).images
    real = torch.from_numpy(held[metrics.subset(len(held), cfg.quality_samples, 1)])
    net = fixed_feature_net(device)
    variance = metrics.diversity(metrics.critic_features(net, real, device))["mean_variance"]
    weights = metrics.weights_fingerprint(cfg.inception_weights) if cfg.inception_weights else ""
    key = artifact_key("quality", {"samples": cfg.quality_samples, "fid_samples": cfg.fid_samples,
                                        "fixed_net": FIXED_NET, "weights": weights},
                            heldout=data.source_id(cfg.test, 32), fid_real=data.source_id(cfg.data, 32) if weights else "")
    ctx = QualityContext(cfg, device, real, net, variance, key=key)
    if cfg.inception_weights:
        attach_inception(ctx, weights)
    return ctx


def attach_inception(ctx: QualityContext, weights_key: str) -> None:
    """Inception and the cached real statistics of the GANs' own training images (FID's usual reference)."""
    from .. import data
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
    """One record per interval checkpoint up to the measured one, kept in <run>/quality-<key>.json (only
    new steps computed; records of later checkpoints, from a run trained further, are kept but not used)."""
    path = Path(cell.run_dir) / f"quality-{ctx.key}.json"
    wanted = [(step, ckpt.name) for step, ckpt in runs.interval_checkpoints(cell.run_dir) if step < cell.end_step]
    wanted.append((cell.end_step, cell.end_name))
    with building(path, wait=True):   # another study measuring this run: wait, then reuse its records
        saved = runs.read_json(path) or {}
        done = {r["step"]: r for r in saved.get("records", [])} if saved.get("key") == ctx.key else {}
        for step, name in wanted:
            if step not in done:
                done[step] = checkpoint_quality(ctx, Path(cell.run_dir), name)
                atomic_write_json(path, {"key": ctx.key, "run_key": cell.key, "records": sorted(done.values(),
                                         key=lambda r: r["step"]), "provenance": provenance()})
    return sorted((r for r in done.values() if r["step"] <= cell.end_step), key=lambda r: r["step"])


# ============================================================================ the linear probe
def probe(cfg: Study, cell: Cell) -> dict | None:
    """The critic's 400-per-class probe at `probe_steps` (0 = the untrained control) and at the measured step."""
    if not cfg.probe:
        return None
    steps = tuple(sorted({0, *cfg.probe_steps, cell.end_step})) if cfg.probe_steps else ()
    values = {"preset": cfg.preset, "run": str(cell.run_dir), "train": cfg.train, "test": cfg.test,
              "cache_dir": cfg.cache_dir, "device": cfg.device, "steps": steps, **words(cfg.probe_args),
              "through": cell.end_step}
    return json.loads(curve.run(build(curve.Config, "curve", values)).read_text())


def point_details(point: dict | None) -> dict:
    """The probe point's test size and unconverged fits, from its SVM results file ({} when it is gone)."""
    res = runs.read_json(Path(point["results"])) if point and point.get("results") else None
    k = ((res or {}).get("settings") or {}).get("400") or {}
    solver = k.get("solver") or {}
    return {"test_size": k.get("test_size"), "not_converged": len(solver.get("not_converged") or []),
            "fits": solver.get("fits")} if k else {}


# ============================================================================ one cell, measured
def measure(cfg: Study, ctx: QualityContext, cell: Cell) -> dict[str, Any]:
    """Everything a row and the figures need: log series, quality records, probe curve, end values."""
    series = log_series(cell.run_dir, cell.end_step)
    records = quality(ctx, cell)
    probed = probe(cfg, cell)
    points = (probed or {}).get("points") or []
    last = records[-1] if records else {}
    out = {"series": series, "quality": records, "probe": probed,
           "end": {name: end_value(values) for name, (_, values) in series.items()}}
    out["end"].update(wasserstein=last.get("wasserstein"), diversity=last.get("diversity"), fid=last.get("fid"),
                      diversity_inception=last.get("diversity_inception"), step=last.get("step"))
    control = next((p for p in points if p["step"] == 0), None)
    final = next((p for p in points if p["step"] == cell.end_step and p["step"] != 0), None)
    out["end"].update(probe=final, control=control, probe_details=point_details(final),
                      control_details=point_details(control))
    return out


@dataclass
class StudyCell:
    """One cell of a study (one table row): its GANs, one per seed, each measured."""
    label: str
    cells: list[Cell]
    measured: list[dict]

    @property
    def first(self) -> Cell:
        return self.cells[0]

    def ends(self, name: str) -> list:
        """The per-seed end values of one measure (None where a seed has none)."""
        return [m["end"].get(name) for m in self.measured]


def measure_cell(cfg: Study, ctx: QualityContext, label: str, values: dict, root: Path) -> StudyCell:
    cells = seed_cells(cfg, label, values, root)
    return StudyCell(label, cells, [measure(cfg, ctx, c) for c in cells])


# BCE (DCGAN) and hinge critics have no Wasserstein reading: E[D(real)] - E[D(fake)] is their score (logit) gap
def is_wasserstein_critic(cell: Cell) -> bool:
    return str((cell.end.get("config") or {}).get("loss", "")).startswith("wgan")


# ============================================================================ figures
def plot_measure(curves: dict[str, list[tuple[list, list]]], styles: dict[str, dict], ylabel: str, title: str,
                 path: Path, dense: bool) -> Path:
    """Every cell's curves of one measure on shared axes, one line per seed in the cell's style (dense log
    series are smoothed)."""
    from ..core.plots import pyplot, save_figure, smooth
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for label, seeds in curves.items():
        style = styles.get(label, {})
        for k, (steps, values) in enumerate(seeds):
            y = np.asarray([np.nan if v is None else v for v in values], dtype=float)
            if dense and len(y) > 3:
                y = smooth(np.nan_to_num(y))
            marker = None if dense and len(y) > 3 else "o"
            ax.plot(steps, y, label=f"{label} ({len(seeds)} seed{'s' if len(seeds) > 1 else ''})" if k == 0 else None,
                    marker=marker, ms=3, lw=1.2, alpha=0.85, **style)
    ax.set_xlabel("generator step")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=3)
    return save_figure(fig, path)


# figure name -> (measure, y label, what the title adds, dense log series?, which critics: "wgan", "other" or
# None for all). The Wasserstein figures hold WGAN critics only; BCE/hinge critics' E[D(real)] - E[D(fake)]
# is a logit gap, not a distance, and gets figures of its own
FIGURES = {
    "critic_loss": ("critic_loss", "critic loss", "training batches, smoothed", True, None),
    "generator_loss": ("generator_loss", "generator loss", "training batches, smoothed", True, None),
    "wasserstein_train": ("wasserstein_train", "Wasserstein estimate", "WGAN critics only; training batches, smoothed",
                          True, "wgan"),
    "wasserstein": ("wasserstein", "Wasserstein estimate", "WGAN critics only; held-out real images", False, "wgan"),
    "logit_gap_train": ("wasserstein_train", "logit gap (not a Wasserstein estimate)",
                        "E[D(real)] - E[D(fake)] of BCE/hinge critics; training batches, smoothed", True, "other"),
    "logit_gap": ("wasserstein", "logit gap (not a Wasserstein estimate)",
                  "E[D(real)] - E[D(fake)] of BCE/hinge critics; held-out real images", False, "other"),
    "diversity": ("diversity", "diversity (generated / real)", "variance in fixed random features", False, None),
    "fid": ("fid", "FID", "lower is better", False, None),
    "probe": ("probe", "linear probe (%)", "400 per class, L2-SVM on the critic's features", False, None),
}


def measure_curves(measured: dict, name: str) -> tuple[list, list] | None:
    if name in measured["series"]:
        return measured["series"][name]
    if name == "probe":
        points = (measured.get("probe") or {}).get("points") or []
        return ([p["step"] for p in points], [100 * p["mean"] for p in points]) if points else None
    records = [r for r in measured["quality"] if r.get(name) is not None]
    return ([r["step"] for r in records], [r[name] for r in records]) if records else None


def critic_kind(sc: StudyCell) -> str:
    return "wgan" if is_wasserstein_critic(sc.first) else "other"


def plot_all(study_cells: list[StudyCell], styles: dict, out_dir: Path, title: str) -> list[Path]:
    """One figure per measure with every cell (each seed a line) on it; figures no cell has are skipped."""
    from ..core.plots import pyplot
    colours = pyplot().rcParams["axes.prop_cycle"].by_key()["color"]   # one colour per cell in every figure
    styles = {sc.label: {"color": colours[i % len(colours)], **{k: v for k, v in styles.get(sc.label, {}).items()
                                                               if v is not None}} for i, sc in enumerate(study_cells)}
    written = []
    for fig_name, (name, ylabel, note, dense, critics) in FIGURES.items():
        curves = {}
        for sc in study_cells:
            if critics and critic_kind(sc) != critics:
                continue
            seeds = [got for m in sc.measured if (got := measure_curves(m, name))]
            if seeds:
                curves[sc.label] = seeds
        if curves:
            written.append(plot_measure(curves, styles, ylabel, f"{title}: {ylabel}\n({note})",
                                        out_dir / f"{fig_name}.png", dense))
    return written


def sample_grid_at(run_dir: Path, step: int) -> Path | None:
    """samples/step_<s>.png with the highest s <= step (the measured state's samples, or the nearest before)."""
    grids = [p for p in sorted((Path(run_dir) / "samples").glob("step_*.png")) if int(p.stem.split("_")[-1]) <= step]
    return grids[-1] if grids else None


def sample_mosaic(grid: list[list[Cell | None]], out_png: Path, title: str, row_names: list[str],
                  col_names: list[str]) -> Path:
    """Each cell's sample grid at its measured step, rows x cols; a diverged cell's title says so."""
    from PIL import Image

    from ..core.plots import pyplot, save_figure
    plt = pyplot()
    rows, cols = len(grid), len(grid[0])
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.4 * rows), squeeze=False)
    for r, row in enumerate(grid):
        for c, cell in enumerate(row):
            ax = axes[r][c]
            ax.axis("off")
            png = sample_grid_at(Path(cell.run_dir), cell.end_step) if cell else None
            if png is not None:
                with Image.open(png) as img:
                    ax.imshow(np.asarray(img.convert("RGB")), interpolation="nearest")
            note = f" (diverged at {cell.diverged['step']})" if cell and cell.diverged else ""
            name = " x ".join(n for n in (row_names[r], col_names[c]) if n)
            where = f"\nseed {cell.seed}, step {int(png.stem.split('_')[-1])}" if png else ""
            ax.set_title(name + note + where, fontsize=8)
    fig.suptitle(title)
    return save_figure(fig, out_png)


def figure_links(paths: list[Path], out_dir: Path) -> str:
    return " ".join(f"[{p.stem}]({p.relative_to(out_dir).as_posix()})" for p in paths)
