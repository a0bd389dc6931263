"""Choosing C: the grid, its scale and the bracket, then the two settings (full, 400 per class) that
select C and score the chosen one on test.

C search (both settings, `bracket`): the starting grid is `c_grid` in sum form, times
NORM_REFERENCE / mean_i ||x_i||^2 of the preprocessed train rows with c_scale=norm (the smoke
preset; NORM_REFERENCE = 200, see its comment), as given with c_scale=none (paper). After scoring it,
while the largest C scored attains the best score (ties included: the score has not fallen below the
best above it), C_max * 10 is scored too (upward paths warm-start from the largest C's solution; the full
setting's all-row search from the secant of its last two solutions in log C, `_Fitter`), and
while the smallest does, C_min / 10 (cold: a short path of its own), at most `c_extend` decades per
side; the 400 setting scores each new C on the same selection draws. The chosen C is the best one
(the smallest on ties); `c_at_edge` says it is still at an edge of the scored grid once the cap is hit. With
`c_presearch` rows the full setting brackets first on a subsample and fits all rows only around its
optimum (then brackets again there); with `c_refine=false` as well, the subsample's C is the choice and
the refit is the only fit on all rows (the benchmark records whether the exhaustive search agrees: on a
trained critic's 50,000 rows it did not, the best C on all rows was 10x the subsample's; opt-in only).
With the default c_refine=true it agreed there (C = 0.0147, 2,346 s against the exhaustive 2,738 s).
The all-row bracket starts at the subsample's optimum and the C above it (more rows want less
regularisation at the same mean-form C); it steps below only if the subsample's optimum wins there.
Selection fits of the full setting (presearch and train-minus-val) stop where LinearSVC itself stops
(`select_stop=liblinear`, the default: every class past liblinear's rule, recorded as the fit's `tol`);
the refit, and every fit of the 400 setting, stops at TOL.
"""
from __future__ import annotations

import math
import time
from typing import Callable, Sequence

import numpy as np
import torch

from ...core.config import ConfigError
from .design import LinearModel, Problem, _available_memory, _float32_rows, _gram, accuracies, prepare
from .solver import CLASS_BUILD_CG, LIBLINEAR, MAX_ITER, TOL, _newton, fit_liblinear
from .protocol import Config, NORM_REFERENCE, REFIT_C_RULE, SplitScorer, balanced_draw, draw_rng, train_gram


# ============================================================================ C: grid, scale, bracket
def c_scale_factor(X: np.ndarray, cfg: Config, block: int = 1024) -> float:
    """NORM_REFERENCE / mean_i ||x_i||^2 over the (preprocessed) train rows for c_scale=norm, to 3
    significant digits (readable C values), else 1."""
    if cfg.c_scale == "none":
        return 1.0
    total = sum(float(np.einsum("ij,ij->i", X[i:i + block], X[i:i + block]).sum(dtype=np.float64))
                for i in range(0, len(X), block))
    if not total > 0:
        raise ConfigError(f"c_scale=norm: the train features of {cfg.features} are all zero")
    return float(f"{NORM_REFERENCE * len(X) / total:.3g}")


def _round_c(c: float) -> float:
    """10 significant digits: C values stay readable (and exact as JSON keys) after scaling."""
    return float(f"{c:.10g}")


def _sum_c(c: float, n: int, cfg: Config) -> float:
    return c / n if cfg.c_form == "mean" else c


def _grid(cfg: Config, n: int, factor: float = 1.0) -> list[float]:
    """The starting grid in sum form for n rows, scaled (sorted); fixed_c alone (unscaled) when given."""
    if cfg.fixed_c > 0:
        return [_sum_c(cfg.fixed_c, n, cfg)]
    return sorted(_round_c(_sum_c(c, n, cfg) * factor) for c in cfg.c_grid)


def _pick(curve: dict[float, float]) -> float:
    """The C with the best validation accuracy (the smallest such C on ties)."""
    best = max(curve.values())
    return min(c for c, acc in curve.items() if acc == best)


