"""Pretraining: a GAN on unlabelled images, checkpoints that carry their config, resume by rerun.

    python -m replearn pretrain model=wgan-gp data=../shared/data/tinyimagenet/train.parquet preset=smoke

A run folder holds `last.pt` (model, optimizers, step, RNG, resolved config, provenance),
`ckpt_<step>.pt` at intervals, `config.json`, `log.jsonl` (one JSON line per generator step),
`samples/step_<step>.png` grids and `losses.png`. Rerunning the same command resumes from
`last.pt`; raising `steps` continues a finished run. Under `torchrun` each process trains on its
share of every global batch through DistributedDataParallel; rank 0 alone logs and saves.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..models import nets, zoo
from . import runs
from ..core.config import ConfigError, from_dict, register_preset, to_dict
from ..core.stage import Stage, artifact_key, default_root, keyed
from .distributed import BatchStream, Dist, init_distributed
from ..models.losses import LOSSES, build_loss
from ..core.plots import plot_losses
from ..models.recipes import RECIPES
from .runs import Config   # the stage's config, kept beside the run-folder layout it describes
from ..core.utils import (append_jsonl, atomic_write_json, autocast, lookup, make_registry, pick_device, provenance,
                    atomic_write_text, read_jsonl, resolve_precision, torch_atomic_save)

OPTIMIZERS, register_optimizer = make_registry("optimizer")
# keys that may change when a run is resumed: they say how long, how often and on what hardware to
# train, not what is trained. Every other key (optimizer and its settings, learning rates, batch size,
# n_critic, seed, nets, loss) and the data file's identity make the run's key: a resume with another
# key is refused, and the chain builds such a run in a folder of its own.
RESUMABLE_KEYS = ("run_dir", "steps", "max_minutes", "log_every", "sample_every", "ckpt_every", "fid_every",
                  "device", "compile", "cache_dir", "nan_policy", "data",   # data: keyed by its identity instead
                  "inception_weights")
# keys added after runs were made, with the value those runs had: left out of the key at that value
ADDED_KEYS = {"channels": 3}
# bumped when the training step itself changes what a run computes (e.g. the generator step reusing the
# critic step's fakes, the exact penalty pass): runs made by an older loop get another key
TRAINER_VERSION = 3
# last.pt is also written this often between interval checkpoints (which the cpu preset keeps every 1000
# steps, ~30 min on 2 cores): a kill, such as the end of a working session, loses minutes, not half a run
LAST_EVERY_SECONDS = 300.0


# smoke: a fixed CPU budget per model, so the whole chain takes ~30 min on 2 cores; the table reports
# the steps each model reached in it
register_preset("smoke", "pretrain", steps=1000, max_minutes=5.0, sample_every=25, ckpt_every=50, log_every=5)
# tiny: the whole chain in a few CPU minutes, for the end-to-end test (numbers mean nothing)
register_preset("tiny", "pretrain", steps=40, width=0.25, sample_every=20, ckpt_every=20, log_every=5)
# cpu: 2000 generator steps per model, where the gain over the untrained control is real: DCGAN +7.2 (67 min
# on 2 AVX512-BF16 cores), wgan-gp-bn-ttur +5.8 (48 min), reference wgan-gp +3.0 (~3.3 h)
# (benchmarks/results/cpu_preset).
# A fixed step count, not a time budget, so that every machine trains the same nets
register_preset("cpu", "pretrain", steps=2000, max_minutes=0.0, sample_every=100, ckpt_every=1000, log_every=10)
register_preset("paper", "pretrain")
# seed 003 (Chen 2019): 30,000 generator steps, a 64-image sample grid every 200 steps, models saved every
# 10,000; FID of 5,000 generated images (evaluate's default) every 2,500 steps, so the run's report has an
# FID curve, not three points. Batch and nets are the recipe's (the seed: batch 128 at 28 px, 64 at 64 px).
register_preset("seed003", "pretrain", steps=30000, sample_every=200, ckpt_every=10000, fid_every=2500, log_every=10)


# ============================================================================ registries
@register_optimizer("adam")
def _adam(params, lr, cfg):
    return torch.optim.Adam(params, lr=lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)


@register_optimizer("rmsprop")
def _rmsprop(params, lr, cfg):
    return torch.optim.RMSprop(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


@register_optimizer("sgd")
def _sgd(params, lr, cfg):
    return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def resolve(cfg: Config) -> Config:
    """Fill every None from the recipe, then the loss's reference defaults; check the choices."""
    recipe = lookup(RECIPES, cfg.model, "model")()
    values = {k: v for k, v in to_dict(cfg).items()}
    for key, value in recipe.items():
        if values.get(key) is None:
            values[key] = value
    loss_cls = lookup(LOSSES, values["loss"], "loss")
    fallback = dict(n_critic=1, batch_size=64, optimizer="adam", lr_g=2e-4, lr_d=2e-4, beta1=0.5, beta2=0.999,
                    norm="batch", spectral_norm=False, g_norm="batch", attention_res=0, momentum=0.0,
                    lr_decay="none", force_batchnorm=False)   # keys a recipe may set, so None (unset) until here
    for key, value in {**fallback, **loss_cls.defaults}.items():
        if values.get(key) is None:
            values[key] = value
    out = from_dict(Config, values)
    lookup(zoo.ARCHS, out.arch, "architecture")
    zoo.check_size(out.arch, out.image_size)
    lookup(OPTIMIZERS, out.optimizer, "optimizer")
    if out.norm not in nets.NORMS or out.g_norm not in nets.NORMS:
        raise ConfigError(f"unknown norm {out.norm!r}/{out.g_norm!r}; choose from: {', '.join(nets.NORMS)}")
    if out.loss == "wgan-gp" and out.norm == "batch" and not out.force_batchnorm:
        raise ConfigError("BatchNorm in the critic breaks the per-sample gradient penalty; use norm=layer or "
                          "norm=none, or force_batchnorm=true to run it anyway")
    if out.lr_decay not in ("none", "linear") or out.nan_policy not in ("stop", "rollback"):
        raise ConfigError("lr_decay must be none|linear and nan_policy stop|rollback")
    return out


