"""Generation: a jitted prefill that fills a preallocated KV cache, then a jitted on-device decode loop.

Both run the decoder's ``unrolled`` layout (one module per layer, [out, in] matrix kernels; see
:class:`~internvl_jax.decoder.Decoder`): ``generate`` converts the stored params once per call, or takes params
already converted by :func:`unrolled_params` (then nothing is copied). Rows of different lengths are given with
an ``attention_mask`` (either padding side); their real tokens are moved to the end of each row (left padding),
so that every row writes its k-th generated token at the same cache slot ``P + k`` (P the bucketed prompt
length). Prompt lengths and cache sizes are bucketed, so many prompts reuse a few compiled programs.

The decode programs are compiled with XLA options of their own (``DECODE_COMPILER_OPTIONS``, per platform, or
``decode_compiler_options=``): a decode step is a chain of matrix-vector products, which on a GPU wants other
GEMM kernels than the prefill, and per-program options need no ``XLA_FLAGS`` before JAX starts.
"""

from __future__ import annotations

import functools
import os
import time
import warnings
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from .config import InternVLConfig
from .decoder import CACHE_AXES, unrolled_params as _decoder_unrolled_params
from .layers import as_dtype
from .model import InternVL, check_image_tokens
from .target import traced_platform

__all__ = ["CACHE_AXES", "DECODE_COMPILER_OPTIONS", "GenerationArgumentError", "check_generation_args",
           "check_max_new_tokens", "generate", "generate_stream", "init_cache", "platform_decode_options", "row_keys", "sample_logits",
           "token_logprobs", "unrolled_params"]


class GenerationArgumentError(ValueError):
    """An argument of :func:`generate` / :func:`generate_stream` (or of ``chat``) that no generation can honour;
    raised before any work (nothing is converted, compiled or run). The message names the argument, what was
    given and what is expected."""


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def check_max_new_tokens(max_new_tokens) -> None:
    """A positive integer (a float such as 8.0 is refused: it would fail inside JAX after the prefill)."""
    if not _is_int(max_new_tokens) or max_new_tokens < 1:
        raise GenerationArgumentError(
            f"max_new_tokens must be a positive integer, got {max_new_tokens!r} ({type(max_new_tokens).__name__})")


def check_sampling(do_sample, temperature, top_k, top_p, vocab_size: int) -> None:
    """The sampling settings that give a distribution to draw from (checked whether or not ``do_sample``: a
    setting that is wrong now is wrong when sampling is turned on)."""
    if not (isinstance(temperature, (int, float, np.number)) and temperature > 0):
        raise GenerationArgumentError(f"temperature must be a positive number, got {temperature!r}")
    if not _is_int(top_k) or not 0 <= top_k <= vocab_size:
        raise GenerationArgumentError(f"top_k must be an integer in 0..{vocab_size} (the vocabulary; 0: all tokens), "
                                      f"got {top_k!r}")
    if not (isinstance(top_p, (int, float, np.number)) and 0 < top_p <= 1):
        raise GenerationArgumentError(f"top_p must be in (0, 1], got {top_p!r}")


