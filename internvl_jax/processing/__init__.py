"""Turning user inputs (images, videos, chat messages) into the model's static-shaped arrays."""

from .images import load_image, to_rgb
from .pixels import IMAGENET_MEAN, IMAGENET_STD, normalize
from .positions import v2pe_positions
from .processor import Processor, tile_bucket
from .resample import image_tiles
from .templates import (
    IGNORE_INDEX, TEMPLATES, Template, expand_image_tokens, get_template, image_prompt, render, render_hf, sft_labels,
)
from .tiling import TilePlan, choose_grid, pil_tiles, plan_tiles
from .tokenizer import Tokenizer
from .video import frame_indices, load_video, training_frame_indices, video_prompt
