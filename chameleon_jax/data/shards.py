"""Token shards: `NAME.array_record` (one record per document) + `NAME.json` (its manifest entry).

A source directory (local, or an object-store prefix such as gs://bucket/tok) holds shards and a
`manifest.json` summary. A shard's JSON is written only after its records are complete, so a shard
counts as finished exactly when its JSON exists (pretokenize resumes on that; a half-written shard is
redone).

ArrayRecord's reader and writer open local files only (given a gs:// name, the reader hangs). Shards
bound for an object store are written locally and uploaded whole; shards read from one are copied to
a local cache first (`readable_paths`). For data larger than a host's disk, mount the bucket with
gcsfuse and give the mounted (local) path instead: the launchers set that mount up.
"""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from typing import Any, Iterable

from etils import epath

from chameleon_jax import storage
from chameleon_jax.vocab import Vocab

RECORD_SUFFIX = ".array_record"
SIDECAR_SUFFIX = ".json"
MANIFEST = "manifest.json"


def is_finished(shard_path_without_suffix: str | os.PathLike) -> bool:
    stem = os.fspath(shard_path_without_suffix)
    return epath.Path(stem + SIDECAR_SUFFIX).exists() and epath.Path(stem + RECORD_SUFFIX).exists()


def write_shard(path_without_suffix: str | os.PathLike, records: Iterable[bytes], summary: dict[str, Any]) -> None:
    """Writes the records, then the JSON summary; each appears whole or not at all."""
    from array_record.python.array_record_module import ArrayRecordWriter

    stem = os.fspath(path_without_suffix)
    with tempfile.TemporaryDirectory(prefix="shard-") as staging:
        # The writer needs a local file; locally it is beside the target, so the rename is atomic.
        local_dir = staging if storage.is_remote(stem) else os.path.dirname(os.path.abspath(stem))
        tmp = os.path.join(local_dir, os.path.basename(stem) + RECORD_SUFFIX + ".tmp")
        writer = ArrayRecordWriter(tmp, "group_size:1")  # group_size 1: cheap random access per document
        for r in records:
            writer.write(r)
        writer.close()
        if storage.is_remote(stem):
            storage.upload(tmp, stem + RECORD_SUFFIX)
        else:
            os.replace(tmp, stem + RECORD_SUFFIX)
    storage.write_atomic(stem + SIDECAR_SUFFIX, json.dumps(summary, indent=1))


@dataclasses.dataclass(frozen=True)
class SourceInfo:
    path: str
    shards: tuple[str, ...]  # .array_record paths or URLs, sorted
    documents: int
    tokens: int
    max_image_block: int
    vocab: Vocab


def _sidecars(directory: epath.Path) -> list[epath.Path]:
    return sorted((p for p in directory.glob("*" + SIDECAR_SUFFIX) if p.name != MANIFEST), key=lambda p: p.name)


def read_source(path: str | os.PathLike) -> SourceInfo:
    """Finished shards of a pretokenized source; fails with the fix when there is nothing to train on."""
    path = os.fspath(path)
    directory = epath.Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"data source {path!r} does not exist; run `python -m chameleon_jax.pretokenize "
                                f"--out {path} ...` first, or fix the path in config.data.sources")
    records = {p.name for p in directory.glob("*" + RECORD_SUFFIX)}
    entries = []
    for sc in _sidecars(directory):
        stem = sc.name[: -len(SIDECAR_SUFFIX)]
        if stem + RECORD_SUFFIX in records:
            entries.append((os.fspath(directory / (stem + RECORD_SUFFIX)), json.loads(sc.read_text())))
    entries = [(p, e) for p, e in entries if e["documents"] > 0]
    if not entries:
        raise ValueError(f"data source {path!r} has no documents (no finished non-empty *{RECORD_SUFFIX} shards); "
                         "check the pretokenize manifest.json there for skipped items, or fix the path")
    vocabs = {json.dumps(e["vocab"], sort_keys=True) for _, e in entries}
    if len(vocabs) > 1:
        raise ValueError(f"shards in {path!r} were written with different vocabularies; re-pretokenize them "
                         "with one tokenizer")
    return SourceInfo(path=path, shards=tuple(p for p, _ in entries),
                      documents=sum(e["documents"] for _, e in entries),
                      tokens=sum(sum(e["tokens"].values()) for _, e in entries),
                      max_image_block=max(e.get("max_image_block", 0) for _, e in entries),
                      vocab=Vocab(**entries[0][1]["vocab"]))


def readable_paths(info: SourceInfo, cache_dir: str | None = None) -> list[str]:
    """Local files ArrayRecord can open: local shards as they are, remote ones via a local cache
    (`storage.local_copy`; CHAMELEON_JAX_CACHE or the temp dir)."""
    return [storage.local_copy(p, cache_dir) for p in info.shards]


def match_sources(pattern: str) -> list[str]:
    """The directories a source pattern names: itself, or a glob's sorted matches (local or gs://)."""
    if not any(c in pattern for c in "*?["):
        return [pattern]
    if storage.is_remote(pattern):
        scheme, rest = pattern.split("://", 1)
        bucket, _, key_pattern = rest.partition("/")
        root = epath.Path(f"{scheme}://{bucket}")
        return sorted(os.fspath(p) for p in root.glob(key_pattern))
    import glob

    return sorted(glob.glob(pattern))


def write_manifest(out_dir: str | os.PathLike) -> dict[str, Any]:
    """Summarises every finished shard in out_dir into manifest.json (counts, tokens, skipped with reasons)."""
    out_dir = epath.Path(out_dir)
    total = {"shards": 0, "documents": 0, "tokens": {}, "skipped_by_reason": {}, "skipped": []}
    for sc in _sidecars(out_dir):
        e = json.loads(sc.read_text())
        total["shards"] += 1
        total["documents"] += e["documents"]
        for k, v in e["tokens"].items():
            total["tokens"][k] = total["tokens"].get(k, 0) + v
        for s in e["skipped"]:
            total["skipped_by_reason"][s["reason"]] = total["skipped_by_reason"].get(s["reason"], 0) + 1
        total["skipped"].extend(e["skipped"])
        total["vocab"] = e["vocab"]
    storage.write_atomic(out_dir / MANIFEST, json.dumps(total, indent=1))
    return total
