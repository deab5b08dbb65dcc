"""The one VQ-GAN loader reads what a finished VQ-GAN run exports, from any of the paths users pass."""
import dataclasses
import importlib.util

import jax
import numpy as np
import pytest

from chameleon_jax import checkpoint as ckpt
from chameleon_jax.vqgan import checkpoint as vq_ckpt


def _tiny_config():
    spec = importlib.util.spec_from_file_location("vqgan_smoke", "experiments/vqgan_smoke.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config("tiny")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    config = _tiny_config()
    params = vq_ckpt.random_params(vq_ckpt.model_config(config), seed=3)
    run = tmp_path_factory.mktemp("vqgan_run")
    ckpt.export_params(params, run / vq_ckpt.EXPORT, config)  # what vqgan.train writes at the end of a run
    return run, config, params


@pytest.mark.parametrize("where", ["", "export", "export/state"])
def test_load_restores_the_exported_params_from_the_run_its_export_or_its_state(run_dir, where):
    run, config, params = run_dir
    cfg, loaded = vq_ckpt.load(run / where if where else run)
    assert cfg == vq_ckpt.model_config(config)  # read back from export/config.json
    assert jax.tree.structure(loaded) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), b)
    assert vq_ckpt.is_finished(run)


def test_an_unfinished_run_is_an_error_that_names_the_fix(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(FileNotFoundError, match="vqgan.train"):
        vq_ckpt.load(tmp_path)
    assert not vq_ckpt.is_finished(tmp_path)


def test_another_architecture_does_not_load(run_dir):
    run, config, _ = run_dir
    other = dataclasses.replace(vq_ckpt.model_config(config), n_embed=128)  # a larger codebook
    with pytest.raises(ValueError, match="shape"):
        vq_ckpt.load(run, other)


def test_pretokenize_encodes_with_the_loaded_vqgan(run_dir):
    from chameleon_jax import pretokenize
    from chameleon_jax.vqgan import model as vq_model

    run, config, params = run_dir
    encode, load, n_codes = pretokenize.vqgan_tools(str(run), encode_batch=2)
    cfg = vq_ckpt.model_config(config)
    images = np.random.default_rng(0).uniform(-1, 1, (3, cfg.resolution, cfg.resolution, 3)).astype(np.float32)
    np.testing.assert_array_equal(encode(images), np.asarray(jax.jit(vq_model.encode)(params, images)))
    assert n_codes == cfg.n_embed
