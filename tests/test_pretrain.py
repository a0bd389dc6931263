"""Training: config resolution, resume == uninterrupted, DDP (gloo, 2 processes) == one process."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import random_images
from replearn.train import pretrain, runs
from replearn.core.config import ConfigError, build
from replearn.core.store import write_image_cache
from replearn.core.utils import read_jsonl

TINY = dict(width=0.125, batch_size=8, n_critic=2, precision="fp32", log_every=1, sample_every=2, ckpt_every=2)


@pytest.fixture
def image_cache(tmp_path) -> Path:
    images = random_images(96, seed=1)
    return write_image_cache(tmp_path / "images.h5", images, np.full(len(images), -1), [], {"source": "test"})


def tiny_config(tmp_path, cache, **over) -> pretrain.Config:
    values = {**TINY, "data": str(cache), "run_dir": str(tmp_path / "run"), "cache_dir": str(tmp_path / "cache")}
    return build(pretrain.Config, "pretrain", {**values, **over})


def params(path: Path) -> dict[str, torch.Tensor]:
    ckpt = runs.load_checkpoint(path)
    return {**{f"g.{k}": v for k, v in ckpt["generator"].items()}, **{f"d.{k}": v for k, v in ckpt["critic"].items()}}


def test_recipes_fill_reference_defaults():
    cfg = pretrain.resolve(pretrain.Config(model="wgan-gp"))
    assert (cfg.loss, cfg.n_critic, cfg.batch_size, cfg.lr_d, cfg.beta1, cfg.beta2) == ("wgan-gp", 5, 64, 1e-4, .5, .9)
    assert cfg.norm == "none"   # igul222's critic has no normalisation
    cfg = pretrain.resolve(pretrain.Config(model="dcgan"))
    assert (cfg.batch_size, cfg.lr_d, cfg.beta1, cfg.norm) == (128, 2e-4, 0.5, "batch")
    cfg = pretrain.resolve(pretrain.Config(model="wgan"))
    assert (cfg.optimizer, cfg.lr_d, cfg.clip) == ("rmsprop", 5e-5, 0.01)


def test_batchnorm_with_gradient_penalty_is_refused():
    with pytest.raises(ConfigError, match="force_batchnorm"):
        pretrain.resolve(pretrain.Config(model="wgan-gp", norm="batch"))
    assert pretrain.resolve(pretrain.Config(model="wgan-gp", norm="batch", force_batchnorm=True)).norm == "batch"
    # a recipe may force it (wgan-gp-bn-ttur), and a user may still unforce it
    cfg = pretrain.resolve(pretrain.Config(model="wgan-gp-bn-ttur"))
    assert (cfg.loss, cfg.norm, cfg.force_batchnorm, cfg.n_critic, cfg.lr_d) == ("wgan-gp", "batch", True, 1, 4e-4)
    with pytest.raises(ConfigError, match="force_batchnorm"):
        pretrain.resolve(pretrain.Config(model="wgan-gp-bn-ttur", force_batchnorm=False))
    assert pretrain.resolve(pretrain.Config(model="dcgan")).force_batchnorm is False


def test_unknown_key_and_model_list_the_choices():
    with pytest.raises(ConfigError, match="valid keys: .*batch_size"):
        build(pretrain.Config, "pretrain", ["bacth_size=3"])
    with pytest.raises(ConfigError, match="choose from: .*wgan-gp"):
        pretrain.resolve(pretrain.Config(model="nope"))


def test_optional_bool_keys_read_the_words_a_bool_key_reads():
    # spectral_norm is `bool | None` (None: the recipe's value); `spectral_norm=true` once failed as a type error
    for word, value in (("true", True), ("1", True), ("off", False), ("None", None)):
        assert build(pretrain.Config, "pretrain", [f"spectral_norm={word}"]).spectral_norm is value
    with pytest.raises(ConfigError, match="spectral_norm expects true/false"):
        build(pretrain.Config, "pretrain", ["spectral_norm=maybe"])


@pytest.mark.parametrize("model", ["dcgan", "wgan-gp"])
def test_resume_gives_the_same_state_as_an_uninterrupted_run(tmp_path, image_cache, model):
    whole = pretrain.run(tiny_config(tmp_path / "a", image_cache, model=model, steps=4))
    pretrain.run(tiny_config(tmp_path / "b", image_cache, model=model, steps=2))
    assert not (tmp_path / "b" / "run" / "finished.json").exists() or \
        __import__("json").loads((tmp_path / "b" / "run" / "finished.json").read_text())["step"] == 2
    resumed = pretrain.run(tiny_config(tmp_path / "b", image_cache, model=model, steps=4))
    a, b = params(whole / "last.pt"), params(resumed / "last.pt")
    for key in a:
        assert torch.equal(a[key], b[key]), key
    for name in ("log.jsonl", "losses.png", "config.json", "finished.json", "ckpt_0000004.pt"):
        assert (resumed / name).exists(), name
    assert (resumed / "samples" / "step_0000004.png").exists()


def test_a_kill_between_interval_checkpoints_resumes_from_the_timed_last_pt(tmp_path, image_cache, monkeypatch):
    """last.pt is written every LAST_EVERY_SECONDS as well: killed at step 4 (no interval checkpoint there),
    the run resumes from step 4, not from step 2, and ends where an uninterrupted run ends."""
    whole = pretrain.run(tiny_config(tmp_path / "a", image_cache, model="dcgan", steps=5))
    monkeypatch.setattr(pretrain, "LAST_EVERY_SECONDS", 0.0)
    real_finished = pretrain.finished

    def killed_after_step_4(s, cfg):
        if s.step == 4:
            raise KeyboardInterrupt
        return real_finished(s, cfg)

    monkeypatch.setattr(pretrain, "finished", killed_after_step_4)
    with pytest.raises(KeyboardInterrupt):
        pretrain.run(tiny_config(tmp_path / "b", image_cache, model="dcgan", steps=5))
    assert runs.load_checkpoint(tmp_path / "b" / "run" / "last.pt")["step"] == 4
    monkeypatch.setattr(pretrain, "finished", real_finished)
    resumed = pretrain.run(tiny_config(tmp_path / "b", image_cache, model="dcgan", steps=5))
    steps = [r["step"] for r in read_jsonl(resumed / "log.jsonl")]
    assert steps == sorted(set(steps)) and steps[-1] == 5        # each step logged once
    a, b = params(whole / "last.pt"), params(resumed / "last.pt")
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_resuming_a_different_run_is_refused(tmp_path, image_cache):
    pretrain.run(tiny_config(tmp_path, image_cache, model="wgan-gp", steps=1))
    with pytest.raises(ConfigError, match="different run"):
        pretrain.run(tiny_config(tmp_path, image_cache, model="dcgan", steps=1))


def test_nan_loss_stops_and_names_a_good_checkpoint_that_exists(tmp_path, image_cache):
    with pytest.raises(ConfigError, match="diverged") as err:
        pretrain.run(tiny_config(tmp_path, image_cache, model="wgan-gp", steps=4, lr_d=1e30, lr_g=1e30, log_every=1))
    # the step named is the one that went non-finite: the step after the last one logged (every finite step is)
    logged = [r["step"] for r in read_jsonl(tmp_path / "run" / "log.jsonl")]
    assert f"diverged at step {max(logged, default=0) + 1} " in str(err.value)
    named = str(err.value).split("the last good checkpoint is ")[1].split(".pt")[0] + ".pt"
    ckpt = runs.load_checkpoint(named)
    assert all(torch.isfinite(v).all() for v in ckpt["critic"].values() if v.is_floating_point())
    assert "nan_policy=rollback" in str(err.value)


@pytest.mark.slow
def test_two_process_ddp_matches_one_process(tmp_path, image_cache):
    """torchrun, gloo, 2 processes on CPU: the first update equals the 1-process one at the same global batch."""
    args = [f"{k}={v}" for k, v in {**TINY, "model": "wgan-gp", "steps": 1, "n_critic": 1, "g_norm": "layer",
                                      "data": image_cache, "cache_dir": tmp_path / "cache"}.items()]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "replearn", "pretrain", *args, f"run_dir={tmp_path / 'one'}"],
                   check=True, env=env, capture_output=True)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "replearn", "pretrain", *args, f"run_dir={tmp_path / 'two'}"],
                         env=env, capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = params(tmp_path / "one" / "last.pt"), params(tmp_path / "two" / "last.pt")
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6, rtol=1e-4), key


def test_time_budget_finishes_the_run_and_survives_resume(tmp_path, image_cache):
    cfg = tiny_config(tmp_path, image_cache, model="dcgan", steps=1000, max_minutes=1e-4)
    run_dir = pretrain.run(cfg)
    done = __import__("json").loads((run_dir / "finished.json").read_text())
    assert done["reason"] == "max_minutes" and 1 <= done["step"] < 1000
    assert (run_dir / f"ckpt_{done['step']:07d}.pt").exists()
    pretrain.run(cfg)   # a rerun of a spent budget trains no further
    assert runs.load_checkpoint(run_dir / "last.pt")["step"] == done["step"]
