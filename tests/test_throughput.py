"""Analytic FLOP counting (train.throughput.program_flops), the numerator of every MFU we report."""
import json

import jax
import jax.numpy as jnp

from chameleon_jax.train import throughput
from chameleon_jax.train.throughput import program_flops


def test_counts_a_convolution_and_a_matmul_by_their_shapes():
    x = jnp.zeros((2, 8, 8, 4))
    k = jnp.zeros((3, 3, 4, 5))
    conv = lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    assert program_flops(conv, x, k) == 2 * (2 * 8 * 8 * 5) * (3 * 3 * 4)
    strided = lambda x, k: jax.lax.conv_general_dilated(x, k, (2, 2), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    assert program_flops(strided, x, k) == 2 * (2 * 3 * 3 * 5) * (3 * 3 * 4)
    a, b = jnp.zeros((3, 6, 7)), jnp.zeros((3, 7, 9))
    assert program_flops(jnp.matmul, a, b) == 2 * 3 * 6 * 7 * 9


def test_counts_inside_nested_jit_and_each_scan_iteration():
    w = jnp.zeros((16, 16))

    def body(h, _):
        return jax.jit(lambda h: h @ w)(h), None

    def f(h):
        return jax.lax.scan(body, h, None, length=5)[0] * 2.0  # the multiply is not a matmul: not counted

    assert program_flops(f, jnp.zeros((4, 16))) == 5 * 2 * 4 * 16 * 16


def test_the_cpu_peak_is_measured_once_per_machine_and_cached(tmp_path):
    first, source = throughput.cpu_peak(str(tmp_path))
    assert first > 1e9 and "cached" not in source  # any CPU this runs on does > 1 GFLOP/s of f32 matmul
    again, source = throughput.cpu_peak(str(tmp_path))
    assert again == first and "cached" in source
    (tmp_path / "cpu_peak.json").write_text("{not json")  # a damaged cache is measured again, not a crash
    _, source = throughput.cpu_peak(str(tmp_path))
    assert "cached" not in source
    assert json.loads((tmp_path / "cpu_peak.json").read_text())  # and rewritten whole
