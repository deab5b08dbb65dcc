"""The training input pipeline: pretokenized sources -> mixture -> packed rows -> batches -> global arrays.

Per source: ArrayRecord shards -> MapDataset -> global shuffle (seeded; reshuffled every epoch) -> this
host's slice -> repeat -> decode -> split documents longer than seq_len (never cutting an image). Then
a weighted mixture of the sources, FirstFit packing into seq_len rows, batching, and worker processes.
Stages (paper §2.2: stage 1 = first 80% of training, stage 2 = the rest) each have their own mixture.

    it = make_train_iterator(config.data, total_steps=config.total_steps)
    batch = to_global_batch(next(it), mesh)        # dict of jax.Array, sharded P(('data','fsdp'), None)
    # checkpoint: ocp.args.Composite(..., data=grain.checkpoint.CheckpointSave(it)); restore with
    # grain.checkpoint.CheckpointRestore(it) on a freshly built iterator (same config and process count).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import zlib
from typing import Any, Mapping, Sequence

import grain
import ml_collections
import numpy as np

from chameleon_jax.data import packing, records, shards
from chameleon_jax.data.batch import Batch, to_global_batch  # noqa: F401  (to_global_batch: see the docstring)
from chameleon_jax.vocab import Vocab

log = logging.getLogger(__name__)


def default_config() -> ml_collections.ConfigDict:
    """The `config.data` block of an experiment config; every field is described here."""
    c = ml_collections.ConfigDict()
    c.sources = {}  # name -> directory written by `python -m chameleon_jax.pretokenize --out DIR`
    # The command-line way to name sources when `sources` is empty: pretokenized directories as a comma
    # list and/or globs, e.g. --config.data.train_shards='/data/tok/web,/data/tok/pairs_*'. Each directory
    # becomes a source named after it, all weighted equally. eval_shards: the held-out directories that
    # perplexity evaluation reads (empty: train_shards, drawn with the eval seed).
    c.train_shards = ""
    c.eval_shards = ""
    # Mixtures, in order. `until` = fraction of total_steps where the stage ends (the last stage has none).
    # Weights are relative (normalised per stage); a source missing from a stage is not drawn in it.
    c.stages = [{"weights": {}, "until": None}]
    c.weights_unit = "tokens"  # weights are shares of tokens ("tokens") or of documents ("documents")
    c.seq_len = 256
    c.global_batch_size = 8  # rows per step over all hosts; each host yields global/process_count
    c.seed = 0
    c.num_workers = 0  # Grain worker processes per host (0 = in the main process)
    c.read_threads = 0  # reader threads per source and process; raise for remote storage (e.g. GCS)
    c.packing_bins = 0  # rows filled at once by FirstFit; 0 = max(per-host batch size, 16)
    return c


@dataclasses.dataclass(frozen=True)
class _Stage:
    weights: dict[str, float]
    end_step: int | None


def _get(obj, key, default=None):
    if isinstance(obj, Mapping):
        return obj.get(key, default)
    return getattr(obj, key, default)


def _shard_sources(spec: str) -> dict[str, str]:
    """'DIR,DIR2,GLOB*' -> {name: directory}; a name is the directory's base name (made unique)."""
    out: dict[str, str] = {}
    for part in (p.strip() for p in str(spec or "").split(",")):
        if not part:
            continue
        matches = shards.match_sources(part)  # local or object-store (gs://) directories
        if not matches:
            raise FileNotFoundError(f"no pretokenized directory matches {part!r}; run `python -m "
                                    "chameleon_jax.pretokenize --out DIR ...` first, or fix the pattern")
        for path in matches:
            name = os.path.basename(os.path.normpath(path)) or "source"
            while name in out:
                name += "_"
            out[name] = path
    return out


