"""The process-reward critic: step scores of a batch of candidates with different step counts equal a float64
reference computed from the critic's own logits (each candidate's conversation rendered, tokenized and run alone
through the plain forward), in process and outcome modes; the answer aggregates; input errors."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from internvl_jax.critic import (PRM_SYSTEM_PROMPT, aggregate, judgement_messages, score_answers, split_steps,
                                 step_scores, critic_inputs, judgement_token_ids)
from internvl_jax.generate import unrolled_params
from internvl_jax.model import InternVL, init_params
from internvl_jax.processing.processor import Processor
from internvl_jax.processing.templates import expand_image_tokens, get_template, render
from internvl_jax.processing.tokenizer import Tokenizer
from train.demo_data import build_demo_tokenizer, demo_model_config, draw_scene, random_scene, write_demo_tokenizer

TOL_SCORE = 1e-5  # step probabilities, max abs diff against the float64 reference
REFERENCE_LENGTH = 320  # every reference row right-padded to it: one compiled forward

QUESTION = "How many shapes are there?"
ANSWERS = [
    "There is a red circle.",
    "There is a red circle.\n\nThere is a blue square.\n\nFinal answer: two",
    "I see one shape.\n\n\n\nFinal answer: one\n\n",  # an empty piece between blank lines is no step
]


@pytest.fixture(scope="module")
def critic(tmp_path_factory):
    folder = tmp_path_factory.mktemp("critic_tok")
    texts = [PRM_SYSTEM_PROMPT, *ANSWERS, "### Question:\n### Solution Process:\n+ -"]
    write_demo_tokenizer(str(folder), extra_texts=texts)
    tokenizer = Tokenizer.from_pretrained(str(folder))
    config = demo_model_config()
    config = config.replace(text=dataclasses.replace(config.text, vocab_size=build_demo_tokenizer(texts).get_vocab_size(),
                                                     max_position_embeddings=1024))
    model = InternVL(config)
    params = jax.jit(lambda key: init_params(config, key))(jax.random.PRNGKey(0))
    rng = np.random.default_rng(1)  # spread the logits: P(+) far from 1/2
    params = jax.tree.map(lambda x: np.asarray(x) + 0.3 * rng.standard_normal(x.shape, np.float32), params)
    processor = Processor(tokenizer=tokenizer, config=config, template=get_template("internvl2_5"),
                          max_length=config.text.max_position_embeddings)
    image = draw_scene(random_scene(np.random.default_rng(0)))
    return model, params, processor, image


def reference_scores(model, params, processor, answer, image, mode):
    """float64 P(+) / (P(+) + P(-)) at each judgement of one candidate: its conversation rendered by the template,
    tokenized whole, run alone through the model's plain forward; judgements found as the '+' tokens."""
    batch = processor("x", images=[image])
    tiles = int(batch["tile_mask"].sum())
    messages = judgement_messages(QUESTION, split_steps(answer), mode=mode, image=True)
    messages[0]["content"] = expand_image_tokens(messages[0]["content"], [tiles], model.config.tokens_per_tile)
    text = render(processor.template, messages, system_message=PRM_SYSTEM_PROMPT, add_generation_prompt=False)
    ids = np.asarray(processor.tokenizer.encode(text), np.int32)
    padded = np.pad(ids, (0, REFERENCE_LENGTH - len(ids)))  # causal: the padding after a row changes none of it
    logits = np.asarray(model.apply({"params": params}, jnp.asarray(padded[None]), batch["pixel_values"],
                                    batch["tile_mask"]))[0].astype(np.float64)
    plus, minus = judgement_token_ids(processor)
    at = np.nonzero(ids == plus)[0] - 1
    return np.exp(logits[at, plus]) / (np.exp(logits[at, plus]) + np.exp(logits[at, minus]))


@pytest.mark.parametrize("mode", ["process", "outcome"])
def test_step_scores_equal_the_float64_reference_for_candidates_of_different_step_counts(critic, mode):
    model, params, processor, image = critic
    ours = unrolled_params(params, model.config)  # the layout scoring runs in, converted once
    per_answer, means = score_answers(model, ours, processor, QUESTION, ANSWERS, [image], mode=mode)
    expected = [reference_scores(model, params, processor, a, image, mode) for a in ANSWERS]
    counts = [1, 3, 2] if mode == "process" else [1, 1, 1]
    assert [len(s) for s in per_answer] == [len(e) for e in expected] == counts
    for got, want in zip(per_answer, expected):
        assert np.max(np.abs(np.asarray(got) - want)) <= TOL_SCORE
    assert np.max(np.abs(means - [np.mean(e) for e in expected])) <= TOL_SCORE
    if mode == "process":
        assert np.std(np.concatenate(expected)) > 0.05  # the scores differ: a misplaced position would show
        _, mins = score_answers(model, ours, processor, QUESTION, ANSWERS, [image], how="min")
        _, lasts = score_answers(model, ours, processor, QUESTION, ANSWERS, [image], how="last")
        assert np.max(np.abs(mins - [e.min() for e in expected])) <= TOL_SCORE
        assert np.max(np.abs(lasts - [e[-1] for e in expected])) <= TOL_SCORE


def test_the_prompt_and_image_run_once_and_both_param_layouts_score_the_same(critic):
    model, params, processor, image = critic
    batch = critic_inputs(processor, QUESTION, [split_steps(a) for a in ANSWERS], [image])
    prefix = batch.prefix_ids[0, batch.prefix_start:]
    image_id = model.config.image_token_id
    assert (prefix == image_id).sum() == model.config.tokens_per_tile * int(batch.tile_mask.sum())
    assert not (batch.suffix_ids == image_id).any() and len(prefix) > len(PRM_SYSTEM_PROMPT.split())
    ids = judgement_token_ids(processor)
    a = step_scores(model, params, batch, ids)
    b = step_scores(model, unrolled_params(params, model.config), batch, ids)
    np.testing.assert_allclose(a, b, atol=TOL_SCORE)


def test_steps_format_and_errors(critic):
    _, _, processor, _ = critic
    assert split_steps("a\n\n b \n\n\n\nc") == ["a", "b", "c"] and split_steps("  ") == [""]
    messages = judgement_messages("Q?", ["s1", "s2"], labels=[True, "-"], image=True)
    assert [m["content"] for m in messages] == [
        "<image>\n### Question:\nQ?\n\n### Solution Process:\ns1", "+", "s2", "-"]
    assert aggregate(np.array([[0.2, 0.8, np.nan]]), "last")[0] == 0.8
    with pytest.raises(ValueError, match="expected 2 judgement"):
        judgement_messages("Q?", ["s1", "s2"], labels=["+"])
    with pytest.raises(ValueError, match="critic mode 'steps'"):
        judgement_messages("Q?", ["s1"], mode="steps")
    with pytest.raises(ValueError, match="aggregate 'max'"):
        aggregate(np.zeros((1, 1)), "max")
    with pytest.raises(ValueError, match="chat templates"):
        critic_inputs(dataclasses.replace(processor, template=None), "Q?", [["s"]])
