"""The unified vocabulary: one id space for text BPE, image codes and the specials.

Layouts (the official tokenizer's ids; image tokens named IMGIMG<letters>Z):

    chameleon  <s>=0 <pad>=1 </s>=2 <unk>=3 | image codes 4..8195 (code+4) | <eoss> (end image)=8196,
               <racm3:break> (begin image)=8197 | text BPE over the rest of 65,536; end-of-turn=8710
    custom     <s>=0 <pad>=1 </s>=2 <unk>=3 | image codes 4..4+K-1 | end image=4+K, begin image=4+K+1,
               end-of-turn=4+K+2 | text pieces from 4+K+3 on (see `chameleon_jax.text`)

An image in a sequence is always begin-image, h*w codes in raster order, end-image. The modality of an
id is a pure function of the id (`modality`, `is_image`), usable on numpy arrays and inside jit.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import numpy as np

TEXT, IMAGE, SPECIAL = 0, 1, 2  # values returned by `modality`


@dataclasses.dataclass(frozen=True)
class Vocab:
    """Where each kind of token lives in the unified id space."""

    name: str
    size: int
    image_start: int
    image_codes: int
    text_start: int  # first id of the text block (pieces that are not specials)
    bos: int = 0
    pad: int = 1
    eos: int = 2
    unk: int = 3
    end_image: int = 8196
    begin_image: int = 8197
    end_turn: int = 8710

    @property
    def specials(self) -> tuple[int, ...]:
        return (self.bos, self.pad, self.eos, self.unk, self.end_image, self.begin_image, self.end_turn)

    def image_ids(self, codes) -> np.ndarray:
        """VQ codes (any shape) -> unified ids."""
        codes = np.asarray(codes)
        if codes.size and (codes.min() < 0 or codes.max() >= self.image_codes):
            raise ValueError(
                f"image codes must lie in [0, {self.image_codes}) for vocab {self.name!r}, got "
                f"[{codes.min()}, {codes.max()}]; build the vocab with image_codes= the VQ-GAN codebook size")
        return (codes.astype(np.int32) + self.image_start).astype(np.int32)

    def image_codes_of(self, ids) -> np.ndarray:
        """Unified image ids -> VQ codes."""
        return (np.asarray(ids, np.int32) - self.image_start).astype(np.int32)

    def image_block(self, codes) -> np.ndarray:
        """begin-image + codes in raster order + end-image, as int32 ids."""
        flat = self.image_ids(np.asarray(codes).reshape(-1))
        return np.concatenate([[self.begin_image], flat, [self.end_image]]).astype(np.int32)

    def is_image(self, ids):
        """True where an id is an image code. Works on numpy and jax arrays (pure, jit-friendly)."""
        return (ids >= self.image_start) & (ids < self.image_start + self.image_codes)

    def is_special(self, ids):
        out = ids == self.specials[0]
        for s in self.specials[1:]:
            out = out | (ids == s)
        return out

    def modality(self, ids):
        """TEXT (0), IMAGE (1) or SPECIAL (2) per id; same array type as `ids`, int32."""
        xp = _array_module(ids)
        return xp.where(self.is_image(ids), IMAGE, xp.where(self.is_special(ids), SPECIAL, TEXT)).astype(xp.int32)


def _array_module(x):
    if isinstance(x, np.ndarray) or np.isscalar(x):
        return np
    import jax.numpy as jnp  # jax arrays and tracers

    return jnp


CHAMELEON = Vocab(name="chameleon", size=65536, image_start=4, image_codes=8192, text_start=8198)


def custom(text_pieces: int, image_codes: int) -> Vocab:
    """Our own layout: 4 leading specials, the image block, 3 image/turn specials, then the text pieces.

    text_pieces: number of ordinary text pieces (the sentencepiece vocab minus its 7 reserved ids).
    image_codes: the VQ-GAN codebook size.
    """
    if text_pieces <= 0 or image_codes <= 0:
        raise ValueError(f"text_pieces={text_pieces} and image_codes={image_codes} must both be positive")
    end_image = 4 + image_codes
    return Vocab(name=f"custom-{text_pieces}t-{image_codes}i", size=end_image + 3 + text_pieces, image_start=4,
                 image_codes=image_codes, text_start=end_image + 3, end_image=end_image,
                 begin_image=end_image + 1, end_turn=end_image + 2)


def render(ids: Sequence[int], vocab: Vocab, decode_text: Callable[[list[int]], str],
           image_shape: tuple[int, int] | None = None) -> list[str | np.ndarray]:
    """A token sequence -> ordered list of text segments (str) and images (int32 code grids [h, w]).

    Specials outside images are dropped. An image cut short (no end-image, e.g. a truncated sample) is
    completed by repeating its first code, as the official streaming preview does.
    image_shape defaults to the square grid of the image's code count.
    """
    ids = np.asarray(ids, np.int64).reshape(-1)
    out: list[str | np.ndarray] = []
    text: list[int] = []
    i = 0
    while i < len(ids):
        if ids[i] != vocab.begin_image:
            if not (vocab.is_special(ids[i]) or vocab.is_image(ids[i])):
                text.append(int(ids[i]))
            i += 1
            continue
        if text:
            out.append(decode_text(text))
            text = []
        j = i + 1
        while j < len(ids) and ids[j] != vocab.end_image and vocab.is_image(ids[j]):
            j += 1
        codes = vocab.image_codes_of(ids[i + 1:j])
        out.append(_to_grid(codes, image_shape))
        i = j + 1 if j < len(ids) and ids[j] == vocab.end_image else j
    if text:
        out.append(decode_text(text))
    return out


def _to_grid(codes: np.ndarray, image_shape: tuple[int, int] | None) -> np.ndarray:
    if image_shape is None:
        side = math.isqrt(len(codes))
        if side * side != len(codes):
            side = math.isqrt(len(codes) - 1) + 1 if len(codes) else 0
        image_shape = (side, side)
    n = image_shape[0] * image_shape[1]
    if len(codes) < n:
        fill = codes[0] if len(codes) else 0
        codes = np.concatenate([codes, np.full(n - len(codes), fill, np.int32)])
    return codes[:n].reshape(image_shape).astype(np.int32)
