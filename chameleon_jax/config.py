"""The experiment config's shape, its defaults, and `validate`, which runs before anything compiles.

Experiment files in experiments/ start from `base_config()` and change only what differs.
"""

from __future__ import annotations

import copy
import logging
import re

import ml_collections

from chameleon_jax.model import trainable
from chameleon_jax.model.config import ATTENTION_KERNELS, REMAT_POLICIES, ModelConfig
from chameleon_jax.model.sharding import MESH_AXES, mesh_shape, slice_layout

log = logging.getLogger(__name__)

CHAMELEON_IMAGE_IDS = (4, 4 + 8192)  # image codes are ids 4..8195 (spec §4.7)


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict(dict(
        vocab_size=65_536, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32, head_dim=0,
        ffn_dim=0, ffn_multiple_of=256, ffn_multiplier=1.0, qk_norm_groups=1, block_order="prenorm",
        rope_theta=10_000.0, norm_eps=1e-5, dropout=0.0, init_std=0.02, scan_layers=True,
        remat="none", attention="auto", dtype="float32", param_dtype="float32"))
    c.loss = ml_collections.ConfigDict(dict(image_ids=CHAMELEON_IMAGE_IDS, z_loss_weight=1e-5))
    c.optimizer = ml_collections.ConfigDict(dict(
        peak_lr=1e-4, warmup_steps=4000, decay="exponential", final_lr_fraction=0.01,
        b1=0.9, b2=0.95, eps=1e-5, weight_decay=0.1, clip_norm=1.0))
    # Global axis sizes (one may be -1: fill). slices > 1 joins TPU slices over DCN with dcn_axis across
    # them (model.sharding.slice_layout); on CPU each process stands in for one slice.
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, slices=1, dcn_axis="data"))
    c.sharding_rules = ml_collections.ConfigDict()  # overrides of model.sharding.DEFAULT_RULES
    c.train = ml_collections.ConfigDict(dict(
        steps=1000, batch_size=8, seq_len=4096, seed=0, log_every=50, eval_every=0,
        max_bad_steps=10, microbatches=1,
        peak_flops=0.0))  # MFU denominator for all devices; 0 = datasheet (TPU/GPU) or measured (CPU)
    # Token source (train.batch_size / train.seq_len are the one source of truth for the shape):
    # kind "synthetic" (built-in, chameleon_jax.data.synthetic) or "tokens" (pretokenized shards,
    # chameleon_jax.data.pipeline.default_config() describes the fields). The tokens fields that a
    # command line can set: train_shards / eval_shards, pretokenized directories as a comma list or
    # globs (--config.data.kind=tokens --config.data.train_shards=/data/tok), and num_workers.
    c.data = ml_collections.ConfigDict(dict(kind="synthetic", seed=0, train_shards="", eval_shards="",
                                            num_workers=0), type_safe=False)
    # Held-out perplexity every train.eval_every steps over eval.steps batches; eval.data overrides
    # fields of config.data (synthetic: a different seed; tokens: held-out `sources`).
    c.eval = ml_collections.ConfigDict(dict(steps=4, data=ml_collections.ConfigDict(
        dict(seed=1_000_003), type_safe=False)))
    # Orbax: save every `every` steps (a multiple of train.log_every), keep the latest `keep`, and every
    # `keep_every`-th step for good (0 = none); SIGTERM/SIGINT save at once and exit.
    c.checkpoint = ml_collections.ConfigDict(dict(every=500, keep=3, keep_every=0, async_save=True))
    # A jax.profiler trace of steps FIRST:END (END excluded, e.g. "10:13") into DIR/profile/; "" = none.
    c.profile = ml_collections.ConfigDict(dict(steps=""))
    # Initialise params (only) from another run's checkpoint when the workdir has none (e.g. SFT).
    c.init = ml_collections.ConfigDict(dict(checkpoint=""))
    # What trains (model/trainable.py; defaults: everything). trainable: comma list of param path
    # patterns ("output", "blocks/attention", "" = none); rows: PATTERN=START:STOP or PATTERN=image, a
    # vocabulary range of a selected tensor; lora: adapters on the projections (model/lora.py), rank 0 = off.
    # Frozen params have no optimizer state and keep their bits.
    c.finetune = ml_collections.ConfigDict(dict(
        trainable="*", rows="",
        lora=ml_collections.ConfigDict(dict(rank=0, alpha=16.0, targets="wq,wk,wv,wo,w1,w3,w2"))))
    return c


