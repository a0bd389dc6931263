"""Results JSON -> comparison tables (markdown, CSV, LaTeX) beside the literature's numbers.

    python -m replearn table results='build/<preset>/**/*.svm-*.json'

Quoted rows (docs/protocol.md s.4) are marked `quoted`; every reproduced row says how it was produced:
pretraining data and steps, hardware, precision, the SVM's C and draws, the evaluation split,
commit and date, and its scale (smoke runs are labelled as such).
"""
from __future__ import annotations

import glob
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..core.config import ConfigError
from ..core.utils import atomic_write_text, git_commit, read_jsonl
from .formats import duration, latex_escape, percent, split_name
from .noise import gain_full, gain_k, gain_text, test_ci95


QUOTED = [
    ("1 Layer K-means", 80.6, 63.7, 0.7, 4800, "Coates & Ng 2011, quoted by Radford et al. 2016"),
    ("3 Layer K-means Learned RF", 82.0, 70.7, 0.7, 3200, "Coates & Ng 2011, quoted by Radford et al. 2016"),
    ("View Invariant K-means", 81.9, 72.6, 0.7, 6400, "Hui 2013, quoted by Radford et al. 2016"),
    ("Exemplar CNN", 84.3, 77.4, 0.2, 1024, "Dosovitskiy et al. 2014, quoted by Radford et al. 2016"),
    ("DCGAN (ImageNet-1k critic)", 82.8, 73.8, 0.4, 512, "Radford et al. 2016, Table 1"),
    ("WGAN-GP (2024 paper)", 83.2, 74.1, None, 512, "Tarek et al. 2024"),
]
FAMILY_NAMES = {"dcgan": "DCGAN (BCE)", "wgan-gp": "WGAN-GP", "wgan": "WGAN (weight clipping)",
                "wgan-gp-sn-resnet": "WGAN-GP", "wgan-gp-sn-ttur": "WGAN-GP (SN critic, TTUR)",
                "wgan-gp-bn-ttur": "WGAN-GP (BN critic, TTUR)",
                "resnet-hinge": "SNGAN, hinge", "sagan": "SAGAN, hinge",
                "mlp-gan": "MLP GAN, BCE", "dense-wgan-gp": "WGAN-GP", "dcgan-rmsprop": "DCGAN (BCE), RMSprop",
                "dcgan-sgd": "DCGAN (BCE), SGD"}


@dataclass(frozen=True)
class Config:
    results: str = "build/**/*.svm*.json"  # glob (or comma-separated paths) of `svm` results
    out_dir: str = "tables"
    name: str = "cifar10"
    dataset: str = "cifar10"              # the evaluation data set the header names (its train/test pair)
    quoted: bool = True                   # include the literature rows of docs/protocol.md s.4 (CIFAR-10 only)
    data_note: str = ""                   # said in every reproduced row about the evaluation data
    command: str = ""                     # the command that built the results (named in the header)
    preset: str = ""


def result_paths(pattern: str) -> list[Path]:
    paths: list[Path] = []
    for part in (p.strip() for p in pattern.split(",") if p.strip()):
        hits = sorted(h for h in glob.glob(part, recursive=True) if not h.endswith(".partial.json"))   # svm progress
        if not hits:
            raise ConfigError(f"no results file matches {part} (run `replearn svm` or `make svm-table` first)")
        paths += [Path(h) for h in hits]
    return paths


def read_results(path: Path) -> dict:
    """An svm results file, or one line naming the file and what is wrong with it."""
    try:
        res = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"{path} is not a readable JSON file ({str(err).splitlines()[0]}); pass svm results "
                          f"files (*.svm*.json)") from None
    if not isinstance(res, dict) or not isinstance(res.get("settings"), dict) or "features" not in res:
        raise ConfigError(f"{path} is not an svm results file (no 'settings'/'features'); pass the JSON written "
                          f"by `replearn svm`")
    return res


def quoted_rows() -> list[dict[str, Any]]:
    return [{"model": m, "status": "quoted", "scale": "paper (quoted)", "full_acc": full / 100, "k_acc": k400 / 100,
             "k_per_class": 400, "k_ci95_draws": None if pm is None else pm / 100, "max_units": units,
             "how_produced": src, "flags": []} for m, full, k400, pm, units, src in QUOTED]


def commit_of(record: dict | None) -> str:
    return str(((record or {}).get("provenance") or {}).get("git_commit", "?"))


