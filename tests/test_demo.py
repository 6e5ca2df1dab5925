"""The README's main job, run as users run it: `internvl-jax demo` generates its data, trains a tiny InternVL from
scratch on 8 simulated CPU devices with FSDP, exports it, reloads it and answers the held-out questions.

CI runs a shortened setting (``--steps`` below). What it must show: the model answers from the images, i.e. beats
the best image-blind answerer (for each question kind, always the kind's most frequent held-out answer) by a clear
margin. Measured: 0.745 at STEPS against a blind 0.350 (0.755 before b19b623). The default 600 steps
(``internvl-jax demo``) reach the issue's goal, 0.915 >= 0.90, in 4.6 minutes (seed 0, the README's figures); CI runs
the shortened setting."""

import collections
import json
import os
import subprocess
import sys

STEPS = 300
MARGIN = 0.3  # accuracy points above the image-blind oracle


def _blind_oracle(heldout_jsonl: str) -> float:
    """Accuracy of answering every question of a kind with that kind's most frequent held-out answer."""
    answers = collections.defaultdict(collections.Counter)
    for line in open(heldout_jsonl):
        record = json.loads(line)
        answers[record["kinds"][0]][record["conversations"][1]["value"]] += 1
    total = sum(sum(c.values()) for c in answers.values())
    return sum(c.most_common(1)[0][1] for c in answers.values()) / total


def test_demo_answers_from_the_images(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # the demo asks for its own 8 devices
    out = subprocess.run([sys.executable, "-m", "internvl_jax.cli", "demo", "--workdir", str(tmp_path),
                          "--steps", str(STEPS)], capture_output=True, text=True, timeout=1500, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    last = out.stdout.strip().splitlines()[-1]
    assert last.startswith("held-out accuracy: "), out.stdout[-2000:]
    blind = _blind_oracle(str(tmp_path / "data" / "heldout.jsonl"))
    assert float(last.split(": ")[1]) >= blind + MARGIN, (blind, out.stdout[-2000:])
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert records[-1]["loss"] < records[0]["loss"]
    assert (tmp_path / "export" / "config.json").exists() and (tmp_path / "checkpoints").is_dir()


def test_a_workdir_whose_data_another_version_wrote_is_not_resumed_on_new_data(tmp_path):
    import pytest

    from train.config import ConfigError, load_train_config
    from train.demo import setup

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "complete.json").write_text(json.dumps({"train": 4000, "heldout": 200, "seed": 0}))
    (tmp_path / "checkpoints" / "100").mkdir(parents=True)
    cfg = load_train_config("demo").replace(workdir=str(tmp_path))
    with pytest.raises(ConfigError, match="complete.json.*use a new workdir"):
        setup(cfg)
    assert not (tmp_path / "data" / "meta.json").exists()  # nothing rewritten
