"""The optimiser (train/optim.py) against its specification and against PyTorch / transformers.

Tolerance: parameters after AdamW updates agree with torch.optim.AdamW (float64) to 1e-6 absolute on values of
order 1 (float32 round-off of a few updates); the schedule agrees with transformers' to 1e-6 relative (float32).
Frozen parameters are compared bit for bit.
"""

import math
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from internvl_jax.model import abstract_params
from internvl_jax.presets import get_preset
from train.optim import (
    DEFAULT_DECAY_RULES,
    HF_TRAINER_DECAY_RULES,
    OptimConfig,
    build_optimizer,
    decay_mask,
    lr_multipliers,
    opt_state_bytes,
    paths,
    schedule,
    stage_rules,
    trainable_count,
    trainable_grads,
    trainable_mask,
    warmup_steps,
)

ATOL = 1e-6  # AdamW vs torch, on parameters of order 1
RTOL_LR = 1e-6  # schedule vs transformers, float32


def random_tree(shapes, seed=0):
    """A tree of float32 normal arrays with the shapes of ``shapes`` (ShapeDtypeStructs or shape tuples)."""
    rng = np.random.default_rng(seed)
    leaf = lambda s: jnp.asarray(rng.standard_normal(getattr(s, "shape", s)), jnp.float32)  # noqa: E731
    return jax.tree.map(leaf, shapes, is_leaf=lambda s: isinstance(s, tuple))


def flat(tree) -> dict:
    return dict(zip(jax.tree.leaves(paths(tree)), jax.tree.leaves(tree)))


def bits(x) -> np.ndarray:
    return np.asarray(x).view(np.uint32)


def run_updates(cfg, params, grads_seq, total_steps):
    """params after len(grads_seq) updates, and the final optimiser state. The updates are computed under jit
    and applied outside it: inside one jitted step XLA folds ``p + 0`` to ``p``, which would hide a +0.0 update
    turning a -0.0 parameter into +0.0."""
    tx = build_optimizer(cfg, params, total_steps)
    state = tx.init(params)
    update = jax.jit(tx.update)
    for grads in grads_seq:
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
    return params, state


def state_arrays(state) -> dict:
    """keystr -> array for every non-scalar leaf of an optimiser state (the moments)."""
    return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(state)[0] if np.ndim(x)}


def tiny_qwen2():
    return abstract_params(get_preset("tiny-qwen2"))


# --------------------------------------------------------------------------------------------------------
# AdamW + clipping + schedule + groups vs torch
# --------------------------------------------------------------------------------------------------------

SHAPES = {
    "vision": {
        "embeddings": {"pos_embed": (1, 3, 4)},
        "layers": {"fc1": {"kernel": (3, 4, 5), "bias": (3, 5)}, "ls1": (3, 4)},  # 3 stacked layers
    },
    "projector": {"fc1": {"kernel": (4, 6), "bias": (6,)}},
    "language_model": {"embed_tokens": (7, 6)},
}
RULES = (("^vision/layers/", 1.0, (1, None)), ("^vision/", 0.0), ("^projector/", 0.5))
# the reference's param groups, written out: path -> (trainable layers or None for the whole array, lr
# multiplier, decayed). vision/layers slice 0 and vision/embeddings are frozen: no torch tensor at all.
GROUPS = {
    "vision/layers/fc1/kernel": ([1, 2], 1.0, True),
    "vision/layers/fc1/bias": ([1, 2], 1.0, False),
    "vision/layers/ls1": ([1, 2], 1.0, False),
    "projector/fc1/kernel": (None, 0.5, True),
    "projector/fc1/bias": (None, 0.5, False),
    "language_model/embed_tokens": (None, 1.0, True),
}


