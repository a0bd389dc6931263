"""Generator quality at checkpoints: FID, the critic's Wasserstein estimate, diversity, nearest neighbours.

    python -m replearn evaluate run=build/<preset>/wgan-gp-<key>                       # the last checkpoint
    python -m replearn evaluate run=build/<preset>/wgan-gp-<key> checkpoint=all preset=paper \
        inception_weights=/data/pt_inception-2015-12-05-6726825d.pth

Writes into the run folder:
    evaluate.json            one record per evaluated step (a rerun replaces that step's record), atomic
    nearest/<space>_step_<step>.png   generated images beside their nearest training images
    metrics_vs_step.png      FID / Wasserstein estimate / diversity against step (two or more steps)

FID needs the standard Inception weights as a local file (`inception_weights`); without it the
record says why (`fid_unavailable`) and every other number is still computed, unless
`require_fid=true`. Real FID statistics are cached in `cache_dir` under a name that carries the
source, the weights' hash, the count and the seed.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import metrics, runs
from ..core.config import ConfigError, register_check, register_preset, require, to_dict, validate
from ..core.lock import building
from ..core.plots import plot_metrics_vs_step, plot_neighbour_grid
from ..core.utils import atomic_write_json, pick_device, provenance

NN_SPACES = ("pixel", "critic", "both")


@dataclass(frozen=True)
class Config:
    run: str = ""          # a pretrain run folder (build/<preset>/<model>-<key>)
    checkpoint: str = "last.pt"      # a checkpoint in the run folder, or `all` (every ckpt_*.pt and last.pt)
    real: str = ""                   # FID reference images; '' = the run's training data (FID's usual reference)
    heldout: str = ""                # real images for E[D(real)] - E[D(fake)]; '' = `real` (then not held out: flagged)
    num_samples: int = 5000          # generated and real images for FID: docs/protocol.md s.6's lower end (paper preset: 50k)
    critic_samples: int = 2000       # per side for the Wasserstein estimate: std error ~ std(D) / 45
    diversity_samples: int = 1000    # pairwise distances cost n^2: 1000 gives ~500k pairs, plenty for a mean
    nn_queries: int = 16             # generated images (grid rows) searched for nearest training images
    nn_k: int = 5                    # nearest training images shown per generated image
    nn_space: str = "pixel"          # pixel (copying is a pixel matter) | critic (semantic) | both
    nn_bank: int = 0                 # training images searched; 0 = all (a sample would hide a copy)
    inception_weights: str = "weights/pt_inception-2015-12-05-6726825d.pth"   # local copy; never downloaded
    require_fid: bool = False        # true: missing Inception weights is an error, not a notice
    cache_dir: str = ""              # image caches and real FID statistics; '' = the run's cache_dir
    device: str = "auto"
    batch_size: int = 256            # images per forward pass (Inception runs at 1/4 of it: 299x299 inside)
    seed: int = 0                    # z draws and real subsets: the same for every checkpoint, so steps compare
    preset: str = ""


register_preset("smoke", "evaluate", num_samples=256, critic_samples=256, diversity_samples=128, nn_queries=8,
                nn_bank=5000)
register_preset("paper", "evaluate", num_samples=50000, critic_samples=10000, diversity_samples=2000)
# seed 003: FID of 5,000 generated images (the defaults) at each of its checkpoints (pretrain preset seed003)
register_preset("seed003", "evaluate")
# tiny: a few seconds per checkpoint (numbers mean nothing), for tests and the tiny chain
register_preset("tiny", "evaluate", num_samples=64, critic_samples=64, diversity_samples=32, nn_queries=4, nn_k=3,
                nn_bank=500)


# ============================================================================ inputs
@register_check(Config)
def check_config(cfg: Config) -> None:
    if cfg.nn_space not in NN_SPACES:
        raise ConfigError(f"unknown nn_space {cfg.nn_space!r}; choose from: {', '.join(NN_SPACES)}")
    counts = dict(num_samples=cfg.num_samples, critic_samples=cfg.critic_samples,
                  diversity_samples=cfg.diversity_samples, nn_queries=cfg.nn_queries, nn_k=cfg.nn_k)
    small = [f"{k}={v}" for k, v in counts.items() if v < 2]
    if small:
        raise ConfigError(f"{', '.join(small)}: each needs at least 2 images")
    require(cfg, positive=("batch_size",), non_negative=("nn_bank",))


def checkpoint_names(run_dir: Path, which: str) -> list[str]:
    """`all`: every interval checkpoint in step order, then last.pt (deduplicated by step later)."""
    if not run_dir.is_dir():
        raise ConfigError(f"run folder not found: {run_dir} (run `replearn pretrain run_dir={run_dir}` first)")
    if which != "all":
        if not (run_dir / which).exists():
            found = sorted(p.name for p in run_dir.glob("*.pt"))
            raise ConfigError(f"checkpoint {run_dir / which} not found; choose from: {', '.join(found) or 'none'}, all")
        return [which]
    names = sorted(p.name for p in run_dir.glob("ckpt_*.pt"))
    last = run_dir / "last.pt"
    if last.exists() and f"ckpt_{saved_step(last):07d}.pt" not in names:   # last.pt is newer than any interval
        names.append("last.pt")
    if not names:
        raise ConfigError(f"no checkpoints in {run_dir} (run `replearn pretrain run_dir={run_dir}` first)")
    return names


def saved_checkpoint(path: Path) -> dict:
    """The checkpoint dict, memory-mapped: reading its step or config does not load the weights.
    Loaded without running code from the file (refused in one line)."""
    return runs.load_checkpoint(path, mmap=True)


def saved_step(path: Path) -> int:
    return int(saved_checkpoint(path)["step"])


@dataclass
class Context:
    """What every checkpoint's evaluation shares: images, Inception and the real statistics."""
    cfg: Config
    run_dir: Path
    device: torch.device
    train: torch.Tensor                 # N x H x W x 3 uint8: the run's training images (NN bank)
    train_rows: np.ndarray              # rows of `train` searched for neighbours
    heldout: torch.Tensor               # critic_samples x H x W x 3 uint8
    heldout_is_training_data: bool
    diversity_real: torch.Tensor        # diversity_samples real images (the reference spread)
    real_spec: str
    inception: torch.nn.Module | None = None
    real_stats: dict | None = None
    fid_unavailable: str = ""
    fid_stats_file: str = ""


