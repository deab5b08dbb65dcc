"""Meta's whole Chameleon release -> one self-contained export (transformer, VQ-GAN, text tokenizer).

The release (spec §9.1), as downloaded:

    RELEASE/7b/ or RELEASE/30b/      params.json, consolidate_params.json, consolidated*.pth  (also RELEASE/models/7b)
    RELEASE/tokenizer/               text_tokenizer.json, vqgan.ckpt, vqgan.yaml

The export written by `python -m chameleon_jax.convert --from meta --src RELEASE --out OUT`:

    OUT/state, OUT/config.json                 transformer params export (train, eval, generate read it)
    OUT/vqgan/state, OUT/vqgan/config.json     VQ-GAN params export (`vqgan.checkpoint.load(OUT)` reads it)
    OUT/tokenizer/text_tokenizer.json          the official tokenizer, copied after checking it (`text.load(OUT)`)

Pickles are read with `torch.load(weights_only=True)`: no code from the file runs. A Lightning
checkpoint may also pickle objects that are not tensors (hyper-parameters, callback classes); those
are loaded as inert stand-ins (their classes are never imported) and dropped, and only `state_dict`
is used.
"""
from __future__ import annotations

import json
import logging
import os
import pickle

import numpy as np
from etils import epath

from chameleon_jax.text import BUNDLED as TOKENIZER  # OUT/tokenizer/text_tokenizer.json
from chameleon_jax.vqgan.checkpoint import BUNDLED as VQGAN  # OUT/vqgan: the VQ-GAN params export

log = logging.getLogger(__name__)
MODEL_FOLDERS = ("7b", "30b")


def locate(src: str) -> tuple[str, str | None]:
    """(model folder, tokenizer folder or None) of a release given as RELEASE, RELEASE/models or a model
    folder (RELEASE/7b: its tokenizer is looked for beside it, at ../tokenizer or ../../tokenizer)."""
    src = os.path.abspath(src)
    if os.path.isfile(os.path.join(src, "params.json")):
        model_dir = src
    else:
        found = [os.path.join(base, name) for base in (src, os.path.join(src, "models"))
                 for name in MODEL_FOLDERS if os.path.isfile(os.path.join(base, name, "params.json"))]
        if not found:
            raise FileNotFoundError(f"{src} is not a Chameleon release: expected params.json in it, or a 7b/ or "
                                    f"30b/ folder (also under models/) beside tokenizer/")
        if len(found) > 1:
            raise ValueError(f"{src} holds several models ({', '.join(found)}); pass one of them as --src "
                             "(its tokenizer/ folder is found beside it)")
        model_dir = found[0]
    for up in (1, 2):
        candidate = os.path.join(model_dir, *[".."] * up, "tokenizer")
        if os.path.isdir(candidate):
            return model_dir, os.path.normpath(candidate)
    return model_dir, None


def load_torch_checkpoint(path: str) -> dict:
    """A torch pickle read with weights_only=True; objects that are not tensors come back as inert stand-ins.

    weights_only refuses any global outside torch's allowlist. For those the checkpoint is read again with
    a stand-in class under each refused name: the stand-in records constructor arguments and state but
    runs no code, and the real class is never imported. Anything still unreadable is an error that says
    what the file holds.
    """
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as first:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        if not names:
            raise ValueError(f"{path} cannot be read with torch.load(weights_only=True): {first}") from None
    stand_ins = [(_stand_in(name), name) for name in names]
    try:
        with torch.serialization.safe_globals(stand_ins):
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path} holds pickled objects ({', '.join(names)}) that cannot be read without running "
                         f"their code ({e}); extract its state_dict where you trust the file: "
                         f"torch.save(torch.load(PATH, weights_only=False)['state_dict'], 'vqgan_weights.ckpt')"
                         ) from None
    log.info("%s: not tensors, read as inert stand-ins and ignored: %s", path, ", ".join(names))
    return ckpt


