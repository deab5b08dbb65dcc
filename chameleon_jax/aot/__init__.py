"""Ahead-of-time compilation of the real train step for a TPU topology, from a CPU machine.

With the `tpu` extra (libtpu) installed, `jax.experimental.topologies` describes a TPU slice as
compile-only devices. We build the config's mesh over them, give `jit_train_step` abstract state and
batch (ShapeDtypeStructs carrying their shardings), compile, and read the per-chip memory from
`compiled.memory_analysis()`. Nothing is allocated, so a 7B step for 64 chips compiles on a laptop.

  report, compiled = compile_train_step(config, "v5p:4x4x4")    # the library; the program:

  python -m chameleon_jax.aot --config experiments/chameleon_7b.py --topology v5p:4x4x4
  python -m chameleon_jax.aot --config experiments/tiny.py --topology v5e:2x2 --json
  python -m chameleon_jax.aot --config experiments/tiny.py --topology v5e:2x2 \
      --config.mesh.slices=2 --config.mesh.data=2 --config.mesh.tensor=2

With mesh.slices > 1 the topology is one slice, repeated; the report then lists the transfers that
cross slices over DCN, by the mesh axes they connect (read from the compiler's host-transfer table:
XLA:TPU lowers every cross-slice collective to megascale send/recv pairs between "endpoints", which are
device ids). With data across slices only the 'data' axis should appear there.

libtpu logs warnings about TPU_ACCELERATOR_TYPE and worker hostnames on a machine without TPUs;
they are harmless.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import re
import tempfile
import time
from pathlib import Path

# Compiling for a topology never touches a TPU, so do not contend for libtpu's single-process lock
# (/tmp/libtpu_lockfile) with other JAX processes on the machine.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax
import jax.numpy as jnp
import numpy as np

from chameleon_jax import model as model_lib
from chameleon_jax.config import validate
from chameleon_jax.model import sharding as shd
from chameleon_jax.model import trainable
from chameleon_jax.train import optimizer as opt_lib
from chameleon_jax.train import step as step_lib

GiB = 1024 ** 3

# HBM per chip, by the generation before the ':' in a topology name (vendor datasheets).
CHIP_HBM_BYTES = {"v4": 32 * GiB, "v5e": 16 * GiB, "v5litepod": 16 * GiB, "v5p": 95 * GiB,
                  "v6e": 32 * GiB}

BATCH_KEYS = ("tokens", "segment_ids", "positions", "loss_mask")


def format_bytes(n: float) -> str:
    for unit, size in (("GiB", GiB), ("MiB", 1024 ** 2), ("KiB", 1024)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def chip_hbm_bytes(topology: str) -> int:
    generation = topology.split(":", 1)[0].lower()
    if generation not in CHIP_HBM_BYTES:
        raise ValueError(f"Unknown TPU generation {generation!r} in topology {topology!r}; use one of "
                         f"{sorted(CHIP_HBM_BYTES)}, e.g. v5p:4x4x4 or v5e:2x2.")
    return CHIP_HBM_BYTES[generation]


def topology_devices(topology: str, slices: int = 1) -> list:
    """Compile-only TPU devices for `slices` slices of a topology such as 'v5p:4x4x4' (needs libtpu)."""
    from jax.experimental import topologies
    try:
        return list(topologies.get_topology_desc(platform="tpu", topology_name=topology,
                                                 num_slices=slices).devices)
    except Exception as e:  # libtpu missing raises a plain RuntimeError from the plugin loader
        raise RuntimeError(
            f"Could not describe TPU topology {topology!r}: {e}\nInstall libtpu with "
            f"`pip install -e '.[tpu]'` and pass a name like v5e:2x2 or v5p:4x4x4.") from e


def abstract_train_inputs(config, mesh):
    """(train step fn, state shardings, abstract state, abstract batch) for `config` on `mesh`.

    The same objects the runner builds, but every array is a ShapeDtypeStruct with its sharding.
    """
    model_cfg = validate(config, num_devices=mesh.size)
    rules = shd.rules_from_config(config.get("sharding_rules"))
    tx = opt_lib.make_optimizer(config.optimizer, int(config.train.steps))
    schedule = opt_lib.learning_rate_schedule(config.optimizer, int(config.train.steps))
    graphdef, _ = model_lib.abstract(model_cfg)
    plan = trainable.plan_from_config(config, model_cfg)  # what trains: the optimizer state's shape
    step_fn = step_lib.make_train_step(graphdef, model_cfg, tx,
                                       step_lib.LossConfig.from_config(config.loss), schedule,
                                       microbatches=int(config.train.get("microbatches", 1)), plan=plan)
    shardings = shd.named(mesh, step_lib.state_specs(model_cfg, tx, rules, plan))
    shapes = step_lib.abstract_state(model_cfg, tx, plan)
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                         shapes, shardings)
    batch_shape = (int(config.train.batch_size), int(config.train.seq_len))
    batch = {k: jax.ShapeDtypeStruct(batch_shape, jnp.int32, sharding=shd.batch_sharding(mesh))
             for k in BATCH_KEYS}
    return step_fn, shardings, state, batch, rules


# Bytes per element of the dtypes that cross DCN (xla_data.proto PrimitiveType names).
_ELEMENT_BYTES = {"PRED": 1, "S8": 1, "U8": 1, "S16": 2, "U16": 2, "F16": 2, "BF16": 2, "S32": 4, "U32": 4,
                  "F32": 4, "S64": 8, "U64": 8, "F64": 8}


@dataclasses.dataclass(frozen=True)
class DcnTransfer:
    """One cross-slice collective as the compiled program sends it: its device-to-host half."""
    key: str                        # the collective it came from, e.g. "all-reduce.49_0"
    kind: str                       # ALL_REDUCE, ALL_GATHER, ...
    bytes: int                      # sent per device, per execution of the enclosing computation
    groups: tuple[tuple[int, ...], ...]  # device ids that exchange this buffer over DCN


def _blocks(text: str, name: str) -> list[str]:
    """The bodies of the top-level `name { ... }` messages of a text-format protobuf."""
    out, depth, start = [], 0, None
    for m in re.finditer(r"(\w+) \{|\}", text):
        if m.group(0) == "}":
            depth -= 1
            if depth == 0 and start is not None:
                out.append(text[start:m.start()])
                start = None
        else:
            if depth == 0 and m.group(1) == name:
                start = m.end()
            depth += 1
    return out


def dcn_transfers(dump_dir: str | os.PathLike) -> list[DcnTransfer]:
    """The megascale sends in the `*host_transfers.txt` that XLA:TPU dumps beside a compiled module."""
    files = sorted(Path(dump_dir).glob("*jit_step*host_transfers.txt"))
    if not files:
        raise FileNotFoundError(f"no *host_transfers.txt under {dump_dir}: was the step compiled (not loaded "
                                f"from JAX_COMPILATION_CACHE_DIR) with xla_dump_to={dump_dir} for several slices?")
    out = []
    for block in _blocks(files[-1].read_text(), "host_transfers"):
        if "MEGASCALE_SEND" not in block or "megascale_info" not in block:
            continue
        shape = _blocks(block, "shape")[0]
        elements = 1
        for d in re.findall(r"^\s*dimensions: (\d+)", shape.split("layout {")[0], re.M):
            elements *= int(d)
        dtype = re.search(r"element_type: (\w+)", shape)[1]
        info = _blocks(block, "megascale_info")[0]
        # Collectives list their groups as endpoints; point-to-point sends as a source and destinations.
        groups = tuple(tuple(int(e) for e in re.findall(r"(?:endpoints|source|destinations): (\d+)", g))
                       for g in _blocks(info, "endpoint_groups") + _blocks(info, "one_to_all_groups"))
        out.append(DcnTransfer(key=re.search(r'key: "([^"]+)"', block)[1],
                               kind=re.search(r"transfer_type: (\w+)", info)[1],
                               bytes=elements * _ELEMENT_BYTES[dtype], groups=groups))
    return out


def axes_between(group, mesh) -> tuple[str, ...]:
    """The mesh axes along which the devices of `group` (device ids) differ."""
    position = {d.id: np.unravel_index(i, mesh.devices.shape) for i, d in enumerate(mesh.devices.flat)}
    coords = np.array([position[i] for i in group])
    return tuple(a for a, c in zip(mesh.axis_names, coords.T) if len(set(c)) > 1)


def dcn_by_axes(transfers: list[DcnTransfer], mesh) -> dict[str, dict]:
    """{"ALL_REDUCE over data": {"count", "bytes"}}: the cross-slice traffic by the axes it connects.

    Counts are static: a transfer inside a loop body (scan over layers, microbatches) runs once per
    iteration.
    """
    out: dict[str, dict] = collections.defaultdict(lambda: {"count": 0, "bytes": 0})
    for t in transfers:
        axes = sorted({a for g in t.groups for a in axes_between(g, mesh)})
        row = out[f"{t.kind} over {'+'.join(axes) or 'none'}"]
        row["count"] += 1
        row["bytes"] += t.bytes
    return dict(out)


def optimized_hlo_text(dump_dir: str | os.PathLike) -> str:
    """The train step's HLO after optimizations, from a compile with `hlo_dump=dump_dir`."""
    files = sorted(Path(dump_dir).glob("*jit_step*after_optimizations.txt"), key=lambda f: f.stat().st_size)
    if not files:
        raise FileNotFoundError(f"no *jit_step*after_optimizations.txt under {dump_dir}: compile with "
                                f"compile_train_step(..., hlo_dump={str(dump_dir)!r}) (not from a compilation cache)")
    return files[-1].read_text()


