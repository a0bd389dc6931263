"""Frozen dataclass configs, `key=value` overrides and presets.

Every stage has one frozen dataclass. The CLI turns `key=value` words into a config with
`parse_overrides`; an unknown key fails and lists the valid ones. `to_dict` gives the resolved
config that travels into every artifact.
"""
from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import io
import textwrap
import tokenize
import types
import typing
from typing import Any, Callable, Iterable

# preset name -> stage name -> {key: value}. Filled by the stage modules through `register_preset`.
PRESETS: dict[str, dict[str, dict[str, Any]]] = {}


class ConfigError(ValueError):
    """A bad key, value, preset or name in user input: printed as one line by the CLI."""


def register_preset(preset: str, stage: str, **values: Any) -> None:
    PRESETS.setdefault(preset, {})[stage] = values


def field_names(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """' (did you mean 'steps'?)' for a near miss such as `stpes` or `PRESET`, else ''."""
    by_lower = {c.lower(): c for c in choices}
    close = difflib.get_close_matches(word.lower(), list(by_lower), n=1, cutoff=0.6)
    return f" (did you mean {by_lower[close[0]]!r}?)" if close else ""


# what keys without a comment of their own mean, wherever they appear
COMMON_HELP = {"preset": "a named scale (e.g. tiny, smoke, cpu, paper) whose values this stage starts from",
               "cache_dir": "where decoded image caches live (rebuilt from the sources when missing)",
               "pretrain_data": "unlabelled images the GANs train on: any data source (a folder of JPEG/PNG files, "
                                "parquet, hf:<id>[:split], ...)"}


@functools.lru_cache(maxsize=None)
def field_help(cls) -> dict[str, str]:
    """Field name -> the comment beside it in the class source (with its indented continuation lines), else
    the comment block just above it, so `replearn <stage> --help` says what each key means without a second
    copy of the text to keep in step. Section banners (`# -- speed`) name groups, not keys: skipped."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))   # a class defined inside a function is indented
    except (OSError, TypeError):
        return {}
    comments = {tok.start[0]: (tok.start[1], tok.string.lstrip("#").strip())
                for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    lines = source.splitlines()

    def alone(row: int) -> bool:   # 1-based row holding nothing but a comment
        return row in comments and lines[row - 1].strip().startswith("#")

    out = {}
    for node in ast.parse(source).body[0].body:
        if not isinstance(node, ast.AnnAssign) or not isinstance(node.target, ast.Name):
            continue
        parts, row = [], node.end_lineno
        if row in comments and not alone(row):
            parts.append(comments[row][1])
            while alone(row + 1) and comments[row + 1][0] > node.col_offset:   # the comment wraps
                row += 1
                parts.append(comments[row][1])
        else:
            row = node.lineno - 1
            while alone(row) and comments[row][0] == node.col_offset and not comments[row][1].startswith("--"):
                parts.insert(0, comments[row][1])
                row -= 1
        out[node.target.id] = " ".join(parts) or COMMON_HELP.get(node.target.id, "")
    return out


def _coerce(cls, key: str, raw: Any) -> Any:
    """Turn `raw` (a string from the command line or a python value) into the field's type."""
    hint = typing.get_type_hints(cls)[key]
    origin = typing.get_origin(hint)
    if isinstance(raw, str):
        if hint is str:
            return raw
        # `bool | None` (a recipe's default unless given) reads the same words as bool
        if hint is bool or (_is_union(origin) and bool in typing.get_args(hint) and raw.lower() != "none"):
            low = raw.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ConfigError(f"{cls.__name__}.{key} expects true/false, got {raw!r}")
        if origin is tuple and not raw.strip().startswith("("):
            # `layers=3,4,5` and `settings=full,400` read as tuples, item by item
            return _check_type(cls, key, hint, tuple(_literal(part.strip()) for part in raw.split(",") if part.strip()))
        value = _literal(raw)
    else:
        value = raw
    return _check_type(cls, key, hint, value)


def _is_union(origin) -> bool:
    """`X | Y` and `Optional[X]` hints (their typing.get_origin)."""
    return origin in (typing.Union, types.UnionType)


def _literal(raw: str):
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw   # a bare word, e.g. for a str field


def _check_type(cls, key: str, hint, value):
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if _is_union(origin):
        if value is None and type(None) in args:
            return None
        for option in (a for a in args if a is not type(None)):
            try:
                return _check_type(cls, key, option, value)
            except ConfigError:
                continue
        raise ConfigError(f"{cls.__name__}.{key} expects {hint}, got {value!r}")
    if origin is tuple:
        if isinstance(value, (int, float, str)):
            value = (value,)
        if not isinstance(value, (tuple, list)):
            raise ConfigError(f"{cls.__name__}.{key} expects a tuple, got {value!r}")
        inner = args[0] if args else object
        return tuple(_check_type(cls, key, inner, v) for v in value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is str and not isinstance(value, str):
        return str(value)
    if hint in (int, float, bool, str) and not isinstance(value, hint):
        raise ConfigError(f"{cls.__name__}.{key} expects {hint.__name__}, got {value!r}")
    if hint is int and isinstance(value, bool):
        raise ConfigError(f"{cls.__name__}.{key} expects int, got {value!r}")
    return value


def split_overrides(words: list[str]) -> dict[str, str]:
    pairs = {}
    for word in words:
        if "=" not in word:
            raise ConfigError(f"expected key=value, got {word!r}")
        key, value = word.split("=", 1)
        pairs[key.strip()] = value
    return pairs


def words(text: str) -> dict[str, str]:
    """A `*_args` string ('steps=20 width=0.5') as overrides: how extra words travel between stages."""
    return split_overrides(text.split())


def build(cls, stage: str, overrides: dict[str, Any] | list[str] | None = None):
    """Defaults <- preset (if `preset=` is given) <- explicit overrides, all type-checked."""
    if isinstance(overrides, list):
        overrides = split_overrides(overrides)
    overrides = dict(overrides or {})
    valid = field_names(cls)
    unknown = sorted(k for k in overrides if k not in valid)
    if unknown:
        named = ", ".join(f"{k!r}{did_you_mean(k, valid)}" for k in unknown)
        raise ConfigError(f"unknown key{'s' if len(unknown) > 1 else ''} {named} for stage {stage!r}; "
                          f"valid keys: {', '.join(valid)}")
    values: dict[str, Any] = {}
    preset = overrides.get("preset")
    if preset and "preset" in valid:   # '' (every stage's default) and None mean no preset
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}{did_you_mean(str(preset), PRESETS)}; "
                              f"choose from {sorted(PRESETS)}")
        values.update(PRESETS[preset].get(stage, {}))
    values.update(overrides)
    return validate(cls(**{k: _coerce(cls, k, v) for k, v in values.items()}))


