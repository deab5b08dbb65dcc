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
    """`ChameleonVQVAEConfig` -> VQGANConfig (taming field names); refuses what our model cannot run."""
    if getattr(hf_config, "double_latent", False):
        raise ValueError("double_latent=True is a KL-VAE layout; Chameleon's VQ model has double_z=False")
    attn_type = getattr(hf_config, "attn_type", "vanilla")
    if attn_type != "vanilla":
        # Without this check a template would silently keep random mid-attention weights.
        raise ValueError(f"attn_type={attn_type!r} is not supported: our VQ-GAN always has the mid-block "
                         f"attention; supported values: {SUPPORTED_ATTN_TYPES}")
    return VQGANConfig(resolution=hf_config.resolution, in_channels=hf_config.in_channels,
                       ch=hf_config.base_channels, ch_mult=tuple(hf_config.channel_multiplier),
                       num_res_blocks=hf_config.num_res_blocks,
                       attn_resolutions=tuple(hf_config.attn_resolutions or ()),
                       z_channels=hf_config.latent_channels, embed_dim=hf_config.embed_dim,
                       n_embed=hf_config.num_embeddings)


# ------------------------------------------------------------------------- taming yaml + checkpoint

SUPPORTED_ATTN_TYPES = ("vanilla",)
# ddconfig fields that map onto VQGANConfig (taming and our names agree).
_DDCONFIG_MAPPED = ("resolution", "in_channels", "out_ch", "ch", "ch_mult", "num_res_blocks", "attn_resolutions",
                    "z_channels")
# ddconfig fields that must hold the one value our architecture implements: field -> (allowed values).
_DDCONFIG_FIXED = {"double_z": (False,), "attn_type": SUPPORTED_ATTN_TYPES, "use_linear_attn": (False,),
                   "resamp_with_conv": (True,), "give_pre_end": (False,), "tanh_out": (False,)}
# Fields that only matter to training or to taming's file handling; inference ignores them.
_DDCONFIG_IGNORED = ("dropout",)  # dropout is the identity at inference
_PARAMS_IGNORED = ("lossconfig", "ckpt_path", "ignore_keys", "image_key", "colorize_nlabels", "monitor",
                   "sane_index_shape", "scheduler_config", "use_ema")
_QUANTIZER_FIXED = {"remap": (None,), "beta": None, "legacy": None}  # beta/legacy: training losses only


def config_from_taming(yaml_config: Mapping[str, Any]) -> VQGANConfig:
    """VQGANConfig from a taming `VQModel` yaml (already parsed; `model.params` or the params block).

    Every field is either mapped, checked against the one value our architecture implements, or known to
    matter only for training; anything else is refused with its name and the supported values, so a
    checkpoint of another architecture never loads into ours half-matched.
    """
    model_block = yaml_config.get("model", yaml_config)
    target = model_block.get("target", "taming.models.vqgan.VQModel")
    if not str(target).endswith(".VQModel"):
        raise ValueError(f"vqgan.yaml model.target={target!r} is not supported; supported: "
                         "taming.models.vqgan.VQModel (Chameleon's VQ-GAN; Gumbel/EMA quantizers are other models)")
    params = model_block.get("params", model_block)
    problems = []
    dd = dict(params.get("ddconfig") or {})
    if not dd:
        raise ValueError("vqgan.yaml has no model.params.ddconfig; it is not a taming VQModel config")
    fields = {}
    for name, value in dd.items():
        if name in _DDCONFIG_MAPPED:
            fields[name] = tuple(value) if isinstance(value, (list, tuple)) else value
        elif name in _DDCONFIG_FIXED:
            if value not in _DDCONFIG_FIXED[name]:
                problems.append(f"ddconfig.{name}={value!r} (supported: {list(_DDCONFIG_FIXED[name])})")
        elif name not in _DDCONFIG_IGNORED:
            problems.append(f"ddconfig.{name}={value!r} (unknown field; supported: "
                            f"{sorted(_DDCONFIG_MAPPED + tuple(_DDCONFIG_FIXED) + _DDCONFIG_IGNORED)})")
    for name, value in params.items():
        if name in ("ddconfig", "embed_dim", "n_embed") or name in _PARAMS_IGNORED:
            continue
        if name in _QUANTIZER_FIXED:
            allowed = _QUANTIZER_FIXED[name]
            if allowed is not None and value not in allowed:
                problems.append(f"params.{name}={value!r} (supported: {list(allowed)})")
            continue
        problems.append(f"params.{name}={value!r} (unknown field; supported: "
                        f"{sorted(('ddconfig', 'embed_dim', 'n_embed') + _PARAMS_IGNORED + tuple(_QUANTIZER_FIXED))})")
    for name in ("embed_dim", "n_embed"):
        if name not in params:
            problems.append(f"params.{name} is missing")
    for name in ("z_channels", "resolution", "ch", "ch_mult", "num_res_blocks"):
        if name not in dd:
            problems.append(f"ddconfig.{name} is missing")
    if problems:
        raise ValueError("vqgan.yaml describes a VQ-GAN this project cannot run: " + "; ".join(problems))
    fields.setdefault("attn_resolutions", ())
    return VQGANConfig(embed_dim=int(params["embed_dim"]), n_embed=int(params["n_embed"]), **fields)


def from_taming(state_dict: Mapping[str, Any], cfg: VQGANConfig) -> Params:
    """params of `cfg` from a taming `VQModel` state dict, which must hold exactly the model's tensors.

    `loss.*` (discriminator, LPIPS) and other non-model keys are dropped like taming's strict=False load;
    within the model every tensor must be present with the model's shape, and nothing extra: a release
    import never keeps an initialised leaf (unlike `from_hf`, whose checkpoints lack the decoder).
    """
    import jax

    from chameleon_jax.vqgan.model import init

    shapes = jax.eval_shape(lambda: init(jax.random.key(0), cfg))
    # Zero-stride views: the model's state-dict names and torch shapes without allocating its weights.
    views = jax.tree.map(lambda x: np.broadcast_to(np.float32(0), x.shape), shapes)
    want = {name: tuple(arr.shape) for name, arr in to_state_dict(views).items()}
    model_keys = {k for k in state_dict if k.split(".")[0] in MODEL_PREFIXES}
    problems = [f"missing {k}" for k in sorted(want.keys() - model_keys)]
    problems += [f"unexpected {k}" for k in sorted(model_keys - want.keys())]
    problems += [f"{k}: checkpoint shape {tuple(state_dict[k].shape)}, vqgan.yaml gives {want[k]}"
                 for k in sorted(want.keys() & model_keys) if tuple(state_dict[k].shape) != want[k]]
    if problems:
        shown = problems[:12] + ([f"... {len(problems) - 12} more"] if len(problems) > 12 else [])
        raise ValueError("vqgan.ckpt does not match vqgan.yaml's architecture:\n  " + "\n  ".join(shown))
    return from_state_dict({k: state_dict[k] for k in model_keys})


MODEL_PREFIXES = ("encoder", "decoder", "quant_conv", "post_quant_conv", "quantize")


def from_hf(model_or_state_dict, template: Params | None = None) -> Params:
    """HF `ChameleonVQVAE` (a module, or its state dict) -> params. The HF checkpoint has no decoder:
    pass `template` (e.g. `init(rng, config_from_hf(model.config))`) to get a full pytree."""
    sd = model_or_state_dict.state_dict() if hasattr(model_or_state_dict, "state_dict") else model_or_state_dict
    return from_state_dict(sd, template)


def _copy(tree):
    return {k: _copy(v) for k, v in tree.items()} if isinstance(tree, Mapping) else tree
