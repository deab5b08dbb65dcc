"""Test setup: 8 fake CPU devices so meshes like (2,2,2) exist on a laptop."""
import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# A persistent XLA cache: tests (and the processes they start, which inherit it) compile the same tiny
# train steps many times.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "chameleon_jax_xla_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_threefry_partitionable", True)
