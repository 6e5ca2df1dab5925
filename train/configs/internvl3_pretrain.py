"""``internvl-jax train internvl3_pretrain init=/ckpt/InternVL3-8B-Pretrained data.meta=mix.json workdir=runs/pt``

InternVL 3.0 native multimodal pre-training: a single stage in which ViT + MLP + LLM all train at once on a
mixture of interleaved image-text, video-text and text-only corpora. Rows are packed, the loss uses the square
weighting, and positions use V2PE with a random stride per image.

The mixture: every dataset of the meta JSON carries a ``weight`` (``train/data/meta.py``), and the pipeline
draws each next sample from dataset i with probability weight_i / sum(weights) (``grain.MapDataset.mix``), for
as many steps as the run is long. Either all datasets have a weight or none has one (then they are simply
concatenated and shuffled). The InternVL3 report (arXiv 2504.10479) describes about 200B tokens at a
language : multimodal ratio of 1 : 3. Weights count samples, not tokens, so for that ratio choose them so
that sum(weight x mean tokens per sample) over the text-only datasets is a third of the same sum over the
multimodal ones. The original's ``PackedDataset`` (``internvl_chat_pretrain.py``)
samples datasets in proportion to their lengths after ``repeat_time``, or to the square root of those with
``--use_data_resampling``. To reproduce that, set each ``weight`` to that number. Text-only rows keep the static
tile shape: their tile slots are padding, and they send no gradient to the ViT or the MLP.

The repository has no InternVL3 pre-training script (in OpenGVLab/InternVL at 2410d1d, 2025-09-22,
``internvl_chat/shell/internvl3.0/`` holds only ``2nd_finetune/`` and ``mpo/``), and the report gives no
optimiser table. The settings therefore come from these sources:

- Trainable: everything. The report optimises all parameters jointly ("native" pre-training), starting from an
  incrementally pre-trained InternViT, a base (not instruction-tuned) LLM and a randomly initialised MLP (model
  cards of OpenGVLab/InternVL3-*).
- Loss: square averaging (the report), as ``data.loss_weighting`` "square" over the global batch.
- V2PE: ``data.v2pe`` "random". The report trains with V2PE, drawing a stride per image from {1, 2, 4, ..., 256}
  tokens per tile (``internvl_jax.processing.positions``). At inference, use a fixed stride (the model's
  ``v2pe_stride``). Pass ``data.v2pe=`` (empty) for integer positions, which is what released InternVL3 checkpoints
  run with.
- Everything else is a documented default: the packed full-model recipe of the InternVL 2.5 stage-2 script,
  ``internvl_chat/shell/internvl2.5/stage2/internvl2_5_8b_internlm2_5_7b_dynamic_res_stage2.sh``.
  It gives ``optim.lr`` 4e-5, warm-up ratio 0.03, cosine to 0, ``optim.weight_decay`` 0.05, ``drop_path`` 0.1,
  ``image_size`` 448, ``data.max_dynamic_patch`` 12 with thumbnails, and video frames 8 to 32. Its packing gives
  ``data.max_tokens`` 16384 and ``data.max_tiles`` 48. Its batch is 512 packed rows per step (512 GPUs x 1 x 1),
  so ``data.rows`` is 512.
- Steps: ``steps`` defaults to 1000. A weighted mixture is an endless stream, so ``steps`` alone sets the length
  of the run: tokens wanted / (rows x max_tokens x the packer's fill rate).
- bf16, gradient checkpointing, a checkpoint every 100 steps, and 8 loader workers (as the 2.5 scripts).

Model-size variants follow the 2.5 stage-2 scripts: ``optim.weight_decay=0.01`` for small models (1B / 2B),
``optim.lr=2e-5 drop_path=0.4`` for 38B / 78B with InternViT-6B.

Differences from the original: ``init`` is one whole checkpoint (e.g. a released ``InternVL3-*-Pretrained``, to
continue pre-training). The original's start, a separate ViT + base LLM + fresh MLP, cannot be put together from
parts here. ``preset`` initialises everything at random. Weight decay skips biases, norms and the position
table (``train.optim.DEFAULT_DECAY_RULES``).
"""

from train.config import DataConfig, FreezeConfig, TrainConfig
from train.optim import OptimConfig

CONFIG = TrainConfig(
    name="internvl3_pretrain",
    steps=1000,  # a weighted mixture never ends: steps is the run's length
    drop_path=0.1,
    image_size=448,
    dtype="bfloat16",
    remat="full",
    save_every=100,
    keep=3,
    data=DataConfig(
        rows=512,
        max_tokens=16384,
        max_tiles=48,
        packing=True,
        split_long=True,
        loss_weighting="square",
        max_dynamic_patch=12,
        v2pe="random",
        min_num_frames=8,
        max_num_frames=32,
        workers=8,
    ),
    freeze=FreezeConfig(freeze_backbone=False, freeze_mlp=False, freeze_llm=False),
    optim=OptimConfig(lr=4e-5, warmup_steps=0, warmup_ratio=0.03, weight_decay=0.05, schedule="cosine"),
)
