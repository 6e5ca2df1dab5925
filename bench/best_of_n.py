"""Best-of-N sampling cost: N candidates from one shared prefill (``generate(num_return_sequences=N)``) against N
separate generations, and the critic's scoring time per candidate, on an InternVL2.5-1B-shaped model.

    python bench/best_of_n.py                           # float32, 512-token prompt with one 448 px tile, N = 1 4 16
    python bench/best_of_n.py --ns 1 4 --new-tokens 16 --repeats 1 --critic-candidates 4   # a quicker look

Random weights of the preset (``--preset``), converted once to the generation layout. The prompt is 8 text tokens,
the 256 IMG_CONTEXT tokens of one tile and text up to ``--prompt-tokens``; sampling at temperature 1 runs exactly
``--new-tokens`` tokens (no end-of-sequence id), so every call does the same work.

    shared N     generate(prompt, num_return_sequences=N): the ViT and the prefill once, the KV cache repeated to N
                 rows, one batched decode loop
    separate N   N calls generate(prompt) (batch 1): N ViT passes, N prefills, N decode loops. The N calls are the
                 same call N times, so by default one is timed per round and counted N times; ``--separate-all``
                 runs them all

candidates/s = N / seconds. Each (N, runner) gets a warm-up call (compiles), then ``--repeats`` rounds interleave
the runners (this CPU's speed drifts from minute to minute); medians are reported. Goal (issue 20): shared N = 16
costs <= 4x shared N = 1.

Critic: ``internvl_jax.critic.step_scores`` on ``--critic-candidates`` rows, each the prompt (system prompt and
question stand-in tokens, the tile) followed by ``--steps`` steps of ``--step-tokens`` tokens and their judgement
turns (5 template tokens each): the shared prompt runs once into a KV cache, the candidates' steps in one batch on
top of it; seconds per candidate and per judged step. (Random token ids: timing needs no tokenizer.)
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


def prompt(config, length: int, seed: int = 0):
    """ids int32 [1, length] (8 text tokens, one tile of IMG_CONTEXT tokens, text), pixels float32 [1, 1, S, S, 3]."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, min(150000, config.text.vocab_size), (1, length)).astype(np.int32)
    ids[ids == config.image_token_id] = 1
    ids[:, 8:8 + config.tokens_per_tile] = config.image_token_id
    size = config.image_size
    return ids, rng.standard_normal((1, 1, size, size, 3)).astype(np.float32)


def critic_batch(config, ids, pixels, candidates: int, steps: int, step_tokens: int, seed: int = 1):
    """A CriticInputs of ``candidates`` rows: the prompt, then per step its tokens and a 5-token judgement turn whose
    third token is the judged one (the position before it read); the prompt is their shared prefix."""
    from internvl_jax.critic import pack_rows

    rng = np.random.default_rng(seed)
    turn = step_tokens + 5
    rows, judges = [], []
    for _ in range(candidates):
        body = rng.integers(1, min(150000, config.text.vocab_size), steps * turn).astype(np.int32)
        body[body == config.image_token_id] = 1
        rows.append(np.concatenate([ids[0], body]))
        judges.append(ids.shape[1] + np.arange(steps) * turn + step_tokens + 1)
    positions = [np.arange(len(r), dtype=np.int32) for r in rows]
    return pack_rows(rows, judges, positions, pixels, np.ones((1, 1), bool), image_token_id=config.image_token_id)


