"""Image preprocessing shared by the CLI and the processor: normalisation constants of every release."""

from __future__ import annotations

import numpy as np

# ImageNet statistics, used by every InternVL release (1.0 included)
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


# every uint8 level of each channel through the formula below: [3, 256]
_LEVELS = ((np.arange(256, dtype=np.float32)[:, None] / 255.0 - IMAGENET_MEAN) / IMAGENET_STD).T.copy()


def normalize(image: np.ndarray) -> np.ndarray:
    """uint8 RGB [..., H, W, 3] -> float32 [..., H, W, 3]: scaled to [0, 1], then ImageNet mean/std, in that order
    (torchvision's ToTensor + Normalize). A uint8 image is looked up per channel in the formula's table (the same
    values, one pass instead of four over the image)."""
    if image.dtype != np.uint8:
        return (image.astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    out = np.empty(image.shape, np.float32)
    for c in range(3):
        np.take(_LEVELS[c], image[..., c], out=out[..., c])
    return out
