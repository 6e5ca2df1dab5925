"""``Processor``: chat messages, images and videos -> the model's arrays, as the original ``chat()`` builds them."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image

from internvl_jax.config import ConfigError, InternVLConfig, load_config

from .images import load_image
from .pixels import normalize
from .positions import v2pe_positions
from .resample import image_tiles
from .templates import (IMAGE_PLACEHOLDER, IMG_CONTEXT_TOKEN, Template, expand_image_tokens, get_template,
                        image_prompt, render, render_hf)
from .tiling import TilePlan, pil_tiles, plan_tiles
from .tokenizer import Tokenizer
from .video import load_video

RESIZES = ("pil", "device")  # Processor.resize
TILE_BUCKETS = (1, 2, 4, 8, 13, 16, 24, 32, 48, 64)  # tile slots per row: 13 = 12 tiles + thumbnail


def tile_bucket(n: int) -> int:
    """The number of tile slots a row with ``n`` tiles is padded to."""
    return next((b for b in TILE_BUCKETS if b >= n), n)


def bucketed_tiles(tiles: list) -> tuple[np.ndarray, np.ndarray]:
    """Tiles of one row ([n_i, S, S, 3] per image or frame, in order) -> (pixel_values float32 [1, T, S, S, 3],
    tile_mask bool [1, T]), T the :func:`tile_bucket` of their count."""
    stacked = np.concatenate([np.asarray(t) for t in tiles])
    n = stacked.shape[0]
    t = tile_bucket(n)
    pixels = np.zeros((1, t, *stacked.shape[1:]), np.float32)
    pixels[0, :n] = stacked
    return pixels, (np.arange(t) < n)[None]


def _agreed_image_token_id(config: InternVLConfig, raw: dict, tokenizer: Tokenizer, path: str) -> InternVLConfig:
    """``config`` with the tokenizer's IMG_CONTEXT id where config.json leaves it to the tokenizer (original
    configs: -1); a ConfigError naming both ids and their sources where the two disagree (the model would look for
    image tokens the prompt does not have)."""
    token_id = tokenizer.img_context_id
    if config.image_token_id < 0:
        return config.replace(image_token_id=token_id)
    if config.image_token_id != token_id:
        key = next((k for k in ("image_token_id", "img_context_token_id") if k in raw), None)
        source = f"config.json's {key}" if key else "the default of config.json's absent image_token_id"
        raise ConfigError(f"{path}: IMG_CONTEXT token ids disagree: {source} is {config.image_token_id}, the "
                          f"tokenizer's {IMG_CONTEXT_TOKEN} is {token_id}; expected the same id (fix one of them)")
    return config


@dataclass
class Processor:
    """Tokenizer, template and tiling settings of one checkpoint.

    ``template`` None means the transformers-native prompt format (no default system prompt).
    """

    tokenizer: Tokenizer
    config: InternVLConfig
    template: Template | None
    system_message: str | None = None
    max_length: int | None = None
    v2pe_stride: float | None = None  # V2PE position stride per tile; None: plain integer positions
    resize: str = "pil"  # "pil": the original's PIL tiling on the host (exact); "device": resample.image_tiles

    def __post_init__(self):
        if self.resize not in RESIZES:
            raise ValueError(f"Processor resize={self.resize!r}: expected one of {', '.join(RESIZES)}")

    def tiles(self, image, plan: TilePlan):
        """float32 [plan.num_tiles, S, S, 3] normalised tiles of one image (PIL image or uint8 [H, W, 3]) by
        ``plan``. ``resize="pil"``: the original's ``dynamic_preprocess`` on the host (:func:`pil_tiles`), bit for
        bit what the training pipeline gives; ``"device"``: the jitted path (equal to PIL up to rare off-by-one
        rounding; a program per shape bucket; for accelerator hosts: on a CPU the host path is faster,
        ``bench/preprocess.py``)."""
        if self.resize == "device":
            return image_tiles(np.asarray(image), plan, self.config.image_size)
        image = image if isinstance(image, Image.Image) else Image.fromarray(image)
        return normalize(pil_tiles(image, plan, self.config.image_size))

    @classmethod
    def from_pretrained(cls, path: str, **overrides) -> "Processor":
        """Read the template, tiling settings, image size and tokenizer from a checkpoint folder (either layout)."""
        config = load_config(path)
        with open(os.path.join(path, "config.json")) as f:
            raw = json.load(f)
        tokenizer = Tokenizer.from_pretrained(path)
        config = _agreed_image_token_id(config, raw, tokenizer, path)
        template = get_template(raw["template"]) if raw.get("template") else None
        kwargs = dict(
            tokenizer=tokenizer,
            config=config,
            template=template,
            system_message=raw.get("system_message"),  # null -> the template's default (see templates.render)
            max_length=config.text.max_position_embeddings,
            v2pe_stride=config.v2pe_stride,  # set when the checkpoint's config asks for V2PE
        )
        return cls(**{**kwargs, **overrides})

    def prompt(self, question: str, *, num_images: int = 0, video_frames: int = 0, history=()) -> str:
        """The prompt text (placeholders not yet expanded): history = [(question, answer), ...]."""
        if (num_images or video_frames) and not history:
            question = image_prompt(question, num_images, video_frames=video_frames)
        messages = []
        for q, a in history:
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        messages.append({"role": "user", "content": question})
        if self.template is None:
            return render_hf(messages)
        return render(self.template, messages, system_message=self.system_message)

    def image_tiles(self, images, max_tiles: int | None = None) -> list:
        """The tiles of each image ([n_i, S, S, 3] each), by the checkpoint's dynamic-resolution rule; several
        images share the ``max_tiles`` budget (default: the checkpoint's), as ``chat()`` does."""
        c = self.config
        images = [load_image(i) for i in images]
        max_tiles = max_tiles or c.max_dynamic_patch
        per_image = max(1, max_tiles // len(images)) if len(images) > 1 else max_tiles
        tiles = []
        for im in images:
            plan = plan_tiles(im.width, im.height, min_tiles=c.min_dynamic_patch, max_tiles=per_image,
                              tile_size=c.image_size, use_thumbnail=c.use_thumbnail)
            tiles.append(self.tiles(im, plan))
        return tiles

    def __call__(self, text: str, images=(), videos=(), *, history=(), max_tiles: int | None = None,
                 num_segments: int = 8, return_question: bool = False) -> dict:
        """One conversation turn -> numpy arrays with a batch axis of 1.

        text: the question (``<image>`` placeholders optional in the first turn: without them images go in front,
        as ``chat()`` does; a later turn with images needs them, one per image and video frame); images: paths or
        PIL images; videos: paths (``num_segments`` frames each, one tile per frame); history: earlier (question,
        answer) pairs, their questions with the placeholders they were asked with (``question`` below), so a later
        turn passes the conversation's images again, as the original ``chat`` does. Returns ``input_ids`` int32
        [1, L], and with images ``pixel_values`` float32 [1, T, S, S, 3] with ``tile_mask`` bool [1, T] (T = a tile
        bucket), plus ``positions`` float32 [1, L] when the processor uses V2PE; with ``return_question`` also
        ``question``: the text as it went into the prompt (placeholders in front on a first turn with media), what
        a history keeps (a string: leave it out of what goes to the device).
        """
        c = self.config
        if history and (images or videos) and IMAGE_PLACEHOLDER not in "".join([text, *(q for q, _ in history)]):
            raise ValueError(
                f"a follow-up turn with {len(images)} image(s) and {len(videos)} video(s) needs an {IMAGE_PLACEHOLDER} "
                "placeholder in its question for each image (and each video frame): only the first question gets "
                "them in front; e.g. '<image>\\nWhat about this one?'")
        images = [load_image(i) for i in images]
        tiles = self.image_tiles(images, max_tiles)
        frames = 0
        for path in videos:
            video, _ = load_video(path, num_segments=num_segments)
            one = plan_tiles(video.shape[2], video.shape[1], dynamic=False, use_thumbnail=False)
            tiles += [self.tiles(f, one) for f in video]
            frames += len(video)
        if (images or frames) and not history:
            text = image_prompt(text, len(images), video_frames=frames)
        placed = sum(q.count(IMAGE_PLACEHOLDER) for q, _ in history)
        if placed and len(tiles) < placed:
            raise ValueError(
                f"the history holds {placed} {IMAGE_PLACEHOLDER} placeholder(s) but {len(tiles)} image(s) and video "
                "frame(s) were given: pass the conversation's images (and videos) again on every turn, as the "
                "original chat does")
        prompt = self.prompt(text, history=history)
        prompt = expand_image_tokens(prompt, [len(t) for t in tiles], c.tokens_per_tile)
        ids = np.asarray(self.tokenizer.encode(prompt), np.int32)[None]
        if self.max_length is not None and ids.shape[1] > self.max_length:
            raise ValueError(
                f"the prompt is {ids.shape[1]} tokens, {ids.shape[1] - self.max_length} more than the model's "
                f"maximum of {self.max_length}; use fewer tiles (max_tiles) or a shorter text"
            )
        out = {"input_ids": ids, **({"question": text} if return_question else {})}
        if tiles:
            out["pixel_values"], out["tile_mask"] = bucketed_tiles(tiles)
        if self.v2pe_stride is not None:
            out["positions"] = v2pe_positions(ids[0], c.image_token_id, self.v2pe_stride,
                                              tokens_per_tile=c.tokens_per_tile)[None]
        return out