def parse_profile_steps(spec: str) -> range | None:
    """profile.steps: '10:13' -> range(10, 13); '' -> None. Steps count from 1, as the logged step numbers do."""
    if not spec:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(spec))
    if not m or not 1 <= int(m[1]) < int(m[2]):
        raise ValueError(f"profile.steps={spec!r}; write FIRST:END with 1 <= FIRST < END (END excluded), "
                         f"e.g. --config.profile.steps=10:13 for steps 10, 11 and 12.")
    return range(int(m[1]), int(m[2]))


# Model fields a run chooses for itself whatever weights it starts from: how it computes, not what the weights
# are. Every other model field is a shape (or the math the weights were trained with) and comes from them.
MODEL_NUMERICS = ("dtype", "param_dtype", "remat", "attention", "attention_block", "dropout", "init_std",
                  "scan_layers")


def model_from_init_checkpoint(config, init_config, explicit=()) -> ml_collections.ConfigDict:
    """`config` with the model that `init.checkpoint`'s weights define: its shape fields and `loss.image_ids`
    from `init_config` (the config stored with that checkpoint or export), MODEL_NUMERICS kept as the
    experiment and its flags set them. As with HF's from_pretrained, the weights define the model.

    `explicit`: the config fields set on the command line ("model.d_model", ...). One that names a field the
    checkpoint defines with another value is a contradiction, and raises ValueError naming both values.
    Returns a copy; `config` is unchanged.
    """
    taken = {f"model.{k}": v for k, v in init_config["model"].items()
             if k not in MODEL_NUMERICS and k in config.model}
    if "loss" in init_config and "image_ids" in init_config["loss"]:
        taken["loss.image_ids"] = tuple(int(x) for x in init_config["loss"]["image_ids"])
    out = copy.deepcopy(config)
    errors, changed = [], []
    for name, value in taken.items():
        section, field = name.split(".")
        ours = out[section][field]
        same = tuple(ours) == value if isinstance(value, tuple) else ours == value
        if name in explicit and not same:
            errors.append(f"--config.{name}={ours!r} but init.checkpoint {config.init.checkpoint} holds "
                          f"{name}={value!r}")
        if not same:
            changed.append(f"{name}={value!r} (experiment: {ours!r})")
        with out[section].ignore_type():  # the weights' value as stored (e.g. a float where the experiment had 1)
            out[section][field] = float(value) if isinstance(ours, float) else value
    if errors:
        raise ValueError("; ".join(errors) + ". The checkpoint's weights define the model: drop the flag, or "
                         "start from a checkpoint of that shape.")
    # Numeric rows were written for the experiment's ids; `image` / `image+N` follow the checkpoint's.
    if (re.search(r"=\s*\d", out.finetune.rows) and "finetune.rows" not in explicit
            and tuple(out.loss.image_ids) != tuple(config.loss.image_ids)):
        log.warning("finetune.rows=%s was written for the experiment's loss.image_ids %s; the checkpoint's are %s "
                    "(set --config.finetune.rows for them)", out.finetune.rows,
                    tuple(config.loss.image_ids), tuple(out.loss.image_ids))
    log.info("model from init.checkpoint %s: %s", config.init.checkpoint,
             ", ".join(changed) if changed else "the experiment's shape already (nothing changed)")
    return out


