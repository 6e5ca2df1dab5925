"""The text tokenizer of a checkpoint folder, without transformers.

Two kinds of folders:

* ``tokenizer.json`` (transformers-native checkpoints, Qwen2/2.5/3, Llama-3 ...): loaded with the ``tokenizers``
  library, which handles its added tokens and BOS/EOS post-processing itself;
* ``tokenizer.model`` (InternLM2 / 2.5 in the original checkpoints): a sentencepiece model plus the added
  tokens named in ``tokenizer_config.json`` (``added_tokens_decoder``), ``added_tokens.json`` and
  ``special_tokens_map.json``. As InternLM2Tokenizer does: the text is split on those tokens first (longest
  match; a token's ``lstrip``/``rstrip`` flags strip the whitespace beside it), each remaining chunk goes
  through sentencepiece, and BOS is put in front when ``add_bos_token`` (default True). EOS is never appended
  (InternVL loads it with ``add_eos_token=False``). Decoding writes added tokens verbatim between the
  sentencepiece text (InternLM2Tokenizer also puts a space before a kept special token).

Image token ids are always looked up here, never hard-coded (they differ between releases).

    tok = Tokenizer.from_pretrained("path/to/InternVL3-1B")
    ids = tok.encode("<|im_start|>user\\nHi<|im_end|>")
    tok.img_context_id                                      # 151667 for Qwen2.5-based releases
"""

from __future__ import annotations

import json
import os
import re

from .templates import IMG_CONTEXT_TOKEN, IMG_END_TOKEN, IMG_START_TOKEN

TOKENIZER_JSON = "tokenizer.json"
SENTENCEPIECE_MODEL = "tokenizer.model"
_SPECIAL_ROLES = ("bos_token", "eos_token", "unk_token", "pad_token")


def _read_json(folder: str, name: str) -> dict:
    path = os.path.join(folder, name)
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _content(token: str | dict | None) -> str | None:
    """A special-token entry of a config: a string, an AddedToken dict ({"content": ...}) or null."""
    return token["content"] if isinstance(token, dict) else token


def _special_names(config: dict, special_map: dict) -> dict[str, str | None]:
    """{"bos_token": "<s>", ...}: special_tokens_map.json over tokenizer_config.json, as transformers loads them."""
    return {role: _content(special_map.get(role, config.get(role))) for role in _SPECIAL_ROLES}


class _TokenizersBackend:
    """A ``tokenizers`` tokenizer.json: added tokens, normalisation and post-processing all in the file."""

    def __init__(self, path: str):
        import tokenizers

        self._tok = tokenizers.Tokenizer.from_file(path)

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)


class _SentencePieceBackend:
    """A sentencepiece model plus added tokens, encoded as InternLM2Tokenizer (a transformers slow tokenizer).

    added:   {token: id} of the added tokens (ids may override pieces of the model, as InternLM2's do).
    special: tokens that are never split (special ones and added ones) and are dropped by
             ``decode(skip_special_tokens=True)`` when marked special.
    strip:   {token: (lstrip, rstrip)} flags of the added tokens.
    """

    def __init__(self, path: str, added: dict[str, int], special: set[str], strip: dict[str, tuple[bool, bool]],
                 bos_token: str | None, add_bos: bool):
        import sentencepiece

        self._sp = sentencepiece.SentencePieceProcessor(model_file=path)
        self._added = added
        self._strip = strip
        never_split = set(added) | {t for t in special if self.token_to_id(t) is not None}
        self._special_ids = {self.token_to_id(t) for t in never_split if t in special}
        self._token_by_id = {self.token_to_id(t): t for t in never_split}
        # longest first, so that the alternation takes the longest token starting at a position
        alternation = "|".join(re.escape(t) for t in sorted(never_split, key=len, reverse=True))
        self._splitter = re.compile(f"({alternation})") if never_split else None
        self._bos_id = self.token_to_id(bos_token) if bos_token is not None and add_bos else None

    def _chunks(self, text: str) -> list[str]:
        """text split into plain chunks and never-split tokens (odd indices), stripped as the flags say."""
        chunks = self._splitter.split(text) if self._splitter else [text]
        for i in range(1, len(chunks), 2):
            lstrip, rstrip = self._strip.get(chunks[i], (False, False))
            if lstrip:
                chunks[i - 1] = chunks[i - 1].rstrip()
            if rstrip:
                chunks[i + 1] = chunks[i + 1].lstrip()
        return chunks

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        ids = [self._bos_id] if add_special_tokens and self._bos_id is not None else []
        for i, chunk in enumerate(self._chunks(text)):
            if i % 2:
                ids.append(self.token_to_id(chunk))
            elif chunk:
                ids += self._sp.encode(chunk)
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        """Runs of model pieces through sentencepiece; added tokens and control pieces as their text."""
        out, run = [], []
        for i in ids:
            token = self._token_by_id.get(i)
            if token is None and not self._sp.is_control(i):
                run.append(i)
                continue
            out.append(self._sp.decode(run))
            run = []
            is_special = token is None or i in self._special_ids  # token None: a control piece such as <s>
            if not (skip_special_tokens and is_special):
                out.append(token if token is not None else self._sp.id_to_piece(i))
        out.append(self._sp.decode(run))
        return "".join(out)

    def token_to_id(self, token: str) -> int | None:
        if token in self._added:
            return self._added[token]
        piece_id = self._sp.piece_to_id(token)
        return None if piece_id == self._sp.unk_id() and token != self._sp.id_to_piece(piece_id) else piece_id


