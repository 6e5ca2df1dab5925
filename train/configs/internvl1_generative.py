"""``internvl-jax train internvl1_generative init=/ckpt/InternVL-14B-224px data.meta=pairs/meta.json workdir=runs/g``

InternVL 1.0's generative stage (InternVL-G): one QLLaMA pass over [ITM ; ITC ; ITG] rows of [96 queries ;
text] gives image-text matching + image-text contrastive + image-grounded generation ("English caption:" +
caption), ``loss = loss_itm + loss_itc + loss_itg`` (train/clip_losses.py). Trained, as the original's stage 2:
the queries, QLLaMA's cross-attention, clip_projector2, itm_head and the temperature; the ViT, QLLaMA's own
weights, clip_projector and text_projection frozen (``optim.lr_rules`` in front change that, e.g.
``"optim.lr_rules=(('^vision/', 1.0),)"``). Data as ``internvl1_contrastive``: ``{"image", "caption"}`` pairs;
each row's ITM negative is another row's caption.

Settings from OpenGVLab/InternVL's only released stage-2 script (``internvl_g/shell/finetune/
internvl_stage2_finetune_coco_364_bs1024_ep5.sh``, which tunes every weight with layer-wise lr decay 0.9 at 364 px
and drop path 0.3; add ``image_size=364 drop_path=0.3`` for that): global batch 1024 (32 GPUs x 32), lr 1e-6, weight
decay 0.05, 100 warm-up steps, cosine, 80 text tokens, bf16. The stage-2 pre-training settings of the paper are not
in the repository. No image augmentation (the script crops at random and flips); no layer-wise lr decay.
"""

from train.config import DataConfig, TrainConfig
from train.optim import OptimConfig

CONFIG = TrainConfig(
    name="internvl1_generative",
    objective="generative",
    preset="InternVL-14B-224px",
    steps=2000,
    dtype="bfloat16",
    remat="full",
    save_every=100,
    keep=5,
    data=DataConfig(rows=1024, max_tokens=80, workers=8),
    optim=OptimConfig(lr=1e-6, warmup_steps=100, weight_decay=0.05, schedule="cosine"),
)
