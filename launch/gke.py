"""Train on TPU slices in a GKE cluster: a JobSet manifest (kubectl apply) or an XPK command.

    python launch/gke.py --name cham-7b --image us-docker.pkg.dev/P/repo/chameleon_jax:TAG \\
        --tpu v5p --topology 4x4x4 --num-slices 2 --data-bucket BUCKET --dry-run -- \\
        --config experiments/chameleon_7b.py --workdir gs://BUCKET/runs/cham-7b --config.mesh.data=2
    python launch/gke.py ... --xpk --cluster my-cluster --dry-run -- ...

The JobSet runs one indexed Job per slice with one pod per TPU host (4 chips each), all running
`python -m chameleon_jax.train --distributed ...`. `jax.distributed.initialize()` reads the TPU cluster
from the environment the manifest gives every pod (jax._src.clusters.cloud_tpu_cluster.GkeTpuCluster):
TPU_WORKER_ID / TPU_WORKER_HOSTNAMES (the hosts of its slice, by the JobSet's DNS names) and, across
slices, MEGASCALE_NUM_SLICES / MEGASCALE_SLICE_ID / MEGASCALE_COORDINATOR_ADDRESS (slice 0's first
pod). With --num-slices N the train command gets --config.mesh.slices=N, so the mesh puts its DCN axis
(mesh.dcn_axis, `data`) across the slices. The image must contain this project (`pip install .[tpu]`)
and the workdir must be a bucket. --data-bucket mounts a bucket read-only at --data-mount through GKE's
gcsfuse CSI driver (the service account needs read access to it).

Restart policy: a failed pod fails its Job and the JobSet restarts every pod (failurePolicy.maxRestarts),
which resumes from the workdir; exit code 3 (non-finite loss) fails the JobSet for good, since a rerun
would repeat it. On preemption GKE sends SIGTERM and waits terminationGracePeriodSeconds before SIGKILL:
every host saves the same step in that time. --dry-run prints the manifest or command, applying nothing.
"""
from __future__ import annotations

import argparse
import math
import shlex
import subprocess
import sys

import yaml

if __package__:  # imported as launch.gke
    from launch import training
else:  # run as `python launch/gke.py`: launch/ is on sys.path
    import training

# GKE node selector value and chips per host, per TPU generation.
ACCELERATORS = {
    "v4": ("tpu-v4-podslice", 4),
    "v5p": ("tpu-v5p-slice", 4),
    "v5e": ("tpu-v5-lite-podslice", 4),
    "v6e": ("tpu-v6e-slice", 4),
}
REPLICATED_JOB = "slice"
TPU_RUNTIME_PORT = 8471   # the TPU runtime's own port, as XPK declares it
MEGASCALE_PORT = 8080     # cross-slice (DCN) transfers
JAX_COORDINATOR_PORT = 8482  # jax._src.clusters.cloud_tpu_cluster.coordinator_port


def train_command(train_args: list[str], num_slices: int = 1) -> list[str]:
    """The training command; a multi-slice run also tells the mesh how many slices it spans."""
    slices = [f"--config.mesh.slices={num_slices}"] if num_slices > 1 and not any(
        a.startswith("--config.mesh.slices") for a in train_args) else []
    return ["python3", "-m", "chameleon_jax.train", "--distributed", *train_args, *slices]