def test_adamw_updates_match_torch_adamw_with_clipping_and_hf_schedule():
    from transformers.optimization import get_cosine_schedule_with_warmup

    cfg = OptimConfig(lr=1e-2, warmup_steps=2, weight_decay=0.1, max_grad_norm=1.0, lr_rules=RULES)
    total, steps = 6, 4
    params = random_tree(SHAPES, seed=0)
    grads_seq = [jax.tree.map(lambda g: 3 * g, random_tree(SHAPES, seed=1 + t)) for t in range(steps)]

    # reference: torch AdamW on float64 copies, one tensor per trainable array or layer slice
    p0, tensors, groups = flat(params), {}, []
    for path, (layers, mult, decayed) in GROUPS.items():
        for i in layers if layers is not None else [None]:
            value = np.asarray(p0[path] if i is None else p0[path][i], np.float64)
            tensors[path, i] = torch.nn.Parameter(torch.tensor(value))
            groups.append({"params": [tensors[path, i]], "lr": cfg.lr * mult,
                           "weight_decay": cfg.weight_decay if decayed else 0.0})
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.b1, cfg.b2), eps=cfg.eps)
    sched = get_cosine_schedule_with_warmup(opt, num_warmup_steps=2, num_training_steps=total)
    clipped = []
    for grads in grads_seq:
        g = flat(grads)
        for (path, i), t in tensors.items():
            t.grad = torch.tensor(np.asarray(g[path] if i is None else g[path][i], np.float64))
        clipped.append(float(torch.nn.utils.clip_grad_norm_(list(tensors.values()), cfg.max_grad_norm)))
        opt.step()
        sched.step()
    assert min(clipped) > cfg.max_grad_norm  # clipping was active on every step

    ours = flat(run_updates(cfg, params, grads_seq, total)[0])
    for (path, i), t in tensors.items():
        got = ours[path] if i is None else ours[path][i]
        np.testing.assert_allclose(np.asarray(got), t.detach().numpy(), rtol=0, atol=ATOL, err_msg=f"{path}[{i}]")
    for path in ("vision/embeddings/pos_embed",):
        assert np.array_equal(bits(ours[path]), bits(p0[path])), path
    for path in ("vision/layers/fc1/kernel", "vision/layers/fc1/bias", "vision/layers/ls1"):
        assert np.array_equal(bits(ours[path][0]), bits(p0[path][0])), f"{path}[0]"
        assert not np.array_equal(bits(ours[path][1]), bits(p0[path][1])), f"{path}[1] did not move"


def test_lr_multipliers_scale_updates():
    cfg = OptimConfig(lr=1e-3, schedule="constant", warmup_steps=0, warmup_ratio=0.0, weight_decay=0.1,
                      max_grad_norm=1.0, lr_rules=(("^b$", 0.5), ("^c$", 2.0)))
    params = random_tree({"a": (4, 3), "b": (4, 3), "c": (4, 3)}, seed=0)
    params["b"] = params["c"] = params["a"]
    g = 3 * random_tree({"x": (4, 3)}, seed=1)["x"]
    tx = build_optimizer(cfg, params, total_steps=10)
    state = tx.init(params)
    for _ in range(2):
        updates, state = tx.update({"a": g, "b": g, "c": g}, state, params)
    u = {k: np.asarray(v) for k, v in updates.items()}
    assert np.abs(u["a"]).min() > 0.5 * cfg.lr  # Adam's step is about lr * sign(g): not a vanishing update
    assert np.array_equal(u["b"], 0.5 * u["a"]) and np.array_equal(u["c"], 2.0 * u["a"])  # exact: powers of 2


# --------------------------------------------------------------------------------------------------------
# Schedule vs transformers
# --------------------------------------------------------------------------------------------------------


