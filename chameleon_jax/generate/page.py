"""The answers as one HTML page: OUT/index.html, each prompt followed by its text and images in order.

Each answer's files sit in a folder beside the page (written by `answer.write_segments`); the page
links them by relative path, so the folder can be copied or served as it is. Every piece of text
(prompts, answers, file names, skip reasons) goes through html.escape.
"""
from __future__ import annotations

import html
import urllib.parse
from typing import Sequence

from etils import epath

# Code grids decode to small images (16 px for tiny models); they are drawn 4x with nearest-neighbour
# scaling so every generated pixel stays a sharp square block.
SCALE = 4

_STYLE = """body { font-family: sans-serif; margin: 16px; background: #fff; color: #111; }
section { margin-bottom: 24px; }
.prompt { background: #eef; padding: 6px; white-space: pre-wrap; }
.text { white-space: pre-wrap; }
img { image-rendering: pixelated; display: block; margin: 6px 0; }
.skipped { color: #a00; }"""


def _src(folder: str, name: str) -> str:
    return html.escape(urllib.parse.quote(f"{folder}/{name}" if folder else name), quote=True)


def render(entries: Sequence[dict], skipped: Sequence[tuple[int, str]] = (), title: str = "Generated answers") -> str:
    """entries: {"label", "prompt", "images_in", "folder", "parts"} with parts as from write_segments."""
    out = ["<!DOCTYPE html>", '<html><head><meta charset="utf-8">', f"<title>{html.escape(title)}</title>",
           f"<style>{_STYLE}</style></head><body>", f"<h1>{html.escape(title)}</h1>"]
    for e in entries:
        out.append(f'<section id="answer-{html.escape(str(e["label"]), quote=True)}">')
        out.append(f"<h2>Prompt {html.escape(str(e['label']))}</h2>")
        inputs = "".join(f" [{html.escape(str(p))}]" for p in e.get("images_in", ()))
        out.append(f'<p class="prompt">{html.escape(e["prompt"])}{inputs}</p>')
        for part in e["parts"]:
            if "text" in part:
                out.append(f'<p class="text">{html.escape(part["text"])}</p>')
            else:
                w, h = part.get("size", (0, 0))
                size = f' width="{w * SCALE}" height="{h * SCALE}"' if w and h else ""
                out.append(f'<img src="{_src(e["folder"], part["image"])}"{size} '
                           f'alt="{html.escape(part["image"], quote=True)}">')
        out.append("</section>")
    if skipped:
        out.append(f'<h2 class="skipped">Skipped {len(skipped)} line(s)</h2><ul class="skipped">')
        out += [f"<li>line {n}: {html.escape(reason)}</li>" for n, reason in skipped]
        out.append("</ul>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def write(out: str, entries: Sequence[dict], skipped: Sequence[tuple[int, str]] = ()) -> epath.Path:
    path = epath.Path(out) / "index.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(entries, skipped))
    return path
