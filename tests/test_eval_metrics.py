"""Captioning and VQA scores, their confidence intervals, and `python -m chameleon_jax.eval --eval_set`.

CIDEr is checked against pycocoevalcap's own scorer and against a case worked by hand; the VQA answer
normalisation against a table; the intervals against their formulas. End to end, the program answers an
eval set with the tiny checkpoint of tests/test_generate_program.py: its predictions must be what
generate_batch gives for the same prompts, and its scores the metrics applied to them.
"""
import importlib.util
import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.cider.cider_scorer import CiderScorer

from chameleon_jax import checkpoint as ckpt
from chameleon_jax import config as config_lib
from chameleon_jax import model as model_lib
from chameleon_jax import text as text_lib
from chameleon_jax.convert import release
from chameleon_jax.evals import metrics, stats
from chameleon_jax.generate import benchmark
from chameleon_jax.generate.answer import Decoding, Request, generate_batch, load, prompt_ids
from chameleon_jax.vqgan import checkpoint as vq_checkpoint
from test_generate_program import FAST_COMPILE, REPO, VQ, WORDS

CAPTIONS = ["A red circle, left of a blue square.", "two green lines crossing", "The small yellow star!"]
REFERENCES = [["a red circle left of a blue square", "A red disc beside a square."],
              ["Two green lines cross.", "green lines in an X"],
              ["a yellow star", "a small star that is yellow"]]


# ------------------------------------------------------------------------------------------------- CIDEr

def test_cider_is_pycocoevalcaps_scorer_on_our_tokens():
    corpus, per_item = metrics.cider(CAPTIONS, REFERENCES)
    # The COCO toolkit's entry point, fed the tokens our rule makes (what its Java tokenizer would have made).
    gts = {i: [metrics.caption_tokens(r) for r in refs] for i, refs in enumerate(REFERENCES)}
    res = {i: [metrics.caption_tokens(c)] for i, c in enumerate(CAPTIONS)}
    want, want_items = Cider().compute_score(gts, res)
    assert corpus == want and np.array_equal(per_item, want_items)
    assert metrics.caption_tokens("The small, yellow star!") == "the small yellow star"
    # Untokenized text would score differently ("square." is not "square"): the rule really is applied.
    raw = CiderScorer(n=4, sigma=6.0)
    for c, refs in zip(CAPTIONS, REFERENCES):
        raw += (c, refs)
    assert raw.compute_score()[0] != corpus


def test_cider_prefers_the_right_caption():
    right, right_items = metrics.cider([r[0] for r in REFERENCES], REFERENCES)
    wrong, wrong_items = metrics.cider([REFERENCES[1][0], REFERENCES[2][0], REFERENCES[0][0]], REFERENCES)
    assert (right_items > wrong_items).all() and right > wrong


def test_cider_on_a_case_worked_by_hand():
    """Two items, one reference each, no n-gram in common, so every n-gram's tf-idf weight is
    log(2) - log(1) (an n-gram of a candidate that no reference has gets df clipped to 1, the same weight).
    Both candidates are as long as their reference, so the length penalty is 1.
    Item 1, "a red square right" against "a red circle left": 1-grams 2 shared of 4 -> cosine 2/4; 2-grams
    "a red" of 3 -> 1/3; no 3- or 4-gram shared. CIDEr-D = 10 * mean(1/2, 1/3, 0, 0) = 25/12.
    Item 2 repeats its 4-word reference: cosine 1 at every n -> 10."""
    corpus, per_item = metrics.cider(["a red square right", "Two green lines crossing."],
                                     [["A red circle, left."], ["two green lines crossing"]])
    np.testing.assert_allclose(per_item, [25 / 12, 10.0], rtol=1e-12)  # a few float64 operations
    assert corpus == pytest.approx((25 / 12 + 10) / 2, rel=1e-12)


def test_cider_rejects_mismatched_input():
    with pytest.raises(ValueError, match="one reference list per prediction"):
        metrics.cider(["a"], [["a"], ["b"]])
    with pytest.raises(ValueError, match="non-empty list"):
        metrics.cider(["a", "b"], [["a"], "b"])