def hf_lrs(make, lr, total):
    """The lr transformers' scheduler gives the optimiser at updates 0..total (stepped after each update)."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = make(opt)
    out = []
    for _ in range(total + 1):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return np.asarray(out)


@pytest.mark.parametrize("total,cfg_kw,warm", [
    (1000, dict(warmup_steps=100), 100),  # 2.5 stages 1 and 1.5
    (50, dict(warmup_ratio=0.03), 2),  # ceil(1.5)
    (7, dict(warmup_ratio=0.0), 0),
])
def test_cosine_schedule_equals_hf_at_every_step(total, cfg_kw, warm):
    from transformers import TrainingArguments
    from transformers.optimization import get_cosine_schedule_with_warmup

    cfg = OptimConfig(lr=2e-4, **cfg_kw)
    # transformers 5 folds warmup_ratio into a fractional warmup_steps; same ceil(total * ratio) rule
    hf_warm = TrainingArguments.get_warmup_steps(
        SimpleNamespace(warmup_steps=cfg.warmup_steps or cfg.warmup_ratio), total)
    assert warmup_steps(cfg, total) == hf_warm == warm
    want = hf_lrs(lambda o: get_cosine_schedule_with_warmup(o, warm, total), cfg.lr, total)
    got = np.asarray(schedule(cfg, total)(jnp.arange(total + 1)))
    np.testing.assert_allclose(got, want, rtol=RTOL_LR, atol=1e-12)
    assert got[-1] == 0.0 and (warm == 0 or got[0] == 0.0)


def test_min_lr_and_constant_schedules_equal_hf():
    from transformers.optimization import get_constant_schedule_with_warmup, get_cosine_with_min_lr_schedule_with_warmup

    total = 40
    cfg = OptimConfig(lr=1e-3, warmup_steps=5, min_lr_ratio=0.1)
    want = hf_lrs(lambda o: get_cosine_with_min_lr_schedule_with_warmup(o, 5, total, min_lr_rate=0.1), cfg.lr, total)
    np.testing.assert_allclose(np.asarray(schedule(cfg, total)(jnp.arange(total + 1))), want, rtol=RTOL_LR)
    cfg = OptimConfig(lr=1e-3, warmup_steps=5, schedule="constant")
    want = hf_lrs(lambda o: get_constant_schedule_with_warmup(o, 5), cfg.lr, total)
    np.testing.assert_allclose(np.asarray(schedule(cfg, total)(jnp.arange(total + 1))), want, rtol=RTOL_LR)
    # past the end the cosine holds its minimum
    assert float(schedule(OptimConfig(lr=1.0), 10)(15)) == 0.0


# --------------------------------------------------------------------------------------------------------
# Decay masks
# --------------------------------------------------------------------------------------------------------

# the spec of DEFAULT_DECAY_RULES on tiny-qwen2: exactly these decay (kernels, the token table, the head)
DECAYED_TINY_QWEN2 = {
    "vision/embeddings/patch_kernel",
    "vision/layers/attn/qkv/kernel",
    "vision/layers/attn/proj/kernel",
    "vision/layers/fc1/kernel",
    "vision/layers/fc2/kernel",
    "projector/fc1/kernel",
    "projector/fc2/kernel",
    "language_model/embed_tokens",
    "language_model/layers/attn/q_proj/kernel",
    "language_model/layers/attn/k_proj/kernel",
    "language_model/layers/attn/v_proj/kernel",
    "language_model/layers/attn/o_proj/kernel",
    "language_model/layers/mlp/gate_proj/kernel",
    "language_model/layers/mlp/up_proj/kernel",
    "language_model/layers/mlp/down_proj/kernel",
    "language_model/lm_head/kernel",
}
# and these do not: biases, norms, the position table, the class token, LayerScale
NOT_DECAYED_TINY_QWEN2 = {
    "vision/embeddings/cls_token", "vision/embeddings/pos_embed", "vision/embeddings/patch_bias",
    "vision/layers/attn/qkv/bias", "vision/layers/attn/proj/bias", "vision/layers/fc1/bias", "vision/layers/fc2/bias",
    "vision/layers/ls1", "vision/layers/ls2",
    "vision/layers/norm1/scale", "vision/layers/norm1/bias", "vision/layers/norm2/scale", "vision/layers/norm2/bias",
    "projector/norm/scale", "projector/norm/bias", "projector/fc1/bias", "projector/fc2/bias",
    "language_model/layers/attn/q_proj/bias", "language_model/layers/attn/k_proj/bias",
    "language_model/layers/attn/v_proj/bias", "language_model/layers/input_norm/scale",
    "language_model/layers/post_attn_norm/scale", "language_model/norm/scale",
}


def decayed_paths(cfg, params) -> set:
    return {p for p, d in zip(jax.tree.leaves(paths(params)), jax.tree.leaves(decay_mask(cfg, params))) if d}


def test_default_decay_mask_on_tiny_qwen2():
    params = tiny_qwen2()
    assert set(jax.tree.leaves(paths(params))) == DECAYED_TINY_QWEN2 | NOT_DECAYED_TINY_QWEN2
    assert decayed_paths(OptimConfig(), params) == DECAYED_TINY_QWEN2


def test_default_decay_mask_skips_qk_norms():
    for preset, extra in (("tiny-vit6b", "vision/layers/attn/{}_norm/scale"),
                          ("tiny-qwen3", "language_model/layers/attn/{}_norm/scale")):
        params = abstract_params(get_preset(preset))
        names = set(jax.tree.leaves(paths(params)))
        for part in ("q", "k"):
            assert extra.format(part) in names and extra.format(part) not in decayed_paths(OptimConfig(), params)
        assert decayed_paths(OptimConfig(), params) <= DECAYED_TINY_QWEN2


def hf_path(layout, name: str, family: str = "qwen2") -> str:
    """A transformers parameter name -> our parameter path, through convert's key map."""
    key = layout.canonical(name)
    for rule in layout.rules:
        m = rule.pattern.fullmatch(key)
        if m and rule.applies_to(family):
            return rule.target.replace("{part}", m["part"]) if "{part}" in rule.target else rule.target
    raise KeyError(name)


