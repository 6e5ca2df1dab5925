"""Best-of-N test-time scaling: N sampled answers to one question, one chosen by a critic or a critic-free rule.

``best_of_n`` samples the N candidates in one batched decode with one shared prefill
(``generate(num_return_sequences=N)``), scores them with a process-reward critic (:mod:`internvl_jax.critic`, all
steps of all candidates in one forward) and returns the choice with every candidate, its step scores, and the
timings. The critic-free baselines are computed on the same candidates: self-consistency (the majority vote of
the candidates' final answers, :func:`final_answer`) and the policy's own mean token log-probability.
"""

from __future__ import annotations

import collections
import re
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .chat import answer_text, stop_token
from .critic import AGGREGATES, MODES, PRM_SYSTEM_PROMPT, score_answers, split_steps
from .generate import GenerationArgumentError, generate
from .processing.templates import IMAGE_PLACEHOLDER

__all__ = ["METHODS", "BestOfN", "Candidate", "best_of_n", "final_answer", "majority_choice"]

METHODS = ("critic", "self_consistency", "logprob")
_FINAL = re.compile(r"(?:final answer|answer)\s*[:：]\s*(.+)", re.IGNORECASE)


def final_answer(text: str) -> str:
    """The final answer a candidate states: what follows the last ``Final answer:`` / ``Answer:``, else its last
    step; lower-cased, stripped of spaces and a trailing full stop (for voting)."""
    found = _FINAL.findall(text)
    answer = found[-1] if found else split_steps(text)[-1]
    return answer.strip().rstrip(".").strip().lower()


def majority_choice(answers: list[str]) -> int:
    """Index of the first candidate whose final answer is the most frequent (ties: the answer seen first)."""
    counts = collections.Counter(answers)
    best = max(counts.values())
    return next(i for i, a in enumerate(answers) if counts[a] == best)


@dataclass
class Candidate:
    """One sampled answer: its text, steps, final answer, the policy's mean token log-probability, and the critic's
    judgement scores (one per step, or one in outcome mode) and answer score (None without a critic)."""

    text: str
    steps: list[str]
    final_answer: str
    mean_logprob: float
    step_scores: list[float] | None = None
    score: float | None = None


@dataclass
class BestOfN:
    """The result: ``answer`` = ``candidates[choice].text`` by ``method``; ``picks`` holds the index every method
    available would choose (critic, self_consistency, logprob) on the same candidates; ``timings`` seconds:
    ``prefill_s``, ``decode_s`` (sampling), ``critic_s`` (scoring), ``total_s``."""

    answer: str
    choice: int
    method: str
    candidates: list[Candidate]
    picks: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)


def _mean_logprobs(tokens: np.ndarray, logprobs: np.ndarray, stop_id: int) -> np.ndarray:
    """[N]: the mean log-probability of each row's tokens up to and including its first stop token."""
    stopped = tokens == stop_id
    length = np.where(stopped.any(axis=1), stopped.argmax(axis=1) + 1, tokens.shape[1])
    mask = np.arange(tokens.shape[1])[None] < length[:, None]
    return (logprobs * mask).sum(axis=1) / length


def best_of_n(policy, critic, processor, question: str, images=(), n: int = 8, *, method: str = "critic",
              mode: str = "process", how: str = "mean", generation_config: dict | None = None,
              critic_processor=None, system_message: str = PRM_SYSTEM_PROMPT, max_tiles: int | None = None,
              on_progress: Callable[[str], None] | None = None) -> BestOfN:
    """Sample ``n`` answers to ``question`` (with ``images``) from ``policy`` and choose one.

    policy / critic: ``(model, params)`` pairs (params as stored or :func:`~internvl_jax.generate.unrolled_params`);
    critic may be None for the critic-free methods. method: ``critic`` (highest answer score), ``self_consistency``
    (majority final answer) or ``logprob`` (highest mean token log-probability). mode / how: the critic's
    ``process`` or ``outcome`` judgements and the answer aggregate (``mean``, ``min``, ``last``).
    generation_config: ``max_new_tokens`` (default 512), ``temperature``, ``top_k``, ``top_p``, ``seed``; sampling is
    always on. critic_processor: the critic checkpoint's processor (default ``processor``). on_progress: called
    with a line after each stage (candidates sampled, steps scored).
    """
    t0 = time.perf_counter()
    if method not in METHODS:
        raise ValueError(f"method {method!r}: expected one of {', '.join(METHODS)}")
    if method == "critic" and critic is None:
        raise ValueError("method 'critic' needs a critic (model, params); or choose self_consistency or logprob")
    if mode not in MODES or how not in AGGREGATES:
        raise ValueError(f"critic mode {mode!r} / aggregate {how!r}: expected one of {', '.join(MODES)} / "
                         f"{', '.join(AGGREGATES)}")
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
        raise GenerationArgumentError(f"n (candidates) must be a positive integer, got {n!r}")
    config = {"max_new_tokens": 512, **(generation_config or {})}
    unknown = sorted(set(config) - {"max_new_tokens", "temperature", "top_k", "top_p", "seed"})
    if unknown:
        raise GenerationArgumentError(f"generation_config has unknown key(s) {', '.join(map(repr, unknown))}: "
                                      "expected some of max_new_tokens, temperature, top_k, top_p, seed")
    say = on_progress or (lambda line: None)
    model, params = policy
    batch = processor(question, images=images, max_tiles=max_tiles)
    stop_text, stop_id = stop_token(processor)
    timings = {}
    tokens, logprobs = generate(model, params, input_ids=batch["input_ids"], pixel_values=batch.get("pixel_values"),
                                tile_mask=batch.get("tile_mask"), positions=batch.get("positions"),
                                num_return_sequences=n, do_sample=True,
                                eos_token_id=stop_id, pad_token_id=stop_id, return_logprobs=True, timings=timings,
                                **config)
    texts = [answer_text(processor, row, stop_text, stop_id) for row in tokens]
    means = _mean_logprobs(tokens, logprobs, stop_id)
    candidates = [Candidate(t, split_steps(t), final_answer(t), float(m)) for t, m in zip(texts, means)]
    say(f"sampled {n} candidate{'s' * (n != 1)} in {timings['prefill_s'] + timings['decode_s']:.1f} s (prefill "
        f"{timings['prefill_s']:.1f} s, decode {timings['decode_s']:.1f} s)")
    picks = {"self_consistency": majority_choice([c.final_answer for c in candidates]),
             "logprob": int(np.argmax(means))}
    if critic is not None:
        t1 = time.perf_counter()
        judged = question.replace(IMAGE_PLACEHOLDER + "\n", "") if len(images) <= 1 else question
        per_answer, scores = score_answers(*critic, critic_processor or processor, judged, texts, images, mode=mode,
                                           how=how, system_message=system_message, max_tiles=max_tiles)
        timings["critic_s"] = time.perf_counter() - t1
        for c, s, total in zip(candidates, per_answer, scores):
            c.step_scores, c.score = s, float(total)
        picks["critic"] = int(np.argmax(scores))
        say(f"scored {sum(len(s) for s in per_answer)} {'steps' if mode == 'process' else 'answers'} of {n} "
            f"candidates in {timings['critic_s']:.1f} s")
    timings["total_s"] = time.perf_counter() - t0
    choice = picks[method]
    return BestOfN(texts[choice], choice, method, candidates, picks, timings)