def _stand_in(qualified_name: str) -> type:
    """A class that accepts whatever the pickle passes (args, state) and does nothing with it."""
    def init(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def setstate(self, state):
        self.state = state

    module, _, name = qualified_name.rpartition(".")
    return type(name, (), {"__init__": init, "__setstate__": setstate, "__module__": module,
                           "__qualname__": name})


def load_vqgan(tokenizer_dir: str):
    """(VQGANConfig, params) from tokenizer/vqgan.yaml and tokenizer/vqgan.ckpt of a release."""
    import yaml

    from chameleon_jax.vqgan import convert as vq_convert

    yaml_path, ckpt_path = os.path.join(tokenizer_dir, "vqgan.yaml"), os.path.join(tokenizer_dir, "vqgan.ckpt")
    for p in (yaml_path, ckpt_path):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"{p} is missing; the release's tokenizer/ folder holds vqgan.yaml and vqgan.ckpt")
    with open(yaml_path) as f:
        cfg = vq_convert.config_from_taming(yaml.safe_load(f) or {})
    ckpt = load_torch_checkpoint(ckpt_path)
    state_dict = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state_dict, dict):
        raise ValueError(f"{ckpt_path} holds {type(ckpt).__name__}, not a checkpoint dict with a state_dict")
    dropped = sorted({k.split(".")[0] for k in state_dict} - set(vq_convert.MODEL_PREFIXES))
    if dropped:
        log.info("%s: dropped the training-only tensors under %s", ckpt_path, ", ".join(dropped))
    return cfg, vq_convert.from_taming(state_dict, cfg)


def save_vqgan(out_dir, cfg, params) -> epath.Path:
    """Writes OUT/vqgan (state/ + config.json whose `model` block is the VQGANConfig)."""
    import dataclasses

    from chameleon_jax import checkpoint

    return checkpoint.export_params(params, epath.Path(out_dir) / VQGAN, {"model": dataclasses.asdict(cfg)})


def copy_tokenizer(tokenizer_dir: str, out_dir, n_embed: int) -> epath.Path:
    """Checks tokenizer/text_tokenizer.json against the chameleon id layout and the VQ-GAN's codebook, then
    copies it byte for byte to OUT/tokenizer/text_tokenizer.json."""
    from chameleon_jax import text

    src = os.path.join(tokenizer_dir, "text_tokenizer.json")
    tok = text.OfficialText(src)  # raises unless the specials and image tokens sit at Chameleon's ids
    with open(src, encoding="utf-8") as f:
        names = json.load(f)["model"]["vocab"]
    image_tokens = sum(text.image_code_of_name(name) is not None for name in names)
    if image_tokens != n_embed:
        raise ValueError(f"{src} names {image_tokens} image tokens but vqgan.yaml's codebook has n_embed={n_embed}; "
                         "the tokenizer and the VQ-GAN must come from the same release")
    if tok.vocab.image_codes != n_embed:
        raise ValueError(f"the chameleon vocabulary reserves {tok.vocab.image_codes} image ids, the VQ-GAN has "
                         f"n_embed={n_embed} codes")
    dest = epath.Path(out_dir) / TOKENIZER
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(src, "rb") as f:
        dest.write_bytes(f.read())
    return dest


def convert_tokenizers(tokenizer_dir: str, out_dir) -> dict:
    """The VQ-GAN and the text tokenizer of a release into the export at out_dir; returns what was written."""
    cfg, params = load_vqgan(tokenizer_dir)
    tok = copy_tokenizer(tokenizer_dir, out_dir, cfg.n_embed)
    vq = save_vqgan(out_dir, cfg, params)
    n = sum(int(np.prod(x.shape)) for x in _leaves(params))
    return {"vqgan": str(vq), "tokenizer": str(tok), "vqgan_params": n, "resolution": cfg.resolution,
            "codes": cfg.n_embed, "grid": cfg.code_shape}


def _leaves(tree):
    if isinstance(tree, dict):
        for v in tree.values():
            yield from _leaves(v)
    else:
        yield tree


def tokenizer_path(export) -> epath.Path | None:
    """OUT/tokenizer/text_tokenizer.json of a converted release, or None if the export has none."""
    p = epath.Path(export) / TOKENIZER
    return p if p.is_file() else None


def vqgan_path(export) -> epath.Path | None:
    """OUT/vqgan of a converted release, or None if the export has none."""
    p = epath.Path(export) / VQGAN
    return p if (p / "state").is_dir() else None


def describe(export) -> list[str]:
    """What a converted release holds besides the transformer, one line each (the convert CLI prints them)."""
    lines = []
    if vqgan_path(export) is not None:
        cfg = json.loads((vqgan_path(export) / "config.json").read_text())["model"]
        side = cfg["resolution"] // 2 ** (len(cfg["ch_mult"]) - 1)
        lines.append(f"wrote {vqgan_path(export)}: VQ-GAN {cfg['resolution']} px -> {side}x{side} codes of "
                     f"{cfg['n_embed']} (encoder and decoder)")
    if tokenizer_path(export) is not None:
        lines.append(f"wrote {tokenizer_path(export)}: text tokenizer")
    return lines
