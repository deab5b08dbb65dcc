"""Anole-style image-generation fine-tune: only the output head's image-code rows train (spec §10).

Meta's released Chameleon weights do not generate images. Anole restored generation by training
only the rows of the output head that score image tokens (image codes and the end-of-image token),
with everything else frozen; its users report that full fine-tuning failed where this worked. Here
that is `finetune.trainable=output` with `finetune.rows=output=image+1` (4:8197 for the release): columns 4..8196 of our output
kernel [D, V] (vocab ids 4..8195 are the image codes, 8196 is <eoss>). The other 57,340 columns and
every other tensor keep their bits, and the AdamW moments cover the trained slice only
(2 x 4,096 x 8,193 floats, 268 MB, instead of 2 x 6.9 B).

Recipe from Anole (spec §10): LR 1e-3, ~6 M image tokens of image-caption pairs, 3 epochs. Anole's
schedule, weight decay and its He-normal re-initialisation of the rows are not reproduced: weight
decay is 0 (it would only pull the trained logits toward zero), and the rows start from the release.
Dropout is off: the frozen body then computes the same features as at inference.

  # Chameleon-7B: the converted release as init.checkpoint, pretokenized image-caption pairs
  python -m chameleon_jax.train --config experiments/anole_7b.py --workdir gs://BUCKET/anole \\
      --config.init.checkpoint=gs://BUCKET/chameleon_7b --config.data.sources.images=gs://BUCKET/tokens
  python -m chameleon_jax.model_info --config experiments/anole_7b.py --num_devices 8

  # CPU: the tiny model, from a tiny pretraining run
  python -m chameleon_jax.train --config experiments/tiny.py --workdir /tmp/tiny
  python -m chameleon_jax.train --config experiments/anole_7b.py:tiny --workdir /tmp/tiny_anole \\
      --config.init.checkpoint=/tmp/tiny
"""
import importlib.util
from pathlib import Path

import ml_collections

from chameleon_jax.data import pipeline

_HERE = Path(__file__).resolve().parent


def _experiment(name):
    spec = importlib.util.spec_from_file_location(name, _HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def get_config(arg=None):
    tiny = arg == "tiny"
    c = _experiment("tiny" if tiny else "chameleon_7b")
    # Image codes are loss.image_ids; the end-of-image token follows them (vocab.py), and Anole trains
    # its row too, so that a generated image can end. `image+1` is resolved against the image ids of the
    # checkpoint the run starts from.
    c.finetune.update(trainable="output", rows="output=image+1")
    c.model.dropout = 0.0
    c.optimizer.update(peak_lr=1e-3, decay="cosine", final_lr_fraction=0.0, weight_decay=0.0,
                       warmup_steps=50)
    c.init.checkpoint = ""  # required: --config.init.checkpoint=<converted release, workdir or export>
    if tiny:
        c.optimizer.update(peak_lr=3e-3, warmup_steps=5)
        c.train.update(steps=60, log_every=10, eval_every=30)
        c.checkpoint.every = 30
    else:
        # 3 epochs of ~6 M image tokens at 16 x 4,096 tokens per step.
        c.train.update(steps=300, batch_size=16, seq_len=4096, microbatches=1, log_every=10, eval_every=100)
        c.checkpoint.every = 100
        data = pipeline.default_config()
        data.kind = "tokens"
        data.sources = {"images": ""}  # --config.data.sources.images=<pretokenized image-caption pairs>
        c.data = ml_collections.ConfigDict(data.to_dict())
        c.eval.data = ml_collections.ConfigDict({"sources": {"images": ""}})  # held-out pairs
    return c
