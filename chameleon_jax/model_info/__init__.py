"""What a config costs: parameters, training FLOPs per token, and memory per device for its mesh.

  python -m chameleon_jax.model_info --config experiments/chameleon_7b.py --num_devices 64
  python -m chameleon_jax.model_info --config experiments/chameleon_7b.py --json --config.mesh.tensor=4
  python -m chameleon_jax.model_info --config experiments/chameleon_7b.py --topology v5p:4x4x4

Everything is computed from abstract shapes (nothing is allocated). The memory figures are an
estimate (see `estimate_memory`); `--topology` adds the exact per-chip figures of the real train step
compiled ahead of time for that TPU slice (needs the `tpu` extra; see chameleon_jax/aot.py).
"""

from __future__ import annotations

import json
import math

import jax
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

from chameleon_jax.config import validate
from chameleon_jax.model import flops
from chameleon_jax.model import sharding as shd
from chameleon_jax.model import trainable
from chameleon_jax.model.config import ModelConfig
from chameleon_jax.train import optimizer as opt_lib
from chameleon_jax.train import step as step_lib


def topology_chips(topology: str) -> int:
    """Chips in a TPU topology name: the product of its dims ('v5p:4x4x4' → 64, 'v5e:2x2' → 4)."""
    try:
        return math.prod(int(d) for d in topology.split(":", 1)[1].split("x"))
    except (IndexError, ValueError):
        raise ValueError(f"Cannot read a chip count from topology {topology!r}; "
                         f"write it as GENERATION:AxB[xC], e.g. v5e:2x2 or v5p:4x4x4.") from None


