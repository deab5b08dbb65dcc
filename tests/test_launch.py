"""Launchers: the exact commands and manifests their --dry-run prints."""
from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import yaml

from launch import gke, local, tpu_vm

REPO = Path(__file__).resolve().parents[1]
TRAIN = ["--config", "experiments/chameleon_7b.py", "--workdir", "gs://bucket/run"]


def dry_run(script, *args):
    out = subprocess.run([sys.executable, str(REPO / "launch" / script), *args], capture_output=True, text=True,
                         timeout=60, cwd=REPO)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_local_gives_every_process_the_coordinator_and_its_index():
    out = dry_run("local.py", "--processes", "2", "--devices", "2", "--port", "4321", "--timeout", "90", "--dry-run", "--",
                  "python", "-m", "chameleon_jax.train", "--workdir", "/tmp/x").splitlines()
    assert len(out) == 2
    for i, line in enumerate(out):
        argv = shlex.split(line)
        assert argv[:2] == ["JAX_PLATFORMS=cpu", "JAX_NUM_CPU_DEVICES=2"]
        assert argv[2:6] == ["timeout", "-k", "60", "90"]  # no process can outlive its timeout
        assert argv[-6:] == ["--coordinator_address", "127.0.0.1:4321", "--num_processes", "2", "--process_id", str(i)]


def test_local_stops_the_others_when_one_process_fails():
    rc = local.run([sys.executable, "-c", "import sys, time\n"
                    "i = sys.argv[sys.argv.index('--process_id') + 1]\n"
                    "sys.exit(7) if i == '1' else time.sleep(60)"], processes=2, timeout_s=30)
    assert rc == 7


def test_tpu_vm_dry_run_creates_installs_runs_on_all_workers_collects_and_deletes():
    lines = dry_run("tpu_vm.py", "--name", "cham", "--zone", "us-east5-a", "--project", "proj",
                    "--accelerator", "v5p-32", "--dry-run", "--", *TRAIN).splitlines()
    cmds = [shlex.split(line) for line in lines]
    verbs = [c[4] if c[0] == "gcloud" else c[0] for c in cmds]
    assert verbs == ["create", "git", "scp", "ssh", "ssh"] + ["scp"] * 4 + ["delete"]  # v5p-32: 16 chips, 4 hosts
    create = cmds[0]
    assert create[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "cham"]
    assert create[create.index("--accelerator-type") + 1] == "v5p-32" and "--project" in create
    train = cmds[4]
    assert "--worker=all" in train
    remote = train[train.index("--command") + 1]
    assert "python3 -m chameleon_jax.train --distributed --config experiments/chameleon_7b.py " \
           "--workdir gs://bucket/run" in remote
    assert [c[c.index("--worker=0") if "--worker=0" in c else -1] for c in cmds[5:6]] == ["--worker=0"]
    assert cmds[-1][4:6] == ["delete", "cham"] and "--quiet" in cmds[-1]


def test_tpu_vm_reuse_and_keep_skip_create_and_delete():
    cmds = [shlex.split(l) for l in dry_run("tpu_vm.py", "--name", "c", "--zone", "z", "--accelerator", "v6e-8",
                                            "--reuse", "--keep", "--dry-run", "--", *TRAIN).splitlines()]
    verbs = [c[4] if c[0] == "gcloud" else c[0] for c in cmds]
    assert verbs == ["git", "scp", "ssh", "ssh", "scp"]  # v6e-8 is one host


def test_worker_counts():
    assert [tpu_vm.workers_of(a) for a in ("v4-8", "v4-32", "v5p-128", "v5litepod-16", "v6e-8", "v6e-256")] == \
        [1, 4, 16, 4, 1, 64]


def test_gke_jobset_has_one_pod_per_host_with_the_train_command():
    manifest = yaml.safe_load(dry_run("gke.py", "--name", "cham", "--image", "img:1", "--tpu", "v5p",
                                      "--topology", "2x4x4", "--num-slices", "2", "--dry-run", "--", *TRAIN))
    assert manifest["kind"] == "JobSet"
    job = manifest["spec"]["replicatedJobs"][0]
    assert job["replicas"] == 2
    assert job["template"]["spec"]["parallelism"] == job["template"]["spec"]["completions"] == 8  # 32 chips / 4
    pod = job["template"]["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"cloud.google.com/gke-tpu-accelerator": "tpu-v5p-slice",
                                   "cloud.google.com/gke-tpu-topology": "2x4x4"}
    container = pod["containers"][0]
    assert container["command"] == ["python3", "-m", "chameleon_jax.train", "--distributed", *TRAIN]
    assert container["resources"]["limits"]["google.com/tpu"] == 4


def test_gke_xpk_command():
    cmd = shlex.split(dry_run("gke.py", "--name", "cham", "--image", "img:1", "--tpu", "v5p", "--topology",
                              "4x4x4", "--xpk", "--cluster", "c1", "--dry-run", "--", *TRAIN))
    assert cmd[:3] == ["xpk", "workload", "create"]
    assert cmd[cmd.index("--tpu-type") + 1] == "v5p-128"
    assert shlex.split(cmd[cmd.index("--command") + 1]) == ["python3", "-m", "chameleon_jax.train",
                                                           "--distributed", *TRAIN]
