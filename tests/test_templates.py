"""Chat templates: exact strings of the original templates, transformers-processor parity of the native
prompt, image placeholders, SFT label masking, errors."""

import numpy as np
import pytest
from PIL import Image
from test_tokenizer import write_bpe_folder, write_sentencepiece_folder

from internvl_jax.processing.templates import (
    IGNORE_INDEX,
    TEMPLATES,
    expand_image_tokens,
    get_template,
    image_prompt,
    render,
    render_hf,
    sft_labels,
)
from internvl_jax.processing.tokenizer import Tokenizer

# The default system messages, written out by hand from the reference.
S_OLD = "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"
S_25 = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"

HISTORY = [
    {"role": "user", "content": "<image>\nq1"},
    {"role": "assistant", "content": "a1"},
    {"role": "user", "content": "q2"},
]

# template -> (system message, rendering of HISTORY with the generation prompt), from the reference table
EXPECTED = {
    "Hermes-2": (
        S_OLD,
        f"<|im_start|>system\n{S_OLD}<|im_end|><|im_start|>user\n<image>\nq1<|im_end|>"
        "<|im_start|>assistant\na1<|im_end|><|im_start|>user\nq2<|im_end|><|im_start|>assistant\n",
    ),
    "internlm2-chat": (
        S_OLD,
        f"<|im_start|>system\n{S_OLD}<|im_end|><|im_start|>user\n<image>\nq1<|im_end|>"
        "<|im_start|>assistant\na1<|im_end|><|im_start|>user\nq2<|im_end|><|im_start|>assistant\n",
    ),
    "phi3-chat": (
        S_OLD,
        f"<|system|>\n{S_OLD}<|end|><|user|>\n<image>\nq1<|end|><|assistant|>\na1<|end|>"
        "<|user|>\nq2<|end|><|assistant|>\n",
    ),
    "internvl2_5": (
        S_25,
        f"<|im_start|>system\n{S_25}<|im_end|>\n<|im_start|>user\n<image>\nq1<|im_end|>\n"
        "<|im_start|>assistant\na1<|im_end|>\n<|im_start|>user\nq2<|im_end|>\n<|im_start|>assistant\n",
    ),
    "internvl_zh": ("", " <human>: <image>\nq1 <bot>: a1</s><human>: q2 <bot>:"),
}
STOP_TOKENS = {
    "Hermes-2": "<|im_end|>", "internlm2-chat": "<|im_end|>", "phi3-chat": "<|end|>", "internvl2_5": "<|im_end|>",
    "internvl_zh": "</s>", "internvl3_5_gpt_oss": "<|return|>",
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_render_matches_reference_strings(name):
    template = get_template(name)
    system, expected = EXPECTED[name]
    assert template.system_message == system
    assert render(template, HISTORY) == expected
    assert render(template, HISTORY, system_message=None) == expected  # config "system_message": null


def test_render_custom_system_message_and_single_question():
    q = [{"role": "user", "content": "Hi"}]
    assert render(get_template("internvl2_5"), q, system_message="Be brief.") == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    phi3 = render(get_template("phi3-chat"), q, system_message="")
    assert phi3 == "<|system|>\n<|end|><|user|>\nHi<|end|><|assistant|>\n"


def test_render_finished_conversation():
    done = HISTORY + [{"role": "assistant", "content": "a2"}]
    assert render(get_template("internvl2_5"), done, system_message="S", add_generation_prompt=False) == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\n<image>\nq1<|im_end|>\n"
        "<|im_start|>assistant\na1<|im_end|>\n"
        "<|im_start|>user\nq2<|im_end|>\n<|im_start|>assistant\na2<|im_end|>\n"
    )
    # gpt-oss: the final answer of a finished conversation ends with sep2
    assert render(get_template("internvl3_5_gpt_oss"), done, system_message="S", add_generation_prompt=False) == (
        "<|start|>system<|message|>S<|end|><|start|>user<|message|><image>\nq1<|end|><|start|>assistant"
        "a1<|end|><|start|>user<|message|>q2<|end|><|start|>assistanta2<|return|>"
    )
    assert render(get_template("internvl3_5_gpt_oss"), HISTORY, system_message="S").endswith(
        "<|start|>user<|message|>q2<|end|><|start|>assistant"
    )


@pytest.mark.parametrize("name", sorted(STOP_TOKENS))
def test_stop_token(name):
    assert get_template(name).stop_token == STOP_TOKENS[name]


def test_template_table_is_complete():
    assert set(TEMPLATES) == set(STOP_TOKENS)


def test_unknown_template_lists_known_names():
    with pytest.raises(ValueError, match="unknown chat template 'llava'; known: .*phi3-chat, internvl2_5"):
        get_template("llava")