def bracket(score: Callable[[list[float]], dict[float, float]], start: Sequence[float], cap: int,
            candidates: Sequence[float] = ()) -> tuple[dict[float, float], dict[str, int]]:
    """Score `start`, then, while the largest (smallest) C scored still attains the best score, the next
    C beyond it: the nearest of `candidates` beyond it if any, else a decade further (at most `cap`
    decades per side). Ties count as not fallen: a grid lying wholly on the chance-level plateau of
    tiny C must move up, not stop at its smallest C (the one `_pick` prefers on ties).
    score(Cs, increasing) -> {C: validation score}. Returns (curve, {"up": decades, "down": decades})."""
    curve = dict(score(sorted(start)))
    added = {"up": 0, "down": 0}
    while True:
        cs, best = sorted(curve), max(curve.values())
        up, down = curve[cs[-1]] == best, curve[cs[0]] == best
        beyond = [c for c in candidates if c > cs[-1]][:1] if up else []
        below = [c for c in candidates if c < cs[0]][-1:] if down else []
        if beyond or below:
            curve.update(score(beyond or below))
        elif up and added["up"] < cap:
            added["up"] += 1
            curve.update(score([_round_c(cs[-1] * 10)]))
        elif down and added["down"] < cap:
            added["down"] += 1
            curve.update(score([_round_c(cs[0] / 10)]))
        else:
            return curve, added


def _search_fields(curve: dict[float, float], added: dict[str, int], factor: float) -> dict:
    """What every setting records of its C search (nothing scored: fixed_c)."""
    cs = sorted(curve)
    at_edge = bool(cs) and _pick(curve) in (cs[0], cs[-1])
    return {"val_curve": curve, "grid": cs, "c_at_edge": at_edge, "c_extended": added, "c_scale_factor": factor}


# ============================================================================ fitting
class _Fitter:
    """One (X, y) fitted at C values, one call at a time, keeping what later calls reuse: the prepared
    problem (design, Gram factor, preconditioner eigenpairs) and the solution at the largest C so far."""

    def __init__(self, X, y, cfg: Config, device, gram: torch.Tensor | None = None, tol: float | str = TOL,
                 sketch: tuple | None = None, problem: Problem | None = None, secant: bool = False,
                 preconditioner: str = "auto"):
        self.X, self.y, self.cfg, self.device, self.gram = X, y, cfg, device, gram     # X: N x D
        self.preconditioner = preconditioner     # `prepare`'s
        self.sketch = sketch      # a design's `sketch_state` over X's first rows, adopted by `prepare`
        self.tol = tol            # TOL, or LIBLINEAR for fits that only choose C (`select_stop`)
        self._problem = problem   # already prepared on these rows (`Setting400.fitter`), else made by `problem`
        # the two largest C fitted so far with their V, increasing: upward paths start from the last one, and
        # with `secant` a fit above both starts from the last one's V moved along their
        # secant in log C (at most one secant's length): the full setting's fit a decade above the optimum,
        # a third of its search, took 105 s from there against 138 s from the top's V (40,000 x 28672
        # trained-critic rows, AVX2 kernels; benchmarks/results/notes.md, stop 52)
        self.secant, self._top2 = secant, []

    @property
    def problem(self) -> Problem:
        """The prepared problem of these rows (made at the first call, or given)."""
        if self._problem is None:
            self._problem = prepare(self.X, self.y, device=self.device, gram=self.gram, sketch=self.sketch,
                                    preconditioner=self.preconditioner)
            self.sketch = None
        return self._problem

    def path(self, cs: Sequence[float], warm: LinearModel | None = None) -> list[LinearModel]:
        """Models at `cs` (increasing) as one warm-started path, starting from `warm` if given, else
        from the largest C fitted so far when `cs` lie above it (an upward extension), else cold (the
        first path, or a downward extension: small-C cold starts are cheap, large-C ones are not)."""
        if self.cfg.solver == "liblinear":
            return [fit_liblinear(self.X, self.y, c) for c in cs]
        problem, V = self.problem, None
        if warm is not None:
            V = problem.from_model(warm)
        elif self._top2 and cs[0] > self._top2[-1][0]:
            V = self._top2[-1][1]
        models = []
        for c in cs:
            top2 = self._top2
            if self.secant and len(top2) == 2 and V is top2[1][1] and c > top2[1][0]:
                (c0, V0), (c1, V1) = top2
                V = V1 + min(1.0, math.log(c / c1) / math.log(c1 / c0)) * (V1 - V0)
            V, info = _newton(problem, c, V, self.tol, MAX_ITER)
            models.append(problem.to_model(V, info))
            if not top2 or c > top2[-1][0]:
                self._top2 = (top2 + [(c, V)])[-2:]
        return models


