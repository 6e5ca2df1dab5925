"""Image preprocessing shared by the CLI and the processor: normalisation constants of every release."""

from __future__ import annotations

import numpy as np

# ImageNet statistics, used by every InternVL release (1.0 included)
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def normalize(image: np.ndarray) -> np.ndarray:
    """uint8 RGB [..., H, W, 3] -> float32 [..., H, W, 3]: scaled to [0, 1], then ImageNet mean/std."""
    return (image.astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
