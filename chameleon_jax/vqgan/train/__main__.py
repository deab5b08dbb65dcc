"""Train a VQ-GAN: `python -m chameleon_jax.vqgan.train --config experiments/vqgan_*.py --workdir DIR`.

Rerunning the same command resumes; a finished run prints its held-out metrics from the export.
"""
from __future__ import annotations

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "An experiments/vqgan_*.py file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics.jsonl, tensorboard/, export/.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    from chameleon_jax import cpu

    from chameleon_jax.vqgan.train import settings

    config = settings.upgrade(flags.FLAGS.config)
    cpu.use_every_core(divides=(config.train.batch_size,))  # before any backend exists
    import jax

    from chameleon_jax.train import trainer
    from chameleon_jax.vqgan import checkpoint as vq_checkpoint, perceptual
    from chameleon_jax.vqgan.train import data, evaluate, task

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("absl", "orbax", "jax._src"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    workdir = flags.FLAGS.workdir
    if not vq_checkpoint.is_finished(workdir):
        try:
            result = task.train(config, workdir)  # prints its held-out evaluation after the last step
        except trainer.NonFiniteError as e:
            logging.getLogger("chameleon_jax.vqgan").error("%s", e)
            sys.exit(3)
        if result.preempted:
            logging.getLogger("chameleon_jax.vqgan").warning(
                "preempted at step %d; rerun the same command to resume", result.step)
        return
    _, params = vq_checkpoint.load(workdir, config)
    images, scenes = data.eval_images(config.data, config.eval)
    lp = jax.device_put(perceptual.load_params()) if config.eval.lpips and perceptual.available() else None
    metrics, _ = evaluate.evaluate(params, images, scenes, n_embed=config.model.n_embed, lpips_params=lp)
    print("held-out:", " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))


if __name__ == "__main__":
    from chameleon_jax import cpu

    cpu.use_huge_pages()  # before anything allocates; see chameleon_jax/cpu.py
    app.run(main)
