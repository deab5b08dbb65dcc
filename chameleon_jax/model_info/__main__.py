"""python -m chameleon_jax.model_info --config experiments/X.py [--num_devices N] [--topology v5p:4x4x4] [--json]

Prints what a config costs (parameters, FLOPs, memory per device); see chameleon_jax.model_info.
"""
import json
import os

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
_JSON = flags.DEFINE_bool("json", False, "Print exactly one JSON object.")
_TOPOLOGY = flags.DEFINE_string(
    "topology", None, "TPU topology (e.g. v5p:4x4x4): size the mesh for it and compile the train step ahead "
    "of time for it (needs the `tpu` extra).")
_NUM_DEVICES = flags.DEFINE_integer(
    "num_devices", None, "Devices to size the mesh for; default: the topology's chips, else the local device "
    "count.")
flags.mark_flags_as_required(["config"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    import jax

    if _TOPOLOGY.value:
        from chameleon_jax import aot  # sets libtpu's env before any backend starts
        if not os.environ.get("JAX_PLATFORMS"):  # TPU devices are compile-only; the host runs nothing
            jax.config.update("jax_platforms", "cpu")
    from chameleon_jax import model_info

    config = _CONFIG.value
    num_devices = _NUM_DEVICES.value or (
        model_info.topology_chips(_TOPOLOGY.value) if _TOPOLOGY.value else jax.device_count())
    info = model_info.model_info(config, num_devices)
    report = None
    if _TOPOLOGY.value:
        report, _ = aot.compile_train_step(config, _TOPOLOGY.value)
        info["aot"] = report.as_dict()
    if _JSON.value:
        print(json.dumps(info))
        return
    print(model_info.format_report(info))
    if report is not None:
        print("\n".join(report.lines()))


if __name__ == "__main__":
    app.run(main)
