"""The svm stage's protocol machinery: bracketed C search, solver records, refit C rule, feature file
checks, progress file and resume, reuse by key. Small synthetic feature files written with h5py."""
from __future__ import annotations

import dataclasses
import json
import re

import h5py
import numpy as np
import pytest
import torch

from replearn.core import stage as core_stage
from replearn.probe import svm
from replearn.cli import main as cli
from replearn.core.config import ConfigError, build

TIMING = ("seconds", "selection_seconds", "final_seconds")


def blobs(n: int, k: int = 3, d: int = 12, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """N x D float32, N labels: one-hot class centres under a large common offset and a strong shared
    direction, so that small C (the bias is regularised too) is clearly worse than moderate C."""
    g = np.random.default_rng(seed)
    y = np.arange(n) % k
    centres = np.zeros((k, d))
    centres[np.arange(k), np.arange(k)] = 1.0
    shared = 3.0 * g.normal(size=(n, 1)) * np.ones(d) / np.sqrt(d)
    return (centres[y] + 0.3 * g.normal(size=(n, d)) + shared + 5.0).astype(np.float32), y


def write_h5(path, train=None, test=None, key: str | None = None):
    """The store.py feature file layout, written with h5py directly (so that it can be inconsistent)."""
    train = blobs(300, seed=1) if train is None else train
    test = blobs(150, seed=2) if test is None else test
    with h5py.File(path, "w") as h5:
        for split, (X, y) in (("train", train), ("test", test)):
            group = h5.create_group(split)
            group.create_dataset("features", data=X)
            group.create_dataset("labels", data=y)
        h5.attrs["layer_names"] = json.dumps(["all"])
        h5.attrs["layer_offsets"] = json.dumps([0, int(np.shape(train[0])[1])])
        h5.attrs["complete"] = True
        if key is not None:
            h5.attrs["key"] = json.dumps(key)
    return path


def config(features, out, **values):
    base = {"features": str(features), "out": str(out), "per_class": 20, "val_size": 60, "select_draws": 2,
            "final_draws": 5, "c_grid": (1e-6, 1e-5), "device": "cpu", "gram_cache": "off"}
    return build(svm.Config, "svm", {**base, **values})


def settings_without_timing(record: dict) -> dict:
    """The settings less what measures time: their seconds and the solver's fit_seconds."""
    def strip(res):
        solver = {k: v for k, v in res["solver"].items() if k != "fit_seconds"}
        return {**{k: v for k, v in res.items() if k not in TIMING}, "solver": solver}
    return {name: strip(res) for name, res in record["settings"].items()}


# ----------------------------------------------------------------------------- bracketing
def peaked(at: float):
    """A validation curve with its maximum at C = `at` (log scale), and the calls made to it."""
    calls = []

    def score(cs):
        calls.append(list(cs))
        return {c: -abs(np.log10(c) - np.log10(at)) for c in cs}
    return score, calls


def test_bracket_extends_upward_until_the_best_is_interior():
    score, calls = peaked(100.0)
    curve, added = svm.search.bracket(score, [1e-1, 1e-2, 1.0], cap=4)
    assert sorted(curve) == [1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0]
    assert added == {"up": 3, "down": 0} and svm.search._pick(curve) == 100.0
    assert calls[0] == [1e-2, 1e-1, 1.0] and calls[1:] == [[10.0], [100.0], [1000.0]]   # increasing, one per decade
    assert not svm.search._search_fields(curve, added, 1.0)["c_at_edge"]


def test_bracket_extends_downward_and_stops_at_the_cap():
    score, _ = peaked(1e-5)
    curve, added = svm.search.bracket(score, [1e-2, 1e-1], cap=4)
    assert min(curve) == pytest.approx(1e-6) and added == {"up": 0, "down": 4}
    assert svm.search._pick(curve) == pytest.approx(1e-5)
    score, _ = peaked(1e6)                          # beyond the cap: the edge is recorded
    curve, added = svm.search.bracket(score, [1e-2, 1e-1], cap=2)
    assert max(curve) == pytest.approx(10.0) and added == {"up": 2, "down": 0}
    assert svm.search._search_fields(curve, added, 1.0)["c_at_edge"]
    curve, added = svm.search.bracket(score, [1e-2, 1e-1], cap=0)     # c_extend=0: the grid only
    assert sorted(curve) == [1e-2, 1e-1] and svm.search._search_fields(curve, added, 1.0)["c_at_edge"]


def test_bracket_walks_candidates_before_adding_decades():
    score, calls = peaked(2e-3)
    candidates = [1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2]
    curve, added = svm.search.bracket(score, [2e-4, 5e-4, 1e-3], cap=4, candidates=candidates)
    assert calls[1:] == [[2e-3], [5e-3]] and added == {"up": 0, "down": 0}
    assert svm.search._pick(curve) == 2e-3


def test_ties_do_not_stop_the_search():
    """A grid on the chance-level plateau of tiny C moves up (the smallest C wins ties, but the score
    has not fallen anywhere); a plateau of the best score is followed to the cap on both sides."""
    def chance_then_peak(cs):
        return {c: max(1 / 3, 1 - abs(np.log10(c) + 2) / 3) for c in cs}      # chance below 1e-5, best at 1e-2
    curve, added = svm.search.bracket(chance_then_peak, [1e-7, 1e-6], cap=6)
    assert svm.search._pick(curve) == pytest.approx(1e-2) and added == {"up": 5, "down": 0}
    curve, added = svm.search.bracket(lambda cs: {c: 1.0 for c in cs}, [1.0, 10.0], cap=3)
    assert added == {"up": 3, "down": 3} and svm.search._pick(curve) == pytest.approx(1e-3)
    assert svm.search._search_fields(curve, added, 1.0)["c_at_edge"]


def test_run_brackets_both_settings_from_a_low_grid(tmp_path):
    features = write_h5(tmp_path / "f.h5")
    record = json.loads(svm.run(config(features, tmp_path / "r.json", c_extend=6)).read_text())
    for name in ("full", "400"):
        res = record["settings"][name]
        assert res["c_extended"]["up"] >= 2 and res["c_extended"]["down"] == 0
        assert not res["c_at_edge"] and res["grid"][0] == 1e-6 and len(res["grid"]) >= 4
        assert sorted(map(float, res["val_curve"])) == res["grid"]
        assert res["grid"][0] < res["c_select" if name == "full" else "c"] < res["grid"][-1]
    few = record["settings"]["400"]
    assert all(len(v) == 2 for v in few["val_draws"].values())          # every C on the same 2 draws
    assert record["settings"]["full"]["test_acc"] > 0.9


def bar_states(err: str) -> dict[str, list[tuple[int, int]]]:
    """Each tqdm bar's (done, total) states by its name, read from the carriage-return-separated stderr."""
    bars: dict[str, list[tuple[int, int]]] = {}
    for m in re.finditer(r"(svm [^:\r\n]+: [^:\r\n]+?):\s+\d+%\|[^|]*\| (\d+)/(\d+)", err):
        bars.setdefault(m.group(1), []).append((int(m.group(2)), int(m.group(3))))
    return bars


def test_every_progress_bar_keeps_its_total_and_an_extension_gets_its_own(tmp_path, capsys):
    features = write_h5(tmp_path / "f.h5")
    record = json.loads(svm.run(config(features, tmp_path / "r.json", c_extend=6)).read_text())
    bars = bar_states(capsys.readouterr().err)
    for name, states in bars.items():
        assert len({total for _, total in states}) == 1, (name, states)       # a total never moves
        assert states[-1][0] == states[-1][1], (name, states)                  # and every bar ends full
    assert bars["svm full: C search"][-1][1] == 2 and bars["svm full: refit at the chosen C"][-1][1] == 1
    assert bars["svm 20pc: C selection (2 draws)"][-1][1] == 2 * 2 and bars["svm 20pc: final draws"][-1][1] == 5
    ups = record["settings"]["full"]["c_extended"]["up"]
    assert ups >= 2 and sum(s[-1][1] for n, s in bars.items() if n.startswith("svm full: C search, extended up to C=")) == ups


def test_c_scale_norm_multiplies_the_grid(tmp_path):
    X, y = blobs(300, seed=1)
    features = write_h5(tmp_path / "f.h5", train=(X, y))
    cfg = config(features, tmp_path / "r.json", settings=("full",), c_grid=(1e-3, 1e-2, 1e-1), c_scale="norm")
    record = json.loads(svm.run(cfg).read_text())
    factor = float(f"{svm.protocol.NORM_REFERENCE / np.mean(np.sum(X.astype(np.float64) ** 2, 1)):.3g}")
    full = record["settings"]["full"]
    assert full["c_scale_factor"] == record["c_scale"]["factor"] == factor != 1.0
    for c in (1e-3, 1e-2, 1e-1):
        assert svm.search._round_c(c * factor) in full["grid"]
    assert build(svm.Config, "svm", {"preset": "smoke"}).c_scale == "norm"
    assert build(svm.Config, "svm", {"preset": "paper"}).c_grid == svm.protocol.DEFAULT_C_GRID
    assert build(svm.Config, "svm", {"preset": "paper"}).c_scale == "none"


# ----------------------------------------------------------------------------- refit C rule
@pytest.mark.parametrize("form", ["sum", "mean"])
def test_refit_c_rule(tmp_path, monkeypatch, form):
    """The full setting's refit on all n = 300 rows after choosing C on n_rest = 240."""
    fitted = []
    path = svm.search._Fitter.path
    monkeypatch.setattr(svm.search._Fitter, "path", lambda self, cs, warm=None: fitted.append((len(self.X), list(cs)))
                        or path(self, cs, warm))
    grid = (1e-4, 1e-3, 1e-2) if form == "sum" else (0.024, 0.24, 2.4)
    cfg = config(write_h5(tmp_path / "f.h5"), tmp_path / "r.json", settings=("full",), c_form=form, c_grid=grid)
    full = json.loads(svm.run(cfg).read_text())["settings"]["full"]
    assert fitted[-1] == (300, [full["c"]])                         # the refit ran at the recorded C
    if form == "sum":
        assert full["c"] == full["c_select"] and full["refit_c_rule"] == "sum form kept"
        assert full["c_select"] in grid or full["c_extended"] != {"up": 0, "down": 0}
    else:
        assert full["c"] == pytest.approx(full["c_select"] * 240 / 300)
        assert full["refit_c_rule"] == "mean form kept (sum C rescaled by n_rest/n)"
        assert any(full["c_select"] * 240 == pytest.approx(c * 10.0 ** e) for c in grid for e in range(-4, 5))


@pytest.mark.parametrize("refine", [True, False])
def test_presearch_fits_the_subsample_in_mean_form_and_refines_only_when_asked(tmp_path, monkeypatch, refine):
    """c_presearch=120 of n_rest = 240: every subsample fit runs at C * 240/120 (the same mean-form C), its
    curve is keyed by the 240-row C; c_refine=false fits nothing else on 240 rows, and the refit on all
    300 starts from the subsample's model at the chosen C."""
    fitted = []
    path = svm.search._Fitter.path
    monkeypatch.setattr(svm.search._Fitter, "path", lambda self, cs, warm=None: fitted.append(
        (len(self.X), list(cs), warm is not None)) or path(self, cs, warm))
    cfg = config(write_h5(tmp_path / "f.h5"), tmp_path / "r.json", settings=("full",), c_presearch=120,
                 c_refine=refine, c_grid=(1e-4, 1e-3, 1e-2))
    full = json.loads(svm.run(cfg).read_text())["settings"]["full"]
    pre = full["presearch"]
    assert pre["rows"] == 120 and pre["refined"] == refine
    sub_cs = [c for n, cs, _ in fitted if n == 120 for c in cs]
    assert sorted(sub_cs) == pytest.approx([c * 2 for c in pre["grid"]])
    assert full["c"] == full["c_select"]                                 # sum form kept
    assert fitted[-1] == (300, [full["c"]], True)                        # the warm-started refit
    rest = [cs for n, cs, _ in fitted if n == 240]
    if refine:
        at = pre["grid"].index(pre["c"])                                 # the all-row bracket starts at its optimum
        assert rest and rest[0] == pre["grid"][at:at + 2]                # and the C above it,
        assert [w for n, _, w in fitted if n == 240][0]                  # from the subsample's model
    else:
        assert rest == [] and full["c_select"] == pre["c"] and full["grid"] == pre["grid"]
        assert full["val_curve"] == pre["val_curve"]
    assert full["test_acc"] > 0.9 and not full["c_at_edge"]


def test_refit_adopts_the_selection_designs_sketch(tmp_path, monkeypatch):
    """A sketched primal design (d = 12 > the dense limit, n > d): the refit on all 300 rows is prepared
    with the 240-row selection design's sketch, and still reaches the same point as a cold refit."""
    monkeypatch.setattr(svm.design, "DENSE_PRECONDITIONER_MAX_DIM", 4)
    monkeypatch.setattr(svm.design, "NYSTROM_RANK", 6)
    monkeypatch.setattr(svm.design, "PRIMAL_RANK_FACTOR", 1)       # a rank-6 sketch of 13 columns
    prepared, prepare = [], svm.prepare
    monkeypatch.setattr(svm.search, "prepare", lambda X, y, *a, **kw: prepared.append((len(X), kw.get("sketch")))
                        or prepare(X, y, *a, **kw))
    cfg = config(write_h5(tmp_path / "f.h5"), tmp_path / "r.json", settings=("full",), c_grid=(1e-4, 1e-3, 1e-2))
    full = json.loads(svm.run(cfg).read_text())["settings"]["full"]
    (n_select, none), (n_refit, sketch) = prepared[0], prepared[-1]
    assert (n_select, n_refit, none) == (240, 300, None)
    assert sketch is not None and sketch[3] == 240 and sketch[0].shape == (13, 6)
    X, y = blobs(300, seed=1)
    order = np.concatenate(svm.protocol.split_validation(y, 60, cfg.seed))
    cold = svm.fit(X[order], y[order], full["c"], device="cpu")
    assert full["test_acc"] == pytest.approx(svm.accuracy(cold, *blobs(150, seed=2)), abs=1 / 150)


# ----------------------------------------------------------------------------- solver record
def test_fit_records_convergence_iterations_and_jitter(monkeypatch):
    X, y = blobs(200, seed=3)
    model = svm.fit(X, y, 0.01, device="cpu")
    assert model.info["converged"] and model.info["stop"] == "gradient"
    assert model.info["iterations"] >= 1 and model.info["rel_grad"] <= svm.solver.TOL and model.info["jitter"] == 0.0
    capped = svm.fit(X, y, 10.0, max_iter=1, device="cpu")
    assert capped.info["stop"] == "max_iter" and not capped.info["converged"] and capped.info["iterations"] == 1
    assert capped.info["rel_grad"] > svm.solver.TOL
    assert all(m.info["converged"] for m in svm.fit_path(X, y, [1e-3, 1e-1], device="cpu"))
    assert svm.fit_liblinear(X, y, 0.01).info is None


def test_gram_jitter_is_recorded(monkeypatch):
    _, rel = svm.design._cholesky(torch.ones(3, 3, dtype=torch.float64))      # rank one: needs a jitter
    assert rel > 0
    cholesky = svm.design._cholesky
    monkeypatch.setattr(svm.design, "_cholesky", lambda G: (cholesky(G)[0], 1e-7))
    X, y = blobs(30, d=60, seed=4)
    assert svm.fit(X, y, 0.01, method="gram", device="cpu").info["jitter"] == 1e-7


def test_no_progress_counts_as_converged_only_under_liblinears_rule():
    X, y = blobs(90, seed=5)                       # 3 balanced classes: min(#pos, #neg) / N = 1/3
    problem = svm.prepare(X, y, device="cpu")
    rule = svm.solver.LIBLINEAR_TOL / 3
    assert svm.solver._solver_record(problem, torch.tensor([0.5 * rule] * 3), "no-progress", 7)["converged"]
    assert not svm.solver._solver_record(problem, torch.tensor([0.5 * rule, 2 * rule, 0.0]), "no-progress", 7)["converged"]
    assert not svm.solver._solver_record(problem, torch.tensor([1e-9] * 3), "max_iter", 100)["converged"]


def test_a_stalled_stop_needs_liblinears_rule_and_a_small_last_step(monkeypatch):
    X, y = blobs(600, d=40, seed=6)                # 3 balanced classes, N > D: primal design
    rule = svm.solver.LIBLINEAR_TOL * 200 / 600
    monkeypatch.setattr(svm.solver, "STALL_DECREASE", 1e300)  # any step counts as small: only the gradient rule holds it
    loose = svm.fit(X, y, 10.0, tol=1e-14, device="cpu")
    assert loose.info["stop"] == "stalled" and loose.info["converged"]
    assert loose.info["rel_grad"] <= rule and loose.info["iterations"] >= 1
    monkeypatch.setattr(svm.solver, "STALL_DECREASE", 0.0)    # never small: the fit goes on to its other rules
    tight = svm.fit(X, y, 10.0, tol=1e-14, device="cpu")
    assert tight.info["stop"] != "stalled" and tight.info["iterations"] > loose.info["iterations"]
    assert tight.info["rel_grad"] < loose.info["rel_grad"]


def test_results_summarise_every_fit(tmp_path):
    record = json.loads(svm.run(config(write_h5(tmp_path / "f.h5"), tmp_path / "r.json")).read_text())
    full, few = record["settings"]["full"], record["settings"]["400"]
    assert full["solver"]["fits"] == len(full["grid"]) + 1                        # + the refit
    assert few["solver"]["fits"] == 2 * len(few["grid"]) + 5                      # select_draws x C + final draws
    for res in (full, few):
        solver = res["solver"]
        assert solver["converged_fits"] + len(solver["not_converged"]) == solver["recorded"] == solver["fits"]
        assert solver["max_iterations"] >= 1 and solver["max_jitter"] == 0.0 and solver["max_rel_grad"] < 1e-4
        assert set(solver["fit_seconds"]) == ({"select", "refit"} if res is full else {"select", "final"})
        assert all(t > 0 for t in solver["fit_seconds"].values()) and solver["cg_iterations"] >= 0
    summary = svm.search.solver_summary([[1.0, "refit", {"converged": False, "stop": "max_iter", "iterations": 100,
                                                  "rel_grad": 0.1, "jitter": 0.0}], [2.0, "final 0", None]])
    assert summary["not_converged"] == [[1.0, "refit", 0.1, "max_iter"]] and summary["recorded"] == 1


# ----------------------------------------------------------------------------- feature file checks
def check_fails(tmp_path, match: str, **arrays):
    features = write_h5(tmp_path / "bad.h5", **arrays)
    out = tmp_path / "bad.json"
    with pytest.raises(ConfigError, match=match) as err:
        svm.run(config(features, out))
    assert str(features) in str(err.value) and "\n" not in str(err.value)
    assert not out.exists() and not svm.stage.progress_path(out).exists()


def test_checks_rows_against_labels(tmp_path):
    X, y = blobs(300, seed=1)
    check_fails(tmp_path, "train has 300 feature rows but 299 labels", train=(X, y[:-1]))


def test_checks_widths(tmp_path):
    X, y = blobs(150, d=13, seed=2)
    check_fails(tmp_path, "12 wide but test features 13", test=(X, y))


def test_checks_labels_are_non_negative_integers(tmp_path):
    X, y = blobs(150, seed=2)
    check_fails(tmp_path, "test labels include -1", test=(X, np.where(np.arange(150) < 5, -1, y)))
    check_fails(tmp_path, "train labels are float64, not integers", train=(blobs(300, seed=1)[0], np.zeros(300)))


def test_checks_finite_features(tmp_path, monkeypatch):
    fitted = []
    monkeypatch.setattr(svm.search._Fitter, "path", lambda *a, **k: fitted.append(1))
    X, y = blobs(300, seed=1)
    X[17, 3] = np.nan
    check_fails(tmp_path, "train features hold NaN or inf", train=(X, y))
    X, y = blobs(150, seed=2)
    X[149, 0] = np.inf
    check_fails(tmp_path, "test features hold NaN or inf.*first row 149", test=(X, y))
    assert not fitted                                                             # before any fit


def test_checks_every_test_class_is_in_train(tmp_path):
    X, y = blobs(150, k=4, seed=2)
    check_fails(tmp_path, r"test classes \[3\] never appear in train", test=(X, y))


def test_cli_prints_a_check_failure_as_one_line(tmp_path, capsys):
    X, y = blobs(300, seed=1)
    features = write_h5(tmp_path / "bad.h5", train=(X, y[:-1]))
    assert cli(["svm", f"features={features}", f"out={tmp_path / 'r.json'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "299 labels" in err


# ----------------------------------------------------------------------------- progress and resume
class Killed(BaseException):
    """Stands in for kill -9: nothing below run() catches it."""


def count_calls(monkeypatch, owner, name):
    calls = []
    original = getattr(owner, name)

    def counted(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)
    monkeypatch.setattr(owner, name, counted)
    return calls


def test_resume_after_a_kill_in_the_final_draws(tmp_path, monkeypatch):
    features = write_h5(tmp_path / "f.h5")
    whole = json.loads(svm.run(config(features, tmp_path / "whole.json")).read_text())

    out = tmp_path / "killed.json"
    scored = []
    score = svm.protocol.SplitScorer.score

    def dies_after_three_draws(self, models):     # call 1: the full setting's refit; then one per final draw
        if len(scored) == 1 + 3:
            raise Killed
        scored.append(1)
        return score(self, models)
    monkeypatch.setattr(svm.protocol.SplitScorer, "score", dies_after_three_draws)
    with pytest.raises(Killed):
        svm.run(config(features, out))
    monkeypatch.setattr(svm.protocol.SplitScorer, "score", score)
    progress = json.loads(svm.stage.progress_path(out).read_text())
    assert not out.exists() and "full" in progress["settings"] and len(progress["partial"]["400"]["draws"]) == 3

    full_runs = count_calls(monkeypatch, svm.stage, "run_full")
    fits = count_calls(monkeypatch, svm.search._Fitter, "path")
    resumed = json.loads(svm.run(config(features, out)).read_text())
    assert not full_runs and not svm.stage.progress_path(out).exists()
    assert len(fits) == 1 + 2                      # draw 0 again (the warm start), then draws 3 and 4
    assert resumed["resumed_from"]["settings_done"] == ["full"] and resumed["resumed_from"]["final_draws_done"] == 3
    assert whole["resumed_from"] is None
    assert settings_without_timing(resumed) == settings_without_timing(whole)


def test_resume_inside_an_upward_extension_round(tmp_path, monkeypatch):
    """Killed after selection draw 0 of the first extension: draw 1's warm start is refitted by the
    same steps (grid path, then the extension chain), so the numbers equal an uninterrupted run's."""
    features = write_h5(tmp_path / "f.h5")
    values = {"settings": ("400",), "select_draws": 3}
    whole = json.loads(svm.run(config(features, tmp_path / "whole.json", **values)).read_text())
    assert whole["settings"]["400"]["c_extended"]["up"] >= 2

    out = tmp_path / "killed.json"
    select_fit = svm.search.Setting400.select_fit

    def dies_in_the_second_extension(self, draw, cs):
        if cs[0] > self.grid[-1] * 50 and draw == 1:
            raise Killed
        return select_fit(self, draw, cs)
    monkeypatch.setattr(svm.search.Setting400, "select_fit", dies_in_the_second_extension)
    with pytest.raises(Killed):
        svm.run(config(features, out, **values))
    monkeypatch.setattr(svm.search.Setting400, "select_fit", select_fit)
    resumed = json.loads(svm.run(config(features, out, **values)).read_text())
    assert resumed["resumed_from"]["select_scores"] > 0
    assert settings_without_timing(resumed) == settings_without_timing(whole)


def test_each_selection_draw_is_prepared_once(tmp_path, monkeypatch):
    """Wider than the draws are long (a Gram-space fit): every bracketing round refits each selection
    draw from the problem its first round prepared (Gram matrix, factor, sketch), with the numbers of a
    run preparing it anew."""
    features = write_h5(tmp_path / "f.h5", train=blobs(300, d=80, seed=1), test=blobs(150, d=80, seed=2))
    values = {"settings": ("400",), "select_draws": 3}
    products = count_calls(monkeypatch, svm.search, "_gram")
    prepared = count_calls(monkeypatch, svm.search, "prepare")
    cached = json.loads(svm.run(config(features, tmp_path / "cached.json", **values)).read_text())
    assert cached["settings"]["400"]["c_extended"]["up"] >= 1      # more than one round per draw
    assert len(products) == 3
    selection_prepares = len(prepared) - len(cached["settings"]["400"]["draws"])
    assert selection_prepares == 3

    fitter = svm.search.Setting400.fitter

    # short of memory, only the Gram matrices are kept: each round factors them again
    monkeypatch.setattr(svm.search, "_available_memory", lambda: 1)
    del products[:], prepared[:]
    grams_only = json.loads(svm.run(config(features, tmp_path / "grams.json", **values)).read_text())
    assert len(products) == 3 and len(prepared) > 3 + len(grams_only["settings"]["400"]["draws"])
    assert settings_without_timing(grams_only) == settings_without_timing(cached)

    def forgetting(self, purpose, draw, *args):
        self.select_kept.clear()
        return fitter(self, purpose, draw, *args)
    monkeypatch.setattr(svm.search.Setting400, "fitter", forgetting)
    anew = json.loads(svm.run(config(features, tmp_path / "anew.json", **values)).read_text())
    assert len(products) > 3 + 3
    assert settings_without_timing(anew) == settings_without_timing(cached)


def test_progress_of_another_config_is_ignored_and_replaced(tmp_path, monkeypatch):
    features = write_h5(tmp_path / "f.h5")
    out = tmp_path / "r.json"
    svm.stage.atomic_write_json(svm.stage.progress_path(out), {"identity": {"config": {"seed": 99}, "features": "x"},
                                                   "settings": {"full": {"c": 1.0}}, "partial": {}})
    finish = svm.stage.Progress.finish

    def dies_after_saving(self, name, result):
        finish(self, name, result)
        raise Killed
    monkeypatch.setattr(svm.stage.Progress, "finish", dies_after_saving)
    with pytest.raises(Killed):
        svm.run(config(features, out, settings=("full",)))
    progress = json.loads(svm.stage.progress_path(out).read_text())
    assert progress["identity"]["config"]["seed"] == 0 and progress["settings"]["full"]["c"] != 1.0


# ----------------------------------------------------------------------------- reuse by key
def test_reuse_by_key(tmp_path, monkeypatch, capsys):
    features = write_h5(tmp_path / "f.h5", key="0123456789")
    out = tmp_path / "r.json"
    cfg = config(features, out, settings=("full",))
    first = json.loads(svm.run(cfg).read_text())
    expected = svm.stage.artifact_key("svm", svm.stage.keyed(svm.stage.to_dict(cfg), svm.stage.ADDED_KEYS),
                                ignore=("out", "device", "gram_cache", "preset"), features="0123456789")
    assert first["key"] == expected and first["features"]["identity"] == "0123456789" and first["complete"]

    fits = count_calls(monkeypatch, svm.search._Fitter, "path")
    capsys.readouterr()
    monkeypatch.setattr(core_stage, "_BUILT", set())                     # as a later process finds it
    assert svm.run(dataclasses.replace(cfg, device="auto", gram_cache="on")) == out   # ignored by the key
    assert not fits and "up to date" in capsys.readouterr().err
    assert json.loads(out.read_text()) == first

    svm.run(config(features, out, settings=("full",), seed=1))            # another config: recomputed
    assert fits and json.loads(out.read_text())["key"] != first["key"]


def test_key_without_a_features_key_uses_path_size_mtime(tmp_path):
    features = write_h5(tmp_path / "f.h5")
    with svm.stage.FeatureFile(features) as ff:
        identity = svm.stage.features_identity(ff)
    stat = features.stat()
    assert identity == f"{features.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"


def test_a_key_added_with_its_old_value_re_keys_nothing():
    """c_refine and select_stop came after results were made: at the value older results had ('tight' for
    select_stop, whose default is now 'liblinear'), the key is the one computed without them."""
    cfg = build(svm.Config, "svm", {"select_stop": "tight"})
    before = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("c_refine", "select_stop")}
    old_key = svm.stage.artifact_key("svm", before, ignore=("out", "device", "gram_cache", "preset"), features="f")
    assert svm.results_key(cfg, "f") == old_key
    assert svm.results_key(dataclasses.replace(cfg, c_refine=False), "f") != old_key
    assert svm.results_key(build(svm.Config, "svm", {}), "f") != old_key


def test_test_split_read_in_blocks_scores_the_same(tmp_path, monkeypatch):
    """Without room for the test split in memory, it is scanned, then re-read per batch of draws."""
    features = write_h5(tmp_path / "f.h5")
    in_memory = json.loads(svm.run(config(features, tmp_path / "a.json")).read_text())
    monkeypatch.setattr(svm.design, "_available_memory", lambda: 1000)
    monkeypatch.setattr(svm.protocol, "_available_memory", lambda: 1000)
    batches = count_calls(monkeypatch, svm.protocol, "score_on_split")
    streamed = json.loads(svm.run(config(features, tmp_path / "b.json")).read_text())
    assert [len(args[2]) for args in batches] == [1, 5]          # the full setting's refit, then 5 draws at once
    assert settings_without_timing(streamed) == settings_without_timing(in_memory)


# ----------------------------------------------------------------------------- selection fits' stop
def liblinear_gradient_norms(model, X, y, C: float) -> np.ndarray:
    """||g_k|| / ||g_k(0)|| of LinearSVC's objective at `model`, in float64 numpy (not the solver's code):
    g_k = [w_k; v_k] + 2C [X | s]^T (active * (scores - y_k)), s = intercept_scaling = 1."""
    A = np.hstack([X.astype(np.float64), np.ones((len(X), 1))])
    V = np.vstack([model.W.T.astype(np.float64), model.b[None].astype(np.float64)])      # (D+1) x K
    Y = np.where(y[:, None] == model.classes[None], 1.0, -1.0)
    scores = A @ V
    active = (1.0 - Y * scores) > 0
    g = V + 2.0 * C * A.T @ (active * (scores - Y))
    g0 = 2.0 * C * A.T @ (-Y)
    return np.linalg.norm(g, axis=0) / np.linalg.norm(g0, axis=0)


def test_a_liblinear_stop_meets_linearsvcs_rule_and_takes_no_more_steps():
    X, y = blobs(600, d=40, seed=7)                # 3 balanced classes: liblinear's rule is 1e-4 / 3
    C = 1.0
    loose = svm.fit(X, y, C, tol=svm.solver.LIBLINEAR, device="cpu")
    tight = svm.fit(X, y, C, device="cpu")
    assert loose.info["tol"] == "liblinear" and tight.info["tol"] == svm.solver.TOL and loose.info["converged"]
    rel = liblinear_gradient_norms(loose, X, y, C)
    assert (rel <= 1.5 * svm.solver.LIBLINEAR_TOL / 3).all()          # float32 weights: a little slack on the rule
    assert (liblinear_gradient_norms(tight, X, y, C) <= 1e-5).all()
    assert loose.info["iterations"] <= tight.info["iterations"]
    assert loose.objective(X, y, C) == pytest.approx(tight.objective(X, y, C), rel=1e-4)


@pytest.mark.parametrize("stop", ["liblinear", "tight"])
def test_full_setting_selection_fits_stop_at_select_stop_and_the_refit_at_tol(tmp_path, stop):
    cfg = config(write_h5(tmp_path / "f.h5"), tmp_path / "r.json", settings=("full",), select_stop=stop,
                 c_presearch=120, c_grid=(1e-4, 1e-3, 1e-2))
    rules = json.loads(svm.run(cfg).read_text())["settings"]["full"]["solver"]["stop_rules"]
    expected = "liblinear" if stop == "liblinear" else svm.solver.TOL
    assert rules == {"presearch": [expected], "select": [expected], "refit": [svm.solver.TOL]}
    with pytest.raises(ConfigError, match="select_stop.*liblinear, tight"):
        config(tmp_path / "f.h5", tmp_path / "r.json", select_stop="loose")


def test_the_all_row_bracket_starts_at_the_subsample_optimum_and_steps_down_only_if_it_wins():
    """The presearch's optimum and the C above it are scored first; the C below only when the optimum
    still wins on all rows (then it is an edge, and the search never stops at one)."""
    candidates = [1e-4, 1e-3, 1e-2, 1e-1]
    start = candidates[1:3]                         # as select_full cuts them around a presearch optimum 1e-3
    score, calls = peaked(5e-3)                      # all rows want more C: nothing below is fitted
    svm.search.bracket(score, start, cap=4, candidates=candidates)
    assert calls == [[1e-3, 1e-2], [1e-1]]
    score, calls = peaked(1e-3)                      # the subsample's optimum wins: its lower neighbour follows
    curve, _ = svm.search.bracket(score, start, cap=4, candidates=candidates)
    assert calls == [[1e-3, 1e-2], [1e-4]] and svm.search._pick(curve) == 1e-3


@pytest.mark.parametrize("switch_cg,build_cg", [(0, 10 ** 9), (10 ** 9, 0), (10 ** 9, 10 ** 9)])
def test_final_draws_start_per_class_when_the_first_draw_switched_or_its_cg_ran_long(tmp_path, monkeypatch,
                                                                                     switch_cg, build_cg):
    """Gram-space draws (wider than long): the final draws after the first are prepared per class exactly
    when draw 0's 'auto' fit switched to per-class preconditioners (forced here by the switch's CG length) or
    averaged over CLASS_BUILD_CG CG iterations a Newton step (forced by that bound)."""
    monkeypatch.setattr(svm.solver, "CLASS_SWITCH_CG", switch_cg)
    monkeypatch.setattr(svm.search, "CLASS_BUILD_CG", build_cg)
    features = write_h5(tmp_path / "f.h5", train=blobs(300, d=80, seed=1), test=blobs(150, d=80, seed=2))
    asked = []
    prepare = svm.search.prepare
    monkeypatch.setattr(svm.search, "prepare", lambda *a, **k: asked.append(k["preconditioner"]) or prepare(*a, **k))
    record = json.loads(svm.run(config(features, tmp_path / "r.json", settings=("400",))).read_text())
    final = asked[-(len(record["settings"]["400"]["draws"]) - 1):]        # draws 1.. (draw 0 is prepared 'auto')
    assert asked[-len(final) - 1] == "auto"
    assert final == ["class" if 0 in (switch_cg, build_cg) else "auto"] * len(final)
    assert record["settings"]["400"]["solver"]["converged_fits"] == record["settings"]["400"]["solver"]["fits"]
