"""The demo: a tiny InternVL trained from scratch on synthetic visual question answering (train/demo.py).

    internvl-jax train demo workdir=runs/demo            # the training alone; rerun on the same folder resumes
    internvl-jax demo                                    # data, training, held-out accuracy, export, chat

The setup hook writes the data and the tokenizer into ``<workdir>/data``. 8 simulated CPU devices, FSDP.
"""

from train.config import DataConfig, TrainConfig
from train.demo_data import demo_model_config
from train.optim import OptimConfig

CONFIG = TrainConfig(
    name="demo",
    model=demo_model_config(),
    setup="train.demo:setup",
    steps=600,
    seed=0,
    dtype="float32",
    remat="none",
    scan_unroll=2,  # both 2-layer stacks without a loop (faster on the CPU)
    mesh="1,8,1",
    rules="fsdp",
    cpu_devices=8,
    log_every=50,
    save_every=100,
    keep=2,
    export="original",
    data=DataConfig(rows=16, max_tokens=256, max_tiles=16, loss_weighting="square", eval_samples=64),
    optim=OptimConfig(lr=1e-3, warmup_steps=20, weight_decay=0.01),
)
