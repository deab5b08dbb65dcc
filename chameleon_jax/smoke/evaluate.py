"""Scoring the smoke model on held-out scenes: captioning, text-to-image, perplexity per modality.

    scenes         distinct held-out scenes (every single-object test scene + a seeded two-object sample);
                   each exact score comes with a 95% Wilson interval
    captioning     <s> <image> -> greedy caption -> caption grammar -> exact scene, per-attribute accuracy, CIDEr
    text-to-image  <s> caption <begin-image> -> h·w codes -> VQ-GAN decoder -> shape analyzer
    ceiling        the true codes decoded and read back: what the VQ-GAN alone allows
    VQA            <s> <image> question <end-turn> -> greedy one-word answer -> exact-match accuracy
    perplexity     loss, accuracy and perplexity per modality on the held-out pairs
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def attribute_accuracy(pred, truth) -> dict[str, float]:
    """Per-attribute accuracy over the true objects: matched by cell, then shape / colour / size."""
    by_cell = {o.cell: o for o in (pred.objects if pred else ())}
    n = len(truth.objects)
    out = {"cell": sum(o.cell in by_cell for o in truth.objects) / n}
    for attr in ("shape", "color", "size"):
        out[attr] = sum(o.cell in by_cell and getattr(by_cell[o.cell], attr) == getattr(o, attr)
                        for o in truth.objects) / n
    out["count"] = float(pred is not None and len(pred.objects) == n)
    return out


def _mean(rows: list[dict]) -> dict[str, float]:
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]} if rows else {}


def _interval(hits: list[float]) -> list[float]:
    """95% Wilson interval of a share of exact hits (each evaluation scene counts once)."""
    from chameleon_jax.evals import stats

    return [float(x) for x in stats.wilson_interval(int(round(sum(hits))), len(hits))]


def _by_objects(hits: list[float], objects: list[int]) -> dict[str, float]:
    """Exact share per object count ("1", "2"): the two kinds of scene behave differently."""
    return {str(n): float(np.mean([h for h, k in zip(hits, objects) if k == n])) for n in sorted(set(objects))}


def _caption_metrics(captions: list[str], truths: list[str]) -> dict:
    """CIDEr of the greedy captions against the true caption (one reference per scene)."""
    from chameleon_jax.evals import metrics

    corpus, _ = metrics.cider(captions, [[t] for t in truths])
    return {"cider": float(corpus)}


def evaluate_vqa(s, graphdef, model_cfg, params, tokenizer, scenes: list[dict], codes: np.ndarray) -> dict:
    """Held-out questions on the held-out scenes: <s> <image> question <end-turn> ⇒ greedy answer up to
    the end of the turn; exact-match accuracy overall and per question kind."""
    from chameleon_jax.evals import metrics
    from chameleon_jax.generate import GenerationConfig, Generator
    from chameleon_jax.sampling import SamplingParams

    v = tokenizer.vocab
    asked = [(i, q) for i, sc in enumerate(scenes) for q in sc["questions"]]
    answerer = Generator(graphdef, model_cfg, v, GenerationConfig(
        max_new_tokens=s.get("answer_tokens", 8), text=SamplingParams(), image_output=False,
        image_shape=codes.shape[1:], extra_stop_ids=(v.end_turn,)))
    prompts = [[v.bos, *v.image_block(codes[i]).tolist(), *tokenizer.encode(q["question"]).tolist(), v.end_turn]
               for i, q in asked]
    out = answerer(params, prompts, seed=s.seed)
    answers = [tokenizer.decode(out.row(k)).strip() for k in range(len(prompts))]
    truths = [q["answer"] for _, q in asked]
    accuracy, per_item = metrics.vqa_accuracy(answers, [[t] for t in truths])  # exact match after normalising
    hits = [float(x) for x in per_item]
    kinds = [q["kind"] for _, q in asked]
    return {
        "accuracy": float(accuracy),
        "interval": _interval(hits), "questions": len(asked),
        "by_kind": {k: float(np.mean([h for h, kk in zip(hits, kinds) if kk == k])) for k in sorted(set(kinds))},
        "examples": [{"question": q["question"], "caption": scenes[i]["caption"], "answer": a, "truth": q["answer"],
                      "hit": bool(h)} for (i, q), a, h in zip(asked, answers, hits)],
    }


def evaluate_generation(s, graphdef, model_cfg, params, tokenizer, vq_cfg, vq_params, eval_dir: Path) -> dict:
    """Captioning, text-to-image and VQA on the distinct held-out evaluation scenes; scores and examples."""
    import jax

    from chameleon_jax.data import shapes
    from chameleon_jax.generate import GenerationConfig, Generator
    from chameleon_jax.sampling import SamplingParams
    from chameleon_jax.vqgan import images as vq_images, model as vq_model

    v = tokenizer.vocab
    scenes = json.loads((eval_dir / "scenes.json").read_text())
    truths = [shapes.parse_caption(sc["caption"]) for sc in scenes]
    objects = [len(t.objects) for t in truths]
    pixels = np.stack([vq_images.load_image(str(eval_dir / sc["image"]), size=vq_cfg.resolution) for sc in scenes])
    codes = np.asarray(jax.jit(vq_model.encode)(vq_params, pixels))
    h, w = codes.shape[1:]

    # Image → text: <s> <begin-image> codes <end-image> ⇒ greedy caption up to </s>.
    captioner = Generator(graphdef, model_cfg, v, GenerationConfig(
        max_new_tokens=s.caption_tokens, text=SamplingParams(), image_output=False, image_shape=(h, w)))
    prompts = [[v.bos, *v.image_block(c).tolist()] for c in codes]
    out = captioner(params, prompts, seed=s.seed)
    captions = [tokenizer.decode(out.row(i)) for i in range(len(prompts))]
    cap_rows, cap_attr = [], []
    for text_out, truth in zip(captions, truths):
        pred = shapes.parse_caption(text_out)
        cap_rows.append({**shapes.score(pred, truth), "parsed": float(pred is not None)})
        cap_attr.append(attribute_accuracy(pred, truth))
    cap_hits = [r["exact"] for r in cap_rows]
    captioning = {**_mean(cap_rows), "interval": _interval(cap_hits), "by_objects": _by_objects(cap_hits, objects),
                  "attributes": _mean(cap_attr), **_caption_metrics(captions, [sc["caption"] for sc in scenes])}

    # Text → image: <s> caption <begin-image> ⇒ exactly h·w codes (+ end-image), decoded and analysed.
    prompts = [[v.bos, *tokenizer.encode(sc["caption"]).tolist(), v.begin_image] for sc in scenes]

    def text_to_image(guidance: str):
        painter = Generator(graphdef, model_cfg, v, GenerationConfig(
            max_new_tokens=h * w + 1, image=SamplingParams(temperature=s.image_temperature), image_output=True,
            image_shape=(h, w), guidance=guidance, text_scale=s.get("text_scale", 3.0),
            image_scale=s.get("image_scale", 1.2)))
        out = painter(params, prompts, seed=s.seed)
        gen_codes = np.stack([v.image_codes_of(out.tokens[i, : h * w]).reshape(h, w) for i in range(len(prompts))])
        images = vq_images.to_uint8(np.asarray(jax.jit(vq_model.decode)(vq_params, gen_codes)))
        preds = [shapes.analyze(img) for img in images]
        rows = [shapes.score(p, t) for p, t in zip(preds, truths)]
        hits = [r["exact"] for r in rows]
        scores = {**_mean(rows), "interval": _interval(hits), "by_objects": _by_objects(hits, objects),
                  "attributes": _mean([attribute_accuracy(p, t) for p, t in zip(preds, truths)])}
        return scores, images, [shapes.caption(p) if p else "(unreadable)" for p in preds]

    t2i, images, readback = text_to_image(s.guidance)
    if s.guidance != "none":  # what the guidance adds, measured on the same prompts
        t2i["unguided"] = text_to_image("none")[0]
    # The VQ-GAN's own ceiling: are the reconstructions of the true codes read back correctly?
    recon = vq_images.to_uint8(np.asarray(jax.jit(vq_model.decode)(vq_params, codes)))
    ceiling_hits = [float(shapes.analyze(r) == t) for r, t in zip(recon, truths)]
    vqa = evaluate_vqa(s, graphdef, model_cfg, params, tokenizer, scenes, codes) if s.get("vqa", True) else None
    return {
        "scenes": {"total": len(scenes), "single_object": objects.count(1), "two_object": objects.count(2)},
        "captioning": captioning,
        "text_to_image": {**t2i, "guidance": s.guidance, "vqgan_readback_ceiling": float(np.mean(ceiling_hits)),
                          "vqgan_readback_ceiling_by_objects": _by_objects(ceiling_hits, objects)},
        **({"vqa": {k: x for k, x in vqa.items() if k != "examples"}} if vqa else {}),
        "examples": {"captions": captions, "truth": [sc["caption"] for sc in scenes], "images": images,
                     "inputs": (pixels + 1) * 127.5, "readback": readback,
                     "ceiling_misses": [sc["caption"] for sc, hit in zip(scenes, ceiling_hits) if not hit],
                     "vqa": vqa["examples"] if vqa else []},
    }


def heldout_perplexity(config, graphdef, model_cfg, params) -> dict:
    """Loss, accuracy and perplexity per modality on the held-out pairs (config.eval.data)."""
    import jax

    from chameleon_jax.data import sources
    from chameleon_jax.evals import perplexity
    from chameleon_jax.model import sharding as shd
    from chameleon_jax.model.loss import LossConfig

    mesh = shd.make_mesh(config.mesh)
    step = perplexity.make_eval_step(graphdef, LossConfig.from_config(config.loss), mesh,
                                     jax.tree.map(lambda x: x.sharding, params))
    return perplexity.evaluate(step, params, sources.eval_batches(config), mesh)
