"""The pretrain run-folder layout and its config: the module every later stage reads a run through.

Run folder (written by `pretrain`):
    config.json      resolved config, data identity, key, provenance
    last.pt          model, optimizers, step, RNG, config: the resume point
    ckpt_<step>.pt   weights at log-spaced steps (0, 1, 2, 5, 10, 20, 50, ...) and every ckpt_every
    finished.json    written when the run reached its steps or time budget
    log.jsonl, samples/, losses.png, report.md, curve-<key>.json/.png
"""
from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from ..core.config import ConfigError, register_check, require

LAST = "last.pt"
FINISHED = "finished.json"
CONFIG = "config.json"
CKPT_PATTERN = re.compile(r"ckpt_(\d+)\.pt")


# ============================================================================ run folders
# The pretrain stage's config (`pretrain.Config`): here, beside the folder layout whose config.json and
# checkpoints carry it, so that the stages reading run folders (load_run, evaluate) need not import the
# trainer, which itself calls them.
@dataclass(frozen=True)
class Config:
    model: str = "dcgan"          # a recipe: arch + loss + options (see RECIPES); explicit keys override it
    run_dir: str = ""             # default build/<preset>/<model>-<key>, as the chain
    data: str = "hf:benjamin-paine/imagenet-1k-32x32:train"  # unlabelled images, any source; ImageNet-1k 32x32 (docs/protocol.md s.1)
    image_size: int = 32          # 28, 32, 64 for dcgan (stride-2 stages follow the size), any for mlp
    channels: int = 3             # 1: grayscale nets (the critic reads the luminance; MNIST-style data)
    cache_dir: str = "cache"
    # -- model (None: the recipe's value, then the loss's reference default)
    arch: str | None = None
    loss: str | None = None
    norm: str | None = None       # critic normalisation: batch | layer | none
    g_norm: str | None = None     # generator normalisation; default batch (BN as DCGAN; layer/none for exact multi-process)
    spectral_norm: bool | None = None
    attention_res: int | None = None  # put a self-attention block at this resolution (default 0: none)
    z_dim: int = 256              # DCGAN ImageNet model: 256-dim z ~ U(-1, 1)
    width: float = 1.0            # channel multiplier (tests use small nets; 1.0 is the paper's)
    # BN breaks the per-sample gradient penalty: refused unless forced (None: the recipe's value, else false)
    force_batchnorm: bool | None = None
    # -- optimisation (None: the loss's reference default, docs/protocol.md s.1)
    steps: int = 300000           # generator steps: 30 epochs of ImageNet-1k (1.28M images) at batch 128, as the
                                  # released DCGAN model (named for epoch 30); GPU-sized
    batch_size: int | None = None
    n_critic: int | None = None
    gp_lambda: float = 10.0
    clip: float = 0.01
    optimizer: str | None = None  # adam | rmsprop | sgd
    lr_g: float | None = None
    lr_d: float | None = None
    beta1: float | None = None
    beta2: float | None = None
    momentum: float | None = None  # RMSprop and SGD; default 0
    weight_decay: float = 0.0     # some DCGAN scripts used 1e-5
    lr_decay: str | None = None   # none (default) | linear (to 0 at `steps`, as gan_cifar_resnet.py)
    # -- speed
    device: str = "auto"
    precision: str = "auto"       # auto: bf16 autocast where the hardware has bf16 units, else fp32
    channels_last: bool = True    # 1.1-1.2x on CPU convs, and what tensor cores want
    compile: bool = False         # torch.compile the nets (first steps pay the compile time)
    # -- bookkeeping
    seed: int = 0
    log_every: int = 10
    sample_every: int = 500
    ckpt_every: int = 2000
    max_minutes: float = 0.0      # training-time budget of the whole run (kept across resumes); 0: none
    nan_policy: str = "stop"      # stop | rollback (reload last good checkpoint, skip the batch)
    fid_every: int = 0            # run `evaluate` (FID, ...) every fid_every steps, checkpointed there (0: never)
    inception_weights: str = ""   # FID weights for fid_every ('' = evaluate's default path; missing: FID skipped)
    preset: str = ""


# out-of-range values fail when the config is built (None: set later by the recipe, checked again then)
register_check(Config, lambda cfg: require(
    cfg, stage="pretrain", positive=("steps", "batch_size", "width", "n_critic", "ckpt_every", "log_every",
                                     "sample_every", "z_dim", "lr_g", "lr_d", "clip"),
    non_negative=("gp_lambda", "max_minutes", "fid_every", "weight_decay"), at_least={"image_size": 8},
    choices={"channels": (1, 3)}))


def ckpt_name(step: int) -> str:
    return f"ckpt_{step:07d}.pt"


def log_spaced(step: int) -> bool:
    """Steps 0, 1, 2, 5, 10, 20, 50, 100, ...: the pretraining curve gets points early and late."""
    if step == 0:
        return True
    mantissa = step
    while mantissa % 10 == 0:
        mantissa //= 10
    return mantissa in (1, 2, 5)


