"""The truncated Newton solver of the L2-SVM (design.py) for all K classes at once, and the fit API.

The solver (`fit`, `fit_path`)
------------------------------
A primal truncated Newton method for all K classes at once (Keerthi & DeCoste 2005; liblinear's
TRON uses the same generalised Hessian). With a = augmented design, D_k = {i: 1 - y_ik a_i.w_k > 0}:
    gradient  g_k = w_k + 2C A^T [1_D (A w_k - y_k)]
    Hessian   H_k = I + 2C A_Dk^T A_Dk            (generalised: the loss is only C^1)
Each Newton step solves H_k d_k = -g_k by preconditioned CG, batched over the K columns, to a
residual of eta_k ||g_k|| with Eisenstat & Walker's forcing term eta_k = sqrt(||g_k|| / ||g_k(0)||)
(no smaller than half the stopping target over ||g_k||) clipped to [1e-3, 0.1], then takes the exact
minimiser along d_k of the piecewise quadratic
(safeguarded 1-D Newton). It stops when ||g_k|| <= tol * ||g_k(w=0)|| for every k, tol = 1e-6
(liblinear's primal rule is 1e-4 * min(#pos, #neg) / N, about 1e-5 here, and can stop far from the
optimum for large C); when every class is past liblinear's rule and its last step lowered its
objective by under STALL_DECREASE = 1e-7 (relative: large-C fits near a degenerate optimum, see the
constant); or when an iteration no longer lowers the objective (the precision of float32 products).


Solver record: every replearn fit sets `LinearModel.info` (None for liblinear) = {converged, stop
('gradient' | 'stalled' | 'no-progress' | 'max_iter'), iterations (Newton steps), cg_iterations (their CG steps),
rel_grad (max over classes of ||g_k|| / ||g_k(0)|| at the returned point), jitter (the Gram factor's
relative Cholesky jitter, 0 in the primal), hessian (the dtype of the Hessian products), preconditioner
('shared', 'class' or 'shared, then class'), tol (the relative gradient it stopped at, or 'liblinear':
every class at `_liblinear_rule`, LinearSVC's own stopping point)}. A
'no-progress' stop counts as converged only when every class also meets the rule LinearSVC itself
stops at (liblinear's primal: rel_grad_k <= 1e-4 * min(#pos_k, #neg_k) / N).
"""
from __future__ import annotations

import time
from typing import Sequence

import numpy as np
import torch

from .design import LinearModel, Problem, _Design, _as_numpy32, prepare


# ============================================================================ truncated Newton
def _gradient(design: _Design, Y, V, scores, C: float):
    active = ((1.0 - Y * scores) > 0).float()                                     # N x K
    return V + 2.0 * C * design.backward(active * (scores - Y)), active


def _cg(design: _Design, active, C: float, G, apply_m, rel_tol=1e-3, max_iter: int = 1000):
    """(d, CG iterations, [A | s] d): (I + 2C A^T D_k A) d_k = -g_k solved for every column k by preconditioned
    CG, to a residual of rel_tol * ||g_k|| (rel_tol: a float or one value per column). [A | s] d is summed from
    the products' own forward passes, the pass the line search needs saved (None where the products run on a
    bf16 copy: the line search takes the float32 design's)."""
    d = torch.zeros_like(G)
    Ad = torch.zeros(len(active), G.shape[1], dtype=G.dtype, device=G.device) if design.H is design.A else None
    r = -G
    z = apply_m(r)
    p = z.clone()
    rz = (r * z).sum(0, dtype=torch.float64)
    target = rel_tol * G.norm(dim=0)
    for done in range(max_iter):
        if bool((r.norm(dim=0) <= target).all()):
            return d, done, Ad
        Hp, Ap = design.hessian_and_forward(p, active, C)
        pHp = (p * Hp).sum(0, dtype=torch.float64).clamp_min(1e-300)
        alpha = torch.where(r.norm(dim=0) > target, rz / pHp, 0.0)
        d += alpha * p
        if Ad is not None:
            Ad += alpha * Ap
        r -= alpha * Hp
        z = apply_m(r)
        rz_new = (r * z).sum(0, dtype=torch.float64)
        p = z + (rz_new / rz.clamp_min(1e-300)) * p
        rz = rz_new
    return d, max_iter, Ad


