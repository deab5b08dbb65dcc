"""Gradient accumulation over microbatches gives the same update as the one-shot step."""

import jax
import numpy as np

from chameleon_jax.model import ModelConfig, abstract
from chameleon_jax.model import sharding as shd
from chameleon_jax.train import step as step_lib
from chameleon_jax.config import base_config
from chameleon_jax.train import optimizer


def test_microbatched_step_matches_full_batch_step():
    cfg = ModelConfig(vocab_size=128, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                      ffn_dim=64, qk_norm_groups=2, block_order="swin", scan_layers=True)
    opt = base_config().optimizer
    opt.update(peak_lr=1e-2, warmup_steps=0, decay="constant")
    tx = optimizer.make_optimizer(opt, 10)
    mesh = shd.make_mesh({"data": 2, "fsdp": 2, "tensor": 1}, jax.devices()[:4])
    graphdef, _ = abstract(cfg)
    loss_cfg = step_lib.LossConfig(image_ids=(4, 36))
    rng = np.random.default_rng(0)
    seg = np.ones((8, 16), np.int32)
    seg[:, 10:] = 2
    seg[1, 12:] = 0  # padding rows make microbatch token counts unequal: weighting matters
    batch = {"tokens": rng.integers(0, 128, (8, 16)).astype(np.int32), "segment_ids": seg,
             "positions": np.where(seg == 2, np.arange(16) - 10, np.arange(16)).astype(np.int32),
             "loss_mask": (seg > 0).astype(np.int32)}
    results = {}
    for micro in (1, 4):
        state, shardings = step_lib.init_sharded_state(cfg, tx, mesh, jax.random.PRNGKey(0))
        step = step_lib.jit_train_step(
            step_lib.make_train_step(graphdef, cfg, tx, loss_cfg, microbatches=micro), mesh, shardings)
        with jax.set_mesh(mesh):
            state, metrics = step(state, jax.device_put(batch, shd.batch_sharding(mesh)))
        results[micro] = (jax.device_get(state["params"]), jax.device_get(metrics))
    (p1, m1), (p4, m4) = results[1], results[4]
    np.testing.assert_allclose(m4["loss"], m1["loss"], rtol=1e-5)
    np.testing.assert_allclose(m4["grad_norm"], m1["grad_norm"], rtol=1e-4)
    assert m4["tokens"] == m1["tokens"]
    for a, b in zip(jax.tree.leaves(p4), jax.tree.leaves(p1)):
        # Adam normalises each coordinate, so near-zero gradients amplify rounding; a weighting bug
        # would move most coordinates by ~lr (1e-2).
        np.testing.assert_allclose(a, b, atol=2e-5)
