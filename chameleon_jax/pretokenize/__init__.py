"""Raw documents -> ArrayRecord token shards + manifest, in the unified vocabulary.

    python -m chameleon_jax.pretokenize --input data/pairs.jsonl,data/folder,data/shards/ --out /data/tok \
        --tokenizer spm.model --vqgan runs/vqgan

Images are preprocessed like the official pipeline (chameleon_jax.vqgan), encoded by the VQ-GAN in
jitted fixed-size batches, and text by the tokenizer. Each work unit becomes one shard; a shard whose
manifest entry exists is skipped on a rerun. Hosts take every process_count-th unit. Bad items (malformed
JSON, missing or corrupt images, empty documents, images longer than --seq_len) are skipped, counted and
logged with their reason in the manifest; they never stop the run.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Callable

import numpy as np
from etils import epath

from chameleon_jax import vocab as vocab_lib
from chameleon_jax.data import readers, records, shards
from chameleon_jax.data.readers import BadItem

log = logging.getLogger(__name__)

ImageEncoder = Callable[[np.ndarray], np.ndarray]  # float32 [N,H,W,3] in [-1,1] -> int32 codes [N,h,w]
ImageLoader = Callable[[readers.ImageRef], np.ndarray]  # path or bytes -> float32 [H,W,3] in [-1,1]


def batched_encoder(encode: Callable, params, batch_size: int) -> ImageEncoder:
    """Wraps `encode(params, images[B,H,W,3]) -> codes[B,h,w]` in one jit with a fixed batch (padded),
    sharded over as many of this process's devices as divide it (one per core on a CPU host set up by
    `chameleon_jax.cpu`, where a convolution runs on one thread per device)."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P

    from chameleon_jax import cpu

    mesh = cpu.data_mesh(batch_size, jax.local_devices())
    rows, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    params = jax.device_put(params, replicated)
    jitted = jax.jit(encode, in_shardings=(replicated, rows), out_shardings=rows)

    def run(images: np.ndarray) -> np.ndarray:
        out = []
        for i in range(0, len(images), batch_size):
            chunk = images[i:i + batch_size]
            n = len(chunk)
            if n < batch_size:  # pad so every call reuses one compiled shape
                chunk = np.concatenate([chunk, np.zeros((batch_size - n, *chunk.shape[1:]), chunk.dtype)])
            out.append(np.asarray(jitted(params, chunk))[:n])
        return np.concatenate(out).astype(np.int32)

    run.batch_size = batch_size  # pretokenize flushes at this many images, so no call is mostly padding
    return run


@dataclasses.dataclass
class _ShardBuilder:
    """Accumulates one work unit's documents; images are encoded in batches as they accumulate."""

    tokenizer: object
    encode_images: ImageEncoder
    vocab: vocab_lib.Vocab
    seed: int
    seq_len: int
    pair_loss: str = "all"
    image_first_fraction: float = 0.5

    def __post_init__(self):
        self.records: list[bytes] = []
        self.skipped: list[dict] = []
        self.tokens = {"text": 0, "image": 0, "special": 0}
        self.max_image_block = 0
        self._pending: list[tuple[readers.Document, list[np.ndarray]]] = []

    def skip(self, key: str, reason: str):
        log.warning("skipped %s: %s", key, reason)
        self.skipped.append({"item": key, "reason": reason})

    def add(self, doc: readers.Document, images: list[np.ndarray]):
        self._pending.append((doc, images))

    @property
    def pending_images(self) -> int:
        return sum(len(im) for _, im in self._pending)

    def flush(self):
        images = [im for _, ims in self._pending for im in ims]
        codes = iter(self.encode_images(np.stack(images)) if images else [])
        for doc, ims in self._pending:
            doc_codes = [next(codes) for _ in ims]
            try:
                tokens, mask = self._assemble(doc, doc_codes)
            except BadItem as e:
                self.skip(doc.key, str(e))
                continue
            self._count(tokens)
            self.records.append(records.serialize(tokens, mask))
        self._pending = []

    def _segments(self, segments, codes: list) -> list:
        out = []
        for kind, value in segments:
            if kind == "image":
                out.append(records.Image(codes.pop(0)))
            elif value.strip():
                out.append(self.tokenizer.encode(value))
        return out

    def _assemble(self, doc: readers.Document, codes: list) -> tuple[np.ndarray, np.ndarray | None]:
        codes = list(codes)
        v = self.vocab
        if doc.kind == "sft":
            turns = [records.Turn(role, self._segments(segs, codes)) for role, segs in doc.turns]
            if not any(t.role == "assistant" and t.segments for t in turns):
                raise BadItem("empty document: an SFT conversation needs a non-empty assistant turn")
            tokens, mask = records.sft_tokens(turns, v)
        else:
            segments = self._segments(doc.segments, codes)
            if not segments:
                raise BadItem("empty document: no text and no images")
            if doc.kind == "pair":
                caption = [s for s in segments if not isinstance(s, records.Image)]
                image = [s for s in segments if isinstance(s, records.Image)]
                if not caption:
                    raise BadItem("empty document: the image–text pair has an empty caption")
                first = records.image_first(doc.key, self.seed, self.image_first_fraction)
                tokens = records.pair_tokens(caption[0], image[0].codes, v, is_image_first=first)
                mask = (records.pair_target_mask(caption[0], image[0].codes, v, is_image_first=first)
                        if self.pair_loss == "target" else None)
            else:
                tokens, mask = records.interleaved_tokens(segments, v), None
        block = _longest_image_block(tokens, v)
        if self.seq_len and block > self.seq_len:
            raise BadItem(f"an image of {block} tokens cannot fit seq_len={self.seq_len}; raise --seq_len or "
                          "encode images at a lower resolution")
        self.max_image_block = max(self.max_image_block, block)
        return tokens, mask

    def _count(self, tokens: np.ndarray):
        m = self.vocab.modality(tokens)
        self.tokens["text"] += int((m == vocab_lib.TEXT).sum())
        self.tokens["image"] += int((m == vocab_lib.IMAGE).sum())
        self.tokens["special"] += int((m == vocab_lib.SPECIAL).sum())


