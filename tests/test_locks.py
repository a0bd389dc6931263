"""One lock per artifact (replearn/core/lock.py): a second process asking for an artifact that is being built refuses
in one line naming the first (two `replearn pretrain` on one run folder, two `replearn features` into one file);
a stale lock (its holder dead) is taken over; the lock is re-entrant in one process and released on success,
exception and Ctrl-C; shared caches wait instead of refusing; temporary files get names no other process shares;
the Stage every stage runs through reuses by key and says "up to date" only of what an earlier run built.

The CLI tests freeze the first process (SIGSTOP) once it holds its lock, run the second, then let the first
finish: the outcome does not depend on how fast this machine is."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, random_images
from replearn.core import lock, stage
from replearn.train import pretrain
from replearn.core.config import ConfigError, build
from replearn.core.store import FeatureFile, write_image_cache
from replearn.core.utils import read_jsonl, remove_stale_temps, temp_name

ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
PRETRAIN = ["width=0.125", "batch_size=8", "n_critic=1", "precision=fp32", "log_every=1", "sample_every=100",
            "ckpt_every=100"]


# ----------------------------------------------------------------------------- helpers
def replearn(tmp_path: Path, name: str, *words: str) -> subprocess.Popen:
    """`python -m replearn ...` in the background, its output in tmp_path/<name>.log (a pipe could fill)."""
    log = open(tmp_path / f"{name}.log", "w")
    return subprocess.Popen([sys.executable, "-m", "replearn", *words], cwd=tmp_path, env=ENV, stdout=log,
                            stderr=subprocess.STDOUT)


def wait_for_holder(lock_file: Path, proc: subprocess.Popen, timeout: float = 300) -> dict:
    """The holder record once `proc` has locked `lock_file` and written its pid there."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the first process exited ({proc.returncode}) before taking {lock_file}")
        with contextlib.suppress(OSError, ValueError):
            info = json.loads(lock_file.read_text())
            if info["pid"] == proc.pid:
                return info
        time.sleep(0.05)
    pytest.fail(f"no lock {lock_file} after {timeout} s")


def second_while_first_holds(tmp_path: Path, first: subprocess.Popen, lock_file: Path, *words: str):
    """Run the second command while the first, holding `lock_file`, is frozen; then let the first go on."""
    try:
        wait_for_holder(lock_file, first)
        os.kill(first.pid, signal.SIGSTOP)
        try:
            second = subprocess.run([sys.executable, "-m", "replearn", *words], cwd=tmp_path, env=ENV,
                                    capture_output=True, text=True, timeout=300)
        finally:
            os.kill(first.pid, signal.SIGCONT)
        assert first.wait(timeout=300) == 0, (tmp_path / "first.log").read_text()[-2000:]
    finally:
        if first.poll() is None:
            first.kill()
    return second


def assert_refused_by(second: subprocess.CompletedProcess, artifact: str, pid: int) -> None:
    """Exit 2 and one line: '<artifact> is being built by pid <pid> (started HH:MM:SS on <host>): ...'."""
    assert second.returncode == 2, second.stderr
    assert second.stderr.count("\n") == 1 and "Traceback" not in second.stderr, second.stderr
    assert f"{artifact} is being built by pid {pid} (started " in second.stderr, second.stderr
    assert second.stderr.rstrip().endswith("wait for it or stop it"), second.stderr


