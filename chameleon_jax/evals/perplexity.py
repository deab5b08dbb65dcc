"""Perplexity per modality over a held-out token source.

    eval_step = make_eval_step(graphdef, loss_cfg, mesh, params_shardings)
    results = evaluate(eval_step, params, batches, mesh)   # {'text/perplexity': ..., 'image/loss': ...}

Sums and counts are accumulated exactly (float64 on the host), so the result does not depend on how
the held-out set is split into batches or on the mesh beyond floating-point tolerance.
"""
from __future__ import annotations

from typing import Iterable

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from chameleon_jax import model as model_lib
from chameleon_jax.data.batch import Batch, device_batch
from chameleon_jax.model import sharding as shd
from chameleon_jax.model import loss as loss_lib


def make_eval_step(graphdef, loss_cfg, mesh, params_shardings):
    """(params, batch) -> metric sums (tokens, nll, per-modality nll/correct), jitted over `mesh`."""

    def eval_step(params, batch):
        model = model_lib.bind(graphdef, params)
        logits = model.logits(batch["tokens"], batch["segment_ids"], batch["positions"])
        _, sums = loss_lib.loss_and_metrics(logits, batch, image_ids=loss_cfg.image_ids,
                                            z_loss_weight=loss_cfg.z_loss_weight)
        return sums

    return jax.jit(eval_step, in_shardings=(params_shardings, NamedSharding(mesh, shd.BATCH_SPEC)),
                   out_shardings=NamedSharding(mesh, P()))


def evaluate(eval_step, params, batches: Iterable[Batch], mesh, to_global=None) -> dict[str, float]:
    """Runs `eval_step` over host-local numpy batches; returns per-modality loss/accuracy/perplexity."""
    to_global = to_global or device_batch
    totals: dict[str, float] = {}
    n = 0
    with jax.set_mesh(mesh):
        for batch in batches:
            sums = jax.device_get(eval_step(params, to_global(batch, mesh)))
            for k, v in sums.items():
                totals[k] = totals.get(k, 0.0) + float(np.float64(v))
            n += 1
    if not n:
        raise ValueError("the eval source yielded no batches; check eval.steps and the eval data config")
    out = loss_lib.summarize(totals)
    out["perplexity"] = float(np.exp(out["nll"]))
    out["tokens"] = totals["tokens"]
    return out