@dataclasses.dataclass
class AotReport:
    """Per-chip memory of the compiled train step (bytes), as XLA's buffer assignment sees it."""
    topology: str
    device_kind: str
    chips: int
    mesh: dict
    hbm_bytes: int
    compile_seconds: float
    fits: bool
    argument_bytes: int = 0   # train state shard + batch shard
    output_bytes: int = 0     # new state + metrics; aliases the donated state
    alias_bytes: int = 0      # output bytes that reuse donated argument buffers
    temp_bytes: int = 0       # activations, gradients, optimizer temporaries
    code_bytes: int = 0       # the executable itself
    total_bytes: int = 0      # arguments + outputs − aliased + temporaries + code
    error: str = ""           # set when XLA refused to compile (e.g. out of HBM)
    slices: int = 1
    dcn: dict = dataclasses.field(default_factory=dict)  # dcn_by_axes of the compiled step

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def lines(self) -> list[str]:
        g = lambda b: f"{format_bytes(b):>10}"
        mesh = "x".join(f"{k}={v}" for k, v in self.mesh.items())
        where = self.topology if self.slices == 1 else f"{self.slices} slices of {self.topology}"
        out = [f"AOT train step for {where} ({self.chips} × {self.device_kind}), mesh {mesh}, "
               f"compiled in {self.compile_seconds:.1f} s"]
        if self.error:
            return out + [f"  compile failed: {self.error}",
                          f"  temporaries {g(self.temp_bytes)}   (as XLA reported them)",
                          f"  DOES NOT FIT in {g(self.hbm_bytes).strip()} HBM per chip"]
        out += [f"  arguments   {g(self.argument_bytes)}   (state + batch shard)",
                f"  outputs     {g(self.output_bytes)}   ({g(self.alias_bytes).strip()} aliased to donated state)",
                f"  temporaries {g(self.temp_bytes)}   (activations, gradients, optimizer scratch)",
                f"  code        {g(self.code_bytes)}",
                f"  total       {g(self.total_bytes)}   of {g(self.hbm_bytes).strip()} HBM per chip "
                f"({100 * self.total_bytes / self.hbm_bytes:.0f}%): {'fits' if self.fits else 'DOES NOT FIT'}"]
        if self.slices > 1:
            out.append("  cross-slice (DCN) transfers in the program, by the mesh axes they connect:")
            out += [f"    {k:<28} {v['count']:>4} sends, {format_bytes(v['bytes']):>10} per device"
                    for k, v in sorted(self.dcn.items())] or ["    none"]
        return out


