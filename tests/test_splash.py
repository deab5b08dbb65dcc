"""Splash attention (the Pallas TPU kernel, model/splash.py) against the XLA path, and its selection.

On CPU the kernel runs in Pallas interpret mode (`splash.options(interpret=True)`): the same kernel
program, evaluated by XLA:CPU, so outputs and gradients can be compared here; shapes stay small since
interpret mode is slow. Whether the real Mosaic kernel reaches a TPU program is checked by compiling
the train step for a TPU topology (libtpu, compile-only devices).
"""
import dataclasses

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from chameleon_jax import aot
from chameleon_jax import model as model_lib
from chameleon_jax.config import validate
from chameleon_jax.model import sharding as shd
from chameleon_jax.model import splash
from chameleon_jax.model.attention import attention_mask, causal_self_attention
from numerics import ELEMENTWISE, U, chain_tol, gamma, transformer_lengths
from test_config import error_of, load

B, T, N, K, H, BLOCK = 4, 256, 4, 2, 64, 128  # GQA: two query heads per kv head; two blocks per row


def packed_segments() -> np.ndarray:
    """[B, T] rows packed with several documents, block-crossing boundaries, and trailing padding."""
    seg = np.ones((B, T), np.int32)
    seg[0, 100:], seg[0, 200:] = 2, 3          # three documents, two cut inside a 128-row block
    seg[1, 128:], seg[1, 230:] = 2, 0          # a boundary on the block edge, then padding
    seg[2, 5:], seg[2, 140:], seg[2, 141:] = 2, 3, 4  # a one-token document
    return seg


def xla_attention(q, k, v, seg):
    index = jnp.broadcast_to(jnp.arange(T), seg.shape)
    return causal_self_attention(q, k, v, attention_mask(seg, seg, index, index), 64)