def pretrain_text(feat: dict) -> str:
    pre = feat.get("pretrain") or {}
    cfg, data = pre.get("config") or {}, pre.get("data") or {}
    prov = pre.get("provenance") or {}
    skipped = f", {data['skipped']} unreadable skipped" if data.get("skipped") else ""
    return (f"pretrained on {split_name(str(data.get('spec', '?')))} ({data.get('num_images', '?')} images{skipped}"
            f"{geometry(cfg)}), "
            f"{feat.get('checkpoint_step')} G steps and {pre.get('critic_batches', '?')} critic steps x batch "
            f"{cfg.get('batch_size')} ({cfg.get('optimizer')} lr {cfg.get('lr_d')}), seed {cfg.get('seed', '?')}, "
            f"{pre.get('precision')}, "
            f"{duration(pre.get('seconds') or 0)} on {prov.get('hardware', '?')}, pretrain commit "
            f"{prov.get('git_commit', '?')}")


def kmeans_text(feat: dict) -> str:
    cfg = feat.get("config") or {}
    p = cfg.get("patch_size", 6)
    return (f"K={cfg.get('k')}, {cfg.get('patches')} patches, {cfg.get('iterations')} iterations, "
            f"{p}x{p}x{cfg.get('channels', 3)} patches, ZCA eps {cfg.get('whiten_eps')}{geometry(cfg)}")


def geometry(cfg: dict) -> str:
    """', 28 px, 1 channel' where the images are not the protocol's 32 px RGB."""
    size, channels = cfg.get("image_size", 32), cfg.get("channels", 3)
    if (size, channels) == (32, 3):
        return ""
    return f", {size} px, {channels} channel{'s' if channels != 1 else ''}"


def supervised_text(feat: dict) -> str:
    cfg, critic, prov = feat.get("config") or {}, feat.get("critic") or {}, feat.get("provenance") or {}
    return (f"{critic.get('arch', '?')} critic of `{feat.get('model')}` (norm {critic.get('norm')}, width "
            f"{cfg.get('width')}{geometry(cfg)}) with a linear softmax head on its {cfg.get('grid', 4)}x"
            f"{cfg.get('grid', 4)}-pooled features ({feat.get('feature_dim')} dims, the SVM rows' features), trained end "
            f"to end with cross-entropy on the labels: {feat.get('steps')} steps x batch {cfg.get('batch_size')} "
            f"(Adam lr {cfg.get('lr')} decayed linearly, weight decay {cfg.get('weight_decay')}, no augmentation), "
            f"{feat.get('precision')}, {duration(feat.get('seconds') or 0)} on {prov.get('hardware', '?')}")


def is_control(feat: dict) -> bool:
    return feat.get("kind") not in ("kmeans", "supervised") and feat.get("checkpoint_step") == 0


def row_name(feat: dict, scale: str) -> str:
    if feat.get("kind") == "supervised":
        family = FAMILY_NAMES.get(str(feat.get("model")), str(feat.get("model")))
        name = f"supervised (upper reference): {family} critic trained with labels"
    elif feat.get("kind") == "kmeans":
        name = f"1 Layer K-means (reproduced, K={(feat.get('config') or {}).get('k')})"
    else:
        cfg = (feat.get("pretrain") or {}).get("config") or {}
        name = FAMILY_NAMES.get(str(feat.get("model")), str(feat.get("model")))
        name += " untrained control (step 0" if is_control(feat) else " (reproduced"
        extras = [k for k in ("spectral_norm",) if cfg.get(k)] + ([f"attn@{cfg['attention_res']}"]
                                                                  if cfg.get("attention_res") else [])
        if cfg.get("arch") not in (None, "dcgan"):
            extras.insert(0, str(cfg.get("arch")))
        name += (", " + ", ".join(extras) if extras else "") + ")"
    return name


def preprocessing_label(res: dict) -> str:
    """What the SVM did to the features before fitting, when not the paper's nothing."""
    cfg = res.get("config") or {}
    done = [label for key, label in (("l2_normalize", "rows L2-normalised"), ("standardize", "dims standardised"))
            if cfg.get(key)] + (["layers equalised"] if cfg.get("layer_scale", "none") != "none" else [])
    return f" [SVM input: {', '.join(done)}]" if done else ""


