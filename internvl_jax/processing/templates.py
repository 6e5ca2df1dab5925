"""Chat templates: the original InternVL conversation templates, the transformers-native prompt, image
placeholders and SFT label masking.

The originals (``internvl_chat/internvl/conversation.py``) render a conversation "MPT style": the system part,
then ``role + message + sep`` per turn, then the bare assistant role as the generation prompt. Images are
written as ``<image>`` placeholders in the text, and each one is later expanded to
``<img>`` + ``<IMG_CONTEXT>`` x (tokens per tile x tiles of that image) + ``</img>``.

Typical inference use (one image of 3 tiles, 256 tokens per tile)::

    template = get_template("internvl2_5")
    question = image_prompt("Describe the image.", num_images=1)            # "<image>\\nDescribe the image."
    prompt = render(template, [{"role": "user", "content": question}])
    prompt = expand_image_tokens(prompt, tiles_per_image=[3], tokens_per_tile=256)
    input_ids = tokenizer.encode(prompt)
    stop_id = tokenizer.token_to_id(template.stop_token)                    # "<|im_end|>"
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .tokenizer import Tokenizer

IMAGE_PLACEHOLDER = "<image>"
IMG_START_TOKEN = "<img>"
IMG_END_TOKEN = "</img>"
IMG_CONTEXT_TOKEN = "<IMG_CONTEXT>"
IGNORE_INDEX = -100  # label of a position that gets no loss (PyTorch's cross-entropy default)

# Default system messages of the original templates (exact strings).
SYSTEM_MESSAGE_V1_5 = "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"
SYSTEM_MESSAGE_V2_5 = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
SYSTEM_MESSAGE_GPT_OSS = (
    "You are InternVL, a large language model trained by Shanghai AI Laboratory.\nKnowledge cutoff: 2024-06\n"
    "Current date: 2025-08-06\n\nReasoning: low\n\n# Valid channels: final. Channel must be included for every message."
)

STYLE_MPT = "mpt"
STYLE_INTERNVL_ZH = "internvl_zh"


@dataclass(frozen=True)
class Template:
    """One conversation template of the original code (field names as there).

    system_template: the system part, with a ``{system_message}`` slot (unused by the internvl_zh style).
    system_message:  the default system message.
    roles:           (user prefix, assistant prefix) written before each message.
    style:           "mpt": system_template + sep, then role + message + sep per turn, then the bare assistant
                     role; "internvl_zh": system_message + sep2, then role + ": " + message + (sep2 after a user
                     turn, sep after an assistant turn), then assistant role + ":".
    sep:             separator after each turn (mpt) or after each assistant turn (internvl_zh).
    sep2:            mpt: separator after the final message when it is the assistant's ("" = sep; gpt-oss ends
                     a finished conversation with <|return|>); internvl_zh: separator after each user turn.
    """

    name: str
    system_template: str
    system_message: str
    roles: tuple[str, str]
    style: str
    sep: str
    sep2: str = ""

    @property
    def stop_token(self) -> str:
        """The token that ends generation, as the original chat() looks it up.

        ``sep.strip()`` (e.g. "<|im_end|>", "<|end|>", "</s>"); the gpt-oss chat() uses ``sep2.strip()``
        ("<|return|>") when the template has a sep2. NOT the config's eos id (InternVL3 stops at 151645,
        its llm_config's eos_token_id is 151643).
        """
        return self.sep2.strip() or self.sep.strip()


def _chatml(name: str, system_message: str, sep: str) -> Template:
    return Template(
        name=name,
        system_template="<|im_start|>system\n{system_message}",
        system_message=system_message,
        roles=("<|im_start|>user\n", "<|im_start|>assistant\n"),
        style=STYLE_MPT,
        sep=sep,
    )


TEMPLATES: dict[str, Template] = {
    t.name: t
    for t in (
        # InternVL-Chat-V1-1
        Template("internvl_zh", "", "", ("<human>", "<bot>"), STYLE_INTERNVL_ZH, sep="</s>", sep2=" "),
        # V1-2, InternVL2-1B, InternVL2-40B. Same string as internlm2-chat; the originals differ only in SFT
        # preprocessing (preprocess_mpt vs preprocess_internlm: BOS, message stripping).
        _chatml("Hermes-2", SYSTEM_MESSAGE_V1_5, "<|im_end|>"),
        # V1-5, Mini-2B-V1-5, InternVL2-2B/8B/26B/76B
        _chatml("internlm2-chat", SYSTEM_MESSAGE_V1_5, "<|im_end|>"),
        # Mini-4B-V1-5, InternVL2-4B
        Template(
            "phi3-chat", "<|system|>\n{system_message}", SYSTEM_MESSAGE_V1_5,
            ("<|user|>\n", "<|assistant|>\n"), STYLE_MPT, sep="<|end|>",
        ),
        # InternVL2.5, 3 and 3.5 (the 3.5 dense checkpoints name this template too)
        _chatml("internvl2_5", SYSTEM_MESSAGE_V2_5, "<|im_end|>\n"),
        # InternVL3.5-20B-A4B (internvl_chat_gpt_oss/)
        Template(
            "internvl3_5_gpt_oss", "<|start|>system<|message|>{system_message}", SYSTEM_MESSAGE_GPT_OSS,
            ("<|start|>user<|message|>", "<|start|>assistant"), STYLE_MPT, sep="<|end|>", sep2="<|return|>",
        ),
    )
}

# Templates whose original SFT preprocessing is reproduced by `sft_labels`, and those whose preprocessing
# strips each message first (preprocess_internlm).
SFT_TEMPLATES = ("Hermes-2", "internlm2-chat", "phi3-chat", "internvl2_5")
_SFT_STRIPS_MESSAGES = ("internlm2-chat",)


def get_template(name: str) -> Template:
    """The template of that name, as a checkpoint's config.json ``template`` field spells it.

    >>> get_template("internvl2_5").stop_token
    '<|im_end|>'
    >>> get_template("llava")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ValueError: unknown chat template 'llava'; known: internvl_zh, Hermes-2, internlm2-chat, phi3-chat, ...
    """
    if name not in TEMPLATES:
        raise ValueError(f"unknown chat template {name!r}; known: {', '.join(TEMPLATES)}")
    return TEMPLATES[name]


def _alternating_contents(messages: list[dict], add_generation_prompt: bool) -> list[str | None]:
    """Message contents in order (user, assistant, user, ...), with None for the generation prompt."""
    contents = [m["content"] for m in messages] + ([None] if add_generation_prompt else [])
    for i, message in enumerate(messages + ([{"role": "assistant"}] if add_generation_prompt else [])):
        expected = ("user", "assistant")[i % 2]
        if message["role"] != expected:
            raise ValueError(
                f"message {i} has role {message['role']!r}, expected {expected!r}: messages alternate user, "
                "assistant, ... starting with user" + (" and end with user" if add_generation_prompt else "")
            )
    return contents


def _render_mpt(template: Template, contents: list[str | None], system_message: str) -> str:
    final_sep = template.sep2 or template.sep
    out = template.system_template.format(system_message=system_message) + template.sep
    for i, content in enumerate(contents):
        role = template.roles[i % 2]
        if content is None:
            out += role
        else:
            is_final_answer = i == len(contents) - 1 and i % 2 == 1
            out += role + content + (final_sep if is_final_answer else template.sep)
    return out


def _render_internvl_zh(template: Template, contents: list[str | None], system_message: str) -> str:
    seps = (template.sep2, template.sep)  # after user turns, after assistant turns
    out = system_message + seps[0]
    for i, content in enumerate(contents):
        role = template.roles[i % 2]
        out += role + ":" if content is None else role + ": " + content + seps[i % 2]
    return out


_RENDERERS = {STYLE_MPT: _render_mpt, STYLE_INTERNVL_ZH: _render_internvl_zh}


def render(
    template: Template,
    messages: list[dict],
    *,
    system_message: str | None = None,
    add_generation_prompt: bool = True,
) -> str:
    """The prompt string the original chat() builds for these messages.

    messages: ``[{"role": "user" | "assistant", "content": str}, ...]``, alternating, starting with user (the
    history, then the question). system_message: None uses the template's default. A checkpoint config's
    ``"system_message": null`` (InternVL3-1B has it) must map to None here: the <= 3.0 modeling code formats
    the literal text "None" into the prompt, which we do not reproduce; the 3.5 code uses the default too.
    add_generation_prompt: end with the bare assistant role (inference); False renders a finished
    conversation (training).

    >>> render(get_template("internvl2_5"), [{"role": "user", "content": "Hi"}], system_message="S")
    '<|im_start|>system\\nS<|im_end|>\\n<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n'
    >>> render(get_template("internvl_zh"), [{"role": "user", "content": "Hi"}])
    ' <human>: Hi <bot>:'
    """
    contents = _alternating_contents(messages, add_generation_prompt)
    system = template.system_message if system_message is None else system_message
    return _RENDERERS[template.style](template, contents, system)


def render_hf(messages: list[dict], *, add_generation_prompt: bool = True) -> str:
    """The prompt of the transformers-native checkpoints' chat template (InternVL3-1B-hf and others).

    ``<|im_start|>{role}\\n`` + content + ``<|im_end|>\\n`` per message, then ``<|im_start|>assistant\\n``; no
    default system prompt (a "system" message is rendered like any other role). content: a string, or a
    list of ``{"type": "image"}`` / ``{"type": "text", "text": str}`` items. The transformers template writes
    ``<IMG_CONTEXT>\\n`` for an image item, which its processor then expands; we write ``<image>\\n`` so that
    `expand_image_tokens` applies unchanged, and the expanded strings are equal.

    >>> render_hf([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}])
    '<|im_start|>user\\n<image>\\nHi<|im_end|>\\n<|im_start|>assistant\\n'
    """
    rendered = "".join(f"<|im_start|>{m['role']}\n{_hf_content(m['content'])}<|im_end|>\n" for m in messages)
    return rendered + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def _hf_content(content: str | list[dict]) -> str:
    if isinstance(content, str):
        return content
    parts = []
    for item in content:
        if item["type"] == "image":
            parts.append(IMAGE_PLACEHOLDER + "\n")
        elif item["type"] == "text":
            parts.append(item["text"])
        else:
            raise ValueError(f"content item of type {item['type']!r}; supported: 'image', 'text'")
    return "".join(parts)


def image_prompt(question: str, num_images: int = 0, *, video_frames: int = 0) -> str:
    """The first question with its image placeholders put in front, as the original usage does.

    A question that already holds ``<image>`` is returned as is (the caller placed them). Otherwise:
    one image -> ``<image>\\n`` (chat() does this itself); several -> ``Image-1: <image>\\nImage-2: <image>\\n``;
    video frames -> ``Frame1: <image>\\nFrame2: <image>\\n`` (1-based; one tile per frame). Images come first
    when both are given. Later turns of a conversation get no placeholders (chat() adds them only without
    history).

    >>> image_prompt("What is shown?", 2)
    'Image-1: <image>\\nImage-2: <image>\\nWhat is shown?'
    >>> image_prompt("What happens?", video_frames=2)
    'Frame1: <image>\\nFrame2: <image>\\nWhat happens?'
    """
    if IMAGE_PLACEHOLDER in question:
        return question
    if num_images == 1:
        images = IMAGE_PLACEHOLDER + "\n"
    else:
        images = "".join(f"Image-{i + 1}: {IMAGE_PLACEHOLDER}\n" for i in range(num_images))
    frames = "".join(f"Frame{i + 1}: {IMAGE_PLACEHOLDER}\n" for i in range(video_frames))
    return images + frames + question


def expand_image_tokens(
    text: str,
    tiles_per_image: list[int],
    tokens_per_tile: int,
    *,
    img_start: str = IMG_START_TOKEN,
    img_end: str = IMG_END_TOKEN,
    img_context: str = IMG_CONTEXT_TOKEN,
) -> str:
    """Each ``<image>`` in order -> img_start + img_context x (tokens_per_tile x tiles of that image) + img_end.

    tiles_per_image: [num_images] tile counts (thumbnail included). tokens_per_tile: 256 for every released
    model ((448 / 14)^2 patches / pixel-shuffle 2^2).

    >>> expand_image_tokens("<image>\\nHi", [2], 1, img_context="C")
    '<img>CC</img>\\nHi'
    """
    pieces = text.split(IMAGE_PLACEHOLDER)
    if len(pieces) - 1 != len(tiles_per_image):
        raise ValueError(
            f"the text has {len(pieces) - 1} {IMAGE_PLACEHOLDER} placeholders but {len(tiles_per_image)} "
            f"images were given (tiles per image: {list(tiles_per_image)})"
        )
    spans = [img_start + img_context * (tokens_per_tile * tiles) + img_end for tiles in tiles_per_image]
    return pieces[0] + "".join(span + piece for span, piece in zip(spans, pieces[1:]))


def _sft_pieces(template: Template, contents: list[str], system_message: str) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, supervised) pieces; their concatenation is `render`'s string.

    Supervised: each assistant message + the stop token. Not: the system part, user turns, the assistant
    role prefix and whatever follows the stop token in sep (internvl2_5's newline).
    """
    stop = template.sep.rstrip()
    pieces = [(template.system_template.format(system_message=system_message) + template.sep, False)]
    for i, content in enumerate(contents):
        if i % 2 == 0:
            pieces.append((template.roles[0] + content + template.sep, False))
        else:
            pieces += [(template.roles[1], False), (content + stop, True), (template.sep[len(stop):], False)]
    return [(text, supervised) for text, supervised in pieces if text]


