"""Launchers: the exact commands and manifests their --dry-run prints."""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from launch import gke, local, tpu_vm, training

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


def test_tpu_vm_remote_script_fails_when_training_fails(tmp_path):
    # The exact script every worker runs, with a training command that crashes after some output.
    crash = [sys.executable, "-c", "import sys; print('step 1 loss=nan... crash'); sys.exit(7)"]
    log = tmp_path / "train.log"
    script = tpu_vm.remote_train_script(crash, {"PYTHONUNBUFFERED": "1"}, remote_dir=str(tmp_path), log=str(log))
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 7, done.stderr  # not tee's 0
    assert "crash" in log.read_text() and "crash" in done.stdout  # the log still gets the output
    # The same pipe without pipefail reports success: the bug this guards against.
    assert subprocess.run(["bash", "-c", script.replace("set -o pipefail; ", "")],
                          capture_output=True, timeout=60).returncode == 0


def test_tpu_vm_launcher_stops_at_and_returns_the_first_failure(tmp_path):
    after = tmp_path / "after"
    rc = tpu_vm.run_in_order([["true"], ["bash", "-c", "exit 5"], ["touch", str(after)]])
    assert rc == 5 and not after.exists()
    # Cleanup steps run regardless, and still report the failure.
    rc = tpu_vm.run_in_order([["bash", "-c", "exit 4"], ["touch", str(after)]], stop_on_failure=False)
    assert rc == 4 and after.exists()


def test_tpu_vm_restart_policy():
    decide = tpu_vm.after_failure
    assert decide(0, "", 0, 3) == "done"
    assert decide(1, "READY\n", 0, 3) == "rerun"          # a crashed host: rerun on the same slice
    assert decide(137, "PREEMPTED\n", 1, 3) == "recreate"  # the slice is gone: create it again
    assert decide(1, "READY", 3, 3) == "give_up"           # restarts used up
    assert decide(training.NON_FINITE_EXIT, "READY", 0, 3) == "give_up"  # would diverge again


def test_tpu_vm_mounts_the_data_bucket_sets_the_environment_and_needs_a_bucket_workdir():
    cmds = [shlex.split(l) for l in dry_run("tpu_vm.py", "--name", "c", "--zone", "z", "--accelerator", "v5p-64",
                                            "--data-bucket", "bkt/tokens", "--env", "XLA_FLAGS=--x", "--dry-run",
                                            "--", *TRAIN).splitlines()]
    remote = [c[c.index("--command") + 1] for c in cmds if "--command" in c]
    mount = next(r for r in remote if "gcsfuse" in r)
    assert "--implicit-dirs -o ro --only-dir tokens bkt /mnt/data" in mount
    train = next(r for r in remote if "chameleon_jax.train" in r)
    assert "set -o pipefail;" in train and "export JAX_COMPILATION_CACHE_DIR=gs://bucket/run/jax_cache;" in train
    assert "export XLA_FLAGS=--x;" in train
    assert remote.index(mount) < remote.index(train)
    bad = subprocess.run([sys.executable, str(REPO / "launch/tpu_vm.py"), "--name", "c", "--zone", "z", "--dry-run",
                          "--", "--config", "x.py", "--workdir", "/tmp/run"], capture_output=True, text=True)
    assert bad.returncode != 0 and "gs://BUCKET/run" in bad.stderr


def test_tpu_vm_reuse_and_keep_skip_create_and_delete():
    cmds = [shlex.split(l) for l in dry_run("tpu_vm.py", "--name", "c", "--zone", "z", "--accelerator", "v6e-8",
                                            "--reuse", "--keep", "--dry-run", "--", *TRAIN).splitlines()]
    verbs = [c[4] if c[0] == "gcloud" else c[0] for c in cmds]
    assert verbs == ["git", "scp", "ssh", "ssh", "scp"]  # v6e-8 is one host


@pytest.mark.parametrize("script, own", [("tpu_vm.py", ["--name", "c", "--zone", "z"]),
                                         ("gke.py", ["--name", "c", "--image", "img:1"])])
