"""Test setup: 8 fake CPU devices so meshes like (2,2,2) exist on a laptop."""
import os
import sys
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

# Files of a minute or more of worker time (2 vCPUs, 2026-12-02), longest first. `--dist loadfile` hands
# whole files to workers; xdist's default order, most tests first, left the long files with few tests
# (2-process runs, TPU compiles) for last, so one worker ran them alone while the other sat idle.
LONGEST_FILES_FIRST = ("test_multislice.py", "test_vqgan_train.py", "test_preemption.py", "test_runner.py",
                       "test_smoke.py", "test_faults.py", "test_release_to_hf.py", "test_vqgan.py",
                       "test_model.py", "test_init_checkpoint.py", "test_gcs.py", "test_generate_program.py")


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):  # xdist installed: keep the order set below
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's own order is kept


@pytest.fixture(scope="session", autouse=True)
def huge_page_malloc_for_started_programs():
    """The programs tests start (train, eval, smoke, ...) get the huge-page malloc tunable from the start.

    Their entry points call cpu.use_huge_pages(), which, without the tunable in the environment,
    re-executes the process after importing jax once for nothing: ~2 s of CPU (3-5 s wall under load)
    per process started, ~25 launches of one or two processes in the suite. With it already set they run
    exactly as after that re-exec. A fixture, not module code: it runs in the processes that run tests,
    never in an xdist controller, so pytest's own workers keep the default malloc.
    """
    from chameleon_jax import cpu

    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if (sys.platform.startswith("linux") and not os.environ.get(cpu.NO_HUGE_PAGES_ENV)
            and "glibc.malloc.hugetlb" not in tunables and cpu._transparent_huge_pages()):
        os.environ["GLIBC_TUNABLES"] = f"{tunables}:{cpu.HUGE_PAGES_TUNABLE}" if tunables else cpu.HUGE_PAGES_TUNABLE
    yield


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
