"""Fit documents into `seq_len` rows: split long documents without cutting an image, then FirstFit-pack.

Rows follow docs/CONVENTIONS.md: tokens, segment_ids (1-based, 0 = padding), positions (restart per
segment) and loss_mask (0 on padding), all int32 [L].
"""
from __future__ import annotations

import logging
from typing import Any

import grain
import numpy as np

from chameleon_jax.vocab import Vocab

log = logging.getLogger(__name__)

SKIPPED: dict[str, int] = {}  # reason -> count, in this process (each worker process keeps its own)


def _image_spans(tokens: np.ndarray, vocab: Vocab) -> list[tuple[int, int]]:
    """[begin, end) of every begin-image … end-image block."""
    begins = np.flatnonzero(tokens == vocab.begin_image)
    ends = np.flatnonzero(tokens == vocab.end_image)
    spans, j = [], 0
    for b in begins:
        while j < len(ends) and ends[j] < b:
            j += 1
        e = ends[j] + 1 if j < len(ends) else len(tokens)  # an unterminated image runs to the end
        spans.append((int(b), int(e)))
    return spans


def split_document(tokens: np.ndarray, seq_len: int, vocab: Vocab) -> list[tuple[int, int]] | None:
    """Cut points [(start, stop), …] with every piece <= seq_len; None if an image alone exceeds seq_len.

    Pieces end at an image boundary when one lies in the window (the last such boundary, so pieces stay
    long); text-only stretches are cut at seq_len. An image is never cut.
    """
    n = len(tokens)
    if n <= seq_len:
        return [(0, n)]
    spans = _image_spans(tokens, vocab)
    if any(e - b > seq_len for b, e in spans):
        return None
    boundaries = sorted({c for b, e in spans for c in (b, e)} | {n})
    inside = np.zeros(n + 1, bool)  # inside[c]: a cut before token c would split an image
    for b, e in spans:
        inside[b + 1:e] = True
    pieces, start = [], 0
    while n - start > seq_len:
        window_end = start + seq_len
        at_images = [c for c in boundaries if start < c <= window_end]
        stop = at_images[-1] if at_images else window_end
        if inside[stop]:  # only possible without boundaries in the window; cannot happen, kept as a guard
            raise AssertionError(f"cut at {stop} would split an image")
        pieces.append((start, stop))
        start = stop
    pieces.append((start, n))
    return pieces


def record_skip(reason: str, detail: str) -> None:
    SKIPPED[reason] = SKIPPED.get(reason, 0) + 1
    count = SKIPPED[reason]
    if count <= 10 or count % 1000 == 0:
        log.warning("skipped a document (%s, %d so far): %s", reason, count, detail)


class SplitLongDocuments(grain.experimental.FlatMapTransform):
    """Document -> pieces that fit seq_len; documents with an image longer than seq_len are skipped."""

    def __init__(self, seq_len: int, vocab: Vocab, max_fan_out: int = 4096):
        self.seq_len, self.vocab, self.max_fan_out = seq_len, vocab, max_fan_out

    def flat_map(self, doc: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
        tokens = doc["tokens"]
        if len(tokens) == 0:
            record_skip("empty document", "0 tokens")
            return []
        pieces = split_document(tokens, self.seq_len, self.vocab)
        if pieces is None:
            longest = max(e - b for b, e in _image_spans(tokens, self.vocab))
            record_skip("image longer than seq_len",
                        f"an image block of {longest} tokens cannot fit seq_len={self.seq_len}; "
                        "raise seq_len or tokenize images at a lower resolution")
            return []
        return [{k: v[b:e] for k, v in doc.items()} for b, e in pieces]


def pack(ds: grain.IterDataset, seq_len: int, num_packing_bins: int, seed: int, pad_id: int) -> grain.IterDataset:
    """FirstFit packing of {tokens, loss_mask} pieces into rows in the CONVENTIONS batch format."""
    packed = grain.experimental.FirstFitPackIterDataset(
        ds, length_struct={"tokens": seq_len, "loss_mask": seq_len}, num_packing_bins=num_packing_bins,
        seed=seed, padding_struct={"tokens": pad_id, "loss_mask": 0})
    return packed.map(_to_row)


def _to_row(packed: dict[str, Any]) -> dict[str, np.ndarray]:
    segment_ids = np.asarray(packed["tokens_segment_ids"], np.int32)
    return {
        "tokens": np.asarray(packed["tokens"], np.int32),
        "segment_ids": segment_ids,
        "positions": np.asarray(packed["tokens_positions"], np.int32),
        "loss_mask": np.asarray(packed["loss_mask"], np.int32) * (segment_ids > 0),
    }
