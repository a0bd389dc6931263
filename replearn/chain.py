"""The whole protocol as one stage: pretrain -> features (trained and untrained control) -> svm ->
curve -> K-means -> table, every artifact keyed and reused, the table published to `tables/`.

    python -m replearn chain preset=smoke models=dcgan,wgan-gp pretrain_data=... train=... test=...

This is what `make pretrain|features|svm|curve|svm-table` run (with `upto=`). Each artifact lives
under `<build_dir>/<preset>/` in a folder or file named by its key (runs.py): the same key is reused
at once, a different one (another config, `*_args`, input artifact or data file) is built beside the
old one, so nothing committed or built earlier can stand in for what was asked. The table is
written last, to `<tables_dir>/<name>-<preset>.md` (and .csv, .tex), from this run's artifacts only.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from .train import pretrain, runs
from .probe import curve, features, kmeans, supervised, svm
from .publish import tables
from .core import carry
from .core.config import ConfigError, build, register_preset, words

UPTO = ("pretrain", "features", "svm", "curve", "table")


@dataclass(frozen=True)
class Config:
    preset: str = ""               # tiny | smoke | cpu | paper: required, as the scales differ by hours
    models: tuple[str, ...] = ("dcgan", "wgan-gp")    # recipes (replearn.models.recipes); one table row each
    pretrain_data: str = "hf:benjamin-paine/imagenet-1k-32x32:train"
    train: str = "hf:uoft-cs/cifar10:train"          # the labelled split the SVMs fit
    test: str = "hf:uoft-cs/cifar10:test"            # the split they are scored on
    controls: bool = True          # the same critics at initialisation, through the same protocol
    curve: bool = True             # score every interval checkpoint (the pretraining curve)
    kmeans: bool = True            # Coates's K-means baseline row
    # each critic (and control) also scored with its layers equalised (svm layer_scale=equal), as labelled
    # rows beside the paper's unscaled ones: unscaled, a layer whose activations grew in training can drown
    # the others (benchmarks/results/cpu_preset: WGAN-GP -5.4 points unscaled, +3.0 equalised)
    layer_rows: bool = True
    # more pretraining seeds of the first model (each with its control, through the same features and SVM
    # protocol, unscaled rows only): the table reports the spread over seeds beside the draws' spread
    seed_repeats: tuple[int, ...] = ()
    # false: a critic's feature file is deleted once all its SVM results are written; a rerun reuses those
    # results by key without extracting again (the cpu chain's float16 files are 2.9 GB each)
    keep_features: bool = True
    # keep each finished run's small results (records, SVM and curve JSON, the table's pictures; no
    # checkpoints or features) in <tables_dir>/<name>-<preset>-results/, to commit: a fresh machine's chain
    # puts them back and reuses them by key instead of training again (core/carry.py)
    carry: bool = False
    upto: str = "table"            # pretrain | features | svm | curve | table: the last stage to run
    build_dir: str = "build"       # every artifact, in folders named by their keys
    tables_dir: str = "tables"     # where the table is published
    name: str = "cifar10"          # the evaluation data set: the table is <tables_dir>/<name>-<preset>.md
    image_size: int = 32           # 28 / 32 / 64: pretraining, features and K-means read images at this size
    channels: int = 3              # 1: grayscale nets and K-means patches (MNIST-style data)
    supervised: bool = False       # the first model's critic trained with labels: the upper reference row
    data_note: str = ""            # said in every row about the evaluation data (e.g. its encoding)
    cache_dir: str = "cache"
    # extra key=value words for each stage (the Makefile's PRETRAIN_ARGS, FEATURES_ARGS, SVM_ARGS, ...)
    pretrain_args: str = ""
    features_args: str = ""
    svm_args: str = ""
    kmeans_args: str = ""
    curve_args: str = ""
    supervised_args: str = ""


def pretrain_config(cfg: Config, model: str, root: Path, seed: int | None = None) -> pretrain.Config:
    values = {"preset": cfg.preset, "model": model, "data": cfg.pretrain_data, "cache_dir": cfg.cache_dir,
              "image_size": cfg.image_size, "channels": cfg.channels, **words(cfg.pretrain_args),
              **({} if seed is None else {"seed": seed})}
    planned, key = pretrain.plan(build(pretrain.Config, "pretrain", values))
    return dataclasses.replace(planned, run_dir=str(root / f"{model}-{key}"))


def pretrain_step(cfg: Config, model: str, root: Path, seed: int | None = None) -> Path:
    return pretrain.run(pretrain_config(cfg, model, root, seed))


def planned_runs(cfg: Config) -> list[tuple[str, int | None, Path]]:
    """(model, seed repeat or None, run folder) of every GAN the chain trains, without training any:
    benchmarks/gpu_chain.sh starts them side by side under the keys the chain will ask for."""
    root = Path(cfg.build_dir) / cfg.preset
    return [(m, s, Path(pretrain_config(cfg, m, root, s).run_dir)) for m, s in gan_runs(cfg)]


def gan_runs(cfg: Config) -> list[tuple[str, int | None]]:
    """(model, seed repeat or None): each model, then the first model again at each seed repeat."""
    return [(m, None) for m in cfg.models] + [(cfg.models[0], s) for s in cfg.seed_repeats if cfg.models]


def features_config(cfg: Config, run_dir: Path, checkpoint: str) -> features.Config:
    values = {"preset": cfg.preset, "run": str(run_dir), "checkpoint": checkpoint, "train": cfg.train,
              "test": cfg.test, "cache_dir": cfg.cache_dir, "expect_run_key": runs.run_key(run_dir),
              **words(cfg.features_args)}
    return build(features.Config, "features", values)


def svm_config(cfg: Config, feature_file: Path, extra: dict | None = None) -> svm.Config:
    values = {"preset": cfg.preset, "features": str(feature_file), **(extra or {}), **words(cfg.svm_args)}
    return build(svm.Config, "svm", values)


def probe_step(cfg: Config, run_dir: Path, checkpoint: str, variants: list[dict], upto_svm: bool) -> list[Path]:
    """One checkpoint's features, then its SVM results under each variant of the protocol. Results already
    made (by key) are reused without extracting their features again; with keep_features=false the
    feature file is deleted once every result it feeds is written."""
    feat_cfg = features_config(cfg, run_dir, checkpoint)
    feat_path, feat_key = features.plan(feat_cfg)
    svm_cfgs = [svm_config(cfg, feat_path, extra) for extra in variants] if upto_svm else []
    reused = svm.finished_results(svm_cfgs, feat_key) if upto_svm else None
    if reused:
        print(f"chain: {len(reused)} svm result(s) of {feat_path.name} reused")
        return reused
    features.run(feat_cfg)
    made = [svm.run(c) for c in svm_cfgs]
    if upto_svm and not cfg.keep_features:
        feat_path.unlink(missing_ok=True)
    return made


def curve_step(cfg: Config, run_dir: Path) -> Path:
    values = {"preset": cfg.preset, "run": str(run_dir), "train": cfg.train, "test": cfg.test,
              "cache_dir": cfg.cache_dir, "features_args": cfg.features_args, "svm_args": cfg.svm_args,
              **words(cfg.curve_args)}
    return curve.run(build(curve.Config, "curve", values))


def kmeans_steps(cfg: Config, root: Path) -> Path:
    """Coates: features standardised in the file, his C (kmeans.SVM_SETTINGS)."""
    values = {"preset": cfg.preset, "train": cfg.train, "test": cfg.test, "cache_dir": cfg.cache_dir,
              "image_size": cfg.image_size, "channels": cfg.channels, **words(cfg.kmeans_args)}
    km_cfg = build(kmeans.Config, "kmeans", values)
    if not km_cfg.out:
        km_cfg = dataclasses.replace(km_cfg, out=str(root / f"kmeans-{kmeans.STAGE.key(km_cfg)}" / "features.h5"))
    km_path, km_key = kmeans.STAGE.plan(km_cfg)
    svm_cfg = svm_config(cfg, km_path, kmeans.SVM_SETTINGS)
    reused = svm.finished_results([svm_cfg], km_key)              # e.g. carried here without its features
    if reused:
        return reused[0]
    return svm.run(dataclasses.replace(svm_cfg, features=str(kmeans.run(km_cfg))))


def supervised_step(cfg: Config, root: Path, run_dir: Path) -> Path:
    """The pretrained run's own critic (recipe, width, norm, size, channels) trained with labels."""
    critic = runs.run_record(run_dir)["config"]
    values = {"preset": cfg.preset, "train": cfg.train, "test": cfg.test, "cache_dir": cfg.cache_dir,
              **{k: critic[k] for k in ("model", "width", "norm", "spectral_norm", "attention_res", "image_size")},
              "channels": critic.get("channels", 3), **words(cfg.supervised_args)}
    sup_cfg = build(supervised.Config, "supervised", values)
    if not sup_cfg.out:
        key = supervised.supervised_key(sup_cfg)
        sup_cfg = dataclasses.replace(sup_cfg, out=str(root / f"supervised-{sup_cfg.model}-{key}"))
    return supervised.run(sup_cfg)


