"""Chameleon-7B (spec §2.1, §3.1): d=4096, 32 layers, 32 heads (MHA), pre-norm, dropout 0.1.

  python -m chameleon_jax.model_info --config experiments/chameleon_7b.py
  python -m chameleon_jax.train --config experiments/chameleon_7b.py --workdir gs://BUCKET/run
"""

from chameleon_jax.config import base_config


def get_config(arg=None):
    c = base_config()
    c.model.update(d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32, qk_norm_groups=1,
                   block_order="prenorm", dropout=0.1, remat="dots_no_batch", dtype="bfloat16")
    # 2^23 tokens per step, accumulated over 32 microbatches (64 sequences each) so a step fits in HBM.
    c.train.update(batch_size=2048, seq_len=4096, microbatches=32)
    c.mesh.update(data=1, fsdp=-1, tensor=1)
    return c
