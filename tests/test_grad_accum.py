"""Gradient accumulation over microbatches gives the same update as the one-shot step."""

import jax
import numpy as np

from chameleon_jax.model import ModelConfig, abstract
from chameleon_jax.model import sharding as shd
from chameleon_jax.train import step as step_lib
from chameleon_jax.config import base_config
from chameleon_jax.train import optimizer
from numerics import chain_tol, transformer_lengths


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
        initial = jax.device_get(state["params"])
        step = step_lib.jit_train_step(
            step_lib.make_train_step(graphdef, cfg, tx, loss_cfg, microbatches=micro), mesh, shardings)
        with jax.set_mesh(mesh):
            state, metrics = step(state, jax.device_put(batch, shd.batch_sharding(mesh)))
        results[micro] = (jax.device_get(state["params"]), jax.device_get(metrics))
    (p1, m1), (p4, m4) = results[1], results[4]
    # Four microbatch sums reorder the loss's and the gradients' token sums: the forward's any-order
    # bound (the model's path at 16 positions, logsumexp over 128 ids, the token mean); the gradient
    # norm adds the backward (twice that path, the token sum) and the sum of n_params squares.
    tokens = int(batch["loss_mask"].sum())
    fwd = transformer_lengths(cfg, context=16) + [cfg.vocab_size, tokens]
    n_params = sum(x.size for x in jax.tree.leaves(p1))
    np.testing.assert_allclose(m4["loss"], m1["loss"], rtol=0, atol=chain_tol(m1["loss"], fwd))
    np.testing.assert_allclose(m4["grad_norm"], m1["grad_norm"], rtol=0,
                               atol=chain_tol(m1["grad_norm"], 2 * fwd + [tokens, n_params]))
    assert m4["tokens"] == m1["tokens"]
    # Adam normalises each coordinate, so rounding is amplified only where a gradient is within
    # rounding of 0: those few coordinates may move by up to ~lr, the rest agree to rounding. A
    # weighting bug changes the update's direction on most coordinates: a drift of the update's size.
    flat = lambda p: np.concatenate([np.ravel(x) for x in jax.tree.leaves(p)]).astype(np.float64)
    update = np.linalg.norm(flat(p1) - flat(initial))
    drift = np.linalg.norm(flat(p4) - flat(p1))
    assert drift < 1e-2 * update, (drift, update)
    moved = np.abs(flat(p4) - flat(p1)) > 1e-3 * opt.peak_lr  # coordinates past rounding
    assert moved.mean() < 0.01, moved.mean()
