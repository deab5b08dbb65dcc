"""Dot-product attention restricted to causal, same-segment pairs, plus rotary embeddings.

Dimension letters: B batch, T query length, S key length, N query heads, K kv heads,
G query heads per kv head (N = K·G), H head_dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Large finite negative rather than -inf: a fully masked row (padding) then softmaxes to a uniform
# distribution instead of NaN, and its output is never used.
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def rope_frequencies(head_dim: int, theta: float) -> jax.Array:
    return 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotates x [B, T, *, H] by its positions [B, T].

    Pairing layout: half-split, i.e. dim i rotates with dim i + H/2 (HF transformers' `rotate_half`).
    Meta's release pairs adjacent dims (2i, 2i+1); its wq/wk rows and q/k-norm vectors are permuted
    per head (new row j·H/2 + i ← old row 2i + j) on import, exactly as HF's converter does (spec §2.4),
    so HF weights load unchanged and Meta weights load through that permutation.
    """
    half = x.shape[-1] // 2
    angles = positions[..., None].astype(jnp.float32) * rope_frequencies(x.shape[-1], theta)
    angles = angles[:, :, None, :]  # broadcast over heads
    sin, cos = jnp.sin(angles), jnp.cos(angles)
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def attention_mask(q_segment_ids, kv_segment_ids, q_index, kv_index) -> jax.Array:
    """[B, T, S] bool: key s is visible to query t iff same non-padding segment and s <= t.

    Indices are row offsets (not per-document positions), so packed documents stay causal, and with a
    KV cache the query index is simply the cache offset.
    """
    same_segment = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
    not_pad = (q_segment_ids != 0)[:, :, None]
    causal = kv_index[:, None, :] <= q_index[:, :, None]
    return same_segment & not_pad & causal


def dot_product_attention(q, k, v, mask) -> jax.Array:
    """q [B,T,N,H], k/v [B,S,K,H], mask [B,T,S] -> [B,T,N,H]. Softmax in f32; scale 1/sqrt(H)."""
    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(b, t, kv_heads, n // kv_heads, h)
    scores = jnp.einsum("BTKGH,BSKH->BKGTS", q, k, preferred_element_type=jnp.float32)
    scores = scores * (h ** -0.5)
    scores = jnp.where(mask[:, None, None, :, :], scores, _MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v)
    return out.reshape(b, t, n, h)
