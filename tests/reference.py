"""PyTorch references for the parity tests: tiny random ``transformers`` models, perturbed, saved to disk.

Tolerances are stated once, here (float32 unless a test says otherwise).
"""

from __future__ import annotations

import numpy as np
import torch

TOL_LOGITS = 1e-4  # end-to-end logits, max abs diff
TOL_MODULE = 1e-5  # one module's output, max abs diff

IMAGE_TOKEN_ID = 255
IMAGE_SIZE = 56  # 4x4 patches of 14 -> 4 tokens per tile after pixel shuffle
TOKENS_PER_TILE = 4

_TEXT_COMMON = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
)

# transformers text configs, one per decoder family
TEXT = {
    "qwen2": dict(_TEXT_COMMON, model_type="qwen2", rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    "llama": dict(
        _TEXT_COMMON, model_type="llama", rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 5e5}
    ),
    "qwen3": dict(
        _TEXT_COMMON, model_type="qwen3", head_dim=24, rope_parameters={"rope_type": "default", "rope_theta": 1e6}
    ),
    "internlm3": dict(
        _TEXT_COMMON,
        model_type="internlm3",
        head_dim=16,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 5e4},
    ),
    "phi3": dict(
        _TEXT_COMMON,
        model_type="phi3",
        num_key_value_heads=4,
        pad_token_id=None,  # Phi3Config's default 32000 is outside the tiny vocabulary
        eos_token_id=None,
        max_position_embeddings=128,
        original_max_position_embeddings=32,
        rope_parameters={
            "rope_type": "longrope",
            "rope_theta": 10000.0,
            "short_factor": [1.0 + 0.1 * i for i in range(8)],
            "long_factor": [2.0 + 0.5 * i for i in range(8)],
            "original_max_position_embeddings": 32,
        },
    ),
}

VISION = {
    # InternViT-300M style
    "layernorm_bias": dict(norm_type="layer_norm", attention_bias=True, use_qk_norm=False),
    # InternViT-6B style
    "rmsnorm_qknorm": dict(norm_type="rms_norm", attention_bias=False, use_qk_norm=True),
}


def vision_config(variant: str) -> dict:
    return dict(
        VISION[variant],
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=[IMAGE_SIZE, IMAGE_SIZE],
        patch_size=[14, 14],
        layer_norm_eps=1e-6,
    )


def perturb_(model: torch.nn.Module, seed: int = 0, scale: float = 0.1) -> torch.nn.Module:
    """Add noise to every parameter: LayerScale, norm weights and biases start as constants, which hides wiring bugs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
    return model.eval()


def tiny_internvl(text: str, vision: str = "layernorm_bias", *, tie: bool = False, seed: int = 0, text_overrides=None,
                  **extra):
    """A perturbed random ``InternVLForConditionalGeneration``."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    torch.manual_seed(seed)
    cfg = InternVLConfig(
        text_config=dict(TEXT[text], **(text_overrides or {})),
        vision_config=vision_config(vision),
        image_token_id=IMAGE_TOKEN_ID,
        tie_word_embeddings=tie,
        **extra,
    )
    return perturb_(InternVLForConditionalGeneration(cfg), seed)


def tiny_causal_lm(family: str, seed: int = 0, **overrides):
    """A perturbed random transformers causal LM of ``family`` (a key of ``TEXT``)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    d = dict(TEXT[family], **overrides)
    cfg = AutoConfig.for_model(d.pop("model_type"), **d)
    return perturb_(AutoModelForCausalLM.from_config(cfg), seed)


def image_batch(tiles_per_row: list[list[int]], length: int, max_tiles: int, seed: int = 0):
    """Token ids with image spans and matching tiles.

    tiles_per_row[b] lists the tile count of each image of row b. Returns (ids int32 [B, L],
    torch pixels [N, 3, H, W] of all tiles in order, our pixels [B, T, H, W, 3], tile_mask [B, T]).
    """
    rng = np.random.default_rng(seed)
    b = len(tiles_per_row)
    ids = rng.integers(0, IMAGE_TOKEN_ID - 1, (b, length)).astype(np.int32)
    pixels = np.zeros((b, max_tiles, IMAGE_SIZE, IMAGE_SIZE, 3), np.float32)
    mask = np.zeros((b, max_tiles), bool)
    flat = []
    for row, images in enumerate(tiles_per_row):
        pos, slot = 2, 0
        for n in images:
            ids[row, pos : pos + n * TOKENS_PER_TILE] = IMAGE_TOKEN_ID
            pos += n * TOKENS_PER_TILE + 3
            for _ in range(n):
                tile = rng.standard_normal((IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
                pixels[row, slot], mask[row, slot] = tile, True
                flat.append(tile)
                slot += 1
        assert pos <= length, "sequence too short for the images"
    torch_pixels = torch.tensor(np.stack(flat).transpose(0, 3, 1, 2))
    return ids, torch_pixels, pixels, mask


def max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
