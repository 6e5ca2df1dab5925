"""The train state: everything a step changes and a checkpoint holds (the data iterator's state aside)."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class TrainState:
    """step int32 []; params (float32 master weights); opt_state (optax); rng (PRNG key, drop path);
    skipped int32 [] (updates skipped for a non-finite loss or gradient, over the whole run)."""

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array
    skipped: jax.Array

    @classmethod
    def create(cls, params, tx, rng) -> "TrainState":
        return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=rng,
                   skipped=jnp.zeros((), jnp.int32))


def abstract_state(boxed_params, tx) -> TrainState:
    """The state's shapes (``jax.eval_shape``) with params and optimizer moments still boxed with their logical
    axes (optax keeps flax's boxes), so ``sharding.shardings`` can place every leaf; scalars and the key get
    replicated."""
    def build(p):
        return TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p),
                          rng=jax.random.PRNGKey(0), skipped=jnp.zeros((), jnp.int32))

    return jax.eval_shape(build, boxed_params)
