"""The smoke experiment from nothing to a report: the stages in order, each timed.

    results = run(config, workdir)              # config: experiments/smoke.py's get_config()
    print(summary(results, workdir))
    results = reevaluate(config, workdir, out)  # a finished run's model on today's evaluation set
"""
from __future__ import annotations

import copy
import json
import logging
import time
from pathlib import Path

from chameleon_jax.smoke import evaluate, report, stages

log = logging.getLogger(__name__)


Interrupted = stages.Interrupted  # what __main__ catches: a stage stopped, nothing scored, rerun resumes


def run(config, workdir, vqgan_workdir=None) -> dict:
    """Runs (or resumes) every stage in `workdir`; returns the results also written to results.json.

    `vqgan_workdir` is the VQ-GAN run to reuse or create (default WORKDIR/vqgan).
    """
    import jax

    from chameleon_jax import model as model_lib
    from chameleon_jax import text
    from chameleon_jax.train import metrics as metrics_lib
    from chameleon_jax.train import runner

    config = copy.deepcopy(config)  # the stages complete it (vocabulary, token sources)
    config.unlock()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    vq_dir = Path(vqgan_workdir) if vqgan_workdir else workdir / "vqgan"
    s = config.smoke
    stage_s = {}
    t0 = time.monotonic()

    def stage(name):
        stage_s[name] = time.monotonic() - t0 - sum(stage_s.values())
        log.info("stage %s done in %.0fs", name, stage_s[name])

    data = workdir / "data"
    stages.build_data(s, data)
    stages.build_eval(s, workdir / "eval")
    stage("data")
    tok_path = stages.train_tokenizer(s, data, workdir / "tokenizer")
    stage("tokenizer")
    vq_cfg, vq_params = stages.load_vqgan(s, vq_dir)
    stage("vqgan")
    tokenizer = text.load(tok_path, image_codes=vq_cfg.n_embed)
    stages.pretokenize(s, data, workdir / "tokens", tok_path, vq_cfg, vq_params)
    stage("pretokenize")

    config = stages.train_config(config, tokenizer, workdir / "tokens")
    # What `python -m chameleon_jax.generate --workdir WORKDIR/train` needs besides the checkpoint.
    config.generate = {"tokenizer": tok_path, "vqgan": str(vq_dir)}
    result = runner.train(config, workdir / "train")
    if result.preempted:  # an unfinished model must not be scored as the experiment's result
        raise Interrupted(f"training stopped at step {result.step} of {config.train.steps} (checkpoint saved); "
                          "rerun the same command to resume")
    stage("train")

    model_cfg = model_lib.ModelConfig.from_config(config.model)
    graphdef, _ = model_lib.abstract(model_cfg)
    params = jax.device_get(result.state["params"])
    gen = evaluate.evaluate_generation(s, graphdef, model_cfg, params, tokenizer, vq_cfg, vq_params,
                                       workdir / "eval")
    metrics = metrics_lib.read_metrics(workdir / "train")
    ppl = evaluate.heldout_perplexity(config, graphdef, model_cfg, result.state["params"])
    stage("evaluate")

    results = {
        "seed": s.seed, "eval_scenes": gen["scenes"], "eval_seed": s.eval_seed,
        "train_questions": s.get("train_questions", 0),
        "captioning": gen["captioning"], "text_to_image": gen["text_to_image"], **({"vqa": gen["vqa"]} if "vqa" in gen else {}),
        "perplexity": ppl,
        "model": f"d={model_cfg.d_model}, {model_cfg.n_layers} layers, vocab {model_cfg.vocab_size}, "
                 f"{sum(x.size for x in jax.tree.leaves(params)) / 1e6:.2f}M params",
        "train_steps": int(result.step), "tokens_per_step": config.train.batch_size * config.train.seq_len,
        "stage_s": stage_s, "wall_s": time.monotonic() - t0,
    }
    report.write_report(workdir, results, gen["examples"], metrics, s.grid_examples)
    stage("report")
    # Written again so that the report's wall time includes the report stage itself.
    results["stage_s"], results["wall_s"] = stage_s, time.monotonic() - t0
    (workdir / "results.json").write_text(json.dumps(results, indent=2))
    report.write_report(workdir, results, gen["examples"], metrics, s.grid_examples)
    return results


