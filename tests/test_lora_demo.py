"""LoRA on a frozen base, through the trainer: the demo's questions learnt by adapters alone.

The base is the demo's tiny model SFT-ed from scratch for a few steps on another task (``demo`` preset, shape
questions: "Which shape is drawn?"), exported. ``train demo init=BASE lora.rank=8`` then trains adapters on
its ViT and LLM (the projector trains too, as in the original's LoRA stages) on the demo's colour questions ("What
colour is the shape?"); the base weights stay frozen. One shape per image keeps the run within CI's budget (the
demo's crowded images take hundreds of steps before the model reads the image at all, see test_mpo_heldout).

Measured on held-out images neither run saw: greedy exact-match accuracy (``train.demo.heldout_accuracy``, as
``internvl-jax demo``). The base answers no colour question (it learnt shapes); after LoRA the accuracy must beat
the best image-blind answerer (the most frequent held-out colour, always) by MARGIN. Measured: 0.69 against a
blind 0.22 (seed 0, this test; 0.81 with the demo's earlier question wording, and 0.62 with seed 1 then).
"""

import collections
import json
import os

from convert.load import load_pretrained
from internvl_jax.generate import unrolled_params
from internvl_jax.processing.processor import Processor
from train.config import apply_overrides, load_train_config
from train.demo import heldout_accuracy, heldout_records
from train.demo_data import write_demo_dataset, write_demo_tokenizer
from train.trainer import train

MARGIN = 0.3  # accuracy points above the image-blind answerer
BASE_STEPS, LORA_STEPS = 12, 30
# optim.lr: the one the figure above was measured with (the demo's own is 1e-3)
COMMON = ("setup=", "progress=false", "save_every=1000", "log_every=1000", "data.rows=8", "data.max_tokens=256",
          "data.eval_samples=0", "export=original", "seed=0", "optim.lr=2e-3")


def _config(workdir, paths, tokenizer, *extra):
    return apply_overrides(load_train_config("demo"), [
        f"workdir={workdir}", f"data.meta={paths.meta}", f"data.eval_meta={paths.heldout_meta}",
        f"tokenizer={tokenizer}", *COMMON, *extra])


def _accuracy(export, cfg) -> float:
    model, params = load_pretrained(export)
    return heldout_accuracy(model, unrolled_params(params, model.config), Processor.from_pretrained(export),
                            heldout_records(cfg))[0]


def _blind(heldout_jsonl: str) -> float:
    answers = collections.Counter(json.loads(line)["conversations"][1]["value"] for line in open(heldout_jsonl))
    return answers.most_common(1)[0][1] / sum(answers.values())


def test_lora_on_a_frozen_base_learns_the_colour_questions(tmp_path):
    tokenizer = write_demo_tokenizer(str(tmp_path / "tokenizer"))
    other = write_demo_dataset(str(tmp_path / "shape"), train=400, heldout=16, kinds=("shape",), shapes=(1, 1))
    task = write_demo_dataset(str(tmp_path / "colour"), train=400, heldout=96, kinds=("colour",), shapes=(1, 1),
                              seed=1)
    train(_config(str(tmp_path / "base"), other, tokenizer, f"steps={BASE_STEPS}"))
    base = str(tmp_path / "base" / "export")
    cfg = _config(str(tmp_path / "lora"), task, tokenizer, f"init={base}", f"steps={LORA_STEPS}", "lora.rank=8")
    run = train(cfg)
    assert run.model.config.lora and len(run.metrics) == LORA_STEPS
    before, after = _accuracy(base, cfg), _accuracy(str(tmp_path / "lora" / "export"), cfg)
    blind = _blind(task.heldout)
    print(f"held-out colour accuracy: base {before:.3f}, after LoRA {after:.3f}, image-blind {blind:.3f}")
    assert after >= blind + MARGIN and after > before
    assert os.path.exists(tmp_path / "lora" / "adapter" / "adapter_config.json")
