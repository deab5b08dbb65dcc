"""Starting a run from a converted release: the export's weights define the model, and a run fine-tuned from
it finds the export's tokenizer and VQ-GAN through its init.checkpoint.

The export is tests/release_fixture.py's tiny synthetic release (d_model 32, swin, image ids 4..8195),
converted once per module; the experiment is experiments/anole_7b.py:tiny (d_model 64, image ids 4..259).
"""
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import jax

from chameleon_jax import config as config_lib
from release_fixture import build_release, convert_main

REPO = Path(__file__).resolve().parents[1]


def anole_tiny():
    spec = importlib.util.spec_from_file_location("anole_7b", REPO / "experiments" / "anole_7b.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config("tiny")


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    root = tmp_path_factory.mktemp("release")
    build_release(root)
    convert_main(["--from", "meta", "--src", str(root), "--out", str(root / "export")])
    return root / "export"


@pytest.fixture(scope="module")
def stored(export):
    return json.loads((export / "config.json").read_text())


def experiment(export, **numerics):
    c = anole_tiny()
    c.init.checkpoint = str(export)
    c.model.update(numerics)
    return c


def test_the_export_defines_the_shape_and_the_experiment_its_numerics(export, stored, caplog):
    ours = experiment(export, dtype="bfloat16", remat="full", attention="xla", dropout=0.1)
    before = ours.to_dict()
    with caplog.at_level(logging.INFO, logger="chameleon_jax.config"):
        got = config_lib.model_from_init_checkpoint(ours, stored)
    assert ours.to_dict() == before  # a copy: the experiment's config is untouched
    for field in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim",
                  "qk_norm_groups", "block_order", "rope_theta", "norm_eps"):
        assert got.model[field] == stored["model"][field], field
    assert (got.model.dtype, got.model.remat, got.model.attention, got.model.dropout) == (
        "bfloat16", "full", "xla", 0.1)
    assert tuple(got.loss.image_ids) == tuple(stored["loss"]["image_ids"]) != tuple(ours.loss.image_ids)
    # validate() builds the model the export's weights fit (the experiment's d_model is 64, the export's 32).
    cfg = config_lib.validate(got, num_devices=1)
    assert (cfg.d_model, cfg.block_order, cfg.qk_norm_groups) == (32, "swin", 2)
    lines = [r.getMessage() for r in caplog.records if "model from init.checkpoint" in r.getMessage()]
    assert len(lines) == 1 and "model.d_model=32 (experiment: 64)" in lines[0], lines
    # The preset's rows (image+1) follow the export's image ids: nothing to warn about. Numeric rows were
    # written for the experiment's ids, not the export's: said, not silently kept.
    warned = lambda: any("finetune.rows" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert not warned()
    ours.finetune.rows = "output=4:261"
    config_lib.model_from_init_checkpoint(ours, stored)
    assert warned()


def test_a_shape_flag_that_contradicts_the_export_is_refused(export, stored):
    ours = experiment(export)
    with pytest.raises(ValueError, match=r"--config.model.d_model=64 .* holds model.d_model=32"):
        config_lib.model_from_init_checkpoint(ours, stored, explicit={"model.d_model", "train.steps"})
    # A flag that agrees with the export, or a numerics flag, is no contradiction.
    ours.model.d_model = 32
    got = config_lib.model_from_init_checkpoint(ours, stored, explicit={"model.d_model", "model.dtype"})
    assert got.model.d_model == 32


def test_train_program_refuses_a_contradicting_flag_before_it_builds_anything(export, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "chameleon_jax.train", "--config", "experiments/anole_7b.py:tiny",
         "--workdir", str(tmp_path / "run"), f"--config.init.checkpoint={export}", "--config.model.n_layers=3"],
        cwd=REPO, capture_output=True, text=True, timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "--config.model.n_layers=3" in proc.stderr and "model.n_layers=2" in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "run" / "checkpoints").exists()


def train(*args):
    return subprocess.run([sys.executable, "-m", "chameleon_jax.train", "--config", "experiments/anole_7b.py:tiny",
                           *args], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})


def test_train_program_fine_tunes_the_export_and_resumes_without_it(export, tmp_path):
    own = tmp_path / "export"  # a copy the run may lose between its launches
    shutil.copytree(export, own)
    args = ["--workdir", str(tmp_path / "run"), f"--config.init.checkpoint={own}",
            "--config.finetune.rows=output=4:8197", "--config.train.batch_size=1", "--config.train.seq_len=32",
            "--config.train.log_every=1", "--config.train.eval_every=0", "--config.checkpoint.every=1",
            "--config.checkpoint.async_save=false"]
    first = train(*args, "--config.train.steps=1")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "model.d_model=32 (experiment: 64)" in first.stderr and "initialised params from" in first.stderr
    recorded = json.loads((tmp_path / "run" / "config.json").read_text())
    assert recorded["model"]["d_model"] == 32 and recorded["loss"]["image_ids"] == [4, 8196]
    shutil.rmtree(own)
    again = train(*args, "--config.train.steps=2")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stderr and "step 2:" in again.stdout + again.stderr


def fine_tuned_run(export, root, init):
    """A params export shaped as a run fine-tuned from `init`: the export's weights, a config naming `init`
    as init.checkpoint and no generate block (what a fine-tune of the release records)."""
    shutil.copytree(export / "state", root / "state")
    config = json.loads((export / "config.json").read_text())
    config["init"]["checkpoint"] = str(init)
    config.pop("generate", None)
    (root / "config.json").write_text(json.dumps(config))
    return root


def test_generate_finds_the_tokenizer_and_vqgan_through_init_checkpoint(export, tmp_path):
    from chameleon_jax.generate.answer import load

    run = fine_tuned_run(export, tmp_path / "run", export)
    one = jax.devices()[:1]
    loaded = load(str(run), devices=one)
    assert loaded.vq_cfg.resolution == 16 and loaded.vq_cfg.n_embed == 8192  # the export's VQ-GAN
    assert loaded.tokenizer.encode("a cat.").tolist()  # the export's tokenizer (letters, space, full stop)
    assert loaded.grid == (8, 8)

    # A run whose init.checkpoint has no tokenizer or VQ-GAN still names the flags to pass.
    bare = tmp_path / "bare"
    shutil.copytree(export / "state", bare / "state")
    shutil.copy(export / "config.json", bare / "config.json")
    orphan = fine_tuned_run(export, tmp_path / "orphan", bare)
    with pytest.raises(ValueError, match="pass --tokenizer"):
        load(str(orphan), devices=one)
