"""One persistent-compilation-cache entry per program for every process of a multi-process CPU job.

JAX keys a cache entry by the program, the compile options (which hold the global device assignment)
and the devices' topology fingerprint, and only process 0 writes entries (jax/_src/compiler.py,
`_cache_write`). XLA:CPU's topology describes the calling process's own devices, so in a jax.distributed
job on CPU process 1 computes another key than process 0 for the very same program: it never finds the
entry process 0 wrote, never writes its own, and compiles every program again on every launch while
process 0 loads it from the cache and then waits for it in the first collective. Measured with
`JAX_DEBUG_LOG_MODULES=jax._src.compiler,jax._src.cache_key` on a two-process tiny train run: the
train step's key hashes differed in `accelerator_config` alone, and process 1 logged a miss for it on
every launch. `jax_share_binary_between_hosts` is no way out: process 1 then waits in the key-value
store under its own key, which process 0 never publishes, until DEADLINE_EXCEEDED.

On TPU the topology is the whole slice's, the same on every host, so keys already agree there.
"""
from __future__ import annotations

import ipaddress
import logging

log = logging.getLogger(__name__)


def on_this_machine(coordinator_address: str) -> bool:
    """Whether a job coordinated at HOST:PORT runs on this machine only (a loopback HOST)."""
    host = coordinator_address.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def share_cpu_entries_between_local_processes() -> bool:
    """Keys CPU programs by the devices' kind instead of the per-process topology; returns whether it did.

    Then every process of the job finds the entry process 0 wrote for a program that spans them all;
    a program on one process's own devices still has a key of its own (its device assignment differs).
    Call it only when every process runs on this machine (`on_this_machine`): an executable is compiled
    for the host's CPU features, which the per-process topology would otherwise tell apart across hosts.
    Call it after jax.distributed.initialize; it touches no backend.
    """
    try:
        from jax._src import cache_key
        per_process = cache_key._hash_accelerator_config
        by_kind = cache_key._hash_devices
    except (ImportError, AttributeError) as e:  # a JAX that hashes devices differently: the cache still works, per process
        log.warning("compile cache: cannot share entries between local processes with this JAX (%s); "
                    "processes other than 0 recompile every program", e)
        return False

    def accelerator_config(hash_obj, devices):
        if all(d.platform == "cpu" for d in devices.flat):
            by_kind(hash_obj, devices)  # jax's own fallback where a backend has no topology to hash
        else:
            per_process(hash_obj, devices)

    cache_key._hash_accelerator_config = accelerator_config
    return True
