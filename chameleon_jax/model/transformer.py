"""The Chameleon decoder-only transformer in Flax NNX (spec §2).

Conventions: B batch, T length, D d_model, N query heads, K kv heads, H head_dim, F ffn, V vocab,
L layers. Parameters carry logical axis names (see sharding.py); activations are pinned with
`constrain`. Layers are stored stacked along a leading L axis in every mode, so checkpoints do not
depend on `scan_layers`: with scan the stack is iterated by `lax.scan`, without it by a Python loop.

Dropout takes explicit keys (no NNX RNG state), so the whole model is a pure function of
(params, inputs, key) once merged, which keeps the train step functional.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from chameleon_jax.model import splash
from chameleon_jax.model.attention import (apply_rope, attention_mask, causal_self_attention,
                                          dot_product_attention, rope_table)
from chameleon_jax.model.config import ModelConfig
from chameleon_jax.model.sharding import constrain

Cache = dict[str, jax.Array]


def _param(rngs: nnx.Rngs, shape, names, std, dtype):
    init = nnx.initializers.normal(std) if std else nnx.initializers.ones
    return nnx.Param(init(rngs.params(), shape, jnp.dtype(dtype)), out_sharding=names)


def _dropout(x, rate: float, key):
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, param_dtype: str):
        self.scale = nnx.Param(jnp.ones((dim,), jnp.dtype(param_dtype)), out_sharding=("norm",))
        self.eps = eps

    def __call__(self, x):
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (xf * self.scale[...].astype(jnp.float32)).astype(x.dtype)


class GroupedHeadNorm(nnx.Module):
    """QK-norm: LayerNorm over head_dim with bias, before RoPE (spec §2.3).

    `groups` parameter sets, each shared by consecutive heads: 1 for 7B, 4 for the released 30B, which
    kept one set per model-parallel shard.
    """

    def __init__(self, groups: int, head_dim: int, param_dtype: str):
        dt = jnp.dtype(param_dtype)
        self.scale = nnx.Param(jnp.ones((groups, head_dim), dt), out_sharding=("qk_groups", "head_dim"))
        self.bias = nnx.Param(jnp.zeros((groups, head_dim), dt), out_sharding=("qk_groups", "head_dim"))

    def __call__(self, x):  # x [B, T, heads, H]
        heads, groups = x.shape[2], self.scale.shape[0]
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        xf = (xf - mean) * jax.lax.rsqrt(var + 1e-5)
        scale = jnp.repeat(self.scale[...], heads // groups, axis=0).astype(jnp.float32)
        bias = jnp.repeat(self.bias[...], heads // groups, axis=0).astype(jnp.float32)
        return (xf * scale + bias).astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, n, k, h, pd = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.param_dtype
        std = cfg.init_std
        self.wq = _param(rngs, (d, n, h), ("embed", "heads", "head_dim"), std, pd)
        self.wk = _param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), std, pd)
        self.wv = _param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), std, pd)
        self.wo = _param(rngs, (n, h, d), ("heads", "head_dim", "embed"), std, pd)
        self.q_norm = GroupedHeadNorm(cfg.qk_norm_groups, h, pd)
        self.k_norm = GroupedHeadNorm(cfg.qk_norm_groups, h, pd)
        self.attention_block = cfg.attention_block
        self.attention_kernel = cfg.attention
        self.dtype = jnp.dtype(cfg.dtype)

    def __call__(self, x, rope, mask_inputs, cache: Cache | None = None, cache_index=None):
        dt = self.dtype
        q = jnp.einsum("BTD,DNH->BTNH", x, self.wq[...].astype(dt))
        k = jnp.einsum("BTD,DKH->BTKH", x, self.wk[...].astype(dt))
        v = jnp.einsum("BTD,DKH->BTKH", x, self.wv[...].astype(dt))
        q = constrain(q, ("batch", "length", "heads", "head_dim"))
        k = constrain(k, ("batch", "length", "kv_heads", "head_dim"))
        q = apply_rope(self.q_norm(q), rope)
        k = apply_rope(self.k_norm(k), rope)
        # Training and prefill (a static cache offset of 0: no query sees a key past its own rows) are
        # self-attention over these rows, which the splash kernel can do; cached decoding is not.
        t = q.shape[1]
        prefill = cache is not None and isinstance(cache_index, int) and cache_index == 0 and t > 1
        rows_k, rows_v = k, v
        if cache is not None:
            # Write this step's keys/values at the cache offset, then attend over the whole cache.
            k = jax.lax.dynamic_update_slice_in_dim(cache["k"], k.astype(cache["k"].dtype), cache_index, 1)
            v = jax.lax.dynamic_update_slice_in_dim(cache["v"], v.astype(cache["v"].dtype), cache_index, 1)
            cache = {"k": k, "v": v}
        if (cache is None or prefill) and splash.kernel_for(self.attention_kernel, t, prefill=prefill) == "splash":
            out = splash.causal_attention(q, rows_k, rows_v, mask_inputs[0], mask_inputs[1][:, :t])
        elif cache is None:  # training / full-sequence scoring: keys are these rows, causal by offset
            out = causal_self_attention(q, k, v, attention_mask(*mask_inputs), self.attention_block)
        else:
            out = dot_product_attention(q, k.astype(dt), v.astype(dt), attention_mask(*mask_inputs))
        out = constrain(out, ("batch", "length", "heads", "head_dim"))
        return jnp.einsum("BTNH,NHD->BTD", out, self.wo[...].astype(dt)), cache


class SwiGLU(nnx.Module):
    """FFN(h) = W2(silu(W1 h) ⊙ W3 h), no biases (spec §2.5)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, f, pd, std = cfg.d_model, cfg.ffn_dim, cfg.param_dtype, cfg.init_std
        self.w1 = _param(rngs, (d, f), ("embed", "mlp"), std, pd)
        self.w3 = _param(rngs, (d, f), ("embed", "mlp"), std, pd)
        self.w2 = _param(rngs, (f, d), ("mlp", "embed"), std, pd)
        self.dtype = jnp.dtype(cfg.dtype)

    def __call__(self, x):
        dt = self.dtype
        return swiglu(x, self.w1[...].astype(dt), self.w3[...].astype(dt), self.w2[...].astype(dt))


