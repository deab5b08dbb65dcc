"""`python -m chameleon_jax.generate` as users run it: a JSONL batch of prompts, text streamed as it is
produced, answers on an HTML page checked in headless Chromium, and a sharded mesh that gives the same
tokens as one device. The checkpoint is a tiny 34B-shaped model (experiments/tiny.py:gqa: 2 kv heads
for 4 query heads, 2 QK-norm groups, swin block order) with a tiny VQ-GAN and tokenizer beside it."""
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from chameleon_jax import checkpoint as ckpt
from chameleon_jax import config as config_lib
from chameleon_jax import model as model_lib
from chameleon_jax import text as text_lib
from chameleon_jax import vocab as vocab_lib
from chameleon_jax.convert import release
from chameleon_jax.generate.answer import Decoding, Request, load
from chameleon_jax.generate.streaming import TextStream
from chameleon_jax.vqgan import checkpoint as vq_checkpoint
from chameleon_jax.vqgan import model as vq_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST_COMPILE = {"xla_backend_optimization_level": 0}
# 16 px images -> 4x4 codes of 16: an image answer is 16 codes + end-image.
VQ = vq_model.VQGANConfig(resolution=16, ch=32, ch_mult=(1, 1, 1), num_res_blocks=1, z_channels=8, embed_dim=8,
                          n_embed=16)
WORDS = ("the red circle sits on a blue square near the green line while a small yellow star "
         "shines over the grey hill and the orange sun sets behind the white house").split()


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    return make_export(tmp_path_factory.mktemp("gen"))


def make_export(root):
    """A params export with its VQ-GAN bundled (OUT/vqgan) and its tokenizer named in config.generate."""
    lines = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))]
    sp = text_lib.train_sentencepiece(lines, str(root / "tok" / "sp"), vocab_size=320, num_threads=1)
    tok = text_lib.load(sp, image_codes=VQ.n_embed)
    spec = importlib.util.spec_from_file_location("tiny", os.path.join(REPO, "experiments", "tiny.py"))
    tiny = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tiny)
    config = tiny.get_config("gqa")
    config.model.vocab_size = -(-tok.vocab.size // 8) * 8  # divisible by any tensor size up to 8
    config.generate = {"tokenizer": sp}
    model_cfg = config_lib.validate(config)
    assert model_cfg.n_kv_heads < model_cfg.n_heads and model_cfg.qk_norm_groups > 1
    assert model_cfg.block_order == "swin"
    params = model_lib.init_params(model_cfg, jax.random.PRNGKey(3))
    out = root / "export"
    ckpt.export_params(params, str(out), config)
    release.save_vqgan(out, VQ, vq_checkpoint.random_params(VQ, seed=1))
    return out


def test_sharded_mesh_gives_the_same_tokens_as_one_device(export):
    """A (2, 2, 2) data/FSDP/tensor mesh over the 8 fake devices against one device, greedy.

    Exact token equality is the claim. The meshes sum the FSDP- and tensor-split contractions in another
    order, so the logits differ by rounding (fp32, ~1e-6 relative here); a greedy pick can only change
    where the top two logits are closer than that, which random tiny weights over a ~340-id vocab make
    unlikely, and the fixed weights and prompts make the outcome deterministic, not flaky."""
    requests = [Request("the red circle", mode="text", label=1), Request("a blue", mode="text", label=2),
                Request("green line while", mode="text", label=3)]
    decoding = Decoding(max_new_tokens=12)
    got = {}
    for mesh, devices in (((2, 2, 2), jax.devices()), ((1, 1, 1), jax.devices()[:1])):
        loaded = load(str(export), mesh=mesh, devices=devices)
        if mesh == (2, 2, 2):  # the params really are split: an FSDP and a tensor-parallel kernel
            out_kernel = loaded.params["output"]
            assert len(out_kernel.sharding.device_set) == 8
            assert out_kernel.addressable_shards[0].data.size * 4 == out_kernel.size
        from chameleon_jax.generate.answer import generate_batch, prompt_ids

        ids = [prompt_ids(loaded, r) for r in requests]
        # 3 prompts are padded to 4 rows, a multiple of data x fsdp.
        _, result = generate_batch(loaded, requests, ids, decoding, compiler_options=FAST_COMPILE)
        got[mesh] = result.tokens[:3]
    np.testing.assert_array_equal(got[(2, 2, 2)], got[(1, 1, 1)])
    assert (got[(1, 1, 1)] != got[(1, 1, 1)][:1]).any()  # the prompts lead to different answers


def _run_program(args, tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    env.pop("JAX_NUM_CPU_DEVICES", None)
    proc = subprocess.run([sys.executable, "-m", "chameleon_jax.generate", *args], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def answered(export, tmp_path_factory):
    """The program on a JSONL batch: two good text prompts, an image prompt with an input image, and
    three bad lines (not JSON, no prompt, a missing image), one of them between the good ones."""
    root = tmp_path_factory.mktemp("answers")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 24, 3), np.uint8)).save(root / "in.png")
    lines = [json.dumps({"prompt": "the red <b>circle</b> & co", "mode": "text"}),
             "{not json",
             json.dumps({"prompt": "<image> a small star", "images": ["in.png"], "mode": "image"}),
             json.dumps({"text": "no prompt here"}),
             "",
             json.dumps({"prompt": "a blue", "mode": "text"}),
             json.dumps({"prompt": "a grey hill", "images": ["missing.png"]})]
    (root / "prompts.jsonl").write_text("\n".join(lines) + "\n")
    out = root / "out"
    stdout = _run_program([f"--checkpoint={export}", "--prompts=prompts.jsonl", f"--out={out}", "--mesh=1,1,1",
                           "--max_new_tokens=20", "--batch_size=4", "--stream_every=8"], root)
    return out, stdout


