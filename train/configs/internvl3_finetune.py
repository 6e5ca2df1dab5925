"""``internvl-jax train internvl3_finetune init=/ckpt/InternVL3-8B data.meta=meta.json workdir=runs/ft``

InternVL 3.0 second fine-tuning of a released InternVL3 model on your own data: the MLP and the LLM train and
the ViT is frozen. Images use dynamic resolution up to 12 tiles plus a thumbnail. Rows are not packed and the
loss is a plain token mean.

Source of every setting ("the script"): OpenGVLab/InternVL at 2410d1d (2025-09-22),
``internvl_chat/shell/internvl3.0/2nd_finetune/internvl3_8b_dynamic_res_2nd_finetune_full.sh``.

- Trainable: MLP + LLM (``--freeze_backbone True --freeze_mlp False --freeze_llm False``).
- ``optim.lr`` 2e-5, warm-up ratio 0.03, cosine to 0, ``optim.weight_decay`` 0.05. Adam betas, eps and clipping
  are as in ``train/optim.py``.
- ``drop_path`` 0.0 (``--drop_path_rate``).
- ``image_size`` 448 (``--force_image_size``). ``data.max_dynamic_patch`` 12 (``--max_dynamic_patch 12``), with
  thumbnails (``--use_thumbnail True``). Video: 8 to 32 frames (``internvl_chat_finetune.py``'s defaults).
- Batch: ``BATCH_SIZE`` 128 = 8 GPUs x ``PER_DEVICE_BATCH_SIZE`` 4 x 4 accumulation steps, so ``data.rows`` is 128
  samples (one per row, global). ``--max_seq_length 16384`` gives ``data.max_tokens`` 16384. Not packed (the script
  passes no ``--use_packed_ds``), so the loss is the token mean (``data.loss_weighting`` "token").
- ``data.max_tiles`` 13 is one image at 12 tiles plus its thumbnail. The original has no per-row tile budget, so
  this is a default chosen here, not a script setting. For multi-image or video data raise it to the largest
  count of a sample (a 32-frame video needs 32). Samples over the budget are skipped and counted.
- Static rows of 16384 tokens mostly hold padding when samples are short. ``data.max_tokens=4096`` (if your
  samples fit) or ``data.packing=true`` (same token-mean loss, fuller rows) cuts that cost. The original pads each
  GPU micro-batch to its longest sample.
- Steps: the script runs ``--num_train_epochs 1``. ``steps`` defaults to 1000 here: set it to samples / rows for
  one epoch of your data.
- V2PE: off (``data.v2pe`` ""). The script has none, and released InternVL3 checkpoints run with integer positions.
- bf16, gradient checkpointing, a checkpoint every 200 steps (``--save_steps 200``), and 4 loader workers.

Model-size variants (the other scripts in ``internvl_chat/shell/internvl3.0/2nd_finetune/``, all with batch 128,
weight decay 0.05 and MLP + LLM):

- InternVL3-1B: ``optim.lr=1e-5``.
- InternVL3-2B / 9B: the 8B settings above.
- InternVL3-14B: ``drop_path=0.1``. InternVL3-38B: ``drop_path=0.2``. InternVL3-78B: ``drop_path=0.4``.

Unlike the InternVL 2.5 scripts, the 3.0 fine-tuning scripts keep weight decay at 0.05 for the small models.

Differences from the original: the loss is a token mean over the global batch, where the original averages the
means of each GPU micro-batch. Weight decay skips biases, norms and the position table
(``train.optim.DEFAULT_DECAY_RULES``). The DeepSpeed run decayed all trainable parameters
(``train.optim.DECAY_ALL``, which needs a config file). ``freeze.unfreeze_vit_layers=-4`` also trains the last 4
ViT layers (their embeddings stay frozen, as in the original).
"""

from train.config import DataConfig, FreezeConfig, TrainConfig
from train.optim import OptimConfig

CONFIG = TrainConfig(
    name="internvl3_finetune",
    steps=1000,  # the script runs 1 epoch; set steps = samples / rows for your data
    drop_path=0.0,
    image_size=448,
    dtype="bfloat16",
    remat="full",
    save_every=200,
    keep=3,
    data=DataConfig(
        rows=128,  # 8 GPUs x 4 samples x 4 accumulation steps
        max_tokens=16384,  # --max_seq_length
        max_tiles=13,  # one image: 12 tiles + thumbnail (chosen here; the original has no tile budget)
        packing=False,
        split_long=True,
        loss_weighting="token",
        max_dynamic_patch=12,
        v2pe="",
        min_num_frames=8,
        max_num_frames=32,
        workers=4,
    ),
    freeze=FreezeConfig(freeze_backbone=True, freeze_mlp=False, freeze_llm=False),
    optim=OptimConfig(lr=2e-5, warmup_steps=0, warmup_ratio=0.03, weight_decay=0.05, schedule="cosine"),
)
