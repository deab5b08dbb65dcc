"""pretokenize: every input kind, bad input skipped with reasons, manifest, resume, host split, pipeline."""
import io
import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from chameleon_jax import pretokenize, text, vocab as V
from chameleon_jax.data import corpora, pipeline, readers, records, shards

SIDE = 8  # test images are 8x8; the stand-in encoder maps 4x4 patches to 2x2 codes


def load_image(ref):
    f = ref if isinstance(ref, str) else io.BytesIO(ref)
    with Image.open(f) as im:
        return np.asarray(im.convert("RGB").resize((SIDE, SIDE)), np.float32) / 127.5 - 1


class PatchEncoder:
    """Deterministic stand-in for the VQ-GAN (irrelevant to what these tests check): brightness of 4x4 patches."""

    def __init__(self, batch_size=None):
        self.calls, self.sizes = 0, []
        if batch_size:
            self.batch_size = batch_size

    def __call__(self, images):
        self.calls += 1
        self.sizes.append(len(images))
        patches = images.reshape(len(images), 2, SIDE // 2, 2, SIDE // 2, 3).mean(axis=(2, 4, 5))
        return np.clip(((patches + 1) / 2 * 16).astype(np.int32), 0, 15)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    prefix = str(tmp_path_factory.mktemp("tok") / "bpe")
    lines = [d["text"] for d in corpora.pydoc_documents()][:200] + ["a red circle at the top left"] * 20
    return text.load(text.train_sentencepiece(lines, prefix, vocab_size=400), image_codes=16)


def _png(path, color):
    Image.new("RGB", (SIDE * 2, SIDE), color).save(path)


@pytest.fixture
def raw(tmp_path):
    d = tmp_path / "raw"
    (d / "img").mkdir(parents=True)
    _png(d / "img/red.png", (255, 0, 0))
    _png(d / "img/blue.png", (0, 0, 255))
    (d / "img/corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    lines = [
        {"text": "The with statement."},
        {"image": "img/red.png", "caption": "a red square"},
        {"segments": [{"text": "first"}, {"image": "img/red.png"}, {"text": "then"}, {"image": "img/blue.png"}]},
        {"turns": [{"role": "user", "content": [{"image": "img/blue.png"}, {"text": "colour?"}]},
                   {"role": "assistant", "content": "blue"}]},
        "{not json",
        {"image": "img/missing.png", "caption": "gone"},
        {"image": "img/corrupt.png", "caption": "broken"},
        {"text": "   "},
        {"turns": [{"role": "user", "content": "only a question"}]},
    ]
    with open(d / "docs.jsonl", "w") as f:
        for x in lines:
            f.write((x if isinstance(x, str) else json.dumps(x)) + "\n")
    folder = d / "folder"
    folder.mkdir()
    _png(folder / "a.png", (0, 255, 0))
    (folder / "a.txt").write_text("a green square")
    _png(folder / "b.png", (9, 9, 9))  # no caption file
    buf = io.BytesIO()
    Image.new("RGB", (SIDE, SIDE), (255, 255, 0)).save(buf, format="PNG")
    with tarfile.open(d / "shard.tar", "w") as tar:
        for name, data in [("k1.png", buf.getvalue()), ("k1.txt", b"a yellow square")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return [str(d / "docs.jsonl"), str(folder), str(d / "shard.tar")]


def _run(raw, out, tokenizer, encoder=None, **kw):
    kw.setdefault("docs_per_shard", 4)
    return pretokenize.run(raw, str(out), tokenizer=tokenizer, encode_images=encoder or PatchEncoder(),
                           load_image=load_image, encode_batch=2, show_progress=False, **kw)


def _all_records(out):
    from array_record.python.array_record_module import ArrayRecordReader

    docs = []
    for p in shards.read_source(str(out)).shards:
        r = ArrayRecordReader(p)
        docs += [records.deserialize(x) for x in r.read_all()]
        r.close()
    return docs


def test_every_input_kind_becomes_records_and_bad_items_are_skipped_with_reasons(raw, tmp_path, tokenizer):
    m = _run(raw, tmp_path / "out", tokenizer)
    assert m["documents"] == 6  # text, pair, interleaved, sft, folder pair, tar pair
    reasons = m["skipped_by_reason"]
    assert sum(reasons.values()) == 6
    joined = " | ".join(f"{s['item']}: {s['reason']}" for s in m["skipped"])
    for expected in ["docs.jsonl:5: malformed JSON", "missing image file", "corrupt image", "docs.jsonl:8: empty document",
                     "docs.jsonl:9: empty document: an SFT", "no caption file b.txt"]:
        assert expected in joined, joined
    v = tokenizer.vocab
    docs = _all_records(tmp_path / "out")
    assert all(d["tokens"][0] == v.bos and d["tokens"][-1] == v.eos for d in docs)
    n_images = sum(int((d["tokens"] == v.begin_image).sum()) for d in docs)
    assert n_images == 1 + 2 + 1 + 1 + 1 and m["tokens"]["image"] == 4 * n_images
    sft = [d for d in docs if (d["tokens"] == v.end_turn).any()]
    assert len(sft) == 1 and tokenizer.decode(sft[0]["tokens"][sft[0]["loss_mask"] == 1]) == "blue"
    assert all(d["loss_mask"].all() for d in docs if d is not sft[0])


def test_an_image_longer_than_seq_len_is_skipped_at_pretokenize(raw, tmp_path, tokenizer):
    m = _run(raw, tmp_path / "out", tokenizer, seq_len=5)  # an image block here is 2*2+2 = 6 tokens
    assert any("cannot fit seq_len=5" in s["reason"] for s in m["skipped"])
    assert m["documents"] == 1  # only the text document is left


def test_rerun_skips_finished_shards_and_redoes_unfinished_ones(raw, tmp_path, tokenizer):
    out = tmp_path / "out"
    first = _run(raw, out, tokenizer)
    enc = PatchEncoder()
    assert _run(raw, out, tokenizer, encoder=enc) == first and enc.calls == 0
    sidecars = sorted(p for p in os.listdir(out) if p.endswith(".json") and p != "manifest.json")
    os.remove(out / sidecars[0])  # as if the run died while writing that shard
    assert _run(raw, out, tokenizer, encoder=enc) == first and enc.calls > 0


def test_hosts_split_the_work_disjointly(raw, tmp_path, tokenizer):
    whole = _run(raw, tmp_path / "whole", tokenizer)
    for i in range(2):
        _run(raw, tmp_path / "hosts", tokenizer, process_index=i, process_count=2)
    names = lambda d: sorted(p for p in os.listdir(d) if p.endswith(shards.RECORD_SUFFIX))
    assert names(tmp_path / "whole") == names(tmp_path / "hosts")
    merged = shards.write_manifest(str(tmp_path / "hosts"))
    assert merged["documents"] == whole["documents"] and merged["tokens"] == whole["tokens"]


def _pairs_jsonl(raw, n: int) -> str:
    """n image–caption pairs p0..p{n-1} (all the same red square) beside the raw inputs."""
    path = os.path.join(os.path.dirname(raw[0]), "pairs.jsonl")
    with open(path, "w") as f:
        f.writelines(json.dumps({"id": f"p{i}", "image": "img/red.png", "caption": "a red square"}) + "\n"
                     for i in range(n))
    return path


def test_pairs_flip_by_seed_and_key(raw, tmp_path, tokenizer):
    path = _pairs_jsonl(raw, 40)
    _run([path], tmp_path / "out", tokenizer, docs_per_shard=100, seed=3)
    v = tokenizer.vocab
    flips = [d["tokens"][1] == v.begin_image for d in _all_records(tmp_path / "out")]
    assert flips == [pretokenize.records.image_first(f"p{i}", 3) for i in range(40)]
    assert 0 < sum(flips) < 40


def test_pair_loss_target_trains_only_the_second_modality(raw, tmp_path, tokenizer):
    path = _pairs_jsonl(raw, 20)
    _run([path], tmp_path / "out", tokenizer, docs_per_shard=100, pair_loss="target")
    v = tokenizer.vocab
    for d in _all_records(tmp_path / "out"):
        trained = d["tokens"][d["loss_mask"] == 1]
        if d["tokens"][1] == v.begin_image:  # image first: only the caption and </s> are targets
            assert not v.is_image(trained).any() and v.begin_image not in trained and trained[-1] == v.eos
        else:  # caption first: the whole image block and </s>, no caption piece
            assert trained[0] == v.begin_image and v.is_image(trained[1:-2]).all() and trained[-1] == v.eos
    with pytest.raises(ValueError, match="pair_loss"):
        _run([path], tmp_path / "bad", tokenizer, pair_loss="second")


def test_images_are_encoded_in_the_encoders_own_batch_size(raw, tmp_path, tokenizer):
    # A jitted encoder pads every call to its batch; flushing earlier would mostly encode padding.
    enc = PatchEncoder(batch_size=3)
    pretokenize.run(raw[:1], str(tmp_path / "out"), tokenizer=tokenizer, encode_images=enc, load_image=load_image,
                    docs_per_shard=100, show_progress=False)  # one work unit: only its last call may be short
    assert len(enc.sizes) >= 2 and all(n >= 3 for n in enc.sizes[:-1]), enc.sizes


def test_missing_input_fails_clearly(tmp_path, tokenizer):
    with pytest.raises(FileNotFoundError, match="fix --input"):
        _run([str(tmp_path / "nope.jsonl")], tmp_path / "out", tokenizer)


def test_pretokenized_output_feeds_the_pipeline(raw, tmp_path, tokenizer):
    _run(raw, tmp_path / "out", tokenizer)
    c = pipeline.default_config()
    c.sources = {"raw": str(tmp_path / "out")}
    c.seq_len, c.global_batch_size = 32, 2
    it = pipeline.make_train_iterator(c, process_index=0, process_count=1)
    assert it.vocab == tokenizer.vocab
    b = next(it)
    assert b["tokens"].shape == (2, 32) and tokenizer.vocab.is_image(b["tokens"]).any()


VQGAN_CONFIG = '''
import ml_collections
def get_config(arg=None):
    return ml_collections.ConfigDict(dict(model=dict(resolution=32, ch=32, ch_mult=(1, 1, 2), num_res_blocks=1,
                                                     z_channels=32, embed_dim=32, n_embed=64)))
'''


def test_cli_pretokenizes_the_shapes_corpus_with_a_real_vqgan(tmp_path, tokenizer):
    import subprocess
    import sys

    raw = corpora.write_shapes(str(tmp_path / "shapes"), count=6)
    (tmp_path / "vqgan_tiny.py").write_text(VQGAN_CONFIG)
    spm = text.train_sentencepiece([d["text"] for d in corpora.pydoc_documents()][:100] +
                                   [json.loads(line)["caption"] for line in open(raw)], str(tmp_path / "spm"), 500)
    r = subprocess.run([sys.executable, "-m", "chameleon_jax.pretokenize", f"--input={raw}", f"--out={tmp_path}/tok",
                        f"--tokenizer={spm}", f"--vqgan_config={tmp_path}/vqgan_tiny.py", "--vqgan_random_init",
                        "--encode_batch=4"], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.load(open(tmp_path / "tok/manifest.json"))
    assert m["documents"] == 6 and not m["skipped"]
    assert m["tokens"]["image"] == 6 * 8 * 8  # 32 px / f=4 -> 8x8 codes per image
    v = V.Vocab(**m["vocab"])
    assert v.image_codes == 64
    for d in _all_records(tmp_path / "tok"):
        codes = d["tokens"][v.is_image(d["tokens"])]
        assert len(codes) == 64 and codes.min() >= v.image_start


def _answer_mask(tokens, v):
    """Independent reading of an SFT record: turns alternate user/assistant, each closed by <eot>; the
    answer tokens are an assistant turn's content, the <eot> closing it, and a </s> right after one."""
    mask, turn = np.zeros(len(tokens), np.int32), 0
    for i, t in enumerate(tokens):
        if t == v.bos:
            continue
        if t == v.eos:
            mask[i] = turn % 2 == 0 and turn > 0  # after an even number of turns the last was an answer
            continue
        mask[i] = turn % 2 == 1
        turn += t == v.end_turn
    return mask


def test_sft_conversations_train_on_answers_only_through_packing_and_the_train_step(tmp_path, tokenizer):
    """Pretokenize conversations, pack them with plain text, and follow the masks into the train step."""
    import jax

    from chameleon_jax import model as model_lib
    from chameleon_jax.config import base_config
    from chameleon_jax.train import optimizer, step as step_lib

    rng = np.random.default_rng(0)
    words = ["red", "circle", "top", "left", "blue", "with", "statement", "square", "green"]
    say = lambda n: " ".join(rng.choice(words, n))
    answers, lines = [], []
    for i in range(10):
        turns = []
        for _ in range(1 + i % 2):  # one or two exchanges
            answers.append(say(rng.integers(1, 4)))
            turns += [{"role": "user", "content": say(rng.integers(2, 6))}, {"role": "assistant", "content": answers[-1]}]
        lines.append({"turns": turns})
        lines.append({"text": say(8)})  # plain text between them: loss everywhere
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    _run([str(tmp_path / "chat.jsonl")], tmp_path / "out", tokenizer, docs_per_shard=100)
    v = tokenizer.vocab

    c = pipeline.default_config()
    c.kind, c.sources, c.seq_len, c.global_batch_size = "tokens", {"chat": str(tmp_path / "out")}, 128, 4
    batch = next(pipeline.make_train_iterator(c, process_index=0, process_count=1))
    conversations = 0
    for r in range(4):
        row = {k: x[r] for k, x in batch.items()}
        for s in np.unique(row["segment_ids"][row["segment_ids"] > 0]):
            doc, mask = row["tokens"][row["segment_ids"] == s], row["loss_mask"][row["segment_ids"] == s]
            assert doc[0] == v.bos and doc[-1] == v.eos, "a document was cut: raise seq_len"
            if (doc == v.end_turn).any():
                conversations += 1
                np.testing.assert_array_equal(mask, _answer_mask(doc, v))
                said = tokenizer.decode(doc[(mask == 1) & (doc != v.end_turn) & (doc != v.eos)])
                assert said.split() and all(w in words for w in said.split())
            else:
                assert mask.all()  # (<s> is never a target: it has no predecessor in its document)
    assert conversations >= 2 and 0 < batch["loss_mask"].sum() < (batch["segment_ids"] > 0).sum()

    # The train step counts exactly the answer targets that have a predecessor in their document.
    cfg = model_lib.ModelConfig(vocab_size=v.size, d_model=16, n_layers=1, n_heads=2, n_kv_heads=2,
                                head_dim=8, ffn_dim=32)
    tx = optimizer.make_optimizer(base_config().optimizer, 10)
    graphdef, _ = model_lib.abstract(cfg)
    state = step_lib.init_state(cfg, tx, jax.random.PRNGKey(0))
    image_ids = (v.image_start, v.image_start + v.image_codes)
    step = jax.jit(step_lib.make_train_step(graphdef, cfg, tx, step_lib.LossConfig(image_ids)))
    _, metrics = step(state, jax.device_put(batch))
    assert int(metrics["tokens"]) == int(batch["loss_mask"][batch["positions"] > 0].sum())
