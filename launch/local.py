"""Run a multi-process JAX job on this machine: N processes joined by jax.distributed on localhost.

    python launch/local.py --processes 2 --devices 2 -- \\
        python -m chameleon_jax.train --config experiments/tiny.py --workdir /tmp/mh --config.mesh.data=2

Each process gets `--coordinator_address 127.0.0.1:PORT --num_processes N --process_id I` appended,
`JAX_NUM_CPU_DEVICES=<devices>` and `JAX_PLATFORMS=cpu`, and runs under `timeout`, because when one
process of a jax.distributed job dies the others block in collectives for minutes. The first failure
stops the rest. SIGTERM/SIGINT to the launcher is forwarded to every process (they save and exit).
Output lines are prefixed with the process index. The launcher's exit status is the first failure's,
shell-style (128+N for a process killed by signal N, 124 past --timeout), with a line naming it.
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_commands(command: list[str], processes: int, port: int, timeout_s: int) -> list[list[str]]:
    """The exact command line of every process."""
    # After a TERM (the timeout's own, or one forwarded by the launcher) a process has 60 s to save.
    return [["timeout", "-k", "60", str(timeout_s), *command, "--coordinator_address", f"127.0.0.1:{port}",
             "--num_processes", str(processes), "--process_id", str(i)] for i in range(processes)]


# Seconds before the timeout at which the launcher sends SIGUSR1 to the command under every `timeout`: a
# program that registers faulthandler for it (chameleon_jax.train does) prints every thread's stack.
STACK_DUMP_LEAD_S = 15


def _children(pid: int) -> list[int]:
    """The processes `timeout` (pid) started: the command itself, not `timeout`, which SIGUSR1 would end."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except OSError:  # gone already, or no /proc (the dump is a diagnosis, not a requirement)
        return []


def _catches(pid: int, sig: int) -> bool:
    """Whether process `pid` has a handler for `sig` (the SigCgt mask in /proc/PID/status)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            mask = next(int(line.split()[1], 16) for line in f if line.startswith("SigCgt:"))
    except (OSError, StopIteration):
        return False
    return bool(mask >> (sig - 1) & 1)


def _pump(stream, prefix: str, out):
    for line in iter(stream.readline, b""):
        out.write(f"{prefix}{line.decode(errors='replace')}")
        out.flush()


def exit_status(returncode: int, timeout_s: int) -> tuple[int, str]:
    """A process's exit as a shell-style status (128+N for signal N) and the words for it."""
    if returncode < 0:  # `timeout` re-raises its child's fatal signal on itself
        return 128 - returncode, f"was killed by {signal.Signals(-returncode).name} (status {128 - returncode})"
    if returncode == 124:
        return 124, f"ran past --timeout {timeout_s} s and was stopped (status 124)"
    return returncode, f"exited with status {returncode}"


def run(command: list[str], processes: int = 2, devices: int = 2, timeout_s: int = 600,
        port: int | None = None, env: dict | None = None) -> int:
    """Starts the processes, waits for all of them; returns 0 or the first failure's status.

    The status follows the shell: a process killed by signal N gives 128+N (137 for SIGKILL), one
    past the timeout 124, otherwise its own exit code; a line on stderr names the process and why.
    """
    port = port or free_port()
    env = dict(env or os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(devices))
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
             for cmd in process_commands(command, processes, port, timeout_s)]
    pumps = [threading.Thread(target=_pump, args=(p.stdout, f"[{i}] ", sys.stdout), daemon=True)
             for i, p in enumerate(procs)]
    for t in pumps:
        t.start()

    def forward(signum, frame):
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signum)  # the group: `timeout` and the python under it

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    dump_at = time.monotonic() + timeout_s - STACK_DUMP_LEAD_S
    try:
        failed = 0
        while any(p.poll() is None for p in procs):
            if time.monotonic() > dump_at:  # a hang: show where every process waits before `timeout` ends it
                dump_at = float("inf")
                print(f"launch: still running {timeout_s - STACK_DUMP_LEAD_S} s after the start; asking every "
                      f"process for its Python stacks (SIGUSR1)", file=sys.stderr, flush=True)
                for p in procs:
                    for pid in _children(p.pid):
                        if _catches(pid, signal.SIGUSR1):  # else SIGUSR1 would end it, with another status
                            os.kill(pid, signal.SIGUSR1)
            for i, p in enumerate(procs):
                if p.poll() not in (None, 0) and not failed:
                    failed, how = exit_status(p.returncode, timeout_s)
                    survivors = [j for j, q in enumerate(procs) if q.poll() is None]
                    print(f"launch: process {i} {how}" + (f"; stopping process(es) {survivors}, which would "
                          f"wait for it in collectives" if survivors else ""), file=sys.stderr, flush=True)
                    for j in survivors:
                        os.killpg(procs[j].pid, signal.SIGKILL)
            time.sleep(0.05)
        for t in pumps:
            t.join(timeout=5)
        if not failed:
            for i, p in enumerate(procs):  # all ended between two polls
                if p.returncode:
                    failed, how = exit_status(p.returncode, timeout_s)
                    print(f"launch: process {i} {how}", file=sys.stderr, flush=True)
                    break
        return failed
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--devices", type=int, default=2, help="fake CPU devices per process")
    parser.add_argument("--timeout", type=int, default=600, help="seconds before every process is killed")
    parser.add_argument("--port", type=int, default=None, help="coordinator port (default: a free one)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands and exit")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command each process runs")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command after --, e.g. -- python -m chameleon_jax.train --config ...")
    if args.dry_run:
        for cmd in process_commands(command, args.processes, args.port or 12345, args.timeout):
            print(f"JAX_PLATFORMS=cpu JAX_NUM_CPU_DEVICES={args.devices} " + " ".join(cmd))
        return 0
    return run(command, args.processes, args.devices, args.timeout, args.port)


if __name__ == "__main__":
    sys.exit(main())
