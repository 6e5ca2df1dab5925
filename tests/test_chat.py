"""chat / batch_chat and the `internvl-jax chat` command on a tiny checkpoint with its own tokenizer."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from convert.load import load_pretrained
from internvl_jax.chat import batch_chat, chat
from internvl_jax.generate import generate
from internvl_jax.processing.processor import Processor
from reference import perturb_
from test_tokenizer import write_bpe_folder


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A transformers-native tiny InternVL (448 px tiles, 1-layer ViT) saved with a tiny BPE tokenizer."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    folder = tmp_path_factory.mktemp("ckpt")
    tok = write_bpe_folder(folder)
    text = dict(model_type="qwen2", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    vision = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                  image_size=[448, 448], patch_size=[14, 14])
    torch.manual_seed(0)
    config = InternVLConfig(text_config=text, vision_config=vision, image_token_id=tok.token_to_id("<IMG_CONTEXT>"))
    perturb_(InternVLForConditionalGeneration(config)).save_pretrained(folder)
    Image.new("RGB", (600, 300), (20, 120, 220)).save(folder / "sky.png")
    return folder


@pytest.fixture(scope="module")
def loaded(checkpoint):
    """(model, params, processor, image path) of the checkpoint, loaded once for the Python API tests."""
    model, params = load_pretrained(str(checkpoint))
    return model, params, Processor.from_pretrained(str(checkpoint)), str(checkpoint / "sky.png")


def test_chat_answer_is_the_decoded_generation_and_history_grows(loaded):
    model, params, proc, image = loaded
    answer, history = chat(model, params, proc, "describe", images=[image], return_history=True,
                           generation_config={"max_new_tokens": 6})
    batch = proc("describe", images=[image])
    tokens = generate(model, params, input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
                      tile_mask=batch["tile_mask"], max_new_tokens=6)[0]
    stop = proc.tokenizer.token_to_id("<|im_end|>")
    kept = tokens[: list(tokens).index(stop)] if stop in tokens else tokens
    assert answer == proc.tokenizer.decode(kept.tolist()).strip() and history == [("<image>\ndescribe", answer)]
    pieces = []
    streamed = chat(model, params, proc, "describe", images=[image], generation_config={"max_new_tokens": 6},
                    on_text=pieces.append)
    assert streamed == answer and "".join(pieces).strip() == answer
    again, history = chat(model, params, proc, "and?", images=[image], history=history, return_history=True,
                          generation_config={"max_new_tokens": 4})
    assert len(history) == 2


def test_a_follow_up_turn_sees_the_first_turns_image_as_the_original(loaded):
    """The original keeps '<image>\n' + question in its history and takes pixel_values on every turn: a follow-up
    prompt holds the image's tokens; without the images again it is an error, not an image-blind answer."""
    model, params, proc, image = loaded
    _, history = chat(model, params, proc, "describe", images=[image], return_history=True,
                      generation_config={"max_new_tokens": 2})
    first = proc("describe", images=[image])
    follow = proc("and?", images=[image], history=history)
    image_id = model.config.image_token_id
    assert (follow["input_ids"] == image_id).sum() == (first["input_ids"] == image_id).sum() > 0
    with pytest.raises(ValueError, match="pass the conversation's images"):
        chat(model, params, proc, "and?", history=history)


def test_batch_chat_equals_one_by_one(loaded):
    model, params, proc, image = loaded
    questions, images = ["describe", "what colour is the sky in this photo"], [[image], []]
    answers = batch_chat(model, params, proc, questions, images=images, generation_config={"max_new_tokens": 5})
    alone = [chat(model, params, proc, q, images=im, generation_config={"max_new_tokens": 5}) for q, im in zip(questions, images)]
    assert answers == alone


def run(*args):
    return subprocess.run([sys.executable, "-m", "internvl_jax.cli", *args], capture_output=True, text=True, timeout=600)


def test_cli_chat_answers_and_reports_bad_input(checkpoint, tmp_path):
    converted = tmp_path / "original"
    assert run("export", str(checkpoint), str(converted), "--layout", "original").returncode == 0
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (converted / name).write_bytes((checkpoint / name).read_bytes())
    out = run("chat", str(converted), "--image", str(checkpoint / "sky.png"), "--max-new-tokens", "5", "describe")
    assert out.returncode == 0, out.stderr
    steps = out.stderr.splitlines()  # what happens before the first token, each step said at once and timed
    assert steps[0] == f"loading {converted} in bfloat16 ..." and steps[1].startswith("  done in ")
    assert steps[2] == "compiling the image and generation programs (first answer) ..." and "  done in" in steps[-1]
    interactive = subprocess.run([sys.executable, "-m", "internvl_jax.cli", "chat", str(checkpoint), "--max-new-tokens",
                                  "3", "--dtype", "float32"], input="hello\nmore\n\n", capture_output=True, text=True,
                                 timeout=600)
    assert interactive.returncode == 0 and interactive.stdout.count("> ") >= 2, interactive.stderr
    (tmp_path / "bad.png").write_bytes(b"nope")
    for args, message in [((str(tmp_path / "missing"), "q"), "does not exist"),
                          ((str(checkpoint), "--image", str(tmp_path / "bad.png"), "q"), "cannot read image")]:
        bad = run("chat", *args)
        assert bad.returncode == 2 and message in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