def load_images(spec: str, size: int, cache_dir: str) -> torch.Tensor:
    from .. import data
    return torch.from_numpy(data.cached(spec, size=size, cache_dir=cache_dir).images)


def build_context(cfg: Config, run_dir: Path, run_cfg) -> Context:
    cache_dir = cfg.cache_dir or run_cfg.cache_dir
    train = load_images(run_cfg.data, run_cfg.image_size, cache_dir)
    real_spec = cfg.real or run_cfg.data
    real = train if real_spec == run_cfg.data else load_images(real_spec, run_cfg.image_size, cache_dir)
    heldout_spec = cfg.heldout or real_spec
    heldout = real if heldout_spec == real_spec else load_images(heldout_spec, run_cfg.image_size, cache_dir)
    ctx = Context(cfg, run_dir, pick_device(cfg.device), train,
                  train_rows=metrics.subset(len(train), cfg.nn_bank or len(train), cfg.seed),
                  heldout=heldout[metrics.subset(len(heldout), cfg.critic_samples, cfg.seed + 1)],
                  heldout_is_training_data=heldout_spec == run_cfg.data,
                  diversity_real=heldout[metrics.subset(len(heldout), cfg.diversity_samples, cfg.seed + 2)],
                  real_spec=real_spec)
    attach_fid_reference(ctx, real, run_cfg.image_size, cache_dir)
    return ctx


