"""Generation: greedy decoding equals transformers token for token; the KV cache equals full recomputation;
sampling is reproducible and respects top-k / top-p."""

import importlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from convert.load import load_pretrained
from internvl_jax.generate import (DECODE_COMPILER_OPTIONS, GenerationArgumentError, generate, generate_stream,
                                   greedy_tokens, init_cache, platform_decode_options, row_keys, sample_logits,
                                   unrolled_params)
from internvl_jax.processing.positions import v2pe_positions
from internvl_jax.target import target_platform
from reference import TOL_LOGITS, image_batch, max_diff, tiny_internvl

NEW = 32


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    ref = tiny_internvl("qwen2", "layernorm_bias")
    path = tmp_path_factory.mktemp("gen")
    ref.save_pretrained(path)
    model, params = load_pretrained(str(path))
    return ref, model, params


def test_greedy_with_two_images_equals_transformers(loaded):
    ref, model, params = loaded
    ids, torch_pixels, pixels, mask = image_batch([[2, 3]], length=40, max_tiles=6)
    with torch.no_grad():
        expected = ref.generate(input_ids=torch.tensor(ids, dtype=torch.long), pixel_values=torch_pixels,
                                max_new_tokens=NEW, do_sample=False)[:, ids.shape[1]:].numpy()
    got = generate(model, params, input_ids=ids, pixel_values=pixels, tile_mask=mask, max_new_tokens=NEW)
    np.testing.assert_array_equal(got, expected)


def test_greedy_batch_of_different_lengths_equals_transformers(loaded):
    ref, model, params = loaded
    rng = np.random.default_rng(1)
    lengths = [5, 17, 11]
    ids = np.zeros((3, 17), np.int64)
    attn = np.zeros((3, 17), np.int64)
    for r, n in enumerate(lengths):  # left padding, as transformers batches prompts
        ids[r, 17 - n:] = rng.integers(1, 250, n)
        attn[r, 17 - n:] = 1
    with torch.no_grad():
        expected = ref.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(attn), max_new_tokens=NEW,
                                do_sample=False, pad_token_id=0)[:, 17:].numpy()
    got = generate(model, params, input_ids=ids, attention_mask=attn, max_new_tokens=NEW)
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("v2pe", [False, True], ids=["integer", "v2pe"])
def test_kv_cache_logits_equal_full_recomputation(loaded, v2pe):
    _, model, params = loaded
    ids, _, pixels, mask = image_batch([[2, 3], [1]], length=40, max_tiles=6)
    positions = jnp.broadcast_to(jnp.arange(40, dtype=jnp.float32), (2, 40))
    if v2pe:  # image tokens advance by 1/4, text by 1
        positions = jnp.asarray(np.stack([v2pe_positions(row, model.config.image_token_id, 1, tokens_per_tile=4)
                                          for row in ids]))
    full = model.apply({"params": params}, jnp.asarray(ids), pixels, mask, positions=positions)
    # the cache runs in the unrolled layout; its logits without a cache equal the scanned model's too
    model, params = model.clone(unrolled=True), unrolled_params(params, model.config)
    unrolled = model.apply({"params": params}, jnp.asarray(ids), pixels, mask, positions=positions)
    assert max_diff(unrolled, full) <= TOL_LOGITS
    split = 30  # prefill 30 tokens, then feed the rest one at a time through the cache
    cache = init_cache(model.config, 2, 64)
    logits, cache = model.apply({"params": params}, jnp.asarray(ids[:, :split]), pixels, mask,
                                positions=positions[:, :split], cache=cache, cache_index=0)
    steps = [logits]
    for i in range(split, ids.shape[1]):
        step, cache = model.apply({"params": params}, jnp.asarray(ids[:, i:i + 1]), positions=positions[:, i:i + 1],
                                  cache=cache, cache_index=i)
        steps.append(step)
    assert max_diff(jnp.concatenate(steps, axis=1), full) <= TOL_LOGITS


def test_params_converted_once_give_the_same_tokens(loaded):
    _, model, params = loaded
    ids = np.random.default_rng(5).integers(1, 250, (2, 9))
    once = unrolled_params(params, model.config)
    np.testing.assert_array_equal(generate(model, once, input_ids=ids, max_new_tokens=6),
                                  generate(model, params, input_ids=ids, max_new_tokens=6))


def test_timings_split_the_call_into_prefill_and_decode(loaded):
    _, model, params = loaded
    ids = np.random.default_rng(6).integers(1, 250, (1, 9))
    timings = {}
    t0 = time.perf_counter()
    got = generate(model, params, input_ids=ids, max_new_tokens=6, timings=timings)
    total = time.perf_counter() - t0
    np.testing.assert_array_equal(got, generate(model, params, input_ids=ids, max_new_tokens=6))
    assert set(timings) == {"prefill_s", "decode_s"}
    assert 0 < timings["prefill_s"] and 0 < timings["decode_s"] and timings["prefill_s"] + timings["decode_s"] <= total


