"""Data-path throughput: pretokenize (images/s, docs/s) and the Grain pipeline (packed tokens/s) against
what the smoke train step consumes. Target: the pipeline feeds the step with >= 20x headroom.

    python benchmarks/bench_data.py [--scenes 256] [--batches 200] [--config experiments/tiny.py]

Everything is measured in this one run on this machine (timings on a shared 2-vCPU box are noisy; the
ratio is the figure that matters).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import tempfile
import time

import numpy as np


def _load_config(path):
    spec = importlib.util.spec_from_file_location("exp_config", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


def _image_tools():
    """The project's VQ-GAN at a smoke-sized config (64 px -> 8x8 codes from 1024), random weights."""
    from chameleon_jax import pretokenize

    cfg = dict(resolution=64, ch=64, ch_mult=(1, 1, 2, 2), num_res_blocks=2, z_channels=64, embed_dim=64,
               n_embed=1024)
    encode, load, codes = pretokenize.vqgan_tools(None, encode_batch=16, config=cfg)
    return encode, load, codes, "VQ-GAN 64px, ch 64, f=8, 1024 codes, random weights"


def bench_pretokenize(work: str, scenes: int):
    from chameleon_jax import pretokenize, text
    from chameleon_jax.data import corpora

    shapes_jsonl = corpora.write_shapes(os.path.join(work, "raw_shapes"), scenes)
    pydoc_jsonl = corpora.write_pydoc(os.path.join(work, "raw_pydoc"))
    encode, load, codes, encoder_name = _image_tools()
    spm = text.train_sentencepiece(text.corpus_lines([shapes_jsonl, pydoc_jsonl]),
                                   os.path.join(work, "spm"), vocab_size=1000)
    tok = text.load(spm, image_codes=codes)
    encode(np.zeros((1, 64, 64, 3), np.float32))  # compile outside the timing
    t = time.perf_counter()
    m_img = pretokenize.run([shapes_jsonl], os.path.join(work, "tok_shapes"), tokenizer=tok, encode_images=encode,
                            load_image=load, docs_per_shard=128, show_progress=False)
    t_img = time.perf_counter() - t
    t = time.perf_counter()
    m_txt = pretokenize.run([pydoc_jsonl], os.path.join(work, "tok_pydoc"), tokenizer=tok, encode_images=encode,
                            load_image=load, docs_per_shard=500, show_progress=False)
    t_txt = time.perf_counter() - t
    return {"images/s": m_img["documents"] / t_img, "text docs/s": m_txt["documents"] / t_txt,
            "encoder": encoder_name, "pairs": m_img["documents"], "text docs": m_txt["documents"]}


def bench_pipeline(work: str, seq_len: int, batch: int, workers: int, batches: int):
    from chameleon_jax.data import pipeline

    c = pipeline.default_config()
    c.sources = {"shapes": os.path.join(work, "tok_shapes"), "pydoc": os.path.join(work, "tok_pydoc")}
    c.stages = [{"weights": {"shapes": 0.5, "pydoc": 0.5}, "until": None}]
    c.num_workers = workers
    it = pipeline.make_train_iterator(c, seq_len=seq_len, batch_size=batch, process_index=0, process_count=1)
    next(it)  # worker start-up and first fill are not steady state
    t = time.perf_counter()
    real = 0
    for _ in range(batches):
        b = next(it)
        real += int((b["segment_ids"] > 0).sum())
    dt = time.perf_counter() - t
    it.close()
    return batches * batch * seq_len / dt, real / (batches * batch * seq_len)


def bench_train_step(config_path: str, seq_len: int):
    import jax
    import jax.numpy as jnp

    from chameleon_jax import config as config_lib, model as model_lib
    from chameleon_jax.model import sharding as shd
    from chameleon_jax.train import optimizer, step as step_lib

    cfg = _load_config(config_path)
    cfg.train.seq_len = seq_len
    if cfg.model.vocab_size == 0:  # experiments/smoke.py: the driver fills the vocab from its tokenizer
        codes = 512  # experiments/vqgan_smoke.py codebook
        cfg.model.vocab_size = cfg.smoke.text_vocab_size + codes + 8
        cfg.loss.image_ids = (cfg.smoke.text_vocab_size, cfg.smoke.text_vocab_size + codes)
    mcfg = config_lib.validate(cfg, jax.device_count())
    mesh = shd.make_mesh(cfg.mesh)
    tx = optimizer.make_optimizer(cfg.optimizer, cfg.train.steps)
    state, shardings = step_lib.init_sharded_state(mcfg, tx, mesh, jax.random.PRNGKey(0))
    graphdef, _ = model_lib.abstract(mcfg)
    fn = step_lib.jit_train_step(step_lib.make_train_step(graphdef, mcfg, tx, step_lib.LossConfig.from_config(cfg.loss)),
                                 mesh, shardings)
    B, L = cfg.train.batch_size, cfg.train.seq_len
    rng = np.random.default_rng(0)
    batch = {"tokens": jnp.asarray(rng.integers(0, mcfg.vocab_size, (B, L)), jnp.int32),
             "segment_ids": jnp.ones((B, L), jnp.int32), "positions": jnp.tile(jnp.arange(L, dtype=jnp.int32), (B, 1)),
             "loss_mask": jnp.ones((B, L), jnp.int32)}
    with jax.set_mesh(mesh):
        state, m = fn(state, batch)
        jax.block_until_ready(m)
        t = time.perf_counter()
        n = 10
        for _ in range(n):
            state, m = fn(state, batch)
        jax.block_until_ready(m)
    return n * B * L / (time.perf_counter() - t), B, L


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scenes", type=int, default=256)
    p.add_argument("--batches", type=int, default=200)
    p.add_argument("--seq_len", type=int, default=256, help="row length for both the pipeline and the train step")
    p.add_argument("--config", default="experiments/smoke.py" if os.path.exists("experiments/smoke.py")
                   else "experiments/tiny.py")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as work:
        pre = bench_pretokenize(work, args.scenes)
        step_tps, B, L = bench_train_step(args.config, args.seq_len)
        rows = [(w, *bench_pipeline(work, L, B, w, args.batches)) for w in (0, 2)]
    from chameleon_jax import cpu
    print("\n" + cpu.describe())
    print(f"pretokenize ({pre['encoder']}; 64x64 shapes pairs, pydoc text)")
    print(f"  {'images/s':>14} {pre['images/s']:10.1f}   ({pre['pairs']} pairs)")
    print(f"  {'text docs/s':>14} {pre['text docs/s']:10.1f}   ({pre['text docs']} docs)")
    print(f"\npipeline vs train step ({args.config}: batch {B} x seq_len {L})")
    print(f"  {'source':<28} {'tokens/s':>12} {'fill':>6} {'headroom':>9}")
    print(f"  {'train step consumes':<28} {step_tps:12.0f} {'':>6} {'':>9}")
    for w, tps, fill in rows:
        print(f"  {f'pipeline, {w} workers':<28} {tps:12.0f} {fill:6.2f} {tps / step_tps:8.1f}x")
    print("  (target: >= 20x headroom; fill = share of non-padding tokens in packed rows)")


if __name__ == "__main__":
    from chameleon_jax import cpu
    cpu.start_up()  # this CPU's XLA flags and huge pages, as the train entry point has them
    main()
