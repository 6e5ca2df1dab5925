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


CACHE_AXES = ("layers", "batch", "cache_length", "kv_heads", "head_dim")  # logical axes of each cache array


def init_cache(config: InternVLConfig, batch: int, length: int):
    """Zeroed (k, v), each [layers, batch, length, kv_heads, head_dim] (logical axes ``CACHE_AXES``) in the
    compute dtype."""
    t = config.text
    shape = (t.num_layers, batch, length, t.num_kv_heads, t.head_dim)
    dtype = as_dtype(config.dtype)
    return jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)  # two buffers, so either can be donated


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


def _sampling(do_sample, temperature, top_k, top_p) -> tuple:
    return bool(do_sample), float(temperature), int(top_k), float(top_p)


def _pick(logits, rng, sampling):
    do_sample, temperature, top_k, top_p = sampling
    return sample_logits(logits, rng, do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p)


@partial(jax.jit, static_argnames=("model", "sampling"))
def _prefill(model, params, ids, lengths, positions, pixel_values, tile_mask, cache, rng, *, sampling):
    """Run the prompt into the cache; returns (first new token [B], its position [B], cache, rng)."""
    logits, cache = model.apply(
        {"params": params}, ids, pixel_values, tile_mask, positions=positions, cache=cache,
        cache_index=jnp.zeros((ids.shape[0],), jnp.int32),
    )
    last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
    rng, key = jax.random.split(rng)
    next_pos = jnp.take_along_axis(positions, (lengths - 1)[:, None], axis=1)[:, 0] + 1
    return _pick(last, key, sampling), next_pos, cache, rng


def _step(model, params, lengths, step, token, pos, cache, rng, sampling):
    """Feed the ``step``-th generated token (slot lengths + step - 1); returns the next token and the new state."""
    logits, cache = model.apply(
        {"params": params}, token[:, None], positions=pos[:, None], cache=cache, cache_index=lengths + step - 1
    )
    rng, key = jax.random.split(rng)
    return _pick(logits[:, 0], key, sampling), pos + 1, cache, rng


_decode_step = jax.jit(_step, static_argnames=("model", "sampling"))


@partial(jax.jit, static_argnames=("model", "max_new_tokens", "sampling"))
def _decode_loop(model, params, lengths, token, pos, cache, rng, eos, pad, *, max_new_tokens, sampling):
    """The whole decode on the device (``lax.while_loop``), stopping once every row produced an eos token."""
    out = jnp.full((token.shape[0], max_new_tokens), pad, jnp.int32).at[:, 0].set(token)

    def cond(state):
        step, *_, done = state
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(state):
        step, token, pos, cache, rng, out, done = state
        new, pos, cache, rng = _step(model, params, lengths, step, token, pos, cache, rng, sampling)
        new = jnp.where(done, pad, new)
        return step + 1, new, pos, cache, rng, out.at[:, step].set(new), done | jnp.isin(new, eos)

    state = (jnp.int32(1), token, pos, cache, rng, out, jnp.isin(token, eos))
    return jax.lax.while_loop(cond, body, state)[5]


def _prepare(model, input_ids, attention_mask, positions, tile_mask, max_new_tokens, pad_token_id):
    """Host side: real tokens to the front of each row, bucketed prompt length, a fresh cache."""
    config = model.config
    ids = np.asarray(input_ids, np.int32)
    b, p = ids.shape
    mask = np.ones_like(ids, bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    lengths = mask.sum(axis=1).astype(np.int32)
    if (lengths == 0).any():
        raise ValueError(f"row {int(np.argmin(lengths))} of the prompt has no tokens")
    order = np.argsort(~mask, axis=1, kind="stable")
    ids = np.take_along_axis(ids, order, axis=1)
    positions = np.broadcast_to(np.arange(p), (b, p)) if positions is None else np.take_along_axis(
        np.asarray(positions), order, axis=1)
    real = np.arange(p)[None] < lengths[:, None]
    check_image_tokens(np.where(real, ids, -1), tile_mask, config.image_token_id, config.tokens_per_tile)
    p_bucket = _bucket(p)
    ids = np.pad(ids, ((0, 0), (0, p_bucket - p)), constant_values=pad_token_id)
    positions = np.pad(positions, ((0, 0), (0, p_bucket - p)), mode="edge")
    cache = init_cache(config, b, _bucket(p_bucket + max_new_tokens))
    return jnp.asarray(ids), jnp.asarray(lengths), jnp.asarray(positions), cache


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
    sampling = _sampling(do_sample, temperature, top_k, top_p)
    ids, lengths, positions, cache = _prepare(model, input_ids, attention_mask, positions, tile_mask, max_new_tokens,
                                              pad_token_id)
    token, pos, cache, rng = _prefill(model, params, ids, lengths, positions, pixel_values, tile_mask, cache,
                                      jax.random.PRNGKey(seed), sampling=sampling)
    eos = jnp.asarray(np.atleast_1d(-1 if eos_token_id is None else eos_token_id), jnp.int32)
    return np.asarray(_decode_loop(model, params, lengths, token, pos, cache, rng, eos, jnp.int32(pad_token_id),
                                   max_new_tokens=max_new_tokens, sampling=sampling))


def generate_stream(model: InternVL, params, *, input_ids, attention_mask=None, pixel_values=None, tile_mask=None,
                    positions=None, max_new_tokens: int = 32, do_sample: bool = False, temperature: float = 1.0,
                    top_k: int = 0, top_p: float = 1.0, seed: int = 0, eos_token_id=None):
    """Like :func:`generate`, but yields each step's tokens (int32 [B]) as soon as they exist; rows that ended keep
    yielding their eos token. Stops when every row produced an eos token or after ``max_new_tokens`` steps."""
    sampling = _sampling(do_sample, temperature, top_k, top_p)
    ids, lengths, positions, cache = _prepare(model, input_ids, attention_mask, positions, tile_mask, max_new_tokens, 0)
    token, pos, cache, rng = _prefill(model, params, ids, lengths, positions, pixel_values, tile_mask, cache,
                                      jax.random.PRNGKey(seed), sampling=sampling)
    eos = np.atleast_1d(-1 if eos_token_id is None else eos_token_id)
    done = np.zeros(ids.shape[0], bool)
    for step in range(1, max_new_tokens + 1):
        host = np.asarray(token)
        host = np.where(done, eos[0], host)
        yield host
        done |= np.isin(host, eos)
        if done.all() or step == max_new_tokens:
            return
        token, pos, cache, rng = _decode_step(model, params, lengths, jnp.int32(step), token, pos, cache, rng,
                                              sampling=sampling)
