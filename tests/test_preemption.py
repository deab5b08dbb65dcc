"""Pod-wide preemption with two processes (jax.distributed on localhost, launch/local.py's commands).

SIGTERM reaches ONE process; both must save the same step and exit 0, and the resumed run must end
bitwise where an uninterrupted run ends. A process that dies without notice must make the other exit
within the heartbeat timeout instead of hanging in a collective.
"""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np

from chameleon_jax import checkpoint as ckpt
from chameleon_jax.evals.checkpoint import restore_for_eval
from chameleon_jax.model import sharding as shd
from chameleon_jax.train import metrics as metrics_lib
from launch import local

REPO = Path(__file__).resolve().parents[1]
STEPS = 40  # long enough (seconds of steps) for the signal to land mid-run


def train_command(workdir, *extra):
    return [sys.executable, "-m", "chameleon_jax.train", "--config", str(REPO / "experiments/tiny.py"),
            "--workdir", str(workdir), f"--config.train.steps={STEPS}", "--config.train.log_every=4",
            f"--config.checkpoint.every={STEPS}", "--config.train.eval_every=0", "--config.mesh.data=2",
            "--config.mesh.fsdp=2", "--config.mesh.tensor=1", "--config.train.peak_flops=1e11", *extra]


def start(workdir, tmp_path, timeout_s=600, extra=()):
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="2", PYTHONPATH=str(REPO))
    return [subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, start_new_session=True,
                             stderr=open(tmp_path / f"{Path(workdir).name}_p{i}.log", "wb"))
            for i, cmd in enumerate(local.process_commands(train_command(workdir, *extra), 2, local.free_port(),
                                                           timeout_s))]


def python_of(proc) -> int:
    """The training process under launch/local.py's `timeout` wrapper."""
    deadline = time.time() + 30
    while time.time() < deadline:
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        if children:
            return int(children[0])
        time.sleep(0.05)
    raise AssertionError("no training process under the timeout wrapper")


def logged_steps(workdir) -> list[int]:
    return [r["step"] for r in metrics_lib.read_metrics(workdir) if "train/loss" in r]


def wait_for_step(procs, workdir, step, tmp_path, deadline_s=300):
    deadline = time.time() + deadline_s
    while not any(s >= step for s in logged_steps(workdir)):
        assert all(p.poll() is None for p in procs), (tmp_path / f"{Path(workdir).name}_p0.log").read_text()[-3000:]
        assert time.time() < deadline, f"step {step} was not logged in time"
        time.sleep(0.02)


def final_params(workdir):
    config = ckpt.read_config(workdir)
    mesh = shd.make_mesh(dict(data=-1, fsdp=1, tensor=1), jax.devices())
    params, _, step_dir = restore_for_eval(workdir, config, mesh)
    return step_dir, jax.tree.map(np.asarray, params)


