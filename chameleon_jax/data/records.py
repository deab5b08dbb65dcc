"""Document formats -> token sequences in the unified vocabulary, and their on-disk record encoding.

Every sequence is `<s> … </s>`; every image is begin-image + codes + end-image (spec §5.1).

    text         <s> text </s>
    pair         <s> caption IMAGE </s>, or image-first <s> IMAGE caption </s> with probability 0.5,
                 decided by a hash of (seed, example key) so reruns give the same sequences (spec §3.2)
    interleaved  <s> seg_1 seg_2 … </s>, segments in their given order
    sft          <s> turn_1 <eot> turn_2 <eot> … </s>; loss only on assistant tokens, the <eot> that closes
                 an assistant turn, and a final </s> after one (spec §7.2)

A record holds int32 tokens and, for SFT (and pairs pretokenized with `pair_loss="target"`), a uint8 loss
mask (absent = loss everywhere).
"""
from __future__ import annotations

import dataclasses
import hashlib
import struct
from typing import Sequence, Union

import numpy as np

from chameleon_jax.vocab import Vocab


@dataclasses.dataclass(frozen=True)
class Image:
    codes: np.ndarray  # int32 VQ codes [h, w]


Segment = Union[np.ndarray, Image]  # a 1-D int32 array of text ids, or an image


@dataclasses.dataclass(frozen=True)
class Turn:
    role: str  # "user" | "assistant" (also accepted: "system"; only "assistant" carries loss)
    segments: Sequence[Segment]


def image_first(key: str, seed: int, fraction: float = 0.5) -> bool:
    """Deterministic coin per (seed, example key), heads with probability `fraction`: the image-first
    flip for pairs (0.5 = as often image→text as text→image)."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"image-first fraction {fraction} must lie in [0, 1]")
    digest = hashlib.blake2b(f"{seed}\x00{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0 ** 64 < fraction


def _ids(segment: Segment, vocab: Vocab) -> np.ndarray:
    if isinstance(segment, Image):
        return vocab.image_block(segment.codes)
    return np.asarray(segment, np.int32).reshape(-1)


def interleaved_tokens(segments: Sequence[Segment], vocab: Vocab) -> np.ndarray:
    body = [_ids(s, vocab) for s in segments]
    return np.concatenate([[vocab.bos], *body, [vocab.eos]]).astype(np.int32)


def text_tokens(text_ids: np.ndarray, vocab: Vocab) -> np.ndarray:
    return interleaved_tokens([text_ids], vocab)


def pair_tokens(caption_ids: np.ndarray, codes: np.ndarray, vocab: Vocab, *, is_image_first: bool) -> np.ndarray:
    segments = [Image(codes), caption_ids] if is_image_first else [caption_ids, Image(codes)]
    return interleaved_tokens(segments, vocab)


def pair_target_mask(caption_ids: np.ndarray, codes: np.ndarray, vocab: Vocab, *, is_image_first: bool) -> np.ndarray:
    """Loss mask for `pair_tokens` that trains only the second modality given the first (captioning or
    text-to-image, as in instruction tuning): <s> and the first segment carry no loss; the second segment
    and </s> do. The mask marks targets, so predicting the second segment's first token is trained."""
    first = vocab.image_block(codes) if is_image_first else np.asarray(caption_ids).reshape(-1)
    second = np.asarray(caption_ids).reshape(-1) if is_image_first else vocab.image_block(codes)
    return np.concatenate([np.zeros(1 + len(first), np.uint8), np.ones(len(second) + 1, np.uint8)])


def sft_tokens(turns: Sequence[Turn], vocab: Vocab) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, loss_mask): the mask marks the targets the model is trained to produce."""
    tokens, mask = [np.array([vocab.bos], np.int32)], [np.zeros(1, np.uint8)]
    for turn in turns:
        ids = np.concatenate([*(_ids(s, vocab) for s in turn.segments), [vocab.end_turn]]).astype(np.int32)
        tokens.append(ids)
        mask.append(np.full(len(ids), turn.role == "assistant", np.uint8))
    tokens.append(np.array([vocab.eos], np.int32))
    mask.append(np.array([bool(turns) and turns[-1].role == "assistant"], np.uint8))
    return np.concatenate(tokens), np.concatenate(mask)


_MAGIC = b"CJT1"
_HEADER = struct.Struct("<4sIB")  # magic, length, has_mask


def serialize(tokens: np.ndarray, loss_mask: np.ndarray | None = None) -> bytes:
    tokens = np.ascontiguousarray(tokens, dtype="<i4")
    parts = [_HEADER.pack(_MAGIC, len(tokens), loss_mask is not None), tokens.tobytes()]
    if loss_mask is not None:
        if len(loss_mask) != len(tokens):
            raise ValueError(f"loss_mask length {len(loss_mask)} != tokens length {len(tokens)}")
        parts.append(np.ascontiguousarray(loss_mask, dtype=np.uint8).tobytes())
    return b"".join(parts)


def deserialize(record: bytes) -> dict[str, np.ndarray]:
    """-> {"tokens": int32 [n], "loss_mask": int32 [n]} (mask of ones when the record has none)."""
    magic, n, has_mask = _HEADER.unpack_from(record)
    if magic != _MAGIC:
        raise ValueError(f"not a chameleon_jax token record (magic {magic!r}); re-run "
                         "`python -m chameleon_jax.pretokenize` to produce the shards")
    tokens = np.frombuffer(record, "<i4", n, _HEADER.size).astype(np.int32)
    if has_mask:
        mask = np.frombuffer(record, np.uint8, n, _HEADER.size + 4 * n).astype(np.int32)
    else:
        mask = np.ones(n, np.int32)
    return {"tokens": tokens, "loss_mask": mask}
