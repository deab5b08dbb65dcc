"""Turning logits into the next token: the modality grammar, guidance and the samplers (as the official chameleon.py decoders).

Everything here is a pure function of arrays, usable inside `jit` and inside the decoding loop.
B rows, V vocab.

Modality grammar (official `TextDecoder` / `ImageDecoder`):
  text mode   allows text tokens, end-of-sequence, the extra stop ids and, if image output is on,
              begin-image — but only while at least h·w + 2 tokens remain (begin-image, the codes,
              end-image), so an image is never cut short by the budget;
  image mode  allows only image codes for exactly h·w steps, then only end-image, then text mode.
Specials (pad, bos, end-image in text mode, end-of-turn unless it is a stop id) are never sampled.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from chameleon_jax import vocab as vocab_lib

TEXT_MODE, IMAGE_MODE = 0, 1
NEG_INF = -jnp.inf


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """One modality's sampler. temperature 0 means greedy (argmax); top_k 0 and top_p 1 mean off.

    Official defaults (chameleon.py `Options`) are temperature 0.7, top_p 0.9, repetition_penalty 1.2 for text and
    temperature 0.7, top_p 0.9 for images; repetition penalty never applies to image codes.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0

    def __post_init__(self):
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1 or self.repetition_penalty <= 0:
            raise ValueError(f"{self}: need temperature >= 0 (0 = greedy), top_k >= 0 (0 = off), "
                             f"0 < top_p <= 1 (1 = off) and repetition_penalty > 0 (1 = off)")


@dataclasses.dataclass(frozen=True)
class Grammar:
    """Static token classes of the modality grammar, built once from a `Vocab`."""

    vocab: vocab_lib.Vocab
    model_vocab_size: int
    image_len: int            # h·w codes per generated image
    image_output: bool        # may text mode open an image?
    stop_ids: tuple[int, ...]  # eos plus any extra stop ids

    @classmethod
    def build(cls, vocab: vocab_lib.Vocab, model_vocab_size: int, image_shape=(32, 32),
              image_output: bool = False, extra_stop_ids=()) -> "Grammar":
        if model_vocab_size < vocab.size:
            raise ValueError(f"the model's vocab ({model_vocab_size}) is smaller than vocab {vocab.name!r} "
                             f"({vocab.size}); build the model with vocab_size >= {vocab.size}")
        stops = tuple(dict.fromkeys((vocab.eos, *map(int, extra_stop_ids))))
        return cls(vocab, model_vocab_size, int(np.prod(image_shape)), bool(image_output), stops)

    def text_mask(self) -> np.ndarray:
        """[V] bool: ids text mode may emit (begin-image included iff image output is on)."""
        ids = np.arange(self.model_vocab_size)
        ok = ~self.vocab.is_image(ids) & ~self.vocab.is_special(ids) & (ids < self.vocab.size)
        ok[list(self.stop_ids)] = True
        ok[self.vocab.begin_image] = self.image_output
        return ok

    def code_mask(self) -> np.ndarray:
        return self.vocab.is_image(np.arange(self.model_vocab_size))


@dataclasses.dataclass
class ModalityState:
    """Per-row decoding state. mode: TEXT_MODE/IMAGE_MODE; codes_left: codes still owed by the open image."""

    mode: jax.Array        # int32 [B]
    codes_left: jax.Array  # int32 [B]
    done: jax.Array        # bool [B]


jax.tree_util.register_dataclass(ModalityState, data_fields=["mode", "codes_left", "done"], meta_fields=[])


def allowed_tokens(g: Grammar, state: ModalityState, remaining) -> jax.Array:
    """[B, V] bool mask of the ids each row may emit now.

    `remaining` (scalar or [B]): tokens left in the budget including this one.
    """
    v = g.model_vocab_size
    text = jnp.asarray(g.text_mask())
    boi_ok = jnp.reshape(jnp.asarray(remaining) >= g.image_len + 2, (-1, 1))  # scalar or [B]
    text = text[None, :] & ~((jnp.arange(v) == g.vocab.begin_image)[None, :] & ~boi_ok)
    codes = jnp.asarray(g.code_mask())[None, :]
    eoi = (jnp.arange(v) == g.vocab.end_image)[None, :]
    image = jnp.where(state.codes_left[:, None] > 0, codes, eoi)
    return jnp.where(state.mode[:, None] == IMAGE_MODE, image, text)


def advance(g: Grammar, state: ModalityState, token: jax.Array) -> ModalityState:
    """The state after each row emits `token` [B] (rows already done stay done and unchanged)."""
    live = ~state.done
    opens = live & (state.mode == TEXT_MODE) & (token == g.vocab.begin_image)
    in_image = live & (state.mode == IMAGE_MODE)
    closes = in_image & (state.codes_left == 0)
    mode = jnp.where(opens, IMAGE_MODE, jnp.where(closes, TEXT_MODE, state.mode))
    codes_left = jnp.where(opens, g.image_len, jnp.where(in_image & ~closes, state.codes_left - 1, state.codes_left))
    stop = live & (state.mode == TEXT_MODE) & jnp.isin(token, jnp.asarray(g.stop_ids))
    return ModalityState(mode.astype(jnp.int32), codes_left.astype(jnp.int32), state.done | stop)


