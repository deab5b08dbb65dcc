"""Train on a Cloud TPU VM slice (a pod): create it, install this project on every worker, mount the data
bucket, run the same train command on all workers, restart after failures, collect logs, delete.

    python launch/tpu_vm.py launch --name cham-7b --zone us-east5-a --accelerator v5p-64 \\
        --data-bucket BUCKET/tokens --dry-run -- \\
        --config experiments/chameleon_7b.py --workdir gs://BUCKET/runs/cham-7b
    python launch/tpu_vm.py watch   --name cham-7b --zone us-east5-a            # follow worker 0's log
    python launch/tpu_vm.py preempt --name cham-7b --zone us-east5-a --worker 3 # SIGTERM one host
    python launch/tpu_vm.py delete  --name cham-7b --zone us-east5-a

`launch` is the default action. Every worker runs `python -m chameleon_jax.train --distributed ...`:
`jax.distributed.initialize()` finds the other workers from the TPU metadata by itself. The workdir must be
a bucket (gs://), since every process writes its own part of each checkpoint and a restart may land on
other VMs. Training data is read through a read-only gcsfuse mount of --data-bucket at --data-mount on
every worker. The remote shell runs with `set -o pipefail`, so a crashed training run fails the launcher
even though its output goes through `tee`.

Restart policy (--max-restarts): when training fails, the slice's state decides. A PREEMPTED or
TERMINATED slice is deleted, created again and set up; a READY one just reruns the command. Either way
the run resumes from the workdir's latest checkpoint. Exit code 3 (non-finite loss, see
chameleon_jax.train) is not retried: it would repeat. --dry-run prints every command of the first
attempt, in order, without running any.
"""
from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

if __package__:  # imported as launch.tpu_vm
    from launch import training
else:  # run as `python launch/tpu_vm.py`: launch/ is on sys.path
    import training

REPO = Path(__file__).resolve().parents[1]
REMOTE_DIR = "chameleon_jax"  # under each worker's home
TARBALL = "/tmp/chameleon_jax_src.tar.gz"
LOG = "~/train.log"
# Seconds an ssh-started training gets to save after SIGTERM before the preempt action sends SIGKILL.
GRACE_S = 300


