"""Model and train-step behaviour that the performance work must not change.

Sharding invariance across meshes, causal + segment masking, both block orders, z-loss by hand,
overfitting a fixed batch, and the hand-written backward passes (fused output/CE/z-loss, SwiGLU)
against plain autodiff.
"""
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from chameleon_jax import model as model_lib
from chameleon_jax.model import sharding as shd
from chameleon_jax.model.transformer import swiglu
from chameleon_jax.model import loss as loss_lib
from chameleon_jax.train import optimizer as opt_lib, step as step_lib
from numerics import ELEMENTWISE, U, attention_tol, chain_tol, cross_entropy_tol, gamma, transformer_lengths

IMAGE_IDS = (4, 4 + 64)


def tiny_cfg(**kw):
    # Heads (8) and kv heads (4) divisible by the tensor axis of every mesh below, GQA with 2 groups.
    base = dict(vocab_size=256, d_model=32, n_layers=2, n_heads=8, n_kv_heads=4, head_dim=8,
                ffn_dim=64, qk_norm_groups=2, scan_layers=True)
    base.update(kw)
    return model_lib.ModelConfig(**base)


def opt_cfg(lr=3e-3):
    return ml_collections.ConfigDict(dict(peak_lr=lr, warmup_steps=1, decay="constant",
                                          final_lr_fraction=1.0, b1=0.9, b2=0.95, eps=1e-5,
                                          weight_decay=0.1, clip_norm=1.0))


def packed_batch(b=8, t=16, seed=0, vocab=256):
    """Two documents per row (split at a row-dependent point) and padding at the end."""
    rng = np.random.default_rng(seed)
    seg = np.zeros((b, t), np.int32)
    pos = np.zeros((b, t), np.int32)
    for i in range(b):
        cut, end = min(4 + i % 5, t - 3), t - (i % 3)
        seg[i, :cut], seg[i, cut:end] = 1, 2
        pos[i, :cut], pos[i, cut:end] = np.arange(cut), np.arange(end - cut)
    return {"tokens": rng.integers(0, vocab, (b, t)).astype(np.int32), "segment_ids": seg,
            "positions": pos, "loss_mask": (seg != 0).astype(np.int32)}


def run_steps(cfg, mesh_shape, batch, steps=3):
    """Trains `steps` steps on one mesh; returns per-step losses and grad norms, and the params before/after."""
    devices = jax.devices()[:int(np.prod(mesh_shape))]
    mesh = shd.make_mesh(dict(zip(shd.MESH_AXES, mesh_shape)), devices)
    opt = opt_cfg()
    opt.warmup_steps = 0  # every step moves the params (a 1-step warm-up gives step 0 lr = 0)
    tx = opt_lib.make_optimizer(opt, 100)
    graphdef, _ = model_lib.abstract(cfg)
    state, shardings = step_lib.init_sharded_state(cfg, tx, mesh, jax.random.PRNGKey(0))
    declared = shd.named(mesh, model_lib.param_specs(cfg))
    for (path, leaf), want in zip(jax.tree_util.tree_leaves_with_path(state["params"]),
                                  jax.tree.leaves(declared)):
        assert leaf.sharding.is_equivalent_to(want, leaf.ndim), (jax.tree_util.keystr(path), leaf.sharding)
    initial = jax.device_get(state["params"])
    step = step_lib.jit_train_step(
        step_lib.make_train_step(graphdef, cfg, tx, step_lib.LossConfig(IMAGE_IDS)), mesh, shardings)
    losses, grad_norms = [], []
    with jax.set_mesh(mesh):
        batch = jax.device_put(batch, shd.batch_sharding(mesh))
        for _ in range(steps):
            state, metrics = step(state, batch)
            losses.append(float(metrics["loss"]))
            grad_norms.append(float(metrics["grad_norm"]))
    for leaf, want in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(declared)):
        assert leaf.sharding.is_equivalent_to(want, leaf.ndim)
    return np.array(losses), np.array(grad_norms), initial, jax.device_get(state["params"])


def _flat(params):
    return np.concatenate([np.ravel(x) for x in jax.tree.leaves(params)]).astype(np.float64)


