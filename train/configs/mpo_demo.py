"""``internvl-jax train mpo_demo workdir=DIR [init=SFT_CHECKPOINT]``: MPO on the demo's synthetic preference pairs.

The setup hook (train/preference_demo.py) writes the demo's images and questions with a correct (chosen) and a
wrong (rejected) answer each into ``<workdir>/data``. Without ``init`` the demo's tiny model starts at random;
give the export of a demo run (``internvl-jax train demo ... export=original``) to tune an SFT-ed model. The MPO
settings are the InternVL scripts' mix (0.8 sigmoid + 0.2 bco_pair + 1.0 sft, beta 0.1) with a frozen copy as the
reference; 8 simulated CPU devices, FSDP.
"""

from train.config import DataConfig, TrainConfig
from train.demo_data import demo_model_config
from train.optim import OptimConfig
from train.preference import MPOConfig

CONFIG = TrainConfig(
    name="mpo_demo",
    objective="mpo",
    model=demo_model_config(),
    setup="train.preference_demo:setup",
    steps=100,
    dtype="float32",
    remat="none",
    mesh="1,8,1",
    rules="fsdp",
    cpu_devices=8,
    log_every=10,
    save_every=50,
    keep=2,
    data=DataConfig(rows=8, max_tokens=256, max_tiles=16, eval_samples=64),
    optim=OptimConfig(lr=1e-4, warmup_steps=5, weight_decay=0.01),
    mpo=MPOConfig(max_pairs=4),
)
