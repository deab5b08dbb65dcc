"""Evaluation: perplexity per modality (`perplexity`), and of a stored checkpoint (`checkpoint`); captioning
and VQA scores (`metrics`: CIDEr-D, VQA accuracy) and their confidence intervals (`stats`)."""
from chameleon_jax.evals.checkpoint import evaluate_checkpoint, restore_for_eval

__all__ = ["evaluate_checkpoint", "restore_for_eval"]
