"""Orbax checkpoints: save/restore {state, data, config}, and params-only restore onto any mesh.

A run's checkpoints live in one directory, one sub-folder per step:

    <dir>/<step>/state    the train state pytree (params, opt_state, step, rng, ...), OCDBT
    <dir>/<step>/data     the Grain iterator position, one JSON per process
    <dir>/<step>/config   the experiment config, JSON

Orbax writes each step into a temporary folder and renames it only once every process has finished
(on an object store such as gs://, which has no rename, it writes in place and marks the step complete
with a `commit_success.txt` last), so a crash mid-write leaves the previous step as the latest complete
one. `<dir>` may be local or a gs:// URL: paths are `etils.epath.Path`s throughout.

A resumed run restores with `restore_latest_intact`: every process reads alone, then all agree through
one all-gather, so a damaged newest step (a truncated or zeroed data file, a lost per-process JSON) makes
every process fall back to the newest intact one, with the reason logged, instead of leaving some of
them waiting in a barrier that the failed one never reaches.

Restoring onto another topology (other device count, mesh or process count for `state`) works by
restoring into abstract targets: `jax.ShapeDtypeStruct(shape, dtype, sharding=<current sharding>)`.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any, Callable

import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers as policies

from chameleon_jax import storage

log = logging.getLogger(__name__)


def _orbax_dir(directory) -> epath.Path:
    """storage.resolve for the folders Orbax writes arrays into, which must be local or gs://.

    Orbax 0.12 hands TensorStore a remote kvstore for gs:// only: an s3:// folder becomes the local path
    ./s3:/... (OCDBT then refuses it as relative, after writing part of the step there)."""
    path = storage.resolve(directory)
    scheme = str(path).split("://", 1)[0] if "://" in str(path) else ""
    if scheme not in ("", "gs"):
        raise ValueError(f"{path}: checkpoints can be written to a local folder or gs:// only (Orbax stores "
                         f"{scheme}:// arrays on the local disk); use a gs:// bucket, or mount the bucket "
                         f"(e.g. mountpoint-s3 or gcsfuse) and pass the mounted path.")
    return path


_array_handler_set = False


def _save_arrays_whole_on_cpu() -> None:
    """Turns Orbax's replica-parallel saving off when the arrays live on CPU devices.

    Replica-parallel saving splits every replicated array among the devices that hold a copy, so that
    accelerators copy their parts to the host at once and hosts share the writes. CPU devices are one
    process's memory: the split buys no parallelism and costs one eagerly dispatched slice per copy,
    thousands per save for a state replicated over 8 CPU devices (4 s of a 5 s save of a 16 px VQ-GAN).
    Accelerators keep Orbax's default."""
    global _array_handler_set
    if _array_handler_set or jax.default_backend() != "cpu":
        return
    ocp.type_handlers.register_type_handler(
        jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False,
                                                  array_metadata_store=_array_metadata_store()),
        override=True)
    _array_handler_set = True


def _array_metadata_store():
    from orbax.checkpoint._src.metadata import array_metadata_store
    return array_metadata_store.Store()


def make_manager(directory, *, keep: int = 3, keep_every: int = 0, async_save: bool = True,
                 read_only: bool = False) -> ocp.CheckpointManager:
    """A manager that keeps the latest `keep` steps plus every `keep_every`-th step for good.

    It saves whenever asked: the caller decides when (an interval, a signal, the last step).
    """
    _save_arrays_whole_on_cpu()
    keepers = [policies.LatestN(int(keep))]
    if keep_every:
        keepers.append(policies.EveryNSteps(int(keep_every)))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policies.AnyPreservationPolicy(keepers),
        enable_async_checkpointing=async_save, read_only=read_only, create=not read_only,
        cleanup_tmp_directories=not read_only)
    return ocp.CheckpointManager(_orbax_dir(directory), options=options)


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


class CheckpointDamaged(RuntimeError):
    """Checkpoints exist but none restores on every process; the run stops rather than start over."""


