"""Meshes and logical axis rules.

Every parameter and key activation is annotated with *logical* axis names; one rules table maps them
onto the physical mesh ('data', 'fsdp', 'tensor'). Switching DP / FSDP / TP is a config change.

Logical names: batch, length, act_embed (activations' model dim), embed (weights' model dim),
heads, kv_heads, head_dim, mlp, vocab, layers, norm, qk_groups.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# Weights shard their model dim over fsdp (ZeRO-3 style) and their head/mlp/vocab dims over tensor;
# activations shard batch over both data axes and keep the model dim whole (act_embed).
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),
    ("norm", None),
    ("qk_groups", None),
)

BATCH_SPEC = P(("data", "fsdp"), None)


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, int, int]:
    """Resolves {'data','fsdp','tensor'} sizes, where at most one is -1 (fills the remaining devices)."""
    sizes = [int(mesh_cfg[a]) for a in MESH_AXES]
    fill = [i for i, s in enumerate(sizes) if s == -1]
    if len(fill) > 1:
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))}: at most one axis may be -1.")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))}: sizes must be positive or -1.")
    known = math.prod(s for s in sizes if s != -1)
    if fill:
        if num_devices % known:
            raise ValueError(
                f"mesh {dict(zip(MESH_AXES, sizes))}: the fixed axes ({known}) do not divide the "
                f"{num_devices} devices; pick sizes whose product divides {num_devices}.")
        sizes[fill[0]] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(
            f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices but "
            f"{num_devices} are available; set one axis to -1 to fill, e.g. --config.mesh.data=-1.")
    return tuple(sizes)


def make_mesh(mesh_cfg, devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
    """A ('data','fsdp','tensor') mesh with Auto axes, so GSPMD propagates shardings from the rules."""
    devices = list(devices if devices is not None else jax.devices())
    shape = mesh_shape(mesh_cfg, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def rules_from_config(rules_cfg=None) -> tuple:
    """The default rules table, with any per-name overrides from the config applied."""
    rules = dict(DEFAULT_RULES)
    for name, axes in (rules_cfg or {}).items():
        rules[name] = tuple(axes) if isinstance(axes, (list, tuple)) else axes
    return tuple(rules.items())


def logical_to_spec(names: Sequence[str | None], rules=DEFAULT_RULES) -> P:
    table = dict(rules)
    out = []
    for name in names:
        if name is None:
            out.append(None)
            continue
        if name not in table:
            raise KeyError(f"Logical axis {name!r} has no sharding rule; add it to the rules table.")
        out.append(table[name])
    return P(*out)


def param_specs(abstract_state: nnx.State, rules=DEFAULT_RULES):
    """PartitionSpecs for a params state (pure dict), read from each Variable's logical annotation."""
    def spec(v):
        names = v.get_metadata().get("out_sharding") or (None,) * len(v.shape)
        return logical_to_spec(names, rules)
    specs = jax.tree.map(spec, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.to_pure_dict(specs) if isinstance(specs, nnx.State) else specs


def named(mesh, specs):
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


# The rules active for activation constraints; set by `activation_rules` around tracing.
_ACTIVE_RULES: list = [DEFAULT_RULES]


class activation_rules:
    """Context manager selecting the rules used by `constrain` while tracing."""

    def __init__(self, rules):
        self.rules = rules

    def __enter__(self):
        _ACTIVE_RULES.append(self.rules)

    def __exit__(self, *exc):
        _ACTIVE_RULES.pop()


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Pins an activation's sharding by logical names; a no-op when no mesh is set (e.g. eager CPU)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or math.prod(mesh.shape.values()) == 1:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(names, _ACTIVE_RULES[-1]))


def host_local_batch_size(global_batch: int, mesh) -> int:
    """Rows of the global batch that this process feeds."""
    return global_batch // jax.process_count()


def batch_sharding(mesh) -> NamedSharding:
    return NamedSharding(mesh, BATCH_SPEC)


def describe(tree, shardings) -> list[str]:
    """One line per leaf: path, shape and spec; used by model_info and golden sharding tests."""
    lines = []
    for (path, leaf), sh in zip(jax.tree_util.tree_leaves_with_path(tree), jax.tree.leaves(
            shardings, is_leaf=lambda x: isinstance(x, (NamedSharding, P)))):
        spec = sh.spec if isinstance(sh, NamedSharding) else sh
        lines.append(f"{jax.tree_util.keystr(path)} {tuple(np.shape(leaf))} {spec}")
    return lines
