"""LoRA against PEFT (pinned in requirements-test.txt) on the tiny transformers InternVL of ``reference.py``
(qwen2 text, InternViT-300M style vision, images in every row), float32.

- PEFT's ``LoraConfig`` on the ViT's q/k/v_proj, projection_layer, fc1, fc2 and the LLM's q/k/v/o/gate/up/down
  projections (r 4, alpha 8, random A and B: a zero B would hide the low-rank path); PEFT saves the adapter, ours
  loads it onto the converted base (``convert.peft``): logits; gradients of the token-mean cross-entropy for
  every adapter tensor; one AdamW step (torch ``AdamW`` on the adapters, ours ``train.step`` + ``train.optim``
  with the base frozen): adapters after it, the base bit-identical, no optimizer state for the base (counted).
- Our adapters after that step saved in PEFT format load into PEFT: logits.
- The original's fused ViT qkv adapter (our ``vit`` preset) saved in PEFT format and as merged safetensors
  (``hf`` layout) reload in PyTorch with the logits of ours unmerged; the ``original`` layout export holds the
  same merged kernels.
- Phi-3 (transformers' fused ``qkv_proj`` and ``gate_up_proj``): PEFT on qkv_proj, o_proj, gate_up_proj, down_proj
  loads into ours as shared-A groups (our ``llm`` preset's layout for phi3, PEFT's count of adapter scalars) with
  the same logits, gradients and AdamW step; ours saved loads into PEFT; the merged hf export equals ours
  unmerged in transformers.

Tolerances are stated once, here.
"""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from convert.export import export_checkpoint
from convert.load import load_pretrained
from convert.peft import from_peft_tensors, load_adapter, load_with_adapter, save_adapter, to_peft_tensors
from internvl_jax import lora
from internvl_jax.model import InternVL, _dummy_inputs, abstract_params
from reference import image_batch, max_diff, tiny_internvl
from train import optim
from train.loss import IGNORE
from train.state import TrainState
from train.step import make_train_step

TOL_LOGITS = 1e-4  # max abs difference of logits
TOL_GRAD = 1e-4  # per tensor: max |ours - torch| / max |torch|
TOL_PARAMS = 1e-5  # max abs difference of the adapters after one AdamW step
TOL_MERGE = 1e-6  # merged kernels computed twice from the same adapters, max abs

R, ALPHA = 4, 8
TARGETS = (r".*(vision_tower.*\.(q_proj|k_proj|v_proj|projection_layer|fc1|fc2)"
           r"|language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj))$")
OPTIM = optim.OptimConfig(lr=1e-2, warmup_steps=0, warmup_ratio=0.0, schedule="constant", weight_decay=0.05,
                          max_grad_norm=0.0, lr_rules=((r"/lora_[ab]$", 1.0), (r".", 0.0)))
L = 20


def _torch_logits(model, ids, pixels):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids, dtype=torch.long), pixel_values=pixels).logits.numpy()


def _ours_logits(config, params, ids, pixels, mask):
    return np.asarray(jax.jit(lambda p: InternVL(config).apply({"params": p}, ids, pixels, mask))(params))


def _assert_peft_logits(peft, text, lconfig, params, inputs, label):
    """PEFT's logits (eval mode) equal ours within TOL_LOGITS, and differ from the adapter-free model's."""
    ids, torch_pixels, pixels, mask = inputs
    peft.eval()
    want = _torch_logits(peft, ids, torch_pixels)
    got = _ours_logits(lconfig, params, ids, pixels, mask)
    print(f"{label}PEFT -> ours logits max abs diff {max_diff(got, want):.2e}")
    assert max_diff(got, want) <= TOL_LOGITS, max_diff(got, want)
    assert max_diff(want, _torch_logits(tiny_internvl(text), ids, torch_pixels)) > 0.05  # adapters matter


def _saved_base(folder, text):
    """The tiny transformers InternVL with a ``text`` LLM saved to ``folder/base`` and loaded by ours; the inputs:
    (folder, our config, our base params, (ids, torch pixels, our pixels, tile mask))."""
    tiny_internvl(text).save_pretrained(folder / "base")
    model, base = load_pretrained(str(folder / "base"))
    return folder, model.config, base, image_batch([[1], [2]], L, 2, seed=1)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return _saved_base(tmp_path_factory.mktemp("lora_peft"), "qwen2")


