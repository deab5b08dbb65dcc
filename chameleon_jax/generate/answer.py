"""Answering one prompt from a stored checkpoint: what `python -m chameleon_jax.generate` does.

    lines = answer("runs/smoke/train", "a large red circle at the center.", "/tmp/red", mode="image")

The checkpoint's config names its tokenizer and VQ-GAN (`config.generate`, written by the smoke
experiment), or they come with a converted release: the checkpoint itself, or the export a run was
fine-tuned from (its `init.checkpoint`); `tokenizer=` / `vqgan=` give them for other runs. The output folder gets output.txt (text
segments, `[image_<n>.png]` where an image was drawn), the PNGs and output.json (ids and codes).
"""
from __future__ import annotations

import dataclasses
import json
import math
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


@dataclasses.dataclass
class Loaded:
    """A checkpoint ready to generate from: params on a mesh, tokenizer and VQ-GAN."""

    config: object
    params: dict
    model_cfg: object
    graphdef: object
    mesh: object
    rules: tuple
    step_dir: object
    tokenizer: object
    vq_cfg: object
    vq_params: dict
    grid: tuple[int, int]   # image code grid (h, w)
    # Compiled decoders by settings, so the batches of one run (same settings, same shapes) compile once.
    generators: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

    @property
    def vocab(self):
        return self.tokenizer.vocab

    @property
    def row_multiple(self) -> int:
        """Rows per batch must divide by this (the mesh axes the batch is split over: data × fsdp)."""
        return int(self.mesh.shape["data"] * self.mesh.shape["fsdp"])


def load(path: str, *, mesh=(1, 1, 1), devices=None, tokenizer: str | None = None, vqgan: str | None = None,
         vqgan_config=None) -> Loaded:
    """Restores the checkpoint at `path` (a training workdir, a step folder or a params export) onto a
    (data, fsdp, tensor) mesh of `devices` (default: all; -1 fills), sharded by the config's rules as
    eval restores it, and loads its tokenizer and VQ-GAN (given here, or named by the config's `generate`
    block, or bundled in a converted release: `path` itself or the run's init.checkpoint)."""
    import jax
    import jax.numpy as jnp

    from chameleon_jax import checkpoint as ckpt
    from chameleon_jax import model as model_lib
    from chameleon_jax import text as text_lib
    from chameleon_jax.convert import release
    from chameleon_jax.evals.checkpoint import restore_for_eval
    from chameleon_jax.model import sharding as shd
    from chameleon_jax.vqgan import checkpoint as vq_checkpoint
    from chameleon_jax.vqgan import model as vq_model

    config = ckpt.read_config(path)
    recorded = dict(config.get("generate", {}) or {})
    # A converted release (`python -m chameleon_jax.convert --from meta`) carries both inside the export, and
    # a run fine-tuned from one names it as init.checkpoint: its tokenizer and VQ-GAN are the run's too.
    exports = [path] + ([config.init.checkpoint] if config.get("init", {}).get("checkpoint") else [])
    tok_path = tokenizer or recorded.get("tokenizer") or next(
        (str(p) for p in map(release.tokenizer_path, exports) if p is not None), None)
    if not tok_path:
        raise ValueError("no tokenizer: pass --tokenizer (the run's config has no generate.tokenizer, and neither "
                         "it nor its init.checkpoint is a converted release with tokenizer/)")
    # "vqgan_workdir": the key smoke runs recorded before `generate.vqgan`.
    vq_path = vqgan or recorded.get("vqgan") or recorded.get("vqgan_workdir") or next(
        (str(p) for p in map(release.vqgan_path, exports) if p is not None), None)
    if not vq_path:
        raise ValueError("no VQ-GAN: pass --vqgan RUN (a finished `python -m chameleon_jax.vqgan.train` run or "
                         "its export); the run's config has no generate.vqgan, and neither it nor its "
                         "init.checkpoint is a converted release with vqgan/")
    vq_cfg, vq_params = vq_checkpoint.load(vq_path, vqgan_config)
    tok = text_lib.load(tok_path, image_codes=vq_cfg.n_embed)

    devices = list(devices if devices is not None else jax.devices())
    config.mesh.update(dict(zip(shd.MESH_AXES, (int(x) for x in mesh))))
    mesh = shd.make_mesh(config.mesh, devices)
    params, model_cfg, step_dir = restore_for_eval(path, config, mesh)
    graphdef, _ = model_lib.abstract(model_cfg)
    grid = tuple(int(x) for x in jax.eval_shape(
        vq_model.encode, vq_params,
        jax.ShapeDtypeStruct((1, vq_cfg.resolution, vq_cfg.resolution, 3), jnp.float32)).shape[1:])
    return Loaded(config, params, model_cfg, graphdef, mesh, shd.rules_from_config(config.get("sharding_rules")),
                  step_dir, tok, vq_cfg, vq_params, grid)


