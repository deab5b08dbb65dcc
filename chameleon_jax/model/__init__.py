"""The Chameleon transformer: config, NNX modules, sharding rules and a functional surface.

Params travel as pure nested dicts of arrays (what Orbax saves and the optimizer updates); the
module is rebuilt from (graphdef, params) inside jitted functions with `bind`.
"""

from __future__ import annotations

import jax
from flax import nnx

from chameleon_jax.model.config import ModelConfig, swiglu_hidden_size
from chameleon_jax.model.transformer import Transformer
from chameleon_jax.model import sharding

# Annotations are resolved by our own rules table when shardings are derived; eager per-variable
# sharding would need a mesh at construction time.
nnx.use_eager_sharding(False)

__all__ = ["ModelConfig", "Transformer", "swiglu_hidden_size", "abstract", "init_params", "bind",
           "param_specs", "sharding"]


def abstract(cfg: ModelConfig):
    """(graphdef, abstract state) without allocating: shapes, dtypes and logical annotations."""
    model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    return nnx.split(model)


def param_specs(cfg: ModelConfig, rules=sharding.DEFAULT_RULES):
    """PartitionSpec per parameter (pure dict), from the logical names and the rules table."""
    _, state = abstract(cfg)
    return sharding.param_specs(state, rules)


def init_params(cfg: ModelConfig, key: jax.Array) -> dict:
    """Fresh parameters as a pure dict. Jit this with out_shardings to have them born sharded."""
    model = Transformer(cfg, rngs=nnx.Rngs(params=key))
    return nnx.to_pure_dict(nnx.split(model)[1])


def bind(graphdef, params: dict) -> Transformer:
    """Rebuilds the module from its graphdef and a pure params dict."""
    return nnx.merge(graphdef, params)
