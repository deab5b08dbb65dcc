"""Evaluate a checkpoint: params only, onto the devices at hand, perplexity per modality.

    python -m chameleon_jax.eval --workdir DIR                 # latest checkpoint of a training run
    python -m chameleon_jax.eval --checkpoint DIR/checkpoints/500 --mesh=1,1,1
    python -m chameleon_jax.eval --workdir DIR --export /tmp/params   # params-only export (also restorable)

The config stored with the checkpoint is used unless --config is given (then its overrides apply, e.g.
--config.eval.steps=50). The mesh is chosen here, not by the run that trained: a checkpoint written
on 8 devices as (2,2,2) restores onto 1 device, because params are restored into abstract targets
that carry the current shardings. The held-out data is config.eval.data (over config.data);
`--split train` evaluates on the training source instead.
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags



def restore_for_eval(path, config, mesh):
    """(params on `mesh`, ModelConfig, step folder) from a workdir, step folder or export."""
    import jax

    from chameleon_jax import checkpoint as ckpt
    from chameleon_jax import config as config_lib
    from chameleon_jax import model as model_lib
    from chameleon_jax.model import sharding as shd
    model_cfg = config_lib.validate(config)
    step_dir = ckpt.resolve_step_dir(path)
    rules = shd.rules_from_config(config.get("sharding_rules"))
    shardings = shd.named(mesh, model_lib.param_specs(model_cfg, rules))
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            jax.eval_shape(lambda: model_lib.init_params(model_cfg, jax.random.PRNGKey(0))),
                            shardings)
    return ckpt.restore_params(str(step_dir), abstract), model_cfg, step_dir


def evaluate_checkpoint(path, config=None, mesh_sizes=(-1, 1, 1), split="eval") -> tuple[dict, object]:
    """Perplexity per modality of the checkpoint at `path` on the current devices; (results, params)."""
    import jax

    from chameleon_jax import checkpoint as ckpt
    from chameleon_jax import model as model_lib
    from chameleon_jax.evals import perplexity
    from chameleon_jax.model import sharding as shd
    from chameleon_jax.train import runner
    from chameleon_jax.train.step import LossConfig

    config = config if config is not None else ckpt.read_config(path)
    config.mesh.update(dict(zip(shd.MESH_AXES, mesh_sizes)))
    mesh = shd.make_mesh(config.mesh)
    params, model_cfg, step_dir = restore_for_eval(path, config, mesh)
    graphdef, _ = model_lib.abstract(model_cfg)
    rules = shd.rules_from_config(config.get("sharding_rules"))
    eval_step = perplexity.make_eval_step(graphdef, LossConfig.from_config(config.loss), mesh,
                                          jax.tree.map(lambda x: x.sharding, params))
    if split == "eval":
        batches = runner.eval_batches(config)
    else:
        it = runner.make_data_iterator(config)
        batches = (next(it) for _ in range(int(config.eval.steps)))
    with shd.activation_rules(rules):
        results = perplexity.evaluate(eval_step, params, batches, mesh)
    results["checkpoint"] = str(step_dir)
    results["mesh"] = dict(mesh.shape)
    return results, params


def main(argv):
    del argv
    F = flags.FLAGS
    if bool(F.workdir) == bool(F.checkpoint):
        sys.exit("give exactly one of --workdir DIR or --checkpoint PATH")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "orbax", "jax._src"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from chameleon_jax import checkpoint as ckpt

    path = F.workdir or F.checkpoint
    config = F.config if F.config is not None else ckpt.read_config(path)
    mesh_sizes = tuple(int(x) for x in F.mesh.split(","))
    results, params = evaluate_checkpoint(path, config, mesh_sizes, F.split)
    print(json.dumps(results, indent=2))
    if F.output:
        Path(F.output).write_text(json.dumps(results, indent=2))
    if F.export:
        print(f"exported params to {ckpt.export_params(params, F.export, config)}")


if __name__ == "__main__":
    from chameleon_jax import cpu
    cpu.use_huge_pages()  # before anything allocates; see chameleon_jax/cpu.py
    # Flags are defined only when run as a program, so the library functions above import cleanly
    # next to other CLIs that also define --config.
    config_flags.DEFINE_config_file("config", None, "Optional experiment config; default: the checkpoint's own.")
    flags.DEFINE_string("workdir", None, "A training workdir: its latest checkpoint is evaluated.")
    flags.DEFINE_string("checkpoint", None, "A step folder (DIR/checkpoints/<step>) or a params export.")
    flags.DEFINE_string("mesh", "-1,1,1", "data,fsdp,tensor sizes for eval (-1 fills the devices).")
    flags.DEFINE_enum("split", "eval", ["eval", "train"], "Held-out data (config.eval.data) or the training source.")
    flags.DEFINE_string("export", None, "Write a params-only export here (OUT/state, OUT/config.json).")
    flags.DEFINE_string("output", None, "Also write the results as JSON here.")
    app.run(main)
