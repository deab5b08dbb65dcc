"""Scoring the smoke model on held-out scenes: captioning, text-to-image, perplexity per modality.

    captioning     <s> <image> -> greedy caption -> caption grammar -> exact scene and per-attribute accuracy
    text-to-image  <s> caption <begin-image> -> h·w codes -> VQ-GAN decoder -> shape analyzer
    ceiling        the true codes decoded and read back: what the VQ-GAN alone allows
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


def evaluate_generation(s, graphdef, model_cfg, params, tokenizer, vq_cfg, vq_params, data: Path) -> dict:
    """Captioning and text-to-image on the held-out evaluation scenes; returns scores and examples."""
    import jax

    from chameleon_jax.data import shapes
    from chameleon_jax.generate import GenerationConfig, Generator
    from chameleon_jax.sampling import SamplingParams
    from chameleon_jax.vqgan import images as vq_images, model as vq_model

    v = tokenizer.vocab
    scenes = json.loads((data / "eval_scenes.json").read_text())
    truths = [shapes.parse_caption(sc["caption"]) for sc in scenes]
    pixels = np.stack([vq_images.load_image(str(data / sc["image"]), size=vq_cfg.resolution) for sc in scenes])
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
        scores = {**_mean([shapes.score(p, t) for p, t in zip(preds, truths)]),
                  "attributes": _mean([attribute_accuracy(p, t) for p, t in zip(preds, truths)])}
        return scores, images, [shapes.caption(p) if p else "(unreadable)" for p in preds]

    t2i, images, readback = text_to_image(s.guidance)
    if s.guidance != "none":  # what the guidance adds, measured on the same prompts
        t2i["unguided"] = text_to_image("none")[0]
    # The VQ-GAN's own ceiling: are the reconstructions of the true codes read back correctly?
    recon = vq_images.to_uint8(np.asarray(jax.jit(vq_model.decode)(vq_params, codes)))
    ceiling = float(np.mean([shapes.analyze(r) == t for r, t in zip(recon, truths)]))
    return {
        "captioning": {**_mean(cap_rows), "attributes": _mean(cap_attr)},
        "text_to_image": {**t2i, "guidance": s.guidance, "vqgan_readback_ceiling": ceiling},
        "examples": {"captions": captions, "truth": [sc["caption"] for sc in scenes], "images": images,
                     "inputs": (pixels + 1) * 127.5, "readback": readback},
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
