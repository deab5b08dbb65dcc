"""Ahead-of-time compilation of the real train step for a TPU topology, from a CPU machine.

With the `tpu` extra (libtpu) installed, `jax.experimental.topologies` describes a TPU slice as
compile-only devices. We build the config's mesh over them, give `jit_train_step` abstract state and
batch (ShapeDtypeStructs carrying their shardings), compile, and read the per-chip memory from
`compiled.memory_analysis()`. Nothing is allocated, so a 7B step for 64 chips compiles on a laptop.

  python -m chameleon_jax.aot --config experiments/chameleon_7b.py --topology v5p:4x4x4
  python -m chameleon_jax.aot --config experiments/tiny.py --topology v5e:2x2 --json

libtpu logs warnings about TPU_ACCELERATOR_TYPE and worker hostnames on a machine without TPUs;
they are harmless.
"""

from __future__ import annotations

import dataclasses
import os
import re
import time

# Compiling for a topology never touches a TPU, so do not contend for libtpu's single-process lock
# (/tmp/libtpu_lockfile) with other JAX processes on the machine.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax
import jax.numpy as jnp

from chameleon_jax import model as model_lib
from chameleon_jax.config import validate
from chameleon_jax.model import sharding as shd
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


def topology_devices(topology: str) -> list:
    """Compile-only TPU devices for a topology name such as 'v5p:4x4x4' (needs libtpu)."""
    from jax.experimental import topologies
    try:
        return list(topologies.get_topology_desc(platform="tpu", topology_name=topology).devices)
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
    step_fn = step_lib.make_train_step(graphdef, model_cfg, tx,
                                       step_lib.LossConfig.from_config(config.loss), schedule,
                                       microbatches=int(config.train.get("microbatches", 1)))
    shardings = shd.named(mesh, step_lib.state_specs(model_cfg, tx, rules))
    shapes = step_lib.abstract_state(model_cfg, tx)
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                         shapes, shardings)
    batch_shape = (int(config.train.batch_size), int(config.train.seq_len))
    batch = {k: jax.ShapeDtypeStruct(batch_shape, jnp.int32, sharding=shd.batch_sharding(mesh))
             for k in BATCH_KEYS}
    return step_fn, shardings, state, batch, rules


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

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def lines(self) -> list[str]:
        g = lambda b: f"{format_bytes(b):>10}"
        mesh = "x".join(f"{k}={v}" for k, v in self.mesh.items())
        out = [f"AOT train step for {self.topology} ({self.chips} × {self.device_kind}), mesh {mesh}, "
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
        return out


def compile_train_step(config, topology: str) -> tuple[AotReport, object]:
    """Compiles the real train step for `topology`; returns the report and the Compiled (or None)."""
    hbm = chip_hbm_bytes(topology)
    devices = topology_devices(topology)
    mesh = shd.make_mesh(config.mesh, devices)
    step_fn, shardings, state, batch, rules = abstract_train_inputs(config, mesh)
    report = AotReport(topology=topology, device_kind=devices[0].device_kind, chips=len(devices),
                       mesh=dict(mesh.shape), hbm_bytes=hbm, compile_seconds=0.0, fits=False)
    start = time.perf_counter()
    try:
        with jax.set_mesh(mesh), shd.activation_rules(rules):
            jitted = step_lib.jit_train_step(step_fn, mesh, shardings)
            compiled = jitted.lower(state, batch).compile()
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


def main(argv):
    del argv
    import json
    config = _FLAGS.config
    report, _ = compile_train_step(config, _FLAGS.topology)
    if _FLAGS.json:
        print(json.dumps(report.as_dict()))
    else:
        print("\n".join(report.lines()))


if __name__ == "__main__":
    # Flags live here so that model_info can import this module and define its own.
    if not os.environ.get("JAX_PLATFORMS"):  # the host runs nothing: TPU devices are compile-only
        jax.config.update("jax_platforms", "cpu")
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
    flags.DEFINE_string("topology", None, "TPU topology, e.g. v5e:2x2 or v5p:4x4x4.", required=True)
    flags.DEFINE_bool("json", False, "Print one JSON object instead of a table.")
    flags.mark_flags_as_required(["config"])
    _FLAGS = flags.FLAGS
    app.run(main)
