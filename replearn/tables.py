"""Results JSON -> comparison tables (markdown, CSV, LaTeX) beside the literature's numbers.

    python -m replearn table results='runs/**/*.svm.json'

Quoted rows (PROTOCOL s.4) are marked `quoted`; every reproduced row says how it was produced:
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

# PROTOCOL s.4: (model, full %, 400-per-class %, +-, max # feature units, source)
QUOTED = [
    ("1 Layer K-means", 80.6, 63.7, 0.7, 4800, "Coates & Ng 2011, quoted by Radford et al. 2016"),
    ("3 Layer K-means Learned RF", 82.0, 70.7, 0.7, 3200, "Coates & Ng 2011, quoted by Radford et al. 2016"),
    ("View Invariant K-means", 81.9, 72.6, 0.7, 6400, "Hui 2013, quoted by Radford et al. 2016"),
    ("Exemplar CNN", 84.3, 77.4, 0.2, 1024, "Dosovitskiy et al. 2014, quoted by Radford et al. 2016"),
    ("DCGAN (ImageNet-1k critic)", 82.8, 73.8, 0.4, 512, "Radford et al. 2016, Table 1"),
    ("WGAN-GP (2024 paper)", 83.2, 74.1, None, 512, "Tarek et al. 2024"),
]
FAMILY_NAMES = {"dcgan": "DCGAN (BCE)", "wgan-gp": "WGAN-GP", "wgan": "WGAN (weight clipping)",
                "wgan-gp-sn-resnet": "WGAN-GP", "resnet-hinge": "SNGAN, hinge", "sagan": "SAGAN, hinge",
                "mlp-gan": "MLP GAN, BCE", "dense-wgan-gp": "WGAN-GP", "dcgan-rmsprop": "DCGAN (BCE), RMSprop",
                "dcgan-sgd": "DCGAN (BCE), SGD"}
COLUMNS = ["model", "full", "400 per class", "max # features units", "status", "samples", "how produced"]


@dataclass(frozen=True)
class Config:
    results: str = "runs/**/*.svm.json"   # glob (or comma-separated paths) of `svm` results
    out_dir: str = "tables"
    name: str = "cifar10"
    quoted: bool = True                   # include the literature rows of PROTOCOL s.4
    preset: str = ""


def result_paths(pattern: str) -> list[Path]:
    paths: list[Path] = []
    for part in (p.strip() for p in pattern.split(",") if p.strip()):
        hits = sorted(glob.glob(part, recursive=True))
        if not hits and not any(ch in part for ch in "*?["):
            raise ConfigError(f"results file not found: {part} (run `replearn svm` first)")
        paths += [Path(h) for h in hits]
    return paths


def percent(value: float | None, spread: float | None = None) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f}%" + (f" (+-{100 * spread:.1f})" if spread is not None else "")


def quoted_rows() -> list[dict[str, Any]]:
    return [{"model": m, "full": f"{full:.1f}%", "400 per class": f"{k400:.1f}%" + (f" (+-{pm})" if pm else ""),
             "max # features units": units, "status": "quoted", "samples": "", "how produced": src}
            for m, full, k400, pm, units, src in QUOTED]


def split_name(spec: str) -> str:
    return spec.replace("../shared/data/", "").replace("/train.parquet", "-train")


def pretrain_text(feat: dict) -> str:
    pre = feat.get("pretrain") or {}
    cfg, data = pre.get("config") or {}, pre.get("data") or {}
    prov = pre.get("provenance") or {}
    steps = feat.get("checkpoint_step")
    return (f"pretrained on {split_name(str(data.get('spec', '?')))} ({data.get('num_images', '?')} images), "
            f"{steps} G steps and {pre.get('critic_batches', '?')} critic steps x batch {cfg.get('batch_size')} ("
            f"{cfg.get('optimizer')} lr {cfg.get('lr_d')}), {pre.get('precision')}, "
            f"{(pre.get('seconds') or 0) / 60:.0f} min on {prov.get('hardware', '?')}")


def kmeans_text(feat: dict) -> str:
    cfg = feat.get("config") or {}
    return (f"K={cfg.get('k')}, {cfg.get('patches')} patches, {cfg.get('iterations')} iterations, "
            f"6x6 patches, ZCA eps {cfg.get('whiten_eps')}")


def row_name(feat: dict, scale: str) -> str:
    if feat.get("kind") == "kmeans":
        name = f"1 Layer K-means (reproduced, K={(feat.get('config') or {}).get('k')})"
    else:
        cfg = (feat.get("pretrain") or {}).get("config") or {}
        name = FAMILY_NAMES.get(str(feat.get("model")), str(feat.get("model"))) + " (reproduced"
        extras = [k for k in ("spectral_norm",) if cfg.get(k)] + ([f"attn@{cfg['attention_res']}"]
                                                                  if cfg.get("attention_res") else [])
        if cfg.get("arch") not in (None, "dcgan"):
            extras.insert(0, str(cfg.get("arch")))
        name += (", " + ", ".join(extras) if extras else "") + ")"
    return name + (f" [{scale} scale]" if scale not in ("", "paper") else "")


def run_dir_of(res: dict) -> Path | None:
    """The pretrain run a critic's features came from (the features file sits in its folder)."""
    path = Path(str((res.get("features") or {}).get("path", "")))
    return path.parent if (path.parent / "config.json").exists() else None


