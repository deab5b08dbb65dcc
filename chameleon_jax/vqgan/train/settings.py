"""The VQ-GAN experiment config's shared names, and the older spellings they replace.

The VQ-GAN trainer reads the same keys as the language model's where a setting means the same thing:
`train.batch_size`, `train.steps`, `train.log_every`, `train.eval_every`, `checkpoint.every`,
`checkpoint.keep`. Configs written before those names were shared (`data.batch_size`,
`train.checkpoint_every`, `train.keep_checkpoints`) still load: `upgrade` moves each old key to its
new place and logs it once.
"""
from __future__ import annotations

import logging

import ml_collections

log = logging.getLogger(__name__)

# old key -> shared key
RENAMED = {"data.batch_size": "train.batch_size",
           "train.checkpoint_every": "checkpoint.every",
           "train.keep_checkpoints": "checkpoint.keep"}


def upgrade(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`config` with the old spellings moved to the shared keys (a copy; `config` may be locked)."""
    d = config.to_dict()
    moved = []
    for old, new in RENAMED.items():
        (old_section, old_key), (new_section, new_key) = old.split("."), new.split(".")
        if old_key not in d.get(old_section, {}):
            continue
        value = d[old_section].pop(old_key)
        present = d.setdefault(new_section, {}).get(new_key)
        if present is not None and present != value:
            raise ValueError(f"the VQ-GAN config sets both {old}={value!r} and {new}={present!r}; "
                             f"{old} is the old name of {new}: keep only {new}")
        d[new_section][new_key] = value
        moved.append(f"{old} -> {new}")
    if moved:
        log.warning("VQ-GAN config: renamed %s (the names the language model's config uses)", ", ".join(moved))
    return ml_collections.ConfigDict(d)