def sft_labels(
    template: Template,
    messages: list[dict],
    tokenizer: Tokenizer,
    *,
    system_message: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of a finished conversation and its labels: IGNORE_INDEX except where the original trains.

    messages: alternating user/assistant turns (``<image>`` already expanded with `expand_image_tokens`).
    Returns (input_ids, labels), both int32 [L]; labels equal input_ids on the supervised positions (shift
    them for next-token prediction at the loss).

    What the original preprocess functions supervise, all four alike: each assistant message and its stop
    token (``<|im_end|>`` or ``<|end|>``); not the system part, the user turns, the ``<|im_start|>assistant\\n``
    prefix, internvl2_5's newline after ``<|im_end|>``, nor the BOS. BOS (InternLM2, Phi-3 tokenizers) comes
    once, at the start. internlm2-chat strips each message first (preprocess_internlm).

    The text is tokenized piece by piece at the span borders, like preprocess_internvl2_5 (per message) and
    like the others' token counting (they tokenize the whole string but count the tokens of each prefix):
    the ids equal those of the whole string whenever the tokenizer merges nothing across a border (the borders
    are special tokens, except the start of an answer). Example::

        ids, labels = sft_labels(get_template("internvl2_5"), messages, tokenizer)
        tokenizer.decode(ids[labels != IGNORE_INDEX], skip_special_tokens=False)   # "a1<|im_end|>a2<|im_end|>"
    """
    if template.name not in SFT_TEMPLATES:
        raise ValueError(f"no SFT label rule for template {template.name!r}; supported: {', '.join(SFT_TEMPLATES)}")
    contents = _alternating_contents(messages, add_generation_prompt=False)
    if template.name in _SFT_STRIPS_MESSAGES:
        contents = [content.strip() for content in contents]
    system = template.system_message if system_message is None else system_message
    ids, labels = [], []
    if tokenizer.adds_bos:
        ids, labels = [tokenizer.bos_id], [IGNORE_INDEX]
    for text, supervised in _sft_pieces(template, contents, system):
        piece = tokenizer.encode(text, add_special_tokens=False)
        ids += piece
        labels += piece if supervised else [IGNORE_INDEX] * len(piece)
    return np.asarray(ids, np.int32), np.asarray(labels, np.int32)
