"""Generator-quality metrics: closed-form FID, critic-gap sign, exact neighbours, evaluate + report smoke."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from conftest import random_images, random_inception_weights
from replearn.train import evaluate, metrics, pretrain, report
from replearn.core.config import ConfigError, build
from replearn.core.store import write_image_cache


class TinyExtractor(nn.Module):
    """A fixed random conv + global pool: uint8 N x 3 x H x W -> N x 16 features, no download."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 16, 5, stride=2)

    def forward(self, x):
        return torch.tanh(self.conv(x.float() / 127.5 - 1)).mean((2, 3))


@pytest.fixture(scope="module")
def tiny_features() -> torch.Tensor:
    images = torch.from_numpy(random_images(400, seed=3))
    return metrics.batched(TinyExtractor(), images, "cpu", nchw_uint8=True).double()   # 400 x 16


def test_fid_of_a_set_against_itself_is_zero(tiny_features):
    assert abs(metrics.fid_from_features(tiny_features, tiny_features)) < 1e-6


def test_fid_against_a_shifted_copy_is_the_squared_mean_distance(tiny_features):
    """Equal covariances: the trace terms cancel, FID = ||mu_a - mu_b||^2."""
    shift = torch.linspace(-0.3, 0.5, tiny_features.shape[1], dtype=torch.float64)
    fid = metrics.fid_from_features(tiny_features, tiny_features + shift)
    assert fid == pytest.approx(float((shift ** 2).sum()), rel=1e-6, abs=1e-8)


def test_fid_matches_the_closed_form_for_gaussians():
    """N(0, a^2 I) vs N(m, b^2 I) in d dims: ||m||^2 + d (a - b)^2, from the exact moments."""
    d, a, b = 6, 1.0, 2.0
    stats_a = {"mu": np.zeros(d), "sigma": a * a * np.eye(d)}
    stats_b = {"mu": np.full(d, 0.5), "sigma": b * b * np.eye(d)}
    assert metrics.frechet_distance(stats_a, stats_b) == pytest.approx(d * 0.25 + d * (a - b) ** 2)


def test_wasserstein_estimate_is_positive_when_the_critic_scores_real_higher():
    brightness = lambda x: x.mean((1, 2, 3))                         # noqa: E731 - a critic: brighter = "real"
    real = torch.from_numpy(np.full((32, 8, 8, 3), 200, np.uint8))
    fake = torch.from_numpy(np.full((32, 8, 8, 3), 50, np.uint8))
    est = metrics.wasserstein_estimate(metrics.critic_scores(brightness, real, "cpu"),
                                       metrics.critic_scores(brightness, fake, "cpu"))
    assert est["estimate"] > 0 and est["real_mean"] > est["fake_mean"]
    swapped = metrics.wasserstein_estimate(metrics.critic_scores(brightness, fake, "cpu"),
                                           metrics.critic_scores(brightness, real, "cpu"))
    assert swapped["estimate"] == pytest.approx(-est["estimate"])


def test_nearest_neighbours_find_training_images_exactly():
    bank = torch.from_numpy(random_images(300, seed=5)).reshape(300, -1)
    picks = torch.tensor([7, 123, 299, 0])
    dist, idx = metrics.nearest_neighbours(bank[picks], bank, k=3, block=64)   # several blocks
    assert torch.equal(idx[:, 0], picks) and torch.all(dist[:, 0] == 0)
    brute = torch.cdist(bank[picks].double(), bank.double()) ** 2
    assert torch.allclose(dist, brute.topk(3, largest=False).values, rtol=1e-9)


def test_diversity_is_zero_for_a_collapsed_generator():
    collapsed = metrics.diversity(torch.ones(10, 4))
    spread = metrics.diversity(torch.randn(10, 4))
    assert collapsed["mean_pairwise_distance"] == 0 and collapsed["mean_variance"] == 0
    assert spread["mean_pairwise_distance"] > 0


def test_missing_inception_weights_is_one_line_and_never_downloads(tmp_path, monkeypatch):
    import torch_fidelity.feature_extractor_inceptionv3 as fe
    with pytest.raises(ConfigError, match="pt_inception-2015-12-05") as err:
        metrics.inception_extractor(tmp_path / "nope.pth", "cpu")
    assert "\n" not in str(err.value) and "nope.pth" in str(err.value)
    with pytest.raises(ConfigError):
        metrics.inception_extractor("", "cpu")


