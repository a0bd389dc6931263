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
(no smaller than half the stopping target over ||g_k||) clipped to [1e-3, 0.1], then takes the exact
minimiser along d_k of the piecewise quadratic
(safeguarded 1-D Newton). It stops when ||g_k|| <= tol * ||g_k(w=0)|| for every k, tol = 1e-6
(liblinear's primal rule is 1e-4 * min(#pos, #neg) / N, about 1e-5 here, and can stop far from the
optimum for large C); when every class is past liblinear's rule and its last step lowered its
objective by under STALL_DECREASE = 1e-7 (relative: large-C fits near a degenerate optimum, see the
constant); or when an iteration no longer lowers the objective (the precision of float32 products).

The preconditioner is M = I + mu S with S = [A | s]^T [A | s] and mu = 2C * (mean active fraction):
one dense stand-in for all K Hessians, which captures what makes them ill-conditioned (features
with a large common mean and strongly correlated dimensions: trained critic features, standardised
K-means features). It is rebuilt only when mu moves by 1.5x. How M^-1 is applied:
- P <= 8192 (K-means features): S formed once, M Cholesky-factored;
- wider designs (28672-dim critic features, N > D) and Gram designs: a rank-384 randomized Nystrom approximation
  U diag(lam) U^T of S from two passes over the data (Frangella, Tropp & Udell 2023), inverted in
  closed form; CG then only sees the flat tail of the spectrum.
Per class (`preconditioner`: 'auto' by default = per class in primal designs, and in Gram designs once
a CG solve takes over CLASS_SWITCH_CG iterations; 'shared' = the M above for every class): on the
sketch's span U each class gets its own exact block T_k = U^T H_k U = I + 2C B^T D_k B (B = [A | s] U,
one extra pass, cached), rebuilt every Newton step; outside U a constant. One scatter cannot stand in
for K active sets of positives and hard negatives: on 12,000 x 28672 trained-critic rows at a
full-setting C this took 5 Newton steps and 15 CG iterations against 10 and 93 (3.3x less time).
Sampled (`preconditioner='rows'`, opt-in):
M_k = I + 2C (N/m) S_mk^T S_mk, class k's Hessian estimated from the active rows of a seeded sample
of m = ROW_SAMPLE rows (subsampled Newton), inverted by Woodbury through one m_k x m_k Cholesky
factor per class and Newton step. Where the rank-384 sketch keeps only the top of the spectrum, the
sample spans 4096 directions of the whole spectrum, tail included. Measured on trained BN-critic rows
(1000 steps): 40,000 rows at C = 6.98e-5, 40 CG iterations (120 s) where the per-class sketch took 25
(56 s); 20,000 rows at C = 0.0014, 87 (99 s) against 73 (62 s). The per-class sketch stays the default.
The sketch and its scores B are taken on the float32 design: built on the bf16 copy H (products
rounded to 3 digits, an error that T_k amplifies by 2C lam in the top directions), the same 40,000-row
fit's CG took 41-52 iterations a Newton step and did not finish in 4 steps (113 s).
Primal designs of BF16_HESSIAN_MIN_ELEMENTS or more (40,000 x 28672) take CG's Hessian products and
the Nystrom sketch on a bfloat16 copy where the hardware has bf16 units; the gradient, line search
and stopping rule keep the float32 design, so the optimum is the float32 problem's.