def hold_in_child(path: Path, seconds: float) -> subprocess.Popen:
    """Another process holding `path`'s lock for `seconds` (it prints 'held' once it has it)."""
    code = (f"import time; from replearn.core.lock import building\n"
            f"with building({str(path)!r}):\n    print('held', flush=True); time.sleep({seconds})\n")
    proc = subprocess.Popen([sys.executable, "-c", code], env=ENV, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ----------------------------------------------------------------------------- two processes, one artifact
def test_a_second_pretrain_on_the_same_run_folder_refuses_naming_the_first(tmp_path):
    cache = write_image_cache(tmp_path / "images.h5", random_images(48, seed=1), np.full(48, -1), [], {})
    words = ["pretrain", f"data={cache}", "run_dir=run", "cache_dir=cache", "steps=4", *PRETRAIN]
    first = replearn(tmp_path, "first", *words)
    second = second_while_first_holds(tmp_path, first, tmp_path / "run.lock", *words)
    assert_refused_by(second, "run", first.pid)
    steps = [r["step"] for r in read_jsonl(tmp_path / "run" / "log.jsonl")]
    assert steps == [1, 2, 3, 4]                      # each step once: only the first trained
    assert (tmp_path / "run" / "finished.json").exists()
    assert not (tmp_path / "run.lock").exists()       # released (and removed) when the first finished


def test_a_second_extraction_into_the_same_file_refuses_naming_the_first(tmp_path):
    pre = write_image_cache(tmp_path / "pre.h5", random_images(32, seed=2), np.full(32, -1), [], {})
    labels = np.arange(24) % 4
    train = write_image_cache(tmp_path / "train.h5", random_images(24, seed=3), labels, list("abcd"), {})
    test = write_image_cache(tmp_path / "test.h5", random_images(12, seed=4), labels[:12], list("abcd"), {})
    pretrain.run(build(pretrain.Config, "pretrain", {"data": str(pre), "run_dir": str(tmp_path / "run"), "steps": 1,
                                                     "cache_dir": str(tmp_path / "cache"),
                                                     **dict(w.split("=") for w in PRETRAIN)}))
    words = ["features", "run=run", f"train={train}", f"test={test}", "precision=fp32", "bn_images=16",
             "cache_dir=cache", "out=feats.h5"]
    first = replearn(tmp_path, "first", *words)
    second = second_while_first_holds(tmp_path, first, tmp_path / "feats.h5.lock", *words)
    assert_refused_by(second, "feats.h5", first.pid)
    with FeatureFile(tmp_path / "feats.h5") as f:      # the first's file, complete
        assert f.num_rows("train") == 24 and f.num_rows("test") == 12
    assert not (tmp_path / "feats.h5.lock").exists()


# ----------------------------------------------------------------------------- the lock itself
def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    artifact = tmp_path / "results.json"
    stale = lock.lock_path(artifact)
    stale.write_text(json.dumps({"pid": dead_pid(), "host": "here", "started": "2024-01-01T00:00:00+00:00"}))
    with lock.building(artifact):
        assert json.loads(stale.read_text())["pid"] == os.getpid()
    assert not stale.exists()


def test_a_held_lock_refuses_in_one_line_and_wait_waits(tmp_path):
    artifact = tmp_path / "feats.h5"
    holder, held_since = hold_in_child(artifact, 1.5), time.monotonic()
    try:
        with pytest.raises(ConfigError) as refused:
            with lock.building(artifact):
                pytest.fail("entered a lock another process holds")
        message = str(refused.value)
        assert message.startswith(f"{artifact} is being built by pid {holder.pid} (started ") and "\n" not in message
        assert message.endswith("wait for it or stop it")
        with lock.building(artifact, wait=True):      # returns once the holder is done
            assert time.monotonic() - held_since >= 1.4
    finally:
        holder.kill()
        holder.wait()


def test_reentrant_in_one_process_and_released_on_errors(tmp_path):
    artifact = tmp_path / "run"
    with lock.building(artifact):
        with lock.building(tmp_path / "." / "run"):   # the chain calling a stage that calls a stage
            pass
        assert lock.lock_path(artifact).exists()      # still held by the outer block
    for error in (RuntimeError("boom"), KeyboardInterrupt()):
        with pytest.raises(type(error)):
            with lock.building(artifact):
                raise error
        assert not lock.lock_path(artifact).exists()
        with lock.building(artifact):   # a leaked descriptor would still lock the file: this would refuse
            pass


def test_temporary_names_are_never_shared(tmp_path):
    path = tmp_path / "x.json"
    first, second = temp_name(path), temp_name(path)
    assert first != second and first.name.startswith(f"x.json.tmp-{os.getpid()}-")
    gone = path.with_name(f"x.json.tmp-{dead_pid()}-0123abcd")
    old_style = path.with_name(f"x.json.tmp-{dead_pid()}")
    live = path.with_name(f"x.json.tmp-{os.getppid()}-0123abcd")
    for p in (gone, old_style, live):
        p.write_text("")
    remove_stale_temps(path)
    assert not gone.exists() and not old_style.exists() and live.exists()


# ----------------------------------------------------------------------------- the Stage that every stage uses
def counting_stage(tmp_path: Path, built: list, wait: bool = False) -> stage.Stage:
    def build_it(cfg, out, key):
        built.append(key)
        out.write_text(key)
        return out
    return stage.Stage("demo", key=lambda cfg: f"k{cfg}", out=lambda cfg, key: tmp_path / f"{key}.txt",
                       finished=lambda cfg, out, key: out.exists() and out.read_text() == key, build=build_it, wait=wait)


def test_the_stage_builds_once_and_calls_up_to_date_only_what_an_earlier_run_built(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(stage, "_BUILT", set())
    built: list = []
    demo = counting_stage(tmp_path, built)
    assert demo.run(1) == tmp_path / "k1.txt" and built == ["k1"]
    assert demo.run(1) == tmp_path / "k1.txt" and built == ["k1"]      # reused ...
    assert "up to date" not in capsys.readouterr().err                 # ... silently: this process built it
    monkeypatch.setattr(stage, "_BUILT", set())                        # as a later process finds it
    demo.run(1)
    assert capsys.readouterr().err == f"demo: {tmp_path / 'k1.txt'} is up to date (key k1); delete it to recompute\n"
    assert demo.plan(2) == (tmp_path / "k2.txt", "k2") and not demo.is_done(2)
    assert built == ["k1"]


def test_the_stage_refuses_while_another_process_builds_and_waits_when_asked(tmp_path, monkeypatch):
    monkeypatch.setattr(stage, "_BUILT", set())
    built: list = []
    holder = hold_in_child(tmp_path / "k1.txt", 1.5)
    try:
        with pytest.raises(ConfigError, match=rf"k1.txt is being built by pid {holder.pid} \(started "):
            counting_stage(tmp_path, built).run(1)
        assert built == []
        (tmp_path / "k1.txt").write_text("k1")                          # what the holder publishes
        counting_stage(tmp_path, built, wait=True).run(1)               # waits, then reuses it
        assert built == []
    finally:
        holder.kill()
        holder.wait()
