"""Plots people would rather look at than read: loss curves, accuracy against C, FID over steps."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .utils import atomic_path, read_jsonl


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def smooth(values: np.ndarray, weight: float = 0.9) -> np.ndarray:
    """Exponential moving average with bias correction (TensorBoard-style smoothing)."""
    out, avg = np.empty_like(values, dtype=float), 0.0
    for i, v in enumerate(values):
        avg = weight * avg + (1 - weight) * v
        out[i] = avg / (1 - weight ** (i + 1))
    return out


def save_figure(fig, path: Path) -> Path:
    plt = _pyplot()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    plt.close(fig)
    return path


def plot_losses(log_path: str | Path, out_png: str | Path) -> Path | None:
    """G and D losses (raw and smoothed), and the critic's Wasserstein estimate where logged."""
    records = read_jsonl(log_path)
    if not records:
        return None
    plt = _pyplot()
    steps = np.array([r["step"] for r in records])
    panels = [k for k in ("d_loss", "g_loss", "wasserstein", "gp") if k in records[-1]]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2), squeeze=False)
    for ax, key in zip(axes[0], panels):
        values = np.array([r.get(key, np.nan) for r in records], dtype=float)
        ax.plot(steps, values, alpha=0.3, lw=0.8, label="raw")
        ax.plot(steps, smooth(np.nan_to_num(values)), lw=1.6, label="smoothed")
        ax.set_title({"d_loss": "critic loss", "g_loss": "generator loss", "wasserstein": "Wasserstein estimate",
                      "gp": "gradient penalty"}[key])
        ax.set_xlabel("generator step")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(Path(log_path).parent.name)
    return save_figure(fig, Path(out_png))


def plot_accuracy_vs_c(curves: dict[str, dict[float, float]], out_png: str | Path, title: str) -> Path:
    """Validation accuracy (percent) against C on a log axis, one line per setting."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for label, curve in curves.items():
        cs = sorted(curve, key=float)
        ax.plot([float(c) for c in cs], [100 * curve[c] for c in cs], marker="o", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("C (LinearSVC convention)")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, Path(out_png))


def plot_series(xs, ys, out_png: str | Path, title: str, xlabel: str, ylabel: str) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.4))
    ax.plot(xs, ys, marker="o")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return save_figure(fig, Path(out_png))
