"""Chameleon's VQ-GAN image tokenizer as pure functions of a params pytree (taming-style names).

    params = init(rng, VQGANConfig(...))          # or convert.from_hf(hf_model, template)
    codes = encode(params, images)                # float32 [B,H,W,3] in [-1,1] -> int32 [B,H/f,W/f]
    images = decode(params, codes)                # -> float32 [B,H,W,3]; images.to_uint8 for pixels
    x = images_lib.load_image(path, 512)          # official preprocessing (alpha→white, LANCZOS, crop)

Training: `python -m chameleon_jax.vqgan.train --config experiments/vqgan_smoke.py --workdir DIR`,
or `train.train_or_load(config, workdir)` from code.
"""
from chameleon_jax.vqgan.model import (CHAMELEON, VQGANConfig, decode, decode_latents, encode, encode_latents, init,
                                       lookup, param_count, quantize)
from chameleon_jax.vqgan.convert import config_from_hf, from_hf, from_state_dict, to_state_dict
from chameleon_jax.vqgan.images import BadImage, load_image, load_images, preprocess, to_uint8

__all__ = ["CHAMELEON", "VQGANConfig", "init", "encode", "decode", "encode_latents", "decode_latents", "lookup",
           "quantize", "param_count", "from_hf", "from_state_dict", "to_state_dict", "config_from_hf",
           "BadImage", "load_image", "load_images", "preprocess", "to_uint8"]
