"""Orbax checkpoints: save/restore {state, data, config}, and params-only restore onto any mesh.

A run's checkpoints live in one directory, one sub-folder per step:

    <dir>/<step>/state    the train state pytree (params, opt_state, step, rng, ...), OCDBT
    <dir>/<step>/data     the Grain iterator position, one JSON per process
    <dir>/<step>/config   the experiment config, JSON

Orbax writes each step into a temporary folder and renames it only once every process has finished,
so a crash mid-write leaves the previous step as the latest complete one.

Restoring onto another topology (other device count, mesh or process count for `state`) works by
restoring into abstract targets: `jax.ShapeDtypeStruct(shape, dtype, sharding=<current sharding>)`.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

log = logging.getLogger(__name__)


def make_manager(directory, *, keep: int = 3, keep_every: int = 0, async_save: bool = True,
                 read_only: bool = False) -> ocp.CheckpointManager:
    """A manager that keeps the latest `keep` steps plus every `keep_every`-th step for good.

    It saves whenever asked: the caller decides when (an interval, a signal, the last step).
    """
    keepers = [policies.LatestN(int(keep))]
    if keep_every:
        keepers.append(policies.EveryNSteps(int(keep_every)))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policies.AnyPreservationPolicy(keepers),
        enable_async_checkpointing=async_save, read_only=read_only, create=not read_only,
        cleanup_tmp_directories=not read_only)
    return ocp.CheckpointManager(Path(directory).absolute(), options=options)


class _FrozenIterator(grain.DatasetIterator):
    """The iterator's position at save time, so an async save never sees a later position."""

    def __init__(self, state):
        super().__init__()
        self._state = state

    def __next__(self):
        raise RuntimeError("a frozen iterator state cannot be iterated")

    def get_state(self):
        return self._state

    def set_state(self, state):
        self._state = state


def _config_json(config) -> dict:
    if isinstance(config, ml_collections.ConfigDict):
        return json.loads(config.to_json_best_effort())
    return dict(config)


def save(manager: ocp.CheckpointManager, step: int, state, data_iterator=None, config=None, *,
         force: bool = False) -> bool:
    """Starts an (async) save of the items given; returns whether a save was started."""
    items = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
        items["data"] = grain.checkpoint.CheckpointSave(_FrozenIterator(data_iterator.get_state()))
    if config is not None:
        items["config"] = ocp.args.JsonSave(_config_json(config))
    return manager.save(int(step), args=ocp.args.Composite(**items), force=force)


def restore(manager: ocp.CheckpointManager, step: int, abstract_state, data_iterator=None):
    """The state restored into `abstract_state`'s shardings; `data_iterator` is repositioned in place."""
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
        items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = manager.restore(int(step), args=ocp.args.Composite(**items))
    return restored["state"]


def restore_config(manager: ocp.CheckpointManager, step: int) -> dict:
    return manager.restore(int(step), args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]


def resolve_step_dir(path) -> Path:
    """A workdir, a checkpoints folder, a step folder or an export -> the folder holding `state`."""
    path = Path(path)
    if (path / "state").is_dir():
        return path
    for candidate in (path / "checkpoints", path):
        steps = sorted((int(p.name), p) for p in candidate.glob("*") if p.name.isdigit() and
                       (p / "state").is_dir()) if candidate.is_dir() else []
        if steps:
            return steps[-1][1]
    raise FileNotFoundError(f"no checkpoint under {path}: expected a workdir (with checkpoints/<step>/state), "
                            f"a checkpoints folder, a step folder or a params export")


def restore_params(path, abstract_params) -> Any:
    """Params only (no optimizer state), restored onto the shardings of `abstract_params`.

    `abstract_params` holds `jax.ShapeDtypeStruct(..., sharding=...)` leaves for the current mesh, so
    a checkpoint written on 8 devices as (2,2,2) restores onto 1 device, and vice versa.
    """
    step_dir = resolve_step_dir(path)
    target = {"params": abstract_params}
    args = ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                  partial_restore=True)
    with ocp.PyTreeCheckpointer() as checkpointer:
        restored = checkpointer.restore((step_dir / "state").absolute(), args=args)
    log.info("restored params from %s", step_dir)
    return restored["params"]


def export_params(params, out_dir, config=None) -> Path:
    """Writes a params-only checkpoint (`OUT/state` = {params}, `OUT/config.json`) for eval/serving."""
    out_dir = Path(out_dir).absolute()
    with ocp.PyTreeCheckpointer() as checkpointer:
        checkpointer.save(out_dir / "state", args=ocp.args.PyTreeSave({"params": params}), force=True)
    if config is not None and jax.process_index() == 0:
        (out_dir / "config.json").write_text(json.dumps(_config_json(config), indent=2))
    return out_dir


def read_config(path) -> ml_collections.ConfigDict:
    """The experiment config stored with a checkpoint or export (for eval without --config)."""
    step_dir = resolve_step_dir(path)
    for f in (step_dir / "config.json", step_dir / "config" / "metadata"):
        if f.is_file():
            return ml_collections.ConfigDict(json.loads(f.read_text()))
    raise FileNotFoundError(f"{step_dir} has no stored config; pass --config")
