"""Generated sample images for the demo, tests and benchmarks (nothing is downloaded)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw, ImageFilter


def photo_like(width: int, height: int, seed: int = 0) -> np.ndarray:
    """uint8 RGB [height, width, 3]: gradients, coloured shapes, texture and blur, then JPEG compression, so that
    resampling sees the edges and noise of a real photo."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([128 + 100 * np.sin(xx / (20 + 7 * c) + c) * np.cos(yy / (15 + 5 * c)) for c in range(3)], -1)
    im = Image.fromarray(np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(im)
    for _ in range(6):
        x0, y0 = rng.integers(0, width), rng.integers(0, height)
        draw.ellipse((x0, y0, x0 + width // 4, y0 + height // 4), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    im = im.filter(ImageFilter.GaussianBlur(1.2))
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=85)
    return np.asarray(Image.open(buf).convert("RGB"))
