"""The L2-SVM solver against scikit-learn's LinearSVC, and the evaluation protocol end to end."""
from __future__ import annotations

import json
import multiprocessing
import os

import numpy as np
import pytest
import torch

from replearn.probe import svm
from replearn.core.config import ConfigError, build
from replearn.core.store import FeatureWriter


def blobs(n: int, d: int, k: int, seed: int, spread: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """N x D float32 class-dependent Gaussian features and N int labels."""
    g = np.random.default_rng(seed)
    y = g.integers(0, k, n)
    centres = spread * g.normal(size=(k, d))
    return (g.normal(size=(n, d)) + centres[y]).astype(np.float32), y


# ----------------------------------------------------------------------------- the solver
@pytest.mark.parametrize("n,d,k", [(200, 40, 3), (120, 300, 4), (150, 20, 2)])   # primal, Gram space, binary
@pytest.mark.parametrize("C", [1e-3, 0.02, 0.2])
@pytest.mark.parametrize("fit_intercept", [True, False])
def test_matches_linearsvc(n, d, k, C, fit_intercept):
    X, y = blobs(n, d, k, seed=n + k)
    ours = svm.fit(X, y, C, fit_intercept=fit_intercept, device="cpu")
    ref = svm.fit_liblinear(X, y, C, fit_intercept=fit_intercept, tol=1e-7, max_iter=200000)
    ours_obj, ref_obj = ours.objective(X, y, C), ref.objective(X, y, C)
    assert ours_obj <= ref_obj * (1 + 1e-3)      # within 0.1% (ours may be the lower one)
    assert ref_obj <= ours_obj * (1 + 1e-3)
    assert np.mean(ours.predict(X) == ref.predict(X)) >= 0.99
    assert ours.W.shape == ref.W.shape


def test_objective_closed_form():
    """w = 0, b = 0: every hinge is 1, so the objective is C * N * (number of one-vs-rest problems)."""
    X, y = blobs(30, 5, 3, seed=1)
    zero = svm.LinearModel(np.zeros((3, 5), np.float32), np.zeros(3, np.float32), np.arange(3))
    assert zero.objective(X, y, 0.5) == pytest.approx(0.5 * 30 * 3)


def test_intercept_is_regularised_like_liblinear():
    """The bias is the weight of a constant feature s: its penalty is 0.5 (b / s)^2."""
    X, y = blobs(100, 10, 2, seed=2)
    X += 3.0                                        # an offset the bias must absorb
    for scaling in (1.0, 10.0):
        ours = svm.fit(X, y, 0.1, intercept_scaling=scaling)
        ref = svm.fit_liblinear(X, y, 0.1, intercept_scaling=scaling, tol=1e-8)
        assert ours.objective(X, y, 0.1) == pytest.approx(ref.objective(X, y, 0.1), rel=1e-3)
        assert ours.b == pytest.approx(ref.b, rel=2e-2, abs=1e-3)


def test_separable_toy_set_is_learned_perfectly():
    g = np.random.default_rng(3)
    y = np.repeat(np.arange(4), 25)
    X = (np.eye(4)[y] * 5 + 0.1 * g.normal(size=(100, 4))).astype(np.float32)
    model = svm.fit(X, y, 1.0)
    assert svm.accuracy(model, X, y) == 1.0


def test_warm_started_path_matches_cold_fits():
    X, y = blobs(150, 400, 3, seed=4)
    cs = [1e-3, 1e-2, 1e-1]
    path = svm.fit_path(X, y, cs)
    for c, model in zip(cs, path):
        cold = svm.fit(X, y, c)
        assert model.objective(X, y, c) == pytest.approx(cold.objective(X, y, c), rel=1e-5)


def test_torch_input_and_primal_equal_gram():
    torch = pytest.importorskip("torch")
    X, y = blobs(100, 150, 3, seed=5)
    gram = svm.fit(torch.from_numpy(X), y, 0.05, method="gram")
    primal = svm.fit(X, y, 0.05, method="primal")
    assert gram.objective(X, y, 0.05) == pytest.approx(primal.objective(X, y, 0.05), rel=1e-5)


def test_nystrom_preconditioner_is_exact_at_full_rank(monkeypatch):
    """Rank >= P+1: the randomized preconditioner equals the dense (I + mu S)^-1."""
    torch = pytest.importorskip("torch")
    X, _ = blobs(80, 12, 3, seed=8)
    design = svm.design._Design(torch.from_numpy(X), 1.0)
    monkeypatch.setattr(svm.design, "NYSTROM_RANK", 13)
    r = torch.randn(13, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    dense, low_rank = design._dense(0.3)(r), design._nystrom(0.3)(r)
    assert torch.allclose(dense, low_rank, rtol=1e-4, atol=1e-6)


def test_gram_preconditioner_inverts_i_plus_mu_ztz(monkeypatch):
    """In Gram space (Z = L, N x N) the preconditioner at full rank is exactly (I + mu Z^T Z)^-1."""
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(svm.design, "NYSTROM_RANK", 41)
    X, y = blobs(40, 60, 3, seed=9)
    problem = svm.prepare(X, y, method="gram", device="cpu")
    Z = problem.design.A.double()
    r = torch.randn(41, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    r[-1] = 0                                        # the bias row is folded into the Gram matrix
    z = problem.design.preconditioner(0.7)(r)
    M = torch.eye(40, dtype=torch.float64) + 0.7 * Z.T @ Z
    assert torch.allclose(M @ z[:-1], r[:-1], rtol=1e-4, atol=1e-5)


def test_gram_design_products_read_only_the_lower_triangle(monkeypatch):
    """The Gram factor's products skip the blocks above the diagonal blocks: with NaN written there they
    give the dense products of the true (zero above the diagonal) factor."""
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(svm.design, "TRIANGLE_ROWS", 16)            # several blocks, the last one short
    X, y = blobs(70, 90, 3, seed=12)
    L = svm.prepare(X, y, method="gram", device="cpu").L.clone()
    dense = svm.design._Design(L.float().contiguous(), 0.0)
    block = torch.arange(70) // 16
    L[block[:, None] < block[None, :]] = float("nan")
    design = svm.design._GramDesign(L)
    gen = torch.Generator().manual_seed(6)
    V, R = torch.randn(71, 3, dtype=torch.float64, generator=gen), torch.randn(70, 3, dtype=torch.float64, generator=gen)
    V[-1] = 0

    def close(a, b, rtol):
        # float32 products summed in another order: an entry that cancels to near 0 keeps an error of
        # rtol times the largest entry, not of itself (a fixed atol=1e-6 failed 1 run in 4 on random V)
        return torch.allclose(a, b, rtol=rtol, atol=rtol * float(b.abs().max()))
    assert close(design.forward(V), dense.forward(V), 1e-5)
    assert close(design.backward(R), dense.backward(R), 1e-5)
    assert close(design.hessian_product(V, torch.ones(70, 3), 0.1), dense.hessian_product(V, torch.ones(70, 3), 0.1), 1e-4)


@pytest.mark.parametrize("fit_intercept", [True, False])
def test_wide_primal_with_nystrom_matches_linearsvc(monkeypatch, fit_intercept):
    """Designs wider than the dense limit take the randomized (Nystrom) preconditioner."""
    monkeypatch.setattr(svm.design, "DENSE_PRECONDITIONER_MAX_DIM", 16)
    monkeypatch.setattr(svm.design, "NYSTROM_RANK", 8)
    X, y = blobs(300, 50, 3, seed=10)
    X += 2.0                                         # a large mean direction, as trained features have
    for C in (1e-3, 0.1):
        ours = svm.fit(X, y, C, fit_intercept=fit_intercept, method="primal", device="cpu")
        ref = svm.fit_liblinear(X, y, C, fit_intercept=fit_intercept, tol=1e-7, max_iter=200000)
        assert ours.objective(X, y, C) == pytest.approx(ref.objective(X, y, C), rel=1e-3)


@pytest.mark.parametrize("dense", [True, False])
def test_bf16_hessian_reaches_the_float32_optimum(monkeypatch, dense):
    """Large primal designs take CG's Hessian products on a bfloat16 copy; the gradient stays float32, so
    the fit must land on the same optimum as an all-float32 fit (and say which Hessian it used)."""
    X, y = blobs(400, 60, 3, seed=11)
    X += 2.0
    if not dense:                                    # the Nystrom sketch runs on the bf16 copy too
        monkeypatch.setattr(svm.design, "DENSE_PRECONDITIONER_MAX_DIM", 16)
        monkeypatch.setattr(svm.design, "NYSTROM_RANK", 8)
    exact = svm.fit(X, y, 0.05, method="primal", device="cpu")
    monkeypatch.setattr(svm.design, "BF16_HESSIAN_MIN_ELEMENTS", 0)
    monkeypatch.setattr(svm.design, "bf16_supported", lambda device: True)
    fast = svm.fit(X, y, 0.05, method="primal", device="cpu")
    assert exact.info["hessian"] == "float32" and fast.info["hessian"] == "bfloat16"
    assert fast.info["converged"] and fast.info["cg_iterations"] >= fast.info["iterations"] > 0
    assert fast.objective(X, y, 0.05) == pytest.approx(exact.objective(X, y, 0.05), rel=1e-6)
    assert np.mean(fast.predict(X) == exact.predict(X)) == 1.0


# ----------------------------------------------------------------------------- draws and splits
def test_draws_are_class_balanced_and_reproducible():
    labels = np.repeat(np.arange(10), 50)
    np.random.default_rng(0).shuffle(labels)
    a = svm.protocol.balanced_draw(labels, 7, svm.protocol.draw_rng(0, 3, 5))
    b = svm.protocol.balanced_draw(labels, 7, svm.protocol.draw_rng(0, 3, 5))
    c = svm.protocol.balanced_draw(labels, 7, svm.protocol.draw_rng(0, 3, 6))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert np.bincount(labels[a]).tolist() == [7] * 10
    assert len(np.unique(a)) == len(a)


def test_validation_split_is_disjoint_and_draws_respect_it():
    labels = np.repeat(np.arange(5), 100)
    rest, val = svm.protocol.split_validation(labels, 100, seed=0)
    assert np.bincount(labels[val]).tolist() == [20] * 5
    assert len(np.intersect1d(rest, val)) == 0 and len(rest) + len(val) == len(labels)
    draw = svm.protocol.balanced_draw(labels, 10, svm.protocol.draw_rng(0, 2, 0), pool=rest)
    assert len(np.intersect1d(draw, val)) == 0
    with pytest.raises(ConfigError):
        svm.protocol.balanced_draw(labels, 90, svm.protocol.draw_rng(0, 2, 0), pool=rest)


# ----------------------------------------------------------------------------- protocol end to end
def write_features(path, dtype: str = "float32", n_train: int = 300, n_test: int = 100, k: int = 3,
                   model: str = "blobs", seed: int = 7):
    g = np.random.default_rng(seed)
    centres = g.normal(size=(k, 24))
    layers = [("conv1", 8), ("conv2", 16)]
    with FeatureWriter(path, layers, {"kind": "test", "model": model, "key": f"{model}-{seed}", "config": {"k": k}},
                       dtype=dtype) as writer:
        for split, n in (("train", n_train), ("test", n_test)):
            y = np.arange(n) % k
            writer.create_split(split, n)
            writer.write(split, 0, (g.normal(size=(n, 24)) + 1.5 * centres[y]).astype(np.float32), y)
    return path


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_run_end_to_end(tmp_path, dtype):
    features = write_features(tmp_path / f"feat_{dtype}.h5", dtype)
    cfg = build(svm.Config, "svm", {"features": str(features), "preset": "smoke", "per_class": 20,
                                   "settings": ("full", "400"), "val_size": 60, "select_draws": 2, "final_draws": 4,
                                   "c_grid": (1e-3, 1e-2, 1e-1), "device": "cpu"})
    out = svm.run(cfg)
    assert out.name.startswith(features.stem + ".svm-") and out.suffix == ".json" and out.with_suffix(".png").exists()
    record = json.loads(out.read_text())
    assert set(record) >= {"config", "provenance", "features", "settings"}
    assert record["features"]["attrs"]["model"] == "blobs"
    full, few = record["settings"]["full"], record["settings"]["400"]
    assert 0.8 < full["test_acc"] <= 1.0
    # the starting grid (scaled by the smoke preset's c_scale=norm) and any bracketing decades
    assert len(full["grid"]) >= 3 and sorted(map(float, full["val_curve"])) == full["grid"]
    assert len(few["draws"]) == 4 and few["mean"] == pytest.approx(np.mean(few["draws"]))
    assert few["ci95"] == pytest.approx(1.96 * np.std(few["draws"]))
    assert float(few["c"]) in [float(c) for c in few["val_curve"]]


def test_results_of_identical_features_are_reused_not_refitted(tmp_path):
    """Two runs' feature files with the same bytes (the chain's two seed-0 controls) and other attrs: the
    second copies the first's results, names them in `reused_from`, and counts no SVM seconds; a file
    that differs is fitted."""
    from replearn.publish.tables import eval_text, stage_seconds
    paths = {name: write_features(tmp_path / name / "feat.h5", model=name, seed=seed)
             for name, seed in (("a", 7), ("b", 7), ("c", 8))}
    made = {}
    for name, features in paths.items():
        cfg = build(svm.Config, "svm", {"features": str(features), "per_class": 20, "settings": ("full", "400"),
                                       "val_size": 60, "select_draws": 2, "final_draws": 3,
                                       "c_grid": (1e-2, 1e-1), "device": "cpu"})
        made[name] = json.loads(svm.run(cfg).read_text())
    a, b, c = made["a"], made["b"], made["c"]
    assert a["content_key"] == b["content_key"] != c["content_key"] and a["key"] != b["key"]
    assert "reused_from" not in a and "reused_from" not in c
    assert b["reused_from"]["features"]["path"] == str(paths["a"])
    assert b["settings"] == a["settings"] and b["features"]["attrs"]["model"] == "b"
    assert stage_seconds(b, {})["svm full"] == 0 < stage_seconds(a, {})["svm full"]
    assert "shared with a/feat.h5" in eval_text(b, {}) and "shared with" not in eval_text(a, {})
    assert stage_seconds(c, {})["svm full"] > 0


def test_cached_train_gram_gives_the_same_protocol(tmp_path):
    """gram_cache=on cuts each draw's block (18 rows < 24 dims: the Gram route) out of one Gram
    matrix of all train rows: same draws, same models (up to float32 rounding), same accuracies."""
    features = write_features(tmp_path / "feat.h5", n_train=240, n_test=90)
    results = {}
    for mode in ("on", "off"):
        cfg = build(svm.Config, "svm", {"features": str(features), "settings": ("400",), "per_class": 6,
                                       "val_size": 60, "select_draws": 2, "final_draws": 3,
                                       "c_grid": (1e-3, 1e-1), "gram_cache": mode, "device": "cpu",
                                       "out": str(tmp_path / f"{mode}.json")})
        results[mode] = json.loads(svm.run(cfg).read_text())["settings"]["400"]
    assert results["on"]["gram_cache"] and not results["off"]["gram_cache"]
    assert results["on"]["draws"] == results["off"]["draws"]
    assert results["on"]["val_curve"] == results["off"]["val_curve"]


def test_given_gram_equals_computed():
    torch = pytest.importorskip("torch")
    X, y = blobs(60, 90, 3, seed=11)
    given = svm.fit(X, y, 0.05, gram=torch.from_numpy(X) @ torch.from_numpy(X).T)
    computed = svm.fit(X, y, 0.05)
    assert given.objective(X, y, 0.05) == pytest.approx(computed.objective(X, y, 0.05), rel=1e-6)


def test_run_options_fixed_c_layers_preprocessing(tmp_path):
    features = write_features(tmp_path / "feat.h5")
    cfg = build(svm.Config, "svm", ["features=" + str(features), "settings=full", "fixed_c=100", "c_form=mean",
                                   "layers=1", "standardize=true", "l2_normalize=true", "val_size=60",
                                   f"out={tmp_path / 'r.json'}"])
    record = json.loads(svm.run(cfg).read_text())
    assert record["settings"]["full"]["c"] == pytest.approx(100 / 300)   # mean form -> sum form over all of train
    assert record["settings"]["full"]["val_curve"] == {}
    assert record["settings"]["full"]["test_acc"] > 0.8


def test_bad_config_fails_with_one_line(tmp_path):
    with pytest.raises(ConfigError, match="solver"):
        svm.run(svm.Config(features=str(tmp_path / "x.h5"), solver="sgd"))
    with pytest.raises(ConfigError, match="not found"):
        svm.run(svm.Config(features=str(tmp_path / "missing.h5")))


def test_layer_scale_equal_gives_layers_equal_shares(tmp_path):
    """layer_scale=equal against a hand computation: after it, each layer's mean squared norm over the
    train rows is the same (half the unscaled total for two layers), and the test rows are scaled by the
    same factors: the full-setting model scores test exactly as a fit on hand-scaled rows does."""
    g = np.random.default_rng(3)
    k, n_train, n_test = 3, 240, 90
    centres = g.normal(size=(k, 24))
    raw = {}
    path = tmp_path / "scales.h5"
    with FeatureWriter(path, [("conv1", 8), ("conv2", 16)], {"kind": "test", "model": "scales"}) as writer:
        for split, n in (("train", n_train), ("test", n_test)):
            y = np.arange(n) % k
            X = (g.normal(size=(n, 24)) + 1.5 * centres[y]).astype(np.float32)
            X[:, 8:] *= 300.0                     # the second layer 300x larger, as BN'd deep layers are
            raw[split] = (X, y)
            writer.create_split(split, n)
            writer.write(split, 0, X, y)
    cfg = build(svm.Config, "svm", [f"features={path}", "settings=full", "fixed_c=0.01", "layer_scale=equal",
                                   "val_size=60", "device=cpu", f"out={tmp_path / 'r.json'}"])
    record = json.loads(svm.run(cfg).read_text())
    X, y = raw["train"]
    sq1, sq2 = (X[:, :8] ** 2).sum(1).mean(), (X[:, 8:] ** 2).sum(1).mean()
    f1, f2 = np.sqrt((sq1 + sq2) / 2 / sq1), np.sqrt((sq1 + sq2) / 2 / sq2)
    factors = record["layer_scale"]["factors"]
    assert record["layer_scale"]["mode"] == "equal"
    assert factors["conv1"] == pytest.approx(f1, rel=1e-5) and factors["conv2"] == pytest.approx(f2, rel=1e-5)
    scale = np.concatenate([np.full(8, f1), np.full(16, f2)]).astype(np.float32)
    model = svm.fit(X * scale, y, 0.01, device="cpu")          # all train rows: the refit the setting does
    Xt, yt = raw["test"]
    assert record["settings"]["full"]["test_acc"] == pytest.approx(svm.accuracy(model, Xt * scale, yt), abs=1.5 / n_test)
    with pytest.raises(ConfigError, match="layer_scale"):
        build(svm.Config, "svm", ["layer_scale=per-dim"])


@pytest.mark.parametrize("method", ["gram", "primal"])
def test_class_preconditioner_inverts_each_class_hessian_at_full_rank(monkeypatch, method):
    """With the sketch spanning the whole space, M_k is class k's own Hessian I + 2C A^T D_k A (formed
    here by hand from the augmented design), so M_k^-1 H_k v = v for every class at once."""
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(svm.design, "DENSE_PRECONDITIONER_MAX_DIM", 8)
    X, y = blobs(60, 20, 3, seed=12)
    X += 1.5
    problem = svm.prepare(X, y, method=method, device="cpu", preconditioner="class")
    design = problem.design
    monkeypatch.setattr(svm.design, "NYSTROM_RANK", design.A.shape[1] + 1)
    assert design.preconditioning == "class"
    A = torch.cat([design.A.double(), torch.full((len(X), 1), float(design.scale), dtype=torch.float64)], 1)
    active = (torch.rand(len(X), 3, generator=torch.Generator().manual_seed(0)) > 0.4).double()
    C, v = 0.03, torch.randn(A.shape[1], 3, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    if design.scale == 0:
        v[-1] = 0                                    # Gram space: the bias is folded in, its row stays 0
    Hv = torch.stack([(torch.eye(A.shape[1], dtype=torch.float64) + 2 * C * A.T @ (active[:, k:k + 1] * A)) @ v[:, k]
                      for k in range(3)], 1)
    assert torch.allclose(design.class_preconditioner(C, active)(Hv), v, rtol=1e-4, atol=1e-4)


def test_class_scatter_updated_from_the_step_before_equals_a_fresh_one(monkeypatch):
    """A Newton step's per-class scatter B^T D_k B, updated from the step before's by the rows that joined and
    left (class 0: a few rows changed) or rebuilt (class 1: most changed), equals one built from scratch, and
    its M_k still inverts class k's Hessian at full rank."""
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(svm.design, "DENSE_PRECONDITIONER_MAX_DIM", 8)
    X, y = blobs(80, 20, 3, seed=21)
    X += 1.5
    design = svm.prepare(X, y, method="primal", device="cpu", preconditioner="class").design
    monkeypatch.setattr(svm.design, "NYSTROM_RANK", 21)
    gen = torch.Generator().manual_seed(5)
    before = (torch.rand(80, 3, generator=gen) > 0.4).double()
    after = before.clone()
    after[:4, 0] = 1 - after[:4, 0]                              # class 0: 4 rows change state
    after[:, 1] = 1 - after[:, 1]                                # class 1: every row does
    updated = design.class_scatter(after, design.class_scatter(before))
    fresh = design.class_scatter(after)
    assert torch.allclose(updated[1], fresh[1], rtol=1e-5, atol=1e-4 * float(fresh[1].abs().max()))
    A = torch.cat([design.A.double(), torch.full((80, 1), float(design.scale), dtype=torch.float64)], 1)
    C, v = 0.03, torch.randn(21, 3, dtype=torch.float64, generator=gen)
    Hv = torch.stack([(torch.eye(21, dtype=torch.float64) + 2 * C * A.T @ (after[:, k:k + 1] * A)) @ v[:, k]
                      for k in range(3)], 1)
    assert torch.allclose(design.class_preconditioner(C, after, updated)(Hv), v, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["gram", "primal"])
def test_class_preconditioner_reaches_the_same_optimum(monkeypatch, method):
    """A preconditioner changes the path, not the optimum: per-class and shared fits agree with LinearSVC."""
    monkeypatch.setattr(svm.design, "DENSE_PRECONDITIONER_MAX_DIM", 16)
    monkeypatch.setattr(svm.design, "NYSTROM_RANK", 8)
    X, y = blobs(300, 50, 3, seed=13)
    X += 2.0
    C = 0.05
    ours = svm.fit(X, y, C, method=method, device="cpu", preconditioner="class")
    ref = svm.fit_liblinear(X, y, C, tol=1e-7, max_iter=200000)
    assert ours.info["preconditioner"] == "class" and ours.info["converged"]
    assert ours.objective(X, y, C) == pytest.approx(ref.objective(X, y, C), rel=1e-4)
    with pytest.raises(ConfigError, match="choose from: shared, class, rows, auto"):
        svm.prepare(X, y, preconditioner="diagonal")
    # auto: a Gram design switches once CG gets long (a large C); a primal one is per class from the start
    switched = svm.fit(X, y, 5.0, method=method, device="cpu", preconditioner="auto")
    assert switched.info["preconditioner"] == {"gram": "shared, then class", "primal": "class"}[method]
    assert switched.info["converged"]
    shared = svm.fit(X, y, 5.0, method=method, device="cpu", preconditioner="shared")
    assert shared.info["preconditioner"] == "shared"
    assert switched.objective(X, y, 5.0) == pytest.approx(shared.objective(X, y, 5.0), rel=1e-4)


def test_sketch_test_block_is_computed_once_per_shape():
    """The Nystrom sketch's seeded orthonormal block is cached: the protocol sketches 110+ designs of one shape."""
    torch = pytest.importorskip("torch")
    first = svm.design._seeded_orthonormal(30, 4, torch.device("cpu"))
    assert svm.design._seeded_orthonormal(30, 4, torch.device("cpu")) is first
    assert torch.allclose(first.T @ first, torch.eye(4, dtype=first.dtype))


@pytest.mark.parametrize("numpy_blas,threads", [(False, 1), (True, 1), (True, 3)])
def test_blocked_primal_products_match_a_float64_reference(monkeypatch, numpy_blas, threads):
    """[A | s]^T R summed over row blocks and [A | s] V a block of rows at a time (a ragged last block
    included), through torch's BLAS and through numpy's (CPUs without bf16 units), against float64 products;
    numpy's skinny products in one row part per thread (3 here), OpenBLAS's threads restored after them."""
    torch = pytest.importorskip("torch")
    threadpoolctl = pytest.importorskip("threadpoolctl")
    monkeypatch.setattr(svm.design, "PRIMAL_ROWS", 7)
    monkeypatch.setattr(svm.design, "SKINNY_FORWARD_ROWS", 4)
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    parts = []
    monkeypatch.setattr(svm.design, "_in_row_parts", lambda n, columns, rows, real=svm.design._in_row_parts:
                        parts.append(len(out := real(n, columns, rows))) or out)
    openblas = lambda: [i["num_threads"] for i in threadpoolctl.threadpool_info() if i["internal_api"] == "openblas"]
    before = openblas()
    X, y = blobs(60, 20, 3, seed=17)
    design = svm.prepare(X, y, method="primal", device="cpu").design
    design.numpy_blas = numpy_blas
    R = torch.randn(60, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    A = torch.cat([torch.as_tensor(X, dtype=torch.float64), torch.full((60, 1), float(design.scale), dtype=torch.float64)], 1)
    assert torch.allclose(design.backward(R), A.T @ R, rtol=1e-5, atol=1e-5)
    V = torch.randn(21, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(design.forward(V), A @ V, rtol=1e-5, atol=1e-5)
    assert parts == ([threads, threads] if numpy_blas else [])
    assert openblas() == before
    wide = torch.randn(60, svm.design.SKINNY_COLUMNS + 1, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    assert torch.allclose(design.backward(wide), A.T @ wide, rtol=1e-5, atol=1e-5)
    assert parts[2:] == ([1] if numpy_blas else [])                        # wide products: OpenBLAS's threads
    bf16 = design.backward(R, design.A.to(torch.bfloat16))       # the Hessian products' copy: its rounding
    assert float((bf16 - A.T @ R).norm() / (A.T @ R).norm()) < 1e-2


def test_adopted_sketch_serves_a_design_over_more_rows(monkeypatch):
    """The refit's design (train-minus-val rows, then val) adopts the selection design's sketch: its scores
    B are [A | s] U for every row, hand-formed; at full rank its M_k is still each class's own Hessian
    over all rows; the refit reaches LinearSVC's optimum; a sketch of other dims is refused."""
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(svm.design, "DENSE_PRECONDITIONER_MAX_DIM", 8)
    X, y = blobs(120, 20, 3, seed=18)
    X += 1.5
    monkeypatch.setattr(svm.design, "NYSTROM_RANK", 21)                          # full rank: P + 1
    first = svm.prepare(X[:90], y[:90], method="primal", device="cpu").design
    assert first.sketch_state() is None                                  # nothing built yet
    first.class_preconditioner(0.03, torch.ones(90, 3, dtype=torch.float64))
    state = first.sketch_state()
    design = svm.prepare(X, y, method="primal", device="cpu", sketch=state).design
    U, lam = design._eigen
    A = torch.cat([torch.as_tensor(X, dtype=torch.float64), torch.full((120, 1), float(design.scale), dtype=torch.float64)], 1)
    assert torch.allclose(design._sketch_scores.double(), A @ U, rtol=1e-4, atol=1e-4)
    assert torch.allclose(lam, state[1] * 120 / 90)
    active = (torch.rand(120, 3, generator=torch.Generator().manual_seed(3)) > 0.4).double()
    C, v = 0.03, torch.randn(21, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    Hv = torch.stack([(torch.eye(21, dtype=torch.float64) + 2 * C * A.T @ (active[:, k:k + 1] * A)) @ v[:, k]
                      for k in range(3)], 1)
    assert torch.allclose(design.class_preconditioner(C, active)(Hv), v, rtol=1e-4, atol=1e-4)
    monkeypatch.setattr(svm.design, "NYSTROM_RANK", 6)                           # a low-rank sketch, as at scale
    monkeypatch.setattr(svm.design, "PRIMAL_RANK_FACTOR", 1)
    small = svm.prepare(X[:90], y[:90], method="primal", device="cpu").design
    small.class_preconditioner(0.03, torch.ones(90, 3, dtype=torch.float64))
    problem = svm.prepare(X, y, method="primal", device="cpu", sketch=small.sketch_state())
    V, info = svm.solver._newton(problem, 0.05, None, svm.solver.TOL, svm.solver.MAX_ITER)
    ours, ref = problem.to_model(V, info), svm.fit_liblinear(X, y, 0.05, tol=1e-7, max_iter=200000)
    assert info["converged"] and ours.objective(X, y, 0.05) == pytest.approx(ref.objective(X, y, 0.05), rel=1e-4)
    with pytest.raises(ValueError, match="does not fit"):
        svm.prepare(X[:, :10], y, method="primal", device="cpu", sketch=state)


@pytest.mark.parametrize("method", ["gram", "primal"])
def test_sampled_preconditioner_inverts_each_class_hessian_when_the_sample_is_every_row(monkeypatch, method):
    """With ROW_SAMPLE >= N the sample is every row (c = 2C), so M_k is class k's own Hessian
    I + 2C A^T D_k A, formed here by hand from the augmented design: M_k^-1 H_k v = v for every class."""
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(svm.design, "ROW_SAMPLE", 1000)
    X, y = blobs(60, 80, 3, seed=15)
    X += 1.5
    design = svm.prepare(X, y, method=method, device="cpu", preconditioner="rows").design
    assert design.preconditioning == "rows"
    A = torch.cat([design.A.double(), torch.full((len(X), 1), float(design.scale), dtype=torch.float64)], 1)
    active = (torch.rand(len(X), 3, generator=torch.Generator().manual_seed(1)) > 0.4).double()
    C, v = 0.03, torch.randn(A.shape[1], 3, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    Hv = torch.stack([(torch.eye(A.shape[1], dtype=torch.float64) + 2 * C * A.T @ (active[:, k:k + 1] * A)) @ v[:, k]
                      for k in range(3)], 1)
    # the products with the sample run in float32 and H_k v is ~400x v here: 1e-3 is its rounding, not a bias
    assert torch.allclose(design.sampled_preconditioner(C, active)(Hv), v, rtol=1e-3, atol=1e-3)


def test_sampled_preconditioner_on_a_subsample_reaches_linearsvc_and_the_shared_optimum(monkeypatch):
    """A sample of 64 of 400 rows: M_k is only an estimate of H_k, so CG takes more than one step, and the
    fit still reaches LinearSVC's optimum (the preconditioner changes the path, not the point)."""
    monkeypatch.setattr(svm.design, "ROW_SAMPLE", 64)
    monkeypatch.setattr(svm.design, "DENSE_PRECONDITIONER_MAX_DIM", 16)
    X, y = blobs(400, 60, 4, seed=16)
    X += 2.0
    for C in (0.05, 2.0):
        ours = svm.fit(X, y, C, device="cpu", preconditioner="rows")
        ref = svm.fit_liblinear(X, y, C, tol=1e-7, max_iter=200000)
        assert ours.info["preconditioner"] == "rows" and ours.info["converged"]
        assert ours.info["cg_iterations"] > ours.info["iterations"]
        assert ours.objective(X, y, C) == pytest.approx(ref.objective(X, y, C), rel=1e-4)


def test_jittered_cholesky_raises_the_shift_until_the_matrix_is_positive_definite():
    torch = pytest.importorskip("torch")
    G = torch.tensor([[1.0, 2.0], [2.0, 1.0]], dtype=torch.float64)        # eigenvalues 3 and -1
    L = svm.design._jittered_cholesky(G, 0.5)                                      # 0.5 fails, 5.0 works
    assert torch.allclose(L @ L.T, G + 5.0 * torch.eye(2, dtype=torch.float64))
    assert L.is_contiguous()


def test_gram_space_model_is_combined_in_float64():
    """w = X^T L^-T u sums rows that share a large mean with weights of both signs: the model must match a
    float64 reference (numpy), where a float32 product of the same beta loses digits to cancellation."""
    torch = pytest.importorskip("torch")
    g = np.random.default_rng(14)
    X = (1000.0 + g.normal(size=(300, 400))).astype(np.float32)        # a common mean 1000x the signal
    y = g.integers(0, 3, 300)
    problem = svm.prepare(X, y, method="gram", device="cpu")
    V = torch.from_numpy(g.normal(size=(301, 3)))
    V[-1] = 0
    beta = np.linalg.solve(problem.L.numpy().T, V[:-1].numpy())
    reference = beta.T @ X.astype(np.float64)                           # K x D
    W = problem.to_model(V).W
    assert np.allclose(W, reference, rtol=1e-5, atol=1e-6 * np.abs(reference).max())
    float32 = (torch.from_numpy(beta).T.float() @ torch.from_numpy(X)).numpy()
    assert not np.allclose(float32, reference, rtol=1e-5, atol=1e-6 * np.abs(reference).max())


def test_the_full_setting_benchmark_runs_on_a_small_file(tmp_path):
    """benchmarks/svm.py --full-setting (the bracketed search against the exhaustive one) on a small feature
    file: the benchmark behind issue 40's full-setting figure keeps up with the search's API."""
    import subprocess
    import sys
    from conftest import REPO
    features = write_features(tmp_path / "feat.h5", n_train=300, n_test=100)
    out = tmp_path / "svm.json"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "svm.py"), "--full-setting", "--features",
                           str(features), "--presearch", "120", "--val-size", "60", "--c-scale", "norm",
                           "--results", str(out), "--device", "cpu"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "REPLEARN_CPU_ISA": ""})
    assert done.returncode == 0, done.stderr[-2000:]
    row = json.loads(out.read_text())["full_setting"]
    assert row["n"] == 300 and row["n_rest"] == 240 and row["presearch_rows"] == 120
    assert row["bracketed"]["presearch"]["rows"] == 120 and row["bracketed"]["solver"]["fits"] >= 3
    assert isinstance(row["same_c"], bool) and 0 < row["exhaustive"]["test_acc"] <= 1


def test_secant_started_path_reaches_the_plain_paths_models():
    """The full setting's selection fitter starts a fit above the path's last two from their secant in
    log C: a start, never a different optimum (the solver is globally convergent on this convex problem)."""
    from replearn.probe.svm.search import _Fitter
    X, y = blobs(300, 40, 4, seed=5, spread=1.5)
    cfg = build(svm.Config, "svm", {"features": "unused.h5"})
    cs = [1e-3, 3e-3, 3e-2, 3e-1]
    fitted = {}
    for secant in (False, True):
        fitter = _Fitter(X, y, cfg, "cpu", secant=secant)
        fitted[secant] = fitter.path(cs[:2]) + fitter.path(cs[2:3]) + fitter.path(cs[3:])
    for c, plain, started in zip(cs, fitted[False], fitted[True]):
        assert started.info["converged"] and plain.info["converged"]
        assert abs(started.objective(X, y, c) - plain.objective(X, y, c)) <= 1e-6 * plain.objective(X, y, c), c
    assert fitted[True][0].info["iterations"] == fitted[False][0].info["iterations"]   # nothing to extrapolate yet


def test_accuracies_of_several_models_in_one_product_match_each_models_own():
    X, y = blobs(300, 20, 4, seed=21)
    models = [svm.fit(X, y, C, device="cpu") for C in (1e-3, 0.1)] + [svm.fit(X, y % 2, 0.1, device="cpu")]
    together = svm.design.accuracies(models, X, y)                  # a binary model among them: one score column
    assert together == [svm.accuracy(m, X, y) for m in models]
    assert 0.5 < together[1] <= 1.0 and svm.design.accuracies(models[2:], X, y % 2)[0] > 0.5


def test_a_benchmark_rerun_keeps_the_record_it_replaces():
    """benchmarks/svm.py: a part's old record is kept under its commit (and machine, where it ran on another),
    _2 for a second rerun of one commit, and never for this run's own earlier save."""
    from conftest import load_benchmark
    bench = load_benchmark("svm")
    here, epyc = bench.hardware(), "CPU AMD EPYC (2 cores, AVX2)"
    old = {"seconds": 1.0, "measured": {"git_commit": "abcdef012345", "hardware": here}}
    new = {"seconds": 2.0, "measured": {"git_commit": "0123456789ab", "hardware": here, "date": "today"}}
    record = {"protocol_400": old}
    assert bench.keep_replaced(record, "protocol_400", new) == "protocol_400_abcdef0"
    record["protocol_400"] = new
    assert bench.keep_replaced(record, "protocol_400", {**new, "seconds": 3.0}) is None      # this run's second save
    record["protocol_400"] = {**old, "seconds": 5.0}                                          # another run of abcdef0
    assert bench.keep_replaced(record, "protocol_400", new) == "protocol_400_abcdef0_2"
    assert record["protocol_400_abcdef0"] == old and record["protocol_400_abcdef0_2"]["seconds"] == 5.0
    record["protocol_400"] = {"seconds": 6.0, "provenance": {"git_commit": "fedcba987654", "hardware": epyc}}
    assert bench.keep_replaced(record, "protocol_400", new) == "protocol_400_amd-avx2_fedcba9"
    assert bench.machine_tag("CPU Intel(R) Xeon(R) Processor (2 cores, AMX-BF16 limited to AVX2)") == \
        "intel-amx-bf16-limited-to-avx2"
    # the summary names each current part's own machine, not this run's
    kept = {"protocol_400": new, "full_setting": {"provenance": {"hardware": epyc}}, "protocol_400_abcdef0": old}
    assert bench.part_machines(kept) == {"protocol_400": here, "full_setting": epyc}


def test_row_parts_work_in_a_forked_child(monkeypatch):
    """A process forked after the row-part threads started (the image cache's decoders fork) computes its
    products on a pool of its own (the parent's threads do not exist in the child)."""
    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("no fork on this platform")
    monkeypatch.setattr(svm.design, "SKINNY_FORWARD_ROWS", 4)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    a = np.arange(60 * 5, dtype=np.float32).reshape(60, 5)
    w = np.ones((5, 2), dtype=np.float32)
    assert np.array_equal(svm.design._times(a, w), a @ w)                  # the parent's workers start

    def child():
        raise SystemExit(0 if np.array_equal(svm.design._times(a, w), a @ w) else 1)
    process = multiprocessing.get_context("fork").Process(target=child)
    process.start()
    process.join(60)
    if process.exitcode is None:
        process.kill()
    assert process.exitcode == 0
