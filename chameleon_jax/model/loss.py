"""The model's objective: next-token cross-entropy with z-loss, and per-modality metrics (spec §2.6,
paper §2.3). Training minimises it and evaluation reports it, so it sits below both.

Everything is a pure function of arrays. Metrics are returned as *sums and counts* so that a logging
window (or an eval set) aggregates exactly; `summarize` turns them into means.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from chameleon_jax.data.batch import Batch  # the batch format: int32 [B, L] tokens, segment_ids, ...


@dataclasses.dataclass(frozen=True)
class LossConfig:
    image_ids: tuple[int, int]
    z_loss_weight: float = 1e-5

    @classmethod
    def from_config(cls, cfg) -> "LossConfig":
        return cls(image_ids=tuple(cfg.image_ids), z_loss_weight=float(cfg.z_loss_weight))


def next_token_targets(batch: Batch) -> tuple[jax.Array, jax.Array]:
    """Targets [B, T] (token t+1 at position t) and their weights.

    A position contributes iff its successor is in the same non-padding segment and the successor
    is marked loss-bearing. Shifting the targets (not the logits) avoids copying the [B, T, V] logits.
    """
    tokens, seg = batch["tokens"], batch["segment_ids"]
    loss_mask = batch.get("loss_mask")
    if loss_mask is None:
        loss_mask = jnp.ones_like(tokens)
    targets = jnp.pad(tokens[:, 1:], ((0, 0), (0, 1)))
    next_seg = jnp.pad(seg[:, 1:], ((0, 0), (0, 1)))
    next_mask = jnp.pad(loss_mask[:, 1:], ((0, 0), (0, 1)))
    weights = (seg == next_seg) & (next_seg != 0) & (next_mask != 0)
    return targets, weights.astype(jnp.float32)


def cross_entropy_terms(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-token (nll, logsumexp, correct) from f32 logits [B, T, V]."""
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return lse - target_logit, lse, correct


def is_image_token(ids: jax.Array, image_ids: tuple[int, int]) -> jax.Array:
    """Modality from the id alone: image codes occupy the contiguous range [start, stop)."""
    start, stop = image_ids
    return (ids >= start) & (ids < stop)


def loss_and_metrics(logits, batch: Batch, *, image_ids: tuple[int, int], z_loss_weight: float = 1e-5):
    """Scalar training loss (mean over loss-bearing tokens of nll + w·lse²) and metric sums."""
    targets, weights = next_token_targets(batch)
    nll, lse, correct = cross_entropy_terms(logits, targets)
    return _reduce(nll, lse, correct, targets, weights, image_ids, z_loss_weight)


def _reduce(nll, lse, correct, targets, weights, image_ids, z_loss_weight):
    count = jnp.maximum(weights.sum(), 1.0)
    z = jnp.square(lse)
    loss = ((nll + z_loss_weight * z) * weights).sum() / count
    image = is_image_token(targets, image_ids).astype(jnp.float32) * weights
    text = weights - image
    sums = {
        "tokens": weights.sum(),
        "nll": (nll * weights).sum(),
        "z_loss": (z * weights).sum() * z_loss_weight,
        "text/tokens": text.sum(),
        "text/nll": (nll * text).sum(),
        "text/correct": (correct * text).sum(),
        "image/tokens": image.sum(),
        "image/nll": (nll * image).sum(),
        "image/correct": (correct * image).sum(),
    }
    return loss, sums


def summarize(sums: dict) -> dict:
    """Means from accumulated sums: loss, z_loss, and per-modality loss / accuracy / perplexity."""
    out = {}
    n = max(float(sums["tokens"]), 1.0)
    out["nll"] = float(sums["nll"]) / n
    out["z_loss"] = float(sums["z_loss"]) / n
    for m in ("text", "image"):
        k = float(sums[f"{m}/tokens"])
        if k > 0:
            out[f"{m}/loss"] = float(sums[f"{m}/nll"]) / k
            out[f"{m}/accuracy"] = float(sums[f"{m}/correct"]) / k
            out[f"{m}/perplexity"] = float(jnp.exp(out[f"{m}/loss"]))
    return out


# ---------------------------------------------------------------------------------------------------
# Fused output projection + cross-entropy + z-loss.
#
# The plain path materialises f32 logits [B, T, V] and lets autodiff walk them again several times
# (softmax, its transpose for the weight gradient, the dlogits buffer). On XLA:CPU that backward ran
# at ~4.7x its forward (docs stack.md). Here the loss is computed chunk by chunk along T, so one
# [B, c, V] block is live at a time, and under differentiation each chunk's gradient with respect
# to its logits, w·((1 + 2·z·lse)·softmax − onehot), is formed analytically while the block is hot
# and contracted at once into dh and dW. The backward rule only scales those by the cotangent.
# ---------------------------------------------------------------------------------------------------