def data_identity(cfg: Config) -> str:
    from .. import data
    return data.source_id(cfg.data, cfg.image_size)


def run_key(cfg: Config, data_id: str) -> str:
    """What the run is: its resolved config less RESUMABLE_KEYS, the data's identity, the trainer."""
    # spectral-norm runs made before nets.init_dcgan re-registered spectral norm started from stale u, v
    # (a ~1e10x too large step-0 critic): they get another key, the other runs keep theirs
    fixed_init = {"spectral_norm_init": 2} if cfg.spectral_norm else {}
    return artifact_key("pretrain", keyed(to_dict(cfg), ADDED_KEYS), ignore=RESUMABLE_KEYS, data=data_id,
                             trainer=TRAINER_VERSION, **fixed_init)


def default_run_dir(cfg: Config, key: str) -> str:
    return cfg.run_dir or str(default_root(cfg.preset) / f"{cfg.model}-{key}")


# ============================================================================ distributed
def device_for(cfg: Config, dist_info: Dist) -> torch.device:
    device = pick_device(cfg.device)
    if device.type == "cuda" and dist_info.world > 1:
        device = torch.device("cuda", dist_info.local_rank)
    return device


# ============================================================================ data
def load_training_images(cfg: Config) -> tuple[torch.Tensor, dict]:
    from .. import data
    images = data.cached(cfg.data, size=cfg.image_size, cache_dir=cfg.cache_dir)
    info = {"spec": cfg.data, "num_images": len(images), "source_id": data_identity(cfg),
            "skipped": images.skipped}
    return torch.from_numpy(images.images), info   # N x H x W x 3 uint8, kept as uint8 in memory


# ============================================================================ state
@dataclass
class State:
    gen: nn.Module
    critic: nn.Module
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    step: int = 0
    batches: int = 0
    seconds: float = 0.0
    rng: torch.Generator = dataclasses.field(default_factory=torch.Generator)


def build_state(cfg: Config, device: torch.device) -> State:
    torch.manual_seed(cfg.seed)
    gen, critic = zoo.build_models(cfg.arch, **nets.options(cfg))
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    gen, critic = gen.to(device, memory_format=fmt), critic.to(device, memory_format=fmt)
    make = lookup(OPTIMIZERS, cfg.optimizer, "optimizer")
    rng = torch.Generator().manual_seed(cfg.seed)
    return State(gen, critic, make(gen.parameters(), cfg.lr_g, cfg), make(critic.parameters(), cfg.lr_d, cfg),
                 rng=rng)