def sources_of(data_config, split: str = "train") -> dict[str, str]:
    """The named sources to read: `sources`, else `train_shards` (or, for split="eval", `eval_shards`
    when given)."""
    sources = dict(_get(data_config, "sources") or {})
    if sources:
        return sources
    spec = _get(data_config, "eval_shards") if split == "eval" else ""
    return _shard_sources(spec or _get(data_config, "train_shards"))


def check_vocab(infos: dict[str, shards.SourceInfo], vocab_size: int) -> None:
    """Every token id of the sources must be a row of the model's embedding (else NaN from step 1)."""
    for name, info in infos.items():
        if info.vocab.size > vocab_size:
            raise ValueError(
                f"source {name!r} ({info.path}) was pretokenized with vocabulary {info.vocab.name!r} of "
                f"{info.vocab.size:,} ids, but the model has model.vocab_size={vocab_size:,}; ids from "
                f"{vocab_size:,} up would index past the embedding. Set --config.model.vocab_size={info.vocab.size} "
                f"(or a larger multiple of the tensor axis), or pretokenize with the model's tokenizer")


def validate(data_config, total_steps: int | None = None, process_count: int = 1, *,
             vocab_size: int | None = None, split: str = "train") -> dict[str, shards.SourceInfo]:
    """Checks the config and every source before anything runs; returns the source summaries.

    `vocab_size` (the model's) makes a source with larger token ids an error here, before compiling.
    """
    sources = sources_of(data_config, split)
    if not sources:
        raise ValueError("no token sources: pass pretokenized directories with "
                         "--config.data.train_shards=/data/tok (a comma list or glob), or set "
                         "config.data.sources={name: directory} in the experiment file")
    infos = {name: shards.read_source(path) for name, path in sources.items()}
    vocabs = {info.vocab for info in infos.values()}
    if len(vocabs) > 1:
        raise ValueError("sources were pretokenized with different vocabularies: "
                         + ", ".join(f"{n}: {i.vocab.name}" for n, i in infos.items())
                         + "; re-pretokenize them with the same tokenizer and VQ-GAN")
    if vocab_size is not None:
        check_vocab(infos, int(vocab_size))
    for name, info in infos.items():
        if info.documents < process_count:
            raise ValueError(f"source {name!r} has {info.documents} documents, fewer than the {process_count} hosts; "
                             "add data or drop the source")
    seq_len = int(_get(data_config, "seq_len"))
    for name, info in infos.items():
        if info.max_image_block > seq_len:
            log.warning("source %r has image blocks of %d tokens > seq_len=%d: documents with such images are "
                        "skipped; raise seq_len to fit them", name, info.max_image_block, seq_len)
    stages = _stages(data_config, total_steps, split)
    for i, st in enumerate(stages):
        unknown = set(st.weights) - set(sources)
        if unknown:
            raise ValueError(f"stage {i} weights name unknown sources {sorted(unknown)}; "
                             f"config.data.sources has {sorted(sources)}")
        if not any(w > 0 for w in st.weights.values()):
            raise ValueError(f"stage {i} has no positive weight; give at least one source a weight > 0")
    gbs = int(_get(data_config, "global_batch_size"))
    if gbs % process_count:
        raise ValueError(f"global_batch_size={gbs} is not divisible by the {process_count} hosts")
    if _get(data_config, "weights_unit", "tokens") not in ("tokens", "documents"):
        raise ValueError("config.data.weights_unit must be 'tokens' or 'documents'")
    return infos


def _stages(data_config, total_steps: int | None, split: str = "train") -> list[_Stage]:
    raw = list(_get(data_config, "stages") or [])
    sources = sources_of(data_config, split)
    if not raw or not _get(raw[0], "weights"):
        raw = [{"weights": {n: 1.0 for n in sources}, "until": None}] + raw[1:]
    out = []
    for i, st in enumerate(raw):
        until = _get(st, "until")
        last = i == len(raw) - 1
        if last and until is not None and until < 1.0:
            raise ValueError(f"the last stage has until={until}; the last stage must run to the end (until=None)")
        if not last and until is None:
            raise ValueError(f"stage {i} needs `until` (fraction of total_steps), e.g. 0.8 for the paper's stage 1")
        if not last and total_steps is None:
            raise ValueError("several data stages need total_steps to place the stage boundaries")
        end = None if last else int(round(float(until) * total_steps))
        out.append(_Stage({k: float(v) for k, v in dict(_get(st, "weights")).items()}, end))
    return out