def _peft_model(adapter=None, *, text="qwen2", targets=TARGETS):
    """PEFT on the tiny transformers InternVL with a ``text`` LLM: the saved ``adapter`` folder, or a new LoRA on
    ``targets`` with random A and B (a zero B would hide the low-rank path)."""
    from peft import LoraConfig, PeftModel, get_peft_model

    base = tiny_internvl(text)  # the same seed: the same base as the saved one
    if adapter is not None:
        return PeftModel.from_pretrained(base, str(adapter)).eval()
    torch.manual_seed(5)
    return get_peft_model(base, LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=targets,
                                           init_lora_weights=False))


def _worst(ours, theirs, relative):
    flat = dict(jax.tree_util.tree_flatten_with_path(ours)[0])
    worst = (0.0, "")
    for path, b in jax.tree_util.tree_flatten_with_path(theirs)[0]:
        err = max_diff(flat[path], b) / (float(np.max(np.abs(b))) if relative else 1.0)
        worst = max(worst, (err, jax.tree_util.keystr(path)))
    return worst


def _torch_adamw_step(peft, ids, torch_pixels):
    """The token-mean cross-entropy on PEFT's adapters (the base frozen): (loss, {module weight name: gradient},
    {name: value after one torch AdamW step}) in PEFT's key names."""
    peft.train()  # dropout is 0: train mode changes nothing else here
    lora_params = {n: p for n, p in peft.named_parameters() if "lora_" in n}
    assert all(p.requires_grad for p in lora_params.values())
    assert not any(p.requires_grad for n, p in peft.named_parameters() if "lora_" not in n)
    opt = torch.optim.AdamW(lora_params.values(), lr=OPTIM.lr, betas=(OPTIM.b1, OPTIM.b2), eps=OPTIM.eps,
                            weight_decay=OPTIM.weight_decay)
    logits = peft(input_ids=torch.tensor(ids, dtype=torch.long), pixel_values=torch_pixels).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                             torch.tensor(ids[:, 1:], dtype=torch.long).reshape(-1))
    loss.backward()
    named = lambda what: {n.replace(".default", ""): what(p) for n, p in lora_params.items()}  # noqa: E731
    grads = named(lambda p: p.grad.numpy().copy())
    opt.step()
    peft.eval()
    return loss.item(), grads, named(lambda p: p.detach().numpy().copy())


def _ours_adamw_step(config, params, ids, pixels, mask):
    """Ours on the same loss: the train step with the base frozen; a probe before the optimiser keeps the
    gradients. Returns (state after the step, its metrics, the adapters' gradients)."""
    labels = np.concatenate([ids[:, 1:], np.full((2, 1), IGNORE)], axis=1).astype(np.int32)
    batch = {"input_ids": ids, "labels": labels, "loss_weights": (labels != IGNORE).astype(np.float32),
             "pixel_values": pixels, "tile_mask": mask}
    inner = optim.build_optimizer(OPTIM, params, 1)
    tx = __import__("optax").chain(optax_probe(), inner)
    step = make_train_step(InternVL(config), tx, trainable=optim.trainable_mask(OPTIM, params), vocab_chunk=None)
    state, metrics = jax.jit(step)(TrainState.create(params, tx, jax.random.PRNGKey(0)), batch)
    return state, metrics, lora.adapters_of(state.opt_state[0])


def _assert_same_step(peft, config, lconfig, params, inputs, peft_cfg):
    """One step of torch (PEFT) and of ours from the same adapters: the loss, every adapter gradient (relative),
    the adapters after AdamW, and the frozen base bit-identical with no optimizer state. Returns our state."""
    ids, torch_pixels, pixels, mask = inputs
    loss, grads, after = _torch_adamw_step(peft, ids, torch_pixels)
    torch_grads = from_peft_tensors(grads, peft_cfg, config, rules=lconfig.lora)[1]
    torch_after = from_peft_tensors(after, peft_cfg, config, rules=lconfig.lora)[1]
    state, metrics, ours = _ours_adamw_step(lconfig, params, ids, pixels, mask)
    assert abs(float(metrics["loss"]) - loss) <= 1e-5 * loss
    err, where = _worst(ours, torch_grads, relative=True)
    print(f"adapter gradients: worst relative error {err:.2e} ({where})")
    assert err <= TOL_GRAD, (err, where)
    err, where = _worst(lora.adapters_of(state.params), torch_after, relative=False)
    print(f"adapters after one AdamW step: max abs diff {err:.2e} ({where})")
    assert err <= TOL_PARAMS, (err, where)
    # the base: bit-identical, no optimizer state (Adam's two moments for the adapters only, plus two counts)
    frozen = lambda t: lora.partition(t, lambda p: not lora.is_adapter_path(p))[0]  # noqa: E731
    for path, x in jax.tree_util.tree_flatten_with_path(frozen(state.params))[0]:
        np.testing.assert_array_equal(np.asarray(x), np.asarray(_dig(params, path)), err_msg=jax.tree_util.keystr(path))
    scalars = lora.count(state.opt_state[1])
    assert scalars == 2 * lora.count(lora.adapters_of(params)) + 2, scalars
    return state


