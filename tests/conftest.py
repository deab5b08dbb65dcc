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
