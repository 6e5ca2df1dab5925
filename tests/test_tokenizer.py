"""Tokenizer: tokenizer.json through `tokenizers`, InternLM2-style sentencepiece + added tokens, id look-ups.

Tiny tokenizers are trained here (no downloads). The builders are shared with test_templates.py.
"""

import io
import json
import random

import pytest
import sentencepiece
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from internvl_jax.processing.tokenizer import Tokenizer

# Every special token the templates and the transformers processor use.
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>",
    "<img>", "</img>", "<IMG_CONTEXT>", "<video>",
]
CORPUS_WORDS = "the a cat dog sat on mat image picture describe what is in this photo red blue two hello world".split()


def corpus(n_sentences=200, words_per_sentence=8, seed=0):
    rng = random.Random(seed)
    return [" ".join(rng.choice(CORPUS_WORDS) for _ in range(words_per_sentence)) for _ in range(n_sentences)]


def train_bpe(bos=None):
    """Byte-level BPE (Qwen-like) with the special tokens; `bos`: a token put in front of every encoding."""
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = SPECIAL_TOKENS + ([bos] if bos else [])
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    if bos:
        bos_entry = [(bos, tok.token_to_id(bos))]
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=bos_entry)
    return tok


def write_bpe_folder(folder, bos=None):
    """A transformers-native style folder: tokenizer.json + tokenizer_config.json. Returns the tokenizers object."""
    tok = train_bpe(bos)
    tok.save(str(folder / "tokenizer.json"))
    config = {"bos_token": bos, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return tok


def train_sentencepiece():
    """A sentencepiece model shaped like InternLM2's: <unk> <s> </s>, reserved pieces, byte fallback, no dummy
    prefix, no whitespace normalisation. Returns the serialized model."""
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()), model_writer=model, vocab_size=400, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity", add_dummy_prefix=False,
        remove_extra_whitespaces=False, user_defined_symbols=["[UNUSED_TOKEN_145]", "[UNUSED_TOKEN_146]"],
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, hard_vocab_limit=False, minloglevel=2,
    )
    return model.getvalue()


