"""Train: `python -m chameleon_jax.train --config experiments/X.py[:variant] --workdir DIR [--config.a.b=v]`.

Rerunning the same command resumes from DIR's latest checkpoint. SIGTERM or Ctrl-C saves and exits.
Multi-process: `--coordinator_address HOST:PORT --num_processes N --process_id I` (launch/local.py), or
`--distributed` to let `jax.distributed.initialize()` detect a TPU pod / GKE job by itself.
"""
from __future__ import annotations

import faulthandler
import logging
import signal
import sys

from absl import app, flags
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Experiment config file (experiments/X.py[:variant]).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics.jsonl, tensorboard/.")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() with auto-detection (TPU pods, GKE).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for explicit multi-process runs.")
flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator_address).")
flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator_address).")
flags.DEFINE_integer("heartbeat_timeout_s", 100, "Multi-process: a process that sent no heartbeat for this long "
                     "counts as dead, and every other process stops instead of waiting for it.")
flags.mark_flags_as_required(["config", "workdir"])


def init_distributed() -> None:
    """Joins the multi-process job, before any other JAX call (as every entry point must)."""
    import jax

    from chameleon_jax.train import compile_cache

    F = flags.FLAGS
    if F.coordinator_address:
        jax.distributed.initialize(F.coordinator_address, F.num_processes, F.process_id,
                                   heartbeat_timeout_seconds=F.heartbeat_timeout_s)
        if compile_cache.on_this_machine(F.coordinator_address):
            # Else XLA:CPU's per-process topology gives process 1 other cache keys than process 0, and it
            # recompiles every program on every launch (launch/local.py jobs, the multi-process tests).
            compile_cache.share_cpu_entries_between_local_processes()
    elif F.distributed:
        jax.distributed.initialize(heartbeat_timeout_seconds=F.heartbeat_timeout_s)


def config_with_init_model():
    """The experiment config, its model shaped as its init.checkpoint's weights are (fine-tuning an export)."""
    from chameleon_jax import checkpoint as ckpt
    from chameleon_jax import config as config_lib

    config = flags.FLAGS.config
    if not config.init.checkpoint:
        return config
    try:  # resuming: the run recorded that model when it started, and needs the export no more
        source = ckpt.resolve_step_dir(flags.FLAGS.workdir)
    except FileNotFoundError:
        source = ckpt.resolve_step_dir(config.init.checkpoint)  # a wrong path fails here, naming what it expected
    try:
        stored = ckpt.read_config(source)
    except FileNotFoundError:
        logging.getLogger("chameleon_jax.train").warning(
            "init.checkpoint %s has no stored config: the experiment's model must match its weights",
            config.init.checkpoint)
        return config
    return config_lib.model_from_init_checkpoint(
        config, stored, explicit=set(config_flags.get_override_values(flags.FLAGS["config"])))


def main(argv):
    del argv
    # A SIGTERM while joining the job would otherwise hit the default action (the notifier that owns the
    # signal in a multi-process run is installed inside initialize): remember it, then hand it on.
    early: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, frame: early.append(signum))
    # `kill -USR1 PID` prints every thread's Python stack to stderr and training goes on: where a hung host
    # waits (launch/local.py sends it shortly before its timeout).
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    init_distributed()
    import jax

    from chameleon_jax.train import preemption

    if early and jax.process_count() == 1:
        print("SIGTERM before the run started: nothing trained, nothing to save", file=sys.stderr)
        return
    from chameleon_jax import checkpoint as ckpt
    from chameleon_jax.train import runner

    level = logging.INFO if jax.process_index() == 0 else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("absl", "orbax", "jax._src"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        config = config_with_init_model()
    except ValueError as e:  # the command line contradicts the weights it starts from
        logging.getLogger("chameleon_jax.train").error("%s", e)
        sys.exit(2)
    try:
        # Entered before the task is built, so a signal from here on (data, restore, first compile) is
        # honoured at the first step boundary on every process. One remembered above is handed on now:
        # to StopSignal's handler (one process) or to jax's preemption notifier (several).
        with preemption.StopSignal() as stop:
            if early:
                signal.raise_signal(signal.SIGTERM)
            result = runner.train(config, flags.FLAGS.workdir, stop)
    except runner.NonFiniteError as e:
        logging.getLogger("chameleon_jax.train").error("%s", e)
        sys.exit(3)
    except ckpt.CheckpointDamaged as e:  # every process raises it at the same point: no peer is left waiting
        logging.getLogger("chameleon_jax.train").error("%s", e)
        sys.exit(4)
    if result.preempted:
        logging.getLogger("chameleon_jax.train").warning("preempted at step %d; rerun the same command to resume",
                                                          result.step)


if __name__ == "__main__":
    from chameleon_jax import cpu
    cpu.use_huge_pages()  # before anything allocates
    app.run(main)
