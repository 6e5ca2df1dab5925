"""``internvl-jax train internvl2_5_stage1 init=/ckpt/InternVL2_5-8B data.meta=meta.json workdir=runs/s1``

InternVL 2.5 stage 1, MLP warm-up: only the projector trains (ViT and LLM frozen), on packed rows with the
square loss weighting.

Source of every setting ("the script"): OpenGVLab/InternVL at 2410d1d (2025-09-22),
``internvl_chat/shell/internvl2.5/stage1/internvl2_5_8b_internlm2_5_7b_dynamic_res_stage1.sh``.

- Trainable: the MLP only (``--freeze_backbone True --freeze_mlp False --freeze_llm True``).
- ``optim.lr`` 2e-4 (``--learning_rate``), ``optim.warmup_steps`` 100 (``--warmup_steps 100``), cosine to 0
  (``--lr_scheduler_type cosine``), ``optim.weight_decay`` 0.05. AdamW betas (0.9, 0.999), eps 1e-8 and clipping
  at norm 1.0 come from the DeepSpeed config and the HF defaults (see ``train/optim.py``).
- ``drop_path`` 0.0 (``--drop_path_rate``).
- ``image_size`` 448 (``--force_image_size``). ``data.max_dynamic_patch`` 12: the script sets none, so
  ``internvl_chat_pretrain.py``'s default applies, with thumbnails (``--use_thumbnail True``). A meta entry's
  ``max_dynamic_patch`` overrides it per dataset, as in the original. Video: 8 to 32 frames (``--min_num_frame`` /
  ``--max_num_frame``).
- Packing: ``--use_packed_ds True --max_packed_tokens 16384`` gives ``data.max_tokens`` 16384, and
  ``--num_images_expected 48`` (the "Image Tile Threshold") gives ``data.max_tiles`` 48. The script's
  ``--max_seq_length`` is 16384 as well.
- Loss: ``--loss_reduction square --loss_reduction_all_gather True`` gives ``data.loss_weighting`` "square",
  normalised over the global batch.
- Batch: 512 GPUs x ``--per_device_train_batch_size 1`` x ``--gradient_accumulation_steps 1`` = 512 packed rows of
  16384 tokens per optimizer step ("Packed Batch Size: 512"), so ``data.rows`` is 512. ``rows`` counts rows for all
  processes together. To fit fewer chips, either keep it and raise ``accum_steps``, or lower ``rows``; lowering
  ``rows`` shrinks the tokens per step.
- Steps: the script's ``--max_steps 100000`` comes with "Epoch: None", so it only caps a run over its own data
  mixture. It does not tell you the right length for your data. ``steps`` defaults to 1000 here: set ``steps`` for
  your data (tokens of one epoch / (rows x max_tokens x the packer's fill rate)).
- Other script settings kept: bf16 with gradient checkpointing (``dtype`` bfloat16, ``remat`` full), a checkpoint
  every 100 steps (``--save_steps 100``, ``--save_total_limit 3``), 8 loader workers (``--dataloader_num_workers``).

Model-size variants (the other scripts in ``internvl_chat/shell/internvl2.5/stage1/``): InternVL2_5-1B / 2B / 4B
add ``optim.weight_decay=0.01``. 26B / 38B / 78B use the 8B settings above.

Differences from the original: the original starts from separate ``--vision_path`` / ``--llm_path`` checkpoints
and a freshly initialised MLP. Here ``init`` is one whole checkpoint, so the stage re-warms the MLP of a released
model (or ``preset`` initialises everything at random). Weight decay skips biases, norms, the position table,
the class token and LayerScale (``train.optim.DEFAULT_DECAY_RULES``, as issue 14 asks). The released DeepSpeed
runs decayed every trainable parameter. To get that, write a config file with
``optim=OptimConfig(..., decay_rules=train.optim.DECAY_ALL)`` (rule tables cannot be set from the command line).
Extra freezing: ``freeze.unfreeze_vit_layers=-4`` also trains the last 4 ViT layers (their embeddings stay
frozen, as in the original). ``freeze.unfreeze_lm_head=true`` really trains the LM head (the original's flag has
no effect).
"""

from train.config import FreezeConfig
from train.configs.internvl2_5_stage2 import CONFIG as STAGE2
from train.optim import OptimConfig

CONFIG = STAGE2.replace(
    name="internvl2_5_stage1",
    drop_path=0.0,
    freeze=FreezeConfig(freeze_backbone=True, freeze_mlp=False, freeze_llm=True),
    optim=OptimConfig(lr=2e-4, warmup_steps=100, weight_decay=0.05, schedule="cosine"),
)  # steps: the script's max_steps 100000 is a cap with "Epoch: None"; set steps for your data
