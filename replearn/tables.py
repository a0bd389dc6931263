"""Results JSON -> comparison tables (markdown, CSV, LaTeX) beside the literature's numbers.

    python -m replearn table results='runs/**/*.svm.json'

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

import pandas as pd

from .config import ConfigError
from .utils import atomic_write_text, git_commit

# docs/protocol.md s.4: (model, full %, 400-per-class %, +-, max # feature units, source)
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
COLUMNS = ["model", "full", "400 per class", "gain over untrained control", "max # features units", "status",
           "samples", "how produced"]


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


def percent(value: float | None, spread: float | None = None) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f}%" + (f" (+-{100 * spread:.1f})" if spread is not None else "")


def quoted_rows() -> list[dict[str, Any]]:
    return [{"model": m, "full": f"{full:.1f}%", "400 per class": f"{k400:.1f}%" + (f" (+-{pm})" if pm else ""),
             "gain over untrained control": "", "max # features units": units, "status": "quoted", "samples": "",
             "how produced": src} for m, full, k400, pm, units, src in QUOTED]


def split_name(spec: str) -> str:
    spec = str(spec)
    return spec[spec.index("shared/data/") + len("shared/data/"):].replace("/train.parquet", "-train") \
        if "shared/data/" in spec else spec


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
            f"{cfg.get('batch_size')} ({cfg.get('optimizer')} lr {cfg.get('lr_d')}), {pre.get('precision')}, "
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
    return name + (f" [{scale} scale]" if scale not in ("", "paper") else "")


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
    from .report import latest_sample_grid
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
    skipped = [f"{feat[f'skipped_{k}']} unreadable {k} images skipped" for k in ("train", "test")
               if feat.get(f"skipped_{k}")]
    text += "".join(f"; {s}" for s in skipped)
    return text + (f"; scored on {split_name(str(test))}; evaluation commit {commit_of(res)}, "
                   f"{str((res.get('provenance') or {}).get('date', '?'))[:10]}")


def duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def reproduced_row(path: Path, out_dir: Path) -> dict[str, Any]:
    res = read_results(path)
    feat = (res.get("features") or {}).get("attrs", {})
    settings = res.get("settings", {})
    full, k400 = settings.get("full") or {}, settings.get("400") or {}
    scale = str(((feat.get("pretrain") or {}).get("config") or {}).get("preset")
                or (feat.get("config") or {}).get("preset") or (res.get("config") or {}).get("preset") or "")
    how = {"kmeans": kmeans_text, "supervised": supervised_text}.get(str(feat.get("kind")), pretrain_text)(feat)
    how += "; " + eval_text(res, feat) + ("" if is_control(feat) else curve_text(res))
    kind = {"supervised": "upper reference"}.get(str(feat.get("kind")), "control" if is_control(feat) else "reproduced")
    status = f"{kind} ({scale or 'custom'} scale)"
    return {"model": row_name(feat, scale) + preprocessing_label(res), "full": percent(full.get("test_acc")),
            "400 per class": percent(k400.get("mean"), k400.get("ci95")), "gain over untrained control": "",
            "max # features units": feat.get("max_units", (feat.get("config") or {}).get("k", "-")),
            "status": "; ".join([status] + flags(res, feat)),
            "samples": "" if is_control(feat) else samples_link(res, out_dir, path.name.split(".")[0] + "-" + path.parent.name),
            "how produced": how,
            # for pairing rows with their controls, dropped before writing
            "_pair": ((feat.get("pretrain") or {}).get("key"), json.dumps(svm_pairing_config(res), sort_keys=True)),
            "_control": is_control(feat), "_acc": (full.get("test_acc"), k400.get("mean")), "_run_dir": run_dir_of(res)}


def svm_pairing_config(res: dict) -> dict:
    return {k: v for k, v in (res.get("config") or {}).items() if k not in ("features", "out", "device")}


def gain(trained: float | None, control: float | None) -> str:
    return "-" if trained is None or control is None else f"{100 * (trained - control):+.1f}"


def attach_gains(rows: list[dict]) -> None:
    """Each trained critic's gain over its own untrained control (same run, same SVM protocol), in points."""
    controls = {r["_pair"]: r for r in rows if r["_control"]}
    for row in rows:
        if row["_control"] or row["_pair"][0] is None:
            continue
        control = controls.get(row["_pair"])
        row["gain over untrained control"] = "no control" if control is None else \
            f"full {gain(row['_acc'][0], control['_acc'][0])}, 400 {gain(row['_acc'][1], control['_acc'][1])} points"