def solver_summary(fits: list) -> dict:
    """fits: [C, label ('select', 'refit', 'select 3', 'final 7', ...), model.info or None (liblinear)]."""
    infos = [(c, label, info) for c, label, info in fits if info is not None]
    failed = [[c, label, info["rel_grad"], info["stop"]] for c, label, info in infos if not info["converged"]]
    seconds: dict[str, float] = {}           # where the time went, by kind of fit ('select 3' -> 'select')
    stops: dict[str, list] = {}              # the stopping rules each kind of fit used (TOL, or LIBLINEAR)
    for _, label, info in infos:
        kind = label.split()[0]
        seconds[kind] = seconds.get(kind, 0.0) + info.get("seconds", 0.0)
        if "tol" in info and info["tol"] not in stops.setdefault(kind, []):
            stops[kind].append(info["tol"])
    return {"fits": len(fits), "recorded": len(infos), "converged_fits": len(infos) - len(failed),
            "fit_seconds": seconds, "stop_rules": stops,
            "cg_iterations": sum(info.get("cg_iterations", 0) for _, _, info in infos),
            "not_converged": failed,
            "max_rel_grad": max((i["rel_grad"] for _, _, i in infos), default=None),
            "max_iterations": max((i["iterations"] for _, _, i in infos), default=None),
            "max_jitter": max((i["jitter"] for _, _, i in infos), default=None)}


class PhaseBars:
    """One progress bar per phase of the search (C on a subsample, C search, refit, selection draws, final
    draws), each opened with its known total; a search extended past its grid's edge opens a new bar with
    the extension's own total, so no bar's total moves while it runs."""

    def __init__(self, prefix: str = "svm"):
        self.prefix, self.bar = prefix, None

    def start(self, phase: str, total: int, done: int = 0) -> None:
        from tqdm import tqdm
        self.close()
        self.bar = tqdm(total=total, initial=done, desc=f"{self.prefix} {phase}", unit="fit")

    def update(self, n: int = 1) -> None:
        self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _phase(start: list[float], cs: list[float], name: str) -> str:
    """The bar's name for scoring `cs`: the phase itself, or the extension above or below its grid."""
    if cs == start:
        return name
    return f"{name}, extended up to C={max(cs):.3g}" if cs[0] > max(start) else f"{name}, extended down to C={min(cs):.3g}"


# ============================================================================ the full setting
def run_full(X: np.ndarray, y: np.ndarray, n_rest: int, test: SplitScorer, cfg: Config, factor: float, device,
             bar) -> dict:
    """C bracketed on train-minus-val (X[:n_rest]) scored on val (X[n_rest:]), then a refit on all of
    train (REFIT_C_RULE), scored on test."""
    start, fits = time.time(), []
    search = {"c": None, "model": None, "curve": {}, "added": {"up": 0, "down": 0}, "presearch": None, "sketch": None}
    if cfg.fixed_c > 0:
        chosen = _grid(cfg, len(X))[0]
    else:
        search = select_full(X, y, n_rest, cfg, factor, device, bar, fits)
        chosen = search["c"] * n_rest / len(X) if cfg.c_form == "mean" else search["c"]
    # warm: the chosen C's model; X[:n_rest] are the selection's rows, so the refit adopts their sketch
    bar.start("full: refit at the chosen C", 1)
    model = _Fitter(X, y, cfg, device, sketch=search["sketch"]).path([chosen], warm=search["model"])[0]
    fits.append([chosen, "refit", model.info])
    bar.update(1)
    return {"c": chosen, "c_select": search["c"], "refit_c_rule": REFIT_C_RULE[cfg.c_form],
            **_search_fields(search["curve"], search["added"], factor), "presearch": search["presearch"],
            "test_acc": test.score([model])[0], "test_correct": test.correct(model), "test_size": len(test.labels),
            "solver": solver_summary(fits), "seconds": time.time() - start}


def _select_tol(cfg: Config) -> float | str:
    """Where the full setting's selection fits stop (`select_stop`); the refit always stops at TOL."""
    return LIBLINEAR if cfg.select_stop == "liblinear" else TOL


