"""LoRA adapters on the attention and MLP projections (Hu et al. 2021), and their merge into the kernels.

A target kernel W gains a rank-r update: W' = W + (alpha / r) · A·B, with A [in, r] and B [r, out].
The kernels keep the model's layout (transformer.py): stacked over layers and split into heads, e.g.
wq [L, D, N, H], wo [L, N, H, D]. So an adapter is stacked over L too, and its A takes the kernel's
input axes and its B the output axes:

    wq, wk, wv [L, D, N|K, H]   A [L, D, r]      B [L, r, N|K, H]
    wo         [L, N, H, D]     A [L, N, H, r]   B [L, r, D]
    w1, w3     [L, D, F]        A [L, D, r]      B [L, r, F]
    w2         [L, F, D]        A [L, F, r]      B [L, r, D]

The adapter tree mirrors the params tree ({"blocks": {"attention": {"wq": {"a", "b"}}}}), so a path
names the same kernel in both. B starts at zero, so a fresh adapter leaves the model unchanged.

Training runs the model on `merge_lora(params, lora, cfg)`: the forward is the merged model, the
same function an export writes. The cost of that choice: the backward forms each target's full
weight gradient before projecting it onto A and B (the weight-gradient matmuls of full fine-tuning),
and the merged kernels are one more copy of the targets per step. What LoRA saves here is the
optimizer state: AdamW moments for the adapters only, not for the frozen kernels.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

# Target name -> (path in the params tree, number of input axes after the layer axis).
TARGETS: dict[str, tuple[tuple[str, ...], int]] = {
    "wq": (("blocks", "attention", "wq"), 1),
    "wk": (("blocks", "attention", "wk"), 1),
    "wv": (("blocks", "attention", "wv"), 1),
    "wo": (("blocks", "attention", "wo"), 2),
    "w1": (("blocks", "mlp", "w1"), 1),
    "w3": (("blocks", "mlp", "w3"), 1),
    "w2": (("blocks", "mlp", "w2"), 1),
}


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """`config.finetune.lora`: rank 0 means no adapters."""
    rank: int = 0
    alpha: float = 16.0
    targets: tuple[str, ...] = tuple(TARGETS)

    @classmethod
    def from_config(cls, c) -> "LoraConfig":
        """From the `finetune.lora` section; targets as a comma list ("wq,wv") or a sequence."""
        targets = c.get("targets", ",".join(TARGETS))
        if isinstance(targets, str):
            targets = tuple(t.strip() for t in targets.split(",") if t.strip())
        return cls(rank=int(c.get("rank", 0)), alpha=float(c.get("alpha", 16.0)), targets=tuple(targets))

    def errors(self) -> list[str]:
        out = []
        if self.rank < 0:
            out.append(f"finetune.lora.rank={self.rank} must be >= 0 (0 = no adapters).")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown:
            out.append(f"finetune.lora.targets has {unknown}; choose from {list(TARGETS)} "
                       f"(attention wq,wk,wv,wo; MLP gate w1, up w3, down w2), comma-separated.")
        if self.rank > 0 and not self.targets:
            out.append("finetune.lora.rank > 0 but finetune.lora.targets is empty; name the projections, "
                       f"e.g. --config.finetune.lora.targets={','.join(TARGETS)}.")
        if self.rank > 0 and self.alpha <= 0:
            out.append(f"finetune.lora.alpha={self.alpha} must be > 0 (the update is scaled by alpha / rank).")
        return out

    @property
    def enabled(self) -> bool:
        return self.rank > 0


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def _put(tree: dict, path, value) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def _split_axes(shape, n_in: int):
    """(layers, input axes, output axes) of a stacked kernel."""
    return shape[0], tuple(shape[1:1 + n_in]), tuple(shape[1 + n_in:])


def init_lora(params, cfg: LoraConfig, key: jax.Array) -> dict:
    """Fresh adapters for `params` (arrays or ShapeDtypeStructs): A ~ N(0, 1/fan_in), B = 0.

    Adapters are float32 whatever the params' dtype: they are small, and a bf16 B would round away the
    first small updates from zero.
    """
    lora: dict = {}
    for i, name in enumerate(cfg.targets):
        path, n_in = TARGETS[name]
        layers, ins, outs = _split_axes(_get(params, path).shape, n_in)
        a = jax.random.normal(jax.random.fold_in(key, i), (layers, *ins, cfg.rank), jnp.float32) * math.prod(ins) ** -0.5
        b = jnp.zeros((layers, cfg.rank, *outs), jnp.float32)
        _put(lora, path, {"a": a, "b": b})
    return lora


def lora_specs(param_specs, cfg: LoraConfig) -> dict:
    """PartitionSpecs of the adapters: A shards like its kernel's input axes, B like its output axes;
    the rank axis is whole (it is small)."""
    specs: dict = {}
    for name in cfg.targets:
        path, n_in = TARGETS[name]
        spec = tuple(_get(param_specs, path))  # one entry per kernel axis (sharding.param_specs)
        layers, ins, outs = spec[0], spec[1:1 + n_in], spec[1 + n_in:]
        _put(specs, path, {"a": P(layers, *ins, None), "b": P(layers, None, *outs)})
    return specs


def lora_delta(a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """scale · A·B in float32, in the kernel's layout [L, *in, *out].

    HIGHEST precision: on TPU a default fp32 matmul runs in bf16 passes, and the merged kernel would then
    differ from the adapter's exact product by more than fp32 rounding.
    """
    layers, r = a.shape[0], a.shape[-1]
    ins, outs = a.shape[1:-1], b.shape[2:]
    delta = jnp.einsum("lir,lro->lio", a.reshape(layers, -1, r).astype(jnp.float32),
                       b.reshape(layers, r, -1).astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    return scale * delta.reshape(layers, *ins, *outs)


def merge_lora(params: dict, lora: dict, cfg) -> dict:
    """params with every adapted kernel replaced by W + (alpha / rank) · A·B, in the kernel's dtype.

    Pure: `params` (the model's pure dict, e.g. state["params"]) is not modified. `lora` is the adapter
    tree (state["lora"]); `cfg` is a LoraConfig or the experiment's `finetune.lora` section (it needs
    `alpha` and `rank`). The sum is formed in float32 and rounded once to the kernel's dtype. An empty
    `lora` returns `params` itself.
    """
    if not lora:
        return params
    scale = float(cfg.alpha) / int(cfg.rank)
    out = jax.tree.map(lambda x: x, params)  # a new dict tree; the arrays are shared
    for path, _ in TARGETS.values():
        try:
            adapter = _get(lora, path)
        except KeyError:
            continue
        if adapter["a"].shape[-1] != int(cfg.rank):
            raise ValueError(f"the adapter of {'/'.join(path)} has rank {adapter['a'].shape[-1]} but the config "
                             f"says finetune.lora.rank={cfg.rank}; pass the config the adapters were trained with.")
        w = _get(params, path)
        merged = w.astype(jnp.float32) + lora_delta(adapter["a"], adapter["b"], scale)
        _put(out, path, merged.astype(w.dtype))
    return out


__all__ = ["TARGETS", "LoraConfig", "init_lora", "lora_specs", "lora_delta", "merge_lora"]
