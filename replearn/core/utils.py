"""Small shared helpers: registries, provenance, atomic files, JSON lines, hardware choices."""
from __future__ import annotations

import contextlib
import datetime
import errno
import functools
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

from .config import ConfigError, did_you_mean


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
        raise ConfigError(f"unknown {kind} {name!r}{did_you_mean(str(name), table)}; "
                          f"choose from: {', '.join(sorted(table))}")
    return table[name]


# ----------------------------------------------------------------------------- provenance
@functools.lru_cache(maxsize=1)
def git_commit() -> str:
    # a copy of the tree sent elsewhere (a lent GPU machine) may carry a stale .git, or none: the sender
    # checked every file against its commit's blobs and says so here (benchmarks/gpu_chain.sh)
    vouched = os.environ.get("REPLEARN_SOURCE_COMMIT")
    if vouched:
        return vouched
    root = Path(__file__).resolve().parents[2]   # the repository: replearn/core/utils.py
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        # benchmarks/results/ and tables/ hold measurements, not code: one benchmark rewriting its JSON there
        # must not mark the next one, run from the same tree, as made by uncommitted code, nor a chain that
        # rewrites its committed curves and carried results (tables/) mark the table it writes next
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)benchmarks/results", ":(exclude)tables"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (sha or "unknown") + ("-dirty" if dirty else "")


def hardware() -> str:
    import torch
    gpu = f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)} with " if torch.cuda.is_available() else ""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    isa, found = cpu_vector_units(), cpu_vector_units(limit="")
    if isa != found:
        isa = f"{found} limited to {isa}"
    return f"{gpu}CPU {cpu} ({os.cpu_count()} cores{', ' + isa if isa else ''})"


# the vector units that decide CPU timings here: the same "AMD EPYC" model name has come as a Zen 4 with
# AVX512-BF16 (bf16 matmuls ~2x fp32) and as an AVX2-only part (~2.5x slower at the same work), and one
# earlier machine had AMX; a figure is comparable only between machines of the same units
VECTOR_UNITS = (("amx_bf16", "AMX-BF16"), ("avx512_bf16", "AVX512-BF16"), ("avx512f", "AVX512"), ("avx2", "AVX2"))


def cpu_vector_units(flags: str | None = None, limit: str | None = None) -> str:
    """'AMX-BF16', 'AVX512-BF16', 'AVX512', 'AVX2' (the best one /proc/cpuinfo lists) or '', at most `limit`
    (default: the REPLEARN_CPU_ISA variable, e.g. AVX2; '' for none). With a limit below what the CPU has,
    replearn's bf16 paths stay off and `hardware()` names both; with the libraries' own switches as well
    (benchmarks/isa.sh) a Zen 4 runs the code paths of the AVX2-only kind: an estimate of that kind's
    times, not a measurement of it (clock and memory differ)."""
    limit = os.environ.get("REPLEARN_CPU_ISA", "") if limit is None else limit
    names = [name for _, name in VECTOR_UNITS]
    if limit and limit not in names:
        raise ConfigError(f"REPLEARN_CPU_ISA={limit!r} is not one of {', '.join(names)}")
    if flags is None:
        try:
            flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines()
                          if line.startswith("flags")), "")
        except OSError:
            return ""
    words = set(flags.split())
    found = next((name for flag, name in VECTOR_UNITS if flag in words), "")
    if limit and found and names.index(found) < names.index(limit):
        return limit
    return found


def provenance() -> dict[str, Any]:
    import numpy
    import torch
    versions = {"python": sys.version.split()[0], "torch": str(torch.__version__), "numpy": numpy.__version__}
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
# errors that mean "the disk is full or refuses writes", whatever call raised them
DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}


def is_disk_error(err: BaseException) -> bool:
    if isinstance(err, OSError) and err.errno in DISK_ERRNOS:
        return True
    # HDF5 ("file write failed: ... errno = 28") and torch.save ("... failed writing file ...: file write
    # failed") report a failed write in their own words, as OSError or RuntimeError
    return isinstance(err, (OSError, RuntimeError)) and "file write failed" in str(err)


