"""Linear L2-SVM (exactly scikit-learn's `LinearSVC` objective) and the evaluation protocol.

The objective
-------------
One-vs-rest over the K classes (one problem when K == 2, as LinearSVC). For class k, with
y_ik = +1 if example i is of class k else -1, and the bias handled as liblinear does it (an
extra feature of constant value s = `intercept_scaling`, whose weight v_k is regularised like
any other and gives b_k = s * v_k):

    min_{w_k, v_k}  0.5 * (||w_k||^2 + v_k^2) + C * sum_i max(0, 1 - y_ik (w_k . x_i + s v_k))^2

C is in LinearSVC's *sum* form; Coates' mean form C' * mean_i(...) is C = C' / N (`c_form`).
`LinearModel.objective` evaluates this sum over classes in float64.

The solver (`fit`, `fit_path`)
------------------------------
A primal truncated Newton method for all K classes at once (Keerthi & DeCoste 2005; liblinear's
TRON uses the same generalised Hessian). With a = augmented design, D_k = {i: 1 - y_ik a_i.w_k > 0}:
    gradient  g_k = w_k + 2C A^T [1_D (A w_k - y_k)]
    Hessian   H_k = I + 2C A_Dk^T A_Dk            (generalised: the loss is only C^1)
Each Newton step solves H_k d_k = -g_k by preconditioned CG, batched over the K columns, to a
residual of eta_k ||g_k|| with Eisenstat & Walker's forcing term eta_k = sqrt(||g_k|| / ||g_k(0)||)
clipped to [1e-3, 0.1], then takes the exact minimiser along d_k of the piecewise quadratic
(safeguarded 1-D Newton). It stops when ||g_k|| <= tol * ||g_k(w=0)|| for every k, tol = 1e-6
(liblinear's primal rule is 1e-4 * min(#pos, #neg) / N, about 1e-5 here, and can stop far from the
optimum for large C), or when an iteration no longer lowers the objective (the precision of float32
products).

The preconditioner is M = I + mu S with S = [A | s]^T [A | s] and mu = 2C * (mean active fraction):
one dense stand-in for all K Hessians, which captures what makes them ill-conditioned (features
with a large common mean and strongly correlated dimensions: trained critic features, standardised
K-means features). It is rebuilt only when mu moves by 1.5x. How M^-1 is applied:
- P <= 8192 (K-means features): S formed once, M Cholesky-factored;
- wider designs (28672-dim critic features, N > D) and Gram designs: a rank-384 randomized Nystrom approximation
  U diag(lam) U^T of S from two passes over the data (Frangella, Tropp & Udell 2023), inverted in
  closed form; CG then only sees the flat tail of the spectrum.

When N <= D (e.g. 4000 x 28672) the work moves into an N-dimensional space: the Gram matrix of the
augmented design, G = X X^T + s^2 (the intercept folded in as a constant feature; fp32 products,
float64 accumulation across blocks), is Cholesky-factored, G = L L^T, and Z = L (N x N) is a design
with Z Z^T = G. Any optimum has [w; v] = [X | s]^T beta (representer theorem), and
[w; v] = [X | s]^T L^-T u maps u in R^N to such w with scores Z u and ||w||^2 + v^2 = ||u||^2, so the
N-dim problem in u is the same problem. Solving in u costs N^2 K per product instead of N D K, and
one factorisation serves a whole C path (warm starts). There the preconditioner is always the
Nystrom one (two products with an N x 384 block per problem, nothing per mu). A tiny relative
jitter keeps Cholesky defined when G is numerically singular.

The protocol (`run`, PROTOCOL.md section 3)
-------------------------------------------
- validation: a seeded class-balanced `val_size` subset of the feature file's `train` split
  (the `test` split is a different HDF5 group, so the two never overlap);
- `400`: each C scored as the mean validation accuracy over `select_draws` class-balanced draws of
  `per_class` examples from train-minus-validation; the chosen C is then fit on `final_draws`
  class-balanced draws from the whole train split, each scored on test; reported mean and
  ci95 = 1.96 * std (population std) over the draws;
- `full`: C chosen by fitting train-minus-validation and scoring on validation, then a refit on all
  of train with that C, scored on test.
`fixed_c > 0` skips selection. Preprocessing: `l2_normalize` (per row), then `standardize`
(per-dim mean and std of the train split, sqrt(var + 1e-8)); `layers` picks feature layers.

Results JSON (accuracies are fractions in 0..1, C in sum form):
    {"config": {...}, "provenance": {...},
     "features": {"path": ..., "attrs": {kind, model, config, provenance, layer_names, ...}},
     "settings": {"full": {"c", "val_curve": {C: acc}, "test_acc", "seconds"},
                  "400":  {"c", "val_curve": {C: mean acc}, "val_draws": {C: [acc...]},
                           "draws": [acc...], "mean", "std", "ci95", "seconds"}}}
A PNG of validation accuracy against C is written beside it (`<out stem>.png`).
"""
from __future__ import annotations