def _longest_image_block(tokens: np.ndarray, v: vocab_lib.Vocab) -> int:
    begins = np.flatnonzero(tokens == v.begin_image)
    ends = np.flatnonzero(tokens == v.end_image)
    return int(max((ends[ends > b][0] - b + 1 for b in begins), default=0))


def _load_images(doc: readers.Document, load_image: ImageLoader) -> list[np.ndarray]:
    segs = [s for _, ss in doc.turns for s in ss] if doc.kind == "sft" else list(doc.segments)
    out = []
    for kind, ref in segs:
        if kind != "image":
            continue
        if isinstance(ref, str) and not os.path.exists(ref):
            raise BadItem(f"missing image file {ref}")
        try:
            out.append(load_image(ref))
        except Exception as e:  # PIL raises many types for corrupt/truncated files; all are a skip
            name = ref if isinstance(ref, str) else f"<{len(ref)} bytes>"
            raise BadItem(f"corrupt image {name}: {e}") from e
    return out


def pretokenize_unit(unit: readers.WorkUnit, out_dir: str, *, tokenizer, encode_images: ImageEncoder,
                     load_image: ImageLoader, seed: int = 0, seq_len: int = 0, encode_batch: int | None = None,
                     pair_loss: str = "all", image_first_fraction: float = 0.5, progress=None,
                     allow_paths_outside_input: bool = False) -> dict:
    """One work unit -> one finished shard (records + manifest entry); returns the entry.

    Images are encoded `encode_batch` at a time (default: the encoder's own `batch_size`, else 16).
    `pair_loss`: "all" trains every token of an image–text pair (pretraining, paper §2.2); "target" only
    the second modality given the first (`records.pair_target_mask`). `image_first_fraction` of the
    pairs put the image first (chosen per document key by `records.image_first`). An image path that
    resolves outside its input's folder is a skip unless `allow_paths_outside_input` (a trusted corpus).
    """
    if pair_loss not in ("all", "target"):
        raise ValueError(f"pair_loss={pair_loss!r}: use 'all' (every token) or 'target' (the second modality only)")
    if not 0.0 <= image_first_fraction <= 1.0:  # before any document, not at the first pair
        raise ValueError(f"image_first_fraction={image_first_fraction}: pass a share in [0, 1]")
    encode_batch = encode_batch or getattr(encode_images, "batch_size", 16)
    b = _ShardBuilder(tokenizer, encode_images, tokenizer.vocab, seed, seq_len, pair_loss, image_first_fraction)
    for item in readers.read(unit, allow_paths_outside_input=allow_paths_outside_input):
        if progress is not None:
            progress.update(1)
        if item.error is not None:
            b.skip(item.key, item.error)
            continue
        try:
            images = _load_images(item.document, load_image)
        except BadItem as e:
            b.skip(item.key, str(e))
            continue
        b.add(item.document, images)
        if b.pending_images >= encode_batch:
            b.flush()
    b.flush()
    summary = {"documents": len(b.records), "tokens": b.tokens, "max_image_block": b.max_image_block,
               "skipped": b.skipped, "vocab": dataclasses.asdict(b.vocab),
               "input": {"path": unit.path, "start": unit.start, "stop": unit.stop}, "seed": seed}
    shards.write_shard(os.path.join(out_dir, unit.name), b.records, summary)
    return summary


