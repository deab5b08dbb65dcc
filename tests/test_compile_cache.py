"""The persistent compilation cache across the processes of a local multi-process CPU job."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from chameleon_jax.train import compile_cache
from launch import local

REPO = Path(__file__).resolve().parents[1]

# Each process compiles one program over all 4 devices of the job, runs it (its collective is the barrier
# after which process 0 has written its entry), drops its in-memory caches and compiles it again: the
# second compile finds an entry or compiles afresh. First with jax's own keys, then with shared ones.
PROCESS = """
import json, sys
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
i = int(sys.argv[sys.argv.index("--process_id") + 1])
jax.distributed.initialize(sys.argv[sys.argv.index("--coordinator_address") + 1], 2, i)
from chameleon_jax.train import compile_cache
hits = []
jax.monitoring.register_event_listener(
    lambda event, **kw: hits.append(1) if event == "/jax/compilation_cache/cache_hits" else None)
mesh = jax.make_mesh((4,), ("d",))
x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("d")), np.arange(2.0) + 2 * i)

def second_compile_hits():
    f = jax.jit(lambda v: jnp.sum(jnp.sin(v) * v))
    f(x).block_until_ready()
    jax.clear_caches()
    del hits[:]
    f = jax.jit(lambda v: jnp.sum(jnp.sin(v) * v))
    f(x).block_until_ready()
    return bool(hits)

before = second_compile_hits()
shared = compile_cache.share_cpu_entries_between_local_processes()
after = second_compile_hits()
json.dump(dict(before=before, shared=shared, after=after), open(sys.argv[1] + f"/p{i}.json", "w"))
"""


def test_only_loopback_coordinators_count_as_this_machine():
    assert compile_cache.on_this_machine("127.0.0.1:1234") and compile_cache.on_this_machine("localhost:80")
    assert compile_cache.on_this_machine("[::1]:8476")
    assert not compile_cache.on_this_machine("10.0.0.2:8476") and not compile_cache.on_this_machine("tpu-0:8476")


def test_process_1_loads_what_process_0_compiled_once_keys_are_shared(tmp_path, monkeypatch):
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")  # the tiny program compiles in ms
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    assert local.run([sys.executable, "-c", PROCESS, str(tmp_path)], processes=2, devices=2, timeout_s=120) == 0
    p0, p1 = (json.loads((tmp_path / f"p{i}.json").read_text()) for i in range(2))
    assert p0 == dict(before=True, shared=True, after=True)  # process 0 writes and reads its own entries
    # XLA:CPU's per-process topology in jax's key: process 1 never found process 0's entry (the reason the
    # 2-process tests recompiled every program on every launch). With shared keys it does.
    assert p1 == dict(before=False, shared=True, after=True)
