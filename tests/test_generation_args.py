"""Generation arguments no generation can honour are refused with GenerationArgumentError before any work: the
host preparation and the jitted prefill are never reached (they are replaced here by a tripwire), so nothing is
converted or compiled. The same holds for chat() and for `internvl-jax chat`."""

import dataclasses
import importlib
import json

import numpy as np
import pytest

from internvl_jax.chat import chat
from internvl_jax.cli import main
from internvl_jax.config import RopeConfig, to_hf_dict
from internvl_jax.generate import GenerationArgumentError, generate, generate_stream
from internvl_jax.model import InternVL
from internvl_jax.presets import get_preset
from test_tokenizer import write_bpe_folder

generation = importlib.import_module("internvl_jax.generate")  # the package exports a function of that name
CONFIG = get_preset("tiny-qwen2")  # vocabulary 256, 128 positions, default rope


class Reached(Exception):
    """Raised by the tripwires: the call got past the argument checks."""


@pytest.fixture
def tripwire(monkeypatch):
    """Host preparation and prefill raise Reached; returns the list of the tripwires that fired."""
    fired = []

    def wire(name):
        def fire(*args, **kwargs):
            fired.append(name)
            raise Reached(name)
        monkeypatch.setattr(generation, name, fire)

    wire("_prepare")
    wire("_prefill")
    return fired


def _ids(length: int, value: int = 5) -> np.ndarray:
    return np.full((1, length), value, np.int32)


