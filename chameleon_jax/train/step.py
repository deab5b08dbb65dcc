"""Train state, its shardings, sharded initialisation, and the jitted train step.

The state is a plain dict pytree {params, opt_state, step, rng, bad_steps} (plus `lora`, the adapters,
when the run trains LoRA) so that Orbax saves it as is and any mesh can restore it from abstract targets.

Partial fine-tuning (model/trainable.py): `plan` says what trains. The optimizer's state and update
cover only `trainable.trained_tree` (the selected tensors, a row range cut to its slice, the adapters);
the gradient is taken with respect to that tree alone, so the backward pass skips what nothing
trained needs, and frozen params pass through the step untouched.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from chameleon_jax import model as model_lib
from chameleon_jax.model import sharding as shd
from chameleon_jax.model import loss as loss_lib
from chameleon_jax.model import trainable
from chameleon_jax.model.loss import LossConfig  # noqa: F401  (the step's loss settings; step_lib.LossConfig)
from chameleon_jax.train.optimizer import global_norm

TrainState = dict


def abstract_state(model_cfg, tx: optax.GradientTransformation, plan: trainable.Plan = trainable.FULL):
    """Shapes of the whole train state, without allocating."""
    return jax.eval_shape(lambda: init_state(model_cfg, tx, jax.random.PRNGKey(0), plan))


def state_specs(model_cfg, tx, rules=shd.DEFAULT_RULES, plan: trainable.Plan = trainable.FULL) -> TrainState:
    """PartitionSpecs for the train state: optimizer moments follow what they train (a row slice
    like its tensor except along the rows; an adapter like its kernel's axes)."""
    pspecs = model_lib.param_specs(model_cfg, rules)
    lspecs = trainable.adapter_specs(plan, pspecs)
    abstract = abstract_state(model_cfg, tx, plan)
    ospecs = optax.tree_map_params(
        tx, lambda _, spec: spec, abstract["opt_state"],
        trainable.trained_tree(plan, pspecs, lspecs, cut=trainable.slice_spec),
        transform_non_params=lambda _: P(), is_leaf=lambda x: isinstance(x, P))
    specs = {"params": pspecs, "opt_state": ospecs, "step": P(), "rng": P(), "bad_steps": P()}
    if lspecs is not None:
        specs["lora"] = lspecs
    return specs


def init_state(model_cfg, tx, key, plan: trainable.Plan = trainable.FULL) -> TrainState:
    init_key, rng = jax.random.split(key)
    params = model_lib.init_params(model_cfg, init_key)
    # The adapters' key is derived, so the base params are the same with and without LoRA.
    lora = trainable.init_adapters(plan, params, jax.random.fold_in(init_key, 0x10A))
    state = {"params": params, "opt_state": tx.init(trainable.trained_tree(plan, params, lora)),
             "step": jnp.zeros((), jnp.int32), "rng": rng, "bad_steps": jnp.zeros((), jnp.int32)}
    if lora is not None:
        state["lora"] = lora
    return state


def init_sharded_state(model_cfg, tx, mesh, key, rules=shd.DEFAULT_RULES,
                       plan: trainable.Plan = trainable.FULL) -> tuple[TrainState, TrainState]:
    """Parameters born sharded: jit the init with out_shardings derived from the logical names."""
    shardings = shd.named(mesh, state_specs(model_cfg, tx, rules, plan))
    with jax.set_mesh(mesh):
        state = jax.jit(lambda k: init_state(model_cfg, tx, k, plan), out_shardings=shardings)(key)
    return state, shardings


def make_train_step(graphdef, model_cfg, tx, loss_cfg: LossConfig, schedule=None,
                    microbatches: int = 1, plan: trainable.Plan = trainable.FULL) -> Callable:
    """(state, batch) -> (state, metrics). Pure; jit it with `jit_train_step`.

    `microbatches` > 1 accumulates gradients over that many slices of the batch (a `lax.scan`), so
    a 2^23-token global batch fits in HBM; the update equals the one-shot step up to float rounding.

    A non-finite loss or gradient skips the update (params and optimizer state unchanged) and bumps
    `bad_steps`; a finite step resets it. The runner stops after K consecutive bad steps.

    Precision (model.dtype bf16, model.param_dtype fp32 or bf16): the forward casts params to the
    activation dtype, so the gradients come back in the param dtype. The loss, the gradient norm
    (this guard and the optimizer's clip) and the microbatch gradient sum are float32.
    """
    dropout = model_cfg.dropout > 0

    def loss_fn(trained, base, batch, key):
        # `trained` is the optimizer's tree; `base` = (params, lora) of the state, the frozen rest.
        params, lora = trainable.write_back(plan, *base, trained)
        model = model_lib.bind(graphdef, trainable.model_params(plan, params, lora))
        x, _ = model(batch["tokens"], batch["segment_ids"], batch["positions"],
                     dropout_key=key if dropout else None)
        # Same as loss_and_metrics(model.head(x), ...) without materialising the [B, T, V] logits.
        loss, sums = loss_lib.fused_loss_and_metrics(
            model.final_norm(x), model.output[...], batch, image_ids=loss_cfg.image_ids,
            z_loss_weight=loss_cfg.z_loss_weight)
        # Divergence monitor (paper §2.3): RMS of the last block's output over real tokens.
        real = (batch["segment_ids"] != 0).astype(jnp.float32)
        sq = jnp.mean(jnp.square(x.astype(jnp.float32)), axis=-1)
        sums["last_layer_rms"] = jnp.sqrt((sq * real).sum() / jnp.maximum(real.sum(), 1.0))
        return loss, sums

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def accumulated_grads(trained, base, batch, key):
        """Token-weighted sum of per-microbatch gradients = gradient of the whole-batch mean loss."""
        def split(x):
            # Microbatch m takes rows m, M+m, 2M+m, ...: each stays spread over every batch shard.
            x = x.reshape(x.shape[0] // microbatches, microbatches, *x.shape[1:]).swapaxes(0, 1)
            return shd.constrain(x, (None, "batch") + (None,) * (x.ndim - 2))

        def body(carry, mb):
            index, micro = mb
            (loss, sums), grads = grad_fn(trained, base, micro, jax.random.fold_in(key, index))
            n = sums["tokens"]
            acc_grads, acc_loss, acc_sums = carry
            acc_grads = jax.tree.map(lambda a, g: a + g.astype(jnp.float32) * n, acc_grads, grads)
            acc_sums = jax.tree.map(jnp.add, acc_sums, sums)
            return (acc_grads, acc_loss + loss * n, acc_sums), None

        # The sum runs in float32 even for bf16 params: 32 microbatches of bf16 partial sums would
        # lose the low bits of every term. The optimizer takes float32 gradients anyway.
        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), trained)
        zero_sums = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(
            lambda: grad_fn(trained, base, jax.tree.map(lambda x: x[: x.shape[0] // microbatches], batch), key)[0][1]))
        micro = jax.tree.map(split, batch)
        (grads, loss, sums), _ = jax.lax.scan(
            body, (zeros, jnp.zeros((), jnp.float32), zero_sums), (jnp.arange(microbatches), micro))
        total = jnp.maximum(sums["tokens"], 1.0)
        sums["last_layer_rms"] = sums["last_layer_rms"] / microbatches
        return (loss / total, sums), jax.tree.map(lambda g: g / total, grads)

    def step(state: TrainState, batch) -> tuple[TrainState, dict]:
        key = jax.random.fold_in(state["rng"], state["step"])
        base = (state["params"], state.get("lora"))
        trained = trainable.trained_tree(plan, *base)
        if microbatches > 1:
            (loss, sums), grads = accumulated_grads(trained, base, batch, key)
        else:
            (loss, sums), grads = grad_fn(trained, base, batch, key)
        grad_norm = global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        def update(trained, opt_state):
            updates, new_opt = tx.update(grads, opt_state, trained)
            return optax.apply_updates(trained, updates), new_opt

        # A branch, not a select: a select over every parameter and moment reads old and new state
        # once more per step (~85 ms of a 5 s CPU step, measured); the skip branch is the rare one.
        new_trained, new_opt = jax.lax.cond(finite, update, lambda p, o: (p, o), trained, state["opt_state"])
        new_params, new_lora = trainable.write_back(plan, *base, new_trained)
        new_state = {
            "params": new_params,
            "opt_state": new_opt,
            "step": state["step"] + 1,
            "rng": state["rng"],
            "bad_steps": jnp.where(finite, 0, state["bad_steps"] + 1),
        }
        if new_lora is not None:
            new_state["lora"] = new_lora
        metrics = dict(sums, loss=loss, grad_norm=grad_norm, finite=finite.astype(jnp.float32),
                       param_norm=global_norm(new_state["params"]))
        if schedule is not None:
            metrics["learning_rate"] = schedule(state["step"])
        return new_state, metrics

    return step


def jit_train_step(step_fn, mesh, state_shardings):
    """The train step under jax.jit with explicit in/out shardings and the state donated."""
    batch_sharding = NamedSharding(mesh, shd.BATCH_SPEC)
    replicated = NamedSharding(mesh, P())
    jitted = jax.jit(step_fn, in_shardings=(state_shardings, batch_sharding),
                     out_shardings=(state_shardings, replicated), donate_argnums=0)
    return jitted
