"""python -m chameleon_jax.smoke --workdir DIR [--config experiments/smoke.py[:quick]] [--config.x.y=v]
    [--vqgan_workdir DIR] [--reevaluate FINISHED_RUN]

Runs (or resumes) the smoke experiment in DIR and prints its headline scores; see chameleon_jax.smoke.
"""
import logging

from absl import app, flags
from ml_collections import config_flags

from chameleon_jax.smoke import stages

_CONFIG = config_flags.DEFINE_config_file(
    "config", str(stages.REPO / "experiments" / "smoke.py"), "Experiment config file (path.py[:variant]).",
    lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory; every stage is cached here.", required=True)
_VQGAN_WORKDIR = flags.DEFINE_string(
    "vqgan_workdir", None, "VQ-GAN run to reuse or create (default WORKDIR/vqgan); a finished run is loaded, "
    "not retrained.")
_REEVALUATE = flags.DEFINE_string(
    "reevaluate", None, "A finished smoke run's workdir: score its model on the evaluation set of --config "
    "(written to --workdir) instead of running the experiment; nothing is trained.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; overrides look like --config.train.steps=100")
    from chameleon_jax import cpu
    from chameleon_jax import smoke

    config = _CONFIG.value
    # Data-parallel over the cores: before any JAX backend exists.
    cpu.use_every_core(divides=(config.train.batch_size, stages.vqgan_config(config.smoke).train.batch_size))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("absl", "orbax", "jax._src"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if _REEVALUATE.value:
        from chameleon_jax.smoke import experiment

        results = experiment.reevaluate(config, _REEVALUATE.value, _WORKDIR.value)
    else:
        from chameleon_jax.smoke import experiment

        try:
            results = smoke.run(config, _WORKDIR.value, _VQGAN_WORKDIR.value)
        except experiment.Interrupted as stopped:
            logging.warning("%s", stopped)
            raise SystemExit(143)  # as a SIGTERM'd process would
    print("\n" + smoke.summary(results, _WORKDIR.value))


if __name__ == "__main__":
    from chameleon_jax import cpu

    cpu.use_huge_pages()  # before anything allocates; see chameleon_jax/cpu.py
    app.run(main)
