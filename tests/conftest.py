"""Shared fixtures. Tests are CPU-only and offline; those needing ../shared/data skip without it."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("REPLEARN_SHARED_DATA", REPO.parent / "shared" / "data"))

torch.set_num_threads(min(2, os.cpu_count() or 1))


def load_benchmark(name: str):
    """benchmarks/<name>.py as a module (the benchmarks are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pytest_collection_modifyitems(config, items):
    if (SHARED_DATA / "cifar10" / "train.parquet").exists():
        return
    skip = pytest.mark.skip(reason=f"real images not found under {SHARED_DATA}")
    for item in items:
        if "shared_data" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def shared_data() -> Path:
    return SHARED_DATA


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def random_images(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    """N x size x size x 3 uint8 images with some structure (smooth blobs), for smoke tests."""
    g = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = np.empty((n, size, size, 3), dtype=np.uint8)
    for i in range(n):
        cx, cy, r = g.uniform(0.2, 0.8), g.uniform(0.2, 0.8), g.uniform(0.1, 0.4)
        blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))
        colour = g.uniform(0, 255, size=3)
        img = blob[..., None] * colour + g.normal(0, 10, size=(size, size, 3)) + 40
        out[i] = np.clip(img, 0, 255).astype(np.uint8)
    return out


def random_inception_weights(path: Path, monkeypatch) -> Path:
    """A randomly initialised FID Inception (torch-fidelity's, same keys, plus an AuxLogits entry that the
    loader drops, as torchvision-based exports carry) saved at `path`: it stands in for the real weights
    offline. Any download fails the test, while building it and for the rest of the test."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe
    monkeypatch.setattr(fe, "load_state_dict_from_url", lambda *a, **k: pytest.fail("tried to download"))
    with monkeypatch.context() as patch:
        patch.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None)
        torch.save({}, path)
        random_net = fe.FeatureExtractorInceptionV3("x", ["2048"], feature_extractor_weights_path=str(path))
    state = dict(random_net.state_dict())
    state["AuxLogits.fc.weight"] = torch.zeros(1)
    torch.save(state, path)
    return path
