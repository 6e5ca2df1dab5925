"""``sharding.plan``: exact per-device bytes of sharded state, a plan for every release, the report's last lines."""

import argparse

import jax
import numpy as np
import pytest

import sharding
from internvl_jax.generate import init_cache
from internvl_jax.model import InternVL, _dummy_inputs
from internvl_jax.presets import PRESETS
from sharding import plan as P

CONFIG = P.target_config("tiny-qwen2", dtype="float32", platform="gpu")
RELEASES = [name for name in PRESETS if not name.startswith("tiny-")]


def _device0_bytes(tree) -> int:
    """Bytes of the shards device 0 holds."""
    dev = jax.devices()[0]
    return sum(s.data.nbytes for x in jax.tree_util.tree_leaves(tree) for s in x.addressable_shards if s.device == dev)


@pytest.mark.parametrize("rules,shape", [("dp", (8, 1, 1)), ("fsdp", (1, 8, 1)), ("fsdp", (2, 2, 2)),
                                         ("fsdp_tp", (1, 4, 2)), ("fsdp_tp", (2, 2, 2))])
def test_estimate_equals_allocated_shards(rules, shape):
    mesh = sharding.make_mesh(*shape)
    model = InternVL(CONFIG)
    params = sharding.init_sharded(lambda r: model.init(r, *_dummy_inputs(CONFIG))["params"], mesh, rules,
                                   jax.random.PRNGKey(0))
    tx = P.OPTIMIZERS["adamw"]()
    opt_sh = sharding.shardings(jax.eval_shape(tx.init, P._boxed_params(CONFIG)), mesh, rules)
    opt_state = jax.jit(tx.init, out_shardings=opt_sh)(params)
    rows, length = 8, 32
    cache_sh = sharding.shardings(P.abstract_cache(CONFIG, rows, length), mesh, rules)
    cache = jax.jit(lambda: init_cache(CONFIG, rows, length), out_shardings=cache_sh)()
    est = P.estimate(CONFIG, sharding.mesh_shape(mesh), rules, rows=rows, seq_len=length, tiles=2)
    assert est.params == _device0_bytes(params) == est.grads
    assert est.opt_state == _device0_bytes(opt_state)
    assert est.kv_cache == _device0_bytes(cache)
    # the same figures through plan() for a GPU slice of the same shape (estimate only)
    plan = P.plan("tiny-qwen2", chips="h100-8", mesh=",".join(map(str, shape)), rules=rules, seq_len=length,
                  batch=rows, tiles=2, dtype="float32")
    assert (plan.estimate.params, plan.estimate.opt_state, plan.estimate.kv_cache) == (
        est.params, est.opt_state, est.kv_cache)
    assert plan.compiled is None and plan.lines()[-2] == f"per-device bytes: {est.train}"


@pytest.mark.parametrize("preset", RELEASES)
def test_every_release_plans(preset):
    plan = P.plan(preset, chips="v5p-64", compile=False)
    lines = plan.lines()
    assert lines[-2] == f"per-device bytes: {plan.estimate.train}"
    assert lines[-1] == ("verdict: fits" if plan.estimate.train <= 95 * 2**30 else "verdict: does not fit")
    if plan.smallest:
        assert plan.smallest[2].train <= 95 * 2**30


def test_verdicts_and_smallest_slice():
    small = P.plan("InternVL2_5-8B", chips="v5e-4", compile=False)
    assert small.lines()[-1] == "verdict: does not fit"
    slice_, sizes, est = small.smallest
    assert slice_.chip.name == "v5e" and est.train <= 16 * 2**30 and np.prod(list(sizes.values())) == slice_.chips
    assert slice_.chips & (slice_.chips - 1) == 0 and slice_.chips > 4
    assert P.plan("InternVL2_5-8B", chips=f"v5e-{slice_.chips}", compile=False).lines()[-1] == "verdict: fits"
    assert P.plan("InternVL2_5-8B", chips=f"v5e-{slice_.chips // 2}", compile=False).lines()[-1] == (
        "verdict: does not fit")
    # the ViT-6B width (3200) caps FSDP at 128 ways: with one 2048-token row per device the 78B fits 16 GiB there only
    slice_, sizes, est = P.plan("InternVL2_5-78B", chips="v5e-16", compile=False).smallest
    assert slice_.chips == 128 and sizes["fsdp"] == 128 and est.train <= 16 * 2**30


