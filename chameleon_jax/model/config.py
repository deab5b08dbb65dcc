"""The transformer's hyper-parameters, as a frozen dataclass built from an ml_collections config.

Layers receive this small object, never the whole experiment config.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

BlockOrder = Literal["prenorm", "swin"]
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "save_block_outputs")
# Self-attention kernel for training and prefill (model/splash.py): "auto" = the Pallas splash kernel
# when the step is compiled for TPU devices, the XLA path (attention.causal_self_attention) elsewhere.
ATTENTION_KERNELS = ("auto", "xla", "splash")


def swiglu_hidden_size(d_model: int, multiple_of: int = 256, multiplier: float = 1.0) -> int:
    """FFN width rule of the official code (spec §2.1): 2/3 of 4d, times a multiplier, rounded up."""
    hidden = int(2 * 4 * d_model / 3)
    hidden = int(multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    qk_norm_groups: int = 1
    block_order: BlockOrder = "prenorm"
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-5
    dropout: float = 0.0
    init_std: float = 0.02
    scan_layers: bool = True
    remat: str = "none"
    # Query rows per block in training attention; blocks above the causal diagonal are skipped
    # (attention.causal_self_attention). 0 = one block. Any length works (the last block is ragged).
    attention_block: int = 64
    # "auto" | "xla" | "splash" (ATTENTION_KERNELS); cached single-token decoding always uses XLA.
    attention: str = "auto"
    dtype: str = "float32"        # activations / matmul inputs
    param_dtype: str = "float32"  # stored weights

    @classmethod
    def from_config(cls, cfg) -> "ModelConfig":
        """Builds from the `config.model` ConfigDict; head_dim and ffn_dim default to the spec's rules."""
        d = dict(cfg)
        if d.get("head_dim") in (None, 0):
            d["head_dim"] = d["d_model"] // d["n_heads"]
        if d.get("ffn_dim") in (None, 0):
            d["ffn_dim"] = swiglu_hidden_size(
                d["d_model"], d.pop("ffn_multiple_of", 256), d.pop("ffn_multiplier", 1.0))
        d.pop("ffn_multiple_of", None)
        d.pop("ffn_multiplier", None)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"Unknown config.model fields {sorted(unknown)}; known fields: {sorted(names)}")
        return cls(**d)

    @property
    def q_heads_per_kv(self) -> int:
        return self.n_heads // self.n_kv_heads
