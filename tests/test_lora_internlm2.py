"""LoRA on InternLM2's fused ``attention.wqkv``, which the original adapts as one Linear (one lora_A for the q, k and
v rows, lora_B over all of them): our ``llm`` preset for internlm2 puts q/k/v_proj in the shared-A group ``wqkv``.
transformers has no InternLM2, so the base is the tiny original-layout checkpoint of ``original_layout.py`` (written
from a transformers Llama InternVL; 2 KV heads of 3 query heads each, so a wrong row grouping cannot pass), float32.

- The group's layout and count: one A [E, r] per layer and B rows for q, k, v, as a LoRA on wqkv has.
- In every layer of the unrolled decoder (generation's), our q/k/v projections, put in the original's grouped row
  order, equal a hand-written fused LoRA ``W x + s * B(A x)`` over wqkv (W read from the checkpoint, A the group's,
  B the members' rows grouped as wqkv's); the scanned model gives the unrolled one's logits.
- The merged export in the original layout holds wqkv = W + s * B A and wo, w1, w2, w3 with their own adapters
  (merged by hand), every other tensor of the base bit for bit; reloaded, it gives ours unmerged.
- Saved in PEFT's format (transformers' Llama names q/k/v_proj, each with the group's A) it loads into PEFT on the
  transformers model of the same weights with our logits, and back into ours as the same group.

Tolerances are stated once, here.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from convert.export import export_checkpoint
from convert.load import load_pretrained
from convert.peft import load_adapter, save_adapter
from internvl_jax import lora
from internvl_jax.generate import unrolled_params
from internvl_jax.model import InternVL, _dummy_inputs
from original_layout import grouped_wqkv, original_checkpoint
from reference import image_batch, max_diff

TOL_LOGITS = 1e-4  # max abs difference of logits
TOL_MODULE = 1e-5  # one projection's output, max abs
TOL_MERGE = 1e-6  # a merged kernel against the same merge by hand in float64, max abs

R, ALPHA = 4, 8
WQKV = "language_model.model.layers.{}.attention.wqkv.weight"
OWN = {"attention.wo": "attn/o_proj", "feed_forward.w1": "mlp/gate_proj", "feed_forward.w3": "mlp/up_proj",
       "feed_forward.w2": "mlp/down_proj"}  # InternLM2's Linears with an adapter of their own in the llm preset


@pytest.fixture(scope="module")
def adapted(tmp_path_factory):
    """(folder, torch reference, original tensors, base config, adapted config, base + adapters with random B,
    inputs)."""
    folder = tmp_path_factory.mktemp("lora_internlm2")
    ref, tensors = original_checkpoint("internlm2", folder / "base")
    model, base = load_pretrained(str(folder / "base"))
    config = model.config
    assert config.text.family == "internlm2"
    lconfig = config.replace(lora=lora.preset_rules("llm", R, ALPHA, family="internlm2"))
    init = jax.jit(lambda k: lora.adapters_of(nn.unbox(InternVL(lconfig).init(k, *_dummy_inputs(lconfig))["params"])))
    key = jax.random.PRNGKey(8)
    adapters = jax.tree_util.tree_map_with_path(
        lambda p, x: 0.2 * jax.random.normal(jax.random.fold_in(key, len(jax.tree_util.keystr(p))), x.shape)
        if p[-1].key == "lora_b" else x, init(jax.random.PRNGKey(7)))
    inputs = image_batch([[1], [2]], 20, 2, seed=1)
    return folder, ref, tensors, config, lconfig, lora.combine(base, adapters), inputs


def _logits(config, params, inputs, unrolled=False):
    _, _, pixels, mask = inputs
    model = InternVL(config, unrolled=unrolled)
    return np.asarray(jax.jit(lambda p: model.apply({"params": p}, inputs[0], pixels, mask))(params))


def _fused_ab(attn: dict, layer: int, kv_heads: int):
    """The group's adapters as one LoRA on wqkv, float64 torch: A [r, E], B [rows, r] in wqkv's grouped rows."""
    a = torch.tensor(np.asarray(attn["wqkv"]["lora_a"][layer], np.float64)).T
    q, k, v = (torch.tensor(np.asarray(attn[f"{p}_proj"]["lora_b"][layer], np.float64)).reshape(R, -1).T for p in "qkv")
    return a, grouped_wqkv(q, k, v, kv_heads)


def test_wqkv_group_layout_and_count(adapted):
    _, _, _, config, _, params, _ = adapted
    attn = lora.adapters_of(params)["language_model"]["layers"]["attn"]
    c = config.text
    assert set(attn["wqkv"]) == {"lora_a"} and all(set(attn[f"{p}_proj"]) == {"lora_b"} for p in "qkv")
    rows = (c.num_heads + 2 * c.num_kv_heads) * c.head_dim
    assert lora.count({k: attn[k] for k in ("wqkv", "q_proj", "k_proj", "v_proj")}) == c.num_layers * R * (
        c.hidden_size + rows)  # a LoRA on wqkv [rows, E]: A [r, E] + B [rows, r] per layer


def test_wqkv_group_is_the_fused_lora(adapted):
    _, _, tensors, config, lconfig, params, inputs = adapted
    c = config.text
    unrolled = unrolled_params(params, lconfig)
    _, state = jax.jit(lambda p: InternVL(lconfig, unrolled=True).apply(
        {"params": p}, inputs[0], inputs[2], inputs[3], mutable=["intermediates"],
        capture_intermediates=lambda m, _: m.name in ("input_norm", "q_proj", "k_proj", "v_proj")))(unrolled)
    attn = lora.adapters_of(params)["language_model"]["layers"]["attn"]
    worst = 0.0
    for i in range(c.num_layers):
        layer = state["intermediates"]["language_model"][f"layers_{i}"]
        x = torch.tensor(np.asarray(layer["input_norm"]["__call__"][0], np.float64)).reshape(-1, c.hidden_size)
        w = torch.tensor(tensors[WQKV.format(i)].numpy(), dtype=torch.float64)
        a, b = _fused_ab(attn, i, c.num_kv_heads)
        fused = x @ w.T + (ALPHA / R) * (x @ a.T) @ b.T  # [N, rows]: the original's wqkv with LoRA
        ours = [torch.tensor(np.asarray(layer["attn"][f"{p}_proj"]["__call__"][0], np.float64)).reshape(len(x), -1).T
                for p in "qkv"]
        worst = max(worst, max_diff(grouped_wqkv(*ours, c.num_kv_heads).T, fused))
    print(f"q/k/v of the wqkv group vs the hand-written fused LoRA: max abs diff {worst:.2e}")
    assert worst <= TOL_MODULE
    assert max_diff(_logits(lconfig, params, inputs), _logits(lconfig, unrolled, inputs, unrolled=True)) <= TOL_LOGITS


def test_merged_original_export_and_peft_interchange(adapted):
    from peft import PeftModel

    folder, ref, tensors, config, lconfig, params, inputs = adapted
    ours = _logits(lconfig, params, inputs)
    assert max_diff(ours, _logits(config, lora.partition(params, lambda p: not lora.is_adapter_path(p))[0],
                                  inputs)) > 0.05  # the adapters matter

    export_checkpoint(lora.merge(params, lconfig.lora), config, str(folder / "merged"), layout="original")
    written = load_file(str(folder / "merged" / "model.safetensors"))
    assert written.keys() == tensors.keys()
    layers = lora.adapters_of(params)["language_model"]["layers"]
    for key, t in tensors.items():
        name = key.split(".")
        if key.endswith("attention.wqkv.weight"):
            a, b = _fused_ab(layers["attn"], int(name[3]), config.text.num_kv_heads)
        elif ".".join(name[4:6]) in OWN:  # wo, w1, w2, w3: their own adapters, torch [out, in] += s * (A B)^T
            node = _dig(layers, [jax.tree_util.DictKey(k) for k in OWN[".".join(name[4:6])].split("/")])
            a, b = (torch.tensor(np.asarray(node[k][int(name[3])], np.float64)) for k in ("lora_a", "lora_b"))
            a, b = a.reshape(-1, R).T, b.reshape(R, -1).T
        else:  # no adapter: the base's tensor, bit for bit
            np.testing.assert_array_equal(written[key], t.numpy(), err_msg=key)
            continue
        assert max_diff(written[key], t.double() + (ALPHA / R) * b @ a) <= TOL_MERGE, key
    merged = _logits(config, load_pretrained(str(folder / "merged"))[1], inputs)
    print(f"merged original export reloaded vs ours unmerged: {max_diff(merged, ours):.2e}")
    assert max_diff(merged, ours) <= TOL_LOGITS

    save_adapter(params, lconfig, str(folder / "peft"))
    peft = PeftModel.from_pretrained(ref, str(folder / "peft")).eval()
    with torch.no_grad():
        theirs = peft(input_ids=torch.tensor(inputs[0], dtype=torch.long), pixel_values=inputs[1]).logits.numpy()
    print(f"ours -> PEFT on the transformers model: logits max abs diff {max_diff(theirs, ours):.2e}")
    assert max_diff(theirs, ours) <= TOL_LOGITS
    back_config, back = load_adapter(str(folder / "peft"), config)
    assert lora.adapter_for(back_config.lora, "language_model/layers/attn/k_proj/kernel").group == "wqkv"
    for path, x in jax.tree_util.tree_flatten_with_path(lora.adapters_of(params))[0]:
        np.testing.assert_array_equal(np.asarray(_dig(back, path)), np.asarray(x), err_msg=jax.tree_util.keystr(path))


def _dig(tree, path):
    for k in path:
        tree = tree[k.key]
    return tree