# --------------------------------------------------------------------------------------------------- VQA

@pytest.mark.parametrize("raw, normal", [
    ("Two", "2"),                       # number words -> digits
    ("none", "0"),
    ("The dog.", "dog"),                # articles and a final period go
    ("an apple", "apple"),
    ("1,000", "1000"),                  # a digit comma is deleted, not a word break
    ("2.5", "2.5"),                     # a decimal point stays
    ("don't", "dont"),                  # apostrophes are deleted: contractions match with or without
    ("T-Shirt!", "t shirt"),            # other punctuation separates words
    ("  Yes\n", "yes"),
    ("red, white and blue", "red white and blue"),
    ("a\tcat", "cat"),
])
def test_vqa_answer_normalisation(raw, normal):
    assert metrics.normalize_answer(raw) == normal


def test_vqa_accuracy_and_consensus_score():
    acc, per_item = metrics.vqa_accuracy(["Two", "a cat", "blue"], [["2"], ["dog", "Cat."], ["red"]])
    assert acc == pytest.approx(2 / 3) and per_item.tolist() == [1.0, 1.0, 0.0]
    # VQA's consensus score over 10 human answers: with 3 matching, the leave-one-out subsets that drop a
    # match hold 2 (score 2/3; 3 of them), the others 3 (score 1; 7 of them): (3 * 2/3 + 7) / 10 = 0.9.
    # With 2 matching: (2 * 1/3 + 8 * 2/3) / 10 = 0.6. An item with 2 answers has no such score (NaN).
    score, items = metrics.vqa_score(["2", "yes", "no"], [["two"] * 3 + ["3"] * 7, ["yes"] * 2 + ["no"] * 8,
                                                          ["no", "no"]])
    np.testing.assert_allclose(items[:2], [0.9, 0.6], rtol=1e-12)
    assert math.isnan(items[2]) and score == pytest.approx(0.75)


# ---------------------------------------------------------------------------------------------- intervals

def test_wilson_interval_matches_its_formula():
    # 0 of 10 at 95%: the upper bound is z^2 / (n + z^2), z = 1.959964 (worked from the Wilson formula).
    z = 1.959963984540054
    assert stats.wilson_interval(0, 10) == (0.0, pytest.approx(z * z / (10 + z * z), rel=1e-12))
    assert stats.wilson_interval(10, 10) == (pytest.approx(10 / (10 + z * z), rel=1e-12), 1.0)
    from scipy.stats import binomtest

    for k, n, conf in ((87, 100, 0.95), (3, 7, 0.9), (50, 50, 0.99)):
        want = binomtest(k, n).proportion_ci(confidence_level=conf, method="wilson")
        np.testing.assert_allclose(stats.wilson_interval(k, n, conf), (want.low, want.high), rtol=1e-10)
    assert stats.wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError, match="successes <= n"):
        stats.wilson_interval(5, 4)


def test_bootstrap_interval_is_deterministic_and_has_the_normal_width():
    values = np.random.default_rng(1).random(400)
    low, high = stats.bootstrap_interval(values)
    assert low < values.mean() < high
    assert stats.bootstrap_interval(values) == (low, high)
    assert stats.bootstrap_interval(values, seed=1) != (low, high)
    # The mean of 400 i.i.d. values is close to normal: the 95% interval is about mean +- 1.96 sd/sqrt(n).
    # 10,000 resamples put each percentile within ~2% of the half-width; 5% leaves room for the sample.
    half = 1.959964 * values.std() / np.sqrt(values.size)
    np.testing.assert_allclose((low, high), (values.mean() - half, values.mean() + half), atol=0.05 * half)
    assert stats.bootstrap_interval(np.full(9, 0.3)) == pytest.approx((0.3, 0.3))
    with pytest.raises(ValueError, match="NaN"):
        stats.bootstrap_interval([0.1, float("nan")])


# ------------------------------------------------------------------------------------------- end to end

