"""Generation: a jitted prefill that fills a preallocated KV cache, then a jitted on-device decode loop.

Rows of different lengths are given with an ``attention_mask`` (either padding side); their real tokens are moved
to the front of each row so that row b writes its k-th generated token at cache slot ``length_b + k``.
Prompt lengths and cache sizes are bucketed, so many prompts reuse a few compiled programs.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from .config import InternVLConfig
from .layers import as_dtype
from .model import InternVL, check_image_tokens


def _bucket(n: int, minimum: int = 64) -> int:
    """Lengths rounded up to a power of two (at least ``minimum``)."""
    return max(minimum, 1 << max(n - 1, 0).bit_length())


def init_cache(config: InternVLConfig, batch: int, length: int):
    """Zeroed (k, v), each [layers, batch, length, kv_heads, head_dim] in the compute dtype."""
    t = config.text
    shape = (t.num_layers, batch, length, t.num_kv_heads, t.head_dim)
    zeros = jnp.zeros(shape, as_dtype(config.dtype))
    return zeros, zeros


def sample_logits(logits, rng, *, do_sample: bool, temperature: float, top_k: int, top_p: float):
    """Next tokens from float32 logits [B, V]: argmax, or a draw after temperature, top-k and top-p (nucleus)."""
    if not do_sample:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / max(temperature, 1e-6)
    if top_k > 0:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_probs = jax.nn.softmax(jnp.take_along_axis(logits, order, axis=-1), axis=-1)
        # keep the smallest prefix whose mass reaches top_p (the token that crosses it included)
        keep_sorted = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs < top_p
        keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
        logits = jnp.where(keep, logits, -jnp.inf)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@partial(jax.jit, static_argnames=("model", "max_new_tokens", "sampling"))
def _generate(model, params, ids, lengths, positions, pixel_values, tile_mask, cache, eos, pad, rng, *,
              max_new_tokens: int, sampling: tuple):
    do_sample, temperature, top_k, top_p = sampling
    b = ids.shape[0]
    pick = partial(sample_logits, do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p)
    logits, cache = model.apply(
        {"params": params}, ids, pixel_values, tile_mask, positions=positions, cache=cache,
        cache_index=jnp.zeros((b,), jnp.int32),
    )
    last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
    rng, key = jax.random.split(rng)
    token = pick(last, key)
    next_pos = jnp.take_along_axis(positions, (lengths - 1)[:, None], axis=1)[:, 0] + 1
    out = jnp.full((b, max_new_tokens), pad, jnp.int32).at[:, 0].set(token)
    done = jnp.isin(token, eos)

    def cond(state):
        step, _, _, _, _, done, _ = state
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(state):
        step, token, pos, cache, out, done, rng = state
        logits, cache = model.apply(
            {"params": params}, token[:, None], positions=pos[:, None].astype(positions.dtype), cache=cache,
            cache_index=lengths + step - 1,
        )
        rng, key = jax.random.split(rng)
        new = pick(logits[:, 0], key)
        new = jnp.where(done, pad, new)
        out = out.at[:, step].set(new)
        return step + 1, new, pos + 1, cache, out, done | jnp.isin(new, eos), rng

    state = (jnp.int32(1), token, next_pos, cache, out, done, rng)
    return jax.lax.while_loop(cond, body, state)[4]


def generate(
    model: InternVL,
    params,
    *,
    input_ids,
    attention_mask=None,
    pixel_values=None,
    tile_mask=None,
    positions=None,
    max_new_tokens: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    eos_token_id=None,
    pad_token_id: int = 0,
) -> np.ndarray:
    """Generate ``max_new_tokens`` tokens per row: int32 [B, max_new_tokens], rows padded with ``pad_token_id``
    after their end-of-sequence token (``eos_token_id``: one id or several). The loop stops when every row ended.

    input_ids int [B, P]; attention_mask [B, P] (1 = real token; left or right padding), default all real;
    pixel_values / tile_mask as for the model; positions [B, P] (V2PE floats) continue at the last prompt
    position + 1. Greedy unless ``do_sample`` (then temperature, top_k, top_p, seed).
    """
    config = model.config
    ids = np.asarray(input_ids, np.int32)
    b, p = ids.shape
    mask = np.ones_like(ids, bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    lengths = mask.sum(axis=1).astype(np.int32)
    if (lengths == 0).any():
        raise ValueError(f"row {int(np.argmin(lengths))} of the prompt has no tokens")
    # real tokens to the front of each row (stable), padding after them
    order = np.argsort(~mask, axis=1, kind="stable")
    ids = np.take_along_axis(ids, order, axis=1)
    if positions is None:
        positions = np.broadcast_to(np.arange(p), (b, p))
    else:
        positions = np.take_along_axis(np.asarray(positions), order, axis=1)
    check_image_tokens(np.where(np.arange(p)[None] < lengths[:, None], ids, -1), tile_mask, config.image_token_id,
                       config.tokens_per_tile)
    p_bucket = _bucket(p)
    ids = np.pad(ids, ((0, 0), (0, p_bucket - p)), constant_values=pad_token_id)
    positions = np.pad(positions, ((0, 0), (0, p_bucket - p)), mode="edge")
    cache = init_cache(config, b, _bucket(p_bucket + max_new_tokens))
    eos = jnp.asarray(np.atleast_1d(-1 if eos_token_id is None else eos_token_id), jnp.int32)
    return np.asarray(_generate(
        model, params, jnp.asarray(ids), jnp.asarray(lengths), jnp.asarray(positions), pixel_values, tile_mask, cache,
        eos, jnp.int32(pad_token_id), jax.random.PRNGKey(seed),
        max_new_tokens=max_new_tokens, sampling=(bool(do_sample), float(temperature), int(top_k), float(top_p)),
    ))
