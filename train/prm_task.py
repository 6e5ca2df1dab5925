"""A synthetic multi-step task for best-of-N with a process-reward critic: a tiny policy and a tiny critic trained
from scratch with the trainer, then compared on held-out prompts (:func:`train_and_evaluate`, which
bench/best_of_n_task.py runs and tests/test_best_of_n_task.py runs in a shortened setting).

The question lists one to three colours; the answer names each colour in a step of its own, then counts them::

    List the colours, then count them: red blue        ->   I see red.\\n\\nI see blue.\\n\\nFinal answer: two

The policy is trained on answers of which ``error_rate`` (default 60%) carry one hallucinated colour, a colour the
question does not list, inserted at a random step (so their count is one too many): sampling it gives mostly
wrong answers and they agree with each other, so a majority vote of its final answers (self-consistency) is
usually wrong too. The critic is trained on step-labelled answers (train.prm_data's input format): steps are
``+`` until the hallucinated one and ``-`` from it on (the original's Monte-Carlo labels mark every step after an
error wrong). A critic can tell a wrong answer by a step whose colour the question lacks, or by a listing step one
past the question's count (what the critic of bench/best_of_n_task.py learns first: it flags that step, and the
mean of the step scores then ranks the answers with the right count first). Text-only (no image), so that both
models learn in minutes on a CPU; the critic runs the VisualPRM conversation with its system prompt (or
:data:`SHORT_SYSTEM`). The held-out prompts ask questions that no training sample of either model asks
(:func:`is_heldout`).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import zlib

import numpy as np

from internvl_jax.critic import PRM_SYSTEM_PROMPT
from internvl_jax.processing.templates import get_template, render

from .config import DataConfig, TrainConfig
from .demo_data import TEMPLATE, build_demo_tokenizer, demo_model_config, write_demo_tokenizer
from .optim import OptimConfig
from .prm_data import write_prm_dataset

COLOURS = ("red", "blue", "green", "yellow", "purple", "orange", "pink", "brown")
COUNTS = ("zero", "one", "two", "three", "four")
PROMPT = "List the colours, then count them:"


def task_prompt(colours) -> str:
    return f"{PROMPT} {' '.join(colours)}"


def solution_steps(colours) -> list[str]:
    """The steps of an answer listing ``colours`` (as given, hallucinated ones included)."""
    return [f"I see {c}." for c in colours] + [f"Final answer: {COUNTS[len(colours)]}"]


def is_heldout(colours) -> bool:
    """Whether the question listing ``colours`` is one of the held-out fifth that training never shows (chosen by
    a hash of its text: 12 of the 56 two-colour and 67 of the 336 three-colour questions; no one-colour one)."""
    return zlib.crc32(task_prompt(colours).encode()) % 5 == 0


HELDOUT_QUESTIONS = sum(is_heldout(c) for k in (1, 2, 3) for c in itertools.permutations(COLOURS, k))  # 79


def draw(rng: np.random.Generator, error_rate: float, heldout: bool = False
         ) -> tuple[list[str], list[str], int | None]:
    """(question colours, answered colours, index of the hallucinated step or None): one to three colours, the
    question drawn among the training questions or (``heldout``) the held-out ones."""
    while True:
        k = int(rng.integers(1, 4))
        colours = [COLOURS[i] for i in rng.choice(len(COLOURS), size=k, replace=False)]
        if is_heldout(colours) == heldout:
            break
    if rng.random() >= error_rate:
        return colours, list(colours), None
    extra = str(rng.choice([c for c in COLOURS if c not in colours]))
    at = int(rng.integers(0, k + 1))
    return colours, colours[:at] + [extra] + colours[at:], at


def heldout_prompts(n: int, seed: int = 1) -> list[tuple[str, str]]:
    """``n`` (question, correct final answer) pairs: distinct questions drawn among the held-out ones
    (:func:`is_heldout`, 79 in all) with training's distribution of colour counts until the two-colour ones run out."""
    if n > HELDOUT_QUESTIONS:
        raise ValueError(f"{n} held-out prompts asked for; the task holds out {HELDOUT_QUESTIONS} questions")
    rng = np.random.default_rng([seed, 99])
    out = {}
    while len(out) < n:
        colours, _, _ = draw(rng, 0.0, heldout=True)
        out.setdefault(task_prompt(colours), COUNTS[len(colours)])
    return list(out.items())


