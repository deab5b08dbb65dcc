"""Partial fine-tuning: frozen params keep their bits, the optimizer state covers only what trains, LoRA.

The tiny model of experiments/tiny.py (vocab 1,024, image ids 4..259) on 8 fake devices, mesh (2,2,2):
the output head's vocab axis is sharded over `tensor`, so a row slice crosses shards.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from chameleon_jax import checkpoint as ckpt
from chameleon_jax import model as model_lib
from chameleon_jax.config import validate
from chameleon_jax.model import lora as lora_lib
from chameleon_jax.model import sharding as shd
from chameleon_jax.model import trainable
from chameleon_jax.model_info import estimate_memory, trainable_params
from chameleon_jax.train import optimizer as opt_lib
from chameleon_jax.train import runner
from chameleon_jax.train import step as step_lib
from numerics import gamma

REPO = Path(__file__).resolve().parents[1]
MESH = {"data": 2, "fsdp": 2, "tensor": 2}


def experiment(name, arg=None, **overrides):
    spec = importlib.util.spec_from_file_location(name, REPO / f"experiments/{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(arg)
    config.mesh.update(MESH)
    config.optimizer.warmup_steps = 0  # every step moves what trains
    config.train.peak_flops = 1e11  # skip measuring the CPU's matmul peak
    for key, value in overrides.items():
        node = config
        *path, leaf = key.split(".")
        for p in path:
            node = node[p]
        node[leaf] = value
    return config


def batch(config, seed=0):
    rng = np.random.default_rng(seed)
    b, t = config.train.batch_size, config.train.seq_len
    seg = np.ones((b, t), np.int32)
    return {"tokens": rng.integers(0, config.model.vocab_size, (b, t)).astype(np.int32), "segment_ids": seg,
            "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(), "loss_mask": seg}


def train(config, steps):
    """`steps` real train steps (the runner's step, jitted with its shardings); (initial, final) state."""
    m = validate(config, num_devices=8)
    plan = trainable.plan_from_config(config, m)
    mesh = shd.make_mesh(config.mesh)
    tx = opt_lib.make_optimizer(config.optimizer, 100)
    state, shardings = step_lib.init_sharded_state(m, tx, mesh, jax.random.PRNGKey(0), plan=plan)
    initial = jax.device_get(state)
    step = step_lib.jit_train_step(step_lib.make_train_step(
        model_lib.abstract(m)[0], m, tx, step_lib.LossConfig.from_config(config.loss), plan=plan), mesh, shardings)
    losses = []
    with jax.set_mesh(mesh):
        data = jax.device_put(batch(config), shd.batch_sharding(mesh))
        for _ in range(steps):
            state, metrics = step(state, data)
            losses.append(float(metrics["loss"]))
    return m, plan, initial, jax.device_get(state), losses


def flat(tree):
    return traverse_util.flatten_dict(tree, sep="/")


def at(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def test_frozen_params_and_rows_keep_their_bits_and_have_no_optimizer_state():
    # Trains wq whole and the image rows of the output head; everything else is frozen.
    config = experiment("tiny", **{"finetune.trainable": "output,blocks/attention/wq",
                                   "finetune.rows": "output=image", "optimizer.weight_decay": 0.1})
    m, plan, before, after, _ = train(config, steps=3)
    start, stop = config.loss.image_ids
    old, new = flat(before["params"]), flat(after["params"])
    for path in old:
        if path not in ("output", "blocks/attention/wq"):
            # Bitwise: weight decay or a zero update added to a frozen leaf would already differ here.
            assert old[path].tobytes() == new[path].tobytes(), path
    out_old, out_new = old["output"], new["output"]
    outside = np.r_[0:start, stop:m.vocab_size]
    assert out_old[:, outside].tobytes() == out_new[:, outside].tobytes()
    assert (out_old[:, start:stop] != out_new[:, start:stop]).mean() > 0.9  # the slice did train
    assert (old["blocks/attention/wq"] != new["blocks/attention/wq"]).mean() > 0.9

    # The moments exist for the trained slice and wq only.
    adam = after["opt_state"]
    shapes = {jax.tree_util.keystr(p, simple=True, separator="/"): x.shape
              for p, x in jax.tree_util.tree_leaves_with_path(adam) if np.ndim(x) > 0}
    assert shapes == {f"1/0/{moment}/params/{path}": shape for moment in ("mu", "nu") for path, shape in (
        ("output", (m.d_model, stop - start)),
        ("blocks/attention/wq", (m.n_layers, m.d_model, m.n_heads, m.head_dim)))}


def test_model_info_optimizer_bytes_drop_to_the_trainable_count():
    full = experiment("tiny", **{"mesh.data": 1, "mesh.fsdp": 1, "mesh.tensor": 1})
    anole = experiment("anole_7b", "tiny", **{"mesh.data": 1, "mesh.fsdp": 1, "mesh.tensor": 1})
    m = validate(full)
    start, stop = anole.loss.image_ids
    assert trainable_params(full, m) == 238_016
    assert trainable_params(anole, m) == m.d_model * (stop + 1 - start)  # image codes and end-of-image
    f, a = estimate_memory(full, m, 1), estimate_memory(anole, m, 1)
    # AdamW keeps mu and nu in float32 (8 bytes a parameter) plus the same scalar counts in both runs.
    assert f["optimizer_bytes"] - a["optimizer_bytes"] == 8 * (trainable_params(full, m) - trainable_params(anole, m))
    assert a["gradients_bytes"] == 4 * trainable_params(anole, m)
    # And it is what the train state really holds.
    plan = trainable.plan_from_config(anole, m)
    state = jax.eval_shape(lambda: step_lib.init_state(
        m, opt_lib.make_optimizer(anole.optimizer, 10), jax.random.PRNGKey(0), plan))
    held = sum(np.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(state["opt_state"]))
    assert a["optimizer_bytes"] == held
    # MFU counts the work done: the blocks run forward only (2 FLOPs a matmul weight, a third of the causal
    # attention), and the backward forms the weight gradient of the trained slice alone.
    n_matmul, attention = 172_032, 6 * m.n_layers * 64 * m.n_heads * m.head_dim  # flops.py: causal, T = 64
    assert trainable.train_flops_per_token(plan, m, 64) == (
        2 * n_matmul + attention // 3 + 2 * m.d_model * (stop + 1 - start))
    assert trainable.train_flops_per_token(trainable.FULL, m, 64) == 6 * n_matmul + attention == 1_081_344


def test_lora_with_zero_b_is_the_base_model_and_merges_to_the_trained_model():
    config = experiment("tiny", **{"finetune.trainable": "", "finetune.lora.rank": 4,
                                   "optimizer.peak_lr": 1e-2})
    m, plan, before, after, losses = train(config, steps=3)
    graphdef, _ = model_lib.abstract(m)
    data = batch(config, seed=1)
    logits = jax.jit(lambda p: model_lib.bind(graphdef, p).logits(
        data["tokens"], data["segment_ids"], data["positions"]))

    # Step 0: B = 0, so the merged kernels are the base kernels and the logits are the same bits.
    base = logits(before["params"])
    merged0 = logits(lora_lib.merge_lora(before["params"], before["lora"], config.finetune.lora))
    np.testing.assert_array_equal(np.asarray(merged0), np.asarray(base))

    # Trained: the base is untouched, the adapters moved, and the merged model is a different model.
    assert all(a.tobytes() == b.tobytes() for a, b in zip(jax.tree.leaves(before["params"]),
                                                           jax.tree.leaves(after["params"])))
    assert np.abs(flat(after["lora"])["blocks/mlp/w2/b"]).max() > 0
    assert losses[-1] < losses[0]
    assert np.abs(np.asarray(logits(lora_lib.merge_lora(after["params"], after["lora"], plan.lora))) -
                  np.asarray(base)).max() > 1e-3


@pytest.mark.parametrize("name", list(lora_lib.TARGETS))
def test_merged_kernel_equals_the_unmerged_adapter(name):
    # The unmerged model computes x·W + s·(x·A)·B; the merged one x·(W + s·A·B), through the model's own
    # einsum for that kernel (transformer.py). A wrong axis order in the merge (heads vs head_dim, wo's
    # two input axes) changes the result by O(1), far above the bound.
    cfg = validate(experiment("tiny", arg="gqa"))
    params = model_lib.init_params(cfg, jax.random.PRNGKey(0))
    lcfg = lora_lib.LoraConfig(rank=4, alpha=8.0, targets=(name,))
    lora = lora_lib.init_lora(params, lcfg, jax.random.PRNGKey(1))
    path, n_in = lora_lib.TARGETS[name]
    adapter = at(lora, path)
    adapter["b"] = jax.random.normal(jax.random.PRNGKey(2), adapter["b"].shape) * 0.05  # a trained B
    merged = lora_lib.merge_lora(params, lora, lcfg)
    w, w_merged = at(params, path)[0], at(merged, path)[0]  # layer 0
    a, b, s = adapter["a"][0], adapter["b"][0], lcfg.alpha / lcfg.rank
    einsum = {"wq": "BTD,DNH->BTNH", "wk": "BTD,DKH->BTKH", "wv": "BTD,DKH->BTKH", "wo": "BTNH,NHD->BTD",
              "w1": "BTD,DF->BTF", "w3": "BTD,DF->BTF", "w2": "BTF,FD->BTD"}[name]
    x = jax.random.normal(jax.random.PRNGKey(3), (2, 5, *w.shape[:n_in]))
    ins = "".join(einsum.split(",")[0][2:])  # the kernel's input letters, e.g. "NH" for wo
    outs = einsum.split("->")[1][2:]
    hi = jax.lax.Precision.HIGHEST
    unmerged = (jnp.einsum(einsum, x, w, precision=hi) + s * jnp.einsum(
        f"BTR,R{outs}->BT{outs}", jnp.einsum(f"BT{ins},{ins}R->BTR", x, a, precision=hi), b, precision=hi))
    got = jnp.einsum(einsum, x, w_merged, precision=hi)
    # Bound: each side is an fp32 sum over the n = fan_in (+ rank) products of |x|·(|W| + s|A||B|), with
    # the merged kernel itself rounded once (u·|W'|, counted in gamma(n + 2)). Higham §3.1 per side.
    fan_in = int(np.prod(w.shape[:n_in]))
    magnitude = jnp.einsum(einsum, jnp.abs(x), jnp.abs(w) + s * jnp.abs(lora_lib.lora_delta(
        jnp.abs(a)[None], jnp.abs(b)[None], 1.0)[0]), precision=hi)
    bound = 2 * gamma(fan_in + lcfg.rank + 2) * magnitude
    assert np.all(np.abs(np.asarray(got - unmerged)) <= np.asarray(bound))
    assert np.abs(np.asarray(got - jnp.einsum(einsum, x, w, precision=hi))).max() > 1e-3  # the adapter counts


def test_runner_resumes_the_partial_optimizer_state(tmp_path):
    # The Anole preset with adapters on wv too: a row slice and LoRA moments go through save and restore.
    overrides = {"train.log_every": 2, "checkpoint.every": 2, "train.eval_every": 0,
                 "finetune.lora.rank": 2, "finetune.lora.targets": "wv"}
    first = runner.train(experiment("anole_7b", "tiny", **overrides, **{"train.steps": 2}), tmp_path)
    # The resumed run also evaluates at its last step, on the params with the adapters merged.
    config = experiment("anole_7b", "tiny", **{**overrides, "train.steps": 3, "train.eval_every": 3, "eval.steps": 1})
    task = runner.make_task(config)
    manager = ckpt.make_manager(tmp_path / "checkpoints", read_only=True)
    restored = ckpt.restore(manager, 2, task.abstract_state)
    manager.close()
    saved = jax.device_get(first.state)
    assert jax.tree.structure(restored) == jax.tree.structure(saved)
    for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(jax.device_get(restored))):
        np.testing.assert_array_equal(a, b)
    # The resumed run continues those moments (a fresh optimizer would count from 0, not 2).
    resumed = runner.train(config, tmp_path)
    assert resumed.step == 3
    counts = {int(x) for p, x in jax.tree_util.tree_leaves_with_path(jax.device_get(resumed.state["opt_state"]))
              if "count" in jax.tree_util.keystr(p)}
    assert counts == {3}
    logged = (tmp_path / "metrics.jsonl").read_text()
    assert '"eval/perplexity"' in logged

    # Another selection is another optimizer state: the workdir refuses it and names the fix.
    with pytest.raises(ValueError, match="finetune.trainable.*new --workdir"):
        runner.train(experiment("anole_7b", "tiny", **overrides, **{"train.steps": 4,
                                                                     "finetune.trainable": "output,final_norm"}),
                     tmp_path)


def test_the_anole_preset_rows_follow_the_image_ids_of_the_checkpoint_it_starts_from():
    """`output=image+1` resolves against loss.image_ids when the plan is made: after the export's ids
    (Chameleon's 4:8196) replace the tiny experiment's, the head trains columns 4..8196 (codes + <eoss>)."""
    from chameleon_jax.config import model_from_init_checkpoint
    config = experiment("anole_7b", "tiny")
    assert config.finetune.rows == "output=image+1"
    export = experiment("tiny")
    export.model.vocab_size = 8320
    export.loss.image_ids = (4, 8196)
    config = model_from_init_checkpoint(config, export.to_dict())
    plan, errors = trainable.resolve(config.finetune, validate(config, num_devices=8), tuple(config.loss.image_ids))
    assert not errors and dict(plan.trained)["output"] == trainable.Rows(1, 4, 8197)
    plan, _ = trainable.resolve(config.finetune, validate(config, num_devices=8), (4, 260))
    assert dict(plan.trained)["output"] == trainable.Rows(1, 4, 261)