def compile_train_step(config, topology: str, hlo_dump: str | None = None) -> tuple[AotReport, object]:
    """Compiles the real train step for `topology`; returns the report and the Compiled (or None).

    `hlo_dump`: a local folder where the compiler writes the optimized HLO as text
    (`*after_optimizations.txt`; read it with `optimized_hlo_text`). `compiled.as_text()` goes through
    jaxlib's HLO proto round trip, which refuses some large programs libtpu emits ("async-update
    instruction should have 1 operands but sees 3").
    """
    hbm = chip_hbm_bytes(topology)
    slices = int(config.mesh.get("slices", 1))
    devices = topology_devices(topology, slices)
    mesh = shd.make_mesh(config.mesh, devices)
    step_fn, shardings, state, batch, rules = abstract_train_inputs(config, mesh)
    report = AotReport(topology=topology, device_kind=devices[0].device_kind, chips=len(devices),
                       mesh=dict(mesh.shape), hbm_bytes=hbm, compile_seconds=0.0, fits=False, slices=slices)
    start = time.perf_counter()
    # Which devices talk over DCN is recorded only in XLA's dump files (the host-transfer table).
    with tempfile.TemporaryDirectory(prefix="aot_dump_") as dump:
        try:
            with jax.set_mesh(mesh), shd.activation_rules(rules):
                jitted = step_lib.jit_train_step(step_fn, mesh, shardings)
                options = {}
                if slices > 1:
                    options["xla_dump_to"] = dump
                if hlo_dump:
                    options.update(xla_dump_to=hlo_dump if slices == 1 else dump, xla_dump_hlo_as_text=True,
                                   xla_dump_hlo_module_re="jit_step")
                compiled = jitted.lower(state, batch).compile(compiler_options=options or None)
        except Exception as e:  # XLA:TPU refuses programs that cannot fit in HBM: report, don't crash
            if "RESOURCE_EXHAUSTED" not in str(e) and "out of memory" not in str(e).lower():
                raise
            report.compile_seconds = time.perf_counter() - start
            report.error = str(e).strip().splitlines()[0][:500]
            # "... HLO temporaries (511.25G) exceeds available HBM (95.73G)": keep the figure.
            needed = re.search(r"temporaries \(([\d.]+)([GMK])\)", report.error)
            if needed:
                report.temp_bytes = int(float(needed[1]) * 1024 ** "KMG".index(needed[2]) * 1024)
            return report, None
        report.compile_seconds = time.perf_counter() - start
        if slices > 1:
            report.dcn = dcn_by_axes(dcn_transfers(dump), mesh)
            if hlo_dump:
                for f in Path(dump).glob("*after_optimizations.txt"):
                    (Path(hlo_dump) / f.name).write_text(f.read_text())
    mem = compiled.memory_analysis()
    report.argument_bytes = int(mem.argument_size_in_bytes)
    report.output_bytes = int(mem.output_size_in_bytes)
    report.alias_bytes = int(mem.alias_size_in_bytes)
    report.temp_bytes = int(mem.temp_size_in_bytes)
    report.code_bytes = int(mem.generated_code_size_in_bytes)
    report.total_bytes = (report.argument_bytes + report.output_bytes - report.alias_bytes
                          + report.temp_bytes + report.code_bytes)
    report.fits = report.total_bytes <= hbm
    return report, compiled

