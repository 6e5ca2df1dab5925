"""The InternVL 1.0 demo: coloured shapes on noise captioned by class name, a word-level LLaMA-style tokenizer and a
tiny InternVL-C/G, so ``internvl-jax train internvl1_contrastive_demo workdir=DIR`` runs without downloads.

The setup hook (:func:`setup`) writes ``<workdir>/data``: ``images/*.png``, ``captions.jsonl`` (one
``{"image", "caption"}`` pair per image, the caption a random template of its class, train/data/captions.py) and
``meta.json``, and the tokenizer in ``<workdir>/data/tokenizer``; the files are a pure function of the seed.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {"red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 80, 240)}
SHAPES = ("circle", "square", "triangle")
CLASSES = [f"{c} {s}" for c in COLOURS for s in SHAPES]
TEMPLATES = ("a {}", "a photo of a {}", "{}")
IMAGE_SIZE = 56  # an 8 x 8 grid of 7 px patches
TEXT_LENGTH = 12  # the longest demo text: BOS "English caption:" + 6 words + EOS = 11 tokens
TRAIN_PER_CLASS = 100
DATA = "data"
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")  # LLaMA's ids: 0 (also the text padding), BOS 1, EOS 2


def draw(class_index: int, rng: np.random.Generator, size: int = IMAGE_SIZE) -> Image.Image:
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


def demo_texts() -> list[str]:
    """Every text the demo tokenises: the stage prefixes and each template of each class."""
    from train.data.captions import ITG_PREFIX

    return ["summarize:", ITG_PREFIX] + [t.format(c) for c in CLASSES for t in TEMPLATES]


def build_clip_tokenizer(texts=None):
    """A ``tokenizers.Tokenizer``: word-level over the words of ``texts`` (default :func:`demo_texts`; words and
    punctuation apart), ``<unk>`` 0, ``<s>`` 1, ``</s>`` 2, the words from 3 in sorted order."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    splitter = pre_tokenizers.Whitespace()
    words = sorted({w for t in (demo_texts() if texts is None else texts) for w, _ in splitter.pre_tokenize_str(t)})
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate((*SPECIAL_TOKENS, *words))}, unk_token="<unk>"))
    tok.pre_tokenizer = splitter
    tok.decoder = decoders.WordPiece()  # joins words with spaces
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tok


def write_clip_tokenizer(folder: str, texts=None) -> str:
    """tokenizer.json + tokenizer_config.json of :func:`build_clip_tokenizer` in ``folder`` (read by
    ``internvl_jax.processing.Tokenizer.from_pretrained``); returns the folder."""
    os.makedirs(folder, exist_ok=True)
    build_clip_tokenizer(texts).save(os.path.join(folder, "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
              "unk_token": "<unk>", "model_max_length": 80}
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    return folder


def write_clip_demo_set(folder: str, *, per_class: int = TRAIN_PER_CLASS, seed: int = 0,
                        size: int = IMAGE_SIZE) -> str:
    """``per_class`` images of every class with a caption each (a random template) under ``folder``; returns the
    meta file's path."""
    rng = np.random.default_rng(seed)
    images = os.path.join(folder, "images")
    os.makedirs(images, exist_ok=True)
    lines = []
    for i, c in enumerate(np.tile(np.arange(len(CLASSES)), per_class)):
        name = f"{i:05d}.png"
        draw(int(c), rng, size).save(os.path.join(images, name))
        template = TEMPLATES[int(rng.integers(len(TEMPLATES)))]
        lines.append(json.dumps({"image": name, "caption": template.format(CLASSES[c])}))
    with open(os.path.join(folder, "captions.jsonl"), "w") as f:
        f.write("\n".join(lines) + "\n")
    meta = os.path.join(folder, "meta.json")
    with open(meta, "w") as f:
        json.dump({"clip_shapes": {"root": "images", "annotation": "captions.jsonl", "length": len(lines)}}, f,
                  indent=2)
    return meta


def clip_demo_model_config(vocab_size: int | None = None, **changes):
    """The demo's tiny InternVL 1.0: a 2-layer RMSNorm ViT 32 wide on 56 px images of 7 px patches, a 2-layer
    QLLaMA 32 wide with 4 queries, a 32-d CLIP space. ``vocab_size``: default the demo tokenizer's. ``changes``:
    CLIPConfig fields to replace."""
    from internvl_jax.clip_config import CLIPConfig
    from internvl_jax.config import TextConfig, VisionConfig

    vocab = build_clip_tokenizer().get_vocab_size() if vocab_size is None else vocab_size
    width = 32
    config = CLIPConfig(
        vision=VisionConfig(hidden_size=width, num_layers=2, num_heads=2, intermediate_size=2 * width,
                            image_size=IMAGE_SIZE, patch_size=7, norm_type="rms_norm", qk_norm=True, qkv_bias=False),
        qllama=TextConfig(family="llama", vocab_size=vocab, hidden_size=width, num_layers=2, num_heads=4,
                          num_kv_heads=4, head_dim=width // 4, intermediate_size=2 * width,
                          max_position_embeddings=64, tie_word_embeddings=True),
        num_query_token=4, clip_embed_dim=32, attn_pool_num_heads=2)
    return config.replace(**changes)


def setup(cfg):
    """The setup hook of the demo presets: write the pairs and the tokenizer under ``<workdir>/data`` unless a
    complete copy of this seed's is there; return ``cfg`` pointing at them (``data.meta``, ``tokenizer``)."""
    from .config import ConfigError

    folder = os.path.join(os.path.abspath(cfg.workdir), DATA)
    done = os.path.join(folder, "complete.json")
    sizes = {"per_class": TRAIN_PER_CLASS, "image_size": IMAGE_SIZE, "seed": cfg.seed, "classes": CLASSES,
             "templates": list(TEMPLATES)}
    written = json.load(open(done)) if os.path.exists(done) else None
    checkpoints = os.path.join(os.path.abspath(cfg.workdir), "checkpoints")
    if written not in (None, sizes) and os.path.isdir(checkpoints) and os.listdir(checkpoints):
        raise ConfigError(f"{done}: this workdir's data was written with {written}, this version writes {sizes}, and "
                          f"{checkpoints} holds a run trained on it; use a new workdir")
    if written != sizes:
        write_clip_demo_set(folder, seed=cfg.seed)
        write_clip_tokenizer(os.path.join(folder, "tokenizer"))
        with open(done, "w") as f:
            json.dump(sizes, f)
    data = dataclasses.replace(cfg.data, meta=os.path.join(folder, "meta.json"))
    return cfg.replace(data=data, tokenizer=os.path.join(folder, "tokenizer"))
