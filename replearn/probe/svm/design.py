"""Linear L2-SVM, exactly scikit-learn's `LinearSVC` objective: the model, and the designs the solver
(solver.py) works on -- primal or Gram -- with their preconditioners.

The objective
-------------
One-vs-rest over the K classes (one problem when K == 2, as LinearSVC). For class k, with
y_ik = +1 if example i is of class k else -1, and the bias handled as liblinear does it (an
extra feature of constant value s = `intercept_scaling`, whose weight v_k is regularised like
any other and gives b_k = s * v_k):

    min_{w_k, v_k}  0.5 * (||w_k||^2 + v_k^2) + C * sum_i max(0, 1 - y_ik (w_k . x_i + s v_k))^2

C is in LinearSVC's *sum* form; Coates' mean form C' * mean_i(...) is C = C' / N (`c_form`).
`LinearModel.objective` evaluates this sum over classes in float64.


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
factor per class and Newton step. Where the rank-384 sketch (768 in primal designs since stop 52) keeps
only the top of the spectrum, the sample spans 4096 directions of the whole spectrum, tail included.
Measured (with the rank-384 sketch) on trained BN-critic rows
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
"""
from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from threadpoolctl import ThreadpoolController

from ...core.config import ConfigError
from ...core.utils import bf16_supported, pick_device


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
        return self._shaped(_as_numpy32(X) @ self.W.T + self.b)

    def _shaped(self, scores: np.ndarray) -> np.ndarray:
        return scores[:, 0] if len(self.classes) == 2 else scores

    def predict(self, X) -> np.ndarray:
        return self._labels(self.decision_function(X))

    def _labels(self, scores: np.ndarray) -> np.ndarray:
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
    return accuracies([model], X, y)[0]