@dataclasses.dataclass
class Restored:
    step: int | None               # the step restored; None when the directory holds no checkpoint
    state: Any = None              # restored into the abstract state's shardings
    config: dict | None = None     # the experiment config stored with it
    skipped: list = dataclasses.field(default_factory=list)  # [(step, reason)] newer steps set aside


def _reader(directory) -> ocp.CheckpointManager:
    """A read-only manager over this process alone: its restores hold no cross-process barrier.

    Orbax ends every restore with a barrier over all processes. If one process fails to read its part,
    the others wait in that barrier (and the failing one in jax.distributed's shutdown barrier) until
    timeouts of many minutes. Reading alone, then agreeing through one all-gather that every process
    enters whatever happened, turns a damaged file into a decision instead of a hang.
    """
    me = jax.process_index()
    options = ocp.CheckpointManagerOptions(
        read_only=True, create=False, cleanup_tmp_directories=False, save_interval_steps=0,
        multiprocessing_options=ocp.options.MultiprocessingOptions(
            primary_host=me, active_processes={me}, barrier_sync_key_prefix=f"restore-p{me}"))
    return ocp.CheckpointManager(_orbax_dir(directory), options=options)


_REASON_BYTES = 320


def _gather_reasons(reason: str) -> list[str]:
    """Every process's failure reason ("" = restored), in process order: one all-gather of a fixed-size
    buffer that every process enters whatever happened to it, so all of them decide alike."""
    if jax.process_count() == 1:
        return [reason]
    from jax.experimental import multihost_utils

    buf = np.zeros(_REASON_BYTES, np.uint8)
    raw = reason.encode()[:_REASON_BYTES]
    buf[:len(raw)] = np.frombuffer(raw, np.uint8)
    rows = np.asarray(multihost_utils.process_allgather(buf)).reshape(-1, _REASON_BYTES)
    return [bytes(r).rstrip(b"\0").decode(errors="replace") for r in rows]


def _root_cause(e: BaseException) -> str:
    """The innermost cause, which names the file and the fault (Orbax wraps it in a generic one)."""
    while e.__cause__ is not None:
        e = e.__cause__
    return f"{type(e).__name__}: {' '.join(str(e).split())}"


def restore_latest_intact(manager: ocp.CheckpointManager, abstract_state, data_iterator=None, *,
                          check_config: Callable[[dict], None] | None = None) -> Restored:
    """The newest checkpoint that every process restores, falling back past damaged ones.

    Every process tries the newest step on its own, then all of them agree through an all-gather:
    either all restored it, or all move on to the next older step. A damaged step that was passed
    over is logged with each failing process's reason and moved aside to `<dir>/damaged-<step>` (on
    process 0, so the run can save that step number again); delete it once inspected. If checkpoints
    exist but none restores, raises CheckpointDamaged naming each step and why: the run never
    silently starts from scratch. `data_iterator` is repositioned in place to the restored step.

    `check_config(saved_config)` runs before a step's state is read; what it raises (e.g. "this workdir
    holds another model") propagates, identically on every process, since all read the same file.
    """
    steps = sorted(manager.all_steps(), reverse=True)
    if not steps:
        return Restored(step=None)
    directory = epath.Path(manager.directory)
    reader = _reader(directory)
    damaged: list[tuple[int, str]] = []
    try:
        for step in steps:
            restored, saved_config, reason = None, None, ""
            try:
                saved_config = reader.restore(int(step), args=ocp.args.Composite(
                    config=ocp.args.JsonRestore()))["config"]
            except Exception as e:  # noqa: BLE001 -- any unreadable config is damage to report, not a crash
                reason = _root_cause(e)
            if not reason and check_config is not None:
                check_config(saved_config)
            if not reason:
                items = {"state": ocp.args.StandardRestore(abstract_state)}
                if data_iterator is not None:
                    items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
                try:
                    restored = reader.restore(int(step), args=ocp.args.Composite(**items))
                except Exception as e:  # Orbax, tensorstore and Grain raise many types for damaged files
                    reason = _root_cause(e)
                    missing = [f for f in ("_CHECKPOINT_METADATA", "state/_METADATA", "state/manifest.ocdbt")
                               if not (directory / str(step) / f).exists()]
                    if missing:  # Orbax reports a lost metadata file as a pytree structure mismatch
                        reason = f"{', '.join(missing)} missing; {reason}"
                    log.debug("process %d cannot restore step %d", jax.process_index(), step, exc_info=True)
            reasons = _gather_reasons(reason[:_REASON_BYTES - 8])
            if not any(reasons):
                if damaged:
                    _set_aside(manager, directory, [s for s, _ in damaged])
                    log.warning("resumed from step %d, the newest intact checkpoint in %s; skipped damaged %s",
                                step, directory, "; ".join(f"step {s} ({r})" for s, r in damaged))
                return Restored(step=int(step), state=restored["state"], config=saved_config, skipped=damaged)
            why = "; ".join(f"process {i}: {r}" for i, r in enumerate(reasons) if r)
            log.error("checkpoint step %d (%s) cannot be restored: %s", step, directory / str(step), why)
            damaged.append((int(step), why))
    finally:
        reader.close()
    listing = "; ".join(f"step {s} ({r})" for s, r in damaged)
    raise CheckpointDamaged(
        f"no checkpoint in {directory} can be restored on every process: {listing}. Nothing was trained "
        f"from scratch. Restore the files, or delete the damaged step folders to start over "
        f"(rm -r {' '.join(str(directory / str(s)) for s, _ in damaged)}), or use a new --workdir.")


