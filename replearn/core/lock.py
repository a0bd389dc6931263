"""One lock per artifact: `with building(path):` around everything a stage does to make `path`.

The lock is an exclusive `fcntl.flock` on `<path>.lock`, a sibling of the artifact (a run folder's is
beside the folder). The kernel drops it when the holding process ends, however it ends, so a lock file
left by a killed run is stale and simply taken over. The holder writes its pid, host and start time
into the file; a second process asking for the same artifact refuses in one line naming it (a
ConfigError: the CLI prints it and exits 2). Shared caches that any stage builds on its way (image
caches, FID statistics) pass `wait=True` instead: the second process waits, then finds the cache made.

Re-entrant within one process (the chain calls stages that call stages): a lock this process already
holds is entered again at no cost, and released when the outermost block ends, on success, exception or
KeyboardInterrupt alike. The holder deletes the lock file while still holding it; a process that locked
the deleted file sees that it is no longer the one at the path and tries again, so two processes never
both hold a lock for one path. Under torchrun only rank 0 locks: the other ranks work for it.
"""
from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Iterator

from .config import ConfigError

# lock file (absolute path) -> [file descriptor, depth] of the locks this process holds
_HELD: dict[str, list[int]] = {}
HOLDER_WAIT_S = 2.0   # how long a refusal waits for a new holder to write its name into the lock file


def lock_path(artifact: str | Path) -> Path:
    artifact = Path(artifact)
    return artifact.with_name(artifact.name + ".lock")


@contextlib.contextmanager
def building(artifact: str | Path, wait: bool = False) -> Iterator[Path]:
    """Hold the artifact's lock for the block; refuse in one line (or, with `wait`, wait) while another
    process holds it. Yields the artifact's path."""
    artifact = Path(artifact)
    if os.environ.get("RANK", "0") != "0":   # torchrun: rank 0 holds the lock for the whole job
        yield artifact
        return
    lock = lock_path(artifact).resolve()   # one key per file, however the path is spelled
    held = _HELD.get(str(lock))
    if held is not None:
        held[1] += 1
        try:
            yield artifact
        finally:
            held[1] -= 1
        return
    fd = _acquire(lock, artifact, wait)
    _HELD[str(lock)] = [fd, 1]
    try:
        yield artifact
    finally:
        del _HELD[str(lock)]
        _release(lock, fd)


def _acquire(lock: Path, artifact: Path, wait: bool) -> int:
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"cannot create folder {lock.parent} ({err.strerror or type(err).__name__}); fix its "
                          f"permissions or choose another output location") from None
    told = False
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(fd)
                if not wait:
                    raise ConfigError(f"{artifact} is being built by {holder}: wait for it or stop it") from None
                if not told:
                    print(f"{artifact} is being built by {holder}; waiting for it", file=sys.stderr)
                    told = True
                fcntl.flock(fd, fcntl.LOCK_EX)
            if _same_file(fd, lock):   # else the holder deleted it on release: lock the new one
                _write_holder(fd)
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)


def _release(lock: Path, fd: int) -> None:
    try:
        if _same_file(fd, lock):
            lock.unlink()   # while still locked: a process waiting on this file retries with a new one
    except OSError:
        pass
    finally:
        os.close(fd)   # releases the flock


def _same_file(fd: int, path: Path) -> bool:
    try:
        on_disk = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (mine.st_dev, mine.st_ino) == (on_disk.st_dev, on_disk.st_ino)


def _write_holder(fd: int) -> None:
    text = json.dumps({"pid": os.getpid(), "host": platform.node(), "argv": sys.argv,
                       "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")})
    os.ftruncate(fd, 0)
    os.pwrite(fd, text.encode() + b"\n", 0)


def _holder(fd: int) -> str:
    """'pid 1234 (started 18:02:11 on host)', from the lock file; a holder that has just locked it may
    not have written its name yet, so an empty file is read again for up to HOLDER_WAIT_S."""
    deadline = time.monotonic() + HOLDER_WAIT_S
    while True:
        try:
            info = json.loads(os.pread(fd, 65536, 0).decode())
            break
        except (ValueError, UnicodeDecodeError):
            if time.monotonic() > deadline:
                return "another process"
            time.sleep(0.05)
    try:
        started = datetime.datetime.fromisoformat(info["started"])
        same_day = started.date() == datetime.datetime.now(started.tzinfo).date()
        when = f"started {started.strftime('%H:%M:%S' if same_day else '%Y-%m-%d %H:%M:%S')} on {info['host']}"
        return f"pid {int(info['pid'])} ({when})"
    except (KeyError, TypeError, ValueError):
        return "another process"


def _forget_in_child() -> None:
    """A forked child (a decoding worker) inherits the lock files' descriptors: it drops them, so that
    the lock ends with its holder and not with the last of its children."""
    for fd, _ in _HELD.values():
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD.clear()


os.register_at_fork(after_in_child=_forget_in_child)
