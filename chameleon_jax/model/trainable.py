"""Which parameters a run trains: whole tensors by path pattern, vocabulary rows of some, LoRA adapters.

`config.finetune` (defaults: train everything):

    trainable     "*"   comma list of glob patterns over param paths; a pattern also matches everything
                        under it ("output", "blocks/attention", "blocks/*/w1", "*norm*"); "" = no base param
    rows          ""    PATTERN=START:STOP[,...]: of the tensors that `trainable` selected, those matching
                        PATTERN train only vocabulary ids START..STOP-1 along their vocab axis (the output
                        head [D, V]: columns; the embedding [V, D]: rows). START:STOP may be `image`
                        (= loss.image_ids) or `image+N` (N more ids after them, e.g. end-of-image).
    lora.rank     0     > 0 adds adapters of that rank (model/lora.py) ...
    lora.alpha    16    ... scaled by alpha / rank ...
    lora.targets  all   ... on these projections: wq,wk,wv,wo,w1,w3,w2

The optimizer sees only what trains (`trained_tree`): the selected tensors, with a row range cut to its
slice, and the adapters. So frozen params and the frozen rows of a partly trained tensor have no AdamW
moments at all, and `write_back` copies the updated slice into the full tensor, leaving every frozen
element bit for bit as it was. Slicing (not a mask over the whole tensor) is what keeps the Anole
preset's optimizer state at 2 x D x 8,192 floats instead of 2 x D x 65,536.

Full training keeps the optimizer tree equal to the params tree, so checkpoints from before these
fields existed resume unchanged.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import re

import jax
from flax import nnx
from flax import traverse_util
from jax.sharding import PartitionSpec as P

from chameleon_jax.model import flops
from chameleon_jax.model.config import ModelConfig
from chameleon_jax.model.lora import TARGETS, LoraConfig, init_lora, lora_specs, merge_lora
from chameleon_jax.model.transformer import Transformer

EVERYTHING = "*"


@dataclasses.dataclass(frozen=True)
class Rows:
    """A vocabulary range along one axis of a tensor."""
    axis: int
    start: int
    stop: int


@dataclasses.dataclass(frozen=True)
class Plan:
    """What trains, resolved against the model's param paths ("blocks/attention/wq").

    `trained` is None for "every param, whole" (full training), else (path, Rows or None) pairs in the
    params' flattening order.
    """
    trained: tuple[tuple[str, Rows | None], ...] | None = None
    lora: LoraConfig = LoraConfig()

    @property
    def full(self) -> bool:
        """Full training without adapters: the optimizer tree is the params tree itself."""
        return self.trained is None and not self.lora.enabled

    @property
    def backward_through_blocks(self) -> bool:
        """Whether the gradient has to flow back through the blocks (anything below the final norm trains)."""
        return self.trained is None or self.lora.enabled or any(
            p == "embedding" or p.startswith("blocks/") for p, _ in self.trained)

    def describe(self) -> str:
        parts = ["every param"] if self.trained is None else [
            p if r is None else f"{p}[{r.start}:{r.stop} on axis {r.axis}]" for p, r in self.trained]
        if self.lora.enabled:
            parts.append(f"LoRA rank {self.lora.rank} (alpha {self.lora.alpha:g}) on {','.join(self.lora.targets)}")
        return ", ".join(parts) or "nothing"


FULL = Plan()


# ------------------------------------------------------------------------------------------------
# From the config.
# ------------------------------------------------------------------------------------------------
def _param_axes(model_cfg: ModelConfig) -> dict[str, tuple]:
    """Param path -> logical axis names per dim ("layers", "embed", "vocab", ...), from abstract shapes."""
    _, state = nnx.split(nnx.eval_shape(lambda: Transformer(model_cfg, rngs=nnx.Rngs(0))))
    names = jax.tree.map(lambda v: tuple(v.get_metadata().get("out_sharding") or (None,) * len(v.shape)),
                         state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    flat = traverse_util.flatten_dict(nnx.to_pure_dict(names), sep="/")
    return {k: v for k, v in flat.items()}


def _patterns(spec: str) -> list[str]:
    return [p.strip().strip("/") for p in str(spec).split(",") if p.strip()]


def _matches(path: str, pattern: str) -> bool:
    return fnmatch.fnmatchcase(path, pattern) or fnmatch.fnmatchcase(path, pattern + "/*")


def resolve(finetune, model_cfg: ModelConfig, image_ids=(0, 0)) -> tuple[Plan, list[str]]:
    """The Plan of a `config.finetune` section, and the errors that stop it (each names its fix)."""
    errors: list[str] = []
    lora = LoraConfig.from_config(finetune.get("lora", {}))
    errors += lora.errors()
    trainable = _patterns(finetune.get("trainable", EVERYTHING))
    rows_spec = str(finetune.get("rows", "")).strip()
    if trainable == [EVERYTHING] and not rows_spec:
        if lora.enabled:
            errors.append("finetune.lora.rank > 0 with finetune.trainable='*' trains the whole model besides the "
                          "adapters; set --config.finetune.trainable='' to train the adapters only, or name the "
                          "base params to train with them (e.g. 'output').")
        return Plan(None, lora), errors

    axes = _param_axes(model_cfg)
    paths = list(axes)
    selected = [p for p in paths if any(_matches(p, pat) for pat in trainable)]
    for pat in trainable:
        if not any(_matches(p, pat) for p in paths):
            errors.append(f"finetune.trainable pattern {pat!r} matches no parameter; the paths are: {', '.join(paths)}.")
    rows: dict[str, Rows] = {}
    for entry in _patterns(rows_spec):
        m = re.fullmatch(r"([^=]+)=\s*(?:(image)(?:\s*\+\s*(\d+))?|(\d+)\s*:\s*(\d+))", entry)
        if not m:
            errors.append(f"finetune.rows entry {entry!r}; write PATTERN=START:STOP (vocabulary ids, STOP "
                          f"excluded), PATTERN=image or PATTERN=image+N, e.g. --config.finetune.rows=output=4:8196.")
            continue
        pat = m[1].strip().strip("/")
        # image+N: the image ids and the N after them, resolved against loss.image_ids when the plan is
        # made, so a preset follows the image ids a checkpoint brings (model_from_init_checkpoint).
        start, stop = ((int(image_ids[0]), int(image_ids[1]) + int(m[3] or 0)) if m[2]
                       else (int(m[4]), int(m[5])))
        hits = [p for p in selected if _matches(p, pat)]
        if not hits:
            errors.append(f"finetune.rows pattern {pat!r} matches no parameter that finetune.trainable selects "
                          f"({', '.join(selected) or 'none'}); add it to finetune.trainable, e.g. "
                          f"--config.finetune.trainable={pat}.")
        if not 0 <= start < stop <= model_cfg.vocab_size:
            errors.append(f"finetune.rows {entry!r}: need 0 <= START < STOP <= vocab_size ({model_cfg.vocab_size}).")
        for p in hits:
            if "vocab" not in axes[p]:
                errors.append(f"finetune.rows: {p} has no vocabulary axis (its axes: {axes[p]}); rows apply to "
                              f"'output' and 'embedding' only.")
            elif p in rows:
                errors.append(f"finetune.rows gives {p} two ranges; give it one.")
            else:
                rows[p] = Rows(axes[p].index("vocab"), start, stop)
    plan = Plan(tuple((p, rows.get(p)) for p in selected), lora)
    if not selected and not lora.enabled:
        errors.append("finetune.trainable selects no parameter and LoRA is off (finetune.lora.rank=0): "
                      "nothing would train; name params (e.g. 'output') or set finetune.lora.rank.")
    return plan, errors


def plan_from_config(config, model_cfg: ModelConfig) -> Plan:
    """The experiment's Plan (FULL when the config has no `finetune` section)."""
    finetune = config.get("finetune")
    if finetune is None:
        return FULL
    plan, errors = resolve(finetune, model_cfg, tuple(config.loss.image_ids))
    if errors:
        raise ValueError("Invalid config:\n  - " + "\n  - ".join(errors))
    return plan


