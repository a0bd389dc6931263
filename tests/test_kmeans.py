"""Coates's K-means baseline: closed-form checks of whitening, encoding, K-means and pooling."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from replearn.core import stage, store
from replearn.probe import kmeans
from replearn.core.config import ConfigError, build
from conftest import random_images


def direct_features(image: np.ndarray, centroids, mean, whiten, size: int, norm_eps: float) -> np.ndarray:
    """Coates's extract_features.m for one image, one position at a time (the reference)."""
    h = image.shape[0]
    rows = h - size + 1
    half = int(np.floor(rows / 2 + 0.5))   # MATLAB round()
    acts = np.zeros((rows, rows, len(centroids)))
    for r in range(rows):
        for c in range(rows):
            p = image[r:r + size, c:c + size, :].reshape(-1).astype(np.float64)
            p = (p - p.mean()) / np.sqrt(p.var(ddof=1) + norm_eps)
            w = (p - mean) @ whiten
            z = np.sqrt(((w - centroids) ** 2).sum(1))
            acts[r, c] = np.maximum(0, z.mean() - z)
    quads = [acts[:half, :half], acts[half:, :half], acts[:half, half:], acts[half:, half:]]
    return np.concatenate([q.sum((0, 1)) for q in quads])


def test_whitening_maps_covariance_to_shrunk_identity():
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(8, 8, generator=g)
    x = torch.randn(50_000, 8, generator=g, dtype=torch.float64) @ mix.double() + 3.0
    eps = 0.1
    mean, whiten = kmeans.zca(x.float(), eps)
    w = (x.float() - mean) @ whiten
    lam = torch.linalg.eigvalsh(torch.cov(x.T)).double()
    got = torch.linalg.eigvalsh(torch.cov(w.double().T))
    # ZCA with epsilon: eigenvalue lambda becomes lambda / (lambda + eps); identity when eps = 0
    assert torch.allclose(got, lam / (lam + eps), rtol=1e-3)
    mean0, whiten0 = kmeans.zca(x.float(), 0.0)
    cov0 = torch.cov(((x.float() - mean0) @ whiten0).double().T)
    assert torch.allclose(cov0, torch.eye(8, dtype=torch.float64), atol=1e-3)
    assert torch.allclose(whiten, whiten.T, atol=1e-5)   # ZCA, not PCA: symmetric


def test_patch_normalisation_matches_matlab_var():
    p = torch.tensor([[0, 10, 20, 30.0], [5, 5, 5, 5]])
    got = kmeans.normalise(p, 10.0)
    row = np.array([0, 10, 20, 30.0])
    assert np.allclose(got[0].numpy(), (row - 15) / np.sqrt(row.var(ddof=1) + 10))
    assert torch.all(got[1] == 0)   # a flat patch maps to zero, not NaN


def test_sampled_patches_are_image_crops():
    images = random_images(5, size=12)
    patches = kmeans.sample_patches(images, 40, 6, seed=1)
    crops = {kmeans.patch_view(images, 6)[i, r, c].tobytes()
             for i in range(5) for r in range(7) for c in range(7)}
    assert patches.shape == (40, 108) and patches.dtype == np.uint8
    assert all(p.tobytes() in crops for p in patches)


@pytest.mark.parametrize("compile_", [False, True])
def test_conv_encoding_equals_direct_per_patch(compile_):
    size, k = 6, 7
    images = random_images(2, size=14, seed=3)
    g = torch.Generator().manual_seed(0)
    centroids = torch.randn(k, 108, generator=g)
    a = torch.randn(108, 108, generator=g) * 0.1
    whiten = a @ a.T + torch.eye(108)       # any symmetric positive definite matrix
    mean = torch.randn(108, generator=g) * 0.1
    cfg = kmeans.Config(k=k, batch=2, compile=compile_)
    encoder = kmeans.Encoder(centroids, mean, whiten, cfg, image_size=14, precision="fp32")
    got = encoder.step(torch.from_numpy(images)).numpy()                    # 2 x 4K
    for i in range(2):
        want = direct_features(images[i], centroids.double().numpy(), mean.double().numpy(),
                               whiten.double().numpy(), size, cfg.norm_eps)
        assert np.allclose(got[i], want, rtol=1e-4, atol=1e-3)


def test_quadrants_split_at_14_of_27():
    f = torch.ones(1, 27, 27, 1)
    sums = kmeans.quadrant_sums(f, 14)[0, :, 0]
    assert sums.tolist() == [14 * 14, 13 * 14, 14 * 13, 13 * 13]   # TL, BL, TR, BR (Coates q1..q4)
    cfg = kmeans.Config(k=3, compile=False)
    assert kmeans.Encoder(torch.zeros(3, 108), torch.zeros(108), torch.eye(108), cfg, 32, "fp32").half == 14
    for (r, c), quadrant in {(13, 13): 0, (14, 13): 1, (13, 14): 2, (14, 14): 3, (26, 0): 1}.items():
        one = torch.zeros(1, 27, 27, 1)
        one[0, r, c] = 1
        assert kmeans.quadrant_sums(one, 14)[0, :, 0].argmax().item() == quadrant


