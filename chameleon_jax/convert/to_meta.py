"""Export to Meta's release layout: per-rank `consolidated*.pth` plus `params.json` (spec §9.1–9.2).

The exact inverse of meta.py, so `--from meta` reads the export back bit-identically:
- each rank holds 1/R of every matrix, split where Meta's model-parallel code splits it: wq/wk/wv and
  w1/w3 by output rows (whole heads), wo and w2 by input columns, the embedding by hidden columns,
  the output head by vocabulary rows; the RMSNorm scales are replicated on every rank;
- each rank holds one q/k-norm vector per layer, applied to its own heads (spec §2.3): rank r gets QK
  group r·G/R, so R must be a multiple of qk_norm_groups G (R = G by default, the model-parallel size the
  groups came from; R > G repeats each group's vector on R/G ranks, which imports as R equal groups);
- Wq/Wk rows and the q/k-norm vectors go back from our half-split RoPE layout to Meta's adjacent pairs
  within every head (old row 2i + j <- our row j·H/2 + i, the inverse of meta.py's reorder).

Ranks are built and written one at a time (torch.save pickles a whole rank), so the export holds the
source params plus one rank's tensors: 1/R of the model at the written dtype.
"""
from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from chameleon_jax.convert.meta import _half_split_order
from chameleon_jax.model.config import ModelConfig, swiglu_hidden_size


@dataclasses.dataclass
class ExportedMeta:
    out_dir: str
    files: list[str]
    ranks: int
    rank_bytes: int  # the largest rank's tensor bytes (what one torch.save holds)


def adjacent_pair_order(head_dim: int) -> np.ndarray:
    """Index array taking a head's half-split layout back to Meta's adjacent pairs (inverse of meta.py's)."""
    return np.argsort(_half_split_order(head_dim))


def ffn_args(d_model: int, ffn_dim: int) -> dict:
    """multiple_of / ffn_dim_multiplier that make Meta's FeedForward size rule (spec §2.1) give ffn_dim."""
    if swiglu_hidden_size(d_model) == ffn_dim:
        return {"multiple_of": 256}
    hidden = int(2 * 4 * d_model / 3)
    # Rounding up to a multiple of ffn_dim lands on ffn_dim for any 0 < int(mult * hidden) <= ffn_dim.
    args = {"multiple_of": ffn_dim, "ffn_dim_multiplier": min(1.0, ffn_dim / hidden)}
    assert swiglu_hidden_size(d_model, ffn_dim, args["ffn_dim_multiplier"]) == ffn_dim
    return args


def check_ranks(cfg: ModelConfig, ranks: int) -> None:
    problems = []
    if ranks < 1 or ranks % cfg.qk_norm_groups:
        problems.append(f"each rank holds one q/k-norm vector, so --ranks must be a multiple of "
                        f"qk_norm_groups={cfg.qk_norm_groups}")
    for name, size in (("n_heads", cfg.n_heads), ("n_kv_heads", cfg.n_kv_heads), ("ffn_dim", cfg.ffn_dim),
                       ("vocab_size", cfg.vocab_size), ("d_model", cfg.d_model)):
        if ranks >= 1 and size % ranks:
            problems.append(f"{name}={size} is not divisible by {ranks} ranks")
    if problems:
        ok = [r for r in range(cfg.qk_norm_groups, cfg.n_kv_heads + 1, cfg.qk_norm_groups)
              if not any(s % r for s in (cfg.n_heads, cfg.n_kv_heads, cfg.ffn_dim, cfg.vocab_size, cfg.d_model))]
        raise ValueError(f"--ranks {ranks}: " + "; ".join(problems) + f". Pick --ranks in {ok}.")


