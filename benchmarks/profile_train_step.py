"""Where the train-step benchmark's time goes: its pieces timed apart, in one process, interleaved.

    .venv/bin/python -m benchmarks.profile_train_step [--rounds 4]     # from the repository root

Same model and batch as `bench_train_step.py`. Rows:
- body forward / body grad: the 8 blocks alone (loss = sum of squares of their output);
- loss forward / loss grad: body + final norm + the fused output projection and cross-entropy;
- train step: the real jitted, donated step (loss grad + clipping + AdamW + NaN guard + metrics);
- the step's matmul shapes alone, each jitted by itself, against a 2048² f32 peak probe.

Each row is timed in rounds that alternate with the others (the machine is shared: a slow window
hits every row alike) and reported as best / median. GFLOP/s use analytic FLOPs of the matmuls only.
"""
from __future__ import annotations

import argparse
import time

import numpy as np


def _matmul_rows(rng):
    """(name, fn, args, flops) for the step's dense matmuls at benchmark shapes, one per kind."""
    import jax.numpy as jnp

    from benchmarks import bench_train_step as b

    ffn = b.model_config(False).ffn_dim
    tokens = 2048

    def r(*shape):
        return jnp.asarray(rng.standard_normal(shape), jnp.float32)

    x, h, w_d, w_f, w_f2, a = r(tokens, b.D), r(tokens, ffn), r(b.D, b.D), r(b.D, ffn), r(ffn, b.D), r(2048, 2048)
    hc, w_v, g = r(512, b.D), r(b.D, b.VOCAB), r(512, b.VOCAB)
    return [
        ("peak probe 2048² @ 2048²", lambda a: a @ a, (a,), 2 * 2048 ** 3),
        ("x @ W  [2048,512]·[512,512]", lambda x, w: x @ w, (x, w_d), 2 * tokens * b.D * b.D),
        ("x @ W1 [2048,512]·[512,1536]", lambda x, w: x @ w, (x, w_f), 2 * tokens * b.D * ffn),
        ("h @ W2 [2048,1536]·[1536,512]", lambda h, w: h @ w, (h, w_f2), 2 * tokens * b.D * ffn),
        ("dW1 = xᵀ·dh [512,2048]·[2048,1536]", lambda x, h: x.T @ h, (x, h), 2 * tokens * b.D * ffn),
        ("dx = dh·W1ᵀ [2048,1536]·[1536,512]", lambda h, w: h @ w.T, (h, w_f), 2 * tokens * b.D * ffn),
        ("logits chunk [512,512]·[512,16384]", lambda h, w: h @ w, (hc, w_v), 2 * 512 * b.D * b.VOCAB),
        ("dW_out chunk [512,512]ᵀ·[512,16384]", lambda h, g: h.T @ g, (hc, g), 2 * 512 * b.D * b.VOCAB),
    ]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args()

    from chameleon_jax import cpu
    cpu.use_every_core(1)
    import jax
    import jax.numpy as jnp

    from benchmarks import bench_train_step as b
    from chameleon_jax import model as model_lib
    from chameleon_jax.model import loss as loss_lib

    graphdef, mesh, state, step, batch = b.setup_ours(b._batch(4, 512), scan_layers=False)
    params = jax.tree.map(jnp.copy, state["params"])  # the step donates `state`; these stay alive

    def body(p):
        x, _ = model_lib.bind(graphdef, p)(batch["tokens"], batch["segment_ids"], batch["positions"])
        return x

    def body_loss(p):
        return jnp.sum(jnp.square(body(p)))

    def full_loss(p):
        model = model_lib.bind(graphdef, p)
        return loss_lib.fused_loss_and_metrics(model.final_norm(body(p)), model.output[...], batch,
                                               image_ids=(4, 8196))[0]

    holder = {"state": state}

    def train_step():
        holder["state"], metrics = step(holder["state"], batch)
        return metrics

    pieces = {"body forward": (jax.jit(body_loss), (params,)),
              "body grad": (jax.jit(jax.grad(body_loss)), (params,)),
              "loss forward (body + head + CE)": (jax.jit(full_loss), (params,)),
              "loss grad": (jax.jit(jax.grad(full_loss)), (params,)),
              "train step": (lambda: train_step(), ())}
    mm = {name: (jax.jit(fn), a, fl) for name, fn, a, fl in _matmul_rows(np.random.default_rng(0))}
    times = {k: [] for k in [*pieces, *mm]}
    with jax.set_mesh(mesh):
        for _ in range(args.rounds):
            for name, (fn, a) in pieces.items():
                jax.block_until_ready(fn(*a))  # untimed: memory idle between rows is faulted back first
                for _ in range(2):
                    t = time.perf_counter()
                    jax.block_until_ready(fn(*a))
                    times[name].append(time.perf_counter() - t)
            for name, (fn, a, _) in mm.items():
                jax.block_until_ready(fn(*a))
                for _ in range(3):
                    t = time.perf_counter()
                    jax.block_until_ready(fn(*a))
                    times[name].append(time.perf_counter() - t)

    print("\n" + cpu.describe())
    print(f"| {'piece':38s} | {'best s':>7s} | {'median s':>8s} | {'GFLOP/s best':>12s} |")
    print(f"|{'-' * 40}|{'-' * 9}|{'-' * 10}|{'-' * 14}|")
    for name in pieces:
        t = times[name]
        print(f"| {name:38s} | {min(t):7.3f} | {np.median(t):8.3f} | {'':>12s} |")
    for name, (_, _, fl) in mm.items():
        t = times[name]
        print(f"| {name:38s} | {min(t):7.4f} | {np.median(t):8.4f} | {fl / min(t) / 1e9:12.1f} |")


if __name__ == "__main__":
    from chameleon_jax import cpu
    cpu.start_up()
    main()
