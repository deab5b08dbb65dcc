"""VQ-GAN training on the shared loop: losses and metrics by hand, one step by hand, the budget plan, and
runs on a folder of real (PNG) images that train, export, resume bitwise after SIGKILL or a clean stop,
and skip a non-finite step.

Runs use the `:tiny` config (16 px, 64 codes) on 8 fake devices, the GAN on from the second step and the
weight EMA on, so every part of the state changes before a checkpoint. Children run under `timeout`.
"""
from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from chameleon_jax import checkpoint as ckpt
from chameleon_jax.train import trainer
from chameleon_jax.train.metrics import read_metrics
from chameleon_jax.vqgan import checkpoint as vq_checkpoint
from chameleon_jax.vqgan import discriminator, losses
from chameleon_jax.vqgan import train as T
from chameleon_jax.vqgan.train import budget, data as vq_data

REPO = Path(__file__).resolve().parents[1]
STEPS = 10  # the reference run; checkpoints every 2
OVERRIDES = {"data.kind": "images", "data.threads": 2, "train.steps": STEPS, "checkpoint.every": 2,
             "checkpoint.keep": 10, "train.ema_decay": 0.9, "train.eval_every": 0, "eval.num_images": 4}


def smoke_config(arg=None):
    spec = importlib.util.spec_from_file_location("vqgan_smoke", REPO / "experiments/vqgan_smoke.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def image_config(folder, **extra):
    config = smoke_config("tiny")
    for key, value in {**OVERRIDES, "data.inputs": str(folder), **extra}.items():
        section, leaf = key.split(".")
        config[section][leaf] = value
    return config


def host(tree):
    """Host numpy copies; PRNG keys as their raw key data."""
    def leaf(x):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        return np.asarray(jax.device_get(x))
    return jax.tree.map(leaf, tree)


def assert_bitwise_equal(a, b):
    la, lb = jax.tree_util.tree_leaves_with_path(host(a)), jax.tree.leaves(host(b))
    assert len(la) == len(lb)
    for (path, x), y in zip(la, lb):
        assert x.dtype == y.dtype and np.array_equal(x, y), f"{jax.tree_util.keystr(path)} differs"


def complete_steps(workdir):
    folder = Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else []


def train_logs(workdir):
    return {(r["step"], k): v for r in read_metrics(workdir) for k, v in r.items() if k.startswith(("train/", "eval/"))}


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """16 small PNGs of several sizes and aspect ratios (resized and centre-cropped to 16 px), no
    captions, and one file that is not an image at all (a logged skip, not a crash)."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(16):
        w, h = int(rng.integers(16, 40)), int(rng.integers(16, 40))
        yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
        colour = rng.uniform(0, 255, 3)
        img = (colour * (0.5 + 0.5 * np.sin(6 * (xx + yy * (i % 3)) + i))[..., None]).clip(0, 255)
        Image.fromarray(img.astype(np.uint8), "RGB").save(folder / f"img{i:02d}.png")
    (folder / "broken.png").write_bytes(b"not a png")
    return folder


@pytest.fixture(scope="module")
def reference(image_folder, tmp_path_factory):
    """STEPS uninterrupted steps on the image folder."""
    workdir = tmp_path_factory.mktemp("straight")
    result = T.train(image_config(image_folder), workdir)
    assert result.step == STEPS and not result.preempted
    return result, workdir


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
    # Shapes only: traced, not run (op by op, every conv of the 64 px input was compiled on its own).
    p = jax.eval_shape(lambda: discriminator.init(jax.random.key(0), ndf=32, n_layers=3))
    out = jax.eval_shape(discriminator.apply, p, jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32))
    assert out.shape == (2, 6, 6, 1)  # 64 -> 32 -> 16 -> 8 -> 7 -> 6 (taming's PatchGAN)


def test_one_step_keeps_a_unit_codebook_and_averages_the_weights():
    c = smoke_config("tiny")
    c.train.ema_decay = 0.999
    state = T.init_state(c, jax.random.key(0))
    before = host(state["params"])
    x = vq_data.shapes_batch(c.data, 0, c.train.batch_size)
    assert x.shape == (8, 16, 16, 3) and -1.0 <= x.min() and x.max() <= 1.0
    # batches are a function of the step
    np.testing.assert_array_equal(x, vq_data.shapes_batch(c.data, 0, c.train.batch_size))
    state, m = T.make_train_step(c, gan=False)(state, x, None)  # the GAN variant runs in the runs below
    assert int(state["step"]) == 1 and float(m["finite"]) == 1.0 and np.isfinite(float(m["loss"]))
    assert {"q_loss", "dead_codes", "nll"} <= set(m) and "d_loss" not in m
    new, ema = host(state["params"]), host(state["ema_params"])
    assert not np.allclose(before["encoder"]["conv_in"]["kernel"], new["encoder"]["conv_in"]["kernel"])
    np.testing.assert_allclose(np.linalg.norm(new["quantize"]["embedding"], axis=-1), 1.0, atol=1e-5)
    # step 0: the decay warms up at min(0.999, 1/10), so the average is 0.1·init + 0.9·new; tolerance:
    # one fp32 multiply-add per element, a few ulp of values of order 0.1
    k = ("decoder", "conv_out", "kernel")
    expect = 0.1 * before[k[0]][k[1]][k[2]] + 0.9 * new[k[0]][k[1]][k[2]]
    np.testing.assert_allclose(ema[k[0]][k[1]][k[2]], expect, rtol=1e-5, atol=1e-7)
    assert not np.allclose(ema[k[0]][k[1]][k[2]], new[k[0]][k[1]][k[2]])
    np.testing.assert_allclose(np.linalg.norm(ema["quantize"]["embedding"], axis=-1), 1.0, atol=1e-5)
    assert T.eval_params(state) is state["ema_params"]
    del state["ema_params"]
    assert T.eval_params(state) is state["params"]  # without the option the live weights are evaluated


def test_budget_plan_fits_the_schedule_and_shrinks_when_the_machine_slows(tmp_path):
    c = smoke_config()
    c.train.update(steps=1000, time_budget_s=100, fit_to_budget=True)
    c.checkpoint.every = 250
    c.optim.update(warmup_steps=20, decay_steps=1000)
    plan = budget.BudgetPlan(c, tmp_path)
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
    assert budget.BudgetPlan(c, tmp_path).steps == 567  # a resumed run keeps its plan
    c.train.steps = 20  # the plan never goes beyond train.steps, even with time to spare at its last step
    (tmp_path / "short").mkdir()
    short = budget.BudgetPlan(c, tmp_path / "short")
    assert not short.update(1, 0, 5.0) and not short.update(20, 0, 6.9) and short.steps == 20
    c.train.fit_to_budget = False
    off = budget.BudgetPlan(c, tmp_path / "off")
    assert off.steps == 20 and not off.wants_timing(1, 0) and off.config().optim.decay_steps == 1000


def test_trains_on_an_image_folder_and_exports_what_the_loader_reads(reference, image_folder):
    result, workdir = reference
    train = {r["step"]: r for r in read_metrics(workdir) if "train/loss" in r}
    assert sorted(train) == list(range(1, STEPS + 1))  # log_every=1
    for r in train.values():
        assert all(np.isfinite(v) for k, v in r.items() if k.startswith("train/")), r
        assert r["train/skipped_steps"] == 0
    assert "train/d_loss" not in train[1] and {"train/d_loss", "train/disc_lambda"} <= set(train[2])  # disc_start=1
    evals = [r for r in read_metrics(workdir) if "eval/psnr" in r]
    assert [r["step"] for r in evals] == [STEPS] and "eval/analyzer_exact" not in evals[0]  # not shapes scenes
    assert {"eval/ssim", "eval/codebook_usage", "eval/code_round_trip"} <= set(evals[0])
    assert (workdir / "images" / f"eval_reconstructions_{STEPS:06d}.png").is_file()
    assert complete_steps(workdir) == list(range(2, STEPS + 1, 2))

    cfg, params = vq_checkpoint.load(workdir)  # the export, with its config from export/config.json
    assert cfg.resolution == 16 and cfg.n_embed == 64
    assert_bitwise_equal(params, T.eval_params(result.state))
    assert_bitwise_equal(T.train_or_load(image_config(image_folder), workdir), params)  # loaded, not retrained


def test_two_runs_of_2_and_8_steps_equal_10_straight_steps_bitwise(reference, image_folder, tmp_path):
    ref, ref_dir = reference
    first = T.train(image_config(image_folder, **{"train.steps": 2}), tmp_path)
    assert first.step == 2 and complete_steps(tmp_path) == [2]
    resumed = T.train(image_config(image_folder), tmp_path)  # picks up at step 2, data position included
    assert resumed.step == STEPS
    # generator, discriminator, both Adam states, EMA, code usage, step, rng, skip count
    assert set(ref.state) == {"params", "opt_state", "disc_params", "disc_opt_state", "ema_params", "code_ema",
                              "step", "rng", "bad_steps"}
    assert_bitwise_equal(resumed.state, ref.state)
    assert {k: v for k, v in train_logs(tmp_path).items() if k[0] > 2} == \
        {k: v for k, v in train_logs(ref_dir).items() if k[0] > 2}


def test_sigkill_after_a_checkpoint_then_resume_is_bitwise_identical(reference, image_folder, tmp_path):
    ref, _ = reference
    workdir = tmp_path / "run"
    args = [f"--config.{k}={v}" for k, v in {**OVERRIDES, "data.inputs": image_folder}.items()]
    cmd = ["timeout", "-k", "5", "600", sys.executable, "-m", "chameleon_jax.vqgan.train",
           "--config", f"{REPO / 'experiments/vqgan_smoke.py'}:tiny", "--workdir", str(workdir), *args]
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="8", PYTHONPATH=str(REPO))
    log = tmp_path / "child.log"
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=open(log, "wb"),
                            start_new_session=True)  # its own group: SIGKILL reaches python, not only `timeout`
    try:
        deadline = time.time() + 580
        while not complete_steps(workdir):  # the first committed checkpoint, then kill at once
            assert proc.poll() is None, f"the child exited (rc={proc.returncode}):\n" + log.read_text()[-3000:]
            assert time.time() < deadline, "no checkpoint within the time limit"
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    assert proc.returncode == -signal.SIGKILL
    killed_at = complete_steps(workdir)[-1]
    assert killed_at < STEPS, "the child finished before the kill"
    assert not vq_checkpoint.is_finished(workdir)

    resumed = T.train(image_config(image_folder), workdir)
    assert resumed.step == STEPS
    assert_bitwise_equal(resumed.state, ref.state)


class _NaNAt:
    """The task's data iterator with batch `index` replaced by NaN images (a corrupt batch)."""

    def __init__(self, it, index):
        self.it, self.index, self.count = it, index, 0

    def __next__(self):
        batch = next(self.it)
        self.count += 1
        if self.count - 1 == self.index:
            batch = {"images": np.full_like(batch["images"], np.nan)}
        return batch

    def get_state(self):
        return self.it.get_state()

    def set_state(self, state):
        self.it.set_state(state)


def test_a_non_finite_step_is_skipped_counted_and_changes_nothing(image_folder, tmp_path):
    config = image_config(image_folder, **{"train.steps": 2, "checkpoint.every": 1})
    task = T.make_task(config, tmp_path)
    task.train_data = _NaNAt(task.train_data, index=1)  # step 2 (with the GAN terms) sees NaN images
    result = trainer.run(task, tmp_path)
    assert result.step == 2
    logged = {r["step"]: r for r in read_metrics(tmp_path) if "train/skipped_steps" in r}
    assert logged[1]["train/skipped_steps"] == 0 and logged[2]["train/skipped_steps"] == 1
    after_1 = ckpt.restore(ckpt.make_manager(tmp_path / "checkpoints", read_only=True), 1, task.abstract_state)
    after_2 = result.state
    assert int(after_2["step"]) == 2 and int(after_2["bad_steps"]) == 1
    for part in ("params", "opt_state", "disc_params", "disc_opt_state", "ema_params", "code_ema"):
        assert_bitwise_equal(after_2[part], after_1[part])


def test_image_inputs_name_the_fix_when_empty(tmp_path):
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match="--config.data.inputs"):
        vq_data.image_refs([str(tmp_path)])