def select_full(X, y, n_rest: int, cfg: Config, factor: float, device, bar, fits: list) -> dict:
    """The bracketed search on train-minus-val: {c, model (at c), curve, added, presearch, sketch (the
    selection design's `sketch_state`, adopted by the refit, or None)}. Every C
    is fitted on the same problem: upward extensions warm-start from the largest C's solution."""
    grid, candidates, presearch, sub_model = _grid(cfg, n_rest, factor), (), None, None
    start = grid
    if 0 < cfg.c_presearch < n_rest:
        presearch, sub_model = _presearch(X, y, n_rest, cfg, grid, device, bar, fits)
        if not cfg.c_refine:      # the subsample's C and curve are the search; the refit starts from its model
            return {"c": presearch["c"], "model": sub_model, "curve": presearch["val_curve"],
                    "added": presearch["c_extended"], "presearch": presearch, "sketch": None}
        candidates = presearch["grid"]
        at = candidates.index(presearch["c"])
        # the subsample's optimum and the C above it: at the same mean-form C, more rows want less
        # regularisation, so the best C on all rows is not below the subsample's (measured: 10x above it,
        # module docstring). The C below is still fitted if the subsample's optimum wins on all rows
        # (`bracket` then steps down to it): the search never stops at an edge either way
        start = candidates[at:at + 2]
    fitter, models = _Fitter(X[:n_rest], y[:n_rest], cfg, device, tol=_select_tol(cfg), secant=True), {}   # row views

    def score(cs):
        bar.start(_phase(start, cs, "full: C search"), len(cs))
        # the first path starts from the subsample's model at the same mean-form C: a cold start at a
        # large C spends its first Newton steps on an active set of every row
        for c, model in zip(cs, fitter.path(cs, warm=sub_model if cs == start else None)):
            models[c] = model
            fits.append([c, "select", model.info])
            bar.update(1)
        return dict(zip(cs, accuracies([models[c] for c in cs], X[n_rest:], y[n_rest:])))
    curve, added = bracket(score, start, cfg.c_extend, candidates)
    best = _pick(curve)
    sketch = fitter._problem.design.sketch_state() if fitter._problem is not None else None
    return {"c": best, "model": models[best], "curve": curve, "added": added, "presearch": presearch,
            "sketch": sketch}


def _presearch(X, y, n_rest: int, cfg: Config, grid: list[float], device, bar, fits: list) -> tuple[dict, LinearModel]:
    """The bracketed search on a class-balanced subsample of train-minus-val: each C (sum form for
    n_rest rows) is fitted as C * n_rest / n_sub on the n_sub rows (the same mean-form C) and scored
    on val; the curve is keyed by the n_rest-row C. Returns (record, the subsample's model at its best C)."""
    per_class = cfg.c_presearch // len(np.unique(y[:n_rest]))
    idx = balanced_draw(y, per_class, draw_rng(cfg.seed, 4, 0), pool=np.arange(n_rest))
    fitter, ratio, models = _Fitter(X[idx], y[idx], cfg, device, tol=_select_tol(cfg)), n_rest / len(idx), {}

    def score(cs):
        bar.start(_phase(grid, cs, f"full: C on {len(idx)} rows"), len(cs))
        for c, m in zip(cs, fitter.path([c * ratio for c in cs])):
            models[c] = m
            fits.append([c * ratio, "presearch", m.info])
        bar.update(len(cs))
        return dict(zip(cs, accuracies([models[c] for c in cs], X[n_rest:], y[n_rest:])))
    curve, added = bracket(score, grid, cfg.c_extend)
    best = _pick(curve)
    return {"rows": int(len(idx)), "val_curve": curve, "grid": sorted(curve), "c": best, "c_extended": added,
            "refined": cfg.c_refine}, models[best]


# ============================================================================ the 400-per-class setting
# bytes a kept Gram-space problem takes per squared row (`Setting400.select_kept`): L in float64 (8) and
# float32 (4), L^T (4), and the N x 384 sketch with its scores (~1 at 4000 rows)
KEPT_PROBLEM_BYTES = 17