def test_peft_parity_logits_grads_adamw_and_round_trip(setup):
    folder, config, base, (ids, torch_pixels, pixels, mask) = setup
    peft = _peft_model()
    peft.save_pretrained(folder / "peft")
    lconfig, adapters = load_adapter(str(folder / "peft"), config)
    qkv_rule = lora.adapter_for(lconfig.lora, "vision/layers/attn/qkv/kernel")
    assert qkv_rule.split and qkv_rule.rank == R and qkv_rule.scale == ALPHA / R  # PEFT's q/k/v each have an A
    params = lora.combine(base, jax.tree.map(jnp.asarray, adapters))

    _assert_peft_logits(peft, "qwen2", lconfig, params, (ids, torch_pixels, pixels, mask), "")

    # gradients, one AdamW step; the base frozen
    peft_cfg = json.loads((folder / "peft" / "adapter_config.json").read_text())
    state = _assert_same_step(peft, config, lconfig, params, (ids, torch_pixels, pixels, mask), peft_cfg)
    state_scalars = lora.count(state.opt_state[1])
    assert lora.count(lora.adapters_of(params)) < lora.count(base) / 10

    # our adapters after the step, saved in PEFT's format, load into PEFT
    save_adapter(state.params, lconfig, str(folder / "ours"))
    reloaded = _peft_model(folder / "ours")
    ours_now = _ours_logits(lconfig, state.params, ids, pixels, mask)
    print(f"ours -> PEFT logits max abs diff {max_diff(_torch_logits(reloaded, ids, torch_pixels), ours_now):.2e}; "
          f"optimizer state {state_scalars} scalars for {lora.count(lora.adapters_of(params))} adapter and "
          f"{lora.count(base)} base scalars")
    assert max_diff(_torch_logits(reloaded, ids, torch_pixels), ours_now) <= TOL_LOGITS


def optax_probe():
    """A transformation whose state is the last gradients it saw (the tree the optimiser is fed)."""
    import optax

    return optax.GradientTransformation(lambda p: jax.tree.map(jnp.zeros_like, p), lambda u, s, p=None: (u, u))


def _dig(tree, path):
    for k in path:
        tree = tree[k.key]
    return tree


@pytest.fixture(scope="module")
def fused_adapter(setup):
    """The original's target set (one adapter on the ViT's fused qkv, the LLM's projections) with random B, saved
    in PEFT's format to ``<folder>/fused``: (config, adapters, base + adapters)."""
    folder, config, base, _ = setup
    fused = config.replace(lora=lora.preset_rules("vit,llm", R, alpha=ALPHA))
    init = jax.jit(lambda k: lora.adapters_of(nn.unbox(InternVL(fused).init(k, *_dummy_inputs(fused))["params"])))(
        jax.random.PRNGKey(7))
    key = jax.random.PRNGKey(8)
    adapters = jax.tree_util.tree_map_with_path(
        lambda p, x: 0.2 * jax.random.normal(jax.random.fold_in(key, len(jax.tree_util.keystr(p))), x.shape)
        if p[-1].key == "lora_b" else x, init)
    params = lora.combine(base, adapters)
    save_adapter(params, fused, str(folder / "fused"))
    return fused, adapters, params