def test_image_batches_from_jsonl_tar_and_folder_resume_exactly(image_folder, tmp_path):
    import io
    import json
    import tarfile

    import ml_collections

    pngs = sorted(p for p in image_folder.iterdir() if p.name.startswith("img"))
    jsonl = tmp_path / "docs.jsonl"  # images named by documents, relative to the file
    (tmp_path / "a.png").write_bytes(pngs[0].read_bytes())
    jsonl.write_text(json.dumps({"image": "a.png", "caption": "a"}) + "\n" + json.dumps({"text": "no image"}) + "\n")
    shard = tmp_path / "shard.tar"  # webdataset-style, no captions
    with tarfile.open(shard, "w") as tar:
        for i, p in enumerate(pngs[:3]):
            info = tarfile.TarInfo(f"{i:04d}.png")
            info.size = p.stat().st_size
            tar.addfile(info, io.BytesIO(p.read_bytes()))
    refs = vq_data.image_refs([str(jsonl), str(shard), str(image_folder)])
    assert len(refs) == 1 + 3 + 17  # the folder's broken.png is listed; it is skipped when decoded
    assert np.array_equal(vq_data.load(refs[1], 16), vq_data.load(str(pngs[0]), 16))  # a tar member decodes

    config = ml_collections.ConfigDict(dict(kind="images", inputs=f"{jsonl},{shard},{image_folder}", seed=3,
                                            image_size=16, threads=2))
    eval_config = ml_collections.ConfigDict(dict(num_images=2, inputs=""))
    it = vq_data.make_iterator(config, eval_config, batch_size=4)
    first = [next(it)["images"] for _ in range(3)]
    assert all(b.shape == (4, 16, 16, 3) and b.dtype == np.float32 and np.abs(b).max() <= 1.0 for b in first)
    state = it.get_state()
    after = [next(it)["images"] for _ in range(6)]  # past the 19 training images: a reshuffled epoch
    again = vq_data.make_iterator(config, eval_config, batch_size=4)
    again.set_state(state)
    for a, b in zip(after, [next(again)["images"] for _ in range(6)]):
        np.testing.assert_array_equal(a, b)
    train_refs, held_refs = vq_data.split_inputs(config, eval_config)  # held back from training
    assert len(held_refs) == 2 and len(train_refs) == len(refs) - 2
    assert not set(map(str, held_refs)) & set(map(str, train_refs))
    held, scenes = vq_data.eval_images(config, eval_config)
    assert 1 <= held.shape[0] <= 2 and scenes is None  # fewer if broken.png is one of them


def test_the_older_config_names_move_to_the_shared_ones_and_a_conflict_names_the_fix():
    from chameleon_jax.vqgan.train import settings

    c = smoke_config("tiny")
    assert "batch_size" not in c.data and "checkpoint_every" not in c.train  # the files use the shared names
    old = smoke_config("tiny")
    del old.train["batch_size"], old["checkpoint"]
    old.data.batch_size, old.train.checkpoint_every, old.train.keep_checkpoints = 4, 3, 5
    new = settings.upgrade(old)
    assert (new.train.batch_size, new.checkpoint.every, new.checkpoint.keep) == (4, 3, 5)
    assert "batch_size" not in new.data and "checkpoint_every" not in new.train and "keep_checkpoints" not in new.train
    assert settings.upgrade(c).to_dict() == c.to_dict()  # nothing to move: unchanged
    both = smoke_config("tiny")
    both.data.batch_size = 2  # the shared key says 8
    with pytest.raises(ValueError, match="keep only train.batch_size"):
        settings.upgrade(both)
