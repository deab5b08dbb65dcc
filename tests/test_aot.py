"""AOT compilation of the real train step for a TPU topology on this CPU machine (needs libtpu)."""
import pytest

from chameleon_jax import aot
from chameleon_jax.config import validate
from chameleon_jax.model_info import estimate_memory
from test_config import load


def test_tiny_train_step_compiles_for_v5e_2x2_and_fits():
    config = load("tiny")
    report, compiled = aot.compile_train_step(config, "v5e:2x2")
    assert compiled is not None and not report.error
    assert report.chips == 4 and report.device_kind.startswith("TPU v5")
    assert report.mesh == {"data": 4, "fsdp": 1, "tensor": 1}
    assert report.hbm_bytes == 16 * aot.GiB
    for name in ("argument_bytes", "output_bytes", "temp_bytes", "total_bytes"):
        assert getattr(report, name) > 0, name
    # The donated state comes back in place: outputs alias the arguments.
    assert report.alias_bytes > 0
    # The arguments hold at least the (replicated) params and AdamW moments on every chip.
    mem = estimate_memory(config, validate(config), 4)
    assert report.argument_bytes >= mem["params_bytes"] + mem["optimizer_bytes"]
    assert report.fits and report.total_bytes < report.hbm_bytes
    assert "fits" in "\n".join(report.lines())


def test_unknown_generation_names_the_known_ones():
    with pytest.raises(ValueError, match="v5p:4x4x4"):
        aot.chip_hbm_bytes("v9x:2x2")