def tolerances(q, k, v, seg, cot) -> tuple[float, dict]:
    """Bounds on |splash - XLA| for the outputs and for each gradient, from fp32 rounding (numerics.py).

    Each side is bounded against the exact result and the two bounds add (x2). Computed in float64 from
    the exact probabilities p and absolute-value sums, with u the unit roundoff and gamma(n) ~ n*u:
    - a score s = (q/sqrt(H))·k is an H-term dot: error d <= (gamma(H)+u)·A, A = |q||k|^T/sqrt(H);
    - p = exp(s-m)/sum exp: relative error rho <= 2d + gamma(T) + u + ulps of its exps (numerator,
      normaliser, and one rescale per key block of the online softmax, ELEMENTWISE ulps each);
    - out = sum_s p v: (rho + gamma(T)) · sum_s p|v|;
    - dv = sum_{t,g} p dO: (rho + gamma(G·T)) · sum p|dO| (G query heads share a kv head);
    - dS = p (dP - D), dP = dO·v and D = dO·out H-term dots: with B = |dO||v|^T and C = sum_s p B,
      the error of dS is within p (B + C) (2rho + 2gamma(H) + gamma(T) + u); dq = sum_s dS k/sqrt(H)
      and dk = sum_{t,g} dS q/sqrt(H) add gamma(T) resp. gamma(G·T) of sum p (B + C) |k| (|q|)/sqrt(H).
    """
    q, k, v, cot = (np.asarray(x, np.float64) for x in (q, k, v, cot))
    seg, g, scale = np.asarray(seg), N // K, H ** -0.5
    kq, vq = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)  # query head n reads kv head n // G
    index = np.arange(T)
    visible = ((seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] != 0)
               & (index[None, None, :] <= index[None, :, None]))[:, None]        # [B, 1, T, S]
    scores = np.where(visible, np.einsum("btnh,bsnh->bnts", q, kq) * scale, -np.inf)
    with np.errstate(invalid="ignore"):                                         # padding rows: 0
        p = np.exp(scores - scores.max(-1, keepdims=True))
        p = np.nan_to_num(p / p.sum(-1, keepdims=True))
    a = np.einsum("btnh,bsnh->bnts", np.abs(q), np.abs(kq)) * scale
    d = (gamma(H) + U) * a[np.broadcast_to(visible, a.shape)].max()
    rho = 2 * d + gamma(T) + U + (2 + T // BLOCK) * ELEMENTWISE * U
    out = 2 * (rho + gamma(T)) * np.einsum("bnts,bsnh->btnh", p, np.abs(vq)).max()
    b = np.einsum("btnh,bsnh->bnts", np.abs(cot), np.abs(vq))
    w = p * (b + (p * b).sum(-1, keepdims=True))
    eps = 2 * rho + 2 * gamma(H) + gamma(T) + 2 * U

    def per_kv_head(x):  # [B, S, N, H] summed over each kv head's G query heads
        return x.reshape(B, T, K, g, H).sum(3)

    grads = {
        "q": 2 * (eps + gamma(T)) * scale * np.einsum("bnts,bsnh->btnh", w, np.abs(kq)).max(),
        "k": 2 * (eps + gamma(g * T)) * scale * per_kv_head(np.einsum("bnts,btnh->bsnh", w, np.abs(q))).max(),
        "v": 2 * (rho + gamma(g * T)) * per_kv_head(np.einsum("bnts,btnh->bsnh", p, np.abs(cot))).max(),
    }
    return float(out), grads


@pytest.mark.parametrize("mesh_shape", [None, (2, 2, 2)], ids=["one_device", "data2_fsdp2_tensor2"])
def test_splash_matches_xla_outputs_and_gradients(mesh_shape):
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(B, T, n, H)), jnp.float32) for n in (N, K, K))
    seg = jnp.asarray(packed_segments())
    real = (seg != 0)[:, :, None, None]
    # The loss's cotangent: zero on padding rows, whose outputs no loss reads (see splash.py).
    cot = jnp.asarray(rng.normal(size=(B, T, N, H)), jnp.float32) * real

    def outputs_and_grads(attend):
        out = attend(q, k, v, seg)
        grads = jax.grad(lambda q, k, v: jnp.sum(attend(q, k, v, seg) * cot), argnums=(0, 1, 2))(q, k, v)
        return out, grads

    want_out, want_grads = jax.jit(outputs_and_grads, static_argnums=0)(xla_attention)
    with splash.options(interpret=True, max_block=BLOCK):
        if mesh_shape is None:
            got_out, got_grads = jax.jit(outputs_and_grads, static_argnums=0)(splash.causal_attention)
        else:
            mesh = jax.make_mesh(mesh_shape, shd.MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)
            with jax.set_mesh(mesh):
                got_out, got_grads = jax.jit(outputs_and_grads, static_argnums=0)(splash.causal_attention)
            # Batch over data x fsdp, heads over tensor, as the rules say.
            spec = jax.sharding.PartitionSpec(("data", "fsdp"), None, "tensor")
            assert got_out.sharding.is_equivalent_to(jax.sharding.NamedSharding(mesh, spec), 4)

    out_tol, grad_tol = tolerances(q, k, v, seg, cot)
    out_err = float(jnp.max(jnp.abs(got_out - want_out) * real))
    assert out_err <= out_tol, (out_err, out_tol)
    for name, got, want in zip("qkv", got_grads, want_grads):
        err = float(jnp.max(jnp.abs(got - want)))
        assert err <= grad_tol[name], (name, err, grad_tol[name])


