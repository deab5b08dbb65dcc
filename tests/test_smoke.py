"""The smoke experiment's driver end to end at unit-test size: every stage runs, the report is written,
and the same seed gives the same results."""
import json

import numpy as np
import pytest

from chameleon_jax import smoke
from chameleon_jax.smoke import experiment, stages


def _tiny_config():
    c = stages.load_config_file("experiments/smoke.py:quick")
    c.train.update(steps=4, log_every=2, eval_every=4)
    c.checkpoint.every = 4
    c.eval.steps = 1
    c.smoke.update(train_pairs=24, train_texts=4, train_questions=4, heldout_pairs=8, eval_two_object_scenes=2,
                   eval_single_object_scenes=2, caption_tokens=6, answer_tokens=3, grid_examples=4,
                   vqgan_config="experiments/vqgan_smoke.py:tiny")
    c.smoke.vqgan_overrides = {"train": {"time_budget_s": 0, "steps": 2, "eval_every": 2}, "checkpoint": {"every": 2}}
    return c


def test_evaluation_scenes_are_distinct_held_out_and_fixed():
    from chameleon_jax.data import shapes

    scenes = shapes.evaluation_scenes("test", two_object=40, seed=0)
    assert len(set(scenes)) == len(scenes) and all(shapes.split_of(sc) == "test" for sc in scenes)
    singles = [sc for sc in scenes if len(sc.objects) == 1]
    # Every single-object scene of the split, whatever the sample size: 324 scenes enumerated.
    assert singles == [sc for sc in shapes.all_scenes(1) if shapes.split_of(sc) == "test"] and len(singles) > 10
    assert len(scenes) - len(singles) == 40
    assert shapes.evaluation_scenes("test", 40, seed=0) == scenes != shapes.evaluation_scenes("test", 40, seed=1)


def test_questions_are_answered_by_the_scene():
    from chameleon_jax.data import shapes

    rng = np.random.default_rng(0)
    scene = shapes.parse_caption("a large red triangle at the top left and a small blue triangle at the center.")
    qs = {kind: (q, a) for kind, q, a in shapes.questions(scene, rng)}
    assert qs["count"] == ("how many shapes are there?", "two")
    assert "color_of" not in qs  # "the triangle" would name two objects
    assert qs["size_of"] in {("what size is the red triangle?", "large"), ("what size is the blue triangle?", "small")}
    cell = next(c for c in shapes.CELLS[::-1] if qs["shape_at"][0] == f"what shape is at the {c}?")
    assert qs["shape_at"][1] == {"top left": "triangle", "center": "triangle"}.get(cell, "nothing")


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
    assert results["eval_scenes"] == {"total": 4, "single_object": 2, "two_object": 2}
    for task in ("captioning", "text_to_image"):
        assert 0.0 <= results[task]["exact"] <= 1.0 and set(results[task]["attributes"]) >= {"cell", "shape"}
        lo, hi = results[task]["interval"]
        assert 0.0 <= lo <= results[task]["exact"] <= hi <= 1.0 and hi - lo > 0.2  # 4 scenes: a wide interval
    assert results["captioning"]["cider"] >= 0.0
    assert results["vqa"]["questions"] >= 4 * 2 and 0.0 <= results["vqa"]["accuracy"] <= 1.0  # >= 2 per scene
    assert results["perplexity"]["text/perplexity"] > 1.0
    assert json.loads((workdir / "results.json").read_text())["captioning"] == results["captioning"]


def test_the_same_seed_gives_the_same_results(first_run, tmp_path):
    _, first = first_run
    second = smoke.run(_tiny_config(), tmp_path / "smoke_b")  # from nothing again, VQ-GAN included
    assert _comparable(second) == _comparable(first)


def test_reevaluating_a_finished_run_gives_its_scores(first_run, tmp_path):
    # Same model, same evaluation set, greedy decoding: the scores must be the run's own, and nothing retrains.
    workdir, results = first_run
    again = experiment.reevaluate(_tiny_config(), workdir, tmp_path / "again")
    for key in ("eval_scenes", "captioning", "text_to_image", "vqa"):
        assert again[key] == results[key], key
    assert not (tmp_path / "again" / "train").exists() and (tmp_path / "again" / "report.md").stat().st_size > 0


def test_changed_data_settings_rebuild_the_data_and_the_tokenizer(tmp_path):
    s = _tiny_config().smoke
    s.train_images = 2
    data = tmp_path / "data"
    stages.build_data(s, data)
    tok = stages.train_tokenizer(s, data, tmp_path / "tokenizer")
    lines = (data / "train.jsonl").read_text().splitlines()
    assert len(lines) == s.train_pairs + s.train_texts + s.train_images + s.train_questions
    assert sum('"segments"' in line for line in lines) == s.train_images  # caption-less images
    assert sum('"turns"' in line for line in lines) == s.train_questions  # question -> answer turns
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
    scene = workdir / "eval" / "eval_000000.png"
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
