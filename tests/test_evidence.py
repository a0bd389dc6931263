"""The evidence the tables stand on, checked against independent references: pooled features against a
hand-written block max over the conv activations (taken after the activation), recomputed BatchNorm
statistics against a hand average, the untrained control checkpoint, log-spaced checkpoints, keys."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn as nn

from conftest import random_images
from replearn.models import nets, zoo
from replearn.train import pretrain, runs
from replearn.probe import features
from replearn.core import stage
from replearn.core.config import ConfigError, build
from replearn.core.store import FeatureFile, write_image_cache


def small_critic() -> nets.Critic:
    torch.manual_seed(0)
    _, critic = zoo.build_models("dcgan", norm="batch", spectral_norm=False, attention_res=0, z_dim=16,
                                  image_size=32, width=0.125, g_norm="batch")
    return critic.eval()


def hand_block_max(fmap: np.ndarray, grid: int) -> np.ndarray:
    """N x C x H x W -> N x (C * grid * grid): the max over each of grid x grid equal blocks, C-major."""
    n, c, h, w = fmap.shape
    g = min(grid, h)
    blocks = fmap.reshape(n, c, g, h // g, g, w // g)
    return blocks.max(axis=(3, 5)).reshape(n, -1)


def test_pooled_features_are_a_block_max_of_each_layer_after_its_activation():
    critic = small_critic()
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    # independent taps: hooks on every LeakyReLU (the last op of each conv block)
    taps = []
    hooks = [m.register_forward_hook(lambda m, i, o: taps.append(o.detach().clone()))
             for m in critic.modules() if isinstance(m, nn.LeakyReLU)]
    with torch.no_grad():
        critic(x)
    for h in hooks:
        h.remove()
    assert len(taps) == 6
    assert all(bool((t >= -1e-6).all() or (t < 0).any()) for t in taps)   # taps are post-activation maps
    with torch.no_grad():
        pooled = nets.pooled_features(critic, x, grid=4).numpy()
    expected = np.concatenate([hand_block_max(t.numpy(), 4) for t in taps], axis=1)
    np.testing.assert_allclose(pooled, expected, rtol=1e-6, atol=1e-6)
    assert pooled.shape[1] == 16 * sum((16, 16, 32, 32, 64, 64))


def test_feature_taps_come_after_the_activation_not_before():
    """Each tap equals its block's LeakyReLU output, and differs from the conv/BN output before it."""
    critic = small_critic()
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    pre, post = [], []
    for block in critic.blocks:
        block[-2].register_forward_hook(lambda m, i, o: pre.append(o.detach().clone()))   # BN (or identity)
        block[-1].register_forward_hook(lambda m, i, o: post.append(o.detach().clone()))  # LeakyReLU
    with torch.no_grad():
        taps = [fmap for _, fmap in critic.features(x)]
    for tap, before, after in zip(taps, pre, post):
        torch.testing.assert_close(tap, after)
        torch.testing.assert_close(tap, nn.functional.leaky_relu(before, 0.2))
        assert (before < 0).any() and not torch.allclose(tap, before)


def test_recomputed_batchnorm_statistics_are_the_plain_average_of_batch_statistics():
    critic = small_critic()
    images = random_images(48, seed=5)
    nets.recompute_bn_stats(critic, images, batch=16, device=torch.device("cpu"), channels_last=False, seed=0)
    # hand average: the same permutation and batches, statistics of the first BN's input
    order = np.random.default_rng(0).permutation(len(images))
    bn = next(m for m in critic.modules() if isinstance(m, nn.BatchNorm2d))
    conv_in = []
    hook = bn.register_forward_hook(lambda m, i, o: conv_in.append(i[0].detach().double()))
    critic.train()
    means, variances = [], []
    with torch.no_grad():
        for start in range(0, 48, 16):
            idx = np.sort(order[start:start + 16])
            conv_in.clear()
            critic.features(nets.to_unit(torch.from_numpy(images[idx]), torch.device("cpu"), False))
            act = conv_in[0]
            means.append(act.mean(dim=(0, 2, 3)))
            n = act.numel() / act.shape[1]
            variances.append(act.var(dim=(0, 2, 3), unbiased=False) * n / (n - 1))
    hook.remove()
    critic.eval()
    np.testing.assert_allclose(bn.running_mean.double().numpy(), torch.stack(means).mean(0).numpy(), rtol=1e-4,
                               atol=1e-5)
    np.testing.assert_allclose(bn.running_var.double().numpy(), torch.stack(variances).mean(0).numpy(), rtol=1e-4,
                               atol=1e-5)