def _swiglu_gate_up(x, w1, w3):
    gate = constrain(jnp.einsum("BTD,DF->BTF", x, w1), ("batch", "length", "mlp"))
    up = constrain(jnp.einsum("BTD,DF->BTF", x, w3), ("batch", "length", "mlp"))
    return gate, up


@jax.custom_vjp
def swiglu(x, w1, w3, w2):
    """W2(silu(x W1) ⊙ x W3) with a hand-written backward.

    Autodiff of silu left XLA:CPU fusing the sigmoid's derivative into the transposes that feed the
    weight-gradient matmuls (a strided, unvectorised loop as slow as the matmuls themselves); here
    the elementwise terms are formed once, row-major, and the backward ran ~1.5x faster (measured).
    """
    gate, up = _swiglu_gate_up(x, w1, w3)
    return jnp.einsum("BTF,FD->BTD", jax.nn.silu(gate) * up, w2)


def _swiglu_fwd(x, w1, w3, w2):
    gate, up = _swiglu_gate_up(x, w1, w3)
    return jnp.einsum("BTF,FD->BTD", jax.nn.silu(gate) * up, w2), (x, w1, w3, w2, gate, up)


def _swiglu_bwd(res, dout):
    x, w1, w3, w2, gate, up = res
    sig = jax.nn.sigmoid(gate)
    act = gate * sig
    dhidden = jnp.einsum("BTD,FD->BTF", dout, w2)
    dup = dhidden * act
    dgate = dhidden * up * sig * (1 + gate * (1 - sig))  # silu'(g) = σ(g)(1 + g(1 − σ(g)))
    dw2 = jnp.einsum("BTF,BTD->FD", act * up, dout)
    dx = jnp.einsum("BTF,DF->BTD", dgate, w1) + jnp.einsum("BTF,DF->BTD", dup, w3)
    dw1 = jnp.einsum("BTD,BTF->DF", x, dgate)
    dw3 = jnp.einsum("BTD,BTF->DF", x, dup)
    return dx, dw1, dw3, dw2


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


class Block(nnx.Module):
    """One residual block in either order (spec §2.2).

    prenorm (7B):  h = x + Attn(norm(x));  out = h + FFN(norm(h))
    swin    (34B): h = x + norm(Attn(x));  out = h + norm(FFN(h))
    Dropout sits on each sub-layer's output, just before the residual add (paper §2.3).
    """

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.attention = Attention(cfg, rngs)
        self.mlp = SwiGLU(cfg, rngs)
        self.attention_norm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.param_dtype)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.param_dtype)
        self.swin = cfg.block_order == "swin"
        self.dropout = cfg.dropout

    def __call__(self, x, rope, mask_inputs, dropout_key=None, cache=None, cache_index=None):
        keys = (None, None) if dropout_key is None else tuple(jax.random.split(dropout_key))
        if self.swin:
            attn, cache = self.attention(x, rope, mask_inputs, cache, cache_index)
            h = x + _dropout(self.attention_norm(attn), self.dropout, keys[0])
            out = h + _dropout(self.ffn_norm(self.mlp(h)), self.dropout, keys[1])
        else:
            attn, cache = self.attention(self.attention_norm(x), rope, mask_inputs, cache, cache_index)
            h = x + _dropout(attn, self.dropout, keys[0])
            out = h + _dropout(self.mlp(self.ffn_norm(h)), self.dropout, keys[1])
        return constrain(out, ("batch", "length", "act_embed")), cache


