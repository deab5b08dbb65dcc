"""Compile the real train step for a TPU topology and print its per-chip memory (and DCN transfers).

  python -m chameleon_jax.aot --config experiments/chameleon_7b.py --topology v5p:4x4x4 [--json]

The fit table (7B and 34B on v5p / v5e / v6e slices; minutes per compile, so run it in the background):

  python -m chameleon_jax.aot --sweep --cases=all --out=docs/results/fit.md

The library is chameleon_jax/aot/__init__.py (compile_train_step, AotReport) and aot/sweep.py.
"""
import json
import os

import jax
from absl import app, flags
from ml_collections import config_flags

from chameleon_jax import aot  # sets libtpu's env before any backend starts

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", None, "TPU topology, e.g. v5e:2x2 or v5p:4x4x4.")
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object instead of a table.")
_SWEEP = flags.DEFINE_bool("sweep", False, "Make the fit table: largest fitting batch per case (aot/sweep.py).")
_CASES = flags.DEFINE_string("cases", "all", "Sweep cases: 'all' or MODEL@TOPOLOGY,... e.g. 7B@v5p:4x4x4 "
                            "(v5p:4x4x4 = 64 chips = v5p-128).")
_ATTENTION = flags.DEFINE_list("attention", [], "Attention kernels to sweep (xla, splash); default: splash "
                               "where the tree has model.attention, else xla.")
_REMATS = flags.DEFINE_list("remats", ["full"], "Remat policies tried, in order, when the config's own "
                            "does not fit one sequence per shard.")
_HBM_LIMIT_GIB = flags.DEFINE_float("hbm_limit_gib", None, "Fit against this many GiB per chip instead of "
                                    "the chip's HBM.")
_MAX_PROBES = flags.DEFINE_integer("max_probes", 4, "At most this many compiles per batch search.")
_AT_CONFIG = flags.DEFINE_list("at_config", ["7B@v5p:4x4x4"], "Cases also compiled at the config's own "
                               "global batch and microbatches.")
_PROBES = flags.DEFINE_string("probes", "docs/results/fit_probes.jsonl", "Every compile's measurements, one "
                              "JSON per line; a rerun reuses them.")
_OUT = flags.DEFINE_string("out", None, "Write the Markdown table here (else print it).")
_COMPILE = flags.DEFINE_bool("compile", True, "With --nocompile, make the table from the probe log only "
                              "(cases it does not cover are listed as not finished).")
_HLO_DIR = flags.DEFINE_string("hlo_dir", None, "Keep each compiled program's optimized HLO here (gzip).")
_NOTE = flags.DEFINE_string("note", "", "A sentence for the table's header (e.g. which source tree ran).")


def main(argv):
    del argv
    if _SWEEP.value:
        from chameleon_jax.aot import fit
        text = fit.run(_CASES.value, attention=_ATTENTION.value, remats=_REMATS.value,
                       hbm_limit_gib=_HBM_LIMIT_GIB.value, max_probes=_MAX_PROBES.value,
                       at_config=_AT_CONFIG.value, probes=_PROBES.value, out=_OUT.value, note=_NOTE.value,
                       compile=_COMPILE.value, hlo_dir=_HLO_DIR.value)
        if not _OUT.value:
            print(text)
        return
    if _CONFIG.value is None or not _TOPOLOGY.value:
        raise app.UsageError("Pass --config and --topology (or --sweep).")
    report, _ = aot.compile_train_step(_CONFIG.value, _TOPOLOGY.value)
    print(json.dumps(report.as_dict()) if _JSON.value else "\n".join(report.lines()))


if __name__ == "__main__":
    if not os.environ.get("JAX_PLATFORMS"):  # the host runs nothing: TPU devices are compile-only
        jax.config.update("jax_platforms", "cpu")
    app.run(main)
