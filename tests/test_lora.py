"""LoRA adapters by path rules (internvl_jax.lora): which kernels get one, their shapes and logical axes, the
low-rank path inside the scanned and unrolled layers, merging, dropout, sharding on an 8-device mesh; shared-A
groups (the fused torch modules of InternLM2 and Phi-3) in each of these.

Tolerances (float32): TOL_SAME, max abs difference between two computations of the same function in a
different order (merged vs low-rank path, stacked vs unrolled layers).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sharding
from internvl_jax import lora
from internvl_jax.config import ConfigError
from internvl_jax.generate import unrolled_params
from internvl_jax.model import InternVL, _dummy_inputs, abstract_params, init_params
from internvl_jax.presets import get_preset
from sharding import PARAM_AXES

TOL_SAME = 1e-5

VIT_KERNELS = {"vision/layers/attn/qkv", "vision/layers/attn/proj", "vision/layers/fc1", "vision/layers/fc2"}
LLM_KERNELS = {f"language_model/layers/attn/{p}_proj" for p in "qkvo"} | {
    f"language_model/layers/mlp/{p}_proj" for p in ("gate", "up", "down")}


def _adapted_modules(tree) -> set:
    flat = jax.tree_util.tree_flatten_with_path(lora.adapters_of(tree))[0]
    return {"/".join(k.key for k in path[:-1]) for path, _ in flat}


def _with_random_b(params, seed=1, scale=0.1):
    """Adapters with non-zero B (a fresh adapter is the identity), so that the low-rank path shows."""
    key = jax.random.PRNGKey(seed)
    return jax.tree_util.tree_map_with_path(
        lambda p, x: jax.random.normal(jax.random.fold_in(key, hash(jax.tree_util.keystr(p)) % 2**31), x.shape) * scale
        if p[-1].key == "lora_b" else x, params)


def test_presets_name_the_originals_targets():
    shapes = lambda targets: abstract_params(get_preset("tiny-qwen2").replace(  # noqa: E731
        lora=lora.preset_rules(targets, 8)))
    assert _adapted_modules(shapes("vit")) == VIT_KERNELS
    assert _adapted_modules(shapes("llm")) == LLM_KERNELS
    assert _adapted_modules(shapes("vit,llm,projector")) == VIT_KERNELS | LLM_KERNELS | {
        "projector/fc1", "projector/fc2"}
    rules = lora.preset_rules("llm", 16)
    assert {r[1:4] for r in rules} == {(16, 32.0, 0.05)}  # r, alpha = 2r, dropout 0.05


@pytest.mark.parametrize("family, groups", [
    ("qwen2", {}),
    ("internlm2", {"attn": {"wqkv": "qkv"}}),
    ("phi3", {"attn": {"qkv_proj": "qkv"}, "mlp": {"gate_up_proj": ("gate", "up")}}),
])
def test_llm_preset_groups_the_fused_modules_of_the_family(family, groups):
    """The original adapts InternLM2's wqkv and Phi-3's qkv_proj / gate_up_proj as one Linear each: one A
    [layers, E, r] at <module>/<group>, each member keeping its own B; the trainer's table (``lora_rules`` with the
    model's family) is the preset's."""
    from train.config import LoraConfig, TrainConfig, lora_rules

    config = get_preset(f"tiny-{family}")
    rules = lora.preset_rules("llm", 4, family=family)
    assert lora_rules(TrainConfig(lora=LoraConfig(rank=4, targets="llm")), family) == rules
    boxed = lora.adapters_of(abstract_params(config.replace(lora=rules), boxed=True))["language_model"]["layers"]
    e, layers = config.text.hidden_size, config.text.num_layers
    grouped = set()
    for module, named in groups.items():
        for group, members in named.items():
            a = boxed[module][group]["lora_a"]
            assert set(boxed[module][group]) == {"lora_a"}
            assert a.value.shape == (layers, e, 4) and a.names == ("layers", "embed", "lora_rank")
            for m in members:
                assert set(boxed[module][f"{m}_proj"]) == {"lora_b"}
                grouped.add(f"{module}/{m}_proj")
    for module, nodes in boxed.items():  # the rest: an adapter of its own
        for name, node in nodes.items():
            if f"{module}/{name}" not in grouped and name not in groups.get(module, {}):
                assert set(node) == {"lora_a", "lora_b"}, (module, name)
    assert not any(r[5:] for r in lora.preset_rules("llm", 4))  # no family: every projection its own adapter


def test_first_rule_wins_and_rank_zero_excludes():
    rules = ((r"mlp/down_proj/kernel$", 0, 1.0),) + lora.preset_rules("llm", 2, alpha=4)
    tree = abstract_params(get_preset("tiny-qwen2").replace(lora=rules))
    assert _adapted_modules(tree) == LLM_KERNELS - {"language_model/layers/mlp/down_proj"}
    assert lora.adapter_for(rules, "language_model/layers_1/attn/q_proj/kernel") == lora.Adapter(2, 4.0, 0.05)


@pytest.mark.parametrize("rule, message", [
    ((("(", 4, 8.0),), "bad regex"),
    ((("q_proj", -1, 8.0),), "rank must be an int >= 0"),
    ((("q_proj", 4, 0),), "alpha must be a number > 0"),
    ((("q_proj", 4, 8.0, 1.5),), "dropout must lie in [0, 1)"),
    ((("q_proj", 4, 8.0, 0.0, "yes"),), "split must be True or False"),
    ((("q_proj", 4, 8.0, 0.0, False, "q/k"),), "group must be a module name"),
    ((("q_proj", 4, 8.0, 0.0, True, "qkv"),), "either split or in a shared-A group"),
    ((("q_proj", 4),), "expected (regex, rank, alpha"),
])
def test_bad_rules_are_named(rule, message):
    with pytest.raises(ConfigError, match=r"InternVLConfig\.lora: LoRA rules\[0\].*" + message.replace("(", r"\(")
                       .replace(")", r"\)").replace("[", r"\[")):
        get_preset("tiny-qwen2").replace(lora=rule)
    with pytest.raises(ValueError, match="unknown LoRA target set 'vits'"):
        lora.preset_rules("vits,llm", 4)


def test_adapter_shapes_axes_and_init():
    config = get_preset("tiny-qwen2").replace(lora=lora.preset_rules("vit_split,llm", 4))
    boxed = abstract_params(config, boxed=True)
    qkv = boxed["vision"]["layers"]["attn"]["qkv"]
    # kernel [layers, C, 3, H, D]; split: A [layers, C, 3, r], B [layers, 3, r, H, D]
    assert qkv["lora_a"].value.shape == qkv["kernel"].value.shape[:3] + (4,)
    assert qkv["lora_a"].names == ("layers", "vit_embed", None, "lora_rank")
    assert qkv["lora_b"].names == ("layers", None, "lora_rank", "vit_heads", "head_dim")
    o = boxed["language_model"]["layers"]["attn"]["o_proj"]
    assert o["lora_a"].names == ("layers", "heads", "head_dim", "lora_rank")
    assert o["lora_b"].names == ("layers", "lora_rank", "embed")
    for leaf in jax.tree_util.tree_leaves(lora.adapters_of(boxed), is_leaf=lambda x: isinstance(x, nn.Partitioned)):
        assert set(n for n in leaf.names if n) <= set(PARAM_AXES)
        assert leaf.value.dtype == jnp.float32


@pytest.mark.parametrize("family", ["qwen2", "phi3"])
def test_low_rank_path_fresh_merged_unrolled_dropout(family):
    """One init (bf16 base) and one compile per model variant: a fresh adapter is the identity (bit-exact), random
    B changes the logits, the merged kernels give the low-rank path's logits, so do the unrolled (generation)
    layers, and LoRA dropout acts only with a dropout rng; with phi3's shared-A groups as well."""
    config = get_preset(f"tiny-{family}")
    adapted = config.replace(lora=lora.preset_rules("vit,llm", 4, family=family), param_dtype="bfloat16")
    fresh = jax.jit(lambda k: init_params(adapted, k))(jax.random.PRNGKey(0))
    # init: A uniform in +-1/sqrt(fan_in) (PEFT's kaiming_uniform(a=sqrt(5))), B zero, both float32 on a bf16 base
    a = np.asarray(fresh["language_model"]["layers"]["mlp"]["down_proj"]["lora_a"])
    bound = 1 / np.sqrt(config.text.intermediate_size)
    assert a.dtype == np.float32 and 0.9 * bound < np.abs(a).max() <= bound
    assert fresh["language_model"]["layers"]["mlp"]["down_proj"]["kernel"].dtype == jnp.bfloat16
    assert not any(np.any(np.asarray(x)) for p, x in jax.tree_util.tree_flatten_with_path(lora.adapters_of(fresh))[0]
                   if p[-1].key == "lora_b")
    base = lora.partition(fresh, lambda p: not lora.is_adapter_path(p))[0]
    size = config.image_size
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 200, (2, 12)), jnp.int32)
    ids = ids.at[:, 2:2 + config.tokens_per_tile].set(config.image_token_id)
    pixels = jax.random.normal(jax.random.PRNGKey(3), (2, 1, size, size, 3))
    mask = jnp.ones((2, 1), bool)
    f32 = lambda c: c.replace(param_dtype="float32", dtype="float32")  # noqa: E731
    plain = jax.jit(lambda p: InternVL(f32(config)).apply({"params": p}, ids, pixels, mask))
    lowrank = jax.jit(lambda p: InternVL(f32(adapted)).apply({"params": p}, ids, pixels, mask))
    np.testing.assert_array_equal(np.asarray(lowrank(fresh)), np.asarray(plain(base)))
    params = _with_random_b(fresh)
    unmerged = lowrank(params)
    assert float(jnp.max(jnp.abs(unmerged - plain(base)))) > 0.05  # the adapters do something
    merged = lora.merge(params, adapted.lora)
    assert merged["language_model"]["layers"]["attn"]["q_proj"]["kernel"].dtype == jnp.bfloat16
    as_f32 = jax.tree.map(lambda x: x.astype(jnp.float32), params)
    assert float(jnp.max(jnp.abs(unmerged - plain(lora.merge(as_f32, adapted.lora))))) <= TOL_SAME
    text = ids.at[:, 2:2 + config.tokens_per_tile].set(7)  # the unrolled layers and dropout: the LLM alone
    stacked = InternVL(f32(adapted)).apply({"params": as_f32}, text)
    unrolled = InternVL(f32(adapted), unrolled=True).apply({"params": unrolled_params(as_f32, adapted)}, text)
    assert float(jnp.max(jnp.abs(stacked - unrolled))) <= TOL_SAME
    dropped = InternVL(f32(adapted)).apply({"params": as_f32}, text, rngs={"dropout": jax.random.PRNGKey(0)})
    assert float(jnp.max(jnp.abs(dropped - stacked))) > 1e-3