@dataclasses.dataclass(frozen=True)
class Request:
    """One prompt: text (`<image>` marks where each image goes), input image files, and the answer's mode."""

    prompt: str
    images: tuple[str, ...] = ()
    mode: str = "mixed"
    label: object = 0       # how the answer is named in the stream, the page and its folder


def prompt_ids(loaded: Loaded, request: Request) -> list[int]:
    """The request's token ids (input images encoded by the VQ-GAN); raises ValueError/BadImage on bad input."""
    import jax

    from chameleon_jax.vqgan import images as vq_images, model as vq_model

    if request.mode not in MODES:
        raise ValueError(f"mode={request.mode!r}; choose one of {MODES}")
    codes = []
    if request.images:
        pixels = np.stack([vq_images.load_image(p, size=loaded.vq_cfg.resolution) for p in request.images])
        codes = list(np.asarray(jax.jit(vq_model.encode)(loaded.vq_params, pixels)))
    return build_prompt(request.prompt, codes, loaded.tokenizer, loaded.vocab, request.mode)


@dataclasses.dataclass(frozen=True)
class Decoding:
    """How to decode: the sampling settings of `python -m chameleon_jax.generate`."""

    max_new_tokens: int = 0          # 0 = 64 text tokens plus one image (mode "image": one image)
    seed: int = 0
    text: SamplingParams = SamplingParams()
    image: SamplingParams = SamplingParams()
    guidance: str = "none"
    text_scale: float = 3.0
    image_scale: float = 1.2
    stop_at_end_of_turn: bool = False

    def budget(self, mode: str, image_len: int) -> int:
        return self.max_new_tokens or (image_len + 1 if mode == "image" else 64 + image_len + 2)


