"""``internvl-jax train internvl2_5_stage2 init=/ckpt/InternVL2_5-8B data.meta=meta.json workdir=runs/s2``

InternVL 2.5 stage 2, full-model instruction tuning: ViT + MLP + LLM all train, on packed rows with the square
loss weighting.

Source of every setting ("the script"): OpenGVLab/InternVL at 2410d1d (2025-09-22),
``internvl_chat/shell/internvl2.5/stage2/internvl2_5_8b_internlm2_5_7b_dynamic_res_stage2.sh``.

- Trainable: everything (``--freeze_backbone False --freeze_mlp False --freeze_llm False``).
- ``optim.lr`` 4e-5, warm-up ratio 0.03 (``--warmup_ratio 0.03``: ceil(0.03 x steps) steps), cosine to 0,
  ``optim.weight_decay`` 0.05. Adam betas, eps and clipping are as in ``train/optim.py``.
- ``drop_path`` 0.1 (``--drop_path_rate``).
- ``image_size`` 448 (``--force_image_size``). ``data.max_dynamic_patch`` 12 (``internvl_chat_pretrain.py``'s
  default: the script sets none), with thumbnails. A meta entry's ``max_dynamic_patch`` overrides it. Video: 8 to
  32 frames.
- Packing: ``--max_packed_tokens 16384`` gives ``data.max_tokens`` 16384, and ``--num_images_expected 48`` gives
  ``data.max_tiles`` 48. ``--max_seq_length`` is 16384.
- Loss: ``--loss_reduction square --loss_reduction_all_gather True`` gives ``data.loss_weighting`` "square" over
  the global batch.
- Batch: 512 GPUs x ``--per_device_train_batch_size 1`` x ``--gradient_accumulation_steps 1`` = 512 packed rows
  of 16384 tokens (8.4M token slots) per optimizer step, so ``data.rows`` is 512 (global). To fit, raise
  ``accum_steps``. Lowering ``rows`` instead shrinks the tokens per step.
- Steps: the script's ``--max_steps 5500`` is one epoch ("Epoch: 1") of the original's own SFT mixture. ``steps``
  defaults to 1000 here: set ``steps`` to one epoch of your data (its tokens / (rows x max_tokens x the packer's
  fill rate)). The warm-up follows, at 3% of ``steps``.
- bf16, gradient checkpointing, a checkpoint every 100 steps, and 8 loader workers, as the script.

Model-size variants (the other scripts in ``internvl_chat/shell/internvl2.5/stage2/``):

- InternVL2_5-1B / 2B / 4B: ``optim.weight_decay=0.01`` (lr 4e-5 and drop_path 0.1 as above; their max_steps
  are 22000 / 22000 / 11000).
- InternVL2_5-26B / 38B / 78B: ``optim.lr=2e-5 drop_path=0.4`` (max_steps 5500).

Differences from the original: weight decay skips biases, norms, the position table, the class token and
LayerScale (``train.optim.DEFAULT_DECAY_RULES``). The released runs decayed every trainable parameter
(``train.optim.DECAY_ALL``, which needs a config file).
"""

from train.config import DataConfig, FreezeConfig, TrainConfig
from train.optim import OptimConfig

CONFIG = TrainConfig(
    name="internvl2_5_stage2",
    steps=1000,  # the script's 5500 is one epoch of its own mixture; set steps for your data
    drop_path=0.1,
    image_size=448,
    dtype="bfloat16",
    remat="full",
    save_every=100,
    keep=3,
    data=DataConfig(
        rows=512,  # 512 GPUs x 1 packed row x 1 accumulation step
        max_tokens=16384,
        max_tiles=48,
        packing=True,
        split_long=True,
        loss_weighting="square",
        max_dynamic_patch=12,
        min_num_frames=8,
        max_num_frames=32,
        workers=8,
    ),
    freeze=FreezeConfig(freeze_backbone=False, freeze_mlp=False, freeze_llm=False),
    optim=OptimConfig(lr=4e-5, warmup_steps=0, warmup_ratio=0.03, weight_decay=0.05, schedule="cosine"),
)
