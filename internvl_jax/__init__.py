"""InternVL vision-language models in JAX/Flax."""

from .config import InternVLConfig, TextConfig, VisionConfig, RopeConfig, ConfigError, load_config
from .model import InternVL, ImageTokenMismatch, abstract_params, check_image_tokens, init_params, param_count
from .presets import PRESETS, get_preset
from .generate import generate, generate_stream


def __getattr__(name):
    # resolved lazily: convert/ builds on this package, so importing it here would be circular
    if name in ("load_pretrained", "from_state_dict"):
        import convert.load

        return getattr(convert.load, name)
    if name == "Processor":  # imported on use: it brings the tokenizer and video decoders
        from .processing import Processor

        return Processor
    raise AttributeError(f"module 'internvl_jax' has no attribute {name!r}")


__all__ = [
    "InternVL", "InternVLConfig", "TextConfig", "VisionConfig", "RopeConfig", "ConfigError", "ImageTokenMismatch",
    "PRESETS", "abstract_params", "check_image_tokens", "get_preset", "init_params", "load_config",
    "load_pretrained", "from_state_dict", "param_count", "Processor", "generate", "generate_stream",
]
