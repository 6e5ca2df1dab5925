"""best_of_n and `internvl-jax chat --best-of N --critic CKPT` on a tiny random policy and critic written as
checkpoints: the candidates are generate(num_return_sequences=N)'s, each method's pick follows its rule on the
candidates' own scores, the critic's scores are those of score_answers; the command streams progress and prints the
choice; bad flags are one-line errors."""

import jax
import numpy as np
import pytest

from convert.export import export_checkpoint
from convert.load import load_pretrained
from internvl_jax.best_of_n import best_of_n, final_answer, majority_choice
from internvl_jax.chat import answer_text, stop_token
from internvl_jax.cli import main
from internvl_jax.critic import score_answers
from internvl_jax.generate import generate, unrolled_params
from internvl_jax.model import init_params
from internvl_jax.processing.processor import Processor
from train.prm_task import task_model_config, task_texts
from train.demo_data import write_demo_tokenizer

QUESTION = "List the colours, then count them: red blue"
GEN = {"max_new_tokens": 12, "seed": 3}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """(policy folder, critic folder): random tiny models of the task's config, with its tokenizer."""
    root = tmp_path_factory.mktemp("bon")
    tokenizer = write_demo_tokenizer(str(root / "tokenizer"), extra_texts=task_texts())
    config = task_model_config()
    folders = []
    init = jax.jit(lambda key: init_params(config, key))
    for name, seed in (("policy", 0), ("critic", 1)):
        params = init(jax.random.PRNGKey(seed))
        export_checkpoint(jax.device_get(params), config, str(root / name), layout="original",
                          side_files_from=tokenizer)
        folders.append(str(root / name))
    return folders


@pytest.fixture(scope="module")
def loaded(checkpoints):
    policy_dir, critic_dir = checkpoints
    model, params = load_pretrained(policy_dir)
    critic = load_pretrained(critic_dir)
    return (model, unrolled_params(params, model.config)), critic, Processor.from_pretrained(policy_dir)


def test_best_of_n_candidates_scores_and_picks_follow_their_rules(loaded):
    policy, critic, processor = loaded
    lines = []
    result = best_of_n(policy, critic, processor, QUESTION, (), 4, generation_config=GEN, on_progress=lines.append)
    # the candidates are the shared-prefill sampling's, decoded as chat decodes
    batch = processor(QUESTION)
    stop_text, stop_id = stop_token(processor)
    tokens = generate(*policy, input_ids=batch["input_ids"], num_return_sequences=4, do_sample=True,
                      eos_token_id=stop_id, pad_token_id=stop_id, **GEN)
    texts = [answer_text(processor, row, stop_text, stop_id) for row in tokens]
    assert [c.text for c in result.candidates] == texts
    per_answer, scores = score_answers(*critic, processor, QUESTION, texts)
    assert [c.step_scores for c in result.candidates] == per_answer
    np.testing.assert_allclose([c.score for c in result.candidates], scores)
    assert result.picks == {"critic": int(np.argmax(scores)),
                            "self_consistency": majority_choice([final_answer(t) for t in texts]),
                            "logprob": int(np.argmax([c.mean_logprob for c in result.candidates]))}
    assert result.method == "critic" and result.choice == result.picks["critic"] and result.answer == texts[result.choice]
    assert all(c.mean_logprob < 0 for c in result.candidates)
    assert set(result.timings) == {"prefill_s", "decode_s", "critic_s", "total_s"}
    assert lines[0].startswith("sampled 4 candidates") and lines[1].startswith("scored ")
    plain = best_of_n(policy, None, processor, QUESTION, (), 4, method="self_consistency", generation_config=GEN)
    assert [c.text for c in plain.candidates] == texts and plain.choice == result.picks["self_consistency"]
    assert "critic" not in plain.picks and plain.candidates[0].score is None


def test_final_answer_and_majority():
    assert final_answer("I see red.\n\nFinal answer: Two.") == "two"
    assert final_answer("a\n\nno marker here") == "no marker here"
    assert majority_choice(["b", "a", "a", "b", "c"]) == 0  # tie: the answer seen first


def test_best_of_n_argument_errors(loaded):
    policy, critic, processor = loaded
    with pytest.raises(ValueError, match="needs a critic"):
        best_of_n(policy, None, processor, QUESTION, (), 2)
    with pytest.raises(ValueError, match="method 'vote'"):
        best_of_n(policy, critic, processor, QUESTION, (), 2, method="vote")
    with pytest.raises(ValueError, match="n \\(candidates\\) must be a positive integer"):
        best_of_n(policy, critic, processor, QUESTION, (), 0)
    with pytest.raises(ValueError, match="unknown key"):
        best_of_n(policy, critic, processor, QUESTION, (), 2, generation_config={"beams": 2})


def test_chat_best_of_streams_progress_and_prints_the_choice(checkpoints, capsys):
    policy_dir, critic_dir = checkpoints
    code = main(["chat", policy_dir, "--best-of", "3", "--critic", critic_dir, "--dtype", "float32",
                 "--max-new-tokens", "8", QUESTION])
    out, err = capsys.readouterr()
    assert code == 0
    assert "sampled 3 candidates" in err and "scored " in err
    lines = out.splitlines()
    assert [line[:3] for line in lines[:3]] == ["[0]", "[1]", "[2]"] and "critic " in lines[0]
    assert lines[3].startswith("choice (critic): candidate ")


@pytest.mark.parametrize("argv,message", [
    (["--critic", "CRITIC", "q"], "--critic needs --best-of N"),
    (["--best-of", "0", "q"], "--best-of is 0"),
    (["--best-of", "2"], "--best-of needs the question"),
    (["--best-of", "2", "q"], "--select critic needs --critic"),
    (["--best-of", "2", "--critic", "/nonexistent/critic", "q"], "critic checkpoint folder /nonexistent/critic"),
])
def test_chat_best_of_flag_errors_are_one_line(checkpoints, capsys, argv, message):
    policy_dir, critic_dir = checkpoints
    argv = [critic_dir if a == "CRITIC" else a for a in argv]
    assert main(["chat", policy_dir, *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
