"""The VQ-GAN as a task of the shared training loop (`chameleon_jax.train.trainer`).

What is the VQ-GAN's own: the model and its losses, the generator + discriminator step with the
discriminator starting at `loss.disc_start`, the weight EMA, image data, the held-out evaluation, the
optional wall-clock budget, and the params-only export written when the run finishes.
"""
from __future__ import annotations

import logging
import time

import jax
import ml_collections
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec as P

from chameleon_jax import checkpoint as ckpt
from chameleon_jax.model import sharding as shd
from chameleon_jax.train import trainer
from chameleon_jax.vqgan import checkpoint as vq_checkpoint
from chameleon_jax.vqgan import perceptual
from chameleon_jax.vqgan.train import budget, data, evaluate, report, settings, step as step_lib

log = logging.getLogger(__name__)

_CONSOLE = ("train/loss", "train/psnr", "train/d_loss", "train/disc_lambda", "train/batch_usage",
            "train/grad_norm", "perf/images_per_s", "perf/data_wait_fraction")


def make_mesh(batch_size: int) -> jax.sharding.Mesh:
    """Data parallel: the batch is split over the devices, the (small) model replicated. One process
    uses the most devices that divide the batch; several processes use every device."""
    devices = jax.devices()
    if jax.process_count() > 1:
        if batch_size % len(devices):
            raise ValueError(f"train.batch_size={batch_size} does not split over {len(devices)} devices; "
                             f"use a multiple of {len(devices)}")
        k = len(devices)
    else:
        k = max(n for n in range(1, len(devices) + 1) if batch_size % n == 0)
    return shd.make_mesh({"data": k, "fsdp": 1, "tensor": 1}, devices[:k])


def make_task(config: ml_collections.ConfigDict, workdir) -> trainer.Task:
    workdir = epath.Path(workdir)
    config = settings.upgrade(config)
    t = config.train

    # ---- Mesh, data -----------------------------------------------------------------------------
    mesh = make_mesh(t.batch_size)
    replicated = NamedSharding(mesh, P())
    train_iter = data.make_iterator(config.data, config.eval, batch_size=int(t.batch_size))

    # ---- State: shapes on the mesh, and a fresh one ----------------------------------------------
    abstract = jax.eval_shape(lambda: step_lib.init_state(config, jax.random.key(config.seed)))
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), abstract)

    def init_state():
        return jax.device_put(step_lib.init_state(config, jax.random.key(config.seed)), replicated)

    # ---- The step: the generator alone, then with the discriminator from loss.disc_start ----------
    lp = None
    if config.loss.perceptual_weight > 0 or (config.eval.lpips and perceptual.available()):
        lp = jax.device_put(perceptual.load_params(), replicated)
    plan = budget.BudgetPlan(config, workdir)
    gan_on = config.loss.disc_weight > 0
    steps = {}
    clock = {}  # when the first step started: the budget counts from there

    def build_steps():  # both variants, for the current plan's schedule
        run_config = plan.config()
        steps.update({gan: step_lib.make_train_step(run_config, gan=gan) for gan in (False, True)})

    build_steps()

    def train_step(state, batch, done):
        clock.setdefault("t0", time.monotonic())
        return steps[gan_on and done >= config.loss.disc_start](state, batch["images"], lp)

    total = {"steps": plan.steps}
    budget_s = t.get("time_budget_s", 0)

    def replan(done, start, state):
        """Re-plans the schedule at the plan's timing points; ends the run when the budget is spent."""
        elapsed = lambda: time.monotonic() - clock["t0"]  # noqa: E731
        if plan.wants_timing(done, start):
            jax.block_until_ready(state["step"])
            if plan.update(done, start, elapsed()):
                total["steps"] = plan.steps
                build_steps()
                log.warning("schedule fitted to the %.0f s budget: %d steps", budget_s, plan.steps)
        if budget_s and elapsed() > budget_s and done < total["steps"]:
            log.warning("time budget of %ss spent at step %d of %d: finishing here", budget_s, done, total["steps"])
            total["steps"] = done
        return total["steps"]

    # ---- Held-out evaluation and the export ------------------------------------------------------
    eval_set, scenes = data.eval_images(config.data, config.eval)

    def evaluate_state(state) -> trainer.EvalResult:
        metrics, recon = evaluate.evaluate(step_lib.eval_params(state), eval_set, scenes,
                                           n_embed=config.model.n_embed,
                                           lpips_params=lp if config.eval.lpips else None)
        return trainer.EvalResult(metrics, images={"reconstructions": evaluate.comparison_grid(eval_set, recon)},
                                  console=" ".join(f"{k}={v:.4f}" for k, v in metrics.items()))

    def export(state):
        ckpt.export_params(step_lib.eval_params(state), workdir / vq_checkpoint.EXPORT, config)
        if config.eval.get("report", False) and jax.process_index() == 0:  # held-out report (report.py)
            report.heldout_report(step_lib.eval_params(state), config, workdir / "report",
                                  lpips_params=lp if config.eval.lpips else None)
            log.warning("held-out report written to %s", workdir / "report" / "report.md")

    return trainer.Task(
        name="vqgan", config=config, mesh=mesh,
        loop=trainer.LoopSettings(
            steps=plan.steps, log_every=int(t.log_every), eval_every=int(t.eval_every), eval_at_end=True,
            checkpoint_every=int(config.checkpoint.every), max_bad_steps=int(t.get("max_bad_steps", 10)),
            keep=int(config.checkpoint.keep)),
        abstract_state=abstract, init_state=init_state, train_step=train_step, train_data=train_iter,
        items_per_step=int(t.batch_size), item_unit="images", console=_CONSOLE,
        evaluate=evaluate_state, replan=replan if (plan.enabled or budget_s) else None, finish=export,
        # the state's shapes: the architectures, the codebook, and whether an EMA copy is kept
        resume_guard=("model.", "loss.disc_ndf", "loss.disc_layers", "train.ema_decay"),
        non_finite_shows=("loss", "nll", "q_loss", "d_loss", "grad_norm"),
        non_finite_hint="Try a lower optim.lr or disc_optim.lr, set optim.grad_clip, or check the images")


def train(config: ml_collections.ConfigDict, workdir) -> trainer.Result:
    """Trains (resuming if `workdir` has checkpoints); a finished run writes workdir/export."""
    return trainer.run(make_task(config, workdir), workdir)


def train_or_load(config, workdir) -> dict:
    """The trained params for `config` in `workdir`: loaded from workdir/export if that run finished,
    otherwise trained (resuming from its checkpoints). Cache-friendly entry for later experiments."""
    if vq_checkpoint.is_finished(workdir):
        return vq_checkpoint.load(workdir, config)[1]
    result = train(config, workdir)
    if result.preempted:
        raise RuntimeError(f"the VQ-GAN run in {workdir} was interrupted at step {result.step}; rerun to resume it")
    return step_lib.eval_params(result.state)
