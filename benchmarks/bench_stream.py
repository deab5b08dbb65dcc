"""Streaming cost: decode rate with and without printing the text as it is produced.

    .venv/bin/python benchmarks/bench_stream.py [--steps 256] [--batches 1,8] [--config gqa]

The tiny model of experiments/tiny.py (random weights) decodes text greedily, once with
`Generator(on_step=None)` and once with on_step = a `TextStream` (generate/streaming.py) writing to a
null file: the same jitted loop plus one `jax.debug.callback` per step that hands the step's tokens to
the host, which decodes and prints them. Rate = generated tokens (rows that stop early count fewer) /
seconds of the call, prefill included, best of --repeats after a compile run.
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import time

import jax


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=256)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--config", default="gqa")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--every", default="1,16", help="stream_every values (steps per host callback)")
    args = ap.parse_args()
    from chameleon_jax import cpu
    print(cpu.describe(), flush=True)

    from chameleon_jax import config as config_lib, model as model_lib, vocab as vocab_lib
    from chameleon_jax.generate.decoding import GenerationConfig, Generator
    from chameleon_jax.generate.streaming import TextStream
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from experiments import tiny

    cfg = tiny.get_config(args.config)
    model_cfg = config_lib.validate(cfg)
    vocab = vocab_lib.custom(text_pieces=model_cfg.vocab_size - 4 - 16 - 3, image_codes=16)
    params = model_lib.init_params(model_cfg, jax.random.PRNGKey(0))
    graphdef, _ = model_lib.abstract(model_cfg)
    gen_cfg = GenerationConfig(max_new_tokens=args.steps)
    decode = lambda ids: " ".join(map(str, ids))
    for b in map(int, args.batches.split(",")):
        prompts = [[vocab.bos, vocab.text_start + r] for r in range(b)]
        rates = {}
        for name in ["plain"] + [f"every {k}" for k in args.every.split(",")]:
            best, current = None, []
            # One compiled loop per variant; each call streams into a fresh TextStream.
            on_step = (lambda i, t: current[-1].put(i, t)) if name != "plain" else None
            gen = Generator(graphdef, model_cfg, vocab, gen_cfg, on_step=on_step,
                            stream_every=int(name.split()[-1]) if on_step else 1)
            for rep in range(args.repeats + 1):
                current.append(TextStream(decode, vocab, list(range(b)), io.StringIO()))
                t0 = time.perf_counter()
                out = gen(params, prompts, seed=0)
                dt = time.perf_counter() - t0
                if rep:
                    best = min(best or dt, dt)
            rates[name] = int(out.lengths.sum()) / best
        print(f"batch {b}: {int(out.lengths.sum())} tokens; " + ", ".join(
            f"{k} {r:.0f} tok/s ({r / rates['plain']:.2f}x)" for k, r in rates.items()), flush=True)


if __name__ == "__main__":
    from chameleon_jax import cpu
    cpu.start_up()
    main()
