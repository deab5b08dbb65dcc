"""Captioning and VQA eval sets (JSONL + images): greedy answers from a checkpoint, scored with intervals.

    results = evaluate_eval_set("runs/x/train", "coco_val/captions.jsonl", "caption", output="/tmp/r.json")
    # {"cider": {"value": 0.71, "ci": [0.62, 0.80], ...}, "items": 500, "skipped": [[3, "not JSON ..."]], ...}

One JSON object per line, image paths relative to the JSONL file's folder:
    captioning  {"image": "a.png", "references": ["a dog on grass", ...]}
    VQA         {"image": "a.png", "question": "what colour is the dog?", "answers": ["brown", ...]}
A line that cannot be scored (not JSON, a missing or mistyped field, an image that is missing or does not
decode) is skipped and counted with its line number; the rest still run.

Each item's prompt is a template with `<image>` where the image goes and, for VQA, `{question}`
(defaults in PROMPTS). Answers are greedy text (generate/answer.py `generate_batch`, the decoder
`python -m chameleon_jax.generate` uses), in batches on the loaded mesh. The scored prediction is the
output's first line, stripped: a model that goes on after its answer is scored on the answer.
With `chat`, the prompt is a user turn, as SFT records (`turns`) train it: <end-turn> follows the prompt and
decoding stops at the answer's own <end-turn>.
Scores (evals/metrics.py) come with 95% intervals (evals/stats.py): a percentile bootstrap over items
for CIDEr and the VQA consensus score, Wilson for exact-match VQA accuracy (a rate of 0/1 items).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from typing import Sequence

import numpy as np
from etils import epath

from chameleon_jax.evals import metrics, stats
from chameleon_jax.generate.answer import Decoding, Loaded, Request, generate_batch, load, prompt_ids
from chameleon_jax.generate.batch import jsonl_lines

log = logging.getLogger(__name__)

TASKS = ("caption", "vqa")
# The image, then nothing: the model continues with its caption (as the smoke's `<s> <image>` prompt).
# VQA: the image, then the question as written in the eval set.
PROMPTS = {"caption": "<image>", "vqa": "<image>{question}"}
# Greedy budget in new tokens: a caption is a sentence, a VQA answer a word or three.
MAX_NEW_TOKENS = {"caption": 32, "vqa": 10}


@dataclasses.dataclass(frozen=True)
class Item:
    """One scorable line: its line number, image (resolved path), the question (VQA) and the references
    (captions) or human answers (VQA)."""

    line: int
    image: str
    references: tuple[str, ...]
    question: str | None = None


def _string_list(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, str) for v in value)


def read_eval_set(path: str, task: str) -> tuple[list[Item], list[tuple[int, str]]]:
    """(items, [(line number, why skipped)]); blank lines are ignored."""
    if task not in TASKS:
        raise ValueError(f"task={task!r}; choose one of {TASKS}")
    field = "references" if task == "caption" else "answers"
    if not epath.Path(path).exists():
        raise ValueError(f"eval set {path} not found; give a JSONL file (one item per line, see "
                         "docs/evaluation.md)")
    items, skipped = [], []
    base = os.path.dirname(str(path))
    for n, obj in jsonl_lines(path, skipped):
        if not isinstance(obj, dict) or not isinstance(obj.get("image"), str):
            skipped.append((n, 'not an object with an "image" path'))
            continue
        if not _string_list(obj.get(field)):
            skipped.append((n, f'"{field}" must be a non-empty list of strings'))
            continue
        if task == "vqa" and not isinstance(obj.get("question"), str):
            skipped.append((n, 'no "question" string'))
            continue
        image = obj["image"]
        image = image if os.path.isabs(image) or "://" in image else os.path.join(base, image)
        if not epath.Path(image).exists():
            skipped.append((n, f"image not found: {image}"))
            continue
        items.append(Item(n, image, tuple(obj[field]), obj.get("question") if task == "vqa" else None))
    return items, skipped


def item_prompt(template: str, item: Item) -> str:
    return template.replace("{question}", item.question) if item.question is not None else template


def prediction_of(output: str) -> str:
    """The scored answer: the output's first non-empty line, stripped."""
    return next((line.strip() for line in output.split("\n") if line.strip()), "")


