"""Dot-product attention restricted to causal, same-segment pairs, plus rotary embeddings.

Dimension letters: B batch, T query length, S key length, N query heads, K kv heads,
G query heads per kv head (N = K·G), H head_dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# Large finite negative rather than -inf: a fully masked row (padding) then softmaxes to a uniform
# distribution instead of NaN, and its output is never used.
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def rope_frequencies(head_dim: int, theta: float) -> np.ndarray:
    """Inverse frequencies θ^(-2i/H), i < H/2, in f32 exactly as HF's Chameleon computes them."""
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    return (np.float32(1.0) / (np.float32(theta) ** exponents)).astype(np.float32)


def rope_table(positions: jax.Array, head_dim: int, theta: float, size: int) -> tuple[jax.Array, jax.Array]:
    """(cos, sin) of the rotary angles, [B, T, 1, H/2], for integer positions in [0, size).

    The angles of every position below `size` are a constant built at trace time (numpy, f32 like
    HF), and the batch's rows are gathered from it. Computing cos/sin of `positions` in the graph
    instead cost two transcendentals per element of q and k: XLA fuses that cheap-looking producer
    into each of its 32 consumers (8 layers x q,k x fwd,bwd in benchmarks/bench_train_step.py) and
    evaluates it per head; the gathered table made 16 rotations fwd+bwd of [4,512,8,64] 3x faster
    (127-151 ms -> 42-47 ms, measured 2026-11-26). Positions at or above `size` gather NaN, so a
    wrong position is loud rather than silently clamped. Callers pass the sequence length (training:
    positions restart per segment, so they stay below it) or the KV-cache length (decoding).
    """
    angles = np.arange(size, dtype=np.float32)[:, None] * rope_frequencies(head_dim, theta)[None, :]

    def gather(table):
        rows = jnp.take(jnp.asarray(table, jnp.float32), positions, axis=0, mode="fill", fill_value=jnp.nan)
        return rows[:, :, None, :]  # broadcast over heads
    return gather(np.cos(angles)), gather(np.sin(angles))


def apply_rope(x: jax.Array, rope: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Rotates x [B, T, *, H] by the angles of `rope_table`.

    Pairing layout: half-split, i.e. dim i rotates with dim i + H/2 (HF transformers' `rotate_half`).
    Meta's release pairs adjacent dims (2i, 2i+1); its wq/wk rows and q/k-norm vectors are permuted
    per head (new row j·H/2 + i ← old row 2i + j) on import, exactly as HF's converter does (spec §2.4),
    so HF weights load unchanged and Meta weights load through that permutation.
    """
    return _rotate(x, *rope)


def _rotate_impl(x, cos, sin):
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


@jax.custom_vjp
def _rotate(x, cos, sin):
    return _rotate_impl(x, cos, sin)


def _rotate_fwd(x, cos, sin):
    return _rotate_impl(x, cos, sin), (cos, sin)


def _rotate_bwd(res, dy):
    # A rotation's transpose is the rotation by the opposite angle: one fused elementwise pass,
    # where autodiff of the slices and the concatenate left pads and adds over [B, T, N, H].
    # The angles come from integer positions, so they get no gradient.
    cos, sin = res
    return _rotate_impl(dy, cos, -sin), jnp.zeros_like(cos), jnp.zeros_like(sin)


_rotate.defvjp(_rotate_fwd, _rotate_bwd)


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


def causal_self_attention(q, k, v, mask, block: int) -> jax.Array:
    """Self-attention (key s and query t index the same rows) that skips the blocks above the diagonal.

    Queries are cut into blocks of `block` rows; block i attends only to keys [0, end of block i),
    since later keys are masked out anyway. With 8 blocks this does 56% of the score/value FLOPs of
    `dot_product_attention`, and it works head-major ([B, K, G, T, H], transposed once), where
    XLA:CPU's batched matmuls with a 64-wide contraction ran ~1.6x faster than token-major: together
    the attention's forward+backward took 0.7-0.8 s instead of 1.6-1.8 s for 8 layers of the
    train-step benchmark (benchmarks/bench_train_step.py shapes, measured 2026-11-26).
    Same result as `dot_product_attention(q, k, v, mask)` for any mask that is causal in row
    offsets (the training mask is), since each row's softmax still sees all its visible keys.
    """
    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    if block <= 0 or block >= t:
        return dot_product_attention(q, k, v, mask)
    q = q.reshape(b, t, kv_heads, n // kv_heads, h).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, H]
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)                    # [B, K, S, H]
    outs = []
    for start in range(0, t, block):
        end = min(start + block, t)
        scores = jnp.einsum("BKGTH,BKSH->BKGTS", q[:, :, :, start:end], k[:, :, :end],
                            preferred_element_type=jnp.float32) * (h ** -0.5)
        scores = jnp.where(mask[:, None, None, start:end, :end], scores, _MASK_VALUE)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        outs.append(jnp.einsum("BKGTS,BKSH->BKGTH", probs, v[:, :, :end]))
    out = jnp.concatenate(outs, axis=3)                                         # [B, K, G, T, H]
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)
