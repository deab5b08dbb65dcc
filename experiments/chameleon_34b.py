"""Chameleon-34B ("30b" release, spec §2.1): d=8192, 48 layers, 64 heads, 8 kv heads (GQA),
norm re-ordering (swin), 4 QK-norm groups (one per released model-parallel shard), no dropout.

  python -m chameleon_jax.model_info --config experiments/chameleon_34b.py
"""

from chameleon_jax.config import base_config


def get_config(arg=None):
    c = base_config()
    c.model.update(d_model=8192, n_layers=48, n_heads=64, n_kv_heads=8, qk_norm_groups=4,
                   block_order="swin", dropout=0.0, remat="dots_no_batch", dtype="bfloat16")
    # 3·2^22 tokens per step, accumulated over 48 microbatches of 64 sequences (1 per data shard on
    # 256 chips as fsdp 64 × tensor 4; 4 per shard on 64 chips).
    c.train.update(batch_size=3072, seq_len=4096, microbatches=48)
    c.mesh.update(data=1, fsdp=-1, tensor=4)
    return c