def score(task: str, predictions: Sequence[str], references: Sequence[Sequence[str]], *,
          confidence: float = 0.95) -> tuple[dict, dict]:
    """(corpus scores with intervals, per-item scores by name) for one task; a pure function of the text."""
    refs = [list(r) for r in references]
    if task == "caption":
        value, per_item = metrics.cider(list(predictions), refs)
        low, high = stats.bootstrap_interval(per_item, confidence)
        return {"cider": {"value": value, "ci": [low, high], "confidence": confidence,
                          "interval": "percentile bootstrap over items"}}, {"cider": per_item}
    if task != "vqa":
        raise ValueError(f"task={task!r}; choose one of {TASKS}")
    acc, correct = metrics.vqa_accuracy(list(predictions), refs)
    hits = int(correct.sum())
    low, high = stats.wilson_interval(hits, len(correct), confidence)
    scores = {"vqa_accuracy": {"value": acc, "ci": [low, high], "confidence": confidence, "correct": hits,
                               "interval": "Wilson"}}
    per_item = {"correct": correct}
    consensus, consensus_items = metrics.vqa_score(list(predictions), refs)
    scored = consensus_items[~np.isnan(consensus_items)]  # items with >= 3 human answers
    if scored.size:
        low, high = stats.bootstrap_interval(scored, confidence)
        scores["vqa_score"] = {"value": consensus, "ci": [low, high], "confidence": confidence,
                               "items": int(scored.size), "interval": "percentile bootstrap over items"}
        per_item["vqa_score"] = consensus_items
    return scores, per_item


def describe(results: dict) -> str:
    """One line for people: each score with its interval, the items scored and the lines skipped."""
    parts = []
    if "cider" in results:
        c = results["cider"]
        parts.append(f"CIDEr {c['value']:.3f} [{c['ci'][0]:.3f}, {c['ci'][1]:.3f}]")
    if "vqa_accuracy" in results:
        a = results["vqa_accuracy"]
        parts.append(f"VQA accuracy {100 * a['value']:.1f}% [{100 * a['ci'][0]:.1f}%, {100 * a['ci'][1]:.1f}%] "
                     f"({a['correct']}/{results['items']})")
    if "vqa_score" in results:
        v = results["vqa_score"]
        parts.append(f"VQA score {100 * v['value']:.1f}% [{100 * v['ci'][0]:.1f}%, {100 * v['ci'][1]:.1f}%] "
                     f"({v['items']} items with >= 3 answers)")
    confidence = next(iter(x["confidence"] for x in results.values() if isinstance(x, dict) and "confidence" in x))
    return (f"{'; '.join(parts)} ({100 * confidence:g}% intervals) over {results['items']} item(s), "
            f"{len(results['skipped'])} line(s) skipped")


