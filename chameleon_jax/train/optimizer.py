"""AdamW with the paper's settings and its learning-rate schedules (spec §3.1), built with optax.

Precision: the optimizer works in float32 whatever `model.param_dtype` is. Gradients and params enter
it cast to float32, its moments are stored in float32, and its updates leave in float32. Then
`optax.apply_updates` adds each update to its param in float32 and rounds the sum once to the
param's dtype.
- param_dtype float32 (the default): fp32 master weights and fp32 moments, as in MaxText's default
  (weight_dtype float32) and levanter's "p=f32,c=bf16" policy. Here every cast is a no-op.
- param_dtype bfloat16: bf16 weights, but fp32 moments (10 bytes per parameter against 12). optax
  alone would store mu and nu in the params' dtype. We keep them fp32 because nu averages squared
  gradients, and an 8-bit mantissa would make that average coarse. bf16 weights have their own
  limit: an update smaller than half a bf16 spacing of its weight (between |w|·2^-9 and |w|·2^-8)
  rounds away. At |w| = 0.02 that is 6e-5 per step, so a low or decayed learning rate stalls. On
  experiments/tiny.py the bf16-weight loss drifted 0.2 from the fp32 one within 60 steps. Use bf16
  weights only for a run that does not fit with fp32 ones.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
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
    """Global-norm clipping, then AdamW(β=(0.9, 0.95), eps 1e-5, wd 0.1) by default, all in float32."""
    schedule = learning_rate_schedule(opt_cfg, total_steps)
    return in_float32(optax.chain(
        optax.clip_by_global_norm(float(opt_cfg.clip_norm)),
        optax.adamw(schedule, b1=float(opt_cfg.b1), b2=float(opt_cfg.b2), eps=float(opt_cfg.eps),
                    weight_decay=float(opt_cfg.weight_decay), mask=weight_decay_mask),
    ))


def to_float32(tree):
    """Floating leaves cast to float32 (a no-op for fp32 leaves); other leaves unchanged."""
    def cast(x):
        if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating):
            return x.astype(jnp.float32)
        return x
    return jax.tree.map(cast, tree)


def global_norm(tree) -> jax.Array:
    """The L2 norm over all leaves, squared and summed in float32.

    `optax.tree.norm` sums in each leaf's dtype, so bf16 gradients would give a bf16 norm.
    """
    return optax.tree.norm(to_float32(tree))


def in_float32(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """`tx` run on float32 copies of the gradients and params, with its state born float32.

    The state has the same structure as `tx`'s own, so `optax.tree_map_params` and checkpoints see
    no wrapper. The updates stay float32, so `optax.apply_updates` rounds only once, into the
    param's dtype.
    """
    def init(params):
        return tx.init(to_float32(params))

    def update(updates, state, params=None):
        return tx.update(to_float32(updates), state, None if params is None else to_float32(params))

    return optax.GradientTransformation(init, update)