def _seed(*parts) -> int:
    return zlib.crc32("/".join(map(str, parts)).encode()) & 0x7FFFFFFF


_PERMUTATION_LIMIT = 1 << 24  # documents; above this Grain's O(1)-memory index shuffle is used instead


class _EpochPermutation(grain.MapDataset):
    """Global shuffle with a fresh permutation every epoch, held as one numpy array.

    Same contract as MapDataset.shuffle (deterministic in (seed, index), reshuffled per epoch) at a
    fraction of its per-element cost: Grain's index_shuffle was the single largest per-document cost
    of the pipeline here (benchmarks/bench_data.py).
    """

    def __init__(self, parent: grain.MapDataset, seed: int):
        super().__init__(parent)
        self._seed, self._n = seed, len(parent)
        self._epoch, self._perm = -1, None

    def __len__(self) -> int:
        return self._n

    def __str__(self) -> str:
        return f"EpochPermutation(seed={self._seed})"

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        epoch, j = divmod(index, self._n)
        if epoch != self._epoch:
            self._perm = np.random.default_rng([self._seed, epoch]).permutation(self._n).astype(np.int64)
            self._epoch = epoch
        return self._parent[int(self._perm[j]) + epoch * self._n]


def _source_dataset(info: shards.SourceInfo, name: str, stage: int, seed: int, process_index: int,
                    process_count: int, read_threads: int = 0) -> grain.IterDataset:
    """This host's endless, shuffled stream of one source's documents."""
    ds = grain.MapDataset.source(grain.sources.ArrayRecordDataSource(shards.readable_paths(info)))
    # One permutation over all hosts' data (hosts slice it below), new every epoch.
    shuffle_seed = _seed(seed, name, stage)
    ds = _EpochPermutation(ds, shuffle_seed) if len(ds) <= _PERMUTATION_LIMIT else ds.shuffle(seed=shuffle_seed)
    ds = ds.slice(slice(process_index, None, process_count)).repeat(None).map(records.deserialize)
    # Local ArrayRecord reads are microseconds; reader threads then cost more (GIL, polling) than they save.
    return ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=max(read_threads, 1) * 32))


def build_stage_dataset(data_config, infos: dict[str, shards.SourceInfo], stage: _Stage, stage_index: int,
                        process_index: int, process_count: int) -> grain.IterDataset:
    """One stage's mixture, packed and batched, with worker processes if configured."""
    seq_len, seed = int(_get(data_config, "seq_len")), int(_get(data_config, "seed", 0))
    vocab = next(iter(infos.values())).vocab
    weights = {n: w for n, w in stage.weights.items() if w > 0}
    if _get(data_config, "weights_unit", "tokens") == "tokens":
        # Grain mixes documents; a token share w needs a document share w / (mean document length).
        weights = {n: w / (infos[n].tokens / infos[n].documents) for n, w in weights.items()}
    threads = int(_get(data_config, "read_threads", 0))
    parts = {n: _source_dataset(infos[n], n, stage_index, seed, process_index, process_count, threads)
             for n in sorted(weights)}
    # Mix whole documents (so the weights mean what they say), then split the long ones.
    mixed = grain.IterDataset.mix(parts, {n: weights[n] for n in sorted(weights)})
    mixed = grain.experimental.FlatMapIterDataset(mixed, packing.SplitLongDocuments(seq_len, vocab))
    per_host = int(_get(data_config, "global_batch_size")) // process_count
    bins = int(_get(data_config, "packing_bins", 0) or max(per_host, 16))
    ds = packing.pack(mixed, seq_len, bins, _seed(seed, "pack", stage_index), vocab.pad)
    ds = ds.batch(per_host, drop_remainder=True)
    workers = int(_get(data_config, "num_workers", 0))
    if workers > 0:
        _absl_flags_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    return ds