def samples_link(res: dict, out_dir: Path, slug: str) -> str:
    """Copy the run's latest sample grid next to the table (one PNG per row) and link it."""
    from .report import latest_sample_grid
    run_dir = run_dir_of(res)
    grid = latest_sample_grid(run_dir) if run_dir else None
    if grid is None:
        return ""
    target = out_dir / "samples" / f"{slug}.png"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(grid, target)
    link = f"[grid](samples/{slug}.png)"
    report = run_dir / "report.md"   # `replearn report run=...` writes it; runs/ stays local
    if report.exists():
        link += f" [report]({os.path.relpath(report.resolve(), out_dir.resolve())})"
    return link


def reproduced_row(path: Path, out_dir: Path) -> dict[str, Any]:
    res = json.loads(path.read_text())
    feat = (res.get("features") or {}).get("attrs", {})
    settings = res.get("settings", {})
    full, k400 = settings.get("full") or {}, settings.get("400") or {}
    svm_cfg = res.get("config") or {}
    scale = str(((feat.get("pretrain") or {}).get("config") or {}).get("preset")
                or (feat.get("config") or {}).get("preset") or svm_cfg.get("preset") or "")
    how = kmeans_text(feat) if feat.get("kind") == "kmeans" else pretrain_text(feat)
    prov = res.get("provenance") or {}
    feat_cfg = feat.get("config") or {}
    train = feat.get("source_train") or feat_cfg.get("train")   # critic files / the kmeans config
    test = feat.get("source_test") or feat_cfg.get("test")
    how += (f"; features {feat.get('precision', 'fp32')}; L2-SVM ({svm_cfg.get('solver')}) trained on "
            f"{split_name(str(train))}, scored on {split_name(str(test))}, "
            f"C full={full.get('c', '-')}, C 400={k400.get('c', '-')}, {len(k400.get('draws', []))} draws; "
            f"commit {prov.get('git_commit', '?')}, {str(prov.get('date', '?'))[:10]}")
    return {"model": row_name(feat, scale), "full": percent(full.get("test_acc")),
            "400 per class": percent(k400.get("mean"), k400.get("ci95")),
            "max # features units": feat.get("max_units", (feat.get("config") or {}).get("k", "-")),
            "status": f"reproduced ({scale or 'custom'} scale)",
            "samples": samples_link(res, out_dir, path.name.split(".")[0] + "-" + path.parent.name),
            "how produced": how}


def build_table(cfg: Config) -> pd.DataFrame:
    rows = quoted_rows() if cfg.quoted else []
    rows += [reproduced_row(p, Path(cfg.out_dir)) for p in result_paths(cfg.results)]
    return pd.DataFrame(rows, columns=COLUMNS)


def compare_samples(cfg: Config) -> Path | None:
    """All reproduced GAN rows' sample grids side by side in one PNG."""
    from .report import report_compare
    runs = [r for r in (run_dir_of(json.loads(p.read_text())) for p in result_paths(cfg.results)) if r]
    if not runs:
        return None
    return report_compare(runs, Path(cfg.out_dir) / f"{cfg.name}_samples.png", "samples of each reproduced GAN")


def header(cfg: Config, n_reproduced: int) -> str:
    return (f"# CIFAR-10 linear L2-SVM accuracy on frozen features\n\n"
            f"Generated by `replearn table` at commit {git_commit()} from `{cfg.results}`. "
            f"Quoted rows are the literature's numbers on the CIFAR-10 test split (PROTOCOL s.4); "
            f"{n_reproduced} reproduced row(s) were computed by this code, and each says how, including "
            f"which split it was scored on. Rows marked *smoke scale* come from minutes of CPU "
            f"pretraining and are not comparable with the quoted numbers.\n\n")


def run(cfg: Config) -> Path:
    """Write <out_dir>/<name>.md, .csv and .tex from the svm results."""
    table = build_table(cfg)
    out = Path(cfg.out_dir)
    n_rep = int((table["status"] != "quoted").sum())
    compared = compare_samples(cfg)
    footer = f"\n![samples]({compared.name})\n" if compared else ""
    atomic_write_text(out / f"{cfg.name}.md", header(cfg, n_rep) + table.to_markdown(index=False) + "\n" + footer)
    atomic_write_text(out / f"{cfg.name}.csv", table.to_csv(index=False))
    atomic_write_text(out / f"{cfg.name}.tex", table.drop(columns=["how produced", "samples"]).to_latex(index=False))
    print(table.drop(columns=["how produced", "samples"]).to_markdown(index=False))
    return out / f"{cfg.name}.md"
