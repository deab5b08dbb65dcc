"""The smoke experiment's report: WORKDIR/report.md with its figures (matplotlib, no display needed).

    report.md          the scores against their targets, per-attribute accuracy, every miss
    loss_curves.png    train and held-out loss, train next-token accuracy per modality
    text_to_image.png  prompt, generated image and what the shape analyzer read back
    captioning.png     held-out image, true caption and the model's caption
"""
from __future__ import annotations

from pathlib import Path

import numpy as np


def _grid_png(path: Path, rows, title: str):
    """rows: (image uint8 [H,W,3], caption lines) pairs, drawn as a grid of titled thumbnails."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 4
    n = len(rows)
    fig, axes = plt.subplots(-(-n // cols), cols, figsize=(cols * 3.2, -(-n // cols) * 3.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (img, text) in zip(axes.flat, rows):
        ax.imshow(np.asarray(img, np.uint8), interpolation="nearest")
        ax.set_title(text, fontsize=6.5, wrap=True)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _wrap(text: str, width: int = 38) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width))


def _loss_curves(metrics: list[dict], path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    for key, label in (("train/loss", "train total"), ("train/text/loss", "train text"),
                       ("train/image/loss", "train image")):
        pts = [(m["step"], m[key]) for m in metrics if key in m]
        if pts:
            a.plot(*zip(*pts), label=label)
    for key, label in (("eval/text/loss", "held-out text"), ("eval/image/loss", "held-out image")):
        pts = [(m["step"], m[key]) for m in metrics if key in m]
        if pts:
            a.plot(*zip(*pts), "o--", label=label)
    a.set_xlabel("step"), a.set_ylabel("cross-entropy (nats)"), a.set_yscale("log"), a.legend()
    for key, label in (("train/text/accuracy", "text"), ("train/image/accuracy", "image")):
        pts = [(m["step"], m[key]) for m in metrics if key in m]
        if pts:
            b.plot(*zip(*pts), label=label)
    b.set_xlabel("step"), b.set_ylabel("next-token accuracy (train)"), b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _misses(title: str, output_name: str, truths: list[str], outputs: list[str]) -> list[str]:
    """Markdown lines: a table of the outputs whose parsed scene differs from the truth's (none: no lines)."""
    from chameleon_jax.data import shapes

    rows = [(t, o) for t, o in zip(truths, outputs) if shapes.parse_caption(o) != shapes.parse_caption(t)]
    if not rows:
        return []
    return [f"## {title} ({len(rows)})", "", f"| truth | {output_name} |", "|---|---|",
            *(f"| {t} | {o.strip().replace('|', '/') or '(empty)'} |" for t, o in rows), ""]


