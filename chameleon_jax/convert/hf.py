"""Import a HF transformers `ChameleonForConditionalGeneration` directory (spec §9.3).

Reads `config.json` and the `*.safetensors` files written by `save_pretrained` with numpy only (no
torch), tensor by tensor, and stacks per-layer weights along the leading L axis of our params.

HF already stores Wq/Wk rows in the half-split RoPE layout our model uses (its converter permuted
Meta's adjacent-pair rows), so no permutation happens here. HF's q/k-norm arrays are (heads, H):
each model-parallel shard's vector repeated over that shard's heads; we keep one row per group and
check that the other rows of the group are identical. `model.vqmodel.*` (the image tokenizer) is
not read here.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Callable

import numpy as np

from chameleon_jax.model.config import ModelConfig


def model_config_from_hf(hf: dict) -> dict:
    """Our `config.model` fields from a HF ChameleonConfig dict; rejects what our model cannot run."""
    d, n = hf.get("hidden_size", 4096), hf.get("num_attention_heads", 32)
    k = hf.get("num_key_value_heads") or n
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    problems = []
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        problems.append(f"rope type {rope.get('rope_type', rope.get('type'))!r} (only plain RoPE is supported)")
    if hf.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={hf['hidden_act']!r} (SwiGLU needs 'silu')")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        problems.append("attention_bias/mlp_bias (our linear layers have no biases)")
    if d % n:
        problems.append(f"hidden_size={d} not divisible by num_attention_heads={n}")
    if problems:
        raise ValueError("This HF Chameleon config cannot be imported: " + "; ".join(problems))
    return dict(
        vocab_size=hf.get("vocab_size", 65_536), d_model=d, n_layers=hf.get("num_hidden_layers", 32),
        n_heads=n, n_kv_heads=k, head_dim=d // n, ffn_dim=hf.get("intermediate_size", 11_008),
        # One q/k-norm parameter set per model-parallel shard of the original training run (spec §2.3).
        qk_norm_groups=hf.get("model_parallel_size") or 1,
        block_order="swin" if hf.get("swin_norm") else "prenorm",
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10_000.0))),
        norm_eps=float(hf.get("rms_norm_eps", 1e-5)))


class _SafetensorsDir:
    """Lazy name -> numpy array over every *.safetensors file of a directory."""

    def __init__(self, src: str):
        from safetensors import safe_open

        files = sorted(glob.glob(os.path.join(src, "*.safetensors")))
        if not files:
            raise FileNotFoundError(
                f"No *.safetensors in {src}; save the HF model with save_pretrained(..., safe_serialization=True).")
        self._handles = [safe_open(f, framework="numpy") for f in files]
        self._where = {key: h for h in self._handles for key in h.keys()}

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def keys(self):
        return self._where.keys()

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self._where:
            raise KeyError(f"{key} is missing from the HF checkpoint")
        return self._where[key].get_tensor(key)


def _grouped_norm(w: np.ndarray, groups: int, name: str) -> np.ndarray:
    """(heads, H) HF q/k-norm array -> (groups, H), checking rows within each group are equal."""
    heads, h = w.shape
    if heads % groups:
        raise ValueError(f"{name}: {heads} heads cannot be split into qk_norm_groups={groups} "
                         f"(model_parallel_size in config.json); it must divide the head count.")
    per_group = w.reshape(groups, heads // groups, h)
    spread = np.abs(per_group - per_group[:, :1]).max(axis=(1, 2))
    if spread.max() > 0:
        bad = int(np.argmax(spread))
        raise ValueError(
            f"{name}: rows within QK-norm group {bad} differ (max |diff| {spread[bad]:.3g}); with "
            f"model_parallel_size={groups} every {heads // groups} consecutive heads must share one "
            f"vector. Our model keeps one vector per group, so this checkpoint (e.g. fine-tuned with "
            f"untied per-head norms, or a wrong model_parallel_size) cannot be imported exactly.")
    return per_group[:, 0]


def params_from_hf(tensors, cfg: ModelConfig, dtype=np.float32,
                   tie_word_embeddings: bool = False) -> dict:
    """Our pure params dict from HF tensors (a mapping name -> numpy array)."""
    n_layers, d, n, k, h = cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim

    def stacked(fn: Callable[[int], np.ndarray]) -> np.ndarray:
        first = np.asarray(fn(0))
        out = np.empty((n_layers,) + first.shape, dtype)
        out[0] = first
        for i in range(1, n_layers):
            out[i] = fn(i)
        return out

    def layer(i, suffix):
        return tensors[f"model.layers.{i}.{suffix}"]

    # torch Linear weights are (out, in); our kernels are (in, out) split into heads.
    attention = {
        "wq": stacked(lambda i: layer(i, "self_attn.q_proj.weight").T.reshape(d, n, h)),
        "wk": stacked(lambda i: layer(i, "self_attn.k_proj.weight").T.reshape(d, k, h)),
        "wv": stacked(lambda i: layer(i, "self_attn.v_proj.weight").T.reshape(d, k, h)),
        "wo": stacked(lambda i: layer(i, "self_attn.o_proj.weight").T.reshape(n, h, d)),
    }
    for ours, theirs in (("q_norm", "q_norm"), ("k_norm", "k_norm")):
        attention[ours] = {
            "scale": stacked(lambda i: _grouped_norm(
                layer(i, f"self_attn.{theirs}.weight"), cfg.qk_norm_groups, f"layer {i} {theirs}.weight")),
            "bias": stacked(lambda i: _grouped_norm(
                layer(i, f"self_attn.{theirs}.bias"), cfg.qk_norm_groups, f"layer {i} {theirs}.bias")),
        }
    blocks = {
        "attention": attention,
        "mlp": {
            "w1": stacked(lambda i: layer(i, "mlp.gate_proj.weight").T),
            "w3": stacked(lambda i: layer(i, "mlp.up_proj.weight").T),
            "w2": stacked(lambda i: layer(i, "mlp.down_proj.weight").T),
        },
        # In HF's swin layer `input_layernorm` is applied to the attention output, exactly like our
        # `attention_norm` in the swin order, so the names map 1:1 in both block orders.
        "attention_norm": {"scale": stacked(lambda i: layer(i, "input_layernorm.weight"))},
        "ffn_norm": {"scale": stacked(lambda i: layer(i, "post_attention_layernorm.weight"))},
    }
    embedding = tensors["model.embed_tokens.weight"]
    if "lm_head.weight" in tensors:
        output = tensors["lm_head.weight"]
    elif tie_word_embeddings:
        output = embedding
    else:
        raise KeyError("lm_head.weight is missing and tie_word_embeddings is false")
    return {
        "embedding": np.asarray(embedding, dtype),
        "blocks": blocks,
        "final_norm": {"scale": np.asarray(tensors["model.norm.weight"], dtype)},
        "output": np.ascontiguousarray(np.asarray(output, dtype).T),
    }


def image_ids_from_vocabulary_map(vocabulary_map: dict | None):
    """[start, stop) of the image-code ids (names `IMGIMG*` in HF's vocabulary_map), or None."""
    ids = sorted(v for name, v in (vocabulary_map or {}).items() if name.startswith("IMGIMG"))
    if not ids or ids[-1] - ids[0] + 1 != len(ids):
        return None  # absent or not one contiguous block: keep the default range
    return ids[0], ids[-1] + 1


def load_hf(src: str, dtype=np.float32) -> tuple[dict, dict, tuple[int, int] | None]:
    """(config.model fields, params, image id range) from a `save_pretrained` directory."""
    with open(os.path.join(src, "config.json")) as f:
        hf_config = json.load(f)
    if hf_config.get("model_type") not in (None, "chameleon"):
        raise ValueError(f"{src}/config.json has model_type={hf_config.get('model_type')!r}, not 'chameleon'.")
    fields = model_config_from_hf(hf_config)
    cfg = ModelConfig(**fields)
    params = params_from_hf(_SafetensorsDir(src), cfg, dtype, bool(hf_config.get("tie_word_embeddings")))
    return fields, params, image_ids_from_vocabulary_map(hf_config.get("vocabulary_map"))
