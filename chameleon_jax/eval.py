"""Evaluate a checkpoint: params only, onto the devices at hand, perplexity per modality.

    python -m chameleon_jax.eval --workdir DIR                 # latest checkpoint of a training run
    python -m chameleon_jax.eval --checkpoint DIR/checkpoints/500 --mesh=1,1,1
    python -m chameleon_jax.eval --workdir DIR --export /tmp/params   # params-only export (also restorable)
    python -m chameleon_jax.eval --checkpoint DIR --eval_set caps.jsonl --task caption --output r.json  # CIDEr
    python -m chameleon_jax.eval --checkpoint DIR --harness lm-eval --tasks my_mc,my_qa --include_path tasks/

The config stored with the checkpoint is used unless --config is given (then its overrides apply, e.g.
--config.eval.steps=50). `--split train` evaluates on the training source instead of config.eval.data.
The library is `chameleon_jax.evals.checkpoint`. With --eval_set, a captioning or VQA eval set (JSONL plus
images) is answered greedily and scored instead: CIDEr or VQA accuracy with 95% intervals, per-item
predictions beside --output (library: `chameleon_jax.generate.benchmark`; docs/evaluation.md).
With --harness lm-eval, lm-evaluation-harness tasks (local YAML configs and data files, run offline) are
scored on the restored params (library: `chameleon_jax.generate.harness`; docs/evaluation.md).
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
            batch_size=F.batch_size, output=F.output, chat=F.chat, tokenizer=F.tokenizer, vqgan=F.vqgan)
        print(json.dumps(results, indent=2))
        return
    if F.harness:  # lm-evaluation-harness tasks: loglikelihood / generation requests on the restored params
        from chameleon_jax.generate import harness

        if not F.tasks or not F.include_path:
            raise app.UsageError("--harness lm-eval needs --tasks NAME[,NAME] and --include_path DIR (task YAMLs)")
        summary = harness.evaluate_tasks(
            path, F.tasks, F.include_path, mesh=F.mesh.split(","), limit=F.limit, batch_size=F.batch_size,
            max_length=F.max_length or None, num_fewshot=F.num_fewshot, tokenizer=F.tokenizer, vqgan=F.vqgan,
            output=F.output, samples=F.log_samples)
        print(json.dumps({k: v for k, v in summary.items() if k != "samples"}, indent=2))
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
    flags.DEFINE_bool("chat", False, "With --eval_set: the prompt is a user turn (SFT-trained models): "
                      "<end-turn> follows it and the answer ends at its own.")
    flags.DEFINE_integer("max_new_tokens", 0, "With --eval_set: greedy answer budget (0: 32 caption, 10 VQA).")
    flags.DEFINE_integer("batch_size", 16, "Items decoded together (padded to a multiple of data x fsdp).")
    flags.DEFINE_string("tokenizer", None, "The tokenizer, if the checkpoint does not name one (generation evals).")
    flags.DEFINE_string("vqgan", None, "The VQ-GAN, if the checkpoint does not name one (generation evals).")
    flags.DEFINE_enum("harness", None, ["lm-eval"], "Score lm-evaluation-harness tasks instead of perplexity.")
    flags.DEFINE_list("tasks", [], "With --harness: task names defined under --include_path.")
    flags.DEFINE_string("include_path", None, "With --harness: the folder of task YAMLs (local data files).")
    flags.DEFINE_float("limit", None, "With --harness: at most this many documents per task (<1: a fraction).")
    flags.DEFINE_integer("num_fewshot", None, "With --harness: few-shot examples (default: each task's own).")
    flags.DEFINE_integer("max_length", 0, "With --harness: the context window in tokens (0: config.train.seq_len).")
    flags.DEFINE_bool("log_samples", False, "With --harness: also write every request and response to --output.")
    app.run(main)