# A one-line system message for the critic where CPU time is short (the tests): its rows are ~4x shorter than with
# VisualPRM's ~200-token prompt, so four samples pack into a row; the turns are VisualPRM's either way.
SHORT_SYSTEM = "Judge each step of the solution: answer + if it is correct so far, - if not."


def task_texts() -> list[str]:
    """Every text the task renders, for its word-level tokenizer."""
    template = get_template(TEMPLATE)
    steps = solution_steps(COLOURS[:4])
    messages = [{"role": "user", "content": task_prompt(COLOURS)}, {"role": "assistant", "content": "\n\n".join(steps)}]
    return [PRM_SYSTEM_PROMPT, SHORT_SYSTEM, render(template, messages, add_generation_prompt=False),
            " ".join(COUNTS), "### Question:\n### Solution Process:\n+ -"]


# A narrower decoder (hidden 64, 2 heads) for CI: a third of the demo decoder's step time, learns the task as well.
NARROW = {"hidden_size": 64, "num_heads": 2, "num_kv_heads": 1, "intermediate_size": 128}


def task_model_config(**text_changes):
    """The demo's tiny InternVL with the task's vocabulary and room for the critic's system prompt; text_changes:
    TextConfig fields to replace (e.g. a narrower decoder)."""
    config = demo_model_config()
    vocab = build_demo_tokenizer(task_texts()).get_vocab_size()
    return config.replace(text=dataclasses.replace(config.text, vocab_size=vocab, max_position_embeddings=512,
                                                   **text_changes))


def write_task_data(folder: str, *, policy_samples: int = 2000, critic_samples: int = 2000,
                    error_rate: float = 0.6, seed: int = 0, system_message: str = PRM_SYSTEM_PROMPT) -> dict:
    """The tokenizer, the policy's SFT set and the critic's step-labelled set (converted by
    :func:`train.prm_data.write_prm_dataset` with ``system_message``) under ``folder``; returns their paths."""
    os.makedirs(folder, exist_ok=True)
    tokenizer = write_demo_tokenizer(os.path.join(folder, "tokenizer"), extra_texts=task_texts())
    rng = np.random.default_rng([seed, 0])
    policy = os.path.join(folder, "policy.jsonl")
    with open(policy, "w", encoding="utf-8") as f:
        for _ in range(policy_samples):
            colours, answered, _ = draw(rng, error_rate)
            f.write(json.dumps({"conversations": [
                {"from": "human", "value": task_prompt(colours)},
                {"from": "gpt", "value": "\n\n".join(solution_steps(answered))}]}) + "\n")
    with open(os.path.join(folder, "policy_meta.json"), "w") as f:
        json.dump({"policy": {"annotation": policy, "length": policy_samples}}, f)
    rng = np.random.default_rng([seed, 1])
    labelled = []
    for _ in range(critic_samples):
        colours, answered, wrong = draw(rng, 0.5)
        steps = solution_steps(answered)
        labelled.append({"question": task_prompt(colours), "steps_with_score": [
            {"step": s, "label": "+" if wrong is None or i < wrong else "-"} for i, s in enumerate(steps)]})
    with open(os.path.join(folder, "critic_steps.jsonl"), "w", encoding="utf-8") as f:
        f.writelines(json.dumps(item) + "\n" for item in labelled)
    critic = write_prm_dataset(os.path.join(folder, "critic_steps.jsonl"), folder, "critic",
                               system_message=system_message)
    return {"tokenizer": tokenizer, "policy_meta": os.path.join(folder, "policy_meta.json"), "critic_meta": critic}


def train_config(role: str, workdir: str, paths: dict, *, steps: int, seed: int = 0, init: str = "",
                 rows: int = 8, max_tokens: int | None = None, model=None) -> TrainConfig:
    """The trainer's config for the task's ``policy`` or ``critic`` (one CPU device, float32, exported). init: a
    checkpoint to start from (the critic starts from the trained policy, as VisualPRM from InternVL2.5). rows x
    max_tokens: a step's packed batch (default tokens: 320 for the critic, whose sample with VisualPRM's system
    prompt is ~250 tokens, 256 for the policy). model: the policy's InternVLConfig (default
    :func:`task_model_config`)."""
    tokens = max_tokens or (320 if role == "critic" else 256)
    return TrainConfig(
        name=f"prm_task_{role}", workdir=workdir, init=init,
        model=None if init else model or task_model_config(),
        tokenizer="" if init else paths["tokenizer"], steps=steps,
        seed=seed, dtype="float32", remat="none", mesh="1,1,1", rules="fsdp", log_every=max(steps, 1),
        save_every=steps, keep=1, export="original", progress=False,
        data=DataConfig(meta=paths[f"{role}_meta"], rows=rows, max_tokens=tokens, max_tiles=1, eval_samples=0),
        optim=OptimConfig(lr=3e-3, warmup_steps=10, weight_decay=0.0),
    )