def write_sentencepiece_folder(folder, add_bos_token=True):
    """An original InternLM2-style folder: tokenizer.model + tokenizer_config.json whose added tokens override
    the reserved pieces (<|im_end|>, <|im_start|>) or lie past the model's vocabulary (the rest), as in
    InternVL2-8B. Returns the sentencepiece processor."""
    proto = train_sentencepiece()
    (folder / "tokenizer.model").write_bytes(proto)
    sp = sentencepiece.SentencePieceProcessor(model_proto=proto)
    ids = {"<|im_end|>": sp.piece_to_id("[UNUSED_TOKEN_145]"), "<|im_start|>": sp.piece_to_id("[UNUSED_TOKEN_146]")}
    extra = [t for t in SPECIAL_TOKENS if t not in ids]
    ids.update({t: sp.get_piece_size() + i for i, t in enumerate(extra)})
    added = {
        str(i): {"content": t, "lstrip": False, "rstrip": False, "normalized": False, "special": True}
        for t, i in ids.items()
    }
    config = {
        "tokenizer_class": "InternLM2Tokenizer", "add_bos_token": add_bos_token, "add_eos_token": False,
        "bos_token": "<s>", "eos_token": "</s>", "pad_token": "</s>", "unk_token": "<unk>",
        "added_tokens_decoder": added,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return sp


CHAT = "<|im_start|>user\n<img><IMG_CONTEXT><IMG_CONTEXT></img>\nwhat is in this photo<|im_end|>\n"


def test_tokenizer_json_matches_tokenizers_and_looks_up_image_tokens(tmp_path):
    hf = write_bpe_folder(tmp_path)
    tok = Tokenizer.from_pretrained(str(tmp_path))
    ids = tok.encode(CHAT)
    assert ids == hf.encode(CHAT).ids
    assert ids.count(tok.img_context_id) == 2
    assert (tok.img_start_id, tok.img_end_id) == (hf.token_to_id("<img>"), hf.token_to_id("</img>"))
    assert tok.decode(ids, skip_special_tokens=False) == CHAT
    assert tok.decode(ids) == "user\n\nwhat is in this photo\n"
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (None, hf.token_to_id("<|im_end|>"), hf.token_to_id("<|endoftext|>"))
    assert not tok.adds_bos


def test_tokenizer_json_post_processor_bos(tmp_path):
    write_bpe_folder(tmp_path, bos="<s>")
    tok = Tokenizer.from_pretrained(str(tmp_path))
    assert tok.adds_bos
    assert tok.encode("a cat")[0] == tok.bos_id == tok.token_to_id("<s>")
    assert tok.encode("a cat", add_special_tokens=False) == tok.encode("a cat")[1:]


def test_sentencepiece_splits_on_added_tokens_and_adds_bos(tmp_path):
    sp = write_sentencepiece_folder(tmp_path)
    tok = Tokenizer.from_pretrained(str(tmp_path))
    names = ("<|im_start|>", "<|im_end|>", "<img>", "<IMG_CONTEXT>", "</img>")
    im_start, im_end, img, ctx, img_end = (tok.token_to_id(t) for t in names)
    assert im_end == sp.piece_to_id("[UNUSED_TOKEN_145]") and img_end >= sp.get_piece_size()
    expected = (
        [sp.bos_id(), im_start] + sp.encode("user\n") + [img, ctx, ctx, img_end]
        + sp.encode("\nwhat is in this photo") + [im_end] + sp.encode("\n")
    )
    assert tok.encode(CHAT) == expected
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (sp.bos_id(), sp.eos_id(), sp.eos_id())
    assert tok.adds_bos
    assert tok.decode(tok.encode(CHAT), skip_special_tokens=False) == "<s>" + CHAT
    assert tok.decode(tok.encode(CHAT)) == "user\n\nwhat is in this photo\n"
    assert tok.encode("<s>hi", add_special_tokens=False) == [sp.bos_id()] + sp.encode("hi")  # named specials split too


def test_sentencepiece_without_bos(tmp_path):
    write_sentencepiece_folder(tmp_path, add_bos_token=False)
    tok = Tokenizer.from_pretrained(str(tmp_path))
    assert not tok.adds_bos
    assert tok.encode("<|im_end|>") == [tok.token_to_id("<|im_end|>")]


def test_sentencepiece_added_tokens_json_and_strip_flags(tmp_path):
    """Older folders: added_tokens.json + special_tokens_map.json; an rstrip token eats the spaces after it."""
    proto = train_sentencepiece()
    (tmp_path / "tokenizer.model").write_bytes(proto)
    sp = sentencepiece.SentencePieceProcessor(model_proto=proto)
    n = sp.get_piece_size()
    (tmp_path / "added_tokens.json").write_text(json.dumps({"<img>": n, "<IMG_CONTEXT>": n + 1}))
    special_map = {"bos_token": "<s>", "additional_special_tokens": ["<img>"]}
    (tmp_path / "special_tokens_map.json").write_text(json.dumps(special_map))
    strip_entry = {"content": "<|end|>", "lstrip": False, "rstrip": True, "special": True}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": {str(n + 2): strip_entry}}))
    tok = Tokenizer.from_pretrained(str(tmp_path))
    expected = [sp.bos_id(), n, n + 1] + sp.encode("a cat") + [n + 2] + sp.encode("sat")
    assert tok.encode("<img><IMG_CONTEXT>a cat<|end|>  sat") == expected
    # <img> is special (special_tokens_map), <IMG_CONTEXT> only added: skipping drops just the former
    assert tok.decode([n, n + 1] + sp.encode("a cat")) == "<IMG_CONTEXT>a cat"


@pytest.mark.parametrize("write", [write_bpe_folder, write_sentencepiece_folder])
def test_missing_token_is_a_key_error_naming_it(tmp_path, write):
    write(tmp_path)
    tok = Tokenizer.from_pretrained(str(tmp_path))
    with pytest.raises(KeyError, match="<quad>"):
        tok.token_to_id("<quad>")


def test_missing_image_token(tmp_path):
    tok = HFTokenizer(models.WordLevel({"hi": 0, "[UNK]": 1}, unk_token="[UNK]"))
    tok.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(KeyError, match="<IMG_CONTEXT>"):
        Tokenizer.from_pretrained(str(tmp_path)).img_context_id


def test_folder_without_tokenizer(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json .* tokenizer.model"):
        Tokenizer.from_pretrained(str(tmp_path))