def guide(streams: jax.Array, text_scale, image_scale) -> jax.Array:
    """Classifier-free guidance over stacked stream logits [G, B, V] (official chameleon.py; InstructPix2Pix, arXiv 2211.09800).

    G=3 (full, images-only, unconditional): u + s_img·(i − u) + s_txt·(f − i).
    G=2 (full, unconditional):              u + s_txt·(f − u).
    G=1: the logits unchanged. With every scale at 1 each form reduces to f.
    """
    if streams.shape[0] == 1:
        return streams[0]
    if streams.shape[0] == 2:
        f, u = streams
        return u + text_scale * (f - u)
    f, i, u = streams
    return u + image_scale * (i - u) + text_scale * (f - i)


def repetition_penalty(logits, presence, penalty) -> jax.Array:
    """HF/official rule on ids present in the context: positive logits divided, negative multiplied."""
    penalty = jnp.asarray(penalty, logits.dtype)
    if penalty.ndim == 1:
        penalty = penalty[:, None]
    scaled = jnp.where(logits > 0, logits / penalty, logits * penalty)
    return jnp.where(presence, scaled, logits)


def argmax(x: jax.Array, block: int = 512) -> jax.Array:
    """`jnp.argmax(x, -1)` (first index of the row maximum) as int32, in two passes over blocks.

    XLA:CPU lowers argmax to one variadic (value, index) reduction that does not vectorise: 1.2 ms for
    16 × 65,536 logits, about as long as the rest of a decode step's non-matmul work. Taking each
    block's max, the first block that holds the row max, then the first hit inside it is 4x faster
    (benchmarks/bench_decode.py) and returns the same index.
    """
    rows, v = x.shape
    if v % block or v <= block:
        return jnp.argmax(x, axis=-1).astype(jnp.int32)
    blocks = x.reshape(rows, v // block, block)
    first_block = jnp.argmax(jnp.max(blocks, axis=-1), axis=-1)
    inside = jnp.take_along_axis(blocks, first_block[:, None, None], axis=1)[:, 0]
    return (first_block * block + jnp.argmax(inside, axis=-1)).astype(jnp.int32)


def sample(logits, key, temperature, top_k, top_p, *, filtered: bool = True, greedy_only: bool = False) -> jax.Array:
    """One id per row from logits [B, V] (−inf = forbidden), with per-row sampler settings [B].

    temperature 0 → argmax. Order as in HF: temperature, then top-k, then top-p on the renormalised
    top-k distribution. `filtered=False` (static) skips the sort when no row uses top-k/top-p, and
    `greedy_only` (static) skips drawing random numbers (B·V of them per step) when every row is greedy.
    """
    greedy = argmax(logits)
    if greedy_only:
        return greedy
    hot = temperature > 0
    x = logits / jnp.where(hot, temperature, 1.0)[:, None]
    if filtered:
        v = x.shape[-1]
        desc = -jnp.sort(-x, axis=-1)
        rank = jnp.arange(v)[None, :]
        k = jnp.where(top_k > 0, jnp.minimum(top_k, v), v)
        desc = jnp.where(rank < k[:, None], desc, NEG_INF)
        probs = jax.nn.softmax(desc, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs
        # Keep the smallest prefix whose mass reaches top_p (the top token always survives).
        keep = (before < top_p[:, None]) & (rank < k[:, None])
        keep = keep | (rank == 0)
        n_keep = jnp.sum(keep, axis=-1)
        threshold = jnp.take_along_axis(desc, (n_keep - 1)[:, None], axis=-1)
        x = jnp.where(x >= threshold, x, NEG_INF)
    drawn = _inverse_cdf(x, key)
    return jnp.where(hot, drawn, greedy)


def _inverse_cdf(x, key) -> jax.Array:
    """Draws from softmax(x) per row with one uniform per row (Gumbel-max would need B·V random numbers,
    which dominates a CPU decode step at V=65,536). −inf entries have zero mass and are never drawn."""
    probs = jax.nn.softmax(x, axis=-1)
    cdf = jnp.cumsum(probs, axis=-1)
    u = jax.random.uniform(key, x.shape[:1], jnp.float32) * cdf[:, -1]
    idx = jnp.minimum(jnp.sum(cdf < u[:, None], axis=-1), x.shape[-1] - 1).astype(jnp.int32)
    # Rounding can land u past the last non-zero entry; fall back to the most likely id then.
    ok = jnp.take_along_axis(probs, idx[:, None], axis=-1)[:, 0] > 0
    return jnp.where(ok, idx, jnp.argmax(x, axis=-1).astype(jnp.int32))


def next_token(g: Grammar, logits, state: ModalityState, remaining, key, text: SamplingParams,
               image: SamplingParams, presence=None, pad_id: int | None = None):
    """Constrains, penalises and samples one step: (token [B], new state). Done rows emit pad.

    logits [B, V] f32 (already guided); presence [B, V] bool (ids seen so far) when text uses a
    repetition penalty.
    """
    is_image = state.mode == IMAGE_MODE
    if text.repetition_penalty != 1.0:
        penalised = repetition_penalty(logits, presence, text.repetition_penalty)
        logits = jnp.where(is_image[:, None], logits, penalised)
    logits = jnp.where(allowed_tokens(g, state, remaining), logits, NEG_INF)
    pick = lambda a, b: jnp.where(is_image, b, a)
    filtered = (text.top_k, text.top_p, image.top_k, image.top_p) != (0, 1.0, 0, 1.0)
    token = sample(logits, key, pick(text.temperature, image.temperature), pick(text.top_k, image.top_k),
                   pick(text.top_p, image.top_p), filtered=filtered,
                   greedy_only=text.temperature == 0 and image.temperature == 0)
    pad = g.vocab.pad if pad_id is None else pad_id
    token = jnp.where(state.done, pad, token)
    return token, advance(g, state, token)