_REMAT = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_block_outputs": jax.checkpoint_policies.save_only_these_names("block_out"),
}


class Transformer(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        pd, std = cfg.param_dtype, cfg.init_std
        self.embedding = _param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), std, pd)

        @nnx.split_rngs(splits=cfg.n_layers)
        @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_blocks(rngs):
            return Block(cfg, rngs)

        self.blocks = make_blocks(rngs)
        self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps, pd)
        self.output = _param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), std, pd)

    def __call__(self, tokens, segment_ids, positions, *, dropout_key=None, cache=None,
                 cache_index=None, kv_segment_ids=None, layers=None):
        """Returns the last block's output [B, T, D] (before the final norm) and the updated cache.

        Training: tokens/segment_ids/positions are [B, T]. Decoding: pass `cache` (k/v of shape
        [L, B, S, K, H]), the write offset `cache_index`, and `kv_segment_ids` [B, S].

        `layers` (from `unstack_layers`) runs the blocks from per-layer weights with a per-layer cache
        (a tuple of {"k", "v"} of shape [B, S, K, H]): a decoding loop then neither slices the stacked
        weights nor rebuilds the stacked cache every step, which XLA:CPU does as copies (about a third
        of a batch-1 decode step, measured in benchmarks/bench_decode.py).
        """
        cfg = self.cfg
        b, t = tokens.shape
        x = jnp.take(self.embedding[...], tokens, axis=0).astype(jnp.dtype(cfg.dtype))
        x = constrain(x, ("batch", "length", "act_embed"))
        q_index = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        if cache is None:
            rope = rope_table(positions, cfg.head_dim, cfg.rope_theta, size=t)
            mask_inputs = (segment_ids, segment_ids, q_index, q_index)
        else:
            s = kv_segment_ids.shape[1]
            kv_index = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
            rope = rope_table(positions, cfg.head_dim, cfg.rope_theta, size=max(s, t))
            mask_inputs = (segment_ids, kv_segment_ids, q_index + cache_index, kv_index)

        if layers is not None:
            graphdef, per_layer = layers
            new_cache = []
            for i, params in enumerate(per_layer):
                key = None if dropout_key is None else jax.random.fold_in(dropout_key, i)
                x, c = nnx.merge(graphdef, params)(x, rope, mask_inputs, key,
                                                   None if cache is None else cache[i], cache_index)
                new_cache.append(c)
            return x, None if cache is None else tuple(new_cache)

        graphdef, stacked = nnx.split(self.blocks)

        def body(x, layer):
            params, index, layer_cache = layer
            key = None if dropout_key is None else jax.random.fold_in(dropout_key, index)
            out, new_cache = nnx.merge(graphdef, params)(
                x, rope, mask_inputs, key, layer_cache, cache_index)
            out = checkpoint_name(out, "block_out")
            return out, new_cache

        if cfg.remat != "none":
            body = jax.checkpoint(body, policy=_REMAT[cfg.remat], prevent_cse=not cfg.scan_layers)
        xs = (stacked, jnp.arange(cfg.n_layers), cache)
        if cfg.scan_layers:
            x, new_cache = jax.lax.scan(body, x, xs)
        else:
            caches = []
            for i in range(cfg.n_layers):
                x, c = body(x, jax.tree.map(lambda a, i=i: a[i], xs))
                caches.append(c)
            new_cache = None if cache is None else jax.tree.map(lambda *a: jnp.stack(a), *caches)
        return x, new_cache

    def head(self, x):
        """Final norm then output projection: logits [B, T, V] in f32 (spec §2.6)."""
        h = self.final_norm(x)
        logits = jnp.einsum("BTD,DV->BTV", h, self.output[...].astype(h.dtype),
                            preferred_element_type=jnp.float32)
        return constrain(logits, ("batch", "length", "vocab"))

    def logits(self, tokens, segment_ids, positions, **kw):
        x, _ = self(tokens, segment_ids, positions, **kw)
        return self.head(x)

    def unstack_layers(self):
        """(block graphdef, per-layer param states): the `layers` argument of __call__, sliced once."""
        graphdef, stacked = nnx.split(self.blocks)
        return graphdef, tuple(jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(self.cfg.n_layers))

    def init_cache(self, batch: int, max_len: int, dtype=None) -> Cache:
        cfg = self.cfg
        shape = (cfg.n_layers, batch, max_len, cfg.n_kv_heads, cfg.head_dim)
        dt = jnp.dtype(dtype or cfg.dtype)
        return {"k": jnp.zeros(shape, dt), "v": jnp.zeros(shape, dt)}
