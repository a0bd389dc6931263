"""Artifact keys, and the Stage: the one place where every stage's key, reuse, lock and messages are handled.

Keys. Every artifact (run folder, feature file, results JSON) carries a `key`: a short hash of
everything that determines it -- the stage's resolved config less the keys that only say where or
how fast to compute it, the keys of its input artifacts, and the identity of its data sources
(`data.source_id`: resolved path, slice, size and a digest of the files' bytes). The same key means the
artifact can be reused; a different key builds a new artifact beside the old one. A stage asked for
an input with an expected key refuses, in one line, an input whose recorded key differs.
"""
from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from .config import ConfigError, to_dict
from .lock import building
from .utils import provenance


# ============================================================================ keys
def default_root(preset: str) -> Path:
    """Where a stage run on its own puts what it builds when no path is given: the chain's own layout,
    build/<preset>/ (build/default/ without a preset), so `make` and a bare stage find each other's work."""
    return Path("build") / (preset or "default")


def require_input(value: str, key: str, what: str) -> None:
    """A stage's input path left empty: one line naming the key and what to give it."""
    if not value:
        raise ConfigError(f"{key}= is required: {what}")


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


# ============================================================================ the Stage
# artifacts this process built (resolved paths): asked for again in the same process (the chain's curve
# asks for the features and SVM results the chain made a minute before), they are returned without the
# "up to date" line, which is kept for what an earlier run built
_BUILT: set[str] = set()


@dataclass(frozen=True)
class Stage:
    """A stage as a declaration; `run` does the rest, the same way for every stage:

        resolve(cfg) -> cfg             the config as the stage will use it (e.g. absolute data paths)
        key(cfg) -> str                 what the artifact is: resolved config, input artifacts' keys, data identity
        out(cfg, key) -> Path           where the artifact of that key lives
        finished(cfg, out, key) -> bool a complete artifact of this key is at `out`
        build(cfg, out, key) -> Path    makes it, publishing through core.utils' atomic writes (a temp name
                                        unique to the process, then a rename); called with the lock held and
                                        nothing current at `out`
        result(out) -> Path             what `run` returns for a finished artifact (default: `out`)
        wait                            a second process waits for the holder, then reuses its artifact
                                        (shared caches); otherwise it refuses in one line naming the holder's pid

    The lock (core/lock.py) is taken on `out` before `finished` is read, so a half-built artifact of another
    process is never taken for a finished one, and a resume starts from what the holder left.
    """
    name: str
    key: Callable[[Any], str]
    out: Callable[[Any, str], Path]
    finished: Callable[[Any, Path, str], bool]
    build: Callable[[Any, Path, str], Path]
    resolve: Callable[[Any], Any] = lambda cfg: cfg
    result: Callable[[Path], Path] = lambda out: out
    wait: bool = False

    def plan(self, cfg) -> tuple[Path, str]:
        """(where the artifact goes, its key) without building anything."""
        cfg = self.resolve(cfg)
        key = self.key(cfg)
        return Path(self.out(cfg, key)), key

    def is_done(self, cfg) -> bool:
        cfg = self.resolve(cfg)
        key = self.key(cfg)
        return self.finished(cfg, Path(self.out(cfg, key)), key)

    def run(self, cfg) -> Path:
        cfg = self.resolve(cfg)
        key = self.key(cfg)
        out = Path(self.out(cfg, key))
        with building(out, wait=self.wait):
            if self.finished(cfg, out, key):
                if _identity(out) not in _BUILT:
                    print(f"{self.name}: {self.result(out)} is up to date (key {key}); delete it to recompute",
                          file=sys.stderr)
                return self.result(out)
            made = self.build(cfg, out, key)
        _BUILT.add(_identity(out))
        return made


def _identity(path: Path) -> str:
    return str(Path(path).resolve())


def record(cfg, key: str, **fields: Any) -> dict[str, Any]:
    """The provenance every artifact carries: its resolved config (as an object), key, commit and hardware."""
    return {"config": to_dict(cfg), "key": key, "provenance": provenance(), **fields}
