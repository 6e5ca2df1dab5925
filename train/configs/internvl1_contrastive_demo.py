"""``internvl-jax train internvl1_contrastive_demo workdir=DIR``: InternVL 1.0's contrastive stage on synthetic
image-text pairs, no downloads.

The setup hook (train/clip_demo.py) writes 900 coloured shapes on noise (9 classes: 3 colours x 3 shapes, 56 px)
captioned by a random template of their class name, and a word-level LLaMA-style tokenizer, into
``<workdir>/data``. The model is a tiny InternVL-C/G (2-layer ViT and QLLaMA, 32 wide, 4 queries); symmetric
InfoNCE over the global batch, features all-gathered over the mesh, everything but the stage-2 parts trained
(``freeze.freeze_backbone=true`` freezes the ViT). A rerun on the same workdir resumes.
"""

from train.clip_demo import TEXT_LENGTH, clip_demo_model_config
from train.config import DataConfig, TrainConfig
from train.optim import OptimConfig

CONFIG = TrainConfig(
    name="internvl1_contrastive_demo",
    objective="contrastive",
    model=clip_demo_model_config(),
    setup="train.clip_demo:setup",
    steps=300,
    dtype="float32",
    remat="none",
    rules="dp",  # a tiny model: params replicated, the batch split over the devices
    log_every=50,
    save_every=300,
    keep=2,
    export="original",
    data=DataConfig(rows=16, max_tokens=TEXT_LENGTH),
    optim=OptimConfig(lr=5e-3, warmup_steps=20, weight_decay=0.1, b2=0.98),
)