def checkpoint_dict(state: State, cfg: Config, data_info: dict, precision: str) -> dict[str, Any]:
    """Tensors, numbers, strings and plain containers only: it loads with weights_only=True."""
    return {"generator": state.gen.state_dict(), "critic": state.critic.state_dict(),
            "opt_g": state.opt_g.state_dict(), "opt_d": state.opt_d.state_dict(),
            "step": state.step, "batches": state.batches, "seconds": state.seconds,
            "rng": state.rng.get_state(), "config": to_dict(cfg), "data": data_info,
            "key": data_info["key"], "data_id": data_info["source_id"],
            "precision": precision, "provenance": provenance()}


def save_checkpoint(state: State, cfg: Config, data_info: dict, precision: str, keep_interval: bool) -> Path:
    run_dir = Path(cfg.run_dir)
    ckpt = checkpoint_dict(state, cfg, data_info, precision)
    torch_atomic_save(ckpt, run_dir / runs.LAST)
    if keep_interval:
        torch_atomic_save({k: v for k, v in ckpt.items() if not k.startswith("opt_")},
                          run_dir / runs.ckpt_name(state.step))
    return run_dir / runs.LAST


def restore(state: State, ckpt: dict) -> None:
    state.gen.load_state_dict(ckpt["generator"])
    state.critic.load_state_dict(ckpt["critic"])
    state.opt_g.load_state_dict(ckpt["opt_g"])
    state.opt_d.load_state_dict(ckpt["opt_d"])
    state.step, state.batches, state.seconds = ckpt["step"], ckpt["batches"], ckpt["seconds"]
    state.rng.set_state(ckpt["rng"])


def check_same_run(saved: dict, key: str, cfg: Config, path: Path) -> None:
    """A resume must continue the same run: refused, before anything is written, if the key differs."""
    recorded = saved.get("key")
    if recorded == key:
        return
    old = saved.get("config") or {}
    diffs = [f"{k}: {old.get(k, ADDED_KEYS.get(k))!r} -> {v!r}" for k, v in to_dict(cfg).items()
             if k not in RESUMABLE_KEYS and old.get(k, ADDED_KEYS.get(k)) != v]
    data_id = data_identity(cfg)
    if saved.get("data_id") not in (None, data_id):
        diffs.append(f"data identity: {saved.get('data_id')} -> {data_id}")
    raise ConfigError(f"{path} belongs to a different run ({', '.join(diffs) or f'key {recorded} -> {key}'}); "
                      f"keys that may change on resume: {', '.join(k for k in RESUMABLE_KEYS if k != 'data')}; "
                      f"pick another run_dir or delete it")


# ============================================================================ steps
def set_lr(state: State, cfg: Config) -> None:
    """The config's learning rates are authoritative (also over a resumed optimizer's state)."""
    frac = max(0.0, 1.0 - state.step / cfg.steps) if cfg.lr_decay == "linear" else 1.0
    for opt, base in ((state.opt_g, cfg.lr_g), (state.opt_d, cfg.lr_d)):
        for group in opt.param_groups:
            group["lr"] = base * frac


def my_share(run: "Runner", draws: torch.Tensor) -> torch.Tensor:
    """Randomness is drawn for the whole global batch and sliced like the data, so a run over
    several processes computes exactly what one process would."""
    return draws[run.dist.rank::run.dist.world].to(run.device)


def critic_update(run: "Runner", real_uint8: torch.Tensor, keep_fake: bool = False) -> tuple[dict, torch.Tensor | None]:
    """One critic step. With `keep_fake` the fakes are made with their graph and returned, for a
    generator step that reuses them (otherwise None)."""
    s, cfg = run.state, run.cfg
    real = nets.to_unit(real_uint8, run.device, cfg.channels_last, cfg.channels)  # n x C x H x W
    z = my_share(run, nets.sample_z(cfg.batch_size, cfg.z_dim, "cpu", s.rng))      # n x z_dim
    alpha = my_share(run, torch.rand(cfg.batch_size, 1, 1, 1, generator=s.rng))    # n x 1 x 1 x 1
    with torch.set_grad_enabled(keep_fake), autocast(run.device, run.precision):
        fake_graph = (run.gen_ddp if keep_fake else run.gen)(z)
    with autocast(run.device, run.precision):
        loss, stats = run.loss.critic_loss(run.critic_ddp, real, fake_graph.detach().float(), alpha)
    s.opt_d.zero_grad(set_to_none=True)
    loss.backward()
    s.opt_d.step()
    run.loss.after_critic_step(s.critic)
    return stats, fake_graph if keep_fake else None