def test_roles_must_alternate():
    with pytest.raises(ValueError, match="message 1 has role 'user', expected 'assistant'"):
        render(get_template("internvl2_5"), [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    with pytest.raises(ValueError, match="expected 'user'"):
        render(get_template("internvl2_5"), HISTORY[:2])  # generation prompt after an assistant turn


def test_image_prompt():
    assert image_prompt("Q", 1) == "<image>\nQ"
    assert image_prompt("Q", 3) == "Image-1: <image>\nImage-2: <image>\nImage-3: <image>\nQ"
    assert image_prompt("Q", video_frames=2) == "Frame1: <image>\nFrame2: <image>\nQ"
    assert image_prompt("Q", 0) == "Q"
    assert image_prompt("Look: <image> now", 2) == "Look: <image> now"  # placed by the caller


def test_expand_image_tokens():
    text = "Image-1: <image>\nImage-2: <image>\nQ"
    expected = "Image-1: <img>" + "<IMG_CONTEXT>" * 6 + "</img>\nImage-2: <img>" + "<IMG_CONTEXT>" * 2 + "</img>\nQ"
    assert expand_image_tokens(text, [3, 1], 2) == expected
    assert expand_image_tokens("<image>", [2], 1, img_start="[", img_end="]", img_context="c") == "[cc]"
    assert expand_image_tokens("no image", [], 256) == "no image"


def test_expand_image_tokens_count_mismatch():
    with pytest.raises(ValueError, match="2 <image> placeholders but 1 images"):
        expand_image_tokens("<image><image>", [4], 256)
    with pytest.raises(ValueError, match="0 <image> placeholders but 1 images"):
        expand_image_tokens("text", [1], 256)


# --- transformers-native prompt: parity with transformers.InternVLProcessor ---------------------------------

HF_CHAT_TEMPLATE = (  # the InternVL3-1B-hf chat template
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\n' }}"
    "{% elif content['type'] == 'video' %}{{ '<video>\n' }}{% elif content['type'] == 'text' %}{{ content['text'] }}"
    "{% endif %}{% endfor %}{% endif %}{{'<|im_end|>\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{'<|im_start|>assistant\n' }}{% endif %}"
)
TOKENS_PER_TILE = 3  # image_seq_length of the tiny processor
TILE_SIZE = 28


@pytest.fixture
def hf_processor(tmp_path, monkeypatch):
    """transformers.InternVLProcessor over a tiny tokenizer; PIL image processor, no video processor."""
    import transformers
    from transformers.processing_utils import ProcessorMixin

    # The video processor needs torchvision, which the test environment lacks; videos are not used here.
    check = ProcessorMixin.check_argument_for_proper_class
    monkeypatch.setattr(
        ProcessorMixin, "check_argument_for_proper_class",
        lambda self, name, arg: None if name == "video_processor" and arg is None else check(self, name, arg),
    )
    hf_tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=write_bpe_folder(tmp_path),
        extra_special_tokens={
            "start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
            "video_token": "<video>",
        },
    )
    image_processor = transformers.GotOcr2ImageProcessorPil(size={"height": TILE_SIZE, "width": TILE_SIZE})
    processor = transformers.InternVLProcessor(
        image_processor=image_processor, tokenizer=hf_tokenizer, video_processor=None,
        image_seq_length=TOKENS_PER_TILE, chat_template=HF_CHAT_TEMPLATE,
    )
    return processor, Tokenizer.from_pretrained(str(tmp_path))


def image(width, height):
    return Image.fromarray(np.random.default_rng(width).integers(0, 256, (height, width, 3), np.uint8))


IMAGE_ITEM = {"type": "image"}
HF_CASES = {
    "single image": [{"role": "user", "content": [IMAGE_ITEM, {"type": "text", "text": "describe the image"}]}],
    "two images": [
        {"role": "user", "content": [IMAGE_ITEM, IMAGE_ITEM, {"type": "text", "text": "what is in this photo"}]}
    ],
    "with history": [
        {"role": "user", "content": [IMAGE_ITEM, {"type": "text", "text": "what is in this photo"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "a red cat"}]},
        {"role": "user", "content": "and the dog"},
    ],
}


@pytest.mark.parametrize("case", sorted(HF_CASES))
def test_native_prompt_ids_equal_transformers_processor(hf_processor, case):
    processor, tokenizer = hf_processor
    messages = HF_CASES[case]
    n_images = sum(item == IMAGE_ITEM for m in messages if not isinstance(m["content"], str) for item in m["content"])
    images = [image(20 + i, 30) for i in range(n_images)]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    expected = processor(text=text, images=images, crop_to_patches=False)["input_ids"][0]

    prompt = expand_image_tokens(render_hf(messages), [1] * n_images, TOKENS_PER_TILE)  # one tile per image
    assert tokenizer.encode(prompt) == list(expected)


def test_native_prompt_ids_equal_transformers_processor_with_tiles(hf_processor):
    """Dynamic tiling on (the processor's own tile count): each image's span grows with its tiles."""
    processor, tokenizer = hf_processor
    messages = HF_CASES["two images"]
    images = [image(2 * TILE_SIZE, TILE_SIZE), image(TILE_SIZE, TILE_SIZE)]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    kwargs = {"crop_to_patches": True, "max_patches": 4}
    expected = processor(text=text, images=images, **kwargs)["input_ids"][0]
    tiles = list(processor.image_processor(images, **kwargs)["num_patches"])
    assert tiles[0] == 3  # a 2:1 grid + thumbnail
    prompt = expand_image_tokens(render_hf(messages), tiles, TOKENS_PER_TILE)
    assert tokenizer.encode(prompt) == list(expected)


def test_render_hf_rejects_video_items():
    with pytest.raises(ValueError, match="'video'"):
        render_hf([{"role": "user", "content": [{"type": "video"}]}])


# --- SFT labels ----------------------------------------------------------------------------------------------

ANSWERS = ["a red cat", "two dog sat on the mat"]


def sft_conversation(tokens_per_image):
    image_span = expand_image_tokens("<image>", [1], tokens_per_image)
    return [
        {"role": "user", "content": f"{image_span}\nwhat is in this photo"},
        {"role": "assistant", "content": ANSWERS[0]},
        {"role": "user", "content": "and the dog"},
        {"role": "assistant", "content": ANSWERS[1]},
    ]


def supervised_runs(labels):
    """[(start, stop)] of the maximal runs of supervised positions."""
    mask = np.concatenate([[False], labels != IGNORE_INDEX, [False]])
    edges = np.flatnonzero(mask[1:] != mask[:-1])
    return list(zip(edges[::2], edges[1::2]))


@pytest.fixture(params=["bpe", "sentencepiece"])
def tokenizer(request, tmp_path):
    write = {"bpe": write_bpe_folder, "sentencepiece": write_sentencepiece_folder}[request.param]
    write(tmp_path)
    return Tokenizer.from_pretrained(str(tmp_path))


@pytest.mark.parametrize("name", ["internvl2_5", "Hermes-2", "internlm2-chat", "phi3-chat"])
def test_sft_labels_supervise_answers_and_stop_token(tokenizer, name):
    template = get_template(name)
    messages = sft_conversation(tokens_per_image=4)
    ids, labels = sft_labels(template, messages, tokenizer, system_message="be brief")

    assert ids.dtype == labels.dtype == np.int32 and ids.shape == labels.shape
    supervised = labels != IGNORE_INDEX
    np.testing.assert_array_equal(labels[supervised], ids[supervised])
    spans = [tokenizer.decode(ids[a:b], skip_special_tokens=False) for a, b in supervised_runs(labels)]
    assert spans == [answer + template.stop_token for answer in ANSWERS]
    assert tokenizer.img_context_id in ids and tokenizer.img_context_id not in labels
    # the pieces put together are the whole conversation, tokenized at once (plus BOS where the tokenizer adds it)
    whole = render(template, messages, system_message="be brief", add_generation_prompt=False)
    assert list(ids) == tokenizer.encode(whole)
    assert labels[0] == IGNORE_INDEX


def test_sft_labels_internvl2_5_leaves_the_newline_after_im_end(tokenizer):
    ids, labels = sft_labels(get_template("internvl2_5"), sft_conversation(1), tokenizer)
    newline = tokenizer.encode("\n", add_special_tokens=False)
    for _, stop in supervised_runs(labels):
        assert ids[stop - 1] == tokenizer.token_to_id("<|im_end|>")
        assert list(ids[stop:stop + len(newline)]) == newline and labels[stop] == IGNORE_INDEX


def test_sft_labels_internlm2_chat_strips_messages(tokenizer):
    padded = [{**m, "content": f"  {m['content']}\n"} for m in sft_conversation(1)]
    stripped_ids, _ = sft_labels(get_template("internlm2-chat"), sft_conversation(1), tokenizer)
    padded_ids, _ = sft_labels(get_template("internlm2-chat"), padded, tokenizer)
    np.testing.assert_array_equal(padded_ids, stripped_ids)


def test_sft_labels_unsupported_template(tokenizer):
    with pytest.raises(ValueError, match="no SFT label rule for template 'internvl_zh'"):
        sft_labels(get_template("internvl_zh"), sft_conversation(1), tokenizer)
