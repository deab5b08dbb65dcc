"""Next-token cross-entropy with z-loss, and per-modality metrics (spec §2.6, paper §2.3).

Everything is a pure function of arrays. Metrics are returned as *sums and counts* so that a logging
window (or an eval set) aggregates exactly; `summarize` turns them into means.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Batch = dict[str, jax.Array]


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
