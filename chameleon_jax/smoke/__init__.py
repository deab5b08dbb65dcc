"""The CPU smoke experiment: a small Chameleon learns captioning and text-to-image on procedural shapes.

    python -m chameleon_jax.smoke --workdir runs/smoke [--config experiments/smoke.py[:quick]]
        [--vqgan_workdir runs/vqgan_smoke] [--config.smoke.guidance=two ...]

    stages.py      data, tokenizer, vqgan, pretokenize, train config; each cached in the workdir
    evaluate.py    captioning, text-to-image and the VQ-GAN ceiling on held-out scenes; perplexity
    report.py      WORKDIR/report.md, its figures and results.json
    experiment.py  `run`: the stages in order, then `runner.train`, evaluation and the report

Everything is a function of the config's seeds, so the same seed gives the same results.
"""
from chameleon_jax.smoke.experiment import run, summary

__all__ = ["run", "summary"]
