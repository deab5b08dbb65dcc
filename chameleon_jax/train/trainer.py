"""The training loop every model shares, big_vision style: read it top to bottom.

    task = <model>.make_task(config, workdir)   # what differs: model, loss, step, data, eval
    result = trainer.run(task, workdir)

    config & mesh (the task's) -> init or restore -> loop -> finish
    (metrics every log_every steps, eval every eval_every, checkpoints every checkpoint_every,
    non-finite steps skipped and counted, SIGTERM/SIGINT: save and exit).

The language model (`train/runner.py`) and the VQ-GAN (`vqgan/train/task.py`) are two `Task`s over this loop.

Workdir layout (process 0 writes the logs; every process writes its part of a checkpoint):

    DIR/checkpoints/<step>/{state,data,config}   Orbax, one folder per kept step
    DIR/metrics.jsonl                            one JSON object per logging window / eval
    DIR/tensorboard/                             the same scalars (and eval images) as TensorBoard events
    DIR/config.json                              the config of the latest (re)start

Resume is automatic: if DIR/checkpoints has a complete step, training continues from it with the
exact data iterator position, so an interrupted run reproduces the uninterrupted one bit for bit.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from typing import Any, Callable, ContextManager, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from chameleon_jax import checkpoint as ckpt
from chameleon_jax.data.batch import device_batch
from chameleon_jax.train import goodput as goodput_lib
from chameleon_jax.train import metrics as metrics_lib
from chameleon_jax.train import profiling
from chameleon_jax.train.preemption import StopSignal  # noqa: F401 (also imported from here)

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """K consecutive steps had a non-finite loss or gradient; the run stopped without saving them."""


@dataclasses.dataclass
class Result:
    step: int                 # steps done when the run ended
    state: dict               # the final train state (global jax.Arrays)
    preempted: bool           # stopped by SIGTERM/SIGINT after saving
    last_metrics: dict        # the last logging window


# ------------------------------------------------------------------------------------------------
# What a model brings to the loop.
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class LoopSettings:
    """When things happen, in steps."""
    steps: int
    log_every: int
    checkpoint_every: int       # a multiple of log_every, so a resumed run logs the same windows
    eval_every: int = 0         # 0: no periodic evaluation
    eval_at_end: bool = False   # also evaluate after the last step
    max_bad_steps: int = 10     # stop after this many consecutive non-finite steps
    keep: int = 3               # checkpoints: the latest `keep`, plus every `keep_every`-th for good
    keep_every: int = 0
    async_save: bool = True


@dataclasses.dataclass
class EvalResult:
    scalars: dict                                          # logged as eval/<key>
    images: dict = dataclasses.field(default_factory=dict)  # tag -> uint8 [H, W, 3], logged as images
    console: str = ""                                      # the line printed above the progress bar


class Window:
    """Per-step metric values (fetched to the host) over one logging window.

    The default keeps the mean of every scalar over the steps that were applied; a task with exact
    sums to keep (the LM's token-weighted losses) subclasses it. Every step's metrics carry `finite`.
    """

    def __init__(self):
        self.steps = self.skipped = 0
        self.data_wait = 0.0
        self.untimed_steps = 0  # compile steps and eval time are not throughput
        self.untimed_s = 0.0
        self.last: dict = {}
        self._sums: dict = {}
        self._counts: dict = {}

    def add(self, m: dict):
        self.steps += 1
        finite = bool(m["finite"])
        self.skipped += not finite
        if finite:  # a skipped step's values are not part of the model's trajectory
            for k, v in m.items():
                if k != "finite":
                    self._sums[k] = self._sums.get(k, 0.0) + float(np.float64(v))
                    self._counts[k] = self._counts.get(k, 0) + 1
        self.last = m

    def summary(self) -> dict:
        out = {"train/" + k: s / self._counts[k] for k, s in self._sums.items()}
        for k in self.last:  # a window of skipped steps only: their values are not averaged, but shown
            if k != "finite" and "train/" + k not in out:
                out["train/" + k] = float("nan")
        out["train/skipped_steps"] = self.skipped
        return out


@dataclasses.dataclass
class Task:
    """A model's part of training; `run` does the rest (mesh use, restore, loop, guard, saves, logs)."""
    name: str                          # the progress bar's label
    config: ml_collections.ConfigDict  # saved with every checkpoint and as DIR/config.json
    loop: LoopSettings
    mesh: jax.sharding.Mesh
    abstract_state: Any                # ShapeDtypeStruct leaves carrying their shardings: the restore target
    init_state: Callable[[], Any]      # a fresh state at step 0, on those shardings (called in `context`)
    # (state, device batch, steps done before this one) -> (state, device metrics). The step skips its
    # own update when the loss or a gradient is non-finite and reports metrics["finite"] (1.0 / 0.0).
    train_step: Callable[[Any, Any, int], tuple[Any, dict]]
    train_data: Iterator               # host-local batches; get_state/set_state (Grain) for exact resume
    items_per_step: int                # global batch size in `item_unit`s, for throughput
    item_unit: str                     # "tokens" | "images"
    console: tuple[str, ...]           # logged keys printed above the progress bar
    resume_guard: tuple[str, ...]      # config key prefixes that must not change on resume (the model)
    non_finite_hint: str               # what to try when the run stops on non-finite steps
    resume_free: tuple[str, ...] = ()  # keys under resume_guard that may change (they do not shape the state)
    non_finite_shows: tuple[str, ...] = ("loss", "grad_norm")  # step metrics quoted in that error
    new_window: Callable[[], Window] = Window
    evaluate: Callable[[Any], EvalResult] | None = None
    flops_per_item: float = 0.0        # with `peak_flops`, gives perf/mfu
    peak_flops: float = 0.0
    context: Callable[[], ContextManager] = contextlib.nullcontext  # around init and the loop
    # (steps done, first step of this run, state) -> total steps: lets a task re-plan the run's length
    # (the VQ-GAN's wall-clock budget); None keeps loop.steps.
    replan: Callable[[int, int, Any], int] | None = None
    finish: Callable[[Any], None] | None = None  # after the last step (not on preemption): e.g. an export


# ------------------------------------------------------------------------------------------------
# Checkpoints and batches.
# ------------------------------------------------------------------------------------------------
@jax.jit
def _finite(leaves) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def _in_this_process_on_cpu(x) -> bool:
    return not isinstance(x, jax.Array) or (
        x.is_fully_addressable and all(d.platform == "cpu" for d in x.sharding.device_set))


def _all_finite(tree) -> bool:
    floats = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
    if not floats:
        return True
    if all(map(_in_this_process_on_cpu, floats)):
        # Host memory already, and no other process to agree with: checked in place. Compiling `_finite`
        # for a state of hundreds of leaves takes seconds (up to ~17 s on a loaded 2-vCPU host) for
        # microseconds of work, once per process and state layout.
        return all(np.isfinite(np.asarray(x)).all() for x in floats)
    return bool(_finite(floats))  # the same answer on every process (an accelerator or several hosts)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_resumable(saved: dict, config, workdir, guarded: tuple[str, ...], free: tuple[str, ...] = ()) -> None:
    """A workdir resumes only the same model; other changes (steps, LR, ...) are allowed and logged.

    `guarded` are key prefixes of the state's shapes; `free` are keys under them that do not shape the
    state (a kernel choice, activation dtype, remat). A key the checkpoint's config does not have, because it
    was added after that run started, is logged, not refused: a real shape change still fails in the restore.
    """
    now = _flat(json.loads(config.to_json_best_effort()))
    saved = _flat(saved)
    changed = sorted(k for k in set(now) | set(saved) if now.get(k) != saved.get(k))
    model = [k for k in changed if k.startswith(guarded) and not k.startswith(free) and k in saved and k in now]
    if model:
        raise ValueError(f"{workdir} holds a checkpoint of a different model (" + ", ".join(
            f"{k}: {saved.get(k)} -> {now.get(k)}" for k in model) + "); use a new --workdir")
    if changed:
        log.warning("resuming with a changed config: %s", ", ".join(
            f"{k}: {saved.get(k)} -> {now.get(k)}" for k in changed))


def save_checkpoint(manager, step: int, state, data_iterator, config, *, force=False, last_good=None):
    """Starts an async save of {state, data, config}; a state with NaN/Inf is never saved."""
    if not _all_finite(state):
        raise NonFiniteError(f"step {step}: the train state has non-finite values; refusing to save it. "
                             f"The last good checkpoint is step {last_good}.")
    ckpt.save(manager, step, state, data_iterator, config, force=force)


def _progress(name: str, total: int, initial: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True,
                smoothing=0.1, desc=name)


# ------------------------------------------------------------------------------------------------
# The loop.
# ------------------------------------------------------------------------------------------------
def run(task: Task, workdir: str | epath.Path, stop: StopSignal | None = None) -> Result:
    """`stop`: a StopSignal the program entered earlier (right after jax.distributed.initialize), so
    that a signal while the task was built is honoured too; without one, signals are taken from here."""
    if stop is not None:
        return _run(task, workdir, stop)
    # SIGTERM/SIGINT are taken from here on, so one that arrives during restore or the first step's
    # compile is honoured at the first agreed step boundary instead of killing the process.
    with StopSignal() as stop:
        return _run(task, workdir, stop)


def _run(task: Task, workdir: str | epath.Path, stop: StopSignal) -> Result:
    workdir = epath.Path(workdir)
    is_main = jax.process_index() == 0
    loop, config, mesh = task.loop, task.config, task.mesh
    total_steps = int(loop.steps)
    goodput = goodput_lib.Goodput()  # wall time by cause, logged with every window
    profiler = profiling.StepProfiler(config.get("profile", {}).get("steps", ""), workdir)

    # ---- Config -------------------------------------------------------------------------------
    if loop.checkpoint_every % loop.log_every:
        raise ValueError(f"checkpoint every {loop.checkpoint_every} steps must be a multiple of logging every "
                         f"{loop.log_every}, so that a resumed run logs the same windows")
    log.info("%s: mesh %s over %d devices, %d process(es)", task.name, dict(mesh.shape), jax.device_count(),
             jax.process_count())
    if is_main:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))

    restore_started = time.perf_counter()
    # ---- Init or restore -----------------------------------------------------------------------
    manager = ckpt.make_manager(workdir / "checkpoints", keep=loop.keep, keep_every=loop.keep_every,
                                async_save=loop.async_save)
    # Every process restores alone and all agree: a damaged newest step falls back, never hangs.
    restored = ckpt.restore_latest_intact(manager, task.abstract_state, task.train_data, check_config=lambda saved:
                                          check_resumable(saved, config, workdir, task.resume_guard, task.resume_free))
    start, state = restored.step, restored.state
    if start is not None:
        log.info("resumed from %s at step %d", workdir / "checkpoints", start)
        goodput.add("restore", time.perf_counter() - restore_started)
    else:
        with task.context():
            state = task.init_state()
        start = 0
    step = int(jax.device_get(state["step"]))
    last_saved = start if start else None
    consecutive_bad = int(jax.device_get(state["bad_steps"])) if "bad_steps" in state else 0

    # ---- Metrics -------------------------------------------------------------------------------
    writer = metrics_lib.MetricsWriter(workdir, enabled=is_main, resume_step=step)

    def log_window(at_step: int, window: Window, wall: float):
        out = window.summary()
        timed, wall = window.steps - window.untimed_steps, wall - window.untimed_s
        if timed > 0 and wall > 0:
            out["perf/step_time_s"] = wall / timed
            out[f"perf/{task.item_unit}_per_s"] = task.items_per_step * timed / wall
            if task.flops_per_item:
                out["perf/mfu"] = (out[f"perf/{task.item_unit}_per_s"] * task.flops_per_item / task.peak_flops
                                   if task.peak_flops else 0.0)
            out["perf/data_wait_fraction"] = min(window.data_wait / wall, 1.0)
        out.update(goodput.metrics())
        writer.write(at_step, out)
        if is_main:
            bar.write(f"step {at_step}: " + "  ".join(
                f"{k.split('/', 1)[1]}={out[k]:.4g}" for k in task.console if k in out))
        return out

    def run_eval(at_step: int):
        t = time.perf_counter()
        result = task.evaluate(state)
        writer.write(at_step, {"eval/" + k: v for k, v in result.scalars.items()})
        for tag, image in result.images.items():
            writer.write_image(at_step, "eval/" + tag, image)
        if is_main and result.console:
            bar.write(f"step {at_step}: eval {result.console}")
        window.untimed_s += time.perf_counter() - t
        goodput.add("eval", time.perf_counter() - t)
        return result

    def save(at_step: int, *, force: bool = False):
        nonlocal last_saved
        t = time.perf_counter()
        save_checkpoint(manager, at_step, state, task.train_data, config, force=force, last_good=last_saved)
        last_saved = at_step
        window.untimed_s += time.perf_counter() - t  # the blocking part of an async save
        goodput.add("checkpoint", time.perf_counter() - t)

    # ---- Loop ----------------------------------------------------------------------------------
    # Each step's metrics are fetched after the next step is dispatched, so the host never stalls
    # the device; `pending` holds the previous step's (step, device metrics, data wait).
    window, window_start = task.new_window(), time.perf_counter()
    last_metrics: dict = {}
    pending = None
    preempted = False
    first_step = step + 1
    max_bad = int(loop.max_bad_steps)
    eval_every = int(loop.eval_every)

    def consume(pending_step, device_metrics, data_wait):
        nonlocal window, window_start, consecutive_bad, last_metrics
        m = jax.device_get(device_metrics)
        window.add(m)
        if pending_step == first_step:  # this step compiled the update: time the window from here
            window.untimed_steps += 1
            window_start = time.perf_counter()
        else:
            window.data_wait += data_wait
        consecutive_bad = 0 if bool(m["finite"]) else consecutive_bad + 1
        if consecutive_bad >= max_bad:
            last_metrics = log_window(pending_step, window, time.perf_counter() - window_start)
            manager.wait_until_finished()
            shown = ", ".join(f"{k}={float(m[k])}" for k in task.non_finite_shows if k in m)
            raise NonFiniteError(
                f"{consecutive_bad} consecutive steps (up to step {pending_step}) had a non-finite loss or "
                f"gradient ({shown}). Their updates were skipped and nothing after step {last_saved} was "
                f"saved. {task.non_finite_hint}; train.max_bad_steps={max_bad} sets the limit.")
        if pending_step % loop.log_every == 0 or pending_step == total_steps:
            last_metrics = log_window(pending_step, window, time.perf_counter() - window_start)
            window, window_start = task.new_window(), time.perf_counter()
            bar.set_postfix(loss=f"{last_metrics['train/loss']:.3f}", refresh=False)

    def flush():
        nonlocal pending
        if pending is not None:
            consume(*pending)
            pending = None

    with jax.set_mesh(mesh), task.context(), \
            _progress(task.name, total_steps, step, is_main) as bar:
        goodput.loop_started()
        while step < total_steps:
            t0 = time.perf_counter()
            batch = device_batch(next(task.train_data), mesh)
            data_wait = time.perf_counter() - t0
            goodput.add("data_wait", data_wait)
            with profiler.step(step + 1):
                state, device_metrics = task.train_step(state, batch, step)
            if step + 1 == first_step:  # the first call traces and compiles; the device runs it later
                goodput.add("compile", time.perf_counter() - t0 - data_wait)
            step += 1
            profiler.after(step, device_metrics)
            flush()
            pending = (step, device_metrics, data_wait)
            bar.update(1)
            if task.replan is not None and (planned := task.replan(step, first_step - 1, state)) != total_steps:
                total_steps = bar.total = planned
            if (eval_every and step % eval_every == 0) or (loop.eval_at_end and step == total_steps):
                if task.evaluate is not None:
                    flush()
                    run_eval(step)
            if step % loop.checkpoint_every == 0 or step == total_steps:
                flush()  # log up to this step before its checkpoint can exist
                save(step, force=True)
            if stop.agreed():
                flush()
                if window.steps:  # the partial window, so that no step goes unlogged
                    last_metrics = log_window(step, window, time.perf_counter() - window_start)
                    window, window_start = task.new_window(), time.perf_counter()
                if last_saved != step:
                    save(step, force=True)
                preempted = True
                log.warning("saved step %d after %s; exiting", step, stop.received)
                break
        flush()
        profiler.close()
    manager.wait_until_finished()
    manager.close()
    if not preempted and step >= total_steps and task.finish is not None:
        task.finish(state)
    writer.close()
    return Result(step=step, state=state, preempted=preempted, last_metrics=last_metrics)
