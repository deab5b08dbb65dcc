"""chameleon_jax: train, evaluate and sample Chameleon-style early-fusion mixed-modal models in JAX."""

__version__ = "0.1.0"
