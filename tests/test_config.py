"""Config validation: bad configs are rejected before anything compiles, with the fix in the message."""
import importlib.util
import pathlib

import pytest

from chameleon_jax.config import validate

EXPERIMENTS = pathlib.Path(__file__).resolve().parents[1] / "experiments"


def load(name, arg=None):
    spec = importlib.util.spec_from_file_location(name, EXPERIMENTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def error_of(config, num_devices=None) -> str:
    with pytest.raises(ValueError) as e:
        validate(config, num_devices=num_devices)
    return str(e.value)


@pytest.mark.parametrize("name,devices", [("tiny", 8), ("chameleon_7b", 64), ("chameleon_34b", 64),
                                          ("chameleon_34b", 256)])
def test_shipped_configs_are_valid(name, devices):
    m = validate(load(name), num_devices=devices)
    assert m.n_heads % m.n_kv_heads == 0


def test_heads_not_divisible_by_kv_heads():
    c = load("tiny")
    c.model.update(n_kv_heads=3, qk_norm_groups=1)
    msg = error_of(c)
    assert "model.n_heads=4 is not divisible by model.n_kv_heads=3" in msg
    assert "pick model.n_kv_heads in [1, 2, 4]" in msg


def test_heads_not_divisible_by_tensor_axis():
    c = load("tiny")
    c.mesh.update(data=1, fsdp=1, tensor=8)
    msg = error_of(c, num_devices=8)
    assert "model.n_heads=4 is not divisible by the tensor axis (mesh.tensor=8)" in msg
    assert "pick mesh.tensor in [1, 2, 4]" in msg


def test_kv_heads_not_divisible_by_tensor_axis():
    c = load("tiny", "gqa")  # 4 heads, 2 kv heads
    c.mesh.update(data=-1, fsdp=1, tensor=4)
    msg = error_of(c, num_devices=8)
    assert "model.n_kv_heads=2 is not divisible by the tensor axis (mesh.tensor=4)" in msg
    assert "model.n_heads" not in msg  # 4 heads split over 4 is fine
    assert "pick mesh.tensor in [1, 2]" in msg


def test_mesh_not_matching_device_count():
    c = load("tiny")
    c.mesh.update(data=2, fsdp=2, tensor=1)
    msg = error_of(c, num_devices=8)
    assert "needs 4 devices but 8 are available" in msg
    assert "set one axis to -1" in msg


def test_mesh_fill_axis_cannot_divide_devices():
    c = load("tiny")
    c.mesh.update(data=-1, fsdp=3, tensor=1)
    msg = error_of(c, num_devices=8)
    assert "fixed axes (3) do not divide the 8 devices" in msg


def test_all_errors_reported_together():
    c = load("tiny")
    c.model.update(n_kv_heads=3, qk_norm_groups=1)
    c.model.remat = "everything"
    msg = error_of(c)
    assert "n_kv_heads=3" in msg and "model.remat='everything'" in msg


def test_a_misspelled_dtype_names_the_choices():
    c = load("tiny")
    c.model.update(dtype="bf16", param_dtype="float16")
    msg = error_of(c)
    assert "model.dtype='bf16'" in msg and "model.param_dtype='float16'" in msg and "'bfloat16'" in msg
    c.model.update(dtype="bfloat16", param_dtype="bfloat16")
    validate(c, num_devices=8)  # both spelled right: valid
