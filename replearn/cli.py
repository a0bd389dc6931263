"""`python -m replearn <stage> key=value ...`: parse, build the stage's config, call `run(cfg)`.

Each stage module defines a frozen dataclass `Config` and `run(cfg) -> Path`; nothing else
happens here, except turning mistakes into one line that says what to type instead.
"""
from __future__ import annotations

import ast
import importlib
import importlib.metadata
import importlib.util
import os
import sys

from .core.config import ConfigError, build, did_you_mean, field_help, to_dict

# stage name -> module holding `Config` and `run`
STAGES = {
    "prepare": "replearn.data.cache",
    "pretrain": "replearn.train.pretrain",
    "features": "replearn.probe.features",
    "svm": "replearn.probe.svm.stage",
    "kmeans": "replearn.probe.kmeans",
    "table": "replearn.publish.tables",
    "evaluate": "replearn.train.evaluate",
    "report": "replearn.train.report",
    "curve": "replearn.probe.curve",
    "supervised": "replearn.probe.supervised",
    "chain": "replearn.chain",
    # the seed papers' studies (issue 18)
    "wgan-grid": "replearn.studies.wgan_grid",
    "ablation": "replearn.studies.ablation",
    "augment": "replearn.studies.augment",
    "subset": "replearn.data.subset",
    "generate": "replearn.train.generate",
    "classify": "replearn.probe.classifier",
}

# keys holding a data source spec, checked before any work (a bad test split must not wait for an hour of
# pretraining); the labelled ones need classes (the SVMs fit and score them)
DATA_KEYS = ("data", "pretrain_data", "source", "train", "test")
LABELLED_KEYS = ("train", "test")
# the make variables behind a stage's data keys (Makefile), named in its data errors
MAKE_VARIABLES = {
    "chain": {"pretrain_data": "PRETRAIN_DATA", "train": "TRAIN_DATA", "test": "TEST_DATA"},
    "wgan-grid": {"data": "STUDY_DATA", "train": "TRAIN_DATA", "test": "TEST_DATA"},
    "ablation": {"data": "STUDY_DATA", "train": "TRAIN_DATA", "test": "TEST_DATA"},
    "augment": {"train": "TRAIN_DATA", "test": "TEST_DATA"},
}


def version() -> str:
    try:
        return importlib.metadata.version("replearn")
    except importlib.metadata.PackageNotFoundError:   # run from a checkout without installing it
        from . import __version__
        return __version__


def summary(stage: str) -> str:
    """The first line of the stage's `run` docstring, read from the source: `--help` imports no torch."""
    spec = importlib.util.find_spec(STAGES[stage])
    tree = ast.parse(open(spec.origin, encoding="utf-8").read())
    run = next((n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "run"), None)
    return ((ast.get_docstring(run) if run else "") or "").strip().split("\n")[0]


def usage() -> str:
    width = max(map(len, STAGES))
    lines = [f"replearn {version()}: how good are the features a GAN critic learns without labels?",
             "usage: replearn <stage> [key=value ...]",
             "       replearn <stage> --help   the stage's keys, their defaults and what each means",
             "       replearn --version",
             "stages:"]
    lines += [f"  {name:<{width}}  {summary(name)}" for name in STAGES]
    lines.append("The Makefile runs the chain: `make help` shows its targets, presets and variables.")
    return "\n".join(lines)


def stage_help(stage: str, module) -> str:
    """One line per key: key=default as it would be typed, then its meaning (the comment beside the field)."""
    meaning = field_help(module.Config)
    typed = [f"{key}={_as_typed(value)}" for key, value in to_dict(module.Config()).items()]
    width = min(40, max(map(len, typed)))
    lines = [f"replearn {stage}: {summary(stage)}", f"usage: replearn {stage} [key=value ...]   keys, with their defaults:"]
    for word in typed:
        lines.append(f"  {word:<{width}}  {_short(meaning.get(word.split('=', 1)[0], ''))}".rstrip())
    return "\n".join(lines)


def _short(text: str, limit: int = 110) -> str:
    """A long comment cut at its last clause boundary before `limit` (the source keeps the whole story)."""
    if len(text) <= limit:
        return text
    cut = max(text.rfind(mark, 0, limit) for mark in ("; ", ". ", ", ", ": "))
    return (text[:cut] if cut > limit // 3 else text[:limit].rsplit(" ", 1)[0]) + " ..."


def _as_typed(value) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value)) if value else "()"
    if isinstance(value, str):
        return value if value and " " not in value else repr(value)
    return str(value)


def say(text: str) -> None:
    """Print, also into `| head`: a reader that stops early is no error."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())   # no second error at exit


def stage_module(name: str):
    if name not in STAGES:
        raise ConfigError(f"unknown stage {name!r}{did_you_mean(name, STAGES)}; choose from: {', '.join(STAGES)}")
    return importlib.import_module(STAGES[name])


def check_data(cfg) -> None:
    """Parse every data spec of the config at once; train/test must carry classes."""
    from . import data
    for key in DATA_KEYS:
        for spec in _specs(getattr(cfg, key, "")):
            if key in LABELLED_KEYS:
                data.require_labelled(spec)
            else:
                data.parse_spec(spec)


def _specs(value) -> list[str]:
    items = value if isinstance(value, (tuple, list)) else [value]
    return [s for s in items if isinstance(s, str) and s.strip()]


def where_set(stage: str, err, cfg, words: dict[str, str]) -> str:
    """'set train= ...' for a data error: the key (and make variable) whose value is the failing spec."""
    from .data import absolute_spec
    values = {**(to_dict(cfg) if cfg is not None else {}), **words}
    keys = []
    for key, value in values.items():
        for spec in _specs(value):
            try:
                same = spec.strip() == err.spec or absolute_spec(spec) == err.spec
            except ConfigError:
                same = False
            if same and key not in keys:
                keys.append(key)
    if not keys:
        return ""
    make = MAKE_VARIABLES.get(stage, {})
    if all(k in make for k in keys):
        names = " / ".join(f"{make[k]}=" for k in keys)
        return f"fix or change {names} on the make line ({' / '.join(f'{k}=' for k in keys)} for replearn {stage})"
    return f"fix or change {' / '.join(f'{k}=' for k in keys)}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        say(usage())
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        say(f"replearn {version()}")
        return 0
    cfg, words = None, {}
    try:
        module = stage_module(argv[0])
        if "--help" in argv[1:] or "-h" in argv[1:]:
            say(stage_help(argv[0], module))
            return 0
        words = dict(w.split("=", 1) for w in argv[1:] if "=" in w)
        cfg = build(module.Config, argv[0], argv[1:])
        check_data(cfg)
        out = module.run(cfg)
    except ConfigError as err:
        from .data import DataError
        if isinstance(err, DataError) and err.spec and not err.hint:
            err.hint = where_set(argv[0], err, cfg, words)
        print(f"replearn {argv[0]}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"replearn {argv[0]}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    print(out)
    return 0