def _line_search(V, d, scores, Ad, Y, C: float, iters: int = 60) -> torch.Tensor:
    """Exact minimiser t_k of the convex piecewise quadratic phi_k(V + t d), per column.

    phi'(t) = V.d + t d.d - 2C sum_i max(0, m_i(t)) y_i a_i.d with m_i(t) = 1 - y_i (z_i + t a_i.d):
    Newton steps on phi', kept inside a bracket [lo, hi] with phi'(lo) < 0 < phi'(hi) (bisection
    when a step leaves it), so it cannot cycle between the pieces.
    """
    vd, dd = (V * d).sum(0), (d * d).sum(0)
    yz, yad = Y * scores, Y * Ad

    def slope_curve(t):
        margin = 1.0 - yz - t * yad
        on = margin > 0
        return vd + t * dd - 2.0 * C * (on * margin * yad).sum(0), dd + 2.0 * C * (on * yad * yad).sum(0)

    lo, hi = torch.zeros_like(vd), torch.ones_like(vd)
    for _ in range(60):                                   # grow hi until phi'(hi) >= 0
        grow = slope_curve(hi)[0] < 0
        if not bool(grow.any()):
            break
        lo, hi = torch.where(grow, hi, lo), torch.where(grow, 2 * hi, hi)
    t = hi.clone()
    for _ in range(iters):
        slope, curve = slope_curve(t)
        lo, hi = torch.where(slope < 0, t, lo), torch.where(slope > 0, t, hi)
        newton = t - slope / curve.clamp_min(1e-300)
        inside = (newton > lo) & (newton < hi)
        t_new = torch.where(slope == 0, t, torch.where(inside, newton, 0.5 * (lo + hi)))
        if bool(((t_new - t).abs() <= 1e-12 * t.abs().clamp_min(1e-12)).all()):
            return t_new
        t = t_new
    return t


# preconditioner='auto': a Newton step whose CG took more iterations than this switches the rest of the fit
# to per-class preconditioners (their rebuild, K products N_k x l x l per Newton step, costs about as much
# as five CG iterations of a 4000-row Gram design, and far less than one of a 50,000-row primal one): on the
# 400-per-class protocol's untrained-critic draws (AVX2 kernels), per class from the first step took 2-4 CG
# iterations at C <= 0.01 where shared took 3-16, but 0.33-0.38 s a fit against 0.13-0.29 s; at C = 1, 26
# against 64 and 0.77 s against 0.90 s (benchmarks/results/notes.md, stop 55)
CLASS_SWITCH_CG = 20
# a per-class build costs about this many CG iterations of a 4000-row Gram design (its first build in a fit;
# `class_scatter` updates the later ones for less): the protocol's final draws start per class when draw 0's
# fit averaged more CG iterations a Newton step than this (`Setting400.final`)
CLASS_BUILD_CG = 5
TOL = 1e-6          # ||g_k|| <= TOL * ||g_k(w=0)|| for every class (see the module docstring)
# tol=LIBLINEAR: stop where LinearSVC itself stops (every class past `_liblinear_rule`), no further
LIBLINEAR = "liblinear"
MAX_ITER = 100      # Newton steps; warm-started fits take a few, cold ones at most a few tens
# a fit that stops for lack of progress still counts as converged when every class's gradient meets the
# rule scikit-learn's LinearSVC itself stops at (liblinear's primal TRON at its default tol = 1e-4):
# ||g_k|| <= 1e-4 * max(min(#pos_k, #neg_k), 1) / N * ||g_k(0)||, about 1e-5 for ten balanced classes
LIBLINEAR_TOL = 1e-4
# past that rule a class whose last Newton step lowered its objective by at most this (relative) is done
# (stop 'stalled', converged). Near a degenerate optimum (tens of thousands of rows on the margin of a
# 28672-dim problem) the generalised Newton direction crosses kinks of the loss and its steps shrink
# (line search t 0.3 ... 0.02) while the gradient falls ~1.3x a step: 40,000 x 28672 trained-critic rows
# at C = 0.00147 (cold) met the rule after 6 Newton steps and ground on to 13 (320 s, the last 7 at
# a relative decrease of 6e-9 ... 4e-13); at 0.0147 (warm) after 5, of 27 to the 1e-12 rule (about
# 50 min); the validation accuracy had stopped moving at step 4-5 (61.27%, 64.31%). A float64 gradient
# at the stalled point equals the float32 one to 3e-7 of ||g(0)||: the method stalls, not rounding
STALL_DECREASE = 1e-7


def solve(problem: Problem, C: float, V0: torch.Tensor | None = None, tol: float = TOL,
          max_iter: int = MAX_ITER) -> torch.Tensor:
    """Parameters V ((P+1) x K) minimising every class's objective; V0 warm-starts.

    Cold starts with a large C (C * sum_i ||x_i||^2 >> 1) spend many short Newton steps after
    the first, which overshoots: fit a C path from small C instead (`fit_path`).
    """
    return _newton(problem, C, V0, tol, max_iter)[0]