@pytest.mark.parametrize("vision,preset", [("layernorm_bias", "tiny-qwen2"), ("rmsnorm_qknorm", "tiny-vit6b")])
def test_hf_trainer_decay_rules_equal_transformers_trainer(vision, preset):
    from reference import tiny_internvl
    from transformers import Trainer

    from convert.keymaps import HF

    model = tiny_internvl("qwen2", vision)
    decayed = set(Trainer.get_decay_parameter_names(None, model))  # reads nothing of the trainer
    want = {}
    for name, _ in model.named_parameters():
        want.setdefault(hf_path(HF, name), set()).add(name in decayed)
    assert all(len(v) == 1 for v in want.values()), want  # the torch tensors fused into one array agree
    params = abstract_params(get_preset(preset))
    assert set(want) == set(jax.tree.leaves(paths(params)))
    got = decayed_paths(OptimConfig(decay_rules=HF_TRAINER_DECAY_RULES), params)
    assert got == {p for p, v in want.items() if v == {True}}


# --------------------------------------------------------------------------------------------------------
# Freezing
# --------------------------------------------------------------------------------------------------------


def test_mlp_only_stage_freezes_everything_else_bit_identical_and_holds_projector_moments_only():
    cfg = OptimConfig(lr=1e-2, warmup_steps=0, warmup_ratio=0.0,
                      lr_rules=stage_rules(freeze_backbone=True, freeze_llm=True))
    abstract = tiny_qwen2()
    params = random_tree(abstract, seed=0)
    params["vision"]["layers"]["ls1"] = params["vision"]["layers"]["ls1"].at[0, 0].set(-0.0)  # keeps its sign bit
    grads_seq = [random_tree(abstract, seed=1 + t) for t in range(3)]
    new, state = run_updates(cfg, params, grads_seq, total_steps=10)

    before, after = flat(params), flat(new)
    for path in before:
        same = np.array_equal(bits(after[path]), bits(before[path]))
        assert same == (not path.startswith("projector/")), path
    moments = state_arrays(state)
    assert moments and all("['projector']" in k for k in moments)
    projector_paths = {p for p in before if p.startswith("projector/")}
    for moment in ("mu", "nu"):  # one moment per projector parameter, named by its path
        keys = {k.split(f".{moment}")[1] for k in moments if f".{moment}[" in k}
        assert keys == {"".join(f"['{part}']" for part in p.split("/")) for p in projector_paths}
    projector_bytes = sum(x.size * 4 for x in jax.tree.leaves(abstract["projector"]))
    assert sum(x.nbytes for x in moments.values()) == 2 * projector_bytes  # mu and nu of the projector alone
    assert opt_state_bytes(cfg, abstract) == 2 * projector_bytes + 2 * 4  # + the Adam and schedule counts
    assert opt_state_bytes(cfg, abstract_params(get_preset("tiny-qwen2"), boxed=True)) == 2 * projector_bytes + 8
    assert trainable_count(cfg, abstract) == projector_bytes // 4
    assert trainable_mask(cfg, abstract) == jax.tree.map(lambda p: p.startswith("projector/"), paths(abstract))


@pytest.mark.parametrize("k", [-1, 1])
def test_unfreeze_vit_layers_on_a_two_layer_stack(k):
    # 2 layers: layers[-1:] and layers[1:] are both the last layer
    cfg = OptimConfig(lr=1e-2, warmup_steps=0, warmup_ratio=0.0, lr_rules=stage_rules(
        freeze_backbone=True, freeze_mlp=True, freeze_llm=True, unfreeze_vit_layers=k))
    abstract = tiny_qwen2()
    params = random_tree(abstract, seed=0)
    params["vision"]["layers"]["ls1"] = params["vision"]["layers"]["ls1"].at[0, 0].set(-0.0)  # in a frozen slice
    new, state = run_updates(cfg, params, [random_tree(abstract, seed=1 + t) for t in range(3)], total_steps=10)

    before, after = flat(params), flat(new)
    for path in before:
        if path.startswith("vision/layers/"):
            assert np.array_equal(bits(after[path][0]), bits(before[path][0])), f"{path}[0] moved"
            assert not np.array_equal(bits(after[path][1]), bits(before[path][1])), f"{path}[1] did not move"
        else:
            assert np.array_equal(bits(after[path]), bits(before[path])), path
    # the partly frozen stacks keep full-size moments; nothing else holds any
    moments = state_arrays(state)
    n_stacked = sum(p.startswith("vision/layers/") for p in before)
    assert len(moments) == 2 * n_stacked and all("['vision']['layers']" in key for key in moments)
    layer_bytes = sum(x.size * 4 for x in jax.tree.leaves(abstract["vision"]["layers"]))
    assert trainable_count(cfg, abstract) * 4 == layer_bytes // 2
    # the gradients the clipping norm sees: the frozen slice and the frozen parameters zeroed, the rest as given
    grads = random_tree(abstract, seed=9)
    kept = flat(trainable_grads(cfg, abstract, grads))
    for path, g in flat(grads).items():
        if path.startswith("vision/layers/"):
            assert not np.any(kept[path][0]) and np.array_equal(kept[path][1], g[1]), path
        else:
            assert not np.any(kept[path]), path


