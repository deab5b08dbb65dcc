"""Runs the fit sweep case by case and writes the Markdown document after each one, so an interrupted
sweep leaves a table of what finished (and the probe log lets a rerun resume)."""

from __future__ import annotations

import datetime
import platform
import subprocess
import sys

from chameleon_jax import aot
from chameleon_jax.aot import sweep
from chameleon_jax.aot import table


def _versions() -> str:
    import jax
    import jaxlib
    try:
        from importlib.metadata import version
        libtpu = version("libtpu")
    except Exception:  # libtpu absent: the sweep fails earlier, at topology_devices
        libtpu = "?"
    return f"jax {jax.__version__}, jaxlib {jaxlib.__version__}, libtpu {libtpu}, Python {platform.python_version()}"


def _commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True).stdout.strip()
        if not head:
            return "(source tree outside git)"
        return head + (" (with uncommitted edits in the tree)" if dirty else "")
    except OSError:
        return "(source tree outside git)"


def default_attention() -> str:
    from chameleon_jax.config import base_config
    return "splash" if "attention" in base_config().model else "xla"


def document(results: list[sweep.CaseResult], *, command: str, pending: list[sweep.Case], started: str,
             note: str = "") -> str:
    lines = ["# Fit table: 7B and 34B train steps compiled for TPU slices", "",
             f"Made by `{command}` (started {started}) on {platform.node() or 'a CPU machine'}: "
             f"{platform.machine()}, {_cpu_count()} CPUs, no TPU (compile-only TPU devices from libtpu). "
             f"{_versions()}; chameleon_jax {_commit()}. {note}".rstrip(), "",
             "Every figure is per chip and per train step. HBM comes from the compiled program "
             "(`compiled.memory_analysis()`: arguments + outputs − aliased + temporaries + code). FLOPs and "
             "collectives are read from the compiled HLO with loop trip counts (aot/hlo.py); XLA's own "
             "`cost_analysis()` counts each loop body once, so its figure is shown beside ours for reference. "
             "Collective bytes are the buffers moved: all-gather = its gathered result, the others = their operand. "
             "**Step time and MFU are roofline ESTIMATES from datasheet peaks** (aot/roofline.py): "
             "max(compute, HBM traffic, ICI egress), with the no-overlap sum's MFU in brackets; nothing ran on a TPU.",
             "", "Slice names: v5p-N counts TensorCores (2 per chip), so v5p-128 is 64 chips (`v5p:4x4x4`); "
             "v5e-256 and v6e-256 count chips. A plan's batch is sequences of 4,096 tokens per data×fsdp shard "
             "per microbatch; the search compiles with one microbatch.", "",
             "## Datasheet figures used by the estimates", ""]
    lines += table.chip_table()
    lines += ["", "## Largest per-chip batch that fits, per case", ""]
    lines += table.results_table(results)
    lines += ["", "## At the config's global batch (microbatches = global / (batch per shard × shards))", ""]
    lines += table.global_batch_lines(results)
    if pending:
        lines += ["", "## Not finished", "",
                  "These cases had not finished when this file was written: "
                  + ", ".join(f"{c.model} on {sweep.slice_name(c.topology)} (`{c.topology}`)" for c in pending) + "."]
    return "\n".join(lines) + "\n"


def _cpu_count() -> int:
    import os
    return os.cpu_count() or 0


def run(cases: str, *, attention: list[str], remats: list[str], hbm_limit_gib: float | None, max_probes: int,
        at_config: list[str], probes: str | None, out: str | None, note: str = "") -> str:
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    command = "python -m chameleon_jax.aot " + " ".join(sys.argv[1:])
    todo = sweep.parse_cases(cases)
    kernels = attention or [default_attention()]
    limit = int(hbm_limit_gib * aot.GiB) if hbm_limit_gib else None
    cache = sweep.ProbeCache(probes)
    slopes: dict = {}
    results: list[sweep.CaseResult] = []
    text = ""
    for i, case in enumerate(todo):
        for kernel in kernels:
            print(f"{case.model} on {sweep.slice_name(case.topology)} ({case.topology}), attention={kernel}",
                  flush=True)
            results.append(sweep.sweep_case(case, attention=kernel, remats=remats, cache=cache, hbm_limit=limit,
                                            slopes=slopes, at_config=case.key in at_config,
                                            max_probes=max_probes, log=lambda s: print(s, flush=True)))
            text = document(results, command=command, pending=todo[i + 1:], started=started, note=note)
            if out:
                from etils import epath
                epath.Path(out).write_text(text)
    return text
