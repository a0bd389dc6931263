"""The noise of a row and of a gain: the test set's binomial ci95, McNemar's paired test on the per-image
correctness of two rows, and each trained row's gain over its own untrained control.
"""
from __future__ import annotations

import math

import numpy as np


# ============================================================================ noise
Z95 = 1.96


def test_ci95(acc: float | None, n: int | None) -> float | None:
    """Half-width of the 95% interval that sampling the test images alone puts on an accuracy (binomial)."""
    if acc is None or not n:
        return None
    return Z95 * math.sqrt(max(acc * (1 - acc), 0.0) / n)


def mcnemar(a_text: str | None, b_text: str | None, n: int | None) -> dict | None:
    """Paired comparison of two models scored on the same test images: the accuracy difference a - b,
    its 95% half-width from the discordant pairs, and McNemar's exact p-value."""
    if not a_text or not b_text or not n:
        return None
    from scipy.stats import binomtest
    from ..probe.svm import unpack_correct
    a, b = unpack_correct(a_text, n), unpack_correct(b_text, n)
    only_a, only_b = int(np.sum(a & ~b)), int(np.sum(~a & b))
    se = math.sqrt(max(only_a + only_b - (only_a - only_b) ** 2 / n, 0.0)) / n
    p = binomtest(only_a, only_a + only_b, 0.5).pvalue if only_a + only_b else 1.0
    return {"diff": (only_a - only_b) / n, "ci95": Z95 * se, "p": float(p), "only_a": only_a, "only_b": only_b}


def gain_full(row: dict, control: dict) -> dict:
    """Full setting: one model each, scored on the same test images: McNemar."""
    test = mcnemar(row["_full_correct"], control["_full_correct"], row["_test_size"])
    if row["full_acc"] is None or control["full_acc"] is None:
        return {}
    out = {"gain": row["full_acc"] - control["full_acc"], "ci95": None, "p": None, "beyond_noise": None}
    if test:
        out.update(ci95=test["ci95"], p=test["p"], beyond_noise=test["p"] < 0.05)
    return out


def gain_k(row: dict, control: dict) -> dict:
    """N per class: the mean over draws, paired draw by draw (the same labelled subsets), plus the test
    images' own sampling noise (McNemar's discordant pairs of draw 0), added in quadrature."""
    a, b = row["_k_draws"], control["_k_draws"]
    if not a or not b:
        return {}
    n = min(len(a), len(b))
    diffs = np.asarray(a[:n]) - np.asarray(b[:n])
    draw_se = float(np.std(diffs, ddof=1) / math.sqrt(n)) if n > 1 else 0.0
    test = mcnemar(row["_k_correct"], control["_k_correct"], row["_test_size"])
    test_se = test["ci95"] / Z95 if test else None
    se = math.sqrt(draw_se ** 2 + (test_se or 0.0) ** 2)
    gain = float(np.mean(diffs))
    return {"gain": gain, "ci95": Z95 * se, "p": None, "beyond_noise": abs(gain) > Z95 * se if se > 0 else None,
            "covers": "draws" + (" + test sampling" if test else "")}


def gain_text(g: dict) -> str:
    if not g:
        return "-"
    text = f"{100 * g['gain']:+.1f}"
    if g.get("ci95") is not None:
        text += f" ± {100 * g['ci95']:.1f}"
    if g.get("beyond_noise") is not None:
        text += " *" if g["beyond_noise"] else " (n.s.)"
    return text