def test_compiled_figures_for_a_tpu_slice():
    plan = P.plan("tiny-qwen2", chips="v5e:2x2", seq_len=32, step_time=1.0, dtype="float32")
    c = plan.compiled
    assert c is not None and plan.per_device_bytes == c.total and plan.program_flops > 0
    text = "\n".join(plan.lines())
    assert "compiled train step (v5e:2x2" in text and "MFU" in text
    assert text.endswith(f"per-device bytes: {c.total}\nverdict: fits")


def test_the_mpo_step_compiles_for_a_tpu_slice_with_its_reference():
    """The MPO step's plan: the frozen copy is an argument of the compiled step and a line of the estimate; with
    stored log-probs there is no second model."""
    kw = dict(chips="v5e:2x2", seq_len=32, dtype="float32", rules="fsdp")
    copy, file = P.plan("tiny-qwen2", mpo="copy", **kw), P.plan("tiny-qwen2", mpo="file", **kw)
    assert copy.estimate.reference == copy.estimate.params and file.estimate.reference == 0
    assert copy.estimate.train - file.estimate.train == copy.estimate.params
    # the compiled reference: the params once more, in the TPU's padded layout (small tensors pad to whole tiles),
    # so at least their plain bytes and less than half the policy's state (params + two Adam moments)
    extra = copy.compiled.argument_bytes - file.compiled.argument_bytes
    assert copy.estimate.params <= extra < file.compiled.argument_bytes / 2, (extra, copy.estimate.params)
    assert "MPO step (reference: frozen copy)" in copy.lines()[0] and "frozen reference" in "\n".join(copy.lines())


def test_command_line(capsys):
    parser = argparse.ArgumentParser()
    P.add_parser(parser.add_subparsers())
    args = parser.parse_args(["plan", "InternVL2_5-8B", "--chips", "h100-8", "--mesh", "1,8,1", "--step-time", "2"])
    args.func(args)
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-2].startswith("per-device bytes: ") and out[-1] == "verdict: fits"
    for bad, msg in [(["--mesh", "1,3,1"], "needs 3 devices"), (["--chips", "v9-8"], "unknown chips"),
                     (["--mesh", "1,8,1", "--rules", "fsdp_tp", "--chips", "h100-16"], "needs 8 devices")]:
        with pytest.raises(ValueError, match=msg):
            P.run(parser.parse_args(["plan", "tiny-qwen2", *bad]))


def test_lora_plan_keeps_gradients_and_moments_for_the_adapters_and_the_projector_only():
    """``plan(..., lora=r)`` / ``--lora r``: the adapters of ``train ... lora.rank=r`` on the ViT and the LLM;
    gradients and Adam moments exist for the adapters and the projector alone (counted on one device); the
    activations are the full fine-tuning's."""
    parser = argparse.ArgumentParser()
    P.add_parser(parser.add_subparsers())
    args = parser.parse_args(["plan", "tiny-qwen2", "--chips", "h100-1", "--seq-len", "32", "--dtype", "float32",
                              "--lora", "4"])
    kw = dict(chips=args.chips, seq_len=args.seq_len, dtype=args.dtype)
    low, full = P.plan("tiny-qwen2", lora=args.lora, **kw), P.plan("tiny-qwen2", **kw)
    config, opt = P.with_lora(CONFIG, 4)
    flat = jax.tree_util.tree_flatten_with_path(P.abstract_params(config))[0]
    trained = {jax.tree_util.keystr(p): x.size for (p, x), t in zip(flat, jax.tree_util.tree_leaves(opt.trainable))
               if t}
    assert trained and all("lora_" in p or "projector" in p for p in trained)
    assert any("vision" in p for p in trained) and any("language_model" in p for p in trained)
    n = sum(trained.values())
    assert low.estimate.grads == 4 * n < full.estimate.grads
    assert 8 * n <= low.estimate.opt_state < 8 * n + 64  # two float32 moments, plus step counts
    assert low.estimate.activations == full.estimate.activations
    assert "LoRA r=4 on the ViT and the LLM" in low.lines()[0]
    with pytest.raises(ValueError, match="freezes the ViT and the LLM, so LoRA has no tower"):
        P.plan("tiny-qwen2", lora=4, stage="internvl2_5_stage1", **kw)  # the MLP-only stage