def accuracies(models: list[LinearModel], X, y) -> list[float]:
    """`accuracy` of every model, their scores from one product over X: one read of the rows instead of one
    per model (10,000 x 28672 validation rows, AVX2 kernels: 0.27 s for 7 models against 0.79 s)."""
    scores = _as_numpy32(X) @ np.concatenate([m.W for m in models]).T + np.concatenate([m.b for m in models])
    ends = np.cumsum([len(m.W) for m in models])
    return [float(np.mean(m._labels(m._shaped(scores[:, end - len(m.W):end])) == np.asarray(y)))
            for m, end in zip(models, ends)]


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
NYSTROM_RANK = 384                    # rank of the randomized preconditioner of Gram designs (N <= D)
# primal designs wider than the dense limit sketch this many times NYSTROM_RANK: with AVX2 kernels the
# benchmark's full setting (50,000 x 28672 trained-critic rows) took 426 s at rank 384, 369 s at 768, 363 s
# at 1024 and 408 s at 1536 (CG iterations 489, 372, 342, 325: the sketch and the per-class blocks T_k grow
# as l^2 per Newton step), the same C and validation curve to one image. With bf16 units (the Hessian's
# products on the bf16 copy) 195 s at 384 and 194 s at 768: 429 and 428 CG iterations, the bf16 products'
# rounding and not the preconditioner then limit CG (benchmarks/results/notes.md, stop 52)
PRIMAL_RANK_FACTOR = 2
ROW_SAMPLE = 4096                     # rows of the sampled preconditioner (`_Design.sampled_preconditioner`)
PRIMAL_ROWS = 2048                    # rows per block of the primal products (`_Design.backward`, numpy's forward)
SKINNY_COLUMNS = 32                   # numpy's products with at most this many columns run in row parts (`_in_row_parts`)
SKINNY_FORWARD_ROWS = 512             # rows per block of such a part's forward product
TRIANGLE_ROWS = 512                   # rows per block of the Gram factor's triangular products (`_GramDesign`)


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
        # float32 products through numpy's BLAS (OpenBLAS in numpy's wheels) instead of torch's (MKL) on CPUs
        # without bf16 units, where every product is float32: with every library's kernels limited to AVX2
        # (benchmarks/isa.sh) the skinny K = 10 passes over 40,000 x 28672 rows ran 1.7x faster, and the full
        # setting took 309 s against 483 s with the same C and accuracy. With bf16 units (the Hessian's products
        # on H's bf16 copy, torch) it gained nothing (245 s against 240 s), so there the products stay torch's
        # and the results bit for bit what they were (benchmarks/results/notes.md, stop 50)
        self.numpy_blas = A.device.type == "cpu" and A.dtype == torch.float32 and not bf16_supported(A.device)

    @property
    def sketch_rank(self) -> int:
        """Columns of the Nystrom sketch (`_eigen`), at most P + 1."""
        return PRIMAL_RANK_FACTOR * NYSTROM_RANK

    def _through_numpy(self, A: torch.Tensor) -> bool:
        """A product with A (this design's features, or H's bf16 copy) goes through numpy's BLAS."""
        return self.numpy_blas and A.dtype == torch.float32

    # Products run in A's dtype (float32); parameters, scores and
    # residuals stay float64 so that cancellation in the gradient does not limit the accuracy.
    def forward(self, V: torch.Tensor, A: torch.Tensor | None = None) -> torch.Tensor:   # (P+1) x K -> N x K
        A = self.A if A is None else A
        Wt = V[:-1].T.to(A.dtype).contiguous()                                         # K x P
        if not self._through_numpy(A):
            # as A W^T with W^T contiguous: for K ~ 10 columns MKL's sgemm ran this layout in 0.95 s against
            # 1.5-1.9 s for A @ V on a 50,000 x 28672 A (2 AVX2 cores): CG's products are these skinny passes
            return F.linear(A, Wt).double() + self.scale * V[-1]
        return torch.from_numpy(_times(A.numpy(), Wt.numpy().T)).double() + self.scale * V[-1]

    def backward(self, R: torch.Tensor, A: torch.Tensor | None = None) -> torch.Tensor:  # N x K -> (P+1) x K
        # R^T A is much faster than A^T R for a row-major A (one streaming pass), and faster again in
        # blocks of PRIMAL_ROWS rows summed in float64: on 40,000 x 28672 rows (2 Zen 4 cores) the bf16
        # product took 0.22 s blocked against 0.34 s whole (float32: the same, 0.9-1.0 s). A bf16 block's
        # output is rounded to bf16 once per block, not once in all: no less accurate than the whole product
        A = self.A if A is None else A
        Rt = R.to(A.dtype).T.contiguous()                                              # K x N
        if self._through_numpy(A):
            # the blocks' sum in numpy as well: after a torch op its OpenMP workers spin for milliseconds,
            # taking the cores OpenBLAS's threads need (interleaved so, short products ran 2-5x slower)
            top = torch.from_numpy(_times_rows(Rt.numpy(), A.numpy()))
        else:
            top = torch.zeros(R.shape[1], A.shape[1], dtype=torch.float64, device=A.device)  # K x P
            for start in range(0, A.shape[0], PRIMAL_ROWS):
                top += Rt[:, start:start + PRIMAL_ROWS] @ A[start:start + PRIMAL_ROWS]
        return torch.cat([top.T, self.scale * R.sum(0, keepdim=True)])

    @property
    def pass_elements(self) -> int:
        """Elements of H one forward (or backward) product reads (benchmarks count its bytes and FLOPs)."""
        return self.H.numel()

    def hessian_product(self, p: torch.Tensor, active: torch.Tensor, C: float) -> torch.Tensor:
        """(I + 2C [A | s]^T D_k [A | s]) p_k for every column k, the products on H."""
        return self.hessian_and_forward(p, active, C)[0]

    def hessian_and_forward(self, p: torch.Tensor, active: torch.Tensor, C: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(`hessian_product`, [A | s] p as its forward pass computed it, on H)."""
        Ap = self.forward(p, self.H)
        return p + 2.0 * C * self.backward(active * Ap, self.H), Ap

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
        """(U, lam): a rank-`sketch_rank` Nystrom approximation U diag(lam) U^T of [A | s]^T [A | s]
        (Frangella, Tropp & Udell 2023, alg. 2.1): two passes over A with a block of random vectors."""
        p1 = self.A.shape[1] + 1
        Q = _seeded_orthonormal(p1, min(self.sketch_rank, p1), self.A.device)                # (P+1) x l
        # on A, not on H's bf16 copy: a bf16 product rounds its output to 3 digits, and T_k amplifies an
        # error in the top directions by 2C lam (~1e5): sketched on H, the 40,000-row fits' CG took 41-52
        # iterations a Newton step at the bracket's smallest C (three fp32 passes of l columns instead)
        Y = self.backward(self.forward(Q))                                                   # S Q
        shift = float(torch.finfo(self.A.dtype).eps * Y.norm())                              # A's products
        Y = Y + shift * Q
        B = torch.linalg.cholesky(Q.T @ Y)                                                   # l x l
        F = torch.linalg.solve_triangular(B, Y.T, upper=False).T                             # Y B^-T
        # an SVD, not the eigenproblem of F^T F (5x faster at 4001 x 384): that squares F's condition number, and
        # at full rank (a zero eigenvalue lifted only by the shift) U lost its orthogonality (|U^T U - I| 0.06)
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

    def class_scatter(self, active: torch.Tensor, previous: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(active, S) with S[k] = B^T D_k B (K x l x l float64, B = [A | s] U) over class k's active rows only
        (D_k is 0 or 1): the work shrinks with the active fraction, where a product over all rows (a masked copy
        of B and its N x l x l product) cost the same at any fraction (40,000 x 384 x 10 classes: 1.0-1.2 s
        against 0.1 s at 10% active, 0.6 s at 60%). With `previous`, this design's (active, S) at the Newton
        step before, a class whose rows changed state fewer times than it has active rows takes S_k plus the
        rows that joined less those that left: a warm-started fit's steps change 36%, 21%, 6% and 1% of the
        active rows (the protocol's final draws)."""
        B = self._sketch_scores                                                        # N x l
        S = torch.empty(active.shape[1], B.shape[1], B.shape[1], dtype=torch.float64, device=B.device)
        for k in range(active.shape[1]):                                               # one class's copy at a time
            now = active[:, k] > 0
            if previous is not None:
                was = previous[0][:, k] > 0
                joined, left = now & ~was, was & ~now
                if int(joined.sum()) + int(left.sum()) < int(now.sum()):
                    Bj, Bl = B[joined], B[left]
                    S[k] = previous[1][k] + (Bj.T @ Bj).double() - (Bl.T @ Bl).double()
                    continue
            Bk = B[now]
            S[k] = (Bk.T @ Bk).double()
        return active, S

    def class_preconditioner(self, C: float, active: torch.Tensor, scatter: tuple | None = None):
        """z_k = M_k^-1 r_k, one M_k per class: exact on the sketch's span U, a constant outside it,
            M_k = U T_k U^T + floor_k (I - U U^T),  T_k = U^T H_k U = I + 2C B^T D_k B  (B = [A | s] U),
        floor_k = 1 + 2C f_k lam_l (f_k: class k's active fraction). Where the shared M = I + mu S
        stands one scatter in for all K Hessians, T_k sees class k's own active rows and the couplings
        between the sketch's directions (an active set of positives and hard negatives is not a scaled
        copy of all rows). Built every Newton step from `class_scatter` (`scatter`: its result for this
        `active`, else computed here)."""
        U, lam = self._eigen
        _, S = self.class_scatter(active) if scatter is None else scatter
        eye = torch.eye(U.shape[1], dtype=torch.float64, device=U.device)
        T = eye + 2.0 * C * S                                                          # K x l x l
        R, _ = torch.linalg.cholesky_ex(T)                                             # SPD: I + PSD
        floor = 1.0 + 2.0 * C * active.mean(0).double() * float(lam[-1])                # K

        def apply(r):                                                                  # (P+1) x K
            c = U.T @ r                                                                # l x K
            inner = torch.cholesky_solve(c.T.unsqueeze(-1), R).squeeze(-1).T           # l x K
            return U @ (inner - c / floor) + r / floor                                 # = U inner + (r - U c) / floor
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
        `sketch_rank` columns and most of the fourth (the new rows' scores only)."""
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


def _times(a: np.ndarray, w: np.ndarray) -> np.ndarray:
    """a @ w for a row-major N x P `a` and a P x K `w`, a block of a's rows at a time (1.6x faster than whole)."""
    out = np.empty((len(a), w.shape[1]), dtype=np.result_type(a, w))
    block = SKINNY_FORWARD_ROWS if _skinny(w.shape[1]) else PRIMAL_ROWS

    def rows(lo, hi):
        for start in range(lo, hi, block):
            end = min(start + block, hi)
            np.matmul(a[start:end], w, out=out[start:end])
    _in_row_parts(len(a), w.shape[1], rows)
    return out


def _times_rows(r: np.ndarray, a: np.ndarray) -> np.ndarray:
    """r @ a (K x P, float64) for a K x N `r` and a row-major N x P `a`: R^T A streams A's rows, where A^T R
    does not, and the PRIMAL_ROWS-row blocks' products are summed in float64."""
    def rows(lo, hi):
        top = np.zeros((len(r), a.shape[1]))
        for start in range(lo, hi, PRIMAL_ROWS):
            end = min(start + PRIMAL_ROWS, hi)
            top += r[:, start:end] @ a[start:end]
        return top
    return functools.reduce(np.add, _in_row_parts(len(a), len(r), rows))


def _skinny(columns: int) -> bool:
    return columns <= SKINNY_COLUMNS and torch.get_num_threads() > 1


@functools.lru_cache(maxsize=None)
def _openblas() -> ThreadpoolController:
    return ThreadpoolController().select(internal_api="openblas")


@functools.lru_cache(maxsize=None)
def _row_workers(threads: int, pid: int) -> ThreadPoolExecutor:
    """One pool per process: a forked child (the image cache's decoders fork) has none of its parent's threads."""
    return ThreadPoolExecutor(threads, thread_name_prefix="replearn-rows")


def _in_row_parts(n: int, columns: int, rows) -> list:
    """rows(lo, hi) over [0, n), results in order. A skinny product (`_skinny`: CG's K-column passes) runs as
    one contiguous part per thread at once, each thread's OpenBLAS single-threaded, where OpenBLAS's own
    threads split every 10-column block product and meet after it. On 40,000 x 28672 float32 rows (AVX2
    kernels, 2 cores) a backward product took 0.35 s against 0.41 s, a forward one 0.41 s against 0.43 s, and a
    40,000-row fit 52 s against 55 s (benchmarks/results/notes.md, stop 58). Wider products (the sketch's)
    keep OpenBLAS's threads. Left with torch: the Gram factor's 3-8 ms products (through numpy, between CG's
    torch ops, a draw's C path took 2.5-5 s against 2.4 s) and the per-class preconditioner's basis products
    (49-51 s against 48-49 s a fit)."""
    threads = torch.get_num_threads()
    if not _skinny(columns) or n < threads * SKINNY_FORWARD_ROWS:
        return [rows(0, n)]
    bounds = np.linspace(0, n, threads + 1).astype(int).tolist()
    with _openblas().limit(limits=1):
        return list(_row_workers(threads, os.getpid()).map(rows, bounds[:-1], bounds[1:]))


@functools.lru_cache(maxsize=1)
def _seeded_orthonormal(rows: int, cols: int, device: torch.device) -> torch.Tensor:
    """The Nystrom sketch's test block: orthonormal columns from a seeded Gaussian (read-only, shared). The
    same for every design of a shape, so computed once for all of them: the 400-per-class protocol sketches
    110+ Gram designs of one shape, and this QR was a quarter of each sketch (0.09 s of 0.38 s, AVX2 kernels)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    return torch.linalg.qr(torch.randn(rows, cols, generator=g, dtype=torch.float64).to(device))[0]


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

    @property
    def sketch_rank(self) -> int:
        return NYSTROM_RANK

    @property
    def pass_elements(self) -> int:
        """The blocks of L on and below the diagonal, as `forward` and `backward` read them."""
        n = len(self.A)
        blocks = range(0, n, TRIANGLE_ROWS)
        return sum(min(TRIANGLE_ROWS, n - start) * min(start + TRIANGLE_ROWS, n) for start in blocks)

    # L is lower triangular: the products read only the blocks on and below the diagonal (57% of L at
    # N = 4000), where a dense product reads the zeros above it too. These skinny K-column products are
    # what a Gram-space fit spends its time on (benchmarks/results/notes.md, stop 47). The backward
    # product's blocks are summed in float64, as the primal design's are
    def forward(self, V: torch.Tensor, A: torch.Tensor | None = None) -> torch.Tensor:
        if A is not None and A is not self.A:
            return super().forward(V, A)
        # L's row blocks, each times V's rows up to the block's end: every output row summed in one product
        # (as the primal forward sums its 28672 terms). On 4000 x 4000, K = 10, AVX2 kernels: 2.1 ms against
        # 3.0 ms for (L V)^T = V^T L^T over a row-major copy of L^T, which is no longer made (stop 58)
        L, Vt = self.A, V[:-1].T.to(self.A.dtype).contiguous()                        # K x N
        out = torch.empty(len(L), V.shape[1], dtype=L.dtype, device=L.device)
        for start in range(0, len(L), TRIANGLE_ROWS):
            end = start + TRIANGLE_ROWS
            out[start:end] = F.linear(L[start:end, :end], Vt[:, :end])
        return out.double()                                         # no bias term: it is folded into L

    def backward(self, R: torch.Tensor, A: torch.Tensor | None = None) -> torch.Tensor:
        if A is not None and A is not self.A:
            return super().backward(R, A)
        L, Rt = self.A, R.to(self.A.dtype).T.contiguous()                             # K x N
        top = torch.zeros(R.shape[1], len(L), dtype=torch.float64, device=L.device)   # K x N
        for start in range(0, len(L), TRIANGLE_ROWS):
            end = start + TRIANGLE_ROWS
            top[:, :end] += Rt[:, start:end] @ L[start:end, :end]
        return torch.cat([top.T, top.new_zeros(1, R.shape[1])])                       # the bias row stays 0


def _gram(X: torch.Tensor, block: int = 1024, dtype=torch.float64) -> torch.Tensor:
    """N x N Gram matrix from fp32 block products (lower blocks only, mirrored: ~56% of a full
    product), stored in `dtype` (float32 loses nothing: the products are float32)."""
    n = X.shape[0]
    G = torch.empty(n, n, dtype=dtype, device=X.device)
    # torch's BLAS even where the primal products take numpy's (`_Design.numpy_blas`): alone, a 4000 x 28672
    # Gram matrix took 2.9 s through numpy against 3.6 s with every library's kernels limited to AVX2, but
    # the 400-per-class setting, with its torch ops between the panels, ran 270 s against 259 s so
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
        # the upper factor of a symmetric G, which LAPACK hands back column-major: its transpose is L row-major,
        # where the lower factor needed a 128 MB copy at 4000 rows (0.08 s of a 0.45 s factorisation)
        U, info = torch.linalg.cholesky_ex(jittered, upper=True)
        if int(info) == 0:
            return U.mT.contiguous(), rel   # no copy where U came back column-major
    raise RuntimeError("Gram matrix could not be factorised (are the features all zero or NaN?)")


def _float64_combination(beta: torch.Tensor, X: torch.Tensor, block: int = 32) -> torch.Tensor:
    """beta^T X (K x D) accumulated in float64, a block of rows at a time. The rows of critic features
    share a large mean and beta's signs are mixed, so the sum cancels: in float32 a 4000-row fit at
    C=0.133 read 180.2 (2 threads) or 172.0 (1 thread) as LinearSVC's objective from the same u-space
    optimum 171.98; float64 gives 172.006. Each block of X is converted into one reused float64 buffer
    small enough to stay in cache: on 4000 x 28672 rows (2 Zen 4 cores) 0.07 s a model, where a float64
    copy of X took 0.8-0.9 s to make and 0.19 s a model to read (benchmarks/results/notes.md, stop 49)."""
    W = torch.zeros(beta.shape[1], X.shape[1], dtype=torch.float64, device=X.device)
    buf = torch.empty(min(block, len(X)), X.shape[1], dtype=torch.float64, device=X.device)
    beta = beta.double()
    for i in range(0, len(X), block):
        rows = buf[:min(block, len(X) - i)]
        rows.copy_(X[i:i + block])
        W.addmm_(beta[i:i + block].T, rows)
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
            W = _float64_combination(beta, self.X)                                               # K x D
            v = s * beta.sum(0)
        else:
            W, v = V[:-1].T, V[-1]
        b = s * v if self.fit_intercept else torch.zeros_like(v)
        return LinearModel(W.cpu().numpy().astype(np.float32), b.cpu().numpy().astype(np.float32), self.classes,
                           s, self.fit_intercept, info)

    def without_rows(self) -> "Problem":
        """This problem with its feature rows dropped (kept while the rows are not: `Setting400.fitter`)."""
        return replace(self, X=None)

    def with_rows(self, X) -> "Problem":
        """This problem over X, the rows it was prepared on (as `prepare` takes them)."""
        return replace(self, X=_float32_rows(X, self.Y.device))

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
    X = _float32_rows(X, device)
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


def _float32_rows(X, device) -> torch.Tensor:
    """Features as the designs take them: a float32 tensor on `device` (no copy when X already is one)."""
    return torch.as_tensor(X).to(device=device, dtype=torch.float32)


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
