"""``internvl-jax train mpo init=/ckpt/InternVL2_5-8B data.meta=MMPR/meta.json workdir=runs/mpo``

Mixed preference optimisation as InternVL2.5-8B-MPO was tuned: ``0.8 * sigmoid + 0.2 * bco_pair + 1.0 * sft``
(DPO, BCO-pair with its running reward shift, the chosen answer's NLL), beta 0.1, a frozen copy of the starting
model as the reference (``mpo.reference=file``: a pre-pass stores its log-probs instead, no second model in memory).
Data: MMPR JSONL lines ``{"image", "question", "chosen", "rejected"}`` named by an InternVL meta JSON.

Source of every setting ("the script"): OpenGVLab/InternVL at 2410d1d (2025-09-22),
``internvl_chat/shell/internvl2.5_mpo/preference_optimization/internvl2_5_8b_internlm2_5_7b_dynamic_res_mpo.sh``.

- Trainable: everything. ``optim.lr`` 1e-6, warm-up ratio 0.03, cosine, ``optim.weight_decay`` 0.05;
  ``drop_path`` 0.1; ``image_size`` 448; ``data.max_dynamic_patch`` 12 (``internvl_chat_mpo.py``'s default).
- Loss: ``--loss_type sigmoid,bco_pair --sigmoid_loss_weight 0.8 --bco_pair_loss_weight 0.2 --rpo_alpha 1`` (trl
  0.9.6); InternVL3.5's script names the same mix as loss types sigmoid, bco_pair, sft with weights 0.8, 0.2, 1.0.
- Batch: 256 GPUs x 1 pair x 1 accumulation step = 256 pairs per optimizer step. Here a row holds one pair
  (``mpo.max_pairs`` 1) of two sequences of up to ``--max_seq_length`` 8192 tokens each, so ``data.max_tokens``
  16384 and ``data.rows`` 256. Raise ``mpo.max_pairs`` (and lower ``data.rows``) to pack short pairs.
- One epoch (``--num_train_epochs 1``): set ``steps`` to your pairs / 256.
- bf16, gradient checkpointing, a checkpoint every 100 steps.

Variants: InternVL3-8B is ``internvl3_mpo`` (lr 2e-7, 12288 tokens per sequence).

Differences from the original: weight decay skips biases, norms, the position table, the class token and
LayerScale (``train.optim.DEFAULT_DECAY_RULES``); the SFT term is the token mean over the global batch (TRL's is
per device); evaluation does not move the BCO shift (TRL's does).
"""

from train.config import DataConfig, TrainConfig
from train.optim import OptimConfig
from train.preference import MPOConfig

CONFIG = TrainConfig(
    name="mpo",
    objective="mpo",
    steps=1000,  # one epoch of your pairs / 256
    drop_path=0.1,
    image_size=448,
    dtype="bfloat16",
    remat="full",
    save_every=100,
    keep=3,
    # loss_weighting: the SFT term is a token mean over the chosen answers whatever this says; "token" states it
    data=DataConfig(rows=256, max_tokens=16384, max_tiles=13, packing=True, loss_weighting="token",
                    max_dynamic_patch=12, workers=8),
    optim=OptimConfig(lr=1e-6, warmup_steps=0, warmup_ratio=0.03, weight_decay=0.05, schedule="cosine"),
    mpo=MPOConfig(loss_types=("sigmoid", "bco_pair", "sft"), loss_weights=(0.8, 0.2, 1.0), beta=0.1, max_pairs=1),
)