def test_sharding_invariance_across_meshes():
    cfg, batch = tiny_cfg(n_layers=1, attention_block=4), packed_batch(t=8)  # two causal blocks
    ref_loss, ref_gn, p0, ref_p = run_steps(cfg, (1, 1, 1), batch)
    assert np.all(np.isfinite(ref_loss)) and ref_loss[-1] < ref_loss[0]
    n_params, tokens = _flat(p0).size, int(batch["loss_mask"].sum())
    fwd = transformer_lengths(cfg, context=8) + [cfg.vocab_size, tokens]  # + logsumexp, token mean
    update = np.linalg.norm(_flat(ref_p) - _flat(p0))
    for mesh_shape in [(8, 1, 1), (2, 2, 2), (1, 2, 4)]:
        loss, gn, _, params = run_steps(cfg, mesh_shape, batch)
        drift = np.linalg.norm(_flat(params) - _flat(ref_p))
        # Params: the meshes reorder the gradient reductions; Adam then amplifies the rounding only on
        # coordinates whose gradient is within rounding of 0, so the 2-norm drift stays far below the
        # update (measured 1e-6 per coordinate vs ~1e-2 moves). A sharding bug (a missing or doubled
        # reduction, a wrong axis) changes the update's direction: drift of the order of the update.
        assert drift < 1e-2 * update, (mesh_shape, drift, update)
        # Loss: the forward's any-order bound plus the first-order effect of the params' drift.
        np.testing.assert_allclose(loss, ref_loss, rtol=0, atol=chain_tol(ref_loss, fwd) + ref_gn.max() * drift,
                                   err_msg=f"mesh {mesh_shape}")
        # Grad norm: backward (twice the forward's path, plus the sum over the batch's tokens) and the
        # sum of n_params squares: ~3e-3 relative; the params' drift moves it far less. A missing
        # data-parallel reduction would scale it by up to 8x.
        bwd = 2 * fwd + [tokens, n_params]
        np.testing.assert_allclose(gn, ref_gn, rtol=0, atol=chain_tol(ref_gn, bwd),
                                   err_msg=f"mesh {mesh_shape}")


def _logits(cfg, params, batch):
    graphdef, _ = model_lib.abstract(cfg)
    fn = jax.jit(lambda p, b: model_lib.bind(graphdef, p).logits(b["tokens"], b["segment_ids"],
                                                                  b["positions"]))
    return np.asarray(fn(params, jax.tree.map(jnp.asarray, batch)))


@pytest.mark.parametrize("attention_block", [0, 3])  # one block, and causal blocks (ragged)
def test_masking_future_and_other_segments_are_invisible(attention_block):
    cfg = tiny_cfg(scan_layers=False, attention_block=attention_block)
    params = model_lib.init_params(cfg, jax.random.PRNGKey(1))
    batch = packed_batch(b=2, t=16)
    base = _logits(cfg, params, batch)
    cut = 4  # row 0: segment 1 is [0, 4), segment 2 is [4, 16)
    # A future token in segment 2 changes nothing before it...
    future = {k: v.copy() for k, v in batch.items()}
    future["tokens"][0, 10] = (future["tokens"][0, 10] + 1) % cfg.vocab_size
    out = _logits(cfg, params, future)
    # Hidden positions enter as exact zeros; only rounding may differ: the any-order bound of the model.
    tol = chain_tol(base, transformer_lengths(cfg, context=16))
    np.testing.assert_allclose(out[0, :10], base[0, :10], rtol=0, atol=tol)
    assert np.abs(out[0, 10:] - base[0, 10:]).max() > 1e-4  # ...and does change what follows
    # A token of segment 1 is invisible to all of segment 2, and the other row is untouched.
    other = {k: v.copy() for k, v in batch.items()}
    other["tokens"][0, 1] = (other["tokens"][0, 1] + 1) % cfg.vocab_size
    out = _logits(cfg, params, other)
    np.testing.assert_allclose(out[0, cut:], base[0, cut:], rtol=0, atol=tol)
    np.testing.assert_allclose(out[1], base[1], rtol=0, atol=tol)
    assert np.abs(out[0, 1:cut] - base[0, 1:cut]).max() > 1e-4


