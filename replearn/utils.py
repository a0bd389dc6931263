"""Small shared helpers: registries, provenance, atomic files, JSON lines, hardware choices."""
from __future__ import annotations

import contextlib
import datetime
import functools
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

from .config import ConfigError


# ----------------------------------------------------------------------------- registries
def make_registry(kind: str) -> tuple[dict[str, Callable], Callable]:
    """A plain dict and a decorator that fills it: `@register("name")`."""
    table: dict[str, Callable] = {}

    def register(name: str):
        def deco(fn):
            if name in table:
                raise KeyError(f"{kind} {name!r} registered twice")
            table[name] = fn
            return fn
        return deco

    return table, register


def lookup(table: dict[str, Any], name: str, kind: str):
    if name not in table:
        raise ConfigError(f"unknown {kind} {name!r}; choose from: {', '.join(sorted(table))}")
    return table[name]


# ----------------------------------------------------------------------------- provenance
@functools.lru_cache(maxsize=1)
def git_commit() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (sha or "unknown") + ("-dirty" if dirty else "")


def hardware() -> str:
    import torch
    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {cpu} ({os.cpu_count()} cores)"


def provenance() -> dict[str, Any]:
    import numpy
    import torch
    versions = {"python": sys.version.split()[0], "torch": torch.__version__, "numpy": numpy.__version__}
    for name in ("h5py", "sklearn", "torchvision", "datasets"):
        mod = sys.modules.get(name)
        if mod is not None:
            versions[name] = getattr(mod, "__version__", "?")
    return {
        "git_commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "hardware": hardware(),
        "host": platform.node(),
        "versions": versions,
    }


# ----------------------------------------------------------------------------- atomic files
@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling path; rename it onto `path` only if the block finishes.

    A killed run leaves `<name>.tmp-<pid>` behind, never a file later stages would take
    for a finished one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        if tmp.exists():
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def torch_atomic_save(obj: Any, path: str | Path) -> Path:
    import torch
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def append_jsonl(path: str | Path, record: dict[str, Any]) -> None:
    with open(path, "a") as fh:
        fh.write(json.dumps(record, default=float) + "\n")


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ----------------------------------------------------------------------------- hardware choices
def pick_device(name: str = "auto"):
    import torch
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@functools.lru_cache(maxsize=None)
def cpu_has_bf16() -> bool:
    """True on CPUs with native bf16 matmul units (AVX512-BF16 or AMX-BF16)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def bf16_supported(device) -> bool:
    import torch
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_has_bf16()


def resolve_precision(precision: str, device) -> str:
    """'auto' -> 'bf16' where the hardware has bf16 units, else 'fp32'."""
    if precision not in ("auto", "bf16", "fp32"):
        raise ConfigError(f"unknown precision {precision!r}; choose from: auto, bf16, fp32")
    if precision == "auto":
        return "bf16" if bf16_supported(device) else "fp32"
    return precision


def autocast(device, precision: str):
    import torch
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