def _absl_flags_parsed():
    # Grain 0.2.18 workers read an absl flag and die if flags are unparsed (grain issue #1355).
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


class DataIterator(grain.DatasetIterator):
    """Host-local batches across the configured stages; get_state/set_state resume exactly.

    It is a Grain DatasetIterator, so `grain.checkpoint.CheckpointSave(it)` stores it as an Orbax item.
    """

    def __init__(self, stage_datasets: Sequence[grain.IterDataset], stage_ends: Sequence[int | None],
                 vocab: Vocab):
        super().__init__()
        self._datasets, self._ends, self.vocab = list(stage_datasets), list(stage_ends), vocab
        self._stage, self._step, self._it = 0, 0, None

    @property
    def step(self) -> int:
        return self._step

    def _open(self, stage: int, inner_state: dict | None = None):
        self.close()
        self._stage = stage
        self._it = iter(self._datasets[stage])
        if inner_state is not None:
            self._it.set_state(inner_state)

    def __next__(self) -> Batch:
        end = self._ends[self._stage]
        if end is not None and self._step >= end:
            log.info("data: step %d starts mixture stage %d", self._step, self._stage + 1)
            self._open(self._stage + 1)
        if self._it is None:
            self._open(self._stage)
        batch = next(self._it)
        self._step += 1
        return batch

    def get_state(self) -> dict[str, Any]:
        return {"stage": self._stage, "step": self._step,
                "inner": None if self._it is None else self._it.get_state()}

    def set_state(self, state: dict[str, Any]) -> None:
        self._step = int(state["step"])
        self._open(int(state["stage"]), state["inner"])

    def close(self) -> None:
        if self._it is not None and hasattr(self._it, "close"):
            self._it.close()
        self._it = None


def make_train_iterator(data_config, *, seq_len: int | None = None, batch_size: int | None = None,
                        total_steps: int | None = None, process_index: int | None = None,
                        process_count: int | None = None, vocab_size: int | None = None,
                        split: str = "train") -> DataIterator:
    """Validates the config and sources, then returns the host-local batch iterator.

    seq_len / batch_size (global rows per step), when given, override data_config.seq_len /
    data_config.global_batch_size, so a runner can keep train.seq_len / train.batch_size as the one
    source of truth. Batches are dicts of int32 numpy arrays [batch_size / process_count, seq_len]:
    tokens, segment_ids, positions, loss_mask (docs/CONVENTIONS.md). process_index/count default to JAX's.
    vocab_size: the model's, checked against the sources' vocabulary. split: "eval" reads eval_shards
    when the sources come from the *_shards fields.
    """
    data_config = _with_shape(data_config, seq_len, batch_size)
    if process_index is None or process_count is None:
        import jax

        process_index, process_count = jax.process_index(), jax.process_count()
    infos = validate(data_config, total_steps, process_count, vocab_size=vocab_size, split=split)
    log.info("%s data: %s", split, ", ".join(f"{n} = {i.path} ({i.documents:,} documents, vocab {i.vocab.name})"
                                             for n, i in infos.items()))
    stages = _stages(data_config, total_steps, split)
    datasets = [build_stage_dataset(data_config, infos, st, i, process_index, process_count)
                for i, st in enumerate(stages)]
    return DataIterator(datasets, [st.end_step for st in stages], next(iter(infos.values())).vocab)


def _with_shape(data_config, seq_len, batch_size) -> dict:
    merged = dict(default_config().to_dict())
    merged.update({k: v for k, v in (data_config.items() if hasattr(data_config, "items") else vars(data_config).items())})
    if seq_len is not None:
        merged["seq_len"] = int(seq_len)
    if batch_size is not None:
        merged["global_batch_size"] = int(batch_size)
    return merged