def _newton(problem: Problem, C: float, V0: torch.Tensor | None, tol: float | str,
            max_iter: int) -> tuple[torch.Tensor, dict]:
    """(V, solver record): see `_solver_record`; tol: a relative gradient, or LIBLINEAR."""
    started = time.perf_counter()
    design, Y = problem.design, problem.Y
    V = torch.zeros(design.A.shape[1] + 1, Y.shape[1], dtype=torch.float64, device=Y.device) if V0 is None \
        else V0.clone()
    g0_norm = (2.0 * C * design.backward(-Y)).norm(dim=0)                        # gradient at V = 0
    rule = _liblinear_rule(Y) * g0_norm                       # K: LinearSVC's own stopping point
    target = rule if tol == LIBLINEAR else tol * g0_norm
    scores = design.forward(V)
    previous = _objectives(V, scores, Y, C)
    apply_m, mu_m, scatter = None, 0.0, None
    per_class, switched = design.preconditioning in ("class", "rows"), False
    stop, steps, cg_steps = "max_iter", 0, 0
    decrease = torch.full_like(g0_norm, float("inf"))           # K: the last step's relative decrease
    history = []        # per Newton step: [seconds so far, its CG iterations, max relative gradient before it]
    for _ in range(max_iter):
        G, active = _gradient(design, Y, V, scores, C)
        g_norm = G.norm(dim=0)
        if bool((g_norm <= target).all()):
            stop = "gradient"
            break
        # a class is done at tol, or once it is past LinearSVC's rule and its last step barely moved it
        if bool(((g_norm <= target) | ((g_norm <= rule) & (decrease <= STALL_DECREASE))).all()):
            stop = "stalled"
            break
        # the preconditioner is rebuilt only when the active fraction has moved by over 1.5x: a dense
        # build is a factorisation (Nystrom ones reuse their cached eigenpairs), and a slightly stale
        # M costs a few CG steps at most
        mu = 2.0 * C * max(float(active.mean()), 1e-3)
        if design.preconditioning == "rows":
            apply_m = design.sampled_preconditioner(C, active)
        elif per_class:     # the scatter updated from the step before's (a fresh one for every fit)
            scatter = design.class_scatter(active, scatter)
            apply_m = design.class_preconditioner(C, active, scatter)
        elif apply_m is None or not 1 / 1.5 < mu / mu_m < 1.5:
            apply_m, mu_m = design.preconditioner(mu), mu
        # inexact Newton (Eisenstat & Walker's forcing term): loose directions while far from the
        # optimum, tight (down to 1e-3) near it, where the fast local convergence pays
        forcing = (g_norm / g0_norm.clamp_min(1e-300)).sqrt()
        # ... but no tighter than the stopping point needs: a step solved to eta ||g|| leaves a gradient of
        # about eta ||g||, so eta = target / (2 ||g||) lands past it. Near a liblinear-rule stop the
        # sqrt term alone asked for 1e-3 and CG spent 40-44 iterations on a step from 4e-5 to 2e-5
        # (40,000 x 28672 rows; the rule was ~1e-5)
        forcing = torch.maximum(forcing, 0.5 * target / g_norm.clamp_min(1e-300)).clamp(1e-3, 0.1)
        d, iterations, Ad = _cg(design, active, C, G, apply_m, forcing)
        cg_steps += iterations
        if not per_class and design.preconditioning == "auto" and iterations > CLASS_SWITCH_CG:
            per_class, switched = True, True
        if Ad is None:
            Ad = design.forward(d)
        t = _line_search(V, d, scores, Ad, Y, C)
        V = V + t * d
        scores = scores + t * Ad
        steps += 1
        history.append([round(time.perf_counter() - started, 2), iterations,
                        float((g_norm / g0_norm.clamp_min(1e-300)).max())])
        current = _objectives(V, scores, Y, C)
        decrease = (previous - current) / current.abs().clamp_min(1e-300)
        # stop when rounding, not the method, limits progress (fp32 products in the primal design)
        if bool((decrease <= 1e-12).all()):
            stop = "no-progress"
            break
        previous = current
    if stop not in ("gradient", "stalled"):   # G is from before the last step: the record needs the returned point's
        G, _ = _gradient(design, Y, V, scores, C)
    record = _solver_record(problem, G.norm(dim=0) / g0_norm.clamp_min(1e-300), stop, steps, cg_steps,
                            "shared, then class" if switched else design.preconditioning if per_class else "shared")
    return V, {**record, "tol": tol, "seconds": time.perf_counter() - started, "history": history}