def run_dir_of(res: dict) -> Path | None:
    """The pretrain run a critic's features came from (the features file sits in its folder)."""
    path = Path(str((res.get("features") or {}).get("path", "")))
    return path.parent if (path.parent / "config.json").exists() else None


def copy_beside(src: Path, out_dir: Path, sub: str, slug: str) -> str:
    target = out_dir / sub / f"{slug}{src.suffix}"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, target)
    return f"{sub}/{target.name}"


def samples_link(res: dict, out_dir: Path, slug: str) -> str:
    """The run's latest sample grid, its pretraining curve and its report, copied next to the table."""
    from ..train.report import latest_sample_grid
    run_dir = run_dir_of(res)
    grid = latest_sample_grid(run_dir) if run_dir else None
    if grid is None:
        return ""
    link = f"[grid]({copy_beside(grid, out_dir, 'samples', slug)})"
    curve = latest_curve(run_dir)
    if curve is not None and curve.with_suffix(".png").exists():
        link += f" [curve]({copy_beside(curve.with_suffix('.png'), out_dir, 'curves', slug)})"
    report = run_dir / "report.md"   # `replearn report run=...` writes it; build/ stays local
    if report.exists():
        link += f" [report]({os.path.relpath(report.resolve(), out_dir.resolve())})"
    return link


