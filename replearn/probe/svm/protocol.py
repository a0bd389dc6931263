"""The SVM evaluation protocol: its config, the validation split and class-balanced draws, the checks of
a feature file, and the preprocessing and scoring of its rows.

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


Checks before any fit (one line each, naming the file): per split, as many feature rows as labels,
integer labels >= 0; both splits equally wide; finite features (train as it is read, test scanned
when loaded); every test class present in train.
"""
from __future__ import annotations

import base64
import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from ...core.config import ConfigError, register_check, register_preset
from ...core.store import FeatureFile
from .design import LinearModel, _available_memory, _gram, accuracies


DEFAULT_C_GRID = (1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2)   # dcgan_code's grid, sum form
SOLVERS = ("replearn", "liblinear")
SETTINGS = ("full", "400")


# ============================================================================ protocol
@dataclass(frozen=True)
class Config:
    features: str = ""                      # a feature file with `train` and `test` splits (`replearn features`)
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
    rows = torch.from_numpy(X)
    for idx, block in ff.iter_blocks("train", order, layers=cfg.layers):
        _require_finite(ff, "train", idx, block)
        rows.index_copy_(0, torch.from_numpy(position[idx]), torch.from_numpy(block))   # threaded, unlike numpy's
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
        return accuracies(models, self.X, self.labels)

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