def test_pod_launchers_refuse_a_local_workdir_and_missing_train_flags(script, own):
    # Both run as scripts and share launch/training.py's checks (imported as a sibling module).
    for train, says in ((["--config", "x.py", "--workdir", "/tmp/run"], "use --workdir gs://BUCKET/run"),
                        (["--workdir", "gs://b/run"], "at least --config")):
        bad = subprocess.run([sys.executable, str(REPO / "launch" / script), *own, "--dry-run", "--", *train],
                             capture_output=True, text=True, timeout=60, cwd="/")
        assert bad.returncode == 2 and says in bad.stderr, bad.stderr


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
    # The mesh is told how many slices it spans, so its DCN axis lies across them.
    assert container["command"] == ["python3", "-m", "chameleon_jax.train", "--distributed", *TRAIN,
                                    "--config.mesh.slices=2"]
    assert container["resources"]["limits"]["google.com/tpu"] == 4
    assert pod["terminationGracePeriodSeconds"] >= 60  # room for the preemption checkpoint after SIGTERM


# What JobSet writes on each pod it creates (the fields a manifest may read through the downward API),
# and the DNS name it gives the pod: <jobset>-<replicated job>-<job index>-<pod index>.<subdomain>.
def jobset_pod(manifest, job_index, pod_index):
    rjob = manifest["spec"]["replicatedJobs"][0]
    fields = {
        "metadata.annotations['jobset.sigs.k8s.io/jobset-name']": manifest["metadata"]["name"],
        "metadata.annotations['jobset.sigs.k8s.io/replicatedjob-name']": rjob["name"],
        "metadata.labels['jobset.sigs.k8s.io/job-index']": str(job_index),
        "metadata.labels['jobset.sigs.k8s.io/replicatedjob-replicas']": str(rjob["replicas"]),
        "metadata.annotations['batch.kubernetes.io/job-completion-index']": str(pod_index),
    }
    env = {}
    for var in rjob["template"]["spec"]["template"]["spec"]["containers"][0]["env"]:
        if "valueFrom" in var:
            env[var["name"]] = fields[var["valueFrom"]["fieldRef"]["fieldPath"]]
        else:  # Kubernetes expands $(VAR) from the variables defined above it, and leaves others as they are
            env[var["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m[1], m[0]), var["value"])
    subdomain = manifest["spec"]["network"]["subdomain"]
    return f"{manifest['metadata']['name']}-{rjob['name']}-{job_index}-{pod_index}.{subdomain}", env


def test_gke_multislice_pods_get_what_jax_distributed_reads(monkeypatch):
    from jax._src.clusters import cloud_tpu_cluster as tpu_cluster

    manifest = yaml.safe_load(dry_run("gke.py", "--name", "cham", "--image", "img:1", "--tpu", "v5p", "--topology",
                                      "2x2x4", "--num-slices", "3", "--dry-run", "--", *TRAIN))
    rjob = manifest["spec"]["replicatedJobs"][0]
    hosts = rjob["template"]["spec"]["parallelism"]
    assert (rjob["replicas"], hosts) == (3, 4)
    by_process = {}
    for s in range(3):
        for i in range(hosts):
            name, env = jobset_pod(manifest, s, i)
            for key in [k for k in os.environ if k.startswith(("TPU_", "MEGASCALE_"))]:
                monkeypatch.delenv(key)
            for key, value in env.items():
                monkeypatch.setenv(key, value)
            cluster = tpu_cluster.GkeTpuCluster
            workers = cluster._get_worker_list_in_slice()
            assert workers[int(env["TPU_WORKER_ID"])] == name  # the slice's host list names this pod
            assert cluster.get_process_count() == 3 * hosts
            by_process[cluster.get_process_id()] = (name, env["MEGASCALE_COORDINATOR_ADDRESS"])
    assert sorted(by_process) == list(range(3 * hosts))  # one process per pod, none twice
    first_pod = by_process[0][0]
    assert {coordinator for _, coordinator in by_process.values()} == {first_pod}  # everyone dials process 0
    ports = {p["containerPort"] for p in rjob["template"]["spec"]["template"]["spec"]["containers"][0]["ports"]}
    assert int(env["MEGASCALE_PORT"]) in ports and int(tpu_cluster.coordinator_port) in ports


def test_gke_data_bucket_is_a_read_only_gcsfuse_volume():
    manifest = yaml.safe_load(dry_run("gke.py", "--name", "cham", "--image", "img:1", "--data-bucket", "bkt/tokens",
                                      "--data-mount", "/data", "--dry-run", "--", *TRAIN))
    template = manifest["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]
    assert template["metadata"]["annotations"]["gke-gcsfuse/volumes"] == "true"
    volume, = template["spec"]["volumes"]
    assert volume["csi"]["driver"] == "gcsfuse.csi.storage.gke.io" and volume["csi"]["readOnly"]
    assert volume["csi"]["volumeAttributes"] == {"bucketName": "bkt", "mountOptions": "implicit-dirs,only-dir=tokens"}
    mount, = template["spec"]["containers"][0]["volumeMounts"]
    assert mount == {"name": volume["name"], "mountPath": "/data", "readOnly": True}


def test_gke_xpk_command():
    cmd = shlex.split(dry_run("gke.py", "--name", "cham", "--image", "img:1", "--tpu", "v5p", "--topology",
                              "4x4x4", "--xpk", "--cluster", "c1", "--dry-run", "--", *TRAIN))
    assert cmd[:3] == ["xpk", "workload", "create"]
    assert cmd[cmd.index("--tpu-type") + 1] == "v5p-128"
    command = cmd[cmd.index("--command") + 1]
    assert command.endswith(shlex.join(["python3", "-m", "chameleon_jax.train", "--distributed", *TRAIN]))
    assert "export JAX_COMPILATION_CACHE_DIR=gs://bucket/run/jax_cache;" in command
    assert int(cmd[cmd.index("--termination-grace-period-seconds") + 1]) >= 60


def runbook_commands() -> list[list[str]]:
    """The shell commands in docs/runbook-pod.md's bash blocks, continuation lines joined."""
    text = (REPO / "docs" / "runbook-pod.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    return [shlex.split(cmd) for block in blocks for cmd in block.replace("\\\n", " ").splitlines() if cmd.strip()]


def test_every_runbook_command_runs_in_dry_run():
    cmds = runbook_commands()
    actions = [c[2] for c in cmds]
    assert actions == ["launch", "watch", "preempt", "launch", "delete"]  # create, watch, preempt, resume, delete
    for c in cmds:
        assert c[:2] == ["python", "launch/tpu_vm.py"], c
        cut = c.index("--") if "--" in c else len(c)
        printed = dry_run("tpu_vm.py", *c[2:cut], "--dry-run", *c[cut:])
        assert printed.startswith("gcloud ") or printed.startswith("git "), printed
    resume = [shlex.split(l) for l in dry_run("tpu_vm.py", *cmds[3][2:cmds[3].index("--")], "--dry-run",
                                                *cmds[3][cmds[3].index("--"):]).splitlines()]
    assert not any(c[4:5] == ["create"] for c in resume if c[0] == "gcloud")  # --reuse: the same slice


def test_local_asks_a_hung_process_for_its_stacks_before_the_timeout(capfd):
    # Process 0 hangs with a SIGUSR1 stack dump registered (as chameleon_jax.train does), process 1 hangs
    # without one: the launcher shows process 0's stack and must not end process 1 with the signal.
    hang = ("import faulthandler, signal, sys, time\n"
            "if sys.argv[sys.argv.index('--process_id') + 1] == '0':\n"
            "    faulthandler.register(signal.SIGUSR1, all_threads=True)\n"
            "def waiting_for_a_peer():\n"
            "    time.sleep(600)\n"
            "waiting_for_a_peer()\n")
    rc = local.run([sys.executable, "-c", hang], processes=2, timeout_s=local.STACK_DUMP_LEAD_S + 5)
    out, err = capfd.readouterr()
    assert rc == 124, out + err  # both ran past the timeout; SIGUSR1 killed neither
    assert "asking every process for its Python stacks" in err
    assert "[0] " in out and "in waiting_for_a_peer" in out, out