def _export(root):
    """A params export of experiments/tiny.py with its VQ-GAN bundled and its tokenizer named, as
    test_generate_program's, but with weights drawn at std 0.3: at the usual 0.02 a random model's greedy
    answer is one id repeated whatever the prompt, so a wrong prompt would go unseen."""
    lines = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))]
    sp = text_lib.train_sentencepiece(lines, str(root / "tok" / "sp"), vocab_size=320, num_threads=1)
    vocab_size = text_lib.load(sp, image_codes=VQ.n_embed).vocab.size
    spec = importlib.util.spec_from_file_location("tiny", os.path.join(REPO, "experiments", "tiny.py"))
    tiny = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tiny)
    config = tiny.get_config()
    config.model.update(vocab_size=-(-vocab_size // 8) * 8, init_std=0.3)
    config.generate = {"tokenizer": sp}
    params = model_lib.init_params(config_lib.validate(config), jax.random.PRNGKey(3))
    out = root / "export"
    ckpt.export_params(params, str(out), config)
    release.save_vqgan(out, VQ, vq_checkpoint.random_params(VQ, seed=1))
    return out


@pytest.fixture(scope="module")
def eval_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalset")
    export = _export(root)
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), np.uint8)).save(root / f"im{i}.png")
    return root, export


@pytest.fixture(scope="module")
def loaded(eval_root):
    return load(str(eval_root[1]), mesh=(1, 1, 1), devices=jax.devices()[:1])


def _generated(loaded, prompts, images, max_new_tokens, compiler_options=None, user_turn=False):
    """What generate_batch answers for these prompts, decoded as one batch: each answer's text and ids.
    `user_turn`: the prompt ends with <end-turn> and decoding stops at the next (an SFT model's answer).
    The ids are compared, not only the text: a random model's byte pieces mostly decode to U+FFFD."""
    requests = [Request(p, (str(im),), "text", label=i) for i, (p, im) in enumerate(zip(prompts, images))]
    ids = [prompt_ids(loaded, r) + ([loaded.vocab.end_turn] if user_turn else []) for r in requests]
    answers, result = generate_batch(loaded, requests, ids, Decoding(max_new_tokens=max_new_tokens,
                                                                      stop_at_end_of_turn=user_turn),
                                     compiler_options=compiler_options)
    return ["".join(s for s in a if isinstance(s, str)) for a in answers], [result.row(i).tolist()
                                                                            for i in range(len(requests))]


