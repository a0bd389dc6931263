"""Decoding one image and fitting it to `size` x `size` uint8.

Geometry (docs/protocol.md s.1): min-side resize to `size`, then center crop `size` x `size`.
Both happen in one PIL bicubic resampling of the centred square (`resize(box=...)`), which is
the same as resize-then-crop in continuous coordinates without rounding the intermediate size;
PIL's bicubic widens its kernel when shrinking, so it is antialiased. Images already
`size` x `size` pass through untouched. JPEGs are first decoded at a reduced DCT scale
(Pillow draft mode) that still leaves the short side >= `size`, which makes full-size ImageNet
JPEGs several times cheaper (see benchmarks/prepare.py).
"""
from __future__ import annotations

import io

from PIL import Image
import numpy as np


DRAFT_MARGIN = 1         # JPEG draft keeps the short side >= DRAFT_MARGIN * size (1: fastest; see benchmark)


# ============================================================================ geometry
def fit_square(img: Image.Image, size: int) -> np.ndarray:
    """Min-side resize to `size` then center crop to `size` x `size`: HWC uint8 RGB."""
    extent = img.size
    if extent != (size, size):
        drafted = img.draft("RGB", (DRAFT_MARGIN * size, DRAFT_MARGIN * size))   # no-op unless JPEG
        if drafted is not None:
            extent = drafted[1][2:]   # the image area in drafted pixels (the size is rounded up)
    if img.mode != "RGB":
        img = img.convert("RGB")      # grayscale, CMYK, palette, RGBA (alpha dropped)
    if img.size == (size, size):
        return np.asarray(img, dtype=np.uint8)
    width, height = extent
    side = min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    out = img.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + side, top + side))
    return np.asarray(out, dtype=np.uint8)


def decode_image(item: bytes | str, size: int) -> np.ndarray | None:
    """Encoded bytes or a file path -> size x size x 3 uint8, or None if the image is unreadable."""
    try:
        with Image.open(io.BytesIO(item) if isinstance(item, bytes) else item) as img:
            return fit_square(img, size)
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError):
        return None   # counted and reported by the caller


def fit_array(images: np.ndarray, size: int) -> np.ndarray:
    """Decoded N x H x W x 3 uint8 images -> N x size x size x 3 (untouched when already that size)."""
    if images.shape[1:3] == (size, size):
        return images
    return np.stack([fit_square(Image.fromarray(img), size) for img in images])
