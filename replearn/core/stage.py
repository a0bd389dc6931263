"""Artifact keys, and (below) the Stage that owns reuse, locking and publishing for every stage.

Keys. Every artifact (run folder, feature file, results JSON) carries a `key`: a short hash of
everything that determines it -- the stage's resolved config less the keys that only say where or
how fast to compute it, the keys of its input artifacts, and the identity of its data sources
(`data.source_id`: resolved path, slice, size and mtime of the files). The same key means the
artifact can be reused; a different key builds a new artifact beside the old one. A stage asked for
an input with an expected key refuses, in one line, an input whose recorded key differs.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable

from .config import ConfigError


# ============================================================================ keys
def artifact_key(stage: str, config: dict[str, Any], ignore: Iterable[str] = (), **inputs: Any) -> str:
    """10 hex digits identifying what `stage` makes from `config` (less `ignore`) and `inputs`."""
    kept = {k: v for k, v in sorted(config.items()) if k not in set(ignore)}
    text = json.dumps({"stage": stage, "config": kept, "inputs": inputs}, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def keyed(config: dict[str, Any], added: dict[str, Any]) -> dict[str, Any]:
    """The config less the keys in `added` (keys a stage gained after artifacts were made) where they hold
    the value every older artifact had, so adding a key with a neutral default re-keys nothing."""
    return {k: v for k, v in config.items() if not (k in added and v == added[k])}


def check_key(path: str | Path, recorded: str | None, expected: str | None) -> None:
    """One line, naming the file, when an input artifact is not the one the caller asked for."""
    if expected and recorded != expected:
        raise ConfigError(f"{path} has key {recorded!r}, not the expected {expected!r}: it was made from other "
                          f"inputs or settings; delete it or point at the right artifact")