def train_and_evaluate(root: str, *, policy_steps: int = 150, critic_steps: int = 500, critic_lr: float = 1e-3,
                       system_message: str = PRM_SYSTEM_PROMPT, prompts: int = 64, n: int = 8, seed: int = 0,
                       policy_lr: float = 3e-3, critic_rows: int = 8, model=None, samples: int = 2000,
                       on_line=None) -> dict:
    """The whole comparison (bench/best_of_n_task.py, tests/test_best_of_n_task.py): the task's data under
    ``root/data``; the policy trained from scratch for ``policy_steps`` at ``policy_lr``; the critic from the
    exported policy for ``critic_steps`` at ``critic_lr`` (``critic_rows`` packed rows a step); both reloaded
    through the converter from their exports; then :func:`evaluate` on ``prompts`` held-out prompts with ``n``
    candidates each. seed: the data's, both runs' and the sampling's; model: the policy's InternVLConfig (default
    :func:`task_model_config`; the critic is the same); samples: training samples of each set. A rerun on
    ``root`` reuses finished runs. on_line: called with a progress line after each stage. Returns evaluate's
    accuracies."""
    import time

    from convert.load import load_pretrained
    from internvl_jax.generate import unrolled_params
    from internvl_jax.processing.processor import Processor

    from .trainer import train

    say = on_line or (lambda line: None)
    paths = write_task_data(os.path.join(root, "data"), policy_samples=samples, critic_samples=samples, seed=seed,
                            system_message=system_message)
    policy_export = os.path.join(root, "policy", "export")
    for role, steps in (("policy", policy_steps), ("critic", critic_steps)):
        t = time.perf_counter()
        cfg = train_config(role, os.path.join(root, role), paths, steps=steps, seed=seed, model=model,
                           rows=critic_rows if role == "critic" else 8, init=policy_export if role == "critic" else "")
        cfg = cfg.replace(optim=dataclasses.replace(cfg.optim, lr=critic_lr if role == "critic" else policy_lr))
        result = train(cfg)
        loss = f", last loss {result.metrics[-1]['loss']:.4f}" if result.metrics else " (already trained)"
        say(f"{role}: {steps} steps in {time.perf_counter() - t:.0f} s{loss}")
    policy_model, policy_params = load_pretrained(policy_export)
    critic = load_pretrained(os.path.join(root, "critic", "export"))
    processor = Processor.from_pretrained(policy_export)
    t = time.perf_counter()
    acc = evaluate((policy_model, unrolled_params(policy_params, policy_model.config)), critic, processor,
                   heldout_prompts(prompts, seed=seed + 1), n=n, seed=seed, system_message=system_message)
    say(f"evaluated {prompts} prompts x {n} candidates in {time.perf_counter() - t:.0f} s")
    return acc


def evaluate(policy, critic, processor, prompts, *, n: int = 8, max_new_tokens: int = 40, seed: int = 0,
             system_message: str = PRM_SYSTEM_PROMPT) -> dict:
    """Accuracy of the final answer on ``prompts`` ((question, answer) pairs) for one sample (the first
    candidate), best-of-``n`` by the critic, by self-consistency and by mean log-probability (all on the same
    candidates), and the share of prompts with any correct candidate."""
    from internvl_jax.best_of_n import best_of_n

    hits = {"single": 0, "critic": 0, "self_consistency": 0, "logprob": 0, "any": 0}
    for i, (question, truth) in enumerate(prompts):
        result = best_of_n(policy, critic, processor, question, (), n,
                           generation_config={"max_new_tokens": max_new_tokens, "seed": seed + i},
                           system_message=system_message)
        right = [c.final_answer == truth for c in result.candidates]
        hits["single"] += right[0]
        hits["any"] += any(right)
        for method, pick in result.picks.items():
            hits[method] += right[pick]
    return {k: v / len(prompts) for k, v in hits.items()}
