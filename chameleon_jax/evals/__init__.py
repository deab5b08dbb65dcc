"""Evaluation: perplexity per modality (`perplexity`), and of a stored checkpoint (`checkpoint`)."""
from chameleon_jax.evals.checkpoint import evaluate_checkpoint, restore_for_eval

__all__ = ["evaluate_checkpoint", "restore_for_eval"]