def test_fused_qkv_adapter_exports_to_peft_and_merged_safetensors(setup, fused_adapter):
    """The original's target set (one adapter on the ViT's fused qkv) with random B: the PEFT export (q/k/v sharing
    A) in PEFT, the merged hf-layout export in transformers, and ours unmerged give the same logits."""
    from transformers import InternVLForConditionalGeneration

    folder, config, base, (ids, torch_pixels, pixels, mask) = setup
    fused, adapters, params = fused_adapter
    ours = _ours_logits(fused, params, ids, pixels, mask)

    tensors, _ = to_peft_tensors(params, fused)
    a = [tensors[f"base_model.model.model.vision_tower.encoder.layer.0.attention.{p}_proj.lora_A.weight"] for p in "qkv"]
    assert np.array_equal(a[0], a[1]) and np.array_equal(a[0], a[2])
    peft = _peft_model(folder / "fused")
    print(f"fused qkv: ours -> PEFT logits {max_diff(_torch_logits(peft, ids, torch_pixels), ours):.2e}")
    assert max_diff(_torch_logits(peft, ids, torch_pixels), ours) <= TOL_LOGITS
    assert load_adapter(str(folder / "fused"), config)[0].lora[0][4] is False  # shared A: loads back fused

    merged = lora.merge(params, fused.lora)
    export_checkpoint(merged, config, str(folder / "merged_hf"), layout="hf")
    torch_merged = InternVLForConditionalGeneration.from_pretrained(str(folder / "merged_hf")).eval()
    print(f"merged hf export in transformers vs ours unmerged {max_diff(_torch_logits(torch_merged, ids, torch_pixels), ours):.2e}")
    assert max_diff(_torch_logits(torch_merged, ids, torch_pixels), ours) <= TOL_LOGITS
    export_checkpoint(merged, config, str(folder / "merged_original"), layout="original")
    reread = load_pretrained(str(folder / "merged_original"))[1]
    for path, x in jax.tree_util.tree_flatten_with_path(merged)[0]:
        np.testing.assert_array_equal(np.asarray(_dig(reread, path)), np.asarray(x))
    assert not os.path.exists(folder / "merged_original" / "adapter_config.json")
    # the serving path of chat --adapter [--merge]: the same adapters unmerged, the same kernels merged
    model, unmerged = load_with_adapter(str(folder / "base"), str(folder / "fused"))
    assert model.config.lora and lora.count(lora.adapters_of(unmerged)) == lora.count(adapters)
    model, merged_again = load_with_adapter(str(folder / "base"), str(folder / "fused"), merge=True)
    assert not model.config.lora
    for path, x in jax.tree_util.tree_flatten_with_path(merged)[0]:
        np.testing.assert_allclose(np.asarray(_dig(merged_again, path)), np.asarray(x), rtol=0, atol=TOL_MERGE)


def test_generate_with_an_adapter_unmerged_and_merged_on_a_mesh(setup, fused_adapter):
    """``load_with_adapter(mesh=)``, the serving path of ``chat --adapter [--merge]`` on 8 devices: every adapter in
    the sharding the fsdp rules give its logical axes, merged kernels in their kernel's; greedy generation with the
    adapters unmerged, merged, and unmerged on the host gives the same tokens."""
    import sharding
    from internvl_jax.generate import generate

    folder, _, _, (ids, _, pixels, mask) = setup
    mesh = sharding.make_mesh(1, 8, 1)
    args = (str(folder / "base"), str(folder / "fused"))
    model, unmerged = load_with_adapter(*args, mesh=mesh)
    want = sharding.shardings(lora.adapters_of(abstract_params(model.config, boxed=True)), mesh, "fsdp")
    placed = jax.tree_util.tree_leaves(lora.adapters_of(unmerged))
    assert len(placed) == len(jax.tree_util.tree_leaves(want)) > 0
    for x, s in zip(placed, jax.tree_util.tree_leaves(want)):
        assert x.sharding.is_equivalent_to(s, x.ndim)
    assert any(not x.sharding.is_fully_replicated for x in placed)
    merged_model, merged = load_with_adapter(*args, mesh=mesh, merge=True)
    kernel = merged["language_model"]["layers"]["attn"]["q_proj"]["kernel"]
    assert kernel.sharding.is_equivalent_to(unmerged["language_model"]["layers"]["attn"]["q_proj"]["kernel"].sharding,
                                            kernel.ndim)
    host_model, host = load_with_adapter(*args)
    tokens = [np.asarray(generate(m, p, input_ids=ids, pixel_values=pixels, tile_mask=mask, max_new_tokens=6))
              for m, p in ((model, unmerged), (merged_model, merged), (host_model, host))]
    np.testing.assert_array_equal(tokens[0], tokens[1])
    np.testing.assert_array_equal(tokens[0], tokens[2])


PHI3_TARGETS = r".*language_model.*\.(qkv_proj|o_proj|gate_up_proj|down_proj)$"  # the original's Phi-3 set


@pytest.fixture(scope="module")
def phi3(tmp_path_factory):
    return _saved_base(tmp_path_factory.mktemp("lora_peft_phi3"), "phi3")


