"""Token shards on disk: `NAME.array_record` (one record per document) + `NAME.json` (its manifest entry).

A source directory holds shards and a `manifest.json` summary. A shard's JSON is written only after its
records are complete, so a shard counts as finished exactly when its JSON exists (pretokenize resumes
on that; a half-written shard is redone).
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os
from typing import Any, Iterable

from chameleon_jax.vocab import Vocab

RECORD_SUFFIX = ".array_record"
SIDECAR_SUFFIX = ".json"


def is_finished(shard_path_without_suffix: str) -> bool:
    return os.path.exists(shard_path_without_suffix + SIDECAR_SUFFIX) and os.path.exists(
        shard_path_without_suffix + RECORD_SUFFIX)


def write_shard(path_without_suffix: str, records: Iterable[bytes], summary: dict[str, Any]) -> None:
    """Writes records, then the JSON summary; both via a temporary name and an atomic rename."""
    from array_record.python.array_record_module import ArrayRecordWriter

    tmp = path_without_suffix + RECORD_SUFFIX + ".tmp"
    writer = ArrayRecordWriter(tmp, "group_size:1")  # group_size 1: cheap random access per document
    for r in records:
        writer.write(r)
    writer.close()
    os.replace(tmp, path_without_suffix + RECORD_SUFFIX)
    with open(path_without_suffix + SIDECAR_SUFFIX + ".tmp", "w") as f:
        json.dump(summary, f, indent=1)
    os.replace(path_without_suffix + SIDECAR_SUFFIX + ".tmp", path_without_suffix + SIDECAR_SUFFIX)


@dataclasses.dataclass(frozen=True)
class SourceInfo:
    path: str
    shards: tuple[str, ...]  # .array_record paths, sorted
    documents: int
    tokens: int
    max_image_block: int
    vocab: Vocab


def read_source(path: str) -> SourceInfo:
    """Finished shards of a pretokenized source; fails with the fix when there is nothing to train on."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"data source {path!r} does not exist; run `python -m chameleon_jax.pretokenize "
                                f"--out {path} ...` first, or fix the path in config.data.sources")
    sidecars = sorted(p for p in glob.glob(os.path.join(path, "*" + SIDECAR_SUFFIX))
                      if os.path.basename(p) != "manifest.json")
    entries = []
    for sc in sidecars:
        stem = sc[: -len(SIDECAR_SUFFIX)]
        if os.path.exists(stem + RECORD_SUFFIX):
            with open(sc) as f:
                entries.append((stem + RECORD_SUFFIX, json.load(f)))
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


def write_manifest(out_dir: str) -> dict[str, Any]:
    """Summarises every finished shard in out_dir into manifest.json (counts, tokens, skipped with reasons)."""
    total = {"shards": 0, "documents": 0, "tokens": {}, "skipped_by_reason": {}, "skipped": []}
    for sc in sorted(glob.glob(os.path.join(out_dir, "*" + SIDECAR_SUFFIX))):
        if os.path.basename(sc) == "manifest.json":
            continue
        with open(sc) as f:
            e = json.load(f)
        total["shards"] += 1
        total["documents"] += e["documents"]
        for k, v in e["tokens"].items():
            total["tokens"][k] = total["tokens"].get(k, 0) + v
        for s in e["skipped"]:
            total["skipped_by_reason"][s["reason"]] = total["skipped_by_reason"].get(s["reason"], 0) + 1
        total["skipped"].extend(e["skipped"])
        total["vocab"] = e["vocab"]
    with open(os.path.join(out_dir, "manifest.json.tmp"), "w") as f:
        json.dump(total, f, indent=1)
    os.replace(os.path.join(out_dir, "manifest.json.tmp"), os.path.join(out_dir, "manifest.json"))
    return total