def generator_update(run: "Runner", fake: torch.Tensor | None = None) -> dict:
    """One generator step, on `fake` (made by the critic step with its graph) or on fresh fakes."""
    s, cfg = run.state, run.cfg
    s.critic.requires_grad_(False)    # no critic gradients on the generator step
    if fake is None:
        z = my_share(run, nets.sample_z(cfg.batch_size, cfg.z_dim, "cpu", s.rng))
        with autocast(run.device, run.precision):
            fake = run.gen_ddp(z)
    with autocast(run.device, run.precision):
        loss, stats = run.loss.generator_loss(run.critic_plain, fake)
    s.opt_g.zero_grad(set_to_none=True)
    loss.backward()
    s.opt_g.step()
    s.critic.requires_grad_(True)
    return stats


class Runner:
    """Holds what one training process needs; `train_step` does one generator step."""

    def __init__(self, cfg: Config, dist_info: Dist):
        self.cfg, self.dist = cfg, dist_info
        self.device = device_for(cfg, dist_info)
        self.precision = resolve_precision(cfg.precision, self.device)
        self.state = build_state(cfg, self.device)
        self.loss = build_loss(cfg.loss, cfg.n_critic, cfg.gp_lambda, cfg.clip)
        self.gen, self.critic_plain = self.state.gen, self.state.critic
        self.gen_ddp, self.critic_ddp = self.gen, self.critic_plain
        if dist_info.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.gen_ddp = DDP(self.gen, device_ids=ids, broadcast_buffers=False)
            self.critic_ddp = DDP(self.critic_plain, device_ids=ids, broadcast_buffers=False)
        if cfg.compile:
            self.gen, self.critic_plain = torch.compile(self.gen), torch.compile(self.critic_plain)
            self.gen_ddp, self.critic_ddp = torch.compile(self.gen_ddp), torch.compile(self.critic_ddp)

    def train_step(self, images: torch.Tensor, stream: BatchStream) -> dict:
        s = self.state
        set_lr(s, self.cfg)
        stats: dict[str, float] = {}
        steps, fake = self.loss.critic_steps(s.step), None
        for _ in range(steps):
            # one critic step per generator step (DCGAN, hinge): the generator step reuses its fakes, as
            # the PyTorch DCGAN example does -- one generator forward per iteration instead of two
            stats, fake = critic_update(self, images[stream.next()], keep_fake=steps == 1)
            s.batches += 1
        stats.update(generator_update(self, fake))
        s.step += 1
        return stats


# ============================================================================ outputs
def fixed_noise(cfg: Config, n: int = 64) -> torch.Tensor:
    return nets.sample_z(n, cfg.z_dim, "cpu", torch.Generator().manual_seed(cfg.seed + 1))


@torch.no_grad()
def save_samples(run: Runner, path: Path) -> None:
    from torchvision.utils import save_image
    run.gen.eval()
    images = run.state.gen(fixed_noise(run.cfg).to(run.device)).float().cpu()
    run.gen.train()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(images, path, nrow=8, normalize=True, value_range=(-1, 1))
    title_image(path, f"{run.cfg.model}, generator step {run.state.step} (fixed noise)")


def title_image(path: Path, title: str) -> None:
    """A white strip with `title` above a saved sample grid, so the grid says what it shows on its own."""
    from PIL import Image, ImageDraw
    with Image.open(path) as grid:
        grid = grid.convert("RGB")
    out = Image.new("RGB", (grid.width, grid.height + 16), "white")
    out.paste(grid, (0, 16))
    ImageDraw.Draw(out).text((4, 2), title, fill="black")
    out.save(path)


def write_run_files(cfg: Config, data_info: dict, precision: str) -> None:
    atomic_write_json(Path(cfg.run_dir) / runs.CONFIG,
                      {"config": to_dict(cfg), "data": data_info, "key": data_info["key"], "precision": precision,
                       "trainer_version": TRAINER_VERSION, "provenance": provenance()})


def finite(stats: dict) -> bool:
    return all(math.isfinite(v) for v in stats.values())


@torch.no_grad()
def weights_finite(state: State) -> bool:
    """Checked after every update, so that no checkpoint ever holds a diverged net."""
    params = [p for m in (state.gen, state.critic) for p in m.parameters()]
    return bool(torch.stack([torch.isfinite(p).all() for p in params]).all())


def last_good_checkpoint(run_dir: Path) -> str:
    saved = [p.name for p in (run_dir / runs.LAST,) if p.exists()] + [p.name for _, p in runs.interval_checkpoints(run_dir)[-1:]]
    return f"the last good checkpoint is {run_dir / saved[0]}" if saved else "no checkpoint has been written yet"