def validate(config, num_devices: int | None = None) -> ModelConfig:
    """Checks the config and returns the ModelConfig; every error says how to fix it."""
    m = ModelConfig.from_config(config.model)
    errors = []
    if m.n_heads % m.n_kv_heads:
        ok = [d for d in range(1, m.n_heads + 1) if m.n_heads % d == 0]
        errors.append(f"model.n_heads={m.n_heads} is not divisible by model.n_kv_heads={m.n_kv_heads}: "
                      f"GQA needs a whole number of query heads per kv head; pick model.n_kv_heads in {ok}.")
    if m.n_heads % m.qk_norm_groups or m.n_kv_heads % m.qk_norm_groups:
        ok = [d for d in range(1, m.n_kv_heads + 1) if m.n_kv_heads % d == 0 and m.n_heads % d == 0]
        errors.append(f"model.qk_norm_groups={m.qk_norm_groups} must divide n_heads={m.n_heads} and "
                      f"n_kv_heads={m.n_kv_heads}; pick model.qk_norm_groups in {ok}.")
    if m.head_dim % 2:
        errors.append(f"head_dim={m.head_dim} must be even for rotary embeddings.")
    if m.block_order not in ("prenorm", "swin"):
        errors.append(f"model.block_order={m.block_order!r}; choose 'prenorm' (7B) or 'swin' (34B).")
    if m.remat not in REMAT_POLICIES:
        errors.append(f"model.remat={m.remat!r}; choose one of {REMAT_POLICIES}.")
    for field in ("dtype", "param_dtype"):
        if getattr(m, field) not in ("float32", "bfloat16"):
            errors.append(f"model.{field}={getattr(m, field)!r}; choose 'float32' or 'bfloat16' "
                          "(bf16 activations over fp32 weights: model.dtype='bfloat16').")
    if m.attention not in ATTENTION_KERNELS:
        errors.append(f"model.attention={m.attention!r}; choose one of {ATTENTION_KERNELS} "
                      f"('auto' = splash on TPU, the XLA path elsewhere).")
    elif m.attention == "splash" and config.train.seq_len % 128:
        errors.append(f"model.attention='splash' tiles the sequence in blocks of a multiple of 128 rows, but "
                      f"train.seq_len={config.train.seq_len}; use a multiple of 128 or model.attention='xla'.")
    if not 0.0 <= m.dropout < 1.0:
        errors.append(f"model.dropout={m.dropout} must be in [0, 1).")
    start, stop = config.loss.image_ids
    if not 0 <= start <= stop <= m.vocab_size:
        errors.append(f"loss.image_ids={tuple(config.loss.image_ids)} must lie within the vocab "
                      f"(0..{m.vocab_size}).")
    if num_devices is not None:
        try:
            data, fsdp, tensor = mesh_shape(config.mesh, num_devices)
            slice_layout(config.mesh, num_devices)
        except ValueError as e:
            errors.append(str(e))
        else:
            # Tensor sizes that split every tensor-sharded dim evenly and divide the device count.
            ok = [d for d in range(1, num_devices + 1) if num_devices % d == 0 and not any(
                n % d for n in (m.n_heads, m.n_kv_heads, m.ffn_dim, m.vocab_size))]
            for name, n in (("n_heads", m.n_heads), ("n_kv_heads", m.n_kv_heads),
                            ("ffn_dim", m.ffn_dim), ("vocab_size", m.vocab_size)):
                if n % tensor:
                    errors.append(f"model.{name}={n} is not divisible by the tensor axis "
                                  f"(mesh.tensor={tensor}); pick mesh.tensor in {ok}.")
            micro = int(config.train.get("microbatches", 1))
            if micro < 1:
                errors.append(f"train.microbatches={micro} must be >= 1.")
            elif config.train.batch_size % (micro * data * fsdp):
                errors.append(f"train.batch_size={config.train.batch_size} is not divisible by "
                              f"microbatches×data×fsdp={micro}×{data}×{fsdp}; use a multiple of "
                              f"{micro * data * fsdp} or change train.microbatches.")
    if config.get("finetune") is not None:
        errors += trainable.resolve(config.finetune, m, tuple(config.loss.image_ids))[1]
    try:
        parse_profile_steps(config.get("profile", {}).get("steps", ""))
    except ValueError as e:
        errors.append(str(e))
    if errors:
        raise ValueError("Invalid config:\n  - " + "\n  - ".join(errors))
    return m


__all__ = ["base_config", "validate", "MESH_AXES", "CHAMELEON_IMAGE_IDS"]