def _solver_record(problem: Problem, rel_grad: torch.Tensor, stop: str, steps: int, cg_steps: int = 0,
                   preconditioner: str = "shared") -> dict:
    """converged, stop ('gradient' | 'stalled' | 'no-progress' | 'max_iter'), Newton iterations, their CG iterations,
    rel_grad (max over classes of ||g_k|| / ||g_k(0)|| at the returned point), the Gram factor's relative
    jitter, the dtype of the Hessian products and the preconditioner used."""
    liblinear_rule = _liblinear_rule(problem.Y)
    converged = stop in ("gradient", "stalled") or (stop == "no-progress" and bool((rel_grad <= liblinear_rule).all()))
    return {"converged": converged, "stop": stop, "iterations": steps, "cg_iterations": cg_steps,
            "rel_grad": float(rel_grad.max()),
            "jitter": problem.jitter, "hessian": str(problem.design.H.dtype).removeprefix("torch."),
            "preconditioner": preconditioner}


def _liblinear_rule(Y: torch.Tensor) -> torch.Tensor:
    """K: the relative gradient LinearSVC stops at, LIBLINEAR_TOL * max(min(#pos_k, #neg_k), 1) / N."""
    positives = (Y > 0).sum(0).double()
    return LIBLINEAR_TOL * torch.minimum(positives, Y.shape[0] - positives).clamp_min(1.0) / Y.shape[0]


def _objectives(V, scores, Y, C: float) -> torch.Tensor:
    """K objective values from the current scores (no extra pass over the data)."""
    hinge = (1.0 - Y * scores).clamp_min(0.0)
    return 0.5 * (V * V).sum(0) + C * (hinge * hinge).sum(0)


def fit(X, y, C: float, fit_intercept: bool = True, intercept_scaling: float = 1.0, tol: float = TOL,
        max_iter: int = MAX_ITER, device=None, warm_start: LinearModel | None = None, method: str = "auto",
        gram: torch.Tensor | None = None, preconditioner: str = "auto") -> LinearModel:
    """LinearSVC(C, loss='squared_hinge', penalty='l2', multi_class='ovr') fitted by truncated Newton;
    the model's `info` is the solver record."""
    problem = prepare(X, y, fit_intercept, intercept_scaling, device, method, gram, preconditioner)
    V0 = problem.from_model(warm_start) if warm_start is not None else None
    return problem.to_model(*_newton(problem, C, V0, tol, max_iter))


def fit_path(X, y, c_values: Sequence[float], fit_intercept: bool = True, intercept_scaling: float = 1.0,
             tol: float = TOL, max_iter: int = MAX_ITER, device=None, method: str = "auto",
             warm_start: LinearModel | None = None, gram: torch.Tensor | None = None,
             preconditioner: str = "auto") -> list[LinearModel]:
    """One model per C (in the given order), sharing one factorisation, each warm-started from the last."""
    problem = prepare(X, y, fit_intercept, intercept_scaling, device, method, gram, preconditioner)
    models, V = [], (problem.from_model(warm_start) if warm_start is not None else None)
    for C in c_values:
        V, info = _newton(problem, C, V, tol, max_iter)
        models.append(problem.to_model(V, info))
    return models


def fit_liblinear(X, y, C: float, fit_intercept: bool = True, intercept_scaling: float = 1.0, tol: float = 1e-6,
                  max_iter: int = 100000, **_) -> LinearModel:
    """The reference: scikit-learn's LinearSVC with the same objective."""
    from sklearn.svm import LinearSVC
    X = _as_numpy32(X)
    ref = LinearSVC(C=C, loss="squared_hinge", penalty="l2", fit_intercept=fit_intercept,
                    intercept_scaling=intercept_scaling, tol=tol, max_iter=max_iter, dual=X.shape[0] <= X.shape[1])
    ref.fit(X, y)
    b = ref.intercept_ if fit_intercept else np.zeros(len(ref.coef_))
    return LinearModel(ref.coef_.astype(np.float32), np.asarray(b, dtype=np.float32), ref.classes_,
                       intercept_scaling, fit_intercept)


def fit_c_path(X, y, c_values: Sequence[float], solver: str = "replearn", device=None,
               warm_start: LinearModel | None = None, gram: torch.Tensor | None = None) -> list[LinearModel]:
    if solver == "liblinear":
        return [fit_liblinear(X, y, C) for C in c_values]
    return fit_path(X, y, c_values, device=device, warm_start=warm_start, gram=gram)
