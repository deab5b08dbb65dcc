"""A built-in, deterministic and learnable token source: no files, no tokenizer, exact resume.

Each row of `seq_len` tokens packs whole documents of two kinds (in the `custom` vocabulary layout of
`chameleon_jax.vocab`, sized from the model's vocab and the image-id range):

- counting text: `<s> a a+d a+2d ... </s>` over the text ids, so every token after the second is
  predictable from the two before it;
- captioned image: `<s> c <begin-image> m0 m1 m2 m3 m0 m1 ... <end-image> </s>`, where the 4-code motif
  m is a fixed function of the caption token c, so the image codes are predictable from the caption.

Rows are a pure function of (seed, row index), so a Grain `MapDataset` over them resumes exactly
from its iterator state (`{"next_index": i}`), workers or not. With `answer_only=True` the loss mask
covers only the "answer" of each document (the image block; the second half of a count), as in SFT.

    it = make_iterator(config.data, batch_size=8, seq_len=64, image_ids=(4, 260), vocab_size=1024)
    batch = next(it)   # dict of int32 [8 / process_count, 64]: tokens, segment_ids, positions, loss_mask
"""
from __future__ import annotations

import grain
import ml_collections
import numpy as np

from chameleon_jax import vocab as vocab_lib

_MOTIF = 4  # codes in an image motif
_ROWS = 2**40  # virtually unbounded; rows are generated on demand


def default_config() -> ml_collections.ConfigDict:
    """The `config.data` block for `kind="synthetic"`."""
    return ml_collections.ConfigDict(dict(
        kind="synthetic",
        seed=0,               # eval uses a different seed: held-out rows
        image_fraction=0.5,   # share of documents that are captioned images
        image_side=4,         # images are side x side codes
        answer_only=False,    # SFT-style loss mask: answers only
    ))


def synthetic_vocab(vocab_size: int, image_ids: tuple[int, int]) -> vocab_lib.Vocab:
    start, stop = image_ids
    if start != 4:
        raise ValueError(f"the synthetic source uses the custom layout with image codes from id 4; "
                         f"got loss.image_ids={tuple(image_ids)}")
    text_pieces = vocab_size - (stop + 3)
    if text_pieces < 16:
        raise ValueError(f"vocab_size={vocab_size} leaves {text_pieces} text ids after the image block "
                         f"{tuple(image_ids)}; use a vocab of at least {stop + 3 + 16}")
    return vocab_lib.custom(text_pieces, stop - start)


class SyntheticRows:
    """Random-access source: row index -> packed row (dict of int32 [seq_len])."""

    def __init__(self, vocab: vocab_lib.Vocab, seq_len: int, seed: int, image_fraction: float = 0.5,
                 image_side: int = 4, answer_only: bool = False):
        self.vocab, self.seq_len, self.seed = vocab, int(seq_len), int(seed)
        self.image_fraction, self.image_side, self.answer_only = float(image_fraction), int(image_side), answer_only
        if self.image_side ** 2 + 5 > self.seq_len:
            raise ValueError(f"image_side={image_side} needs {image_side ** 2 + 5} tokens per image document; "
                             f"seq_len={seq_len} is too short")

    def __len__(self) -> int:
        return _ROWS

    def __repr__(self) -> str:  # Grain validates sources by repr; keep it stable
        return (f"SyntheticRows(vocab={self.vocab.name}, seq_len={self.seq_len}, seed={self.seed}, "
                f"image_fraction={self.image_fraction}, image_side={self.image_side}, answer_only={self.answer_only})")

    def _counting(self, rng, max_len: int) -> tuple[list[int], int]:
        v, n = self.vocab, self.vocab.size - self.vocab.text_start
        length = int(rng.integers(6, max(7, min(max_len, 24) - 1)))
        a, d = int(rng.integers(n)), int(rng.integers(1, 8))
        body = [v.text_start + (a + i * d) % n for i in range(length - 2)]
        return [v.bos, *body, v.eos], 1 + (length - 2) // 2  # answer: second half of the count

    def _image(self, rng) -> tuple[list[int], int]:
        v, n = self.vocab, self.vocab.size - self.vocab.text_start
        c = int(rng.integers(n))
        motif = [(c * 7 + j * 31) % v.image_codes for j in range(_MOTIF)]
        codes = np.resize(np.asarray(motif), self.image_side ** 2)
        return [v.bos, v.text_start + c, *v.image_block(codes).tolist(), v.eos], 2  # answer: the image

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, int(index)])
        L, v = self.seq_len, self.vocab
        tokens = np.full(L, v.pad, np.int32)
        seg, pos, mask = (np.zeros(L, np.int32) for _ in range(3))
        at, doc = 0, 0
        while True:
            room = L - at
            if rng.random() < self.image_fraction:
                ids, answer_from = self._image(rng)
            else:
                ids, answer_from = self._counting(rng, room)
            if len(ids) > room:
                break
            doc += 1
            n = len(ids)
            tokens[at:at + n], seg[at:at + n], pos[at:at + n] = ids, doc, np.arange(n)
            mask[at + (answer_from if self.answer_only else 0):at + n] = 1
            at += n
        return {"tokens": tokens, "segment_ids": seg, "positions": pos, "loss_mask": mask}


def make_dataset(data_config, *, batch_size: int, seq_len: int, image_ids, vocab_size: int,
                 process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
    """Host-local batches (batch_size is global; this host yields batch_size / process_count rows)."""
    if batch_size % process_count:
        raise ValueError(f"batch_size={batch_size} is not divisible by the {process_count} processes")
    rows = SyntheticRows(synthetic_vocab(vocab_size, image_ids), seq_len, data_config.get("seed", 0),
                         data_config.get("image_fraction", 0.5), data_config.get("image_side", 4),
                         bool(data_config.get("answer_only", False)))
    ds = grain.MapDataset.source(rows).slice(slice(process_index, None, process_count))
    # A row costs ~0.15 ms: two threads 16 batches ahead keep up with any step. Grain's default
    # (16 threads, 500 batches ahead) built thousands of rows a short run never reads, competing for the
    # GIL with tracing and the step.
    return ds.batch(batch_size // process_count, drop_remainder=True).to_iter_dataset(
        grain.ReadOptions(num_threads=2, prefetch_buffer_size=16))


def make_iterator(data_config, **kw) -> grain.DatasetIterator:
    """A resumable iterator: `get_state()`/`set_state()` or `grain.checkpoint.CheckpointSave(it)`."""
    return iter(make_dataset(data_config, **kw))
