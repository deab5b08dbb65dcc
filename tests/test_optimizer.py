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
    clipped = optax.clip_by_global_norm(1.0).update(grads, None)[0]
    np.testing.assert_allclose(optax.tree.norm(clipped), 1.0, rtol=1e-6)
