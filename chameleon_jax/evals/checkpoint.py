"""Evaluating a checkpoint: params only, restored onto the devices at hand, perplexity per modality.

    params, model_cfg, step_dir = restore_for_eval(path, config, mesh)
    results, params = evaluate_checkpoint(path)     # {'text/perplexity': ..., 'checkpoint': ..., 'mesh': ...}

`path` is a training workdir (its latest checkpoint), a step folder or a params export. The mesh is
chosen here, not by the run that trained: params are restored into abstract targets that carry the
current shardings, so a checkpoint written on 8 devices as (2,2,2) restores onto 1 device.
"""
from __future__ import annotations


def restore_for_eval(path, config, mesh):
    """(params on `mesh`, ModelConfig, step folder) from a workdir, step folder or export.

    The params are the ones the model runs on: a LoRA run's adapters (state["lora"]) are merged into
    their kernels. A params export holds no adapters (it was written from merged weights)."""
    import jax

    from chameleon_jax import checkpoint as ckpt
    from chameleon_jax import config as config_lib
    from chameleon_jax import model as model_lib
    from chameleon_jax.model import sharding as shd
    from chameleon_jax.model import trainable

    model_cfg = config_lib.validate(config)
    step_dir = ckpt.resolve_step_dir(path)
    rules = shd.rules_from_config(config.get("sharding_rules"))
    specs = model_lib.param_specs(model_cfg, rules)

    def on_mesh(shapes, specs):
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes,
                            shd.named(mesh, specs))

    abstract = on_mesh(jax.eval_shape(lambda: model_lib.init_params(model_cfg, jax.random.PRNGKey(0))), specs)
    params = ckpt.restore_params(str(step_dir), abstract)
    plan = trainable.plan_from_config(config, model_cfg)
    if plan.lora.enabled and "lora" in ckpt.state_items(step_dir):
        shapes = jax.eval_shape(lambda p: trainable.init_adapters(plan, p, jax.random.PRNGKey(0)), abstract)
        lora = ckpt.restore_params(str(step_dir), on_mesh(shapes, trainable.adapter_specs(plan, specs)), item="lora")
        params = trainable.model_params(plan, params, lora)
    return params, model_cfg, step_dir


def evaluate_checkpoint(path, config=None, mesh_sizes=(-1, 1, 1), split="eval") -> tuple[dict, object]:
    """Perplexity per modality of the checkpoint at `path` on the current devices; (results, params).

    `config` defaults to the one stored with the checkpoint; its held-out data is config.eval.data (over
    config.data), or the training source with `split="train"`.
    """
    import jax

    from chameleon_jax import checkpoint as ckpt
    from chameleon_jax import model as model_lib
    from chameleon_jax.data import sources
    from chameleon_jax.evals import perplexity
    from chameleon_jax.model import sharding as shd
    from chameleon_jax.model.loss import LossConfig

    if split not in ("eval", "train"):
        raise ValueError(f"split={split!r}; use 'eval' (config.eval.data) or 'train' (the training source)")
    config = config if config is not None else ckpt.read_config(path)
    config.mesh.update(dict(zip(shd.MESH_AXES, mesh_sizes)))
    mesh = shd.make_mesh(config.mesh)
    params, model_cfg, step_dir = restore_for_eval(path, config, mesh)
    graphdef, _ = model_lib.abstract(model_cfg)
    rules = shd.rules_from_config(config.get("sharding_rules"))
    eval_step = perplexity.make_eval_step(graphdef, LossConfig.from_config(config.loss), mesh,
                                          jax.tree.map(lambda x: x.sharding, params))
    if split == "eval":
        batches = sources.eval_batches(config)
    else:
        it = sources.make_data_iterator(config)
        batches = (next(it) for _ in range(int(config.eval.steps)))
    with shd.activation_rules(rules):
        results = perplexity.evaluate(eval_step, params, batches, mesh)
    results["checkpoint"] = str(step_dir)
    results["mesh"] = dict(mesh.shape)
    return results, params