def _per_device_bytes(shapes, specs, axis_sizes: dict) -> int:
    """Bytes one device holds of a sharded tree: each dim divided (rounded up) by its mesh axes."""
    total = 0
    leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))
    for leaf, spec in zip(jax.tree.leaves(shapes), leaves):
        shape = list(leaf.shape)
        for i, axes in enumerate(spec):
            if axes is not None:
                div = math.prod(axis_sizes[a] for a in ((axes,) if isinstance(axes, str) else axes))
                shape[i] = -(-shape[i] // div)
        total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
    return total


def activation_bytes(m: ModelConfig, rows: int, seq_len: int, tensor: int, backward_through_blocks: bool = True) -> int:
    """Rough peak activation bytes on one device for `rows` sequences of `seq_len` tokens.

    Three terms, all per device (heads, kv heads, mlp and vocab split over the tensor axis):
      - what the remat policy keeps per layer for the backward pass, for all L layers: always the
        residual stream (the scan carry); `dots_no_batch` adds the q/k/v/o, gate/up/down projection
        outputs; `dots` adds the attention scores and weighted values; `none` also the probabilities;
      - the working set of the one layer being recomputed and differentiated, dominated by the
        materialised attention scores and probabilities (f32, [heads, T, T] per row);
      - the f32 logits and their gradient.
    Elementwise temporaries, fusion buffers and collectives' scratch are not counted; use
    `--topology` for the compiler's exact figure. `backward_through_blocks=False` (only the head or
    the final norm trains) drops the stash: the blocks then run forward only.
    """
    act = np.dtype(m.dtype).itemsize
    d, hd = m.d_model, m.head_dim
    heads, kv = -(-m.n_heads // tensor), -(-m.n_kv_heads // tensor)
    f, v = -(-m.ffn_dim // tensor), -(-m.vocab_size // tensor)
    tokens = rows * seq_len
    projections = heads * hd + 2 * kv * hd + d + 2 * f + d
    kept = {"full": d, "save_block_outputs": d, "dots_no_batch": d + projections,
            "dots": d + projections + heads * seq_len + heads * hd,
            "none": d + projections + 2 * heads * seq_len + heads * hd + 2 * d + f}[m.remat]
    stash = m.n_layers * tokens * kept * act if backward_through_blocks else 0
    layer = tokens * (2 * heads * seq_len * 4 + (projections + f + 4 * d) * act)
    logits = 2 * tokens * v * 4
    return stash + layer + logits


def estimate_memory(config, m: ModelConfig, num_devices: int) -> dict:
    """Per-device bytes for the config's mesh: params, AdamW moments, gradients, activations.

    Params (with any LoRA adapters) and optimizer state are exact shard sizes from the sharding rules;
    gradients are one copy of what trains (config.finetune: all params by default); activations are
    `activation_bytes` (rough).
    """
    data, fsdp, tensor = shd.mesh_shape(config.mesh, num_devices)
    axis_sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
    tx = opt_lib.make_optimizer(config.optimizer, int(config.train.steps))
    rules = shd.rules_from_config(config.get("sharding_rules"))
    plan = trainable.plan_from_config(config, m)
    shapes = step_lib.abstract_state(m, tx, plan)
    specs = step_lib.state_specs(m, tx, rules, plan)
    params = _per_device_bytes(shapes["params"], specs["params"], axis_sizes)
    if "lora" in shapes:
        params += _per_device_bytes(shapes["lora"], specs["lora"], axis_sizes)
    optimizer = _per_device_bytes(shapes["opt_state"], specs["opt_state"], axis_sizes)
    trained = trainable.trained_tree(plan, shapes["params"], shapes.get("lora"), cut=_cut_shape)
    gradients = _per_device_bytes(trained, trainable.trained_tree(
        plan, specs["params"], specs.get("lora"), cut=trainable.slice_spec), axis_sizes)
    rows = -(-int(config.train.batch_size) // (data * fsdp))
    acts = activation_bytes(m, rows, int(config.train.seq_len), tensor,
                            backward_through_blocks=plan.backward_through_blocks)
    out = {"params_bytes": params, "optimizer_bytes": optimizer, "gradients_bytes": gradients,
           "activations_bytes": acts}
    out["total_bytes"] = sum(out.values())
    return {"mesh": axis_sizes, "rows_per_device": rows, **out}


def _cut_shape(leaf, rows):
    """The shape of a row range's slice (trainable.trained_tree over ShapeDtypeStructs)."""
    shape = list(leaf.shape)
    shape[rows.axis] = rows.stop - rows.start
    return jax.ShapeDtypeStruct(tuple(shape), leaf.dtype)


def trainable_params(config, m: ModelConfig) -> int:
    """Parameters the optimizer updates (config.finetune): all of them, a selection, or the adapters."""
    plan = trainable.plan_from_config(config, m)
    shapes = jax.eval_shape(lambda: step_lib.init_state(m, optax.identity(), jax.random.PRNGKey(0), plan))
    trained = trainable.trained_tree(plan, shapes["params"], shapes.get("lora"), cut=_cut_shape)
    return sum(math.prod(x.shape) for x in jax.tree.leaves(trained))


def model_info(config, num_devices: int) -> dict:
    """The whole report as a JSON-ready dict (validates the config for `num_devices` first)."""
    m = validate(config, num_devices=num_devices)
    seq_len = int(config.train.seq_len)
    per_token = trainable.train_flops_per_token(trainable.plan_from_config(config, m), m, seq_len)
    tokens = int(config.train.batch_size) * seq_len
    return {
        "params": flops.param_count(m),
        "params_breakdown": flops.param_breakdown(m),
        "trainable_params": trainable_params(config, m),
        "flops_per_token": per_token,
        "flops_breakdown": flops.flops_breakdown(m, seq_len),
        "seq_len": seq_len,
        "tokens_per_step": tokens,
        "flops_per_step": per_token * tokens,
        "num_devices": num_devices,
        "memory_per_device": estimate_memory(config, m, num_devices),
    }


def format_report(info: dict) -> str:
    from chameleon_jax.aot import format_bytes

    pb, fb, mem = info["params_breakdown"], info["flops_breakdown"], info["memory_per_device"]
    mesh = ", ".join(f"{k}={v}" for k, v in mem["mesh"].items())
    lines = [
        f"parameters        {info['params']:,}  (matmul {pb['matmul']:,}, embedding {pb['embedding']:,}, "
        f"norms {pb['norm']:,})",
        f"trainable         {info['trainable_params']:,}  (config.finetune)",
        f"FLOPs per token   {info['flops_per_token']:.4g}  (6·N_matmul {fb['matmul']:.4g} + causal attention "
        f"{fb['attention']:.4g}) at seq_len {info['seq_len']}" if info["flops_per_token"] == sum(fb.values()) else
        f"FLOPs per token   {info['flops_per_token']:.4g}  (forward, and the backward of what config.finetune "
        f"trains; full training {sum(fb.values()):.4g}) at seq_len {info['seq_len']}",
        f"FLOPs per step    {info['flops_per_step']:.4g}  ({info['tokens_per_step']:,} tokens)",
        f"memory per device on {info['num_devices']} devices, mesh {mesh}, "
        f"{mem['rows_per_device']} sequences per device (estimate):",
        f"  params          {format_bytes(mem['params_bytes'])}",
        f"  AdamW moments   {format_bytes(mem['optimizer_bytes'])}",
        f"  gradients       {format_bytes(mem['gradients_bytes'])}",
        f"  activations     {format_bytes(mem['activations_bytes'])}  (rough: remat stash + one layer + logits)",
        f"  total           {format_bytes(mem['total_bytes'])}",
    ]
    return "\n".join(lines)
