"""InternVL 1.0 test helpers: a synthetic image-text set (coloured shapes on noise, captioned by class name), a
word-level tokenizer with the interface ``internvl_jax.clip.tokenize`` reads, and random params without a compiled
init."""

from __future__ import annotations

import jax
import numpy as np

from train.clip_demo import CLASSES, COLOURS, SHAPES, TEMPLATES, draw  # noqa: F401  the demo's synthetic set


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