def test_kmeans_recovers_separated_clusters():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[8.0, 0, 0], [0, 8, 0], [0, 0, 8], [-8, -8, -8]])
    x = (centres.repeat_interleave(300, 0) + 0.3 * torch.randn(1200, 3, generator=g))
    found, empty = kmeans.kmeans(x, 4, iterations=20, seed=0, batch=256, progress=False)
    assert empty == 0
    nearest = torch.cdist(centres, found).min(1).values
    assert torch.all(nearest < 0.1), nearest


def test_config_presets_and_errors():
    assert build(kmeans.Config, "kmeans", ["preset=smoke"]).k == 400
    assert build(kmeans.Config, "kmeans", ["preset=paper"]).k == 1600
    with pytest.raises(ConfigError):
        build(kmeans.Config, "kmeans", ["precision=fp8"])
    with pytest.raises(ConfigError):
        build(kmeans.Config, "kmeans", ["k=0"])


def image_caches(folder, skipped_train: int = 0) -> tuple[str, str]:
    """Generated train/test image caches, as `prepare` writes them (the specs kmeans reads)."""
    train = store.write_image_cache(folder / "train.h5", random_images(60, seed=1), np.arange(60) % 3,
                                    ["a", "b", "c"], {"skipped": skipped_train})
    test = store.write_image_cache(folder / "test.h5", random_images(20, seed=2), np.arange(20) % 3,
                                   ["a", "b", "c"], {"skipped": 0})
    return str(train), str(test)


def test_run_writes_standardised_feature_file_and_resumes(tmp_path):
    train_spec, test_spec = image_caches(tmp_path, skipped_train=2)
    cfg = kmeans.Config(train=train_spec, test=test_spec, k=8, patches=3000, iterations=5, batch=3,
                        compile=False, out=str(tmp_path / "km" / "features.h5"))
    path = kmeans.run(cfg)
    with store.FeatureFile(path) as ff:
        assert ff.attrs["kind"] == "kmeans" and ff.attrs["model"] == "kmeans-8"
        assert ff.layer_names == list(kmeans.QUADRANTS) and ff.offsets == [0, 8, 16, 24, 32]
        train, test = ff.read("train"), ff.read("test")
        assert train.shape == (60, 32) and test.shape == (20, 32)
        assert np.array_equal(ff.labels("test"), np.arange(20) % 3)
        assert np.allclose(train.mean(0), 0, atol=1e-4) and np.all(train.std(0, ddof=1) <= 1.0 + 1e-4)
        assert ff.h5["feature_mean"].shape == (32,) and set(ff.attrs["seconds"]) >= {"kmeans", "encoding"}
        assert ff.attrs["skipped_train"] == 2 and ff.attrs["skipped_test"] == 0
        assert ff.attrs["key"] == kmeans.feature_key(cfg, ff.attrs["source_ids"]) and ff.attrs["source_ids"]["test"]
    assert (tmp_path / "km" / "centroids.pt").exists() and (tmp_path / "km" / "kmeans.json").exists()
    assert kmeans.run(cfg) == path                                  # complete: returned as is
    again = kmeans.run(kmeans.Config(**{**cfg.__dict__, "dtype": "float16"}))   # reuses the centroids
    with store.FeatureFile(again) as ff:
        assert ff.attrs["seconds"]["kmeans"] == 0.0
        assert np.allclose(ff.read("train"), train, atol=1e-2)


def test_changed_data_is_never_reused(tmp_path, capsys, monkeypatch):
    """The reuse key and the centroid key carry the data's identity (path, size, mtime), not only its name."""
    train_spec, test_spec = image_caches(tmp_path)
    cfg = kmeans.Config(train=train_spec, test=test_spec, k=4, patches=500, iterations=2, batch=4,
                        compile=False, out=str(tmp_path / "km" / "features.h5"))
    kmeans.run(cfg)
    with store.FeatureFile(cfg.out) as ff:
        key = ff.attrs["key"]
    capsys.readouterr()
    store.write_image_cache(tmp_path / "test.h5", random_images(20, seed=7), np.arange(20) % 3, ["a", "b", "c"], {})
    kmeans.run(cfg)   # new test data: encoded again, centroids (train only) reused
    said = capsys.readouterr()
    assert "up to date" not in said.err and "reusing centroids" in said.out
    with store.FeatureFile(cfg.out) as ff:
        assert ff.attrs["key"] != key
    store.write_image_cache(tmp_path / "train.h5", random_images(60, seed=8), np.arange(60) % 3, ["a", "b", "c"], {})
    kmeans.run(cfg)   # new training data: new centroids
    assert "reusing centroids" not in capsys.readouterr().out
    monkeypatch.setattr(stage, "_BUILT", set())   # as a later process finds it
    kmeans.run(cfg)
    assert "is up to date" in capsys.readouterr().err
