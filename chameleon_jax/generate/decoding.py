"""Generation: prefill, then KV-cached decoding in one jitted `lax.while_loop` (as Chameleon's official inference).

    gen = Generator(graphdef, model_cfg, vocab, GenerationConfig(max_new_tokens=64), mesh=mesh)
    out = gen(params, prompts, seed=0)          # prompts: list of id lists, or [B, P] + segment ids
    segments = out.segments(0, tokenizer.decode)  # ['a red circle ...', array([[...codes...]]), ...]

Rows may be padded on either side (or anywhere): a prompt token is real where its segment id is
non-zero; positions count real tokens, padding is masked out of attention, and the first new token of
each row comes from its last real token. All rows share one cache write offset, so a row's cache has
holes where its padding was, which the mask hides.

Classifier-free guidance runs G streams of the same B rows in one batch of G·B (stream-major). Every
stream sees every generated token, but a stream *hides* (segment 0) the tokens it must not condition
on: the images-only stream keeps only <s>, image codes and the image delimiters; the unconditional
stream keeps only <s> and the image being drawn (a new begin-image hides everything else again).
Hidden tokens are invisible to attention and take no position, so each stream equals a fresh run on
its filtered context (the official chameleon.py: [<s>, <racm3:break>] + codes for the unconditional stream).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from chameleon_jax import model as model_lib
from chameleon_jax import sampling
from chameleon_jax import vocab as vocab_lib
from chameleon_jax.model import sharding as shd
from chameleon_jax.sampling import SamplingParams

GUIDANCE_STREAMS = {"none": 1, "two": 2, "three": 3}
# The context each stream conditions on: 0 full, 1 images only, 2 unconditional ("two" = full, uncond).
_STREAM_ROLES = {1: (0,), 2: (0, 2), 3: (0, 1, 2)}


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """What to generate. Image defaults follow the official inference `Options` (chameleon.py)."""

    max_new_tokens: int
    text: SamplingParams = SamplingParams()
    image: SamplingParams = SamplingParams(temperature=0.7, top_p=0.9)
    image_output: bool = False           # may text mode open an image (mixed-modal output)?
    image_shape: tuple[int, int] = (32, 32)
    guidance: str = "none"               # "none" | "two" (full, uncond) | "three" (full, images-only, uncond)
    text_scale: float = 3.0              # g_txt (official default)
    image_scale: float = 1.2             # g_img
    extra_stop_ids: tuple[int, ...] = ()  # stop on these as on </s> (e.g. end-of-turn)
    return_logits: bool = False          # also return the full stream's raw logits per step (tests)

    def __post_init__(self):
        if self.guidance not in GUIDANCE_STREAMS:
            raise ValueError(f"guidance={self.guidance!r}; choose one of {sorted(GUIDANCE_STREAMS)}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} must be >= 1")


@dataclasses.dataclass
class GenerationOutput:
    tokens: np.ndarray            # int32 [B, T] generated ids, pad after a row stops
    lengths: np.ndarray           # int32 [B] tokens generated per row (stop token included)
    vocab: vocab_lib.Vocab
    image_shape: tuple[int, int]
    logits: np.ndarray | None = None  # f32 [B, T, V] when return_logits

    def row(self, i: int) -> np.ndarray:
        return self.tokens[i, : self.lengths[i]]

    def segments(self, i: int, decode_text: Callable[[list[int]], str]) -> list:
        """Row i as an ordered list of text segments (str) and images (int32 code grids [h, w])."""
        return vocab_lib.render(self.row(i), self.vocab, decode_text, self.image_shape)


def pad_prompts(prompts: Sequence[Sequence[int]], pad_id: int, side: str = "left",
                multiple: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Lists of ids -> (tokens, segment_ids) [B, P], P rounded up to `multiple` to limit recompiles."""
    if side not in ("left", "right"):
        raise ValueError(f"side={side!r}; use 'left' or 'right'")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (start it with <s>)")
    length = -(-max(len(p) for p in prompts) // multiple) * multiple
    tokens = np.full((len(prompts), length), pad_id, np.int32)
    seg = np.zeros((len(prompts), length), np.int32)
    for r, p in enumerate(prompts):
        sl = slice(length - len(p), length) if side == "left" else slice(0, len(p))
        tokens[r, sl], seg[r, sl] = p, 1
    return tokens, seg


def _stream_keep(tokens, real, vocab, stream: int):
    """[B, P] bool: which prompt tokens stream 0 (full), 1 (images only) or 2 (uncond) conditions on."""
    if stream == 0:
        return real
    bos, boi, eoi = vocab.bos, vocab.begin_image, vocab.end_image
    if stream == 1:
        return real & (vocab.is_image(tokens) | (tokens == bos) | (tokens == boi) | (tokens == eoi))
    # Unconditional: <s> plus an image left open at the end of the prompt.
    idx = jnp.arange(tokens.shape[1])[None, :]
    last_boi = jnp.max(jnp.where(real & (tokens == boi), idx, -1), axis=1, keepdims=True)
    last_eoi = jnp.max(jnp.where(real & (tokens == eoi), idx, -1), axis=1, keepdims=True)
    open_image = (last_boi > last_eoi) & (idx >= last_boi)
    return real & ((tokens == bos) | open_image)


def _open_image_state(tokens, real, vocab, image_len):
    """Rows whose prompt ends inside an image start in image mode, owing the rest of its codes."""
    idx = jnp.arange(tokens.shape[1])[None, :]
    last_boi = jnp.max(jnp.where(real & (tokens == vocab.begin_image), idx, -1), axis=1)
    last_eoi = jnp.max(jnp.where(real & (tokens == vocab.end_image), idx, -1), axis=1)
    is_open = last_boi > last_eoi
    written = jnp.sum(real & vocab.is_image(tokens) & (idx > last_boi[:, None]), axis=1)
    mode = jnp.where(is_open, sampling.IMAGE_MODE, sampling.TEXT_MODE).astype(jnp.int32)
    codes_left = jnp.where(is_open, jnp.maximum(image_len - written, 0), 0).astype(jnp.int32)
    return mode, codes_left


class Generator:
    """A compiled generation function for one model, vocab and GenerationConfig.

    With `mesh`, params are expected sharded by the model's logical rules (as the train step holds them)
    and rows are sharded over ('data','fsdp'); G·B must then divide by data×fsdp.
    `compiler_options` go to XLA (tests pass {"xla_backend_optimization_level": 0} to compile faster).
    `on_step(i, tokens)`, when given, is called on the host from inside the decoding loop (a
    `jax.debug.callback`, so the loop never returns to Python) every `stream_every` steps and after the
    last: i is the latest step, tokens the [B, max_new_tokens] ids generated so far (steps 0..i filled).
    A callback costs far more than a small model's decode step on CPU (benchmarks/bench_stream.py), so
    tokens travel in chunks; calls may reach the host out of order (generate/streaming.py copes).
    """

    def __init__(self, graphdef, model_cfg, vocab: vocab_lib.Vocab, config: GenerationConfig,
                 mesh=None, rules=shd.DEFAULT_RULES, compiler_options: dict | None = None,
                 on_step: Callable[[np.ndarray, np.ndarray], None] | None = None, stream_every: int = 32):
        self.graphdef, self.model_cfg, self.vocab, self.config = graphdef, model_cfg, vocab, config
        self.mesh, self.rules = mesh, rules
        self.grammar = sampling.Grammar.build(vocab, model_cfg.vocab_size, config.image_shape,
                                              config.image_output, config.extra_stop_ids)
        self.streams = GUIDANCE_STREAMS[config.guidance]
        if stream_every < 1:
            raise ValueError(f"stream_every={stream_every} must be >= 1 (steps between host callbacks)")
        fn = functools.partial(_generate, graphdef, self.grammar, config, self.streams, on_step, stream_every)
        if mesh is None:
            self._fn = jax.jit(fn, compiler_options=compiler_options)
        else:
            params_sh = shd.named(mesh, model_lib.param_specs(model_cfg, rules))
            rows = NamedSharding(mesh, shd.BATCH_SPEC)
            rep = NamedSharding(mesh, P())
            out_sh = {"tokens": rows, "lengths": NamedSharding(mesh, P(shd.BATCH_SPEC[0]))}
            if config.return_logits:
                out_sh["logits"] = NamedSharding(mesh, P(shd.BATCH_SPEC[0], None, None))
            self._fn = jax.jit(fn, in_shardings=(params_sh, rows, rows, rep, rep), out_shardings=out_sh,
                               compiler_options=compiler_options)

    def __call__(self, params, prompts, segment_ids=None, *, seed: int | jax.Array = 0,
                 side: str = "left", text_scale: float | None = None,
                 image_scale: float | None = None) -> GenerationOutput:
        """prompts: list of id lists (padded on `side`), or int32 [B, P] with segment_ids [B, P] (0 = pad).

        Guidance scales default to the config's; they are runtime values (no recompilation).
        """
        if segment_ids is None:
            tokens, segment_ids = pad_prompts(prompts, self.vocab.pad, side)
        else:
            tokens = np.asarray(prompts, np.int32)
        key = jax.random.key(seed) if isinstance(seed, int) else seed
        scales = np.array([self.config.text_scale if text_scale is None else text_scale,
                           self.config.image_scale if image_scale is None else image_scale], np.float32)
        if self.mesh is None:
            out = self._fn(params, tokens, segment_ids, key, scales)
        else:
            with jax.set_mesh(self.mesh), shd.activation_rules(self.rules):
                out = self._fn(params, tokens, segment_ids, key, scales)
        out = jax.device_get(out)
        return GenerationOutput(np.asarray(out["tokens"]), np.asarray(out["lengths"]), self.vocab,
                                self.config.image_shape, out.get("logits"))


def _decode_head(model, rows: int):
    """The output head for decoding steps. Same maths as `Transformer.head`; for many rows the weight is
    transposed once per call to [V, D], which XLA:CPU multiplies ~1.5x faster at 16 rows (measured in
    benchmarks/bench_decode.py), while a single row streams the [D, V] layout faster."""
    if rows < 8:
        return lambda x: model.head(x)[:, 0]
    w_t = model.output[...].T

    def head(x):
        h = model.final_norm(x)[:, 0]
        logits = jnp.einsum("BD,VD->BV", h, w_t.astype(h.dtype), preferred_element_type=jnp.float32)
        return shd.constrain(logits, ("batch", "vocab"))

    return head


def _generate(graphdef, g: sampling.Grammar, cfg: GenerationConfig, streams: int, on_step, stream_every: int,
              params, tokens, segment_ids, key, scales):
    model = model_lib.bind(graphdef, params)
    vocab = g.vocab
    b, p = tokens.shape
    t_max = cfg.max_new_tokens
    s = p + t_max
    v = model.cfg.vocab_size
    real = segment_ids != 0

    # Streams stacked stream-major: rows [k·B, (k+1)·B) belong to stream k.
    roles = _STREAM_ROLES[streams]
    keep = jnp.concatenate([_stream_keep(tokens, real, vocab, k) for k in roles], axis=0)
    all_tokens = jnp.tile(tokens, (streams, 1))
    seg = keep.astype(jnp.int32)
    positions = jnp.maximum(jnp.cumsum(seg, axis=1) - 1, 0).astype(jnp.int32)
    kv_seg = jnp.zeros((streams * b, s), jnp.int32).at[:, :p].set(seg)
    cache = jax.tree.map(lambda c: shd.constrain(c, ("layers", "batch", "length", "kv_heads", "head_dim")),
                         model.init_cache(streams * b, s))
    x, cache = model(all_tokens, seg, positions, cache=cache, cache_index=0, kv_segment_ids=kv_seg)
    # Row r's next token comes from its last kept prompt token (any padding side).
    last = jnp.max(jnp.where(keep, jnp.arange(p)[None, :], 0), axis=1)
    x_last = jnp.take_along_axis(x, last[:, None, None], axis=1)
    logits = model.head(x_last)[:, 0]

    mode, codes_left = _open_image_state(tokens, real, vocab, g.image_len)
    state = sampling.ModalityState(mode, codes_left, jnp.zeros((b,), bool))
    seq = jnp.concatenate([all_tokens, jnp.full((streams * b, t_max), vocab.pad, jnp.int32)], axis=1)
    presence = None
    if cfg.text.repetition_penalty != 1.0:
        presence = jnp.zeros((b, v), jnp.int32).at[jnp.arange(b)[:, None], tokens].add(real) > 0
    out_tokens = jnp.full((b, t_max), vocab.pad, jnp.int32)
    out_logits = jnp.zeros((b, t_max, v), jnp.float32) if cfg.return_logits else None
    stream_id = jnp.repeat(jnp.array(roles), b)  # each row's role (0 full, 1 images only, 2 uncond)
    head = _decode_head(model, streams * b)
    # The loop runs the blocks from per-layer weights and caches, split once here (see Transformer).
    layers = model.unstack_layers()
    cache = tuple(jax.tree.map(lambda c, i=i: shd.constrain(c[i], ("batch", "length", "kv_heads", "head_dim")), cache)
                  for i in range(model.cfg.n_layers))

    def step_logits(logits, state):
        full = logits[:b]
        if streams == 1:
            return full
        guided = sampling.guide(logits.reshape(streams, b, v), scales[0], scales[1])
        return jnp.where((state.mode == sampling.IMAGE_MODE)[:, None], guided, full)

    def body(carry):
        i, logits, cache, kv_seg, seq, state, presence, out_tokens, out_logits, lengths = carry
        lengths = lengths + (~state.done).astype(jnp.int32)
        token, new_state = sampling.next_token(
            g, step_logits(logits, state), state, t_max - i, jax.random.fold_in(key, i), cfg.text,
            cfg.image, presence)
        out_tokens = out_tokens.at[:, i].set(token)
        if on_step is not None:
            # Every `stream_every` steps, and at the last one. Unordered: an ordered effect is refused
            # on a multi-device mesh; each call carries all tokens so far, so the host needs no order.
            last = (i + 1 >= t_max) | jnp.all(new_state.done)
            jax.lax.cond(((i + 1) % stream_every == 0) | last,
                         lambda: jax.debug.callback(on_step, i, out_tokens), lambda: None)
        if out_logits is not None:
            out_logits = out_logits.at[:, i].set(logits[:b])
        if presence is not None:
            presence = presence.at[jnp.arange(b), token].set(True)
        # Feed the token to every stream; each stream keeps it or hides it (see module docstring).
        tok = jnp.tile(token, streams)
        img_tok = vocab.is_image(tok) | (tok == vocab.begin_image) | (tok == vocab.end_image)
        in_image = jnp.tile(state.mode == sampling.IMAGE_MODE, streams)
        keep_tok = jnp.select([stream_id == 0, stream_id == 1], [True, img_tok],
                              in_image | (tok == vocab.begin_image))
        keep_tok = keep_tok & ~jnp.tile(state.done, streams)
        # A new image resets the unconditional stream to [<s>, <begin-image>].
        reset = (stream_id == 2) & (tok == vocab.begin_image) & ~jnp.tile(state.done, streams)
        kv_seg = jnp.where(reset[:, None] & (seq != vocab.bos), 0, kv_seg)
        pos = jnp.sum(kv_seg != 0, axis=1).astype(jnp.int32)
        kv_seg = kv_seg.at[:, p + i].set(keep_tok.astype(jnp.int32))
        seq = seq.at[:, p + i].set(tok)
        x, cache = model(tok[:, None], keep_tok.astype(jnp.int32)[:, None], pos[:, None], cache=cache,
                         cache_index=p + i, kv_segment_ids=kv_seg, layers=layers)
        logits = head(x)
        return i + 1, logits, cache, kv_seg, seq, new_state, presence, out_tokens, out_logits, lengths

    def cond(carry):
        i, state = carry[0], carry[5]
        return (i < t_max) & ~jnp.all(state.done)

    carry = (jnp.int32(0), logits, cache, kv_seg, seq, state, presence, out_tokens, out_logits,
             jnp.zeros((b,), jnp.int32))
    carry = jax.lax.while_loop(cond, body, carry)
    out_tokens, out_logits, lengths = carry[7], carry[8], carry[9]
    out = {"tokens": out_tokens, "lengths": lengths}
    if out_logits is not None:
        out["logits"] = out_logits
    return out