def test_sampling_is_reproducible_and_top_k_1_is_greedy(loaded):
    _, model, params = loaded
    ids = np.random.default_rng(2).integers(1, 250, (2, 9))
    run = lambda **kw: generate(model, params, input_ids=ids, max_new_tokens=12, **kw)  # noqa: E731
    a, b = run(do_sample=True, seed=3), run(do_sample=True, seed=3)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, run(do_sample=True, seed=4))
    np.testing.assert_array_equal(run(do_sample=True, top_k=1, seed=5), run())


def test_shared_prefill_candidates_equal_independent_generations_with_their_row_keys(loaded):
    """num_return_sequences N: one prefill per prompt (images included) broadcast to N rows; row r (prompt r // N)
    equals its prompt generated alone with row_keys[r] (the keys documented by generate), token for token."""
    _, model, params = loaded
    params = unrolled_params(params, model.config)
    ids, _, pixels, mask = image_batch([[2], [1]], length=30, max_tiles=2, seed=4)
    n, kw = 3, dict(max_new_tokens=10, do_sample=True, temperature=1.5, top_k=50, top_p=0.95)
    got, logprobs = generate(model, params, input_ids=ids, pixel_values=pixels, tile_mask=mask,
                             num_return_sequences=n, seed=11, return_logprobs=True, **kw)
    keys = row_keys(11, 2 * n)
    alone = np.concatenate([generate(model, params, input_ids=ids[r // n:r // n + 1], pixel_values=pixels[r // n:r // n + 1],
                                     tile_mask=mask[r // n:r // n + 1], row_keys=keys[r:r + 1], **kw)
                            for r in range(2 * n)])
    np.testing.assert_array_equal(got, alone)
    assert len({tuple(row) for row in got[:n]}) > 1  # the candidates of one prompt differ
    # each token's log-probability: the full forward of prompt + candidate (no cache), log-softmaxed
    rows = np.repeat(np.arange(2), n)
    full = np.concatenate([ids[rows], got], axis=1)
    logits = model.clone(unrolled=True).apply({"params": params}, jnp.asarray(full), pixels[rows], mask[rows])
    expected = np.take_along_axis(np.asarray(jax.nn.log_softmax(logits[:, ids.shape[1] - 1:-1])), got[..., None], 2)
    assert max_diff(logprobs, expected[..., 0]) <= TOL_LOGITS
    streamed = np.stack(list(generate_stream(model, params, input_ids=ids, pixel_values=pixels, tile_mask=mask,
                                             num_return_sequences=n, seed=11, **kw)), axis=1)
    np.testing.assert_array_equal(streamed, got)
    with pytest.raises(GenerationArgumentError, match="needs do_sample=True"):
        generate(model, params, input_ids=ids, num_return_sequences=2)
    with pytest.raises(GenerationArgumentError, match=r"expected \(6, 2\)"):
        generate(model, params, input_ids=ids, num_return_sequences=n, row_keys=keys[:2], **kw)


def test_greedy_tokens_are_argmax_ties_and_nan_included():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((6, 1000)).astype(np.float32)
    logits[1, [3, 700]] = 9.0  # a tie: the first index wins
    logits[2, :] = -np.inf
    logits[3, 500] = np.nan  # NaN counts as the largest
    logits[4, [10, 20]] = np.inf
    logits[5, [40, 30]] = np.nan, np.inf  # the first of NaN and +inf
    got = np.asarray(greedy_tokens(jnp.asarray(logits)))
    np.testing.assert_array_equal(got, np.asarray(jnp.argmax(jnp.asarray(logits), axis=-1)))
    np.testing.assert_array_equal(got[1:5], [3, 0, 500, 10])


def test_top_p_keeps_exactly_the_nucleus():
    # probabilities 0.5, 0.3, 0.15, 0.05: top_p 0.7 keeps the first two (0.5 < 0.7 needs the 0.3 that crosses it)
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
    draws = jax.vmap(lambda k: sample_logits(logits, k, do_sample=True, temperature=1.0, top_k=0, top_p=0.7))(
        jax.random.split(jax.random.PRNGKey(0), 4000))
    counts = np.bincount(np.asarray(draws).ravel(), minlength=4)
    assert counts[2] == counts[3] == 0
    assert abs(counts[0] / counts[:2].sum() - 0.5 / 0.8) < 0.03


def test_eos_stops_rows_and_pads(loaded):
    _, model, params = loaded
    ids = np.random.default_rng(3).integers(1, 250, (2, 9))
    free = generate(model, params, input_ids=ids, max_new_tokens=10)
    eos = int(free[0, 3])
    stopped = generate(model, params, input_ids=ids, max_new_tokens=10, eos_token_id=eos, pad_token_id=-7)
    first = int(np.argmax(free[0] == eos))
    np.testing.assert_array_equal(stopped[0, : first + 1], free[0, : first + 1])
    assert (stopped[0, first + 1:] == -7).all()


def test_streaming_yields_the_same_tokens(loaded):
    _, model, params = loaded
    ids = np.random.default_rng(4).integers(1, 250, (2, 9))
    whole = generate(model, params, input_ids=ids, max_new_tokens=8)
    streamed = np.stack(list(generate_stream(model, params, input_ids=ids, max_new_tokens=8)), axis=1)
    np.testing.assert_array_equal(streamed, whole)


def _dumped_programs(folder) -> set:
    """Names of the jitted functions XLA compiled with ``xla_dump_to=folder`` (module_NNNN.jit_NAME.*)."""
    return {f.name.split(".")[1] for f in folder.glob("module_*.txt")}


def test_decode_programs_compile_with_their_own_xla_options(loaded, tmp_path, monkeypatch):
    """decode_compiler_options, or else the platform's DECODE_COMPILER_OPTIONS entry, reach the decode programs'
    compilation and no other: XLA dumps exactly the programs compiled with ``xla_dump_to``."""
    _, model, params = loaded
    ids = np.random.default_rng(7).integers(1, 250, (2, 9))
    expected = generate(model, params, input_ids=ids, max_new_tokens=5)
    got = generate(model, params, input_ids=ids, max_new_tokens=5,
                   decode_compiler_options={"xla_dump_to": str(tmp_path / "given")})
    np.testing.assert_array_equal(got, expected)
    assert _dumped_programs(tmp_path / "given") == {"jit__decode_loop"}
    monkeypatch.setitem(DECODE_COMPILER_OPTIONS, jax.default_backend(), {"xla_dump_to": str(tmp_path / "table")})
    streamed = np.stack(list(generate_stream(model, params, input_ids=ids, max_new_tokens=5)), axis=1)
    np.testing.assert_array_equal(streamed, expected)
    dumped = _dumped_programs(tmp_path / "table")  # with the table's options checked by a trivial program
    assert "jit__step" in dumped and "jit__prefill" not in dumped


def test_gpu_decode_compiles_without_triton_gemms_unless_xla_flags_say_otherwise(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    assert platform_decode_options("gpu") == {"xla_gpu_enable_triton_gemm": False}
    assert platform_decode_options("cpu") == {}
    monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_enable_triton_gemm=true --xla_dump_to=/tmp/x")
    assert platform_decode_options("gpu") == {}
    for options in DECODE_COMPILER_OPTIONS.values():  # real XLA option names: an unknown one fails to compile
        assert jax.jit(lambda x: x + 1, compiler_options=options)(1) == 2


def test_an_option_this_xla_does_not_know_leaves_decoding_to_its_defaults(loaded, monkeypatch):
    _, model, params = loaded
    ids = np.random.default_rng(8).integers(1, 250, (1, 9))
    expected = generate(model, params, input_ids=ids, max_new_tokens=4)
    monkeypatch.setitem(DECODE_COMPILER_OPTIONS, jax.default_backend(), {"xla_renamed_in_a_later_release": False})
    with pytest.warns(UserWarning, match="xla_renamed_in_a_later_release"):
        got = generate(model, params, input_ids=ids, max_new_tokens=4)
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("platform,lowering", [("gpu", "cuda"), ("tpu", "tpu")])
def test_generation_traces_and_lowers_for_gpu_and_tpu(loaded, platform, lowering):
    """The prefill and the decode loop (with the platform's decode options), traced for another platform on this CPU
    host, lower for it, and no CPU kernel (custom call ``internvl_*``) is called outside a per-platform switch.
    Whether tracing for them builds the kernels is tests/test_kernels.py's question: lowering drops the CPU branch
    of a switch either way."""
    generation = importlib.import_module("internvl_jax.generate")  # the package exports the function of that name
    _, model, params = loaded
    ids, _, pixels, mask = image_batch([[2]], length=24, max_tiles=6)
    sampling = generation._sampling(False, 1.0, 0, 1.0)
    with target_platform(platform):
        model, params, ids, start, positions, length = generation._prepare(model, params, ids, None, None, mask, 8, 0)
        keys = generation.row_keys(0, 1)
        prefill = generation._prefill.trace(model, params, ids, start, positions, pixels, mask, keys,
                                            sampling=sampling, cache_length=length)
        cache = init_cache(model.config, 1, length)
        loop = generation._programs_for(None)[1].trace(
            model, params, start, jnp.int32(ids.shape[1]), jnp.zeros((1,), jnp.int32), positions[:, -1] + 1, cache,
            keys, jnp.asarray([-1]), jnp.int32(0), max_new_tokens=8, sampling=sampling)
        for traced in (prefill, loop):
            text = traced.lower(lowering_platforms=(lowering,)).as_text()
            assert "internvl_" not in text