def test_log_spaced_steps():
    assert [s for s in range(0, 2001) if runs.log_spaced(s)] == [0, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000]


def test_artifact_keys_follow_what_determines_the_artifact():
    base = stage.artifact_key("svm", {"c": 1, "out": "a"}, ignore=("out",), features="k1")
    assert base == stage.artifact_key("svm", {"out": "b", "c": 1}, ignore=("out",), features="k1")
    assert base != stage.artifact_key("svm", {"c": 2, "out": "a"}, ignore=("out",), features="k1")
    assert base != stage.artifact_key("svm", {"c": 1, "out": "a"}, ignore=("out",), features="k2")
    with pytest.raises(ConfigError, match="not the expected"):
        stage.check_key("x.h5", "k1", "k2")


@pytest.fixture()
def unlabelled(tmp_path):
    return write_image_cache(tmp_path / "pre.h5", random_images(48, seed=2), np.full(48, -1), [], {})


def tiny_pretrain(tmp_path, data, **over):
    values = dict(model="dcgan", width=0.125, batch_size=8, steps=6, precision="fp32", data=str(data),
                  run_dir=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"), ckpt_every=1000)
    return build(pretrain.Config, "pretrain", {**values, **over})


def test_pretraining_keeps_the_untrained_control_and_log_spaced_checkpoints(tmp_path, unlabelled):
    run_dir = pretrain.run(tiny_pretrain(tmp_path, unlabelled))
    assert [s for s, _ in runs.interval_checkpoints(run_dir)] == [0, 1, 2, 5, 6]
    control = runs.load_checkpoint(run_dir / "ckpt_0000000.pt")
    assert control["step"] == 0 and control["key"] == runs.run_key(run_dir)
    # the step-0 critic is the seeded initialisation: the same as a fresh build with that seed
    torch.manual_seed(0)
    _, fresh = zoo.build_models("dcgan", norm="batch", spectral_norm=False, attention_res=0, z_dim=256,
                                 image_size=32, width=0.125, g_norm="batch")
    for name, value in fresh.state_dict().items():
        torch.testing.assert_close(control["critic"][name], value)
    assert json.loads((run_dir / "finished.json").read_text())["key"] == runs.run_key(run_dir)


def test_resume_with_another_identity_is_refused_before_anything_is_written(tmp_path, unlabelled):
    run_dir = pretrain.run(tiny_pretrain(tmp_path, unlabelled, steps=2))
    before = (run_dir / "config.json").read_text()
    with pytest.raises(ConfigError, match=r"lr_d: 0.0002 -> 0.001.*may change on resume"):
        pretrain.run(tiny_pretrain(tmp_path, unlabelled, steps=4, lr_d=1e-3))
    assert (run_dir / "config.json").read_text() == before
    # steps may change: the run continues, the log holds each step once, finished.json is rewritten
    pretrain.run(tiny_pretrain(tmp_path, unlabelled, steps=4, log_every=1))
    steps = [json.loads(line)["step"] for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 4
    assert json.loads((run_dir / "finished.json").read_text())["step"] == 4


def test_a_changed_data_file_is_another_run(tmp_path, unlabelled):
    cfg_a, key_a = pretrain.plan(tiny_pretrain(tmp_path, unlabelled, run_dir=""))
    write_image_cache(unlabelled, random_images(48, seed=3), np.full(48, -1), [], {})   # same path, new content
    import os
    os.utime(unlabelled, ns=(1, 1))
    _, key_b = pretrain.plan(tiny_pretrain(tmp_path, unlabelled, run_dir=""))
    assert key_a != key_b and key_a in cfg_a.run_dir


def test_the_same_data_copied_again_is_the_same_run(tmp_path, unlabelled):
    """Content names the data, not its mtime: a fresh machine or a shared folder copied in again (new
    mtimes, same bytes) resumes the runs built before instead of starting over."""
    import os
    _, key_a = pretrain.plan(tiny_pretrain(tmp_path, unlabelled, run_dir=""))
    copy = unlabelled.read_bytes()
    unlabelled.unlink()
    unlabelled.write_bytes(copy)
    os.utime(unlabelled, ns=(10**18, 10**18))
    _, key_b = pretrain.plan(tiny_pretrain(tmp_path, unlabelled, run_dir=""))
    assert key_a == key_b


def test_out_of_range_values_fail_when_built(tmp_path, unlabelled):
    for bad in (dict(steps=-1), dict(batch_size=0), dict(width=0.0), dict(n_critic=0), dict(ckpt_every=0),
                dict(lr_g=0.0), dict(max_minutes=-1.0)):
        with pytest.raises(ConfigError, match="out of range"):
            pretrain.plan(tiny_pretrain(tmp_path, unlabelled, **bad))


def test_divergence_leaves_no_non_finite_checkpoint(tmp_path, unlabelled):
    with pytest.raises(ConfigError, match="diverged"):
        pretrain.run(tiny_pretrain(tmp_path, unlabelled, lr_g=1e30, lr_d=1e30, steps=20))
    for _, path in runs.interval_checkpoints(tmp_path / "run"):
        ckpt = runs.load_checkpoint(path)
        assert all(torch.isfinite(v).all() for part in ("generator", "critic") for v in ckpt[part].values()
                   if v.is_floating_point())


def test_features_of_the_control_and_of_the_trained_critic_are_keyed_apart(tmp_path, unlabelled):
    run_dir = pretrain.run(tiny_pretrain(tmp_path, unlabelled, steps=2))
    labels = np.arange(24) % 3
    train = write_image_cache(tmp_path / "train.h5", random_images(24, seed=4), labels, list("abc"), {})
    values = dict(run=str(run_dir), train=str(train), test=str(train), precision="fp32", bn_images=16,
                  cache_dir=str(tmp_path / "cache"))
    trained = features.run(build(features.Config, "features", {**values, "checkpoint": "ckpt_0000002.pt"}))
    control = features.run(build(features.Config, "features", {**values, "checkpoint": "ckpt_0000000.pt"}))
    assert trained != control
    with FeatureFile(control) as f:
        assert f.attrs["untrained"] and f.attrs["checkpoint_step"] == 0
    assert features.run(build(features.Config, "features", {**values, "checkpoint": "ckpt_0000000.pt"})) == control
    with pytest.raises(ConfigError, match="not the expected"):
        features.run(build(features.Config, "features", {**values, "expect_run_key": "0123456789"}))


def test_table_refuses_what_is_not_a_results_file(tmp_path, capsys):
    from replearn.cli import main
    (tmp_path / "other.json").write_text('{"hello": 1}')
    (tmp_path / "broken.json").write_text("{not json")
    for pattern, words in ((tmp_path / "other.json", "not an svm results file"),
                           (tmp_path / "broken.json", "not a readable JSON file"),
                           (tmp_path / "none-*.svm.json", "no results file matches")):
        assert main(["table", f"results={pattern}", f"out_dir={tmp_path / 'tables'}"]) == 2
        err = capsys.readouterr().err.strip()
        assert words in err and str(tmp_path) in err and len(err.splitlines()) == 1


def test_run_folders_record_absolute_data_paths(tmp_path, unlabelled, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = tiny_pretrain(tmp_path, "pre.h5", steps=1, run_dir=str(tmp_path / "run"))
    run_dir = pretrain.run(cfg)
    assert json.loads((run_dir / "config.json").read_text())["config"]["data"] == str(tmp_path / "pre.h5")