# ------------------------------------------------------------------------------------------------
# On params (pure dicts): what the optimizer sees, and back.
# ------------------------------------------------------------------------------------------------
def _cut(x, rows: Rows):
    return jax.lax.slice_in_dim(x, rows.start, rows.stop, axis=rows.axis)


def train_flops_per_token(plan: Plan, cfg: ModelConfig, seq_len: int) -> int:
    """Model FLOPs per token of a step that trains `plan` (flops.py's convention, for MFU).

    Full training: 6·N_matmul + causal attention (flops.train_flops_per_token). Otherwise, forward
    (2·N_matmul and a third of the attention) plus what the backward does: the input gradients through
    every matmul and attention (2·N_matmul and two thirds) when the gradient flows through the blocks,
    and the weight gradients (2 FLOPs a parameter) of the trained matmul weights only; a LoRA target
    counts its whole kernel, whose gradient the merged forward forms. With only the head trained the
    blocks run forward only.
    """
    parts = flops.flops_breakdown(cfg, seq_len)
    if plan.trained is None:
        return sum(parts.values())
    n_matmul, attention_forward = parts["matmul"] // 6, parts["attention"] // 3
    shapes = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.eval_shape(
        lambda: nnx.state(Transformer(cfg, rngs=nnx.Rngs(0)), nnx.Param))), sep="/")

    def is_matmul(path):  # flops.param_breakdown's matmul weights
        return "norm" not in path and path != "embedding"

    trained = sum(math.prod(shapes[p].shape) if r is None else math.prod(shapes[p].shape) // shapes[p].shape[r.axis]
                  * (r.stop - r.start) for p, r in plan.trained if is_matmul(p))
    if plan.lora.enabled:
        trained += sum(math.prod(shapes["/".join(TARGETS[t][0])].shape) for t in plan.lora.targets)
    total = 2 * n_matmul + attention_forward + 2 * trained
    if plan.backward_through_blocks:
        total += 2 * n_matmul + 2 * attention_forward
    elif any(p.startswith("final_norm") for p, _ in plan.trained):
        total += 2 * cfg.d_model * cfg.vocab_size  # the head's input gradient, to reach the final norm
    return total


