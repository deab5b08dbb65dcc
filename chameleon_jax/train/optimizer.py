"""AdamW with the paper's settings and its learning-rate schedules (spec §3.1), built with optax."""

from __future__ import annotations

import jax
import optax


def learning_rate_schedule(opt_cfg, total_steps: int) -> optax.Schedule:
    """Linear warm-up to `peak_lr`, then exponential decay towards zero (paper), cosine or constant.

    Exponential decay: the paper gives no rate, so we reach `peak_lr · final_lr_fraction` at the last
    step (default 1%), which is "towards zero" at any run length.
    """
    warmup = int(opt_cfg.warmup_steps)
    decay_steps = max(int(total_steps) - warmup, 1)
    peak = float(opt_cfg.peak_lr)
    final = peak * float(opt_cfg.get("final_lr_fraction", 0.01))
    kind = opt_cfg.get("decay", "exponential")
    if kind == "exponential":
        decay = optax.exponential_decay(peak, decay_steps, decay_rate=final / peak)
    elif kind == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=final / peak)
    elif kind == "constant":
        decay = optax.constant_schedule(peak)
    else:
        raise ValueError(f"optimizer.decay={kind!r}; choose one of 'exponential', 'cosine', 'constant'.")
    warm = optax.linear_schedule(0.0, peak, max(warmup, 1))
    return optax.join_schedules([warm, decay], [warmup])


def weight_decay_mask(params) -> dict:
    """Decay matrices and embeddings only: never norm scales, QK-norm scales or biases.

    Decided by name rather than ndim, because stacked layers make every norm vector 2-D.
    """
    def decays(path, leaf):
        names = [str(getattr(k, "key", k)) for k in path]
        return not any("norm" in n for n in names)
    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(opt_cfg, total_steps: int) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW(β=(0.9, 0.95), eps 1e-5, wd 0.1) by default."""
    schedule = learning_rate_schedule(opt_cfg, total_steps)
    return optax.chain(
        optax.clip_by_global_norm(float(opt_cfg.clip_norm)),
        optax.adamw(schedule, b1=float(opt_cfg.b1), b2=float(opt_cfg.b2), eps=float(opt_cfg.eps),
                    weight_decay=float(opt_cfg.weight_decay), mask=weight_decay_mask),
    )
