"""Next-token targets, loss masks and per-modality metrics."""

import jax
import jax.numpy as jnp
import numpy as np

from chameleon_jax.model import loss as loss_lib
from numerics import ELEMENTWISE, U, cross_entropy_tol

IMAGE_IDS = (4, 12)


def _batch(tokens, seg, mask=None):
    tokens = jnp.asarray(tokens, jnp.int32)[None]
    seg = jnp.asarray(seg, jnp.int32)[None]
    b = {"tokens": tokens, "segment_ids": seg}
    if mask is not None:
        b["loss_mask"] = jnp.asarray(mask, jnp.int32)[None]
    return b


def test_targets_never_cross_segments_or_padding():
    b = _batch([0, 20, 21, 0, 22, 5, 1], [1, 1, 1, 2, 2, 2, 0])
    targets, w = loss_lib.next_token_targets(b)
    np.testing.assert_array_equal(targets[0], [20, 21, 0, 22, 5, 1, 0])
    # position 2 -> next token is in segment 2; position 5 -> padding; last position has no successor
    np.testing.assert_array_equal(w[0], [1, 1, 0, 1, 1, 0, 0])


def test_loss_mask_selects_targets():
    b = _batch([0, 20, 21, 22], [1, 1, 1, 1], mask=[0, 0, 1, 1])
    _, w = loss_lib.next_token_targets(b)
    np.testing.assert_array_equal(w[0], [0, 1, 1, 0])


def test_per_modality_sums_and_z_loss_by_hand():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(1, 5, 32)) * 3, jnp.float32)
    b = _batch([0, 5, 20, 6, 21], [1, 1, 1, 1, 1])
    loss, sums = loss_lib.loss_and_metrics(logits, b, image_ids=IMAGE_IDS, z_loss_weight=1e-2)
    lg = np.asarray(logits[0], np.float64)
    lse = np.log(np.exp(lg).sum(-1))
    targets = [5, 20, 6, 21]
    nll = np.array([lse[i] - lg[i, t] for i, t in enumerate(targets)])
    expect = np.mean(nll + 1e-2 * lse[:4] ** 2)
    # fp32 against float64: logsumexp over 32 ids and a 4-token mean (the bound in tests/numerics.py).
    tol = cross_entropy_tol(lg[:4], 4, z_loss_weight=1e-2)
    np.testing.assert_allclose(float(loss), expect, rtol=0, atol=tol)
    assert float(sums["image/tokens"]) == 2 and float(sums["text/tokens"]) == 2
    np.testing.assert_allclose(float(sums["image/nll"]), nll[0] + nll[2], rtol=0, atol=2 * tol)  # 2-token sums
    np.testing.assert_allclose(float(sums["text/nll"]), nll[1] + nll[3], rtol=0, atol=2 * tol)
    acc = [float(np.argmax(lg[i]) == t) for i, t in enumerate(targets)]
    np.testing.assert_allclose(float(sums["image/correct"]), acc[0] + acc[2])
    summary = loss_lib.summarize(jax.device_get(sums))
    np.testing.assert_allclose(summary["image/loss"], (nll[0] + nll[2]) / 2, rtol=0, atol=2 * tol)
    # exp turns the mean's absolute error into a relative one (plus its own ulps)
    np.testing.assert_allclose(summary["text/perplexity"], np.exp((nll[1] + nll[3]) / 2),
                               rtol=2 * tol + ELEMENTWISE * U)


def test_image_range_is_half_open_at_both_ends():
    """The first and last image codes are images; the ids just outside are text (vocab: codes at
    [start, stop))."""
    start, stop = IMAGE_IDS
    ids = jnp.array([start - 1, start, stop - 1, stop])
    np.testing.assert_array_equal(loss_lib.is_image_token(ids, IMAGE_IDS), [False, True, True, False])
    # ...and the per-modality sums split there too.
    logits = jnp.zeros((1, 5, 16), jnp.float32)
    _, sums = loss_lib.loss_and_metrics(logits, _batch([0, start, stop - 1, start - 1, stop], [1] * 5),
                                        image_ids=IMAGE_IDS, z_loss_weight=0.0)
    assert float(sums["image/tokens"]) == 2 and float(sums["text/tokens"]) == 2
