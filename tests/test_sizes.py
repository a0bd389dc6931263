"""Image sizes and channels (issue #19): the feature width of every (arch, size, channels) as documented in
zoo.py and the README; sizes an architecture cannot take refused in one line; grayscale read as one
channel; DCGAN and WGAN-GP at 64 px take a training step and give features of the documented width;
the key of a default (32 px, RGB) run does not change with the new keys."""
from __future__ import annotations

import re

import h5py
import numpy as np
import pytest
import torch

from conftest import REPO, random_images
from replearn.models import nets, zoo
from replearn.train import pretrain
from replearn.probe import features
from replearn.core.config import ConfigError, build
from replearn.core.store import with_channels, write_image_cache


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("arch,size", sorted(zoo.FEATURE_DIMS))
def test_feature_width_is_the_documented_one(arch, size, channels):
    _, critic = zoo.build_models(arch, image_size=size, channels=channels)
    assert sum(d for _, d in critic.feature_layers(size)) == zoo.FEATURE_DIMS[arch, size]
    gen, small = zoo.build_models(arch, image_size=size, channels=channels, width=0.125)   # G and D shapes, cheaply
    fake = gen(torch.rand(2, 256))
    assert fake.shape == (2, channels, size, size) and small(fake).shape == (2,)


def test_the_guide_family_table_states_the_same_widths():
    readme = (REPO / "docs" / "guide.md").read_text()   # the model families' table moved from the README
    for arch, size in zoo.FEATURE_DIMS:
        row = next(line for line in readme.splitlines() if line.startswith("| `") and f"(`{arch}`)" in line)
        assert re.search(rf"{size} px:? {zoo.FEATURE_DIMS[arch, size]}\b", row) or \
            (arch == "mlp" and f"{zoo.FEATURE_DIMS[arch, size]} at any size" in row), (arch, size, row)
    for arch, size in (("dcgan", 32), ("mlp", 32), ("resnet", 32), ("dense", 32)):
        assert f"{zoo.FEATURE_DIMS[arch, size]}" in zoo.__doc__


@pytest.mark.parametrize("arch", ["resnet", "dense"])
def test_sizes_an_arch_cannot_take_are_refused_in_one_line(arch):
    with pytest.raises(ConfigError, match="takes image_size 32 or 64") as err:
        zoo.build_models(arch, image_size=28)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="takes image_size 28, 32 or 64"):
        zoo.build_models("dcgan", image_size=30)
    with pytest.raises(ConfigError, match="channels"):
        build(pretrain.Config, "pretrain", {"channels": "2"})
    with pytest.raises(ConfigError, match=f"arch '{arch}' takes image_size"):   # at resolve time, before any data
        pretrain.resolve(pretrain.Config(model="dense-wgan-gp" if arch == "dense" else "wgan-gp-sn-resnet",
                                         image_size=28))


def test_grey_images_stored_as_rgb_read_back_as_their_grey_value():
    grey = np.random.default_rng(0).integers(0, 256, (4, 6, 6), dtype=np.uint8)
    rgb = np.repeat(grey[..., None], 3, axis=3)
    x = nets.to_unit(torch.from_numpy(rgb), "cpu", channels_last=False, channels=1)
    assert x.shape == (4, 1, 6, 6)
    torch.testing.assert_close(x[:, 0], torch.from_numpy(grey).float() / 127.5 - 1, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(with_channels(rgb, 1)[..., 0], grey)


def test_a_default_run_keeps_its_key():
    """channels=3 (the old implicit value) is left out of the key, so existing runs are not rebuilt."""
    cfg = pretrain.resolve(pretrain.Config(model="dcgan"))
    record = {k: v for k, v in pretrain.to_dict(cfg).items() if k not in ("channels", "inception_weights")}
    from replearn.core import stage
    old = stage.artifact_key("pretrain", record, ignore=pretrain.RESUMABLE_KEYS, data="d", trainer=pretrain.TRAINER_VERSION)
    assert pretrain.run_key(cfg, "d") == old
    assert pretrain.run_key(pretrain.resolve(pretrain.Config(model="dcgan", channels=1)), "d") != old


@pytest.mark.parametrize("model", ["dcgan", "wgan-gp"])
def test_64px_takes_a_training_step_and_gives_features_of_the_documented_width(tmp_path, model):
    pre = write_image_cache(tmp_path / "pre.h5", random_images(8, size=64), np.full(8, -1), [], {})
    split = write_image_cache(tmp_path / "split.h5", random_images(6, size=64, seed=1), np.arange(6) % 2, ["a", "b"], {})
    cfg = build(pretrain.Config, "pretrain", {
        "model": model, "data": str(pre), "image_size": 64, "steps": 1, "batch_size": 4, "n_critic": 1,
        "precision": "fp32", "run_dir": str(tmp_path / "run"), "cache_dir": str(tmp_path / "cache")})
    run_dir = pretrain.run(cfg)
    assert (run_dir / "ckpt_0000001.pt").exists()
    out = features.run(build(features.Config, "features", {
        "run": str(run_dir), "checkpoint": "ckpt_0000001.pt", "train": str(split), "test": str(split),
        "bn_images": 8, "bn_batch": 4, "precision": "fp32", "cache_dir": str(tmp_path / "cache")}))
    with h5py.File(out, "r") as h5:
        assert h5["train/features"].shape == (6, zoo.FEATURE_DIMS["dcgan", 64])
