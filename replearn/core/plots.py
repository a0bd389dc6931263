"""Plots people would rather look at than read: loss curves, accuracy against C, FID over steps."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .utils import atomic_path, read_jsonl


def pyplot():
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
    plt = pyplot()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    plt.close(fig)
    return path


def plot_losses(log_path: str | Path, out_png: str | Path) -> Path | None:
    """G and D losses (raw and smoothed), and the critic's Wasserstein estimate where logged."""
    records = read_jsonl(log_path)
    if not records:
        return None
    plt = pyplot()
    steps = np.array([r["step"] for r in records])
    panels = [k for k in ("d_loss", "g_loss", "wasserstein", "gp") if k in records[-1]]
    # constrained layout leaves room for the figure title above the panels' own titles
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False, layout="constrained")
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
    plt = pyplot()
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


# ============================================================================ generator quality (evaluate / report)
def plot_metrics_vs_step(records: list[dict], out_png: str | Path, title: str) -> Path | None:
    """FID (where computed), the critic's Wasserstein estimate and diversity against training step.

    `records` are evaluate.json rows: {'step', 'fid', 'wasserstein': {'estimate'}, 'diversity':
    {'critic': {'generated': {'mean_pairwise_distance'}, 'real': {...}}}}. None when < 2 steps."""
    rows = sorted(records, key=lambda r: r["step"])
    if len(rows) < 2:
        return None
    steps = [r["step"] for r in rows]
    panels = []
    if any(r.get("fid") is not None for r in rows):
        panels.append(("FID (lower is better)", [r.get("fid") for r in rows], None))
    panels.append(("critic: E[D(real)] - E[D(fake)]", [r["wasserstein"]["estimate"] for r in rows], None))
    div = [r["diversity"]["critic"] for r in rows]
    panels.append(("diversity: mean pairwise distance\n(critic features, that step's critic)",
                   [d["generated"]["mean_pairwise_distance"] for d in div],
                   [d["real"]["mean_pairwise_distance"] for d in div]))
    plt = pyplot()
    # constrained layout leaves room for the figure title above the panels' own titles
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False, layout="constrained")
    for ax, (label, values, reference) in zip(axes[0], panels):
        ax.plot(steps, [np.nan if v is None else v for v in values], marker="o", label="generated")
        if reference is not None:
            ax.plot(steps, reference, marker="x", ls="--", label="real images")
            ax.legend(fontsize=8)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("generator step")
        ax.grid(alpha=0.3)
    fig.suptitle(title, y=1.04)   # above the two-line panel titles
    return save_figure(fig, Path(out_png))


def gap_mosaic(rows: list[list[np.ndarray]], gap: int = 2, split_after: int = 1) -> np.ndarray:
    """Tile H x W x 3 uint8 images into one array, white gaps, a wider gap after `split_after` columns."""
    h, w = rows[0][0].shape[:2]
    cols = len(rows[0])
    wide = 4 * gap
    width = cols * w + (cols - 1) * gap + (wide - gap if split_after < cols else 0)
    out = np.full((len(rows) * h + (len(rows) - 1) * gap, width, 3), 255, dtype=np.uint8)
    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            x = c * (w + gap) + (wide - gap if c >= split_after else 0)
            out[r * (h + gap):r * (h + gap) + h, x:x + w] = img
    return out


def plot_neighbour_grid(generated: np.ndarray, neighbours: np.ndarray, distances: np.ndarray,
                        out_png: str | Path, title: str) -> Path:
    """Each generated image (left column) beside its k nearest training images, nearest first.

    generated: Q x H x W x 3 uint8; neighbours: Q x k x H x W x 3 uint8; distances: Q x k (L2)."""
    rows = [[g, *nb] for g, nb in zip(generated, neighbours)]
    mosaic = gap_mosaic(rows)
    plt = pyplot()
    q, k = distances.shape
    fig, ax = plt.subplots(figsize=(1.0 + 0.75 * (k + 1), 0.8 + 0.75 * q))
    ax.imshow(mosaic, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlabel(f"left: generated | right: {k} nearest training images, nearest first "
                  f"(median L2 to nearest: {np.median(distances[:, 0]):.3g})", fontsize=8)
    ax.set_title(title, fontsize=10)
    return save_figure(fig, Path(out_png))


def plot_image_row(panels: list[tuple[str, str | Path]], out_png: str | Path, title: str) -> Path:
    """Images (e.g. each family's sample grid) side by side under their labels: one PNG per table row."""
    from PIL import Image
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 4.0), squeeze=False)
    for ax, (label, path) in zip(axes[0], panels):
        with Image.open(path) as img:
            ax.imshow(np.asarray(img.convert("RGB")), interpolation="nearest")
        ax.set_title(label, fontsize=9)
        ax.axis("off")
    fig.suptitle(title)
    return save_figure(fig, Path(out_png))
