"""The judging pages: one prompt with its two answers side by side, and the rates.

The judge sees "left" and "right" only: image addresses name the side, never the checkpoint's folder,
and no page before the rates names A or B. Every piece of text (prompts, model output, file names)
goes through html.escape: model output is untrusted. Keys: ← left, → right, ↓ or T tie.
"""
from __future__ import annotations

import html
import urllib.parse
from typing import Mapping, Sequence

from chameleon_jax.evals import pairwise
from chameleon_jax.generate import page as answers_page

_STYLE = """body { font-family: sans-serif; margin: 16px; background: #fff; color: #111; }
.prompt { background: #eef; padding: 8px; white-space: pre-wrap; }
.pair { display: grid; grid-template-columns: 1fr 1fr; gap: 16px; margin: 12px 0; }
.response { border: 1px solid #ccc; padding: 8px; min-width: 0; }
.text { white-space: pre-wrap; overflow-wrap: anywhere; }
img { image-rendering: pixelated; display: block; margin: 6px 0; max-width: 100%; height: auto; }
img.input { width: 256px; }
form { display: flex; gap: 12px; justify-content: center; }
button { font-size: 18px; padding: 8px 20px; }
button.chosen { outline: 3px solid #2a7; }
nav { margin-top: 16px; display: flex; justify-content: space-between; }
pre { font-size: 15px; }"""

# Tiny models' images are 16 px: drawn up to 4x (pixelated, as generate's page) but at most ~256 px wide,
# so two 512 px answers still fit side by side.
_MAX_DRAWN = 256

_KEYS_SCRIPT = """<script>
const form = document.getElementById('judge');
let sent = false;  // one judgement per page: a second key press before the next page loads is dropped
form.addEventListener('submit', e => { if (sent) { e.preventDefault(); } sent = true; });
const keys = {ArrowLeft: 'left', ArrowRight: 'right', ArrowDown: 'tie', t: 'tie'};
document.addEventListener('keydown', e => {
  if (e.repeat || e.altKey || e.ctrlKey || e.metaKey) return;
  const choice = keys[e.key.length === 1 ? e.key.toLowerCase() : e.key];
  if (!choice) return;
  e.preventDefault();
  document.getElementById('choice-' + choice).click();
});
</script>"""


def _head(title: str) -> list[str]:
    return ["<!DOCTYPE html>", '<html><head><meta charset="utf-8">', f"<title>{html.escape(title)}</title>",
            f"<style>{_STYLE}</style></head><body>"]


def _url(*parts) -> str:
    return html.escape("/" + "/".join(urllib.parse.quote(str(p), safe="") for p in parts), quote=True)


def _image(src: str, name: str, size) -> str:
    w, h = size or (0, 0)
    scale = max(1, min(answers_page.SCALE, _MAX_DRAWN // max(w, 1)))
    dims = f' width="{w * scale}" height="{h * scale}"' if w and h else ""
    return f'<img src="{src}"{dims} alt="{html.escape(name, quote=True)}">'


def _response(prompt_id, side: str, parts: Sequence[dict]) -> str:
    out = [f'<div class="response" id="{side}"><h3>{side.capitalize()}</h3>']
    for part in parts:
        if "text" in part:
            out.append(f'<p class="text">{html.escape(part["text"])}</p>')
        else:
            out.append(_image(_url("image", prompt_id, side, part["image"]), part["image"], part.get("size")))
    out.append("</div>")
    return "\n".join(out)


def _prompt_body(pid, text: str, n_images: int) -> str:
    """The prompt's text with its input images where its `<image>` placeholders are (or leading, as
    generate.build_prompt places images when there is no placeholder)."""
    images = [f'<img class="input" src="{_url("input", pid, k)}" alt="input image {k + 1}">' for k in range(n_images)]
    pieces = text.split("<image>")
    if len(pieces) - 1 != n_images:
        return "".join(images) + html.escape(text)
    body = [html.escape(pieces[0])]
    for image, piece in zip(images, pieces[1:]):
        body += [image, html.escape(piece)]
    return "".join(body)


def render_pair(prompt: Mapping, left: Sequence[dict], right: Sequence[dict], *, judged: int, total: int,
                token: str, earlier: str | None = None, previous_id=None, next_id=None) -> str:
    """The page for one prompt: {"id", "prompt", "inputs"} and its left and right answers' parts
    (answer_parts), with the buttons; `earlier` marks the judge's earlier choice for this prompt."""
    pid = prompt["id"]
    out = _head(f"Prompt {pid}")
    out.append(f'<h1 data-prompt="{html.escape(str(pid), quote=True)}">Prompt {html.escape(str(pid))}</h1>')
    out.append(f'<p id="progress">{judged} of {total} judged</p>')
    out.append(f'<div class="prompt">{_prompt_body(pid, prompt["prompt"], len(prompt.get("inputs", ())))}</div>')
    out.append('<div class="pair">')
    out.append(_response(pid, "left", left))
    out.append(_response(pid, "right", right))
    out.append("</div>")
    out.append(f'<form id="judge" method="post" action="{_url("prompt", pid)}">')
    out.append(f'<input type="hidden" name="token" value="{html.escape(token, quote=True)}">')
    labels = {"left": "&larr; Left is better", "tie": "Tie (&darr; or T)", "right": "Right is better &rarr;"}
    for choice in ("left", "tie", "right"):
        chosen = ' class="chosen"' if choice == earlier else ""
        out.append(f'<button type="submit" name="choice" value="{choice}" id="choice-{choice}"{chosen}>'
                   f"{labels[choice]}</button>")
    out.append("</form>")
    if earlier:
        out.append(f'<p id="earlier">Judged before: {html.escape(earlier)} (a new choice replaces it)</p>')
    nav = [f'<a href="{_url("prompt", previous_id)}">previous prompt</a>' if previous_id is not None else "<span></span>",
           '<a href="/report">rates (A and B named)</a>',
           f'<a href="{_url("prompt", next_id)}">next prompt</a>' if next_id is not None else "<span></span>"]
    out.append("<nav>" + "".join(nav) + "</nav>")
    out.append(_KEYS_SCRIPT)
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def render_report(text: str, *, done: bool, first_unjudged=None, bad_lines: Sequence[int] = ()) -> str:
    """The rates (pairwise.report's text) as a page, with a way back to judging."""
    out = _head("Pairwise preferences")
    out.append("<h1>All prompts judged</h1>" if done else "<h1>Rates so far</h1>")
    out.append(f'<pre id="report">{html.escape(text)}</pre>')
    if bad_lines:
        out.append(f"<p>{len(bad_lines)} unreadable line(s) in judgements.jsonl left out: "
                   f"{html.escape(', '.join(map(str, bad_lines)))}</p>")
    if first_unjudged is not None:
        out.append(f'<p><a href="{_url("prompt", first_unjudged)}">back to judging</a></p>')
    out.append(f"<p>Choices per prompt: {html.escape(', '.join(pairwise.CHOICES))}; A's win, tie and loss rates "
               "with Wilson 95% intervals, each prompt counted once (its last judgement).</p>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"
