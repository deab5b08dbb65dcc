"""The smoke experiment's stages before evaluation; each caches its output under the workdir.

    data        shapes scenes -> PNGs + JSONL: image–caption pairs, question–answer turns, text-only
                documents, held-out pairs
    eval        the distinct held-out evaluation scenes and their questions
    tokenizer   sentencepiece BPE on the captions
    vqgan       the VQ-GAN of `smoke.vqgan_config`: trained in its run directory, or loaded if finished
    pretokenize `chameleon_jax.pretokenize.run` -> token shards (train and held-out)
    train       the experiment config completed with the vocabulary and the token sources

A finished stage writes DONE with the settings it was made with; a rerun with other settings
rebuilds that stage (and the caller rebuilds what follows) instead of reusing stale files.
"""
from __future__ import annotations

import functools
import json
import logging
import shutil
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]


class Interrupted(Exception):
    """A stage was stopped (SIGTERM: preemption or a user) after saving its checkpoint: nothing is scored;
    the same command resumes."""


def load_config_file(spec: str):
    """`path.py[:arg]` -> its get_config(arg), as ml_collections' config_flags would."""
    import importlib.util

    path, _, arg = spec.partition(":")
    path = Path(path) if Path(path).exists() else REPO / path
    module_spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)


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
    """Train/held-out JSONL documents and PNGs. Splits never share a scene."""
    from chameleon_jax.data import shapes

    root.mkdir(parents=True, exist_ok=True)
    meta = {"train_pairs": s.train_pairs, "train_texts": s.train_texts, "train_images": s.get("train_images", 0),
            "train_questions": s.get("train_questions", 0), "heldout_pairs": s.heldout_pairs}
    if _done(root):
        if _settings(root) == meta:
            return meta
        log.info("rebuilding the data in %s: it was made with other settings than %s", root, meta)
        (root / "DONE").unlink()
    (root / "images").mkdir(exist_ok=True)
    train = shapes.iter_split("train", s.seed)
    asked = np.random.default_rng([s.seed, 7])
    with open(root / "train.jsonl", "w") as f:
        for i in range(s.train_pairs):
            scene = next(train)
            name = f"images/train_{i:06d}.png"
            shapes.render(scene, s.image_size).save(root / name)
            f.write(json.dumps({"id": f"pair{i}", "image": name, "caption": shapes.caption(scene)}) + "\n")
            # Question -> one-word answer about the first train_questions pair scenes (their images are
            # reused); as an SFT turn the loss is on the answer only, like a pair's target.
            if i < s.get("train_questions", 0):
                qs = shapes.questions(scene, asked)
                _, question, answer = qs[int(asked.integers(len(qs)))]
                f.write(json.dumps({"id": f"question{i}", "turns": [
                    {"role": "user", "content": [{"image": name}, {"text": question}]},
                    {"role": "assistant", "content": answer}]}) + "\n")
        for i in range(s.train_texts):
            f.write(json.dumps({"id": f"text{i}", "text": shapes.caption(next(train))}) + "\n")
        # Images without a caption teach the unconditional stream that classifier-free guidance
        # contrasts with (official chameleon.py); as in Make-A-Scene/Chameleon-style CFG, a share of the data.
        for i in range(s.get("train_images", 0)):
            name = f"images/train_uncond_{i:06d}.png"
            shapes.render(next(train), s.image_size).save(root / name)
            f.write(json.dumps({"id": f"image{i}", "segments": [{"image": name}]}) + "\n")
    # Held-out pairs (perplexity per modality) come from the test split.
    test = shapes.iter_split("test", s.seed)
    with open(root / "heldout.jsonl", "w") as f:
        for i in range(s.heldout_pairs):
            scene = next(test)
            name = f"images/heldout_{i:06d}.png"
            shapes.render(scene, s.image_size).save(root / name)
            f.write(json.dumps({"id": f"heldout{i}", "image": name, "caption": shapes.caption(scene)}) + "\n")
    _mark(root, meta)
    return meta


def build_eval(s, root: Path) -> list[dict]:
    """The evaluation scenes (distinct, test split: `shapes.evaluation_scenes`) and their questions, in
    root/scenes.json with their PNGs. Its own stage: changing the evaluation set retrains nothing."""
    from chameleon_jax.data import shapes

    meta = {"two_object": s.eval_two_object_scenes, "single_object": s.get("eval_single_object_scenes", -1),
            "seed": s.eval_seed, "image_size": s.image_size}
    if _done(root) and _settings(root) == meta:
        return json.loads((root / "scenes.json").read_text())
    root.mkdir(parents=True, exist_ok=True)
    single = None if meta["single_object"] < 0 else meta["single_object"]
    asked = np.random.default_rng([s.eval_seed, 11])
    scenes = []
    for i, scene in enumerate(shapes.evaluation_scenes("test", s.eval_two_object_scenes, s.eval_seed, single)):
        name = f"eval_{i:06d}.png"
        shapes.render(scene, s.image_size).save(root / name)
        scenes.append({"image": name, "caption": shapes.caption(scene), "objects": len(scene.objects),
                       "questions": [{"kind": k, "question": q, "answer": a}
                                     for k, q, a in shapes.questions(scene, asked)]})
    (root / "scenes.json").write_text(json.dumps(scenes, indent=1))
    _mark(root, meta)
    return scenes


# ------------------------------------------------------------------------------------ tokenizer, vqgan

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
    """The VQ-GAN experiment config: `smoke.vqgan_config` with `smoke.vqgan_overrides` applied."""
    from chameleon_jax.vqgan.train import settings

    return settings.upgrade(merge_overrides(load_config_file(s.vqgan_config), s.vqgan_overrides))


def load_vqgan(s, run_dir: Path):
    """(VQGANConfig, params) of the VQ-GAN in `run_dir`: trained there first unless that run finished."""
    from chameleon_jax.vqgan import checkpoint as vq_checkpoint

    config = vqgan_config(s)
    if not vq_checkpoint.is_finished(run_dir):
        from chameleon_jax.vqgan import train as vq_train

        result = vq_train.train(config, run_dir)  # resumes from the run's checkpoints if it was interrupted
        if result.preempted:
            raise Interrupted(f"the VQ-GAN stopped at step {result.step} (checkpoint saved in {run_dir}); rerun "
                              "the same command to resume")
    return vq_checkpoint.load(run_dir)


# ------------------------------------------------------------------------------------------ pretokenize

def pretokenize(s, data: Path, out: Path, tokenizer_path: str, vq_cfg, vq_params) -> dict:
    from chameleon_jax import pretokenize as pt
    from chameleon_jax import text
    from chameleon_jax.vqgan import images as vq_images, model as vq_model

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
