"""Parameter counts, FLOPs per token, the memory estimate, and the model_info CLI."""
import dataclasses
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

from chameleon_jax.config import validate
from chameleon_jax.model import flops
from chameleon_jax.model_info import estimate_memory, model_info, topology_chips
from test_config import load

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_param_counts_match_the_released_models():
    assert flops.param_count(validate(load("chameleon_7b"))) == 7_013_158_912
    assert flops.param_count(validate(load("chameleon_34b"))) == 34_293_522_432  # 4 QK-norm groups


def _hand_matmul_params(m):
    d, n, k, h, f = m.d_model, m.n_heads, m.n_kv_heads, m.head_dim, m.ffn_dim
    per_layer = d * n * h + 2 * d * k * h + n * h * d + 3 * d * f  # wq, wk, wv, wo, w1, w3, w2
    return m.n_layers * per_layer + d * m.vocab_size  # + output projection; embedding excluded


def test_tiny_flops_match_hand_formula():
    for variant in (None, "gqa"):
        m = validate(load("tiny", variant))
        seq = 64
        expected = 6 * _hand_matmul_params(m) + 6 * m.n_layers * seq * m.n_heads * m.head_dim
        assert flops.train_flops_per_token(m, seq) == expected
    m = validate(load("tiny"))
    assert flops.train_flops_per_token(m, 64) == 1_081_344  # 6·172,032 + 6·2·64·64


def test_embedding_lookup_costs_no_flops_and_attention_grows_with_length():
    m = validate(load("tiny"))
    wider = dataclasses.replace(m, vocab_size=2 * m.vocab_size)
    # Only the output projection grows: 6·D·ΔV, not 12·D·ΔV.
    assert (flops.train_flops_per_token(wider, 64) - flops.train_flops_per_token(m, 64)
            == 6 * m.d_model * m.vocab_size)
    assert (flops.train_flops_per_token(m, 128) - flops.train_flops_per_token(m, 64)
            == 6 * m.n_layers * 64 * m.n_heads * m.head_dim)


def test_memory_estimate_shards_params_over_fsdp():
    c = load("tiny")
    m = validate(c)
    c.mesh.update(data=1, fsdp=-1, tensor=1)
    one = estimate_memory(c, m, 1)
    eight = estimate_memory(c, m, 8)
    norms = flops.param_breakdown(m)["norm"]
    assert one["params_bytes"] == 4 * flops.param_count(m)  # f32
    # Every matrix splits its d_model dim over fsdp; norm scales stay replicated.
    assert eight["params_bytes"] == 4 * ((flops.param_count(m) - norms) // 8 + norms)
    assert eight["optimizer_bytes"] >= 2 * eight["params_bytes"]  # AdamW mu and nu
    assert eight["rows_per_device"] == 1 and one["rows_per_device"] == 8
    assert eight["activations_bytes"] < one["activations_bytes"]


def test_topology_chips():
    assert topology_chips("v5p:4x4x4") == 64 and topology_chips("v5e:2x2") == 4


def _run_cli(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "chameleon_jax.model_info", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_cli_json_is_one_object_and_takes_mesh_overrides():
    out = _run_cli("--config", "experiments/tiny.py", "--json", "--num_devices", "2",
                   "--config.mesh.data=1", "--config.mesh.tensor=2")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)  # fails if anything else is printed on stdout
    assert info["params"] == 238_016
    assert info["flops_per_token"] == 1_081_344
    assert info["memory_per_device"]["mesh"] == {"data": 1, "fsdp": 1, "tensor": 2}
    assert 0 < info["memory_per_device"]["params_bytes"] < 4 * 238_016


def test_model_info_validates_the_mesh_first():
    c = load("tiny")
    c.mesh.update(data=1, fsdp=1, tensor=8)
    with pytest.raises(ValueError, match=re.escape("pick mesh.tensor in [1, 2, 4]")):
        model_info(c, 8)