def workers_of(accelerator: str) -> int:
    """Hosts in a slice: v4/v5p names count TensorCores (2 per chip), v5e/v6e count chips; 4 chips per host."""
    family, _, size = accelerator.rpartition("-")
    n = int(size)
    chips = n // 2 if family in ("v4", "v5p", "v3", "v2") else n
    if family in ("v5litepod", "v5e", "v6e") and chips <= 8:
        return 1
    return max(chips // 4, 1)


def train_command(train_args: list[str]) -> list[str]:
    return ["python3", "-m", "chameleon_jax.train", "--distributed", *train_args]


def remote_train_script(command: list[str], env: dict[str, str], remote_dir: str = f"~/{REMOTE_DIR}",
                        log: str = LOG) -> str:
    """The bash script each worker runs: pipefail, so `tee` cannot hide the training's exit status."""
    exports = "".join(f"export {k}={shlex.quote(v)}; " for k, v in env.items())
    return f"set -o pipefail; {exports}cd {remote_dir} && {shlex.join(command)} 2>&1 | tee -a {log}"


def mount_script(bucket: str, mount: str) -> str:
    """Installs gcsfuse if needed and mounts the data bucket read-only (the TPU VM image lacks it)."""
    install = ("command -v gcsfuse >/dev/null || { "
               "echo \"deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt "
               "gcsfuse-$(lsb_release -c -s) main\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null && "
               "curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | "
               "sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null && "
               "sudo apt-get update -q && sudo apt-get install -y -q fuse gcsfuse; }")
    name, _, folder = bucket.removeprefix("gs://").partition("/")
    only = f"--only-dir {shlex.quote(folder)} " if folder else ""
    return (f"set -e; {install}; sudo mkdir -p {mount} && sudo chown $USER {mount}; "
            f"mountpoint -q {mount} || gcsfuse --implicit-dirs -o ro {only}{shlex.quote(name)} {mount}")


def _loc(args) -> list[str]:
    return ["--zone", args.zone] + (["--project", args.project] if args.project else [])


TPU = ["gcloud", "compute", "tpus", "tpu-vm"]


def create_commands(args) -> list[list[str]]:
    return [[*TPU, "create", args.name, *_loc(args), "--accelerator-type", args.accelerator,
             "--version", args.version] + (["--spot"] if args.spot else [])]


def setup_commands(args) -> list[list[str]]:
    """Package this checkout, copy it to every worker, install it, mount the data."""
    cmds = [["git", "-C", str(REPO), "archive", "--format=tar.gz", "-o", TARBALL, "HEAD"],
            [*TPU, "scp", TARBALL, f"{args.name}:~/", "--worker=all", *_loc(args)]]
    install = (f"mkdir -p ~/{REMOTE_DIR} && tar xzf ~/{Path(TARBALL).name} -C ~/{REMOTE_DIR} && "
               f"python3 -m pip install -q -U pip && python3 -m pip install -q -e '~/{REMOTE_DIR}[tpu]'")
    cmds.append([*TPU, "ssh", args.name, "--worker=all", *_loc(args), "--command", install])
    if args.data_bucket:
        cmds.append([*TPU, "ssh", args.name, "--worker=all", *_loc(args), "--command",
                     "bash -c " + shlex.quote(mount_script(args.data_bucket, args.data_mount))])
    return cmds


def train_ssh(args, train_args: list[str]) -> list[str]:
    env = training.environment(args, training.workdir_of(train_args))
    script = remote_train_script(train_command(train_args), env)
    return [*TPU, "ssh", args.name, "--worker=all", *_loc(args), "--command", "bash -c " + shlex.quote(script)]


def collect_commands(args) -> list[list[str]]:
    return [[*TPU, "scp", f"{args.name}:{LOG}", f"{args.logs}/worker_{w}.log", f"--worker={w}", *_loc(args)]
            for w in range(args.workers or workers_of(args.accelerator))]


def delete_commands(args) -> list[list[str]]:
    return [[*TPU, "delete", args.name, *_loc(args), "--quiet"]]


def state_command(args) -> list[str]:
    return [*TPU, "describe", args.name, *_loc(args), "--format=value(state)"]


def commands(args, train_args: list[str]) -> list[list[str]]:
    """The first attempt, in order: [create], package, copy, install, [mount], train, collect logs, [delete]."""
    return ((create_commands(args) if not args.reuse else []) + setup_commands(args)
            + [train_ssh(args, train_args)] + collect_commands(args) + (delete_commands(args) if not args.keep else []))


def after_failure(rc: int, state: str, restarts_done: int, max_restarts: int) -> str:
    """What to do once training exited with `rc`: 'done', 'give_up', 'rerun' or 'recreate'."""
    if rc == 0:
        return "done"
    if rc == training.NON_FINITE_EXIT or restarts_done >= max_restarts:
        return "give_up"
    return "recreate" if state.strip() in ("PREEMPTED", "TERMINATED", "") else "rerun"


def run_in_order(cmds: list[list[str]], stop_on_failure: bool = True) -> int:
    """Runs commands one by one, echoing each; returns the first non-zero exit status (0 if none)."""
    rc = 0
    for c in cmds:
        print("+", shlex.join(c), flush=True)
        r = subprocess.run(c).returncode
        rc = rc or r
        if rc and stop_on_failure:
            break
    return rc


def launch(args, train_args: list[str]) -> int:
    rc = run_in_order((create_commands(args) if not args.reuse else []) + setup_commands(args))
    restarts = 0
    while rc == 0:
        rc = run_in_order([train_ssh(args, train_args)])
        state = "" if rc == 0 else subprocess.run(state_command(args), capture_output=True, text=True).stdout
        action = after_failure(rc, state, restarts, args.max_restarts)
        if action in ("done", "give_up"):
            break
        restarts += 1
        print(f"training exited with {rc}, slice state {state.strip() or 'unknown'}: {action} "
              f"(restart {restarts} of {args.max_restarts}); the run resumes from its workdir", flush=True)
        if action == "recreate":
            run_in_order(delete_commands(args), stop_on_failure=False)  # may already be gone
            rc = run_in_order(create_commands(args) + setup_commands(args))
    # Logs are collected and the slice deleted even when training failed.
    Path(args.logs).mkdir(parents=True, exist_ok=True)
    run_in_order(collect_commands(args), stop_on_failure=False)
    if not args.keep:
        run_in_order(delete_commands(args), stop_on_failure=False)
    return rc


def action_commands(args) -> list[list[str]]:
    """The single command of the watch / preempt / delete actions."""
    if args.action == "watch":
        return [[*TPU, "ssh", args.name, f"--worker={args.worker}", *_loc(args), "--command", f"tail -n 50 -F {LOG}"]]
    if args.action == "preempt":
        # What a maintenance event does to one host: SIGTERM, then SIGKILL after the grace period.
        # Every host then saves the same step and exits (chameleon_jax.train.preemption).
        # The pattern is anchored so that it matches the training processes, not this ssh command's shell.
        train = "'^python3 -m chameleon_jax.train'"
        kill = (f"pkill -TERM -f {train}; timeout {GRACE_S} bash -c \"while pgrep -f {train} >/dev/null; "
                f"do sleep 1; done\" || pkill -KILL -f {train}")
        return [[*TPU, "ssh", args.name, f"--worker={args.worker}", *_loc(args), "--command", kill]]
    return delete_commands(args)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    action = argv.pop(0) if argv and argv[0] in ("launch", "watch", "preempt", "delete") else "launch"
    p = argparse.ArgumentParser(prog=f"tpu_vm.py {action}", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", required=True, help="TPU VM (slice) name")
    p.add_argument("--zone", required=True)
    p.add_argument("--project", default=None)
    p.add_argument("--dry-run", action="store_true", help="print the commands instead of running them")
    if action in ("watch", "preempt"):
        p.add_argument("--worker", type=int, default=0, help="which host (0-based)")
    if action == "launch":
        p.add_argument("--accelerator", default="v5p-64", help="accelerator type, e.g. v5p-64, v4-32, v6e-16")
        p.add_argument("--version", default="v2-alpha-tpuv5", help="TPU VM software version (runtime image)")
        p.add_argument("--spot", action="store_true", help="create a Spot slice (preemptible: the run resumes)")
        p.add_argument("--reuse", action="store_true", help="the slice exists already: do not create it")
        p.add_argument("--keep", action="store_true", help="do not delete the slice at the end")
        p.add_argument("--workers", type=int, default=0, help="hosts in the slice (default: from --accelerator)")
        p.add_argument("--logs", default="logs", help="local folder for the workers' logs")
        p.add_argument("--data-bucket", default=None, help="bucket (or bucket/folder) mounted read-only with "
                                                           "gcsfuse on every worker")
        p.add_argument("--data-mount", default="/mnt/data", help="where --data-bucket is mounted")
        training.add_environment_flags(p)
        p.add_argument("--max-restarts", type=int, default=3, help="reruns after a failure or preemption")
        p.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then the train flags (--config, --workdir, ...)")
    args = p.parse_args(argv)
    args.action = action
    if action != "launch":
        cmds = action_commands(args)
        if args.dry_run:
            print("\n".join(shlex.join(c) for c in cmds))
            return 0
        return run_in_order(cmds)
    train_args = training.train_flags(args.train_args)
    training.check_train_flags(p, train_args)
    if args.dry_run:
        for c in commands(args, train_args):
            print(shlex.join(c))
        return 0
    return launch(args, train_args)


if __name__ == "__main__":
    sys.exit(main())
