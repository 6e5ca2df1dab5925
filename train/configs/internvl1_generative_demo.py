"""``internvl-jax train internvl1_generative_demo workdir=DIR [init=CONTRASTIVE_EXPORT]``: InternVL 1.0's
generative stage (ITM + ITC + ITG) on the contrastive demo's synthetic pairs (train/clip_demo.py), no downloads.

Without ``init`` the tiny model starts at random; give the export of a contrastive demo run
(``<workdir>/export`` of ``internvl-jax train internvl1_contrastive_demo``) to continue from stage 1, as the
original did. The stage's rules train the queries, QLLaMA's cross-attention, clip_projector2, itm_head and the
temperature; the ViT, QLLaMA's own weights, clip_projector and text_projection stay frozen.
"""

from train.clip_demo import TEXT_LENGTH, clip_demo_model_config
from train.config import DataConfig, TrainConfig
from train.optim import OptimConfig

CONFIG = TrainConfig(
    name="internvl1_generative_demo",
    objective="generative",
    model=clip_demo_model_config(),
    setup="train.clip_demo:setup",
    steps=200,
    dtype="float32",
    remat="none",
    log_every=20,
    save_every=100,
    keep=2,
    export="original",
    data=DataConfig(rows=24, max_tokens=TEXT_LENGTH),
    optim=OptimConfig(lr=1e-3, warmup_steps=10, weight_decay=0.05),
)
