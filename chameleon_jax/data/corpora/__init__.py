"""Offline corpora for smoke runs and tests, written as JSONL documents that pretokenize reads.

    python -m chameleon_jax.data.corpora shapes --out /data/shapes --count 2000 [--split train]
    python -m chameleon_jax.data.corpora pydoc  --out /data/pydoc

shapes: the procedural scenes of `chameleon_jax.data.shapes` as image–caption pairs (PNG files plus
pairs.jsonl); pretokenize turns each into text→image or image→text with probability 0.5 (paper §2.2).
pydoc: English prose from `pydoc_data.topics`, which ships with Python, as text documents.
"""
from __future__ import annotations

import json
import os
import re
from typing import Iterator


def pydoc_documents(min_chars: int = 400) -> Iterator[dict]:
    """Help topics split at blank lines, paragraphs regrouped into documents of >= min_chars."""
    from pydoc_data import topics

    for name in sorted(topics.topics):
        doc = []
        for para in re.split(r"\n\s*\n", topics.topics[name]):
            if para.strip():
                doc.append(para.strip())
            if sum(map(len, doc)) >= min_chars:
                yield {"id": f"pydoc/{name}/{len(doc)}", "text": "\n\n".join(doc)}
                doc = []
        if doc:
            yield {"id": f"pydoc/{name}/end", "text": "\n\n".join(doc)}


def write_pydoc(out_dir: str) -> str:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "pydoc.jsonl")
    with open(path, "w") as f:
        for d in pydoc_documents():
            f.write(json.dumps(d) + "\n")
    return path


def write_shapes(out_dir: str, count: int, split: str = "train", seed: int = 0) -> str:
    """`count` scenes of `split` (scenes are assigned to splits by hash, so none leaks) as PNG + pairs.jsonl."""
    from chameleon_jax.data import shapes

    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    path = os.path.join(out_dir, "pairs.jsonl")
    written, index = 0, 0
    with open(path, "w") as f:
        while written < count:
            scene = shapes.sample_scene(seed, index)
            index += 1
            if shapes.split_of(scene) != split:
                continue
            name = f"images/{split}_{written:06d}.png"
            shapes.render(scene).save(os.path.join(out_dir, name))
            f.write(json.dumps({"id": f"shapes/{split}/{written}", "image": name,
                                "caption": shapes.caption(scene)}) + "\n")
            written += 1
    return path