def test_the_program_scores_what_generate_answers_and_counts_bad_lines(eval_root, loaded):
    root, export = eval_root
    images = [root / f"im{i}.png" for i in range(3)]
    # Compiled as the program compiles (default XLA options), so rounding cannot flip a greedy pick.
    outputs, tokens = _generated(loaded, ["<image>"] * 3, images, 6)
    preds = [benchmark.prediction_of(o) for o in outputs]
    # The first item's references hold the model's own caption, so CIDEr is not zero by construction.
    refs = [[preds[0], "a red circle"], ["a blue square", "two lines"], ["a yellow star", "grey hill"]]
    lines = [json.dumps({"image": "im0.png", "references": refs[0]}),
             "{not json",
             json.dumps({"image": "im1.png", "references": refs[1]}),
             json.dumps({"image": "im2.png", "references": "one string, not a list"}),
             json.dumps({"image": "missing.png", "references": ["x"]}),
             json.dumps({"image": "im2.png", "references": refs[2]}),
             json.dumps({"image": "corrupt.png", "references": ["x"]})]
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (root / "caps.jsonl").write_text("\n".join(lines) + "\n")
    # The program sees the 8 devices this process has (conftest.py), so the decoder compiled above for a
    # one-device mesh is found in the persistent compilation cache instead of compiled again.
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO, JAX_NUM_CPU_DEVICES="8")
    proc = subprocess.run([sys.executable, "-m", "chameleon_jax.eval", f"--checkpoint={export}",
                           "--eval_set=caps.jsonl", "--task=caption", "--output=results.json", "--mesh=1,1,1",
                           "--max_new_tokens=6", "--batch_size=4"],
                          env=env, cwd=root, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((root / "results.json").read_text())
    assert json.loads(proc.stdout) == results
    assert results["items"] == 3
    assert [s[0] for s in results["skipped"]] == [2, 4, 5, 7]
    assert "not JSON" in results["skipped"][0][1] and "image not found" in results["skipped"][2][1]
    assert results["skipped"][3][1].startswith("BadImage")  # read, but does not decode
    records = [json.loads(x) for x in (root / "results.predictions.jsonl").read_text().splitlines()]
    assert [r["line"] for r in records] == [1, 3, 6]
    assert [r["tokens"] for r in records] == tokens and [r["output"] for r in records] == outputs
    assert len({tuple(t) for t in tokens}) > 1  # the images lead to different answers
    want, want_items = metrics.cider(preds, refs)
    assert want > 0 and results["cider"]["value"] == want
    assert [r["cider"] for r in records] == want_items.tolist()
    assert results["cider"]["ci"] == list(stats.bootstrap_interval(want_items))


def test_vqa_items_get_the_question_in_their_prompt_as_a_user_turn(eval_root, loaded):
    root, _ = eval_root
    questions = ["what is it?", "which colour?", "how many are there?"]
    images = [root / f"im{i}.png" for i in range(3)]
    outputs, tokens = _generated(loaded, [f"<image>Q: {q}" for q in questions], images, 4, FAST_COMPILE,
                                 user_turn=True)
    preds = [benchmark.prediction_of(o) for o in outputs]
    # The first is right, the second wrong, the third right but only 1 of its 3 human answers agrees.
    answers = [[preds[0], "red"], ["certainly not " + preds[1]], [preds[2], "zebra", "zebra"]]
    items = [benchmark.Item(i + 1, str(im), tuple(a), q) for i, (im, a, q) in enumerate(zip(images, answers,
                                                                                          questions))]
    # All three prompts (with <end-turn>) pad to one length (34-35 ids -> 40): both batches have one shape.
    assert len({-(-(len(prompt_ids(loaded, Request(f"<image>Q: {q}", (str(im),), "text"))) + 1) // 8)
                for q, im in zip(questions, images)}) == 1
    (decoder,) = [g for key, g in loaded.generators.items() if key[0].max_new_tokens == 4]
    compiled = decoder._fn._cache_size()
    results = benchmark.evaluate(loaded, items, "vqa", prompt="<image>Q: {question}", batch_size=2, chat=True,
                                 decoding=Decoding(max_new_tokens=4), compiler_options=FAST_COMPILE,
                                 predictions_path=str(root / "vqa.predictions.jsonl"))
    # Two batches, the second padded to the first's shape, on the decoder compiled above: one new shape.
    assert [g for key, g in loaded.generators.items() if key[0].max_new_tokens == 4] == [decoder]
    assert decoder._fn._cache_size() == compiled + 1
    records = [json.loads(x) for x in (root / "vqa.predictions.jsonl").read_text().splitlines()]
    assert [r["tokens"] for r in records] == tokens and [r["output"] for r in records] == outputs
    assert [r["prompt"] for r in records] == [f"<image>Q: {q}" for q in questions]
    assert results["vqa_accuracy"]["value"] == pytest.approx(2 / 3) and results["vqa_accuracy"]["correct"] == 2
    assert results["vqa_accuracy"]["ci"] == list(stats.wilson_interval(2, 3))
    # Only the third item has 3 human answers: 1 of 3 match, so each leave-one-out subset holds 0 or 1
    # matches: (1 * 0 + 2 * 1/3) / 3 = 2/9.
    assert results["vqa_score"]["items"] == 1 and results["vqa_score"]["value"] == pytest.approx(2 / 9)
    assert records[2]["vqa_score"] == pytest.approx(2 / 9) and "vqa_score" not in records[0]
    assert benchmark.describe(results).startswith("VQA accuracy 66.7% [")
    with pytest.raises(ValueError, match="no {question}"):
        benchmark.evaluate(loaded, items, "vqa", prompt="<image> what?")
    with pytest.raises(ValueError, match="not found"):
        benchmark.read_eval_set(str(root / "no_such.jsonl"), "vqa")