def attach_fid_reference(ctx: Context, real: torch.Tensor, size: int, cache_dir: str) -> None:
    """Inception + cached real statistics, or the one-line reason FID is skipped."""
    from .. import data
    cfg = ctx.cfg
    try:
        ctx.inception = metrics.inception_extractor(cfg.inception_weights, ctx.device)
    except ConfigError as err:
        if cfg.require_fid:
            raise
        ctx.fid_unavailable = str(err)
        print(f"evaluate: {err}")
        return
    weights_key = metrics.weights_fingerprint(cfg.inception_weights)
    rows = metrics.subset(len(real), cfg.num_samples, cfg.seed + 3)
    if len(rows) < cfg.num_samples:
        print(f"evaluate: only {len(rows)} real images in {ctx.real_spec} for num_samples={cfg.num_samples}")
    path = metrics.real_stats_path(cache_dir, data.source_id(ctx.real_spec, size), weights_key, len(rows), cfg.seed)
    meta = {"source": ctx.real_spec, "size": size, "weights": str(cfg.inception_weights), "weights_sha1": weights_key,
            "num_samples": len(rows), "seed": cfg.seed, "provenance": provenance()}
    ctx.real_stats = metrics.load_or_compute_stats(
        path, lambda: metrics.frechet_statistics(inception_features(ctx, real[rows])), meta)
    ctx.fid_stats_file = str(path)


