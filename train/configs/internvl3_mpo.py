"""``internvl-jax train internvl3_mpo init=/ckpt/InternVL3-8B data.meta=MMPR/meta.json workdir=runs/mpo``

InternVL3-8B's MPO: the ``mpo`` preset (train/configs/mpo.py) with the InternVL3 script's learning rate and length.

Source: OpenGVLab/InternVL at 2410d1d (2025-09-22), ``internvl_chat/shell/internvl3.0/mpo/internvl3_8b_mpo.sh``:
``--learning_rate 2e-7`` and ``--max_seq_length 12288`` (a row of one pair: 24576 tokens); everything else as the
InternVL2.5 script (256 pairs per step, drop path 0.1, weight decay 0.05, warm-up ratio 0.03, cosine, the
0.8 / 0.2 / 1.0 sigmoid, bco_pair, sft mix). Short pairs pack several to a row: ``mpo.max_pairs=4 data.rows=64``
keeps 256 pairs a step.
"""

import dataclasses

from train.configs.mpo import CONFIG as MPO

CONFIG = MPO.replace(name="internvl3_mpo", optim=dataclasses.replace(MPO.optim, lr=2e-7),
                     data=dataclasses.replace(MPO.data, max_tokens=24576))
