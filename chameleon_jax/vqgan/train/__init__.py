"""Training the VQ-GAN on the shared training loop (`chameleon_jax.train.trainer`).

    python -m chameleon_jax.vqgan.train --config experiments/vqgan_smoke.py --workdir /tmp/vqgan_smoke
    python -m chameleon_jax.vqgan.train --config experiments/vqgan_chameleon.py --workdir RUN \
        --config.data.inputs=/path/to/images

    result = train(config, workdir)          # trainer.Result: step, whole state, preempted, last metrics
    params = train_or_load(config, workdir)  # the finished run's export, or train (resuming) first

Reruns with the same workdir resume from the latest checkpoint bit for bit; SIGTERM/SIGINT save and
exit; a finished run writes RUN/export (read by `chameleon_jax.vqgan.checkpoint.load`).

    data.py      image batches through Grain: procedural shapes, or image folders / JSONL / tar shards
    step.py      the state (generator, discriminator, both Adam states, EMA, code usage) and the update
    evaluate.py  held-out PSNR / SSIM / codebook health / shape analyzer, and the comparison grid
    report.py    the held-out report (eval.report): PNGs, metrics against a downsampling baseline, report.md
    budget.py    fitting the schedule to a wall-clock budget (`train.fit_to_budget`)
    task.py      the VQ-GAN as a `trainer.Task`; train, train_or_load
    settings.py  the config names shared with the language model (train.batch_size, checkpoint.every, ...)
"""
from chameleon_jax.vqgan.train.step import eval_params, init_state, make_train_step
from chameleon_jax.vqgan.train.task import make_task, train, train_or_load

__all__ = ["eval_params", "init_state", "make_train_step", "make_task", "train", "train_or_load"]
