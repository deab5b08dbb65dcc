"""Weight import into our params layout: HF transformers (`hf`) and Meta's release (`meta`), spec §9.

A converted directory is a params export of `chameleon_jax.checkpoint` (`export_params`): `state/`, an
Orbax checkpoint of {"params": pure params dict} (layers stacked along a leading L axis, as
`chameleon_jax.model.init_params` makes them), and `config.json`, a full experiment config
(ml_collections-compatible) whose `model` section describes the imported weights.

    python -m chameleon_jax.convert --from hf --src HF_DIR --out OUT_DIR
    config, params = chameleon_jax.convert.load_converted(OUT_DIR)

OUT_DIR may be a bucket (gs://BUCKET/chameleon-7b): the export goes through Orbax and etils.epath.
The source is read from local disk.
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from chameleon_jax import checkpoint
from chameleon_jax.config import base_config, validate
from chameleon_jax.model import ModelConfig, abstract

__all__ = ["experiment_config", "check_params", "save_converted", "load_converted", "convert"]


def experiment_config(model_fields: dict, image_ids=None, param_dtype: str = "float32"):
    """The base experiment config with `model` set to the imported architecture."""
    config = base_config()
    config.model.update(model_fields, param_dtype=param_dtype)
    if image_ids is not None:
        config.loss.image_ids = tuple(int(i) for i in image_ids)
    validate(config)
    return config


def check_params(params: dict, cfg: ModelConfig) -> None:
    """Raises unless `params` has exactly the tree structure and shapes that `cfg` builds."""
    expected = nnx.to_pure_dict(abstract(cfg)[1])
    want = {jax.tree_util.keystr(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(expected)}
    got = {jax.tree_util.keystr(p): tuple(np.shape(x)) for p, x in jax.tree_util.tree_leaves_with_path(params)}
    problems = [f"missing {k}" for k in want.keys() - got.keys()]
    problems += [f"unexpected {k}" for k in got.keys() - want.keys()]
    problems += [f"{k}: shape {got[k]}, model expects {want[k]}" for k in want.keys() & got.keys()
                 if got[k] != want[k]]
    if problems:
        raise ValueError("Converted params do not match the model:\n  " + "\n  ".join(sorted(problems)))


def save_converted(out_dir: str, config, params: dict) -> None:
    """Writes the params export (`OUT/state`, `OUT/config.json`) that training and eval restore."""
    check_params(params, ModelConfig.from_config(config.model))
    checkpoint.export_params(params, out_dir, config)


def load_converted(out_dir: str, sharding: jax.sharding.Sharding | None = None):
    """(experiment config, params) from a converted directory; params land on `sharding`
    (default: the first local device)."""
    config = checkpoint.read_config(out_dir)
    cfg = ModelConfig.from_config(config.model)
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                          nnx.to_pure_dict(abstract(cfg)[1]))
    return config, checkpoint.restore_params(out_dir, target)


def convert(source: str, src: str, out_dir: str, param_dtype: str = "float32", image_ids=None):
    """Imports `src` (layout `source`: 'hf' or 'meta') and writes it to out_dir; returns the config.

    `image_ids` ([start, stop) of the image-code ids) overrides what the source says (HF: its
    vocabulary_map) and the Chameleon default (4, 8196). For 'meta', `src` is the release (holding 7b/ or
    30b/ and tokenizer/) or a model folder: the VQ-GAN and the text tokenizer found beside it go into the
    same export (`chameleon_jax.convert.release`), so train, eval, pretokenize and generate need only OUT.
    """
    dtype = jax.numpy.dtype(param_dtype)
    tokenizer_dir = None
    if source == "hf":
        from chameleon_jax.convert.hf import load_hf

        fields, params, found_ids = load_hf(src, dtype)
    elif source == "meta":
        from chameleon_jax.convert import release
        from chameleon_jax.convert.meta import load_meta

        model_dir, tokenizer_dir = release.locate(src)
        fields, params, found_ids = load_meta(model_dir, dtype)
    else:
        raise ValueError(f"--from {source!r}: choose 'hf' (save_pretrained directory) or 'meta' "
                         f"(consolidated*.pth + params.json).")
    config = experiment_config(fields, image_ids or found_ids, param_dtype)
    if tokenizer_dir is not None:  # checked before the long transformer write
        parts = release.convert_tokenizers(tokenizer_dir, out_dir)
        if config.loss.image_ids[1] - config.loss.image_ids[0] != parts["codes"]:
            raise ValueError(f"loss.image_ids={tuple(config.loss.image_ids)} spans "
                             f"{config.loss.image_ids[1] - config.loss.image_ids[0]} ids but the VQ-GAN has "
                             f"{parts['codes']} codes; fix --image_ids")
    save_converted(out_dir, config, params)
    return config
