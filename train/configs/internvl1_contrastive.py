"""``internvl-jax train internvl1_contrastive init=/ckpt/InternVL-14B-224px data.meta=pairs/meta.json workdir=runs/c``

InternVL 1.0's contrastive stage (InternVL-C): symmetric InfoNCE between clip_projector(InternViT-6B) and the
QLLaMA text features over the global batch, the features all-gathered over the mesh, the temperature clamped at
100 (train/clip_train.py). Data: image-text pairs, JSONL lines ``{"image", "caption"}`` named by an InternVL
meta file (train/data/captions.py); texts are "summarize:" + caption, 80 tokens (``data.max_tokens``), images
224 px. Trained: everything but the stage-2 parts (queries, cross-attention, clip_projector2, itm_head);
``freeze.freeze_backbone=true`` freezes the ViT (``freeze.unfreeze_vit_layers=-k`` then trains its last k layers).

Without ``init`` the InternVL-14B-224px preset starts at random (give ``tokenizer=`` the LLaMA tokenizer folder).

What is not the original's: its stage-1 training code and settings were not released, so the optimiser settings
here are the library's defaults (AdamW, cosine, warm-up ratio 0.03, weight decay 0.05, lr 4e-5): set ``optim.*``
and ``data.rows`` for your run. No image augmentation.
"""

from train.config import DataConfig, TrainConfig

CONFIG = TrainConfig(
    name="internvl1_contrastive",
    objective="contrastive",
    preset="InternVL-14B-224px",
    steps=10000,
    dtype="bfloat16",
    remat="full",
    save_every=500,
    keep=3,
    data=DataConfig(rows=1024, max_tokens=80, workers=8),
)
