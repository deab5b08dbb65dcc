"""Text tokenizers: our sentencepiece BPE with reserved specials, and the official Chameleon JSON."""
import os
import subprocess
import sys

import numpy as np
import pytest

from chameleon_jax import text, vocab as V
from chameleon_jax.data import corpora


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
    prefix = str(tmp_path_factory.mktemp("spm") / "bpe")
    lines = [d["text"] for d in corpora.pydoc_documents()][:300]
    return text.train_sentencepiece(lines, prefix, vocab_size=600)


def test_sentencepiece_round_trip_in_the_text_block(spm_model):
    tok = text.load(spm_model, image_codes=256)
    s = "The with statement wraps a block; résumé ☃ 42."
    ids = tok.encode(s)
    assert tok.decode(ids) == s
    assert ids.dtype == np.int32 and np.all(tok.vocab.modality(ids) == V.TEXT)
    assert tok.vocab.image_codes == 256 and tok.vocab.size == 4 + 256 + 3 + (600 - 7)


def test_special_names_in_raw_text_never_become_specials(spm_model):
    tok = text.load(spm_model, image_codes=256)
    ids = tok.encode("<begin_image> <end_turn> </s>")
    assert not np.any(tok.vocab.is_special(ids))


def test_a_model_without_reserved_specials_is_rejected(tmp_path):
    import sentencepiece as spm

    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(d["text"] for d in list(corpora.pydoc_documents())[:100]))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "plain"), vocab_size=300,
                                   model_type="bpe", minloglevel=2)
    with pytest.raises(ValueError, match="python -m chameleon_jax.text train"):
        text.load(str(tmp_path / "plain.model"), image_codes=16)


def test_training_cli_writes_a_loadable_model(tmp_path):
    src = tmp_path / "docs.jsonl"
    src.write_text('{"text": "a red circle at the top left"}\n{"caption": "a small blue square"}\nnot json\n')
    r = subprocess.run([sys.executable, "-m", "chameleon_jax.text", "train", f"--input={src},pydoc",
                        f"--model_prefix={tmp_path}/m", "--vocab_size=400", "--image_codes=64"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    tok = text.load(str(tmp_path / "m.model"), image_codes=64)
    assert tok.decode(tok.encode("a small blue square")) == "a small blue square"


def _letters(code: int) -> str:
    return "".join(chr(ord("A") + int(d)) for d in str(code))


def _official_json(path, break_id=8197):
    from tokenizers import Tokenizer, models, pre_tokenizers

    names = ["<s>", "<pad>", "</s>", "<unk>"] + [f"IMGIMG{_letters(c)}Z" for c in range(8192)]
    names += ["<eoss>", "<racm3:break>"] + [f"<reserved{i:05d}>" for i in range(8194, 8706 + 1)]
    names += [f"w{i}" for i in range(65536 - len(names) - 2)] + ["hello", "world"]
    vocab = {n: i for i, n in enumerate(names)}
    vocab["<racm3:break>"], vocab["<eoss>"] = break_id, 8196 if break_id == 8197 else 8197
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))


def test_official_tokenizer_json_keeps_official_ids(tmp_path):
    _official_json(tmp_path / "text_tokenizer.json")
    tok = text.load(str(tmp_path / "text_tokenizer.json"))
    assert tok.vocab is V.CHAMELEON
    np.testing.assert_array_equal(tok.encode("hello world"), [65534, 65535])
    assert tok.decode([0, 65534, 8197, 4, 8196, 65535]) == "hello world"
    assert text.image_code_of_name("IMGIMGBCZ") == 12


def test_a_non_official_json_is_rejected(tmp_path):
    _official_json(tmp_path / "t.json", break_id=8196)
    with pytest.raises(ValueError, match="not the official Chameleon tokenizer"):
        text.load(str(tmp_path / "t.json"))
