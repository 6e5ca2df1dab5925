"""``internvl-jax train internvl1_2_stage2 init=/ckpt/InternVL-Chat-V1-2 data.meta=meta.json workdir=runs/v12s2``

InternVL 1.1 / 1.2 stage 2, supervised fine-tuning: the MLP and the LLM train and the ViT is frozen. Each image
is one 448 px tile. Rows are not packed and the loss is a plain token mean.

Sources: OpenGVLab/InternVL at 2410d1d (2025-09-22); "the script" is
``internvl_chat/shell/internvl1.2/hermes2_yi34b/internvl_chat_v1_2_hermes2_yi34b_448_res_finetune.sh`` (the
InternVL-Chat-V1-2 SFT).

- Trainable: MLP + LLM. This is the InternVL-Chat-V1-1 card's "SFT Stage, Learnable Component: MLP + LLM", and
  the 1.2 scripts that fine-tune further on top of Chat-V1-2-Plus do the same
  (``internvl_chat/shell/internvl1.2/2nd_finetune/internvl_chat_v1_2_hermes2_yi34b_448_res_2nd_finetune_full.sh``:
  ``--freeze_backbone True --freeze_mlp False --freeze_llm False``). The script itself trains the ViT too, with
  ``--drop_path_rate 0.4``. To reproduce it exactly, pass ``freeze.freeze_backbone=false drop_path=0.4``.
- ``drop_path`` 0.0: the value of the frozen-ViT 1.2 script (2nd_finetune_full).
- ``optim.lr`` 1e-5, warm-up ratio 0.03, cosine to 0, ``optim.weight_decay`` 0.05 (the script; the
  2nd_finetune script uses the same). Adam betas, eps and clipping are as in ``train/optim.py``.
- ``image_size`` 448 (``--force_image_size 448``). ``data.max_dynamic_patch`` 1 and ``data.max_tiles`` 1: one tile
  per image, no thumbnail (``--dynamic_image_size`` False; the 2nd_finetune script also passes
  ``--max_dynamic_patch 1 --use_thumbnail False``). Multi-image data needs ``data.max_tiles`` raised to its
  largest image count.
- Batch: ``BATCH_SIZE`` 512 = 64 GPUs x ``PER_DEVICE_BATCH_SIZE`` 8 x 1 accumulation step, so ``data.rows`` is 512
  samples (one per row, global; the 2nd_finetune script uses 128 = 16 x 4 x 2). ``--max_seq_length 2048`` gives
  ``data.max_tokens`` 2048. Not packed (``--use_packed_ds`` False), so the loss is the token mean
  (``data.loss_weighting`` "token"). ``data.packing=true`` keeps the same token-mean loss with fuller rows.
- Steps: the script runs ``--num_train_epochs 1``. ``steps`` defaults to 1000 here: set it to samples / rows for
  one epoch of your data.
- bf16, gradient checkpointing, a checkpoint every 200 steps (``--save_steps 200``), and 4 loader workers.

Differences from the original: the loss is a token mean over the global batch, where the original averages the
means of each GPU micro-batch. Weight decay skips biases, norms and the position table
(``train.optim.DEFAULT_DECAY_RULES``). The DeepSpeed run decayed all trainable parameters
(``train.optim.DECAY_ALL``, which needs a config file). ``freeze.unfreeze_vit_layers=-4`` also trains the last 4
ViT layers (their embeddings stay frozen, as in the original). ``freeze.unfreeze_lm_head`` only matters with a
frozen LLM.
"""

from train.config import DataConfig, FreezeConfig, TrainConfig
from train.optim import OptimConfig

CONFIG = TrainConfig(
    name="internvl1_2_stage2",
    steps=1000,  # the script runs 1 epoch; set steps = samples / rows for your data
    drop_path=0.0,  # the ViT is frozen (the 2nd_finetune_full script's value)
    image_size=448,
    dtype="bfloat16",
    remat="full",
    save_every=200,
    keep=3,
    data=DataConfig(
        rows=512,  # 64 GPUs x 8 samples x 1 accumulation step
        max_tokens=2048,  # --max_seq_length
        max_tiles=1,  # one 448 px tile per image
        packing=False,
        split_long=True,
        loss_weighting="token",
        max_dynamic_patch=1,
        workers=4,
    ),
    freeze=FreezeConfig(freeze_backbone=True, freeze_mlp=False, freeze_llm=False),
    optim=OptimConfig(lr=1e-5, warmup_steps=0, warmup_ratio=0.03, weight_decay=0.05, schedule="cosine"),
)
