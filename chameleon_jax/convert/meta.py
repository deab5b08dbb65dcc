"""Import Meta's official release folder: params.json, consolidate_params.json, consolidated*.pth (spec §9.1–9.2).

The shards are torch pickles, so this path needs torch (the `peers` extra). Per shard: matrices are
split along heads / FFN / vocab / hidden and are concatenated back; the norms are replicated (HF
averages them, and so do we); each shard carries its own q/k-norm vectors, which become our QK-norm
groups (one per shard, in shard order, each shared by that shard's consecutive heads).

RoPE: Meta pairs adjacent dims (2i, 2i+1); our model pairs i with i + H/2. Within every head, the
rows of wq/wk and the q/k-norm vectors are reordered evens-first (new j·H/2 + i <- old 2i + j), the
same permutation as HF's converter (spec §2.4). LayerNorm statistics do not depend on the order.
"""

from __future__ import annotations

import glob
import json
import os

import numpy as np

from chameleon_jax.model.config import ModelConfig


def _half_split_order(head_dim: int) -> np.ndarray:
    """Index array taking a head's adjacent-pair layout to the half-split layout."""
    return np.concatenate([np.arange(0, head_dim, 2), np.arange(1, head_dim, 2)])


def _read_args(src: str) -> dict:
    # The official loader merges {**params, **params["model"], **consolidate_params}.
    with open(os.path.join(src, "params.json")) as f:
        params = json.load(f)
    args = {**params, **params.get("model", {})}
    extra = os.path.join(src, "consolidate_params.json")
    if os.path.exists(extra):
        with open(extra) as f:
            args.update(json.load(f))
    return args


def _to_numpy(t) -> np.ndarray:
    import torch

    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:  # numpy has no bf16: reinterpret the bits as ml_dtypes' bfloat16
        import ml_dtypes

        return t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def load_meta(src: str, dtype=np.float32) -> tuple[dict, dict, None]:
    """(config.model fields, params, None) from an official model folder (e.g. data/models/7b)."""
    import torch

    files = sorted(glob.glob(os.path.join(src, "consolidated*.pth")))
    if not files:
        raise FileNotFoundError(f"No consolidated*.pth in {src}; point --src at e.g. data/models/7b.")
    args = _read_args(src)
    if args.get("qk_normalization") is False:
        raise ValueError("params.json has qk_normalization=false; our model always applies QK-norm.")
    shards = [torch.load(f, map_location="cpu", mmap=True, weights_only=True) for f in files]
    n_shards = len(shards)
    used: set[str] = set()

    def cat(key: str, axis: int) -> np.ndarray:
        used.add(key)
        return np.concatenate([_to_numpy(s[key]) for s in shards], axis=axis).astype(dtype)

    def mean(key: str) -> np.ndarray:
        used.add(key)
        return np.mean([_to_numpy(s[key]).astype(np.float32) for s in shards], axis=0).astype(dtype)

    d, n = args["dim"], args["n_heads"]
    k = args.get("n_kv_heads") or n
    h = d // n
    n_layers = args["n_layers"]
    vocab = shards[0]["output.weight"].shape[0] * n_shards
    ffn = shards[0]["layers.0.feed_forward.w1.weight"].shape[0] * n_shards
    fields = dict(vocab_size=vocab, d_model=d, n_layers=n_layers, n_heads=n, n_kv_heads=k, head_dim=h,
                  ffn_dim=ffn, qk_norm_groups=n_shards,
                  block_order="swin" if args.get("swin_norm") else "prenorm",
                  rope_theta=float(args.get("rope_theta", 10_000.0)), norm_eps=float(args.get("norm_eps", 1e-5)))
    ModelConfig(**fields)  # fails early on inconsistent fields
    if n % n_shards or k % n_shards:
        raise ValueError(f"{n_shards} shards do not split n_heads={n} / n_kv_heads={k} evenly.")
    order = _half_split_order(h)

    def layers(fn) -> np.ndarray:
        return np.stack([fn(f"layers.{i}.") for i in range(n_layers)])

    def attn_in(prefix, name, heads):  # (heads·H, D) torch (out, in) -> [D, heads, H], half-split rows
        return cat(prefix + f"attention.{name}.weight", 0).T.reshape(d, heads, h)[..., order]

    def qk_norm(name):  # one vector per shard -> [L, groups, H], half-split order
        def groups(key):
            used.add(key)
            return np.stack([_to_numpy(s[key]) for s in shards])[:, order].astype(dtype)
        return {"scale": layers(lambda p: groups(p + f"attention.{name}.weight")),
                "bias": layers(lambda p: groups(p + f"attention.{name}.bias"))}

    params = {
        "embedding": cat("tok_embeddings.weight", 1),
        "blocks": {
            "attention": {
                "wq": layers(lambda p: attn_in(p, "wq", n)),
                "wk": layers(lambda p: attn_in(p, "wk", k)),
                "wv": layers(lambda p: cat(p + "attention.wv.weight", 0).T.reshape(d, k, h)),
                "wo": layers(lambda p: cat(p + "attention.wo.weight", 1).T.reshape(n, h, d)),
                "q_norm": qk_norm("q_normalization"),
                "k_norm": qk_norm("k_normalization"),
            },
            "mlp": {
                "w1": layers(lambda p: cat(p + "feed_forward.w1.weight", 0).T),
                "w3": layers(lambda p: cat(p + "feed_forward.w3.weight", 0).T),
                "w2": layers(lambda p: cat(p + "feed_forward.w2.weight", 1).T),
            },
            "attention_norm": {"scale": layers(lambda p: mean(p + "attention_norm.weight"))},
            "ffn_norm": {"scale": layers(lambda p: mean(p + "ffn_norm.weight"))},
        },
        "final_norm": {"scale": mean("norm.weight")},
        "output": np.ascontiguousarray(cat("output.weight", 0).T),
    }
    unused = set(shards[0]) - used - {"rope.freqs"}  # rope.freqs is a buffer (spec §9.1)
    if unused:
        raise ValueError(f"Unexpected keys in {files[0]}: {sorted(unused)[:8]}; is this a Chameleon checkpoint?")
    return fields, params, None
