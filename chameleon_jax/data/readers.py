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
            n = sum(1 for _ in _jsonl_lines(path))
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


def read(unit: WorkUnit, *, allow_paths_outside_input: bool = False) -> Iterator[Item]:
    """The unit's items in order. Image paths must resolve inside the input's folder (the JSONL's
    folder, or the image folder itself) unless `allow_paths_outside_input`; one that leaves it is a skip."""
    if unit.kind == "jsonl":
        yield from _read_jsonl(unit, allow_paths_outside_input)
    elif unit.kind == "folder":
        yield from _read_folder(unit, allow_paths_outside_input)
    else:
        yield from _read_tar(unit)


def _jsonl_lines(path: str) -> Iterator[bytes]:
    """The lines of a JSONL file, split on b"\\n" only, as plan() counts them.

    A stray carriage return stays inside its line: it is JSON whitespace between tokens, and a JSON
    string cannot hold a raw one, so splitting there (universal newlines) would only break documents.
    """
    with open(path, "rb") as f:
        yield from f


def _read_jsonl(unit: WorkUnit, allow_outside: bool = False) -> Iterator[Item]:
    base = os.path.dirname(os.path.abspath(unit.path))
    for line_no, raw in enumerate(_jsonl_lines(unit.path)):
        if line_no < unit.start:
            continue
        if line_no >= unit.stop:
            break
        key = f"{os.path.basename(unit.path)}:{line_no + 1}"
        line = raw.decode("utf-8", errors="replace")
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            reason = f"malformed JSON: {e.msg} at column {e.colno}"
            if "\r" in line.rstrip("\r\n") and e.msg == "Extra data":
                reason += (" (the line holds bare carriage returns: documents must be separated by \\n; "
                           "convert CR line endings with `tr '\\r' '\\n'`)")
            yield Item(key, None, reason)
            continue
        try:
            yield Item(key, parse_document(obj, base, key, allow_outside=allow_outside))
        except BadItem as e:
            yield Item(key, None, str(e))


def image_path(root: str, ref: str, allow_outside: bool = False) -> str:
    """`ref` joined to the input root; raises BadItem if it resolves outside the root (an absolute
    path, `..`, or a symlink pointing out) and `allow_outside` is False.

    A corpus is untrusted: without this boundary a document could make pretokenize read any file the
    user can (e.g. /etc/passwd) or pull in images from elsewhere on the machine.
    """
    path = os.path.join(root, ref)
    if allow_outside:
        return path
    real_root, real = os.path.realpath(root), os.path.realpath(path)
    if os.path.commonpath([real_root, real]) != real_root:
        how = ("an absolute path" if os.path.isabs(ref) else "a path through '..'"
               if ".." in os.path.normpath(ref).split(os.sep) else "a symlink")
        raise BadItem(f"image path {ref!r} leaves the input folder {root} ({how} resolving to {real}); "
                      "move the image under the input folder, or pass --allow_paths_outside_input if the "
                      "corpus is trusted")
    return path


def _read_folder(unit: WorkUnit, allow_outside: bool = False) -> Iterator[Item]:
    for name in _folder_images(unit.path)[unit.start:unit.stop]:
        key = f"{os.path.basename(unit.path)}/{name}"
        try:
            image = image_path(unit.path, name, allow_outside)
        except BadItem as e:
            yield Item(key, None, str(e))
            continue
        caption_path = os.path.splitext(image)[0] + ".txt"
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


def _segments(content, base: str, allow_outside: bool = False) -> tuple:
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
            out.append(("image", image_path(base, seg["image"], allow_outside)))
        else:
            raise BadItem(f"segment {str(seg)[:60]!r} is neither {{'text': str}} nor {{'image': path}}")
    return tuple(out)


def parse_document(obj, base: str, key: str, *, allow_outside: bool = False) -> Document:
    """A decoded JSON line -> Document; raises BadItem naming the expected shapes, or an image path
    that leaves `base` (unless `allow_outside`)."""
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
            parsed.append((t["role"], _segments(t.get("content", ""), base, allow_outside)))
        return Document("sft", key, turns=tuple(parsed))
    if "segments" in obj:
        return Document("interleaved", key, _segments(obj["segments"], base, allow_outside))
    if isinstance(obj.get("image"), str):
        caption = obj.get("caption", obj.get("text"))
        if not isinstance(caption, str):
            raise BadItem("an image–text pair needs a string 'caption'")
        return Document("pair", key, (("text", caption), ("image", image_path(base, obj["image"], allow_outside))))
    if isinstance(obj.get("text"), str):
        return Document("text", key, (("text", obj["text"]),))
    raise BadItem(f"unrecognised document with keys {sorted(obj)[:8]}; expected text | image+caption | "
                  "segments | turns (see README, Data)")
