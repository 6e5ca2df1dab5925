"""InternVL 1.0 test helpers: a synthetic image-text set (coloured shapes on noise, captioned by class name), a
word-level tokenizer with the interface ``internvl_jax.clip.tokenize`` reads, and random params without a compiled
init."""

from __future__ import annotations

import jax
import numpy as np
from PIL import Image, ImageDraw

COLOURS = {"red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 80, 240)}
SHAPES = ("circle", "square", "triangle")
CLASSES = [f"{c} {s}" for c in COLOURS for s in SHAPES]
TEMPLATES = ("a {}", "a photo of a {}", "{}")


def draw(class_index: int, rng: np.random.Generator, size: int = 56) -> Image.Image:
    """One image of class ``CLASSES[class_index]``: the shape (radius about size / 3) at a random place on grey
    noise."""
    colour, shape = CLASSES[class_index].split()
    noise = rng.integers(60, 90, size=(size, size, 1)).repeat(3, axis=2).astype(np.uint8)
    image = Image.fromarray(noise)
    r = size // 3 + int(rng.integers(-1, 2))
    cx, cy = (int(v) for v in rng.integers(r + 1, size - r, size=2))
    pen = ImageDraw.Draw(image)
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        pen.ellipse(box, fill=COLOURS[colour])
    elif shape == "square":
        pen.rectangle(box, fill=COLOURS[colour])
    else:
        pen.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=COLOURS[colour])
    return image


class WordTokenizer:
    """Word-level: pad 0, BOS 1, EOS 2, every word of ``texts`` (split at spaces, ':' its own word) from 3."""

    bos_id, eos_id = 1, 2

    def __init__(self, texts):
        words = sorted({w for t in texts for w in self._words(t)})
        self.vocab = {w: 3 + i for i, w in enumerate(words)}

    @staticmethod
    def _words(text: str) -> list[str]:
        return text.replace(":", " : ").split()

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [self.vocab[w] for w in self._words(text)]


def tokenizer() -> WordTokenizer:
    return WordTokenizer(["summarize:"] + [t.format(c) for c in CLASSES for t in TEMPLATES])


def random_params(config, seed: int = 0, scale: float = 0.2) -> dict:
    """Random values on the params' shapes (``jax.eval_shape``, nothing compiled): norm scales 1 + noise, the
    rest N(0, scale^2), so features stay O(1) through the normalisations."""
    from internvl_jax.clip_model import abstract_clip_params

    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda path, s: (1.0 if path[-1].key == "scale" else 0.0) + rng.normal(size=s.shape).astype(np.float32) * scale,
        abstract_clip_params(config))