def _sentencepiece_backend(folder: str, config: dict, special_map: dict) -> tuple[_SentencePieceBackend, dict]:
    """The backend and the special-token names of an InternLM2-style folder."""
    added = {entry["content"]: int(i) for i, entry in config.get("added_tokens_decoder", {}).items()}
    added.update(_read_json(folder, "added_tokens.json"))
    strip = {
        entry["content"]: (entry.get("lstrip", False), entry.get("rstrip", False))
        for entry in config.get("added_tokens_decoder", {}).values()
    }
    names = _special_names(config, special_map)
    special = {entry["content"] for entry in config.get("added_tokens_decoder", {}).values() if entry.get("special")}
    special |= {name for name in names.values() if name is not None}
    for source in (config, special_map):
        special |= {_content(t) for t in source.get("additional_special_tokens", [])}
    add_bos = config.get("add_bos_token", True)  # InternLM2Tokenizer's default
    backend = _SentencePieceBackend(
        os.path.join(folder, SENTENCEPIECE_MODEL), added, special, strip, names["bos_token"], add_bos
    )
    return backend, names


class Tokenizer:
    """encode/decode text and look tokens up, for a checkpoint's tokenizer (see the module docstring)."""

    def __init__(self, backend: _TokenizersBackend | _SentencePieceBackend, special_names: dict[str, str | None]):
        self._backend = backend
        self._special_names = special_names

    @classmethod
    def from_pretrained(cls, folder: str) -> Tokenizer:
        """Load ``folder/tokenizer.json`` if present, else ``folder/tokenizer.model`` with its config files."""
        config = _read_json(folder, "tokenizer_config.json")
        special_map = _read_json(folder, "special_tokens_map.json")
        if os.path.exists(os.path.join(folder, TOKENIZER_JSON)):
            return cls(_TokenizersBackend(os.path.join(folder, TOKENIZER_JSON)), _special_names(config, special_map))
        if os.path.exists(os.path.join(folder, SENTENCEPIECE_MODEL)):
            return cls(*_sentencepiece_backend(folder, config, special_map))
        raise FileNotFoundError(
            f"no tokenizer in {folder}: expected {TOKENIZER_JSON} (tokenizers) or {SENTENCEPIECE_MODEL} (sentencepiece)"
        )

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of text; special tokens written in the text become their ids. add_special_tokens: BOS
        (and whatever else the tokenizer's post-processor adds)."""
        return self._backend.encode(text, add_special_tokens)

    def decode(self, ids, *, skip_special_tokens: bool = True) -> str:
        """Text of token ids (any int sequence, e.g. a numpy array)."""
        return self._backend.decode([int(i) for i in ids], skip_special_tokens)

    def token_to_id(self, token: str) -> int:
        """The id of a token; KeyError naming it when the tokenizer does not have it."""
        token_id = self._backend.token_to_id(token)
        if token_id is None:
            raise KeyError(f"the tokenizer has no token {token!r}")
        return token_id

    def _special_id(self, role: str) -> int | None:
        name = self._special_names.get(role)
        return None if name is None else self._backend.token_to_id(name)

    @property
    def bos_id(self) -> int | None:
        return self._special_id("bos_token")

    @property
    def eos_id(self) -> int | None:
        """The config's EOS. Chat generation stops at the template's stop token instead (see Template)."""
        return self._special_id("eos_token")

    @property
    def pad_id(self) -> int | None:
        return self._special_id("pad_token")

    @property
    def adds_bos(self) -> bool:
        """Whether ``encode(text)`` puts BOS in front (InternLM2, Phi-3, Llama tokenizers; not Qwen)."""
        return self.bos_id is not None and self.encode("")[:1] == [self.bos_id]

    @property
    def img_context_id(self) -> int:
        return self.token_to_id(IMG_CONTEXT_TOKEN)

    @property
    def img_start_id(self) -> int:
        return self.token_to_id(IMG_START_TOKEN)

    @property
    def img_end_id(self) -> int:
        return self.token_to_id(IMG_END_TOKEN)