def _set_aside(manager: ocp.CheckpointManager, directory: epath.Path, steps: list[int]) -> None:
    """Renames damaged step folders out of Orbax's sight (kept for inspection) and reloads the manager."""
    if jax.process_index() == 0:
        for step in steps:
            target = directory / f"damaged-{step}"
            n = 1
            while target.exists():
                target, n = directory / f"damaged-{step}.{n}", n + 1
            (directory / str(step)).rename(target)
            log.warning("moved damaged checkpoint step %d aside to %s; delete it once inspected", step, target)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("checkpoint: damaged steps set aside")
    manager.reload()


def restore_config(manager: ocp.CheckpointManager, step: int) -> dict:
    return manager.restore(int(step), args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]


def resolve_step_dir(path) -> epath.Path:
    """A workdir, a checkpoints folder, a step folder or an export -> the folder holding `state`."""
    path = epath.Path(path)
    if (path / "state").is_dir():
        return path
    for candidate in (path / "checkpoints", path):
        steps = sorted((int(p.name), p) for p in candidate.glob("*") if p.name.isdigit() and
                       (p / "state").is_dir()) if candidate.is_dir() else []
        if steps:
            return steps[-1][1]
    raise FileNotFoundError(f"no checkpoint under {path}: expected a workdir (with checkpoints/<step>/state), "
                            f"a checkpoints folder, a step folder or a params export")


def restore_params(path, abstract_params, item: str = "params") -> Any:
    """Params only (no optimizer state), restored onto the shardings of `abstract_params`.

    `abstract_params` holds `jax.ShapeDtypeStruct(..., sharding=...)` leaves for the current mesh, so
    a checkpoint written on 8 devices as (2,2,2) restores onto 1 device, and vice versa. `item` names
    another part of the state to read the same way (e.g. "lora", a LoRA run's adapters).
    """
    step_dir = resolve_step_dir(path)
    target = {item: abstract_params}
    args = ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                  partial_restore=True)
    with ocp.PyTreeCheckpointer() as checkpointer:
        restored = checkpointer.restore(_orbax_dir(step_dir / "state"), args=args)
    log.info("restored %s from %s", item, step_dir)
    return restored[item]


def state_items(path) -> set[str]:
    """The top-level names in a checkpoint's state ({"params", "opt_state", "step", ...}), from its metadata."""
    with ocp.PyTreeCheckpointer() as checkpointer:
        return set(checkpointer.metadata(_orbax_dir(resolve_step_dir(path) / "state")).item_metadata.tree)


def export_params(params, out_dir, config=None) -> epath.Path:
    """Writes a params-only checkpoint (`OUT/state` = {params}, `OUT/config.json`) for eval/serving."""
    out_dir = _orbax_dir(out_dir)  # a local folder or a gs:// prefix
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
