"""Held-out evaluation of a VQ-GAN: reconstruction quality, codebook health, and (on shapes scenes)
the shape analyzer's exact-scene accuracy on the reconstructions."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from chameleon_jax.data import shapes
from chameleon_jax.vqgan import losses, model, perceptual
from chameleon_jax.vqgan.images import to_uint8


@jax.jit
def _eval_batch(params, x):
    codes = model.encode(params, x)
    x_hat = model.decode(params, codes)
    codes2 = model.encode(params, jnp.clip(x_hat, -1.0, 1.0))
    return codes, x_hat, losses.psnr(x, x_hat), losses.ssim(x, x_hat), jnp.mean(codes == codes2, axis=(1, 2))


def evaluate(params, images, scenes=None, *, n_embed: int, batch_size: int = 64, lpips_params=None):
    """(metrics, uint8 reconstructions). Metrics: PSNR, SSIM, (LPIPS), codebook usage and perplexity
    over all codes, code round trip (encode(decode(codes)) == codes), and with `scenes` the shape
    analyzer's exact-scene accuracy (the tokenizer's semantic-fidelity gate, research note B4.4)."""
    out = {k: [] for k in ("codes", "x_hat", "psnr", "ssim", "round_trip", "lpips")}
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size]
        codes, x_hat, p, s, rt = _eval_batch(params, x)
        for k, v in zip(("codes", "x_hat", "psnr", "ssim", "round_trip"), (codes, x_hat, p, s, rt)):
            out[k].append(np.asarray(v))
        if lpips_params is not None:
            out["lpips"].append(np.asarray(jax.jit(perceptual.lpips)(lpips_params, x, x_hat)))
    codes = np.concatenate(out["codes"])
    recon = to_uint8(np.concatenate(out["x_hat"]))
    usage, ppl = losses.codebook_stats(jnp.asarray(codes), n_embed)
    metrics = {"psnr": float(np.mean(np.concatenate(out["psnr"]))), "ssim": float(np.mean(np.concatenate(out["ssim"]))),
               "codebook_usage": float(usage), "perplexity": float(ppl),
               "code_round_trip": float(np.mean(np.concatenate(out["round_trip"])))}
    if scenes is not None:
        metrics["analyzer_exact"] = float(np.mean([shapes.analyze(r) == s for r, s in zip(recon, scenes)]))
    if out["lpips"]:
        metrics["lpips"] = float(np.mean(np.concatenate(out["lpips"])))
    return metrics, recon


def comparison_grid(images, recon, n: int = 16, cols: int = 4, pad: int = 2) -> np.ndarray:
    """uint8 [H, W, 3]: up to `n` originals, each beside its reconstruction, `cols` pairs a row."""
    pairs = np.concatenate([to_uint8(images[:n]), recon[:n]], axis=2)
    count, h, w, c = pairs.shape
    rows = -(-count // cols)
    g = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, np.uint8)
    for i in range(count):
        r, k = divmod(i, cols)
        g[pad + r * (h + pad):pad + r * (h + pad) + h, pad + k * (w + pad):pad + k * (w + pad) + w] = pairs[i]
    return g