When N <= D (e.g. 4000 x 28672) the work moves into an N-dimensional space: the Gram matrix of the
augmented design, G = X X^T + s^2 (the intercept folded in as a constant feature; fp32 products,
float64 accumulation across blocks), is Cholesky-factored, G = L L^T, and Z = L (N x N) is a design
with Z Z^T = G. Any optimum has [w; v] = [X | s]^T beta (representer theorem), and
[w; v] = [X | s]^T L^-T u maps u in R^N to such w with scores Z u and ||w||^2 + v^2 = ||u||^2, so the
N-dim problem in u is the same problem. Solving in u costs N^2 K per product instead of N D K, and
one factorisation serves a whole C path (warm starts). The model's w = X^T beta is summed in
float64 (critic feature rows share a large mean and beta's signs are mixed, so the sum cancels).
There the preconditioner is always the Nystrom one (two products with an N x 384 block per problem,
nothing per mu). A tiny relative jitter keeps Cholesky defined when G is numerically singular.

Solver record: every replearn fit sets `LinearModel.info` (None for liblinear) = {converged, stop
('gradient' | 'stalled' | 'no-progress' | 'max_iter'), iterations (Newton steps), cg_iterations (their CG steps),
rel_grad (max over classes of ||g_k|| / ||g_k(0)|| at the returned point), jitter (the Gram factor's
relative Cholesky jitter, 0 in the primal), hessian (the dtype of the Hessian products), preconditioner
('shared', 'class' or 'shared, then class'), tol (the relative gradient it stopped at, or 'liblinear':
every class at `_liblinear_rule`, LinearSVC's own stopping point)}. A
'no-progress' stop counts as converged only when every class also meets the rule LinearSVC itself
stops at (liblinear's primal: rel_grad_k <= 1e-4 * min(#pos_k, #neg_k) / N).

The protocol (`run`, docs/protocol.md s.3)
------------------------------------------
- validation: a seeded class-balanced `val_size` subset of the feature file's `train` split
  (the `test` split is a different HDF5 group, so the two never overlap);
- `400`: each C scored as the mean validation accuracy over `select_draws` class-balanced draws of
  `per_class` examples from train-minus-validation; the chosen C is then fit on `final_draws`
  class-balanced draws from the whole train split, each scored on test as soon as it is fitted;
  reported mean and ci95 = 1.96 * std (population std) over the draws;
- `full`: C chosen by fitting train-minus-validation and scoring on validation, then a refit on all
  of train, scored on test. The refit C rule: with c_form=sum the chosen (sum-form) C is kept as is
  for the n > n_rest rows (LinearSVC's convention); with c_form=mean the mean-form C is kept, i.e. the
  sum-form C becomes C * n_rest / n (`refit_c_rule` in the results says which).
`fixed_c > 0` skips selection. Preprocessing: `l2_normalize` (per row), then `standardize`
(per-dim mean and std of the train split, sqrt(var + 1e-8)), then `layer_scale=equal` (each layer's
block rescaled to an equal share of the train rows' mean squared norm); `layers` picks feature layers.

C search (both settings, `bracket`): the starting grid is `c_grid` in sum form, times
NORM_REFERENCE / mean_i ||x_i||^2 of the preprocessed train rows with c_scale=norm (the smoke
preset; NORM_REFERENCE = 200, see its comment), as given with c_scale=none (paper). After scoring it,
while the largest C scored attains the best score (ties included: the score has not fallen below the
best above it), C_max * 10 is scored too (upward paths warm-start from the largest C's solution), and
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

Checks before any fit (one line each, naming the file): per split, as many feature rows as labels,
integer labels >= 0; both splits equally wide; finite features (train as it is read, test scanned
when loaded); every test class present in train.

Progress and reuse: `<out stem>.partial.json` (atomic) holds the finished settings and, within
`400`, the selection scores per C and draw and the final draws' test accuracies so far, for one
config and one feature file (its `key` attr, else path|size|mtime). A rerun of the same config
resumes from it (recorded in `resumed_from`) and reproduces the uninterrupted run's numbers: every
fit depends only on its draw and C (final draws warm-start from draw 0's model, refitted cold after a
resume; an upward selection extension from its draw's previous model, refitted by the same steps).
A completed run writes the results and removes the progress file. The results carry
`key` = stage.artifact_key("svm", config less out/device/gram_cache/preset, features=identity); when
`out` holds a complete result with the same key, `run` returns it without fitting.

Results JSON (accuracies are fractions in 0..1, C in sum form):
    {"config", "key", "complete": true, "provenance", "resumed_from": null | {...},
     "features": {"path", "identity", "attrs": {kind, model, config, provenance, layer_names, ...}},
     "validation", "c_scale": {"mode", "factor", "reference_mean_sq_norm"},
     "settings": {"full": {"c" (refit C), "c_select", "refit_c_rule", "val_curve": {C: acc}, "grid",
                           "c_at_edge", "c_extended": {"up", "down"}, "c_scale_factor", "presearch",
                           "test_acc", "solver", "seconds"},
                  "400":  {"c", "val_curve": {C: mean acc}, "val_draws": {C: [acc...]}, "grid", "c_at_edge",
                           "c_extended", "c_scale_factor", "draws": [acc...], "mean", "std", "ci95",
                           "solver", "seconds", "selection_seconds", "final_seconds", "gram_cache"}}}
    solver = {fits, recorded, converged_fits, not_converged: [[C, "select 3" | "final 7" | "select" |
              "refit" | "presearch", rel_grad, stop]...], max_rel_grad, max_iterations, max_jitter,
              fit_seconds: {"select" | "final" | "presearch" | "refit": seconds}, cg_iterations (all fits),
              stop_rules: {kind: [1e-06 | "liblinear"]} (the `tol` each kind of fit stopped at)}
A PNG of validation accuracy against C is written beside it (`<out stem>.png`).
"""
from __future__ import annotations

import base64
import dataclasses
import functools
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..core.config import ConfigError, register_check, register_preset, to_dict
from ..core.lock import building
from ..core.stage import artifact_key, keyed
from ..train.runs import read_json
from ..core.store import FeatureFile
from ..core.utils import atomic_path, atomic_write_json, bf16_supported, check_writable, pick_device, provenance

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
    info: dict | None = None      # the replearn solver's record of the fit (`_newton`); None for liblinear

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
ROW_SAMPLE = 4096                     # rows of the sampled preconditioner (`_Design.sampled_preconditioner`)
BACKWARD_ROWS = 2048                  # rows per block of the backward product (`_Design.backward`)


class _Design:
    """The augmented design [A | s * 1] as products; parameters V are (P + 1) x K, last row = bias.

    Every design also builds preconditioners M = I + mu * [A | s]^T [A | s] for the Newton systems
    I + 2C [A | s]^T D_k [A | s] (D_k: class k's active rows); mu = 2C * (mean active fraction) makes
    M a dense stand-in for all K Hessians at once. How M^-1 is applied depends on the shape.
    """

    def __init__(self, A: torch.Tensor, scale: float, hessian_dtype: torch.dtype | None = None,
                 preconditioning: str = "shared"):
        self.A = A                # N x P float32 (features, or the N x N Gram factor)
        self.scale = scale        # 0 when there is no intercept (or it is folded in): the bias row then stays 0
        # 'shared' (`preconditioner`), 'class' (`class_preconditioner`) or 'auto': shared until a Newton
        # step's CG needs more than CLASS_SWITCH_CG iterations, per class from then on within that fit
        self.preconditioning = preconditioning
        # the copy of A that Hessian products and the preconditioner's sketch use (`_hessian_dtype`)
        self.H = A if hessian_dtype in (None, A.dtype) else A.to(hessian_dtype)

    # Products run in A's dtype (float32); parameters, scores and
    # residuals stay float64 so that cancellation in the gradient does not limit the accuracy.
    def forward(self, V: torch.Tensor, A: torch.Tensor | None = None) -> torch.Tensor:   # (P+1) x K -> N x K
        A = self.A if A is None else A
        # as A W^T with W = V^T made contiguous (K x P): for K ~ 10 columns MKL's sgemm ran this layout in
        # 0.95 s against 1.5-1.9 s for A @ V on a 50,000 x 28672 A (2 AVX2 cores; the pass's bandwidth
        # floor is 0.25 s): CG's products are these skinny passes
        return F.linear(A, V[:-1].T.to(A.dtype).contiguous()).double() + self.scale * V[-1]

    def backward(self, R: torch.Tensor, A: torch.Tensor | None = None) -> torch.Tensor:  # N x K -> (P+1) x K
        # R^T A is much faster than A^T R for a row-major A (one streaming pass), and faster again in
        # blocks of BACKWARD_ROWS rows summed in float64: on 40,000 x 28672 rows (2 Zen 4 cores) the bf16
        # product took 0.22 s blocked against 0.34 s whole (float32: the same, 0.9-1.0 s). A bf16 block's
        # output is rounded to bf16 once per block, not once in all: no less accurate than the whole product
        A = self.A if A is None else A
        Rt = R.to(A.dtype).T.contiguous()                                              # K x N
        top = torch.zeros(R.shape[1], A.shape[1], dtype=torch.float64, device=A.device)  # K x P
        for start in range(0, A.shape[0], BACKWARD_ROWS):
            top += Rt[:, start:start + BACKWARD_ROWS] @ A[start:start + BACKWARD_ROWS]
        return torch.cat([top.T, self.scale * R.sum(0, keepdim=True)])

    def hessian_product(self, p: torch.Tensor, active: torch.Tensor, C: float) -> torch.Tensor:
        """(I + 2C [A | s]^T D_k [A | s]) p_k for every column k, the products on H."""
        return p + 2.0 * C * self.backward(active * self.forward(p, self.H), self.H)

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
        # on A, not on H's bf16 copy: a bf16 product rounds its output to 3 digits, and T_k amplifies an
        # error in the top directions by 2C lam (~1e5): sketched on H, the 40,000-row fits' CG took 41-52
        # iterations a Newton step at the bracket's smallest C (three fp32 passes of l columns instead)
        Y = self.backward(self.forward(Q))                                                   # S Q
        shift = float(torch.finfo(self.A.dtype).eps * Y.norm())                              # A's products
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

    @functools.cached_property
    def _sketch_scores(self) -> torch.Tensor:
        """[A | s] U (N x l, stored float32, the product on A like the sketch): the rows' coordinates in the
        sketch's span, one pass."""
        U, _ = self._eigen
        return self.forward(U).float()

    def class_preconditioner(self, C: float, active: torch.Tensor):
        """z_k = M_k^-1 r_k, one M_k per class: exact on the sketch's span U, a constant outside it,
            M_k = U T_k U^T + floor_k (I - U U^T),  T_k = U^T H_k U = I + 2C B^T D_k B  (B = [A | s] U),
        floor_k = 1 + 2C f_k lam_l (f_k: class k's active fraction). Where the shared M = I + mu S
        stands one scatter in for all K Hessians, T_k sees class k's own active rows and the couplings
        between the sketch's directions (an active set of positives and hard negatives is not a scaled
        copy of all rows). Built every Newton step: K products N x l x l, against l passes over A."""
        U, lam = self._eigen
        B = self._sketch_scores                                                        # N x l
        eye = torch.eye(U.shape[1], dtype=torch.float64, device=U.device)
        T = torch.stack([eye + 2.0 * C * ((B * active[:, k:k + 1].float()).T @ B).double()
                         for k in range(active.shape[1])])                             # K x l x l
        R, _ = torch.linalg.cholesky_ex(T)                                             # SPD: I + PSD
        floor = 1.0 + 2.0 * C * active.mean(0).double() * float(lam[-1])                # K

        def apply(r):                                                                  # (P+1) x K
            c = U.T @ r                                                                # l x K
            inner = torch.cholesky_solve(c.T.unsqueeze(-1), R).squeeze(-1).T           # l x K
            return U @ inner + (r - U @ c) / floor
        return apply

    def sketch_state(self) -> tuple | None:
        """(U, lam, B, N) once this design has built its sketch (else None), for a design over these rows
        and more (`adopt_sketch`)."""
        if isinstance(self, _GramDesign) or "_sketch_scores" not in self.__dict__:
            return None
        return (*self._eigen, self._sketch_scores, self.A.shape[0])

    def adopt_sketch(self, state: tuple) -> None:
        """Take the sketch of a design whose N rows are this design's first N rows: the full setting's refit
        (train-minus-val, then val) reuses the selection's. T_k is still formed exactly on U's span from
        this design's own rows (`class_preconditioner`); the span is the selection rows' top directions of S,
        and its eigenvalues (the floor's estimate) scale with the row count. Saves three float32 passes of
        NYSTROM_RANK columns and most of the fourth (the new rows' scores only)."""
        U, lam, B, n = state
        if n > self.A.shape[0] or U.shape[0] != self.A.shape[1] + 1:
            raise ValueError(f"a sketch of {n} rows x {U.shape[0] - 1} dims does not fit a design of {tuple(self.A.shape)}")
        self.__dict__["_eigen"] = (U, lam * (self.A.shape[0] / n))
        self.__dict__["_sketch_scores"] = torch.cat([B, self.forward(U, self.A[n:]).float()])     # N x l

    @functools.cached_property
    def _row_sample(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rows, S_m, G_m): a seeded uniform sample of min(ROW_SAMPLE, N) rows, their augmented
        features [A | s] (m x (P+1) float32) and Gram matrix S_m S_m^T (m x m float64), formed once."""
        n = self.A.shape[0]
        g = torch.Generator(device="cpu").manual_seed(0)
        rows = torch.randperm(n, generator=g)[:min(ROW_SAMPLE, n)].sort().values.to(self.A.device)
        Sm = torch.cat([self.A[rows], torch.full((len(rows), 1), self.scale, device=self.A.device)], 1)
        return rows, Sm, (Sm @ Sm.T).double()

    def sampled_preconditioner(self, C: float, active: torch.Tensor):
        """z_k = M_k^-1 r_k, M_k = I + 2C (N/m) S_mk^T S_mk: class k's Hessian with its active rows
        estimated from the row sample's active rows S_mk (subsampled Newton: every direction the sample
        spans, the whole spectrum's tail included, where a rank-l sketch of the dimensions keeps only
        the top l). Inverted by Woodbury, M_k^-1 = I - S_mk^T (I / c + S_mk S_mk^T)^-1 S_mk with
        c = 2C N/m: one Cholesky factor per class and Newton step (m_k x m_k), two thin products with
        S_m per CG step. Opt-in: measured against the per-class sketch in the module docstring."""
        rows, Sm, G = self._row_sample
        c = 2.0 * C * self.A.shape[0] / len(rows)
        on = active[rows] > 0                                                          # m x K
        factors = []
        for k in range(active.shape[1]):
            idx = on[:, k].nonzero().squeeze(1)
            factors.append((idx, _jittered_cholesky(G[idx[:, None], idx[None, :]], 1.0 / c)))

        def apply(r):                                                                  # (P+1) x K
            Z = (Sm @ r.float()).double()                                              # m x K
            Q = torch.zeros_like(Z)
            for k, (idx, R) in enumerate(factors):
                z = Z[idx, k:k + 1]
                Q[idx, k:k + 1] = torch.linalg.solve_triangular(
                    R.T, torch.linalg.solve_triangular(R, z, upper=False), upper=True)
            return r - (Q.float().T.contiguous() @ Sm).T.double()                      # row-major product
        return apply


def _jittered_cholesky(G: torch.Tensor, shift: float) -> torch.Tensor:
    """Row-major lower factor of G + shift * I, the shift raised 10x at a time while rounding in G
    (float32 products) leaves it indefinite: a preconditioner only needs to be SPD."""
    if len(G) == 0:
        return G
    for _ in range(8):
        L, info = torch.linalg.cholesky_ex(G + shift * torch.eye(len(G), dtype=G.dtype, device=G.device))
        if int(info) == 0:
            return L.contiguous()
        shift *= 10.0
    raise RuntimeError("the sampled preconditioner could not be factorised (are the features finite?)")


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

    def __init__(self, L: torch.Tensor, preconditioning: str = "shared"):
        super().__init__(L.float().contiguous(), 0.0, preconditioning=preconditioning)

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


def _cholesky(G: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(L, rel) with L L^T = G + rel * mean(diag G) * I; the relative jitter rel grows from 0, then 1e-9,
    until the factorisation works (it is part of every Gram-space fit's solver record)."""
    scale = float(G.diagonal().mean().clamp_min(1e-30))
    for rel in (0.0, 1e-9, 1e-8, 1e-7, 1e-6, 1e-5, 1e-4):
        jittered = G
        if rel:
            jittered = G.clone()
            jittered.diagonal().add_(rel * scale)
        L, info = torch.linalg.cholesky_ex(jittered)
        if int(info) == 0:
            return L.contiguous(), rel   # torch returns the factor column-major
    raise RuntimeError("Gram matrix could not be factorised (are the features all zero or NaN?)")


def _float64_combination(beta: torch.Tensor, X: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """beta^T X (K x D) accumulated in float64, a block of rows at a time. The rows of critic features
    share a large mean and beta's signs are mixed, so the sum cancels: in float32 a 4000-row fit at
    C=0.133 read 180.2 (2 threads) or 172.0 (1 thread) as LinearSVC's objective from the same u-space
    optimum 171.98; float64 gives 172.006."""
    W = torch.zeros(beta.shape[1], X.shape[1], dtype=torch.float64, device=X.device)
    for i in range(0, len(X), block):
        W += beta[i:i + block].T.double() @ X[i:i + block].double()
    return W


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
    jitter: float = 0.0           # relative Cholesky jitter of the Gram factor (0: none needed, or primal)

    def to_model(self, V: torch.Tensor, info: dict | None = None) -> LinearModel:
        s = self.intercept_scaling
        if self.L is not None:   # [w; v] = [X | s]^T L^-T u: w = X^T beta, v = s * sum(beta)
            beta = torch.linalg.solve_triangular(self.L.T, V[:-1], upper=True)               # N x K
            W = _float64_combination(beta, self.X)                                            # K x D
            v = s * beta.sum(0)
        else:
            W, v = V[:-1].T, V[-1]
        b = s * v if self.fit_intercept else torch.zeros_like(v)
        return LinearModel(W.cpu().numpy().astype(np.float32), b.cpu().numpy().astype(np.float32), self.classes,
                           s, self.fit_intercept, info)

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


# primal designs of at least this many elements run CG's Hessian products (and the preconditioner's
# sketch) on a bfloat16 copy where the hardware has bf16 units: a 40,000 x 28672 product took 0.28 s there
# against 0.85-1.4 s in float32 on 2 Zen 4 cores. The gradient, the line search and the stopping rule keep
# the float32 design, so the fit still converges to the float32 problem's optimum; only the Newton
# directions come from a Hessian of bf16-rounded features (an inexact Newton method, as CG already is).
BF16_HESSIAN_MIN_ELEMENTS = 1 << 28


def _hessian_dtype(X: torch.Tensor) -> torch.dtype:
    if X.numel() < BF16_HESSIAN_MIN_ELEMENTS or not bf16_supported(X.device):
        return X.dtype
    if X.device.type == "cpu" and X.numel() * 2 > _available_memory() / 2:
        return X.dtype                                       # the copy would crowd out the rest
    return torch.bfloat16


PRECONDITIONERS = ("shared", "class", "rows", "auto")


def prepare(X, y, fit_intercept: bool = True, intercept_scaling: float = 1.0, device=None,
            method: str = "auto", gram: torch.Tensor | None = None, preconditioner: str = "auto",
            sketch: tuple | None = None) -> Problem:
    """method: 'gram' (N <= D), 'primal' (N > D) or 'auto'; `gram`: X X^T already computed (the
    protocol cuts each draw's block out of the whole train split's Gram matrix); preconditioner:
    'shared' (one M = I + mu S for all classes), 'class' (`_Design.class_preconditioner`), 'rows'
    (`_Design.sampled_preconditioner`) or 'auto' (primal designs wider than the dense limit: class;
    Gram designs: shared, per class once a CG solve gets long); 'class' needs a Nystrom sketch (Gram
    designs and primal ones wider than the dense limit), other narrow primal designs stay shared;
    `sketch`: another primal design's `sketch_state`, over this X's first rows (`_Design.adopt_sketch`),
    adopted where this design is primal and sketched too."""
    if preconditioner not in PRECONDITIONERS:
        raise ConfigError(f"unknown preconditioner {preconditioner!r}; choose from: {', '.join(PRECONDITIONERS)}")
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
        L, jitter = _cholesky(G.add_(scale ** 2))    # [X | s] [X | s]^T = L L^T
        return Problem(X, _GramDesign(L, preconditioner), L, Y, classes, fit_intercept, intercept_scaling, jitter)
    # auto, primal: per class from the first Newton step. Measured (benchmarks/results/svm.json, part
    # 'preconditioner'): a 12,000 x 28672 trained-critic fit at a full-setting C took 5 Newton steps and 15 CG
    # iterations against the shared M's 10 and 93 (57 s against 187 s; 27.7 s against 76.5 s after the
    # product layout change; 31.3 s against 42.4 s once the shared fit's stall past LinearSVC's rule was
    # cut short, STALL_DECREASE); its CG steps are not long, so the
    # Gram designs' switch on CG length would never fire there
    # 'rows' is opt-in: on 20,000 x 28672 trained BN-critic rows at C = 0.0014 it took 87 CG iterations
    # (99 s) where the per-class sketch took 73 (62 s)
    sketched = d > DENSE_PRECONDITIONER_MAX_DIM
    if preconditioner == "rows":
        mode = "rows"
    else:
        mode = ("class" if preconditioner == "auto" else preconditioner) if sketched else "shared"
    design = _Design(X, scale, _hessian_dtype(X), mode)
    if sketch is not None and sketched:
        design.adopt_sketch(sketch)
    return Problem(X, design, None, Y, classes, fit_intercept, intercept_scaling)


# ============================================================================ truncated Newton
def _gradient(design: _Design, Y, V, scores, C: float):
    active = ((1.0 - Y * scores) > 0).float()                                     # N x K
    return V + 2.0 * C * design.backward(active * (scores - Y)), active


def _cg(design: _Design, active, C: float, G, apply_m, rel_tol=1e-3, max_iter: int = 1000):
    """(d, CG iterations): (I + 2C A^T D_k A) d_k = -g_k solved for every column k by preconditioned CG,
    to a residual of rel_tol * ||g_k|| (rel_tol: a float or one value per column)."""
    d = torch.zeros_like(G)
    r = -G
    z = apply_m(r)
    p = z.clone()
    rz = (r * z).sum(0, dtype=torch.float64)
    target = rel_tol * G.norm(dim=0)
    for done in range(max_iter):
        if bool((r.norm(dim=0) <= target).all()):
            return d, done
        Hp = design.hessian_product(p, active, C)
        pHp = (p * Hp).sum(0, dtype=torch.float64).clamp_min(1e-300)
        alpha = torch.where(r.norm(dim=0) > target, rz / pHp, 0.0)
        d += alpha * p
        r -= alpha * Hp
        z = apply_m(r)
        rz_new = (r * z).sum(0, dtype=torch.float64)
        p = z + (rz_new / rz.clamp_min(1e-300)) * p
        rz = rz_new
    return d, max_iter


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
# to per-class preconditioners (their rebuild, K products N x l x l per Newton step, costs about as much
# as a few CG iterations of a 4000-row Gram design, and far less than one of a 50,000-row primal one)
CLASS_SWITCH_CG = 20
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
    apply_m, mu_m = None, 0.0
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
        elif per_class:
            apply_m = design.class_preconditioner(C, active)
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
        d, iterations = _cg(design, active, C, G, apply_m, forcing)
        cg_steps += iterations
        if not per_class and design.preconditioning == "auto" and iterations > CLASS_SWITCH_CG:
            per_class, switched = True, True
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


# ============================================================================ protocol
@dataclass(frozen=True)
class Config:
    features: str = "runs/features.h5"     # a feature file with `train` and `test` splits
    out: str = ""                          # results JSON; '' = <features stem>.svm.json beside it
    settings: tuple[str, ...] = SETTINGS   # 'full' and/or '400'
    c_grid: tuple[float, ...] = DEFAULT_C_GRID   # dcgan_code's grid (LinearSVC sum form): where the search starts
    c_form: str = "sum"                    # 'mean': c_grid / fixed_c are Coates' mean form, C_sum = C / N
    # 'norm': the grid times NORM_REFERENCE / mean_i ||x_i||^2 (train rows after preprocessing), so that it
    # starts at the same effective regularisation whatever the features' scale; 'none': the grid as given
    c_scale: str = "none"
    # the search never stops at a grid edge by choice: while the best C is the largest (smallest) scored,
    # the next decade above (below) is scored too, at most this many decades per side (0: the grid only)
    c_extend: int = 4
    # full setting: > 0 (and under the train-minus-val rows) brackets C first on a class-balanced subsample
    # of this many train-minus-val rows (each C fitted there in the same mean form), then fits all rows
    # only near that optimum, bracketing again from there; 0 (the protocol as written): every C of the
    # bracket on all rows
    c_presearch: int = 0
    # with c_presearch: true brackets again on all train-minus-val rows around the subsample's optimum;
    # false takes the subsample's C as chosen (measured too small: the best C grows with the rows faster
    # than the mean form; README), so that the only fit on all rows is the refit (warm-started
    # from the subsample's model at that C): one large fit instead of three or more
    c_refine: bool = True
    # where the full setting's selection fits (train-minus-val, presearch) stop: 'liblinear' = where
    # LinearSVC itself stops (every class's ||g_k|| <= 1e-4 min(#pos_k, #neg_k) / N ||g_k(0)||, ~1e-5
    # relative), 'tight' = TOL (1e-6) like every reported fit. They only rank C values: on 40,000 trained
    # critic rows the validation accuracy stopped moving once LinearSVC's rule was met (STALL_DECREASE),
    # and the refit that is reported stops at TOL whichever is chosen
    select_stop: str = "liblinear"
    fixed_c: float = 0.0                   # > 0: use this C (not scaled, not searched; Coates: 100 with c_form=mean)
    per_class: int = 400                   # the 400-per-class setting
    select_draws: int = 10                 # draws scoring each C (dcgan_code)
    final_draws: int = 100                 # draws for the reported mean +- 1.96 std (dcgan_code)
    val_size: int = 10000                  # validation held out of train (dcgan_code)
    seed: int = 0
    solver: str = "replearn"               # or 'liblinear' (scikit-learn LinearSVC, slow reference)
    standardize: bool = False              # the DCGAN code used none; Coates standardised
    l2_normalize: bool = False             # per-row, as VISSL
    # 'equal': every layer's block is rescaled so that the layers share the train rows' mean squared norm
    # equally (the total kept), after the other preprocessing: one C then weighs each layer alike, where
    # unscaled layers differ by orders of magnitude (an un-normalised first conv against BN'd deeper ones)
    layer_scale: str = "none"
    layers: tuple[int, ...] = ()           # feature layer indices; empty = all
    # 400 per class: 'auto' computes the Gram matrix of all train rows once (float32, N^2 x 4 bytes)
    # when the draws would otherwise compute more products than it and it fits in memory; each draw
    # then cuts its block out of it. 'on' forces it, 'off' computes a Gram matrix per draw.
    gram_cache: str = "auto"
    device: str = "auto"
    preset: str = ""


# smoke: minutes on a 2-core CPU, fewer draws. Trained smoke critics give features with mean ||x||^2 ~ 2e4,
# for which dcgan_code's grid is a very large effective C: the grid is scaled to the features' norm
# (c_scale=norm), and bracketing moves it further where the optimum lies outside. The paper preset keeps
# dcgan_code's plain grid (bracketing still applies).
# smoke: 400 per class only. The full setting on 40,000 x 28672 trained features, with C bracketed, took
# over 8 min for the starting grid and ~8 min per extra decade on 2 cores (SVM_ARGS='settings=full,400')
register_preset("smoke", "svm", final_draws=10, select_draws=3, c_scale="norm", settings=("400",))
register_preset("tiny", "svm", per_class=50, val_size=500, select_draws=2, final_draws=5, c_scale="norm")
# cpu: the paper's protocol with fewer final draws (20: the +- still reads to a few tenths)
register_preset("cpu", "svm", final_draws=20, c_scale="norm")
register_preset("paper", "svm")

# c_scale=norm leaves the grid unchanged for features with this mean squared norm. 200: the smoke
# preset used to evaluate trained smoke critics (mean ||x||^2 ~ 2e4) on dcgan_code's grid / 100, and
# 2e4 / 100 = 200 reproduces that band for them while following any other scale.
NORM_REFERENCE = 200.0
C_SCALES = ("none", "norm")
SELECT_STOPS = ("liblinear", "tight")
LAYER_SCALES = ("none", "equal")
# the C the full setting's refit on all n train rows uses, given the C chosen on the n_rest rows of
# train-minus-val: the sum-form C is kept as is (LinearSVC's C does not change with N: the loss term
# grows with the rows), while a mean-form C is kept in mean form, i.e. its sum form shrinks by n_rest / n
REFIT_C_RULE = {"sum": "sum form kept", "mean": "mean form kept (sum C rescaled by n_rest/n)"}


def check_config(cfg: Config) -> None:
    if not cfg.settings or any(s not in SETTINGS for s in cfg.settings):
        raise ConfigError(f"svm settings {cfg.settings} invalid; choose from: {', '.join(SETTINGS)}")
    if cfg.solver not in SOLVERS:
        raise ConfigError(f"unknown svm solver {cfg.solver!r}; choose from: {', '.join(SOLVERS)}")
    if cfg.gram_cache not in ("auto", "on", "off"):
        raise ConfigError(f"unknown gram_cache {cfg.gram_cache!r}; choose from: auto, on, off")
    if cfg.c_form not in ("sum", "mean"):
        raise ConfigError(f"unknown c_form {cfg.c_form!r}; choose from: sum, mean")
    if cfg.layer_scale not in LAYER_SCALES:
        raise ConfigError(f"unknown layer_scale {cfg.layer_scale!r}; choose from: {', '.join(LAYER_SCALES)}")
    if cfg.c_scale not in C_SCALES:
        raise ConfigError(f"unknown c_scale {cfg.c_scale!r}; choose from: {', '.join(C_SCALES)}")
    if cfg.fixed_c <= 0 and (not cfg.c_grid or min(cfg.c_grid) <= 0):
        raise ConfigError(f"c_grid must hold positive values, got {cfg.c_grid}")
    if min(cfg.per_class, cfg.select_draws, cfg.final_draws, cfg.val_size) < 1:
        raise ConfigError("per_class, select_draws, final_draws and val_size must be >= 1")
    if cfg.select_stop not in SELECT_STOPS:
        raise ConfigError(f"unknown select_stop {cfg.select_stop!r}; choose from: {', '.join(SELECT_STOPS)}")
    if cfg.c_extend < 0 or cfg.c_presearch < 0:
        raise ConfigError(f"c_extend and c_presearch must be >= 0, got {cfg.c_extend}, {cfg.c_presearch}")


register_check(Config, check_config)   # out-of-range values fail when the config is built


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
    """Independent reproducible streams: purpose 2 = selection draws, 3 = final draws, 4 = the presearch subsample."""
    return np.random.default_rng([seed, purpose, draw])


# ============================================================================ feature file checks
def check_features(ff: FeatureFile) -> dict[str, np.ndarray]:
    """{split: labels} for train and test after every check that needs no feature values (those are
    checked as the rows are read, before any fit); a failure is one line naming the file."""
    labels = {split: _checked_labels(ff, split) for split in ("train", "test")}
    widths = {split: ff.require_split(split)["features"].shape[1] for split in labels}
    if widths["train"] != widths["test"]:
        raise ConfigError(f"feature file {ff.path}: train features are {widths['train']} wide but test features "
                          f"{widths['test']}; extract both splits with the same model and layers")
    if ff.offsets[-1] != widths["train"]:
        raise ConfigError(f"feature file {ff.path}: layer_offsets end at {ff.offsets[-1]} but the features are "
                          f"{widths['train']} wide")
    missing = np.setdiff1d(labels["test"], labels["train"])
    if len(missing):
        raise ConfigError(f"feature file {ff.path}: test classes {missing.tolist()} never appear in train; "
                          f"the SVM cannot predict them")
    return labels


def _checked_labels(ff: FeatureFile, split: str) -> np.ndarray:
    data, labels = ff.require_split(split)["features"], ff.labels(split)
    where = f"feature file {ff.path}: {split}"
    if data.ndim != 2 or labels.ndim != 1:
        raise ConfigError(f"{where} features are {data.shape} and labels {labels.shape}; expected N x D and N")
    if data.shape[0] != len(labels):
        raise ConfigError(f"{where} has {data.shape[0]} feature rows but {len(labels)} labels")
    if len(labels) == 0:
        raise ConfigError(f"{where} has no rows")
    if labels.dtype.kind not in "iu":
        raise ConfigError(f"{where} labels are {labels.dtype}, not integers")
    if labels.min() < 0:
        raise ConfigError(f"{where} labels include {int(labels.min())} (-1 marks unlabelled images); the SVM "
                          f"needs labelled train and test splits")
    return labels


def _require_finite(ff: FeatureFile, split: str, idx: np.ndarray, block: np.ndarray) -> None:
    bad = ~np.isfinite(block).all(1)                                               # rows of this block
    if bad.any():
        raise ConfigError(f"feature file {ff.path}: {split} features hold NaN or inf ({int(bad.sum())} rows of "
                          f"block {idx[0]}..{idx[-1]}, first row {idx[np.flatnonzero(bad)[0]]}); recompute them "
                          f"(float16 files overflow above 65504)")


# ============================================================================ data
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


def layer_bounds(ff: FeatureFile, cfg: Config) -> list[tuple[str, int, int]]:
    """(name, first column, end column) of every chosen layer in the loaded matrix's column order."""
    chosen = cfg.layers or range(len(ff.layer_names))
    bounds, start = [], 0
    for i in chosen:
        width = ff.offsets[i + 1] - ff.offsets[i]
        bounds.append((ff.layer_names[i], start, start + width))
        start += width
    return bounds


def layer_factors(X: np.ndarray, bounds: list[tuple[str, int, int]], block: int = 4096) -> np.ndarray:
    """Per-column factors (D,) that give every layer the same mean squared norm over the rows of X,
    T / L each (T: the rows' mean squared norm, L layers), so that the total, and with it C's scale,
    stays as it was. A layer that is all zero keeps factor 1."""
    sq = np.zeros(len(bounds))                                                     # L
    for start in range(0, len(X), block):
        rows = X[start:start + block]
        sq += [np.einsum("ij,ij->", rows[:, a:b], rows[:, a:b], dtype=np.float64) for _, a, b in bounds]
    sq /= len(X)
    share = sq.sum() / len(bounds)
    factors = np.ones(X.shape[1], np.float32)
    for (_, a, b), m in zip(bounds, sq):
        if m > 0:
            factors[a:b] = np.sqrt(share / m)
    return factors


def _width(ff: FeatureFile, cfg: Config) -> int:
    cols = ff.columns(cfg.layers)
    return ff.offsets[-1] if cols is None else len(cols)


def load_train(ff: FeatureFile, order: np.ndarray, cfg: Config) -> np.ndarray:
    """Train rows in the given order, as ONE float32 array (the only working copy), checked finite, L2-normalised
    if asked (standardising needs the whole split's statistics: the caller does it)."""
    X = np.empty((len(order), _width(ff, cfg)), dtype=np.float32)                   # N x D
    position = np.empty(ff.num_rows("train"), dtype=np.int64)
    position[order] = np.arange(len(order))
    for idx, block in ff.iter_blocks("train", order, layers=cfg.layers):
        _require_finite(ff, "train", idx, block)
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


class SplitScorer:
    """The test split: scanned for non-finite values when built (before any fit), then scored per batch
    of models, from memory (read and preprocessed once: 10k x 28672 float32 is 1.1 GB) when it takes under
    a quarter of the available memory, else re-read in blocks at every call (then call it with batches)."""

    def __init__(self, ff: FeatureFile, cfg: Config, stats):
        self.ff, self.cfg, self.stats = ff, cfg, stats
        self.labels = ff.labels("test")
        size = 4 * len(self.labels) * _width(ff, cfg)
        self.X = np.empty((len(self.labels), _width(ff, cfg)), np.float32) \
            if size < _available_memory() / 4 else None                              # N x D or None
        for idx, block in ff.iter_blocks("test", layers=cfg.layers):
            _require_finite(ff, "test", idx, block)
            if self.X is not None:
                _preprocess_inplace(block, cfg, stats)
                self.X[idx] = block

    @property
    def batch(self) -> int:
        """Models to score per call: one per fit from memory, a tenth of 100 draws per pass over the file."""
        return 1 if self.X is not None else 10

    def score(self, models: list[LinearModel]) -> list[float]:
        if self.X is None:
            return score_on_split(self.ff, "test", models, self.cfg, self.stats)
        return [accuracy(model, self.X, self.labels) for model in models]

    def correct(self, model: LinearModel) -> str:
        """Which test images `model` gets right, packed (`pack_correct`): two models scored on the same
        images are compared image by image (McNemar's test in the tables), not only by their means."""
        right = np.zeros(len(self.labels), bool)
        if self.X is not None:
            right[:] = model.predict(self.X) == self.labels
        else:
            for idx, block in self.ff.iter_blocks("test", layers=self.cfg.layers):
                _preprocess_inplace(block, self.cfg, self.stats)
                right[idx] = model.predict(block) == self.labels[idx]
        return pack_correct(right)


def pack_correct(right: np.ndarray) -> str:
    """A boolean vector as base64 of its packed bits (10,000 test images: 1,668 characters)."""
    return base64.b64encode(np.packbits(right.astype(bool)).tobytes()).decode()


def unpack_correct(text: str, n: int) -> np.ndarray:
    return np.unpackbits(np.frombuffer(base64.b64decode(text), np.uint8))[:n].astype(bool)


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
                 sketch: tuple | None = None):
        self.X, self.y, self.cfg, self.device, self.gram = X, y, cfg, device, gram     # X: N x D
        self.sketch = sketch      # a design's `sketch_state` over X's first rows, adopted by `prepare`
        self.tol = tol            # TOL, or LIBLINEAR for fits that only choose C (`select_stop`)
        self._problem: Problem | None = None
        self._top: tuple[float, torch.Tensor] | None = None       # (C, V): upward paths start from it

    def path(self, cs: Sequence[float], warm: LinearModel | None = None) -> list[LinearModel]:
        """Models at `cs` (increasing) as one warm-started path, starting from `warm` if given, else
        from the largest C fitted so far when `cs` lie above it (an upward extension), else cold (the
        first path, or a downward extension: small-C cold starts are cheap, large-C ones are not)."""
        if self.cfg.solver == "liblinear":
            return [fit_liblinear(self.X, self.y, c) for c in cs]
        if self._problem is None:
            self._problem = prepare(self.X, self.y, device=self.device, gram=self.gram, sketch=self.sketch)
            self.sketch = None
        problem, V = self._problem, None
        if warm is not None:
            V = problem.from_model(warm)
        elif self._top is not None and cs[0] > self._top[0]:
            V = self._top[1]
        models = []
        for c in cs:
            V, info = _newton(problem, c, V, self.tol, MAX_ITER)
            models.append(problem.to_model(V, info))
        if self._top is None or cs[-1] > self._top[0]:
            self._top = (cs[-1], V)
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


def _grow(bar, n: int) -> None:
    """Extensions add fits the progress bar did not count."""
    bar.total = (bar.total or 0) + n
    bar.refresh()


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
    fitter, models = _Fitter(X[:n_rest], y[:n_rest], cfg, device, tol=_select_tol(cfg)), {}   # row views

    def score(cs):
        if cs != start:
            _grow(bar, len(cs))
        # the first path starts from the subsample's model at the same mean-form C: a cold start at a
        # large C spends its first Newton steps on an active set of every row
        for c, model in zip(cs, fitter.path(cs, warm=sub_model if cs == start else None)):
            models[c] = model
            fits.append([c, "select", model.info])
            bar.update(1)
        return {c: accuracy(models[c], X[n_rest:], y[n_rest:]) for c in cs}
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
        _grow(bar, len(cs))
        for c, m in zip(cs, fitter.path([c * ratio for c in cs])):
            models[c] = m
            fits.append([c * ratio, "presearch", m.info])
        bar.update(len(cs))
        return {c: accuracy(models[c], X[n_rest:], y[n_rest:]) for c in cs}
    curve, added = bracket(score, grid, cfg.c_extend)
    best = _pick(curve)
    return {"rows": int(len(idx)), "val_curve": curve, "grid": sorted(curve), "c": best, "c_extended": added,
            "refined": cfg.c_refine}, models[best]


# ============================================================================ the 400-per-class setting
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

    def save(self) -> None:
        self.state["seconds"] = self.elapsed + time.time() - self.started
        self._save()

    def fitter(self, purpose: int, draw: int) -> _Fitter:
        """A fitter on the draw's rows (selection draws from train-minus-val, final draws from all of train)."""
        pool = np.arange(self.n_rest) if purpose == 2 else None
        idx = balanced_draw(self.y, self.cfg.per_class, draw_rng(self.cfg.seed, purpose, draw), pool=pool)
        gram = None
        if self.gram_all is not None:   # this draw's block of the cached Gram matrix
            rows = torch.as_tensor(idx, device=self.gram_all.device)
            gram = self.gram_all[rows[:, None], rows[None, :]]
        return _Fitter(self.X[idx], self.y[idx], self.cfg, self.device, gram)

    def run(self) -> dict:
        if self.cfg.fixed_c > 0:
            chosen, curve, added = self.grid[0], {}, {"up": 0, "down": 0}
        else:
            curve, added = bracket(self.score_round, self.grid, self.cfg.c_extend)
            chosen = _pick(curve)
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
        if cs != self.grid:
            _grow(self.bar, len(cs) * self.cfg.select_draws)
        for draw in range(self.cfg.select_draws):
            if all(len(val_draws.get(c, [])) > draw for c in cs):
                self.bar.update(len(cs))
                continue
            models = self.select_fit(draw, cs)
            for c, model in zip(cs, models):
                val_draws.setdefault(c, []).append(accuracy(model, self.X[self.n_rest:], self.y[self.n_rest:]))
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
        independent of the order it is done in: a resumed run refits draw 0 for it, cold, identically)."""
        draws, fits = self.state.setdefault("draws", []), self.state.setdefault("fits", [])
        first, pending = None, []
        for draw in range(len(draws), self.cfg.final_draws):
            if first is None and draw > 0:
                first = self.fitter(3, 0).path([chosen])[0]
            model = self.fitter(3, draw).path([chosen], first)[0]
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


# ============================================================================ progress and reuse
def features_identity(ff: FeatureFile) -> str:
    """The feature file's `key` attr when it has one, else path|size|mtime_ns."""
    raw = ff.h5.attrs.get("key")
    if raw is not None:
        raw = raw.decode() if isinstance(raw, bytes) else str(raw)
        try:   # stored JSON-encoded (store._json_attrs) or as a bare string
            decoded = json.loads(raw)
            return decoded if isinstance(decoded, str) else raw
        except json.JSONDecodeError:
            return raw
    stat = ff.path.stat()
    return f"{ff.path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"


# keys added after results were made, with the value every older result had: they re-key nothing
ADDED_KEYS = {"c_refine": True, "select_stop": "tight"}


def results_key(cfg: Config, features_id: str) -> str:
    return artifact_key("svm", keyed(to_dict(cfg), ADDED_KEYS), ignore=("out", "device", "gram_cache", "preset"),
                        features=features_id)


def progress_path(out: Path) -> Path:
    """<out stem>.partial.json (features.svm.json -> features.svm.partial.json): not a `*.svm.json`."""
    return out.with_suffix(".partial.json")


class Progress:
    """What a run of this config on this feature file has finished: {identity, settings {name: result},
    partial {name: state}}; rewritten atomically after every unit of work. A file for another
    identity (config or features) is ignored, and replaced at the first save."""

    def __init__(self, out: Path, identity: dict):
        self.path = progress_path(out)
        old = read_json(self.path)
        self.data = {"identity": identity, "settings": {}, "partial": {}}
        self.resumed_from = None
        if old and old.get("identity") == json.loads(json.dumps(identity)):
            self.data = {"identity": identity, "settings": {k: _float_keys(v) for k, v in old["settings"].items()},
                         "partial": {k: _float_keys(v) for k, v in old["partial"].items()}}
            self.resumed_from = self._summary()

    def _summary(self) -> dict:
        state = self.data["partial"].get("400", {})
        return {"progress_file": str(self.path), "settings_done": sorted(self.data["settings"]),
                "select_scores": sum(len(v) for v in state.get("val_draws", {}).values()),
                "final_draws_done": len(state.get("draws", []))}

    def state(self, name: str) -> dict:
        return self.data["partial"].setdefault(name, {})

    def save(self) -> None:
        atomic_write_json(self.path, _json_keys(self.data))

    def finish(self, name: str, result: dict) -> None:
        self.data["settings"][name] = result
        self.data["partial"].pop(name, None)
        self.save()


def _float_keys(result: dict) -> dict:
    """C-keyed maps read back from JSON: their string keys become floats again."""
    return {k: ({float(c): v for c, v in value.items()} if k in ("val_curve", "val_draws") else value)
            for k, value in result.items()}


def up_to_date(out: Path, key: str) -> bool:
    """A complete results file at `out` made with exactly this key."""
    record = read_json(out) if out.exists() else None
    return bool(record) and record.get("complete") is True and record.get("key") == key


def planned_out(cfg: Config, features_key: str) -> Path:
    """Where `run` writes the results for a feature file whose key is `features_key` (features.plan): the
    file need not exist, so a chain finds finished results without extracting their features again."""
    return default_out(cfg, results_key(cfg, features_key))


# ============================================================================ the stage
def variant_label(cfg: Config) -> str:
    """What a results file holds, for its name: settings (400 per class as '400pc'), then the SVM input
    when it is not the paper's (layers equalised, standardised, L2-normalised) and a fixed C."""
    label = "+".join("full" if s == "full" else f"{cfg.per_class}pc" for s in cfg.settings)
    label += "-layers-equal" if cfg.layer_scale == "equal" else ""
    label += "-standardized" if cfg.standardize else ""
    label += "-l2" if cfg.l2_normalize else ""
    return label + ("-fixed-c" if cfg.fixed_c > 0 else "")


def default_out(cfg: Config, key: str) -> Path:
    """<features stem>.svm-<variant>-<key>.json (e.g. features-step0002000-<k>.svm-full+400pc-<k>.json): another
    config or features file never overwrites a result. A result made before the variant was in the name
    (<stem>.svm-<key>.json) is still found and reused."""
    if cfg.out:
        return Path(cfg.out)
    legacy = Path(cfg.features).with_name(f"{Path(cfg.features).stem}.svm-{key}.json")
    if legacy.exists():
        return legacy
    return Path(cfg.features).with_name(f"{Path(cfg.features).stem}.svm-{variant_label(cfg)}-{key}.json")


def plot_curves(results: dict, path: Path, per_class: int = 400) -> None:
    import textwrap
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, res in results.items():
        if res.get("val_curve"):
            cs = sorted(res["val_curve"])
            setting = "full" if name == "full" else f"{per_class} per class"
            ax.plot(cs, [100 * res["val_curve"][c] for c in cs], marker="o", label=f"{setting} (C={res['c']:.3g})")
    if ax.lines:
        ax.legend(fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("C (LinearSVC sum form)")
    ax.set_ylabel("validation accuracy (%)")
    # the file name is long (step, keys): wrapped under a short title, so that neither is cut off
    ax.set_title("L2-SVM C selection\n" + "\n".join(textwrap.wrap(path.stem, 60)), fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def run(cfg: Config) -> Path:
    """Evaluate a feature file with the linear L2-SVM protocol (full and 400 per class) -> results JSON."""
    check_config(cfg)
    with FeatureFile(cfg.features) as ff:
        features_id = features_identity(ff)
        key = results_key(cfg, features_id)
        out = default_out(cfg, key)
        check_writable(out.parent)
        with building(out):   # the results and their .partial.json: one process at a time
            if up_to_date(out, key):
                print(f"svm: {out} is up to date (key {key}); delete it to recompute", file=sys.stderr)
                return out
            record = evaluate(ff, cfg, out, features_id)
            record["key"] = key
            atomic_write_json(out, _json_keys(record))
            plot_curves(record["settings"], out.with_suffix(".png"), cfg.per_class)
            progress_path(out).unlink(missing_ok=True)
    return out


def evaluate(ff: FeatureFile, cfg: Config, out: Path, features_id: str) -> dict:
    """Checks, loads, then runs every setting not finished in the progress file -> the results record."""
    from tqdm import tqdm
    X, y, n_rest, stats, layer_factors_used = load_checked(ff, cfg)                  # N x D, N
    test = SplitScorer(ff, cfg, stats)          # scanned (finite) before any fit
    factor = c_scale_factor(X, cfg)
    progress = Progress(out, {"config": to_dict(cfg), "features": features_id})
    device = pick_device(cfg.device)
    n_sel = len(cfg.c_grid) if cfg.fixed_c <= 0 else 0
    total = ("400" in cfg.settings) * (n_sel * cfg.select_draws + cfg.final_draws) \
        + ("full" in cfg.settings) * (n_sel + 1)                                   # before any extension
    results = {}
    with tqdm(total=total, desc="svm fits", unit="fit") as bar:
        for name in cfg.settings:
            if name in progress.data["settings"]:
                results[name] = progress.data["settings"][name]
                continue
            if name == "400":
                results[name] = Setting400(X, y, n_rest, test, cfg, factor, device, bar, progress.state(name),
                                           progress.save).run()
            else:
                results[name] = run_full(X, y, n_rest, test, cfg, factor, device, bar)
            progress.finish(name, results[name])
    return {"config": to_dict(cfg), "complete": True, "provenance": provenance(),
            "features": {"path": str(cfg.features), "attrs": ff.attrs, "identity": features_id},
            "validation": {"size": int(len(X) - n_rest), "seed": cfg.seed, "from": "train"}, "train_rows": int(len(X)),
            "c_scale": {"mode": cfg.c_scale, "factor": factor, "reference_mean_sq_norm": NORM_REFERENCE},
            "layer_scale": {"mode": cfg.layer_scale, "factors": layer_factors_used},
            "resumed_from": progress.resumed_from, "settings": results}


def load_checked(ff: FeatureFile, cfg: Config) -> tuple[np.ndarray, np.ndarray, int, tuple | None, dict | None]:
    """(X, y, n_rest, stats, layer factors): the checked train split, train-minus-val rows first, preprocessed;
    stats ((mean, std) per column) take test rows the same way; layer factors {layer: f} with layer_scale=equal."""
    labels = check_features(ff)["train"]
    if cfg.val_size >= len(labels):
        raise ConfigError(f"val_size={cfg.val_size} leaves no training rows in {cfg.features}; lower val_size")
    rest, val = split_validation(labels, cfg.val_size, cfg.seed)
    order = np.concatenate([rest, val])        # train-minus-val first, so both parts are views
    X, y = load_train(ff, order, cfg), labels[order]                                # N x D, N
    stats, scaled = _column_stats(X) if cfg.standardize else None, None
    if stats is not None:
        _preprocess_inplace(X, dataclasses.replace(cfg, l2_normalize=False), stats)
    if cfg.layer_scale == "equal":
        # folded into the stats that test rows go through: (x - mean) / (std / f) = f (x - mean) / std
        bounds = layer_bounds(ff, cfg)
        f = layer_factors(X, bounds)                                                 # D
        scaled = {name: float(f[a]) for name, a, _ in bounds}
        for start in range(0, len(X), 4096):
            X[start:start + 4096] *= f
        mean, std = stats if stats is not None else (np.zeros_like(f), np.ones_like(f))
        stats = (mean, std / f)
    return X, y, len(rest), stats, scaled


def _json_keys(obj):
    """JSON object keys must be strings: C values become repr-exact strings."""
    if isinstance(obj, dict):
        return {(k if isinstance(k, str) else repr(float(k))): _json_keys(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_keys(v) for v in obj]
    return obj