def hosts(topology: str, chips_per_host: int) -> int:
    chips = math.prod(int(x) for x in topology.split("x"))
    return max(chips // chips_per_host, 1)


def _field(path: str) -> dict:
    return {"valueFrom": {"fieldRef": {"fieldPath": path}}}


def pod_environment(args, n_hosts: int, workdir: str) -> list[dict]:
    """The container's env; order matters, since $(VAR) only expands variables defined above it."""
    env = [
        {"name": "JOBSET_NAME", **_field("metadata.annotations['jobset.sigs.k8s.io/jobset-name']")},
        {"name": "REPLICATED_JOB_NAME", **_field("metadata.annotations['jobset.sigs.k8s.io/replicatedjob-name']")},
        {"name": "JOB_INDEX", **_field("metadata.labels['jobset.sigs.k8s.io/job-index']")},
        {"name": "TPU_WORKER_ID", **_field("metadata.annotations['batch.kubernetes.io/job-completion-index']")},
        # The hosts of this pod's slice, by the DNS names JobSet gives its pods:
        # <jobset>-<replicated job>-<job index>-<pod index>.<subdomain>.
        {"name": "TPU_WORKER_HOSTNAMES", "value": ",".join(
            f"$(JOBSET_NAME)-$(REPLICATED_JOB_NAME)-$(JOB_INDEX)-{i}.$(JOBSET_NAME)" for i in range(n_hosts))},
    ]
    if args.num_slices > 1:
        env += [
            {"name": "MEGASCALE_NUM_SLICES", **_field("metadata.labels['jobset.sigs.k8s.io/replicatedjob-replicas']")},
            {"name": "MEGASCALE_SLICE_ID", "value": "$(JOB_INDEX)"},
            {"name": "MEGASCALE_COORDINATOR_ADDRESS", "value": "$(JOBSET_NAME)-$(REPLICATED_JOB_NAME)-0-0.$(JOBSET_NAME)"},
            {"name": "MEGASCALE_PORT", "value": str(MEGASCALE_PORT)},
        ]
    return env + [{"name": k, "value": v} for k, v in training.environment(args, workdir).items()]


def jobset_manifest(args, train_args: list[str]) -> dict:
    selector, per_host = ACCELERATORS[args.tpu]
    n = hosts(args.topology, per_host)
    container = {
        "name": "train",
        "image": args.image,
        "command": train_command(train_args, args.num_slices),
        "env": pod_environment(args, n, training.workdir_of(train_args)),
        "ports": [{"containerPort": p} for p in (TPU_RUNTIME_PORT, MEGASCALE_PORT, JAX_COORDINATOR_PORT)],
        "securityContext": {"privileged": True},
        "resources": {"limits": {"google.com/tpu": per_host}},
    }
    pod = {
        "metadata": {"annotations": {}},
        "spec": {
            "restartPolicy": "Never",
            # Host networking for DCN bandwidth, as XPK does; the JobSet's DNS names still resolve.
            "hostNetwork": True,
            "dnsPolicy": "ClusterFirstWithHostNet",
            "terminationGracePeriodSeconds": args.grace_period,
            "nodeSelector": {"cloud.google.com/gke-tpu-accelerator": selector,
                             "cloud.google.com/gke-tpu-topology": args.topology},
            "containers": [container],
        },
    }
    if args.service_account:
        pod["spec"]["serviceAccountName"] = args.service_account
    if args.data_bucket:
        name, _, folder = args.data_bucket.removeprefix("gs://").partition("/")
        pod["metadata"]["annotations"]["gke-gcsfuse/volumes"] = "true"
        options = "implicit-dirs" + (f",only-dir={folder}" if folder else "")
        pod["spec"]["volumes"] = [{"name": "data", "csi": {
            "driver": "gcsfuse.csi.storage.gke.io", "readOnly": True,
            "volumeAttributes": {"bucketName": name, "mountOptions": options}}}]
        container["volumeMounts"] = [{"name": "data", "mountPath": args.data_mount, "readOnly": True}]
    job = {"parallelism": n, "completions": n, "completionMode": "Indexed", "backoffLimit": 0,
           # A non-finite loss fails the Job with reason PodFailurePolicy, which the JobSet does not restart.
           "podFailurePolicy": {"rules": [{"action": "FailJob", "onExitCodes": {
               "containerName": "train", "operator": "In", "values": [training.NON_FINITE_EXIT]}}]},
           "template": pod}
    return {
        "apiVersion": "jobset.x-k8s.io/v1alpha2",
        "kind": "JobSet",
        "metadata": {"name": args.name,
                     "annotations": {"alpha.jobset.sigs.k8s.io/exclusive-topology": "cloud.google.com/gke-nodepool"}},
        "spec": {
            "network": {"enableDNSHostnames": True, "subdomain": args.name},
            "failurePolicy": {"maxRestarts": args.max_restarts,
                              "rules": [{"action": "FailJobSet", "onJobFailureReasons": ["PodFailurePolicy"]}]},
            "replicatedJobs": [{"name": REPLICATED_JOB, "replicas": args.num_slices,
                                "template": {"spec": job}}],
        },
    }


def xpk_command(args, train_args: list[str]) -> list[str]:
    # XPK sets the TPU and multi-slice environment itself; the command adds the training's own.
    env = training.environment(args, training.workdir_of(train_args))
    command = "".join(f"export {k}={shlex.quote(v)}; " for k, v in env.items()) + shlex.join(
        train_command(train_args, args.num_slices))
    return ["xpk", "workload", "create", "--cluster", args.cluster, "--workload", args.name,
            "--docker-image", args.image, "--tpu-type", f"{args.tpu}-{args.xpk_size}",
            "--num-slices", str(args.num_slices), "--max-restarts", str(args.max_restarts),
            "--termination-grace-period-seconds", str(args.grace_period),
            "--command", command] + (["--project", args.project] if args.project else []) + (
        ["--zone", args.zone] if args.zone else [])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", required=True, help="JobSet / workload name")
    p.add_argument("--image", required=True, help="container image with this project installed")
    p.add_argument("--tpu", choices=sorted(ACCELERATORS), default="v5p")
    p.add_argument("--topology", default="4x4x4", help="slice topology, e.g. 2x2x4 (v5p), 4x4 (v5e/v6e)")
    p.add_argument("--num-slices", type=int, default=1, help="slices; the `data` mesh axis spans them (DCN)")
    p.add_argument("--max-restarts", type=int, default=3, help="JobSet restarts; each resumes from the workdir")
    p.add_argument("--grace-period", type=int, default=300,
                   help="seconds between SIGTERM and SIGKILL: the preemption checkpoint must fit in it")
    p.add_argument("--service-account", default=None, help="Kubernetes service account with bucket access")
    p.add_argument("--data-bucket", default=None, help="bucket (or bucket/folder) mounted read-only with gcsfuse")
    p.add_argument("--data-mount", default="/mnt/data", help="where --data-bucket is mounted in the container")
    training.add_environment_flags(p)
    p.add_argument("--xpk", action="store_true", help="print/run an XPK command instead of a JobSet manifest")
    p.add_argument("--cluster", default=None, help="GKE cluster (XPK)")
    p.add_argument("--xpk-size", default=None, help="XPK size suffix, e.g. 128 for v5p-128 (default: 2 x chips "
                                                     "for v4/v5p, chips for v5e/v6e)")
    p.add_argument("--project", default=None)
    p.add_argument("--zone", default=None)
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then the train flags")
    args = p.parse_args(argv)
    train_args = training.train_flags(args.train_args)
    training.check_train_flags(p, train_args)
    if args.xpk:
        if not args.cluster:
            p.error("--xpk needs --cluster")
        if args.data_bucket:
            p.error("with --xpk, attach the data bucket with `xpk storage attach` and mount it there; "
                    "--data-bucket is for the JobSet manifest")
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
