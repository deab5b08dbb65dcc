"""Train on a Cloud TPU VM slice: create (or reuse) it, install this project on every worker, run the
same train command on all workers, collect their logs, delete the slice.

    python launch/tpu_vm.py --name cham-7b --zone us-east5-a --accelerator v5p-64 \\
        --version v2-alpha-tpuv5 --dry-run -- \\
        --config experiments/chameleon_7b.py --workdir gs://BUCKET/runs/cham-7b

Every worker runs `python -m chameleon_jax.train --distributed ...`: `jax.distributed.initialize()`
finds the other workers from the TPU metadata by itself. The workdir must be shared storage (a GCS
bucket), since every process writes its own part of each checkpoint. Rerunning with --reuse resumes
the run from the workdir. --dry-run prints every command, in order, without running any.
"""
from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REMOTE_DIR = "chameleon_jax"  # under each worker's home
TARBALL = "/tmp/chameleon_jax_src.tar.gz"


def workers_of(accelerator: str) -> int:
    """Hosts in a slice: v4/v5p names count TensorCores (2 per chip), v5e/v6e count chips; 4 chips per host."""
    family, _, size = accelerator.rpartition("-")
    n = int(size)
    chips = n // 2 if family in ("v4", "v5p", "v3", "v2") else n
    if family in ("v5litepod", "v5e", "v6e") and chips <= 8:
        return 1
    return max(chips // 4, 1)


def commands(args, train_args: list[str]) -> list[list[str]]:
    """The exact commands, in order: [create], package, copy, install, train, collect logs, [delete]."""
    loc = ["--zone", args.zone] + (["--project", args.project] if args.project else [])
    tpu = ["gcloud", "compute", "tpus", "tpu-vm"]
    cmds = []
    if not args.reuse:
        cmds.append([*tpu, "create", args.name, *loc, "--accelerator-type", args.accelerator,
                     "--version", args.version] + (["--spot"] if args.spot else []))
    cmds.append(["git", "-C", str(REPO), "archive", "--format=tar.gz", "-o", TARBALL, "HEAD"])
    cmds.append([*tpu, "scp", TARBALL, f"{args.name}:~/", "--worker=all", *loc])
    install = (f"mkdir -p ~/{REMOTE_DIR} && tar xzf ~/{Path(TARBALL).name} -C ~/{REMOTE_DIR} && "
               f"python3 -m pip install -q -U pip && python3 -m pip install -q -e '~/{REMOTE_DIR}[tpu]'")
    cmds.append([*tpu, "ssh", args.name, "--worker=all", *loc, "--command", install])
    train = " ".join(shlex.quote(a) for a in ["python3", "-m", "chameleon_jax.train", "--distributed", *train_args])
    cmds.append([*tpu, "ssh", args.name, "--worker=all", *loc, "--command",
                 f"cd ~/{REMOTE_DIR} && {train} 2>&1 | tee ~/train.log"])
    for w in range(args.workers or workers_of(args.accelerator)):
        cmds.append([*tpu, "scp", f"{args.name}:~/train.log", f"{args.logs}/worker_{w}.log", f"--worker={w}", *loc])
    if not args.keep:
        cmds.append([*tpu, "delete", args.name, *loc, "--quiet"])
    return cmds


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", required=True, help="TPU VM (slice) name")
    p.add_argument("--zone", required=True)
    p.add_argument("--project", default=None)
    p.add_argument("--accelerator", default="v5p-64", help="accelerator type, e.g. v5p-64, v4-32, v6e-16")
    p.add_argument("--version", default="v2-alpha-tpuv5", help="TPU VM software version (runtime image)")
    p.add_argument("--spot", action="store_true", help="create a Spot slice (preemptible: the run resumes)")
    p.add_argument("--reuse", action="store_true", help="the slice exists already: do not create it")
    p.add_argument("--keep", action="store_true", help="do not delete the slice at the end")
    p.add_argument("--workers", type=int, default=0, help="hosts in the slice (default: from --accelerator)")
    p.add_argument("--logs", default="logs", help="local folder for the workers' logs")
    p.add_argument("--dry-run", action="store_true", help="print the commands instead of running them")
    p.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then the train flags (--config, --workdir, ...)")
    args = p.parse_args(argv)
    train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    if not any(a.startswith("--workdir") for a in train_args) or not any(a.startswith("--config") for a in train_args):
        p.error("pass the train flags after --, at least --config experiments/X.py --workdir gs://BUCKET/run")
    cmds = commands(args, train_args)
    if args.dry_run:
        for c in cmds:
            print(shlex.join(c))
        return 0
    Path(args.logs).mkdir(parents=True, exist_ok=True)
    # Logs are collected and the slice deleted even when training fails.
    first_cleanup = next(i for i, c in enumerate(cmds) if c[4:5] == ["scp"] and "--worker=all" not in c)
    rc = 0
    for i, c in enumerate(cmds):
        if rc and i < first_cleanup:
            continue
        print("+", shlex.join(c), flush=True)
        r = subprocess.run(c).returncode
        rc = rc or r
    return rc


if __name__ == "__main__":
    sys.exit(main())
