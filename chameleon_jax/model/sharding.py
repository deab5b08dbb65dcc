"""Meshes and logical axis rules.

Every parameter and key activation is annotated with *logical* axis names; one rules table maps them
onto the physical mesh ('data', 'fsdp', 'tensor'). Switching DP / FSDP / TP is a config change.

Logical names: batch, length, act_embed (activations' model dim), embed (weights' model dim),
heads, kv_heads, head_dim, mlp, vocab, layers, norm, qk_groups.

Multi-slice: `mesh.slices` > 1 splits one axis (`mesh.dcn_axis`, 'data' by default) across TPU slices,
which talk over the data-centre network (DCN), and keeps the other axes inside each slice (ICI). The
mesh sizes stay global: mesh.data=4 with mesh.slices=2 is 2 data shards per slice times 2 slices.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
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


def slice_layout(mesh_cfg, num_devices: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(per-slice ICI shape, DCN shape) of the mesh, both ordered like MESH_AXES.

    Only `mesh.dcn_axis` crosses slices: its global size is split into slices × per-slice size.
    """
    shape = mesh_shape(mesh_cfg, num_devices)
    slices = int(mesh_cfg.get("slices", 1))
    axis = mesh_cfg.get("dcn_axis", "data")
    if slices < 1:
        raise ValueError(f"mesh.slices={slices} must be >= 1 (the number of TPU slices joined over DCN).")
    if axis not in MESH_AXES:
        raise ValueError(f"mesh.dcn_axis={axis!r}; choose one of {MESH_AXES} ('data' keeps only the "
                         f"gradient all-reduce on the slow network).")
    i = MESH_AXES.index(axis)
    if shape[i] % slices:
        sizes = dict(zip(MESH_AXES, shape))
        raise ValueError(
            f"mesh {sizes} with mesh.slices={slices}: the {axis} axis ({shape[i]}) spans the slices, so it "
            f"must be a multiple of {slices}; set --config.mesh.{axis}={slices} (or a multiple of it) and "
            f"let another axis fill with -1.")
    dcn = tuple(slices if j == i else 1 for j in range(len(MESH_AXES)))
    ici = tuple(s // d for s, d in zip(shape, dcn))
    return ici, dcn


def _granules(devices, slices: int) -> bool:
    """Whether processes stand in for slices (True) or the devices' slice_index is used (False).

    TPU devices know their slice. CPU and GPU devices report slice 0 (or nothing), and there each process
    acts as one slice, so a local 2-process run rehearses a 2-slice job. Raises if neither gives `slices`.
    """
    found = len({getattr(d, "slice_index", 0) for d in devices})
    if found == slices:
        return False
    processes = len({d.process_index for d in devices})
    if devices[0].platform != "tpu" and processes == slices:
        return True
    also = "" if devices[0].platform == "tpu" else f" and {processes} processes (which stand in for slices here)"
    raise ValueError(f"mesh.slices={slices} but the {len(devices)} devices belong to {found} slices{also}; "
                     f"set --config.mesh.slices={found if devices[0].platform == 'tpu' else processes}.")


def make_mesh(mesh_cfg, devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
    """A ('data','fsdp','tensor') mesh with Auto axes, so GSPMD propagates shardings from the rules.

    One slice: `jax.make_mesh`. Several: a hybrid ICI×DCN device mesh whose `mesh.dcn_axis` runs
    across slices (jax.make_mesh refuses multi-slice devices).
    """
    devices = list(devices if devices is not None else jax.devices())
    ici, dcn = slice_layout(mesh_cfg, len(devices))
    shape = tuple(a * b for a, b in zip(ici, dcn))
    slices = math.prod(dcn)
    if slices == 1:
        if hasattr(devices[0], "slice_index") and len({d.slice_index for d in devices}) > 1:
            found = len({d.slice_index for d in devices})
            raise ValueError(f"the devices span {found} TPU slices; set --config.mesh.slices={found} "
                             f"(and mesh.data to a multiple of it).")
        try:
            return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)
        except NotImplementedError:
            # A logical axis that is no product of whole torus axes (tensor=4 on a 16x16 v6e) needs a
            # physical ring split into neighbouring groups; jax.make_mesh allows that for v5e only.
            grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
            return jax.sharding.Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * 3)
    by_process = _granules(devices, slices)
    grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, process_is_granule=by_process)
    return jax.sharding.Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def slice_of(device) -> int:
    """The slice a device belongs to (its process where the platform has no slices)."""
    return getattr(device, "slice_index", device.process_index)


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
