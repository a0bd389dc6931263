"""`python -m replearn <stage> key=value ...`: parse, build the stage's config, call `run(cfg)`.

Each stage module defines a frozen dataclass `Config` and `run(cfg) -> Path`; nothing else
happens here.
"""
from __future__ import annotations

import importlib
import sys

from .config import ConfigError, build, to_dict

# stage name -> module holding `Config` and `run`
STAGES = {
    "prepare": "replearn.data",
    "pretrain": "replearn.pretrain",
    "features": "replearn.features",
    "svm": "replearn.svm",
    "kmeans": "replearn.kmeans",
    "table": "replearn.tables",
    "evaluate": "replearn.evaluate",
    "report": "replearn.report",
    "curve": "replearn.curve",
    "supervised": "replearn.supervised",
    "chain": "replearn.chain",
    # the seed papers' studies (issue 18)
    "wgan-grid": "replearn.wgan_grid",
    "ablation": "replearn.ablation",
    "augment": "replearn.augment",
    "subset": "replearn.subset",
    "generate": "replearn.generate",
    "classify": "replearn.classifier",
}


def usage() -> str:
    return (f"usage: replearn <stage> [key=value ...]   stages: {', '.join(STAGES)}\n"
            f"       replearn <stage> --help   lists the stage's keys and defaults")


def stage_module(name: str):
    if name not in STAGES:
        raise ConfigError(f"unknown stage {name!r}; choose from: {', '.join(STAGES)}")
    return importlib.import_module(STAGES[name])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    try:
        module = stage_module(argv[0])
        if "--help" in argv[1:] or "-h" in argv[1:]:
            print(f"replearn {argv[0]}: {(module.run.__doc__ or '').strip().splitlines()[0]}")
            for key, value in to_dict(module.Config()).items():
                print(f"  {key}={value!r}")
            return 0
        cfg = build(module.Config, argv[0], argv[1:])
        out = module.run(cfg)
    except ConfigError as err:
        print(f"replearn {argv[0]}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"replearn {argv[0]}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    print(out)
    return 0

