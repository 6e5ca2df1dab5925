"""``internvl-jax train internvl1_2_stage1 init=/ckpt/InternVL-Chat-V1-2 data.meta=meta.json workdir=runs/v12s1``

InternVL 1.1 / 1.2 stage 1, pre-training: the ViT and the MLP train and the LLM is frozen. Tiles are 448 px,
and a ViT pre-trained at 224 px (1.1: InternViT-6B-224px) gets its position embeddings interpolated to the
448 px grid. Each image is one tile (no dynamic resolution before 1.5).

The repository has no 1.1 / 1.2 pre-training script, so the settings come from three places (OpenGVLab/InternVL at
2410d1d, 2025-09-22, and the model cards):

- Trainable: ViT + MLP. The InternVL-Chat-V1-1 card says "Pretraining Stage, Learnable Component: InternViT-6B +
  MLP ... we load the pretrained weights of InternViT-6B-224px and interpolate its position embedding to the size
  corresponding to 448 x 448 pixels". The InternVL-Chat-V1-2 card says "Learnable Component: ViT + MLP".
- ``image_size`` 448 (both cards: 448 x 448, 256 tokens). ``data.max_dynamic_patch`` 1: one tile, so no thumbnail
  (the 1.2 scripts leave ``--dynamic_image_size`` at False), and ``data.max_tiles`` 1 per row.
- Batch: the V1-2 card's "8192x4800=39.3M samples" reads as 8192 samples per step for 4800 steps. The learning
  rate that went with it is not published. The optimiser settings are therefore those of the closest released
  script that trains an InternViT-6B together with the MLP and freezes the LLM: InternVL 1.5's pre-training,
  ``internvl_chat/shell/internvl1.5/internlm2_20b/internvl_chat_v1_5_internlm2_20b_dynamic_res_pretrain.sh``.
  It uses ``optim.lr`` 1e-5, ``optim.warmup_steps`` 100, cosine to 0, ``optim.weight_decay`` 0.05 and
  ``drop_path`` 0.2, with a global batch of 2048 (256 GPUs x 4 x 2 accumulation steps). ``data.rows`` is 2048 to
  match that learning rate. For the card's batch, pass ``data.rows=8192 steps=4800``.
- Rows: not packed, one sample per row, as the 1.x scripts. ``data.max_tokens`` is 2048, the 1.2 scripts'
  ``--max_seq_length 2048``: ample for one 256-token tile and a caption. The 1.5 script's 4096 was for 13 tiles.
  Loss: the plain token-mean cross-entropy of non-packed runs (``data.loss_weighting`` "token"). For throughput
  on short captions, ``data.packing=true`` keeps the same token-mean loss and fills the rows.
- Steps: ``steps`` defaults to 1000 (set it for your data: samples / rows per epoch).
- bf16, gradient checkpointing, a checkpoint every 200 steps (``--save_steps 200``), and 4 loader workers, as the
  1.x scripts.

Differences from the original:

- The original resizes the position table once at load (``InternVisionModel.resize_pos_embeddings``, called by
  ``internvl_chat_pretrain.py`` when ``--force_image_size`` differs from the checkpoint) and then trains the
  32 x 32 table. Here ``image_size`` interpolates the stored table bicubically in every forward pass
  (``internvl_jax.vision``), so the table that trains stays at the checkpoint's grid.
- The original composes its model from ``--vision_path`` / ``--llm_path`` (and ``--mlp_path``). Here ``init`` is
  one whole checkpoint.
- The loss is a token mean over the global batch. The original takes the mean per GPU micro-batch and then
  averages those means.
- Weight decay skips biases, norms and the position table (``train.optim.DEFAULT_DECAY_RULES``). The DeepSpeed
  runs decayed all trainable parameters (``train.optim.DECAY_ALL``, which needs a config file).

``freeze.freeze_backbone=true freeze.unfreeze_vit_layers=-4`` trains only the last 4 ViT layers (plus the MLP),
with the original's semantics.
"""

from train.config import DataConfig, FreezeConfig, TrainConfig
from train.optim import OptimConfig

CONFIG = TrainConfig(
    name="internvl1_2_stage1",
    steps=1000,  # no released step count fits your data; the V1-2 card's run was 4800 steps of 8192
    drop_path=0.2,  # the 1.5 pre-training script with a trained InternViT-6B
    image_size=448,
    dtype="bfloat16",
    remat="full",
    save_every=200,
    keep=3,
    data=DataConfig(
        rows=2048,  # the 1.5 pre-training script's global batch (256 GPUs x 4 x 2)
        max_tokens=2048,  # the 1.2 scripts' max_seq_length
        max_tiles=1,  # one 448 px tile per sample
        packing=False,
        split_long=True,
        loss_weighting="token",
        max_dynamic_patch=1,
        workers=4,
    ),
    freeze=FreezeConfig(freeze_backbone=False, freeze_mlp=False, freeze_llm=True),
    optim=OptimConfig(lr=1e-5, warmup_steps=100, weight_decay=0.05, schedule="cosine"),
)