def _layout(tree):
    return {jax.tree_util.keystr(p): np.shape(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_phi3_fused_modules_as_shared_a_groups(phi3):
    """PEFT on transformers' Phi-3 adapts the fused ``qkv_proj`` and ``gate_up_proj`` (one lora_A for q, k and v;
    for gate and up): ours loads them as shared-A groups, the layout of our ``llm`` preset for phi3 with PEFT's
    count of adapter scalars; logits, gradients and one AdamW step as PEFT's; ours saved loads in PEFT; the merged
    hf export reloaded in transformers gives ours unmerged."""
    from transformers import InternVLForConditionalGeneration

    folder, config, base, inputs = phi3
    ids, torch_pixels, pixels, mask = inputs
    peft = _peft_model(text="phi3", targets=PHI3_TARGETS)
    peft.save_pretrained(folder / "peft")
    lconfig, adapters = load_adapter(str(folder / "peft"), config)
    preset = config.replace(lora=lora.preset_rules("llm", R, ALPHA, family="phi3"))
    assert _layout(adapters) == _layout(lora.adapters_of(abstract_params(preset)))
    assert lora.count(adapters) == sum(p.numel() for n, p in peft.named_parameters() if "lora_" in n)
    assert {lora.adapter_for(lconfig.lora, f"language_model/layers/{k}/kernel").group
            for k in ("attn/q_proj", "attn/k_proj", "attn/v_proj", "mlp/gate_proj", "mlp/up_proj")} == {
        "qkv_proj", "gate_up_proj"}
    params = lora.combine(base, jax.tree.map(jnp.asarray, adapters))

    _assert_peft_logits(peft, "phi3", lconfig, params, inputs, "phi3: ")

    peft_cfg = json.loads((folder / "peft" / "adapter_config.json").read_text())
    state = _assert_same_step(peft, config, lconfig, params, inputs, peft_cfg)

    save_adapter(state.params, lconfig, str(folder / "ours"))
    saved = json.loads((folder / "ours" / "adapter_config.json").read_text())["target_modules"]
    assert {n.rsplit(".", 1)[-1] for n in saved} == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
    ours_now = _ours_logits(lconfig, state.params, ids, pixels, mask)
    reloaded = _torch_logits(_peft_model(folder / "ours", text="phi3"), ids, torch_pixels)
    print(f"phi3: ours -> PEFT logits max abs diff {max_diff(reloaded, ours_now):.2e}")
    assert max_diff(reloaded, ours_now) <= TOL_LOGITS

    export_checkpoint(lora.merge(state.params, lconfig.lora), config, str(folder / "merged"), layout="hf")
    merged = _torch_logits(InternVLForConditionalGeneration.from_pretrained(str(folder / "merged")).eval(), ids,
                           torch_pixels)
    print(f"phi3: merged hf export in transformers vs ours unmerged {max_diff(merged, ours_now):.2e}")
    assert max_diff(merged, ours_now) <= TOL_LOGITS

    # q/k/v adapted separately have no form on the one torch Linear: a clear error, not a wrong file
    separate = config.replace(lora=lora.preset_rules("llm", R, ALPHA))
    zeros = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), abstract_params(separate))
    with pytest.raises(ValueError, match=r"attn/[qkv]_proj/kernel holds rows of the fused torch Linear .*qkv_proj.*"
                                         r"shared-A group \(rule group 'qkv_proj'"):
        to_peft_tensors(zeros, separate)


def _module_tree(tensors: dict) -> torch.nn.Module:
    """A torch module tree named as the original checkpoint ``tensors`` ({state-dict key: tensor}) are: an
    ``nn.Linear`` at every 2-D ``*.weight`` (with its ``*.bias``), every other tensor a parameter of its module. PEFT
    wraps it by module names, as it wraps the original ``InternVLChatModel``, whose module names these keys are."""
    root = torch.nn.Module()

    def node(path):
        m = root
        for k in path:
            if k not in m._modules:
                m.add_module(k, torch.nn.Module())
            m = m._modules[k]
        return m

    linear = {key[: -len(".weight")] for key, t in tensors.items() if key.endswith(".weight") and t.ndim == 2}
    for name in sorted(linear):
        w, b = tensors[name + ".weight"], tensors.get(name + ".bias")
        module = torch.nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
        module.weight.data = w.clone()
        if b is not None:
            module.bias.data = b.clone()
        *path, leaf = name.split(".")
        node(path).add_module(leaf, module)
    for key, t in tensors.items():
        name, leaf = key.rsplit(".", 1)
        if name not in linear:
            node(name.split(".")).register_parameter(leaf, torch.nn.Parameter(t.clone()))
    return root


