"""Weight import/export between the params pytree and taming / HF `ChameleonVQVAE` state dicts.

The pytree's key paths are the state-dict names (model.py), so conversion is a key map plus
OIHW <-> HWIO transposes. HF checkpoints hold no decoder ("we dont do image generation yet" in the HF
converter): `from_hf` fills what the state dict has and keeps the rest from `template` if given.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from chameleon_jax.vqgan.model import Params, VQGANConfig


def _to_numpy(t) -> np.ndarray:
    if hasattr(t, "detach"):  # torch tensor, without importing torch here
        t = t.detach().cpu().float().numpy()
    return np.asarray(t, np.float32)


def from_state_dict(state_dict: Mapping[str, Any], template: Params | None = None, *, strict: bool = True) -> Params:
    """taming / HF names ("encoder.down.0.block.1.conv1.weight") -> params pytree (numpy leaves).

    Keys outside the VQ model (`loss.*`, a discriminator) are ignored like taming's strict=False load.
    With `template`, its leaves are kept where the state dict has none and shapes are checked.
    """
    out: Params = _copy(template) if template is not None else {}
    for name, value in state_dict.items():
        parts = name.split(".")
        if parts[0] not in ("encoder", "decoder", "quant_conv", "post_quant_conv", "quantize"):
            continue
        arr = _to_numpy(value)
        leaf = parts[-1]
        if leaf == "weight":
            if parts[-2] == "embedding":
                leaf = "embedding"
                parts = parts[:-1]
            elif arr.ndim == 4:
                leaf, arr = "kernel", arr.transpose(2, 3, 1, 0)  # OIHW -> HWIO
            else:
                leaf = "scale"
        node = out
        for k in parts[:-1]:
            node = node.setdefault(k, {})
        if strict and template is not None and leaf in node and tuple(node[leaf].shape) != arr.shape:
            raise ValueError(f"{name}: checkpoint shape {arr.shape} != model shape {tuple(node[leaf].shape)}; "
                             "the config does not match the checkpoint")
        node[leaf] = arr
    return out


def to_state_dict(params: Params) -> dict[str, np.ndarray]:
    """The inverse of `from_state_dict` (taming names, OIHW kernels)."""
    out = {}

    def walk(node, prefix):
        for k, v in node.items():
            if isinstance(v, Mapping):
                walk(v, prefix + [k])
                continue
            arr = np.asarray(v)
            if k == "kernel":
                out[".".join(prefix + ["weight"])] = arr.transpose(3, 2, 0, 1)
            elif k == "scale":
                out[".".join(prefix + ["weight"])] = arr
            elif k == "embedding":
                out[".".join(prefix + ["embedding", "weight"])] = arr
            else:
                out[".".join(prefix + [k])] = arr
    walk(params, [])
    return out


def config_from_hf(hf_config) -> VQGANConfig:
    """`ChameleonVQVAEConfig` -> VQGANConfig (taming field names)."""
    if getattr(hf_config, "double_latent", False):
        raise ValueError("double_latent=True is a KL-VAE layout; Chameleon's VQ model has double_z=False")
    return VQGANConfig(resolution=hf_config.resolution, in_channels=hf_config.in_channels,
                       ch=hf_config.base_channels, ch_mult=tuple(hf_config.channel_multiplier),
                       num_res_blocks=hf_config.num_res_blocks,
                       attn_resolutions=tuple(hf_config.attn_resolutions or ()),
                       z_channels=hf_config.latent_channels, embed_dim=hf_config.embed_dim,
                       n_embed=hf_config.num_embeddings)


def from_hf(model_or_state_dict, template: Params | None = None) -> Params:
    """HF `ChameleonVQVAE` (a module, or its state dict) -> params. The HF checkpoint has no decoder:
    pass `template` (e.g. `init(rng, config_from_hf(model.config))`) to get a full pytree."""
    sd = model_or_state_dict.state_dict() if hasattr(model_or_state_dict, "state_dict") else model_or_state_dict
    return from_state_dict(sd, template)


def _copy(tree):
    return {k: _copy(v) for k, v in tree.items()} if isinstance(tree, Mapping) else tree
