"""A JSONL file of prompts -> answers in folders and one HTML page: what `--prompts FILE.jsonl` runs.

    requests, skipped = read_prompts("prompts.jsonl", default_mode="mixed")
    summary = run(loaded, requests, "/tmp/answers", Decoding(), batch_size=8, stream=sys.stdout, skipped=skipped)

One JSON object per line: {"prompt": "...", "images": ["a.png", ...], "mode": "text" | "image" | "mixed"}
("images" and "mode" optional; relative image paths are read from the JSONL file's folder). Blank
lines are ignored. A line that cannot be answered (not JSON, no prompt, an unknown mode, a missing or
corrupt image, placeholders that do not match the images) is skipped and counted with its line number;
the rest still run. Prompts are decoded in batches of one mode, at most `batch_size` each, in file
order within a mode. Answer k (k = its line number) goes to OUT/<k>/ and to OUT/index.html.
"""
from __future__ import annotations

import json
import os
from typing import Sequence, TextIO

from etils import epath

from chameleon_jax.generate import page
from chameleon_jax.generate.answer import MODES, Decoding, Loaded, Request, generate_batch, prompt_ids, write_segments


def jsonl_lines(path: str, skipped: list[tuple[int, str]]):
    """(line number, parsed object) for each non-blank line; a line that is not JSON is added to
    `skipped` with its number and reason instead."""
    for n, line in enumerate(epath.Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as e:
            skipped.append((n, f"not JSON ({e.msg})"))


def read_prompts(path: str, default_mode: str = "mixed") -> tuple[list[Request], list[tuple[int, str]]]:
    """(requests labelled by line number, [(line number, why skipped)])."""
    requests, skipped = [], []
    base = os.path.dirname(str(path))
    for n, obj in jsonl_lines(path, skipped):
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
            skipped.append((n, 'not an object with a "prompt" string'))
            continue
        images = obj.get("images", [])
        if isinstance(images, str):
            images = [images]
        if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
            skipped.append((n, '"images" must be a list of file paths'))
            continue
        mode = obj.get("mode", default_mode)
        if mode not in MODES:
            skipped.append((n, f"mode {mode!r} is not one of {list(MODES)}"))
            continue
        images = [i if os.path.isabs(i) or "://" in i else os.path.join(base, i) for i in images]
        missing = [i for i in images if not epath.Path(i).exists()]
        if missing:
            skipped.append((n, f"image not found: {missing[0]}"))
            continue
        requests.append(Request(obj["prompt"], tuple(images), mode, label=n))
    return requests, skipped


def run(loaded: Loaded, requests: Sequence[Request], out: str, decoding: Decoding, *, batch_size: int = 8,
        stream: TextIO | None = None, stream_every: int = 32, skipped: Sequence[tuple[int, str]] = (),
        flat: bool = False, compiler_options=None) -> dict:
    """Answers every request, writes OUT/<label>/ (OUT itself with `flat`, for one prompt) and
    OUT/index.html; returns a summary dict.

    Requests whose prompt cannot be built (bad image, placeholder count) join `skipped`."""
    skipped = list(skipped)
    built = []
    for r in requests:
        try:
            built.append((r, prompt_ids(loaded, r)))
        except Exception as e:  # noqa: BLE001 - a bad prompt is skipped with its reason, the run goes on
            skipped.append((r.label, f"{type(e).__name__}: {e}"))
    entries = {}
    for mode in MODES:
        group = [(r, ids) for r, ids in built if r.mode == mode]
        for start in range(0, len(group), batch_size):
            chunk = group[start:start + batch_size]
            answers, result = generate_batch(loaded, [r for r, _ in chunk], [ids for _, ids in chunk], decoding,
                                             stream=stream, stream_every=stream_every, labelled=not flat,
                                             compiler_options=compiler_options)
            for i, ((r, ids), segments) in enumerate(zip(chunk, answers)):
                folder = "" if flat else str(r.label)
                _, parts = write_segments(epath.Path(out) / folder, segments, loaded.vq_params, {
                    "checkpoint": str(loaded.step_dir), "prompt": r.prompt, "images_in": list(r.images),
                    "mode": r.mode, "seed": decoding.seed, "line": r.label, "tokens": result.row(i).tolist()})
                entries[r.label] = {"label": r.label, "prompt": r.prompt, "images_in": list(r.images),
                                    "folder": folder, "parts": parts}
    order = [r.label for r in requests if r.label in entries]
    skipped.sort()
    index = page.write(out, [entries[k] for k in order], skipped)
    return {"page": str(index), "answers": len(order), "skipped": skipped, "entries": [entries[k] for k in order],
            "images": sum("image" in p for e in entries.values() for p in e["parts"])}
