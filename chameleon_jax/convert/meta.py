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


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_MADV_DONTNEED = 4


def _release_pages(t) -> None:
    """Drops the resident pages of a tensor that `torch.load(mmap=True)` mapped from its file.

    Touched pages of a file mapping stay in this process's resident set until the mapping goes away,
    so without this a 7B import's RSS would climb to the whole 14 GB consolidated.pth. The mapping is
    private and only ever read, so the kernel re-reads a dropped page from the file if it is needed
    again (pages shared with a neighbouring tensor included).
    """
    import ctypes

    storage = t.untyped_storage()
    start, end = storage.data_ptr(), storage.data_ptr() + storage.nbytes()
    start -= start % _PAGE
    end += -end % _PAGE
    if end > start:
        ctypes.CDLL(None, use_errno=True).madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start),
                                                  _MADV_DONTNEED)


def _layer_keys(i: int) -> list[str]:
    p = f"layers.{i}."
    return [p + f"attention.{w}.weight" for w in ("wq", "wk", "wv", "wo")] + [
        p + f"attention.{n}.{part}" for n in ("q_normalization", "k_normalization") for part in ("weight", "bias")
    ] + [p + f"feed_forward.{w}.weight" for w in ("w1", "w2", "w3")] + [
        p + "attention_norm.weight", p + "ffn_norm.weight"]


def load_meta(src: str, dtype=np.float32) -> tuple[dict, dict, None]:
    """(config.model fields, params, None) from an official model folder (e.g. data/models/7b).

    The params are `streaming.LazyTensor`s: each layer of each leaf is read from the memory-mapped
    shards, converted and written when the export is saved, then its pages are dropped, so peak host
    memory is about the largest single tensor (docs/convert.md), not the model.
    """
    import torch

    from chameleon_jax.convert.streaming import LazyTensor

    files = sorted(glob.glob(os.path.join(src, "consolidated*.pth")))
    if not files:
        raise FileNotFoundError(f"No consolidated*.pth in {src}; point --src at e.g. data/models/7b.")
    args = _read_args(src)
    if args.get("qk_normalization") is False:
        raise ValueError("params.json has qk_normalization=false; our model always applies QK-norm.")
    # mmap: tensors are views of the files, paged in when a layer is converted (weights_only: no code runs).
    shards = [torch.load(f, map_location="cpu", mmap=True, weights_only=True) for f in files]
    n_shards = len(shards)

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
    expected = {"tok_embeddings.weight", "norm.weight", "output.weight"}
    expected.update(key for i in range(n_layers) for key in _layer_keys(i))
    for f, shard in zip(files, shards):
        missing = expected - set(shard)
        unused = set(shard) - expected - {"rope.freqs"}  # rope.freqs is a buffer (spec §9.1)
        if missing:
            raise ValueError(f"{f} lacks {sorted(missing)[:8]}; params.json says n_layers={n_layers}.")
        if unused:
            raise ValueError(f"Unexpected keys in {f}: {sorted(unused)[:8]}; is this a Chameleon checkpoint?")
    order = _half_split_order(h)

    def pieces(key: str) -> list[np.ndarray]:
        return [_to_numpy(s[key]) for s in shards]

    def done(key: str) -> None:
        for s in shards:
            _release_pages(s[key])

    def cat(key: str, axis: int) -> np.ndarray:
        out = np.concatenate(pieces(key), axis=axis).astype(dtype, copy=False)  # no copy when already dtype
        done(key)
        return out

    def mean(key: str) -> np.ndarray:
        # Replicated norms are identical on every shard; take them as they are, since the fp32 mean of R
        # equal values is not always that value (R=3 or 8 move some elements by an ulp).
        parts = [p.astype(np.float32) for p in pieces(key)]
        same = all(np.array_equal(parts[0], p) for p in parts[1:])
        out = (parts[0] if same else np.mean(parts, axis=0)).astype(dtype)
        done(key)
        return out

    def stacked(fn, shape):
        return LazyTensor.layers(n_layers, lambda i: fn(f"layers.{i}."), shape, dtype)

    def attn_in(name, heads):  # (heads·H, D) torch (out, in) -> [D, heads, H], half-split rows
        return stacked(lambda p: cat(p + f"attention.{name}.weight", 0).T.reshape(d, heads, h)[..., order],
                       (d, heads, h))

    def qk_norm(name):  # one vector per shard -> [L, groups, H], half-split order
        def groups(key):
            out = np.stack(pieces(key))[:, order].astype(dtype)
            done(key)
            return out
        return {"scale": stacked(lambda p: groups(p + f"attention.{name}.weight"), (n_shards, h)),
                "bias": stacked(lambda p: groups(p + f"attention.{name}.bias"), (n_shards, h))}

    params = {
        "embedding": LazyTensor.whole(lambda: cat("tok_embeddings.weight", 1), (vocab, d), dtype),
        "blocks": {
            "attention": {
                "wq": attn_in("wq", n),
                "wk": attn_in("wk", k),
                "wv": stacked(lambda p: cat(p + "attention.wv.weight", 0).T.reshape(d, k, h), (d, k, h)),
                "wo": stacked(lambda p: cat(p + "attention.wo.weight", 1).T.reshape(n, h, d), (n, h, d)),
                "q_norm": qk_norm("q_normalization"),
                "k_norm": qk_norm("k_normalization"),
            },
            "mlp": {
                "w1": stacked(lambda p: cat(p + "feed_forward.w1.weight", 0).T, (d, ffn)),
                "w3": stacked(lambda p: cat(p + "feed_forward.w3.weight", 0).T, (d, ffn)),
                "w2": stacked(lambda p: cat(p + "feed_forward.w2.weight", 1).T, (ffn, d)),
            },
            "attention_norm": {"scale": stacked(lambda p: mean(p + "attention_norm.weight"), (d,))},
            "ffn_norm": {"scale": stacked(lambda p: mean(p + "ffn_norm.weight"), (d,))},
        },
        "final_norm": {"scale": LazyTensor.whole(lambda: mean("norm.weight"), (d,), dtype)},
        "output": LazyTensor.whole(lambda: cat("output.weight", 0).T, (d, vocab), dtype),
    }
    return fields, params, None
