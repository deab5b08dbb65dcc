"""Two processes x two CPU devices through jax.distributed on localhost (launch/local.py).

They train on per-host data slices, checkpoint, are killed with SIGKILL, resume and re-log the same
losses; then the 2-process checkpoint restores for eval in this single process. Every process runs
under `timeout`, so a hung collective cannot hang CI.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from chameleon_jax import eval as eval_lib
from chameleon_jax.train import metrics as metrics_lib
from launch import local

REPO = Path(__file__).resolve().parents[1]


def train_command(workdir):
    return [sys.executable, "-m", "chameleon_jax.train", "--config", str(REPO / "experiments/tiny.py"),
            "--workdir", str(workdir), "--config.train.steps=12", "--config.train.log_every=2",
            "--config.checkpoint.every=4", "--config.train.eval_every=0", "--config.mesh.data=2",
            "--config.mesh.fsdp=2", "--config.mesh.tensor=1", "--config.train.peak_flops=1e11"]


def complete_steps(workdir):
    folder = Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else []


def train_logs(workdir):
    return {(r["step"], k): v for r in metrics_lib.read_metrics(workdir) for k, v in r.items()
            if k.startswith("train/")}


def test_two_processes_train_get_killed_resume_identically_and_restore_in_one_process(tmp_path):
    workdir = tmp_path / "run"
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="2", PYTHONPATH=str(REPO))
    procs = [subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, start_new_session=True,
                              stderr=open(tmp_path / f"p{i}.log", "wb"))
             for i, cmd in enumerate(local.process_commands(train_command(workdir), 2, local.free_port(), 300))]
    try:
        # Generous: the test passes in ~45 s alone, but a starved shared VM once took over 150 s to the
        # first checkpoint (CI, 2026-11-26); the assertion is about resuming, not speed.
        deadline = time.time() + 300
        # Kill once a checkpoint is committed and a window after it has been logged.
        while not (complete_steps(workdir) and any(r["step"] > complete_steps(workdir)[-1]
                                                   for r in metrics_lib.read_metrics(workdir))):
            assert all(p.poll() is None for p in procs), (tmp_path / "p0.log").read_text()[-3000:]
            assert time.time() < deadline, "no checkpoint and later window within the time limit"
            time.sleep(0.02)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(10)
    before_kill = train_logs(workdir)
    resume_from = complete_steps(workdir)[-1]
    assert resume_from < 12, "the processes finished before the kill"

    rc = local.run(train_command(workdir), processes=2, devices=2, timeout_s=150)
    assert rc == 0
    after = train_logs(workdir)
    assert max(s for s, _ in after) == 12
    redone = {k: v for k, v in before_kill.items() if k[0] > resume_from}
    assert redone, "the killed run logged nothing after its last checkpoint"
    assert {k: after[k] for k in redone} == redone  # the resumed processes re-computed the same losses

    results, _ = eval_lib.evaluate_checkpoint(workdir, mesh_sizes=(-1, 1, 1))  # 8 devices, 1 process
    assert results["checkpoint"].endswith("checkpoints/12")
    # The restored model must be the trained one: at init the logits are near uniform (perplexity ~
    # the 1,024-word vocabulary, log 6.93, as the first window's loss shows); 12 steps lower the
    # held-out loss by ~0.26 nats (802, measured on one process). Lost or mixed-up params sit at the
    # start's level; the restored model must match the end of training.
    train = sorted((s, v) for (s, k), v in after.items() if k == "train/loss")
    log_ppl = np.log(results["perplexity"])
    assert np.isfinite(log_ppl) and log_ppl < train[0][1] - 0.1 and log_ppl < train[-1][1] + 0.1, (log_ppl, train)
