"""Profiling chosen steps into the workdir, and goodput accounting in metrics.jsonl."""
from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from chameleon_jax.train import goodput as goodput_lib
from chameleon_jax.train import metrics as metrics_lib
from chameleon_jax.train import profiling

REPO = Path(__file__).resolve().parents[1]


def run_fresh(code: str) -> None:
    """Runs `code` in a new Python process on the CPU backend.

    Tracing happens in a fresh process because the AOT tests of this suite load libtpu into the test
    process for compile-only TPU devices, and once it is loaded jax 0.10.2's `start_trace` crashes the
    process against libtpu 0.0.52's profiler plugin ("Unexpected PLUGIN_Profiler_Api size").
    """
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=REPO, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]


def traced_steps(folder) -> list[int]:
    """The `train` step annotations in the Perfetto trace(s) under `folder`."""
    steps = []
    for trace in Path(folder).rglob("perfetto_trace.json.gz"):
        events = json.load(gzip.open(trace))
        events = events["traceEvents"] if isinstance(events, dict) else events
        steps += [int(e["args"]["step_num"]) for e in events if e.get("name") == "train" and "args" in e]
    return sorted(steps)


def test_profile_steps_are_checked():
    assert profiling.parse_steps("10:13") == range(10, 13)
    assert profiling.parse_steps("") is None
    for bad in ("13:10", "0:3", "10", "a:b"):
        with pytest.raises(ValueError, match="--config.profile.steps=10:13"):
            profiling.parse_steps(bad)


def test_profiler_traces_exactly_the_chosen_steps(tmp_path):
    run_fresh(f"""
        import jax, jax.numpy as jnp
        from chameleon_jax.train import profiling
        profiler = profiling.StepProfiler("3:5", {str(tmp_path)!r})
        step = jax.jit(lambda x: jnp.tanh(x) @ x)
        x = jnp.ones((64, 64))
        for n in range(1, 7):
            with profiler.step(n):
                x = step(x)
            profiler.after(n, x)
        profiler.close()
    """)
    run = tmp_path / "profile" / "process_0" / "plugins" / "profile"
    assert list(run.glob("*/*.xplane.pb"))  # TensorBoard's profile plugin / XProf
    assert traced_steps(run) == [3, 4]


def test_profile_goes_to_a_bucket_workdir(gcs, tmp_path):
    # jax.profiler writes local files only; the trace must still land in a gs:// workdir.
    workdir = gcs.new_bucket() + "/run"
    run_fresh(f"""
        import jax, jax.numpy as jnp
        from chameleon_jax.train import profiling
        profiler = profiling.StepProfiler("1:2", {workdir!r})
        with profiler.step(1):
            y = jax.jit(lambda x: x * 2)(jnp.ones(8))
        profiler.after(1, y)
    """)
    objects = gcs.object_sizes(workdir + "/profile/process_0/")
    assert any(name.endswith(".xplane.pb") and size > 0 for name, size in objects.items()), objects
    assert any(name.endswith("perfetto_trace.json.gz") for name in objects), objects


def test_goodput_parts_add_up_to_wall_time():
    now = [0.0]
    g = goodput_lib.Goodput(clock=lambda: now[0])
    now[0] = 2.0
    with g.measure("restore"):
        now[0] = 5.0                       # 3 s restoring
    now[0] = 6.0                           # 1 s of other start-up
    g.loop_started()
    g.add("compile", 4.0)
    g.add("data_wait", 0.5)
    g.add("checkpoint", 1.5)
    now[0] = 16.0                          # 10 s in the loop: 6 s lost, 4 s productive
    m = g.metrics()
    assert m["goodput/wall_s"] == 16.0 and m["goodput/productive_s"] == 4.0
    assert m["goodput/restore_s"] == 3.0 and m["goodput/other_s"] == 3.0
    assert m["goodput/productive_fraction"] == 4.0 / 16.0
    with pytest.raises(KeyError, match="data_wait"):
        g.add("waiting", 1.0)


def test_a_run_writes_its_profile_and_goodput(tmp_path):
    run_fresh(f"""
        import sys
        sys.path.insert(0, "tests")
        from test_config import load
        from chameleon_jax.train import runner
        config = load("tiny")
        config.train.update(steps=6, log_every=2, eval_every=0)
        config.checkpoint.every = 2
        config.profile.steps = "3:5"
        runner.train(config, {str(tmp_path)!r})
    """)
    assert traced_steps(tmp_path / "profile" / "process_0") == [3, 4]
    rows = [r for r in metrics_lib.read_metrics(tmp_path) if "goodput/wall_s" in r]
    assert [r["step"] for r in rows] == [2, 4, 6]
    parts = ("productive", "compile", "checkpoint", "data_wait", "eval", "restore", "other")
    for r in rows:
        # The parts partition the wall time (float sums of a few terms: exact to ~1e-12 s).
        assert sum(r[f"goodput/{p}_s"] for p in parts) == pytest.approx(r["goodput/wall_s"], abs=1e-9)
        assert all(r[f"goodput/{p}_s"] >= 0 for p in parts if p != "other")
        assert 0 < r["goodput/productive_fraction"] < 1
    last = rows[-1]
    assert last["goodput/compile_s"] > 0 and last["goodput/checkpoint_s"] > 0 and last["goodput/data_wait_s"] > 0
    assert last["goodput/restore_s"] == 0  # a fresh run restored nothing
    # Cumulative: later windows never report less of anything.
    assert rows[0]["goodput/wall_s"] < last["goodput/wall_s"]
