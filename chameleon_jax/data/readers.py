"""Raw inputs -> parsed documents (text and image references), for pretokenize.

Inputs: JSONL files (one document per line, image paths relative to the file), image folders (IMG.png +
IMG.txt caption) and webdataset-style tar shards (KEY.jpg|png + KEY.txt). Work is cut into units, one
output shard each, so hosts can split it and a rerun can skip finished shards.

JSONL document shapes (README, "Data"):
    {"text": "..."}                                                  text
    {"image": "a.png", "caption": "..."}                              image–text pair
    {"segments": [{"text": "..."}, {"image": "a.png"}, ...]}          interleaved
    {"turns": [{"role": "user", "content": [{"text": "..."}, {"image": "a.png"}]},
               {"role": "assistant", "content": "..."}]}              SFT conversation
An optional "id" names the document (it keys the pair flip); otherwise FILE:LINE does.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os
import tarfile
from typing import Iterator, Union

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
ImageRef = Union[str, bytes]  # a file path, or the bytes of an image (tar shards)


class BadItem(ValueError):
    """An input item that is skipped; its message is the reason written to the manifest."""


@dataclasses.dataclass(frozen=True)
class Document:
    kind: str  # "text" | "pair" | "interleaved" | "sft"
    key: str
    segments: tuple = ()  # ("text", str) | ("image", ImageRef)
    turns: tuple = ()  # (role, segments) for sft


@dataclasses.dataclass(frozen=True)
class WorkUnit:
    kind: str  # "jsonl" | "folder" | "tar"
    path: str
    start: int
    stop: int
    name: str  # output shard name


@dataclasses.dataclass(frozen=True)
class Item:
    key: str
    document: Document | None
    error: str | None = None


def plan(inputs: list[str], docs_per_shard: int) -> list[WorkUnit]:
    """Work units over all inputs, in a fixed order (every host computes the same plan)."""
    units = []
    for i, path in enumerate(inputs):
        stem = f"{i:03d}-{_slug(path)}"
        if not os.path.exists(path):
            raise FileNotFoundError(f"pretokenize input {path!r} does not exist; fix --input")
        if path.endswith(".jsonl"):
            with open(path, "rb") as f:
                n = sum(1 for _ in f)
            units += [WorkUnit("jsonl", path, s, min(s + docs_per_shard, n), f"{stem}-{s // docs_per_shard:05d}")
                      for s in range(0, n, docs_per_shard)]
        elif path.endswith(".tar"):
            units.append(WorkUnit("tar", path, 0, -1, f"{stem}-00000"))
        elif os.path.isdir(path):
            tars = sorted(glob.glob(os.path.join(path, "*.tar")))
            if tars:
                units += [WorkUnit("tar", t, 0, -1, f"{stem}-{j:05d}") for j, t in enumerate(tars)]
                continue
            n = len(_folder_images(path))
            units += [WorkUnit("folder", path, s, min(s + docs_per_shard, n), f"{stem}-{s // docs_per_shard:05d}")
                      for s in range(0, n, docs_per_shard)]
        else:
            raise ValueError(f"pretokenize input {path!r} is neither a .jsonl file, a .tar shard nor a directory")
    if not units:
        raise ValueError(f"pretokenize inputs {inputs} hold no documents; check the paths")
    return units


def _slug(path: str) -> str:
    base = os.path.basename(os.path.normpath(path))
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in os.path.splitext(base)[0])[:40]


def _folder_images(path: str) -> list[str]:
    return sorted(f for f in os.listdir(path) if f.lower().endswith(IMAGE_EXTENSIONS))


def read(unit: WorkUnit) -> Iterator[Item]:
    if unit.kind == "jsonl":
        yield from _read_jsonl(unit)
    elif unit.kind == "folder":
        yield from _read_folder(unit)
    else:
        yield from _read_tar(unit)


def _read_jsonl(unit: WorkUnit) -> Iterator[Item]:
    base = os.path.dirname(os.path.abspath(unit.path))
    with open(unit.path, encoding="utf-8", errors="replace") as f:
        for line_no, line in enumerate(f):
            if line_no < unit.start:
                continue
            if line_no >= unit.stop:
                break
            key = f"{os.path.basename(unit.path)}:{line_no + 1}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                yield Item(key, None, f"malformed JSON: {e.msg} at column {e.colno}")
                continue
            try:
                yield Item(key, parse_document(obj, base, key))
            except BadItem as e:
                yield Item(key, None, str(e))


def _read_folder(unit: WorkUnit) -> Iterator[Item]:
    for name in _folder_images(unit.path)[unit.start:unit.stop]:
        image = os.path.join(unit.path, name)
        caption_path = os.path.splitext(image)[0] + ".txt"
        key = f"{os.path.basename(unit.path)}/{name}"
        if not os.path.exists(caption_path):
            yield Item(key, None, f"no caption file {os.path.basename(caption_path)} next to the image")
            continue
        with open(caption_path, encoding="utf-8", errors="replace") as f:
            caption = f.read().strip()
        yield Item(key, Document("pair", key, (("text", caption), ("image", image))))


def _read_tar(unit: WorkUnit) -> Iterator[Item]:
    groups: dict[str, dict[str, bytes]] = {}
    try:
        with tarfile.open(unit.path) as tar:
            for m in tar:
                if not m.isfile():
                    continue
                stem, ext = os.path.splitext(m.name)
                groups.setdefault(stem, {})[ext.lower()] = tar.extractfile(m).read()
    except (tarfile.TarError, OSError, EOFError) as e:
        yield Item(os.path.basename(unit.path), None, f"unreadable tar shard: {e}")  # keep what was read
    for stem in sorted(groups):
        files, key = groups[stem], f"{os.path.basename(unit.path)}/{stem}"
        image = next((files[e] for e in IMAGE_EXTENSIONS if e in files), None)
        if image is None or ".txt" not in files:
            yield Item(key, None, f"tar entry {stem} needs an image ({'/'.join(IMAGE_EXTENSIONS)}) and a .txt caption, "
                                  f"has {sorted(files)}")
            continue
        caption = files[".txt"].decode("utf-8", errors="replace").strip()
        yield Item(key, Document("pair", key, (("text", caption), ("image", image))))


def _segments(content, base: str) -> tuple:
    if isinstance(content, str):
        return (("text", content),)
    if not isinstance(content, list):
        raise BadItem(f"content must be a string or a list of {{'text'|'image'}} segments, got {type(content).__name__}")
    out = []
    for seg in content:
        if isinstance(seg, str):
            out.append(("text", seg))
        elif isinstance(seg, dict) and isinstance(seg.get("text"), str):
            out.append(("text", seg["text"]))
        elif isinstance(seg, dict) and isinstance(seg.get("image"), str):
            out.append(("image", os.path.join(base, seg["image"])))
        else:
            raise BadItem(f"segment {str(seg)[:60]!r} is neither {{'text': str}} nor {{'image': path}}")
    return tuple(out)


def parse_document(obj, base: str, key: str) -> Document:
    """A decoded JSON line -> Document; raises BadItem naming the expected shapes."""
    if not isinstance(obj, dict):
        raise BadItem(f"a document must be a JSON object, got {type(obj).__name__}")
    key = str(obj.get("id", key))
    if "turns" in obj or "messages" in obj:
        turns = obj.get("turns", obj.get("messages"))
        if not isinstance(turns, list):
            raise BadItem("'turns' must be a list of {'role', 'content'} objects")
        parsed = []
        for t in turns:
            if not isinstance(t, dict) or t.get("role") not in ("user", "assistant", "system"):
                raise BadItem(f"turn {str(t)[:60]!r} needs role user|assistant|system and content")
            parsed.append((t["role"], _segments(t.get("content", ""), base)))
        return Document("sft", key, turns=tuple(parsed))
    if "segments" in obj:
        return Document("interleaved", key, _segments(obj["segments"], base))
    if isinstance(obj.get("image"), str):
        caption = obj.get("caption", obj.get("text"))
        if not isinstance(caption, str):
            raise BadItem("an image–text pair needs a string 'caption'")
        return Document("pair", key, (("text", caption), ("image", os.path.join(base, obj["image"]))))
    if isinstance(obj.get("text"), str):
        return Document("text", key, (("text", obj["text"]),))
    raise BadItem(f"unrecognised document with keys {sorted(obj)[:8]}; expected text | image+caption | "
                  "segments | turns (see README, Data)")