def write_report(workdir: Path, results: dict, examples: dict, metrics: list[dict], n_grid: int):
    _loss_curves(metrics, workdir / "loss_curves.png")
    n = min(n_grid, len(examples["truth"]))
    _grid_png(workdir / "text_to_image.png",
              [(examples["images"][i], _wrap(f"prompt: {examples['truth'][i]}") + "\n" +
                _wrap(f"read back: {examples['readback'][i]}")) for i in range(n)],
              "text → image (generated codes decoded by the VQ-GAN)")
    _grid_png(workdir / "captioning.png",
              [(examples["inputs"][i], _wrap(f"truth: {examples['truth'][i]}") + "\n" +
                _wrap(f"model: {examples['captions'][i]}")) for i in range(n)],
              "image → text (greedy captions)")
    cap, t2i, ppl = results["captioning"], results["text_to_image"], results["perplexity"]
    vqa, sc = results.get("vqa"), results["eval_scenes"]
    attrs = lambda d: " / ".join(f"{k} {100 * v:.1f}%" for k, v in d.items())
    ci = lambda d: f"**{100 * d['exact']:.1f}%** [{100 * d['interval'][0]:.1f}, {100 * d['interval'][1]:.1f}]"
    per_n = lambda d: ", ".join(f"{n}-object {100 * v:.1f}%" for n, v in d.items())
    lines = [
        "# Smoke experiment report", "",
        f"Data seed {results['seed']}; {sc['total']} distinct held-out scenes (test split, never trained on): "
        f"all {sc['single_object']} single-object scenes and {sc['two_object']} two-object scenes drawn with "
        f"evaluation seed {results['eval_seed']}; each counts once. Intervals are 95% Wilson intervals. "
        f"Total wall time {results['wall_s'] / 60:.1f} min "
        f"({', '.join(f'{k} {v:.0f}s' for k, v in results['stage_s'].items())}).",
        "",
        "| metric | value [95% interval] | target |", "|---|---:|---:|",
        f"| captioning exact scene | {ci(cap)} ({per_n(cap['by_objects'])}) | ≥ 90% |",
        f"| captioning parsed by the grammar | {100 * cap['parsed']:.1f}% | |",
        f"| captioning CIDEr (one reference caption per scene) | {cap.get('cider', float('nan')):.3f} | |",
        f"| text-to-image exact scene (shape analyzer; guidance: {t2i.get('guidance', 'none')}) | "
        f"{ci(t2i)} ({per_n(t2i['by_objects'])}) | ≥ 85% |",
        *([f"| text-to-image without guidance | {100 * t2i['unguided']['exact']:.1f}% | |"]
          if "unguided" in t2i else []),
        f"| VQ-GAN ceiling: true codes decoded and read back | {100 * t2i['vqgan_readback_ceiling']:.1f}% "
        f"({per_n(t2i['vqgan_readback_ceiling_by_objects'])}) | |",
        *([f"| VQA exact answer ({vqa['questions']} questions; {results['train_questions']} training turns) | "
           f"**{100 * vqa['accuracy']:.1f}%** [{100 * vqa['interval'][0]:.1f}, {100 * vqa['interval'][1]:.1f}] "
           f"({', '.join(f'{k} {100 * v:.1f}%' for k, v in vqa['by_kind'].items())}) | |"] if vqa else []),
        f"| held-out perplexity, text | {ppl.get('text/perplexity', float('nan')):.3f} | |",
        f"| held-out perplexity, image | {ppl.get('image/perplexity', float('nan')):.3f} | |",
        f"| wall time | {results['wall_s'] / 60:.1f} min | ≤ 10 min quiet, ≤ 20 min under load |",
        "",
        f"Captioning per attribute: {attrs(cap['attributes'])}.",
        "",
        f"Text-to-image per attribute: {attrs(t2i['attributes'])}.",
        "",
        f"Model: {results['model']}; {results['train_steps']} steps of {results['tokens_per_step']} tokens.",
        "",
        "![loss curves](loss_curves.png)", "", "![text to image](text_to_image.png)", "",
        "![captioning](captioning.png)", "",
    ]
    # Every miss, truth beside output, so that a miss can be told apart: an unparseable string, a wrong
    # attribute, or an image the VQ-GAN could not represent (compare with the read-back ceiling above).
    lines += _misses("Captioning misses", "model", examples["truth"], examples["captions"])
    lines += _misses("Text-to-image misses", "read back from the image", examples["truth"], examples["readback"])
    if examples.get("ceiling_misses"):  # scenes the VQ-GAN itself cannot give back: text → image cannot either
        lines += [f"## VQ-GAN ceiling misses ({len(examples['ceiling_misses'])})", "",
                  *(f"- {c}" for c in examples["ceiling_misses"]), ""]
    wrong = [q for q in examples.get("vqa", []) if not q["hit"]]
    if wrong:
        lines += [f"## VQA misses ({len(wrong)})", "", "| scene | question | truth | answer |", "|---|---|---|---|",
                  *(f"| {q['caption']} | {q['question']} | {q['truth']} | {q['answer'] or '(empty)'} |" for q in wrong),
                  ""]
    (workdir / "report.md").write_text("\n".join(lines))
