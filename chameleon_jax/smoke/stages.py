"""The CPU smoke experiment, from nothing to a report (issue 6; README "Smoke experiment").

    python -m chameleon_jax.smoke --workdir runs/smoke [--config experiments/smoke.py[:quick]]
        [--vqgan_workdir runs/vqgan_smoke]

Stages, each cached in WORKDIR so a rerun picks up where it stopped:

    data        shapes scenes → PNGs + JSONL: image–caption pairs, text-only documents, held-out pairs
    tokenizer   sentencepiece BPE on the captions
    vqgan       `vqgan.train.train_or_load` (WORKDIR/vqgan, or a cached run via --vqgan_workdir)
    pretokenize `chameleon_jax.pretokenize.run` → token shards (train and held-out)
    train       `chameleon_jax.train.runner.train` on the shards
    evaluate    captioning (greedy caption → caption grammar → exact scene and per-attribute accuracy),
                text-to-image (generated codes → VQ-GAN decoder → shape analyzer), perplexity per modality
    report      WORKDIR/report.md, PNG grids of prompts beside generations, loss curves, results.json

Everything is a function of the config's seeds, so the same seed gives the same results.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent


def load_config_file(spec: str):
    """`path.py[:arg]` -> its get_config(arg), as ml_collections' config_flags would."""
    import importlib.util

    path, _, arg = spec.partition(":")
    path = Path(path) if Path(path).exists() else REPO / path
    module_spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)


def _override(config, overrides: dict):
    for key, value in overrides.items():
        node = config
        *path, leaf = key.split(".")
        for p in path:
            node = node[p]
        node[leaf] = value
    return config


def merge_overrides(config, nested: dict):
    """Sets config[a][b] = v for every leaf of a nested dict of overrides."""
    for key, value in nested.items():
        if hasattr(value, "items"):
            merge_overrides(config[key], value)
        else:
            config[key] = value
    return config


def _done(path: Path) -> bool:
    return (path / "DONE").exists()


def _settings(path: Path) -> dict | None:
    """The settings a finished stage recorded in its DONE marker (None if unfinished)."""
    return json.loads((path / "DONE").read_text()) if _done(path) else None


def _mark(path: Path, info: dict | None = None):
    (path / "DONE").write_text(json.dumps(info or {}, indent=2))


# ------------------------------------------------------------------------------------------------ data

def build_data(s, root: Path) -> dict:
    """Train/held-out JSONL documents and PNGs; the evaluation scenes. Splits never share a scene."""
    from chameleon_jax.data import shapes

    root.mkdir(parents=True, exist_ok=True)
    meta = {"train_pairs": s.train_pairs, "train_texts": s.train_texts,
            "train_images": s.get("train_images", 0), "heldout_pairs": s.heldout_pairs, "eval_scenes": s.eval_scenes}
    if _done(root):
        if _settings(root) == meta:
            return meta
        log.info("rebuilding the data in %s: it was made with other settings than %s", root, meta)
        (root / "DONE").unlink()
    (root / "images").mkdir(exist_ok=True)
    train = shapes.iter_split("train", s.seed)
    with open(root / "train.jsonl", "w") as f:
        for i in range(s.train_pairs):
            scene = next(train)
            name = f"images/train_{i:06d}.png"
            shapes.render(scene, s.image_size).save(root / name)
            f.write(json.dumps({"id": f"pair{i}", "image": name, "caption": shapes.caption(scene)}) + "\n")
        for i in range(s.train_texts):
            f.write(json.dumps({"id": f"text{i}", "text": shapes.caption(next(train))}) + "\n")
        # Images without a caption teach the unconditional stream that classifier-free guidance
        # contrasts with (spec §6.2); as in Make-A-Scene/Chameleon-style CFG, a share of the data.
        for i in range(s.get("train_images", 0)):
            name = f"images/train_uncond_{i:06d}.png"
            shapes.render(next(train), s.image_size).save(root / name)
            f.write(json.dumps({"id": f"image{i}", "segments": [{"image": name}]}) + "\n")
    # Held-out scenes come from the test split: perplexity pairs, then the generation scenes.
    test = shapes.iter_split("test", s.seed)
    with open(root / "heldout.jsonl", "w") as f:
        for i in range(s.heldout_pairs):
            scene = next(test)
            name = f"images/heldout_{i:06d}.png"
            shapes.render(scene, s.image_size).save(root / name)
            f.write(json.dumps({"id": f"heldout{i}", "image": name, "caption": shapes.caption(scene)}) + "\n")
    scenes = []
    for i in range(s.eval_scenes):
        scene = next(test)
        name = f"images/eval_{i:06d}.png"
        shapes.render(scene, s.image_size).save(root / name)
        scenes.append({"image": name, "caption": shapes.caption(scene)})
    (root / "eval_scenes.json").write_text(json.dumps(scenes, indent=1))
    _mark(root, meta)
    return meta


