"""InternVL 1.0 (``InternVLModel``): InternViT-6B-224 + QLLaMA, with the InternVL-C and InternVL-G heads.

* InternVL-C image feature: ``clip_projector`` (attention pooling) over all ViT tokens, class token included.
* InternVL-G image feature: normalize(clip_projector(vit)) + normalize(clip_projector2(QLLaMA query outputs)); the
  96 learnable queries alone go through QLLaMA, bidirectionally, cross-attending to the ViT tokens.
* Text feature: QLLaMA over the tokens alone (causal, no vision), the final-norm state at the last real token
  (right-padded with 0: index (ids > 0).sum - 1, the EOS) times ``text_projection``.
* CLIP logits: exp(logit_scale) * normalize(image) @ normalize(text)^T.

Pixels are NHWC, normalised. Methods other than ``__call__`` are reached with ``model.apply(..., method=...)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn

from .clip_config import CLIPConfig
from .layers import Dense, as_dtype, param_with_axes
from .pooling import AttentionPooling
from .qllama import QLLaMA, cached_prefix_mask, qllama_mask
from .vision import InternViT

MODES = ("InternVL-C", "InternVL-G")


def normalize(x):
    """x / ||x|| over the last axis, in float32."""
    x = x.astype(jnp.float32)
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def eos_index(input_ids):
    """int [B]: the position of the last real token of right-padded (pad id 0) ids [B, L]."""
    return jnp.sum(input_ids > 0, axis=1) - 1


class InternVLCLIP(nn.Module):
    config: CLIPConfig

    def setup(self):
        c = self.config
        kw = dict(dtype=as_dtype(c.dtype), param_dtype=as_dtype(c.param_dtype))
        stack = dict(remat=c.remat, attention_impl=c.attention_impl, scan_unroll=c.scan_unroll)
        self.vision = InternViT(c.vision, **stack, **kw)
        self.qllama = QLLaMA(c, **stack, **kw)
        e, d = c.qllama.hidden_size, c.clip_embed_dim
        pd = kw["param_dtype"]
        self.query_tokens = self.param("query_tokens", param_with_axes(nn.initializers.normal(0.02), (None, None, "embed")),
                                       (1, c.num_query_token, e), pd)
        self.text_projection = self.param("text_projection", param_with_axes(nn.initializers.normal(e**-0.5),
                                                                             ("embed", None)), (e, d), pd)
        self.logit_scale = self.param("logit_scale", param_with_axes(nn.initializers.constant(np.log(1 / 0.07)), ()),
                                      (), jnp.float32)
        self.clip_projector = AttentionPooling(d, c.attn_pool_num_heads, "vit_embed", **kw)
        self.clip_projector2 = AttentionPooling(d, c.attn_pool_num_heads, "embed", **kw)
        self.itm_head = Dense((2,), ("embed",), (None,), True, out_dtype=jnp.float32, **kw)

    def vision_states(self, pixels):
        """pixels [B, H, W, 3] -> ViT tokens [B, 1 + patches, C] (class token first, no final norm)."""
        return self.vision(pixels)

    def query_outputs(self, vit):
        """ViT tokens [B, S, C] -> QLLaMA's final-norm query outputs [B, Q, E] (queries alone, bidirectional)."""
        b = vit.shape[0]
        q = jnp.broadcast_to(self.query_tokens, (b, *self.query_tokens.shape[1:])).astype(as_dtype(self.config.dtype))
        mask = qllama_mask("full", q.shape[1], jnp.ones(q.shape[:2], bool))
        return self.qllama(q, mask, vit)

    def image_features(self, pixels, mode: str = "InternVL-C"):
        """pixels [B, H, W, 3] -> unnormalised image features [B, D] of ``mode`` (see the module docstring)."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        vit = self.vision_states(pixels)
        backbone = self.clip_projector(vit).astype(jnp.float32)
        if mode == "InternVL-C":
            return backbone
        return normalize(backbone) + normalize(self.clip_projector2(self.query_outputs(vit)))

    def text_hidden(self, input_ids):
        """int [B, L] right-padded with 0 -> final-norm hidden states [B, L, E] (causal, no vision)."""
        return self.qllama(self.qllama.embed(input_ids), qllama_mask("causal", 0, input_ids > 0))

    def text_features(self, input_ids):
        """int [B, L] -> unnormalised text features [B, D]: the last real token's state @ text_projection."""
        h = self.text_hidden(input_ids)
        last = jnp.take_along_axis(h, eos_index(input_ids)[:, None, None], axis=1)[:, 0]
        return jnp.dot(last.astype(jnp.float32), self.text_projection.astype(jnp.float32))

    def logits(self, image_features, text_features):
        """Unnormalised [N, D], [M, D] -> float32 logits_per_image [N, M] (scaled cosine similarities)."""
        return jnp.exp(self.logit_scale) * normalize(image_features) @ normalize(text_features).T

    def __call__(self, pixels, input_ids, mode: str = "InternVL-C"):
        """-> (logits_per_image [N, M], logits_per_text [M, N])."""
        per_image = self.logits(self.image_features(pixels, mode), self.text_features(input_ids))
        return per_image, per_image.T

    def lm_hidden(self, vit, input_ids, attention_mask, kind: str | tuple[str, ...] = "prefix"):
        """[queries ; text] through QLLaMA with the query positions cross-attending to ``vit``.

        vit [B, S, C]; input_ids, attention_mask int [k*B, L]; ``kind``: a :func:`qllama_mask` kind (``prefix``
        for captioning / ITG, ``full`` for ITM, ``separate`` for ITC), or k kinds, one per consecutive chunk of
        B rows, each chunk seeing the same images (the stage-2 batch [ITM ; ITC ; ITG]). Returns final-norm
        states [k*B, Q + L, E]."""
        kinds = (kind,) if isinstance(kind, str) else tuple(kind)
        rows = input_ids.shape[0]
        if rows != len(kinds) * vit.shape[0]:
            raise ValueError(f"{rows} text rows for {vit.shape[0]} images and {len(kinds)} mask kinds")
        dtype = as_dtype(self.config.dtype)
        q = jnp.broadcast_to(self.query_tokens, (rows, *self.query_tokens.shape[1:])).astype(dtype)
        x = jnp.concatenate([q, self.qllama.embed(input_ids)], axis=1)
        valid = jnp.concatenate([jnp.ones(q.shape[:2], bool), attention_mask > 0], axis=1)
        chunks = jnp.split(valid, len(kinds))
        mask = jnp.concatenate([qllama_mask(k, q.shape[1], v) for k, v in zip(kinds, chunks)], axis=0)
        return self.qllama(x, mask, jnp.tile(vit, (len(kinds), 1, 1)))

    def lm_logits(self, vit, input_ids, attention_mask):
        """Image-conditioned LM logits [B, Q + L, V] over [queries ; text] (captioning's prefix mask)."""
        return self.qllama.head(self.lm_hidden(vit, input_ids, attention_mask))

    def caption_prefill(self, vit, input_ids, cache):
        """The first step of captioning into a KV cache (:func:`~internvl_jax.qllama.init_cache`): [queries ;
        prompt] at slots 0 .. Q + P - 1, the queries cross-attending to ``vit`` [B, S, C]; input_ids int [B, P]
        (no padding). Returns (float32 logits [B, 1, V] of the last prompt position, cache)."""
        b, p = input_ids.shape
        dtype = as_dtype(self.config.dtype)
        q = jnp.broadcast_to(self.query_tokens, (b, *self.query_tokens.shape[1:])).astype(dtype)
        x = jnp.concatenate([q, self.qllama.embed(input_ids)], axis=1)
        mask = cached_prefix_mask(q.shape[1], jnp.arange(x.shape[1]), cache[0][0].shape[3], b)
        h, cache = self.qllama(x, mask, vit, cache=cache, cache_index=0)
        return self.qllama.head(h[:, -1:]), cache

    def decode_step(self, input_ids, *, positions, cache, cache_index, cache_start=None):
        """Text tokens int [B, L] at cache slots ``cache_index`` .. (after :meth:`caption_prefill`; no
        cross-attention): (float32 logits [B, L, V], cache). The decoding step of
        :func:`internvl_jax.generate`'s loop: positions int [B, L]; cache_start is unused (rows are unpadded)."""
        del cache_start
        b, l = input_ids.shape
        mask = cached_prefix_mask(self.config.num_query_token, cache_index + jnp.arange(l), cache[0][0].shape[3], b)
        h, cache = self.qllama(self.qllama.embed(input_ids), mask, positions=positions, cache=cache,
                               cache_index=cache_index)
        return self.qllama.head(h), cache

    def itm_logits(self, query_states):
        """Query outputs [B, Q, E] -> image-text matching logits [B, 2] (the head's mean over the queries)."""
        return jnp.mean(self.itm_head(query_states), axis=1)

    def init_all(self, pixels, input_ids):
        """Touch every parameter (for ``init``) with one ViT and one QLLaMA pass (compile time)."""
        vit = self.vision_states(pixels)
        h = self.lm_hidden(vit, input_ids, jnp.ones_like(input_ids))
        q = h[:, : self.config.num_query_token]
        return (self.clip_projector(vit), self.clip_projector2(q), self.itm_logits(q), self.qllama.head(h),
                h[:, -1] @ self.text_projection, self.logit_scale)


