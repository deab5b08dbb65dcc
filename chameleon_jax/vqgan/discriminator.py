"""PatchGAN discriminator (pix2pix NLayerDiscriminator, as in taming), pure functions of a params pytree.

Conv4×4 s2 (3→ndf) + LReLU(0.2); n_layers−1 more Conv4×4 s2 doubling widths (max 8·ndf) + norm + LReLU;
Conv4×4 s1 + norm + LReLU; Conv4×4 s1 → 1 patch logit. Init N(0, 0.02) as taming.
Deviation: GroupNorm(32) instead of BatchNorm, so D needs no mutable batch statistics (research note A2).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from chameleon_jax.vqgan.model import group_norm


def _conv(p, x, stride):
    y = jax.lax.conv_general_dilated(x, p["kernel"], (stride, stride), ((1, 1), (1, 1)),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + p["bias"] if "bias" in p else y


def init(rng, in_channels: int = 3, ndf: int = 64, n_layers: int = 3) -> dict:
    chans = [in_channels] + [ndf * min(2 ** i, 8) for i in range(n_layers + 1)] + [1]
    keys = jax.random.split(rng, len(chans))
    params = {}
    for i in range(len(chans) - 1):
        cin, cout = chans[i], chans[i + 1]
        layer = {"kernel": 0.02 * jax.random.normal(keys[i], (4, 4, cin, cout), jnp.float32)}
        normed = 0 < i < len(chans) - 2
        if normed:  # convs before a norm have no bias (taming)
            layer["norm"] = {"scale": 1.0 + 0.02 * jax.random.normal(jax.random.fold_in(keys[i], 1), (cout,)),
                             "bias": jnp.zeros((cout,), jnp.float32)}
        else:
            layer["bias"] = jnp.zeros((cout,), jnp.float32)
        params[str(i)] = layer
    return params


def apply(params, x):
    """NHWC images in [-1, 1] -> patch logits [B, h, w, 1]."""
    n = len(params)
    for i in range(n):
        p = params[str(i)]
        stride = 2 if i < n - 2 else 1
        x = _conv(p, x, stride)
        if "norm" in p:
            x = group_norm(p["norm"], x)
        if i < n - 1:
            x = jax.nn.leaky_relu(x, 0.2)
    return x
