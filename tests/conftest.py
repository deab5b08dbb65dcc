"""Test setup: 8 fake CPU devices so meshes like (2,2,2) exist on a laptop."""
import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# A persistent XLA cache: tests (and the processes they start, which inherit it) compile the same tiny
# train steps many times; compiles over 1 s are reused.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "chameleon_jax_xla_cache"))

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_threefry_partitionable", True)
