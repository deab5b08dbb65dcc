"""Supervised fine-tuning (spec §7.2, paper §3.2): params from a pretraining run, loss on answers only.

Recipe: cosine schedule from a low LR (1e-5), weight decay 0.1, dropout 0.05, z-loss 1e-5 as in
pretraining, 128 sequences of 4096 tokens, prompt/answer pairs packed per row, loss masked on prompt
tokens (the SFT records carry loss-mask spans; `loss_mask` is 1 on answer tokens only). Warm-up and
epochs are not stated in the paper; a short warm-up is used here.

  # Chameleon-7B: params from a pretraining workdir (or step folder / converted export)
  python -m chameleon_jax.train --config experiments/sft_7b.py --workdir gs://BUCKET/sft \\
      --config.init.checkpoint=gs://BUCKET/pretrain --config.data.sources.sft=gs://BUCKET/sft_tokens

  # CPU: the tiny model on the synthetic source with answer-only loss, from a tiny pretraining run
  python -m chameleon_jax.train --config experiments/tiny.py --workdir /tmp/tiny
  python -m chameleon_jax.train --config experiments/sft_7b.py:tiny --workdir /tmp/tiny_sft \\
      --config.init.checkpoint=/tmp/tiny

Only the params come from init.checkpoint: the optimizer starts fresh at step 0. Once the SFT
workdir has its own checkpoint, reruns resume from it and init.checkpoint is ignored.
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
    c.model.dropout = 0.05
    c.loss.z_loss_weight = 1e-5
    c.optimizer.update(peak_lr=1e-5, decay="cosine", final_lr_fraction=0.0, weight_decay=0.1,
                       warmup_steps=100)
    c.init.checkpoint = ""  # required: --config.init.checkpoint=<pretraining workdir or export>
    if tiny:
        c.optimizer.update(peak_lr=1e-3, warmup_steps=10)  # lower than tiny pretraining (3e-3)
        c.train.update(steps=100, log_every=10, eval_every=50)
        c.checkpoint.every = 50
        c.data.update(dict(kind="synthetic", answer_only=True))
        c.eval.data.update(dict(answer_only=True))
    else:
        c.train.update(steps=5000, batch_size=128, seq_len=4096, log_every=10, eval_every=500)
        data = pipeline.default_config()
        data.kind = "tokens"
        data.sources = {"sft": ""}  # --config.data.sources.sft=<pretokenized SFT conversations>
        c.data = ml_collections.ConfigDict(data.to_dict())
        c.eval.data = ml_collections.ConfigDict({"sources": {"sft": ""}})  # held-out conversations
    return c
