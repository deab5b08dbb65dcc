"""The smoke experiment's driver end to end at unit-test size: every stage runs, the report is written,
and the same seed gives the same results."""
import json

import numpy as np
import pytest

from chameleon_jax import smoke
from chameleon_jax.smoke import stages


def _tiny_config():
    c = stages.load_config_file("experiments/smoke.py:quick")
    c.train.update(steps=4, log_every=2, eval_every=4)
    c.checkpoint.every = 4
    c.eval.steps = 1
    c.smoke.update(train_pairs=24, train_texts=4, heldout_pairs=8, eval_scenes=4, caption_tokens=6, grid_examples=4,
                   vqgan_config="experiments/vqgan_smoke.py:tiny")
    c.smoke.vqgan_overrides = {"train": {"time_budget_s": 0, "steps": 2, "eval_every": 2}, "checkpoint": {"every": 2}}
    return c


def _comparable(results: dict) -> dict:
    return {k: v for k, v in results.items() if k not in ("stage_s", "wall_s")}


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("smoke_a")
    return workdir, smoke.run(_tiny_config(), workdir)


def test_every_stage_runs_and_the_report_is_written(first_run):
    workdir, results = first_run
    for name in ("report.md", "results.json", "loss_curves.png", "text_to_image.png", "captioning.png"):
        assert (workdir / name).stat().st_size > 0, name
    assert results["train_steps"] == 4
    assert set(results["stage_s"]) == {"data", "tokenizer", "vqgan", "pretokenize", "train", "evaluate", "report"}
    for task in ("captioning", "text_to_image"):
        assert 0.0 <= results[task]["exact"] <= 1.0 and set(results[task]["attributes"]) >= {"cell", "shape"}
    assert results["perplexity"]["text/perplexity"] > 1.0
    assert json.loads((workdir / "results.json").read_text())["captioning"] == results["captioning"]


def test_the_same_seed_gives_the_same_results(first_run, tmp_path):
    _, first = first_run
    second = smoke.run(_tiny_config(), tmp_path / "smoke_b")  # from nothing again, VQ-GAN included
    assert _comparable(second) == _comparable(first)


def test_changed_data_settings_rebuild_the_data_and_the_tokenizer(tmp_path):
    s = _tiny_config().smoke
    s.train_images = 2
    data = tmp_path / "data"
    stages.build_data(s, data)
    tok = stages.train_tokenizer(s, data, tmp_path / "tokenizer")
    lines = (data / "train.jsonl").read_text().splitlines()
    assert len(lines) == s.train_pairs + s.train_texts + s.train_images
    assert sum('"segments"' in line for line in lines) == s.train_images  # caption-less images
    made = (tmp_path / "tokenizer" / "spm.model").stat().st_mtime_ns

    stages.train_tokenizer(s, data, tmp_path / "tokenizer")  # same settings: reused
    assert (tmp_path / "tokenizer" / "spm.model").stat().st_mtime_ns == made

    s.train_texts += 3  # a stale cache would silently train on the old documents
    stages.build_data(s, data)
    assert len((data / "train.jsonl").read_text().splitlines()) == len(lines) + 3
    assert stages.train_tokenizer(s, data, tmp_path / "tokenizer") == tok
    assert (tmp_path / "tokenizer" / "spm.model").stat().st_mtime_ns != made


def test_generate_answers_from_the_smoke_run(first_run, tmp_path):
    # The run's config records its tokenizer and VQ-GAN, so a checkpoint alone is enough to generate:
    # an image in, its codes through the model, an image out (decoded by the same VQ-GAN).
    from chameleon_jax import generate
    from chameleon_jax.vqgan import checkpoint as vq_checkpoint

    workdir, _ = first_run
    scene = workdir / "data" / "images" / "eval_000000.png"
    out = tmp_path / "answer"
    lines = generate.answer(str(workdir / "train"), "<image> the same scene", str(out), images=[str(scene)],
                            mode="image")
    assert lines == ["[image_1.png]"]  # image mode: exactly one image
    assert (out / "output.txt").read_text() == "[image_1.png]\n" and (out / "image_1.png").stat().st_size > 0
    record = json.loads((out / "output.json").read_text())
    assert record["images_in"] == [str(scene)] and record["mode"] == "image"
    vq_cfg, _ = vq_checkpoint.load(workdir / "vqgan")
    side = vq_cfg.resolution // 2 ** (len(vq_cfg.ch_mult) - 1)  # one downsampling per level after the first
    assert np.array(record["segments"][0]["codes"]).shape == (side, side)