def inception_features(ctx: Context, images: torch.Tensor) -> torch.Tensor:
    return metrics.inception_features(ctx.inception, images, ctx.device, batch=max(1, ctx.cfg.batch_size // 4))


# ============================================================================ one checkpoint
def evaluate_one(ctx: Context, name: str) -> dict[str, Any]:
    cfg = ctx.cfg
    run_cfg, gen, critic, ckpt = runs.load_run(ctx.run_dir, name, str(ctx.device))
    n_fake = max(cfg.critic_samples, cfg.diversity_samples, cfg.nn_queries,
                 cfg.num_samples if ctx.inception is not None else 0)
    fake = metrics.generate(gen, n_fake, run_cfg.z_dim, cfg.seed, ctx.device, cfg.batch_size)   # n x H x W x 3
    record: dict[str, Any] = {"checkpoint": name, "step": int(ckpt["step"]), "model": run_cfg.model,
                              "loss": run_cfg.loss, "real": ctx.real_spec}
    fid, inception_fake = fid_record(ctx, fake)
    record.update(fid)
    record["wasserstein"] = wasserstein_record(ctx, critic, fake)
    record["diversity"] = diversity_record(ctx, critic, fake, inception_fake)
    record["nearest"] = nearest_records(ctx, critic, fake[:cfg.nn_queries], record["step"])
    record["config"] = to_dict(cfg)
    record["provenance"] = provenance()
    return record


def fid_record(ctx: Context, fake: torch.Tensor) -> tuple[dict[str, Any], torch.Tensor | None]:
    """FID of the generated images against the cached real statistics, and their Inception features
    (reused for the Inception diversity figure); the reason instead when the weights are missing."""
    if ctx.inception is None:
        return {"fid": None, "fid_unavailable": ctx.fid_unavailable}, None
    feats = inception_features(ctx, fake[:ctx.cfg.num_samples])                            # n x 2048
    fid = metrics.frechet_distance(metrics.frechet_statistics(feats), ctx.real_stats)
    return {"fid": fid, "fid_num_samples": len(feats), "fid_real_stats": ctx.fid_stats_file,
            "fid_weights": str(ctx.cfg.inception_weights)}, feats


def wasserstein_record(ctx: Context, critic, fake: torch.Tensor) -> dict[str, Any]:
    bs = ctx.cfg.batch_size
    real_scores = metrics.critic_scores(critic, ctx.heldout, ctx.device, bs)
    fake_scores = metrics.critic_scores(critic, fake[:ctx.cfg.critic_samples], ctx.device, bs)
    return {**metrics.wasserstein_estimate(real_scores, fake_scores),
            "real_is_training_data": ctx.heldout_is_training_data}


def diversity_record(ctx: Context, critic, fake: torch.Tensor, inception_fake: torch.Tensor | None) -> dict:
    """Spread in the critic's pooled features (every step) and in Inception features (with weights),
    each beside the same figure for real images, since the raw number means little alone."""
    n, bs = ctx.cfg.diversity_samples, ctx.cfg.batch_size
    out = {"critic": {
        "generated": metrics.diversity(metrics.critic_features(critic, fake[:n], ctx.device, bs)),
        "real": metrics.diversity(metrics.critic_features(critic, ctx.diversity_real, ctx.device, bs))}}
    if inception_fake is not None:
        sigma = ctx.real_stats["sigma"]
        out["inception"] = {"generated": metrics.diversity(inception_fake[:n]),
                            "real": {"mean_variance": float(np.trace(sigma) / len(sigma))}}
    return out


def nearest_records(ctx: Context, critic, queries: torch.Tensor, step: int) -> dict[str, Any]:
    cfg = ctx.cfg
    spaces = ("pixel", "critic") if cfg.nn_space == "both" else (cfg.nn_space,)
    # M x H x W x 3; indexing would copy the whole training set (4 GB for ImageNet) when searching all of it
    bank = ctx.train if len(ctx.train_rows) == len(ctx.train) else ctx.train[ctx.train_rows]
    out = {}
    for space in spaces:
        if space == "pixel":
            q, b = queries.reshape(len(queries), -1), bank.reshape(len(bank), -1)
        else:
            q = metrics.critic_features(critic, queries, ctx.device, cfg.batch_size)
            b = metrics.critic_features(critic, bank, ctx.device, cfg.batch_size)
        sq_dist, idx = metrics.nearest_neighbours(q, b, cfg.nn_k, device=ctx.device)
        dist = sq_dist.sqrt().numpy()
        rel = Path("nearest") / f"{space}_step_{step:07d}.png"
        plot_neighbour_grid(queries.numpy(), bank[idx].numpy(), dist, ctx.run_dir / rel,
                            f"{ctx.run_dir.name} step {step}: nearest training images ({space} space)")
        out[space] = {"png": str(rel), "nearest_l2_median": float(np.median(dist[:, 0])),
                      "nearest_l2_min": float(dist[:, 0].min()), "bank_size": len(bank),
                      "train_rows": ctx.train_rows[idx.numpy()].tolist()}
    return out


# ============================================================================ outputs
def merge_records(path: Path, new: list[dict]) -> list[dict]:
    """Earlier records plus the new ones; a step evaluated again is replaced (same weights)."""
    import json
    old = json.loads(path.read_text())["records"] if path.exists() else []
    steps = {r["step"] for r in new}
    return sorted([r for r in old if r["step"] not in steps] + new, key=lambda r: r["step"])


def summary_line(r: dict) -> str:
    fid = f"FID {r['fid']:.2f}" if r.get("fid") is not None else "FID n/a"
    gen_div, real_div = (r["diversity"]["critic"][k]["mean_pairwise_distance"] for k in ("generated", "real"))
    nn = "  ".join(f"nearest {s} L2 {v['nearest_l2_median']:.3g}" for s, v in r["nearest"].items())
    return (f"evaluate: step {r['step']:>7d}  {fid}  W-est {r['wasserstein']['estimate']:+.4g}  diversity "
            f"{gen_div:.3g} (real {real_div:.3g})  {nn}")


def run(cfg: Config) -> Path:
    """FID, Wasserstein estimate, diversity and nearest-neighbour grids for a run's checkpoints -> evaluate.json."""
    from ..core.config import from_dict
    validate(cfg)   # a Config built in code has not passed `build`
    runs.require_run(cfg.run)
    run_dir = Path(cfg.run)
    names = checkpoint_names(run_dir, cfg.checkpoint)
    run_cfg = from_dict(runs.Config, saved_checkpoint(run_dir / names[-1])["config"])
    ctx = build_context(cfg, run_dir, run_cfg)
    records = []
    for name in names:
        records.append(evaluate_one(ctx, name))
        print(summary_line(records[-1]))
    out = run_dir / "evaluate.json"
    # merged under the file's lock, waiting for any other evaluate of this run (pretraining calls this one
    # at fid_every: refusing would stop the training); the measuring above needs no lock
    with building(out, wait=True):
        merged = merge_records(out, records)
        atomic_write_json(out, {"run": str(run_dir), "records": merged, "provenance": provenance()})
        plot_metrics_vs_step(merged, run_dir / "metrics_vs_step.png", f"{run_dir.name}: generator quality over training")
    return out


__all__ = ["Config", "run", "checkpoint_names"]
