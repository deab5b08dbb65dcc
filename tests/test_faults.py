"""Faults driven from outside, the way a cluster drives a job: killed workers, signals at any moment,
damaged checkpoints. Every case runs real processes under deadlines and prints its fault-to-exit time."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}


def test_launcher_names_the_dead_worker_and_exits_128_plus_its_signal(tmp_path):
    stamp = tmp_path / "killed_at"
    worker = ("import os, signal, sys, time\n"
              "if sys.argv[sys.argv.index('--process_id') + 1] == '1':\n"
              f"    open({str(stamp)!r}, 'w').write(repr(time.time())); os.kill(os.getpid(), signal.SIGKILL)\n"
              "time.sleep(60)\n")
    r = subprocess.run([sys.executable, str(REPO / "launch/local.py"), "--processes", "2", "--timeout", "60", "--",
                        sys.executable, "-c", worker], capture_output=True, text=True, timeout=90, env=ENV)
    took = time.time() - float(stamp.read_text())
    print(f"worker 1 SIGKILLed -> launcher exit {r.returncode} in {took:.2f} s")
    assert r.returncode == 137, (r.returncode, r.stderr)
    assert "process 1 was killed by SIGKILL (status 137); stopping process(es) [0]" in r.stderr, r.stderr
    assert took < 5  # the survivor is killed, not waited for


def test_launcher_passes_on_a_workers_own_exit_status(tmp_path):
    worker = "import sys; sys.exit(3 if sys.argv[sys.argv.index('--process_id') + 1] == '0' else 0)"
    r = subprocess.run([sys.executable, str(REPO / "launch/local.py"), "--processes", "2", "--timeout", "60", "--",
                        sys.executable, "-c", worker], capture_output=True, text=True, timeout=90, env=ENV)
    assert r.returncode == 3 and "process 0 exited with status 3" in r.stderr, (r.returncode, r.stderr)