import dataclasses
import functools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .config import ConfigError, register_preset, to_dict
from .store import FeatureFile
from .utils import atomic_path, atomic_write_json, pick_device, provenance

DEFAULT_C_GRID = (1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2)   # dcgan_code's grid, sum form
SOLVERS = ("replearn", "liblinear")
SETTINGS = ("full", "400")


# ============================================================================ the model
@dataclass
class LinearModel:
    W: np.ndarray                 # K x D float32 (K = 1 for two classes, as LinearSVC)
    b: np.ndarray                 # K float32
    classes: np.ndarray           # the sorted class labels
    intercept_scaling: float = 1.0
    fit_intercept: bool = True

    def decision_function(self, X) -> np.ndarray:
        """N x K scores (N for two classes)."""
        X = _as_numpy32(X)
        scores = X @ self.W.T + self.b                         # N x K
        return scores[:, 0] if len(self.classes) == 2 else scores

    def predict(self, X) -> np.ndarray:
        scores = self.decision_function(X)
        if scores.ndim == 1:
            return self.classes[(scores > 0).astype(int)]
        return self.classes[scores.argmax(1)]

    def objective(self, X, y, C: float) -> float:
        """sum_k 0.5 (||w_k||^2 + (b_k / s)^2) + C sum_i squared hinge, in float64."""
        X = _as_numpy32(X)
        Y = _sign_targets(np.asarray(y), self.classes)          # N x K
        margins = (X @ self.W.T).astype(np.float64) + self.b.astype(np.float64)
        hinge = np.maximum(0.0, 1.0 - Y * margins)
        reg = np.sum(self.W.astype(np.float64) ** 2)
        if self.fit_intercept:
            reg += np.sum((self.b.astype(np.float64) / self.intercept_scaling) ** 2)
        return float(0.5 * reg + C * np.sum(hinge ** 2))


def accuracy(model: LinearModel, X, y) -> float:
    return float(np.mean(model.predict(X) == np.asarray(y)))


def _as_numpy32(X) -> np.ndarray:
    if isinstance(X, torch.Tensor):
        X = X.detach().cpu().numpy()
    return np.asarray(X, dtype=np.float32)