def handle_divergence(run: Runner, stats: dict, rollbacks: int) -> int:
    last = Path(run.cfg.run_dir) / runs.LAST
    if run.cfg.nan_policy == "rollback" and last.exists() and rollbacks < 5:
        restore(run.state, runs.load_checkpoint(last, str(run.device)))
        run.state.rng.manual_seed(run.cfg.seed + 7919 * (rollbacks + 1))   # different batches after rollback
        print(f"pretrain: non-finite loss or weights {stats}; rolled back to step {run.state.step}")
        return rollbacks + 1
    advice = ("5 rollbacks did not help" if run.cfg.nan_policy == "rollback"
              else "or rerun with nan_policy=rollback")
    raise ConfigError(f"pretrain: diverged at step {run.state.step} (non-finite loss or weights, {stats}); "
                      f"{last_good_checkpoint(Path(run.cfg.run_dir))}. Lower lr_d/lr_g, {advice}")


# ============================================================================ the loop
def run(cfg: Config) -> Path:
    """Train a GAN on unlabelled images; returns the run folder (rerun to resume). One process at a time
    trains a run folder: a second one asking for it refuses in one line naming the first."""
    return STAGE.run(cfg)


def train(cfg: Config, key: str) -> Path:
    """The run's training, from its last.pt if there is one (the caller holds the run folder's lock)."""
    images, data_info = load_training_images(cfg)
    data_info["key"] = key
    dist_info = init_distributed()
    run_dir = Path(cfg.run_dir)
    runner = Runner(cfg, dist_info)
    s = runner.state
    last = run_dir / runs.LAST
    if last.exists():   # checked before anything in the folder is rewritten
        ckpt = runs.load_checkpoint(last, str(runner.device))
        check_same_run(ckpt, key, cfg, last)
        restore(s, ckpt)
    stream = BatchStream(len(images), cfg.batch_size, cfg.seed, dist_info, consumed=s.batches)
    if dist_info.main:
        prepare_run_folder(run_dir, s, cfg, data_info, runner.precision)
    if not finished(s, cfg):
        train_loop(runner, images, stream, data_info)
    if dist_info.main and finished(s, cfg):
        write_finished(run_dir, s, cfg, key)
    return run_dir


def planned(cfg: Config) -> Config:
    """The resolved config (recipe applied, data spec absolute) with its run folder."""
    from .. import data
    cfg = resolve(cfg)
    data.parse_spec(cfg.data)   # a bad spec fails here, as typed (the absolute one has its symlinks resolved)
    cfg = dataclasses.replace(cfg, data=data.absolute_spec(cfg.data))   # later stages read it from anywhere
    return dataclasses.replace(cfg, run_dir=default_run_dir(cfg, run_key(cfg, data_identity(cfg))))


def plan(cfg: Config) -> tuple[Config, str]:
    """(the resolved config with its run folder, the run's key), without loading any images."""
    cfg = planned(cfg)
    return cfg, STAGE.key(cfg)


def is_finished(cfg: Config, run_dir: Path, key: str) -> bool:
    """The run finished with this key and the same length settings (nothing to train)."""
    done = runs.finished_record(run_dir) or {}
    saved = done.get("config") or {}
    return done.get("key") == key and saved.get("steps") == cfg.steps and saved.get("max_minutes") == cfg.max_minutes


def is_done(cfg: Config) -> bool:
    return STAGE.is_done(cfg)


def prepare_run_folder(run_dir: Path, s: State, cfg: Config, data_info: dict, precision: str) -> None:
    """config.json; no stale finished.json or log lines past the resume point; the step-0 checkpoint
    (the untrained control: the same nets at initialisation)."""
    write_run_files(cfg, data_info, precision)
    if not finished(s, cfg):
        (run_dir / runs.FINISHED).unlink(missing_ok=True)
    log = run_dir / "log.jsonl"
    if log.exists():
        kept = [r for r in read_jsonl(log) if r.get("step", 0) <= s.step]
        atomic_write_text(log, "".join(json.dumps(r) + "\n" for r in kept))
    if s.step == 0 and not (run_dir / runs.ckpt_name(0)).exists():
        save_checkpoint(s, cfg, data_info, precision, keep_interval=True)


def budget_spent(s: State, cfg: Config) -> bool:
    return bool(cfg.max_minutes) and s.seconds >= 60 * cfg.max_minutes


def finished(s: State, cfg: Config) -> bool:
    return s.step >= cfg.steps or budget_spent(s, cfg)