def test_unfreeze_vit_layers_selects_layers_k_onwards():
    shapes = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, jnp.float32), {
        "vision": {"embeddings": {"pos_embed": (1, 5, 4)}, "layers": {"fc1": {"kernel": (3, 4, 4)}}},
        "projector": {"fc1": {"kernel": (4, 4)}}}, is_leaf=lambda s: isinstance(s, tuple))

    def per_layer(**flags):
        m = lr_multipliers(OptimConfig(lr_rules=stage_rules(**flags)), shapes)
        return np.broadcast_to(m["vision"]["layers"]["fc1"]["kernel"], (3,)).tolist(), m["vision"]["embeddings"]

    assert per_layer(freeze_backbone=True, unfreeze_vit_layers=-1) == ([0, 0, 1], {"pos_embed": 0.0})
    assert per_layer(freeze_backbone=True, unfreeze_vit_layers=1) == ([0, 1, 1], {"pos_embed": 0.0})
    assert per_layer(freeze_backbone=True, unfreeze_vit_layers=-3) == ([1, 1, 1], {"pos_embed": 0.0})
    assert per_layer(freeze_backbone=True) == ([0, 0, 0], {"pos_embed": 0.0})
    assert per_layer(unfreeze_vit_layers=1) == ([1, 1, 1], {"pos_embed": 1.0})  # no-op without freeze_backbone


def test_unfreeze_lm_head_trains_the_head_or_the_tied_table():
    params = tiny_qwen2()
    untied = trainable_mask(OptimConfig(lr_rules=stage_rules(freeze_llm=True, unfreeze_lm_head=True)), params)
    assert untied["language_model"]["lm_head"]["kernel"] and not untied["language_model"]["embed_tokens"]
    assert not any(jax.tree.leaves(untied["language_model"]["layers"]))
    tied_params = {"language_model": {k: v for k, v in params["language_model"].items() if k != "lm_head"}}
    tied = trainable_mask(OptimConfig(
        lr_rules=stage_rules(freeze_llm=True, unfreeze_lm_head=True, tied_head=True)), tied_params)
    assert tied["language_model"]["embed_tokens"] and not tied["language_model"]["norm"]["scale"]


def test_bad_rules_are_clear_errors():
    with pytest.raises(ValueError, match=r"lr_rules\[0\].*multiplier"):
        OptimConfig(lr_rules=(("^vision/", -1.0),))
    with pytest.raises(ValueError, match=r"lr_rules\[0\].*regex"):
        OptimConfig(lr_rules=(("(", 1.0),))
    with pytest.raises(ValueError, match=r"lr_rules must hold tuples"):
        OptimConfig(lr_rules=(["^vision/", 0.0],))
    with pytest.raises(ValueError, match=r"decay_rules\[0\]"):
        OptimConfig(decay_rules=(("bias$", "no"),))
    with pytest.raises(ValueError, match=r"schedule"):
        OptimConfig(schedule="linear")
    cfg = OptimConfig(lr_rules=(("^vision/embeddings/", 0.0, (1, None)),))
    with pytest.raises(ValueError, match=r"selects layers \(1, None\) but parameter 'vision/embeddings/.*not stacked"):
        lr_multipliers(cfg, tiny_qwen2())
    with pytest.warns(UserWarning, match="match no parameter"):
        lr_multipliers(OptimConfig(lr_rules=(("^visoin/", 0.0),)), tiny_qwen2())


def test_config_is_hashable_and_defaults_follow_the_original():
    cfg = OptimConfig()
    hash(cfg)
    assert (cfg.b1, cfg.b2, cfg.eps, cfg.max_grad_norm, cfg.weight_decay, cfg.warmup_ratio, cfg.min_lr_ratio) == (
        0.9, 0.999, 1e-8, 1.0, 0.05, 0.03, 0.0)
    assert cfg.decay_rules == DEFAULT_DECAY_RULES and math.isclose(float(schedule(cfg, 100)(100)), 0.0)