def disk_error(path: str | Path, err: BaseException) -> ConfigError:
    """The one line for a failed write: which file, the system's reason, what to do."""
    found = re.search(r"error message = '([^']*)'", str(err))   # HDF5's wording carries strerror
    if found:
        reason = found[1]
    elif isinstance(err, OSError) and err.errno:
        reason = os.strerror(err.errno)
    else:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
    return ConfigError(f"disk full or not writable while writing {path}: {reason}; free space and rerun")


def pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # alive, owned by another user
        return True
    return True


def temp_name(path: Path) -> Path:
    """`<name>.tmp-<pid>-<random>`: no other process or thread, here or on another host, shares it."""
    return path.with_name(f"{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def remove_stale_temps(path: Path) -> None:
    """Delete `<name>.tmp-<pid>[-<random>]` siblings whose process is gone: a killed run never finishes them,
    and each would keep its share of the disk until someone noticed. Pids are only meaningful on this
    host: on a folder shared between machines, another machine's live temp file looks stale."""
    prefix = f"{path.name}.tmp-"
    try:
        entries = [e for e in os.scandir(path.parent) if e.name.startswith(prefix)]
    except OSError:
        return
    for entry in entries:
        pid = entry.name[len(prefix):].split("-")[0]
        if pid.isdigit() and int(pid) != os.getpid() and not pid_running(int(pid)) \
                and entry.is_file(follow_symlinks=False):
            with contextlib.suppress(OSError):
                os.unlink(entry.path)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling path; rename it onto `path` only if the block finishes.

    A killed run leaves `<name>.tmp-<pid>-<random>` behind, never a file later stages would take
    for a finished one; the next atomic write of the same name removes it. A full disk, in the
    block or while syncing, becomes one line naming `path`.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"cannot create folder {path.parent} ({err.strerror or type(err).__name__}); fix its "
                          f"permissions or choose another output location") from None
    remove_stale_temps(path)
    tmp = temp_name(path)
    try:
        try:
            yield tmp
        except (OSError, RuntimeError) as err:   # RuntimeError: torch.save's "file write failed"
            if is_disk_error(err):
                raise disk_error(path, err) from None
            raise
        if tmp.exists():
            try:
                with open(tmp, "rb+") as fh:
                    os.fsync(fh.fileno())
                os.replace(tmp, path)
            except OSError as err:
                raise disk_error(path, err) from None
    finally:
        if tmp.exists():
            tmp.unlink()


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def check_writable(folder: str | Path, expected_bytes: int | None = None) -> Path:
    """Fail in one line, before any work, unless `folder` can be created and written and (when
    `expected_bytes` is known) has that much free space. Returns the folder."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        with open(probe, "wb", buffering=0) as fh:   # unbuffered: a full disk fails in this write
            fh.write(b"\0")
        probe.unlink()
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise ConfigError(f"cannot write to folder {folder} ({reason}); free space, fix its permissions or "
                          f"choose another output location") from None
    if expected_bytes:
        free = shutil.disk_usage(folder).free
        if free < expected_bytes:
            raise ConfigError(f"not enough free space in {folder}: about {human_bytes(expected_bytes)} needed, "
                              f"{human_bytes(free)} free; free space or choose another output location")
    return folder


def unpickling_reason(err: BaseException) -> str:
    """The useful part of torch's weights_only refusal ("Unsupported global: GLOBAL posix.system ..."),
    whose first lines are generic advice; the first line of any other error."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))
    found = re.search(r"WeightsUnpickler error:\s*(.+)", text)
    line = found[1] if found else (text.strip().splitlines() or [type(err).__name__])[0]
    return re.split(r" was not an allowed global| Please use", line)[0].strip()[:160]


def atomic_write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def json_default(value: Any) -> Any:
    """numpy scalars and arrays (HDF5 attrs come back as them) keep their type; anything else is str."""
    import numpy as np
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=json_default) + "\n")


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
    return cpu_vector_units() in ("AMX-BF16", "AVX512-BF16")


@functools.lru_cache(maxsize=None)
def cpu_has_amx() -> bool:
    """True on CPUs with AMX-BF16 tiles, where oneDNN runs bf16 convolutions on them."""
    return cpu_vector_units() == "AMX-BF16"


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
