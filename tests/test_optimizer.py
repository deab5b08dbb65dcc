"""AdamW settings, weight-decay mask and learning-rate schedules (spec §3.1)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from chameleon_jax.config import base_config
from chameleon_jax.model import ModelConfig, init_params
from chameleon_jax.train import optimizer
from numerics import gamma


def _opt(**kw):
    c = base_config().optimizer
    c.update(kw)
    return c


def test_schedule_warms_up_linearly_then_decays_towards_zero():
    sched = optimizer.learning_rate_schedule(_opt(peak_lr=1e-3, warmup_steps=10), total_steps=110)
    assert float(sched(0)) == 0.0
    np.testing.assert_allclose(float(sched(5)), 5e-4, rtol=1e-6)
    np.testing.assert_allclose(float(sched(10)), 1e-3, rtol=1e-6)
    lrs = [float(sched(s)) for s in range(10, 111, 10)]
    assert all(a > b for a, b in zip(lrs, lrs[1:])), lrs
    np.testing.assert_allclose(lrs[-1], 1e-5, rtol=1e-4)  # final_lr_fraction 1%
    # exponential: equal ratios over equal intervals
    np.testing.assert_allclose(lrs[1] / lrs[0], lrs[6] / lrs[5], rtol=1e-4)


def test_cosine_and_bad_decay_name():
    sched = optimizer.learning_rate_schedule(_opt(peak_lr=1.0, warmup_steps=0, decay="cosine"), 100)
    np.testing.assert_allclose(float(sched(50)), 0.505, rtol=1e-3)
    with pytest.raises(ValueError, match="choose one of"):
        optimizer.learning_rate_schedule(_opt(decay="linear"), 100)


def test_weight_decay_applies_to_matrices_and_embeddings_only():
    cfg = ModelConfig(vocab_size=64, d_model=16, n_layers=2, n_heads=2, n_kv_heads=2, head_dim=8,
                      ffn_dim=32, qk_norm_groups=2)
    params = init_params(cfg, jax.random.PRNGKey(0))
    mask = optimizer.weight_decay_mask(params)
    assert mask["embedding"] and mask["output"]
    assert mask["blocks"]["attention"]["wq"] and mask["blocks"]["mlp"]["w2"]
    assert not mask["final_norm"]["scale"]
    assert not mask["blocks"]["attention_norm"]["scale"]  # 2-D once stacked, still no decay
    assert not mask["blocks"]["attention"]["q_norm"]["scale"]
    assert not mask["blocks"]["attention"]["k_norm"]["bias"]


def test_adamw_update_matches_hand_computation_and_clips():
    opt = _opt(peak_lr=0.1, warmup_steps=0, decay="constant", weight_decay=0.1, clip_norm=1.0)
    tx = optimizer.make_optimizer(opt, 10)
    params = {"w": jnp.ones((2, 2)), "norm": {"scale": jnp.ones((2,))}}
    grads = {"w": jnp.full((2, 2), 3.0), "norm": {"scale": jnp.full((2,), 4.0)}}
    state = tx.init(params)
    updates, _ = tx.update(grads, state, params)
    # First Adam step: m̂/(sqrt(v̂)+eps) = sign(g) (|g| >> eps), after clipping the direction is unchanged.
    np.testing.assert_allclose(updates["w"], -0.1 * (1.0 / (1.0 + 1e-5 / (3 / np.sqrt(52))) + 0.1 * 1.0),
                               rtol=1e-4)
    np.testing.assert_allclose(updates["norm"]["scale"], -0.1 / (1.0 + 1e-5 / (4 / np.sqrt(52))), rtol=1e-4)



def _adamw_reference(grads_seq, params, *, lr, b1, b2, eps, wd, clip, decay_mask):
    """AdamW with global-norm clipping written out in float64 (Loshchilov & Hutter; spec §3.1)."""
    p = {k: np.float64(v) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    for t, g in enumerate(grads_seq, start=1):
        g = {k: np.float64(x) for k, x in g.items()}
        norm = np.sqrt(sum((x ** 2).sum() for x in g.values()))
        g = {k: x * min(1.0, clip / norm) for k, x in g.items()}
        for k in p:
            m[k] = b1 * m[k] + (1 - b1) * g[k]
            v[k] = b2 * v[k] + (1 - b2) * g[k] ** 2
            step = (m[k] / (1 - b1 ** t)) / (np.sqrt(v[k] / (1 - b2 ** t)) + eps)
            p[k] = p[k] - lr * (step + (wd * p[k] if decay_mask[k] else 0.0))
    return p


def test_three_adamw_steps_match_a_float64_reference_with_clipping_eps_and_betas_visible():
    settings = dict(lr=0.1, b1=0.8, b2=0.9, eps=1e-3, wd=0.1, clip=1.0)  # not the defaults: each is read
    opt = _opt(peak_lr=settings["lr"], warmup_steps=0, decay="constant", b1=settings["b1"], b2=settings["b2"],
               eps=settings["eps"], weight_decay=settings["wd"], clip_norm=settings["clip"])
    tx = optimizer.make_optimizer(opt, 10)
    rng = np.random.default_rng(0)
    params = {"w": rng.normal(size=(3, 4)).astype(np.float32), "final_norm": np.ones(4, np.float32)}
    # Step 1 is far above the clip norm, step 2 below it (clipping changes their relative weight in m
    # and v), step 3 has coordinates near eps; signs vary so b1 and b2 shape every later step.
    grads_seq = [{k: (rng.normal(size=x.shape) * scale).astype(np.float32) for k, x in params.items()}
                 for scale in (30.0, 0.3, 3e-3)]
    state, got = tx.init(params), jax.tree.map(jnp.asarray, params)
    for g in grads_seq:
        updates, state = tx.update(jax.tree.map(jnp.asarray, g), state, got)
        got = optax.apply_updates(got, updates)
    mask = {"w": True, "final_norm": False}  # optimizer.weight_decay_mask: matrices decay, norms do not
    want = _adamw_reference(grads_seq, params, decay_mask=mask, **settings)
    # fp32 against float64: the global norm sums 16 squares, then ~10 roundings per coordinate and
    # step through m, v, the bias corrections, sqrt and the division, each feeding the next step; the
    # division by sqrt(v) + eps can amplify a relative error by at most 2 (v's error halves in sqrt).
    # The moves are lr * O(1) per step: bound on the params' difference, relative to the moves' size.
    tol = 3 * settings["lr"] * 2 * gamma(16 + 10 * 3) * 4
    for k in params:
        np.testing.assert_allclose(np.asarray(got[k], np.float64), want[k], rtol=0, atol=tol, err_msg=k)
    # Each setting matters at this tolerance: without clipping, or with another eps/b1/b2, the result
    # moves far outside it.
    for change in (dict(clip=1e9), dict(eps=1e-8), dict(b1=0.9), dict(b2=0.95), dict(wd=0.0)):
        other = _adamw_reference(grads_seq, params, decay_mask=mask, **{**settings, **change})
        assert max(np.abs(other[k] - want[k]).max() for k in params) > 100 * tol, change