def test_a_jsonl_batch_answers_every_good_line_and_counts_the_bad(answered):
    out, stdout = answered
    assert "skipped line 2: not JSON" in stdout
    assert 'skipped line 4: not an object with a "prompt" string' in stdout
    assert "skipped line 7: image not found" in stdout
    assert stdout.rstrip().endswith("wrote %s/index.html: 3 answer(s), 1 image(s), 3 skipped" % out), stdout
    # Text answers stream as whole lines prefixed by their line number (a batch of two text prompts).
    # Split on "\n" only: a random model's byte pieces include characters str.splitlines breaks at.
    for n in (1, 6):
        record = json.loads((out / str(n) / "output.json").read_text())
        streamed = "\n".join(line[len(f"[{n}] "):] for line in stdout.split("\n") if line.startswith(f"[{n}] "))
        text = "".join(p.get("text", "") for p in record["segments"])
        assert text and streamed == text, (streamed, text)
    assert "\n[3] <image>" in stdout  # a batch of one is still labelled; its prompt opened the image
    image_answer = json.loads((out / "3" / "output.json").read_text())
    assert image_answer["segments"][0]["image"] == "image_1.png"  # an image answer opens with its image
    page = (out / "index.html").read_text()
    assert "the red &lt;b&gt;circle&lt;/b&gt; &amp; co" in page and "<b>circle" not in page
    assert page.index('id="answer-1"') < page.index('id="answer-3"') < page.index('id="answer-6"')
    assert 'src="3/image_1.png"' in page


def _screenshot(page, tmp_path, name):
    """The page as headless Chromium draws it (800x1000 CSS px at scale 1), as an RGB array."""
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("chromium is not installed; install it with `apt-get install -y chromium` (Debian), "
                    "as .ci/run does")
    shot = tmp_path / f"{name}.png"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    "--force-device-scale-factor=1", "--force-color-profile=srgb", "--window-size=800,1000",
                    f"--screenshot={shot}", f"file://{page}"], capture_output=True, timeout=120,
                   check=True)
    return np.asarray(Image.open(shot).convert("RGB")).astype(np.int16)


