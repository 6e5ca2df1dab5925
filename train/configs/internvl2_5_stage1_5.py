"""``internvl-jax train internvl2_5_stage1_5 init=runs/s1/export data.meta=meta.json workdir=runs/s1_5``

InternVL 2.5 stage 1.5, ViT incremental learning: the ViT and the MLP train, the LLM stays frozen. Rows are
packed and use the square loss weighting. The original starts this stage from the stage-1 output (``init`` a
stage-1 export or a released checkpoint).

Source of every setting ("the script"): OpenGVLab/InternVL at 2410d1d (2025-09-22),
``internvl_chat/shell/internvl2.5/stage1.5/internvl2_5_8b_internlm2_5_7b_dynamic_res_stage1_5.sh``.

- Trainable: ViT + MLP (``--freeze_backbone False --freeze_mlp False --freeze_llm True``).
- ``optim.lr`` 1e-5, ``optim.warmup_steps`` 100 (``--warmup_steps 100``), cosine to 0, ``optim.weight_decay``
  0.05. Adam betas, eps and clipping are as in ``train/optim.py``.
- ``drop_path`` 0.1 (``--drop_path_rate``).
- ``image_size`` 448 (``--force_image_size``). ``data.max_dynamic_patch`` 12 (``internvl_chat_pretrain.py``'s
  default: the script sets none), with thumbnails. Video: 8 to 32 frames.
- Packing: ``--max_packed_tokens 16384`` gives ``data.max_tokens`` 16384, and ``--num_images_expected 48`` gives
  ``data.max_tiles`` 48. ``--max_seq_length`` is 16384.
- Loss: ``--loss_reduction square --loss_reduction_all_gather True`` gives ``data.loss_weighting`` "square" over
  the global batch.
- Batch: 512 GPUs x ``--per_device_train_batch_size 1`` x ``--gradient_accumulation_steps 2`` = 1024 packed rows
  of 16384 tokens per optimizer step ("Packed Batch Size: 1024"), so ``data.rows`` is 1024 (global). Use
  ``accum_steps`` to fit it into memory, as the original's 2 accumulation steps did.
- Steps: the script's ``--max_steps 100000`` comes with "Epoch: None", so it only caps a run. ``steps`` defaults to
  1000 here: set ``steps`` for your data.
- bf16, gradient checkpointing, a checkpoint every 100 steps, and 8 loader workers, as the script.

Model-size variants: the only other stage-1.5 script (``internvl2_5_26b_internlm2_5_20b_dynamic_res_stage1_5.sh``,
with InternViT-6B) adds ``drop_path=0.4``. The repository has no stage-1.5 script for 1B / 2B / 4B / 38B / 78B:
their stage-1 scripts start from the already incrementally trained InternViT-300M-448px-V2_5 /
InternViT-6B-448px-V2_5 and go straight to stage 2.

Differences from the original: weight decay skips biases, norms, the position table, the class token and
LayerScale (``train.optim.DEFAULT_DECAY_RULES``). The released runs decayed all trainable parameters
(``train.optim.DECAY_ALL``, which needs a config file). ``freeze.unfreeze_vit_layers`` does nothing here, because
the whole ViT trains already (as in the original, where it only re-enables layers under ``freeze_backbone``).
"""

import dataclasses

from train.config import FreezeConfig
from train.configs.internvl2_5_stage2 import CONFIG as STAGE2
from train.optim import OptimConfig

CONFIG = STAGE2.replace(
    name="internvl2_5_stage1_5",
    data=dataclasses.replace(STAGE2.data, rows=1024),  # 512 GPUs x 1 packed row x 2 accumulation steps
    freeze=FreezeConfig(freeze_backbone=False, freeze_mlp=False, freeze_llm=True),
    optim=OptimConfig(lr=1e-5, warmup_steps=100, weight_decay=0.05, schedule="cosine"),
)  # steps: the script's max_steps 100000 is a cap with "Epoch: None"; set steps for your data