# per family, the original checkpoint's fused torch Linears that the llm preset's shared-A groups become
ORIGINAL_FUSED = {"internlm2": ("attention.wqkv",), "phi3": ("self_attn.qkv_proj", "mlp.gate_up_proj")}


@pytest.mark.parametrize("family", sorted(ORIGINAL_FUSED))
def test_adapters_in_the_original_models_names(tmp_path, family):
    """Ours on an InternLM2 / Phi-3 InternVL (vit, llm and projector presets, random B) saved in PEFT's format with
    the original InternVLChatModel's module names (``layout="original"``: ``attn.qkv``, ``mlp1.1``; InternLM2's
    ``attention.wqkv`` with the shared-A group, ``attention.wo``, ``feed_forward.w1``; Phi-3's ``qkv_proj`` and
    ``gate_up_proj``): PEFT on a module tree of the original checkpoint's names takes every tensor of the file,
    and its merge equals our merged original-layout export (other tensors bit for bit); loaded back (the layout
    found from the names) it is the same adapters and rules. A split ViT qkv adapter has no form on the one
    ``attn.qkv``."""
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict
    from safetensors.numpy import load_file

    from original_layout import original_checkpoint

    _, tensors = original_checkpoint(family, tmp_path / "base")
    model, base = load_pretrained(str(tmp_path / "base"))
    config = model.config
    lconfig = config.replace(lora=lora.preset_rules("vit,llm,projector", R, ALPHA, family=family))
    fresh = lora.adapters_of(nn.unbox(jax.jit(lambda k: InternVL(lconfig).init(k, *_dummy_inputs(lconfig)))(
        jax.random.PRNGKey(3))["params"]))
    noise = jax.random.PRNGKey(4)
    adapters = jax.tree_util.tree_map_with_path(  # a zero B would hide the low-rank path
        lambda p, x: 0.2 * jax.random.normal(jax.random.fold_in(noise, len(jax.tree_util.keystr(p))), x.shape)
        if p[-1].key == "lora_b" else x, fresh)
    params = lora.combine(base, adapters)

    save_adapter(params, lconfig, str(tmp_path / "peft"), layout="original")
    written = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    for fused in ORIGINAL_FUSED[family]:
        assert f"base_model.model.language_model.model.layers.0.{fused}.lora_A.weight" in written
    assert "base_model.model.vision_model.encoder.layers.0.attn.qkv.lora_A.weight" in written
    peft = PeftModel.from_pretrained(_module_tree(tensors), str(tmp_path / "peft"))
    taken = get_peft_model_state_dict(peft)
    assert taken.keys() == written.keys()
    for key, x in written.items():
        np.testing.assert_array_equal(taken[key].numpy(), x, err_msg=key)

    export_checkpoint(lora.merge(params, lconfig.lora), config, str(tmp_path / "merged"), layout="original")
    ours = load_file(str(tmp_path / "merged" / "model.safetensors"))
    theirs = {k: t.detach().numpy() for k, t in peft.merge_and_unload().state_dict().items()}
    assert theirs.keys() == ours.keys() == tensors.keys()
    adapted = {k[len("base_model.model."): -len(".lora_A.weight")] + ".weight" for k in written if ".lora_A." in k}
    for key, x in ours.items():
        if key in adapted:
            assert max_diff(theirs[key], x) <= TOL_MERGE, key
            assert max_diff(x, tensors[key].numpy()) > 1e-3, key  # the adapter is in it
        else:
            np.testing.assert_array_equal(theirs[key], x, err_msg=key)

    back_config, back = load_adapter(str(tmp_path / "peft"), config)
    assert _layout(back) == _layout(adapters)
    for path, x in jax.tree_util.tree_flatten_with_path(adapters)[0]:
        np.testing.assert_array_equal(np.asarray(_dig(back, path)), np.asarray(x), err_msg=jax.tree_util.keystr(path))
        kernel = "/".join(k.key for k in path[:-1]) + "/kernel"
        if path[-1].key == "lora_b":
            assert lora.adapter_for(back_config.lora, kernel) == lora.adapter_for(lconfig.lora, kernel), kernel

    split = config.replace(lora=lora.preset_rules("vit_split", R, ALPHA))
    zeros = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), abstract_params(split))
    with pytest.raises(ValueError, match=r"vision/layers/attn/qkv/kernel has a split LoRA adapter .* Linear "
                                         r"vision_model\.encoder\.layers\.\*\.attn\.qkv holds the kernel whole"):
        to_peft_tensors(zeros, split, "original")
