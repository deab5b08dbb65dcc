"""The 7B configs' own training path on a tiny model: bf16 compute, dropout 0.1, every remat policy,
scan and unrolled layers, microbatches through the runner (experiments/chameleon_7b.py)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from chameleon_jax import model as model_lib
from chameleon_jax.model import transformer
from chameleon_jax.model.config import REMAT_POLICIES
from chameleon_jax.train import step as step_lib
from numerics import chain_tol, transformer_lengths

FAST_COMPILE = {"xla_backend_optimization_level": 0}
BF16_U = 2.0 ** -8  # bfloat16 unit roundoff (8 significant bits)
IMAGE_IDS = (4, 36)


def _cfg(**kw):
    # The 7B's block: MHA, pre-norm, one QK-norm group, dropout 0.1 (tiny widths).
    base = dict(vocab_size=128, d_model=32, n_layers=2, n_heads=4, n_kv_heads=4, head_dim=8, ffn_dim=64,
                qk_norm_groups=1, block_order="prenorm", dropout=0.1)
    base.update(kw)
    return model_lib.ModelConfig(**base)


def _batch(b=4, t=16, seed=0):
    rng = np.random.default_rng(seed)
    seg = np.ones((b, t), np.int32)
    seg[:, t // 2:] = 2
    seg[0, -3:] = 0
    pos = np.where(seg == 2, np.arange(t) - t // 2, np.arange(t)).astype(np.int32)
    return {"tokens": rng.integers(0, 128, (b, t)).astype(np.int32), "segment_ids": seg, "positions": pos,
            "loss_mask": (seg > 0).astype(np.int32)}


@functools.lru_cache(maxsize=None)
def _loss_and_grads(remat: str, scan: bool, dtype: str):
    """One train step with plain SGD at lr 1: the params move by exactly minus the gradient."""
    cfg = _cfg(remat=remat, scan_layers=scan, dtype=dtype)
    tx = optax.sgd(1.0)
    graphdef, _ = model_lib.abstract(cfg)
    state = step_lib.init_state(cfg, tx, jax.random.PRNGKey(0))
    before = jax.device_get(state["params"])
    step = jax.jit(step_lib.make_train_step(graphdef, cfg, tx, step_lib.LossConfig(IMAGE_IDS)),
                   compiler_options=FAST_COMPILE)
    after, metrics = step(state, jax.device_put(_batch()))
    grads = jax.tree.map(lambda a, b: np.float64(a) - np.float64(b), before, jax.device_get(after["params"]))
    flat = np.concatenate([np.ravel(g) for g in jax.tree.leaves(grads)])
    scale = max(float(np.abs(np.float64(p)).max()) for p in jax.tree.leaves(before))
    return float(metrics["loss"]), flat, scale


VARIANTS = [(r, True) for r in REMAT_POLICIES] + [("none", False), ("dots_no_batch", False)]


@pytest.mark.parametrize("remat,scan", VARIANTS[1:])
def test_remat_and_unrolled_layers_give_the_loss_and_gradients_of_no_remat_f32(remat, scan):
    """Dropout 0.1 is on: rematerialisation must redraw exactly the same masks."""
    ref_loss, ref_g, scale = _loss_and_grads("none", True, "float32")
    loss, g, _ = _loss_and_grads(remat, scan, "float32")
    cfg = _cfg()
    tokens = int(_batch()["loss_mask"].sum())
    fwd = transformer_lengths(cfg, context=16) + [cfg.vocab_size, tokens]
    # fp32 any-order bounds: the loss along the forward; a gradient along twice that path plus the
    # token sum; recovering it as p - (p - g) adds one rounding of the params' size per side.
    assert abs(loss - ref_loss) <= chain_tol(ref_loss, fwd), (loss, ref_loss)
    tol = chain_tol(ref_g, 2 * fwd + [tokens]) + 2 * 2.0 ** -24 * scale
    np.testing.assert_allclose(g, ref_g, rtol=0, atol=tol)


@pytest.mark.parametrize("remat,scan", [("dots_no_batch", True)])  # the 7B setting
def test_bf16_compute_with_the_7b_remat_policy_matches_no_remat(remat, scan):
    """bf16 activations: each of the ~12 bf16 roundings per layer on the path (norm outputs, q/k/v,
    probabilities, attention and MLP outputs) may land one bf16 ulp apart when the work is reordered;
    the loss, a mean of f32 cross-entropies, and the gradient (relative in the 2-norm) move by at most
    2 * S * u_bf16 of their size, S = 12 per layer + 3 (embedding, final norm, head)."""
    ref_loss, ref_g, _ = _loss_and_grads("none", True, "float32")
    base_loss, base_g, _ = _loss_and_grads("none", True, "bfloat16")
    loss, g, _ = _loss_and_grads(remat, scan, "bfloat16")
    rel = 2 * (12 * _cfg().n_layers + 3) * BF16_U
    assert abs(loss - base_loss) <= rel * abs(base_loss) / np.sqrt(int(_batch()["loss_mask"].sum()))
    assert np.linalg.norm(g - base_g) <= rel * np.linalg.norm(base_g)
    # bf16 is really in use: the f32 run differs from it by more than f32 rounding.
    assert abs(base_loss - ref_loss) > 1e-4 or np.linalg.norm(base_g - ref_g) > 1e-4 * np.linalg.norm(ref_g)


def test_dropout_keeps_one_minus_p_rescales_and_is_keyed():
    x = jnp.ones((200_000,), jnp.float32)
    key = jax.random.key(0)
    out = np.asarray(transformer._dropout(x, 0.1, key))
    kept = out != 0
    # Binomial(200k, 0.9): std sqrt(0.09 / 200k) = 6.7e-4, so 0.004 is 6 sigma.
    assert abs(kept.mean() - 0.9) < 0.004
    np.testing.assert_array_equal(out[kept], np.float32(1.0) / np.float32(0.9))  # inverted dropout: x / (1 - p)
    np.testing.assert_array_equal(np.asarray(transformer._dropout(x, 0.1, key)), out)  # same key, same mask
    assert (np.asarray(transformer._dropout(x, 0.1, jax.random.key(1))) != out).any()
    np.testing.assert_array_equal(np.asarray(transformer._dropout(x, 0.1, None)), x)  # eval: no key, identity


def test_dropout_in_the_train_step_repeats_per_step_and_is_off_in_eval():
    cfg = _cfg()
    tx = optax.sgd(0.0)  # the state stays put, so only the step counter and the rng move
    graphdef, _ = model_lib.abstract(cfg)
    state = step_lib.init_state(cfg, tx, jax.random.PRNGKey(0))
    step = jax.jit(step_lib.make_train_step(graphdef, cfg, tx, step_lib.LossConfig(IMAGE_IDS)),
                   compiler_options=FAST_COMPILE)
    batch = jax.device_put(_batch())
    s1, m1 = step(state, batch)
    _, again = step(state, batch)
    _, m2 = step(s1, batch)  # the next step: another dropout key
    assert float(m1["loss"]) == float(again["loss"])
    assert float(m1["loss"]) != float(m2["loss"])
    # Eval (no dropout key) is deterministic and differs from the dropped-out training loss.
    model = model_lib.bind(graphdef, state["params"])
    logits = jax.jit(model.logits)(batch["tokens"], batch["segment_ids"], batch["positions"])
    again = jax.jit(model.logits)(batch["tokens"], batch["segment_ids"], batch["positions"])
    np.testing.assert_array_equal(np.asarray(logits), np.asarray(again))
    from chameleon_jax.model import loss as loss_lib
    eval_loss = float(loss_lib.loss_and_metrics(logits, batch, image_ids=IMAGE_IDS, z_loss_weight=1e-5)[0])
    assert abs(eval_loss - float(m1["loss"])) > 1e-3


def test_microbatches_through_the_runner_match_one_batch(tmp_path):
    """train.microbatches as the 7B config sets it (32 there, 2 here): same logged losses and grad norms."""
    from test_runner import tiny_config
    from chameleon_jax.train import metrics as metrics_lib, runner

    logs = {}
    for micro in (1, 2):
        config = tiny_config(**{"train.steps": 2, "train.log_every": 1, "train.eval_every": 0,
                                "checkpoint.every": 100, "train.microbatches": micro})
        runner.train(config, tmp_path / f"m{micro}")
        logs[micro] = [r for r in metrics_lib.read_metrics(tmp_path / f"m{micro}") if "train/loss" in r]
    c = tiny_config()
    tokens = c.train.batch_size * c.train.seq_len
    fwd = transformer_lengths(c.model, c.train.seq_len) + [c.model.vocab_size, tokens]
    n_params = 300_000  # > the tiny model's parameter count (the grad norm's sum of squares)
    assert [r["step"] for r in logs[2]] == [1, 2]
    for a, b in zip(logs[2], logs[1]):
        # Step 2 starts from params that differ by the first update's rounding, amplified by Adam
        # only on near-zero gradients: its loss is compared at the same bound plus 1e-3 of the loss.
        extra = 0.0 if a["step"] == 1 else 1e-3 * b["train/loss"]
        assert abs(a["train/loss"] - b["train/loss"]) <= chain_tol(b["train/loss"], fwd) + extra, (a, b)
        assert abs(a["train/grad_norm"] - b["train/grad_norm"]) <= \
            chain_tol(b["train/grad_norm"], 2 * fwd + [tokens, n_params]) + extra * b["train/grad_norm"], (a, b)