def _find(shot, image, scale, tol=6):
    """Top-left (y, x) where `image`, enlarged `scale` times by pixel repetition, appears in `shot` (every
    channel within `tol`, for any colour rounding in the browser), or None."""
    big = np.repeat(np.repeat(image.astype(np.int16), scale, 0), scale, 1)
    h, w = big.shape[:2]
    # Anchor on the image's most saturated pixel, which the page's text and backgrounds do not have.
    flat = image.reshape(-1, 3).astype(np.int16)
    k = int(np.argmax(flat.max(1) - flat.min(1)))
    oy, ox = (k // image.shape[1]) * scale, (k % image.shape[1]) * scale
    ys, xs = np.nonzero(np.all(np.abs(shot - flat[k]) <= tol, axis=-1))
    for y, x in zip(ys - oy, xs - ox):
        if 0 <= y <= shot.shape[0] - h and 0 <= x <= shot.shape[1] - w:
            if np.abs(shot[y:y + h, x:x + w] - big).max() <= tol:
                return int(y), int(x)
    return None


def test_the_page_shows_the_text_and_the_decoded_images_in_chromium(answered, tmp_path):
    from chameleon_jax.generate import page

    out, _ = answered
    decoded = np.asarray(Image.open(out / "3" / "image_1.png").convert("RGB"))
    assert decoded.std() > 20  # a random VQ-GAN's decode is a colourful patch, not a flat one
    shot = _screenshot(out / "index.html", tmp_path, "page")
    assert (shot.min(-1) < 128).sum() > 2000, "the page rendered blank"  # text is dark on white
    where = _find(shot, decoded, page.SCALE)
    assert where is not None, "the decoded image is not on the rendered page"
    # ... below the image prompt's heading and above the next answer: the dark rows of text on both sides.
    dark_rows = np.nonzero((shot.min(-1) < 100).any(1))[0]
    assert dark_rows.min() < where[0] and dark_rows.max() > where[0] + decoded.shape[0] * page.SCALE
    # The check can fail: the same page with the image's src pointing nowhere renders no image.
    broken = tmp_path / "broken.html"
    html_text = (out / "index.html").read_text()
    broken.write_text(html_text.replace('src="3/image_1.png"', 'src="3/no_such_image.png"'))
    shutil.copytree(out / "3", tmp_path / "3")
    assert _find(_screenshot(broken, tmp_path, "broken"), decoded, page.SCALE) is None


def test_stream_prints_steps_in_order_and_matches_the_answer():
    """Steps may reach the host out of order; one prompt prints like TextStreamer (words as they
    complete), several print whole lines with their labels."""
    vocab = vocab_lib.custom(text_pieces=26, image_codes=4)
    letters = {vocab.text_start + i: chr(ord("a") + i) for i in range(26)}
    # 'z' stands for a space, 'y' for a newline.
    decode = lambda ids: "".join(letters[i] for i in ids).replace("z", " ").replace("y", "\n")
    row = [vocab.text_start + i for i in (0, 1, 25, 2, 24, 3)] + [vocab.begin_image, 4, 5, vocab.end_image,
                                                                  vocab.text_start + 4, vocab.eos]
    one = io.StringIO()
    stream = TextStream(decode, vocab, [1], one)
    steps = list(enumerate(row))
    for i, t in steps[1:2] + steps[:1] + steps[2:]:  # step 1 arrives first
        stream.put(i, np.array([t]))
        if i == 2:
            assert one.getvalue() == "ab "  # the word is out before decoding ends
    stream.end()
    assert one.getvalue() == "ab c\nd<image>e\n"
    many = io.StringIO()
    stream = TextStream(decode, vocab, [5, 9], many)
    for i, t in enumerate(row):
        stream.put(i, np.array([t, vocab.text_start + 7]))  # row 1 writes 'h' every step
    stream.end()
    assert many.getvalue() == "[5] ab c\n[5] d<image>e\n[9] hhhhhhhhhhhh\n"