def to_dict(cfg) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg).items()}


def from_dict(cls, values: dict[str, Any]):
    """Rebuild a config saved by `to_dict`, ignoring keys this version no longer has."""
    valid = set(field_names(cls))
    return validate(cls(**{k: _coerce(cls, k, v) for k, v in values.items() if k in valid}))


# ============================================================================ value checks
# config class -> checks that `build`, `from_dict` and `validate` run on every config built. They are
# here, not in each stage's `run`, so an out-of-range value fails in one line when the command is
# parsed (exit 2), not minutes into a stage. Register one with `register_check(Config, fn)`.
CHECKS: dict[type, list[Callable[[Any], None]]] = {}


def register_check(cls, check: Callable[[Any], None] | None = None):
    """`register_check(Config, fn)`, or `@register_check(Config)` above `fn(cfg)`, which raises ConfigError."""
    def add(fn):
        if fn not in CHECKS.setdefault(cls, []):
            CHECKS[cls].append(fn)
        return fn
    return add(check) if check is not None else add


def validate(cfg):
    """Run the checks registered for the config's class; returns the config."""
    for check in CHECKS.get(type(cfg), ()):
        check(cfg)
    return cfg


def require(cfg, *, positive: Iterable[str] = (), non_negative: Iterable[str] = (),
            at_least: dict[str, float] | None = None, choices: dict[str, Iterable] | None = None,
            stage: str = "") -> None:
    """One ConfigError naming every value out of range: `positive` keys need > 0, `non_negative` >= 0,
    `at_least` {key: minimum}, `choices` {key: allowed values}. None passes (a key left unset, filled in
    later, e.g. from a recipe); a tuple is checked item by item."""
    rules = [(key, lambda v: v > 0, "> 0") for key in positive]
    rules += [(key, lambda v: v >= 0, ">= 0") for key in non_negative]
    rules += [(key, lambda v, m=least: v >= m, f">= {least}") for key, least in (at_least or {}).items()]
    bad = [f"{key}={getattr(cfg, key)!r} (needs {need})" for key, ok, need in rules
           if not all(ok(v) for v in _items(getattr(cfg, key)))]
    for key, allowed in (choices or {}).items():
        allowed = tuple(allowed)
        if not all(v in allowed for v in _items(getattr(cfg, key))):
            bad.append(f"{key}={getattr(cfg, key)!r} (choose from: {', '.join(map(str, allowed))})")
    if bad:
        stage = stage or type(cfg).__module__.rsplit(".", 1)[-1]
        raise ConfigError(f"{stage}: value(s) out of range: {', '.join(bad)}")


def _items(value) -> tuple:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)

