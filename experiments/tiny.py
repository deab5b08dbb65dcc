"""A tiny Chameleon for CPU: tests, smoke runs and benchmarks. Variants: `swin`, `gqa`.

  python -m chameleon_jax.model_info --config experiments/tiny.py
  python -m chameleon_jax.train --config experiments/tiny.py --workdir /tmp/tiny
"""

from chameleon_jax.config import base_config


def get_config(arg=None):
    c = base_config()
    c.model.update(vocab_size=1024, d_model=64, n_layers=2, n_heads=4, n_kv_heads=4, head_dim=16,
                   ffn_dim=192, dropout=0.0, scan_layers=True)
    c.loss.image_ids = (4, 4 + 256)
    c.optimizer.update(peak_lr=3e-3, warmup_steps=20, decay="cosine")
    c.train.update(steps=300, batch_size=8, seq_len=64, log_every=25, eval_every=100)
    c.checkpoint.every = 100
    c.mesh.update(data=-1, fsdp=1, tensor=1)
    if arg == "swin":
        c.model.block_order = "swin"
    elif arg == "gqa":
        c.model.update(n_kv_heads=2, qk_norm_groups=2, block_order="swin")
    return c
