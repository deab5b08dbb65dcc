"""Evaluate a checkpoint: params only, onto the devices at hand, perplexity per modality.

    python -m chameleon_jax.eval --workdir DIR                 # latest checkpoint of a training run
    python -m chameleon_jax.eval --checkpoint DIR/checkpoints/500 --mesh=1,1,1
    python -m chameleon_jax.eval --workdir DIR --export /tmp/params   # params-only export (also restorable)
    python -m chameleon_jax.eval --checkpoint DIR --eval_set caps.jsonl --task caption --output r.json  # CIDEr

The config stored with the checkpoint is used unless --config is given (then its overrides apply, e.g.
--config.eval.steps=50). `--split train` evaluates on the training source instead of config.eval.data.
The library is `chameleon_jax.evals.checkpoint`. With --eval_set, a captioning or VQA eval set (JSONL plus
images) is answered greedily and scored instead: CIDEr or VQA accuracy with 95% intervals, per-item
predictions beside --output (library: `chameleon_jax.generate.benchmark`; docs/evaluation.md).
"""
import json
import logging

from absl import app, flags
from etils import epath
from ml_collections import config_flags

from chameleon_jax.evals.checkpoint import evaluate_checkpoint, restore_for_eval  # noqa: F401  (library names)


def main(argv):
    del argv
    F = flags.FLAGS
    if bool(F.workdir) == bool(F.checkpoint):
        raise app.UsageError("give exactly one of --workdir DIR or --checkpoint PATH")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "orbax", "jax._src"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from chameleon_jax import checkpoint as ckpt

    path = F.workdir or F.checkpoint
    if F.eval_set:  # captioning / VQA on an eval set: generated answers, not perplexity
        from chameleon_jax.generate import benchmark

        results = benchmark.evaluate_eval_set(
            path, F.eval_set, F.task, mesh=F.mesh.split(","), prompt=F.prompt, max_new_tokens=F.max_new_tokens,
            batch_size=F.batch_size, output=F.output, tokenizer=F.tokenizer, vqgan=F.vqgan)
        print(json.dumps(results, indent=2))
        return
    config = F.config if F.config is not None else ckpt.read_config(path)
    mesh_sizes = tuple(int(x) for x in F.mesh.split(","))
    results, params = evaluate_checkpoint(path, config, mesh_sizes, F.split)
    print(json.dumps(results, indent=2))
    if F.output:
        epath.Path(F.output).write_text(json.dumps(results, indent=2))
    if F.export:
        print(f"exported params to {ckpt.export_params(params, F.export, config)}")


if __name__ == "__main__":
    from chameleon_jax import cpu

    cpu.use_huge_pages()  # before anything allocates; see chameleon_jax/cpu.py
    # Flags are defined only when run as a program, so `import chameleon_jax.eval` never clashes with
    # another program's --config.
    config_flags.DEFINE_config_file("config", None, "Optional experiment config; default: the checkpoint's own.")
    flags.DEFINE_string("workdir", None, "A training workdir: its latest checkpoint is evaluated.")
    flags.DEFINE_string("checkpoint", None, "A step folder (DIR/checkpoints/<step>) or a params export.")
    flags.DEFINE_string("mesh", "-1,1,1", "data,fsdp,tensor sizes for eval (-1 fills the devices).")
    flags.DEFINE_enum("split", "eval", ["eval", "train"], "Held-out data (config.eval.data) or the training source.")
    flags.DEFINE_string("export", None, "Write a params-only export here (OUT/state, OUT/config.json).")
    flags.DEFINE_string("output", None, "Also write the results as JSON here.")
    flags.DEFINE_string("eval_set", None, "A captioning or VQA eval set (JSONL + images; docs/evaluation.md): "
                        "generate answers and score them instead of perplexity.")
    flags.DEFINE_enum("task", "caption", ["caption", "vqa"], "With --eval_set: CIDEr on captions, or VQA accuracy.")
    flags.DEFINE_string("prompt", None, "With --eval_set: the prompt template, <image> where the image goes and "
                        "{question} for VQA (default: '<image>' / '<image>{question}').")
    flags.DEFINE_integer("max_new_tokens", 0, "With --eval_set: greedy answer budget (0: 32 caption, 10 VQA).")
    flags.DEFINE_integer("batch_size", 16, "Items decoded together (padded to a multiple of data x fsdp).")
    flags.DEFINE_string("tokenizer", None, "The tokenizer, if the checkpoint does not name one (generation evals).")
    flags.DEFINE_string("vqgan", None, "The VQ-GAN, if the checkpoint does not name one (generation evals).")
    app.run(main)