def _torch(x: np.ndarray):
    import torch

    if x.dtype.name == "bfloat16":  # numpy has no bf16 of its own: move the bits
        return torch.from_numpy(x.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(x)


def rank_state(cfg: ModelConfig, params: dict, rank: int, ranks: int, dtype) -> dict:
    """Meta's state dict of one rank (torch tensors in `dtype`)."""
    d, n, k, h, f, v = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.ffn_dim, cfg.vocab_size
    order = adjacent_pair_order(h)
    group = rank * cfg.qk_norm_groups // ranks

    def part(size):
        return slice(rank * size // ranks, (rank + 1) * size // ranks)

    def t(x):  # a copy of its own (a view of the params would be read-only and pin their buffer)
        return _torch(np.array(x, dtype=dtype, order="C", copy=True))

    att, mlp = params["blocks"]["attention"], params["blocks"]["mlp"]
    state = {
        "tok_embeddings.weight": t(np.asarray(params["embedding"])[:, part(d)]),
        "norm.weight": t(params["final_norm"]["scale"]),
        "output.weight": t(np.asarray(params["output"])[:, part(v)].T),
        # A buffer, not a parameter, but Meta's loader asserts that it is the one unexpected key (spec §9.1).
        "rope.freqs": t(1.0 / cfg.rope_theta ** (np.arange(0, h, 2, dtype=np.float64) / h)),
    }
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        wq, wk, wv, wo = (np.asarray(att[w])[i] for w in ("wq", "wk", "wv", "wo"))
        state[p + "attention.wq.weight"] = t(wq[:, part(n)][..., order].reshape(d, -1).T)
        state[p + "attention.wk.weight"] = t(wk[:, part(k)][..., order].reshape(d, -1).T)
        state[p + "attention.wv.weight"] = t(wv[:, part(k)].reshape(d, -1).T)
        state[p + "attention.wo.weight"] = t(wo[part(n)].reshape(-1, d).T)
        for ours, theirs in (("q_norm", "q_normalization"), ("k_norm", "k_normalization")):
            state[p + f"attention.{theirs}.weight"] = t(np.asarray(att[ours]["scale"])[i, group][order])
            state[p + f"attention.{theirs}.bias"] = t(np.asarray(att[ours]["bias"])[i, group][order])
        state[p + "feed_forward.w1.weight"] = t(np.asarray(mlp["w1"])[i][:, part(f)].T)
        state[p + "feed_forward.w3.weight"] = t(np.asarray(mlp["w3"])[i][:, part(f)].T)
        state[p + "feed_forward.w2.weight"] = t(np.asarray(mlp["w2"])[i][part(f)].T)
        state[p + "attention_norm.weight"] = t(np.asarray(params["blocks"]["attention_norm"]["scale"])[i])
        state[p + "ffn_norm.weight"] = t(np.asarray(params["blocks"]["ffn_norm"]["scale"])[i])
    return state


def params_json(cfg: ModelConfig, ranks: int) -> dict:
    """Meta's ModelArgs for this model (the official loader merges params["model"] and
    consolidate_params.json)."""
    args = dict(dim=cfg.d_model, n_layers=cfg.n_layers, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads,
                vocab_size=cfg.vocab_size, norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
                qk_normalization=True, swin_norm=cfg.block_order == "swin", **ffn_args(cfg.d_model, cfg.ffn_dim))
    return {"model": args}


def write_meta(config, params: dict, out_dir: str, *, ranks: int | None = None, dtype=None) -> ExportedMeta:
    """Writes (experiment config, params) in Meta's release layout; see the module docstring.

    `ranks` defaults to qk_norm_groups; `dtype` (of the written tensors) to the params' own.
    One rank: `consolidated.pth`, as in the 7b release; several: `consolidated.00.pth`, ...
    """
    import torch

    from chameleon_jax.convert import check_params

    if "://" in str(out_dir):
        raise ValueError(f"--out {out_dir}: Meta's layout is written to local disk; copy it to the bucket after.")
    cfg = ModelConfig.from_config(config.model)
    check_params(params, cfg)
    ranks = cfg.qk_norm_groups if ranks is None else int(ranks)
    check_ranks(cfg, ranks)
    dtype = np.dtype(dtype) if dtype is not None else np.asarray(params["embedding"]).dtype
    os.makedirs(out_dir, exist_ok=True)
    files, largest = [], 0
    for rank in range(ranks):
        name = "consolidated.pth" if ranks == 1 else f"consolidated.{rank:02d}.pth"
        state = rank_state(cfg, params, rank, ranks, dtype)
        largest = max(largest, sum(x.numel() * x.element_size() for x in state.values()))
        torch.save(state, os.path.join(out_dir, name))
        del state  # this rank's copies go before the next is built
        files.append(name)
    with open(os.path.join(out_dir, "params.json"), "w") as f:
        json.dump(params_json(cfg, ranks), f, indent=2)
    with open(os.path.join(out_dir, "consolidate_params.json"), "w") as f:
        json.dump({"model_parallel_size": ranks}, f)
    return ExportedMeta(out_dir=str(out_dir), files=files + ["params.json", "consolidate_params.json"],
                        ranks=ranks, rank_bytes=largest)