def slice_spec(spec, rows: Rows):
    """The PartitionSpec of a row slice: its tensor's, with the row axis whole. A range such as the
    8,193 image rows divides by no mesh axis, and the slice is small next to its tensor."""
    spec = list(spec) + [None] * (rows.axis + 1 - len(spec))
    spec[rows.axis] = None
    return P(*spec)


def trained_tree(plan: Plan, params: dict, lora: dict | None = None, *, cut=_cut) -> dict:
    """The tree the optimizer updates: `params` itself for full training, else
    {"params": the trained tensors (row ranges cut to their slice), "lora": the adapters}, each part
    present only when it has leaves. `cut` maps (leaf, Rows) to the leaf's trained part; for a tree
    of PartitionSpecs pass `slice_spec`."""
    if plan.full:
        return params
    out = {}
    if plan.trained is None:
        out["params"] = params
    elif plan.trained:
        flat = traverse_util.flatten_dict(params, sep="/")
        out["params"] = traverse_util.unflatten_dict({p: flat[p] if r is None else cut(flat[p], r)
                                                  for p, r in plan.trained}, sep="/")
    if plan.lora.enabled:
        out["lora"] = lora
    return out


def write_back(plan: Plan, params: dict, lora: dict | None, tree: dict) -> tuple[dict, dict | None]:
    """(params, lora) with the trained parts replaced from an (updated) `trained_tree`.

    Frozen tensors are passed through as they are; a row range is written into its tensor with
    dynamic_update_slice, so the rows outside it keep their bits."""
    if plan.full:
        return tree, lora
    if plan.trained is None:
        params = tree["params"]
    elif plan.trained:
        flat = traverse_util.flatten_dict(params, sep="/")
        new = traverse_util.flatten_dict(tree["params"], sep="/")
        for p, r in plan.trained:
            flat[p] = new[p] if r is None else jax.lax.dynamic_update_slice_in_dim(
                flat[p], new[p].astype(flat[p].dtype), r.start, axis=r.axis)
        params = traverse_util.unflatten_dict(flat, sep="/")
    return params, tree.get("lora", lora)


def model_params(plan: Plan, params: dict, lora: dict | None) -> dict:
    """The params the model runs on: the adapters merged into their kernels (see model/lora.py)."""
    return merge_lora(params, lora, plan.lora) if plan.lora.enabled else params


def init_adapters(plan: Plan, params: dict, key: jax.Array) -> dict | None:
    """Fresh adapters for the plan (None without LoRA)."""
    return init_lora(params, plan.lora, key) if plan.lora.enabled else None


def adapter_specs(plan: Plan, param_specs: dict) -> dict | None:
    return lora_specs(param_specs, plan.lora) if plan.lora.enabled else None


__all__ = ["Plan", "Rows", "FULL", "resolve", "plan_from_config", "trained_tree", "write_back",
           "model_params", "init_adapters", "adapter_specs", "slice_spec", "train_flops_per_token"]
