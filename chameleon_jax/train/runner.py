"""The language model's experiment runner: the LM task over the shared loop (`train/trainer.py`).

    result = runner.train(config, workdir)    # python -m chameleon_jax.train --config ... --workdir ...

The LM brings its model (`model/`), loss and step (`train/step.py`), token data (synthetic or
pretokenized shards through the Grain pipeline), perplexity evaluation, and MFU accounting; the loop,
resume, non-finite guard, preemption saves and logging are `trainer.run`'s. Workdir layout and resume:
see `train/trainer.py`.
"""
from __future__ import annotations

import functools
import logging

import jax
import ml_collections
import numpy as np

from chameleon_jax import checkpoint as ckpt
from chameleon_jax import config as config_lib
from chameleon_jax import model as model_lib
from chameleon_jax.data import sources
from chameleon_jax.evals import perplexity
from chameleon_jax.model import flops
from chameleon_jax.model import loss as loss_lib
from chameleon_jax.model import sharding as shd
from chameleon_jax.model import trainable
from chameleon_jax.train import optimizer as optimizer_lib
from chameleon_jax.train import step as step_lib
from chameleon_jax.train import throughput
from chameleon_jax.train import trainer
# The loop's names, for callers of the LM runner (tests, eval, smoke).
from chameleon_jax.train.trainer import NonFiniteError, Result, StopSignal, save_checkpoint  # noqa: F401

log = logging.getLogger(__name__)


# Printed above the progress bar every logging window.
_CONSOLE = ("train/loss", "train/text/accuracy", "train/image/accuracy", "train/grad_norm",
            "train/learning_rate", "perf/tokens_per_s", "perf/mfu", "perf/data_wait_fraction")


# ------------------------------------------------------------------------------------------------
# The host side of metrics: exact window sums of the per-step values.
# ------------------------------------------------------------------------------------------------
class Window(trainer.Window):
    """Exact token-weighted sums of the per-step loss terms over one logging window."""

    SUMMED = ("tokens", "nll", "z_loss", "text/tokens", "text/nll", "text/correct", "image/tokens",
              "image/nll", "image/correct")

    def __init__(self):
        super().__init__()
        self.sums = {k: 0.0 for k in self.SUMMED}
        self.grad_norm = self.last_layer_rms = 0.0
        self.last_layer_rms_max = 0.0

    def add(self, m: dict):
        self.steps += 1
        finite = bool(m["finite"])
        self.skipped += not finite
        if finite:  # a skipped step's values are not part of the model's trajectory
            for k in self.SUMMED:
                self.sums[k] += float(np.float64(m[k]))
            self.grad_norm += float(m["grad_norm"])
            self.last_layer_rms += float(m["last_layer_rms"])
            self.last_layer_rms_max = max(self.last_layer_rms_max, float(m["last_layer_rms"]))
        self.last = m

    def summary(self) -> dict:
        good = max(self.steps - self.skipped, 1)
        out = {"train/" + k: v for k, v in loss_lib.summarize(self.sums).items()}
        n = max(self.sums["tokens"], 1.0)
        out["train/loss"] = (self.sums["nll"] + self.sums["z_loss"]) / n
        out["train/grad_norm"] = self.grad_norm / good
        out["train/last_layer_rms"] = self.last_layer_rms / good
        out["train/last_layer_rms_max"] = self.last_layer_rms_max
        out["train/param_norm"] = float(self.last.get("param_norm", 0.0))
        out["train/learning_rate"] = float(self.last.get("learning_rate", 0.0))
        out["train/skipped_steps"] = self.skipped
        return out


# ------------------------------------------------------------------------------------------------
# The LM task: mesh -> data -> abstract state & shardings -> init -> jitted step -> evaluator.
# ------------------------------------------------------------------------------------------------
# A workdir resumes only a state of the same shapes: these config keys must match the checkpoint's,
# except the ones under them that only choose how the step computes. `finetune.` shapes the optimizer
# state (what trains) and, through lora.alpha, the model the adapters define.
RESUME_GUARD = ("model.", "loss.image_ids", "finetune.")
RESUME_FREE = ("model.attention", "model.remat", "model.dtype", "model.dropout")


