"""Direct convolution vs Winograd F(4×4, 3×3), per 3×3 stride-1 layer of the VQ-GAN encoder, on XLA:CPU.

Why this exists: the VQ encode target (≥ 2× HF) is above what direct convolution can reach on
this machine (`bench_vqgan.py` prints that ceiling), so only an algorithm with fewer multiplies could meet
it. Winograd F(4,3) does the 16 outputs of a 6×6 input tile with 36 products per channel pair instead of
144: 4× fewer matmul FLOPs, paid for with input/output transforms that are pure memory traffic. This
script composes it from XLA ops (transforms as strided slices and sums, the products as 36 batched
matmuls) and times it against `lax.conv_general_dilated` on each encoder layer shape, sharded over one
device per core as the encoder is.

    python benchmarks/bench_conv_algorithms.py            # 512 px Chameleon layers + 64 px smoke layers
    python benchmarks/bench_conv_algorithms.py --quick    # smoke layers only

GF/s counts the direct convolution's FLOPs for both columns, so it reads as "effective" speed.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

# Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks" (2016), F(4×4, 3×3):
# Y = Aᵀ [(G g Gᵀ) ⊙ (Bᵀ d B)] A for a 6×6 input tile d and 3×3 kernel g.
BT = np.array([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
               [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]], np.float64)
G = np.array([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
              [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]], np.float64)
AT = np.array([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]], np.float64)


def _combine(weights, terms):
    """Σ wᵢ·tᵢ over the non-zero weights: the transform matrices are sparse small integers."""
    out = None
    for w, t in zip(weights, terms):
        if w:
            t = t if w == 1 else -t if w == -1 else t * np.float32(w)
            out = t if out is None else out + t
    return out


def winograd_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """3×3 stride-1 SAME convolution of NHWC `x` with HWIO `kernel`; H and W must divide by 4."""
    b, h, w, c = x.shape
    th, tw = h // 4, w // 4
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    rows = [_combine(BT[a], [xp[:, i:i + 4 * th:4] for i in range(6)]) for a in range(6)]  # Bᵀ over rows
    v = jnp.stack([_combine(BT[e], [r[:, :, j:j + 4 * tw:4] for j in range(6)])  # then over columns
                   for r in rows for e in range(6)]).reshape(36, b * th * tw, c)
    u = jnp.einsum("ai,ijcd,bj->abcd", G.astype(np.float32), kernel, G.astype(np.float32)).reshape(36, c, -1)
    m = jnp.einsum("pnc,pcd->pnd", v, u).reshape(6, 6, b, th, tw, -1)  # the 36 batched matmuls
    half = [_combine(AT[r], [m[a] for a in range(6)]) for r in range(4)]
    y = jnp.stack([jnp.stack([_combine(AT[s], [t[q] for q in range(6)]) for s in range(4)]) for t in half])
    return y.transpose(2, 3, 0, 4, 1, 5).reshape(b, h, w, -1)  # [r, s, b, th, tw, co] -> NHWC


def direct_conv(x, kernel):
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


# (config, batch, [(spatial size, c_in, c_out, how many such convs in the encoder)])
LAYERS = {
    "chameleon": (2, [(512, 128, 128, 4), (256, 128, 128, 4), (128, 128, 256, 1), (128, 256, 256, 3),
                      (64, 256, 256, 4), (32, 256, 512, 1), (32, 512, 512, 7), (32, 512, 256, 1)]),
    "smoke": (16, [(64, 32, 32, 2), (32, 32, 32, 2), (16, 32, 64, 1), (16, 64, 64, 1), (8, 64, 64, 7)]),
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke layers only")
    ap.add_argument("--reps", type=int, default=4)
    args = ap.parse_args(argv)
    from chameleon_jax import cpu
    cpu.use_every_core()
    P = jax.sharding.PartitionSpec
    print(cpu.describe())
    print(f"{'config':10} {'layer':>18} {'n':>2} {'direct ms':>9} {'GF/s':>5} {'winograd ms':>11} {'GF/s':>5} "
          f"{'speed-up':>8} {'max rel err':>11}")
    for name in (["smoke"] if args.quick else ["chameleon", "smoke"]):
        batch, layers = LAYERS[name]
        mesh = cpu.data_mesh(batch)
        rows, rep = jax.sharding.NamedSharding(mesh, P("data")), jax.sharding.NamedSharding(mesh, P())
        totals = {"direct": 0.0, "winograd": 0.0, "best": 0.0}
        for size, cin, cout, n in layers:
            rng = np.random.default_rng(size + cin)
            x = jax.device_put(rng.standard_normal((batch, size, size, cin), np.float32), rows)
            k = jax.device_put((rng.standard_normal((3, 3, cin, cout)) / np.sqrt(9 * cin)).astype(np.float32), rep)
            fns = {"direct": jax.jit(direct_conv, out_shardings=rows), "winograd": jax.jit(winograd_conv, out_shardings=rows)}
            ref, out = (np.asarray(f(x, k)) for f in fns.values())  # also the compile
            err = float(np.abs(out - ref).max() / np.abs(ref).max())
            best = {key: float("inf") for key in fns}
            for _ in range(args.reps):
                for key, f in fns.items():
                    t = time.perf_counter()
                    f(x, k).block_until_ready()
                    best[key] = min(best[key], time.perf_counter() - t)
            flops = 2 * 9 * batch * size * size * cin * cout
            totals["direct"] += n * best["direct"]
            totals["winograd"] += n * best["winograd"]
            totals["best"] += n * min(best.values())
            print(f"{name:10} {f'{size}²×{cin}->{cout}':>18} {n:2d} {best['direct'] * 1e3:9.2f} "
                  f"{flops / best['direct'] / 1e9:5.0f} {best['winograd'] * 1e3:11.2f} {flops / best['winograd'] / 1e9:5.0f} "
                  f"{best['direct'] / best['winograd']:7.2f}x {err:11.1e}", flush=True)
        print(f"{name:10} {'all 3×3 stride-1':>18} {'':>2} {totals['direct'] * 1e3:9.1f} {'':>5} "
              f"{totals['winograd'] * 1e3:11.1f} {'':>5} {totals['direct'] / totals['winograd']:7.2f}x  "
              f"(faster of the two per layer: {totals['direct'] / totals['best']:.2f}x)")
    print(f"(jax {jax.__version__}, {jax.device_count()} {jax.devices()[0].platform} devices; best of {args.reps})")


if __name__ == "__main__":
    from chameleon_jax import cpu
    cpu.start_up()
    sys.exit(main())
