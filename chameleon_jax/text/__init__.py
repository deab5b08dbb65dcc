"""Text tokenizers that speak unified-vocabulary ids: our sentencepiece BPE, or the official Chameleon JSON.

Train a BPE model (the official special tokens reserved at their ids):

    python -m chameleon_jax.text train --input corpus.txt,docs.jsonl --model_prefix out/spm \
        --vocab_size 4000 [--image_codes 1024]

`--input pydoc` uses the `pydoc_data.topics` text that ships with Python.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from typing import Iterable, Protocol, Sequence

import numpy as np

from chameleon_jax import vocab as vocab_lib

# sentencepiece ids 0..6; the three control symbols are never produced from raw text.
_SP_RESERVED = ("<s>", "<pad>", "</s>", "<unk>", "<end_image>", "<begin_image>", "<end_turn>")
_SP_FIRST_TEXT = len(_SP_RESERVED)


class TextTokenizer(Protocol):
    vocab: vocab_lib.Vocab

    def encode(self, text: str) -> np.ndarray: ...  # int32 unified ids, no <s>/</s>

    def decode(self, ids: Sequence[int]) -> str: ...


def train_sentencepiece(lines: Iterable[str], model_prefix: str, vocab_size: int, num_threads: int = 2) -> str:
    """Trains a BPE model with the specials reserved at sentencepiece ids 0..6; returns the .model path."""
    import sentencepiece as spm

    os.makedirs(os.path.dirname(os.path.abspath(model_prefix)), exist_ok=True)
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False, encoding="utf-8") as f:
        n = 0
        for line in lines:
            line = line.strip()
            if line:
                f.write(line + "\n")
                n += 1
        corpus = f.name
    if n == 0:
        raise ValueError("the tokenizer training input has no text; pass --input files with text lines "
                         "or JSONL documents (text/caption/content fields), or --input pydoc")
    try:
        spm.SentencePieceTrainer.train(
            input=corpus, model_prefix=model_prefix, model_type="bpe", vocab_size=vocab_size,
            bos_id=0, pad_id=1, eos_id=2, unk_id=3, control_symbols=list(_SP_RESERVED[4:]),
            character_coverage=1.0, byte_fallback=True, num_threads=num_threads, minloglevel=2,
            hard_vocab_limit=False)
    finally:
        os.unlink(corpus)
    return model_prefix + ".model"


class SentencePieceText:
    """Our BPE model, mapped into the `custom` layout: sentencepiece id s >= 7 -> text_start + s - 7."""

    def __init__(self, model_path: str, image_codes: int):
        import sentencepiece as spm

        if not os.path.exists(model_path):
            raise FileNotFoundError(f"no sentencepiece model at {model_path}; train one with "
                                    "`python -m chameleon_jax.text train --model_prefix ...`")
        self._sp = spm.SentencePieceProcessor(model_file=model_path)
        pieces = tuple(self._sp.id_to_piece(i) for i in range(_SP_FIRST_TEXT))
        if pieces != _SP_RESERVED:
            raise ValueError(f"{model_path} does not reserve the specials at ids 0..6 (found {pieces}); "
                             "retrain it with `python -m chameleon_jax.text train`")
        self.vocab = vocab_lib.custom(self._sp.vocab_size() - _SP_FIRST_TEXT, image_codes)
        v = self.vocab
        self._sp_to_unified = np.concatenate([
            np.array([v.bos, v.pad, v.eos, v.unk, v.end_image, v.begin_image, v.end_turn], np.int32),
            np.arange(v.text_start, v.size, dtype=np.int32)])
        self._unified_to_sp = np.full(v.size, 3, np.int32)  # image ids have no text form -> <unk>
        self._unified_to_sp[self._sp_to_unified] = np.arange(len(self._sp_to_unified), dtype=np.int32)

    def encode(self, text: str) -> np.ndarray:
        return self._sp_to_unified[np.asarray(self._sp.encode(text), np.int64)]

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [self._sp_to_unified[np.asarray(t, np.int64)] for t in self._sp.encode(texts)]

    def decode(self, ids: Sequence[int]) -> str:
        ids = np.asarray(ids, np.int64)
        ids = ids[(ids >= self.vocab.text_start) & (ids < self.vocab.size)]
        return self._sp.decode(self._unified_to_sp[ids].tolist())


_IMAGE_NAME = re.compile(r"^IMGIMG([A-J]+)Z$")


def image_token_name(code: int) -> str:
    """VQ code -> official image-token name (the inverse of `image_code_of_name`)."""
    return "IMGIMG" + "".join(chr(ord("A") + int(c)) for c in str(code)) + "Z"


def image_code_of_name(name: str) -> int | None:
    """Official image-token name -> VQ code: `IMGIMG` + letters A..J as decimal digits + `Z` (official vocab.py)."""
    m = _IMAGE_NAME.match(name)
    if not m:
        return None
    return int("".join(str(ord(c) - ord("A")) for c in m.group(1)))


class OfficialText:
    """The released `text_tokenizer.json` (HF `tokenizers`); its ids are already the `chameleon` layout."""

    _EXPECTED = {"<s>": 0, "<pad>": 1, "</s>": 2, "<eoss>": 8196, "<racm3:break>": 8197, "<reserved08706>": 8710}

    def __init__(self, json_path: str):
        try:
            import tokenizers
        except ImportError as e:
            raise ImportError("loading the official tokenizer needs HF tokenizers: pip install -e '.[tokenizers]'") from e
        if not os.path.exists(json_path):
            raise FileNotFoundError(f"no tokenizer JSON at {json_path}; it is tokenizer/text_tokenizer.json "
                                    "of the official Chameleon download")
        self._tok = tokenizers.Tokenizer.from_file(json_path)
        self.vocab = vocab_lib.CHAMELEON
        names = self._tok.get_vocab()
        for name, want in self._EXPECTED.items():
            if names.get(name) != want:
                raise ValueError(f"{json_path}: token {name!r} has id {names.get(name)}, the chameleon layout "
                                 f"needs {want}; this is not the official Chameleon tokenizer")
        for name, i in names.items():
            code = image_code_of_name(name)
            if code is not None and i != code + self.vocab.image_start:
                raise ValueError(f"{json_path}: image token {name} (code {code}) has id {i}, expected "
                                 f"{code + self.vocab.image_start}; the image block is not at ids 4..8195")

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, np.int32)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.asarray(e.ids, np.int32) for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids if not self.vocab.is_image(int(i)) and not self.vocab.is_special(int(i))]
        return self._tok.decode(ids, skip_special_tokens=False)


BUNDLED = "tokenizer/text_tokenizer.json"  # inside a converted Chameleon release (chameleon_jax.convert.release)


def load(path: str, image_codes: int | None = None) -> TextTokenizer:
    """A `.model` sentencepiece file (needs image_codes, the VQ codebook size), the official `.json`, or a
    converted release's export folder (its tokenizer/text_tokenizer.json)."""
    path = str(path)
    if os.path.isdir(path):
        bundled = os.path.join(path, BUNDLED)
        if not os.path.isfile(bundled):
            raise FileNotFoundError(f"{path} is a folder without {BUNDLED}; pass the tokenizer file itself "
                                    "(a sentencepiece .model or text_tokenizer.json)")
        path = bundled
    if path.endswith(".json"):
        return OfficialText(path)
    if image_codes is None:
        raise ValueError(f"loading {path} needs image_codes= the VQ-GAN codebook size, to size the image block")
    return SentencePieceText(path, image_codes)


def corpus_lines(inputs: Sequence[str]) -> Iterable[str]:
    """Text lines from .txt files, JSONL documents (every text/caption/content string) or `pydoc`."""
    for path in inputs:
        if path == "pydoc":
            from chameleon_jax.data import corpora

            yield from (d["text"] for d in corpora.pydoc_documents())
            continue
        if not os.path.exists(path):
            raise FileNotFoundError(f"tokenizer training input {path} does not exist; fix --input")
        with open(path, encoding="utf-8", errors="replace") as f:
            if not path.endswith(".jsonl"):
                yield from f
                continue
            for line in f:
                try:
                    yield from _strings(json.loads(line))
                except json.JSONDecodeError:
                    continue


def _strings(obj) -> Iterable[str]:
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k in ("text", "caption", "content") and isinstance(v, str):
                yield v
            else:
                yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)