def pallas_calls(jaxpr) -> int:
    """Kernel launches in a jaxpr, nested ones (jit, scan, custom_vjp bodies) included."""
    count = 0
    for eqn in jaxpr.eqns:
        count += eqn.primitive.name == "pallas_call"
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    count += pallas_calls(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    count += pallas_calls(sub)
    return count


def test_model_with_splash_matches_xla_in_training_and_prefill():
    """The transformer's call site: segment ids reach the kernel, and prefill through a KV cache uses it."""
    config = load("tiny", "gqa")  # two query heads per kv head, swin block order
    tokens_len = 128
    config.model.attention, config.train.seq_len = "splash", tokens_len
    cfg = validate(config)
    params = model_lib.init_params(cfg, jax.random.key(0))
    rng = np.random.default_rng(1)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, size=(2, tokens_len)), jnp.int32)
    seg = np.ones((2, tokens_len), np.int32)
    seg[0, 50:], seg[1, 120:] = 2, 0
    positions = np.concatenate([np.arange(50), np.arange(tokens_len - 50)])[None].repeat(2, 0)
    seg, positions = jnp.asarray(seg), jnp.asarray(positions, jnp.int32)

    def run(attention):
        graphdef, _ = model_lib.abstract(dataclasses.replace(cfg, attention=attention))
        model = model_lib.bind(graphdef, params)
        train, _ = model(tokens, seg, positions)
        cache = model.init_cache(2, tokens_len + 8)
        kv_seg = jnp.zeros((2, tokens_len + 8), jnp.int32).at[:, :tokens_len].set(seg)
        prefill, cache = model(tokens, seg, positions, cache=cache, cache_index=0, kv_segment_ids=kv_seg)
        return train, prefill, cache["k"]

    want = jax.jit(run, static_argnums=0)("xla")
    with splash.options(interpret=True):
        # The kernel is in both the training forward and the prefill: one call each (layers are scanned).
        assert pallas_calls(jax.make_jaxpr(run, static_argnums=0)("splash").jaxpr) == 2
        got = jax.jit(run, static_argnums=0)("splash")
    real = np.asarray(seg != 0)[:, :, None]
    tol = chain_tol(want[0], transformer_lengths(cfg, context=tokens_len))
    for name, g, w in (("training", got[0], want[0]), ("prefill", got[1], want[1])):
        err = float(np.max(np.abs(np.asarray(g - w)) * real))
        assert err <= tol, (name, err, tol)
    # The cache keys it writes (layer 2's depend on layer 1's attention).
    keys_err = np.abs(np.asarray(got[2] - want[2]))[:, :, :tokens_len] * real[None, :, :, :, None]
    assert float(keys_err.max()) <= tol


def tpu_mesh(topology="v5e:2x2"):
    return shd.make_mesh(dict(data=2, fsdp=1, tensor=2), aot.topology_devices(topology))


def test_auto_picks_splash_for_tpu_devices_and_xla_for_cpu():
    with jax.set_mesh(tpu_mesh()):  # compile-only TPU devices, as in an AOT compile from this CPU host
        assert splash.compile_platform() == "tpu"
        assert splash.kernel_for("auto", 4096) == "splash"
        assert splash.kernel_for("splash", 256) == "splash"
        assert splash.kernel_for("xla", 4096) == "xla"
        assert splash.kernel_for("auto", 64) == "xla"  # no block of 128 rows fits: falls back
        with pytest.raises(ValueError, match="multiple of 128"):
            splash.kernel_for("splash", 200)
        assert splash.kernel_for("splash", 200, prefill=True) == "xla"  # a prompt's length is data
    cpu = jax.make_mesh((2, 2, 2), shd.MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)
    with jax.set_mesh(cpu):
        assert splash.kernel_for("auto", 4096) == "xla"
        with pytest.raises(ValueError, match="needs TPU devices.*'auto'"):
            splash.kernel_for("splash", 4096)
    assert splash.kernel_for("auto", 4096) == "xla"  # no mesh: the default backend, CPU here
    with pytest.raises(ValueError, match=r"'auto', 'xla', 'splash'"):
        splash.kernel_for("flash", 4096)


def test_config_rejects_unknown_attention_and_untileable_lengths():
    config = load("tiny")
    config.model.attention = "flash"
    assert "model.attention='flash'; choose one of ('auto', 'xla', 'splash')" in error_of(config)
    config.model.attention = "splash"  # tiny's seq_len is 64
    assert "train.seq_len=64; use a multiple of 128 or model.attention='xla'" in error_of(config)
    config.train.seq_len = 128
    assert validate(config).attention == "splash"


def test_train_step_for_tpu_holds_the_mosaic_kernel_only_with_splash():
    """The compiled TPU program of the real train step, batch over data and heads over tensor."""
    texts = {}
    for attention in ("splash", "xla"):
        config = load("tiny")
        config.train.seq_len = 128
        config.model.attention = attention
        config.mesh.update(data=2, fsdp=1, tensor=2)
        report, compiled = aot.compile_train_step(config, "v5e:2x2")
        assert compiled is not None and report.fits, report.lines()
        texts[attention] = compiled.as_text()
    # Mosaic kernels appear as tpu_custom_call: forward, dq and dkv for each (scanned) layer.
    assert texts["splash"].count('custom_call_target="tpu_custom_call"') >= 3
    assert "tpu_custom_call" not in texts["xla"]
