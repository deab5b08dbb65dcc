"""Decode speed: our jitted KV-cached loop vs HF transformers `generate()` on the same weights.

    .venv/bin/python benchmarks/bench_decode.py [--steps 64] [--batches 1,16] [--prompt 16]

A random HF `ChameleonForConditionalGeneration` (d=256, 4 layers, vocab 65,536, ≈37M params) is saved
with `save_pretrained` and imported through `chameleon_jax.convert.hf`, so both sides run identical
fp32 weights. Text only, greedy (HF masks image tokens; our text mode forbids them too). Decode rate =
B·steps / (time(1 + steps new tokens) − time(1 new token)), so prefill is excluded; best of `--repeats`.
torch runs at 1 and 2 threads and its best is kept.

The streaming limit: a decode step at batch 1 must read every weight it uses once. It is measured in the
same run by timing a jitted sum over a buffer of the model's size (the model bytes / that bandwidth).
Two figures are printed: for all weights (what the target names) and for the weights a step actually
reads (the embedding table is only gathered one row per token).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

D, LAYERS, HEADS, FFN, VOCAB = 256, 4, 4, 768, 65_536
IMAGE_IDS = (4, 4 + 8192)


def _hf_model():
    import torch
    import transformers

    from chameleon_jax.text import image_token_name

    vocabulary_map = {f"t{i}": i for i in range(VOCAB)}
    for code, i in enumerate(range(*IMAGE_IDS)):
        vocabulary_map.pop(f"t{i}")
        vocabulary_map[image_token_name(code)] = i
    vocabulary_map["<image>"] = 8711
    vq = dict(embed_dim=4, num_embeddings=16, latent_channels=4, resolution=16, base_channels=32,
              channel_multiplier=[1, 1], num_res_blocks=1, attn_resolutions=[])
    cfg = transformers.ChameleonConfig(
        vocab_size=VOCAB, hidden_size=D, intermediate_size=FFN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=HEADS, max_position_embeddings=4096,
        rms_norm_eps=1e-5, vq_config=vq, vocabulary_map=vocabulary_map, bos_token_id=0, pad_token_id=1,
        eos_token_id=2, rope_parameters={"rope_type": "default", "rope_theta": 10_000.0})
    torch.manual_seed(0)
    return transformers.ChameleonForConditionalGeneration(cfg).float().eval()


def _best(fn, repeats):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def bench_hf(model, prompts, steps, repeats, threads):
    import torch

    torch.set_num_threads(threads)
    ids = torch.tensor(prompts, dtype=torch.long)

    def run(n):
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, pad_token_id=1)
        assert out.shape[1] == ids.shape[1] + n
        return out

    run(2)  # warm-up
    return ids.shape[0] * steps / (_best(lambda: run(1 + steps), repeats) - _best(lambda: run(1), repeats))


def bench_jax(graphdef, cfg, params, prompts, steps, repeats):
    """With `--devices N` > 1, rows are sharded over the host devices when they divide evenly. The default
    is one device: a decode step is a few skinny matmuls, which XLA:CPU multi-threads within a device,
    and splitting them over two devices made batch 16 slower (measured: 888 tok/s on 1 device vs 621–707
    on 2, where each device's vocab-head matmul took 13 ms instead of 7)."""
    import jax

    from chameleon_jax import model as model_lib, vocab as vocab_lib
    from chameleon_jax.generate import GenerationConfig, Generator
    from chameleon_jax.model import sharding as shd
    from chameleon_jax.sampling import SamplingParams

    n_dev = jax.device_count()
    mesh = None
    if n_dev > 1 and len(prompts) % n_dev == 0:
        mesh = shd.make_mesh(dict(data=-1, fsdp=1, tensor=1))
        params = jax.device_put(params, shd.named(mesh, model_lib.param_specs(cfg, shd.DEFAULT_RULES)))
    greedy = SamplingParams()
    gens = {n: Generator(graphdef, cfg, vocab_lib.CHAMELEON,
                         GenerationConfig(max_new_tokens=n, text=greedy, image=greedy), mesh=mesh)
            for n in (1, 1 + steps)}

    def run(n):
        out = gens[n](params, prompts, seed=0)
        assert (out.lengths == n).all(), f"a row stopped early: {out.lengths}"
        return out

    for n in gens:
        run(n)  # compile
    return len(prompts) * steps / (_best(lambda: run(1 + steps), repeats) - _best(lambda: run(1), repeats))


def streaming_rate(params, repeats):
    """(bytes/s reading a buffer of the model's size, all-weight bytes, bytes read per batch-1 step).

    141 MiB exceeds this machine's 32 MiB L3, so this is DRAM bandwidth for one process."""
    import jax
    import jax.numpy as jnp

    leaves = jax.tree_util.tree_leaves_with_path(params)
    total = sum(x.nbytes for _, x in leaves)
    embedding = sum(x.nbytes for p, x in leaves if "embedding" in jax.tree_util.keystr(p))
    # Two readers (XLA's reduction and numpy's vectorised max); the faster one sets the bandwidth.
    host = np.ones((total // 4,), np.float32)
    buf = jnp.asarray(host)
    read = jax.jit(jnp.max)
    read(buf).block_until_ready()
    seconds = min(_best(lambda: read(buf).block_until_ready(), repeats * 3), _best(lambda: host.max(), repeats * 3))
    return total / seconds, total, total - embedding


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", default="1,2", help="torch thread counts to try")
    ap.add_argument("--devices", type=int, default=1,
                    help="host devices for ours (default 1: see bench_jax; 0 = one per core)")
    args = ap.parse_args(argv)
    from chameleon_jax import cpu
    cpu.use_every_core(args.devices or None)

    import jax
    import torch

    from chameleon_jax.convert.hf import load_hf
    from chameleon_jax.model import ModelConfig, abstract

    hf = _hf_model()
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        fields, params, _ = load_hf(tmp)
    cfg = ModelConfig(**fields)
    graphdef, _ = abstract(cfg)
    params = jax.device_put(params, jax.devices()[0])
    n_params = sum(x.size for x in jax.tree.leaves(params))

    rng = np.random.default_rng(0)
    rows = []
    for b in (int(x) for x in args.batches.split(",")):
        # Text ids only (past the image block and the specials), each prompt starting with <s>.
        prompts = [[0] + rng.integers(8198, VOCAB, args.prompt - 1).tolist() for _ in range(b)]
        ours = bench_jax(graphdef, cfg, params, prompts, args.steps, args.repeats)
        hf_rates = {t: bench_hf(hf, prompts, args.steps, args.repeats, t)
                    for t in (int(x) for x in args.threads.split(","))}
        best_t = max(hf_rates, key=hf_rates.get)
        rows.append((b, ours, hf_rates[best_t], best_t))
    bandwidth, total, read = streaming_rate(params, args.repeats)

    print("\n" + cpu.describe(f"HF generate at torch threads {args.threads}, best kept"))
    print(f"model: d={D}, {LAYERS} layers, vocab {VOCAB}, {n_params / 1e6:.1f}M params "
          f"({total / 2**20:.0f} MiB fp32); {args.prompt}-token prompts, {args.steps} greedy decode steps; "
          f"jax {jax.__version__} on {jax.device_count()} {jax.devices()[0].platform} devices ({os.cpu_count()} cpus), torch {torch.__version__}")
    print(f"\n| batch | chameleon_jax tok/s | HF generate tok/s (threads) | speed-up |")
    print("|---:|---:|---:|---:|")
    for b, ours, theirs, t in rows:
        print(f"| {b} | {ours:,.0f} | {theirs:,.0f} ({t}) | {ours / theirs:.2f}x |")
    one = dict((b, ours) for b, ours, _, _ in rows).get(1)
    print(f"\nread bandwidth over {total / 2**20:.0f} MiB: {bandwidth / 1e9:.1f} GB/s")
    print("| batch-1 streaming limit | tok/s | ours / limit |")
    print("|---|---:|---:|")
    for label, nbytes in (("all weights", total), ("weights read per step (no embedding table)", read)):
        limit = bandwidth / nbytes
        ratio = f"{one / limit:.2f}" if one else "n/a"
        print(f"| {label} ({nbytes / 2**20:.0f} MiB) | {limit:,.0f} | {ratio} |")


if __name__ == "__main__":
    from chameleon_jax import cpu
    cpu.start_up()  # this CPU's XLA flags and huge pages, before anything allocates
    sys.exit(main())
