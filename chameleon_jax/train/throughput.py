"""Peak FLOP/s of the devices in use, the denominator of MFU.

Accelerators use their datasheet's dense bf16 peak. CPUs have no datasheet figure worth trusting (the
machine is shared and its clock varies), so the peak is measured in the same run: a jitted f32
2048x2048 matmul, the best of a few repeats (docs stack.md: ~290 GFLOP/s on a quiet 2-vCPU machine).
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp

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


def peak_flops(devices=None, override: float = 0.0) -> tuple[float, str]:
    """(total peak FLOP/s over the local devices times the process count, where it came from)."""
    if override:
        return float(override), "config"
    devices = devices or jax.local_devices()
    kind = devices[0].device_kind
    if devices[0].platform == "cpu":
        # Fake CPU devices share the same cores: the host's peak is the peak of all of them together.
        return measure_cpu_peak(), "measured (cpu matmul, one host)"
    for prefix, flops in _PEAK_BY_KIND:
        if kind.startswith(prefix):
            return flops * len(devices) * jax.process_count(), f"datasheet ({kind})"
    return 0.0, f"unknown device kind {kind!r}; set train.peak_flops"
