"""VQ-GAN encode/decode throughput: this JAX implementation vs HF transformers' ChameleonVQVAE.encode
(torch CPU, same weights, best of 1 and 2 threads). HF has no decoder, so decode is reported alone.
Ours is `model.jit_encode` (the encoder with the XLA options the library picks for this CPU, printed
at the end) with the batch sharded over one host device per core (`chameleon_jax.cpu`); the 512 px case
uses batch 2 so both sides can use both cores.

    python benchmarks/bench_vqgan.py              # full Chameleon config at 512 px + the smoke config
    python benchmarks/bench_vqgan.py --quick      # smoke config only

The machine is shared: every round times ours, HF at 1 thread and HF at 2 threads back to back, after
a matmul peak probe, and each figure is the best call over `--reps` rounds (after one warm-up call; a
round makes as many calls as fill ~0.3 s, so 1 at 512 px and ~15 at 64 px). Read the ratios. GF/s is analytic FLOPs (`throughput.program_flops`: the convolutions and matmuls) over time.
`ceiling/hf` is the probed peak over HF's GF/s: the speed-up over HF of a program that did nothing but
these FLOPs, at the matmul peak. Direct convolution cannot beat it; only an algorithm with fewer
multiplies (Winograd, FFT) could.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402


def _seconds(fn, calls: int) -> float:
    """Best single-call time over `calls` back-to-back calls."""
    best = float("inf")
    for _ in range(calls):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def run_case(name, hf_kwargs, size, batch, reps, decode=True):
    import torch
    from transformers.models.chameleon.configuration_chameleon import ChameleonVQVAEConfig
    from transformers.models.chameleon.modeling_chameleon import ChameleonVQVAE

    from chameleon_jax import cpu
    from chameleon_jax.train.throughput import measure_cpu_peak, program_flops
    from chameleon_jax.vqgan import convert, model

    torch.manual_seed(0)
    hf = ChameleonVQVAE(ChameleonVQVAEConfig(**hf_kwargs)).eval()
    template = model.init(jax.random.key(0), convert.config_from_hf(hf.config))
    # images sharded over as many host devices as divide the batch (one per core: chameleon_jax.cpu)
    mesh = cpu.data_mesh(batch)
    rows_sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    params = jax.device_put(convert.from_hf(hf, template), jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    x_np = np.random.default_rng(0).uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)
    xt = torch.from_numpy(x_np.transpose(0, 3, 1, 2).copy())
    x = jax.device_put(x_np, rows_sh)

    enc = model.jit_encode(out_shardings=rows_sh)  # the encoder as the library compiles it for this CPU
    dec = jax.jit(model.decode, out_shardings=rows_sh)
    codes = enc(params, x).block_until_ready()  # warm-up (compile)
    dec(params, codes).block_until_ready()

    def hf_encode(threads):
        torch.set_num_threads(threads)
        with torch.inference_mode():
            return hf.encode(xt)

    same = float(np.mean(np.asarray(codes).reshape(-1) == hf_encode(2).image_tokens.numpy()))  # HF warm-up too
    # small cases take milliseconds: each round times enough calls to fill ~0.3 s per side
    calls = max(1, int(0.3 / _seconds(lambda: hf_encode(1), 1)))
    best = {k: float("inf") for k in ("enc", "dec", 1, 2)}
    peak = 0.0
    for r in range(reps):
        peak = max(peak, measure_cpu_peak(repeats=3))
        best["enc"] = min(best["enc"], _seconds(lambda: enc(params, x).block_until_ready(), calls))
        for threads in (1, 2):
            best[threads] = min(best[threads], _seconds(lambda: hf_encode(threads), calls))
        if decode:
            best["dec"] = min(best["dec"], _seconds(lambda: dec(params, codes).block_until_ready(), calls))
        print(f"  {name} round {r + 1}/{reps}: ours {best['enc']:.3f} s, HF {min(best[1], best[2]):.3f} s "
              f"(best so far, batch {batch}); peak probe {peak / 1e9:.0f} GFLOP/s", flush=True)
    hf_threads = 1 if best[1] < best[2] else 2
    enc_flops = program_flops(model.encode, params, x)
    rows = [dict(name=name, op="encode", size=size, batch=batch, gflop=enc_flops / batch / 1e9,
                 ours=batch / best["enc"], hf=batch / best[hf_threads], thr=hf_threads, same=same, peak=peak)]
    if decode:
        rows.append(dict(name=name, op="decode", size=size, batch=batch, peak=peak,
                         gflop=program_flops(model.decode, params, codes) / batch / 1e9, ours=batch / best["dec"]))
    return rows


CASES = {
    "chameleon": (dict(), 512, 2),  # HF ChameleonVQVAEConfig defaults = Chameleon's tokenizer
    "smoke": (dict(base_channels=32, channel_multiplier=[1, 1, 2, 2], num_res_blocks=1, latent_channels=64,
                   embed_dim=8, num_embeddings=512, resolution=64), 64, 16),
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke config only")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--devices", type=int, default=0, help="host devices for ours (default one per core)")
    args = ap.parse_args(argv)
    from chameleon_jax import cpu
    cpu.use_every_core(args.devices or None)
    names = ["smoke"] if args.quick else ["chameleon", "smoke"]
    rows = []
    for n in names:
        kw, size, batch = CASES[n]
        rows += run_case(n, kw, size, batch, args.reps)
    print("\n" + cpu.describe("HF encode at torch threads 1 and 2, best kept"))
    from chameleon_jax.vqgan import model
    print(f"ours: model.jit_encode, XLA compiler options {model.cpu_compiler_options()}")
    print(f"{'config':10} {'op':7} {'px':>4} {'batch':>5} {'GFLOP/img':>9} {'jax img/s':>10} {'jax GF/s':>8} "
          f"{'hf img/s':>9} {'hf thr':>6} {'hf GF/s':>7} {'jax/hf':>7} {'ceiling/hf':>10} {'codes==hf':>9}")
    for r in rows:
        hf = r.get("hf")
        cells = (f"{hf:9.3f} {r['thr']:>6} {hf * r['gflop']:7.0f} {r['ours'] / hf:6.2f}x "
                 f"{r['peak'] / 1e9 / (hf * r['gflop']):9.2f}x {r['same']:9.4f}") if hf else \
            f"{'-':>9} {'-':>6} {'-':>7} {'-':>7} {'-':>10} {'-':>9}"
        print(f"{r['name']:10} {r['op']:7} {r['size']:4d} {r['batch']:5d} {r['gflop']:9.3f} {r['ours']:10.3f} "
              f"{r['ours'] * r['gflop']:8.0f} {cells}")
    peaks = ", ".join(f"{r['name']} {r['peak'] / 1e9:.0f}" for r in rows if r["op"] == "encode")
    print(f"(jax {jax.__version__} on {jax.device_count()} {jax.devices()[0].platform} devices, {os.cpu_count()} CPUs; "
          f"best call of {args.reps} interleaved rounds after warm-up; matmul peak probe GFLOP/s: {peaks})")


if __name__ == "__main__":
    from chameleon_jax import cpu
    cpu.start_up()  # this CPU's XLA flags and huge pages, before anything allocates
    sys.exit(main())
