"""Every parameter carries logical axis names (one per dimension) from the sharding vocabulary."""

import jax
import flax.linen as nn
import pytest

from internvl_jax.model import abstract_params
from internvl_jax.presets import get_preset
from sharding import PARAM_AXES


@pytest.mark.parametrize("name", ["tiny-qwen2", "tiny-qwen3", "tiny-vit6b", "InternVL2_5-8B"])
def test_every_param_has_logical_axes(name):
    tree = abstract_params(get_preset(name), boxed=True)
    leaves = jax.tree_util.tree_leaves_with_path(tree, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert leaves
    for path, leaf in leaves:
        where = jax.tree_util.keystr(path)
        assert isinstance(leaf, nn.LogicallyPartitioned), where
        names = leaf.names
        assert len(names) == leaf.value.ndim, where
        named = [n for n in names if n is not None]
        assert set(named) <= set(PARAM_AXES), (where, names)
        assert len(named) == len(set(named)), (where, names)
        if "/layers/" in where.replace("']['", "/"):
            assert names[0] == "layers", where