def test_both_block_orders_run_and_differ():
    batch = packed_batch(b=2, t=16)
    outs = {}
    for order in ("prenorm", "swin"):
        cfg = tiny_cfg(block_order=order)
        outs[order] = _logits(cfg, model_lib.init_params(cfg, jax.random.PRNGKey(2)), batch)
        assert np.all(np.isfinite(outs[order]))
    assert np.abs(outs["prenorm"] - outs["swin"]).max() > 1e-3


def test_z_loss_matches_hand_computation():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(2, 6, 11)).astype(np.float32) * 3
    batch = {"tokens": rng.integers(0, 11, (2, 6)).astype(np.int32),
             "segment_ids": np.array([[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 1, 1]], np.int32),
             "loss_mask": np.array([[1, 1, 1, 1, 1, 0], [1, 0, 1, 1, 1, 1]], np.int32)}
    w = 1e-2
    loss, sums = loss_lib.loss_and_metrics(jnp.asarray(logits), batch, image_ids=(4, 6), z_loss_weight=w)
    total, count, zsum = 0.0, 0, 0.0
    for b in range(2):
        for t in range(5):
            seg, nxt = batch["segment_ids"][b, t], batch["segment_ids"][b, t + 1]
            if seg != nxt or nxt == 0 or not batch["loss_mask"][b, t + 1]:
                continue
            row = logits[b, t].astype(np.float64)
            lse = np.log(np.exp(row - row.max()).sum()) + row.max()
            total += lse - row[batch["tokens"][b, t + 1]] + w * lse ** 2
            zsum += w * lse ** 2
            count += 1
    assert count == 7
    # fp32 against a float64 reference: logsumexp over 11 ids, the mean over 7 tokens.
    tol = cross_entropy_tol(logits, count, z_loss_weight=w)
    np.testing.assert_allclose(float(loss), total / count, rtol=0, atol=tol)
    np.testing.assert_allclose(float(sums["z_loss"]), zsum, rtol=0, atol=tol * count)  # a sum, not a mean


def test_tiny_model_overfits_a_fixed_batch():
    cfg = tiny_cfg(n_layers=1)
    tx = opt_lib.make_optimizer(opt_cfg(1e-2), 100)
    graphdef, _ = model_lib.abstract(cfg)
    state = step_lib.init_state(cfg, tx, jax.random.PRNGKey(0))
    step = jax.jit(step_lib.make_train_step(graphdef, cfg, tx, step_lib.LossConfig(IMAGE_IDS)))
    batch = jax.device_put(packed_batch(b=4, t=16))
    first = None
    for _ in range(60):
        state, metrics = step(state, batch)
        first = first if first is not None else float(metrics["nll"] / metrics["tokens"])
    last = float(metrics["nll"] / metrics["tokens"])
    assert first > 5.0 and last < 0.5, (first, last)