def report(args, med: dict) -> None:
    """The sampling table from the median seconds of each (runner, N), and the goal."""
    one = med.get(("shared", 1))
    print(f"\n{'N':>3}  {'shared s':>9}  {'cand/s':>7}  {'separate s':>10}  {'cand/s':>7}  {'speed-up':>8}  {'vs N=1':>6}")
    for n in args.ns:
        s = med[("shared", n)]
        sep = s if n == 1 else med[("separate", n)] * (1 if args.separate_all else n)
        rel = f"{s / one:5.2f}x" if one else "-"
        print(f"{n:>3}  {s:9.2f}  {n / s:7.2f}  {sep:10.2f}  {n / sep:7.2f}  {sep / s:7.2f}x  {rel:>6}")
    if one and 16 in args.ns:
        ratio = med[("shared", 16)] / one
        print(f"goal: shared N=16 costs <= 4x N=1: {ratio:.2f}x, {'met' if ratio <= 4 else 'NOT met'}")
    if not args.separate_all:
        print("(separate N = N x the median of one batch-1 generation, timed in the same rounds)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="InternVL2_5-1B")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--ns", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--separate-all", action="store_true", help="run the N separate calls instead of counting one N times")
    p.add_argument("--skip-sampling", action="store_true", help="time the critic only")
    p.add_argument("--critic-candidates", type=int, default=8)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--step-tokens", type=int, default=24)
    args = p.parse_args()

    import jax
    import jax.numpy as jnp

    from internvl_jax.critic import step_scores
    from internvl_jax.generate import generate, unrolled_params
    from internvl_jax.model import InternVL, init_params
    from internvl_jax.presets import get_preset

    config = get_preset(args.preset).replace(dtype=args.dtype, param_dtype=args.dtype)
    model = InternVL(config)
    t0 = time.perf_counter()
    params = unrolled_params(jax.jit(lambda k: init_params(config, k))(jax.random.PRNGKey(0)), config)
    jax.block_until_ready(params)
    print(f"{args.preset} ({args.dtype}, random weights) ready in {time.perf_counter() - t0:.0f} s; JAX on "
          f"{jax.devices()[0].platform}; prompt {args.prompt_tokens} tokens with one tile, {args.new_tokens} new "
          f"tokens sampled per candidate", flush=True)
    ids, pixels = prompt(config, args.prompt_tokens)
    pix, mask = jnp.asarray(pixels, config.dtype), jnp.ones((1, 1), bool)
    kw = dict(input_ids=ids, pixel_values=pix, tile_mask=mask, max_new_tokens=args.new_tokens, do_sample=True)

    def shared(n):
        return lambda: generate(model, params, num_return_sequences=n, seed=n, **kw)

    def separate(n):
        calls = n if args.separate_all else 1
        return lambda: [generate(model, params, seed=i, **kw) for i in range(calls)]

    runners = {} if args.skip_sampling else {("shared", n): shared(n) for n in args.ns}
    runners.update({} if args.skip_sampling else {("separate", n): separate(n) for n in args.ns if n > 1})
    times = {key: [] for key in runners}
    for key, fn in runners.items():  # warm-up: compiles each shape once
        t = time.perf_counter()
        fn()
        print(f"  warm-up {key[0]} N={key[1]}: {time.perf_counter() - t:.1f} s", flush=True)
    for r in range(args.repeats):
        for key, fn in runners.items():
            t = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - t)
        print(f"  round {r + 1}/{args.repeats} done", flush=True)
    med = {key: statistics.median(v) for key, v in times.items()}
    if not args.skip_sampling:
        report(args, med)

    batch = critic_batch(config, ids, pix, args.critic_candidates, args.steps, args.step_tokens)
    token_ids = (10, 12)
    step_scores(model, params, batch, token_ids)  # compiles
    critic = []
    for _ in range(max(args.repeats, 1)):
        t = time.perf_counter()
        step_scores(model, params, batch, token_ids)
        critic.append(time.perf_counter() - t)
    c = statistics.median(critic)
    print(f"\ncritic: {args.critic_candidates} candidates x {args.steps} steps (a {batch.prefix_ids.shape[1]}-token "
          f"shared prefix, {batch.suffix_ids.shape[1]}-token rows after it) in one forward: {c:.2f} s, "
          f"{c / args.critic_candidates:.3f} s per candidate, {c / (args.critic_candidates * args.steps):.3f} s per "
          "judged step")


if __name__ == "__main__":
    main()
