"""VQ-GAN encode/decode throughput: this JAX implementation vs HF transformers' ChameleonVQVAE.encode
(torch CPU, same weights, best of 1 and 2 threads). HF has no decoder, so decode is reported alone.
Ours shards the batch over one host device per core (`chameleon_jax.cpu`); the 512 px case uses batch 2
so both sides can use both cores.

    python benchmarks/bench_vqgan.py              # full Chameleon config at 512 px + the smoke config
    python benchmarks/bench_vqgan.py --quick      # smoke config only

The machine is shared: both sides are measured in the same run, interleaved, and the ratio is what
to read. Each figure is the best of `--reps` timed calls after one warm-up (compile) call.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402


def _best(fn, reps):
    fn()  # warm-up / compile
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def run_case(name, hf_kwargs, size, batch, reps, decode=True):
    import torch
    from transformers.models.chameleon.configuration_chameleon import ChameleonVQVAEConfig
    from transformers.models.chameleon.modeling_chameleon import ChameleonVQVAE

    from chameleon_jax import cpu
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

    enc = jax.jit(model.encode, out_shardings=rows_sh)
    t_jax = _best(lambda: enc(params, x).block_until_ready(), reps)
    codes = enc(params, x)
    hf_times = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        with torch.inference_mode():
            hf_times[threads] = _best(lambda: hf.encode(xt), reps)
    with torch.inference_mode():
        same = float(np.mean(np.asarray(codes).reshape(-1) == hf.encode(xt).image_tokens.numpy()))
    rows = [(name, "encode", size, batch, batch / t_jax, batch / min(hf_times.values()),
             min(hf_times, key=hf_times.get), same)]
    if decode:
        dec = jax.jit(model.decode, out_shardings=rows_sh)
        t_dec = _best(lambda: dec(params, codes).block_until_ready(), reps)
        rows.append((name, "decode", size, batch, batch / t_dec, None, None, None))
    return rows


CASES = {
    "chameleon": (dict(), 512, 2),  # HF defaults = Chameleon's tokenizer (spec §4.2)
    "smoke": (dict(base_channels=32, channel_multiplier=[1, 1, 2, 2], num_res_blocks=1, latent_channels=64,
                   embed_dim=8, num_embeddings=512, resolution=64), 64, 16),
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke config only")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--devices", type=int, default=0, help="host devices for ours (default one per core)")
    args = ap.parse_args(argv)
    from chameleon_jax import cpu
    cpu.use_every_core(args.devices or None)
    names = ["smoke"] if args.quick else ["chameleon", "smoke"]
    rows = []
    for n in names:
        kw, size, batch = CASES[n]
        rows += run_case(n, kw, size, batch, args.reps)
    print(f"\n{'config':10} {'op':7} {'px':>4} {'batch':>5} {'jax img/s':>10} {'hf img/s':>9} "
          f"{'hf thr':>6} {'jax/hf':>7} {'codes==hf':>9}")
    for name, op, size, batch, j, h, thr, same in rows:
        hf_s = f"{h:9.3f}" if h else f"{'-':>9}"
        ratio = f"{j / h:6.2f}x" if h else f"{'-':>7}"
        print(f"{name:10} {op:7} {size:4d} {batch:5d} {j:10.3f} {hf_s} {thr or '-':>6} {ratio} "
              f"{'' if same is None else f'{same:9.4f}'}")
    print(f"(jax {jax.__version__} on {jax.device_count()} {jax.devices()[0].platform} devices, {os.cpu_count()} CPUs; best of {args.reps} after warm-up)")


if __name__ == "__main__":
    from chameleon_jax import cpu
    cpu.use_huge_pages()  # before anything allocates; see chameleon_jax/cpu.py
    sys.exit(main())