@pytest.mark.parametrize("chunk", [3, 16])
def test_fused_output_loss_matches_plain_value_and_gradient(chunk):
    rng = np.random.default_rng(4)
    h = jnp.asarray(rng.normal(size=(2, 16, 8)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(8, 80)), jnp.float32)
    batch = jax.tree.map(jnp.asarray, packed_batch(b=2, t=16, vocab=80))

    def plain(h, w):
        return loss_lib.loss_and_metrics(jnp.einsum("BTD,DV->BTV", h, w), batch, image_ids=(4, 40),
                                         z_loss_weight=1e-2)

    def fused(h, w):
        return loss_lib.fused_loss_and_metrics(h, w, batch, image_ids=(4, 40), z_loss_weight=1e-2,
                                               chunk=chunk)

    (l1, s1), g1 = jax.value_and_grad(plain, (0, 1), has_aux=True)(h, w)
    (l2, s2), g2 = jax.jit(jax.value_and_grad(fused, (0, 1), has_aux=True))(h, w)
    # Both in fp32 with different contraction orders (chunks of the vocabulary): the logits' D-term
    # dot, then the loss's bound over V=80 ids and the token mean, on each side.
    logits = np.einsum("BTD,DV->BTV", np.float64(h), np.float64(w))
    abs_logits = np.einsum("BTD,DV->BTV", np.abs(np.float64(h)), np.abs(np.float64(w)))
    targets, weights = (np.asarray(x) for x in loss_lib.next_token_targets(batch))
    count = int(weights.sum())
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    z_gain = 1 + 2e-2 * np.abs(lse).max()
    loss_tol = cross_entropy_tol(logits, count, 1e-2, sides=2) + 2 * gamma(8) * abs_logits.max() * z_gain
    np.testing.assert_allclose(l2, l1, rtol=0, atol=loss_tol)
    # Gradients, elementwise (Higham's |A||B| form): d logits = (softmax + onehot)·weight/count, each
    # softmax entry off by its own relative error; then dh sums V terms and dw sums B·T terms.
    probs = np.exp(logits - lse[..., None])
    onehot = np.eye(80)[targets]
    d_logits = (probs * z_gain + onehot) * weights[..., None] / count
    n = 8 + 80 + 32 + 2 * ELEMENTWISE
    spread = 1 + (logits.max(-1) - logits.min(-1)).max() + np.abs(lse).max()
    bound_h = 2 * gamma(n) * spread * np.einsum("BTV,DV->BTD", d_logits, np.abs(np.float64(w)))
    bound_w = 2 * gamma(n) * spread * np.einsum("BTD,BTV->DV", np.abs(np.float64(h)), d_logits)
    for a, b, bound in zip(g2, g1, (bound_h, bound_w)):
        assert (np.abs(np.float64(a) - np.float64(b)) <= bound + 1e-30).all(), np.abs(np.float64(a) - b).max()
    for k in s1:  # sums over tokens: count times the mean's bound
        np.testing.assert_allclose(s2[k], s1[k], rtol=0, atol=loss_tol * count, err_msg=k)
    np.testing.assert_allclose(jax.jit(fused)(h, w)[0], l1, rtol=0, atol=loss_tol)  # primal (no-grad) path too


def test_swiglu_backward_matches_autodiff():
    rng = np.random.default_rng(5)
    x, w1, w3, w2 = (jnp.asarray(rng.normal(size=s), jnp.float32)
                     for s in [(2, 5, 8), (8, 12), (8, 12), (12, 8)])
    cot = jnp.asarray(rng.normal(size=(2, 5, 8)), jnp.float32)

    def plain(x, w1, w3, w2):
        return jnp.einsum("BTF,FD->BTD", jax.nn.silu(x @ w1) * (x @ w3), w2)

    ref = jax.vjp(plain, x, w1, w3, w2)
    out = jax.vjp(swiglu, x, w1, w3, w2)
    # Higham's |A||B| bounds: the same network on absolute values (|silu(a)| <= |a|, |silu'| <= 1.1)
    # bounds every sum's sum|terms|; the longest path is 8 + 12 terms forward, 8 + 12 + 12 + 8 backward.
    absolute = [jnp.abs(a) for a in (x, w1, w3, w2)]
    abs_out, abs_vjp = jax.vjp(lambda x, w1, w3, w2: 1.1 * (x @ w1) * (x @ w3) @ w2, *absolute)
    np.testing.assert_allclose(out[0], ref[0], rtol=0, atol=2 * gamma(8 + 12 + 2 * ELEMENTWISE) * abs_out.max())
    for a, b, bound in zip(out[1](cot), ref[1](cot), abs_vjp(jnp.abs(cot))):
        np.testing.assert_allclose(a, b, rtol=0, atol=2 * gamma(40 + 4 * ELEMENTWISE) * 1.1 * float(bound.max()))


