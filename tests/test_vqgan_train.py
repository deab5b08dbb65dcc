"""VQ-GAN training: losses and metrics by hand, and a 2-step run (GAN on from step 1) that checkpoints,
resumes and exports; train_or_load then loads instead of retraining."""
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from chameleon_jax.train.metrics import read_metrics
from chameleon_jax.vqgan import discriminator, losses, train as T

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "experiments"))
import vqgan_smoke  # noqa: E402


def test_metrics_by_hand():
    x = jnp.zeros((2, 16, 16, 3))
    y = x.at[0].set(0.2)  # [0,1] difference of 0.1 -> mse 0.01 -> 20 dB
    np.testing.assert_allclose(losses.psnr(x, y)[0], 20.0, rtol=1e-5)
    assert float(losses.psnr(x, y)[1]) > 90
    np.testing.assert_allclose(losses.ssim(x + 0.3, x + 0.3), 1.0, atol=1e-5)
    noisy = x + 0.3 * jax.random.normal(jax.random.key(0), x.shape)
    assert float(losses.ssim(x, noisy).max()) < 0.5
    usage, ppl = losses.codebook_stats(jnp.array([0, 0, 1, 1, 2, 3, 3, 3]), 8)
    assert float(usage) == 0.5
    p = np.array([2, 2, 1, 3]) / 8
    np.testing.assert_allclose(ppl, np.exp(-(p * np.log(p)).sum()), rtol=1e-5)
    np.testing.assert_allclose(losses.hinge_d_loss(jnp.array([2.0, 0.0]), jnp.array([-2.0, 0.5])), 0.5 * (0.5 + 0.75))
    lam = losses.adaptive_weight(jnp.full((3,), 2.0), jnp.full((3,), 1.0), 0.8)
    np.testing.assert_allclose(lam, 0.8 * 2 * np.sqrt(3) / (np.sqrt(3) + 1e-4), rtol=1e-5)


def test_discriminator_patch_logits():
    p = discriminator.init(jax.random.key(0), ndf=32, n_layers=3)
    out = discriminator.apply(p, jnp.zeros((2, 64, 64, 3)))
    assert out.shape == (2, 6, 6, 1)  # 64 -> 32 -> 16 -> 8 -> 7 -> 6 (taming's PatchGAN)


def test_one_step_updates_params_and_keeps_a_unit_codebook():
    c = vqgan_smoke.get_config("tiny")
    state = T.init_state(c, jax.random.key(0))
    before = jax.tree.map(np.asarray, state["params"])
    x = T.train_batch(c, 0)
    assert x.shape == (8, 16, 16, 3) and -1.0 <= x.min() and x.max() <= 1.0
    np.testing.assert_array_equal(x, T.train_batch(c, 0))  # batches are a function of the step
    state, m = T.make_train_step(c, gan=False)(state, x, None)  # the GAN variant runs in the test below
    assert int(state["step"]) == 1 and np.isfinite(float(m["loss"]))
    assert {"q_loss", "dead_codes", "nll"} <= set(m) and "d_loss" not in m
    assert not np.allclose(before["encoder"]["conv_in"]["kernel"], state["params"]["encoder"]["conv_in"]["kernel"])
    book = state["params"]["quantize"]["embedding"]
    np.testing.assert_allclose(jnp.linalg.norm(book, axis=-1), 1.0, atol=1e-5)  # l2 mode keeps it unit-norm


def test_train_checkpoints_resumes_and_caches(tmp_path):
    c = vqgan_smoke.get_config("tiny")
    params = T.train(c, tmp_path)  # step 0 plain, step 1 with the GAN terms
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "2"]
    rec = read_metrics(tmp_path)
    by_step = {r["step"]: r for r in rec if "train/loss" in r}
    assert "train/d_loss" not in by_step[1]  # disc_start=1: step 0 plain, step 1 with the GAN terms
    assert {"train/d_loss", "train/g_loss", "train/disc_lambda"} <= set(by_step[2])
    assert np.isfinite(by_step[2]["train/disc_lambda"])
    evals = [r for r in rec if "eval/psnr" in r]
    assert evals and {"eval/codebook_usage", "eval/perplexity", "eval/ssim", "eval/analyzer_exact"} <= set(evals[-1])
    assert any(f.startswith("recon_") for f in os.listdir(tmp_path))
    c.unlock()
    c.train.steps = 3
    resumed = T.train(c, tmp_path)  # picks up at step 2
    assert [r["step"] for r in read_metrics(tmp_path) if "train/loss" in r] == [1, 2, 3]
    loaded = T.train_or_load(c, tmp_path)  # the export exists: no training
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(loaded)):
        np.testing.assert_array_equal(a, b)
    assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(resumed)))


def test_weight_average_is_what_gets_evaluated():
    c = vqgan_smoke.get_config("tiny")
    c.unlock()
    c.train.ema_decay = 0.999
    state = T.init_state(c, jax.random.key(0))
    before = jax.tree.map(np.asarray, state["params"])
    state, _ = T.make_train_step(c, gan=False)(state, T.train_batch(c, 0), None)
    # step 0: decay warms up at min(0.999, 1/10), so the average is 0.1·init + 0.9·new
    k = ("decoder", "conv_out", "kernel")
    new, ema = state["params"], state["ema_params"]
    expect = 0.1 * before[k[0]][k[1]][k[2]] + 0.9 * np.asarray(new[k[0]][k[1]][k[2]])
    np.testing.assert_allclose(ema[k[0]][k[1]][k[2]], expect, rtol=1e-5, atol=1e-7)
    assert not np.allclose(ema[k[0]][k[1]][k[2]], new[k[0]][k[1]][k[2]])
    np.testing.assert_allclose(jnp.linalg.norm(ema["quantize"]["embedding"], axis=-1), 1.0, atol=1e-5)
    assert T.eval_params(state) is ema
    del state["ema_params"]
    assert T.eval_params(state) is state["params"]  # without the option the live weights are evaluated


def test_budget_plan_fits_the_schedule_and_shrinks_when_the_machine_slows(tmp_path):
    c = vqgan_smoke.get_config()
    c.train.update(steps=1000, time_budget_s=100, checkpoint_every=250, fit_to_budget=True)
    c.optim.update(warmup_steps=20, decay_steps=1000)
    plan = T._BudgetPlan(c, tmp_path)
    assert plan.steps == 1000 and plan.wants_timing(1, 0) and plan.wants_timing(20, 0)
    assert not plan.wants_timing(19, 0)
    assert not plan.update(1, 0, 5.0)  # step 1 carries the compile: starts the window only
    # 0.1 s/step over the warm-up, 93.1 s left: 20 + int(0.9 * 931) = 857 steps, decay scaled with them
    assert plan.update(20, 0, 6.9) and plan.steps == 857
    assert plan.config().optim.decay_steps == 857 and plan.config().train.steps == 1000
    assert not plan.update(21, 0, 12.0)  # the recompiled step: restarts the window
    assert not plan.update(250, 0, 12.0 + 229 * 0.1)  # on time: unchanged
    assert plan.steps == 857
    # 0.2 s/step from here: 500 + int(0.9 * (100 - 84.9) / 0.2) = 567
    assert plan.update(500, 0, 34.9 + 250 * 0.2) and plan.steps == 567
    assert T._BudgetPlan(c, tmp_path).steps == 567  # a resumed run keeps its plan
    c.train.fit_to_budget = False
    off = T._BudgetPlan(c, tmp_path / "off")
    assert off.steps == 1000 and not off.wants_timing(1, 0) and off.config().optim.decay_steps == 1000