def _dummy_inputs(config: CLIPConfig):
    s = config.image_size
    return jnp.zeros((1, s, s, 3), as_dtype(config.dtype)), jnp.ones((1, 1), jnp.int32)


def clip_init_fn(config: CLIPConfig):
    """``key -> params`` of a fresh model, boxed with their logical axes (``sharding.init_sharded`` places them)."""
    model = InternVLCLIP(config)
    return lambda key: model.init(key, *_dummy_inputs(config), method=InternVLCLIP.init_all)["params"]


def init_clip_params(config: CLIPConfig, rng) -> dict:
    """Randomly initialised params (plain nested dicts); ``rng``: a ``jax.random`` key (an ``impl="rbg"`` key
    builds fastest)."""
    init = jax.jit(clip_init_fn(config))
    # it runs once: a small model on the CPU is compiled without XLA's expensive passes (several times faster to
    # build); a large one gets them, its unoptimised forward would take longer than the compile saves
    small = clip_param_count(config) < SMALL_INIT_PARAMS and jax.default_backend() == "cpu"
    fast = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
    compiled = init.lower(rng).compile(compiler_options=fast if small else None)
    return nn.unbox(compiled(rng))


SMALL_INIT_PARAMS = 50_000_000


def abstract_clip_params(config: CLIPConfig, *, boxed: bool = False) -> dict:
    """Shapes and dtypes of the params (``jax.eval_shape``, nothing allocated); ``boxed`` keeps the logical axes."""
    tree = jax.eval_shape(clip_init_fn(config), jax.random.PRNGKey(0))
    return tree if boxed else nn.unbox(tree)


def clip_param_count(config: CLIPConfig) -> int:
    """Exact parameter count (``jax.eval_shape``)."""
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(abstract_clip_params(config)))
