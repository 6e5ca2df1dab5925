"""Every python block of the README runs as written, in order, in one session, in a folder where the paths it
names hold tiny stand-ins: ``path/to/InternVL2_5-8B`` a tiny transformers-native checkpoint with its tokenizer,
``path/to/InternVL-14B-224px`` the tiny InternVL 1.0 fixture with a word-level tokenizer, ``photo.jpg`` a small
photo. Nothing is downloaded."""

import json
import os
import re
import shutil

import pytest
from PIL import Image

from test_chat import checkpoint  # noqa: F401  (the fixture: a tiny InternVL with its own tokenizer)

README = os.path.join(os.path.dirname(__file__), "..", "README.md")


def python_blocks(text: str) -> list[str]:
    """The bodies of the ```python fenced blocks, in order."""
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_the_readme_has_the_usage_and_mesh_snippets():
    blocks = python_blocks(open(README).read())
    assert len(blocks) == 3 and "load_pretrained" in blocks[0] and "make_mesh" in blocks[1]
    assert "zero_shot_classify" in blocks[2]


def _internvl1_standin(folder: str) -> None:
    """The InternVL 1.0 fixture plus a word-level tokenizer (pad 0, BOS 1, EOS 2, unknown words 3)."""
    from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers

    shutil.copytree(os.path.join(os.path.dirname(__file__), "fixtures", "internvl1"), folder)
    words = ["summarize", ":", "a", "photo", "of", "cat", "dog", "."]
    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>", *words])}
    tok = HFTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}, f)


def test_every_readme_python_block_runs_as_written(checkpoint, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.chdir(tmp_path)
    os.makedirs("path/to")
    os.symlink(checkpoint, "path/to/InternVL2_5-8B")
    _internvl1_standin("path/to/InternVL-14B-224px")
    Image.open(checkpoint / "sky.png").convert("RGB").save("photo.jpg")
    session = {}
    for i, block in enumerate(python_blocks(open(README).read())):
        try:
            exec(compile(block, f"README.md python block {i + 1}", "exec"), session)
        except Exception as e:  # which block, and the error
            pytest.fail(f"README python block {i + 1} fails: {type(e).__name__}: {e}")
    assert isinstance(session["answer"], str) and session["logits"].shape[0] == session["host_rows"]["input_ids"].shape[0]
    assert os.path.exists("out/model.safetensors") or os.path.exists("out/model.safetensors.index.json")
    assert session["probs"].shape == (1, 2) and session["hits"]["text_to_image"].shape == (2, 1)