def reevaluate(config, run_dir, out_dir) -> dict:
    """Scores a finished smoke run's model (run_dir: its workdir) on the evaluation set that `config.smoke`
    defines now, without retraining: the run's tokenizer, VQ-GAN and last checkpoint; evaluation scenes and
    results in out_dir (results.json, report.md). A run trained without question turns answers nothing
    sensible: set smoke.vqa=False for it."""
    import jax

    from chameleon_jax import checkpoint as ckpt
    from chameleon_jax import model as model_lib
    from chameleon_jax import text
    from chameleon_jax.evals import checkpoint as eval_ckpt
    from chameleon_jax.model import sharding as shd
    from chameleon_jax.train import metrics as metrics_lib
    from chameleon_jax.vqgan import checkpoint as vq_checkpoint

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    run_config = ckpt.read_config(run_dir / "train")
    run_config.unlock()
    run_config.mesh.update(data=-1, fsdp=1, tensor=1)
    params, model_cfg, step_dir = eval_ckpt.restore_for_eval(run_dir / "train", run_config,
                                                             shd.make_mesh(run_config.mesh))
    params = jax.device_get(params)
    graphdef, _ = model_lib.abstract(model_cfg)
    vq_cfg, vq_params = vq_checkpoint.load(run_config.generate.vqgan)
    tokenizer = text.load(run_config.generate.tokenizer, image_codes=vq_cfg.n_embed)
    s = copy.deepcopy(config.smoke)
    s.unlock()
    s.seed = run_config.smoke.seed
    stages.build_eval(s, out_dir / "eval")
    gen = evaluate.evaluate_generation(s, graphdef, model_cfg, params, tokenizer, vq_cfg, vq_params, out_dir / "eval")
    results = {
        "seed": s.seed, "eval_scenes": gen["scenes"], "eval_seed": s.eval_seed,
        "train_questions": run_config.smoke.get("train_questions", 0), "reevaluated": str(step_dir),
        "captioning": gen["captioning"], "text_to_image": gen["text_to_image"],
        **({"vqa": gen["vqa"]} if "vqa" in gen else {}), "perplexity": {},
        "model": f"d={model_cfg.d_model}, {model_cfg.n_layers} layers, vocab {model_cfg.vocab_size}",
        "train_steps": int(run_config.train.steps),
        "tokens_per_step": run_config.train.batch_size * run_config.train.seq_len,
        "stage_s": {"evaluate": time.monotonic() - t0}, "wall_s": time.monotonic() - t0,
    }
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    report.write_report(out_dir, results, gen["examples"], metrics_lib.read_metrics(run_dir / "train"),
                        s.grid_examples)
    return results


def summary(results: dict, workdir) -> str:
    """The lines a run prints: the headline scores with their 95% intervals, and where the report is."""
    cap, t2i, ppl = results["captioning"], results["text_to_image"], results["perplexity"]
    ci = lambda d: f"{100 * d['exact']:.1f}% [{100 * d['interval'][0]:.1f}, {100 * d['interval'][1]:.1f}]"
    vqa = results.get("vqa")
    return (f"{results['eval_scenes']['total']} distinct held-out scenes: captioning exact {ci(cap)}  "
            f"text-to-image exact {ci(t2i)}  (95% Wilson intervals)\n"
            f"CIDEr {cap.get('cider', float('nan')):.3f}  "
            + (f"VQA exact {100 * vqa['accuracy']:.1f}% of {vqa['questions']} questions  " if vqa else "")
            + f"perplexity text {ppl.get('text/perplexity', float('nan')):.3f} image "
            f"{ppl.get('image/perplexity', float('nan')):.3f}  wall {results['wall_s'] / 60:.1f} min\n"
            f"report: {Path(workdir) / 'report.md'}")
