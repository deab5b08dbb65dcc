"""Test setup: 8 fake CPU devices so meshes like (2,2,2) exist on a laptop."""
import os
import tempfile

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# A persistent XLA cache: tests (and the processes they start, which inherit it) compile the same tiny
# train steps many times.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "chameleon_jax_xla_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_threefry_partitionable", True)


def pytest_xdist_auto_num_workers(config):
    """Workers for `pytest -n auto`: one per two cores, at most 4, and none below 4 cores. The suite is
    CPU-bound and many tests start 2-process training runs: on 2 vCPUs two workers ran it no faster
    (326 tests in 14:23 against about 14 min in one process, 2026-12-02) and doubled the load under
    the multi-process tests' time limits."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(4, cores // 2) if cores >= 4 else 0


@pytest.fixture(scope="session")
def gcs_server():
    """A real local GCS server (gcp-storage-emulator in a subprocess; tests/gcs.py), one per session."""
    from gcs import GcsEmulator

    with GcsEmulator() as server:
        yield server


@pytest.fixture
def gcs(gcs_server, monkeypatch):
    """The GCS server, with this test's clients (gcsfs/etils.epath, TensorStore/Orbax, and the processes
    it starts) pointed at it; `gcs.new_bucket()` gives a fresh gs:// bucket."""
    for key, value in gcs_server.env.items():
        monkeypatch.setenv(key, value)
    yield gcs_server