def evaluate(loaded: Loaded, items: Sequence[Item], task: str, *, prompt: str | None = None,
             decoding: Decoding | None = None, batch_size: int = 16, skipped: Sequence[tuple[int, str]] = (),
             predictions_path: str | None = None, chat: bool = False, compiler_options: dict | None = None) -> dict:
    """Answers every item greedily in batches of `batch_size` on `loaded`'s mesh and scores them.

    Returns the scores (with intervals), the items scored and every skipped line; writes one JSON line per
    item (its prompt, generated ids, output text, prediction, references and scores) to `predictions_path` when given.
    Items whose prompt cannot be built (an image that does not decode) join the skipped lines."""
    if task not in TASKS:
        raise ValueError(f"task={task!r}; choose one of {TASKS}")
    template = PROMPTS[task] if prompt is None else prompt
    if template.count("<image>") > 1:
        raise ValueError(f"the prompt {template!r} has {template.count('<image>')} <image> placeholders; an item "
                         "has one image: use one <image> (or none: the image leads)")
    if task == "vqa" and "{question}" not in template:
        raise ValueError(f"the VQA prompt {template!r} has no {{question}}; put it where the question goes, "
                         f"e.g. {PROMPTS['vqa']!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1")
    decoding = decoding or Decoding(max_new_tokens=MAX_NEW_TOKENS[task])
    if chat:
        decoding = dataclasses.replace(decoding, stop_at_end_of_turn=True)
    skipped = list(skipped)
    built = []
    for item in items:
        request = Request(item_prompt(template, item), (item.image,), "text", label=item.line)
        try:
            ids = prompt_ids(loaded, request)
            built.append((item, request, ids + [loaded.vocab.end_turn] if chat else ids))
        except (ValueError, OSError) as e:  # BadImage is a ValueError: skipped with its reason, the run goes on
            skipped.append((item.line, f"{type(e).__name__}: {e}"))
    skipped.sort()
    if not built:
        first = f" (first: line {skipped[0][0]}: {skipped[0][1]})" if skipped else ""
        raise ValueError(f"no item could be scored: {len(skipped)} line(s) skipped{first}; see the eval set "
                         "format in chameleon_jax/generate/benchmark.py")
    outputs, tokens = [], []
    for start in range(0, len(built), batch_size):
        chunk = built[start:start + batch_size]
        n = len(chunk)
        if len(built) > batch_size:  # a short last batch repeats its first item: same shape, no new compile
            chunk = chunk + [chunk[0]] * (batch_size - n)
        answers, result = generate_batch(loaded, [r for _, r, _ in chunk], [ids for _, _, ids in chunk], decoding,
                                         compiler_options=compiler_options)
        outputs += ["".join(s for s in segments if isinstance(s, str)) for segments in answers[:n]]
        tokens += [result.row(i).tolist() for i in range(n)]
    preds = [prediction_of(o) for o in outputs]
    scores, per_item = score(task, preds, [item.references for item, _, _ in built])
    results = {"task": task, "checkpoint": str(loaded.step_dir), "prompt": template, "chat": chat,
               "max_new_tokens": decoding.max_new_tokens, **scores, "items": len(built),
               "skipped": [list(s) for s in skipped]}
    if predictions_path:
        field = "references" if task == "caption" else "answers"
        lines = []
        for k, ((item, request, _), output) in enumerate(zip(built, outputs)):
            record = {"line": item.line, "image": item.image, **({"question": item.question} if item.question
                                                                 is not None else {}),
                      "prompt": request.prompt, "tokens": tokens[k], "output": output, "prediction": preds[k],
                      field: list(item.references),
                      **{name: float(v[k]) for name, v in per_item.items() if not math.isnan(v[k])}}
            lines.append(json.dumps(record))
        epath.Path(predictions_path).write_text("\n".join(lines) + "\n")
        results["predictions"] = str(predictions_path)
    return results


def evaluate_eval_set(checkpoint: str, eval_set: str, task: str, *, mesh=(-1, 1, 1), prompt: str | None = None,
                      max_new_tokens: int = 0, batch_size: int = 16, output: str | None = None, chat: bool = False,
                      tokenizer: str | None = None, vqgan: str | None = None, compiler_options=None) -> dict:
    """What `python -m chameleon_jax.eval --eval_set FILE --task caption|vqa` runs: reads the eval set, loads
    the checkpoint (a workdir, step folder or export) onto a (data, fsdp, tensor) mesh (-1 fills the
    devices), answers and scores. With `output` (results.json), the results go there and the per-item
    predictions to results.predictions.jsonl beside it. `max_new_tokens` 0 = the task's default."""
    import jax

    items, skipped = read_eval_set(eval_set, task)
    for n, why in skipped:
        log.warning("skipped line %d: %s", n, why)
    mesh = tuple(int(x) for x in mesh)
    if len(mesh) != 3:
        raise ValueError(f"mesh={mesh}: give data,fsdp,tensor sizes, e.g. (1, 1, 1) or (-1, 1, 1)")
    devices = None if -1 in mesh else jax.devices()[:math.prod(mesh)]
    loaded = load(checkpoint, mesh=mesh, devices=devices, tokenizer=tokenizer, vqgan=vqgan)
    predictions = None
    if output:
        out = str(output)
        predictions = (out[:-len(".json")] if out.endswith(".json") else out) + ".predictions.jsonl"
    results = evaluate(loaded, items, task, prompt=prompt, batch_size=batch_size, skipped=skipped,
                       decoding=Decoding(max_new_tokens=max_new_tokens or MAX_NEW_TOKENS[task]),
                       predictions_path=predictions, chat=chat, compiler_options=compiler_options)
    results = {"eval_set": str(eval_set), **results}
    if output:
        epath.Path(output).write_text(json.dumps(results, indent=2))
    log.info("%s: %s", eval_set, describe(results))
    return results