def train_tokenizer(s, data: Path, root: Path) -> str:
    from chameleon_jax import text

    model = root / "spm.model"
    settings = {"text_vocab_size": s.text_vocab_size, "data": _settings(data)}
    if model.exists() and _settings(root) != settings:
        log.info("retraining the tokenizer in %s: it was made with other settings than %s", root, settings)
        model.unlink()
    if not model.exists():
        root.mkdir(parents=True, exist_ok=True)
        lines = text.corpus_lines([str(data / "train.jsonl")])
        text.train_sentencepiece(lines, str(root / "spm"), s.text_vocab_size, num_threads=1)
        _mark(root, settings)
    return str(model)


def vqgan_config(s):
    config = load_config_file(s.vqgan_config)
    return merge_overrides(config, s.vqgan_overrides)


def load_vqgan(s, workdir: Path):
    """(VQ-GAN config, params): trained now, resumed, or loaded from the finished run in `workdir`."""
    from chameleon_jax.vqgan import train as vq_train

    config = vqgan_config(s)
    return config, vq_train.train_or_load(config, workdir)


def pretokenize(s, data: Path, out: Path, tokenizer_path: str, vq_config, vq_params) -> dict:
    from chameleon_jax import pretokenize as pt
    from chameleon_jax import text
    from chameleon_jax.vqgan import images as vq_images, model as vq_model

    vq_cfg = vq_model.VQGANConfig.from_dict(vq_config.model)
    tok = text.load(tokenizer_path, image_codes=vq_cfg.n_embed)
    encode = pt.batched_encoder(vq_model.encode, vq_params, 64)
    load = functools.partial(vq_images.load_image, size=vq_cfg.resolution)
    manifests = {}
    settings = {"pair_loss": s.pair_loss, "image_first_fraction": s.image_first_fraction,
                "text_vocab_size": s.text_vocab_size, "data": _settings(data)}
    for split in ("train", "heldout"):
        target = out / split
        if _done(target) and _settings(target) != settings:
            shutil.rmtree(target)  # tokenized under other settings: its finished shards must not be resumed
        if not _done(target):
            pt.run([str(data / f"{split}.jsonl")], str(target), tokenizer=tok, encode_images=encode,
                   load_image=load, docs_per_shard=100_000, seed=s.seed, pair_loss=s.pair_loss,
                   image_first_fraction=s.image_first_fraction, show_progress=False)
            _mark(target, settings)
        manifests[split] = json.loads((target / "manifest.json").read_text())
    return manifests


# ------------------------------------------------------------------------------------------------ train