def reproduced_rows(cfg: Config) -> list[dict[str, Any]]:
    rows = [reproduced_row(p, Path(cfg.out_dir)) for p in result_paths(cfg.results)]
    attach_gains(rows)
    if cfg.data_note:
        for row in rows:
            row["how produced"] += f"; data: {cfg.data_note}"
    return rows


def build_table(cfg: Config, rows: list[dict[str, Any]] | None = None) -> pd.DataFrame:
    rows = reproduced_rows(cfg) if rows is None else rows
    return pd.DataFrame((quoted_rows() if cfg.quoted else []) + rows, columns=COLUMNS)


def compare_samples(cfg: Config, rows: list[dict[str, Any]]) -> Path | None:
    """All reproduced GAN rows' sample grids side by side in one PNG."""
    from .report import report_compare
    runs = sorted({r["_run_dir"] for r in rows if r["_run_dir"]})
    if not runs:
        return None
    return report_compare(runs, Path(cfg.out_dir) / f"{cfg.name}_samples.png", "samples of each reproduced GAN")


DATASET_TITLES = {"cifar10": "CIFAR-10", "mnist": "MNIST", "fashion-mnist": "Fashion-MNIST", "digits": "digits"}


def header(cfg: Config, n_reproduced: int) -> str:
    made_by = f" by `{cfg.command}`" if cfg.command else ""
    quoted = ("Quoted rows are the literature's numbers on the CIFAR-10 test split (PROTOCOL s.4); "
              if cfg.quoted else "")
    return (f"# {DATASET_TITLES.get(cfg.dataset, cfg.dataset)} linear L2-SVM accuracy on frozen features\n\n"
            f"Generated{made_by} with `replearn table` at commit {git_commit()}. {quoted}"
            f"{n_reproduced} reproduced row(s) were computed by this code, and each says how, including "
            f"which split it was scored on. Each reproduced critic has an *untrained control* row: the same "
            f"network at initialisation (step 0, BatchNorm statistics recomputed the same way) through the same "
            f"features and SVM protocol; the gain over it is what pretraining bought. \"+-x\" is 1.96 std over "
            f"the 400-per-class draws, as the paper reports it. Rows marked *[SVM input: layers equalised]* fit "
            f"the same features with every layer rescaled to an equal share of the mean squared norm (svm "
            f"layer_scale=equal); the unmarked rows follow the paper (features as extracted). Rows marked *smoke*, *tiny* or *cpu scale* come "
            f"from minutes of CPU pretraining and are not comparable with the quoted numbers.\n\n")


def run(cfg: Config) -> Path:
    """Write <out_dir>/<name>.md, .csv and .tex from the svm results."""
    rows = reproduced_rows(cfg)
    table = build_table(cfg, rows)
    out = Path(cfg.out_dir)
    n_rep = int((table["status"] != "quoted").sum())
    compared = compare_samples(cfg, rows)
    footer = f"\n![samples]({compared.name})\n" if compared else ""
    atomic_write_text(out / f"{cfg.name}.md", header(cfg, n_rep) + table.to_markdown(index=False) + "\n" + footer)
    atomic_write_text(out / f"{cfg.name}.csv", table.to_csv(index=False))
    atomic_write_text(out / f"{cfg.name}.tex", table.drop(columns=["how produced", "samples"]).to_latex(index=False))
    print(table.drop(columns=["how produced", "samples"]).to_markdown(index=False))
    return out / f"{cfg.name}.md"
