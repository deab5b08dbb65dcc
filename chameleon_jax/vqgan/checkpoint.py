"""Loading a trained VQ-GAN: the one way generate, pretokenize, eval and smoke get (config, params).

    cfg, params = load("runs/vqgan")           # a VQ-GAN training run (its export), or the export itself
    codes = vqgan.encode(params, images)

A finished VQ-GAN run writes a params-only export (`chameleon_jax.checkpoint.export_params`):

    RUN/export/state         Orbax PyTree {"params": ...}
    RUN/export/config.json   the run's experiment config; its `model` block is the VQGANConfig

`load` accepts RUN, RUN/export or RUN/export/state, and the export of a converted Chameleon release
(OUT, holding OUT/vqgan; chameleon_jax.convert.release), and restores the params into the shapes that the
config's architecture has, so a checkpoint of another architecture fails with a shape error rather
than loading half a model.
"""
from __future__ import annotations

import json
import logging

import jax
import numpy as np
from etils import epath

from chameleon_jax import checkpoint as ckpt
from chameleon_jax.vqgan import model

log = logging.getLogger(__name__)

EXPORT = "export"  # RUN/export: written when a VQ-GAN run finishes
BUNDLED = "vqgan"  # OUT/vqgan: the VQ-GAN inside a converted release (`python -m chameleon_jax.convert`)


def model_config(config) -> model.VQGANConfig:
    """A VQGANConfig from itself, an experiment config (its `model` block) or a dict of its fields."""
    if isinstance(config, model.VQGANConfig):
        return config
    block = config.get("model", config) if hasattr(config, "get") else config
    return model.VQGANConfig.from_dict(block.to_dict() if hasattr(block, "to_dict") else block)


def export_dir(path) -> epath.Path:
    """RUN, RUN/export or RUN/export/state -> the export folder (holding state/ and config.json)."""
    path = epath.Path(path)
    # RUN/export, a converted Chameleon release's OUT/vqgan (before OUT itself, whose state/ is the
    # transformer), the export itself, or its state/ folder.
    for candidate in (path / EXPORT, path / BUNDLED, path, path.parent if path.name == "state" else None):
        if candidate is not None and (candidate / "state").is_dir():
            return candidate
    raise FileNotFoundError(
        f"{path} holds no finished VQ-GAN: expected RUN/{EXPORT}/state (written when "
        "`python -m chameleon_jax.vqgan.train --workdir RUN` finishes), an export folder or its state/ folder, "
        f"or a converted release (OUT/{BUNDLED}/state, from `python -m chameleon_jax.convert --from meta`)")


def is_finished(run_dir) -> bool:
    """Whether the VQ-GAN run in `run_dir` has written its export."""
    return (epath.Path(run_dir) / EXPORT / "state").is_dir()


def load(path, config=None) -> tuple[model.VQGANConfig, dict]:
    """(VQGANConfig, params) of the trained VQ-GAN at `path` (see the module docstring).

    `config` (a VQGANConfig or an experiment config) is needed only for an export without config.json.
    """
    export = export_dir(path)
    if config is None:
        stored = export / "config.json"
        if not stored.is_file():
            raise FileNotFoundError(f"{export} has no config.json; pass the VQ-GAN's experiment config "
                                    "(e.g. --vqgan_config experiments/vqgan_smoke.py)")
        config = json.loads(stored.read_text())
    cfg = model_config(config)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                            jax.eval_shape(lambda: model.init(jax.random.key(0), cfg)))
    params = ckpt.restore_params(export, abstract)
    log.info("loaded the VQ-GAN in %s (%d codes, %d px)", export, cfg.n_embed, cfg.resolution)
    return cfg, params


def random_params(cfg: model.VQGANConfig, seed: int = 0) -> dict:
    """Random weights of the VQ-GAN's shapes (fan-in scaled; norm scales 1, biases 0), without running
    init: a trace instead of hundreds of eager ops. The codes then mean nothing (smoke runs, benchmarks)."""
    shapes = jax.eval_shape(lambda k: model.init(k, cfg), jax.random.key(seed))
    rng = np.random.default_rng(seed)

    def leaf(path, s):
        name = jax.tree_util.keystr(path).lower()
        if len(s.shape) >= 2:
            return (rng.standard_normal(s.shape) / np.sqrt(np.prod(s.shape[:-1]))).astype(s.dtype)
        return (np.ones if any(k in name for k in ("scale", "gamma", "weight")) else np.zeros)(s.shape, s.dtype)

    return jax.tree_util.tree_map_with_path(leaf, shapes)