def test_one_host_signalled_every_host_saves_the_same_step_and_the_resume_is_exact(tmp_path):
    reference, run = tmp_path / "reference", tmp_path / "run"
    assert local.run(train_command(reference), processes=2, devices=2, timeout_s=600) == 0

    kill_after = random.Random(os.environ.get("PYTEST_SEED", "0")).randrange(8, 24, 4)
    print(f"SIGTERM to process 1 once step {kill_after} is logged")
    procs = start(run, tmp_path)
    try:
        wait_for_step(procs, run, kill_after, tmp_path)
        os.kill(python_of(procs[1]), signal.SIGTERM)  # process 0 gets no signal
        codes = [p.wait(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    assert codes == [0, 0], [(tmp_path / f"run_p{i}.log").read_text()[-2000:] for i in range(2)]
    saved = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    assert len(saved) == 1 and kill_after < saved[0] < STEPS, saved  # one checkpoint, written by both
    for i in range(2):
        assert f"saved step {saved[0]}" in (tmp_path / f"run_p{i}.log").read_text()

    assert local.run(train_command(run), processes=2, devices=2, timeout_s=600) == 0
    ref_dir, ref = final_params(reference)
    run_dir, resumed = final_params(run)
    assert ref_dir.name == run_dir.name == str(STEPS)
    assert jax.tree.structure(ref) == jax.tree.structure(resumed)
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(a, b)  # bitwise
    last = lambda d: next(r for r in reversed(metrics_lib.read_metrics(d)) if "train/loss" in r)
    assert {k: v for k, v in last(run).items() if k.startswith("train/")} == \
        {k: v for k, v in last(reference).items() if k.startswith("train/")}


def test_a_dead_host_makes_the_other_exit_within_the_heartbeat_timeout(tmp_path):
    heartbeat_s = 10
    procs = start(tmp_path / "dead", tmp_path, extra=(f"--heartbeat_timeout_s={heartbeat_s}",))
    try:
        wait_for_step(procs, tmp_path / "dead", 8, tmp_path)
        os.kill(python_of(procs[1]), signal.SIGKILL)  # no notice, no save
        killed = time.time()
        procs[0].wait(timeout=120)  # launch/local.py's 60 s grace would otherwise hide a hang
        waited = time.time() - killed
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    print(f"the survivor exited {waited:.1f} s after its peer died (heartbeat timeout {heartbeat_s} s)")
    assert procs[0].returncode != 0  # it did not pretend to finish
    # Detection takes up to one timeout; allow another for the error to reach the survivor and for a
    # loaded machine.
    assert waited < 2 * heartbeat_s + 10, waited



def test_a_signal_while_a_resumed_run_restores_or_compiles_stops_every_host_at_its_first_step(tmp_path):
    """SIGTERM to one process of a resumed run before its first step (restore, first compile).

    jax's sync manager picks "the largest sync-point id any process has reached + 1"; with train steps as
    ids, a notice before the first id of a run resumed at step 4 picked 1, a step already behind, and the
    run trained to the end. The choice documented here: the signal is honoured at the first step
    boundary, as in a one-process run, so step 5 is trained and saved by both processes and nothing after
    it runs (a save of the restored step 4 alone would add nothing)."""
    seed = int(os.environ.get("FAULT_SEED", time.time_ns() % 10_000))
    rng = random.Random(seed)
    marker, target = rng.choice(["MFU denominator", "mesh {", "resumed from"]), rng.randrange(2)
    print(f"FAULT_SEED={seed}: SIGTERM to process {target} at process 0's first line holding {marker!r}")
    run = tmp_path / "early"
    assert local.run(train_command(run, "--config.train.steps=4"), processes=2, devices=2, timeout_s=600) == 0
    procs = start(run, tmp_path, timeout_s=300)
    log0 = tmp_path / "early_p0.log"
    try:
        deadline = time.time() + 240
        while marker not in log0.read_text(errors="replace"):
            assert all(p.poll() is None for p in procs), log0.read_text()[-3000:]
            assert time.time() < deadline, f"{marker!r} was not logged in time"
            time.sleep(0.02)
        os.kill(python_of(procs[target]), signal.SIGTERM)
        sent = time.perf_counter()
        codes = [p.wait(timeout=150) for p in procs]  # a lost signal trains all 40 steps (or hits the limit)
        took = time.perf_counter() - sent
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    logs = [(tmp_path / f"early_p{i}.log").read_text() for i in range(2)]
    print(f"SIGTERM at {marker!r} -> both processes exited {codes} after {took:.1f} s")
    assert codes == [0, 0], [log[-2000:] for log in logs]
    saved = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    assert saved == [4, 5] and logged_steps(run) == [4, 5], (saved, logged_steps(run), logs[0][-2000:])
    assert all("saved step 5 after SIGTERM" in log for log in logs), [log[-2000:] for log in logs]

    # The rerun resumes from the saved step (one more step keeps it short).
    assert local.run(train_command(run, "--config.train.steps=6"), processes=2, devices=2, timeout_s=600) == 0
    assert logged_steps(run) == [4, 5, 6]
    assert (run / "checkpoints" / "6").is_dir()
