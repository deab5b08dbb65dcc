"""From Meta's release to a fine-tuned image generator and back, through the programs a user runs.

1. A tiny synthetic Meta release (tests/release_fixture.py: 2 bf16 transformer shards, vqgan.ckpt,
   vqgan.yaml, text_tokenizer.json) converts with `python -m chameleon_jax.convert --from meta`.
2. Four real photographs shipped inside scikit-image's wheel (nothing is downloaded), with captions, are
   pretokenized by `python -m chameleon_jax.pretokenize` with the export as the VQ-GAN and tokenizer.
3. `python -m chameleon_jax.train --config experiments/anole_7b.py:tiny` fine-tunes the export for a few
   steps: every frozen param keeps its bits, every image-code row of the head moves, and the image tokens'
   loss on the photographs goes down.
4. `python -m chameleon_jax.generate` draws an image (a PNG at the VQ-GAN's resolution) and a caption from
   the fine-tuned run.
5. `python -m chameleon_jax.convert --to hf` exports the run; `transformers` loads it whole and its logits
   on the pretokenized photographs match ours.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import torch  # noqa: F401  (the `peers` extra: a missing peer fails, never skips)
import transformers

import jax

from numerics import chain_tol, transformer_lengths
from release_fixture import N_EMBED, VQ_DDCONFIG, build_release, convert_main
from test_convert_hf import _hf_logits

REPO = Path(__file__).resolve().parents[1]
# Real photographs bundled in scikit-image's wheel (skimage/data/*.png), each with a caption in the
# synthetic tokenizer's alphabet (lower-case letters, space, full stop).
PHOTOS = {"astronaut": "an astronaut.", "coffee": "a cup of coffee.", "chelsea": "a cat.", "rocket": "a rocket."}
STEPS = 10
VQ_SIDE = VQ_DDCONFIG["resolution"] // 2 ** (len(VQ_DDCONFIG["ch_mult"]) - 1)  # 8x8 codes per image


def run_program(module: str, *args: str) -> str:
    """`python -m chameleon_jax.<module> ARGS` as a user runs it; its stdout (fails with its stderr's tail)."""
    proc = subprocess.run([sys.executable, "-m", f"chameleon_jax.{module}", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, f"{module} exited {proc.returncode}:\n{proc.stderr[-4000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("release_to_hf")


@pytest.fixture(scope="module")
def export(work):
    """Steps 1-2: the synthetic release, converted through the CLI's main."""
    build_release(work / "release")
    convert_main(["--from", "meta", "--src", str(work / "release"), "--out", str(work / "export")])
    return work / "export"


@pytest.fixture(scope="module")
def photos(work):
    """The photographs as PNG files (shrunk to 64 px on the long side: pretokenize still crops and resizes
    them to the VQ-GAN's 16 px) and a captions JSONL naming them."""
    import skimage.data
    from PIL import Image

    folder = work / "photos"
    folder.mkdir()
    lines = []
    for name, caption in PHOTOS.items():
        shipped = list(Path(skimage.data.__file__).parent.glob(f"{name}.*"))
        assert shipped, f"{name}: not in the scikit-image wheel (it would be downloaded)"
        image = Image.fromarray(getattr(skimage.data, name)())
        image.thumbnail((64, 64))
        image.save(folder / f"{name}.png")
        lines.append(json.dumps({"image": f"{name}.png", "caption": caption}))
    (folder / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="module")
def tokens(export, photos, work):
    """Step 3: caption-then-image documents (text-to-image), the export as VQ-GAN and tokenizer."""
    out = run_program("pretokenize", "--input", str(photos / "captions.jsonl"), "--out", str(work / "tokens"),
                      "--vqgan", str(export), "--image_first_fraction", "0")
    assert "4 documents" in out, out
    return work / "tokens"


def documents(tokens_dir) -> list[np.ndarray]:
    """The pretokenized documents, in shard order."""
    import grain

    from chameleon_jax.data import records, shards

    source = grain.sources.ArrayRecordDataSource(list(shards.read_source(str(tokens_dir)).shards))
    return [records.deserialize(source[i])["tokens"] for i in range(len(source))]


@pytest.fixture(scope="module")
def finetuned(export, tokens, work):
    """Step 4: the Anole preset (only the head's image-code rows train) from the export, on the photographs.
    The model's shape and loss.image_ids come from the export's config.json (the preset's tiny model differs),
    and the preset's rows (image+1) follow those ids."""
    run_program("train", "--config", "experiments/anole_7b.py:tiny", "--workdir", str(work / "run"),
                f"--config.init.checkpoint={export}",
                "--config.data.kind=tokens", f"--config.data.train_shards={tokens}",
                # every step sees all four documents (one per 96-token row: 1 + caption + 66 image + 1)
                "--config.train.batch_size=4", "--config.train.seq_len=96",
                f"--config.train.steps={STEPS}", "--config.train.log_every=5", "--config.train.eval_every=0",
                f"--config.checkpoint.every={STEPS}")
    return work / "run"


def restored(path):
    """(model config, params) of a workdir's latest checkpoint or an export, on one device."""
    from chameleon_jax import checkpoint as ckpt
    from chameleon_jax.evals.checkpoint import restore_for_eval
    from chameleon_jax.model import sharding as shd

    config = ckpt.read_config(str(path))
    config.mesh.update(data=1, fsdp=1, tensor=1)
    params, cfg, _ = restore_for_eval(str(path), config, shd.make_mesh(config.mesh, jax.devices()[:1]))
    return cfg, jax.tree.map(np.asarray, params)


@pytest.fixture(scope="module")
def released(export):
    return restored(export)


@pytest.fixture(scope="module")
def tuned(finetuned):
    return restored(finetuned)


@pytest.fixture(scope="module")
def forward(released):
    """Our fp32 logits [B, T, V] of unpadded rows, one compiled function for both param sets."""
    from chameleon_jax import model as M

    cfg = released[0]
    graphdef, _ = M.abstract(cfg)
    fn = jax.jit(lambda p, t: M.bind(graphdef, p).logits(
        t, jax.numpy.ones_like(t), jax.numpy.broadcast_to(jax.numpy.arange(t.shape[1]), t.shape)))
    return lambda params, tokens: np.asarray(fn(params, jax.numpy.asarray(tokens, jax.numpy.int32)))


def image_nll(forward, params, docs, image_ids) -> float:
    """Mean next-token NLL over the documents' image-code targets (teacher forcing). The documents are
    padded at the end to one length: attention is causal, so the padding changes no earlier logit."""
    length = max(len(d) for d in docs)
    batch = np.stack([np.pad(d, (0, length - len(d)), constant_values=d[-1]) for d in docs])
    logits = forward(params, batch)[:, :-1].astype(np.float64)
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    total, count = 0.0, 0
    for row, doc in enumerate(docs):
        target = doc[1:]
        on_image = (target >= image_ids[0]) & (target < image_ids[1])
        total -= logp[row, np.arange(len(target)), target][on_image].sum()
        count += on_image.sum()
    assert count == len(docs) * VQ_SIDE ** 2
    return total / count


def test_pretokenized_photographs_are_caption_then_image(export, tokens):
    from chameleon_jax import text

    tok = text.load(str(export))
    docs = documents(tokens)
    assert len(docs) == len(PHOTOS)
    vocab = tok.vocab
    captions = [tok.encode(c).tolist() for c in PHOTOS.values()]
    for doc in docs:
        boi = int(np.flatnonzero(doc == vocab.begin_image)[0])
        codes = doc[boi + 1:boi + 1 + VQ_SIDE ** 2]
        assert doc[boi + 1 + VQ_SIDE ** 2] == vocab.end_image
        assert ((codes >= vocab.image_start) & (codes < vocab.image_start + N_EMBED)).all()
        assert doc[1:boi].tolist() in captions  # the caption comes first, intact
    # Different photographs, different codes: the VQ-GAN saw the pixels, not a constant.
    assert len({d[-VQ_SIDE ** 2 - 2:].tobytes() for d in docs}) == len(docs)


def test_anole_finetune_trains_only_the_image_rows(export, finetuned, released, tuned):
    metrics = [json.loads(line) for line in (finetuned / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == STEPS and all(np.isfinite(m["train/loss"]) for m in metrics)

    (_, before), (_, after) = released, tuned
    start, stop = json.loads((export / "config.json").read_text())["loss"]["image_ids"]
    trained = slice(start, stop + 1)  # image codes and the end-of-image token (Anole's rows)
    out_before, out_after = before["output"], after["output"]
    moved = (out_before != out_after).any(axis=0)  # per vocabulary column of the [D, V] kernel
    assert moved[trained].all(), f"{(~moved[trained]).sum()} image rows did not train"
    assert not moved[:start].any() and not moved[stop + 1:].any(), "a text row of the head changed"
    assert jax.tree.structure(after) == jax.tree.structure(before)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(before), jax.tree.leaves(after)):
        if jax.tree_util.keystr(path) != "['output']":
            np.testing.assert_array_equal(y, x, err_msg=f"frozen {jax.tree_util.keystr(path)} changed")


def test_finetune_lowers_the_image_loss_on_the_photographs(export, tokens, released, tuned, forward):
    image_ids = json.loads((export / "config.json").read_text())["loss"]["image_ids"]
    docs = documents(tokens)
    nll_before, nll_after = (image_nll(forward, p, docs, image_ids) for p in (released[1], tuned[1]))
    print(f"image-token NLL on the 4 photographs: {nll_before:.3f} -> {nll_after:.3f} after {STEPS} steps")
    # Measured: 11.59 -> 11.36. The run is deterministic (same four documents in every batch, CPU), so the
    # drop is the optimizer's doing; 0.1 is under half of it. A fine-tune whose rows moved the wrong way or
    # missed the image rows, or a run that started from a fresh init instead of the export (the
    # finetuned params would then not share the export's frozen bits either) fails here.
    assert nll_after < nll_before - 0.1


def test_generates_an_image_and_a_caption(export, photos, finetuned, work):
    from PIL import Image

    prompts = work / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "a cat.", "mode": "image"}) + "\n"
                       + json.dumps({"prompt": "<image>", "images": [str(photos / "chelsea.png")],
                                     "mode": "text"}) + "\n")
    # No --tokenizer / --vqgan: the run's init.checkpoint is the export, which holds both.
    run_program("generate", "--workdir", str(finetuned), "--prompts", str(prompts), "--out", str(work / "gen"),
                "--max_new_tokens", "80", "--seed", "0")
    answers = {a["mode"]: (p.parent, a) for p in (work / "gen").rglob("output.json")
               for a in [json.loads(p.read_text())]}
    assert sorted(answers) == ["image", "text"], answers
    folder, image_answer = answers["image"]
    images = [s for s in image_answer["segments"] if "image" in s]
    assert len(images) == 1, image_answer["segments"]
    png = Image.open(folder / images[0]["image"])
    assert png.size == (VQ_DDCONFIG["resolution"],) * 2  # decoded by the export's VQ-GAN
    assert np.asarray(png).std() > 0  # pixels, not a blank
    assert np.asarray(images[0]["codes"]).shape == (VQ_SIDE, VQ_SIDE)
    _, text_answer = answers["text"]
    caption = "".join(s.get("text", "") for s in text_answer["segments"])
    assert caption.strip() and not any("image" in s for s in text_answer["segments"]), text_answer["segments"]
    print(f"caption of chelsea.png: {caption[:60]!r}...")


def test_hf_export_of_the_finetuned_run_matches_ours(tokens, finetuned, released, tuned, forward, work):
    convert_main(["--to", "hf", "--src", str(finetuned), "--out", str(work / "hf")])
    hf, info = transformers.ChameleonForConditionalGeneration.from_pretrained(
        work / "hf", output_loading_info=True, attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"]  # the VQ-GAN came from init.checkpoint
    hf = hf.float().eval()

    cfg = tuned[0]
    docs = documents(tokens)
    length = min(len(d) for d in docs)
    batch = np.stack([d[:length] for d in docs])  # real documents: caption, begin-image, codes, ...
    ours = forward(tuned[1], batch)
    ref = _hf_logits(hf, batch)
    diff = np.abs(ours - ref).max()
    print(f"max |logits diff| ours vs HF export of the fine-tuned run: {diff:.2e} (logits std {ref.std():.2f})")
    assert ref.std() > 0.5  # logits carry signal, so the tolerance is meaningful
    # fp32 on both sides, sums in different orders. Along one logit's path the contraction lengths add to
    # n ~ 1,100 here (tests/numerics.py: 2 layers, d 32, context ~80). Random-sign rounding errors grow like
    # sqrt(n)*u per side: 2*sqrt(n)*2^-24*max|logit| ~ 1e-5 for |logit| <= ~4, so 1e-4 leaves a margin of ~10;
    # the any-order worst case 2*gamma(n)*max|logit| (chain_tol) is the bound when it is tighter.
    assert diff <= min(1e-4, chain_tol(ref, transformer_lengths(cfg, context=length))), diff
    # The fine-tuned rows travelled: HF's head scores the image codes as ours does after training, not as
    # the release did.
    assert np.abs(forward(released[1], batch) - ref).max() > 1e-2