def generate_batch(loaded: Loaded, requests: Sequence[Request], ids: Sequence[list[int]], decoding: Decoding,
                   stream=None, stream_every: int = 32, labelled: bool | None = None,
                   compiler_options: dict | None = None) -> tuple[list, object]:
    """Decodes prompts of one mode as one batch on the loaded mesh; returns each answer's segments (text
    strings and code grids, in order). The batch is padded with copies of its first prompt to a
    multiple of data × fsdp. `stream` (a file, e.g. sys.stdout) gets the text as it is produced, in
    chunks of `stream_every` steps (generate/streaming.py). Also returns the GenerationOutput."""
    from chameleon_jax import vocab as vocab_lib
    from chameleon_jax.generate.decoding import GenerationConfig, Generator
    from chameleon_jax.generate.streaming import TextStream

    modes = {r.mode for r in requests}
    if len(modes) != 1:
        raise ValueError(f"one batch decodes one mode; got {sorted(modes)} (group the requests by mode)")
    mode = modes.pop()
    vocab = loaded.vocab
    image_len = loaded.grid[0] * loaded.grid[1]
    gen_config = GenerationConfig(
        max_new_tokens=decoding.budget(mode, image_len), text=decoding.text, image=decoding.image,
        image_output=mode != "text", image_shape=loaded.grid, guidance=decoding.guidance,
        text_scale=decoding.text_scale, image_scale=decoding.image_scale,
        extra_stop_ids=(vocab.end_turn,) if decoding.stop_at_end_of_turn else ())
    rows = list(ids) + [ids[0]] * (-len(ids) % loaded.row_multiple)
    streamer = TextStream(loaded.tokenizer.decode, vocab, [r.label for r in requests], stream, labelled,
                          [p[-1] == vocab.begin_image for p in ids]) if stream else None
    # A streamed batch has its own printer in the loop; otherwise a decoder compiled for these settings
    # before is reused (jit compiles again only for a new batch or prompt-length shape).
    key = (gen_config, tuple(sorted((compiler_options or {}).items())))
    gen = None if streamer else loaded.generators.get(key)
    if gen is None:
        gen = Generator(loaded.graphdef, loaded.model_cfg, vocab, gen_config, mesh=loaded.mesh, rules=loaded.rules,
                        compiler_options=compiler_options, on_step=streamer.put if streamer else None,
                        stream_every=stream_every)
        if not streamer:
            loaded.generators[key] = gen
    result = gen(loaded.params, rows, seed=decoding.seed)
    if streamer:
        streamer.end()
    answers = []
    for r, prompt in enumerate(ids):
        row = result.row(r)
        if prompt[-1] == vocab.begin_image:  # the answer continues the image the prompt opened
            row = np.concatenate([[vocab.begin_image], row])
        answers.append(vocab_lib.render(row, vocab, loaded.tokenizer.decode, loaded.grid))
    return answers, result


def answer(path: str, prompt: str, out: str, *, images: Sequence[str] = (), mode: str = "mixed",
           max_new_tokens: int = 0, seed: int = 0, text: SamplingParams = SamplingParams(),
           image: SamplingParams = SamplingParams(), guidance: str = "none", text_scale: float = 3.0,
           image_scale: float = 1.2, stop_at_end_of_turn: bool = False, tokenizer: str | None = None,
           vqgan: str | None = None, vqgan_config=None, mesh=(1, 1, 1), stream=None) -> list[str]:
    """Generates an answer to `prompt` (with `images` at its `<image>` placeholders) from the checkpoint
    at `path` (a training workdir, a step folder or a params export) and writes it to `out`.

    Returns the answer's lines: text segments, and `[image_<n>.png]` for each image drawn.
    `max_new_tokens` 0 = 64 text tokens plus one image (`mode="image"`: one image).
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}; choose one of {MODES}")
    import jax

    loaded = load(path, mesh=mesh, devices=jax.devices()[:math.prod(mesh)] if -1 not in mesh else None,
                  tokenizer=tokenizer, vqgan=vqgan, vqgan_config=vqgan_config)
    request = Request(prompt, tuple(images), mode)
    ids = prompt_ids(loaded, request)
    decoding = Decoding(max_new_tokens, seed, text, image, guidance, text_scale, image_scale, stop_at_end_of_turn)
    (segments,), result = generate_batch(loaded, [request], [ids], decoding, stream=stream)
    return write_answer(out, segments, loaded.vq_params, {
        "checkpoint": str(loaded.step_dir), "prompt": prompt, "images_in": list(images), "mode": mode,
        "seed": seed, "tokens": result.row(0).tolist()})


def write_answer(out: str, segments: list, vq_params, record: dict) -> list[str]:
    """output.txt, output.json and image_<n>.png (decoded by the VQ-GAN) in `out`; returns the text lines."""
    return write_segments(out, segments, vq_params, record)[0]


def write_segments(out: str, segments: list, vq_params, record: dict) -> tuple[list[str], list[dict]]:
    """As `write_answer`; also returns the parts in order ({"text": ...} or {"image": file name, ...})."""
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
        parts.append({"image": name, "codes": seg.tolist(), "size": [int(pixels.shape[1]), int(pixels.shape[0])]})
    (out / "output.txt").write_text("\n".join(lines) + "\n")
    (out / "output.json").write_text(json.dumps({**record, "segments": parts}, indent=1))
    return lines, parts
