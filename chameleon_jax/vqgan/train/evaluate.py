"""Held-out evaluation of a VQ-GAN: reconstruction quality, codebook health, and (on shapes scenes)
the shape analyzer's exact-scene accuracy on the reconstructions; per-image scores of saved uint8
images, a downsampling baseline to calibrate them against, and the comparison grid."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

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


def originals_uint8(images) -> np.ndarray:
    """Preprocessed images (u/127.5 − 1, `vqgan/images.py`) back to their exact uint8 values; the
    decoder's truncating `to_uint8` would lower a quarter of the levels by one."""
    return np.rint((np.asarray(images, np.float32) + 1.0) * 127.5).clip(0, 255).astype(np.uint8)


@jax.jit
def _scores(x, y):
    return losses.psnr(x, y), losses.ssim(x, y)


def score(originals, reconstructions, lpips_params=None) -> dict[str, np.ndarray]:
    """Per-image PSNR (dB), SSIM and, with `lpips_params`, LPIPS-VGG of uint8 [N, H, W, 3]
    reconstructions against uint8 originals: the images a reader sees are the ones scored."""
    x, y = (jnp.asarray(np.asarray(a, np.float32) / 127.5 - 1.0) for a in (originals, reconstructions))
    p, s = _scores(x, y)
    out = {"psnr": np.asarray(p, np.float64), "ssim": np.asarray(s, np.float64)}
    if lpips_params is not None:  # params as a jit argument: closing over them constant-folds VGG for minutes
        out["lpips"] = np.asarray(jax.jit(perceptual.lpips)(lpips_params, x, y), np.float64)
    return out


def downsample_baseline(originals, factor: int = 16) -> np.ndarray:
    """uint8 originals shrunk `factor`× (box average) and enlarged back (bicubic): at factor 16 one
    pixel per code position, the calibration point for a tokenizer that downsamples 16×."""
    out = []
    for img in np.asarray(originals, np.uint8):
        h, w = img.shape[:2]
        if h % factor or w % factor:
            raise ValueError(f"{w}x{h} images do not divide by the baseline factor {factor}")
        small = Image.fromarray(img).resize((w // factor, h // factor), Image.BOX)
        out.append(np.asarray(small.resize((w, h), Image.BICUBIC)))
    return np.stack(out)


def comparison_grid(images, recon, n: int = 16, cols: int = 4, pad: int = 2, more=()) -> np.ndarray:
    """uint8 [H, W, 3]: up to `n` originals, each beside its reconstruction (and then the same image in
    each array of `more`), `cols` cells a row. Float originals are preprocessed images; uint8 as is."""
    originals = images[:n] if np.asarray(images).dtype == np.uint8 else originals_uint8(images[:n])
    pairs = np.concatenate([originals, recon[:n], *(m[:n] for m in more)], axis=2)
    count, h, w, c = pairs.shape
    rows = -(-count // cols)
    g = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, np.uint8)
    for i in range(count):
        r, k = divmod(i, cols)
        g[pad + r * (h + pad):pad + r * (h + pad) + h, pad + k * (w + pad):pad + k * (w + pad) + w] = pairs[i]
    return g