def check_generation_args(config: InternVLConfig, input_ids, attention_mask=None, positions=None, *,
                          max_new_tokens, do_sample=False, temperature=1.0, top_k=0, top_p=1.0,
                          num_return_sequences=1) -> None:
    """Raise :class:`GenerationArgumentError` for arguments that cannot generate: a ``max_new_tokens`` that is not
    a positive integer, ``input_ids`` that are not an integer [B, P] array, real tokens (``attention_mask``)
    outside the vocabulary, a prompt whose positions plus ``max_new_tokens`` pass the model's
    ``max_position_embeddings`` (unless its rope is dynamic NTK, which extends beyond them by design),
    sampling settings without a distribution, or ``num_return_sequences`` that is not a positive integer (above 1
    only when sampling). Host-side and cheap: ``generate`` calls it before any work."""
    check_max_new_tokens(max_new_tokens)
    t = config.text
    check_sampling(do_sample, temperature, top_k, top_p, t.vocab_size)
    if not _is_int(num_return_sequences) or num_return_sequences < 1:
        raise GenerationArgumentError(f"num_return_sequences must be a positive integer, got {num_return_sequences!r}")
    if num_return_sequences > 1 and not do_sample:
        raise GenerationArgumentError(f"num_return_sequences={num_return_sequences} needs do_sample=True: greedy "
                                      "decoding would return the same sequence every time")
    ids = np.asarray(input_ids)
    if ids.ndim != 2 or ids.shape[1] == 0 or not np.issubdtype(ids.dtype, np.integer):
        raise GenerationArgumentError(f"input_ids must be an integer array [batch, length], got {ids.dtype} of "
                                      f"shape {ids.shape}")
    mask = np.ones(ids.shape, bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    if mask.shape != ids.shape:
        raise GenerationArgumentError(f"attention_mask has shape {mask.shape}, input_ids {ids.shape}: expected "
                                      "the same")
    lengths = mask.sum(axis=1)
    if (lengths == 0).any():
        raise GenerationArgumentError(f"row {int(np.argmin(lengths))} of the prompt has no tokens (attention_mask "
                                      "is 0 throughout): expected at least one")
    bad = mask & ((ids < 0) | (ids >= t.vocab_size))
    if bad.any():
        row, col = (int(i[0]) for i in np.nonzero(bad))
        raise GenerationArgumentError(f"input_ids[{row}, {col}] is {int(ids[row, col])}: token ids must be in "
                                      f"0..{t.vocab_size - 1} (the vocabulary)")
    if t.rope.type == "dynamic":
        return
    # the largest position the prompt uses (V2PE positions advance by less than one per image token)
    last = int(lengths.max()) - 1 if positions is None else float(np.max(np.where(mask, positions, 0)))
    if last + max_new_tokens >= t.max_position_embeddings:
        room = t.max_position_embeddings - 1 - last
        raise GenerationArgumentError(
            f"the prompt reaches position {last:g} and max_new_tokens={max_new_tokens} would generate up to "
            f"position {last + max_new_tokens:g}, past the model's max_position_embeddings "
            f"{t.max_position_embeddings}: expected "
            + (f"max_new_tokens <= {int(room)}" if room >= 1 else "a shorter prompt"))


def _bucket(n: int, minimum: int = 64) -> int:
    """``n`` rounded up to a multiple of max(``minimum``, 1/8 of the power of two above it): at most 8 sizes per
    doubling, so a 320-token prompt stays 320 and 3000 becomes 3072."""
    step = max(minimum, 1 << max((n - 1).bit_length() - 3, 0))
    return max(minimum, -(-n // step) * step)


def cache_length(prompt_length: int, max_new_tokens: int) -> int:
    """Cache slots ``generate`` allocates for a prompt of ``prompt_length`` tokens (before bucketing)."""
    return _bucket(_bucket(prompt_length) + max_new_tokens)


def init_cache(config: InternVLConfig, batch: int, length: int):
    """Zeroed KV cache: one (k, v) pair per decoder layer, each [batch, kv_heads, length, head_dim] (logical axes
    ``CACHE_AXES``) in the compute dtype."""
    t = config.text
    shape = (batch, t.num_kv_heads, length, t.head_dim)
    dtype = as_dtype(config.dtype)
    # separate buffers, so that each can be donated and updated in place
    return tuple((jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(t.num_layers))


def unrolled_params(params: dict, config: InternVLConfig) -> dict:
    """InternVL params as stored -> those of ``InternVL(config, unrolled=True)``, the layout generation runs
    (only the decoder's layers and LM head change; see :func:`internvl_jax.decoder.unrolled_params`). Converting
    once and passing the result to ``generate`` saves the per-call conversion at the price of keeping a second
    copy of the LLM weights."""
    if "layers" not in params["language_model"]:
        return params  # already converted
    return {**params, "language_model": _decoder_unrolled_params(params["language_model"], config.text)}


def greedy_tokens(logits):
    """int32 [B]: the first index of each row's largest logit (logits [B, V]), as ``jnp.argmax`` (NaN counts as the
    largest), in plain reductions: XLA CPU's argmax, one reduction of (value, index) pairs, took 0.64 ms over a
    151936-entry vocabulary against 0.17 ms for these, 0.7% of a float32 1B decode step."""
    nan = jnp.isnan(logits)
    hit = jnp.where(nan.any(axis=-1, keepdims=True), nan, logits == jnp.max(logits, axis=-1, keepdims=True))
    index = jnp.where(hit, jnp.arange(logits.shape[-1], dtype=jnp.int32), logits.shape[-1])
    return jnp.min(index, axis=-1)


def sample_logits(logits, rng, *, do_sample: bool, temperature: float, top_k: int, top_p: float):
    """Next tokens from float32 logits [B, V]: argmax, or a draw after temperature, top-k and top-p (nucleus)."""
    if not do_sample:
        return greedy_tokens(logits)
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


def row_keys(seed: int, rows: int):
    """The sampling keys of ``rows`` output rows: uint32 [rows, 2], ``jax.random.split(PRNGKey(seed), rows)``.
    Row r of :func:`generate`'s output (prompt r // N, candidate r % N for ``num_return_sequences`` N) draws its
    tokens with key r alone, so a row is reproduced by generating its prompt alone with ``row_keys=keys[r:r + 1]``
    whatever the other rows are."""
    return jax.random.split(jax.random.PRNGKey(seed), rows)


def _pick(logits, keys, slot, sampling):
    """Next tokens [B] from logits [B, V]; row b samples with ``fold_in(keys[b], slot)``, ``slot`` the cache slot
    of the token just fed (so the key of a draw depends on its row key and its place in the row only)."""
    do_sample, temperature, top_k, top_p = sampling
    if not do_sample:
        return greedy_tokens(logits)

    def one(row, key):
        return sample_logits(row[None], jax.random.fold_in(key, slot), do_sample=True, temperature=temperature,
                             top_k=top_k, top_p=top_p)[0]

    return jax.vmap(one)(logits, keys)


def token_logprobs(logits, tokens):
    """float32 [B]: log-probability of ``tokens`` [B] under the model's own distribution ``softmax(logits [B, V])``
    (temperature 1, no top-k / top-p: what the policy itself assigns)."""
    return jnp.take_along_axis(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), tokens[:, None], axis=1)[:, 0]


@partial(jax.jit, static_argnames=("model", "sampling", "cache_length", "num_return"))
def _prefill(model, params, ids, start, positions, pixel_values, tile_mask, keys, *, sampling, cache_length,
             num_return=1):
    """Run the left-padded prompts ([B, P], real tokens from slot ``start`` [B]) into a fresh cache of
    ``cache_length`` slots; the vision tower and the LM head run once per prompt (the head at the last slot only).
    With ``num_return`` N the cache, last logits, positions and starts are then repeated N times per prompt
    (rows b * N .. b * N + N - 1), so the N candidates share one prefill. keys: [B * N, 2] row keys.
    Returns (first new token [B * N], its log-probability [B * N], its position [B * N], cache, start [B * N])."""
    cache = init_cache(model.config, ids.shape[0], cache_length)
    logits, cache = model.apply(
        {"params": params}, ids, pixel_values, tile_mask, positions=positions, cache=cache, cache_index=0,
        cache_start=start, last_only=True,
    )
    rows = lambda x: jnp.repeat(x, num_return, axis=0) if num_return > 1 else x  # noqa: E731
    cache = jax.tree.map(rows, cache)
    logits = rows(logits[:, 0])
    token = _pick(logits, keys, ids.shape[1] - 1, sampling)
    return token, token_logprobs(logits, token), rows(positions[:, -1] + 1), cache, rows(start)


def _forward_step(model, params, start, slot, token, pos, cache):
    """Feed one token per row at cache ``slot`` (the same in every row): (its logits [B, V], cache). A model with
    a ``decode_step`` method of the same arguments (InternVL 1.0's QLLaMA, :func:`internvl_jax.clip.caption`) is
    stepped through it, others through ``__call__``."""
    logits, cache = model.apply(
        {"params": params}, token[:, None], positions=pos[:, None], cache=cache, cache_index=slot, cache_start=start,
        method=getattr(type(model), "decode_step", None),
    )
    return logits[:, 0], cache


def _step(model, params, start, slot, token, pos, cache, rng, sampling):
    """Feed one token per row at cache ``slot``; returns the next token and the new state. rng: the row keys
    [B, 2] (unused when greedy), passed through."""
    logits, cache = _forward_step(model, params, start, slot, token, pos, cache)
    return _pick(logits, rng, slot, sampling), pos + 1, cache, rng


def _decode_loop(model, params, start, slot, token, pos, cache, rng, eos, pad, first_logprob=None, *,
                 max_new_tokens, sampling):
    """The whole decode on the device (``lax.while_loop``), stopping once every row produced an eos token.
    ``slot``: the cache slot of the first generated token (the bucketed prompt length). Returns the tokens
    [B, max_new_tokens], and with ``first_logprob`` (the first token's, [B]) also every token's log-probability
    (:func:`token_logprobs`; 0 after a row's eos)."""
    rows = token.shape[0]
    out = jnp.full((rows, max_new_tokens), pad, jnp.int32).at[:, 0].set(token)
    scored = first_logprob is not None
    lp = jnp.zeros((rows, max_new_tokens), jnp.float32)
    if scored:
        lp = lp.at[:, 0].set(first_logprob)

    def cond(state):
        step, *_, done = state
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(state):
        step, token, pos, cache, out, lp, done = state
        logits, cache = _forward_step(model, params, start, slot + step - 1, token, pos, cache)
        new = jnp.where(done, pad, _pick(logits, rng, slot + step - 1, sampling))
        if scored:
            lp = lp.at[:, step].set(jnp.where(done, 0.0, token_logprobs(logits, new)))
        return step + 1, new, pos + 1, cache, out.at[:, step].set(new), lp, done | jnp.isin(new, eos)

    state = (jnp.int32(1), token, pos, cache, out, lp, jnp.isin(token, eos))
    final = jax.lax.while_loop(cond, body, state)
    return (final[4], final[5]) if scored else final[4]


# Per platform (``jax.Device.platform``), the XLA compiler options of the decode programs. GPU: XLA's Triton GEMMs
# read batch-1 decode weights at ~35% of an H100's bandwidth, cuBLAS at 84% (issue 5's anchor: a plain jitted
# decoder with the InternVL2.5-8B shapes, 65 vs 150 tokens/s); bench/generate.py --also-xla-defaults times ours
# with both settings in one process, to confirm or revise this entry.
DECODE_COMPILER_OPTIONS: dict[str, dict] = {"gpu": {"xla_gpu_enable_triton_gemm": False}}


def platform_decode_options(platform: str) -> dict:
    """The decode programs' XLA options on ``platform``: its ``DECODE_COMPILER_OPTIONS`` entry, less any option
    that the ``XLA_FLAGS`` environment variable names, so that a flag the user set wins."""
    named = {f.lstrip("-").split("=")[0] for f in os.environ.get("XLA_FLAGS", "").split()}
    return {k: v for k, v in DECODE_COMPILER_OPTIONS.get(platform, {}).items() if k not in named}


@functools.cache
def _decode_programs(options: tuple) -> tuple:
    """(one step, the whole loop), jitted with these XLA compiler options ((name, value) pairs)."""
    opts = dict(options) or None
    step = jax.jit(_step, static_argnames=("model", "sampling"), donate_argnames=("cache",), compiler_options=opts)
    loop = jax.jit(_decode_loop, static_argnames=("model", "max_new_tokens", "sampling"), compiler_options=opts)
    return step, loop


@functools.cache
def _known_to_xla(options: tuple) -> tuple:
    """``options`` if this XLA accepts them, else () with a warning: a renamed option in the platform table must not
    stop every decode (options a caller gives are not checked: their error is theirs to see)."""
    if not options:
        return options
    try:
        jax.jit(lambda x: x, compiler_options=dict(options))(0)
    except jax.errors.JaxRuntimeError as e:
        warnings.warn(f"decoding with XLA's default options: this XLA rejects DECODE_COMPILER_OPTIONS' {dict(options)} "
                      f"({e})", stacklevel=4)
        return ()
    return options


def _programs_for(options: dict | None) -> tuple:
    """The decode programs for ``options`` (None: the :func:`platform_decode_options` of the platform traced for,
    :func:`internvl_jax.target.traced_platform`)."""
    if options is None:
        return _decode_programs(_known_to_xla(tuple(sorted(platform_decode_options(traced_platform()).items()))))
    return _decode_programs(tuple(sorted(options.items())))


def _prepare(model, params, input_ids, attention_mask, positions, tile_mask, max_new_tokens, pad_token_id):
    """Host side: left-padded rows of a bucketed length, their first real slots, the cache length, the unrolled
    model and params."""
    config = model.config
    ids = np.asarray(input_ids, np.int32)
    b, p = ids.shape
    mask = np.ones_like(ids, bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    lengths = mask.sum(axis=1).astype(np.int32)
    order = np.argsort(mask, axis=1, kind="stable")  # padding first, then the real tokens in their order
    ids = np.take_along_axis(ids, order, axis=1)
    real = np.arange(p)[None] >= (p - lengths)[:, None]
    check_image_tokens(np.where(real, ids, -1), tile_mask, config.image_token_id, config.tokens_per_tile)
    if positions is None:
        positions = np.maximum(np.arange(p)[None] - (p - lengths)[:, None], 0)
    else:  # padding gets the row's first real position: never above its real ones (dynamic rope uses the max)
        positions = np.take_along_axis(np.asarray(positions), order, axis=1)
        positions = np.where(real, positions, positions[np.arange(b), p - lengths][:, None])
    p_bucket = _bucket(p)
    ids = np.pad(ids, ((0, 0), (p_bucket - p, 0)), constant_values=pad_token_id)
    positions = np.pad(positions, ((0, 0), (p_bucket - p, 0)), mode="edge")
    start = jnp.asarray(p_bucket - lengths)
    model, params = model.clone(unrolled=True), unrolled_params(params, config)
    return model, params, jnp.asarray(ids), start, jnp.asarray(positions), cache_length(p, max_new_tokens)


def _keys(seed, row_keys_given, rows: int):
    """The [rows, 2] row keys: those given (checked) or :func:`row_keys` of the seed."""
    if row_keys_given is None:
        return row_keys(seed, rows)
    keys = jnp.asarray(row_keys_given, jnp.uint32)
    if keys.shape != (rows, 2):
        raise GenerationArgumentError(f"row_keys has shape {tuple(keys.shape)}: expected ({rows}, 2), one key per "
                                      "output row (prompts x num_return_sequences)")
    return keys


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
    timings: dict | None = None,
    decode_compiler_options: dict | None = None,
    num_return_sequences: int = 1,
    row_keys=None,
    return_logprobs: bool = False,
):
    """Generate ``max_new_tokens`` tokens per row: int32 [B * N, max_new_tokens], rows padded with ``pad_token_id``
    after their end-of-sequence token (``eos_token_id``: one id or several). The loop stops when every row ended.

    num_return_sequences N: N sampled candidates per prompt (rows b * N .. b * N + N - 1 for prompt b) in one
    batched decode loop; the prompt goes through the vision tower and the prefill once and its KV cache is
    repeated to its N rows. Sampling keys are per output row: ``row_keys`` uint32 [B * N, 2], default
    :func:`row_keys` (seed, B * N); a row's draws depend on its key only, so each row equals the generation of its
    prompt alone with ``row_keys=keys[r:r + 1]``. return_logprobs: also float32 [B * N, max_new_tokens], each
    token's log-probability under the model's own distribution (:func:`token_logprobs`; 0 after eos), as
    ``(tokens, logprobs)``.

    params: as stored, or once converted by :func:`unrolled_params` (else converted on every call).
    input_ids int [B, P]; attention_mask [B, P] (1 = real token; left or right padding), default all real;
    pixel_values / tile_mask as for the model; positions [B, P] (V2PE floats) continue at the last prompt
    position + 1. Greedy unless ``do_sample`` (then temperature, top_k, top_p, seed).
    timings: a dict to receive ``prefill_s`` (host preparation, vision, prefill, until the first token exists) and
    ``decode_s`` (the decode loop, until every token is on the host), wall-clock seconds.
    decode_compiler_options: XLA options of the decode loop, e.g. ``{"xla_gpu_enable_triton_gemm": True}``;
    default this platform's (:func:`platform_decode_options`); ``{}`` for XLA's own defaults.
    Arguments no generation can honour raise :class:`GenerationArgumentError` before any work
    (:func:`check_generation_args`).
    """
    t0 = time.perf_counter()
    check_generation_args(model.config, input_ids, attention_mask, positions, max_new_tokens=max_new_tokens,
                          do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                          num_return_sequences=num_return_sequences)
    sampling = _sampling(do_sample, temperature, top_k, top_p)
    keys = _keys(seed, row_keys, np.shape(input_ids)[0] * num_return_sequences)
    model, params, ids, start, positions, length = _prepare(model, params, input_ids, attention_mask, positions,
                                                            tile_mask, max_new_tokens, pad_token_id)
    token, first_lp, pos, cache, start = _prefill(model, params, ids, start, positions, pixel_values, tile_mask,
                                                  keys, sampling=sampling, cache_length=length,
                                                  num_return=num_return_sequences)
    if timings is not None:
        token.block_until_ready()
        t1 = time.perf_counter()
    eos = jnp.asarray(np.atleast_1d(-1 if eos_token_id is None else eos_token_id), jnp.int32)
    decode_loop = _programs_for(decode_compiler_options)[1]
    out = decode_loop(model, params, start, jnp.int32(ids.shape[1]), token, pos, cache, keys, eos,
                      jnp.int32(pad_token_id), first_lp if return_logprobs else None, max_new_tokens=max_new_tokens,
                      sampling=sampling)
    out = tuple(np.asarray(x) for x in out) if return_logprobs else np.asarray(out)
    if timings is not None:
        timings.update(prefill_s=t1 - t0, decode_s=time.perf_counter() - t1)
    return out


def generate_stream(model: InternVL, params, *, input_ids, attention_mask=None, pixel_values=None, tile_mask=None,
                    positions=None, max_new_tokens: int = 32, do_sample: bool = False, temperature: float = 1.0,
                    top_k: int = 0, top_p: float = 1.0, seed: int = 0, eos_token_id=None,
                    decode_compiler_options: dict | None = None, num_return_sequences: int = 1, row_keys=None):
    """Like :func:`generate` (the same tokens for the same arguments), but yields each step's tokens (int32
    [B * N]) as soon as they exist; rows that ended keep yielding their eos token. Stops when every row produced an
    eos token or after ``max_new_tokens`` steps. Arguments are checked when the generator is created, not at its
    first step."""
    check_generation_args(model.config, input_ids, attention_mask, positions, max_new_tokens=max_new_tokens,
                          do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                          num_return_sequences=num_return_sequences)
    keys = _keys(seed, row_keys, np.shape(input_ids)[0] * num_return_sequences)
    return _stream(model, params, input_ids, attention_mask, pixel_values, tile_mask, positions, max_new_tokens,
                   _sampling(do_sample, temperature, top_k, top_p), keys, num_return_sequences, eos_token_id,
                   decode_compiler_options)


def _stream(model, params, input_ids, attention_mask, pixel_values, tile_mask, positions, max_new_tokens, sampling,
            keys, num_return, eos_token_id, decode_compiler_options):
    """The generator of :func:`generate_stream`, its arguments checked."""
    model, params, ids, start, positions, length = _prepare(model, params, input_ids, attention_mask, positions,
                                                            tile_mask, max_new_tokens, 0)
    token, _, pos, cache, start = _prefill(model, params, ids, start, positions, pixel_values, tile_mask, keys,
                                           sampling=sampling, cache_length=length, num_return=num_return)
    eos = np.atleast_1d(-1 if eos_token_id is None else eos_token_id)
    decode_step = _programs_for(decode_compiler_options)[0]
    done = np.zeros(token.shape[0], bool)
    for step in range(1, max_new_tokens + 1):
        host = np.asarray(token)
        host = np.where(done, eos[0], host)
        yield host
        done |= np.isin(host, eos)
        if done.all() or step == max_new_tokens:
            return
        token, pos, cache, _ = decode_step(model, params, start, jnp.int32(ids.shape[1] + step - 1), token, pos,
                                           cache, keys, sampling=sampling)
