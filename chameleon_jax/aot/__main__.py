"""Compile the real train step for a TPU topology and print its per-chip memory (and DCN transfers).

  python -m chameleon_jax.aot --config experiments/chameleon_7b.py --topology v5p:4x4x4 [--json]

The library is chameleon_jax/aot/__init__.py (compile_train_step, AotReport).
"""
import json
import os

import jax
from absl import app, flags
from ml_collections import config_flags

from chameleon_jax import aot  # sets libtpu's env before any backend starts

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", None, "TPU topology, e.g. v5e:2x2 or v5p:4x4x4.", required=True)
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object instead of a table.")
flags.mark_flags_as_required(["config"])


def main(argv):
    del argv
    report, _ = aot.compile_train_step(_CONFIG.value, _TOPOLOGY.value)
    print(json.dumps(report.as_dict()) if _JSON.value else "\n".join(report.lines()))


if __name__ == "__main__":
    if not os.environ.get("JAX_PLATFORMS"):  # the host runs nothing: TPU devices are compile-only
        jax.config.update("jax_platforms", "cpu")
    app.run(main)
