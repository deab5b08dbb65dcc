"""Parameter counts and model FLOPs per token, for MFU (runner, benchmarks, model_info).

Counts come from the model's own abstract state (`nnx.eval_shape`, nothing allocated), so they can
never drift from the code. FLOPs are analytic because `compiled.cost_analysis()` undercounts on CPU
and inside loops (stack.md).

Training FLOPs per token, for a sequence of length T (a multiply-add is 2 FLOPs; backward is 2× forward):

    6 · N_matmul                      every weight used in a matmul, once forward (2) and twice backward (4)
  + 6 · L · T · D_attn                attention scores QKᵀ and the weighted sum PV: 2·2·T·D_attn forward per
                                      token per layer, ×3 for training = 12·L·T·D_attn, halved because a
                                      causal query sees on average half of the keys

where N_matmul counts wq, wk, wv, wo, w1, w2, w3 in every layer plus the output projection, and
D_attn = n_heads · head_dim. Not counted: the embedding lookup (a gather, no matmul FLOPs), norms,
RoPE, softmax and other element-wise work, and any recomputation by remat. This is the usual
"model FLOPs" convention (PaLM appendix B), so MFU does not reward recomputation. Packed segments are
counted as if attention spanned the whole row; the segment mask does not change the work done by a
dense kernel.
"""

from __future__ import annotations

import math

import jax

from chameleon_jax.model.config import ModelConfig


def _leaf_name(path) -> str:
    return "/".join(str(getattr(k, "key", k)) for k in path)


def param_breakdown(cfg: ModelConfig) -> dict[str, int]:
    """Parameter counts by kind: `embedding` (lookup only), `matmul` (weights of matmuls, incl. the
    output projection), `norm` (RMSNorm and QK-norm scales and biases), and `total`."""
    from chameleon_jax import model as model_lib  # model/__init__ imports this package's modules

    _, state = model_lib.abstract(cfg)
    counts = {"embedding": 0, "matmul": 0, "norm": 0}
    for path, leaf in jax.tree_util.tree_leaves_with_path(state):
        name = _leaf_name(path)
        n = math.prod(leaf.shape)
        if "norm" in name:
            counts["norm"] += n
        elif name.startswith("embedding"):
            counts["embedding"] += n
        else:
            counts["matmul"] += n
    counts["total"] = sum(counts.values())
    return counts


def param_count(cfg: ModelConfig) -> int:
    """Total number of parameters (7B: 7,013,158,912; 34B with 4 QK-norm groups: 34,293,522,432)."""
    return param_breakdown(cfg)["total"]


def flops_breakdown(cfg: ModelConfig, seq_len: int) -> dict[str, int]:
    """Training FLOPs per token split into `matmul` (6·N_matmul) and `attention` (6·L·T·D_attn)."""
    n_matmul = param_breakdown(cfg)["matmul"]
    d_attn = cfg.n_heads * cfg.head_dim
    return {"matmul": 6 * n_matmul, "attention": 6 * cfg.n_layers * seq_len * d_attn}


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
    """Model FLOPs to train on one token at sequence length `seq_len` (formula in the module doc)."""
    return sum(flops_breakdown(cfg, seq_len).values())