def test_real_statistics_are_cached_under_what_produced_them(tmp_path, tiny_features):
    calls = []

    def compute():
        calls.append(1)
        return metrics.frechet_statistics(tiny_features)

    path = metrics.real_stats_path(tmp_path, "src-a", "w1", 400, 0)
    first = metrics.load_or_compute_stats(path, compute, {"source": "a"})
    again = metrics.load_or_compute_stats(path, compute, {"source": "a"})
    assert len(calls) == 1 and np.array_equal(first["sigma"], again["sigma"])
    assert metrics.real_stats_path(tmp_path, "src-b", "w1", 400, 0) != path
    assert metrics.real_stats_path(tmp_path, "src-a", "w2", 400, 0) != path
    assert metrics.real_stats_path(tmp_path, "src-a", "w1", 200, 0) != path


# ============================================================================ the stages
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("evalrun")
    images = random_images(64, seed=1)
    cache = write_image_cache(root / "images.h5", images, np.full(len(images), -1), [], {"source": "test"})
    cfg = build(pretrain.Config, "pretrain", dict(model="wgan-gp", width=0.125, batch_size=8, n_critic=1, steps=2,
                                                  precision="fp32", log_every=1, sample_every=1, ckpt_every=1,
                                                  data=str(cache), run_dir=str(root / "run"),
                                                  cache_dir=str(root / "cache")))
    return pretrain.run(cfg)


def small_eval(run_dir: Path, **over) -> evaluate.Config:
    values = dict(run=str(run_dir), num_samples=32, critic_samples=16, diversity_samples=16, nn_queries=4, nn_k=3,
                  inception_weights=str(run_dir / "absent.pth"), batch_size=16, device="cpu")
    return build(evaluate.Config, "evaluate", {**values, **over})


def test_evaluate_and_report_without_inception_weights(tiny_run):
    out = evaluate.run(small_eval(tiny_run, checkpoint="all", nn_space="both"))
    records = json.loads(out.read_text())["records"]
    assert [r["step"] for r in records] == [0, 1, 2]   # ckpt_0 is a log-spaced checkpoint too
    last = records[-1]
    assert last["fid"] is None and "absent.pth" in last["fid_unavailable"]
    assert last["wasserstein"]["real_is_training_data"] is True
    for space in ("pixel", "critic"):
        assert (tiny_run / last["nearest"][space]["png"]).exists()
    assert (tiny_run / "metrics_vs_step.png").exists()

    page = report.run(report.Config(run=str(tiny_run))).read_text()
    assert "**FID unavailable**" in page and "absent.pth" in page
    for link in ("losses.png", "samples/step_0000002.png", "metrics_vs_step.png", "nearest/pixel_step_0000002.png"):
        assert f"]({link})" in page, link
    compare = report.report_compare([tiny_run, tiny_run], tiny_run.parent / "row.png")
    assert compare.exists()


def test_evaluate_again_replaces_that_steps_record(tiny_run):
    evaluate.run(small_eval(tiny_run, checkpoint="last.pt"))
    records = json.loads((tiny_run / "evaluate.json").read_text())["records"]
    assert sorted(r["step"] for r in records) == sorted({r["step"] for r in records})


@pytest.mark.slow
def test_fid_with_a_local_weights_file_is_computed_and_cached(tiny_run, tmp_path, monkeypatch):
    """A randomly initialised Inception saved locally stands in for the real weights."""
    weights = random_inception_weights(tmp_path / "random_inception.pth", monkeypatch)
    cfg = small_eval(tiny_run, num_samples=8, checkpoint="last.pt", inception_weights=str(weights), require_fid=True,
                     cache_dir=str(tmp_path / "cache"))
    record = json.loads(evaluate.run(cfg).read_text())["records"][-1]
    assert record["fid"] is not None and np.isfinite(record["fid"]) and Path(record["fid_real_stats"]).exists()
    assert "inception" in record["diversity"]


def test_bad_keys_fail_with_the_choices(tiny_run):
    with pytest.raises(ConfigError, match="choose from: pixel, critic, both"):
        evaluate.run(small_eval(tiny_run, nn_space="pixels"))
    with pytest.raises(ConfigError, match="choose from: .*last.pt"):
        evaluate.run(small_eval(tiny_run, checkpoint="ckpt_9.pt"))
    with pytest.raises(ConfigError, match="Inception weights not found"):
        evaluate.run(small_eval(tiny_run, require_fid=True))


def test_a_file_that_is_not_inception_weights_is_one_line(tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(ConfigError, match="not a state dict") as err:
        metrics.inception_extractor(junk, "cpu")
    assert "\n" not in str(err.value)