def train_config(config, tokenizer, tok_dir: Path):
    """The experiment config completed with the vocabulary and the token sources."""
    import ml_collections

    from chameleon_jax.data import pipeline

    v = tokenizer.vocab
    config.model.vocab_size = -(-v.size // 8) * 8
    config.loss.image_ids = (v.image_start, v.image_start + v.image_codes)
    data = pipeline.default_config()
    data.kind, data.sources, data.seed = "tokens", {"shapes": str(tok_dir / "train")}, config.smoke.seed
    config.data = ml_collections.ConfigDict(data.to_dict(), type_safe=False)
    config.eval.data = ml_collections.ConfigDict({"sources": {"shapes": str(tok_dir / "heldout")}},
                                                 type_safe=False)
    return config


# --------------------------------------------------------------------------------------------- evaluate

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


def evaluate_generation(s, graphdef, model_cfg, params, tokenizer, vq_config, vq_params, data: Path) -> dict:
    """Captioning and text-to-image on the held-out evaluation scenes; returns scores and examples."""
    import jax

    from chameleon_jax.data import shapes
    from chameleon_jax.generate import GenerationConfig, Generator
    from chameleon_jax.sampling import SamplingParams
    from chameleon_jax.vqgan import images as vq_images, model as vq_model

    v = tokenizer.vocab
    vq_cfg = vq_model.VQGANConfig.from_dict(vq_config.model)
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

    from chameleon_jax.evals import perplexity
    from chameleon_jax.model import sharding as shd
    from chameleon_jax.train import runner
    from chameleon_jax.train.step import LossConfig

    mesh = shd.make_mesh(config.mesh)
    step = perplexity.make_eval_step(graphdef, LossConfig.from_config(config.loss), mesh,
                                     jax.tree.map(lambda x: x.sharding, params))
    return perplexity.evaluate(step, params, runner.eval_batches(config), mesh)


# ----------------------------------------------------------------------------------------------- report

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
    attrs = lambda d: " / ".join(f"{k} {100 * v:.1f}%" for k, v in d.items())
    lines = [
        "# Smoke experiment report", "",
        f"Seed {results['seed']}; {results['eval_scenes']} held-out scenes (test split, never trained on); "
        f"total wall time {results['wall_s'] / 60:.1f} min ({', '.join(f'{k} {v:.0f}s' for k, v in results['stage_s'].items())}).",
        "",
        "| metric | value | target |", "|---|---:|---:|",
        f"| captioning exact scene | {100 * cap['exact']:.1f}% | ≥ 90% |",
        f"| captioning parsed by the grammar | {100 * cap['parsed']:.1f}% | |",
        f"| text-to-image exact scene (shape analyzer; guidance: {t2i.get('guidance', 'none')}) | "
        f"{100 * t2i['exact']:.1f}% | ≥ 80% |",
        *([f"| text-to-image without guidance | {100 * t2i['unguided']['exact']:.1f}% | |"]
          if "unguided" in t2i else []),
        f"| VQ-GAN ceiling: true codes decoded and read back | {100 * t2i['vqgan_readback_ceiling']:.1f}% | |",
        f"| held-out perplexity, text | {ppl.get('text/perplexity', float('nan')):.3f} | |",
        f"| held-out perplexity, image | {ppl.get('image/perplexity', float('nan')):.3f} | |",
        f"| wall time | {results['wall_s'] / 60:.1f} min | ≤ 20 min |",
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
    (workdir / "report.md").write_text("\n".join(lines))


# ------------------------------------------------------------------------------------------------- main

def run(config, workdir, vqgan_workdir=None) -> dict:
    import jax

    from chameleon_jax import model as model_lib
    from chameleon_jax import text
    from chameleon_jax.train import metrics as metrics_lib
    from chameleon_jax.train import runner
    from chameleon_jax.vqgan import model as vq_model

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    s = config.smoke
    stage_s = {}
    t0 = time.monotonic()

    def stage(name):
        stage_s[name] = time.monotonic() - t0 - sum(stage_s.values())
        log.info("stage %s done in %.0fs", name, stage_s[name])

    data = workdir / "data"
    build_data(s, data)
    stage("data")
    tok_path = train_tokenizer(s, data, workdir / "tokenizer")
    stage("tokenizer")
    vq_config, vq_params = load_vqgan(s, Path(vqgan_workdir) if vqgan_workdir else workdir / "vqgan")
    stage("vqgan")
    n_embed = vq_model.VQGANConfig.from_dict(vq_config.model).n_embed
    tokenizer = text.load(tok_path, image_codes=n_embed)
    pretokenize(s, data, workdir / "tokens", tok_path, vq_config, vq_params)
    stage("pretokenize")

    config = train_config(config, tokenizer, workdir / "tokens")
    config.generate = {"tokenizer": tok_path, "vqgan_config": s.vqgan_config,
                       "vqgan_overrides": s.vqgan_overrides.to_dict(),
                       "vqgan_workdir": str(Path(vqgan_workdir) if vqgan_workdir else workdir / "vqgan")}
    result = runner.train(config, workdir / "train")
    stage("train")

    model_cfg = model_lib.ModelConfig.from_config(config.model)
    graphdef, _ = model_lib.abstract(model_cfg)
    params = jax.device_get(result.state["params"])
    gen = evaluate_generation(s, graphdef, model_cfg, params, tokenizer, vq_config, vq_params, data)
    metrics = metrics_lib.read_metrics(workdir / "train")
    ppl = heldout_perplexity(config, graphdef, model_cfg, result.state["params"])
    stage("evaluate")

    results = {
        "seed": s.seed, "eval_scenes": s.eval_scenes,
        "captioning": gen["captioning"], "text_to_image": gen["text_to_image"], "perplexity": ppl,
        "model": f"d={model_cfg.d_model}, {model_cfg.n_layers} layers, vocab {model_cfg.vocab_size}, "
                 f"{sum(x.size for x in jax.tree.leaves(params)) / 1e6:.2f}M params",
        "train_steps": int(result.step), "tokens_per_step": config.train.batch_size * config.train.seq_len,
        "stage_s": stage_s, "wall_s": time.monotonic() - t0,
    }
    write_report(workdir, results, gen["examples"], metrics, s.grid_examples)
    stage("report")
    results["stage_s"], results["wall_s"] = stage_s, time.monotonic() - t0
    (workdir / "results.json").write_text(json.dumps(results, indent=2))
    write_report(workdir, results, gen["examples"], metrics, s.grid_examples)
    return results


def main(argv=None):
    import argparse

    ap = argparse.ArgumentParser(description="CPU smoke experiment: shapes → tokenizer → VQ-GAN → Chameleon → report")
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--config", default="experiments/smoke.py", help="path.py[:variant]")
    ap.add_argument("--vqgan_workdir", default=None,
                    help="VQ-GAN run to reuse or create (default WORKDIR/vqgan); a finished run is loaded, not retrained")
    args, rest = ap.parse_known_args(argv)
    config = load_config_file(args.config)
    overrides = {}
    for item in rest:  # --config.a.b=value, as ml_collections' flags
        if not item.startswith("--config.") or "=" not in item:
            raise SystemExit(f"unknown argument {item!r}; overrides look like --config.train.steps=100")
        key, value = item[len("--config."):].split("=", 1)
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    _override(config, overrides)
    from chameleon_jax import cpu
    vq_batch = vqgan_config(config.smoke).data.batch_size
    cpu.use_every_core(divides=(config.train.batch_size, vq_batch))  # data-parallel over the cores
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("absl", "orbax", "jax._src"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    results = run(config, args.workdir, args.vqgan_workdir)
    cap, t2i = results["captioning"], results["text_to_image"]
    print(f"\ncaptioning exact {100 * cap['exact']:.1f}%  text-to-image exact {100 * t2i['exact']:.1f}%  "
          f"perplexity text {results['perplexity'].get('text/perplexity', float('nan')):.3f} image "
          f"{results['perplexity'].get('image/perplexity', float('nan')):.3f}  wall {results['wall_s'] / 60:.1f} min")
    print(f"report: {Path(args.workdir) / 'report.md'}")


if __name__ == "__main__":
    from chameleon_jax import cpu
    cpu.use_huge_pages()  # before anything allocates; see chameleon_jax/cpu.py
    main()