def write_finished(run_dir: Path, s: State, cfg: Config, key: str) -> None:
    """The marker later stages wait for: the run reached `steps` or its time budget."""
    atomic_write_json(run_dir / runs.FINISHED, {"step": s.step, "critic_batches": s.batches,
                                                "reason": "steps" if s.step >= cfg.steps else "max_minutes",
                                                "train_seconds": s.seconds, "checkpoint": runs.LAST, "key": key,
                                                "checkpoints": [p.name for _, p in runs.interval_checkpoints(run_dir)],
                                                "config": to_dict(cfg), "provenance": provenance()})


def train_loop(runner: Runner, images: torch.Tensor, stream: BatchStream, data_info: dict) -> None:
    from tqdm import tqdm
    cfg, s, main = runner.cfg, runner.state, runner.dist.main
    run_dir = Path(cfg.run_dir)
    bar = tqdm(total=cfg.steps, initial=s.step, desc=f"pretrain {cfg.model}", disable=not main, dynamic_ncols=True)
    rollbacks, last_saved = 0, time.time()
    while not finished(s, cfg):
        t0, batches0 = time.time(), s.batches
        stats = runner.train_step(images, stream)
        if not (finite(stats) and weights_finite(s)):
            rollbacks = handle_divergence(runner, stats, rollbacks)
            continue
        dt = time.time() - t0
        s.seconds += dt
        if runner.dist.world > 1:   # every rank must agree on when the time budget is spent
            s.seconds = broadcast_from_rank0(s.seconds)
        bar.update(1)
        if main and (s.step % cfg.log_every == 0 or s.step == cfg.steps or budget_spent(s, cfg)):
            real_seen = (s.batches - batches0) * cfg.batch_size
            append_jsonl(run_dir / "log.jsonl", {"step": s.step, **stats, "sec_per_step": dt,
                                                 "real_images_per_s": real_seen / max(dt, 1e-9),
                                                 "lr_d": s.opt_d.param_groups[0]["lr"]})
            bar.set_postfix({k: f"{v:.3g}" for k, v in stats.items()})
        out_of_time = budget_spent(s, cfg)
        # interval checkpoints at every ckpt_every and at log-spaced steps (the pretraining curve)
        fid_due = bool(cfg.fid_every) and s.step % cfg.fid_every == 0
        at_interval = s.step % cfg.ckpt_every == 0 or runs.log_spaced(s.step) or fid_due
        if main and (s.step % cfg.sample_every == 0 or s.step == cfg.steps or out_of_time):
            save_samples(runner, run_dir / "samples" / f"step_{s.step:07d}.png")
        if main and (at_interval or s.step == cfg.steps or out_of_time):
            save_checkpoint(s, cfg, data_info, runner.precision, keep_interval=True)
            plot_losses(run_dir / "log.jsonl", run_dir / "losses.png")
            if fid_due:
                evaluate_checkpoint(cfg, run_dir, s.step)
            last_saved = time.time()
        elif main and time.time() - last_saved >= LAST_EVERY_SECONDS:
            save_checkpoint(s, cfg, data_info, runner.precision, keep_interval=False)
            last_saved = time.time()
        if out_of_time:
            print(f"pretrain: training budget max_minutes={cfg.max_minutes} spent at step {s.step}")
    bar.close()


def broadcast_from_rank0(value: float) -> float:
    import torch.distributed as dist
    t = torch.tensor([value], dtype=torch.float64)
    dist.broadcast(t, 0)
    return float(t.item())


def evaluate_checkpoint(cfg: Config, run_dir: Path, step: int) -> None:
    """FID (skipped in one line without local Inception weights), the Wasserstein estimate, diversity and
    nearest neighbours of this checkpoint at the run's preset, then the run's report (its FID curve)."""
    from . import evaluate, report  # lazy: evaluate reads run folders, pretraining only calls it at intervals
    from ..core.config import build
    values = {"run": str(run_dir), "checkpoint": runs.ckpt_name(step), "preset": cfg.preset,
              **({"inception_weights": cfg.inception_weights} if cfg.inception_weights else {})}
    evaluate.run(build(evaluate.Config, "evaluate", values))
    report.run(report.Config(run=str(run_dir)))


# the lock is taken before last.pt is read: a resume starts from what the holder left
STAGE = Stage("pretrain", resolve=planned, key=lambda cfg: run_key(cfg, data_identity(cfg)),
              out=lambda cfg, key: Path(cfg.run_dir), finished=is_finished, build=lambda cfg, out, key: train(cfg, key))
