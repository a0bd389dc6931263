"""How fast does `prepare` turn a tree of full-size JPEGs into 32 x 32 images?

Writes a tree of ImageNet-sized JPEGs (500x375 .. 800x600, photo-like content) into a temporary
folder, then times, in the same run on the same files:
  replearn          data.load_source: draft-mode decoding in `workers` processes (the real path)
  replearn_serial   the same in one process (isolates what draft mode alone buys)
  full_decode       plain PIL: open -> convert RGB -> resize short side to 32 -> center crop,
                    one process, every pixel decoded (what a straightforward loader does)
and how far the outputs are apart (draft mode decodes at a reduced DCT scale, so they differ a little).

    python benchmarks/prepare.py [--images 300] [--workers 2] [--repeats 3]
prints the JSON and writes benchmarks/results/prepare.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from replearn import data  # noqa: E402
from replearn.core.utils import atomic_write_json, hardware, provenance  # noqa: E402

SIZES = [(500, 375), (640, 480), (800, 600), (375, 500), (500, 333), (600, 800)]   # typical ImageNet shapes


def photo_like(width: int, height: int, rng: np.random.Generator) -> Image.Image:
    """Smooth colour fields, edges and fine texture: compresses to ~photo JPEG sizes (not noise, not flat)."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32) / max(width, height)
    channels = []
    for _ in range(3):
        fx, fy, phase = rng.uniform(2, 12), rng.uniform(2, 12), rng.uniform(0, 6)
        channels.append(128 + 90 * np.sin(fx * xx + phase) * np.cos(fy * yy - phase))
    rgb = np.stack(channels, -1)
    rgb[(xx * 7 + yy * 5) % 1 < 0.1] *= 0.5                       # hard edges
    rgb += rng.normal(0, 8, rgb.shape).astype(np.float32)          # sensor-like texture
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))


def write_tree(root: Path, n: int, classes: int, seed: int) -> int:
    rng = np.random.default_rng(seed)
    total = 0
    for i in range(n):
        folder = root / f"n{i % classes:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"img_{i:05d}.JPEG"
        photo_like(*SIZES[i % len(SIZES)], rng).save(path, quality=90)
        total += path.stat().st_size
    return total


def full_decode(path: str, size: int) -> np.ndarray:
    """The plain loader: decode every pixel, resize the short side to `size`, crop the centre."""
    with Image.open(path) as img:
        img = img.convert("RGB")
        w, h = img.size
        scale = size / min(w, h)
        new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
        img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
        left, top = (new_w - size) // 2, (new_h - size) // 2
        return np.asarray(img.crop((left, top, left + size, top + size)))


def same_geometry_no_draft(path: str, size: int) -> np.ndarray:
    with Image.open(path) as img:
        img.load()   # decoded at full size: draft mode no longer applies
        return data.fit_square(img, size)


def timed(fn, repeats: int) -> tuple[list[float], object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return times, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "prepare.json"))
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="replearn-bench-") as tmp:
        root = Path(tmp) / "train"
        jpeg_bytes = write_tree(root, args.images, args.classes, args.seed)
        files = sorted(str(p) for p in root.glob("*/*.JPEG"))
        t_fast, fast = timed(lambda: data.load_source(str(root), args.size, args.workers, progress=False),
                             args.repeats)
        t_serial, _ = timed(lambda: data.load_source(str(root), args.size, 1, progress=False), args.repeats)
        t_full, full = timed(lambda: np.stack([full_decode(f, args.size) for f in files]), args.repeats)
        no_draft = np.stack([same_geometry_no_draft(f, args.size) for f in files])

    n = len(files)
    best = {"replearn": min(t_fast), "replearn_serial": min(t_serial), "full_decode": min(t_full)}
    result = {
        "benchmark": "prepare",
        "summary": {
            "images_per_second": round(n / best["replearn"], 1),
            "speedup_vs_full_decode": round(best["full_decode"] / best["replearn"], 2),
            "speedup_serial_draft_only": round(best["full_decode"] / best["replearn_serial"], 2),
            "full_decode_images_per_second": round(n / best["full_decode"], 1),
            "mean_abs_pixel_diff_vs_full_decode": round(float(np.abs(fast.images.astype(int) - full).mean()), 3),
            "mean_abs_pixel_diff_draft_vs_no_draft": round(float(np.abs(fast.images.astype(int) - no_draft).mean()), 3),
        },
        "machine": hardware(),
        "provenance": provenance(),
        "parameters": {**vars(args), "out": str(Path(args.out).relative_to(REPO)) if Path(args.out).is_relative_to(REPO) else args.out,
                       "image_sizes": SIZES, "jpeg_quality": 90, "mean_jpeg_kb": round(jpeg_bytes / n / 1024, 1),
                       "draft_margin": data.DRAFT_MARGIN, "timing": "best of repeats, wall clock, files in page cache"},
        "timings_s": {"replearn": t_fast, "replearn_serial": t_serial, "full_decode": t_full,
                      "median": {k: statistics.median(v) for k, v in
                                 (("replearn", t_fast), ("replearn_serial", t_serial), ("full_decode", t_full))}},
        "images": n,
    }
    atomic_write_json(args.out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
