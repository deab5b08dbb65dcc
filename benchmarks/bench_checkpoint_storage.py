"""Checkpoint cost by storage: bytes written per checkpoint, and how long a save stalls the train loop,
on local disk against an object store (gs://), for one experiment's full train state.

    python -m benchmarks.bench_checkpoint_storage --config experiments/tiny.py --remote gs://BUCKET/bench

Against a local GCS server instead of a bucket (what the figures in the README were measured on):

    python tests/gcs.py --port 9023 &           # gcp-storage-emulator + the download-header fix
    export STORAGE_EMULATOR_HOST=http://127.0.0.1:9023 TENSORSTORE_GCS_HTTP_URL=http://127.0.0.1:9023 \
           GOOGLE_AUTH_TOKEN_FOR_TESTING=dummy FSSPEC_GCS_TOKEN=anon
    python -m benchmarks.bench_checkpoint_storage --config experiments/tiny.py --remote gs://bench/run

Per storage it saves the state `--saves` times the way the trainer does (async Orbax, {state, config})
and reports, as medians:
- stall: the time the save call blocks the loop (the device-to-host copy and the start of the write);
- commit: from the save call until the step is committed (what a preemption must wait for);
- bytes: the size of one committed step folder (and the number of files or objects in it);
- metrics: one logging window's write (20 scalars to metrics.jsonl and TensorBoard), which on an object
  store rewrites metrics.jsonl whole and uploads the event file.
Timings on a shared machine are noisy; compare the two storages within one run.
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import tempfile
import time


def _load_config(path):
    spec = importlib.util.spec_from_file_location("exp_config", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


def train_state(config):
    """The experiment's initial train state (params, optimizer moments, step, rng) on this host's mesh."""
    import jax

    from chameleon_jax import config as config_lib
    from chameleon_jax.model import sharding as shd
    from chameleon_jax.train import optimizer as optimizer_lib
    from chameleon_jax.train import step as step_lib

    model_cfg = config_lib.validate(config, num_devices=jax.device_count())
    mesh = shd.make_mesh(config.mesh)
    tx = optimizer_lib.make_optimizer(config.optimizer, int(config.train.steps))
    state, _ = step_lib.init_sharded_state(model_cfg, tx, mesh, jax.random.PRNGKey(0),
                                           shd.rules_from_config(config.sharding_rules))
    return state


def step_size(step_dir: str) -> tuple[int, int]:
    """(bytes, files) under a committed step folder, local or remote."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(step_dir)
    sizes = fs.du(path, total=False, withdirs=False)
    return sum(sizes.values()), len(sizes)


def _perturbed(state, seed: int):
    import jax

    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return jax.tree.unflatten(treedef, [
        x + 1e-3 * jax.random.normal(k, x.shape, x.dtype).astype(x.dtype)
        if jax.numpy.issubdtype(x.dtype, jax.numpy.floating) else x for x, k in zip(leaves, keys)])


def measure(directory: str, state, config, saves: int) -> dict:
    import jax

    from chameleon_jax import checkpoint as ckpt

    manager = ckpt.make_manager(directory, keep=saves + 1)
    stalls, commits = [], []
    for step in range(1, saves + 1):
        # A new state per step with every float perturbed, as training makes one: Adam's moments start at
        # zero, which compresses to nothing and would understate the bytes of a real checkpoint.
        state = _perturbed(state, step)
        jax.block_until_ready(state)
        t0 = time.perf_counter()
        ckpt.save(manager, step, state, config=config, force=True)
        stalls.append(time.perf_counter() - t0)
        manager.wait_until_finished()
        commits.append(time.perf_counter() - t0)
    manager.close()
    nbytes, files = step_size(f"{directory.rstrip('/')}/{saves}")
    return {"stall_s": statistics.median(stalls), "commit_s": statistics.median(commits), "bytes": nbytes,
            "files": files, "metrics_s": _metrics_write_s(f"{directory.rstrip('/')}/workdir")}


def _metrics_write_s(workdir: str, windows: int = 20) -> float:
    """Median time of one logging window's write (metrics.jsonl + TensorBoard) at the 20th window."""
    from chameleon_jax.train import metrics as metrics_lib

    writer = metrics_lib.MetricsWriter(workdir)
    times = []
    for step in range(1, windows + 1):
        t0 = time.perf_counter()
        writer.write(step, {f"train/m{i}": 0.5 * i for i in range(20)})
        times.append(time.perf_counter() - t0)
    writer.close()
    return statistics.median(times[windows // 2:])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="experiments/tiny.py")
    parser.add_argument("--remote", required=True, help="gs://BUCKET/PREFIX (the bucket is created if missing)")
    parser.add_argument("--saves", type=int, default=5)
    args = parser.parse_args()

    import fsspec
    import jax

    config = _load_config(args.config)
    state = train_state(config)
    n_params = sum(x.size for x in jax.tree.leaves(state["params"]))
    fs, bucket = fsspec.core.url_to_fs("/".join(args.remote.split("/")[:3]))
    if not fs.exists(bucket):
        fs.mkdir(bucket)  # gcsfs: creates the bucket
    remote = f"{args.remote.rstrip('/')}/{int(time.time())}"
    with tempfile.TemporaryDirectory() as local:
        rows = {"local disk": measure(local, state, config, args.saves),
                args.remote: measure(remote, state, config, args.saves)}
    from chameleon_jax import cpu
    print(cpu.describe())
    print(f"{args.config}: {n_params:,} params; train state {sum(x.nbytes for x in jax.tree.leaves(state)):,} "
          f"bytes in memory; {args.saves} async saves each, medians")
    print(f"{'storage':<28} {'stall ms':>9} {'commit ms':>10} {'bytes/ckpt':>12} {'files':>6} {'metrics ms':>11}")
    for name, r in rows.items():
        print(f"{name:<28} {r['stall_s'] * 1e3:>9.1f} {r['commit_s'] * 1e3:>10.1f} {r['bytes']:>12,} {r['files']:>6} "
              f"{r['metrics_s'] * 1e3:>11.1f}")


if __name__ == "__main__":
    from chameleon_jax import cpu
    cpu.start_up()
    main()
