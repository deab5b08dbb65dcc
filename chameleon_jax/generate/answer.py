"""Answering one prompt from a stored checkpoint: what `python -m chameleon_jax.generate` does.

    lines = answer("runs/smoke/train", "a large red circle at the center.", "/tmp/red", mode="image")

The checkpoint's config names its tokenizer and VQ-GAN (`config.generate`, written by the smoke
experiment); `tokenizer=` / `vqgan=` give them for other runs. The output folder gets output.txt (text
segments, `[image_<n>.png]` where an image was drawn), the PNGs and output.json (ids and codes).
"""
from __future__ import annotations

import json
from typing import Sequence

import numpy as np
from etils import epath

from chameleon_jax.sampling import SamplingParams

MODES = ("text", "image", "mixed")


def build_prompt(text: str, image_codes: Sequence[np.ndarray], tokenizer, vocab, mode: str) -> list[int]:
    """<s> + text with each `<image>` placeholder replaced by an image block (images lead when there is
    no placeholder); `mode="image"` ends the prompt with begin-image so the answer is an image."""
    parts = text.split("<image>")
    if len(parts) - 1 not in (0, len(image_codes)):
        raise ValueError(f"the prompt has {len(parts) - 1} <image> placeholders but {len(image_codes)} images; "
                         "give one image per placeholder (or no placeholder: the images lead)")
    ids = [vocab.bos]
    if len(parts) == 1:
        for codes in image_codes:
            ids += vocab.image_block(codes).tolist()
        parts = [text]
    for i, part in enumerate(parts):
        if i:
            ids += vocab.image_block(image_codes[i - 1]).tolist()
        if part.strip():
            ids += tokenizer.encode(part).tolist()
    if mode == "image":
        ids.append(vocab.begin_image)
    return ids


def answer(path: str, prompt: str, out: str, *, images: Sequence[str] = (), mode: str = "mixed",
           max_new_tokens: int = 0, seed: int = 0, text: SamplingParams = SamplingParams(),
           image: SamplingParams = SamplingParams(), guidance: str = "none", text_scale: float = 3.0,
           image_scale: float = 1.2, stop_at_end_of_turn: bool = False, tokenizer: str | None = None,
           vqgan: str | None = None, vqgan_config=None) -> list[str]:
    """Generates an answer to `prompt` (with `images` at its `<image>` placeholders) from the checkpoint
    at `path` (a training workdir, a step folder or a params export) and writes it to `out`.

    Returns the answer's lines: text segments, and `[image_<n>.png]` for each image drawn.
    `max_new_tokens` 0 = 64 text tokens plus one image (`mode="image"`: one image).
    """
    import jax
    import jax.numpy as jnp

    from chameleon_jax import checkpoint as ckpt
    from chameleon_jax import model as model_lib
    from chameleon_jax import text as text_lib
    from chameleon_jax import vocab as vocab_lib
    from chameleon_jax.evals.checkpoint import restore_for_eval
    from chameleon_jax.generate.decoding import GenerationConfig, Generator
    from chameleon_jax.model import sharding as shd
    from chameleon_jax.vqgan import checkpoint as vq_checkpoint
    from chameleon_jax.vqgan import images as vq_images, model as vq_model

    if mode not in MODES:
        raise ValueError(f"mode={mode!r}; choose one of {MODES}")
    config = ckpt.read_config(path)
    recorded = dict(config.get("generate", {}) or {})
    # A converted release (`python -m chameleon_jax.convert --from meta`) carries both inside the export.
    bundled = epath.Path(path)
    tok_path = tokenizer or recorded.get("tokenizer") or (
        str(path) if (bundled / text_lib.BUNDLED).is_file() else None)
    if not tok_path:
        raise ValueError("no tokenizer: pass --tokenizer (the run's config has no generate.tokenizer)")
    # "vqgan_workdir": the key smoke runs recorded before `generate.vqgan`.
    vq_path = vqgan or recorded.get("vqgan") or recorded.get("vqgan_workdir") or (
        str(path) if (bundled / vq_checkpoint.BUNDLED / "state").is_dir() else None)
    if not vq_path:
        raise ValueError("no VQ-GAN: pass --vqgan RUN (a finished `python -m chameleon_jax.vqgan.train` run or "
                         "its export); the run's config has no generate.vqgan")
    vq_cfg, vq_params = vq_checkpoint.load(vq_path, vqgan_config)
    tok = text_lib.load(tok_path, image_codes=vq_cfg.n_embed)
    vocab = tok.vocab

    config.mesh.update(data=1, fsdp=1, tensor=1)
    mesh = shd.make_mesh(config.mesh, jax.devices()[:1])
    params, model_cfg, step_dir = restore_for_eval(path, config, mesh)
    graphdef, _ = model_lib.abstract(model_cfg)

    codes = []
    if images:
        pixels = np.stack([vq_images.load_image(p, size=vq_cfg.resolution) for p in images])
        codes = list(np.asarray(jax.jit(vq_model.encode)(vq_params, pixels)))
    grid = tuple(int(x) for x in jax.eval_shape(
        vq_model.encode, vq_params,
        jax.ShapeDtypeStruct((1, vq_cfg.resolution, vq_cfg.resolution, 3), jnp.float32)).shape[1:])
    image_len = grid[0] * grid[1]
    ids = build_prompt(prompt, codes, tok, vocab, mode)
    budget = max_new_tokens or (image_len + 1 if mode == "image" else 64 + image_len + 2)
    gen_config = GenerationConfig(
        max_new_tokens=budget, text=text, image=image, image_output=mode != "text", image_shape=grid,
        guidance=guidance, text_scale=text_scale, image_scale=image_scale,
        extra_stop_ids=(vocab.end_turn,) if stop_at_end_of_turn else ())
    result = Generator(graphdef, model_cfg, vocab, gen_config)(params, [ids], seed=seed)
    row = result.row(0)
    if ids[-1] == vocab.begin_image:  # the answer continues the image the prompt opened
        row = np.concatenate([[vocab.begin_image], row])
    segments = vocab_lib.render(row, vocab, tok.decode, grid)
    return write_answer(out, segments, vq_params, {
        "checkpoint": str(step_dir), "prompt": prompt, "images_in": list(images), "mode": mode, "seed": seed,
        "tokens": result.row(0).tolist()})


def write_answer(out: str, segments: list, vq_params, record: dict) -> list[str]:
    """output.txt, output.json and image_<n>.png (decoded by the VQ-GAN) in `out`; returns the text lines."""
    import io

    import jax
    from PIL import Image

    from chameleon_jax.vqgan import images as vq_images, model as vq_model

    out = epath.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lines, parts, n_images = [], [], 0
    for seg in segments:
        if isinstance(seg, str):
            lines.append(seg)
            parts.append({"text": seg})
            continue
        n_images += 1
        pixels = vq_images.to_uint8(np.asarray(jax.jit(vq_model.decode)(vq_params, seg[None])))[0]
        name = f"image_{n_images}.png"
        png = io.BytesIO()
        Image.fromarray(pixels).save(png, format="PNG")
        (out / name).write_bytes(png.getvalue())
        lines.append(f"[{name}]")
        parts.append({"image": name, "codes": seg.tolist()})
    (out / "output.txt").write_text("\n".join(lines) + "\n")
    (out / "output.json").write_text(json.dumps({**record, "segments": parts}, indent=1))
    return lines