BAD = {
    "max_new_tokens 0": (dict(max_new_tokens=0), "max_new_tokens must be a positive integer, got 0"),
    "max_new_tokens negative": (dict(max_new_tokens=-3), "got -3"),
    "max_new_tokens float": (dict(max_new_tokens=8.0), r"got 8.0 \(float\)"),
    "max_new_tokens bool": (dict(max_new_tokens=True), r"got True \(bool\)"),
    "token id past the vocabulary": (dict(input_ids=np.asarray([[5, 6, 300]])),
                                     r"input_ids\[0, 2\] is 300: token ids must be in 0..255"),
    "negative token id": (dict(input_ids=np.asarray([[5, -1, 6]])), r"input_ids\[0, 1\] is -1"),
    "float token ids": (dict(input_ids=np.ones((1, 4), np.float32)), "integer array"),
    "one-dimensional ids": (dict(input_ids=np.ones(4, np.int32)), r"\[batch, length\], got int32 of shape \(4,\)"),
    "prompt plus new tokens past the positions": (
        dict(input_ids=_ids(120), max_new_tokens=16),
        "reaches position 119 and max_new_tokens=16 .* max_position_embeddings 128: expected max_new_tokens <= 8"),
    "prompt past the positions": (dict(input_ids=_ids(130), max_new_tokens=1), "expected a shorter prompt"),
    "v2pe positions past the positions": (
        dict(input_ids=_ids(4), positions=np.asarray([[0.0, 1.0, 2.0, 126.5]]), max_new_tokens=2),
        "reaches position 126.5"),
    "a row without tokens": (dict(input_ids=_ids(4).repeat(2, 0), attention_mask=np.asarray([[1, 1, 1, 1], [0] * 4])),
                             "row 1 of the prompt has no tokens"),
    "mask of another shape": (dict(attention_mask=np.ones((1, 3))), r"attention_mask has shape \(1, 3\)"),
    "temperature 0": (dict(do_sample=True, temperature=0.0), "temperature must be a positive number, got 0.0"),
    "top_p 0": (dict(top_p=0.0), r"top_p must be in \(0, 1\], got 0.0"),
    "top_k negative": (dict(top_k=-1), r"top_k must be an integer in 0..256"),
    "top_k past the vocabulary": (dict(top_k=300), "got 300"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
@pytest.mark.parametrize("entry", [generate, generate_stream], ids=["generate", "generate_stream"])
def test_bad_argument_is_refused_before_any_work(tripwire, entry, case):
    kwargs, message = BAD[case]
    kwargs = {"input_ids": _ids(4), "max_new_tokens": 4, **kwargs}
    with pytest.raises(GenerationArgumentError, match=message):
        entry(InternVL(CONFIG), None, **kwargs)  # generate_stream checks when called, not at its first step
    assert tripwire == []


@pytest.mark.parametrize("entry", [generate, lambda *a, **k: next(generate_stream(*a, **k))],
                         ids=["generate", "generate_stream"])
def test_valid_arguments_pass_the_checks(tripwire, entry):
    """The tripwires fire for good arguments: at the edge of the positions, with out-of-vocabulary ids only under
    padding, and past the positions with dynamic NTK rope (made to extend beyond them)."""
    padded = dict(input_ids=np.asarray([[-1, 7, 8]]), attention_mask=np.asarray([[0, 1, 1]]))
    dynamic = CONFIG.replace(text=dataclasses.replace(CONFIG.text, rope=RopeConfig(type="dynamic", factor=2.0)))
    for config, kwargs in [(CONFIG, dict(input_ids=_ids(120), max_new_tokens=8)), (CONFIG, padded),
                           (dynamic, dict(input_ids=_ids(130), max_new_tokens=64)),
                           (CONFIG, dict(input_ids=np.int64(7) + _ids(3, 0), do_sample=True, temperature=0.5,
                                         top_k=256, top_p=1, max_new_tokens=np.int64(3)))]:
        with pytest.raises(Reached):
            entry(InternVL(config), None, **kwargs)
    assert tripwire and set(tripwire) == {"_prepare"}


class _Processor:
    """A processor stand-in that must not be reached."""

    def __call__(self, *args, **kwargs):
        raise Reached("processor")


@pytest.mark.parametrize("generation_config,message", [
    ({"max_new_tokens": 0}, "max_new_tokens must be a positive integer"),
    ({"max_length": 20}, "unknown key.*'max_length'.*expected some of max_new_tokens"),
    ({"top_p": 1.5}, "top_p must be in"),
])
def test_chat_checks_its_generation_config_before_processing_images(generation_config, message):
    with pytest.raises(GenerationArgumentError, match=message):
        chat(InternVL(CONFIG), None, _Processor(), "describe", images=["photo.jpg"],
             generation_config=generation_config)


@pytest.fixture
def checkpoint_without_weights(tmp_path):
    """config.json and a tokenizer that agree on the IMG_CONTEXT id: no weights, so loading them must not start."""
    tok = write_bpe_folder(tmp_path)
    config = CONFIG.replace(image_token_id=tok.token_to_id("<IMG_CONTEXT>"))
    (tmp_path / "config.json").write_text(json.dumps(to_hf_dict(config)))
    return tmp_path


def test_cli_chat_refuses_bad_arguments_in_one_line_before_loading(checkpoint_without_weights, monkeypatch, capsys):
    import convert.load

    def load(*args, **kwargs):
        raise Reached("load_pretrained")

    monkeypatch.setattr(convert.load, "load_pretrained", load)
    ckpt = str(checkpoint_without_weights)
    cases = {(ckpt, ""): "the question is empty",
             (ckpt, "   "): "the question is empty",
             (ckpt, "q", "--max-new-tokens", "0"): "max_new_tokens must be a positive integer, got 0",
             (ckpt, "q", "--max-new-tokens", "-5"): "got -5",
             (ckpt, "q", "--top-p", "0"): "top_p must be in (0, 1], got 0.0",
             (ckpt, "q", "--temperature", "-1", "--do-sample"): "temperature must be a positive number",
             (ckpt, "q", "--top-k", "999"): "top_k must be an integer in 0..256",
             (ckpt, "q", "--max-tiles", "0"): "--max-tiles is 0: expected a positive tile budget"}
    for args, message in cases.items():
        assert main(["chat", *args]) == 2, args
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and message in err and "chat: error:" in err, (args, err)
    with pytest.raises(Reached):  # good arguments get as far as loading the weights
        main(["chat", ckpt, "q", "--max-new-tokens", "3"])