def _uncorrelated(a, b) -> bool:
    """Pearson correlation of two equal-sized 0/1 arrays within 5 sigma of zero."""
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return abs(np.corrcoef(a, b)[0, 1]) < 5 / np.sqrt(a.size)


@pytest.mark.parametrize("rate", [0.05, 0.5])
def test_dropout_keep_rate_and_independence(rate):
    """The keep mask drops round(rate * 2**32) / 2**32 of the entries (within 5 sigma), the keep probability it returns
    is that exact fraction (so inverted dropout is unbiased); neighbours along either axis, rows whose indices differ
    in one low bit, and masks of two keys are uncorrelated; the leading axes act as one flattened row axis."""
    shape = (256, 1001)
    keep, mask = lora.dropout_keep(jax.random.PRNGKey(0), rate, shape)
    assert mask.shape == shape and mask.dtype == jnp.bool_
    assert keep == 1 - round(rate * 2**32) / 2**32
    m = np.asarray(mask)
    sigma = np.sqrt(keep * (1 - keep) / m.size)
    assert abs(m.mean() - keep) < 5 * sigma
    assert _uncorrelated(m[:, :-1], m[:, 1:]) and _uncorrelated(m[:-1], m[1:])
    assert _uncorrelated(m[0::2], m[1::2]) and _uncorrelated(m[:128], m[128:])
    other = np.asarray(lora.dropout_keep(jax.random.PRNGKey(1), rate, shape)[1])
    assert _uncorrelated(m, other)
    stacked = np.asarray(lora.dropout_keep(jax.random.PRNGKey(0), rate, (4, 64, 1001))[1])
    assert (stacked.reshape(shape) == m).all()