@pytest.mark.parametrize("block,kv_heads", [(4, 4), (5, 2), (16, 8)])
def test_causal_block_attention_matches_full_attention(block, kv_heads):
    """Skipping the blocks above the diagonal changes neither outputs nor gradients, for packed rows,
    padding, GQA and a ragged last block (t=18 with block 4 or 5)."""
    from chameleon_jax.model.attention import attention_mask, causal_self_attention, dot_product_attention
    rng = np.random.default_rng(6)
    b, t, n, h = 3, 18, 8, 4
    batch = packed_batch(b, t, seed=6)
    seg = jnp.asarray(batch["segment_ids"])
    index = jnp.broadcast_to(jnp.arange(t), (b, t))
    mask = attention_mask(seg, seg, index, index)
    q = jnp.asarray(rng.normal(size=(b, t, n, h)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(b, t, kv_heads, h)), jnp.float32) for _ in range(2))
    real = np.asarray(seg != 0)  # padding rows are never used; both give a uniform average there
    cot = jnp.asarray(rng.normal(size=(b, t, n, h)), jnp.float32) * jnp.asarray(real)[:, :, None, None]

    # Outputs and input gradients in one compiled program per side: op by op, every block's differently
    # shaped ops were compiled one at a time. The tolerances below hold for any evaluation order.
    @functools.partial(jax.jit, static_argnames="blocked")
    def value_and_vjp(q, k, v, cot, blocked):
        fn = (lambda *a: causal_self_attention(*a, mask, block)) if blocked else \
            (lambda *a: dot_product_attention(*a, mask))
        out, vjp = jax.vjp(fn, q, k, v)
        return out, vjp(cot)

    out, grads = value_and_vjp(q, k, v, cot, True)
    ref, ref_grads = value_and_vjp(q, k, v, cot, False)
    # The blocks split the softmax's sums over keys: the any-order bound of attention over t=18 keys.
    np.testing.assert_allclose(np.asarray(out)[real], np.asarray(ref)[real], rtol=0, atol=attention_tol(q, k, v))
    for a, r in zip(grads, ref_grads):
        np.testing.assert_allclose(a, r, rtol=0, atol=attention_tol(q, k, v, cot))


def test_rope_backward_is_the_inverse_rotation():
    from chameleon_jax.model import attention
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.normal(size=(2, 6, 3, 8)), jnp.float32)
    pos = jnp.asarray(rng.integers(0, 50, (2, 6)), jnp.int32)
    cot = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
    angles = (pos[..., None] * attention.rope_frequencies(8, 10_000.0))[:, :, None, :]
    out, vjp = jax.vjp(lambda x: attention.apply_rope(x, attention.rope_table(pos, 8, 10_000.0, size=50)), x)
    ref, ref_vjp = jax.vjp(lambda x: attention._rotate_impl(x, jnp.cos(angles), jnp.sin(angles)), x)
    # cos/sin from numpy's table vs XLA's kernels (each within ELEMENTWISE ulps of the same f32 angle,
    # |angle| <= 50), then a 2-term rotation x*cos -+ y*sin, per side.
    rel = 2 * (ELEMENTWISE * U + gamma(2))
    np.testing.assert_allclose(out, ref, rtol=0, atol=rel * 2 * float(jnp.abs(x).max()))
    np.testing.assert_allclose(vjp(cot)[0], ref_vjp(cot)[0], rtol=0, atol=rel * 2 * float(jnp.abs(cot).max()))
    # a rotation keeps norms, so its vjp does too: the rotation's error plus two 8-term sums of squares
    np.testing.assert_allclose(jnp.linalg.norm(vjp(cot)[0], axis=-1), jnp.linalg.norm(cot, axis=-1),
                               rtol=2 * rel + 2 * gamma(8 + ELEMENTWISE))


def test_rope_table_matches_in_graph_angles_and_flags_positions_past_its_size():
    from chameleon_jax.model import attention
    pos = jnp.asarray([[0, 1, 2, 4095], [7, 100, 4096, 3]], jnp.int32)
    cos, sin = attention.rope_table(pos, 128, 10_000.0, size=4096)
    angles = (pos[..., None].astype(jnp.float32) * jnp.asarray(attention.rope_frequencies(128, 10_000.0)))
    valid = np.asarray(pos < 4096)
    # The same f32 product pos*freq on both sides (one correctly rounded multiply); numpy may evaluate
    # cos/sin of the two arrays in its SIMD loop (<= 1.5 ulp) or its scalar tail (libm, < 1 ulp):
    # ELEMENTWISE ulps of values in [-1, 1] per side.
    tol = 2 * ELEMENTWISE * U
    np.testing.assert_allclose(np.asarray(cos[:, :, 0])[valid], np.cos(np.asarray(angles))[valid], rtol=0, atol=tol)
    np.testing.assert_allclose(np.asarray(sin[:, :, 0])[valid], np.sin(np.asarray(angles))[valid], rtol=0, atol=tol)
    assert np.isnan(np.asarray(cos[1, 2])).all() and np.isnan(np.asarray(sin[1, 2])).all()
