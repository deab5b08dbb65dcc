"""Peak FLOP/s of the devices in use (the denominator of MFU) and analytic FLOPs of a program.

Accelerators use their datasheet's dense bf16 peak. CPUs have no datasheet figure worth trusting (the
machine is shared and its clock varies), so the peak is measured in the same run: a jitted f32
2048x2048 matmul, the best of a few repeats (docs stack.md: ~290 GFLOP/s on a quiet 2-vCPU machine).
"""
from __future__ import annotations

import json
import math
import os
import platform
import time

import jax
import jax.numpy as jnp
from jax.extend import core as jax_core

from chameleon_jax import storage

# Dense bf16 peak per chip, by `device_kind` prefix (vendor datasheets).
_PEAK_BY_KIND = (
    ("TPU v6 lite", 918e12), ("TPU v6e", 918e12), ("TPU v5p", 459e12), ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12), ("TPU v4", 275e12), ("TPU v3", 123e12), ("NVIDIA H200", 989e12),
    ("NVIDIA H100", 989e12), ("NVIDIA A100", 312e12),
)


def measure_cpu_peak(n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of one jitted f32 matmul on the default device (XLA uses every core for it)."""
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def cpu_peak(cache_dir: str | None = None) -> tuple[float, str]:
    """(this host's measured matmul peak, where it came from), measured once per machine and cached.

    The measurement costs seconds at every start on a busy machine, and a run's MFU is more comparable
    across runs against one denominator. The cache (CHAMELEON_JAX_CACHE/cpu_peak.json) is keyed by the
    CPU model, core count, device count and XLA_FLAGS; delete it to measure again.
    """
    key = "|".join((_cpu_model(), str(os.cpu_count()), str(jax.device_count()), os.environ.get("XLA_FLAGS", "")))
    path = os.path.join(cache_dir or storage.default_cache_dir(), "cpu_peak.json")
    try:
        with open(path) as f:
            known = json.load(f)
    except (OSError, ValueError):
        known = {}
    if key in known:
        return float(known[key]), f"measured (cpu matmul, cached in {path})"
    peak = measure_cpu_peak()
    known[key] = peak
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(known, f)
        os.replace(tmp, path)  # atomic: concurrent processes never read half a file
    except OSError:
        pass  # a read-only cache only costs the measurement next time
    return peak, "measured (cpu matmul, one host)"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def peak_flops(devices=None, override: float = 0.0) -> tuple[float, str]:
    """(total peak FLOP/s over the local devices times the process count, where it came from)."""
    if override:
        return float(override), "config"
    devices = devices or jax.local_devices()
    kind = devices[0].device_kind
    if devices[0].platform == "cpu":
        # Fake CPU devices share the same cores: the host's peak is the peak of all of them together.
        return cpu_peak()
    for prefix, flops in _PEAK_BY_KIND:
        if kind.startswith(prefix):
            return flops * len(devices) * jax.process_count(), f"datasheet ({kind})"
    return 0.0, f"unknown device kind {kind!r}; set train.peak_flops"


def program_flops(fn, *args) -> float:
    """Analytic FLOPs (2 per multiply-add) of the matmuls and convolutions in `fn(*args)`'s traced
    program: every `dot_general` and `conv_general_dilated`, inside nested jaxprs too (jit, remat,
    custom derivatives; a scan counts `length` times). Elementwise work is not counted, so this is the
    numerator of MFU for conv nets and transformers alike. XLA's own cost analysis is not used
    because it under-counts on CPU (docs stack.md)."""
    return _jaxpr_flops(jax.make_jaxpr(fn)(*args).jaxpr)


def _jaxpr_flops(jaxpr) -> float:
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs, out = eqn.invars[0].aval, eqn.outvars[0].aval
            total += 2.0 * out.size * math.prod(lhs.shape[i] for i in contract)
        elif name == "conv_general_dilated":
            rhs, out = eqn.invars[1].aval, eqn.outvars[0].aval
            out_feature_dim = eqn.params["dimension_numbers"].rhs_spec[0]
            # each output element is a dot over the kernel's window × input features (per group)
            total += 2.0 * out.size * rhs.size / rhs.shape[out_feature_dim]
        times = eqn.params.get("length", 1) if name == "scan" else 1
        for sub in jax_core.jaxprs_in_params(eqn.params):
            total += times * _jaxpr_flops(sub)
    return total