def _chunk_bounds(length: int, chunk: int) -> list[tuple[int, int]]:
    chunk = max(1, min(chunk, length))
    return [(s, min(s + chunk, length)) for s in range(0, length, chunk)]


def _chunk_logits(h_c, w):
    return jnp.einsum("BcD,DV->BcV", h_c, w, preferred_element_type=jnp.float32)


def _chunk_terms(logits, targets_c):
    """(lse, target logit, correct) of one chunk; `correct` counts a tie at the max as a hit."""
    top = jnp.max(logits, axis=-1)
    lse = top + jnp.log(jnp.sum(jnp.exp(logits - top[..., None]), axis=-1))
    target_logit = jnp.take_along_axis(logits, targets_c[..., None], axis=-1)[..., 0]
    return lse, target_logit, (target_logit >= top).astype(jnp.float32)


def _output_ce_fwd_impl(h, w, targets, weights, z_loss_weight, chunk, with_grads):
    nll, lse, correct, dh, dw = [], [], [], [], None
    for s, e in _chunk_bounds(h.shape[1], chunk):
        h_c, t_c = h[:, s:e], targets[:, s:e]
        logits = _chunk_logits(h_c, w)
        lse_c, tgt_c, cor_c = _chunk_terms(logits, t_c)
        nll.append(lse_c - tgt_c)
        lse.append(lse_c)
        correct.append(cor_c)
        if with_grads:
            # d/dlogits of w·(lse − logit[target] + z·lse²) = w·((1 + 2z·lse)·softmax − onehot).
            scale = weights[:, s:e] * (1.0 + 2.0 * z_loss_weight * lse_c)
            probs = jnp.exp(logits - lse_c[..., None])
            onehot = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 2) == t_c[..., None]
            dlogits = scale[..., None] * probs - jnp.where(onehot, weights[:, s:e, None], 0.0)
            dlogits = dlogits.astype(h.dtype)
            dh.append(jnp.einsum("BcV,DV->BcD", dlogits, w, preferred_element_type=jnp.float32))
            dw_c = jnp.einsum("BcD,BcV->DV", h_c, dlogits, preferred_element_type=jnp.float32)
            dw = dw_c if dw is None else dw + dw_c
    nll, lse, correct = (jnp.concatenate(a, axis=1) for a in (nll, lse, correct))
    per_token = nll + z_loss_weight * jnp.square(lse)
    loss = jnp.sum(per_token * weights)
    grads = (jnp.concatenate(dh, axis=1), dw, per_token) if with_grads else None
    return (loss, nll, lse, correct), grads


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _output_ce(h, w, targets, weights, z_loss_weight, chunk):
    return _output_ce_fwd_impl(h, w, targets, weights, z_loss_weight, chunk, False)[0]


def _output_ce_fwd(h, w, targets, weights, z_loss_weight, chunk):
    out, (dh, dw, per_token) = _output_ce_fwd_impl(h, w, targets, weights, z_loss_weight, chunk, True)
    return out, (dh.astype(h.dtype), dw.astype(w.dtype), per_token)


def _output_ce_bwd(z_loss_weight, chunk, res, cotangents):
    # Only the scalar loss is differentiable; the per-token outputs leave through stop_gradient.
    dh, dw, per_token = res
    g = cotangents[0]
    return (g * dh).astype(dh.dtype), (g * dw).astype(dw.dtype), None, g * per_token


_output_ce.defvjp(_output_ce_fwd, _output_ce_bwd)


def fused_loss_and_metrics(h, w_out, batch: Batch, *, image_ids: tuple[int, int],
                           z_loss_weight: float = 1e-5, chunk: int = 128):
    """`loss_and_metrics(h @ w_out, batch)` without materialising the [B, T, V] logits.

    h is the final-normed hidden state [B, T, D]; w_out the output projection [D, V]. `chunk` is the
    number of positions per block along T (B·chunk tokens at a time). Same loss and gradients as the
    plain path up to fp32 rounding; `correct` counts ties at the max as hits (argmax takes the first).

    Mixed precision: h and w_out enter in the activation dtype (bf16 when model.dtype is). The logits
    accumulate into fp32 (preferred_element_type), and the softmax, logsumexp, z-loss and loss after
    them are fp32. Only dlogits is rounded to h's dtype, for the two backward matmuls.
    """
    targets, weights = next_token_targets(batch)
    count = jnp.maximum(weights.sum(), 1.0)
    z_loss_weight = float(z_loss_weight)
    loss, nll, lse, correct = _output_ce(h, w_out.astype(h.dtype), targets, weights / count,
                                         z_loss_weight, chunk)
    nll, lse, correct = (jax.lax.stop_gradient(a) for a in (nll, lse, correct))
    _, sums = _reduce(nll, lse, correct, targets, weights, image_ids, z_loss_weight)
    return loss, sums
