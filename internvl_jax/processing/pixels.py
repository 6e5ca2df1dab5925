"""Image preprocessing shared by the CLI and the processor: normalisation constants of every release."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

# ImageNet statistics, used by every InternVL release (1.0 included)
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def normalize(image: np.ndarray) -> np.ndarray:
    """RGB [..., W, 3] (uint8 levels) -> float32 [..., W, 3]: scaled to [0, 1], then ImageNet mean/std, in
    torchvision's order (ToTensor, then Normalize). Computed in place on rows of W pixels with the statistics
    repeated along them: numpy's inner loop is then a row long instead of 3 channels (3.2x faster on 448 px
    tiles), and every element takes the same float32 operations as ``(x / 255 - mean) / std``."""
    out = np.array(image, np.float32, order="C")  # a fresh C-ordered copy: the rows below must be views of it
    width = out.shape[-2] if out.ndim > 1 else 1
    rows = out.reshape(-1, 3 * width)
    rows /= np.float32(255.0)
    rows -= np.tile(IMAGENET_MEAN, width)
    rows /= np.tile(IMAGENET_STD, width)
    return out


def normalize_levels(levels):
    """Levels [..., 3] (uint8, or float on the 0-255 scale) -> float32 [..., 3], normalised as :func:`normalize`,
    in traced (jitted) code: the model's own step when the training pipeline sends tiles as uint8 (a quarter of
    float32's bytes from the host).
    XLA turns each division by a constant into a multiplication by its reciprocal, so a value may differ from
    :func:`normalize`'s in its last bits (<= 1e-6 absolute; the values reach 2.7)."""
    return (levels.astype(jnp.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