def make_task(config: ml_collections.ConfigDict) -> trainer.Task:
    total_steps = int(config.train.steps)

    # ---- Config and mesh ----------------------------------------------------------------------
    model_cfg = config_lib.validate(config, num_devices=jax.device_count())
    mesh = shd.make_mesh(config.mesh)
    rules = shd.rules_from_config(config.sharding_rules)
    plan = trainable.plan_from_config(config, model_cfg)
    if not plan.full:
        log.info("training %s; the rest is frozen", plan.describe())

    # ---- Input pipeline (host-local batches; every process feeds its slice) --------------------
    train_iter = sources.make_data_iterator(config)

    # ---- Model and optimizer shapes, and their shardings ---------------------------------------
    tx = optimizer_lib.make_optimizer(config.optimizer, total_steps)
    schedule = optimizer_lib.learning_rate_schedule(config.optimizer, total_steps)
    graphdef, _ = model_lib.abstract(model_cfg)
    shardings = shd.named(mesh, step_lib.state_specs(model_cfg, tx, rules, plan))
    abstract_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                  step_lib.abstract_state(model_cfg, tx, plan), shardings)

    def init_state():
        state, _ = step_lib.init_sharded_state(model_cfg, tx, mesh, jax.random.PRNGKey(config.train.seed), rules,
                                               plan)
        if config.init.checkpoint:
            # Fine-tuning: parameters (only) from another run; fresh optimizer, step 0, same rng.
            state["params"] = ckpt.restore_params(config.init.checkpoint, abstract_state["params"])
            log.info("initialised params from %s", config.init.checkpoint)
        return state

    # ---- Jitted update and evaluator -----------------------------------------------------------
    loss_cfg = step_lib.LossConfig.from_config(config.loss)
    jitted_step = step_lib.jit_train_step(
        step_lib.make_train_step(graphdef, model_cfg, tx, loss_cfg, schedule,
                                 microbatches=int(config.train.get("microbatches", 1)), plan=plan),
        mesh, shardings)
    eval_step = perplexity.make_eval_step(graphdef, loss_cfg, mesh, shardings["params"])
    # Evaluation sees the model as trained: the adapters merged into their kernels.
    merged = jax.jit(functools.partial(trainable.model_params, plan), out_shardings=shardings["params"])

    def evaluate(state) -> trainer.EvalResult:
        params = merged(state["params"], state["lora"]) if "lora" in state else state["params"]
        results = perplexity.evaluate(eval_step, params, sources.eval_batches(config), mesh)
        return trainer.EvalResult(results, console="  ".join(
            f"{k}={v:.4g}" for k, v in results.items() if k.endswith("perplexity")))

    # ---- Throughput accounting -----------------------------------------------------------------
    flops_per_token = trainable.train_flops_per_token(plan, model_cfg, config.train.seq_len)
    peak, peak_source = throughput.peak_flops(override=config.train.peak_flops)
    log.info("MFU denominator: %.3g FLOP/s, %s; model: %.3g FLOPs/token", peak, peak_source,
             flops_per_token)

    return trainer.Task(
        name="train", config=config, mesh=mesh,
        loop=trainer.LoopSettings(
            steps=total_steps, log_every=int(config.train.log_every), eval_every=int(config.train.eval_every),
            checkpoint_every=int(config.checkpoint.every), max_bad_steps=int(config.train.max_bad_steps),
            keep=int(config.checkpoint.keep), keep_every=int(config.checkpoint.keep_every),
            async_save=bool(config.checkpoint.async_save)),
        abstract_state=abstract_state, init_state=init_state,
        train_step=lambda state, batch, step: jitted_step(state, batch), train_data=train_iter,
        new_window=Window, evaluate=evaluate if int(config.train.eval_every) else None,
        items_per_step=config.train.batch_size * config.train.seq_len, item_unit="tokens",
        flops_per_item=flops_per_token, peak_flops=peak, console=_CONSOLE,
        context=functools.partial(shd.activation_rules, rules),
        resume_guard=RESUME_GUARD, resume_free=RESUME_FREE,
        non_finite_shows=("loss", "grad_norm", "last_layer_rms", "learning_rate"),
        non_finite_hint="Try a lower optimizer.peak_lr, a larger loss.z_loss_weight, model.block_order='swin', "
                        "or check the data")


def train(config: ml_collections.ConfigDict, workdir, stop: trainer.StopSignal | None = None) -> trainer.Result:
    """Trains the LM of `config` in `workdir`, resuming from its latest checkpoint if it has one.

    `stop`: the program's StopSignal, entered before the task is built (see trainer.run)."""
    return trainer.run(make_task(config), workdir, stop)