def test_dropout_down_recomputes_the_mask_with_the_same_gradients():
    """down(x, A, key=, rate=) is scale * dropout(x).A with dropout_keep's mask, in value and in both gradients
    (the checkpointed product recomputes the mask in the backward pass); without a key it is the plain product."""
    kx, ka, kd = jax.random.split(jax.random.PRNGKey(3), 3)
    x, a = jax.random.normal(kx, (2, 5, 8, 16)), jax.random.normal(ka, (8, 16, 4))

    def reference(x, a):
        keep, mask = lora.dropout_keep(kd, 0.3, x.shape)
        return jnp.dot(jnp.where(mask, x / keep, 0).reshape(10, -1), a.reshape(-1, 4)) * 0.5

    ours = lambda x, a: lora.down(x, a, 2, jnp.float32, 0.5, key=kd, rate=0.3)  # noqa: E731
    np.testing.assert_allclose(ours(x, a), reference(x, a), atol=TOL_SAME)
    grads = [jax.grad(lambda *p: f(*p).sum(), (0, 1))(x, a) for f in (ours, reference)]
    for g, r in zip(*grads):
        np.testing.assert_allclose(g, r, atol=TOL_SAME)
    plain = lora.down(x, a, 2, jnp.float32, 0.5)
    assert not np.allclose(ours(x, a), plain)
    np.testing.assert_array_equal(lora.down(x, a, 2, jnp.float32, 0.5, key=kd, rate=0.0), plain)


