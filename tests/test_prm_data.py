"""Step-labelled JSONL (the VisualPRM pipeline's records) -> critic training conversations: labels by score and
threshold or given, early stop, outcome mode, clear errors; the trainer's sample preparation puts the loss on the
judgement tokens only, at the positions the critic's scoring reads."""

import json

import numpy as np
import pytest
from PIL import Image

from internvl_jax.critic import PRM_SYSTEM_PROMPT, judgement_positions
from internvl_jax.processing.templates import IGNORE_INDEX, get_template, sft_labels
from internvl_jax.processing.tokenizer import Tokenizer
from train.data.meta import Record, read_meta
from train.data.sample import SampleSettings, prepare
from train.demo_data import write_demo_tokenizer
from train.prm_data import PRMDataError, prm_conversation, write_prm_dataset

ITEM = {"image": "shapes.png", "question": "How many shapes are there?", "steps_with_score": [
    {"step": "There is a red circle.", "score": 0.75}, {"step": "There is a blue square.", "score": 0.0},
    {"step": "Final answer: two", "score": 0.5}]}


def turns(record):
    return [(t["from"], t["value"]) for t in record["conversations"]]


def test_process_and_outcome_conversations_in_the_visualprm_layout():
    record = prm_conversation(ITEM)
    assert record["image"] == "shapes.png" and record["supervise"] == "first_token"
    assert turns(record) == [
        ("system", PRM_SYSTEM_PROMPT),
        ("human", "### Question:\nHow many shapes are there?\n\n### Solution Process:\nThere is a red circle."),
        ("gpt", "+"), ("human", "There is a blue square."), ("gpt", "-"), ("human", "Final answer: two"), ("gpt", "+")]
    assert [v for f, v in turns(prm_conversation(ITEM, threshold=0.6)) if f == "gpt"] == ["+", "-", "-"]
    assert [v for f, v in turns(prm_conversation(ITEM, early_stop=True)) if f == "gpt"] == ["+", "-"]
    outcome = turns(prm_conversation(ITEM, mode="outcome"))
    assert outcome[1:] == [("human", "### Question:\nHow many shapes are there?\n\n### Solution Process:\nThere is a "
                                     "red circle.\n\nThere is a blue square.\n\nFinal answer: two"), ("gpt", "+")]
    labelled = {"question": "q", "steps_with_score": [{"step": "s", "label": "-"}]}
    assert turns(prm_conversation(labelled))[-1] == ("gpt", "-") and "image" not in prm_conversation(labelled)


@pytest.mark.parametrize("item,message", [
    ({"steps_with_score": [{"step": "s", "score": 1}]}, "'question' must be a non-empty string"),
    ({"question": "q", "steps_with_score": []}, "'steps_with_score' must be a non-empty list"),
    ({"question": "q", "steps_with_score": [{"score": 1}]}, r"steps_with_score\[0\] must be an object"),
    ({"question": "q", "steps_with_score": [{"step": "s", "label": "ok"}]}, r"steps_with_score\[0\].label is 'ok': expected '\+' or '-'"),
    ({"question": "q", "steps_with_score": [{"step": "s", "score": "high"}]}, "neither a number 'score' nor a 'label'"),
])
def test_bad_records_name_the_line_and_key(tmp_path, item, message):
    source = tmp_path / "steps.jsonl"
    source.write_text(json.dumps(ITEM) + "\n" + json.dumps(item) + "\n")
    with pytest.raises(PRMDataError, match=f"steps.jsonl:2: .*{message}"):
        write_prm_dataset(str(source), str(tmp_path / "out"))


def test_training_samples_supervise_exactly_the_judgements_the_critic_reads(tmp_path):
    Image.new("RGB", (60, 40), (200, 30, 30)).save(tmp_path / "shapes.png")
    source = tmp_path / "steps.jsonl"
    source.write_text(json.dumps(ITEM) + "\n")
    meta = write_prm_dataset(str(source), str(tmp_path / "out"))
    (spec,) = read_meta(meta)
    texts = [PRM_SYSTEM_PROMPT, *(s["step"] for s in ITEM["steps_with_score"]), ITEM["question"],
             "### Question:\n### Solution Process:\n+ -"]
    tokenizer = Tokenizer.from_pretrained(write_demo_tokenizer(str(tmp_path / "tok"), extra_texts=texts))
    template = get_template("internvl2_5")
    settings = SampleSettings(tokenizer=tokenizer, template=template, tokens_per_tile=4, image_size=56,
                              max_dynamic_patch=1, use_thumbnail=False, data_augment=False)
    line = open(spec.annotation).read().strip()
    sample = prepare(Record(spec.name, 1, line), spec, settings, np.random.default_rng(0))
    ids, labels = sample["input_ids"], sample["labels"]
    plus, minus = tokenizer.encode("+", add_special_tokens=False)[0], tokenizer.encode("-", add_special_tokens=False)[0]
    supervised = np.nonzero(labels != IGNORE_INDEX)[0]
    np.testing.assert_array_equal(ids[supervised], [plus, minus, plus])
    # the scoring side: the same conversation with every judgement '+', read one position earlier
    record = json.loads(line)
    messages = [{"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]}
                for t in record["conversations"][1:]]
    messages[0]["content"] = messages[0]["content"].replace(
        "### Question", "<img>" + "<IMG_CONTEXT>" * 4 + "</img>\n### Question")
    _, full = sft_labels(template, messages, tokenizer, system_message=PRM_SYSTEM_PROMPT)
    np.testing.assert_array_equal(judgement_positions(full) + 1, supervised)