def interval_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every `ckpt_<step>.pt` in the folder, in step order."""
    found = []
    for path in Path(run_dir).glob("ckpt_*.pt"):
        match = CKPT_PATTERN.fullmatch(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def require_run(run: str | Path) -> None:
    """An empty run= (every stage that reads a run has it empty by default): one line saying what to give."""
    if not str(run):
        raise ConfigError("run= is required: a folder that `replearn pretrain` wrote (build/<preset>/<model>-<key>) "
                          "or a checkpoint file in one")


def run_record(run_dir: str | Path) -> dict:
    """The run's config.json (resolved config, data identity, key); one line if it is missing."""
    require_run(run_dir)
    record = read_json(Path(run_dir) / CONFIG)
    if record is None:
        raise ConfigError(f"{Path(run_dir) / CONFIG} is missing or unreadable: not a pretrain run folder "
                          f"(run `replearn pretrain run_dir={run_dir}` first)")
    return record


def run_key(run_dir: str | Path) -> str | None:
    return run_record(run_dir).get("key")


def finished_record(run_dir: str | Path) -> dict | None:
    return read_json(Path(run_dir) / FINISHED)


def listed_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of the interval checkpoints the run's finished.json lists, whether or not they are here."""
    names = (finished_record(run_dir) or {}).get("checkpoints") or []
    return sorted((int(m.group(1)), Path(run_dir) / n) for n in names if (m := CKPT_PATTERN.fullmatch(n)))


def recorded_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """The interval checkpoints on disk or, in a run folder restored without them (core/carry.py), the
    ones its finished.json lists: each name gives its step, and so every key downstream of it."""
    return interval_checkpoints(run_dir) or listed_checkpoints(run_dir)


def carried_step(run: str | Path, which: str) -> int | None:
    """The step of a checkpoint that a finished run wrote but this machine does not hold (a run folder
    carried here without its checkpoints); None when the file is here, or was never written."""
    run = Path(run)
    if not run.is_dir() or (run / which).exists():
        return None
    return {p.name: step for step, p in listed_checkpoints(run)}.get(which)


def checkpoint_step(run: str | Path, which: str) -> int:
    """The step a checkpoint holds: read from the file, or for a carried run's absent one from its name
    (the trainer names it at that step), so a key downstream is the same either way."""
    carried = carried_step(run, which)
    return carried if carried is not None else load_checkpoint(checkpoint_path(run, which), mmap=True)["step"]


def checkpoint_path(run: str | Path, which: str = LAST) -> Path:
    require_run(run)
    if not Path(run).exists() and Path(run).suffix != ".pt":   # the folder itself is missing, not a checkpoint in it
        raise ConfigError(f"run folder not found: {run}{_near_folder(Path(run))}; set run= to a folder that "
                          f"`replearn pretrain` wrote (build/<preset>/<model>-<key>)")
    path = Path(run) / which if Path(run).is_dir() else Path(run)
    if not path.exists() and carried_step(run, which) is not None:
        raise ConfigError(f"checkpoint not on this machine: {path} (its run folder was restored from carried "
                          f"results without checkpoints); delete {path.parent} to train the run again")
    if not path.exists():
        found = sorted(p.name for p in path.parent.glob("*.pt")) if path.parent.is_dir() else []
        raise ConfigError(f"checkpoint not found: {path} (found: {', '.join(found) or 'none'}; run "
                          f"`replearn pretrain run_dir={path.parent}` first)")
    return path


def _near_folder(run: Path) -> str:
    """' (did you mean 'runs/dcgan-1a2b'?)' for a mistyped run folder beside existing ones."""
    siblings = [p.name for p in run.parent.iterdir() if p.is_dir()] if run.parent.is_dir() else []
    close = difflib.get_close_matches(run.name, siblings, n=1)
    return f" (did you mean {str(run.parent / close[0])!r}?)" if close else ""


def load_checkpoint(path: str | Path, device: str = "cpu", mmap: bool = False) -> dict:
    """A checkpoint dict, loaded without running code from the file (weights_only)."""
    import pickle

    import torch

    from ..core.utils import unpickling_reason
    try:
        return torch.load(path, map_location=device, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        raise ConfigError(f"{path}: refused to load ({unpickling_reason(err)}); only tensors, numbers, strings and "
                          f"plain containers are read. Re-save an old checkpoint with those only, or retrain") from None
    except (RuntimeError, EOFError, OSError) as err:
        raise ConfigError(f"{path} is not a readable checkpoint ({unpickling_reason(err)}); delete it "
                          f"and rerun the stage that made it") from None


def load_run(run: str | Path, which: str = LAST, device: str = "cpu"):
    """(resolved pretrain config, generator, critic, checkpoint dict) of a run's checkpoint."""
    from ..models import nets, zoo
    from ..core.config import from_dict
    path = checkpoint_path(run, which)
    ckpt = load_checkpoint(path, device)
    cfg = from_dict(Config, ckpt["config"])
    gen, critic = zoo.build_models(cfg.arch, **nets.options(cfg))
    gen.load_state_dict(ckpt["generator"])
    critic.load_state_dict(ckpt["critic"])
    return cfg, gen.to(device).eval(), critic.to(device).eval(), ckpt
