"""Train on TPU slices in a GKE cluster: a JobSet manifest (kubectl apply) or an XPK command.

    python launch/gke.py --name cham-7b --image us-docker.pkg.dev/P/repo/chameleon_jax:TAG \\
        --tpu v5p --topology 4x4x4 --dry-run -- \\
        --config experiments/chameleon_7b.py --workdir gs://BUCKET/runs/cham-7b
    python launch/gke.py ... --xpk --cluster my-cluster --dry-run -- ...

The JobSet runs one indexed Job per slice with one pod per TPU host (4 chips each), all running
`python -m chameleon_jax.train --distributed ...`; `jax.distributed.initialize()` discovers the pods
through the JobSet's headless service. The image must contain this project (`pip install .[tpu]`) and the
workdir must be a bucket. A failed pod restarts the whole JobSet (maxRestarts), which resumes from the
workdir. --dry-run prints the manifest or command without applying anything.
"""
from __future__ import annotations

import argparse
import math
import shlex
import subprocess
import sys

import yaml

# GKE node selector value and chips per host, per TPU generation.
ACCELERATORS = {
    "v4": ("tpu-v4-podslice", 4),
    "v5p": ("tpu-v5p-slice", 4),
    "v5e": ("tpu-v5-lite-podslice", 4),
    "v6e": ("tpu-v6e-slice", 4),
}


def train_command(train_args: list[str]) -> list[str]:
    return ["python3", "-m", "chameleon_jax.train", "--distributed", *train_args]


def hosts(topology: str, chips_per_host: int) -> int:
    chips = math.prod(int(x) for x in topology.split("x"))
    return max(chips // chips_per_host, 1)


def jobset_manifest(args, train_args: list[str]) -> dict:
    selector, per_host = ACCELERATORS[args.tpu]
    n = hosts(args.topology, per_host)
    container = {
        "name": "train",
        "image": args.image,
        "command": train_command(train_args),
        "ports": [{"containerPort": 8471}, {"containerPort": 8080}],
        "securityContext": {"privileged": True},
        "resources": {"limits": {"google.com/tpu": per_host}},
    }
    pod = {
        "metadata": {"annotations": {}},
        "spec": {
            "restartPolicy": "Never",
            "nodeSelector": {"cloud.google.com/gke-tpu-accelerator": selector,
                             "cloud.google.com/gke-tpu-topology": args.topology},
            "containers": [container],
        },
    }
    if args.service_account:
        pod["spec"]["serviceAccountName"] = args.service_account
    return {
        "apiVersion": "jobset.x-k8s.io/v1alpha2",
        "kind": "JobSet",
        "metadata": {"name": args.name,
                     "annotations": {"alpha.jobset.sigs.k8s.io/exclusive-topology": "cloud.google.com/gke-nodepool"}},
        "spec": {
            "failurePolicy": {"maxRestarts": args.max_restarts},
            "replicatedJobs": [{
                "name": "slice",
                "replicas": args.num_slices,
                "template": {"spec": {"parallelism": n, "completions": n, "backoffLimit": 0,
                                      "template": pod}},
            }],
        },
    }


def xpk_command(args, train_args: list[str]) -> list[str]:
    return ["xpk", "workload", "create", "--cluster", args.cluster, "--workload", args.name,
            "--docker-image", args.image, "--tpu-type", f"{args.tpu}-{args.xpk_size}",
            "--num-slices", str(args.num_slices), "--max-restarts", str(args.max_restarts),
            "--command", shlex.join(train_command(train_args))] + (
        ["--project", args.project, "--zone", args.zone] if args.project else [])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", required=True, help="JobSet / workload name")
    p.add_argument("--image", required=True, help="container image with this project installed")
    p.add_argument("--tpu", choices=sorted(ACCELERATORS), default="v5p")
    p.add_argument("--topology", default="4x4x4", help="slice topology, e.g. 2x2x4 (v5p), 4x4 (v5e/v6e)")
    p.add_argument("--num-slices", type=int, default=1, help="slices; the `data` mesh axis spans them (DCN)")
    p.add_argument("--max-restarts", type=int, default=3, help="JobSet restarts; each resumes from the workdir")
    p.add_argument("--service-account", default=None, help="Kubernetes service account with bucket access")
    p.add_argument("--xpk", action="store_true", help="print/run an XPK command instead of a JobSet manifest")
    p.add_argument("--cluster", default=None, help="GKE cluster (XPK)")
    p.add_argument("--xpk-size", default=None, help="XPK size suffix, e.g. 128 for v5p-128 (default: 2 x chips "
                                                     "for v4/v5p, chips for v5e/v6e)")
    p.add_argument("--project", default=None)
    p.add_argument("--zone", default=None)
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then the train flags")
    args = p.parse_args(argv)
    train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    if not any(a.startswith("--workdir") for a in train_args):
        p.error("pass the train flags after --, at least --config experiments/X.py --workdir gs://BUCKET/run")
    if args.xpk:
        if not args.cluster:
            p.error("--xpk needs --cluster")
        chips = math.prod(int(x) for x in args.topology.split("x"))
        args.xpk_size = args.xpk_size or (2 * chips if args.tpu in ("v4", "v5p") else chips)
        cmd = xpk_command(args, train_args)
        if args.dry_run:
            print(shlex.join(cmd))
            return 0
        return subprocess.run(cmd).returncode
    manifest = yaml.safe_dump(jobset_manifest(args, train_args), sort_keys=False)
    if args.dry_run:
        print(manifest)
        return 0
    return subprocess.run(["kubectl", "apply", "-f", "-"], input=manifest.encode()).returncode


if __name__ == "__main__":
    sys.exit(main())
