"""Which batches an experiment reads: its training source and its held-out source, as host-local iterators.

    it = sources.make_data_iterator(config)       # config.data: 'synthetic' or 'tokens' (pretokenized shards)
    for batch in sources.eval_batches(config):     # config.eval.steps batches of config.eval.data over config.data
        ...

`config` is the experiment's ConfigDict (chameleon_jax/config.py's shape). This module reads only the
fields that size and check the batches (train.batch_size, train.seq_len, train.steps, loss.image_ids,
model.vocab_size) and imports nothing above the data layer, so the trainer, the evaluation of a stored
checkpoint and the smoke experiment all pick their data here.
"""
from __future__ import annotations

import jax
import ml_collections

from chameleon_jax.data import synthetic


def make_data_iterator(config, data_config=None, split: str = "train"):
    """The resumable host-local batch iterator for `data_config` (default: config.data); split "eval"
    reads data.eval_shards when the token sources come from the *_shards fields."""
    data_config = data_config if data_config is not None else config.data
    kind = data_config.get("kind", "synthetic")
    if kind == "synthetic":
        return synthetic.make_iterator(
            data_config, batch_size=config.train.batch_size, seq_len=config.train.seq_len,
            image_ids=tuple(config.loss.image_ids), vocab_size=config.model.vocab_size,
            process_index=jax.process_index(), process_count=jax.process_count())
    if kind == "tokens":
        from chameleon_jax.data import pipeline  # Grain and the shard readers: only when shards are read

        cfg = {k: v for k, v in data_config.to_dict().items() if k != "kind"}
        return pipeline.make_train_iterator(cfg, seq_len=config.train.seq_len, batch_size=config.train.batch_size,
                                            total_steps=config.train.steps, vocab_size=config.model.vocab_size,
                                            split=split)
    raise ValueError(f"config.data.kind={kind!r}; choose 'synthetic' (built-in) or 'tokens' (pretokenized shards)")


def eval_data_config(config):
    """config.data with the fields of config.eval.data overriding it (held-out seed or sources)."""
    merged = config.data.to_dict()
    merged.update(config.eval.get("data", {}).to_dict() if config.eval.get("data") else {})
    return ml_collections.ConfigDict(merged)


def eval_batches(config):
    """The first config.eval.steps batches of the held-out source (a fresh iterator on every call)."""
    it = make_data_iterator(config, eval_data_config(config), split="eval")
    for _ in range(int(config.eval.steps)):
        yield next(it)
