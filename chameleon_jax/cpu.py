"""Using every CPU core from one process.

XLA:CPU runs a convolution, and most elementwise and attention work, on one thread per device; only
dots use its intra-op pool. Exposing each core as its own host device and sharding the batch over a
`data` mesh axis runs those ops on all cores at once (measured on the 2-vCPU dev box: a 64 px ×32-channel
3×3 conv at 53 GFLOP/s on one device, 111 over two; the VQ-GAN smoke step 0.71 s → 0.43 s).

Call `use_every_core()` first thing in an entry point, before anything touches a JAX backend. It never
overrides a device count the user chose (`jax_num_cpu_devices`, or the XLA flag), and does nothing once
backends exist. On a GPU/TPU host it is harmless: it only shapes the CPU client, which is not the
default backend there.
"""
from __future__ import annotations

import logging
import os
import sys

# jax is imported inside the functions: an entry point calls use_huge_pages() first, and it re-executes
# the process, so a jax import before it (~2 s of CPU) would be thrown away.

log = logging.getLogger(__name__)
XLA_FLAG = "--xla_force_host_platform_device_count"


HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"
NO_HUGE_PAGES_ENV = "CHAMELEON_JAX_NO_HUGE_PAGES"


def use_huge_pages() -> None:
    """Re-executes this process once with glibc's malloc asking for transparent huge pages.

    XLA:CPU allocates an executable's temporaries afresh on every call, as one large mmap; with 4 KiB
    pages each train step of benchmarks/bench_train_step.py took ~522,000 minor page faults (2 GiB
    faulted in and zeroed, 1.6-2.3 s of system time per 5-6 s step). With `glibc.malloc.hugetlb=1`
    (glibc >= 2.35; older ones ignore it) malloc madvises those blocks as huge pages: ~1,700 faults,
    0.2-0.4 s of system time, and the step 10-15% faster (measured 2026-11-26, same window).
    Call it first thing in an entry point's `__main__`: it must run before the process allocates
    much, and child processes inherit the setting. Does nothing off Linux, when the kernel disables
    transparent huge pages, when already set, or when CHAMELEON_JAX_NO_HUGE_PAGES is set.
    """
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if (not sys.platform.startswith("linux") or os.environ.get(NO_HUGE_PAGES_ENV)
            or "glibc.malloc.hugetlb" in tunables or not _transparent_huge_pages()):
        return
    os.environ["GLIBC_TUNABLES"] = f"{tunables}:{HUGE_PAGES_TUNABLE}" if tunables else HUGE_PAGES_TUNABLE
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])


def _transparent_huge_pages() -> bool:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[never]" not in f.read()
    except OSError:
        return False


def core_count() -> int:
    try:
        return len(os.sched_getaffinity(0))  # the cores this process may use (containers, taskset)
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def use_every_core(n: int | None = None, divides: tuple[int, ...] = ()) -> int:
    """Asks for `n` CPU devices (default: one per core, lowered to the largest count that divides every
    batch size in `divides`, so a data-parallel mesh fits); returns the count that will be in effect."""
    if _configured_count() > 0:
        return _configured_count()
    flags = os.environ.get("XLA_FLAGS", "")
    if XLA_FLAG in flags:
        return int(flags.split(XLA_FLAG + "=")[1].split()[0])
    from jax._src import xla_bridge
    if xla_bridge.backends_are_initialized():
        log.warning("use_every_core() called after JAX initialised its backends; keeping one CPU device")
        return 1
    n = n or core_count()
    while n > 1 and any(b % n for b in divides):
        n -= 1
    _set_count(n)
    return n


def data_mesh(batch_size: int, devices=None) -> "jax.sharding.Mesh":
    """A 1-D ("data",) mesh over the first k of `devices` (default all), k the largest count that divides
    `batch_size`, so a batch shards evenly over it (one device per core after `use_every_core`)."""
    import jax
    devices = list(jax.devices() if devices is None else devices)
    k = max(n for n in range(1, len(devices) + 1) if batch_size % n == 0)
    return jax.make_mesh((k,), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=devices[:k])


def _configured_count() -> int:
    import jax
    return jax.config.jax_num_cpu_devices  # -1 unless someone chose


def _set_count(n: int) -> None:
    import jax
    jax.config.update("jax_num_cpu_devices", n)