def run(inputs: list[str], out_dir: str, *, tokenizer, encode_images: ImageEncoder, load_image: ImageLoader,
        docs_per_shard: int = 1000, seed: int = 0, seq_len: int = 0, encode_batch: int | None = None,
        pair_loss: str = "all", image_first_fraction: float = 0.5, process_index: int = 0, process_count: int = 1,
        show_progress: bool = True, allow_paths_outside_input: bool = False) -> dict:
    """Pretokenizes this host's share of the inputs into out_dir; returns the manifest so far."""
    from tqdm import tqdm

    epath.Path(out_dir).mkdir(parents=True, exist_ok=True)  # a local folder or a gs:// prefix
    units = readers.plan(inputs, docs_per_shard)[process_index::process_count]
    todo = [u for u in units if not shards.is_finished(os.path.join(out_dir, u.name))]
    if len(todo) < len(units):
        log.info("resuming: %d of %d shards of this host are finished and skipped", len(units) - len(todo), len(units))
    known = sum(u.stop - u.start for u in todo if u.stop >= 0)
    with tqdm(total=known or None, unit="doc", desc="pretokenize", disable=not show_progress) as bar:
        for u in todo:
            pretokenize_unit(u, out_dir, tokenizer=tokenizer, encode_images=encode_images, load_image=load_image,
                             seed=seed, seq_len=seq_len, encode_batch=encode_batch, pair_loss=pair_loss,
                             image_first_fraction=image_first_fraction, progress=bar,
                             allow_paths_outside_input=allow_paths_outside_input)
    manifest = shards.write_manifest(out_dir)
    log.info("%s: %d documents, tokens %s, %d skipped %s", out_dir, manifest["documents"], manifest["tokens"],
             len(manifest["skipped"]), manifest["skipped_by_reason"])
    return manifest


def vqgan_tools(vqgan: str | None, encode_batch: int, *, config=None, seed: int = 0):
    """(encode_images, load_image, codebook size) of the trained VQ-GAN at `vqgan` (a run, its export or
    the export's state/; `vqgan.checkpoint.load`), or of random weights of `config`'s architecture when
    `vqgan` is None (smoke runs and benchmarks: the codes then carry no meaning)."""
    import functools

    from chameleon_jax.vqgan import checkpoint as vq_checkpoint
    from chameleon_jax.vqgan import images as vq_images, model as vq_model

    if vqgan:
        cfg, params = vq_checkpoint.load(vqgan, config)
    elif config is not None:
        log.warning("VQ-GAN params are random: the codes carry no meaning (smoke runs and benchmarks only)")
        cfg = vq_checkpoint.model_config(config)
        params = vq_checkpoint.random_params(cfg, seed)
    else:
        raise ValueError("no VQ-GAN: pass a trained one (--vqgan RUN), or a config for random weights "
                         "(--vqgan_config FILE --vqgan_random_init)")
    return (batched_encoder(vq_model.encode, params, encode_batch),
            functools.partial(vq_images.load_image, size=cfg.resolution), cfg.n_embed)


def pretokenize_corpus(inputs: list[str], out_dir: str, *, tokenizer: str | None = None, vqgan: str | None = None,
                       vqgan_config=None, encode_batch: int = 16, seed: int = 0, max_image_pixels: int = -1,
                       process_index: int | None = None, process_count: int | None = None, **options) -> dict:
    """`run` with the tokenizer file and the VQ-GAN at `vqgan` (or random weights of `vqgan_config`).

    `tokenizer` None: the one inside `vqgan` when that is a converted release (`text.load` of the export).
    `max_image_pixels` -1 = `vqgan.images`' limit for the VQ-GAN's resolution; process index/count default
    to JAX's. `options` go to `run` (docs_per_shard, seq_len, pair_loss, ...). Returns the manifest.
    """
    import functools

    import jax

    from chameleon_jax import text

    encode, load, codes = vqgan_tools(vqgan, encode_batch, config=vqgan_config, seed=seed)
    if max_image_pixels >= 0:
        load = functools.partial(load, max_pixels=max_image_pixels)
    if tokenizer is None and vqgan is None:
        raise ValueError("no tokenizer: pass --tokenizer, or --vqgan a converted release that holds one")
    return run(inputs, out_dir, tokenizer=text.load(tokenizer or vqgan, image_codes=codes), encode_images=encode,
               load_image=load, seed=seed, encode_batch=encode_batch,
               process_index=jax.process_index() if process_index is None else process_index,
               process_count=jax.process_count() if process_count is None else process_count, **options)
