"""Train-step speed: our jitted step vs HF transformers + torch on the same model shape and batch.

    .venv/bin/python benchmarks/bench_train_step.py [--batch 4 --seq 512] [--steps 4] [--no-hf]

Model: d=512, 8 layers, 8 heads (MHA, head_dim 64), SwiGLU FFN by the spec's rule (1,536), QK-norm,
prenorm, vocab 16,384, untied output; fp32 everywhere. Batch: 4×512 = 2,048 tokens, one segment per
row, every target loss-bearing.

Ours: `chameleon_jax.train.step.make_train_step` (loss with z-loss, AdamW with clipping, the NaN
guard and metrics) under `jax.jit` with the state donated, on one host device by default: this step is
~75% matmuls, which XLA:CPU multi-threads within a device, and sharding the batch over one device per
core (`--devices 0`, `chameleon_jax.cpu`) added gradient all-reduces without a gain (2026-11-26: 336
tokens/s on 2 devices, 360 on 1, each against HF in its own run).
HF: `ChameleonModel` + a linear head, plain cross-entropy, `torch.optim.AdamW` over the text
weights (the VQ tokenizer inside `ChameleonModel` is frozen and unused), at 1 and 2 torch threads.

MFU = analytic train FLOPs (`chameleon_jax.model.flops.train_flops_per_token`, 6·N + causal
attention) / peak, where the peak is a jitted f32 2048² `jnp.dot`, measured between our timed steps
in this run (the machine is shared: timings drift, so every figure is a best of `--steps` and the
table also prints the spread).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

D, LAYERS, HEADS, VOCAB = 512, 8, 8, 16_384


def _batch(batch, seq, seed=0):
    rng = np.random.default_rng(seed)
    return {"tokens": rng.integers(3, VOCAB, (batch, seq)).astype(np.int32),
            "segment_ids": np.ones((batch, seq), np.int32),
            "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy(),
            "loss_mask": np.ones((batch, seq), np.int32)}


def model_config(scan_layers: bool):
    from chameleon_jax.model import ModelConfig, swiglu_hidden_size
    return ModelConfig(vocab_size=VOCAB, d_model=D, n_layers=LAYERS, n_heads=HEADS, n_kv_heads=HEADS,
                       head_dim=D // HEADS, ffn_dim=swiglu_hidden_size(D), scan_layers=scan_layers)


def _optimizer_config():
    import ml_collections
    return ml_collections.ConfigDict(dict(peak_lr=1e-4, warmup_steps=10, decay="cosine",
                                          final_lr_fraction=0.01, b1=0.9, b2=0.95, eps=1e-5,
                                          weight_decay=0.1, clip_norm=1.0))


def bench_jax(batch_np, steps, scan_layers):
    """(step times, peak FLOP/s samples): a peak probe runs before every timed step."""
    import jax
    from chameleon_jax import model as model_lib
    from chameleon_jax.train import optimizer as opt_lib, step as step_lib
    from chameleon_jax.train.throughput import measure_cpu_peak

    from chameleon_jax.model import sharding as shd

    cfg = model_config(scan_layers)
    tx = opt_lib.make_optimizer(_optimizer_config(), 1000)
    graphdef, _ = model_lib.abstract(cfg)
    mesh = shd.make_mesh(dict(data=-1, fsdp=1, tensor=1))  # batch over every device; params replicated
    state, shardings = step_lib.init_sharded_state(cfg, tx, mesh, jax.random.PRNGKey(0))
    step = step_lib.jit_train_step(step_lib.make_train_step(graphdef, cfg, tx, step_lib.LossConfig(image_ids=(4, 8196))),
                                   mesh, shardings)
    batch = jax.device_put(batch_np, jax.sharding.NamedSharding(mesh, shd.BATCH_SPEC))
    t = time.perf_counter()
    with jax.set_mesh(mesh):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t
    times, peaks = [], []
    for _ in range(steps):
        peaks.append(measure_cpu_peak(repeats=3))
        t = time.perf_counter()
        with jax.set_mesh(mesh):
            state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t)
    return times, peaks, compile_s, float(metrics["loss"])


def bench_hf(batch_np, steps, threads):
    import torch
    import transformers

    torch.set_num_threads(threads)
    vq = dict(embed_dim=4, num_embeddings=16, latent_channels=4, resolution=16, base_channels=32,
              channel_multiplier=[1, 1], num_res_blocks=1, attn_resolutions=[])
    cfg = transformers.ChameleonConfig(
        vocab_size=VOCAB, hidden_size=D, intermediate_size=model_config(False).ffn_dim,
        num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=HEADS,
        max_position_embeddings=4096, rms_norm_eps=1e-5, vq_config=vq,
        vocabulary_map={"<image>": 3}, bos_token_id=0, pad_token_id=1, eos_token_id=2,
        attn_implementation="sdpa")
    torch.manual_seed(0)
    body = transformers.ChameleonModel(cfg).float().train()
    head = torch.nn.Linear(D, VOCAB, bias=False)
    params = [p for n, p in body.named_parameters() if not n.startswith("vqmodel")] + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), eps=1e-5, weight_decay=0.1)
    ids = torch.from_numpy(batch_np["tokens"]).long()
    pos = torch.from_numpy(batch_np["positions"]).long()

    def one_step():
        opt.zero_grad(set_to_none=True)
        h = body(input_ids=ids, position_ids=pos, use_cache=False).last_hidden_state
        logits = head(h[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        return float(loss)

    one_step()  # warm-up
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        one_step()
        times.append(time.perf_counter() - t)
    return times


def _spread(times):
    return f"{min(times):.2f}/{np.median(times):.2f}/{max(times):.2f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--scan", action="store_true", help="scan over layers (default: unrolled loop)")
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--devices", type=int, default=1,
                    help="host devices for ours (batch sharded over them); default 1, 0 = one per core")
    args = ap.parse_args()
    from chameleon_jax import cpu
    devices = cpu.use_every_core(args.devices or None)

    from chameleon_jax.model import flops
    tokens = args.batch * args.seq
    step_flops = flops.train_flops_per_token(model_config(args.scan), args.seq) * tokens
    batch = _batch(args.batch, args.seq)

    times, peaks, compile_s, loss = bench_jax(batch, args.steps, args.scan)
    ours = tokens / min(times)
    peak = max(peaks)
    rows = [(f"ours (JAX, {devices} dev)", _spread(times), ours, step_flops / min(times) / 1e9)]
    hf = {}
    if not args.no_hf:
        for threads in (1, 2):
            t = bench_hf(batch, args.steps, threads)
            hf[threads] = tokens / min(t)
            rows.append((f"HF torch, {threads} thread{'s' * (threads > 1)}", _spread(t), hf[threads],
                         step_flops / min(t) / 1e9))

    print(f"\nconfig: d={D}, {LAYERS} layers, {HEADS} heads (MHA), ffn {model_config(False).ffn_dim}, "
          f"vocab {VOCAB}, batch {args.batch}x{args.seq} = {tokens} tokens/step, fp32, "
          f"scan_layers={args.scan}")
    print(f"analytic train FLOPs/step {step_flops / 1e9:.1f} G (chameleon_jax.model.flops); "
          f"our compile {compile_s:.1f} s; loss after 1+{args.steps} steps {loss:.3f}")
    print(f"peak (jitted f32 2048² jnp.dot, best of {len(peaks)} probes between our steps): "
          f"{peak / 1e9:.0f} GFLOP/s (probes {min(peaks) / 1e9:.0f}–{max(peaks) / 1e9:.0f})\n")
    print(f"| {'run':22s} | {'step s min/med/max':18s} | {'tokens/s':>8s} | {'GFLOP/s':>7s} | {'MFU':>5s} |")
    print(f"|{'-' * 24}|{'-' * 20}|{'-' * 10}|{'-' * 9}|{'-' * 7}|")
    for name, spread, tps, gf in rows:
        print(f"| {name:22s} | {spread:18s} | {tps:8.0f} | {gf:7.1f} | {gf * 1e9 / peak:5.1%} |")
    if hf:
        best = max(hf, key=hf.get)
        print(f"\nours / HF best ({best} thread{'s' * (best > 1)}): {ours / hf[best]:.2f}x "
              f"(target >= 1.1x);  our MFU {step_flops / min(times) / peak:.1%} (target >= 50%)")


if __name__ == "__main__":
    main()