class Setting400:
    """The 400-per-class setting, resumable: `state` (saved by `save` after every unit of work) holds
        val_draws {C: [val acc of selection draw 0, 1, ...]}, draws [test acc of final draw 0, 1, ...],
        fits [[C, label, solver record]], seconds (so far), selection_seconds (once selected).
    Every fit depends only on its draw, its C and the C values scored before it (no state is carried
    between draws), so a resumed run refits what it needs as a warm start by the same steps and
    reproduces an uninterrupted run's numbers (on the same machine and thread count)."""

    def __init__(self, X, y, n_rest: int, test: SplitScorer, cfg: Config, factor: float, device, bar,
                 state: dict, save: Callable[[], None]):
        self.X, self.y, self.n_rest, self.test, self.cfg, self.device, self.bar = X, y, n_rest, test, cfg, device, bar
        self.state, self._save, self.factor, self.started = state, save, factor, time.time()
        self.elapsed = state.get("seconds", 0.0)                  # by earlier runs of this setting
        self.n_fit = cfg.per_class * len(np.unique(y))
        self.grid = _grid(cfg, self.n_fit, factor)
        selecting = cfg.fixed_c <= 0
        self.gram_all = train_gram(X, self.n_fit, cfg.final_draws + selecting * cfg.select_draws, cfg, device)
        self.top: dict[int, tuple[float, LinearModel]] = {}     # selection draw -> its model at the largest C
        # selection draw -> what its next bracketing round reuses: its prepared Gram-space problem less its
        # rows (`Problem.without_rows`: the factor L in float64 and float32, L^T, the Nystrom sketch, about
        # KEPT_PROBLEM_BYTES n_fit^2 bytes: 270 MB at 4000 rows) while the draws' problems take under a quarter
        # of the available memory, else its Gram matrix (float32, n_fit^2 x 4 bytes). Each round fits every
        # selection draw again, and the Gram product (~4 s for 4000 x 28672 on 2 cores), its Cholesky
        # factor, L^T's copy and the sketch (~1.2 s more) are most of a fit's cost outside Newton's steps;
        # the values are those a fresh `prepare` would compute
        self.select_kept: dict[int, Problem | torch.Tensor] = {}
        self.gram_design = cfg.solver == "replearn" and self.n_fit <= X.shape[1]
        self._rows = np.empty((self.n_fit, X.shape[1]), dtype=X.dtype)      # `draw_rows`' buffer

    def save(self) -> None:
        self.state["seconds"] = self.elapsed + time.time() - self.started
        self._save()

    def fitter(self, purpose: int, draw: int, preconditioner: str = "auto") -> _Fitter:
        """A fitter on the draw's rows (selection draws from train-minus-val, final draws from all of train)."""
        pool = np.arange(self.n_rest) if purpose == 2 else None
        idx = balanced_draw(self.y, self.cfg.per_class, draw_rng(self.cfg.seed, purpose, draw), pool=pool)
        X, y = self.draw_rows(idx), self.y[idx]
        kept = self.select_kept.get(draw) if purpose == 2 else None
        if isinstance(kept, Problem):
            return _Fitter(X, y, self.cfg, self.device, problem=kept.with_rows(X))
        gram = kept
        if gram is None and self.gram_all is not None:   # this draw's block of the cached Gram matrix
            rows = torch.as_tensor(idx, device=self.gram_all.device)
            gram = self.gram_all[rows[:, None], rows[None, :]]
        elif gram is None and purpose == 2 and self.gram_design:
            gram = _gram(_float32_rows(X, self.device), dtype=torch.float32)
        fitter = _Fitter(X, y, self.cfg, self.device, gram, preconditioner=preconditioner)
        if purpose == 2 and self.gram_design:
            room = KEPT_PROBLEM_BYTES * self.n_fit ** 2 * self.cfg.select_draws < _available_memory() / 4
            self.select_kept[draw] = fitter.problem.without_rows() if room else gram
        return fitter

    def draw_rows(self, idx: np.ndarray) -> np.ndarray:
        """The draw's feature rows, gathered into one buffer that every draw reuses: each fitter serves one `path`
        call, done before the next draw's rows are gathered. A fresh 4000 x 28672 copy took 0.1-0.24 s (one
        thread, and page faults on new memory; 140 draws a protocol run), torch's gather into the buffer 0.03 s."""
        torch.index_select(torch.from_numpy(self.X), 0, torch.as_tensor(idx), out=torch.from_numpy(self._rows))
        return self._rows

    def run(self) -> dict:
        if self.cfg.fixed_c > 0:
            chosen, curve, added = self.grid[0], {}, {"up": 0, "down": 0}
        else:
            curve, added = bracket(self.score_round, self.grid, self.cfg.c_extend)
            chosen = _pick(curve)
            self.select_kept.clear()           # the final draws are other rows: free them before those fits
        self.state.setdefault("selection_seconds", self.elapsed + time.time() - self.started)
        draws = self.final(chosen)
        seconds = self.elapsed + time.time() - self.started
        val_draws = {c: v for c, v in self.state.get("val_draws", {}).items() if c in curve}
        return {"c": chosen, **_search_fields(curve, added, self.factor), "val_draws": val_draws,
                "draws": draws, "mean": float(np.mean(draws)), "std": float(np.std(draws)),
                "ci95": float(1.96 * np.std(draws)), "seconds": seconds,
                "selection_seconds": self.state["selection_seconds"],
                "final_seconds": seconds - self.state["selection_seconds"],
                "draw0_correct": self.state.get("draw0_correct"), "test_size": len(self.test.labels),
                "gram_cache": self.gram_all is not None, "solver": solver_summary(self.state.get("fits", []))}

    # ------------------------------------------------------------------ selection
    def score_round(self, cs: list[float]) -> dict[float, float]:
        """Mean validation accuracy over the selection draws of every C in `cs` (all below, or all above,
        what is scored already, or the starting grid), fitting only the draws not scored yet."""
        val_draws = self.state.setdefault("val_draws", {})
        self.bar.start(_phase(self.grid, cs, f"{self.cfg.per_class}pc: C selection ({self.cfg.select_draws} draws)"),
                       len(cs) * self.cfg.select_draws)
        for draw in range(self.cfg.select_draws):
            if all(len(val_draws.get(c, [])) > draw for c in cs):
                self.bar.update(len(cs))
                continue
            models = self.select_fit(draw, cs)
            scores = accuracies(models, self.X[self.n_rest:], self.y[self.n_rest:])
            for c, model, score in zip(cs, models, scores):
                val_draws.setdefault(c, []).append(score)
                self.state.setdefault("fits", []).append([c, f"select {draw}", model.info])
            self.bar.update(len(cs))
            self.save()
        return {c: float(np.mean(val_draws[c])) for c in cs}

    def select_fit(self, draw: int, cs: list[float]) -> list[LinearModel]:
        """The grid as one path from cold; an upward extension from this draw's model at the largest C
        scored so far; a downward one cold (its own short path)."""
        warm = self.top_model(draw, cs[0]) if cs[0] > self.grid[-1] else None
        models = self.fitter(2, draw).path(cs, warm)
        if cs[-1] >= self.grid[-1]:
            self.top[draw] = (cs[-1], models[-1])
        return models

    def top_model(self, draw: int, c_new: float) -> LinearModel:
        """This draw's model at the largest C below c_new; after a resume, refitted by the same steps
        that made it first (the grid path, then each upward extension from the previous model)."""
        scored = sorted(self.state["val_draws"])
        previous = max(c for c in scored if c < c_new)
        if draw in self.top and self.top[draw][0] == previous:
            return self.top[draw][1]
        model = self.fitter(2, draw).path(self.grid)[-1]
        for c in (c for c in scored if self.grid[-1] < c <= previous):
            model = self.fitter(2, draw).path([c], model)[0]
        return model

    # ------------------------------------------------------------------ final draws
    def final(self, chosen: float) -> list[float]:
        """Test accuracy of `final_draws` draws at the chosen C. Every draw after the first starts from
        the first draw's model (as close as any other draw's solution, and it keeps each draw's fit
        independent of the order it is done in: a resumed run refits draw 0 for it, cold, identically), and
        per class from its first Newton step when the first draw's fit switched there ('auto' in `prepare`)
        or its CG took over CLASS_BUILD_CG iterations a Newton step: the untrained-critic benchmark's draw 0
        at C = 1 (the stage's features) took 62 in 6 steps, never over the switch's 20 in one, and its warm-started
        draws 68 with the shared preconditioner, 1.34 s a fit, against 22 per class, 1.0 s, the same accuracies."""
        draws, fits = self.state.setdefault("draws", []), self.state.setdefault("fits", [])
        self.bar.start(f"{self.cfg.per_class}pc: final draws", self.cfg.final_draws, done=len(draws))
        first, pending = None, []
        for draw in range(len(draws), self.cfg.final_draws):
            if first is None and draw > 0:
                first = self.fitter(3, 0).path([chosen])[0]
            per_class = draw > 0 and first.info is not None and (
                first.info["preconditioner"] != "shared"
                or first.info["cg_iterations"] > CLASS_BUILD_CG * max(first.info["iterations"], 1))
            model = self.fitter(3, draw, "class" if per_class else "auto").path([chosen], first)[0]
            if draw == 0:   # draw 0's per-image record: the paired test of a gain on the same images
                first = model
                self.state["draw0_correct"] = self.test.correct(model)
            pending.append((draw, model))
            self.bar.update(1)
            if len(pending) == self.test.batch or draw == self.cfg.final_draws - 1:
                draws += self.test.score([m for _, m in pending])
                fits += [[chosen, f"final {d}", m.info] for d, m in pending]
                pending = []
                self.save()
        return draws