def test_dropout_mask_is_the_same_sharded():
    """The mask depends on global indices only: computed under a jit whose output is sharded over 8 devices along rows
    (and, separately, columns), it equals the single-device mask."""
    shape, key = (16, 24, 40), jax.random.PRNGKey(5)
    single = np.asarray(lora.dropout_keep(key, 0.2, shape)[1])
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(8), ("x",))
    for spec in (jax.sharding.PartitionSpec("x"), jax.sharding.PartitionSpec(None, None, "x")):
        out = jax.jit(lambda k: lora.dropout_keep(k, 0.2, shape)[1],
                      out_shardings=jax.sharding.NamedSharding(mesh, spec))(key)
        assert len(out.sharding.device_set) == 8
        np.testing.assert_array_equal(np.asarray(out), single)


def test_groups_need_one_adapter_and_a_module_that_forms_them():
    config = get_preset("tiny-qwen2")
    mixed = ((r"attn/q_proj/kernel$", 4, 8.0, 0.0, False, "qkv"),
             (r"attn/[kv]_proj/kernel$", 2, 4.0, 0.0, False, "qkv"))
    with pytest.raises(ValueError, match=r"group 'qkv' of language_model/layers/attn: its kernels \['q_proj', "
                                         r"'k_proj', 'v_proj'\] get different adapters"):
        abstract_params(config.replace(lora=mixed))
    with pytest.raises(ValueError, match=r"put vision/layers/fc1/kernel in the shared-A group 'mlp', but its module "
                                         r"forms no group intermediate"):
        abstract_params(config.replace(lora=((r"vision/layers/fc[12]/kernel$", 4, 8.0, 0.0, False, "mlp"),)))
    with pytest.raises(ValueError, match=r"has the name of one of its kernels"):
        abstract_params(config.replace(lora=((r"mlp/(gate|up)_proj/kernel$", 4, 8.0, 0.0, False, "up_proj"),)))


def test_merge_needs_the_group_a():
    rules = lora.preset_rules("llm", 2, family="phi3")
    params = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), abstract_params(get_preset("tiny-phi3").replace(
        lora=rules)))
    del params["language_model"]["layers"]["attn"]["qkv_proj"]
    with pytest.raises(ValueError, match=r"language_model/layers/attn/[qkv]_proj is in the LoRA shared-A group "
                                         r"'qkv_proj', but language_model/layers/attn/qkv_proj/lora_a is missing"):
        lora.merge(params, rules)


@pytest.mark.parametrize("rules", ["fsdp", "fsdp_tp"])
def test_adapters_shard_with_the_rule_presets(rules):
    config = get_preset("tiny-qwen2").replace(lora=lora.preset_rules("vit,llm", 4))
    mesh = sharding.make_mesh(1, 4, 2)
    sh = sharding.shardings(abstract_params(config, boxed=True), mesh, rules)
    a = sh["language_model"]["layers"]["mlp"]["up_proj"]["lora_a"].spec  # [layers, embed, r]
    b = sh["language_model"]["layers"]["mlp"]["up_proj"]["lora_b"].spec  # [layers, r, mlp]
    kernel = sh["language_model"]["layers"]["mlp"]["up_proj"]["kernel"].spec  # [layers, embed, mlp]
    assert tuple(a) == (None, kernel[1], None) and tuple(b)[:2] == (None, None) and tuple(b)[2:] == tuple(kernel)[2:]
    assert kernel[1] is not None  # the width is split, so A really is sharded
    grouped = sharding.shardings(abstract_params(get_preset("tiny-phi3").replace(
        lora=lora.preset_rules("llm", 4, family="phi3")), boxed=True), mesh, rules)["language_model"]["layers"]["mlp"]
    assert grouped["gate_up_proj"]["lora_a"].spec == a  # the shared A [layers, embed, r] as a member's own A
    assert grouped["up_proj"]["lora_b"].spec == b
