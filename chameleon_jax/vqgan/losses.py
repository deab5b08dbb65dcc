"""VQ-GAN training losses and evaluation metrics (taming recipe, research note A2/A7).

All inputs are NHWC images in [-1, 1]. Metrics (PSNR, SSIM) are computed on [0, 1] after clamping.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def reconstruction(x, x_hat, kind: str = "l1"):
    """Per-pixel reconstruction loss, mean over everything. kind: "l1" (taming) or "l2" (LlamaGen)."""
    d = x - x_hat
    if kind == "l1":
        return jnp.mean(jnp.abs(d))
    if kind == "l2":
        return jnp.mean(jnp.square(d))
    raise ValueError(f"reconstruction loss {kind!r}: pick 'l1' or 'l2'")


def hinge_d_loss(logits_real, logits_fake):
    """0.5·(mean relu(1 − D(x)) + mean relu(1 + D(x̂)))."""
    return 0.5 * (jnp.mean(jax.nn.relu(1.0 - logits_real)) + jnp.mean(jax.nn.relu(1.0 + logits_fake)))


def hinge_g_loss(logits_fake):
    return -jnp.mean(logits_fake)


def adaptive_weight(grad_nll, grad_g, disc_weight: float):
    """λ = ‖∇_W nll‖ / (‖∇_W g‖ + 1e-4), clamped to [0, 1e4], detached, × disc_weight; W = the decoder's
    last conv kernel (taming calculate_adaptive_weight)."""
    lam = jnp.linalg.norm(grad_nll) / (jnp.linalg.norm(grad_g) + 1e-4)
    return jax.lax.stop_gradient(jnp.clip(lam, 0.0, 1e4)) * disc_weight


def to_unit(x):
    return (jnp.clip(x, -1.0, 1.0) + 1.0) / 2.0


def psnr(x, x_hat):
    """Per-image PSNR in dB on [0, 1] (after the official clamp), shape [B]."""
    mse = jnp.mean(jnp.square(to_unit(x) - to_unit(x_hat)), axis=(1, 2, 3))
    return 10.0 * jnp.log10(1.0 / jnp.maximum(mse, 1e-10))


def _gaussian_window(size: int = 11, sigma: float = 1.5):
    r = jnp.arange(size, dtype=jnp.float32) - (size - 1) / 2
    g = jnp.exp(-0.5 * (r / sigma) ** 2)
    return g / g.sum()


def ssim(x, x_hat):
    """Per-image SSIM (Wang et al. 2004: 11×11 Gaussian σ 1.5, K=(0.01, 0.03), valid windows, mean over
    channels) on [0, 1], shape [B]."""
    a, b = to_unit(x), to_unit(x_hat)
    g = _gaussian_window()
    c = a.shape[-1]

    def blur(t):  # separable depthwise Gaussian, VALID
        kh = jnp.tile(g.reshape(-1, 1, 1, 1), (1, 1, 1, c))
        kw = jnp.tile(g.reshape(1, -1, 1, 1), (1, 1, 1, c))
        dn = ("NHWC", "HWIO", "NHWC")
        t = jax.lax.conv_general_dilated(t, kh, (1, 1), "VALID", dimension_numbers=dn, feature_group_count=c)
        return jax.lax.conv_general_dilated(t, kw, (1, 1), "VALID", dimension_numbers=dn, feature_group_count=c)

    c1, c2 = 0.01 ** 2, 0.03 ** 2
    mu_a, mu_b = blur(a), blur(b)
    s_aa = blur(a * a) - mu_a ** 2
    s_bb = blur(b * b) - mu_b ** 2
    s_ab = blur(a * b) - mu_a * mu_b
    m = ((2 * mu_a * mu_b + c1) * (2 * s_ab + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (s_aa + s_bb + c2))
    return jnp.mean(m, axis=(1, 2, 3))


def codebook_stats(codes, n_embed: int):
    """(usage = fraction of codes used at least once, perplexity = exp(H(mean one-hot))) over `codes`."""
    counts = jnp.bincount(codes.reshape(-1), length=n_embed).astype(jnp.float32)
    p = counts / jnp.maximum(counts.sum(), 1.0)
    perplexity = jnp.exp(-jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.maximum(p, 1e-12)), 0.0)))
    return jnp.mean(counts > 0), perplexity