def final_checkpoint(run_dir: Path) -> str:
    """The run's last step as a step-named file: `last.pt` changes when a run is extended."""
    saved = runs.recorded_checkpoints(run_dir)
    if not saved:
        raise ConfigError(f"{run_dir} has no ckpt_*.pt; rerun `replearn pretrain` for it")
    return saved[-1][1].name


def command_line(cfg: Config) -> str:
    """The chain as a command that rebuilds this table: every key that differs from its preset's value."""
    from .core.config import PRESETS, to_dict
    base = {**to_dict(Config()), **PRESETS.get(cfg.preset, {}).get("chain", {})}
    words_ = []
    for key, value in to_dict(cfg).items():
        default = base.get(key)
        if key in ("upto",) or value == (list(default) if isinstance(default, tuple) else default):
            continue
        text = ",".join(str(v) for v in value) if isinstance(value, (list, tuple)) else str(value)
        words_.append(f"{key}={text}" if text and " " not in text and "[" not in text else f"{key}='{text}'")
    return "python -m replearn chain preset=" + cfg.preset + "".join(" " + w for w in words_ if not w.startswith("preset="))


def run(cfg: Config) -> Path:
    """Run the whole chain (or up to `upto`) with keyed, reused artifacts; publish the table."""
    if not cfg.preset:   # no silent default: `paper` is GPU-sized and downloads ImageNet
        from .core.config import PRESETS
        presets = sorted((p for p, stages in PRESETS.items() if "chain" in stages),
                         key=lambda p: ("tiny", "smoke", "cpu", "paper", p).index(p))   # smallest first
        raise ConfigError(f"no preset given: choose one of {', '.join(presets)} (preset=tiny; through make: "
                          f"make svm-table PRESET=tiny ...)")
    if cfg.upto not in UPTO:
        raise ConfigError(f"unknown upto {cfg.upto!r}; choose from: {', '.join(UPTO)}")
    stop = UPTO.index(cfg.upto)
    root = Path(cfg.build_dir) / cfg.preset
    carry_root = Path(cfg.tables_dir) / f"{cfg.name}-{cfg.preset}-results"
    if cfg.carry:
        carry.restore(carry_root, root)
    from .budget import check_disk
    check_disk(cfg, root)
    if stop < UPTO.index("features"):
        for model, seed in gan_runs(cfg):
            pretrain_step(cfg, model, root, seed)
        return root
    results = []
    upto_svm = stop >= UPTO.index("svm")
    variants = [{}] + ([{"layer_scale": "equal"}] if cfg.layer_rows else [])

    def whole_run(model: str, seed: int | None) -> list[Path]:
        made = []
        run_dir = pretrain_step(cfg, model, root, seed)
        checkpoints = [final_checkpoint(run_dir)] + (["ckpt_0000000.pt"] if cfg.controls else [])
        for name in checkpoints:   # seed repeats give the seed spread: the unscaled protocol only
            made += probe_step(cfg, run_dir, name, variants if seed is None else [{}], upto_svm)
        if seed is None and stop >= UPTO.index("curve") and cfg.curve:
            curve_step(cfg, run_dir)
        if cfg.carry and upto_svm:
            carry.export_folder(run_dir, carry_root, root)
        return made

    # one run at a time, from pretraining to its last result, so that a chain cut short (the end of a
    # session) has whole runs finished, and carried, rather than every run half done; the table's own
    # rows (each model, then K-means: minutes) before the seed repeats, which only feed its noise note
    for model in cfg.models:
        results += whole_run(model, None)
    km_result = kmeans_steps(cfg, root) if upto_svm and cfg.kmeans else None
    if km_result and cfg.carry:
        carry.export_folder(km_result.parent, carry_root, root)
    for seed in (cfg.seed_repeats if cfg.models else ()):
        results += whole_run(cfg.models[0], seed)
    results += [km_result] if km_result else []
    if stop >= UPTO.index("svm") and cfg.supervised and cfg.models:
        results.append(supervised_step(cfg, root, Path(pretrain_config(cfg, cfg.models[0], root).run_dir)))
    if stop < UPTO.index("table"):
        return root
    table_cfg = tables.Config(results=",".join(str(r) for r in results), out_dir=cfg.tables_dir,
                              name=f"{cfg.name}-{cfg.preset}", data_note=cfg.data_note, dataset=cfg.name,
                              quoted=cfg.name == "cifar10",
                              command=command_line(cfg))
    return tables.run(table_cfg)


# presets: what each scale of the chain builds by default
register_preset("tiny", "chain", models=("dcgan", "wgan-gp"))
# smoke: checks the chain at realistic sizes in under an hour on 2 cores; its numbers show nothing
register_preset("smoke", "chain", models=("dcgan",))
# cpu: DCGAN ~67 min on 2 AVX512-BF16 cores; WGAN-GP as wgan-gp-bn-ttur (BatchNorm critic, 1 critic step at 4x
# the generator's rate): 48 min, +5.8 over its control at 2000 steps. The reference wgan-gp's 2000 steps take
# ~3.3 h here (+3.0); the TTUR critics without BN, or with layer or spectral norm, did not gain (recipes.py)
# Unscaled rows only: at this scale the equalised rows moved the gains by 0.1-0.2 points (table at 71c2efe,
# benchmarks/results/notes.md) and doubled the SVM work; LAYER_ROWS=1 brings them back
register_preset("cpu", "chain", models=("dcgan", "wgan-gp-bn-ttur"), seed_repeats=(1, 2), keep_features=False,
                carry=True, layer_rows=False)
register_preset("paper", "chain")