def latest_curve(run_dir: Path) -> Path | None:
    found = sorted(run_dir.glob("curve-*.json"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def curve_text(res: dict) -> str:
    run_dir = run_dir_of(res)
    curve = latest_curve(run_dir) if run_dir else None
    if curve is None:
        return ""
    record = json.loads(curve.read_text())
    points, per_class = record.get("points") or [], (record.get("config") or {}).get("per_class", 400)
    steps = ", ".join(f"{p['step']}: {100 * p['mean']:.1f}" for p in points)
    return f"; pretraining curve ({per_class} per class, {points[0]['draws'] if points else '?'} draws; step: %) {steps}"


def flags(res: dict, feat: dict) -> list[str]:
    """What a reader must know before quoting the row: C at an edge, unconverged fits, mixed code."""
    out = []
    for name, setting in (res.get("settings") or {}).items():
        if setting.get("c_at_edge"):
            out.append(f"{name}: best C at the edge of the capped grid")
        solver = setting.get("solver") or {}
        if solver.get("not_converged"):
            out.append(f"{name}: {len(solver['not_converged'])} of {solver.get('fits')} fits did not converge")
    commits = {c for c in (commit_of(feat.get("pretrain")), commit_of(feat), commit_of(res)) if c not in ("?", "None")}
    if len(commits) > 1:
        out.append("artifacts from different commits")
    if any(c.endswith("-dirty") for c in commits):
        out.append("built from a dirty tree")
    return out


def eval_text(res: dict, feat: dict) -> str:
    settings = res.get("settings", {})
    full, k400 = settings.get("full") or {}, settings.get("400") or {}
    svm_cfg = res.get("config") or {}
    feat_cfg = feat.get("config") or {}
    train = feat.get("source_train") or feat_cfg.get("train")   # critic files / the kmeans config
    test = feat.get("source_test") or feat_cfg.get("test")
    n_train, n_val = res.get("train_rows", "?"), (res.get("validation") or {}).get("size", "?")
    chosen = "fixed" if svm_cfg.get("fixed_c") else f"chosen on {n_val} images held out of train"
    text = f"features {feat.get('precision', 'fp32')} (commit {commit_of(feat)}); L2-SVM ({svm_cfg.get('solver')})"
    if feat.get("kind") == "supervised":
        text = f"trained on all {n_train} labelled images of {split_name(str(train))} (commit {commit_of(feat)})"
        full = {}
    if full:
        text += (f"; full: C={full.get('c', 0):.3g} {chosen}, then fit on all {n_train} labelled images of "
                 f"{split_name(str(train))}")
    if k400:
        text += (f"; {svm_cfg.get('per_class', 400)} per class: C={k400.get('c', 0):.3g}, mean +- 1.96 std over "
                 f"{len(k400.get('draws', []))} draws")
    if res.get("reused_from"):
        twin = Path(str((res["reused_from"].get("features") or {}).get("path") or "?"))
        text += f"; SVM fits shared with {twin.parent.name}/{twin.name} (the same feature bytes)"
    skipped = [f"{feat[f'skipped_{k}']} unreadable {k} images skipped" for k in ("train", "test")
               if feat.get(f"skipped_{k}")]
    text += "".join(f"; {s}" for s in skipped)
    return text + (f"; scored on {split_name(str(test))}; evaluation commit {commit_of(res)}, "
                   f"{str((res.get('provenance') or {}).get('date', '?'))[:10]}")


# ============================================================================ scale
# preset keys that say how often to log or save, not what is trained
BOOKKEEPING = ("sample_every", "ckpt_every", "log_every", "fid_every")


def scale_of(res: dict, feat: dict) -> str:
    """The scale that ran: the preset's name when every pretraining key the preset sets has that value,
    else 'custom (<preset> preset, key=value ...)' listing where the run departs from it."""
    from ..train import pretrain
    from ..probe import curve, features, kmeans, supervised, svm  # noqa: F401  (their presets)
    from ..core.config import PRESETS
    if feat.get("kind") == "kmeans":
        stage, cfg = "kmeans", feat.get("config") or {}
    else:
        stage, cfg = "pretrain", (feat.get("pretrain") or {}).get("config") or {}
    if feat.get("kind") == "supervised":
        stage, cfg = "supervised", feat.get("config") or {}
    preset = str(cfg.get("preset") or (res.get("config") or {}).get("preset") or "")
    if not preset:
        return "custom"
    wanted = PRESETS.get(preset, {}).get(stage, {})
    off = [f"{k}={cfg.get(k)}" for k, v in wanted.items()
           if k in cfg and k not in BOOKKEEPING and json.dumps(cfg.get(k), default=str) != json.dumps(list(v) if isinstance(v, tuple) else v)]
    return preset if not off else f"custom ({preset} preset, {' '.join(off)})"


# ============================================================================ rows
def reproduced_row(path: Path, out_dir: Path) -> dict[str, Any]:
    res = read_results(path)
    feat = (res.get("features") or {}).get("attrs", {})
    settings = res.get("settings", {})
    full, k400 = settings.get("full") or {}, settings.get("400") or {}
    scale = scale_of(res, feat)
    how = {"kmeans": kmeans_text, "supervised": supervised_text}.get(str(feat.get("kind")), pretrain_text)(feat)
    how += "; " + eval_text(res, feat) + ("" if is_control(feat) else curve_text(res))
    kind = {"supervised": "upper reference", "kmeans": "reproduced"}.get(str(feat.get("kind")),
                                                                         "control" if is_control(feat) else "reproduced")
    pre = feat.get("pretrain") or {}
    pre_cfg = pre.get("config") or {}
    n_test = full.get("test_size") or k400.get("test_size")
    per_class = int((res.get("config") or {}).get("per_class", 400))
    draws = k400.get("draws") or []
    return {"model": row_name(feat, scale) + preprocessing_label(res), "status": kind, "scale": scale,
            "seed": pre_cfg.get("seed"), "pretrain_steps": feat.get("checkpoint_step"),
            "pretrain_data": split_name(str((pre.get("data") or {}).get("spec", ""))) if pre else "",
            "eval_train": split_name(str(feat.get("source_train") or (feat.get("config") or {}).get("train"))),
            "eval_test": split_name(str(feat.get("source_test") or (feat.get("config") or {}).get("test"))),
            "hardware": (res.get("provenance") or {}).get("hardware"),
            "pretrain_hardware": (pre.get("provenance") or {}).get("hardware"),
            "commit": commit_of(res), "pretrain_commit": commit_of(pre) if pre else "",
            "full_acc": full.get("test_acc"), "full_ci95_test": test_ci95(full.get("test_acc"), full.get("test_size")),
            "full_c": full.get("c"), "full_c_at_edge": full.get("c_at_edge"),
            "k_per_class": per_class, "k_acc": k400.get("mean"), "k_ci95_draws": k400.get("ci95"),
            "k_ci95_test": test_ci95(k400.get("mean"), n_test), "k_draws": len(draws) or None,
            "k_c": k400.get("c"), "k_c_at_edge": k400.get("c_at_edge"),
            "max_units": feat.get("max_units", (feat.get("config") or {}).get("k", "-")),
            "flags": flags(res, feat), "how_produced": how,
            "samples": "" if is_control(feat) else samples_link(res, out_dir, path.name.split(".")[0] + "-" + path.parent.name),
            "seconds": stage_seconds(res, feat),
            # for pairing rows with their controls and seeds, dropped before writing
            "_pair": (pre.get("key"), json.dumps(svm_pairing_config(res), sort_keys=True)),
            "_group": (str(feat.get("model")), feat.get("kind"), feat.get("checkpoint_step") == 0,
                       json.dumps({k: v for k, v in pre_cfg.items() if k not in ("seed", "run_dir")}, sort_keys=True,
                                  default=str), json.dumps(svm_pairing_config(res), sort_keys=True)),
            "_control": is_control(feat), "_test_size": n_test, "_k_draws": draws,
            "_full_correct": full.get("test_correct"), "_k_correct": k400.get("draw0_correct"),
            "_run_dir": run_dir_of(res), "_run_key": pre.get("key"), "_features": (res.get("features") or {}).get("identity")}


def stage_seconds(res: dict, feat: dict) -> dict[str, float]:
    """Compute seconds each stage spent on this row's artifacts (as recorded in them)."""
    from ..probe.svm.stage import fitted_seconds
    settings = res.get("settings") or {}
    feat_seconds = feat.get("seconds")
    if isinstance(feat_seconds, dict):   # K-means: by part
        feat_seconds = feat_seconds.get("total")
    out = {"features": float(feat_seconds or 0.0)}
    if feat.get("pretrain"):
        out["pretrain"] = float((feat["pretrain"] or {}).get("seconds") or 0.0)
    for name in settings:
        out[f"svm {name}"] = fitted_seconds(res, name)
    return out


def svm_pairing_config(res: dict) -> dict:
    return {k: v for k, v in (res.get("config") or {}).items() if k not in ("features", "out", "device")}


def attach_gains(rows: list[dict]) -> None:
    """Each trained critic's gain over its own untrained control (same run, same SVM protocol), in points."""
    controls = {r["_pair"]: r for r in rows if r["_control"]}
    for row in rows:
        if row["_control"] or row["_pair"][0] is None:
            continue
        control = controls.get(row["_pair"])
        if control is None:
            row["gain_note"] = "no control"
            continue
        row["control_full_acc"], row["control_k_acc"] = control["full_acc"], control["k_acc"]
        for name, g in (("full", gain_full(row, control)), ("k", gain_k(row, control))):
            row[f"gain_{name}"] = g.get("gain")
            row[f"gain_{name}_ci95"] = g.get("ci95")
            row[f"gain_{name}_p"] = g.get("p")
            row[f"gain_{name}_beyond_noise"] = g.get("beyond_noise")
            row[f"_gain_{name}_text"] = gain_text(g)


def seed_groups(rows: list[dict]) -> list[list[dict]]:
    """Trained rows that differ only in the pretraining seed (same model, config, SVM protocol)."""
    groups: dict = {}
    for row in rows:
        if row["status"] == "reproduced" and row["_run_key"]:
            groups.setdefault(row["_group"], []).append(row)
    return [sorted(g, key=lambda r: r["seed"] or 0) for g in groups.values() if len(g) > 1]


def attach_seed_spread(rows: list[dict]) -> list[list[dict]]:
    groups = seed_groups(rows)
    for group in groups:
        for key in ("full_acc", "k_acc", "gain_full", "gain_k"):
            values = [r.get(key) for r in group if r.get(key) is not None]
            if len(values) > 1:
                for r in group:
                    r[f"{key}_seed_std"] = float(np.std(values, ddof=1))
                    r["seeds"] = ",".join(str(x["seed"]) for x in group)
    return groups


def reproduced_rows(cfg: Config) -> list[dict[str, Any]]:
    rows = [reproduced_row(p, Path(cfg.out_dir)) for p in result_paths(cfg.results)]
    attach_gains(rows)
    if cfg.data_note:
        for row in rows:
            row["how_produced"] += f"; data: {cfg.data_note}"
            row["data_note"] = cfg.data_note
    return rows


def main_rows(rows: list[dict]) -> list[dict]:
    """One row per seed group (its lowest seed) and its control: the seed repeats go to their own section."""
    groups = seed_groups(rows)
    extra = {id(r) for g in groups for r in g[1:]}
    extra_keys = {r["_run_key"] for g in groups for r in g[1:]}
    return [r for r in rows if id(r) not in extra and not (r["_control"] and r["_run_key"] in extra_keys)]


# ============================================================================ writers
def k_header(rows: list[dict]) -> str:
    counts = sorted({r["k_per_class"] for r in rows if r.get("k_acc") is not None and r["status"] != "quoted"})
    return f"{'/'.join(map(str, counts or [400]))} per class"


def md_cells(row: dict, note: int | None, k_name: str) -> dict[str, str]:
    full = percent(row.get("full_acc"), row.get("full_ci95_test"))
    k = percent(row.get("k_acc"), row.get("k_ci95_draws"))
    if row["status"] == "quoted":
        full, k = percent(row.get("full_acc")), percent(row.get("k_acc"), row.get("k_ci95_draws"))
    edge = [s for s, key in (("full", "full_c_at_edge"), ("k", "k_c_at_edge")) if row.get(key)]
    return {"model": row["model"], "scale": row["scale"], "full": full + (" †" if "full" in edge else ""),
            k_name: k + (" †" if "k" in edge else ""),
            "gain full": row.get("_gain_full_text", ""), f"gain {k_name.split()[0]}": row.get("_gain_k_text", ""),
            "notes": f"[{note}]" if note else row.get("how_produced", ""),
            "figures": row.get("samples", "")}


def cost_text(rows: list[dict], curves: list[dict]) -> str:
    """What the table cost, summed over its distinct artifacts, by stage."""
    totals: dict[str, float] = {}
    seen_runs, seen_feats = set(), set()
    at_median: list[float | None] = []      # each run's pretraining at its median step time
    for row in rows:
        if row["status"] == "quoted":
            continue
        sec = row["seconds"]
        if row["_run_key"] and row["_run_key"] not in seen_runs and not row["_control"]:
            seen_runs.add(row["_run_key"])
            totals["pretraining"] = totals.get("pretraining", 0) + sec.get("pretrain", 0)
            at_median.append(steady_pretrain_seconds(row["_run_dir"], row.get("pretrain_steps")))
        if row["_features"] not in seen_feats:
            seen_feats.add(row["_features"])
            key = "K-means" if "K-means" in row["model"] else "features"
            totals[key] = totals.get(key, 0) + sec.get("features", 0)
        for name in ("svm full", "svm 400"):
            label = "SVM full" if name == "svm full" else f"SVM {row['k_per_class']} per class"
            totals[label] = totals.get(label, 0) + sec.get(name, 0)
    curve_seconds = sum(p.get("seconds") or 0 for c in curves for p in c.get("points", []))
    if curve_seconds:
        totals["curve"] = curve_seconds
    hardware = sorted({str(r.get("hardware")) for r in rows if r["status"] != "quoted" and r.get("hardware")})
    steady = f" ({duration(sum(at_median))} at each run's median step time)" \
        if at_median and None not in at_median and sum(at_median) else ""
    parts = ", ".join(f"{k} {duration(v)}" + (steady if k == "pretraining" else "") for k, v in totals.items() if v)
    return (f"Compute recorded in the artifacts: {parts}; in all {duration(sum(totals.values()))}"
            f" on {'; '.join(hardware) or '?'}.")


def steady_pretrain_seconds(run_dir: Path | None, steps) -> float | None:
    """A run's steps at the median step time of its log: what its pretraining costs on a machine doing nothing
    else, where the recorded seconds also count steps that other work on the same cores slowed down. None
    without a log."""
    log = run_dir / "log.jsonl" if run_dir else None
    if not steps or log is None or not log.exists():
        return None
    times = [r["sec_per_step"] for r in read_jsonl(log) if isinstance(r.get("sec_per_step"), (int, float))]
    return float(np.median(times)) * int(steps) if times else None


def seed_section(groups: list[list[dict]], k_name: str) -> str:
    if not groups:
        return ("**Spread over pretraining seeds: not measured here** (the chain's `seed_repeats` was empty): the ± "
                "above cover the SVM draws and the test images, not the GAN's own seed.\n")
    out = []
    for group in groups:
        name = group[0]["model"]
        lines = [f"| seed | full | {k_name} | gain full | gain {k_name.split()[0]} |", "|---|---|---|---|---|"]
        for r in group:
            lines.append(f"| {r['seed']} | {percent(r.get('full_acc'))} | {percent(r.get('k_acc'))} | "
                         f"{r.get('_gain_full_text', '-')} | {r.get('_gain_k_text', '-')} |")

        def stat(key):
            vals = [r[key] for r in group if r.get(key) is not None]
            return f"{100 * np.mean(vals):+.1f} ± {100 * np.std(vals, ddof=1):.1f}" if len(vals) > 1 else "-"
        mean_acc = lambda key: stat(key).lstrip("+")   # noqa: E731
        lines.append(f"| mean ± std over {len(group)} seeds | {mean_acc('full_acc')} | {mean_acc('k_acc')} | "
                     f"{stat('gain_full')} | {stat('gain_k')} |")
        out.append(f"**Spread over pretraining seeds: {name}**, seeds {', '.join(str(r['seed']) for r in group)} "
                   f"(each with its own untrained control, the same features and SVM protocol). The std over seeds "
                   f"is the noise a second run of this table would see; a gain smaller than it is not a finding.\n\n"
                   + "\n".join(lines) + "\n")
    return "\n".join(out)


def header(cfg: Config, rows: list[dict], k_name: str, cost: str) -> str:
    made_by = f"`{cfg.command}`" if cfg.command else "`replearn table`"
    scales = sorted({r["scale"] for r in rows if r["status"] != "quoted"})
    quoted = ("Rows marked *quoted* are the literature's numbers on the real CIFAR-10 test split "
              "(docs/protocol.md s.4), not comparable with rows scored elsewhere. " if cfg.quoted else "")
    equalised = ("Rows marked *[SVM input: layers equalised]* fit the same features with every layer rescaled to "
                 "an equal share of the mean squared norm (svm layer_scale=equal); the unmarked rows follow the "
                 "paper. " if any("layers equalised" in r["model"] for r in rows) else "")
    return (f"# {DATASET_TITLES.get(cfg.dataset, cfg.dataset)} linear L2-SVM accuracy on frozen features "
            f"({', '.join(scales) or 'no'} scale)\n\n"
            f"Generated by {made_by} at commit {git_commit()}. {quoted}"
            f"Each reproduced critic stands beside its *untrained control*: the same network at initialisation "
            f"(step 0, BatchNorm statistics recomputed the same way) through the same features and SVM protocol; "
            f"*gain* is the trained row minus its control, in points.\n\n"
            f"Noise: **full** ± is the 95% interval from sampling the test images alone (binomial); **{k_name}** ± "
            f"is 1.96 std over the draws of labelled images, as the paper reports it (the test images' own ± is in "
            f"the csv). **gain full** ± and p: McNemar's test on the same test images; **gain {k_name.split()[0]}** ±: "
            f"draws (paired) and test images in quadrature. `*` marks a gain beyond that noise (p < 0.05), "
            f"`(n.s.)` one that is not distinguishable from zero. † marks a C at the edge of its capped search. "
            f"None of these cover the GAN's own seed: see the seed spread below the table.\n\n"
            f"{equalised}Scale *tiny* and *smoke* rows only check that the chain runs; *cpu* rows come from 2000 generator "
            f"steps on a 30k-image ImageNet stand-in, not the paper's 300k steps on ImageNet-1k.\n\n{cost}\n\n")


def latex_table(rows: list[dict], k_name: str) -> str:
    cols = ["model", "scale", "full", k_name, "gain full", f"gain {k_name.split()[0]}", "how produced (short)"]
    lines = [r"\begin{tabular}{lllllll}", r"\hline", " & ".join(latex_escape(c) for c in cols) + r" \\", r"\hline"]
    for row in rows:
        cells = md_cells(row, None, k_name)
        short = row.get("how_produced", "") if row["status"] == "quoted" else \
            (f"{row.get('pretrain_steps', '')} G steps; {row.get('hardware', '')}; commit {row.get('commit', '')}"
             if row.get("pretrain_steps") is not None else f"{row.get('hardware', '')}; commit {row.get('commit', '')}")
        values = [cells["model"], cells["scale"], cells["full"], cells[k_name], cells["gain full"],
                  cells[f"gain {k_name.split()[0]}"], short]
        lines.append(" & ".join(latex_escape(v) for v in values) + r" \\")
    lines += [r"\hline", r"\end{tabular}", ""]
    return "\n".join(lines)


CSV_DROP = ("samples", "seconds")
INTEGER_COLUMNS = {"seed", "pretrain_steps", "k_per_class", "k_draws"}


def csv_frame(rows: list[dict], k_name: str) -> pd.DataFrame:
    records = []
    for row in rows:
        cells = md_cells(row, None, k_name)
        rec = {k: v for k, v in row.items() if not k.startswith("_") and k not in CSV_DROP}
        rec["flags"] = "; ".join(row.get("flags") or [])
        rec.update({"full_display": cells["full"], "k_display": cells[k_name],
                    "gain_full_display": cells["gain full"], "gain_k_display": cells[f"gain {k_name.split()[0]}"]})
        for key, value in (row.get("seconds") or {}).items():
            rec[f"seconds_{key.replace(' ', '_')}"] = value
        records.append(rec)
    frame = pd.DataFrame(records)
    for column in INTEGER_COLUMNS & set(frame):     # a quoted row's blank would otherwise make every seed read 0.0
        frame[column] = pd.to_numeric(frame[column]).astype("Int64")
    first = ["model", "status", "scale", "seed", "pretrain_steps", "full_acc", "full_ci95_test", "k_per_class", "k_acc",
             "k_ci95_draws", "k_ci95_test", "gain_full", "gain_full_ci95", "gain_full_p", "gain_full_beyond_noise",
             "gain_k", "gain_k_ci95", "gain_k_beyond_noise"]
    return frame[[c for c in first if c in frame] + [c for c in frame if c not in first]]


def curves_of(rows: list[dict]) -> list[dict]:
    found = []
    for run_dir in sorted({r["_run_dir"] for r in rows if r.get("_run_dir")}):
        curve = latest_curve(run_dir)
        if curve is not None:
            found.append(json.loads(curve.read_text()))
    return found


def compare_samples(cfg: Config, rows: list[dict[str, Any]]) -> Path | None:
    """All reproduced GAN rows' sample grids side by side in one PNG."""
    from ..train.report import latest_sample_grid, report_compare
    runs = sorted({r["_run_dir"] for r in rows if r["_run_dir"] and not r["_control"]
                   and latest_sample_grid(r["_run_dir"]) is not None})   # results kept without their run's grids
    if not runs:
        return None
    return report_compare(runs, Path(cfg.out_dir) / f"{cfg.name}_samples.png", "samples of each reproduced GAN")


DATASET_TITLES = {"cifar10": "CIFAR-10", "mnist": "MNIST", "fashion-mnist": "Fashion-MNIST", "digits": "digits"}


def build_markdown(cfg: Config, rows: list[dict], shown: list[dict], groups, k_name: str, footer: str) -> str:
    table_rows, notes = [], []
    for row in (quoted_rows() if cfg.quoted else []) + shown:
        note = None
        if row["status"] != "quoted":
            notes.append(row)
            note = len(notes)
        table_rows.append(md_cells(row, note, k_name))
    frame = pd.DataFrame(table_rows)
    text = header(cfg, rows, k_name, cost_text(rows, curves_of(rows))) + frame.to_markdown(index=False) + "\n\n"
    text += seed_section(groups, k_name) + "\n**How each row was produced**\n\n"
    for i, row in enumerate(notes, 1):
        flag = f" **Flags: {'; '.join(row['flags'])}.**" if row.get("flags") else ""
        text += f"{i}. *{row['model']}* ({row['status']}, {row['scale']} scale): {row['how_produced']}.{flag}\n"
    return text + footer


def run(cfg: Config) -> Path:
    """Write <out_dir>/<name>.md, .csv and .tex from the svm results."""
    rows = reproduced_rows(cfg)
    groups = attach_seed_spread(rows)
    shown = main_rows(rows)
    k_name = k_header(rows)
    out = Path(cfg.out_dir)
    compared = compare_samples(cfg, rows)
    footer = f"\n![samples]({compared.name})\n" if compared else ""
    every = (quoted_rows() if cfg.quoted else []) + rows
    atomic_write_text(out / f"{cfg.name}.md", build_markdown(cfg, rows, shown, groups, k_name, footer))
    atomic_write_text(out / f"{cfg.name}.csv", csv_frame(every, k_name).to_csv(index=False))
    atomic_write_text(out / f"{cfg.name}.tex", latex_table((quoted_rows() if cfg.quoted else []) + shown, k_name))
    frame = pd.DataFrame([md_cells(r, None, k_name) for r in every]).drop(columns=["notes", "figures"])
    print(frame.to_markdown(index=False))
    return out / f"{cfg.name}.md"