def _sign_targets(y: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """N x K matrix of +-1 (one column, for classes[1], when there are two classes)."""
    cols = classes[1:] if len(classes) == 2 else classes
    return np.where(y[:, None] == cols[None, :], 1.0, -1.0)


# ============================================================================ designs
DENSE_PRECONDITIONER_MAX_DIM = 8192   # [A | s]^T [A | s] ((P+1)^2 float64) is formed and factorised up to this width
NYSTROM_RANK = 384                    # rank of the randomized preconditioner of wider designs


class _Design:
    """The augmented design [A | s * 1] as products; parameters V are (P + 1) x K, last row = bias.

    Every design also builds preconditioners M = I + mu * [A | s]^T [A | s] for the Newton systems
    I + 2C [A | s]^T D_k [A | s] (D_k: class k's active rows); mu = 2C * (mean active fraction) makes
    M a dense stand-in for all K Hessians at once. How M^-1 is applied depends on the shape.
    """

    def __init__(self, A: torch.Tensor, scale: float):
        self.A = A                # N x P float32 (features, or the N x N Gram factor)
        self.scale = scale        # 0 when there is no intercept (or it is folded in): the bias row then stays 0

    # Products run in A's dtype (float32); parameters, scores and
    # residuals stay float64 so that cancellation in the gradient does not limit the accuracy.
    def forward(self, V: torch.Tensor) -> torch.Tensor:        # (P+1) x K -> N x K
        return (self.A @ V[:-1].to(self.A.dtype)).double() + self.scale * V[-1]

    def backward(self, R: torch.Tensor) -> torch.Tensor:       # N x K -> (P+1) x K
        # R^T A is much faster than A^T R for a row-major A (one streaming pass)
        top = (R.to(self.A.dtype).T @ self.A).T.double()
        return torch.cat([top, self.scale * R.sum(0, keepdim=True)])

    def preconditioner(self, mu: float):
        """z = M^-1 r for M = I + mu [A | s]^T [A | s]."""
        if self.A.shape[1] <= DENSE_PRECONDITIONER_MAX_DIM:
            return self._dense(mu)
        return self._nystrom(mu)

    @functools.cached_property
    def _scatter(self) -> torch.Tensor:
        """[A | s]^T [A | s], (P+1) x (P+1) float64, formed once."""
        n, p = self.A.shape
        aug = torch.empty(p + 1, p + 1, dtype=torch.float64, device=self.A.device)
        aug[:p, :p] = (self.A.T @ self.A).double()
        col = self.scale * self.A.sum(0, dtype=torch.float64)
        aug[:p, p], aug[p, :p], aug[p, p] = col, col, self.scale ** 2 * n
        return aug

    def _dense(self, mu: float):
        S = self._scatter
        return _cholesky_solver(torch.eye(len(S), dtype=S.dtype, device=S.device) + mu * S)

    @functools.cached_property
    def _eigen(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(U, lam): a rank-NYSTROM_RANK Nystrom approximation U diag(lam) U^T of [A | s]^T [A | s]
        (Frangella, Tropp & Udell 2023, alg. 2.1): two passes over A with a block of random vectors."""
        p1 = self.A.shape[1] + 1
        g = torch.Generator(device="cpu").manual_seed(0)
        Q, _ = torch.linalg.qr(torch.randn(p1, min(NYSTROM_RANK, p1), generator=g, dtype=torch.float64)
                               .to(self.A.device))                                           # (P+1) x l
        Y = self.backward(self.forward(Q))                                                   # S Q
        shift = float(torch.finfo(torch.float32).eps * Y.norm())                             # fp32 products
        Y = Y + shift * Q
        B = torch.linalg.cholesky(Q.T @ Y)                                                   # l x l
        F = torch.linalg.solve_triangular(B, Y.T, upper=False).T                             # Y B^-T
        U, sigma, _ = torch.linalg.svd(F, full_matrices=False)
        return U, (sigma ** 2 - shift).clamp_min(0.0)

    def _nystrom(self, mu: float):
        U, lam = self._eigen
        floor = 1.0 + mu * float(lam[-1])            # M's eigenvalue estimate outside U's span
        gain = (1.0 / (1.0 + mu * lam) - 1.0 / floor)[:, None]
        return lambda r: U @ (gain * (U.T @ r)) + r / floor


def _cholesky_solver(M: torch.Tensor):
    """r -> M^-1 r by two triangular solves with M's Cholesky factor, stored row-major (torch's
    factor comes back column-major, where cholesky_solve runs several times slower than
    solve_triangular on a contiguous copy)."""
    R = torch.linalg.cholesky(M).contiguous()
    return lambda r: torch.linalg.solve_triangular(R.T, torch.linalg.solve_triangular(R, r, upper=False), upper=True)


class _GramDesign(_Design):
    """Z = L with L L^T = X X^T + s^2 1 1^T (the bias folded in as a constant feature), N x N.

    Products with L run in float32 (as the primal design's products with X do); the factorisation
    is float64. The preconditioner is always the Nystrom one: it costs two products with an N x l
    block once per problem, where a dense M costs an N x N Cholesky for every mu.
    """

    def __init__(self, L: torch.Tensor):
        super().__init__(L.float().contiguous(), 0.0)

    def preconditioner(self, mu: float):
        return self._nystrom(mu)


def _gram(X: torch.Tensor, block: int = 1024, dtype=torch.float64) -> torch.Tensor:
    """N x N Gram matrix from fp32 block products (lower blocks only, mirrored: ~56% of a full
    product), stored in `dtype` (float32 loses nothing: the products are float32)."""
    n = X.shape[0]
    G = torch.empty(n, n, dtype=dtype, device=X.device)
    for i in range(0, n, block):
        tile = (X[i:i + block] @ X[:i + block].T).to(dtype)                # the row panel left of the diagonal
        G[i:i + block, :i + block] = tile
        G[:i, i:i + block] = tile[:, :i].T
    return G


def _cholesky(G: torch.Tensor) -> torch.Tensor:
    """L with L L^T = G + jitter * I; jitter grows from 1e-9 of the mean diagonal until it works."""
    scale = float(G.diagonal().mean().clamp_min(1e-30))
    for rel in (0.0, 1e-9, 1e-8, 1e-7, 1e-6, 1e-5, 1e-4):
        jittered = G
        if rel:
            jittered = G.clone()
            jittered.diagonal().add_(rel * scale)
        L, info = torch.linalg.cholesky_ex(jittered)
        if int(info) == 0:
            return L.contiguous()        # torch returns the factor column-major
    raise RuntimeError("Gram matrix could not be factorised (are the features all zero or NaN?)")


@dataclass
class Problem:
    """Data prepared once for any number of C values: the design and how to map back to w."""
    X: torch.Tensor               # N x D float32 (the original features)
    design: _Design
    L: torch.Tensor | None        # N x N float64 Cholesky factor of X X^T + s^2 (bias folded in) in Gram space
    Y: torch.Tensor               # N x K float64 +-1
    classes: np.ndarray
    fit_intercept: bool
    intercept_scaling: float

    def to_model(self, V: torch.Tensor) -> LinearModel:
        s = self.intercept_scaling
        if self.L is not None:   # [w; v] = [X | s]^T L^-T u: w = X^T beta, v = s * sum(beta)
            beta = torch.linalg.solve_triangular(self.L.T, V[:-1], upper=True)               # N x K
            W = beta.T.float() @ self.X                                                       # K x D
            v = s * beta.sum(0)
        else:
            W, v = V[:-1].T, V[-1]
        b = s * v if self.fit_intercept else torch.zeros_like(v)
        return LinearModel(W.cpu().numpy().astype(np.float32), b.cpu().numpy().astype(np.float32), self.classes,
                           s, self.fit_intercept)

    def from_model(self, model: LinearModel) -> torch.Tensor:
        """Warm start: the parameters V that reproduce `model`'s scores on these rows."""
        W = torch.as_tensor(model.W, device=self.X.device).T                       # D x K
        bias = torch.as_tensor(model.b, device=self.X.device).double()
        if not self.fit_intercept:
            bias = torch.zeros_like(bias)
        if self.L is not None:   # u = L^-1 (X w + b): the same scores, bias included
            U = torch.linalg.solve_triangular(self.L, (self.X @ W).double() + bias, upper=False)
            return torch.cat([U, torch.zeros_like(bias)[None]])
        return torch.cat([W.double(), bias[None] / self.intercept_scaling])


def prepare(X, y, fit_intercept: bool = True, intercept_scaling: float = 1.0, device=None,
            method: str = "auto", gram: torch.Tensor | None = None) -> Problem:
    """method: 'gram' (N <= D), 'primal' (N > D) or 'auto'; `gram`: X X^T already computed (the
    protocol cuts each draw's block out of the whole train split's Gram matrix)."""
    device = pick_device("auto") if device is None else torch.device(device)
    X = torch.as_tensor(X).to(device=device, dtype=torch.float32)
    y = np.asarray(y)
    classes = np.unique(y)
    if len(classes) < 2:
        raise ConfigError(f"the SVM needs at least two classes, got {classes.tolist()}")
    Y = torch.as_tensor(_sign_targets(y, classes), dtype=torch.float64, device=device)   # N x K
    n, d = X.shape
    scale = intercept_scaling if fit_intercept else 0.0
    if gram is not None or method == "gram" or (method == "auto" and n <= d):
        G = _gram(X) if gram is None else gram.to(device=device, dtype=torch.float64, copy=True)
        L = _cholesky(G.add_(scale ** 2))            # [X | s] [X | s]^T = L L^T
        return Problem(X, _GramDesign(L), L, Y, classes, fit_intercept, intercept_scaling)
    return Problem(X, _Design(X, scale), None, Y, classes, fit_intercept, intercept_scaling)


# ============================================================================ truncated Newton
def _gradient(design: _Design, Y, V, scores, C: float):
    active = ((1.0 - Y * scores) > 0).float()                                     # N x K
    return V + 2.0 * C * design.backward(active * (scores - Y)), active


def _cg(design: _Design, active, C: float, G, apply_m, rel_tol=1e-3, max_iter: int = 1000):
    """Solve (I + 2C A^T D_k A) d_k = -g_k for every column k by preconditioned CG, to a residual of
    rel_tol * ||g_k|| (rel_tol: a float or one value per column)."""
    d = torch.zeros_like(G)
    r = -G
    z = apply_m(r)
    p = z.clone()
    rz = (r * z).sum(0, dtype=torch.float64)
    target = rel_tol * G.norm(dim=0)
    for _ in range(max_iter):
        if bool((r.norm(dim=0) <= target).all()):
            break
        Hp = p + 2.0 * C * design.backward(active * design.forward(p))
        pHp = (p * Hp).sum(0, dtype=torch.float64).clamp_min(1e-300)
        alpha = torch.where(r.norm(dim=0) > target, rz / pHp, 0.0)
        d += alpha * p
        r -= alpha * Hp
        z = apply_m(r)
        rz_new = (r * z).sum(0, dtype=torch.float64)
        p = z + (rz_new / rz.clamp_min(1e-300)) * p
        rz = rz_new
    return d


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


def solve(problem: Problem, C: float, V0: torch.Tensor | None = None, tol: float = 1e-6,
          max_iter: int = 100) -> torch.Tensor:
    """Parameters V ((P+1) x K) minimising every class's objective; V0 warm-starts.

    Cold starts with a large C (C * sum_i ||x_i||^2 >> 1) spend many short Newton steps after
    the first, which overshoots: fit a C path from small C instead (`fit_path`).
    """
    return _newton(problem, C, V0, tol, max_iter)


def _newton(problem: Problem, C: float, V0: torch.Tensor | None, tol: float, max_iter: int) -> torch.Tensor:
    design, Y = problem.design, problem.Y
    V = torch.zeros(design.A.shape[1] + 1, Y.shape[1], dtype=torch.float64, device=Y.device) if V0 is None \
        else V0.clone()
    g0_norm = (2.0 * C * design.backward(-Y)).norm(dim=0)                        # gradient at V = 0
    target = tol * g0_norm
    scores = design.forward(V)
    previous = _objectives(V, scores, Y, C)
    apply_m, mu_m = None, 0.0
    for _ in range(max_iter):
        G, active = _gradient(design, Y, V, scores, C)
        if bool((G.norm(dim=0) <= target).all()):
            break
        # the preconditioner is rebuilt only when the active fraction has moved by over 1.5x: a dense
        # build is a factorisation (Nystrom ones reuse their cached eigenpairs), and a slightly stale
        # M costs a few CG steps at most
        mu = 2.0 * C * max(float(active.mean()), 1e-3)
        if apply_m is None or not 1 / 1.5 < mu / mu_m < 1.5:
            apply_m, mu_m = design.preconditioner(mu), mu
        # inexact Newton (Eisenstat & Walker's forcing term): loose directions while far from the
        # optimum, tight (down to 1e-3) near it, where the fast local convergence pays
        forcing = (G.norm(dim=0) / g0_norm.clamp_min(1e-300)).sqrt().clamp(1e-3, 0.1)
        d = _cg(design, active, C, G, apply_m, forcing)
        Ad = design.forward(d)
        t = _line_search(V, d, scores, Ad, Y, C)
        V = V + t * d
        scores = scores + t * Ad
        current = _objectives(V, scores, Y, C)
        # stop when rounding, not the method, limits progress (fp32 products in the primal design)
        if bool(((previous - current) <= 1e-12 * current.abs()).all()):
            break
        previous = current
    return V


def _objectives(V, scores, Y, C: float) -> torch.Tensor:
    """K objective values from the current scores (no extra pass over the data)."""
    hinge = (1.0 - Y * scores).clamp_min(0.0)
    return 0.5 * (V * V).sum(0) + C * (hinge * hinge).sum(0)


def fit(X, y, C: float, fit_intercept: bool = True, intercept_scaling: float = 1.0, tol: float = 1e-6,
        max_iter: int = 100, device=None, warm_start: LinearModel | None = None, method: str = "auto",
        gram: torch.Tensor | None = None) -> LinearModel:
    """LinearSVC(C, loss='squared_hinge', penalty='l2', multi_class='ovr') fitted by truncated Newton."""
    problem = prepare(X, y, fit_intercept, intercept_scaling, device, method, gram)
    V0 = problem.from_model(warm_start) if warm_start is not None else None
    return problem.to_model(solve(problem, C, V0, tol, max_iter))


def fit_path(X, y, c_values: Sequence[float], fit_intercept: bool = True, intercept_scaling: float = 1.0,
             tol: float = 1e-6, max_iter: int = 100, device=None, method: str = "auto",
             warm_start: LinearModel | None = None, gram: torch.Tensor | None = None) -> list[LinearModel]:
    """One model per C (in the given order), sharing one factorisation, each warm-started from the last."""
    problem = prepare(X, y, fit_intercept, intercept_scaling, device, method, gram)
    models, V = [], (problem.from_model(warm_start) if warm_start is not None else None)
    for C in c_values:
        V = solve(problem, C, V, tol, max_iter)
        models.append(problem.to_model(V))
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


# ============================================================================ protocol
@dataclass(frozen=True)
class Config:
    features: str = "runs/features.h5"     # a feature file with `train` and `test` splits
    out: str = ""                          # results JSON; '' = <features stem>.svm.json beside it
    settings: tuple[str, ...] = SETTINGS   # 'full' and/or '400'
    c_grid: tuple[float, ...] = DEFAULT_C_GRID   # dcgan_code's grid (LinearSVC sum form)
    c_form: str = "sum"                    # 'mean': c_grid / fixed_c are Coates' mean form, C_sum = C / N
    fixed_c: float = 0.0                   # > 0: use this C, skip selection (Coates: 100 with c_form=mean)
    per_class: int = 400                   # the 400-per-class setting
    select_draws: int = 10                 # draws scoring each C (dcgan_code)
    final_draws: int = 100                 # draws for the reported mean +- 1.96 std (dcgan_code)
    val_size: int = 10000                  # validation held out of train (dcgan_code)
    seed: int = 0
    solver: str = "replearn"               # or 'liblinear' (scikit-learn LinearSVC, slow reference)
    standardize: bool = False              # the DCGAN code used none; Coates standardised
    l2_normalize: bool = False             # per-row, as VISSL
    layers: tuple[int, ...] = ()           # feature layer indices; empty = all
    # 400 per class: 'auto' computes the Gram matrix of all train rows once (float32, N^2 x 4 bytes)
    # when the draws would otherwise compute more products than it and it fits in memory; each draw
    # then cuts its block out of it. 'on' forces it, 'off' computes a Gram matrix per draw.
    gram_cache: str = "auto"
    device: str = "auto"
    preset: str = ""


# smoke: minutes on a 2-core CPU. Trained smoke critics give features with mean ||x||^2 ~ 2e4, so
# dcgan_code's grid is a very large effective C for them: the smoke grid sits three decades lower,
# with fewer draws; both settings run (the full one by Nystrom-preconditioned truncated Newton).
register_preset("smoke", "svm", final_draws=10, select_draws=3, c_grid=(1e-6, 1e-5, 1e-4))
register_preset("paper", "svm")


def check_config(cfg: Config) -> None:
    if not cfg.settings or any(s not in SETTINGS for s in cfg.settings):
        raise ConfigError(f"svm settings {cfg.settings} invalid; choose from: {', '.join(SETTINGS)}")
    if cfg.solver not in SOLVERS:
        raise ConfigError(f"unknown svm solver {cfg.solver!r}; choose from: {', '.join(SOLVERS)}")
    if cfg.gram_cache not in ("auto", "on", "off"):
        raise ConfigError(f"unknown gram_cache {cfg.gram_cache!r}; choose from: auto, on, off")
    if cfg.c_form not in ("sum", "mean"):
        raise ConfigError(f"unknown c_form {cfg.c_form!r}; choose from: sum, mean")
    if cfg.fixed_c <= 0 and (not cfg.c_grid or min(cfg.c_grid) <= 0):
        raise ConfigError(f"c_grid must hold positive values, got {cfg.c_grid}")
    if min(cfg.per_class, cfg.select_draws, cfg.final_draws, cfg.val_size) < 1:
        raise ConfigError("per_class, select_draws, final_draws and val_size must be >= 1")


def balanced_draw(labels: np.ndarray, per_class: int, rng: np.random.Generator,
                  pool: np.ndarray | None = None) -> np.ndarray:
    """Sorted indices: `per_class` examples of every class, drawn without replacement from `pool`."""
    pool = np.arange(len(labels)) if pool is None else np.asarray(pool)
    picks = []
    for cls in np.unique(labels[pool]):
        members = pool[labels[pool] == cls]
        if len(members) < per_class:
            raise ConfigError(f"class {cls} has only {len(members)} examples, fewer than per_class={per_class}; "
                              f"lower per_class or val_size")
        picks.append(rng.choice(members, per_class, replace=False))
    return np.sort(np.concatenate(picks))


def split_validation(labels: np.ndarray, val_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train-minus-val, val) indices into the train split; val is class-balanced and seeded."""
    n_classes = len(np.unique(labels))
    val = balanced_draw(labels, val_size // n_classes, np.random.default_rng([seed, 1]))
    rest = np.setdiff1d(np.arange(len(labels)), val)
    return rest, val


def draw_rng(seed: int, purpose: int, draw: int) -> np.random.Generator:
    """Independent reproducible streams: purpose 2 = selection draws, 3 = final draws."""
    return np.random.default_rng([seed, purpose, draw])


def _preprocess_inplace(X: np.ndarray, cfg: Config, stats: tuple[np.ndarray, np.ndarray] | None,
                        block: int = 4096) -> None:
    for start in range(0, len(X), block):
        rows = X[start:start + block]
        if cfg.l2_normalize:
            rows /= np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
        if stats is not None:
            rows -= stats[0]
            rows /= stats[1]


def _column_stats(X: np.ndarray, block: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Per-dim mean and sqrt(var + 1e-8), accumulated in float64."""
    total = np.zeros(X.shape[1])
    total_sq = np.zeros(X.shape[1])
    for start in range(0, len(X), block):
        rows = X[start:start + block].astype(np.float64)
        total += rows.sum(0)
        total_sq += (rows * rows).sum(0)
    mean = total / len(X)
    var = np.maximum(total_sq / len(X) - mean * mean, 0.0)
    return mean.astype(np.float32), np.sqrt(var + 1e-8).astype(np.float32)


def load_train(ff: FeatureFile, order: np.ndarray, cfg: Config) -> np.ndarray:
    """Train rows in the given order, as ONE float32 array (the only working copy), preprocessed."""
    cols = ff.columns(cfg.layers)
    X = np.empty((len(order), ff.offsets[-1] if cols is None else len(cols)), dtype=np.float32)   # N x D
    position = np.empty(ff.num_rows("train"), dtype=np.int64)
    position[order] = np.arange(len(order))
    for idx, block in ff.iter_blocks("train", order, layers=cfg.layers):
        X[position[idx]] = block
    if cfg.l2_normalize:
        _preprocess_inplace(X, dataclasses.replace(cfg, standardize=False), None)
    return X


def score_on_split(ff: FeatureFile, split: str, models: list[LinearModel], cfg: Config,
                   stats) -> list[float]:
    """Accuracy of every model on a whole split, reading it once in blocks."""
    labels = ff.labels(split)
    correct = np.zeros(len(models))
    for idx, block in ff.iter_blocks(split, layers=cfg.layers):
        _preprocess_inplace(block, cfg, stats)
        for m, model in enumerate(models):
            correct[m] += np.sum(model.predict(block) == labels[idx])
    return (correct / len(labels)).tolist()


def _sum_c(c: float, n: int, cfg: Config) -> float:
    return c / n if cfg.c_form == "mean" else c


def _grid(cfg: Config, n: int) -> list[float]:
    return [_sum_c(cfg.fixed_c, n, cfg)] if cfg.fixed_c > 0 else [_sum_c(c, n, cfg) for c in cfg.c_grid]


def _pick(curve: dict[float, float]) -> float:
    """The C with the best validation accuracy (the smallest such C on ties)."""
    best = max(curve.values())
    return min(c for c, acc in curve.items() if acc == best)


def _fit_models(X, y, cs, cfg: Config, device, warm_start: LinearModel | None = None,
                gram: torch.Tensor | None = None) -> list[LinearModel]:
    return fit_c_path(X, y, cs, cfg.solver, device, warm_start, gram)


def _available_memory() -> int:
    """Bytes of memory available now (Linux MemAvailable: free plus reclaimable page cache; a large
    number where /proc/meminfo is missing, so that 'auto' then trusts the user)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def train_gram(X: np.ndarray, n_fit: int, n_draws: int, cfg: Config, device) -> torch.Tensor | None:
    """X X^T over all train rows (float32, on `device`) when `gram_cache` says so, else None.

    'auto' builds it when the draws' own Gram matrices would cost more products (n_draws * n_fit^2
    against n^2 / 2: each is computed as lower panels) and it takes under half of the available memory.
    """
    n, d = X.shape
    if cfg.solver != "replearn" or cfg.gram_cache == "off" or n_fit > d:
        return None
    free = _available_memory() if torch.device(device).type == "cpu" else torch.cuda.mem_get_info(device)[0]
    if cfg.gram_cache == "auto" and (n_draws * n_fit ** 2 < n * n / 2 or 4 * n * n > free / 2):
        return None
    return _gram(torch.from_numpy(X).to(device), dtype=torch.float32)


def run_400(X: np.ndarray, y: np.ndarray, n_rest: int, ff: FeatureFile, cfg: Config, stats, device,
            bar) -> dict:
    start = time.time()
    n_fit = cfg.per_class * len(np.unique(y))
    cs = _grid(cfg, n_fit)
    gram_all = train_gram(X, n_fit, cfg.final_draws + (cfg.select_draws if len(cs) > 1 else 0), cfg, device)

    def gram_of(idx):   # this draw's block of the cached Gram matrix
        if gram_all is None:
            return None
        rows = torch.as_tensor(idx, device=gram_all.device)
        return gram_all[rows[:, None], rows[None, :]]
    val_draws: dict[float, list[float]] = {c: [] for c in cs}
    if len(cs) > 1:
        X_val, y_val = X[n_rest:], y[n_rest:]
        for draw in range(cfg.select_draws):
            idx = balanced_draw(y, cfg.per_class, draw_rng(cfg.seed, 2, draw), pool=np.arange(n_rest))
            for c, model in zip(cs, _fit_models(X[idx], y[idx], cs, cfg, device, gram=gram_of(idx))):
                val_draws[c].append(accuracy(model, X_val, y_val))
            bar.update(len(cs))
    curve = {c: float(np.mean(v)) for c, v in val_draws.items() if v}
    chosen = _pick(curve) if curve else cs[0]
    selected_at = time.time()
    models: list[LinearModel] = []
    for draw in range(cfg.final_draws):
        idx = balanced_draw(y, cfg.per_class, draw_rng(cfg.seed, 3, draw))
        # the previous draw's solution is close to this one's: fewer Newton steps
        models.append(_fit_models(X[idx], y[idx], [chosen], cfg, device, models[-1] if models else None,
                                  gram_of(idx))[0])
        bar.update(1)
    draws = score_on_split(ff, "test", models, cfg, stats)
    return {"c": chosen, "val_curve": curve, "val_draws": {c: v for c, v in val_draws.items() if v},
            "draws": draws, "mean": float(np.mean(draws)), "std": float(np.std(draws)),
            "ci95": float(1.96 * np.std(draws)), "seconds": time.time() - start,
            "selection_seconds": selected_at - start, "final_seconds": time.time() - selected_at,
            "gram_cache": gram_all is not None}


def run_full(X: np.ndarray, y: np.ndarray, n_rest: int, ff: FeatureFile, cfg: Config, stats, device,
             bar) -> dict:
    start = time.time()
    curve: dict[float, float] = {}
    warm = None
    if cfg.fixed_c <= 0:
        cs = _grid(cfg, n_rest)
        path = _fit_models(X[:n_rest], y[:n_rest], cs, cfg, device)                    # views, no copy
        for c, model in zip(cs, path):
            curve[c] = accuracy(model, X[n_rest:], y[n_rest:])
        bar.update(len(cs))
        chosen_rest = _pick(curve)
        warm = path[cs.index(chosen_rest)]    # the refit over all of train starts from it
        # the same mean-form C over more rows is a smaller sum-form C
        chosen = chosen_rest * n_rest / len(X) if cfg.c_form == "mean" else chosen_rest
    else:
        chosen = _grid(cfg, len(X))[0]
    model = _fit_models(X, y, [chosen], cfg, device, warm)[0]
    bar.update(1)
    return {"c": chosen, "val_curve": curve, "test_acc": score_on_split(ff, "test", [model], cfg, stats)[0],
            "seconds": time.time() - start}


def default_out(cfg: Config) -> Path:
    return Path(cfg.out) if cfg.out else Path(cfg.features).with_suffix(".svm.json")


def plot_curves(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, res in results.items():
        if res.get("val_curve"):
            cs = sorted(res["val_curve"])
            ax.plot(cs, [100 * res["val_curve"][c] for c in cs], marker="o", label=f"{name} (C={res['c']:.3g})")
    if ax.lines:
        ax.legend()
    ax.set_xscale("log")
    ax.set_xlabel("C (LinearSVC sum form)")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title(f"L2-SVM C selection: {path.stem}")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def run(cfg: Config) -> Path:
    """Evaluate a feature file with the linear L2-SVM protocol (full and 400 per class) -> results JSON."""
    from tqdm import tqdm
    check_config(cfg)
    out = default_out(cfg)
    device = pick_device(cfg.device)
    with FeatureFile(cfg.features) as ff:
        ff.require_split("test")
        labels = ff.labels("train")
        if cfg.val_size >= len(labels):
            raise ConfigError(f"val_size={cfg.val_size} leaves no training rows in {cfg.features}; lower val_size")
        rest, val = split_validation(labels, cfg.val_size, cfg.seed)
        order = np.concatenate([rest, val])        # train-minus-val first, so both parts are views
        X, y = load_train(ff, order, cfg), labels[order]
        stats = _column_stats(X) if cfg.standardize else None
        if stats is not None:
            _preprocess_inplace(X, dataclasses.replace(cfg, l2_normalize=False), stats)
        n_sel = (len(cfg.c_grid) if cfg.fixed_c <= 0 else 0)
        total = ("400" in cfg.settings) * (n_sel * cfg.select_draws + cfg.final_draws) + ("full" in cfg.settings) * (n_sel + 1)
        results = {}
        with tqdm(total=total, desc="svm fits", unit="fit") as bar:
            for name in cfg.settings:
                runner = run_400 if name == "400" else run_full
                results[name] = runner(X, y, len(rest), ff, cfg, stats, device, bar)
        feature_info = {"path": str(cfg.features), "attrs": ff.attrs}
    record = {"config": to_dict(cfg), "provenance": provenance(), "features": feature_info,
              "validation": {"size": int(len(val)), "seed": cfg.seed, "from": "train"}, "settings": results}
    atomic_write_json(out, _json_keys(record))
    plot_curves(results, out.with_suffix(".png"))
    return out


def _json_keys(obj):
    """JSON object keys must be strings: C values become repr-exact strings."""
    if isinstance(obj, dict):
        return {(k if isinstance(k, str) else repr(float(k))): _json_keys(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_json_keys(v) for v in obj]
    return obj
