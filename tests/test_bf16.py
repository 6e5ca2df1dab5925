"""bfloat16 compute: our error against the float32 reference is at most twice PyTorch's bfloat16 error."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from convert.load import load_pretrained
from reference import image_batch, max_diff, tiny_internvl


@pytest.mark.parametrize("text", ["qwen2", "qwen3"])
def test_bf16_error_within_twice_pytorch_bf16(tmp_path, text):
    ref = tiny_internvl(text, "layernorm_bias")
    ref.save_pretrained(tmp_path)
    ids, torch_pixels, pixels, mask = image_batch([[2, 3], [1]], length=48, max_tiles=6)
    tids = torch.tensor(ids, dtype=torch.long)
    with torch.no_grad():
        exact = ref(input_ids=tids, pixel_values=torch_pixels).logits.numpy()
        torch_bf16 = ref.to(torch.bfloat16)(input_ids=tids, pixel_values=torch_pixels.bfloat16()).logits.float().numpy()
    model, params = load_pretrained(str(tmp_path), dtype=jnp.bfloat16)
    assert all(p.dtype == jnp.bfloat16 for p in jax.tree_util.tree_leaves(params))
    ours = model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(pixels, jnp.bfloat16), mask)
    assert ours.dtype == jnp.float32
    ours_err, torch_err = max_diff(ours, exact), max_diff(torch_bf16, exact)
    assert torch_err > 0
    assert ours_err <= 2 * torch_err, (ours_err, torch_err)
